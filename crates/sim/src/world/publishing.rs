//! The producer's side: publishing, its connection to each broker, the
//! routes, and each engine's turn.

use std::collections::VecDeque;

use steadfast_core::engine::{Ack, ConnAckInfo, Decision, End, LinkEnd};
use steadfast_core::Qos;

use super::{arrived, cut_whole, in_order, Conn, World, WALL_EPOCH_MS};
use crate::broker::{Down, Reply, FRAME};
use crate::producer::{Msg, SimWire};
use crate::schedule::Publish;

impl World {
    /// The producer's step: routes that came due, then per broker: connect,
    /// take what arrived, let the engine send; then commit.
    pub(super) fn step_producer(&mut self) {
        if self.route_wake.is_some_and(|w| w <= self.t) && self.producer.alive() {
            let d = self.routes.borrow_mut().decide(self.now().at);
            self.apply(d);
        }
        self.receipts_arrive();
        self.producer.sweep_receipts(self.t, &mut self.trace);
        for b in 0..self.brokers.len() {
            self.connect_producer(b);
            self.deliver_to_broker_and_producer(b);
            self.drive_producer(b);
        }
        let now = self.now();
        self.producer.sweep(now, self.t, &mut self.trace);
        if self.producer.commit_ready(self.t) {
            for id in self.producer.commit() {
                if self.accepted.insert(id) {
                    self.trace.note(self.t, Some(id), "accepted (its commit is synced)");
                } else {
                    self.trace.note(self.t, Some(id), "its commit is synced");
                }
            }
        }
    }

    /// Carries out a routing decision: a failover or fail-back makes every
    /// engine read the outbox again.
    fn apply(&mut self, d: Decision) {
        for s in &d.switches {
            let to = s.to.map_or("none".to_owned(), |t| t.to_string());
            let what = if s.back { "fail-back" } else { "failover" };
            self.trace.note(self.t, None, format!("routes: {what} from broker {} to {to}", s.from));
        }
        if d.bump {
            self.producer.engines.iter_mut().for_each(|e| e.rewind());
        }
        self.route_wake = self.routes.borrow().timers()[0].1.map(|n| self.ms(n));
    }

    pub(super) fn publish(&mut self, p: Publish) {
        if !self.producer.alive() {
            return;
        }
        let qos = if p.qos == 2 { Qos::ExactlyOnce } else { Qos::AtLeastOnce };
        let expires = p.ttl_ms.map(|ttl| WALL_EPOCH_MS + self.t + ttl);
        let (id, accepted_now) =
            self.producer.append(self.t, qos, expires, p.max_attempts, p.priority, (p.oversize, p.denied));
        let mut class = match (p.ttl_ms, p.max_attempts) {
            (Some(ttl), _) => format!(", deadline in {ttl} ms"),
            (None, Some(n)) => format!(", budget of {n} sends"),
            (None, None) => String::new(),
        };
        if p.priority > 0 {
            class.push_str(&format!(", priority {}", p.priority));
        }
        if p.oversize {
            class.push_str(", larger than the brokers take");
        }
        if p.denied {
            class.push_str(", on a topic the brokers deny");
        }
        self.trace.note(self.t, Some(id), format!("published at QoS {}{class}", p.qos));
        if accepted_now {
            self.accepted.insert(id);
            self.trace.note(self.t, Some(id), "accepted before its commit is synced");
        }
    }

    fn connect_producer(&mut self, b: usize) {
        if self.conns[b].is_some() || !self.producer.alive() || self.t < self.next_connect[b] {
            return;
        }
        if self.unreachable(b) {
            self.next_connect[b] = self.t + self.rng.u64(100..1_000);
            let d = self.routes.borrow_mut().link_down(b, self.now().at);
            self.apply(d);
            return;
        }
        let present = self.brokers[b].connect(self.t);
        let at = self.t + 2 * self.latency();
        let down = VecDeque::from([(at, Down::ConnAck { present })]);
        self.conns[b] = Some(Conn { up: VecDeque::new(), down, hole_until: 0 });
    }

    pub(super) fn reset_producer_link(&mut self, b: usize, cut_per_mille: u32) {
        let Some(c) = self.conns[b].as_mut() else { return };
        let arrive = cut_whole(&mut c.up, cut_per_mille, FRAME);
        if self.brokers[b].up {
            for f in arrive.chunks(FRAME) {
                self.broker_receives(b, f);
            }
        }
        self.producer_link_lost(b, "connection reset", LinkEnd::Closed);
    }

    pub(super) fn producer_link_lost(&mut self, b: usize, why: &str, end: LinkEnd) {
        if self.conns[b].take().is_some() {
            self.trace.note(self.t, None, format!("producer link to broker {b} lost: {why}"));
            self.brokers[b].producer_left(self.t);
        }
        self.next_connect[b] = self.t + self.rng.u64(100..1_000);
        if !self.producer.alive() {
            return;
        }
        if self.producer.engines[b].awaits_first_pubrec() && !self.qos2_reported {
            // What the driver turns into "the broker may not support QoS 2".
            self.qos2_reported = true;
            self.trace.note(self.t, None, format!("producer: the link to broker {b} ended with a QoS 2 PUBLISH unanswered: reported as a broker that may not support QoS 2"));
        }
        self.producer.engines[b].handle_link_lost(end);
        self.producer.carry_out(b, self.t, &mut self.trace);
        let d = self.routes.borrow_mut().link_down(b, self.now().at);
        self.apply(d);
    }

    /// Frames and packets whose time has come arrive.
    fn deliver_to_broker_and_producer(&mut self, b: usize) {
        let t = self.t;
        let Some(c) = self.conns[b].as_mut() else { return };
        let frames = arrived(&mut c.up, t, c.hole_until);
        let down = arrived(&mut c.down, t, c.hole_until);
        for f in frames.iter().flat_map(|bytes| bytes.chunks(FRAME)) {
            if self.conns[b].is_none() {
                break;
            }
            self.broker_receives(b, f);
        }
        if !down.is_empty() && self.conns[b].is_some() {
            self.producer_receives(b, down);
        }
    }

    fn broker_receives(&mut self, b: usize, f: &[u8]) {
        let refuse = self.failing() && self.rng.u32(0..1000) < self.s.refuse_per_mille;
        let (reply, id) = self.brokers[b].receive(f, refuse);
        let what = ["?", "PUBLISH", "PUBREL", "PINGREQ"].get(f[0] as usize).copied().unwrap_or("?");
        let pid = u16::from_be_bytes([f[1], f[2]]);
        match reply {
            Reply::Send(d) => {
                if let Some(id) = id {
                    self.trace.note(self.t, Some(id), format!("broker {b}: {what} pid {pid} dup {} -> {d}", f[3]));
                }
                let at = self.t + self.latency();
                if let Some(c) = self.conns[b].as_mut() {
                    let at = in_order(&c.down, at);
                    c.down.push_back((at, d));
                }
            }
            Reply::Nothing => {}
            Reply::Close(why) => {
                if let Some(id) = id {
                    self.trace.note(self.t, Some(id), format!("broker {b}: {what} pid {pid}: closes ({why})"));
                }
                self.producer_link_lost(b, why, LinkEnd::Closed);
            }
        }
    }

    fn producer_receives(&mut self, b: usize, packets: Vec<Down>) {
        if !self.producer.alive() {
            return;
        }
        let now = self.now();
        let mut acks = Vec::new();
        self.producer.engines[b].handle_received(now);
        for p in packets {
            match p {
                Down::ConnAck { present } => self.producer_connected(b, present),
                Down::PubAck { pid, of, code } => {
                    self.note_ack(b, of, code);
                    acks.push(Ack::PubAck { pid, code });
                }
                Down::PubRec { pid, of, code } => {
                    self.note_ack(b, of, code);
                    acks.push(Ack::PubRec { pid, code });
                }
                Down::PubComp { pid } => acks.push(Ack::PubComp { pid }),
                Down::PingResp => {}
            }
        }
        let r = self.producer.engines[b].handle_acks(acks, now);
        if self.producer.carry_out(b, self.t, &mut self.trace) {
            self.producer_link_lost(b, "a QoS 2 bind could not be written", LinkEnd::Ours);
            return;
        }
        if let Err(end) = r {
            self.ended(b, end);
        }
    }

    /// An acknowledgement reached the producer: from then on the message
    /// is that broker's to lose (a refusal is none).
    fn note_ack(&mut self, b: usize, of: u64, code: u8) {
        if !steadfast_core::reason::is_refusal(code) {
            self.producer.acks_reached.entry(of).or_default().insert(b);
        } else {
            let why = steadfast_core::reason::describe(code);
            self.trace.note(self.t, Some(of), format!("producer: broker {b} refused it ({why})"));
        }
    }

    /// The CONNACK: the routes hear first (whether this broker takes
    /// messages now), then the engine resumes or restarts.
    fn producer_connected(&mut self, b: usize, present: bool) {
        let now = self.now();
        let limit = self.s.receive_maximum.unwrap_or(u16::MAX).min(self.s.max_inflight) as usize;
        let d = self.routes.borrow_mut().link_up(b, limit, now.at);
        self.apply(d);
        let info = ConnAckInfo {
            session_present: present,
            receive_maximum: self.s.receive_maximum,
            maximum_qos: self.brokers[b].max_qos(),
            asked_clean: false,
            reconnect: self.connected_once[b],
        };
        self.connected_once[b] = true;
        let routes = &self.routes;
        let claims = |_: &Msg| routes.borrow_mut().claims(b, None, "t");
        let r = self.producer.engines[b].handle_connack(info, now, &claims, &mut SimWire);
        let line = format!("producer connected to broker {b}, session present {present}, {} resent", r.resent);
        self.trace.note(self.t, None, line);
    }

    fn ended(&mut self, b: usize, end: End) {
        self.producer_link_lost(b, &format!("the engine ended the link: {end:?}"), LinkEnd::Ended(end));
    }

    /// Broker `b`'s engine's turn: timers, reads, sends.
    fn drive_producer(&mut self, b: usize) {
        if !self.producer.alive() || self.conns[b].is_none() {
            return;
        }
        let now = self.now();
        let e = &mut self.producer.engines[b];
        if e.poll_timeout().is_some_and(|w| w <= now.at) {
            if let Err(end) = e.handle_timeout(now, &mut SimWire) {
                self.ended(b, end);
                return;
            }
        }
        let newest = self.producer.newest();
        let routes = &self.routes;
        let claims = |_: &Msg| routes.borrow_mut().claims(b, None, "t");
        if routes.borrow().is_active(b) {
            while let Some((p, after)) = self.producer.engines[b].next_read(&newest) {
                let page = self.producer.read_after(b, p, after, newest[p]);
                self.producer.engines[b].handle_page(page, p, newest[p], &claims);
            }
        }
        self.producer.engines[b].fill(now, &claims, &mut SimWire);
        // A bind carried out may release held packets: transmit after it.
        if self.producer.carry_out(b, self.t, &mut self.trace) {
            self.producer_link_lost(b, "a QoS 2 bind could not be written", LinkEnd::Ours);
            return;
        }
        let inflight = self.producer.engines[b].in_flight();
        if self.routes.borrow_mut().progress(b, inflight) {
            let d = self.routes.borrow_mut().decide(now.at);
            self.apply(d);
        }
        let Some(bytes) = self.producer.engines[b].poll_transmit() else { return };
        for f in bytes.chunks(FRAME).filter(|f| f[0] == 1) {
            let id = u64::from_be_bytes(f[5..13].try_into().expect("frame size"));
            let pid = u16::from_be_bytes([f[1], f[2]]);
            let line = format!("sent to broker {b}: PUBLISH pid {pid} QoS {} dup {}", f[4] & 3, f[3]);
            self.trace.note(self.t, Some(id), line);
        }
        let at = self.t + self.latency();
        // A capped link takes its time to carry the bytes.
        let carry = self.s.bandwidth.map_or(0, |bw| (bytes.len() as u64).div_ceil(bw));
        if let Some(c) = self.conns[b].as_mut() {
            let at = in_order(&c.up, at) + carry;
            c.up.push_back((at, bytes));
        }
    }
}
