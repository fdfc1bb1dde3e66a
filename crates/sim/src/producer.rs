//! The producer process: its outbox (what is committed survives a crash,
//! what is not is gone), the engine the real driver runs, one per broker,
//! and the routes that say which broker's a message is.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use steadfast_core::engine::{
    accept_after_sync, quorum_met, Bound, Now, PoisonCause, PublishSession, Queued, ReadLimit, SessionConfig, StoreOp,
    SweepConfig, Sweeper, Wire,
};
use steadfast_core::receipt::Settle;
use steadfast_core::{AckTimeout, DropReason, Qos, ReceiptRule, Stage, PRIORITIES};

use crate::broker::FRAME;
use crate::schedule::{Schedule, Spread};
use crate::trace::Trace;

/// A queued message as the engine sees it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub id: u64,
    pub qos: Qos,
    pub attempts: u32,
    /// Brokers that acknowledged it (bit `1 << slot`).
    pub acks: u64,
    /// Its quorum acknowledged it; kept while a broker holds a QoS 2
    /// exchange of it.
    pub done: bool,
    /// Its deadline (wall ms), if it has one.
    pub expires_ms: Option<u64>,
    /// Its retry budget, if it has one.
    pub max_attempts: Option<u32>,
    /// Its priority.
    pub priority: u8,
    /// Moved aside as poison: kept, never sent.
    pub poisoned: bool,
    /// Larger than the brokers take (they close the link on it).
    pub oversize: bool,
    /// On a topic the brokers deny (they refuse it for good, 0x87).
    pub denied: bool,
    /// Delivered, awaiting the consumer's receipt until then (ms); not
    /// sent meanwhile.
    pub awaiting: Option<u64>,
    /// Published again for lack of a receipt, so far.
    pub resends: u32,
    /// A receipt came before its quorum of acknowledgements (fanout).
    pub receipted: bool,
    /// What it holds in memory ([`Queued::size`]): 1 to 13 bytes.
    pub size: usize,
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
        self.priority as usize
    }
    fn size(&self) -> usize {
        self.size
    }
    fn expires_ms(&self) -> Option<u64> {
        self.expires_ms
    }
    fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }
    fn attempts(&self) -> u32 {
        self.attempts
    }
    fn count_attempt(&mut self) {
        self.attempts += 1;
    }
}

/// Failed links in a row with a message alone in flight that make it
/// poison (the client's default).
pub const POISON_AFTER: u32 = 3;

/// The outbox writer's sweeps, as the store runs them.
const SWEEPS: SweepConfig = SweepConfig { every: Duration::from_secs(1), max_age_ms: None };

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
    fn publish(&mut self, m: &Msg, pid: Option<u16>, dup: bool, out: &mut Vec<u8>) -> Result<(), DropReason> {
        let qos = m.qos as u8
            | if m.oversize { crate::broker::OVERSIZE } else { 0 }
            | if m.denied { crate::broker::DENIED } else { 0 };
        out.extend(frame(1, pid.unwrap_or(0), dup, qos, m.id));
        Ok(())
    }
    fn pubrel(&mut self, pid: u16) -> Vec<u8> {
        frame(2, pid, false, 0, 0)
    }
    fn ping(&mut self) -> Vec<u8> {
        frame(3, 0, false, 0, 0)
    }
}

/// A message that left the outbox undelivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub reason: DropReason,
    /// Simulated time of the drop (ms).
    pub at: u64,
    /// Sends counted against its budget by then.
    pub attempts: u32,
    pub expires_ms: Option<u64>,
    pub max_attempts: Option<u32>,
}

impl Dropped {
    /// Whether its reason held when it was dropped.
    pub fn holds(&self) -> bool {
        match self.reason {
            DropReason::Expired => self.expires_ms.is_some_and(|e| e <= crate::world::WALL_EPOCH_MS + self.at),
            DropReason::Budget => self.max_attempts.is_some_and(|max| self.attempts >= max),
            _ => false,
        }
    }
}

/// The outbox's contents.
#[derive(Debug, Clone, Default)]
pub struct Outbox {
    pub msgs: BTreeMap<u64, Msg>,
    /// QoS 2 bindings per (slot, id).
    pub wire: BTreeMap<(usize, u64), (u16, Stage)>,
    /// Dropped messages: why, when (ms), and its sends by then.
    pub drops: BTreeMap<u64, Dropped>,
    next_id: u64,
    /// Per priority, the newest id appended (never lowered).
    newest: [u64; PRIORITIES],
}

impl Outbox {
    /// Messages still to deliver.
    pub fn queued(&self) -> impl Iterator<Item = u64> + '_ {
        self.msgs.values().filter(|m| !m.done && !m.poisoned).map(|m| m.id)
    }

    /// Messages moved aside as poison, kept.
    pub fn poisoned(&self) -> impl Iterator<Item = &Msg> + '_ {
        self.msgs.values().filter(|m| !m.done && m.poisoned)
    }

    fn settle(&mut self, id: u64) {
        if self.msgs.get(&id).is_some_and(|m| m.done) && !self.wire.keys().any(|(_, i)| *i == id) {
            self.msgs.remove(&id);
        }
    }
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
    /// When the commit under way is synced (changes made since wait).
    pub commit_due: Option<u64>,
    sync_ms: u64,
    /// One engine per broker; empty while the process is down.
    pub engines: Vec<PublishSession<Msg>>,
    /// When the outbox sweeps out what passed its deadline (the writer's
    /// sweeper).
    sweeper: Sweeper,
    brokers: usize,
    /// Acknowledgements needed, from all brokers.
    need: u32,
    /// Fanout (every broker is sent every message).
    fanout: bool,
    /// Fanout: the brokers (bits) that refused a queued message for good
    /// while the others could still meet its quorum; in memory, as the
    /// store's writer keeps them (gone at a crash).
    refused_by: BTreeMap<u64, u64>,
    cfg: SessionConfig,
    /// Monotonic time zero of the simulation.
    pub epoch: Instant,
    /// Per message, the brokers whose acknowledgement reached this
    /// process (an observer's record: it survives crashes).
    pub acks_reached: BTreeMap<u64, BTreeSet<usize>>,
    /// Messages the outbox took as acknowledged by a broker whose
    /// acknowledgement of them never reached this process.
    pub phantom_acks: BTreeSet<u64>,
    /// Decides which binds fail (a full disk).
    rng: fastrand::Rng,
    bind_fail_per_mille: u32,
    /// What every message asks of the consumer, if anything.
    receipts: Option<ReceiptRule>,
}

impl Producer {
    pub fn new(s: &Schedule, epoch: Instant) -> Self {
        let cfg = SessionConfig {
            max_inflight: s.max_inflight,
            keep_alive: Duration::from_secs(3),
            // Adaptive, as the product's default, with the ceiling the
            // fixed timeout had here (the schedules' timing is built on it).
            ack_timeout: AckTimeout::Adaptive { floor: Duration::from_millis(500), max: Duration::from_secs(2) },
            refused_pause: Duration::from_secs(1),
            page: ReadLimit { count: s.page, bytes: s.page_bytes as u64 },
            poison_after: POISON_AFTER,
        };
        let need = match s.spread {
            Spread::Fanout { need } => need,
            Spread::Failover { .. } => 1,
        };
        let empty = Outbox { next_id: 1, ..Outbox::default() };
        let mut p = Producer {
            committed: empty.clone(),
            working: empty,
            appended: Vec::new(),
            dirty: false,
            commit_due: None,
            sync_ms: s.sync_ms,
            engines: Vec::new(),
            sweeper: Sweeper::new(SWEEPS, epoch),
            brokers: s.brokers,
            need,
            fanout: matches!(s.spread, Spread::Fanout { .. }),
            refused_by: BTreeMap::new(),
            cfg,
            epoch,
            acks_reached: BTreeMap::new(),
            phantom_acks: BTreeSet::new(),
            rng: fastrand::Rng::with_seed(s.seed ^ 0xb1d),
            bind_fail_per_mille: s.bind_fail_per_mille,
            receipts: s.receipts_ms.map(|ms| ReceiptRule::any(Duration::from_millis(ms))),
        };
        p.start(epoch);
        p
    }

    /// The process starts on its outbox: each broker's QoS 2 bindings are
    /// restored into its engine.
    pub fn start(&mut self, at: Instant) {
        self.sweeper = Sweeper::new(SWEEPS, at);
        self.sweeper.handle_next_expiry(self.committed.msgs.values().filter_map(|m| m.expires_ms).min());
        self.engines = (0..self.brokers)
            .map(|slot| {
                let mut e = PublishSession::new(self.cfg, self.epoch);
                let bound: Vec<_> = self
                    .committed
                    .wire
                    .iter()
                    .filter(|((s, _), _)| *s == slot)
                    .filter_map(|((_, id), (pid, stage))| {
                        self.committed.msgs.get(id).map(|m| (m.clone(), *pid, *stage))
                    })
                    .collect();
                e.restore(bound);
                e
            })
            .collect();
    }

    /// kill -9 (or a power cut): the engines and whatever was not committed
    /// are gone. A commit under way (written, its sync not finished) lands
    /// whole when `lands`, else it is torn and the store's checksums drop
    /// it; either way nobody was told it was synced. Returns the messages
    /// appended in it and whether it landed.
    pub fn crash(&mut self, lands: bool) -> Option<(Vec<u64>, bool)> {
        self.engines.clear();
        self.refused_by.clear();
        let under_way = self.dirty.then(|| std::mem::take(&mut self.appended));
        if under_way.is_some() && lands {
            self.committed = self.working.clone();
        }
        self.working = self.committed.clone();
        self.appended.clear();
        self.dirty = false;
        self.commit_due = None;
        under_way.map(|ids| (ids, lands))
    }

    pub fn alive(&self) -> bool {
        !self.engines.is_empty()
    }

    /// The application publishes a message: it is appended, and accepted
    /// once committed.
    /// Returns the id, and whether the publisher hears "accepted" now
    /// (only with the planted bug; otherwise when the commit is synced).
    pub fn append(
        &mut self,
        t: u64,
        qos: Qos,
        expires_ms: Option<u64>,
        max_attempts: Option<u32>,
        priority: u8,
        (oversize, denied): (bool, bool),
    ) -> (u64, bool) {
        let id = self.working.next_id;
        self.working.next_id += 1;
        self.working.newest[priority as usize] = id;
        let m = Msg {
            id,
            qos,
            attempts: 0,
            acks: 0,
            done: false,
            expires_ms,
            max_attempts,
            priority,
            poisoned: false,
            oversize,
            denied,
            awaiting: None,
            resends: 0,
            receipted: false,
            size: (id % 13 + 1) as usize,
        };
        self.working.msgs.insert(id, m);
        if let Some(e) = expires_ms {
            self.sweeper.handle_deadline(e);
        }
        self.appended.push(id);
        self.changed(t);
        (id, !accept_after_sync())
    }

    /// Something changed at `t`: it is on disk once the next commit is
    /// synced.
    fn changed(&mut self, t: u64) {
        self.dirty = true;
        self.commit_due.get_or_insert(t + self.sync_ms);
    }

    /// True when a commit is synced by `t`.
    pub fn commit_ready(&self, t: u64) -> bool {
        self.dirty && self.commit_due.is_some_and(|due| due <= t)
    }

    /// Group commit: returns the ids it made accepted.
    pub fn commit(&mut self) -> Vec<u64> {
        self.committed = self.working.clone();
        self.dirty = false;
        self.commit_due = None;
        std::mem::take(&mut self.appended)
    }

    /// The newest committed id per priority.
    pub fn newest(&self) -> [u64; PRIORITIES] {
        self.committed.newest
    }

    /// A page of priority `p` after `after`, up to the newest committed,
    /// that `slot` has not acknowledged: the page's count at most, ending
    /// at the message that reaches its bytes (as the store reads).
    pub fn read_after(&self, slot: usize, p: usize, after: u64, upto: u64) -> Vec<Msg> {
        let mut within = self.cfg.page.cut();
        self.working
            .msgs
            .range(after + 1..=upto)
            .filter(|(_, m)| !m.done && !m.poisoned && m.awaiting.is_none())
            .filter(|(_, m)| m.acks & (1 << slot) == 0 && m.priority as usize == p)
            .take_while(|(_, m)| within(m.size as u64))
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Carries out `slot`'s engine's store operations; a bind is committed
    /// at once and its outcome handed back. True when a bind failed: the
    /// link must end (the rest waits, as in the driver).
    fn now(&self, t: u64) -> Now {
        Now { at: self.epoch + Duration::from_millis(t), wall_ms: crate::world::WALL_EPOCH_MS + t }
    }

    pub fn carry_out(&mut self, slot: usize, t: u64, trace: &mut Trace) -> bool {
        if !self.alive() {
            return false;
        }
        while let Some(op) = self.engines[slot].poll_store() {
            self.changed(t);
            match op {
                StoreOp::Ack(ids) => self.acked(slot, ids, t, trace),
                StoreOp::Drop(ids, reason) => {
                    for id in ids {
                        self.drop_one(id, reason, t, trace);
                    }
                }
                StoreOp::Attempted(ids) => {
                    for id in ids {
                        if let Some(m) = self.working.msgs.get_mut(&id) {
                            m.attempts += 1;
                        }
                    }
                }
                StoreOp::Unbind(ids) => {
                    for id in ids {
                        trace.note(t, Some(id), format!("outbox: broker {slot} QoS 2 binding cleared"));
                        self.working.wire.remove(&(slot, id));
                        self.working.settle(id);
                    }
                }
                StoreOp::Poison(id, PoisonCause::Refused(code)) if self.fanout && self.others_may_deliver(slot, id) => {
                    let line = format!(
                        "outbox: broker {slot} refused it for good ({}); the other brokers may still meet its quorum",
                        steadfast_core::reason::describe(code)
                    );
                    trace.note(t, Some(id), line);
                    // Its packet id is free on that broker.
                    self.working.wire.remove(&(slot, id));
                    self.working.settle(id);
                }
                StoreOp::Poison(id, cause) => {
                    self.refused_by.remove(&id);
                    self.working.wire.remove(&(slot, id));
                    if let Some(m) = self.working.msgs.get_mut(&id).filter(|m| !m.done) {
                        m.poisoned = true;
                        let why = match cause {
                            PoisonCause::Closed(n) => {
                                format!("broker {slot} ended {n} links in a row with it alone in flight")
                            }
                            PoisonCause::Size => format!("broker {slot} closed the link on one this large before"),
                            PoisonCause::Refused(code) => {
                                format!("broker {slot} refused it for good: {}", steadfast_core::reason::describe(code))
                            }
                        };
                        let line = format!("outbox: moved aside as poison ({why})");
                        trace.note(t, Some(id), line);
                    }
                }
                StoreOp::Bind(updates) => {
                    // Failures of the parts end with the active phase, like
                    // every other fault.
                    if t < crate::schedule::ACTIVE_MS && self.rng.u32(0..1000) < self.bind_fail_per_mille {
                        let ids: Vec<u64> = updates.iter().map(|(id, _)| *id).collect();
                        trace.note(t, None, format!("outbox: a bind for broker {slot} failed (disk full?) {ids:?}"));
                        let now = self.now(t);
                        self.engines[slot].handle_bound(Bound::Failed, now, &mut SimWire);
                        return true;
                    }
                    let gone = self.bind(slot, updates, t, trace);
                    // A bind is synced before the engine hears of it.
                    self.committed = self.working.clone();
                    let now = self.now(t);
                    self.engines[slot].handle_bound(Bound::Written { gone }, now, &mut SimWire);
                }
            }
        }
        false
    }

    /// The store writer's rule: a broker's refusal for good takes it out of
    /// the message's quorum; poison only once the others cannot meet it.
    fn others_may_deliver(&mut self, slot: usize, id: u64) -> bool {
        let refused = self.refused_by.entry(id).or_default();
        *refused |= 1 << slot;
        let mask = (1u64 << self.brokers) - 1;
        if (mask & !*refused).count_ones() >= self.need.max(1) {
            return true;
        }
        self.refused_by.remove(&id);
        false
    }

    fn acked(&mut self, slot: usize, ids: Vec<u64>, t: u64, trace: &mut Trace) {
        let mask = (1u64 << self.brokers) - 1;
        for id in ids {
            self.working.wire.remove(&(slot, id));
            let Some(m) = self.working.msgs.get_mut(&id) else { continue };
            m.acks |= 1 << slot;
            // Poison never completes on acknowledgements (the store's
            // writer: they count once it is requeued).
            let quorum = !m.done && !m.poisoned && m.awaiting.is_none() && quorum_met(m.acks, mask, self.need);
            let settle =
                quorum.then(|| ReceiptRule::on_quorum(self.receipts.as_ref(), m.receipted as usize, m.resends, t));
            let quorum = match settle {
                None => "",
                Some(Settle::Delivered) => {
                    m.done = true;
                    ": quorum met, delivered"
                }
                Some(Settle::Handled) => {
                    m.done = true;
                    ": quorum met, and the consumer's receipt came before it: handled"
                }
                Some(Settle::Await { due_ms }) => {
                    m.awaiting = Some(due_ms);
                    ": quorum met, delivered; awaiting the consumer's receipt"
                }
            };
            if self.acks_reached.get(&id).is_some_and(|b| b.contains(&slot)) {
                trace.note(t, Some(id), format!("outbox: acknowledged by broker {slot}{quorum}"));
            } else {
                let line = format!("outbox: ANOMALY: taken as acknowledged by broker {slot}{quorum}, but no acknowledgement of it from that broker ever reached the producer");
                trace.note(t, Some(id), line);
                self.phantom_acks.insert(id);
            }
            self.working.settle(id);
        }
    }

    fn bind(&mut self, slot: usize, updates: Vec<(u64, Option<(u16, Stage)>)>, t: u64, trace: &mut Trace) -> Vec<u64> {
        let mut gone = Vec::new();
        for (id, w) in updates {
            let open = self.working.msgs.get(&id).is_some_and(|m| !m.done);
            match w {
                Some(w) if open || self.working.wire.contains_key(&(slot, id)) => {
                    trace.note(t, Some(id), format!("outbox: broker {slot} QoS 2 binding {w:?} written"));
                    // One exchange per packet id and broker, as the store keeps it.
                    self.working.wire.retain(|(s, i), (pid, _)| *s != slot || *pid != w.0 || *i == id);
                    self.working.wire.insert((slot, id), w);
                }
                Some(_) => gone.push(id),
                None => {
                    self.working.wire.remove(&(slot, id));
                    self.working.settle(id);
                }
            }
        }
        gone
    }

    fn drop_one(&mut self, id: u64, reason: DropReason, t: u64, trace: &mut Trace) {
        trace.note(t, Some(id), format!("outbox: dropped as {}", reason.as_str()));
        let Some(m) = self.working.msgs.remove(&id) else { return };
        self.working.wire.retain(|(_, i), _| *i != id);
        let (expires_ms, max_attempts) = (m.expires_ms, m.max_attempts);
        let d = Dropped { reason, at: t, attempts: m.attempts, expires_ms, max_attempts };
        self.working.drops.insert(id, d);
    }

    /// When the outbox's next sweep is due.
    pub fn sweep_due(&self) -> Option<Instant> {
        self.alive().then(|| self.sweeper.poll_timeout()).flatten()
    }

    /// The writer's sweep, when due: what passed its deadline leaves
    /// (unless a broker holds a QoS 2 exchange of it), whether an engine
    /// holds it or not.
    pub fn sweep(&mut self, now: Now, t: u64, trace: &mut Trace) {
        if !self.alive() {
            return;
        }
        let Some(cutoff) = self.sweeper.handle_timeout(now).and_then(|s| s.deadlines_at) else { return };
        let due: Vec<u64> = self
            .working
            .msgs
            .values()
            .filter(|m| !m.done && m.expires_ms.is_some_and(|e| e <= cutoff))
            .filter(|m| !self.working.wire.keys().any(|(_, i)| *i == m.id))
            .map(|m| m.id)
            .collect();
        if !due.is_empty() {
            self.changed(t);
        }
        for id in due {
            trace.note(t, Some(id), "outbox: the sweep finds its deadline passed");
            self.drop_one(id, DropReason::Expired, t, trace);
        }
        let next = self.working.msgs.values().filter(|m| !m.done).filter_map(|m| m.expires_ms).min();
        self.sweeper.handle_next_expiry(next);
    }

    /// True while changes wait for a commit.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// The consumer's receipt for `id` reached this process (through its
    /// receipts session): the message leaves, handled, when the rule
    /// allows (else the receipt is noted); applied with the next commit.
    pub fn receipt(&mut self, id: u64, t: u64, trace: &mut Trace) {
        let Some(rule) = self.receipts.as_ref().filter(|_| self.alive()) else { return };
        let mask = (1u64 << self.brokers) - 1;
        if self.working.msgs.get(&id).is_none_or(|m| m.done) {
            trace.note(t, Some(id), "producer: a receipt for a message no longer queued; nothing to do");
            return;
        }
        self.dirty = true;
        self.commit_due.get_or_insert(t + self.sync_ms);
        let m = self.working.msgs.get_mut(&id).expect("checked");
        if rule.completes(1, m.awaiting.is_some(), self.need, quorum_met(m.acks, mask, self.need)) {
            m.done = true;
            m.awaiting = None;
            trace.note(t, Some(id), "outbox: the consumer's receipt came: HANDLED, it leaves");
            self.working.settle(id);
        } else if self.need > 1 {
            // Noted, as the store notes receipts only for a route that
            // needs several acknowledgements.
            m.receipted = true;
            trace.note(t, Some(id), "outbox: the consumer's receipt came before the quorum; noted");
        } else {
            trace.note(t, Some(id), "outbox: the consumer's receipt does not complete it");
        }
    }

    /// When the next wait for receipts ends (ms).
    pub fn receipts_due(&self) -> Option<u64> {
        self.alive().then(|| self.working.msgs.values().filter_map(|m| m.awaiting).min()).flatten()
    }

    /// Messages whose wait for a receipt ended are queued again, to be
    /// published under the same identity; every engine reads again.
    pub fn sweep_receipts(&mut self, t: u64, trace: &mut Trace) {
        if !self.alive() || self.receipts_due().is_none_or(|due| due > t) {
            return;
        }
        for m in self.working.msgs.values_mut().filter(|m| m.awaiting.is_some_and(|due| due <= t)) {
            m.awaiting = None;
            m.acks = 0;
            m.resends += 1;
            trace.note(t, Some(m.id), format!("outbox: no receipt in time: queued again (resend {})", m.resends));
        }
        self.changed(t);
        for e in &mut self.engines {
            e.rewind();
        }
    }
}
