//! A model MQTT broker: persistent sessions that a kill -9 takes back to
//! the last autosave (or loses, without persistence), QoS 2 exchanges held
//! by packet id, and the quirks of brokers met in the field.

use std::collections::{BTreeSet, HashMap};

use crate::schedule::Schedule;

/// A packet from the producer, as the simulator's codec frames it.
pub const FRAME: usize = 13;

/// What the broker sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    ConnAck { present: bool },
    PubAck { pid: u16 },
    PubRec { pid: u16 },
    PubComp { pid: u16 },
    PingResp,
}

/// The broker's memory of the producer's session.
#[derive(Debug, Clone, Default)]
struct Session {
    /// QoS 2 packet ids PUBREC'd and not yet released, with the message id.
    qos2: HashMap<u16, u64>,
}

/// The model broker.
#[derive(Debug)]
pub struct Broker {
    pub up: bool,
    persistence: bool,
    autosave_ms: u64,
    last_save: u64,
    live: Option<Session>,
    saved: Option<Session>,
    qos2_as_puback: bool,
    max_qos_1: bool,
    /// Every message id the broker acknowledged (PUBACK or PUBREC): from
    /// then on it is the broker's, and the producer's promise is kept.
    pub acknowledged: BTreeSet<u64>,
}

/// What the broker did with a frame.
pub enum Reply {
    Send(Down),
    Nothing,
    /// A protocol error: the broker closes the connection.
    Close(&'static str),
}

impl Broker {
    pub fn new(s: &Schedule) -> Self {
        Broker {
            up: true,
            persistence: s.persistence,
            autosave_ms: s.autosave_ms,
            last_save: 0,
            live: None,
            saved: None,
            qos2_as_puback: s.qos2_as_puback,
            max_qos_1: s.max_qos_1,
            acknowledged: BTreeSet::new(),
        }
    }

    /// The CONNACK's session-present flag (the session is kept or made).
    pub fn connect(&mut self) -> bool {
        let present = self.live.is_some();
        self.live.get_or_insert_with(Session::default);
        present
    }

    pub fn max_qos(&self) -> Option<u8> {
        self.max_qos_1.then_some(1)
    }

    /// kill -9: what was not saved is gone.
    pub fn kill(&mut self) {
        self.up = false;
        self.live = if self.persistence { self.saved.clone() } else { None };
    }

    /// Autosave, when it is due.
    pub fn tick(&mut self, t: u64) {
        if self.up && self.persistence && t >= self.last_save + self.autosave_ms {
            self.saved = self.live.clone();
            self.last_save = t;
        }
    }

    /// Handles one frame: (kind, pid, dup, qos, id).
    pub fn receive(&mut self, f: &[u8]) -> (Reply, Option<u64>) {
        let pid = u16::from_be_bytes([f[1], f[2]]);
        let qos = f[4];
        let id = u64::from_be_bytes(f[5..13].try_into().expect("frame size"));
        let session = self.live.get_or_insert_with(Session::default);
        match f[0] {
            1 if qos == 2 && self.max_qos_1 => (Reply::Close("QoS 2 PUBLISH above the maximum QoS"), Some(id)),
            1 if qos == 1 || (qos == 2 && self.qos2_as_puback) => {
                self.acknowledged.insert(id);
                (Reply::Send(Down::PubAck { pid }), Some(id))
            }
            1 if qos == 2 => {
                // A packet id still held is a duplicate of the message the
                // broker holds under it: answered again, not taken twice.
                session.qos2.entry(pid).or_insert(id);
                self.acknowledged.insert(id);
                (Reply::Send(Down::PubRec { pid }), Some(id))
            }
            1 => (Reply::Nothing, Some(id)),
            2 => {
                session.qos2.remove(&pid);
                (Reply::Send(Down::PubComp { pid }), None)
            }
            _ => (Reply::Send(Down::PingResp), None),
        }
    }
}
