//! Messages from the queue onto the wire: the window, QoS downgrades,
//! deadlines and budgets, and the QoS 2 bindings written before a PUBLISH
//! leaves.

use super::*;

impl<M: Queued> PublishSession<M> {
    /// Moves messages from the queue onto the wire while the window has
    /// room, in outbox order; refused messages whose pause is over go back
    /// to the front first. Does nothing while disconnected or while a bind
    /// is being written.
    pub fn fill(&mut self, now: Now, claims: &dyn Fn(&M) -> bool, wire: &mut impl Wire<M>) {
        if self.keepalive.is_none() || !self.pending.is_empty() {
            return;
        }
        self.requeue_due_retries(now.at, claims);
        self.resend_deferred(wire);
        let mut sent_qos0 = Vec::new();
        let mut attempted = Vec::new();
        // From the first QoS 2 message on, packets wait here (in order)
        // until the bindings are on disk.
        let mut held: Vec<(M, Option<u16>, Vec<u8>)> = Vec::new();
        while let Some(front) = self.queue.front() {
            if front.qos() != Qos::AtMostOnce && !self.window.has_room() {
                break;
            }
            let m = self.queue.pop_front().expect("front exists");
            let Some((m, pid)) = self.prepare(m, now) else { continue };
            if m.qos() == Qos::ExactlyOnce || !held.is_empty() {
                let mut bytes = Vec::new();
                match wire.publish(&m, pid, false, &mut bytes) {
                    Ok(()) => held.push((m, pid, bytes)),
                    Err(reason) => self.refused_by_wire(m, pid, reason),
                }
                continue;
            }
            // Straight onto the wire: written where it goes.
            if let Err(reason) = wire.publish(&m, pid, false, &mut self.out) {
                self.refused_by_wire(m, pid, reason);
                continue;
            }
            if let (Some(pid), None) = (pid, self.timed) {
                self.timed = Some((pid, now.at));
            }
            sent_qos0.extend(self.sent(m, pid, &mut attempted));
        }
        // Counted before the sends they count are acknowledged (the store
        // carries operations out in order).
        if !attempted.is_empty() {
            self.store.push_back(StoreOp::Attempted(attempted));
        }
        if held.is_empty() {
            self.ack_qos0(sent_qos0.iter().map(Queued::id).collect());
        } else {
            let updates = held
                .iter()
                .filter(|(m, _, _)| m.qos() == Qos::ExactlyOnce)
                .filter_map(|(m, pid, _)| pid.map(|pid| (m.id(), Some((pid, Stage::Published)))))
                .collect();
            self.store.push_back(StoreOp::Bind(updates));
            self.pending.push_back(Pending::Send { qos0_before: sent_qos0, held });
            self.bind_at.get_or_insert(now.at);
        }
    }

    /// `m` can never go to this broker: dropped for `reason`, or, when the
    /// codec knows the broker closes the link on it ([`DropReason::Poison`]:
    /// a size learned from an earlier poison message), moved aside at once.
    pub(super) fn cannot_send(&mut self, m: M, reason: DropReason) {
        self.left_unacked(m.id());
        if reason == DropReason::Poison {
            self.store.push_back(StoreOp::Poison(m.id(), PoisonCause::Size));
            self.events.push_back(SessionEvent::Poisoned { message: m, cause: PoisonCause::Size });
        } else {
            self.store.push_back(StoreOp::Drop(vec![m.id()], reason));
        }
    }

    /// QoS 2 PUBLISHes of a kept session that waited for room in the
    /// window go out again under their packet ids, oldest first.
    fn resend_deferred(&mut self, wire: &mut impl Wire<M>) {
        while let Some(&(pid, id)) = self.deferred.front() {
            if self.window.len().saturating_sub(self.deferred.len()) >= self.window.limit() as usize {
                break;
            }
            self.deferred.pop_front();
            let Some(m) = self.inflight.get(&id) else {
                // Never resend blind: free the id; the message is read again.
                self.window.release(pid);
                self.events.push_back(SessionEvent::Missing(id));
                continue;
            };
            if let Err(reason) = wire.publish(m, Some(pid), true, &mut self.out) {
                self.events.push_back(SessionEvent::Stranded { id, reason });
            }
        }
    }

    /// Takes `m` out of the queue for the wire: its QoS for this broker and
    /// a packet id. `None` when it left instead (spent).
    fn prepare(&mut self, mut m: M, now: Now) -> Option<(M, Option<u16>)> {
        // A broker that takes QoS 1 at most gets QoS 2 messages at QoS 1: a
        // consumer's inbox removes the copies QoS 1 allows. Never lower than
        // 1: QoS 0 would give up the acknowledgement.
        if m.qos() == Qos::ExactlyOnce && (self.max_qos == Some(1) || self.closes_on_qos2) {
            if !self.closes_on_qos2 {
                self.downgraded(Downgrade::MaximumQos);
            }
            m.set_qos(Qos::AtLeastOnce);
        }
        let qos = m.qos();
        if let Some(reason) = Self::spent(&m, now.wall_ms) {
            self.left_unacked(m.id());
            self.store.push_back(StoreOp::Drop(vec![m.id()], reason));
            return None;
        }
        if self.window.is_empty() && qos != Qos::AtMostOnce {
            self.progress_at = now.at;
        }
        let pid = (qos != Qos::AtMostOnce).then(|| self.window.assign(m.id(), qos).expect("room checked"));
        Some((m, pid))
    }

    /// The codec cannot send `m` (prepared under `pid`): the id is given
    /// back, and `m` leaves ([`Self::cannot_send`]).
    fn refused_by_wire(&mut self, m: M, pid: Option<u16>, reason: DropReason) {
        if let Some(pid) = pid {
            self.window.release(pid);
        }
        self.cannot_send(m, reason);
    }

    /// `m`'s PUBLISH is on the wire (in `out`): under a packet id it is in
    /// flight; QoS 0 is best-effort (handed to the socket once, then it
    /// leaves the outbox) and is returned.
    fn sent(&mut self, mut m: M, pid: Option<u16>, attempted: &mut Vec<u64>) -> Option<M> {
        Self::count_send(&mut m, attempted);
        match pid {
            Some(_) => {
                self.inflight.insert(m.id(), m);
                None
            }
            None => Some(m),
        }
    }

    /// A send of `m` is going out: it counts against its retry budget
    /// (only a send that really leaves counts; one held back for a bind
    /// that fails does not).
    fn count_send(m: &mut M, attempted: &mut Vec<u64>) {
        if m.qos() != Qos::AtMostOnce && m.max_attempts().is_some() {
            m.count_attempt();
            attempted.push(m.id());
        }
    }

    fn ack_qos0(&mut self, ids: Vec<u64>) {
        if !ids.is_empty() {
            self.store.push_back(StoreOp::Ack(ids));
        }
    }

    /// Refused messages whose wait is over go back to the front of the
    /// queue, if they are still this broker's.
    fn requeue_due_retries(&mut self, now: Instant, claims: &dyn Fn(&M) -> bool) {
        let mut due = Vec::new();
        while self.retry.front().is_some_and(|(t, _)| *t <= now) {
            due.push(self.retry.pop_front().expect("front exists").1);
        }
        due.retain(|m| claims(m));
        due.sort_by_key(Queued::id);
        for m in due.into_iter().rev() {
            self.queue.push_front(m);
        }
    }

    /// The outcome of the last [`StoreOp::Bind`]. Written: what waited for
    /// it goes ahead (held PUBLISHes, PUBRELs, a restart's new window).
    /// Failed: nothing that waited goes out; held messages return to the
    /// front of the queue with their packet ids given back, and a restart
    /// is decided again at the next CONNACK.
    pub fn handle_bound(&mut self, bound: Bound, now: Now, wire: &mut impl Wire<M>) {
        let Some(pending) = self.pending.pop_front() else { return };
        if self.pending.is_empty() {
            if let Some(at) = self.bind_at.take() {
                // The ack timer stood still while the disk was written.
                let waited = now.at.saturating_duration_since(at);
                self.progress_at = (self.progress_at + waited).min(now.at);
            }
        }
        match (pending, bound) {
            (Pending::Send { qos0_before, held }, Bound::Written { gone }) => self.send_held(qos0_before, held, gone),
            (Pending::Release(pids), Bound::Written { .. }) => {
                for pid in pids {
                    self.out.extend(wire.pubrel(pid));
                }
            }
            (Pending::Restart { window, delivered, expected }, Bound::Written { .. }) => {
                self.apply_restart(window, delivered, expected)
            }
            (Pending::Unbind, Bound::Written { .. }) => {}
            (p, Bound::Failed) => self.undo(p),
        }
    }

    /// What waited for a bind that was not written: held messages return
    /// to the front of the queue with their packet ids given back; PUBRELs
    /// wait for the next CONNACK (a kept session resends them); a restart
    /// is decided again at the next CONNACK.
    pub(super) fn undo(&mut self, pending: Pending<M>) {
        if let Pending::Send { qos0_before, held } = pending {
            for (m, pid, _) in held.into_iter().rev() {
                if let Some(pid) = pid {
                    self.window.release(pid);
                }
                self.queue.push_front(m);
            }
            for m in qos0_before.into_iter().rev() {
                self.queue.push_front(m);
            }
        }
    }

    fn send_held(&mut self, qos0_before: Vec<M>, held: Vec<(M, Option<u16>, Vec<u8>)>, gone: Vec<u64>) {
        let mut sent_qos0: Vec<u64> = qos0_before.iter().map(Queued::id).collect();
        let mut attempted = Vec::new();
        for (m, pid, bytes) in held {
            if gone.contains(&m.id()) {
                // Delivered through other brokers meanwhile: not sent here.
                if let Some(pid) = pid {
                    self.window.release(pid);
                }
                continue;
            }
            self.out.extend(bytes);
            sent_qos0.extend(self.sent(m, pid, &mut attempted).as_ref().map(Queued::id));
        }
        if !attempted.is_empty() {
            self.store.push_back(StoreOp::Attempted(attempted));
        }
        self.ack_qos0(sent_qos0);
    }
}
