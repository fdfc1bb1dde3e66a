//! One seed's world in simulated time: the producer, the broker, the
//! connection between them, the faults, and the verdict.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use steadfast_core::engine::{Ack, ConnAckInfo, End, Now};
use steadfast_core::Qos;

use crate::broker::{Broker, Down, Reply, FRAME};
use crate::producer::{Producer, SimWire};
use crate::schedule::{Fault, Schedule, ACTIVE_MS};
use crate::trace::Trace;

/// The longest a run goes on after the active phase, for the backlog to
/// drain once every fault has healed.
const HEAL_MS: u64 = 120_000;
/// Wall-clock time of the simulation's start (deadlines are wall time).
const WALL_EPOCH_MS: u64 = 1_800_000_000_000;

/// The outcome of one seed.
#[derive(Debug)]
pub struct Verdict {
    /// The seed that made this world.
    pub seed: u64,
    /// Messages the producer accepted (committed to its outbox).
    pub accepted: usize,
    /// Accepted, never acknowledged by the broker, not dropped: lost.
    pub lost: Vec<u64>,
    /// Still queued when the run ended although every fault had healed.
    pub stuck: Vec<u64>,
    /// Faults applied.
    pub faults: usize,
    /// Every step, for the story of a message.
    pub trace: Trace,
}

impl Verdict {
    /// True when the promise was kept.
    pub fn passed(&self) -> bool {
        self.accepted > 0 && self.lost.is_empty() && self.stuck.is_empty()
    }

    /// One line for a failing seed.
    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} of {} accepted messages lost (first: {:?}), {} stuck (first: {:?}), {} faults",
            self.seed,
            self.lost.len(),
            self.accepted,
            self.lost.first(),
            self.stuck.len(),
            self.stuck.first(),
            self.faults
        )
    }
}

/// The connection between producer and broker.
struct Conn {
    /// Bytes on their way to the broker, with their arrival time.
    up: VecDeque<(u64, Vec<u8>)>,
    /// Packets on their way to the producer.
    down: VecDeque<(u64, Down)>,
    /// Nothing passes before this time (a black hole).
    hole_until: u64,
}

struct World {
    s: Schedule,
    t: u64,
    rng: fastrand::Rng,
    producer: Producer,
    broker: Broker,
    conn: Option<Conn>,
    connected_once: bool,
    next_connect: u64,
    producer_back: Option<u64>,
    broker_back: Option<u64>,
    accepted: BTreeSet<u64>,
    trace: Trace,
    faults: usize,
}

/// Runs the world of `seed` to its verdict.
pub fn run(seed: u64) -> Verdict {
    let s = Schedule::of(seed);
    let epoch = Instant::now();
    let mut w = World {
        rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
        producer: Producer::new(&s, epoch),
        broker: Broker::new(&s),
        s,
        t: 0,
        conn: None,
        connected_once: false,
        next_connect: 0,
        producer_back: None,
        broker_back: None,
        accepted: BTreeSet::new(),
        trace: Trace::default(),
        faults: 0,
    };
    w.run();
    w.verdict()
}

impl World {
    fn now(&self) -> Now {
        Now { at: self.producer.epoch + Duration::from_millis(self.t), wall_ms: WALL_EPOCH_MS + self.t }
    }

    fn run(&mut self) {
        let (mut next_msg, mut next_fault) = (0, 0);
        while self.t <= ACTIVE_MS + HEAL_MS {
            while next_msg < self.s.messages.len() && self.s.messages[next_msg].0 <= self.t {
                self.publish(self.s.messages[next_msg].1);
                next_msg += 1;
            }
            while next_fault < self.s.faults.len() && self.s.faults[next_fault].0 <= self.t {
                self.fault(self.s.faults[next_fault].1);
                next_fault += 1;
            }
            self.heal();
            self.broker.tick(self.t);
            self.connect();
            self.deliver();
            self.drive();
            if self.producer.dirty() {
                for id in self.producer.commit() {
                    self.trace.note(self.t, Some(id), "accepted (committed to the outbox)");
                    self.accepted.insert(id);
                }
            }
            let done = next_msg == self.s.messages.len() && next_fault == self.s.faults.len();
            if done && self.quiet() {
                break;
            }
            self.t = self.next_event(next_msg, next_fault);
        }
    }

    /// Nothing left to do: everything delivered and on disk.
    fn quiet(&self) -> bool {
        self.producer.alive()
            && self.broker.up
            && self.producer.committed.msgs.is_empty()
            && !self.producer.dirty()
            && self.conn.as_ref().is_none_or(|c| c.up.is_empty() && c.down.is_empty())
    }

    /// The next time anything can happen.
    fn next_event(&self, next_msg: usize, next_fault: usize) -> u64 {
        let mut at = vec![self.t + 1_000];
        at.extend(self.s.messages.get(next_msg).map(|m| m.0));
        at.extend(self.s.faults.get(next_fault).map(|f| f.0));
        at.extend(self.producer_back);
        at.extend(self.broker_back);
        if self.conn.is_none() {
            at.push(self.next_connect);
        }
        if let Some(c) = &self.conn {
            at.extend(c.up.front().map(|(t, _)| *t));
            at.extend(c.down.front().map(|(t, _)| *t));
        }
        if let Some(wake) = self.producer.engine.as_ref().and_then(|e| e.poll_timeout()) {
            at.push(wake.saturating_duration_since(self.producer.epoch).as_millis() as u64);
        }
        at.into_iter().min().unwrap_or(self.t + 1).max(self.t + 1)
    }

    fn publish(&mut self, qos: u8) {
        if !self.producer.alive() {
            return;
        }
        let qos = if qos == 2 { Qos::ExactlyOnce } else { Qos::AtLeastOnce };
        let id = self.producer.append(qos);
        self.trace.note(self.t, Some(id), format!("published at QoS {}", qos as u8));
    }

    fn latency(&mut self) -> u64 {
        self.s.latency_ms.0 + self.rng.u64(0..=self.s.latency_ms.1)
    }

    fn fault(&mut self, f: Fault) {
        self.faults += 1;
        self.trace.note(self.t, None, format!("FAULT {f:?}"));
        match f {
            Fault::KillBroker { down } => {
                if self.broker.up {
                    self.broker.kill();
                    self.broker_back = Some(self.t + down.as_millis() as u64);
                    self.link_lost("the broker was killed");
                }
            }
            Fault::Reset { cut_per_mille } => {
                if let Some(c) = self.conn.as_mut() {
                    // Bytes already sent arrive up to the cut; the rest is lost.
                    let bytes: Vec<u8> = c.up.drain(..).flat_map(|(_, b)| b).collect();
                    let keep = bytes.len() * cut_per_mille as usize / 1000;
                    let whole = keep / FRAME * FRAME;
                    if self.broker.up {
                        for f in bytes[..whole].chunks(FRAME) {
                            self.broker_receives(f);
                        }
                    }
                    self.link_lost("connection reset");
                }
            }
            Fault::BlackHole { lasts } => {
                let until = self.t + lasts.as_millis() as u64;
                if let Some(c) = self.conn.as_mut() {
                    c.hole_until = until;
                }
            }
            Fault::CrashProducer { down } => {
                if self.producer.alive() {
                    self.producer.crash();
                    self.producer_back = Some(self.t + down.as_millis() as u64);
                    self.conn = None;
                }
            }
        }
    }

    fn heal(&mut self) {
        if self.broker_back.is_some_and(|t| t <= self.t) {
            self.broker_back = None;
            self.broker.up = true;
            self.trace.note(self.t, None, "broker restarted");
        }
        if self.producer_back.is_some_and(|t| t <= self.t) {
            self.producer_back = None;
            self.producer.start();
            self.next_connect = self.t;
            self.trace.note(self.t, None, "producer restarted on its outbox");
        }
    }

    fn connect(&mut self) {
        if self.conn.is_some() || !self.producer.alive() || self.t < self.next_connect {
            return;
        }
        if !self.broker.up {
            self.next_connect = self.t + self.rng.u64(100..1_000);
            return;
        }
        let present = self.broker.connect();
        let at = self.t + 2 * self.latency();
        let down = VecDeque::from([(at, Down::ConnAck { present })]);
        self.conn = Some(Conn { up: VecDeque::new(), down, hole_until: 0 });
    }

    fn link_lost(&mut self, why: &str) {
        if self.conn.take().is_some() {
            self.trace.note(self.t, None, format!("link lost: {why}"));
        }
        if let Some(e) = self.producer.engine.as_mut() {
            e.handle_link_lost();
        }
        self.producer.carry_out(self.t, &mut self.trace);
        self.next_connect = self.t + self.rng.u64(100..1_000);
    }

    /// Frames and packets whose time has come arrive.
    fn deliver(&mut self) {
        let t = self.t;
        let Some(c) = self.conn.as_mut() else { return };
        if c.hole_until > t {
            return;
        }
        let mut frames = Vec::new();
        while c.up.front().is_some_and(|(at, _)| *at <= t) {
            frames.push(c.up.pop_front().expect("front").1);
        }
        let mut down = Vec::new();
        while c.down.front().is_some_and(|(at, _)| *at <= t) {
            down.push(c.down.pop_front().expect("front").1);
        }
        for f in frames.iter().flat_map(|b| b.chunks(FRAME)) {
            if self.conn.is_none() {
                break;
            }
            self.broker_receives(f);
        }
        if !down.is_empty() && self.conn.is_some() {
            self.producer_receives(down);
        }
    }

    fn broker_receives(&mut self, f: &[u8]) {
        let (reply, id) = self.broker.receive(f);
        let what = ["?", "PUBLISH", "PUBREL", "PINGREQ"].get(f[0] as usize).copied().unwrap_or("?");
        let pid = u16::from_be_bytes([f[1], f[2]]);
        match reply {
            Reply::Send(d) => {
                if let Some(id) = id {
                    self.trace.note(self.t, Some(id), format!("broker: {what} pid {pid} dup {} -> {d:?}", f[3]));
                }
                let at = self.t + self.latency();
                if let Some(c) = self.conn.as_mut() {
                    let at = at.max(c.down.back().map_or(0, |(t, _)| *t));
                    c.down.push_back((at, d));
                }
            }
            Reply::Nothing => {}
            Reply::Close(why) => {
                if let Some(id) = id {
                    self.trace.note(self.t, Some(id), format!("broker: {what} pid {pid}: closes ({why})"));
                }
                self.link_lost(why);
            }
        }
    }

    fn producer_receives(&mut self, packets: Vec<Down>) {
        let now = self.now();
        let mut acks = Vec::new();
        let Some(e) = self.producer.engine.as_mut() else { return };
        e.handle_received(now);
        for p in packets {
            match p {
                Down::ConnAck { present } => {
                    let info = ConnAckInfo {
                        session_present: present,
                        receive_maximum: self.s.receive_maximum,
                        maximum_qos: self.broker.max_qos(),
                        asked_clean: false,
                        reconnect: self.connected_once,
                    };
                    self.connected_once = true;
                    let r = e.handle_connack(info, now, &|_| true, &mut SimWire);
                    self.trace.note(self.t, None, format!("connected, session present {present}, {} resent", r.resent));
                }
                Down::PubAck { pid } => acks.push(Ack::PubAck { pid, ok: true }),
                Down::PubRec { pid } => acks.push(Ack::PubRec { pid, ok: true }),
                Down::PubComp { pid } => acks.push(Ack::PubComp { pid }),
                Down::PingResp => {}
            }
        }
        let r = e.handle_acks(acks, now);
        self.producer.carry_out(self.t, &mut self.trace);
        if let Err(end) = r {
            self.ended(end);
        }
    }

    fn ended(&mut self, end: End) {
        self.link_lost(&format!("the engine ended the link: {end:?}"));
    }

    /// The engine's turn: reads, sends, timers.
    fn drive(&mut self) {
        let now = self.now();
        let Some(e) = self.producer.engine.as_mut() else { return };
        if let Some(wake) = e.poll_timeout() {
            if wake <= now.at && self.conn.is_some() {
                if let Err(end) = e.handle_timeout(now, &mut SimWire) {
                    self.ended(end);
                    return;
                }
            }
        }
        let Some(mut e) = self.producer.engine.take() else { return };
        let newest = self.producer.newest();
        while let Some((p, after)) = e.next_read(&newest) {
            let page = self.producer.read_after(after, newest[p]);
            e.handle_page(page, p, newest[p], &|_| true);
        }
        e.fill(now, &|_| true, &mut SimWire);
        self.producer.engine = Some(e);
        self.producer.carry_out(self.t, &mut self.trace);
        let Some(e) = self.producer.engine.as_mut() else { return };
        if let Some(bytes) = e.poll_transmit() {
            for f in bytes.chunks(FRAME).filter(|f| f[0] == 1) {
                let id = u64::from_be_bytes(f[5..13].try_into().expect("frame size"));
                let pid = u16::from_be_bytes([f[1], f[2]]);
                self.trace.note(self.t, Some(id), format!("sent: PUBLISH pid {pid} QoS {} dup {}", f[4], f[3]));
            }
            let at = self.t + self.latency();
            if let Some(c) = self.conn.as_mut() {
                let at = at.max(c.up.back().map_or(0, |(t, _)| *t));
                c.up.push_back((at, bytes));
            }
        }
    }

    fn verdict(self) -> Verdict {
        let lost = self
            .accepted
            .iter()
            .copied()
            .filter(|id| !self.broker.acknowledged.contains(id) && !self.producer.committed.drops.contains_key(id))
            .filter(|id| !self.producer.committed.msgs.contains_key(id))
            .collect();
        let stuck = self.producer.committed.msgs.keys().copied().filter(|id| self.accepted.contains(id)).collect();
        Verdict {
            seed: self.s.seed,
            accepted: self.accepted.len(),
            lost,
            stuck,
            faults: self.faults,
            trace: self.trace,
        }
    }
}
