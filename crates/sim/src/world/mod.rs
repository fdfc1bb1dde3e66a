//! One seed's world in simulated time: the producer, the broker, the
//! consumer, the two connections, the faults, and the verdict.
//!
//! `publishing` drives the producer's link, `consuming` the consumer's;
//! this file holds the loop, the faults and the verdict.

mod consuming;
mod publishing;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use steadfast_core::engine::{LinkEnd, Now, Routes, Routing, SetSpec};
use steadfast_core::DropReason;

use crate::broker::{Broker, Down};
use crate::consumer::Consumer;
use crate::producer::Producer;
use crate::schedule::{Fault, Schedule, Size, Spread, ACTIVE_MS};
use crate::trace::Trace;

use self::consuming::CConn;

/// The longest a run goes on after the active phase, for the backlog to
/// drain once every fault has healed.
const HEAL_MS: u64 = 300_000;
/// Wall-clock time of the simulation's start (deadlines are wall time).
pub(crate) const WALL_EPOCH_MS: u64 = 1_800_000_000_000;

/// The outcome of one seed.
#[derive(Debug)]
pub struct Verdict {
    /// The seed that made this world.
    pub seed: u64,
    /// Messages the producer accepted (committed to its outbox).
    pub accepted: usize,
    /// Accepted, never handled by the consumer, not dropped with a reason,
    /// not lost by the broker: lost by steadfast.
    pub lost: Vec<u64>,
    /// Handled twice by the consumer where its inbox should have stopped
    /// the second (the first was recorded before any crash).
    pub twice: Vec<u64>,
    /// Still queued somewhere when the run ended although every fault had
    /// healed.
    pub stuck: Vec<u64>,
    /// Moved aside as poison: messages larger than the brokers take (an
    /// MQTT 3.1.1 broker closes the connection on them, saying nothing) or
    /// that they refuse for good (a denied topic), kept and reported, so
    /// that the messages behind them go through.
    pub poisoned: Vec<u64>,
    /// Moved aside as poison though every broker would have taken it: a
    /// healthy message taken for poison.
    pub poisoned_wrongly: Vec<u64>,
    /// Dropped without the reason holding: a deadline not yet passed, a
    /// budget not spent, or a reason no message of the run can have.
    pub dropped_wrongly: Vec<u64>,
    /// Taken as acknowledged by a broker whose acknowledgement never
    /// reached the producer (lost or not, the outbox let go too early).
    pub phantom_acks: Vec<u64>,
    /// Lost by the broker (a kill without persistence, or since its last
    /// autosave): beyond what steadfast can promise, reported apart.
    /// Never with receipts: then the message is published again.
    pub broker_lost: usize,
    /// With receipts: messages the brokers lost after acknowledging them,
    /// published again for lack of a receipt and handled.
    pub rescued: usize,
    /// Faults applied.
    pub faults: usize,
    /// Faults that found their target down already (a kill of a process
    /// that was down, a reset of a connection that did not exist).
    pub skipped: usize,
    /// Accepted messages the consumer handled.
    pub handled: usize,
    /// Dropped by their class: (expired, budget spent).
    pub dropped: (usize, usize),
    /// Every step, for the story of a message.
    pub trace: Trace,
}

impl Verdict {
    /// True when the promise was kept.
    pub fn passed(&self) -> bool {
        self.accepted > 0
            && self.lost.is_empty()
            && self.twice.is_empty()
            && self.stuck.is_empty()
            && self.dropped_wrongly.is_empty()
            && self.phantom_acks.is_empty()
            && self.poisoned_wrongly.is_empty()
    }

    /// What happened to `id`, as the verdict sees it.
    pub fn fate(&self, id: u64) -> &'static str {
        let kinds: [(&[u64], &str); 7] = [
            (&self.lost, "LOST: accepted, never handled by the consumer, not dropped, not lost by a broker"),
            (&self.twice, "HANDLED TWICE: the inbox should have stopped the second"),
            (&self.stuck, "STUCK: still queued after every fault healed"),
            (&self.dropped_wrongly, "DROPPED WRONGLY: its drop's reason did not hold"),
            (&self.phantom_acks, "LET GO WITHOUT AN ACKNOWLEDGEMENT"),
            (&self.poisoned_wrongly, "MOVED ASIDE AS POISON though the brokers would take it"),
            (
                &self.poisoned,
                "moved aside as poison: larger than the brokers take or refused for good (kept, reported)",
            ),
        ];
        kinds.iter().find(|(ids, _)| ids.contains(&id)).map_or("kept its promise", |(_, what)| *what)
    }

    /// The message whose story explains a failure.
    pub fn culprit(&self) -> Option<u64> {
        self.lost
            .first()
            .or(self.twice.first())
            .or(self.stuck.first())
            .or(self.dropped_wrongly.first())
            .or(self.phantom_acks.first())
            .or(self.poisoned_wrongly.first())
            .copied()
    }

    /// One line for a failing seed: what broke, with the first message
    /// of each kind.
    pub fn summary(&self) -> String {
        let kinds = [
            ("lost", &self.lost),
            ("handled twice", &self.twice),
            ("stuck", &self.stuck),
            ("dropped wrongly", &self.dropped_wrongly),
            ("let go without an acknowledgement", &self.phantom_acks),
            ("moved aside as poison wrongly", &self.poisoned_wrongly),
        ];
        let broken: Vec<String> = kinds
            .iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(what, ids)| format!("{} {what} (first: message {})", ids.len(), ids[0]))
            .collect();
        let broken = if broken.is_empty() { "nothing accepted".to_owned() } else { broken.join(", ") };
        format!(
            "seed {}: of {} accepted messages, {broken}; {} fault(s) applied, {} skipped; {} lost by the brokers themselves",
            self.seed, self.accepted, self.faults, self.skipped, self.broker_lost
        )
    }
}

/// The producer's connection.
struct Conn {
    /// Bytes on their way to the broker, with their arrival time.
    up: VecDeque<(u64, Vec<u8>)>,
    /// Packets on their way to the producer.
    down: VecDeque<(u64, Down)>,
    /// Nothing passes before this time (a black hole).
    hole_until: u64,
}

/// A process that is down, and when it comes back.
struct Back {
    producer: Option<u64>,
    consumer: Option<u64>,
    brokers: Vec<Option<u64>>,
    /// Until when each broker is cut off (a partition).
    partitions: Vec<Option<u64>>,
}

struct World {
    s: Schedule,
    t: u64,
    epoch: Instant,
    rng: fastrand::Rng,
    producer: Producer,
    /// The producer's routes over the brokers (in the process: a crash
    /// starts them afresh).
    routes: RefCell<Routes>,
    /// When the routes must decide again.
    route_wake: Option<u64>,
    consumer: Consumer,
    brokers: Vec<Broker>,
    /// The producer's connection to each broker.
    conns: Vec<Option<Conn>>,
    /// The consumer's connection to each broker.
    cconns: Vec<Option<CConn>>,
    connected_once: Vec<bool>,
    next_connect: Vec<u64>,
    next_cconnect: Vec<u64>,
    back: Back,
    accepted: BTreeSet<u64>,
    /// What the consumer's application handled, and how often.
    handled: BTreeMap<u64, u32>,
    /// Second handlings the inbox could not stop: the first one's record
    /// was not on disk when the consumer crashed.
    excused: BTreeMap<u64, u32>,
    trace: Trace,
    faults: usize,
    skipped: usize,
    /// A link to a broker ended while a QoS 2 PUBLISH waited for its first
    /// PUBREC, and the user was told the broker may not support QoS 2 (an
    /// observer's record: it survives crashes).
    qos2_reported: bool,
    /// Receipts on their way from the consumer to the producer: when they
    /// arrive, the broker they go through and its life then, the message.
    receipts: VecDeque<(u64, usize, u64, u64)>,
    /// Per broker, how often it was killed (a receipt inside dies with it).
    lives: Vec<u64>,
}

/// Runs the world of `seed` to its verdict.
pub fn run(seed: u64) -> Verdict {
    run_sized(seed, None)
}

/// Runs the world of `seed`, made to `size` if given, to its verdict.
pub fn run_sized(seed: u64, size: Option<Size>) -> Verdict {
    let s = Schedule::sized(seed, size);
    let epoch = Instant::now();
    let n = s.brokers;
    let mut w = World {
        rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
        producer: Producer::new(&s, epoch),
        routes: RefCell::new(routes(&s, epoch)),
        route_wake: None,
        consumer: Consumer::new(n, s.acks_ahead),
        brokers: (0..n).map(|_| Broker::new(&s)).collect(),
        s,
        t: 0,
        epoch,
        conns: (0..n).map(|_| None).collect(),
        cconns: (0..n).map(|_| None).collect(),
        connected_once: vec![false; n],
        next_connect: vec![0; n],
        next_cconnect: vec![0; n],
        back: Back { producer: None, consumer: None, brokers: vec![None; n], partitions: vec![None; n] },
        accepted: BTreeSet::new(),
        handled: BTreeMap::new(),
        excused: BTreeMap::new(),
        trace: Trace::default(),
        faults: 0,
        skipped: 0,
        qos2_reported: false,
        receipts: VecDeque::new(),
        lives: vec![0; n],
    };
    w.run();
    w.verdict()
}

/// The producer's routes: one set of every broker, spread as the seed says.
fn routes(s: &Schedule, now: Instant) -> Routes {
    let (routing, failback_ms) = match s.spread {
        Spread::Failover { failback_ms } => (Routing::Failover, failback_ms),
        Spread::Fanout { .. } => (Routing::Fanout, 0),
    };
    let set = SetSpec {
        name: None,
        members: (0..s.brokers).collect(),
        routing,
        failback_after: Duration::from_millis(failback_ms),
    };
    Routes::new(vec![set], s.brokers, now, Duration::from_secs(1), Duration::from_secs(2))
}

impl World {
    fn now(&self) -> Now {
        Now { at: self.epoch + Duration::from_millis(self.t), wall_ms: WALL_EPOCH_MS + self.t }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn run(&mut self) {
        let (mut next_msg, mut next_fault) = (0, 0);
        while self.t <= ACTIVE_MS + HEAL_MS {
            while next_msg < self.s.messages.len() && self.s.messages[next_msg].at <= self.t {
                self.publish(self.s.messages[next_msg]);
                next_msg += 1;
            }
            while next_fault < self.s.faults.len() && self.s.faults[next_fault].0 <= self.t {
                self.fault(self.s.faults[next_fault].1);
                next_fault += 1;
            }
            self.heal();
            for b in &mut self.brokers {
                b.tick(self.t);
            }
            self.step_producer();
            self.step_consumer();
            let done = next_msg == self.s.messages.len() && next_fault == self.s.faults.len();
            if done && self.quiet() {
                break;
            }
            self.t = self.next_event(next_msg, next_fault);
        }
    }

    /// Nothing left to do: everything delivered, handled and on disk.
    fn quiet(&self) -> bool {
        self.producer.alive()
            && self.consumer.alive()
            && self.brokers.iter().all(|b| b.up && b.for_consumer().is_empty())
            && self.producer.committed.queued().next().is_none()
            && !self.producer.dirty()
            && self.consumer.idle()
            && self.conns.iter().flatten().all(|c| c.up.is_empty() && c.down.is_empty())
            && self.cconns.iter().flatten().all(|c| c.up.is_empty() && c.down.is_empty())
    }

    /// The next time anything can happen.
    fn next_event(&self, next_msg: usize, next_fault: usize) -> u64 {
        let mut at = vec![self.t + 1_000];
        at.extend(self.s.messages.get(next_msg).map(|m| m.at));
        at.extend(self.s.faults.get(next_fault).map(|f| f.0));
        at.extend([self.back.producer, self.back.consumer].into_iter().flatten());
        at.extend(self.back.brokers.iter().flatten());
        at.extend(self.back.partitions.iter().flatten());
        at.extend(self.route_wake);
        at.extend(self.producer.commit_due);
        at.extend(self.producer.sweep_due().map(|w| self.ms(w)));
        at.extend(self.producer.receipts_due());
        at.extend(self.receipts.front().map(|r| r.0));
        for b in 0..self.brokers.len() {
            match &self.conns[b] {
                None => at.push(self.next_connect[b]),
                Some(c) => at.extend(next_arrival(&c.up, &c.down, c.hole_until)),
            }
            match &self.cconns[b] {
                None => at.push(self.next_cconnect[b]),
                Some(c) => {
                    at.extend(next_arrival(&c.up, &c.down, c.hole_until));
                    at.extend(c.session.poll_timeout().map(|w| self.ms(w)));
                }
            }
        }
        for e in &self.producer.engines {
            at.extend(e.poll_timeout().map(|w| self.ms(w)));
        }
        if let Some(wake) = self.consumer.engine.as_ref().and_then(|e| e.poll_timeout()) {
            at.push(self.ms(wake));
        }
        at.extend(self.consumer.app.front().map(|(t, _)| *t));
        at.extend(self.consumer.records.front().map(|(t, _, _)| *t));
        at.into_iter().min().unwrap_or(self.t + 1).max(self.t + 1)
    }

    fn latency(&mut self) -> u64 {
        self.s.latency_ms.0 + self.rng.u64(0..=self.s.latency_ms.1)
    }

    fn fault(&mut self, f: Fault) {
        if !self.applies(f) {
            self.skipped += 1;
            self.trace.note(self.t, None, format!("fault skipped (its target is down or absent): {f}"));
            return;
        }
        self.faults += 1;
        self.trace.note(self.t, None, format!("FAULT: {f}"));
        let later = |t: u64, d: Duration| Some(t + d.as_millis() as u64);
        match f {
            Fault::KillBroker { broker, down } => {
                if self.brokers[broker].up {
                    self.brokers[broker].kill(self.t);
                    self.lives[broker] += 1;
                    self.back.brokers[broker] = later(self.t, down);
                    self.producer_link_lost(broker, "the broker was killed", LinkEnd::Closed);
                    self.consumer_link_lost(broker, "the broker was killed");
                }
            }
            Fault::Reset { broker, cut_per_mille, consumer: false } => self.reset_producer_link(broker, cut_per_mille),
            Fault::Reset { broker, cut_per_mille, consumer: true } => self.reset_consumer_link(broker, cut_per_mille),
            Fault::BlackHole { broker, lasts, consumer } => {
                let until = self.t + lasts.as_millis() as u64;
                let hole = if consumer {
                    self.cconns[broker].as_mut().map(|c| &mut c.hole_until)
                } else {
                    self.conns[broker].as_mut().map(|c| &mut c.hole_until)
                };
                if let Some(h) = hole {
                    *h = until;
                }
            }
            Fault::Partition { broker, lasts } => {
                let until = self.t + lasts.as_millis() as u64;
                self.back.partitions[broker] = Some(until);
                let conns = [
                    self.conns[broker].as_mut().map(|c| &mut c.hole_until),
                    self.cconns[broker].as_mut().map(|c| &mut c.hole_until),
                ];
                for h in conns.into_iter().flatten() {
                    *h = until;
                }
            }
            Fault::CrashProducer { down } => {
                if self.producer.alive() {
                    let lands = self.rng.bool();
                    if let Some((appended, lands)) = self.producer.crash(lands) {
                        let how = if lands {
                            "the commit under way landed whole (never reported synced)"
                        } else {
                            "the commit under way was torn (its checksums drop it)"
                        };
                        self.trace.note(self.t, None, format!("producer crashed: {how}"));
                        for id in appended {
                            self.trace.note(
                                self.t,
                                Some(id),
                                format!("producer crashed before its commit was synced: {how}"),
                            );
                        }
                    }
                    self.back.producer = later(self.t, down);
                    self.conns.iter_mut().for_each(|c| *c = None);
                    let t = self.t;
                    self.brokers.iter_mut().for_each(|b| b.producer_left(t));
                }
            }
            Fault::CrashConsumer { down } => {
                if self.consumer.alive() {
                    let t = self.t;
                    self.brokers.iter_mut().for_each(|b| b.consumer_left(t));
                    let (unwritten, taken_back) = self.consumer.crash(&mut self.rng);
                    for id in unwritten {
                        self.trace.note(self.t, Some(id), "consumer crashed before its inbox record was on disk");
                        *self.excused.entry(id).or_default() += 1;
                    }
                    // Records without a sync: excused only within their
                    // bound; a second hand-over of any beyond it fails.
                    let bound = self.consumer.unsynced_bound();
                    for (i, id) in taken_back.into_iter().enumerate() {
                        if i < bound {
                            let note = "power cut: its inbox record, committed without a sync, taken back";
                            self.trace.note(self.t, Some(id), note);
                            *self.excused.entry(id).or_default() += 1;
                        } else {
                            let note = "power cut: its inbox record taken back BEYOND the bound of unsynced records";
                            self.trace.note(self.t, Some(id), note);
                        }
                    }
                    self.back.consumer = later(self.t, down);
                    self.cconns.iter_mut().for_each(|c| *c = None);
                }
            }
        }
    }

    /// Whether the parts may still fail (refusals, failed writes, given
    /// back deliveries): during the active phase only; then everything
    /// heals and the backlog must drain.
    fn failing(&self) -> bool {
        self.t < ACTIVE_MS
    }

    /// Whether a fault has something to act on now.
    fn applies(&self, f: Fault) -> bool {
        match f {
            Fault::KillBroker { broker, .. } => self.brokers[broker].up,
            Fault::Reset { broker, consumer: false, .. } | Fault::BlackHole { broker, consumer: false, .. } => {
                self.conns[broker].is_some()
            }
            Fault::Reset { broker, consumer: true, .. } | Fault::BlackHole { broker, consumer: true, .. } => {
                self.cconns[broker].is_some()
            }
            Fault::Partition { broker, .. } => !self.unreachable(broker),
            Fault::CrashProducer { .. } => self.producer.alive(),
            Fault::CrashConsumer { .. } => self.consumer.alive(),
        }
    }

    /// True while broker `b` cannot be reached (down or cut off).
    fn unreachable(&self, b: usize) -> bool {
        !self.brokers[b].up || self.back.partitions[b].is_some_and(|until| until > self.t)
    }

    fn heal(&mut self) {
        for b in 0..self.brokers.len() {
            if self.back.partitions[b].is_some_and(|t| t <= self.t) {
                self.back.partitions[b] = None;
                self.trace.note(self.t, None, format!("broker {b} reachable again"));
            }
            if self.back.brokers[b].is_some_and(|t| t <= self.t) {
                self.back.brokers[b] = None;
                self.brokers[b].up = true;
                self.trace.note(self.t, None, format!("broker {b} restarted"));
            }
        }
        if self.back.producer.is_some_and(|t| t <= self.t) {
            self.back.producer = None;
            self.producer.start(self.now().at);
            self.routes = RefCell::new(routes(&self.s, self.now().at));
            self.route_wake = None;
            self.connected_once.iter_mut().for_each(|c| *c = false);
            self.next_connect.iter_mut().for_each(|t| *t = self.t);
            self.trace.note(self.t, None, "producer restarted on its outbox");
        }
        if self.back.consumer.is_some_and(|t| t <= self.t) {
            self.back.consumer = None;
            self.consumer.start();
            self.next_cconnect.iter_mut().for_each(|t| *t = self.t);
            self.trace.note(self.t, None, "consumer restarted on its inbox");
        }
    }

    /// The consumer sent a receipt for `id` through broker `b` (on its
    /// session there): it reaches the producer's receipts session unless
    /// the broker dies or is cut off meanwhile, or the producer is down
    /// then (each a lost receipt: the message is published again).
    pub(super) fn send_receipt(&mut self, b: usize, id: u64) {
        let open = self.cconns[b].as_ref().is_some_and(|c| c.hole_until <= self.t);
        if !open {
            self.trace.note(
                self.t,
                Some(id),
                format!("consumer: its receipt is lost (no open session with broker {b})"),
            );
            return;
        }
        let at = (self.t + self.latency() + self.latency()).max(self.receipts.back().map_or(0, |r| r.0));
        self.trace.note(self.t, Some(id), format!("consumer: receipt sent through broker {b}"));
        self.receipts.push_back((at, b, self.lives[b], id));
    }

    /// Receipts that reached their broker and the producer by now.
    fn receipts_arrive(&mut self) {
        while self.receipts.front().is_some_and(|r| r.0 <= self.t) {
            let (_, b, life, id) = self.receipts.pop_front().expect("front");
            if self.lives[b] != life || self.unreachable(b) || !self.producer.alive() {
                self.trace.note(
                    self.t,
                    Some(id),
                    format!("its receipt is lost on the way (broker {b} or the producer went down)"),
                );
                continue;
            }
            self.producer.receipt(id, self.t, &mut self.trace);
        }
    }

    fn verdict(self) -> Verdict {
        let queued: BTreeSet<u64> = self
            .producer
            .committed
            .queued()
            .chain(self.brokers.iter().flat_map(Broker::for_consumer))
            .chain(self.consumer.app.iter().map(|(_, d)| d.id))
            .collect();
        let handled = |id: &u64| self.handled.contains_key(id);
        let dropped = |id: &u64| self.producer.committed.drops.contains_key(id);
        // Lost by the brokers: as many brokers as its quorum acknowledged it
        // to the producer (only then may the producer forget it), and every
        // one of them lost it.
        let need = match self.s.spread {
            Spread::Fanout { need } => need as usize,
            Spread::Failover { .. } => 1,
        };
        let lost_by_brokers = |id: &u64| {
            let took =
                self.producer.acks_reached.get(id).map(|b| b.iter().map(|b| &self.brokers[*b]).collect::<Vec<_>>());
            let took = took.unwrap_or_default();
            took.len() >= need && took.iter().all(|b| b.lost.contains(id))
        };
        // With receipts nothing is excused: a message the brokers lost is
        // published again for lack of a receipt.
        let receipts = self.s.receipts_ms.is_some();
        let broker_lost = |id: &u64| !receipts && lost_by_brokers(id);
        let rescued = self.accepted.iter().filter(|id| receipts && handled(id) && lost_by_brokers(id)).count();
        // Poison is kept aside, not queued: rightly only a message the
        // brokers close the link on or refuse for good.
        let rightly = |m: &&crate::producer::Msg| m.oversize || m.denied;
        let (poisoned, poisoned_wrongly): (Vec<&crate::producer::Msg>, Vec<_>) =
            self.producer.committed.poisoned().partition(rightly);
        let poisoned: Vec<u64> = poisoned.into_iter().map(|m| m.id).collect();
        let poisoned_wrongly: Vec<u64> = poisoned_wrongly.into_iter().map(|m| m.id).collect();
        let kept_aside: BTreeSet<u64> = poisoned.iter().chain(&poisoned_wrongly).copied().collect();
        let lost = self
            .accepted
            .iter()
            .copied()
            .filter(|id| !handled(id) && !dropped(id) && !broker_lost(id) && !queued.contains(id))
            .filter(|id| !kept_aside.contains(id))
            .collect();
        // Nothing may stay queued once every fault healed, handled or not
        // (an outbox that never lets go of a delivered message is a bug
        // too); nothing is excused behind poison, which is moved aside.
        let stuck = self.accepted.iter().copied().filter(|id| queued.contains(id)).collect();
        let twice = self
            .handled
            .iter()
            .filter(|(id, n)| **n > 1 + self.excused.get(id).copied().unwrap_or(0))
            .map(|(id, _)| *id)
            .collect();
        let broker_lost = self.accepted.iter().filter(|id| !handled(id) && broker_lost(id)).count();
        let drops = &self.producer.committed.drops;
        let count = |r: DropReason| drops.values().filter(|d| d.reason == r).count();
        let dropped = (count(DropReason::Expired), count(DropReason::Budget));
        let handled_count = self.accepted.iter().filter(|id| handled(id)).count();
        let dropped_wrongly =
            self.producer.committed.drops.iter().filter(|(_, d)| !d.holds()).map(|(id, _)| *id).collect();
        Verdict {
            seed: self.s.seed,
            accepted: self.accepted.len(),
            lost,
            twice,
            stuck,
            poisoned,
            poisoned_wrongly,
            dropped_wrongly,
            phantom_acks: self.producer.phantom_acks.iter().copied().collect(),
            broker_lost,
            rescued,
            faults: self.faults,
            skipped: self.skipped,
            handled: handled_count,
            dropped,
            trace: self.trace,
        }
    }
}

/// A stream's arrival time: after `at`, never before what is ahead of it.
fn in_order<T>(q: &VecDeque<(u64, T)>, at: u64) -> u64 {
    at.max(q.back().map_or(0, |(t, _)| *t))
}

/// When the first thing under way in either direction arrives (not before
/// a black hole ends).
fn next_arrival<A, B>(up: &VecDeque<(u64, A)>, down: &VecDeque<(u64, B)>, hole_until: u64) -> Option<u64> {
    let first = [up.front().map(|(t, _)| *t), down.front().map(|(t, _)| *t)].into_iter().flatten().min()?;
    Some(first.max(hole_until))
}

/// A reset: the bytes under way towards the broker, as far as the cut at
/// `cut_per_mille` of their length; whole packets of `packet` bytes only
/// arrive, the rest is lost.
fn cut_whole(up: &mut VecDeque<(u64, Vec<u8>)>, cut_per_mille: u32, packet: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = up.drain(..).flat_map(|(_, b)| b).collect();
    let whole = bytes.len() * cut_per_mille as usize / 1000 / packet * packet;
    bytes.truncate(whole);
    bytes
}

/// Takes what arrived by `t` from a queue (nothing while a black hole lasts).
fn arrived<T>(q: &mut VecDeque<(u64, T)>, t: u64, hole_until: u64) -> Vec<T> {
    let mut out = Vec::new();
    if hole_until > t {
        return out;
    }
    while q.front().is_some_and(|(at, _)| *at <= t) {
        out.push(q.pop_front().expect("front").1);
    }
    out
}
