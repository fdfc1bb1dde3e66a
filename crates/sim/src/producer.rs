//! The producer process: its outbox (what is committed survives a crash,
//! what is not is gone), and the engine that the real driver runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use steadfast_core::engine::{Bound, PublishSession, Queued, SessionConfig, StoreOp, Wire};
use steadfast_core::{DropReason, Qos, Stage, PRIORITIES};

use crate::broker::FRAME;
use crate::schedule::Schedule;
use crate::trace::Trace;

/// A queued message as the engine sees it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub id: u64,
    pub qos: Qos,
    pub attempts: u32,
}

impl Queued for Msg {
    fn id(&self) -> u64 {
        self.id
    }
    fn qos(&self) -> Qos {
        self.qos
    }
    fn set_qos(&mut self, qos: Qos) {
        self.qos = qos;
    }
    fn priority(&self) -> usize {
        0
    }
    fn expires_ms(&self) -> Option<u64> {
        None
    }
    fn max_attempts(&self) -> Option<u32> {
        None
    }
    fn attempts(&self) -> u32 {
        self.attempts
    }
    fn count_attempt(&mut self) {
        self.attempts += 1;
    }
}

/// The simulator's codec: fixed frames of (kind, pid, dup, qos, id).
pub struct SimWire;

fn frame(kind: u8, pid: u16, dup: bool, qos: u8, id: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME);
    f.push(kind);
    f.extend(pid.to_be_bytes());
    f.push(dup as u8);
    f.push(qos);
    f.extend(id.to_be_bytes());
    f
}

impl Wire<Msg> for SimWire {
    fn publish(&mut self, m: &Msg, pid: Option<u16>, dup: bool) -> Result<Vec<u8>, DropReason> {
        Ok(frame(1, pid.unwrap_or(0), dup, m.qos as u8, m.id))
    }
    fn pubrel(&mut self, pid: u16) -> Vec<u8> {
        frame(2, pid, false, 0, 0)
    }
    fn ping(&mut self) -> Vec<u8> {
        frame(3, 0, false, 0, 0)
    }
}

/// The outbox's contents.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    pub msgs: BTreeMap<u64, Msg>,
    pub wire: BTreeMap<u64, (u16, Stage)>,
    pub drops: BTreeMap<u64, DropReason>,
    next_id: u64,
}

/// The producer process.
pub struct Producer {
    /// What is on disk.
    pub committed: Outbox,
    /// What the process sees: the committed state and changes not yet
    /// committed.
    working: Outbox,
    /// Appended, not yet committed (not accepted yet).
    appended: Vec<u64>,
    /// Changes wait for a commit.
    dirty: bool,
    pub engine: Option<PublishSession<Msg>>,
    cfg: SessionConfig,
    /// Monotonic time zero of the simulation.
    pub epoch: Instant,
}

impl Producer {
    pub fn new(s: &Schedule, epoch: Instant) -> Self {
        let cfg = SessionConfig {
            max_inflight: s.max_inflight,
            keep_alive: Duration::from_secs(3),
            ack_timeout: Duration::from_secs(2),
            refused_pause: Duration::from_secs(1),
            page: s.page,
        };
        let mut p = Producer {
            committed: Outbox { next_id: 1, ..Outbox::default() },
            working: Outbox { next_id: 1, ..Outbox::default() },
            appended: Vec::new(),
            dirty: false,
            engine: None,
            cfg,
            epoch,
        };
        p.start();
        p
    }

    /// The process starts on its outbox: QoS 2 bindings are restored.
    pub fn start(&mut self) {
        let mut e = PublishSession::new(self.cfg, self.epoch);
        let bound: Vec<_> = self
            .committed
            .wire
            .iter()
            .filter_map(|(id, (pid, stage))| self.committed.msgs.get(id).map(|m| (m.clone(), *pid, *stage)))
            .collect();
        e.restore(bound);
        self.engine = Some(e);
    }

    /// kill -9: the engine and whatever was not committed are gone.
    pub fn crash(&mut self) {
        self.engine = None;
        self.working = self.committed.clone();
        self.appended.clear();
        self.dirty = false;
    }

    pub fn alive(&self) -> bool {
        self.engine.is_some()
    }

    /// The application publishes a message: it is appended, and accepted
    /// once committed.
    pub fn append(&mut self, qos: Qos) -> u64 {
        let id = self.working.next_id;
        self.working.next_id += 1;
        self.working.msgs.insert(id, Msg { id, qos, attempts: 0 });
        self.appended.push(id);
        self.dirty = true;
        id
    }

    /// Group commit: returns the ids it made accepted.
    pub fn commit(&mut self) -> Vec<u64> {
        self.committed = self.working.clone();
        self.dirty = false;
        std::mem::take(&mut self.appended)
    }

    /// The newest committed id per priority.
    pub fn newest(&self) -> [u64; PRIORITIES] {
        let mut n = [0; PRIORITIES];
        n[0] = self.committed.next_id - 1;
        n
    }

    /// A page of messages after `after`, up to the newest committed.
    pub fn read_after(&self, after: u64, upto: u64) -> Vec<Msg> {
        self.working.msgs.range(after + 1..=upto).take(self.cfg.page).map(|(_, m)| m.clone()).collect()
    }

    /// Carries out the engine's store operations; a bind is committed at
    /// once and its outcome handed back.
    pub fn carry_out(&mut self, t: u64, trace: &mut Trace) {
        let Some(mut e) = self.engine.take() else { return };
        while let Some(op) = e.poll_store() {
            self.dirty = true;
            match op {
                StoreOp::Ack(ids) => {
                    for id in ids {
                        trace.note(t, Some(id), "outbox: acknowledged, removed");
                        self.working.msgs.remove(&id);
                        self.working.wire.remove(&id);
                    }
                }
                StoreOp::Drop(ids, reason) => {
                    for id in ids {
                        trace.note(t, Some(id), format!("outbox: dropped ({reason:?})"));
                        self.working.msgs.remove(&id);
                        self.working.wire.remove(&id);
                        self.working.drops.insert(id, reason);
                    }
                }
                StoreOp::Attempted(ids) => {
                    for id in ids {
                        if let Some(m) = self.working.msgs.get_mut(&id) {
                            m.attempts += 1;
                        }
                    }
                }
                StoreOp::Bind(updates) => {
                    let mut gone = Vec::new();
                    for (id, w) in updates {
                        if !self.working.msgs.contains_key(&id) {
                            gone.push(id);
                            continue;
                        }
                        trace.note(t, Some(id), format!("outbox: QoS 2 binding {w:?} written"));
                        match w {
                            Some(w) => self.working.wire.insert(id, w),
                            None => self.working.wire.remove(&id),
                        };
                    }
                    // A bind is synced before the engine hears of it.
                    self.committed = self.working.clone();
                    e.handle_bound(Bound::Written { gone }, &mut SimWire);
                }
            }
        }
        self.engine = Some(e);
    }

    /// True while changes wait for a commit.
    pub fn dirty(&self) -> bool {
        self.dirty
    }
}
