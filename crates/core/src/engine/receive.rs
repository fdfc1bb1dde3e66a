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
    /// PUBACK (QoS 1) or PUBREC (QoS 2) for `pid`.
    fn ack(&mut self, pid: u16, qos: Qos) -> Vec<u8>;
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
        if let Some(entry) = self.order.iter_mut().find(|(p, _, done)| *p == pid && !*done) {
            entry.2 = true;
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
        while self.order.front().is_some_and(|(_, _, done)| *done) {
            let (pid, qos, _) = self.order.pop_front().expect("front exists");
            self.out.extend(wire.ack(pid, qos));
        }
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
