//! The consumer's side: its connection to the broker, the dispatch
//! engine's turn, the application handling deliveries, and inbox records.

use std::collections::VecDeque;

use std::time::Duration;

use steadfast_core::engine::{AckWire, DispatchOp, ReceiveSession};
use steadfast_core::{Identity, Qos};

use super::{arrived, cut_whole, in_order, World};
use crate::consumer::{Del, PRODUCER};

/// What the broker sends the consumer.
#[derive(Debug, Clone, Copy)]
pub(super) enum ToConsumer {
    ConnAck { present: bool },
    Publish { pid: u16, id: u64, dup: bool },
    PingResp,
}

/// The consumer link's codec in the simulator: a PUBACK is its packet id
/// in two bytes, a PINGREQ is packet id 0.
struct SimAcks;

impl AckWire for SimAcks {
    fn ack(&mut self, pid: u16, _qos: Qos, out: &mut Vec<u8>) {
        out.extend(pid.to_be_bytes());
    }
    fn pubcomp(&mut self, _pid: u16) -> Vec<u8> {
        Vec::new()
    }
    fn ping(&mut self) -> Vec<u8> {
        vec![0, 0]
    }
}

/// Bytes of one packet from the consumer (its packet id).
const ACK: usize = 2;

/// The consumer's keep-alive in the simulator.
const CONSUMER_KEEP_ALIVE: Duration = Duration::from_secs(3);

/// The consumer's connection.
pub(super) struct CConn {
    /// Bytes on their way to the broker (PUBACKs, PINGREQs).
    pub(super) up: VecDeque<(u64, Vec<u8>)>,
    /// The engine of this link: acks in arrival order, keep-alive.
    pub(super) session: ReceiveSession,
    /// Packets on their way to the consumer.
    pub(super) down: VecDeque<(u64, ToConsumer)>,
    /// Nothing passes before this time (a black hole).
    pub(super) hole_until: u64,
}

impl World {
    /// The consumer's step: connect, the broker sends, deliveries arrive,
    /// the application finishes, records land, timers fire.
    pub(super) fn step_consumer(&mut self) {
        for b in 0..self.brokers.len() {
            self.connect_consumer(b);
            self.broker_serves_consumer(b);
            self.deliver_to_consumer(b);
        }
        self.application();
        self.records_land();
        let now = self.now();
        if let Some(e) = self.consumer.engine.as_mut() {
            if e.poll_timeout().is_some_and(|w| w <= now.at) {
                e.handle_timeout(now);
            }
        }
        self.carry_out_dispatch();
        for b in 0..self.brokers.len() {
            self.consumer_link_turn(b);
        }
    }

    /// A consumer link's engine: its timers, then what it has to write.
    fn consumer_link_turn(&mut self, b: usize) {
        let now = self.now().at;
        let at = self.t + self.latency();
        let Some(c) = self.cconns[b].as_mut() else { return };
        if c.session.poll_timeout().is_some_and(|w| w <= now)
            && c.session.handle_timeout(now, true, &mut SimAcks).is_err()
        {
            self.consumer_link_lost(b, "the receiving engine found the link dead (keep-alive)");
            return;
        }
        if let Some(bytes) = c.session.poll_transmit(now, &mut SimAcks) {
            let at = in_order(&c.up, at);
            c.up.push_back((at, bytes));
        }
    }

    fn connect_consumer(&mut self, b: usize) {
        if self.cconns[b].is_some() || !self.consumer.alive() || self.t < self.next_cconnect[b] {
            return;
        }
        if self.unreachable(b) {
            self.next_cconnect[b] = self.t + self.rng.u64(100..1_000);
            return;
        }
        self.consumer.epochs[b] += 1;
        let (present, resend) = self.brokers[b].connect_consumer(self.t);
        let at = self.t + 2 * self.latency();
        let mut down = VecDeque::from([(at, ToConsumer::ConnAck { present })]);
        for (pid, id) in resend {
            self.trace.note(self.t, Some(id), format!("broker {b}: resends to the consumer, pid {pid} dup"));
            down.push_back((at, ToConsumer::Publish { pid, id, dup: true }));
        }
        let session = ReceiveSession::new(CONSUMER_KEEP_ALIVE, self.now().at);
        self.cconns[b] = Some(CConn { up: VecDeque::new(), down, hole_until: 0, session });
    }

    pub(super) fn reset_consumer_link(&mut self, b: usize, cut_per_mille: u32) {
        let Some(c) = self.cconns[b].as_mut() else { return };
        let arrive = cut_whole(&mut c.up, cut_per_mille, ACK);
        if self.brokers[b].up {
            for f in arrive.chunks(ACK) {
                self.broker_takes_from_consumer(b, f);
            }
        }
        self.consumer_link_lost(b, "connection reset");
    }

    pub(super) fn consumer_link_lost(&mut self, b: usize, why: &str) {
        if self.cconns[b].take().is_some() {
            self.trace.note(self.t, None, format!("consumer link to broker {b} lost: {why}"));
            self.brokers[b].consumer_left(self.t);
        }
        self.next_cconnect[b] = self.t + self.rng.u64(100..1_000);
    }

    /// A packet from the consumer: a PINGREQ is answered, a PUBACK ends
    /// the delivery of its message.
    fn broker_takes_from_consumer(&mut self, b: usize, f: &[u8]) {
        let pid = u16::from_be_bytes([f[0], f[1]]);
        if pid == 0 {
            let at = self.t + self.latency();
            if let Some(c) = self.cconns[b].as_mut() {
                let at = in_order(&c.down, at);
                c.down.push_back((at, ToConsumer::PingResp));
            }
            return;
        }
        if let Some(id) = self.brokers[b].consumer_acked(pid) {
            self.trace.note(self.t, Some(id), format!("broker {b}: the consumer's PUBACK pid {pid}; done with it"));
        }
    }

    fn broker_serves_consumer(&mut self, b: usize) {
        if !self.brokers[b].up || self.cconns[b].as_ref().is_none_or(|c| c.hole_until > self.t) {
            return;
        }
        while let Some((pid, id)) = self.brokers[b].next_for_consumer() {
            self.trace.note(self.t, Some(id), format!("broker {b}: sends to the consumer, pid {pid}"));
            let at = self.t + self.latency();
            let c = self.cconns[b].as_mut().expect("checked");
            let at = in_order(&c.down, at);
            c.down.push_back((at, ToConsumer::Publish { pid, id, dup: false }));
        }
    }

    fn deliver_to_consumer(&mut self, b: usize) {
        let t = self.t;
        let Some(c) = self.cconns[b].as_mut() else { return };
        let up = arrived(&mut c.up, t, c.hole_until);
        let down = arrived(&mut c.down, t, c.hole_until);
        if !down.is_empty() {
            c.session.handle_received(self.epoch + Duration::from_millis(t));
        }
        for f in up.iter().flat_map(|bytes| bytes.chunks(ACK)) {
            self.broker_takes_from_consumer(b, f);
        }
        let epoch = self.consumer.epochs[b];
        let items: Vec<Del> = down
            .into_iter()
            .filter_map(|p| match p {
                ToConsumer::ConnAck { present } => {
                    self.trace.note(t, None, format!("consumer connected to broker {b}, session present {present}"));
                    None
                }
                ToConsumer::PingResp => None,
                ToConsumer::Publish { pid, id, dup } => {
                    self.trace.note(t, Some(id), format!("consumer: received from broker {b}, pid {pid} dup {dup}"));
                    if let Some(c) = self.cconns[b].as_mut() {
                        c.session.handle_publish(Some(pid), Qos::AtLeastOnce);
                    }
                    let identity = Identity { producer: PRODUCER.to_owned(), seq: id };
                    Some(Del { id, identity, token: (b, epoch, pid), receipt: self.s.receipts_ms.is_some() })
                }
            })
            .collect();
        let now = self.now();
        let Some(e) = self.consumer.engine.as_mut() else { return };
        if items.is_empty() {
            return;
        }
        let asked = e.to_ask(&items);
        let seen: Vec<bool> = asked.iter().map(|(_, seq)| self.consumer.inbox.contains(seq)).collect();
        for ((_, seq), seen) in asked.iter().zip(&seen) {
            let answer = if *seen { "already handled" } else { "not handled yet" };
            self.trace.note(t, Some(*seq), format!("consumer: the inbox says {answer}"));
        }
        e.handle_delivered(items, &seen, now);
    }

    /// The application finishes what is due: handled, then acknowledged;
    /// or, now and then, given back unhandled (it comes again).
    fn application(&mut self) {
        let now = self.now();
        while self.consumer.app.front().is_some_and(|(at, _)| *at <= self.t) {
            let (_, d) = self.consumer.app.pop_front().expect("front");
            if self.failing() && self.rng.u32(0..1000) < self.s.give_back_per_mille {
                self.trace.note(self.t, Some(d.id), "consumer: given back by the application, unhandled");
                if let Some(e) = self.consumer.engine.as_mut() {
                    e.handle_refused(d, now);
                }
                continue;
            }
            *self.handled.entry(d.id).or_default() += 1;
            self.trace.note(self.t, Some(d.id), "consumer: HANDLED by the application");
            if let Some(e) = self.consumer.engine.as_mut() {
                e.handle_acks([(d.token, Some(d.identity))]);
            }
        }
    }

    /// Inbox records whose write finished are on disk.
    fn records_land(&mut self) {
        let now = self.now();
        while self.consumer.records.front().is_some_and(|(at, _, _)| *at <= self.t) {
            let (_, covers, record) = self.consumer.records.pop_front().expect("front");
            let ok = !self.failing() || self.rng.u32(0..1000) >= self.s.record_fail_per_mille;
            let c = &mut self.consumer;
            if ok && record.sync {
                while c.unsynced.front().is_some_and(|(n, _)| *n < covers) {
                    c.unsynced.pop_front();
                }
            }
            let landing = c.landings;
            if ok && !record.sync {
                c.landings += 1;
            }
            for (i, _) in &record.ids {
                if ok {
                    let how = if record.sync { "synced" } else { "committed, not synced" };
                    self.trace.note(self.t, Some(i.seq), format!("consumer: identity recorded in the inbox ({how})"));
                    self.consumer.inbox.insert(i.seq);
                    if !record.sync {
                        self.consumer.unsynced.push_back((landing, i.seq));
                    }
                } else {
                    self.trace.note(self.t, Some(i.seq), "consumer: the inbox record failed (disk full?)");
                    self.consumer.rerecord.insert(i.seq);
                }
            }
            if let Some(e) = self.consumer.engine.as_mut() {
                e.handle_recorded(record, ok, now);
            }
        }
    }

    /// Carries out the dispatch engine's decisions.
    fn carry_out_dispatch(&mut self) {
        loop {
            let Some(op) = self.consumer.engine.as_mut().and_then(|e| e.poll_op()) else { return };
            match op {
                DispatchOp::HandOver { delivery, redelivered } => {
                    let at = self.t + self.rng.u64(0..=self.s.handling_ms);
                    let d = delivery.id;
                    self.trace.note(
                        self.t,
                        Some(d),
                        if redelivered {
                            "consumer: handed to the application again (it gave it back before)".to_owned()
                        } else {
                            "consumer: handed to the application".to_owned()
                        },
                    );
                    self.consumer.app.push_back((at, delivery));
                    self.consumer.app.make_contiguous().sort_by_key(|(t, _)| *t);
                }
                DispatchOp::AckBroker((b, epoch, pid)) => {
                    // An ack of an older connection is void: the broker sends
                    // the message again on the new one.
                    if let Some(c) = self.cconns[b].as_mut().filter(|_| epoch == self.consumer.epochs[b]) {
                        c.session.handle_handled(pid);
                    }
                }
                DispatchOp::Record(record) => {
                    for (i, _) in &record.ids {
                        self.consumer.rerecord.remove(&i.seq);
                    }
                    let at = self.t + self.rng.u64(0..5);
                    // The store writes records in the order they come: a
                    // synced one lands after, and covers, every unsynced
                    // one landed so far.
                    let covers = self.consumer.landings;
                    self.consumer.records.push_back((at, covers, record));
                }
                DispatchOp::Count(..) => {}
                // The simulated consumer is alone: its inbox never says
                // another member holds a message.
                DispatchOp::Ask(_) => unreachable!("the simulated consumer is in no group"),
                DispatchOp::Receipt { token: (b, _, _), identity, .. } => self.send_receipt(b, identity.seq),
                DispatchOp::SuspectedLoss { first, last, .. } => {
                    self.trace.note(
                        self.t,
                        None,
                        format!("consumer: suspected loss of messages {first} to {last} (a gap that did not fill)"),
                    );
                }
            }
        }
    }
}
