//! The producer's side: publishing, its connection to the broker, and the
//! engine's turn.

use std::collections::VecDeque;

use steadfast_core::engine::{Ack, ConnAckInfo, End};
use steadfast_core::Qos;

use super::{arrived, in_order, Conn, World};
use crate::broker::{Down, Reply, FRAME};
use crate::producer::SimWire;

impl World {
    /// The producer's step: connect, take what arrived, let the engine
    /// send, commit.
    pub(super) fn step_producer(&mut self) {
        self.connect_producer();
        self.deliver_to_broker_and_producer();
        self.drive_producer();
        if self.producer.dirty() {
            for id in self.producer.commit() {
                self.trace.note(self.t, Some(id), "accepted (committed to the outbox)");
                self.accepted.insert(id);
            }
        }
    }

    pub(super) fn publish(&mut self, qos: u8) {
        if !self.producer.alive() {
            return;
        }
        let qos = if qos == 2 { Qos::ExactlyOnce } else { Qos::AtLeastOnce };
        let id = self.producer.append(qos);
        self.trace.note(self.t, Some(id), format!("published at QoS {}", qos as u8));
    }

    fn connect_producer(&mut self) {
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

    pub(super) fn reset_producer_link(&mut self, cut_per_mille: u32) {
        let Some(c) = self.conn.as_mut() else { return };
        // Bytes already sent arrive up to the cut; the rest is lost.
        let bytes: Vec<u8> = c.up.drain(..).flat_map(|(_, b)| b).collect();
        let whole = bytes.len() * cut_per_mille as usize / 1000 / FRAME * FRAME;
        if self.broker.up {
            for f in bytes[..whole].chunks(FRAME) {
                self.broker_receives(f);
            }
        }
        self.producer_link_lost("connection reset");
    }

    pub(super) fn producer_link_lost(&mut self, why: &str) {
        if self.conn.take().is_some() {
            self.trace.note(self.t, None, format!("producer link lost: {why}"));
        }
        if let Some(e) = self.producer.engine.as_mut() {
            e.handle_link_lost();
        }
        self.producer.carry_out(self.t, &mut self.trace);
        self.next_connect = self.t + self.rng.u64(100..1_000);
    }

    /// Frames and packets whose time has come arrive.
    fn deliver_to_broker_and_producer(&mut self) {
        let t = self.t;
        let Some(c) = self.conn.as_mut() else { return };
        let frames = arrived(&mut c.up, t, c.hole_until);
        let down = arrived(&mut c.down, t, c.hole_until);
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
                    let at = in_order(&c.down, at);
                    c.down.push_back((at, d));
                }
            }
            Reply::Nothing => {}
            Reply::Close(why) => {
                if let Some(id) = id {
                    self.trace.note(self.t, Some(id), format!("broker: {what} pid {pid}: closes ({why})"));
                }
                self.producer_link_lost(why);
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
                    let resent = r.resent;
                    self.trace.note(
                        self.t,
                        None,
                        format!("producer connected, session present {present}, {resent} resent"),
                    );
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
        self.producer_link_lost(&format!("the engine ended the link: {end:?}"));
    }

    /// The engine's turn: reads, sends, timers.
    fn drive_producer(&mut self) {
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
        // A bind carried out may release held packets: transmit after it.
        self.producer.carry_out(self.t, &mut self.trace);
        let Some(bytes) = self.producer.engine.as_mut().and_then(|e| e.poll_transmit()) else { return };
        for f in bytes.chunks(FRAME).filter(|f| f[0] == 1) {
            let id = u64::from_be_bytes(f[5..13].try_into().expect("frame size"));
            let pid = u16::from_be_bytes([f[1], f[2]]);
            self.trace.note(self.t, Some(id), format!("sent: PUBLISH pid {pid} QoS {} dup {}", f[4], f[3]));
        }
        let at = self.t + self.latency();
        if let Some(c) = self.conn.as_mut() {
            let at = in_order(&c.up, at);
            c.up.push_back((at, bytes));
        }
    }
}
