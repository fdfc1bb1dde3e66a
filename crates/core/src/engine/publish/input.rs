//! What an acknowledgement means: delivered, taken by the broker (QoS 2),
//! refused, downgraded, or a stray that ends the link.

use super::*;

/// Acknowledgements of one read, sorted by what follows from them.
struct Sorted {
    done: Vec<u64>,
    released: Vec<(u64, u16)>,
    /// With the reason code of each.
    refused: Vec<(u64, u8)>,
    /// Whether the last of these that said anything of a message was a
    /// refusal for good (`None`: none did), for the session's `refused_last`.
    refused_last: Option<bool>,
}

impl<M: Queued> PublishSession<M> {
    /// Acknowledgements that arrived together. They are applied in order;
    /// one for a packet id with nothing of its kind in flight is a broker
    /// bug that ends the link (what is in flight is sent again), but the
    /// ones before it still count.
    pub fn handle_acks(&mut self, acks: impl IntoIterator<Item = Ack>, now: Now) -> Result<(), End> {
        let acks = acks.into_iter();
        // Mostly all PUBACKs: `done` sized for them at once.
        let mut s = Sorted {
            done: Vec::with_capacity(acks.size_hint().0),
            released: Vec::new(),
            refused: Vec::new(),
            refused_last: None,
        };
        let mut end = Ok(());
        for ack in acks {
            if let (Ack::PubAck { pid, .. }, Some((timed, sent))) = (ack, self.timed) {
                if pid == timed {
                    self.rtt.sample(now.at.saturating_duration_since(sent));
                    self.timed = None;
                }
            }
            if let Err(e) = self.sort(ack, &mut s) {
                end = Err(e);
                break;
            }
        }
        if let Some(last) = s.refused_last {
            self.refused_last = last;
        }
        // Completed ones first: they reach the store before anything else.
        self.complete(s.done, now);
        self.hold_refused(s.refused, now);
        if !s.released.is_empty() {
            let updates = s.released.iter().map(|(id, pid)| (*id, Some((*pid, Stage::Released)))).collect();
            self.store.push_back(StoreOp::Bind(updates));
            self.pending.push_back(Pending::Release(s.released.into_iter().map(|(_, pid)| pid).collect()));
            self.bind_at.get_or_insert(now.at);
        }
        end
    }

    fn sort(&mut self, ack: Ack, s: &mut Sorted) -> Result<(), End> {
        let stray = |packet, pid, kind| End::Stray { packet, pid, kind };
        s.refused_last = match ack {
            Ack::PubAck { code, .. } | Ack::PubRec { code, .. } if reason::is_refusal(code) => {
                if reason::is_for_good(code) {
                    Some(true)
                } else {
                    s.refused_last
                }
            }
            _ => Some(false),
        };
        match ack {
            Ack::PubAck { pid, code } if !reason::is_refusal(code) => match self.window.on_puback(pid) {
                Some(id) => s.done.push(id),
                // Only a broker that never answered QoS 2 properly on this
                // link downgrades; after a PUBREC a PUBACK under a QoS 2 id
                // is a stray, not a delivery.
                None => match (!self.pubrec_seen).then(|| self.window.on_downgraded_puback(pid)).flatten() {
                    Some(id) => {
                        self.downgraded(Downgrade::PubAck);
                        s.done.push(id);
                    }
                    None => return Err(stray("PUBACK", pid, "QoS 1 message")),
                },
            },
            Ack::PubRec { pid, code } if !reason::is_refusal(code) => match self.window.on_pubrec(pid) {
                Some(id) => {
                    if !self.deferred.is_empty() {
                        self.deferred.retain(|(p, _)| *p != pid);
                    }
                    self.pubrec_seen = true;
                    self.pubrec_ever = true;
                    s.released.push((id, pid));
                }
                None => return Err(stray("PUBREC", pid, "QoS 2 message")),
            },
            Ack::PubComp { pid } => s.done.extend(self.window.on_pubcomp(pid)),
            Ack::PubAck { pid, code } | Ack::PubRec { pid, code } => match self.window.on_refused(pid) {
                Some(id) => s.refused.push((id, code)),
                None => return Err(stray("refusal", pid, "message")),
            },
        }
        Ok(())
    }

    /// Messages acknowledged: they leave the outbox.
    fn complete(&mut self, done: Vec<u64>, now: Now) {
        if done.is_empty() {
            return;
        }
        self.grow(done.len());
        self.rtt.answered();
        if !self.deferred.is_empty() {
            self.deferred.retain(|(_, id)| !done.contains(id));
        }
        for id in &done {
            self.suspects.remove(id);
            if let Some(m) = self.inflight.remove(id) {
                self.largest_acked = self.largest_acked.max(m.size() as u64);
                self.gone_ahead(&m);
            }
        }
        if self.suspects.is_empty() {
            // Every suspect went through: the failures were a limit or
            // chance, and the smaller window stands, with its ceiling.
            self.chase_from = None;
            if self.ceiling != self.ceiling_held {
                self.ceiling_held = self.ceiling;
                self.events.extend(self.ceiling.map(SessionEvent::CeilingHeld));
            }
        }
        self.events.push_back(SessionEvent::Acked(done.len() as u64));
        self.store.push_back(StoreOp::Ack(done));
        self.progress_at = now.at;
    }

    /// Additive growth: one more in flight per window's worth of
    /// acknowledgements, up to what the configuration and the broker allow.
    fn grow(&mut self, acked: usize) {
        self.acks_since_change = self.acks_since_change.saturating_add(acked as u32);
        let top = self.ceiling.map_or(self.cfg.max_inflight, |c| c.min(self.cfg.max_inflight));
        if self.cwnd >= top {
            return;
        }
        self.grow_acks += acked as u32;
        while self.grow_acks >= self.cwnd as u32 && self.cwnd < top {
            self.grow_acks -= self.cwnd as u32;
            self.cwnd += 1;
            self.acks_since_change = 0;
        }
        self.window.set_limit(self.cwnd.min(self.conn_limit));
    }

    /// The broker refused these (an error reason code). Those refused for
    /// good ([`reason::is_for_good`]: not authorised, too large) are moved
    /// aside as poison with their code, so that the messages behind them go
    /// on and the user can see, requeue or delete them, whatever their
    /// retry budget (the broker answered; the budget counts sends without
    /// an answer), and in fanout only once the other members cannot meet
    /// the quorum (the outbox's writer decides). The others stay in the
    /// outbox and are sent again, as new messages, after a pause. A QoS 2
    /// binding is cleared first (poison clears its own): its packet id is
    /// free on the broker.
    fn hold_refused(&mut self, refused: Vec<(u64, u8)>, now: Now) {
        let at = now.at + self.cfg.refused_pause;
        let mut unbind = Vec::new();
        self.deferred.retain(|(_, d)| !refused.iter().any(|(id, _)| id == d));
        for (id, code) in refused {
            let suspect = self.suspects.remove(&id).is_some();
            if let Some(m) = self.inflight.remove(&id) {
                if reason::is_for_good(code) {
                    // Links it was on that ended were its doing (Mosquitto
                    // closes after a 0x95 it may not have sent yet): the
                    // window they narrowed comes back.
                    if suspect {
                        self.explained();
                    }
                    self.gone_ahead(&m);
                    let cause = PoisonCause::Refused(code);
                    self.store.push_back(StoreOp::Poison(id, cause));
                    self.events.push_back(SessionEvent::Poisoned { message: m, cause });
                    continue;
                }
                // It answered: whatever ended links before, it was not this.
                self.events.push_back(SessionEvent::Refused(m.clone(), code));
                if m.qos() == Qos::ExactlyOnce {
                    unbind.push((id, None));
                }
                self.retry.push_back((at, m));
            }
        }
        if !unbind.is_empty() {
            self.store.push_back(StoreOp::Bind(unbind));
            self.pending.push_back(Pending::Unbind);
            self.bind_at.get_or_insert(now.at);
        }
    }
}
