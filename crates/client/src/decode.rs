//! A broker's PUBLISH read in place: the topic, payload and properties a
//! consumer keeps are copied once out of the packet's body, with no packet
//! object built first (docs/design.md, "The driver"). It takes and refuses
//! exactly what the codec's `Publish::parse` takes and refuses, MQTT 3.1.1
//! and 5 (a property test in `link` compares the two on valid, broken and
//! random packets), so that a packet the codec would call malformed still
//! ends the link as `Broken`.

use mqtt_protocol_core::mqtt::result_code::MqttError;
use steadfast_core::receipt::RECEIPT_PROPERTY;
use steadfast_core::{Identity, Qos};

use crate::link::{InProps, Inbound};

/// A body being read, front to back.
struct Body<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MqttError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or(MqttError::MalformedPacket)?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, MqttError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, MqttError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, MqttError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Two bytes of length, then that many.
    fn binary(&mut self) -> Result<&'a [u8], MqttError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A UTF-8 string: two bytes of length, then that many.
    fn string(&mut self) -> Result<&'a str, MqttError> {
        std::str::from_utf8(self.binary()?).map_err(|_| MqttError::MalformedPacket)
    }

    /// A variable byte integer: one to four bytes, seven bits each.
    fn varint(&mut self) -> Result<u32, MqttError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(MqttError::MalformedPacket)
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at..]
    }
}

/// An MQTT 5 PUBACK, PUBREC or PUBCOMP body: its packet id and its reason
/// code (0, success, when left out). Read here rather than by the codec,
/// which refuses a reason code the packet may not carry: Mosquitto 2.0
/// answers a PUBLISH over its `message_size_limit` with PUBACK 0x95
/// ("packet too large", a code of DISCONNECT), and taken for a malformed
/// packet it ended the link, which sent the message again, for ever. Any
/// code from 0x80 on is a refusal, as MQTT 5 defines them. The properties
/// are skipped (their length must fit the body).
pub(crate) fn ack_v5(body: &[u8]) -> Result<(u16, u8), MqttError> {
    let mut b = Body { bytes: body, at: 0 };
    let pid = b.u16()?;
    if pid == 0 {
        return Err(MqttError::MalformedPacket);
    }
    let code = if b.rest().is_empty() { 0 } else { b.u8()? };
    if !b.rest().is_empty() {
        let len = b.varint()? as usize;
        b.take(len)?;
        if !b.rest().is_empty() {
            return Err(MqttError::MalformedPacket);
        }
    }
    Ok((pid, code))
}

/// The PUBLISH whose fixed header carried `flags` and whose body (exactly
/// its remaining length) is `body`.
pub(crate) fn publish(flags: u8, body: &[u8], v5: bool) -> Result<Inbound, MqttError> {
    let qos = match (flags >> 1) & 3 {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        2 => Qos::ExactlyOnce,
        _ => return Err(MqttError::MalformedPacket),
    };
    let mut b = Body { bytes: body, at: 0 };
    let topic = b.string()?;
    let pid = if qos == Qos::AtMostOnce { None } else { Some(b.u16()?) };
    let mut m = Inbound {
        topic: topic.to_owned(),
        payload: Vec::new(),
        qos,
        pid,
        retain: flags & 1 == 1,
        dup: flags & 8 == 8,
        identity: None,
        receipt: None,
        props: InProps::default(),
        expiry_secs: None,
    };
    // MQTT 5 as the codec reads it: a body that ends after the packet id
    // has no properties (not even their length).
    if v5 && !b.rest().is_empty() {
        let len = b.varint()?;
        let mut props = Body { bytes: b.take(len as usize)?, at: 0 };
        properties(&mut props, &mut m)?;
    }
    m.payload = b.rest().to_vec();
    Ok(m)
}

/// The properties of a PUBLISH: those MQTT 5 allows there, each at most
/// once but for user properties and subscription identifiers.
fn properties(p: &mut Body<'_>, m: &mut Inbound) -> Result<(), MqttError> {
    // Payload format, expiry, content type, response topic, correlation
    // data, topic alias: seen once already.
    let mut seen = [false; 6];
    let mut once =
        |i: usize| if std::mem::replace(&mut seen[i], true) { Err(MqttError::ProtocolError) } else { Ok(()) };
    while !p.rest().is_empty() {
        match p.u8()? {
            0x01 => {
                let v = p.u8()?;
                if v > 1 {
                    return Err(MqttError::ProtocolError);
                }
                once(0)?;
                m.props.get_mut().payload_is_utf8 = v == 1;
            }
            0x02 => {
                m.expiry_secs = Some(p.u32()?);
                once(1)?;
            }
            0x03 => {
                m.props.get_mut().content_type = Some(p.string()?.to_owned());
                once(2)?;
            }
            0x08 => {
                m.props.get_mut().response_topic = Some(p.string()?.to_owned());
                once(3)?;
            }
            0x09 => {
                m.props.get_mut().correlation_data = Some(p.binary()?.to_vec());
                once(4)?;
            }
            0x0b => {
                // Kept by no one here, checked as the codec does.
                if p.varint().map_err(|_| MqttError::InsufficientBytes)? == 0 {
                    return Err(MqttError::ProtocolError);
                }
            }
            0x23 => {
                if p.u16()? == 0 {
                    return Err(MqttError::ProtocolError);
                }
                once(5)?;
            }
            0x26 => {
                let (key, val) = (p.string()?, p.string()?);
                if key == Identity::USER_PROPERTY {
                    // The first one is the identity; later ones are dropped.
                    if m.identity.is_none() {
                        m.identity = Some(val.to_owned());
                    }
                } else if key == RECEIPT_PROPERTY {
                    m.receipt = Some(val.to_owned());
                } else {
                    m.props.get_mut().user.push((key.to_owned(), val.to_owned()));
                }
            }
            // Not a PUBLISH property, or no property at all.
            _ => return Err(MqttError::ProtocolError),
        }
    }
    Ok(())
}
