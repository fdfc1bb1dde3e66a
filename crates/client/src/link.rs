//! Glue between steadfast and `mqtt-protocol-core`, used as the packet
//! codec: it builds and parses every packet for either protocol version
//! (what arrives is cut into packets by `frame`), but for the PUBLISH a producer sends and the
//! PUBLISH and acknowledgement a consumer takes and answers, which are
//! written and read here (and in `decode`) byte for byte as the codec
//! does, property tests comparing the two.
//! The delivery state machine (send window, resumption, keep-alive) is
//! ours, in `steadfast-core`: one owner of in-flight state, not two.

use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0, Property};
use mqtt_protocol_core::mqtt::prelude::*;
use mqtt_protocol_core::mqtt::result_code::MqttError;
use steadfast_core::engine::{Ack, AckWire};
use steadfast_core::receipt::RECEIPT_PROPERTY;
use steadfast_core::{Identity, Qos};
use steadfast_store::{Outbox, StoredMessage};

use crate::config::{BrokerUrl, ClientConfig, ProtocolVersion};
use crate::error::{CloseReason, ConnectError, Refusal};
use crate::frame::{FrameError, Framer, Raw};
use crate::transport::{self, io_error, ReadHalf, WriteHalf};

/// The codec state of one TCP connection.
pub(crate) struct Link {
    version: ProtocolVersion,
    envelope: bool,
    framer: Framer,
    max_packet: Option<u32>,
    /// Bytes waiting to be written to the socket.
    pub out: Vec<u8>,
}

/// The receiving engine's view of a link's codec (a consumer's receiver,
/// doctor's probes).
pub(crate) struct LinkAcks<'a>(pub &'a mut Link);

impl AckWire for LinkAcks<'_> {
    fn ack(&mut self, pid: u16, qos: Qos, out: &mut Vec<u8>) {
        put_ack(pid, qos, out);
    }

    fn pubcomp(&mut self, pid: u16) -> Vec<u8> {
        self.0.encoded("PUBCOMP", |l| l.pubcomp(pid))
    }

    fn ping(&mut self) -> Vec<u8> {
        self.0.encoded("PINGREQ", Link::ping)
    }
}

/// What the broker told us, version-independent.
#[derive(Debug)]
pub(crate) enum Incoming {
    ConnAck(ConnAck),
    /// PUBACK, PUBREC or PUBCOMP: what the publishing engine takes (a
    /// reason code from 0x80 on, MQTT 5, refuses the message).
    Ack(Ack),
    Publish(Inbound),
    PubRel {
        pid: u16,
    },
    SubAck {
        /// Per filter: the QoS granted, or `None` when refused.
        granted: Vec<Option<u8>>,
    },
    PingResp,
    Disconnect {
        reason: String,
    },
    Other,
    /// A malformed or forbidden packet: the link must end.
    Broken(ConnectError),
}

/// A PUBLISH from the broker.
#[derive(Debug, Clone)]
pub(crate) struct Inbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub pid: Option<u16>,
    pub retain: bool,
    pub dup: bool,
    /// The `steadfast-id` user property (MQTT 5), as sent.
    pub identity: Option<String>,
    /// The receipts topic its producer asks a receipt at (the
    /// `steadfast-receipt` user property, MQTT 5), as sent.
    pub receipt: Option<String>,
    /// Its other MQTT 5 properties (the identity left out).
    pub props: InProps,
    /// MQTT 5 message expiry interval: seconds it has left, as sent.
    pub expiry_secs: Option<u32>,
}

/// The MQTT 5 properties a delivery came with, boxed when it has any:
/// most have none, and a delivery moves through several queues on its
/// way to the application (a `Properties` inline was a third of its size,
/// copied at each move; docs/performance.md, session 26).
#[derive(Clone, Default)]
pub(crate) struct InProps(Option<Box<steadfast_core::Properties>>);

/// None and an empty box are the same properties.
impl PartialEq for InProps {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for InProps {}

/// What a delivery without properties has.
static NO_PROPS: steadfast_core::Properties = steadfast_core::Properties {
    content_type: None,
    response_topic: None,
    correlation_data: None,
    payload_is_utf8: false,
    user: Vec::new(),
};

impl InProps {
    /// The properties (none set when it came without).
    pub fn get(&self) -> &steadfast_core::Properties {
        self.0.as_deref().unwrap_or(&NO_PROPS)
    }

    /// The properties, to set one.
    pub fn get_mut(&mut self) -> &mut steadfast_core::Properties {
        self.0.get_or_insert_with(Default::default)
    }
}

impl std::fmt::Debug for InProps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// The broker's answer to CONNECT.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConnAck {
    pub session_present: bool,
    pub refused: Option<Refusal>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    /// MQTT 5: the highest QoS the broker takes (absent: 2).
    pub maximum_qos: Option<u8>,
    /// MQTT 5: false when the broker does not keep retained messages.
    pub retain_available: Option<bool>,
    /// MQTT 5: the session expiry the broker imposes instead of ours.
    pub session_expiry: Option<u32>,
}

fn qos_to_mqtt(q: Qos) -> mqtt::packet::Qos {
    match q {
        Qos::AtMostOnce => mqtt::packet::Qos::AtMostOnce,
        Qos::AtLeastOnce => mqtt::packet::Qos::AtLeastOnce,
        Qos::ExactlyOnce => mqtt::packet::Qos::ExactlyOnce,
    }
}

#[cfg(test)]
fn qos_from_mqtt(q: mqtt::packet::Qos) -> Qos {
    match q {
        mqtt::packet::Qos::AtMostOnce => Qos::AtMostOnce,
        mqtt::packet::Qos::AtLeastOnce => Qos::AtLeastOnce,
        mqtt::packet::Qos::ExactlyOnce => Qos::ExactlyOnce,
    }
}

fn build_err(what: &str, e: MqttError) -> ConnectError {
    ConnectError::Protocol(format!("cannot build {what}: {e}"))
}

fn malformed(what: &str, e: MqttError) -> ConnectError {
    ConnectError::Protocol(format!("the broker sent a malformed {what}: {e}"))
}

impl Link {
    /// A link speaking `version`; with `envelope`, MQTT 3.1.1 payloads carry
    /// the message identity in front ([`Identity::wrap`]). A packet from the
    /// broker over `max_packet` bytes ends the link before anything is
    /// allocated for it.
    pub fn new(version: ProtocolVersion, envelope: bool, max_packet: Option<u32>) -> Self {
        let framer = Framer::new(max_packet);
        Self { version, envelope, framer, max_packet, out: Vec::with_capacity(64 * 1024) }
    }

    fn emit(&mut self, packet: &impl GenericPacketTrait) {
        self.out.extend_from_slice(&packet.to_continuous_buffer());
    }

    /// Queues the CONNECT packet; `clean` asks for a fresh session.
    pub fn connect(&mut self, c: &ClientConfig, clean: bool) -> Result<(), ConnectError> {
        let keep_alive = c.keep_alive.as_secs().clamp(1, u16::MAX as u64) as u16;
        let err = |e| build_err("CONNECT", e);
        match self.version {
            ProtocolVersion::V5 => {
                let expiry = c.session_expiry.as_secs().min(u32::MAX as u64) as u32;
                let mut props = Vec::new();
                if expiry > 0 {
                    props.push(Property::SessionExpiryInterval(
                        mqtt::packet::SessionExpiryInterval::new(expiry).map_err(err)?,
                    ));
                }
                // How many unacknowledged PUBLISHes the broker may send us:
                // a consumer's back-pressure.
                props.push(Property::ReceiveMaximum(mqtt::packet::ReceiveMaximum::new(c.max_inflight).map_err(err)?));
                // The largest packet we take: a broker that knows it
                // does not send bigger ones (it skips them for us).
                if let Some(max) = c.max_packet_size {
                    props.push(Property::MaximumPacketSize(mqtt::packet::MaximumPacketSize::new(max).map_err(err)?));
                }
                let mut b = v5_0::Connect::builder()
                    .client_id(c.client_id.as_str())
                    .map_err(err)?
                    .clean_start(clean)
                    .keep_alive(keep_alive)
                    .props(props);
                if let Some(u) = &c.username {
                    b = b.user_name(u.as_str()).map_err(err)?;
                }
                if let Some(p) = &c.password {
                    b = b.password(p).map_err(err)?;
                }
                let p = b.build().map_err(err)?;
                self.emit(&p);
            }
            ProtocolVersion::V311 => {
                let mut b = v3_1_1::Connect::builder()
                    .client_id(c.client_id.as_str())
                    .map_err(err)?
                    .clean_session(clean)
                    .keep_alive(keep_alive);
                if let Some(u) = &c.username {
                    b = b.user_name(u.as_str()).map_err(err)?;
                }
                if let Some(p) = &c.password {
                    b = b.password(p).map_err(err)?;
                }
                let p = b.build().map_err(err)?;
                self.emit(&p);
            }
        }
        Ok(())
    }

    /// The encoded PUBLISH for `m` (not queued); `producer` is the producer
    /// id of its identity.
    ///
    /// `receipts` is the producer's receipts topic: a message that asks
    /// for receipts carries it (MQTT 5, a user property) or the envelope's
    /// receipt flag (MQTT 3.1.1).
    pub fn encode_publish(
        &self,
        m: &StoredMessage,
        producer: &str,
        receipts: Option<&str>,
        pid: Option<u16>,
        dup: bool,
    ) -> Result<Vec<u8>, ConnectError> {
        let mut out = Vec::new();
        self.encode_publish_into(&mut out, m, producer, receipts, pid, dup)?;
        Ok(out)
    }

    /// [`Link::encode_publish`] appended to `out` (left as it was on an
    /// error).
    pub fn encode_publish_into(
        &self,
        out: &mut Vec<u8>,
        m: &StoredMessage,
        producer: &str,
        receipts: Option<&str>,
        pid: Option<u16>,
        dup: bool,
    ) -> Result<(), ConnectError> {
        let receipt_to = receipts.filter(|_| m.msg.receipts.is_some() && m.id != 0);
        match self.version {
            ProtocolVersion::V5 => {
                let props = publish_props(m, producer, receipt_to, steadfast_store::now_ms);
                if publish_v5(out, m, &props, pid, dup).is_none() {
                    // The codec says what is wrong.
                    out.extend(build_v5(m, &props, pid, dup)?.to_continuous_buffer());
                }
            }
            ProtocolVersion::V311 => {
                // An empty retained message clears the topic's retained
                // message: in an envelope it would be one instead.
                let enveloped = self.envelope && m.id != 0 && !m.msg.clears_retained();
                let origin = if enveloped { origin(&m.msg.props) } else { None };
                let envelope = enveloped.then(|| {
                    // An origin too long for the envelope travels under ours.
                    let fits = |(origin, _): &(&str, u64)| origin.len() <= Identity::ENVELOPE_MAX_PRODUCER;
                    // A bridge passes its producer's ask on among the properties.
                    let asking = receipt_to.is_some() || relays_ask(&m.msg.props);
                    match origin.filter(fits) {
                        Some((origin, seq)) => (origin, seq, asking),
                        None => (producer, m.id, asking),
                    }
                });
                if publish_v311(out, m, envelope, pid, dup).is_none() {
                    // The codec says what is wrong.
                    let payload = match envelope {
                        Some((p, seq, asking)) => Identity::wrap_asking(p, seq, &m.msg.payload, asking),
                        None => m.msg.payload.clone(),
                    };
                    out.extend(build_v311(m, &payload, pid, dup)?.to_continuous_buffer());
                }
            }
        }
        Ok(())
    }

    /// Queues a PUBLISH.
    pub fn publish(
        &mut self,
        m: &StoredMessage,
        producer: &str,
        pid: Option<u16>,
        dup: bool,
    ) -> Result<(), ConnectError> {
        let mut out = std::mem::take(&mut self.out);
        let r = self.encode_publish_into(&mut out, m, producer, None, pid, dup);
        self.out = out;
        r
    }

    /// Queues a PUBREL.
    pub fn pubrel(&mut self, pid: u16) -> Result<(), ConnectError> {
        let err = |e| build_err("PUBREL", e);
        match self.version {
            ProtocolVersion::V5 => {
                let p = v5_0::Pubrel::builder().packet_id(pid).build().map_err(err)?;
                self.emit(&p);
            }
            ProtocolVersion::V311 => {
                let p = v3_1_1::Pubrel::builder().packet_id(pid).build().map_err(err)?;
                self.emit(&p);
            }
        }
        Ok(())
    }

    /// Queues a SUBSCRIBE for `filters`; `retain_as_published`: the MQTT 5
    /// option of that name on each (3.1.1 has none).
    pub fn subscribe(
        &mut self,
        pid: u16,
        filters: &[(String, Qos)],
        retain_as_published: bool,
    ) -> Result<(), ConnectError> {
        let err = |e| build_err("SUBSCRIBE", e);
        let rap = retain_as_published && self.version == ProtocolVersion::V5;
        let entries = filters
            .iter()
            .map(|(f, q)| {
                let opts = mqtt::packet::SubOpts::new().set_qos(qos_to_mqtt(*q)).set_rap(rap);
                mqtt::packet::SubEntry::new(f.as_str(), opts)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        match self.version {
            ProtocolVersion::V5 => {
                let p = v5_0::Subscribe::builder().packet_id(pid).entries(entries).build().map_err(err)?;
                self.emit(&p);
            }
            ProtocolVersion::V311 => {
                let p = v3_1_1::Subscribe::builder().packet_id(pid).entries(entries).build().map_err(err)?;
                self.emit(&p);
            }
        }
        Ok(())
    }

    /// Queues the acknowledgement of a received PUBLISH: PUBACK for QoS 1,
    /// PUBREC for QoS 2, as the codec builds it: what `put_ack` writes
    /// must equal it.
    #[cfg(test)]
    pub fn ack_publish(&mut self, pid: u16, qos: Qos) -> Result<(), ConnectError> {
        let err = |e| build_err("PUBACK", e);
        match (self.version, qos) {
            (ProtocolVersion::V5, Qos::ExactlyOnce) => {
                self.emit(&v5_0::Pubrec::builder().packet_id(pid).build().map_err(err)?)
            }
            (ProtocolVersion::V5, _) => self.emit(&v5_0::Puback::builder().packet_id(pid).build().map_err(err)?),
            (ProtocolVersion::V311, Qos::ExactlyOnce) => {
                self.emit(&v3_1_1::Pubrec::builder().packet_id(pid).build().map_err(err)?)
            }
            (ProtocolVersion::V311, _) => self.emit(&v3_1_1::Puback::builder().packet_id(pid).build().map_err(err)?),
        }
        Ok(())
    }

    /// Queues a PUBCOMP (the answer to PUBREL).
    pub fn pubcomp(&mut self, pid: u16) -> Result<(), ConnectError> {
        let err = |e| build_err("PUBCOMP", e);
        match self.version {
            ProtocolVersion::V5 => self.emit(&v5_0::Pubcomp::builder().packet_id(pid).build().map_err(err)?),
            ProtocolVersion::V311 => self.emit(&v3_1_1::Pubcomp::builder().packet_id(pid).build().map_err(err)?),
        }
        Ok(())
    }

    /// Queues a PINGREQ.
    pub fn ping(&mut self) -> Result<(), ConnectError> {
        match self.version {
            ProtocolVersion::V5 => self.emit(&v5_0::Pingreq::new()),
            ProtocolVersion::V311 => self.emit(&v3_1_1::Pingreq::new()),
        }
        Ok(())
    }

    /// The bytes of one packet that `queue` writes, taken from the output
    /// (what was queued before stays). Building fails only for a packet id
    /// of 0, which no window hands out: logged, and nothing is sent.
    pub fn encoded(&mut self, what: &str, queue: impl FnOnce(&mut Link) -> Result<(), ConnectError>) -> Vec<u8> {
        let start = self.out.len();
        if let Err(e) = queue(self) {
            tracing::error!(error = %e, "cannot build a {what}");
        }
        self.out.split_off(start)
    }

    /// Queues a normal DISCONNECT.
    pub fn disconnect(&mut self) {
        match self.version {
            ProtocolVersion::V5 => {
                if let Ok(d) = v5_0::Disconnect::builder().build() {
                    self.emit(&d);
                }
            }
            ProtocolVersion::V311 => self.emit(&v3_1_1::Disconnect::new()),
        }
    }

    /// Feeds received bytes; returns the packets they completed, in order.
    /// A malformed or unexpected packet ends the list as `Broken`: the
    /// packets before it still count (their acks must not be lost), the
    /// link ends after them.
    pub fn receive(&mut self, data: &[u8]) -> Vec<Incoming> {
        let mut incoming = Vec::new();
        self.receive_into(data, &mut incoming);
        incoming
    }

    /// [`Link::receive`] appended to `incoming`: a reader that keeps one
    /// vector across its reads does not grow a new one for each (a read
    /// of 64 KiB holds hundreds of PUBLISHes).
    pub fn receive_into(&mut self, data: &[u8], incoming: &mut Vec<Incoming>) {
        let v5 = self.version == ProtocolVersion::V5;
        let cut = self.framer.feed(data, |raw| match Self::decode(v5, &raw) {
            Ok(packet) => {
                incoming.push(packet);
                true
            }
            Err(e) => {
                incoming.push(Incoming::Broken(e));
                false
            }
        });
        match cut {
            Ok(()) => {}
            Err(FrameError::TooLarge) => {
                let max = self.max_packet.unwrap_or(u32::MAX);
                incoming.push(Incoming::Broken(ConnectError::IncomingTooLarge { max }));
            }
            Err(FrameError::Malformed) => {
                incoming.push(Incoming::Broken(malformed("packet", MqttError::MalformedPacket)));
            }
        }
    }

    fn decode(v5: bool, raw: &Raw<'_>) -> Result<Incoming, ConnectError> {
        Ok(match raw.packet_type() {
            // A broker without MQTT 5 may answer with a 3.1.1 CONNACK
            // refusing the version (code 1), which MQTT 5 allows.
            2 if v5 && raw.body() == [0, 1] => {
                Incoming::ConnAck(ConnAck { refused: Some(Refusal::ProtocolVersion), ..Default::default() })
            }
            2 if v5 => connack_v5(parse(raw, "CONNACK", v5_0::Connack::parse)?),
            2 => connack_v311(parse(raw, "CONNACK", v3_1_1::Connack::parse)?),
            3 => Incoming::Publish(
                crate::decode::publish(raw.flags(), raw.body(), v5).map_err(|e| malformed("PUBLISH", e))?,
            ),
            6 if v5 => Incoming::PubRel { pid: parse(raw, "PUBREL", v5_0::Pubrel::parse)?.packet_id() },
            6 => Incoming::PubRel { pid: parse(raw, "PUBREL", v3_1_1::Pubrel::parse)?.packet_id() },
            9 if v5 => {
                let a = parse(raw, "SUBACK", v5_0::Suback::parse)?;
                let granted = a.reason_codes().iter().map(|c| c.is_success().then_some(*c as u8)).collect();
                Incoming::SubAck { granted }
            }
            9 => {
                let a = parse(raw, "SUBACK", v3_1_1::Suback::parse)?;
                let granted = a.return_codes().iter().map(|c| c.is_success().then_some(*c as u8)).collect();
                Incoming::SubAck { granted }
            }
            4 if v5 => {
                let (pid, code) = crate::decode::ack_v5(raw.body()).map_err(|e| malformed("PUBACK", e))?;
                Incoming::Ack(Ack::PubAck { pid, code })
            }
            4 => Incoming::Ack(Ack::PubAck { pid: parse(raw, "PUBACK", v3_1_1::Puback::parse)?.packet_id(), code: 0 }),
            5 if v5 => {
                let (pid, code) = crate::decode::ack_v5(raw.body()).map_err(|e| malformed("PUBREC", e))?;
                Incoming::Ack(Ack::PubRec { pid, code })
            }
            5 => Incoming::Ack(Ack::PubRec { pid: parse(raw, "PUBREC", v3_1_1::Pubrec::parse)?.packet_id(), code: 0 }),
            7 if v5 => Incoming::Ack(Ack::PubComp {
                pid: crate::decode::ack_v5(raw.body()).map_err(|e| malformed("PUBCOMP", e))?.0,
            }),
            7 => Incoming::Ack(Ack::PubComp { pid: parse(raw, "PUBCOMP", v3_1_1::Pubcomp::parse)?.packet_id() }),
            13 => Incoming::PingResp,
            14 if v5 => {
                let d = parse(raw, "DISCONNECT", v5_0::Disconnect::parse)?;
                Incoming::Disconnect {
                    reason: d.reason_code().map(|r| r.to_string()).unwrap_or_else(|| "normal".into()),
                }
            }
            11 | 15 => Incoming::Other,
            t => {
                return Err(ConnectError::Protocol(format!(
                    "the broker sent packet type {t}, which a server must not send"
                )))
            }
        })
    }
}

/// Appends PUBACK (QoS 1) or PUBREC (QoS 2) for `pid` with success, in
/// its four bytes, the same in MQTT 3.1.1 and 5 (MQTT 5 leaves a success
/// reason code out when there are no properties): byte for byte what the
/// codec's builders write (`Link::ack_publish`; a test compares them),
/// without building a packet per acknowledgement. Packet id 0, which a
/// PUBLISH at QoS 1 or 2 must not carry, is logged and not acknowledged,
/// as the builders refuse it.
fn put_ack(pid: u16, qos: Qos, out: &mut Vec<u8>) {
    if pid == 0 {
        tracing::error!("cannot build a PUBACK for packet id 0");
        return;
    }
    let kind = if qos == Qos::ExactlyOnce { 0x50 } else { 0x40 };
    let [hi, lo] = pid.to_be_bytes();
    out.extend_from_slice(&[kind, 2, hi, lo]);
}

/// The PUBLISH as the codec parses it: what [`crate::decode::publish`]
/// must agree with.
#[cfg(test)]
fn publish_by_codec(flags: u8, body: &[u8], v5: bool) -> Result<Inbound, MqttError> {
    let data: std::sync::Arc<[u8]> = body.into();
    if v5 {
        let (p, _) = v5_0::Publish::parse(flags, data)?;
        let identity = p.props.iter().find_map(|prop| match prop {
            Property::UserProperty(u) if u.key() == Identity::USER_PROPERTY => Some(u.val().to_owned()),
            _ => None,
        });
        let (topic, payload) = (p.topic_name(), p.payload().as_slice());
        let mut m = inbound(topic, payload, p.qos(), p.packet_id(), p.retain(), p.dup(), identity);
        for prop in p.props.iter() {
            match prop {
                Property::UserProperty(u) if u.key() == RECEIPT_PROPERTY => m.receipt = Some(u.val().to_owned()),
                Property::UserProperty(u) if u.key() != Identity::USER_PROPERTY => {
                    m.props.get_mut().user.push((u.key().to_owned(), u.val().to_owned()))
                }
                Property::ContentType(v) => m.props.get_mut().content_type = Some(v.val().to_owned()),
                Property::ResponseTopic(v) => m.props.get_mut().response_topic = Some(v.val().to_owned()),
                Property::CorrelationData(v) => m.props.get_mut().correlation_data = Some(v.val().to_vec()),
                Property::PayloadFormatIndicator(v) => m.props.get_mut().payload_is_utf8 = v.val() == 1,
                Property::MessageExpiryInterval(v) => m.expiry_secs = Some(v.val()),
                _ => {}
            }
        }
        Ok(m)
    } else {
        let (p, _) = v3_1_1::Publish::parse(flags, data)?;
        let (topic, payload) = (p.topic_name(), p.payload().as_slice());
        Ok(inbound(topic, payload, p.qos(), p.packet_id(), p.retain(), p.dup(), None))
    }
}

#[cfg(test)]
fn inbound(
    topic: &str,
    payload: &[u8],
    qos: mqtt::packet::Qos,
    pid: Option<u16>,
    retain: bool,
    dup: bool,
    identity: Option<String>,
) -> Inbound {
    Inbound {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: qos_from_mqtt(qos),
        pid,
        retain,
        dup,
        identity,
        receipt: None,
        props: InProps::default(),
        expiry_secs: None,
    }
}

/// Parses a packet body that must be consumed exactly.
fn parse<T>(
    raw: &Raw<'_>,
    what: &str,
    f: impl FnOnce(&[u8]) -> Result<(T, usize), MqttError>,
) -> Result<T, ConnectError> {
    match f(raw.body()) {
        Ok((packet, used)) if used == raw.body().len() => Ok(packet),
        Ok(_) => Err(malformed(what, MqttError::MalformedPacket)),
        Err(e) => Err(malformed(what, e)),
    }
}

/// A message outside any outbox (`id` 0: no identity on the wire), for
/// probes and tests that speak MQTT directly.
pub(crate) fn loose_message(id: u64, topic: &str, payload: &[u8], qos: Qos, retain: bool) -> StoredMessage {
    StoredMessage {
        id,
        msg: std::sync::Arc::new(steadfast_store::NewMessage {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            qos,
            retain,
            props: Default::default(),
            created_ms: 0,
            route: None,
            policy: Default::default(),
            receipts: None,
        }),
        wire: None,
        acks: 0,
        attempts: 0,
    }
}

/// The identity a forwarded message keeps ([`crate::Message::origin`]).
fn origin(p: &steadfast_core::Properties) -> Option<(&str, u64)> {
    let v = p.user.iter().find(|(k, _)| k == Identity::USER_PROPERTY)?;
    Identity::property_value_parts(&v.1)
}

/// A forwarded message that passes its producer's ask for receipts on
/// (MQTT 5: the property travels as it is; MQTT 3.1.1: the envelope's flag).
fn relays_ask(p: &steadfast_core::Properties) -> bool {
    p.user.iter().any(|(k, _)| k == RECEIPT_PROPERTY)
}

fn build_v5(
    m: &StoredMessage,
    props: &PublishProps<'_>,
    pid: Option<u16>,
    dup: bool,
) -> Result<v5_0::Publish, ConnectError> {
    let err = |e| build_err("PUBLISH", e);
    let mut built: Vec<Property> = Vec::new();
    props.try_each(|p| -> Result<(), ConnectError> {
        built.push(match p {
            PublishProp::Utf8 => Property::PayloadFormatIndicator(
                mqtt::packet::PayloadFormatIndicator::new(mqtt::packet::PayloadFormat::String).map_err(err)?,
            ),
            PublishProp::ContentType(v) => Property::ContentType(mqtt::packet::ContentType::new(v).map_err(err)?),
            PublishProp::ResponseTopic(v) => Property::ResponseTopic(mqtt::packet::ResponseTopic::new(v).map_err(err)?),
            PublishProp::Correlation(v) => {
                Property::CorrelationData(mqtt::packet::CorrelationData::new(v).map_err(err)?)
            }
            PublishProp::User(k, v) => Property::UserProperty(mqtt::packet::UserProperty::new(k, v).map_err(err)?),
            PublishProp::Identity(producer, seq) => Property::UserProperty(
                mqtt::packet::UserProperty::new(Identity::USER_PROPERTY, Identity::property_value(producer, seq))
                    .map_err(err)?,
            ),
            PublishProp::Expiry(secs) => {
                Property::MessageExpiryInterval(mqtt::packet::MessageExpiryInterval::new(secs).map_err(err)?)
            }
        });
        Ok(())
    })?;
    let mut b = v5_0::Publish::builder()
        .topic_name(m.msg.topic.as_str())
        .map_err(err)?
        .qos(qos_to_mqtt(m.msg.qos))
        .retain(m.msg.retain)
        .dup(dup)
        .payload(m.msg.payload.as_slice())
        .props(built);
    if let Some(pid) = pid {
        b = b.packet_id(pid);
    }
    b.build().map_err(err)
}

/// One property of an MQTT 5 PUBLISH, as [`PublishProps::try_each`]
/// gives them.
#[derive(Debug)]
enum PublishProp<'a> {
    Utf8,
    ContentType(&'a str),
    ResponseTopic(&'a str),
    Correlation(&'a Vec<u8>),
    User(&'a str, &'a str),
    /// The message's identity, a user property written without building
    /// its value (producer, sequence number).
    Identity(&'a str, u64),
    /// Message expiry interval, seconds.
    Expiry(u32),
}

/// The properties of an MQTT 5 PUBLISH ([`publish_props`]), given in the
/// order both encoders write them by [`PublishProps::try_each`]. Kept as
/// fields, not a list: a list was an allocation and a free for every
/// PUBLISH of every link (two per message in fanout).
struct PublishProps<'a> {
    utf8: bool,
    content_type: Option<&'a str>,
    response_topic: Option<&'a str>,
    correlation: Option<&'a Vec<u8>>,
    user: &'a [(String, String)],
    identity: Option<(&'a str, u64)>,
    receipt_to: Option<&'a str>,
    expiry: Option<u32>,
}

impl<'a> PublishProps<'a> {
    /// Calls `f` with each property in turn, up to the first error. A
    /// plain walk: an iterator chained over the optional ones cost more
    /// than the vector it replaced.
    fn try_each<E>(&self, mut f: impl FnMut(PublishProp<'a>) -> Result<(), E>) -> Result<(), E> {
        if self.utf8 {
            f(PublishProp::Utf8)?;
        }
        if let Some(v) = self.content_type {
            f(PublishProp::ContentType(v))?;
        }
        if let Some(v) = self.response_topic {
            f(PublishProp::ResponseTopic(v))?;
        }
        if let Some(v) = self.correlation {
            f(PublishProp::Correlation(v))?;
        }
        for (k, v) in self.user {
            f(PublishProp::User(k, v))?;
        }
        if let Some((producer, seq)) = self.identity {
            f(PublishProp::Identity(producer, seq))?;
        }
        if let Some(topic) = self.receipt_to {
            f(PublishProp::User(RECEIPT_PROPERTY, topic))?;
        }
        if let Some(secs) = self.expiry {
            f(PublishProp::Expiry(secs))?;
        }
        Ok(())
    }
}

/// The properties of `m`'s MQTT 5 PUBLISH, `now_ms` read only for a
/// message with a deadline (106 instructions a message, for the others
/// to no purpose).
fn publish_props<'a>(
    m: &'a StoredMessage,
    producer: &'a str,
    receipt_to: Option<&'a str>,
    now_ms: impl FnOnce() -> u64,
) -> PublishProps<'a> {
    let p = &m.msg.props;
    PublishProps {
        utf8: p.payload_is_utf8,
        content_type: p.content_type.as_deref(),
        response_topic: p.response_topic.as_deref(),
        correlation: p.correlation_data.as_ref(),
        user: &p.user,
        // The message's identity (G5): the outbox id is its sequence
        // number. A best-effort message was never stored: it has none (id
        // 0). A forwarded one keeps its origin's, already among the
        // properties.
        identity: (m.id != 0 && origin(p).is_none()).then_some((producer, m.id)),
        receipt_to,
        // A deadline travels as the time it has left, rounded up to a
        // second, so a broker (and a consumer's session) forgets it when
        // it is stale.
        expiry: m
            .msg
            .policy
            .expires_ms
            .map(|e| e.saturating_sub(now_ms()).div_ceil(1000).clamp(1, u32::MAX as u64) as u32),
    }
}

/// The longest remaining length MQTT can express (four bytes of it).
const MAX_REMAINING: usize = 268_435_455;

/// An MQTT 3.1.1 PUBLISH of `m`, with the identity envelope of
/// `(producer, sequence, asking)` when given, appended to `out` (room for
/// it made once). It is the codec's encoding byte for byte
/// (test `the_fast_publish_is_the_codecs_byte_for_byte`) without its
/// copies: the codec's builder copies the topic and the payload, and grows
/// its output three times (2,100 instructions a message,
/// docs/performance.md). `None`, with nothing written, for what the codec
/// refuses (a packet too long, and [`codec_refuses`]): it says why.
fn publish_v311(
    out: &mut Vec<u8>,
    m: &StoredMessage,
    envelope: Option<(&str, u64, bool)>,
    pid: Option<u16>,
    dup: bool,
) -> Option<()> {
    let msg = &m.msg;
    if codec_refuses(msg, pid) {
        return None;
    }
    let envelope_len = envelope.map_or(0, |(p, _, asking)| Identity::envelope_header_len(p, asking));
    let remaining = 2 + msg.topic.len() + 2 * usize::from(pid.is_some()) + envelope_len + msg.payload.len();
    if remaining > MAX_REMAINING {
        return None;
    }
    publish_header(out, msg, remaining, pid, dup);
    if let Some((producer, seq, asking)) = envelope {
        Identity::write_envelope_header(out, producer, seq, asking);
    }
    out.extend_from_slice(&msg.payload);
    Some(())
}

/// What both fast encoders leave to the codec to refuse: a packet id for
/// QoS 0, none or 0 for QoS 1 and 2, a topic empty, too long or with a
/// wildcard (none of these passes the outbox's checks; a damaged row
/// might).
fn codec_refuses(msg: &steadfast_store::NewMessage, pid: Option<u16>) -> bool {
    let t = &msg.topic;
    (msg.qos == Qos::AtMostOnce) != pid.is_none()
        || pid == Some(0)
        || t.is_empty()
        || t.len() > u16::MAX as usize
        || t.contains(['+', '#'])
}

/// A PUBLISH's fixed header, topic and packet id, appended to `out` with
/// room made for the rest (`remaining`: the packet's remaining length).
fn publish_header(out: &mut Vec<u8>, msg: &steadfast_store::NewMessage, remaining: usize, pid: Option<u16>, dup: bool) {
    out.reserve(1 + 4 + remaining);
    out.push(0x30 | u8::from(dup) << 3 | (msg.qos as u8) << 1 | u8::from(msg.retain));
    put_varint(out, remaining);
    put_binary(out, msg.topic.as_bytes());
    if let Some(pid) = pid {
        out.extend_from_slice(&pid.to_be_bytes());
    }
}

/// MQTT's variable byte integer (at most [`MAX_REMAINING`]).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            return;
        }
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A string or binary: two bytes of length, then the bytes (at most
/// 65,535, checked by the caller).
fn put_binary(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// An MQTT 5 PUBLISH of `m` with `props`, appended to `out`:
/// [`publish_v311`]'s counterpart (test
/// `the_fast_v5_publish_is_the_codecs_byte_for_byte`). `None` for what the
/// codec refuses, as there, and for a property longer than MQTT allows.
fn publish_v5(
    out: &mut Vec<u8>,
    m: &StoredMessage,
    props: &PublishProps<'_>,
    pid: Option<u16>,
    dup: bool,
) -> Option<()> {
    let msg = &m.msg;
    if codec_refuses(msg, pid) {
        return None;
    }
    let fits = |b: &[u8]| (b.len() <= u16::MAX as usize).then_some(2 + b.len());
    let mut props_len = 0;
    props
        .try_each(|p| -> Result<(), ()> {
            props_len += 1 + match p {
                PublishProp::Utf8 => 1,
                PublishProp::ContentType(v) | PublishProp::ResponseTopic(v) => fits(v.as_bytes()).ok_or(())?,
                PublishProp::Correlation(v) => fits(v).ok_or(())?,
                PublishProp::User(k, v) => fits(k.as_bytes()).ok_or(())? + fits(v.as_bytes()).ok_or(())?,
                PublishProp::Identity(producer, seq) => {
                    let len = Identity::property_value_len(producer, seq);
                    fits(Identity::USER_PROPERTY.as_bytes()).ok_or(())?
                        + (len <= u16::MAX as usize).then_some(2 + len).ok_or(())?
                }
                PublishProp::Expiry(_) => 4,
            };
            Ok(())
        })
        .ok()?;
    let remaining =
        2 + msg.topic.len() + 2 * usize::from(pid.is_some()) + varint_len(props_len) + props_len + msg.payload.len();
    if remaining > MAX_REMAINING {
        return None;
    }
    publish_header(out, msg, remaining, pid, dup);
    put_varint(out, props_len);
    let _ = props.try_each(|p| -> Result<(), std::convert::Infallible> {
        match p {
            PublishProp::Utf8 => out.extend_from_slice(&[0x01, 1]),
            PublishProp::ContentType(v) => {
                out.push(0x03);
                put_binary(out, v.as_bytes());
            }
            PublishProp::ResponseTopic(v) => {
                out.push(0x08);
                put_binary(out, v.as_bytes());
            }
            PublishProp::Correlation(v) => {
                out.push(0x09);
                put_binary(out, v);
            }
            PublishProp::User(k, v) => {
                out.push(0x26);
                put_binary(out, k.as_bytes());
                put_binary(out, v.as_bytes());
            }
            PublishProp::Identity(producer, seq) => {
                out.push(0x26);
                put_binary(out, Identity::USER_PROPERTY.as_bytes());
                out.extend_from_slice(&(Identity::property_value_len(producer, seq) as u16).to_be_bytes());
                Identity::write_property_value(out, producer, seq);
            }
            PublishProp::Expiry(secs) => {
                out.push(0x02);
                out.extend_from_slice(&secs.to_be_bytes());
            }
        }
        Ok(())
    });
    out.extend_from_slice(&msg.payload);
    Some(())
}

fn build_v311(m: &StoredMessage, payload: &[u8], pid: Option<u16>, dup: bool) -> Result<v3_1_1::Publish, ConnectError> {
    let err = |e| build_err("PUBLISH", e);
    let mut b = v3_1_1::Publish::builder()
        .topic_name(m.msg.topic.as_str())
        .map_err(err)?
        .qos(qos_to_mqtt(m.msg.qos))
        .retain(m.msg.retain)
        .dup(dup)
        .payload(payload);
    if let Some(pid) = pid {
        b = b.packet_id(pid);
    }
    b.build().map_err(err)
}

fn connack_v5(c: v5_0::Connack) -> Incoming {
    use mqtt::result_code::ConnectReasonCode as R;
    let refused = match c.reason_code() {
        R::Success => None,
        R::UnsupportedProtocolVersion => Some(Refusal::ProtocolVersion),
        R::BadUserNameOrPassword | R::BadAuthenticationMethod => Some(Refusal::BadCredentials),
        R::NotAuthorized | R::Banned => Some(Refusal::NotAuthorized),
        R::ClientIdentifierNotValid => Some(Refusal::ClientId),
        R::ServerUnavailable | R::ServerBusy | R::ConnectionRateExceeded => Some(Refusal::Unavailable),
        other => Some(Refusal::Other(other as u8)),
    };
    let mut ack = ConnAck { session_present: c.session_present(), refused, ..Default::default() };
    for prop in c.props() {
        match prop {
            Property::ReceiveMaximum(v) => ack.receive_maximum = Some(v.val()),
            Property::MaximumPacketSize(v) => ack.maximum_packet_size = Some(v.val()),
            Property::MaximumQos(v) => ack.maximum_qos = Some(v.val()),
            Property::RetainAvailable(v) => ack.retain_available = Some(v.val() != 0),
            Property::SessionExpiryInterval(v) => ack.session_expiry = Some(v.val()),
            _ => {}
        }
    }
    Incoming::ConnAck(ack)
}

fn connack_v311(c: v3_1_1::Connack) -> Incoming {
    use mqtt::result_code::ConnectReturnCode as R;
    let refused = match c.return_code() {
        R::Accepted => None,
        R::UnacceptableProtocolVersion => Some(Refusal::ProtocolVersion),
        R::IdentifierRejected => Some(Refusal::ClientId),
        R::ServerUnavailable => Some(Refusal::Unavailable),
        R::BadUserNameOrPassword => Some(Refusal::BadCredentials),
        R::NotAuthorized => Some(Refusal::NotAuthorized),
    };
    Incoming::ConnAck(ConnAck { session_present: c.session_present(), refused, ..Default::default() })
}

/// An MQTT session just opened: the socket halves, the link, the CONNACK
/// (accepted) and whatever arrived after it in the same read.
pub(crate) struct Opened {
    pub rd: ReadHalf,
    pub wr: WriteHalf,
    pub link: Link,
    pub ack: ConnAck,
    pub after: Vec<Incoming>,
    pub buf: Vec<u8>,
    /// CONNECT written to CONNACK read: the link's first round-trip sample.
    pub round_trip: std::time::Duration,
}

/// Connect (TCP, TLS, WebSocket as the URL says), CONNECT, CONNACK, each
/// within the connect timeout; a refusal is an error that says which.
/// The store's key for the version a broker was found to speak.
fn version_key(url: &BrokerUrl) -> String {
    format!("protocol {url}")
}

/// The version to speak to `url` first: the one configured, or with
/// [`ClientConfig::auto_version`] the one `store` remembers it took.
pub(crate) async fn first_version(cfg: &ClientConfig, url: &BrokerUrl, store: Option<&Outbox>) -> ProtocolVersion {
    let Some(store) = store.filter(|_| cfg.auto_version && cfg.version == ProtocolVersion::V5) else {
        return cfg.version;
    };
    match store.meta(&version_key(url)).await {
        Ok(Some(v)) if v == "311" => ProtocolVersion::V311,
        _ => cfg.version,
    }
}

/// Which end of the messages a connection serves: what a fall back to
/// MQTT 3.1.1 means for identities differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Producer,
    Consumer,
}

/// [`open_session`] at `version`; with [`ClientConfig::auto_version`], a
/// broker that does not take MQTT 5 is tried in 3.1.1 at once, and once
/// that works it is remembered (in `version`, and in `store` for later
/// runs when the broker said so).
pub(crate) async fn open_auto(
    cfg: &ClientConfig,
    url: &BrokerUrl,
    clean: bool,
    version: &mut ProtocolVersion,
    store: Option<&Outbox>,
    side: Side,
) -> Result<Opened, ConnectError> {
    let was = *version;
    // A refusal of the version is the broker's answer for good (kept in
    // the store). A close before CONNACK may be a passing one (a
    // connection limit, a balancer between backends), and so may a
    // CONNECT left unanswered (a broker that speaks only 3.1.1 can wait
    // for ever on the properties of an MQTT 5 CONNECT; so can a busy
    // one): after either, each new connection tries 5 first again, so
    // that a broker that was only busy is not left on 3.1.1.
    let attempt = if cfg.auto_version
        && cfg.version == ProtocolVersion::V5
        && was == ProtocolVersion::V311
        && first_version(cfg, url, store).await == ProtocolVersion::V5
    {
        ProtocolVersion::V5
    } else {
        was
    };
    let first = open_session(cfg, url, clean, attempt).await;
    if first.is_ok() {
        if attempt != was {
            tracing::info!(broker = %url, "the broker takes MQTT 5 again");
        }
        *version = attempt;
        return first;
    }
    let refused = matches!(&first, Err(ConnectError::Refused { refusal: Refusal::ProtocolVersion, .. }));
    let closed = matches!(&first, Err(ConnectError::Closed(CloseReason::BeforeConnack { mqtt5: true })));
    let stalled = matches!(&first, Err(ConnectError::Timeout { packet: "CONNECT", mqtt5: true, .. }));
    if !(cfg.auto_version && attempt == ProtocolVersion::V5 && (refused || closed || stalled)) {
        return first;
    }
    // Receipts rest on the identity, which 3.1.1 carries only in the
    // envelope: without it, messages that ask for receipts would never get
    // one and be published again for hours.
    if side == Side::Producer && cfg.receipts.is_some() && !cfg.envelope {
        tracing::error!(broker = %url, "the broker does not take MQTT 5, and receipts need each message's identity, which MQTT 3.1.1 carries only in the payload envelope: not speaking 3.1.1 to it; turn the envelope on (both ends) or receipts off");
        return first;
    }
    match open_session(cfg, url, clean, ProtocolVersion::V311).await {
        Ok(o) => {
            *version = ProtocolVersion::V311;
            if let Some(s) = store.filter(|_| refused) {
                s.set_meta(&version_key(url), "311");
            }
            let why = if refused {
                "the broker refuses MQTT 5; speaking MQTT 3.1.1 to it from now on".to_owned()
            } else if closed {
                "the broker closed the connection on an MQTT 5 CONNECT and takes MQTT 3.1.1; speaking 3.1.1 to it (5 is tried first again at each new connection)".to_owned()
            } else {
                format!(
                    "the broker left an MQTT 5 CONNECT unanswered for {:?} and takes MQTT 3.1.1; speaking 3.1.1 to it (5 is tried first again at each new connection; version 3.1.1 in the configuration spares the wait)",
                    cfg.connect_timeout
                )
            };
            let identity = match (side, cfg.envelope) {
                (Side::Producer, true) => "identities travel in the payload envelope",
                (Side::Producer, false) => {
                    "without the identity envelope, identities do not travel: consumers cannot de-duplicate these messages"
                }
                (Side::Consumer, true) => {
                    "identities are read from the payload envelope (an MQTT 5 producer's identity does not reach this consumer)"
                }
                (Side::Consumer, false) => {
                    "identity envelopes are not unwrapped: messages are handed over at least once, without de-duplication, and an enveloped one with its envelope"
                }
            };
            // Said once a process: the next connections fall back quietly.
            if was == ProtocolVersion::V5 {
                tracing::warn!(broker = %url, "{why}; {identity}");
            } else {
                tracing::debug!(broker = %url, "{why}");
            }
            Ok(o)
        }
        // It takes neither: the refusal of 5 says more.
        Err(ConnectError::Refused { refusal: Refusal::ProtocolVersion, .. }) => first,
        // It answers neither (a 3.1.1 CONNECT left unanswered too): that
        // error, whose hint is not the version.
        Err(e) => Err(e),
    }
}

/// Opens a connection to `url` in `version`: transport, CONNECT, CONNACK.
pub(crate) async fn open_session(
    cfg: &ClientConfig,
    url: &BrokerUrl,
    clean: bool,
    version: ProtocolVersion,
) -> Result<Opened, ConnectError> {
    use tokio::io::AsyncReadExt;
    use tokio::time::timeout;
    let broker = url.to_string();
    let (mut rd, mut wr) = match timeout(cfg.connect_timeout, transport::connect(url, &cfg.tls)).await {
        Err(_) => {
            let reason =
                format!("no connection (TCP, then TLS or WebSocket when used) within {:?}", cfg.connect_timeout);
            return Err(ConnectError::Unreachable { broker, reason });
        }
        Ok(r) => r?,
    };
    let mut link = Link::new(version, cfg.envelope, cfg.max_packet_size);
    link.connect(cfg, clean)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent_at = tokio::time::Instant::now();
    let handshake = async {
        transport::send(&mut wr, &link.out).await.map_err(|e| io_error(&broker, e))?;
        sent_at = tokio::time::Instant::now();
        link.out.clear();
        let mut first_read = true;
        loop {
            let n = rd.read(&mut buf).await.map_err(|e| io_error(&broker, e))?;
            if n == 0 {
                let mqtt5 = version == ProtocolVersion::V5;
                return Err(ConnectError::Closed(CloseReason::BeforeConnack { mqtt5 }));
            }
            // A CONNACK starts with 0x20: anything else first is not MQTT.
            if first_read && buf[0] != 0x20 {
                let sent: String = buf[..n.min(40)].escape_ascii().to_string();
                return Err(ConnectError::NotMqtt { broker: broker.clone(), sent });
            }
            first_read = false;
            let mut incoming = link.receive(&buf[..n]).into_iter();
            while let Some(inc) = incoming.next() {
                if let Incoming::Broken(e) = inc {
                    return Err(e);
                }
                if let Incoming::ConnAck(ack) = inc {
                    // Whatever came in the same read after CONNACK is
                    // handled once the session is set up.
                    return Ok((ack, incoming.collect::<Vec<_>>()));
                }
            }
        }
    };
    let (ack, after) = match timeout(cfg.connect_timeout, handshake).await {
        Err(_) => {
            let mqtt5 = version == ProtocolVersion::V5;
            return Err(ConnectError::Timeout { broker, packet: "CONNECT", timeout: cfg.connect_timeout, mqtt5 });
        }
        Ok(r) => r?,
    };
    let round_trip = sent_at.elapsed();
    if let Some(refusal) = ack.refused {
        return Err(ConnectError::Refused { broker, refusal });
    }
    Ok(Opened { rd, wr, link, ack, after, buf, round_trip })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use steadfast_core::{Identity, Qos};

    use super::{Incoming, Link};
    use crate::config::ProtocolVersion;

    /// `-V auto` against a broker that leaves an MQTT 5 CONNECT unanswered:
    /// a producer whose messages ask for receipts without the envelope
    /// does not fall back (3.1.1 would carry no identity to receipt); with
    /// the envelope it does, and so does a consumer; each new connection
    /// tries 5 first again.
    #[tokio::test]
    async fn a_silent_broker_gets_3_1_1_after_5_at_each_connection_unless_receipts_lack_the_envelope() {
        use super::{open_auto, Side};
        use crate::{BrokerUrl, ClientConfig, ConnectError, ReceiptRule};
        let broker = steadfast_testkit::ScriptedBroker::silent_to_mqtt_5();
        let url: BrokerUrl = broker.url().parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = ClientConfig::new("receipts", url.clone(), dir.path())
            .version(ProtocolVersion::V5)
            .auto_version(true)
            .connect_timeout(std::time::Duration::from_millis(300))
            .receipts(ReceiptRule::any(std::time::Duration::from_secs(30)));
        let mut v = ProtocolVersion::V5;
        let e = open_auto(&cfg, &url, true, &mut v, None, Side::Producer).await.err().expect("no fall back");
        assert!(matches!(e, ConnectError::Timeout { packet: "CONNECT", mqtt5: true, .. }), "{e}");
        assert_eq!((v, broker.connections()), (ProtocolVersion::V5, 1));
        for (cfg, side) in [(cfg.clone().envelope(true), Side::Producer), (cfg, Side::Consumer)] {
            let mut v = ProtocolVersion::V5;
            let opened = open_auto(&cfg, &url, true, &mut v, None, side).await;
            assert!(opened.is_ok(), "{side:?}");
            assert_eq!(v, ProtocolVersion::V311, "{side:?}");
            drop(opened);
            // The next connection tries 5 first again (a silence may have
            // been a busy broker's), then 3.1.1: two connections.
            let before = broker.connections();
            assert!(open_auto(&cfg, &url, true, &mut v, None, side).await.is_ok(), "{side:?}");
            assert_eq!((v, broker.connections() - before), (ProtocolVersion::V311, 2), "{side:?}");
        }
    }

    /// What a fast encoder appends after bytes already in its buffer,
    /// which it leaves alone; `None` when it refused, having written
    /// nothing.
    fn appended(write: impl FnOnce(&mut Vec<u8>) -> Option<()>) -> Option<Vec<u8>> {
        let mut out = b"earlier".to_vec();
        let r = write(&mut out);
        assert!(out.starts_with(b"earlier"), "the bytes before are kept");
        match r {
            Some(()) => Some(out.split_off(7)),
            None => {
                assert_eq!(out, b"earlier", "a refused packet leaves nothing behind");
                None
            }
        }
    }

    fn version(v5: bool) -> ProtocolVersion {
        if v5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        }
    }

    /// Feeds `bytes` in pieces cut at `cuts` (fractions of the length),
    /// stopping at a `Broken` as the connection loops do.
    fn feed(link: &mut Link, bytes: &[u8], cuts: &[f64]) -> Vec<Incoming> {
        let mut at: Vec<usize> = cuts.iter().map(|c| (c * bytes.len() as f64) as usize).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        let mut all = Vec::new();
        for w in at.windows(2) {
            all.extend(link.receive(&bytes[w[0]..w[1]]));
            if matches!(all.last(), Some(Incoming::Broken(_))) {
                break;
            }
        }
        all
    }

    /// Lengths of two and three bytes, the envelope of a long producer
    /// and a long identity property, as the codec writes them.
    #[test]
    fn a_large_fast_publish_is_the_codecs_too() {
        for len in [127, 128, 16_383, 16_384, 70_000] {
            let m = super::loose_message(9, "a/b", &vec![7u8; len], Qos::AtLeastOnce, false);
            let producer = "p".repeat(255);
            let fast = appended(|out| super::publish_v311(out, &m, Some((&producer, 9, true)), Some(3), true)).unwrap();
            let wrapped = Identity::wrap_asking(&producer, 9, &m.msg.payload, true);
            assert_eq!(fast, super::build_v311(&m, &wrapped, Some(3), true).unwrap().to_continuous_buffer(), "{len}");
            let props = super::publish_props(&m, &producer, Some("r/t"), || 0);
            let fast = appended(|out| super::publish_v5(out, &m, &props, Some(3), true)).unwrap();
            assert_eq!(fast, super::build_v5(&m, &props, Some(3), true).unwrap().to_continuous_buffer(), "{len}");
        }
    }

    /// The acknowledgement written in its four bytes is the codec's
    /// PUBACK and PUBREC, in both versions, for packet ids across the
    /// range; packet id 0 writes nothing, as the builders refuse it.
    #[test]
    fn an_acknowledgement_is_the_codecs_packet() {
        for v5 in [false, true] {
            for qos in [Qos::AtLeastOnce, Qos::ExactlyOnce] {
                for pid in [0u16, 1, 255, 256, 4_660, u16::MAX] {
                    let mut link = Link::new(version(v5), false, None);
                    let codec = link.encoded("PUBACK", |l| l.ack_publish(pid, qos));
                    let mut fast = Vec::new();
                    super::put_ack(pid, qos, &mut fast);
                    assert_eq!(fast, codec, "v5 {v5}, {qos:?}, packet id {pid}");
                }
            }
        }
    }

    /// MQTT 5 acknowledgements are read by their reason code, whatever it
    /// is: Mosquitto 2.0 answers a PUBLISH over its `message_size_limit`
    /// with PUBACK 0x95, which MQTT 5 gives DISCONNECT only; taken for a
    /// malformed packet, it ended the link and the message went again, for
    /// ever (and what followed it was delivered many times).
    #[test]
    fn an_mqtt_5_ack_with_any_error_code_is_a_refusal_and_a_broken_one_ends_the_link() {
        use steadfast_core::engine::Ack;
        let mut link = Link::new(version(true), false, None);
        let got = |link: &mut Link, bytes: &[u8]| link.receive(bytes);
        // Mosquitto's answer to a message over its limit, as sent.
        assert!(matches!(
            got(&mut link, &[0x40, 3, 0, 1, 0x95])[..],
            [Incoming::Ack(Ack::PubAck { pid: 1, code: 0x95 })]
        ));
        // Not authorised, with a reason string.
        let pubrec = [0x50, 10, 0, 2, 0x87, 6, 0x1f, 0, 3, b'a', b'c', b'l'];
        assert!(matches!(got(&mut link, &pubrec)[..], [Incoming::Ack(Ack::PubRec { pid: 2, code: 0x87 })]));
        // Success, short and long; "no matching subscribers" is a success.
        assert!(matches!(got(&mut link, &[0x40, 2, 0, 3])[..], [Incoming::Ack(Ack::PubAck { pid: 3, code: 0 })]));
        assert!(matches!(
            got(&mut link, &[0x40, 4, 0, 4, 0x10, 0])[..],
            [Incoming::Ack(Ack::PubAck { pid: 4, code: 0x10 })]
        ));
        assert!(matches!(got(&mut link, &[0x70, 3, 0, 5, 0x92])[..], [Incoming::Ack(Ack::PubComp { pid: 5 })]));
        // Packet id 0, properties longer than the packet, bytes after them.
        for broken in [&[0x40, 2, 0, 0][..], &[0x40, 5, 0, 1, 0, 5, 0], &[0x40, 5, 0, 1, 0, 0, 9]] {
            let mut link = Link::new(version(true), false, None);
            assert!(matches!(got(&mut link, broken)[..], [Incoming::Broken(_)]), "{broken:?}");
        }
    }

    /// A subscription with Retain As Published carries bit 3 of its
    /// options over MQTT 5 (a bridge's source asks for it), and none over
    /// 3.1.1, which has no such bit.
    #[test]
    fn retain_as_published_is_an_mqtt_5_subscription_option() {
        let filters = [("a/#".to_owned(), Qos::AtLeastOnce)];
        for (v5, rap, options) in [(true, true, 0b1001), (true, false, 0b0001), (false, true, 0b0001)] {
            let mut link = Link::new(version(v5), false, None);
            link.subscribe(1, &filters, rap).unwrap();
            assert_eq!(*link.out.last().unwrap(), options, "v5 {v5}, rap {rap}: {:?}", link.out);
        }
    }

    /// One property of a generated PUBLISH: its id and value bytes, any
    /// of the ids MQTT 5 allows in a PUBLISH, one it allows elsewhere
    /// (session expiry) and one that names none.
    fn property() -> impl Strategy<Value = Vec<u8>> {
        let text = prop_oneof![
            Just("steadfast-id".to_owned()),
            Just(steadfast_core::receipt::RECEIPT_PROPERTY.to_owned()),
            "[a-zé/ ]{0,6}",
        ];
        let string = |s: String| {
            let mut v = (s.len() as u16).to_be_bytes().to_vec();
            v.extend(s.into_bytes());
            v
        };
        prop_oneof![
            (0u8..3).prop_map(|v| vec![0x01, v]),
            any::<u32>().prop_map(|v| [vec![0x02], v.to_be_bytes().to_vec()].concat()),
            text.clone().prop_map(move |t| [vec![0x03], string(t)].concat()),
            text.clone().prop_map(move |t| [vec![0x08], string(t)].concat()),
            proptest::collection::vec(any::<u8>(), 0..5)
                .prop_map(move |b| { [vec![0x09], (b.len() as u16).to_be_bytes().to_vec(), b].concat() }),
            (0u32..300).prop_map(|v| if v < 128 {
                vec![0x0b, v as u8]
            } else {
                vec![0x0b, (v as u8) | 0x80, (v >> 7) as u8]
            }),
            (0u16..3).prop_map(|v| [vec![0x23], v.to_be_bytes().to_vec()].concat()),
            (text.clone(), text).prop_map(move |(k, v)| [vec![0x26], string(k), string(v)].concat()),
            Just(vec![0x11, 0, 0, 0, 5]),
            Just(vec![0x7f, 0]),
        ]
    }

    /// A PUBLISH body: topic, packet id (unless QoS 0), MQTT 5 properties
    /// (sometimes none at all, not even their length), payload.
    fn publish_body() -> impl Strategy<Value = (u8, Vec<u8>, bool)> {
        (
            0u8..16,
            any::<bool>(),
            prop_oneof![Just(b"a/b".to_vec()), proptest::collection::vec(any::<u8>(), 0..4)],
            any::<u16>(),
            proptest::option::weighted(0.8, proptest::collection::vec(property(), 0..5)),
            proptest::collection::vec(any::<u8>(), 0..6),
        )
            .prop_map(|(flags, v5, topic, pid, props, payload)| {
                let mut body = (topic.len() as u16).to_be_bytes().to_vec();
                body.extend(&topic);
                if (flags >> 1) & 3 != 0 {
                    body.extend(pid.to_be_bytes());
                }
                if let Some(props) = props.filter(|_| v5) {
                    let props = props.concat();
                    super::put_varint(&mut body, props.len());
                    body.extend(props);
                }
                body.extend(payload);
                (flags, body, v5)
            })
    }

    /// What the in-place reader and the codec make of one PUBLISH body:
    /// the same message, or both a refusal.
    fn same_as_the_codec(flags: u8, body: &[u8], v5: bool) -> Result<(), TestCaseError> {
        let fast = crate::decode::publish(flags, body, v5).map(|m| format!("{m:?}"));
        let codec = super::publish_by_codec(flags, body, v5).map(|m| format!("{m:?}"));
        prop_assert_eq!(fast.is_ok(), codec.is_ok(), "{:?} / {:?} for {:02x?}", fast, codec, body);
        if let (Ok(a), Ok(b)) = (fast, codec) {
            prop_assert_eq!(a, b);
        }
        Ok(())
    }

    proptest! {
        // Cheap cases, and a rule that only two of a kind of property
        // break needs many of them.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The PUBLISH read in place is the codec's, field for field, and
        /// what one refuses the other refuses: valid packets, packets cut
        /// short or with one byte changed, and random bytes.
        #[test]
        fn a_publish_read_in_place_is_the_codecs((flags, body, v5) in publish_body(),
                                                 cut in any::<proptest::sample::Index>(),
                                                 flip in proptest::option::of((any::<proptest::sample::Index>(), any::<u8>())),
                                                 random in proptest::collection::vec(any::<u8>(), 0..24)) {
            same_as_the_codec(flags, &body, v5)?;
            same_as_the_codec(flags, &body[..cut.index(body.len() + 1)], v5)?;
            if let Some((at, byte)) = flip.filter(|_| !body.is_empty()) {
                let mut changed = body.clone();
                changed[at.index(body.len())] ^= byte;
                same_as_the_codec(flags, &changed, v5)?;
            }
            same_as_the_codec(flags, &random, v5)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever bytes a broker sends, in whatever pieces: no panic, and
        /// at most one `Broken`, as the last thing decoded.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                       cuts in proptest::collection::vec(0.0f64..1.0, 0..8),
                                       v5 in any::<bool>(), max in proptest::option::of(128u32..1024)) {
            let mut link = Link::new(version(v5), false, max);
            let got = feed(&mut link, &bytes, &cuts);
            let broken = got.iter().filter(|i| matches!(i, Incoming::Broken(_))).count();
            prop_assert!(broken <= 1);
            if broken == 1 {
                prop_assert!(matches!(got.last(), Some(Incoming::Broken(_))));
            }
        }

        /// The MQTT 3.1.1 PUBLISH written straight into its buffer is the
        /// codec's, byte for byte, and refuses what the codec refuses.
        #[test]
        fn the_fast_publish_is_the_codecs_byte_for_byte(topic in "[a-z+#]{0,8}(/[a-z0-9+#]{0,8}){0,3}",
                                                        payload in proptest::collection::vec(any::<u8>(), 0..300),
                                                        qos in 0u8..3, retain in any::<bool>(), dup in any::<bool>(),
                                                        pid in proptest::option::of(0u16..4),
                                                        envelope in proptest::option::of(("[a-z0-9-]{1,300}", any::<u64>(), any::<bool>()))) {
            let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][qos as usize];
            let m = super::loose_message(3, &topic, &payload, qos, retain);
            let envelope = envelope.as_ref().map(|(p, seq, asking)| (&p[..p.len().min(255)], *seq, *asking));
            let fast = appended(|out| super::publish_v311(out, &m, envelope, pid, dup));
            let wrapped = match envelope {
                Some((p, seq, asking)) => Identity::wrap_asking(p, seq, &payload, asking),
                None => payload.clone(),
            };
            match super::build_v311(&m, &wrapped, pid, dup) {
                Ok(p) => prop_assert_eq!(fast, Some(p.to_continuous_buffer())),
                Err(_) => prop_assert_eq!(fast, None),
            }
        }

        /// The same for MQTT 5, with every property a message can carry.
        #[test]
        fn the_fast_v5_publish_is_the_codecs_byte_for_byte(topic in "[a-z+#]{0,8}(/[a-z0-9+#]{0,8}){0,3}",
                                                           payload in proptest::collection::vec(any::<u8>(), 0..300),
                                                           qos in 0u8..3, retain in any::<bool>(), dup in any::<bool>(),
                                                           pid in proptest::option::of(0u16..4), id in prop_oneof![0u64..3, any::<u64>()],
                                                           utf8 in any::<bool>(),
                                                           content_type in proptest::option::of("[ -~]{0,40}"),
                                                           response_topic in proptest::option::of("[a-z/]{1,20}"),
                                                           correlation in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                                                           user in proptest::collection::vec(("[a-z-]{0,12}", "[ -~]{0,30}"), 0..4),
                                                           receipt_to in proptest::option::of("[a-z/]{1,20}"),
                                                           expires in proptest::option::of(0u64..10_000_000)) {
            let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][qos as usize];
            let mut m = super::loose_message(id, &topic, &payload, qos, retain);
            let msg = std::sync::Arc::make_mut(&mut m.msg);
            msg.props = steadfast_core::Properties { content_type, response_topic, correlation_data: correlation, payload_is_utf8: utf8, user };
            msg.policy.expires_ms = expires.map(|e| 1_000_000 + e);
            let props = super::publish_props(&m, "producer", receipt_to.as_deref(), || 1_000_000);
            let fast = appended(|out| super::publish_v5(out, &m, &props, pid, dup));
            match super::build_v5(&m, &props, pid, dup) {
                Ok(p) => prop_assert_eq!(fast, Some(p.to_continuous_buffer())),
                Err(_) => prop_assert_eq!(fast, None),
            }
        }

        /// A PUBLISH, cut anywhere, decodes to what was encoded.
        #[test]
        fn a_publish_cut_anywhere_decodes_whole(topic in "[a-z]{1,8}(/[a-z0-9]{1,8}){0,3}",
                                                payload in proptest::collection::vec(any::<u8>(), 0..2048),
                                                qos in 0u8..3, retain in any::<bool>(), v5 in any::<bool>(),
                                                cuts in proptest::collection::vec(0.0f64..1.0, 0..12)) {
            let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][qos as usize];
            let pid = (qos != Qos::AtMostOnce).then_some(7);
            let m = super::loose_message(3, &topic, &payload, qos, retain);
            let sender = Link::new(version(v5), false, None);
            let bytes = sender.encode_publish(&m, "producer", None, pid, false).unwrap();
            let mut receiver = Link::new(version(v5), false, None);
            let got = feed(&mut receiver, &bytes, &cuts);
            prop_assert_eq!(got.len(), 1);
            let Incoming::Publish(p) = &got[0] else { return Err(TestCaseError::fail(format!("{got:?}"))) };
            prop_assert_eq!(&p.topic, &topic);
            prop_assert_eq!(&p.payload, &payload);
            prop_assert_eq!((p.qos, p.pid, p.retain), (qos, pid, retain));
            if v5 {
                prop_assert_eq!(p.identity.as_deref(), Some("producer/3"));
            }
        }
    }
}
