//! Admission of a new message: the bounds it must fit in, the overflow
//! policy of its class (deadline or persistent) when it does not, the
//! keep-latest values it replaces, and the queue of publishers waiting
//! for room (overflow `block`), admitted in order as room is made.

use steadfast_core::engine::{accept_after_sync, admit, Admission, Bounds, Candidate, Limit};
use steadfast_core::DropReason;

use super::replies::Batch;
use super::request::PendingAppend;
use super::writer::Writer;
use super::{AppendError, Dropped, Overflow, Source};
use crate::{NewMessage, StoreError, Totals};

impl Writer {
    /// A new message: a bridge's redelivery of what it queued before gets
    /// the id of the first copy; any other goes behind the messages
    /// waiting for room, in order, when it would wait too (a class with
    /// another policy goes ahead).
    pub(super) fn accept(&mut self, p: PendingAppend, b: &mut Batch) -> Result<(), StoreError> {
        if let Some(id) = self.queued_before(p.source.as_ref())? {
            b.known.push((p.reply, id));
            return Ok(());
        }
        if self.blocked.is_empty() || self.policy_of(&p.msg) != Overflow::Block {
            self.try_append(p, b)?;
        } else {
            self.blocked.push_back(p);
        }
        Ok(())
    }

    /// Admits the publishers waiting for room, in order, while the first
    /// of them fits.
    pub(super) fn admit_blocked(&mut self, b: &mut Batch) -> Result<(), StoreError> {
        while let Some(p) = self.blocked.pop_front() {
            let (_, freed, _) = self.replaced_by(&p.msg)?;
            if self.over_bounds(p.msg.size(), freed).is_some() {
                self.blocked.push_front(p);
                break;
            }
            self.try_append(p, b)?;
        }
        Ok(())
    }

    /// The id a bridged message got when it was queued before, if this is
    /// the source broker's redelivery of it (after a crash, before its
    /// acknowledgement left). Only a delivery marked as resent is looked
    /// up: the same content under a reused packet id is a new message.
    fn queued_before(&mut self, source: Option<&Source>) -> Result<Option<u64>, StoreError> {
        match source {
            Some(s) if s.resent => self.store.source_seen(&s.url, s.pid, s.digest),
            _ => Ok(None),
        }
    }

    /// Queues a message if it fits; when it does not, its class's
    /// overflow policy decides (the engine's [`admit`]): refuse it, let it
    /// wait, drop the class's oldest, or drop it.
    fn try_append(&mut self, p: PendingAppend, b: &mut Batch) -> Result<(), StoreError> {
        let size = p.msg.size();
        let deadline = p.msg.policy.expires_ms.is_some();
        // Keep-latest: the values this one replaces leave with its
        // insertion (and only then), which may be all the room it needs.
        let (replaced, replaces, replaces_own) = self.replaced_by(&p.msg)?;
        let overflow = self.policy_of(&p.msg);
        let candidate = Candidate { size, replaces, replaces_own, overflow };
        let (bounds, queued) = (self.bounds(), self.totals);
        let full = |bound: Limit| AppendError::Full { what: bound.to_string() };
        match admit(bounds, queued, candidate, || self.class_totals(deadline))? {
            Admission::Admit => self.supersede(&replaced, b)?,
            Admission::TooBigAlone(bound) => {
                let what = format!("the message alone is {size} bytes, over the bound of {bound}");
                let _ = p.reply.send(Err(AppendError::Full { what }));
                return Ok(());
            }
            Admission::Refuse(bound) => {
                let _ = p.reply.send(Err(full(bound)));
                return Ok(());
            }
            Admission::Wait => {
                self.blocked.push_back(p);
                return Ok(());
            }
            Admission::Evict(bound) => {
                self.supersede(&replaced, b)?;
                self.drop_oldest_for(size, deadline, b)?;
                if self.over_bounds(size, Totals::default()).is_some() {
                    return self.drop_new(p, bound, overflow, b);
                }
            }
            Admission::DropNew(bound) => return self.drop_new(p, bound, overflow, b),
        }
        self.insert(p, b)
    }

    /// The new message is dropped for lack of room: counted, announced,
    /// and the publisher told so.
    fn drop_new(&mut self, p: PendingAppend, bound: Limit, policy: Overflow, b: &mut Batch) -> Result<(), StoreError> {
        self.store.add_drop(DropReason::Overflow, None)?;
        b.drops.push(Dropped { id: 0, topic: p.msg.topic.clone(), reason: DropReason::Overflow });
        let what = bound.to_string();
        b.accepted.push((p.reply, Err(AppendError::Dropped { what, policy: policy.as_str() }), p.at));
        Ok(())
    }

    /// Queues an admitted message and counts it; it is accepted with the
    /// batch's commit.
    fn insert(&mut self, p: PendingAppend, b: &mut Batch) -> Result<(), StoreError> {
        let size = p.msg.size();
        let prio = p.msg.policy.priority.min(crate::MAX_PRIORITY) as usize;
        let expires_ms = p.msg.policy.expires_ms;
        let PendingAppend { msg, reply, delivery, handled, source, at } = p;
        let id = self.store.insert_shared(msg)?;
        if let Some(s) = &source {
            self.store.source_record(&s.url, s.pid, s.digest, id)?;
        }
        self.last_id = self.last_id.max(id);
        self.newest[prio] = self.newest[prio].max(id);
        if let Some(e) = expires_ms {
            self.sweeper.handle_deadline(e);
            if let Some(t) = &mut self.deadline_totals {
                t.count += 1;
                t.bytes += size;
            }
        }
        self.totals.count += 1;
        self.totals.bytes += size;
        // Accepted means on disk: the answer waits for the batch's sync.
        if accept_after_sync() {
            b.accepted.push((reply, Ok(id), at));
        } else {
            let _ = reply.send(Ok(id));
        }
        if let Some(d) = delivery {
            b.new_waiters.push((id, d));
        }
        if let Some(h) = handled {
            b.new_handled.push((id, h));
        }
        Ok(())
    }

    /// The outbox's bounds.
    fn bounds(&self) -> Bounds {
        Bounds { max_messages: self.config.max_messages, max_bytes: self.config.max_bytes }
    }

    /// The bound that `extra` more bytes would break once `freed` (count
    /// and bytes) left.
    fn over_bounds(&self, extra: u64, freed: Totals) -> Option<Limit> {
        self.bounds().broken_by(extra, self.totals, freed)
    }

    /// Keep-latest: the queued values `msg` would replace, the room they
    /// take, and the part of that room in `msg`'s own class.
    fn replaced_by(&mut self, msg: &NewMessage) -> Result<(Vec<u64>, Totals, Totals), StoreError> {
        let (mut room, mut own) = (Totals::default(), Totals::default());
        if !msg.policy.keep_latest {
            return Ok((Vec::new(), room, own));
        }
        let ids = self.store.superseded(&msg.topic, msg.route.as_deref())?;
        for id in &ids {
            if let Some(e) = self.store.entry(*id)? {
                room.count += 1;
                room.bytes += e.size;
                if e.expires_ms.is_some() == msg.policy.expires_ms.is_some() {
                    own.count += 1;
                    own.bytes += e.size;
                }
            }
        }
        Ok((ids, room, own))
    }

    /// The overflow policy of `msg`'s class.
    fn policy_of(&self, msg: &NewMessage) -> Overflow {
        match self.config.deadline_overflow {
            Some(o) if msg.policy.expires_ms.is_some() => o,
            _ => self.config.overflow,
        }
    }

    /// Count and bytes queued of one class (with a deadline or without),
    /// read once and then kept up to date.
    fn class_totals(&mut self, deadline: bool) -> Result<Totals, StoreError> {
        let d = match self.deadline_totals {
            Some(t) => t,
            None => {
                let t = self.store.deadline_totals()?;
                self.deadline_totals = Some(t);
                t
            }
        };
        Ok(if deadline {
            d
        } else {
            Totals {
                count: self.totals.count.saturating_sub(d.count),
                bytes: self.totals.bytes.saturating_sub(d.bytes),
            }
        })
    }

    fn supersede(&mut self, ids: &[u64], b: &mut Batch) -> Result<(), StoreError> {
        for id in ids {
            self.drop_one(*id, DropReason::Superseded, b)?;
        }
        Ok(())
    }

    /// Drops the oldest messages of the class (deadline or not) until
    /// `size` more bytes fit, or none of the class is left.
    fn drop_oldest_for(&mut self, size: u64, deadline: bool, b: &mut Batch) -> Result<(), StoreError> {
        while self.over_bounds(size, Totals::default()).is_some() {
            let oldest = self.store.oldest(64, Some(deadline))?;
            if oldest.is_empty() {
                break;
            }
            for (id, _) in oldest {
                if self.over_bounds(size, Totals::default()).is_none() {
                    break;
                }
                self.drop_one(id, DropReason::Overflow, b)?;
            }
        }
        Ok(())
    }
}
