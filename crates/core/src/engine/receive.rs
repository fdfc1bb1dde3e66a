//! The receiving session of one consumer link: whether to subscribe after
//! CONNACK, the acknowledgements owed in the order the PUBLISHes came
//! (MQTT wants them so), PUBREL answered at once, and the keep-alive of a
//! link that may write nothing for a long time.
//!
//! A delivery's acknowledgement is owed from its arrival
//! ([`ReceiveSession::handle_publish`]) and due once the dispatcher says it
//! was handled and recorded ([`ReceiveSession::handle_handled`]); it
//! leaves with every earlier one ([`ReceiveSession::poll_transmit`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{End, Timer};
use crate::keepalive::{KeepAlive, KeepAliveAction};
use crate::message::Qos;

/// The packet codec of a consumer link, as the session needs it.
pub trait AckWire {
    /// Appends PUBACK (QoS 1) or PUBREC (QoS 2) for `pid` to `out`.
    fn ack(&mut self, pid: u16, qos: Qos, out: &mut Vec<u8>);
    /// PUBCOMP for `pid`.
    fn pubcomp(&mut self, pid: u16) -> Vec<u8>;
    /// PINGREQ.
    fn ping(&mut self) -> Vec<u8>;
}

/// Whether a consumer subscribes after CONNACK: always on a new session,
/// and on a kept one whose filters are not the ones it wants (`granted`:
/// what this broker last granted, as recorded; `wanted`: the configured
/// filters, in the same form).
pub fn must_subscribe(session_present: bool, granted: &str, wanted: &str) -> bool {
    !session_present || granted != wanted
}

/// The receiving session of one consumer link.
#[derive(Debug)]
pub struct ReceiveSession {
    keep_alive: Duration,
    /// Packet ids in arrival order, with their QoS and whether handled.
    order: VecDeque<(u16, Qos, bool)>,
    /// How many entries at the front of `order` are handled (they leave
    /// at the next [`Self::poll_transmit`]): a handled delivery is looked
    /// for after them, so that acks in arrival order cost no scan.
    handled_front: usize,
    keepalive: KeepAlive,
    /// When the link last wrote: a consumer that wrote nothing for half
    /// the keep-alive pings, or the broker would take it for dead.
    written_at: Instant,
    out: Vec<u8>,
}

impl ReceiveSession {
    /// A session whose connection opened at `now`.
    pub fn new(keep_alive: Duration, now: Instant) -> Self {
        Self {
            keep_alive,
            order: VecDeque::new(),
            handled_front: 0,
            keepalive: KeepAlive::new(keep_alive, now),
            written_at: now,
            out: Vec::new(),
        }
    }

    /// A PUBLISH arrived: its acknowledgement (QoS 1 and 2) takes its place
    /// in the order.
    pub fn handle_publish(&mut self, pid: Option<u16>, qos: Qos) {
        if let Some(pid) = pid {
            self.order.push_back((pid, qos, false));
        }
    }

    /// Deliveries received and not acknowledged yet (the broker's count
    /// against this side's Receive Maximum).
    pub fn unacknowledged(&self) -> usize {
        self.order.len()
    }

    /// PUBREL: answered at once (the message was handled before its PUBREC
    /// left).
    pub fn handle_pubrel(&mut self, pid: u16, wire: &mut impl AckWire) {
        self.out.extend(wire.pubcomp(pid));
    }

    /// The delivery under `pid` was handled and its identity recorded: its
    /// acknowledgement is due (it leaves with every earlier one).
    pub fn handle_handled(&mut self, pid: u16) {
        let pending = self.order.iter_mut().skip(self.handled_front);
        if let Some(entry) = pending.into_iter().find(|(p, _, done)| *p == pid && !*done) {
            entry.2 = true;
        }
        while self.order.get(self.handled_front).is_some_and(|(_, _, done)| *done) {
            self.handled_front += 1;
        }
    }

    /// Bytes arrived (or the link is not read: silence then says nothing).
    pub fn handle_received(&mut self, now: Instant) {
        self.keepalive.on_receive(now);
    }

    /// Bytes to write: the acknowledgements due at the front of the
    /// arrival order, and whatever else waits. The caller writes them at
    /// `now`.
    pub fn poll_transmit(&mut self, now: Instant, wire: &mut impl AckWire) -> Option<Vec<u8>> {
        // The handled front is exactly what leaves.
        for (pid, qos, _) in self.order.drain(..self.handled_front) {
            wire.ack(pid, qos, &mut self.out);
        }
        self.handled_front = 0;
        if self.out.is_empty() {
            return None;
        }
        self.written_at = now;
        Some(std::mem::take(&mut self.out))
    }

    /// Every timer of the session and when it fires.
    pub fn timers(&self) -> [(Timer, Option<Instant>); 2] {
        [
            (Timer::KeepAlive, Some(self.keepalive.poll_timeout())),
            (Timer::PingIdle, Some(self.written_at + self.keep_alive / 2)),
        ]
    }

    /// When the session next needs [`Self::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers().into_iter().filter_map(|(_, t)| t).min()
    }

    /// Acts on the timers that are due. `reading` is false while the link
    /// is not read (the application is slow): silence then counts for
    /// nothing.
    pub fn handle_timeout(&mut self, now: Instant, reading: bool, wire: &mut impl AckWire) -> Result<(), End> {
        let mut ping = now >= self.written_at + self.keep_alive / 2;
        if reading {
            match self.keepalive.poll(now) {
                Some(KeepAliveAction::SendPing) => ping = true,
                Some(KeepAliveAction::Dead) => return Err(End::DeadLink),
                None => {}
            }
        } else {
            self.keepalive.on_receive(now);
        }
        // One PINGREQ, whichever rule asked for it.
        if ping {
            self.out.extend(wire.ping());
            self.written_at = now;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pids;

    impl AckWire for Pids {
        fn ack(&mut self, pid: u16, _qos: Qos, out: &mut Vec<u8>) {
            out.extend(pid.to_be_bytes());
        }
        fn pubcomp(&mut self, _pid: u16) -> Vec<u8> {
            Vec::new()
        }
        fn ping(&mut self) -> Vec<u8> {
            Vec::new()
        }
    }

    fn acked(s: &mut ReceiveSession, now: Instant) -> Vec<u16> {
        let bytes = s.poll_transmit(now, &mut Pids).unwrap_or_default();
        bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()
    }

    /// Acknowledgements leave in the order the PUBLISHes came, each once
    /// everything before it is handled, whatever order they are handled
    /// in; a packet id the broker uses again after its ack left is a new
    /// delivery.
    #[test]
    fn acks_leave_in_arrival_order_once_the_front_is_handled() {
        let now = Instant::now();
        let mut s = ReceiveSession::new(Duration::from_secs(60), now);
        for pid in [1, 2, 3, 4, 5] {
            s.handle_publish(Some(pid), Qos::AtLeastOnce);
        }
        s.handle_handled(2);
        s.handle_handled(3);
        assert_eq!(acked(&mut s, now), Vec::<u16>::new());
        s.handle_handled(1);
        assert_eq!(acked(&mut s, now), vec![1, 2, 3]);
        // 1 comes again while 4 and 5 wait; handled first, it waits behind them.
        s.handle_publish(Some(1), Qos::AtLeastOnce);
        s.handle_handled(1);
        s.handle_handled(5);
        assert_eq!(acked(&mut s, now), Vec::<u16>::new());
        assert_eq!(s.unacknowledged(), 3);
        s.handle_handled(4);
        assert_eq!(acked(&mut s, now), vec![4, 5, 1]);
        assert_eq!(s.unacknowledged(), 0);
        // Handled twice, or never received: nothing more leaves.
        s.handle_handled(4);
        s.handle_handled(9);
        assert_eq!(acked(&mut s, now), Vec::<u16>::new());
    }
}
