//! Glue between steadfast and `mqtt-protocol-core`: builds packets for
//! either protocol version and turns what the connection reports into a
//! small, version-independent vocabulary.

use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::connection::Event as MqttEvent;
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0, Packet, Property};
use mqtt_protocol_core::mqtt::prelude::*;
use steadfast_core::{Identity, Qos};
use steadfast_store::StoredMessage;

use crate::config::{ClientConfig, ProtocolVersion};
use crate::error::{ConnectError, Refusal};

/// One protocol connection (one TCP connection's worth of MQTT state).
pub(crate) struct Link {
    conn: mqtt::Connection<mqtt::role::Client>,
    version: ProtocolVersion,
    /// Bytes waiting to be written to the socket.
    pub out: Vec<u8>,
}

/// What the broker told us, version-independent.
#[derive(Debug)]
pub(crate) enum Incoming {
    ConnAck(ConnAck),
    PubAck { pid: u16, ok: bool },
    PubRec { pid: u16, ok: bool },
    PubComp { pid: u16 },
    Publish,
    PingResp,
    Disconnect { reason: String },
    Other,
}

/// An accepted session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnAck {
    pub session_present: bool,
    pub refused: Option<Refusal>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
}

fn qos_to_mqtt(q: Qos) -> mqtt::packet::Qos {
    match q {
        Qos::AtMostOnce => mqtt::packet::Qos::AtMostOnce,
        Qos::AtLeastOnce => mqtt::packet::Qos::AtLeastOnce,
        Qos::ExactlyOnce => mqtt::packet::Qos::ExactlyOnce,
    }
}

fn build_err(what: &str, e: mqtt::result_code::MqttError) -> ConnectError {
    ConnectError::Protocol(format!("cannot build {what}: {e}"))
}

impl Link {
    pub fn new(version: ProtocolVersion) -> Self {
        let v = match version {
            ProtocolVersion::V311 => mqtt::Version::V3_1_1,
            ProtocolVersion::V5 => mqtt::Version::V5_0,
        };
        let mut conn = mqtt::Connection::<mqtt::role::Client>::new(v);
        // PUBREL goes out only after the Released stage is on disk, so the
        // engine must not answer PUBREC by itself.
        conn.set_auto_pub_response(false);
        conn.set_auto_ping_response(true);
        Self {
            conn,
            version,
            out: Vec::with_capacity(64 * 1024),
        }
    }

    /// Queues the CONNECT packet.
    pub fn connect(&mut self, c: &ClientConfig) -> Result<(), ConnectError> {
        let keep_alive = c.keep_alive.as_secs().clamp(1, u16::MAX as u64) as u16;
        let events = match self.version {
            ProtocolVersion::V5 => {
                let expiry = c.session_expiry.as_secs().min(u32::MAX as u64) as u32;
                let mut props = Vec::new();
                if expiry > 0 {
                    props.push(Property::SessionExpiryInterval(
                        mqtt::packet::SessionExpiryInterval::new(expiry)
                            .map_err(|e| build_err("CONNECT", e))?,
                    ));
                }
                let mut b = v5_0::Connect::builder()
                    .client_id(c.client_id.as_str())
                    .map_err(|e| build_err("CONNECT", e))?
                    .clean_start(c.clean_start)
                    .keep_alive(keep_alive)
                    .props(props);
                if let Some(u) = &c.username {
                    b = b
                        .user_name(u.as_str())
                        .map_err(|e| build_err("CONNECT", e))?;
                }
                if let Some(p) = &c.password {
                    b = b.password(p).map_err(|e| build_err("CONNECT", e))?;
                }
                self.conn
                    .checked_send(b.build().map_err(|e| build_err("CONNECT", e))?)
            }
            ProtocolVersion::V311 => {
                let mut b = v3_1_1::Connect::builder()
                    .client_id(c.client_id.as_str())
                    .map_err(|e| build_err("CONNECT", e))?
                    .clean_session(c.clean_start)
                    .keep_alive(keep_alive);
                if let Some(u) = &c.username {
                    b = b
                        .user_name(u.as_str())
                        .map_err(|e| build_err("CONNECT", e))?;
                }
                if let Some(p) = &c.password {
                    b = b.password(p).map_err(|e| build_err("CONNECT", e))?;
                }
                self.conn
                    .checked_send(b.build().map_err(|e| build_err("CONNECT", e))?)
            }
        };
        self.absorb(events).map(|_| ())
    }

    /// Builds the PUBLISH for `m` under `pid` without sending it, to learn
    /// its size.
    pub fn publish_size(
        &self,
        m: &StoredMessage,
        identity: &Identity,
        pid: Option<u16>,
    ) -> Result<usize, ConnectError> {
        Ok(match self.version {
            ProtocolVersion::V5 => build_v5(m, identity, pid, false)?.size(),
            ProtocolVersion::V311 => build_v311(m, pid, false)?.size(),
        })
    }

    /// Queues a PUBLISH. `pid` must have been registered with
    /// [`Link::register_pid`] for QoS 1 and 2.
    pub fn publish(
        &mut self,
        m: &StoredMessage,
        identity: &Identity,
        pid: Option<u16>,
        dup: bool,
    ) -> Result<(), ConnectError> {
        let events = match self.version {
            ProtocolVersion::V5 => self.conn.checked_send(build_v5(m, identity, pid, dup)?),
            ProtocolVersion::V311 => self.conn.checked_send(build_v311(m, pid, dup)?),
        };
        self.absorb(events).map(|_| ())
    }

    /// Tells the protocol engine that `pid` is ours to use.
    pub fn register_pid(&mut self, pid: u16) -> Result<(), ConnectError> {
        self.conn
            .register_packet_id(pid)
            .map_err(|e| ConnectError::Protocol(format!("packet id {pid} cannot be used: {e}")))
    }

    /// Queues a PUBREL.
    pub fn pubrel(&mut self, pid: u16) -> Result<(), ConnectError> {
        let events = match self.version {
            ProtocolVersion::V5 => {
                let p = v5_0::Pubrel::builder()
                    .packet_id(pid)
                    .build()
                    .map_err(|e| build_err("PUBREL", e))?;
                self.conn.checked_send(p)
            }
            ProtocolVersion::V311 => {
                let p = v3_1_1::Pubrel::builder()
                    .packet_id(pid)
                    .build()
                    .map_err(|e| build_err("PUBREL", e))?;
                self.conn.checked_send(p)
            }
        };
        self.absorb(events).map(|_| ())
    }

    /// Queues a PINGREQ.
    pub fn ping(&mut self) -> Result<(), ConnectError> {
        let events = match self.version {
            ProtocolVersion::V5 => self.conn.checked_send(v5_0::Pingreq::new()),
            ProtocolVersion::V311 => self.conn.checked_send(v3_1_1::Pingreq::new()),
        };
        self.absorb(events).map(|_| ())
    }

    /// Queues a normal DISCONNECT.
    pub fn disconnect(&mut self) {
        let events = match self.version {
            ProtocolVersion::V5 => match v5_0::Disconnect::builder().build() {
                Ok(d) => self.conn.checked_send(d),
                Err(_) => Vec::new(),
            },
            ProtocolVersion::V311 => self.conn.checked_send(v3_1_1::Disconnect::new()),
        };
        let _ = self.absorb(events);
    }

    /// Feeds received bytes; returns the packets they completed.
    pub fn receive(&mut self, data: &[u8]) -> Result<Vec<Incoming>, ConnectError> {
        let mut cursor = mqtt::common::Cursor::new(data);
        let mut incoming = Vec::new();
        while (cursor.position() as usize) < data.len() {
            let before = cursor.position();
            let events = self.conn.recv(&mut cursor);
            incoming.extend(self.absorb(events)?);
            if cursor.position() == before {
                break;
            }
        }
        Ok(incoming)
    }

    /// Handles the engine's events: bytes to send are queued, packets
    /// received are translated, errors end the link.
    fn absorb(&mut self, events: Vec<MqttEvent>) -> Result<Vec<Incoming>, ConnectError> {
        let mut incoming = Vec::new();
        for e in events {
            match e {
                MqttEvent::RequestSendPacket { packet, .. } => {
                    self.out.extend_from_slice(&packet.to_continuous_buffer());
                }
                MqttEvent::NotifyPacketReceived(p) => incoming.push(translate(p)),
                MqttEvent::NotifyError(err) => {
                    return Err(ConnectError::Protocol(format!(
                        "MQTT protocol error: {err}"
                    )));
                }
                MqttEvent::RequestClose => {
                    return Err(ConnectError::Protocol(
                        "the MQTT engine closed the connection".into(),
                    ));
                }
                MqttEvent::NotifyPacketIdReleased(_)
                | MqttEvent::RequestTimerReset { .. }
                | MqttEvent::RequestTimerCancel(_) => {}
            }
        }
        Ok(incoming)
    }
}

fn build_v5(
    m: &StoredMessage,
    identity: &Identity,
    pid: Option<u16>,
    dup: bool,
) -> Result<v5_0::Publish, ConnectError> {
    let err = |e| build_err("PUBLISH", e);
    let p = &m.msg.props;
    let mut props: Vec<Property> = Vec::new();
    if p.payload_is_utf8 {
        let v = mqtt::packet::PayloadFormatIndicator::new(mqtt::packet::PayloadFormat::String)
            .map_err(err)?;
        props.push(Property::PayloadFormatIndicator(v));
    }
    if let Some(v) = &p.content_type {
        props.push(Property::ContentType(
            mqtt::packet::ContentType::new(v.as_str()).map_err(err)?,
        ));
    }
    if let Some(v) = &p.response_topic {
        props.push(Property::ResponseTopic(
            mqtt::packet::ResponseTopic::new(v.as_str()).map_err(err)?,
        ));
    }
    if let Some(v) = &p.correlation_data {
        props.push(Property::CorrelationData(
            mqtt::packet::CorrelationData::new(v).map_err(err)?,
        ));
    }
    for (k, v) in &p.user {
        props.push(Property::UserProperty(
            mqtt::packet::UserProperty::new(k.as_str(), v.as_str()).map_err(err)?,
        ));
    }
    let id = identity.to_property_value();
    props.push(Property::UserProperty(
        mqtt::packet::UserProperty::new(Identity::USER_PROPERTY, id.as_str()).map_err(err)?,
    ));
    let mut b = v5_0::Publish::builder()
        .topic_name(m.msg.topic.as_str())
        .map_err(err)?
        .qos(qos_to_mqtt(m.msg.qos))
        .retain(m.msg.retain)
        .dup(dup)
        .payload(m.msg.payload.as_slice())
        .props(props);
    if let Some(pid) = pid {
        b = b.packet_id(pid);
    }
    b.build().map_err(err)
}

fn build_v311(
    m: &StoredMessage,
    pid: Option<u16>,
    dup: bool,
) -> Result<v3_1_1::Publish, ConnectError> {
    let err = |e| build_err("PUBLISH", e);
    let mut b = v3_1_1::Publish::builder()
        .topic_name(m.msg.topic.as_str())
        .map_err(err)?
        .qos(qos_to_mqtt(m.msg.qos))
        .retain(m.msg.retain)
        .dup(dup)
        .payload(m.msg.payload.as_slice());
    if let Some(pid) = pid {
        b = b.packet_id(pid);
    }
    b.build().map_err(err)
}

fn translate(p: Packet) -> Incoming {
    use mqtt::result_code::{ConnectReasonCode as R5, ConnectReturnCode as R3};
    match p {
        Packet::V5_0Connack(c) => {
            let refused = match c.reason_code() {
                R5::Success => None,
                R5::UnsupportedProtocolVersion => Some(Refusal::ProtocolVersion),
                R5::BadUserNameOrPassword | R5::BadAuthenticationMethod => {
                    Some(Refusal::BadCredentials)
                }
                R5::NotAuthorized | R5::Banned => Some(Refusal::NotAuthorized),
                R5::ClientIdentifierNotValid => Some(Refusal::ClientId),
                R5::ServerUnavailable | R5::ServerBusy | R5::ConnectionRateExceeded => {
                    Some(Refusal::Unavailable)
                }
                other => Some(Refusal::Other(other as u8)),
            };
            let mut ack = ConnAck {
                session_present: c.session_present(),
                refused,
                receive_maximum: None,
                maximum_packet_size: None,
            };
            for prop in c.props() {
                match prop {
                    Property::ReceiveMaximum(v) => ack.receive_maximum = Some(v.val()),
                    Property::MaximumPacketSize(v) => ack.maximum_packet_size = Some(v.val()),
                    _ => {}
                }
            }
            Incoming::ConnAck(ack)
        }
        Packet::V3_1_1Connack(c) => {
            let refused = match c.return_code() {
                R3::Accepted => None,
                R3::UnacceptableProtocolVersion => Some(Refusal::ProtocolVersion),
                R3::IdentifierRejected => Some(Refusal::ClientId),
                R3::ServerUnavailable => Some(Refusal::Unavailable),
                R3::BadUserNameOrPassword => Some(Refusal::BadCredentials),
                R3::NotAuthorized => Some(Refusal::NotAuthorized),
            };
            Incoming::ConnAck(ConnAck {
                session_present: c.session_present(),
                refused,
                receive_maximum: None,
                maximum_packet_size: None,
            })
        }
        Packet::V5_0Puback(a) => Incoming::PubAck {
            pid: a.packet_id(),
            ok: a.reason_code().is_none_or(|r| r.is_success()),
        },
        Packet::V3_1_1Puback(a) => Incoming::PubAck {
            pid: a.packet_id(),
            ok: true,
        },
        Packet::V5_0Pubrec(a) => Incoming::PubRec {
            pid: a.packet_id(),
            ok: a.reason_code().is_none_or(|r| r.is_success()),
        },
        Packet::V3_1_1Pubrec(a) => Incoming::PubRec {
            pid: a.packet_id(),
            ok: true,
        },
        Packet::V5_0Pubcomp(a) => Incoming::PubComp { pid: a.packet_id() },
        Packet::V3_1_1Pubcomp(a) => Incoming::PubComp { pid: a.packet_id() },
        Packet::V5_0Publish(_) | Packet::V3_1_1Publish(_) => Incoming::Publish,
        Packet::V5_0Pingresp(_) | Packet::V3_1_1Pingresp(_) => Incoming::PingResp,
        Packet::V5_0Disconnect(d) => Incoming::Disconnect {
            reason: d
                .reason_code()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "normal".into()),
        },
        _ => Incoming::Other,
    }
}
