//! A scripted MQTT broker for protocol tests: it answers CONNECT with the
//! session flag the script chooses, answers each PUBLISH as the script says
//! (ack, refuse, stay silent, close, ack then DISCONNECT), and records what
//! it received. Not a broker: one client at a time, no routing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How the scripted broker answers one QoS 1 or 2 PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// PUBACK / PUBREC with success.
    Ack,
    /// PUBACK / PUBREC with reason code 0x80 (unspecified error).
    Refuse,
    /// No answer.
    Silent,
    /// Close the connection without answering.
    Close,
    /// The ack and a DISCONNECT in one write, then close.
    AckThenDisconnect,
    /// The ack and a malformed packet (reserved type 0) in one write.
    AckThenGarbage,
    /// An ack for another packet id, one never sent.
    AckWrongPid,
    /// The ack, twice.
    AckTwice,
    /// Instead of an ack, the start of a PUBLISH that claims to be 10 MB.
    Oversize,
}

/// A PUBLISH the broker received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Index of the connection it came on (0 for the first).
    pub conn: usize,
    /// Packet id (0 for QoS 0).
    pub pid: u16,
    /// QoS.
    pub qos: u8,
    /// DUP flag.
    pub dup: bool,
    /// Payload.
    pub payload: Vec<u8>,
}

type SessionScript = Box<dyn Fn(usize) -> bool + Send>;
type ReplyScript = Box<dyn Fn(usize, usize) -> Reply + Send>;

/// The scripted broker; runs until the test ends.
pub struct ScriptedBroker {
    port: u16,
    publishes: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
}

impl ScriptedBroker {
    /// Starts on a free loopback port. `session_present(conn)` is the
    /// CONNACK flag for the n-th connection; `reply(conn, nth)` answers the
    /// n-th QoS 1/2 PUBLISH of that connection.
    pub fn start(
        mqtt5: bool,
        session_present: impl Fn(usize) -> bool + Send + 'static,
        reply: impl Fn(usize, usize) -> Reply + Send + 'static,
    ) -> ScriptedBroker {
        Self::spawn(mqtt5, (0, None), Box::new(session_present), Box::new(reply))
    }

    /// An MQTT 5 broker whose CONNACK announces Maximum QoS `max_qos`;
    /// otherwise as [`ScriptedBroker::start`] with a kept session. It
    /// records what QoS each PUBLISH came with.
    pub fn with_max_qos(max_qos: u8, reply: impl Fn(usize, usize) -> Reply + Send + 'static) -> ScriptedBroker {
        Self::spawn(true, (0, Some(max_qos)), Box::new(|_| true), Box::new(reply))
    }

    /// A broker that refuses every CONNECT with this CONNACK code (an MQTT
    /// 3.1.1 return code or an MQTT 5 reason code).
    pub fn refusing(mqtt5: bool, code: u8) -> ScriptedBroker {
        Self::spawn(mqtt5, (code, None), Box::new(|_| false), Box::new(|_, _| Reply::Ack))
    }

    fn spawn(mqtt5: bool, connack: (u8, Option<u8>), sp: SessionScript, rp: ReplyScript) -> ScriptedBroker {
        Self::listen(move |mut stream, conn, p| {
            if read_packet(&mut stream).is_some() {
                serve_after_connect(stream, conn, mqtt5, connack, &sp, &rp, p);
            }
        })
    }

    /// Serves one connection at a time on a free loopback port, counting
    /// them.
    fn listen(serve_one: impl Fn(TcpStream, usize, &Mutex<Vec<Received>>) + Send + 'static) -> ScriptedBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted broker");
        let port = listener.local_addr().expect("addr").port();
        let publishes = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (p, c) = (publishes.clone(), connections.clone());
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                serve_one(stream, conn, &p);
            }
        });
        ScriptedBroker { port, publishes, connections }
    }

    /// An MQTT 3.1.1 broker that allows at most `max` unfinished inbound
    /// QoS 2 messages (PUBREC sent, PUBREL not yet received) and closes the
    /// connection on the next one, without a word: CONNACK has no way to
    /// say so in 3.1.1. It never reports a session (a client without
    /// subscriptions has none on some brokers). It records every PUBLISH.
    pub fn limiting_qos2(max: usize) -> ScriptedBroker {
        Self::listen(move |stream, conn, p| serve_limited(stream, conn, max, p))
    }

    /// A broker that speaks only MQTT 3.1.1 and leaves an MQTT 5 CONNECT
    /// unanswered until the client gives up on it (amqtt 0.12 waits for
    /// ever on the CONNECT's properties); a 3.1.1 CONNECT gets a CONNACK
    /// without a session, and every PUBLISH its acknowledgement.
    pub fn silent_to_mqtt_5() -> ScriptedBroker {
        Self::listen(|mut stream, conn, p| {
            let Some((_, body)) = read_packet(&mut stream) else { return };
            // Protocol name (2-byte length, "MQTT"), then the level.
            if body.get(6) == Some(&5) {
                // Until the client closes it.
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
                return;
            }
            let (session, reply) = (Box::new(|_| false) as SessionScript, Box::new(|_, _| Reply::Ack) as ReplyScript);
            serve_after_connect(stream, conn, false, (0, None), &session, &reply, p);
        })
    }

    /// A broker that takes every connection (no session) and refuses
    /// every subscription: a SUBACK with 0x80 for each filter (MQTT
    /// 3.1.1's failure code, MQTT 5's unspecified error), as aedes does
    /// for a filter its `authorizeSubscribe` denies.
    pub fn refusing_subscriptions(mqtt5: bool) -> ScriptedBroker {
        Self::listen(move |mut stream, _, _| {
            let connack: &[u8] = if mqtt5 { &[0x20, 3, 0, 0, 0] } else { &[0x20, 2, 0, 0] };
            if read_packet(&mut stream).is_none() || stream.write_all(connack).is_err() {
                return;
            }
            while let Some((first, body)) = read_packet(&mut stream) {
                match first >> 4 {
                    8 => {
                        // Packet id, properties (MQTT 5), then each filter
                        // with its options byte.
                        let mut at = 2 + if mqtt5 { property_block_len(&body[2..]) } else { 0 };
                        let mut ack = vec![0x90, 0, body[0], body[1]];
                        if mqtt5 {
                            ack.push(0);
                        }
                        while at + 2 <= body.len() {
                            at += 2 + u16::from_be_bytes([body[at], body[at + 1]]) as usize + 1;
                            ack.push(0x80);
                        }
                        ack[1] = (ack.len() - 2) as u8;
                        if stream.write_all(&ack).is_err() {
                            return;
                        }
                    }
                    12 => {
                        let _ = stream.write_all(&[0xd0, 0]);
                    }
                    14 => return,
                    _ => {}
                }
            }
        })
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Every PUBLISH received so far.
    pub fn publishes(&self) -> Vec<Received> {
        self.publishes.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// One packet: first byte and body.
fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        len |= ((b[0] & 0x7f) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((first[0], body))
}

/// Skips an MQTT 5 property block at the start of `b`; returns its length.
fn property_block_len(b: &[u8]) -> usize {
    let (mut len, mut shift, mut n) = (0usize, 0, 0);
    for byte in b {
        n += 1;
        len |= ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    n + len
}

fn serve_limited(mut s: TcpStream, conn: usize, max: usize, publishes: &Mutex<Vec<Received>>) {
    if read_packet(&mut s).is_none() || s.write_all(&[0x20, 2, 0, 0]).is_err() {
        return;
    }
    let mut unfinished = std::collections::HashSet::new();
    while let Some((first, body)) = read_packet(&mut s) {
        match first >> 4 {
            3 => {
                let qos = (first >> 1) & 3;
                let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                let at = 2 + topic_len;
                let (pid, payload) = if qos > 0 {
                    (u16::from_be_bytes([body[at], body[at + 1]]), body[at + 2..].to_vec())
                } else {
                    (0, body[at..].to_vec())
                };
                let dup = first & 0x08 != 0;
                publishes.lock().unwrap().push(Received { conn, pid, qos, dup, payload });
                let [hi, lo] = pid.to_be_bytes();
                let ok = match qos {
                    1 => s.write_all(&[0x40, 2, hi, lo]).is_ok(),
                    2 => {
                        unfinished.insert(pid);
                        unfinished.len() <= max && s.write_all(&[0x50, 2, hi, lo]).is_ok()
                    }
                    _ => true,
                };
                if !ok {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            6 => {
                unfinished.remove(&u16::from_be_bytes([body[0], body[1]]));
                let _ = s.write_all(&[0x70, 2, body[0], body[1]]);
            }
            12 => {
                let _ = s.write_all(&[0xd0, 0]);
            }
            14 => return,
            _ => {}
        }
    }
}

/// One connection once its CONNECT was read: CONNACK, then the PUBLISHes.
fn serve_after_connect(
    mut s: TcpStream,
    conn: usize,
    mqtt5: bool,
    (refusal, max_qos): (u8, Option<u8>),
    session_present: &SessionScript,
    reply: &ReplyScript,
    publishes: &Mutex<Vec<Received>>,
) {
    let sp = session_present(conn) as u8;
    let connack: Vec<u8> = match (mqtt5, max_qos) {
        // Property 0x24: Maximum QoS.
        (true, Some(q)) => vec![0x20, 5, sp, refusal, 2, 0x24, q],
        (true, None) => vec![0x20, 3, sp, refusal, 0],
        (false, _) => vec![0x20, 2, sp, refusal],
    };
    if s.write_all(&connack).is_err() || refusal != 0 {
        return;
    }
    let mut nth = 0;
    while let Some((first, body)) = read_packet(&mut s) {
        match first >> 4 {
            3 => {
                let qos = (first >> 1) & 3;
                let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                let mut at = 2 + topic_len;
                let mut pid = 0;
                if qos > 0 {
                    pid = u16::from_be_bytes([body[at], body[at + 1]]);
                    at += 2;
                }
                if mqtt5 {
                    at += property_block_len(&body[at..]);
                }
                let dup = first & 0x08 != 0;
                publishes.lock().unwrap().push(Received { conn, pid, qos, dup, payload: body[at..].to_vec() });
                if qos == 0 {
                    continue;
                }
                let ack_type = if qos == 1 { 0x40 } else { 0x50 };
                let [hi, lo] = pid.to_be_bytes();
                let r = reply(conn, nth);
                nth += 1;
                let ok = match r {
                    Reply::Ack => s.write_all(&[ack_type, 2, hi, lo]).is_ok(),
                    Reply::Refuse => s.write_all(&[ack_type, 3, hi, lo, 0x80]).is_ok(),
                    Reply::Silent => true,
                    Reply::Close => false,
                    Reply::AckThenDisconnect => {
                        let _ = s.write_all(&[ack_type, 2, hi, lo, 0xe0, 1, 0x8b]);
                        false
                    }
                    Reply::AckThenGarbage => s.write_all(&[ack_type, 2, hi, lo, 0x00, 0x00]).is_ok(),
                    Reply::AckWrongPid => {
                        let [whi, wlo] = pid.wrapping_add(1000).max(1).to_be_bytes();
                        s.write_all(&[ack_type, 2, whi, wlo]).is_ok()
                    }
                    Reply::AckTwice => s.write_all(&[ack_type, 2, hi, lo, ack_type, 2, hi, lo]).is_ok(),
                    // Remaining length 10,000,000 as a variable byte integer.
                    Reply::Oversize => s.write_all(&[0x30, 0x80, 0xad, 0xe2, 0x04, 0, 1, b't']).is_ok(),
                };
                if !ok {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            6 => {
                let _ = s.write_all(&[0x70, 2, body[0], body[1]]);
            }
            12 => {
                let _ = s.write_all(&[0xd0, 0]);
            }
            14 => return,
            _ => {}
        }
    }
}
