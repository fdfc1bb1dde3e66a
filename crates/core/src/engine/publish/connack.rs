//! What a CONNACK means for what was in flight: resume a kept session
//! under the same packet ids, or restart a lost one from the outbox.

use super::*;

/// What a resume does with one message of the old window.
enum Fate {
    Resend,
    /// Another broker took it over (a failover while this link was down).
    TakenOver,
    /// Beyond a receive maximum that shrank: sent later, as a new send.
    Requeue,
    /// A QoS 2 PUBLISH beyond the window: it keeps its packet id (the
    /// broker may hold it) and is sent again once the window has room.
    Defer,
    /// Past its deadline or budget: it leaves.
    Spent(DropReason),
}

impl<M: Queued> PublishSession<M> {
    /// The broker accepted the connection: the session starts streaming.
    /// A kept session resends what was in flight (PUBLISH with DUP, or
    /// PUBREL) under the same packet ids; a lost one voids every packet id
    /// and republishes everything not acknowledged from the outbox (G2).
    pub fn handle_connack(
        &mut self,
        ack: ConnAckInfo,
        now: Now,
        claims: &dyn Fn(&M) -> bool,
        wire: &mut impl Wire<M>,
    ) -> Connected {
        self.conn_limit = ack.receive_maximum.unwrap_or(u16::MAX).min(self.cfg.max_inflight).max(1);
        let limit = self.conn_limit.min(self.cwnd);
        self.acks_since_change = 0;
        self.max_qos = ack.maximum_qos;
        self.pubrec_seen = false;
        self.refused_last = false;
        self.keepalive = Some(KeepAlive::new(self.cfg.keep_alive, now.at));
        self.progress_at = now.at;
        self.out.clear();
        let mut window = self.window.clone();
        window.set_limit(limit);
        let resent = match window.on_connected(ack.session_present) {
            Resume::Resend(list) => self.resume(window, list, limit, now, claims, wire),
            Resume::Restart { delivered } => {
                self.restart(window, delivered, ack);
                0
            }
        };
        // A suspect that left during the resume gave the window back.
        self.window.set_limit(self.conn_limit.min(self.cwnd));
        // Owners may have changed while the link was down: read again from
        // the oldest message this broker has not acknowledged.
        self.rewind();
        Connected { resent }
    }

    fn resume(
        &mut self,
        mut window: SendWindow,
        list: Vec<(u16, Inflight)>,
        limit: u16,
        now: Now,
        claims: &dyn Fn(&M) -> bool,
        wire: &mut impl Wire<M>,
    ) -> usize {
        let mut resent = 0;
        let mut attempted = Vec::new();
        self.deferred.clear();
        let mut on_wire = 0;
        for (pid, e) in list {
            let Some(m) = self.inflight.get(&e.id) else {
                // Never resend blind: free the id, read the message again.
                window.release(pid);
                self.events.push_back(SessionEvent::Missing(e.id));
                continue;
            };
            let fate = if e.qos == Qos::ExactlyOnce {
                // A QoS 2 exchange under way always finishes where it began:
                // this broker holds its packet id. A PUBLISH waits for room
                // in the window (a broker that ended links with many in
                // flight gets fewer); a PUBREL goes at once.
                if e.stage == Stage::Published && on_wire >= limit as usize {
                    Fate::Defer
                } else {
                    Fate::Resend
                }
            } else if !claims(m) {
                Fate::TakenOver
            } else if on_wire >= limit as usize {
                Fate::Requeue
            } else if let Some(reason) = Self::spent(m, now.wall_ms) {
                Fate::Spent(reason)
            } else {
                Fate::Resend
            };
            let fate = match fate {
                Fate::Resend if crate::mutate::planted(crate::mutate::Bug::ResumeWithoutResend) => continue,
                fate => fate,
            };
            let sent = match fate {
                Fate::Resend => match e.stage {
                    Stage::Published => wire.publish(m, Some(pid), true, &mut self.out),
                    Stage::Released => {
                        self.out.extend(wire.pubrel(pid));
                        Ok(())
                    }
                },
                Fate::TakenOver if crate::mutate::planted(crate::mutate::Bug::FailoverForgetsTheQueue) => {
                    window.release(pid);
                    self.inflight.remove(&e.id);
                    self.store.push_back(StoreOp::Ack(vec![e.id]));
                    continue;
                }
                Fate::Defer => {
                    self.deferred.push_back((pid, e.id));
                    continue;
                }
                Fate::TakenOver | Fate::Requeue => {
                    window.release(pid);
                    self.inflight.remove(&e.id);
                    if matches!(fate, Fate::TakenOver) {
                        self.left_unacked(e.id);
                    }
                    continue;
                }
                Fate::Spent(reason) => Err(reason),
            };
            match sent {
                Ok(()) => {
                    resent += 1;
                    on_wire += 1;
                    if e.qos == Qos::AtLeastOnce && m.max_attempts().is_some() {
                        attempted.push(e.id);
                    }
                }
                // A QoS 2 PUBLISH the broker may have taken (its PUBREC
                // lost) can no longer be encoded: its packet id stays
                // reserved (reused, the broker would take the next message
                // under it for this one), and it waits until the broker
                // loses the session.
                Err(reason) if e.qos == Qos::ExactlyOnce => {
                    self.events.push_back(SessionEvent::Stranded { id: e.id, reason });
                }
                Err(reason) => {
                    window.release(pid);
                    if let Some(m) = self.inflight.remove(&e.id) {
                        self.cannot_send(m, reason);
                    }
                }
            }
        }
        for id in &attempted {
            if let Some(m) = self.inflight.get_mut(id) {
                m.count_attempt();
            }
        }
        if !attempted.is_empty() {
            self.store.push_back(StoreOp::Attempted(attempted));
        }
        self.window = window;
        resent
    }

    /// A lost session. Bindings of QoS 2 messages are void in it: they are
    /// cleared durably before any of them is bound again, and the new
    /// window applies only once that is written (until then the old state
    /// stands, to be decided again at the next CONNACK).
    fn restart(&mut self, window: SendWindow, delivered: Vec<u64>, ack: ConnAckInfo) {
        let expected = !ack.asked_clean && (!self.inflight.is_empty() || ack.reconnect);
        let stale: Vec<WireUpdate> =
            self.inflight.values().filter(|m| m.qos() == Qos::ExactlyOnce).map(|m| (m.id(), None)).collect();
        if stale.is_empty() {
            self.apply_restart(window, delivered, expected);
        } else {
            self.store.push_back(StoreOp::Bind(stale));
            self.pending.push_back(Pending::Restart { window, delivered, expected });
            self.bind_at.get_or_insert(self.progress_at);
        }
    }

    pub(super) fn apply_restart(&mut self, window: SendWindow, mut delivered: Vec<u64>, expected: bool) {
        let republish = self.inflight.len() as u64;
        if crate::mutate::planted(crate::mutate::Bug::ForgetInflightOnSessionLoss) {
            delivered = self.inflight.keys().copied().collect();
        }
        self.window = window;
        self.deferred.clear();
        if !delivered.is_empty() {
            self.store.push_back(StoreOp::Ack(delivered));
        }
        self.events.push_back(SessionEvent::Republished(republish));
        self.inflight.clear();
        self.queue.clear();
        self.retry.clear();
        self.rewind();
        if expected {
            self.events.push_back(SessionEvent::SessionLost { in_flight: republish });
        }
    }
}
