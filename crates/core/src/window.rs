//! The send window: which outbox messages are on the wire under which packet
//! id, and what a reconnect means for them.
//!
//! Packet ids limit how many messages are *in flight* (at most the broker's
//! receive maximum, never more than 65,535); they never limit the backlog,
//! which stays in the outbox on disk and is streamed into the window.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::message::Qos;

/// Packet ids hashed by one multiplication (Fibonacci hashing): a
/// PUBLISH and its PUBACK each look one up, and the ordered map this
/// replaced cost its removal about 260 instructions a message
/// (docs/performance.md, session 28). No random seed: the order of what
/// is in flight follows only what happened to the window.
#[derive(Debug, Default, Clone, Copy)]
struct PidHasher(u64);

impl Hasher for PidHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type ByPid = HashMap<u16, Inflight, BuildHasherDefault<PidHasher>>;

/// Where a QoS 1 or 2 message stands on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// QoS 2 only: PUBREC received, PUBREL sent, waiting for PUBCOMP. The
    /// broker owns the message from here on.
    Released,
}

/// One message in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    /// Its outbox id.
    pub id: u64,
    /// QoS 1 or 2.
    pub qos: Qos,
    /// Where it stands.
    pub stage: Stage,
}

/// What to do after a CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The broker kept the session: resend every in-flight message under its
    /// packet id, in outbox order (PUBLISH with DUP, or PUBREL).
    Resend(Vec<(u16, Inflight)>),
    /// The broker has no session (it restarted, or it is another broker):
    /// every packet id is void. Messages in `delivered` were already taken by
    /// the broker (PUBREC seen) and leave the outbox; everything else still in
    /// the outbox is published again, from the oldest (G2).
    Restart {
        /// QoS 2 messages the broker took before the session was lost.
        delivered: Vec<u64>,
    },
}

/// The send window of one broker session.
#[derive(Debug, Clone)]
pub struct SendWindow {
    limit: u16,
    by_pid: ByPid,
    next_pid: u16,
}

impl SendWindow {
    /// An empty window that holds at most `limit` messages (clamped to 1..).
    pub fn new(limit: u16) -> Self {
        Self { limit: limit.max(1), by_pid: ByPid::default(), next_pid: 1 }
    }

    /// Changes the limit, e.g. to the receive maximum of a CONNACK.
    pub fn set_limit(&mut self, limit: u16) {
        self.limit = limit.max(1);
    }

    /// The current limit.
    pub fn limit(&self) -> u16 {
        self.limit
    }

    /// Outbox ids of the messages whose PUBLISH is in flight (not those
    /// past PUBREC: the broker has those).
    pub fn published_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_pid.values().filter(|e| e.stage == Stage::Published).map(|e| e.id)
    }

    /// Everything in flight, by packet id (sorted here: for the rarer
    /// questions, not for each message).
    pub fn entries(&self) -> impl Iterator<Item = (u16, Inflight)> + '_ {
        let mut all: Vec<(u16, Inflight)> = self.by_pid.iter().map(|(p, e)| (*p, *e)).collect();
        all.sort_unstable_by_key(|(p, _)| *p);
        all.into_iter()
    }

    /// Messages in flight.
    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// True when another message may be published.
    pub fn has_room(&self) -> bool {
        self.by_pid.len() < self.limit as usize
    }

    /// Puts back a message that a previous process had in flight (QoS 2
    /// bindings are kept in the outbox).
    pub fn restore(&mut self, pid: u16, entry: Inflight) {
        self.by_pid.insert(pid, entry);
    }

    /// Binds the outbox message `id` to a free packet id, if there is room.
    pub fn assign(&mut self, id: u64, qos: Qos) -> Option<u16> {
        debug_assert!(qos != Qos::AtMostOnce, "QoS 0 takes no packet id");
        if !self.has_room() {
            return None;
        }
        loop {
            let pid = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.by_pid.entry(pid) {
                slot.insert(Inflight { id, qos, stage: Stage::Published });
                return Some(pid);
            }
        }
    }

    /// PUBACK: the QoS 1 message under `pid` is delivered. Unknown or
    /// mismatched ids (a confused broker) are ignored.
    pub fn on_puback(&mut self, pid: u16) -> Option<u64> {
        self.take_if(pid, |e| e.qos == Qos::AtLeastOnce)
    }

    /// PUBACK for a QoS 2 message not yet PUBREC'd: a broker without QoS 2
    /// took it at QoS 1 (RabbitMQ before 3.12 does). It is delivered.
    pub fn on_downgraded_puback(&mut self, pid: u16) -> Option<u64> {
        self.take_if(pid, |e| e.qos == Qos::ExactlyOnce && e.stage == Stage::Published)
    }

    /// PUBREC: the QoS 2 message under `pid` now belongs to the broker. The
    /// caller records the stage durably, then sends PUBREL. A repeated PUBREC
    /// answers again.
    pub fn on_pubrec(&mut self, pid: u16) -> Option<u64> {
        let e = self.by_pid.get_mut(&pid).filter(|e| e.qos == Qos::ExactlyOnce)?;
        e.stage = Stage::Released;
        Some(e.id)
    }

    /// PUBCOMP: the QoS 2 exchange under `pid` is complete.
    pub fn on_pubcomp(&mut self, pid: u16) -> Option<u64> {
        self.take_if(pid, |e| e.qos == Qos::ExactlyOnce && e.stage == Stage::Released)
    }

    /// Gives back the packet id of a message that did not go out after all
    /// (its PUBLISH could not be built or recorded). Returns its outbox id.
    pub fn release(&mut self, pid: u16) -> Option<u64> {
        self.by_pid.remove(&pid).map(|e| e.id)
    }

    /// A PUBREC or PUBACK carried an error reason code: the broker refused the
    /// message and its packet id is free again. The message stays in the
    /// outbox.
    pub fn on_refused(&mut self, pid: u16) -> Option<u64> {
        self.take_if(pid, |_| true)
    }

    fn take_if(&mut self, pid: u16, ok: impl Fn(&Inflight) -> bool) -> Option<u64> {
        if self.by_pid.get(&pid).is_some_and(ok) {
            self.by_pid.remove(&pid).map(|e| e.id)
        } else {
            None
        }
    }

    /// A CONNACK arrived: decide what happens to what is in flight.
    pub fn on_connected(&mut self, session_present: bool) -> Resume {
        if session_present {
            let mut all: Vec<_> = self.by_pid.iter().map(|(p, e)| (*p, *e)).collect();
            all.sort_by_key(|(_, e)| e.id);
            return Resume::Resend(all);
        }
        let mut delivered: Vec<u64> =
            self.by_pid.values().filter(|e| e.stage == Stage::Released).map(|e| e.id).collect();
        delivered.sort_unstable();
        self.by_pid.clear();
        Resume::Restart { delivered }
    }

    /// Ids of everything in flight (any order).
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_pid.values().map(|e| e.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_bounded_and_packet_ids_are_unique() {
        let mut w = SendWindow::new(3);
        let a = w.assign(10, Qos::AtLeastOnce).unwrap();
        let b = w.assign(11, Qos::AtLeastOnce).unwrap();
        let c = w.assign(12, Qos::ExactlyOnce).unwrap();
        assert!(w.assign(13, Qos::AtLeastOnce).is_none());
        assert_eq!(std::collections::HashSet::from([a, b, c]).len(), 3);
        assert_eq!(w.on_puback(a), Some(10));
        assert_eq!(w.on_puback(a), None, "a second PUBACK is ignored");
        assert_eq!(w.on_puback(c), None, "PUBACK for a QoS 2 message is ignored");
        assert!(w.has_room());
    }

    #[test]
    fn packet_ids_wrap_around_and_skip_ids_in_use() {
        let mut w = SendWindow::new(u16::MAX);
        let first = w.assign(0, Qos::AtLeastOnce).unwrap();
        for i in 1..u16::MAX as u64 {
            let p = w.assign(i, Qos::AtLeastOnce).unwrap();
            w.on_puback(p);
        }
        let next = w.assign(99_999, Qos::AtLeastOnce).unwrap();
        assert_ne!(next, 0);
        assert_ne!(next, first, "the pid still in flight is skipped");
    }

    #[test]
    fn qos2_goes_through_pubrec_then_pubcomp() {
        let mut w = SendWindow::new(10);
        let p = w.assign(5, Qos::ExactlyOnce).unwrap();
        assert_eq!(w.on_pubcomp(p), None, "PUBCOMP before PUBREC is ignored");
        assert_eq!(w.on_pubrec(p), Some(5));
        assert_eq!(w.on_pubrec(p), Some(5), "a repeated PUBREC is answered again");
        assert_eq!(w.on_pubcomp(p), Some(5));
        assert!(w.is_empty());
    }

    #[test]
    fn a_kept_session_resends_in_outbox_order() {
        let mut w = SendWindow::new(10);
        w.restore(40, Inflight { id: 9, qos: Qos::ExactlyOnce, stage: Stage::Released });
        let p1 = w.assign(3, Qos::AtLeastOnce).unwrap();
        let p2 = w.assign(7, Qos::ExactlyOnce).unwrap();
        match w.on_connected(true) {
            Resume::Resend(list) => {
                let order: Vec<_> = list.iter().map(|(p, e)| (*p, e.id)).collect();
                assert_eq!(order, vec![(p1, 3), (p2, 7), (40, 9)]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn a_lost_session_voids_packet_ids_and_keeps_what_the_broker_took() {
        let mut w = SendWindow::new(10);
        w.assign(1, Qos::AtLeastOnce).unwrap();
        let p = w.assign(2, Qos::ExactlyOnce).unwrap();
        w.assign(3, Qos::ExactlyOnce).unwrap();
        w.on_pubrec(p);
        assert_eq!(w.on_connected(false), Resume::Restart { delivered: vec![2] });
        assert!(w.is_empty());
    }
}
