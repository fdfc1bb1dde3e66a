//! A model MQTT broker: the producer's persistent session (QoS 2
//! exchanges held by packet id) and the consumer's (a queue and what is in
//! flight to it), both taken back to the last autosave by a kill -9, or
//! lost without persistence; and the quirks of brokers met in the field.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::schedule::Schedule;

/// A packet from the producer, as the simulator's codec frames it.
pub const FRAME: usize = 13;
/// The bit of a frame's QoS byte that marks a message larger than the
/// brokers take.
pub const OVERSIZE: u8 = 0x80;
/// On a topic the brokers' ACL denies: refused with 0x87 (not authorised).
pub const DENIED: u8 = 0x40;
/// Messages in flight to the consumer at most.
const SUB_WINDOW: usize = 8;

/// What the broker sends the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    ConnAck {
        present: bool,
    },
    /// `of`: the message it answers (the simulator's bookkeeping, not on
    /// the wire); `code`: its reason code, from 0x80 on a refusal.
    PubAck {
        pid: u16,
        of: u64,
        code: u8,
    },
    PubRec {
        pid: u16,
        of: u64,
        code: u8,
    },
    PubComp {
        pid: u16,
    },
    PingResp,
}

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = |code: u8| match code {
            0x87 => " with 0x87 (not authorised: refused for good)",
            c if c >= 0x80 => " with an error code (refused)",
            _ => "",
        };
        match *self {
            Down::ConnAck { present } => write!(f, "CONNACK, session present {present}"),
            Down::PubAck { pid, code, .. } => write!(f, "PUBACK pid {pid}{}", verdict(code)),
            Down::PubRec { pid, code, .. } => write!(f, "PUBREC pid {pid}{}", verdict(code)),
            Down::PubComp { pid } => write!(f, "PUBCOMP pid {pid}"),
            Down::PingResp => f.write_str("PINGRESP"),
        }
    }
}

/// The broker's memory of the producer's session.
#[derive(Debug, Clone, Default)]
struct Session {
    /// QoS 2 packet ids PUBREC'd and not yet released, with the message id.
    qos2: HashMap<u16, u64>,
}

/// The consumer's session: what waits for it and what is in flight to it.
#[derive(Debug, Clone, Default)]
pub struct Subscriber {
    queue: VecDeque<u64>,
    inflight: BTreeMap<u16, u64>,
    next_pid: u16,
}

impl Subscriber {
    fn ids(&self) -> BTreeSet<u64> {
        self.queue.iter().chain(self.inflight.values()).copied().collect()
    }
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
    sub: Option<Subscriber>,
    sub_saved: Option<Subscriber>,
    qos2_as_puback: bool,
    max_qos_1: bool,
    qos2_closes: bool,
    session_expiry_ms: Option<u64>,
    max_queued: Option<usize>,
    /// When the producer's and the consumer's connections ended, while
    /// they are away (their sessions expire from there).
    producer_away: Option<u64>,
    consumer_away: Option<u64>,
    /// Every message id the broker acknowledged (PUBACK or PUBREC): from
    /// then on it is the broker's, and the producer's promise is kept.
    pub acknowledged: BTreeSet<u64>,
    /// Messages the broker lost for the consumer (a kill without
    /// persistence, or since its last autosave): beyond steadfast's reach.
    pub lost: BTreeSet<u64>,
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
        // The consumer registered its session before the run.
        let registered = Some(Subscriber { next_pid: 1, ..Subscriber::default() });
        Broker {
            up: true,
            persistence: s.persistence,
            autosave_ms: s.autosave_ms,
            last_save: 0,
            live: None,
            saved: None,
            sub: registered.clone(),
            sub_saved: registered,
            qos2_as_puback: s.qos2_as_puback,
            max_qos_1: s.max_qos_1,
            qos2_closes: s.qos2_closes,
            session_expiry_ms: s.session_expiry_ms,
            max_queued: s.max_queued,
            producer_away: None,
            consumer_away: None,
            acknowledged: BTreeSet::new(),
            lost: BTreeSet::new(),
        }
    }

    /// Whether a session whose client left at `away` has expired by `t`.
    fn expired(&self, away: Option<u64>, t: u64) -> bool {
        matches!((away, self.session_expiry_ms), (Some(a), Some(e)) if t >= a + e)
    }

    /// The producer's connection ended at `t`.
    pub fn producer_left(&mut self, t: u64) {
        self.producer_away.get_or_insert(t);
    }

    /// The consumer's connection ended at `t`.
    pub fn consumer_left(&mut self, t: u64) {
        self.consumer_away.get_or_insert(t);
    }

    /// The producer's CONNACK at `t`: session present (the session is kept
    /// or made; one that expired while it was away is gone).
    pub fn connect(&mut self, t: u64) -> bool {
        let away = self.producer_away.take();
        if self.expired(away, t) {
            self.live = None;
        }
        let present = self.live.is_some();
        self.live.get_or_insert_with(Session::default);
        present
    }

    /// The consumer's CONNACK at `t`, and what it had in flight, sent
    /// again. A session that expired while it was away is gone, and what
    /// it held with it.
    pub fn connect_consumer(&mut self, t: u64) -> (bool, Vec<(u16, u64)>) {
        let away = self.consumer_away.take();
        if self.expired(away, t) {
            if let Some(sub) = self.sub.take() {
                self.lost.extend(sub.ids());
            }
        }
        let present = self.sub.is_some();
        let sub = self.sub.get_or_insert_with(|| Subscriber { next_pid: 1, ..Subscriber::default() });
        (present, sub.inflight.iter().map(|(p, id)| (*p, *id)).collect())
    }

    pub fn max_qos(&self) -> Option<u8> {
        self.max_qos_1.then_some(1)
    }

    /// kill -9: what was not saved is gone.
    pub fn kill(&mut self, t: u64) {
        self.up = false;
        self.producer_left(t);
        self.consumer_left(t);
        self.live = if self.persistence { self.saved.clone() } else { None };
        let back = if self.persistence { self.sub_saved.clone() } else { None };
        let kept = back.as_ref().map(Subscriber::ids).unwrap_or_default();
        if let Some(sub) = &self.sub {
            self.lost.extend(sub.ids().difference(&kept));
        }
        self.sub = back;
    }

    /// Autosave, when it is due.
    pub fn tick(&mut self, t: u64) {
        if self.up && self.persistence && t >= self.last_save + self.autosave_ms {
            self.saved = self.live.clone();
            self.sub_saved = self.sub.clone();
            self.last_save = t;
        }
    }

    /// A message taken from the producer goes to the consumer's session.
    fn forward(&mut self, id: u64) {
        let max = self.max_queued;
        let full = |sub: &Subscriber| max.is_some_and(|max| sub.queue.len() >= max);
        match self.sub.as_mut() {
            Some(sub) if !full(sub) => sub.queue.push_back(id),
            // No session to queue it in, or its queue is full: dropped.
            _ => {
                self.lost.insert(id);
            }
        }
    }

    /// Handles one frame: (kind, pid, dup, qos, id); returns what to answer
    /// and the message id it concerned. With `refuse`, a new PUBLISH is
    /// refused for now (0x97, quota exceeded); one on a denied topic is
    /// refused for good (0x87, not authorised).
    pub fn receive(&mut self, f: &[u8], refuse: bool) -> (Reply, Option<u64>) {
        let pid = u16::from_be_bytes([f[1], f[2]]);
        let qos = f[4] & 3;
        let oversize = f[4] & OVERSIZE != 0;
        let denied = f[4] & DENIED != 0;
        let id = u64::from_be_bytes(f[5..13].try_into().expect("frame size"));
        let held = self.live.as_ref().is_some_and(|s| s.qos2.contains_key(&pid));
        match f[0] {
            1 if oversize => (Reply::Close("packet too large"), Some(id)),
            1 if qos == 2 && self.max_qos_1 => (Reply::Close("QoS 2 PUBLISH above the maximum QoS"), Some(id)),
            1 if qos == 2 && self.qos2_closes => (Reply::Close("QoS 2 is not supported"), Some(id)),
            1 if (refuse || denied) && qos == 1 => {
                let code = if denied { 0x87 } else { 0x97 };
                (Reply::Send(Down::PubAck { pid, of: id, code }), Some(id))
            }
            1 if (refuse || denied) && qos == 2 && !held => {
                let code = if denied { 0x87 } else { 0x97 };
                let d = if self.qos2_as_puback {
                    Down::PubAck { pid, of: id, code }
                } else {
                    Down::PubRec { pid, of: id, code }
                };
                (Reply::Send(d), Some(id))
            }
            1 if qos == 1 || (qos == 2 && self.qos2_as_puback) => {
                self.acknowledged.insert(id);
                self.forward(id);
                (Reply::Send(Down::PubAck { pid, of: id, code: 0 }), Some(id))
            }
            1 if qos == 2 => {
                // A packet id still held is a duplicate of the message the
                // broker holds under it: answered again, not taken twice.
                let session = self.live.get_or_insert_with(Session::default);
                let new = !session.qos2.contains_key(&pid);
                let held = *session.qos2.entry(pid).or_insert(id);
                self.acknowledged.insert(id);
                if new {
                    self.forward(id);
                } else if held != id {
                    // The broker's session went back to an autosave that
                    // still holds this packet id for an older message: it
                    // takes the new one for a duplicate and loses it. The
                    // producer cannot know (the broker claims the session).
                    self.lost.insert(id);
                }
                (Reply::Send(Down::PubRec { pid, of: id, code: 0 }), Some(id))
            }
            1 => (Reply::Nothing, Some(id)),
            2 => {
                if let Some(s) = self.live.as_mut() {
                    s.qos2.remove(&pid);
                }
                (Reply::Send(Down::PubComp { pid }), None)
            }
            _ => (Reply::Send(Down::PingResp), None),
        }
    }

    /// The next message for the consumer, if its window has room.
    pub fn next_for_consumer(&mut self) -> Option<(u16, u64)> {
        let sub = self.sub.as_mut()?;
        if sub.inflight.len() >= SUB_WINDOW {
            return None;
        }
        let id = sub.queue.pop_front()?;
        while sub.inflight.contains_key(&sub.next_pid) || sub.next_pid == 0 {
            sub.next_pid = sub.next_pid.wrapping_add(1);
        }
        let pid = sub.next_pid;
        sub.next_pid = sub.next_pid.wrapping_add(1);
        sub.inflight.insert(pid, id);
        Some((pid, id))
    }

    /// The consumer's PUBACK.
    pub fn consumer_acked(&mut self, pid: u16) -> Option<u64> {
        self.sub.as_mut().and_then(|s| s.inflight.remove(&pid))
    }

    /// Messages waiting for or in flight to the consumer.
    pub fn for_consumer(&self) -> BTreeSet<u64> {
        self.sub.as_ref().map(Subscriber::ids).unwrap_or_default()
    }
}
