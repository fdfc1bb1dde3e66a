//! What a broker acknowledged, read off the wire by the fault proxy: an
//! account of the publisher's traffic that owes nothing to the publisher's
//! own bookkeeping, so a test can check a client against it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Payloads of QoS 1 and 2 PUBLISH packets that the broker answered with
/// PUBACK or PUBREC, over every connection through one proxy.
pub(crate) type Acknowledged = Arc<Mutex<Vec<Vec<u8>>>>;

/// One connection's two byte streams, parsed into packets.
pub(crate) struct Connection {
    acknowledged: Acknowledged,
    /// MQTT protocol level from the CONNECT (4: 3.1.1, 5: 5.0).
    level: u8,
    /// Packet id -> payload of PUBLISH packets not acknowledged yet.
    open: HashMap<u16, Vec<u8>>,
    to_broker: Vec<u8>,
    from_broker: Vec<u8>,
}

impl Connection {
    pub(crate) fn new(acknowledged: Acknowledged) -> Connection {
        Connection { acknowledged, level: 4, open: HashMap::new(), to_broker: Vec::new(), from_broker: Vec::new() }
    }

    /// Bytes the client sent that reached the broker.
    pub(crate) fn client_sent(&mut self, bytes: &[u8]) {
        self.to_broker.extend_from_slice(bytes);
        while let Some((header, body)) = take_packet(&mut self.to_broker) {
            match header >> 4 {
                1 => self.level = body.get(6).copied().unwrap_or(4),
                3 => self.publish(header, &body),
                _ => {}
            }
        }
    }

    /// Bytes the broker sent.
    pub(crate) fn broker_sent(&mut self, bytes: &[u8]) {
        self.from_broker.extend_from_slice(bytes);
        while let Some((header, body)) = take_packet(&mut self.from_broker) {
            // PUBACK or PUBREC: the broker has taken the message, unless
            // an MQTT 5 reason code of 0x80 or more says it refused it.
            let refused = self.level == 5 && body.get(2).is_some_and(|code| *code >= 0x80);
            if matches!(header >> 4, 4 | 5) && body.len() >= 2 && !refused {
                let pid = u16::from_be_bytes([body[0], body[1]]);
                if let Some(payload) = self.open.remove(&pid) {
                    crate::proxy::lock(&self.acknowledged).push(payload);
                }
            }
        }
    }

    fn publish(&mut self, header: u8, body: &[u8]) {
        let qos = (header >> 1) & 3;
        let Some(topic_len) = body.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else { return };
        let mut at = 2 + topic_len;
        if qos == 0 || body.len() < at + 2 {
            return;
        }
        let pid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
        if self.level == 5 {
            let Some((props, used)) = varint(&body[at..]) else { return };
            at += used + props;
        }
        if let Some(payload) = body.get(at..) {
            self.open.insert(pid, payload.to_vec());
        }
    }
}

/// A variable byte integer and the bytes it took.
fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The first whole packet in `buf` (first byte, body), removed from it.
fn take_packet(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let (len, used) = varint(buf.get(1..)?)?;
    let end = 1 + used + len;
    if buf.len() < end {
        return None;
    }
    let body = buf[1 + used..end].to_vec();
    let header = buf[0];
    buf.drain(..end);
    Some((header, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(header: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![header];
        let mut len = body.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            out.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn publish(level: u8, pid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 1, b't'];
        body.extend_from_slice(&pid.to_be_bytes());
        if level == 5 {
            body.extend_from_slice(&[3, 0x23, 0, 1]); // topic alias 1
        }
        body.extend_from_slice(payload);
        packet(0x32, &body)
    }

    fn connect(level: u8) -> Vec<u8> {
        packet(0x10, &[0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 30])
    }

    #[test]
    fn only_what_the_broker_acknowledged_counts_in_any_chunking() {
        for level in [4, 5] {
            let acked = Acknowledged::default();
            let mut c = Connection::new(acked.clone());
            let mut up = connect(level);
            up.extend(publish(level, 1, b"one"));
            up.extend(publish(level, 2, &vec![b'x'; 300]));
            up.extend(publish(level, 3, b"three"));
            // One byte at a time: packets cut anywhere.
            for b in &up {
                c.client_sent(std::slice::from_ref(b));
            }
            let mut down = packet(0x40, &[0, 2]);
            down.extend(packet(0x50, &[0, 1]));
            down.extend(packet(0x40, &[0, 9])); // nothing open under 9
                                                // MQTT 5: a PUBACK with a refusing reason code (0x87, not
                                                // authorised) is no acknowledgement; on 3.1.1 there is none.
            down.extend(packet(0x40, &[0, 3, 0x87, 0]));
            for chunk in down.chunks(3) {
                c.broker_sent(chunk);
            }
            let mut want = vec![vec![b'x'; 300], b"one".to_vec()];
            if level == 4 {
                want.push(b"three".to_vec());
            }
            assert_eq!(*acked.lock().unwrap(), want, "level {level}");
        }
    }
}
