//! How a queued message leaves the outbox: delivered once its route's
//! quorum acknowledged it (its row kept while a broker holds a QoS 2
//! exchange of it), or dropped by its policy, counted by reason and
//! announced (G3); and the sweeps that find what outlived its deadline,
//! the age bound, or a fanout catch-up window.

use std::collections::HashMap;

use steadfast_core::engine::{quorum_met, Sweep};
use steadfast_core::receipt::Settle;
use steadfast_core::{ConsumerReceipt, DropReason, ReceiptRule};

use super::replies::Batch;
use super::writer::Writer;
use super::{held_for, Delivery, Dropped};
use crate::{Entry, StoreError};

/// Counter names of receipts in the store: identities counted towards a
/// rule, messages handled, messages published again for lack of one.
pub const RECEIPTS_COUNTED: &str = "receipts.counted";
/// See [`RECEIPTS_COUNTED`].
pub const RECEIPTS_HANDLED: &str = "receipts.handled";
/// See [`RECEIPTS_COUNTED`].
pub const RECEIPTS_REPUBLISHED: &str = "receipts.republished";

/// The acknowledgements a message of `route` needs under `quorums`, and
/// from which slots. Without routes (one broker), any acknowledgement will
/// do. A message held for another broker set is never complete here (a
/// QoS 2 exchange its old set left open may still close on a broker of
/// this run): its acknowledgements count once its set is back. Nor is
/// poison: in fanout a member that had it in flight may acknowledge it
/// after another refused it for good, and one acknowledgement must not
/// finish a message whose quorum was not met (it counts once requeued).
fn rule_of(quorums: &[super::Quorum], route: Option<&str>) -> (u64, u32, Option<u64>) {
    if held_for(route).is_some() || route == Some(crate::POISON_ROUTE) {
        return (0, u32::MAX, None);
    }
    match quorums.iter().find(|q| q.route.as_deref() == route) {
        Some(q) => (q.mask(), q.need.max(1), q.catch_up_ms),
        None => (u64::MAX, 1, None),
    }
}

impl Writer {
    /// Messages that reached their end, whatever acknowledged them, or
    /// that their policy dropped.
    pub(super) fn remove_all(&mut self, ids: &[u64], outcome: Delivery, b: &mut Batch) -> Result<(), StoreError> {
        for &id in ids {
            match outcome {
                Delivery::Delivered => drop(self.remove_one(id, outcome, b)?),
                Delivery::Dropped(reason) => self.drop_one(id, reason, b)?,
            }
        }
        Ok(())
    }

    /// The broker in `slot` acknowledged these (and closed its QoS 2
    /// exchanges of them).
    pub(super) fn ack_all(&mut self, slot: u32, ids: &[u64], b: &mut Batch) -> Result<(), StoreError> {
        // What this acknowledgement alone finishes (its quorum met, no
        // receipts asked for) the store removes at once: the common case
        // costs it no update of a row about to go, and a run of them one
        // read and one delete. The rest is settled as before.
        let quorums = &self.quorums;
        let mut finishes = |e: &Entry| {
            e.receipts.is_none() && e.awaiting_ms.is_none() && {
                let (mask, need, _) = rule_of(quorums, e.route.as_deref());
                quorum_met(e.acks, mask, need)
            }
        };
        // What now awaits receipts is written at the end, together: ids
        // ascending and distinct, each settled once.
        let mut waits = Vec::new();
        for (id, answer) in self.store.ack_or_remove_many(ids, slot, &mut finishes)? {
            match answer {
                Some((e, true)) => {
                    self.count_delivered(&e, b);
                    self.finished(id, &e, Delivery::Delivered, b);
                }
                Some((e, false)) => waits.extend(self.settle_entry(id, e, b)?.map(|due| (id, due))),
                None => {}
            }
        }
        self.await_all(&waits, b)
    }

    /// A message delivered (counted once: its receipts and resends do not
    /// count again): counted, and its time from enqueue to this
    /// acknowledgement kept for `steadfast_delivery_seconds` (recorded
    /// after the commit: a failed one applies the acknowledgement again).
    fn count_delivered(&self, e: &Entry, b: &mut Batch) {
        b.delivered += 1;
        let now = b.now_ms();
        b.delivery_ms.push(now.saturating_sub(e.created_ms));
    }

    /// [`rule_of`] this writer's quorums.
    pub(super) fn rule(&self, route: Option<&str>) -> (u64, u32, Option<u64>) {
        rule_of(&self.quorums, route)
    }

    /// After an acknowledgement or a closed QoS 2 exchange: a message whose
    /// quorum is complete is delivered; its row goes once no broker holds
    /// an exchange of it any more.
    pub(super) fn settle(&mut self, id: u64, b: &mut Batch) -> Result<(), StoreError> {
        let Some(e) = self.store.entry(id)? else { return Ok(()) };
        match self.settle_entry(id, e, b)? {
            Some(due) => self.await_all(&[(id, due)], b),
            None => Ok(()),
        }
    }

    /// [`Writer::settle`] with the message as it is now, but a wait for
    /// receipts it begins (until the time returned) left to the caller to
    /// write ([`Writer::await_all`]).
    fn settle_entry(&mut self, id: u64, e: Entry, b: &mut Batch) -> Result<Option<u64>, StoreError> {
        if e.done {
            if e.bindings == 0 {
                self.store.remove(id)?;
            }
            return Ok(None);
        }
        if e.awaiting_ms.is_some() {
            // Delivered before: a late acknowledgement changes nothing.
            return Ok(None);
        }
        let (mask, need, _) = self.rule(e.route.as_deref());
        if quorum_met(e.acks, mask, need) {
            return self.deliver(id, &e, need, b);
        }
        Ok(None)
    }

    /// Messages delivered that now wait for receipts, each until its time
    /// (`(id, due)`, ascending by id): written a run at a time, so that a
    /// window's worth costs a few statements, not one each. Every caller
    /// writes its waits before anything else reads those rows.
    fn await_all(&mut self, waits: &[(u64, u64)], b: &mut Batch) -> Result<(), StoreError> {
        if waits.is_empty() {
            return Ok(());
        }
        let now = b.now_ms();
        let mut ids = Vec::with_capacity(waits.len());
        for same in waits.chunk_by(|x, y| x.1 == y.1) {
            ids.clear();
            ids.extend(same.iter().map(|&(id, _)| id));
            self.store.await_receipts_many(&ids, same[0].1, now)?;
            self.sweeper.handle_awaiting(same[0].1);
        }
        b.awaiting.extend(waits.iter().map(|&(id, _)| id));
        Ok(())
    }

    /// The brokers a message's route needs have it (or, fanout catch-up,
    /// its window passed): it leaves delivered, or, when it asks for
    /// receipts, waits for them until the time returned, which the caller
    /// writes ([`Writer::await_all`]; unless receipts noted before its
    /// quorum already meet its rule).
    fn deliver(&mut self, id: u64, e: &Entry, need: u32, b: &mut Batch) -> Result<Option<u64>, StoreError> {
        let Some(rule) = e.receipts.as_deref().and_then(ReceiptRule::parse) else {
            self.count_delivered(e, b);
            return self.finish(id, e, Delivery::Delivered, b).map(|()| None);
        };
        // Receipts before the quorum are noted only when it needs several.
        let by = if need > 1 { self.store.receipts_of(id)? } else { Vec::new() };
        let now = b.now_ms();
        let first = e.acked_ms.is_none();
        match ReceiptRule::on_quorum(Some(&rule), by.len(), e.resends, now) {
            Settle::Delivered => {
                if first {
                    self.count_delivered(e, b);
                }
                self.finish(id, e, Delivery::Delivered, b).map(|()| None)
            }
            // Counted as delivered there (once).
            Settle::Handled => {
                self.handled(id, e, by, b);
                self.finish(id, e, Delivery::Delivered, b).map(|()| None)
            }
            Settle::Await { due_ms } => {
                if first {
                    self.count_delivered(e, b);
                }
                Ok(Some(due_ms))
            }
        }
    }

    /// A message's receipts met its rule: it is counted and announced as
    /// handled, and the caller makes it leave ([`Writer::finish`]).
    fn handled(&mut self, id: u64, e: &Entry, by: Vec<String>, b: &mut Batch) {
        if let Some(acked) = e.acked_ms {
            let now = b.now_ms();
            metrics::histogram!("steadfast_receipt_wait_seconds").record(now.saturating_sub(acked) as f64 / 1000.0);
        } else if e.awaiting_ms.is_none() {
            // Handled before its acknowledgement was recorded: delivered.
            self.count_delivered(e, b);
        }
        b.handled.push((id, by));
    }

    /// A receipt: each message it names that asks for receipts from its
    /// consumer counts it, and leaves, handled, once its rule is met. A
    /// receipt proves that a broker took the message; a route that needs
    /// several brokers' acknowledgements (fanout) keeps the receipt noted
    /// until they came, so that no broker of the set misses the message.
    /// Only rows that exist and ask for receipts are visited, whatever
    /// ranges the receipt names.
    pub(super) fn apply_receipt(&mut self, receipt: &ConsumerReceipt, b: &mut Batch) -> Result<(), StoreError> {
        const PAGE: usize = 4096;
        let (mut counted, mut handled) = (0u64, 0u64);
        for &(first, last) in &receipt.ranges {
            let mut from = first.max(1);
            let last = last.min(self.last_id);
            while from <= last {
                // Read at once, then settled one by one (settling one
                // changes no other row), and what they handled leaves
                // together before the next page is read.
                let page = self.store.entries_asking_between(from, last, PAGE)?;
                let next = match page.last() {
                    Some(&(id, _)) if page.len() == PAGE && id < last => Some(id + 1),
                    _ => None,
                };
                let mut leaving = Vec::new();
                for &(id, ref e) in &page {
                    let Some(rule) = e.receipts.as_deref().and_then(ReceiptRule::parse) else { continue };
                    if e.done || !rule.accepts(&receipt.by) {
                        continue;
                    }
                    counted += 1;
                    let (mask, need, _) = self.rule(e.route.as_deref());
                    let quorum = quorum_met(e.acks, mask, need);
                    let by = if rule.needed() == 1 && need <= 1 {
                        vec![receipt.by.clone()]
                    } else {
                        self.store.add_receipt(id, &receipt.by)?
                    };
                    if rule.completes(by.len(), e.awaiting_ms.is_some(), need, quorum) {
                        self.handled(id, e, by, b);
                        leaving.push((id, e));
                        handled += 1;
                    }
                }
                self.finish_many(&leaving, Delivery::Delivered, b)?;
                let Some(next) = next else { break };
                from = next;
            }
        }
        self.store.add_counter(RECEIPTS_COUNTED, counted)?;
        self.store.add_counter(RECEIPTS_HANDLED, handled)?;
        metrics::counter!("steadfast_receipts_received_total").increment(counted);
        metrics::counter!("steadfast_handled_total").increment(handled);
        Ok(())
    }

    /// Messages whose wait for receipts ended go back into the queue, to
    /// be published again under the same identity (the consumers' inboxes
    /// remove the copy of what did arrive); senders read again.
    pub(super) fn sweep_receipts(&mut self, sweep: &Sweep) -> Result<(), StoreError> {
        let Some(now) = sweep.receipts_at else { return Ok(()) };
        let mut requeued = 0u64;
        loop {
            let ids = self.store.receipts_due(now, 4096)?;
            for id in &ids {
                self.store.requeue_for_receipts(*id)?;
            }
            requeued += ids.len() as u64;
            if ids.len() < 4096 {
                break;
            }
        }
        self.sweeper.handle_next_receipt(self.store.awaiting()?.next_due_ms);
        if requeued > 0 {
            self.store.add_counter(RECEIPTS_REPUBLISHED, requeued)?;
            self.republished += requeued;
            metrics::counter!("steadfast_republished_total").increment(requeued);
            tracing::warn!(messages = requeued, "no receipt came in time: published again under the same identity");
            self.requeued += requeued;
        }
        Ok(())
    }

    /// A queued message reached its end. While a broker holds a QoS 2
    /// exchange of it (even one dropped by its policy), the row stays, so
    /// that its packet id is not reused after a restart.
    pub(super) fn finish(&mut self, id: u64, e: &Entry, outcome: Delivery, b: &mut Batch) -> Result<(), StoreError> {
        self.finish_many(&[(id, e)], outcome, b)
    }

    /// [`Writer::finish`] of several messages, ascending by id: those
    /// bound to no packet id are removed together.
    fn finish_many(&mut self, rows: &[(u64, &Entry)], outcome: Delivery, b: &mut Batch) -> Result<(), StoreError> {
        let mut bound = false;
        for &(id, e) in rows {
            // Receipts noted before a fanout quorum (a rule that needs
            // several keeps its own, removed with the row).
            if e.receipts.is_some() && self.rule(e.route.as_deref()).1 > 1 {
                self.store.clear_receipts(id)?;
            }
            if e.bindings != 0 {
                self.store.set_done(id)?;
                bound = true;
            }
        }
        // Every caller read them just before, in this batch.
        if bound {
            let free: Vec<(u64, &Entry)> = rows.iter().filter(|(_, e)| e.bindings == 0).copied().collect();
            self.store.remove_many_as_read(&free)?;
        } else {
            self.store.remove_many_as_read(rows)?;
        }
        for &(id, e) in rows {
            self.finished(id, e, outcome, b);
        }
        Ok(())
    }

    /// The counts and the batch's news after a message left the queue
    /// (removed, or kept as done for its open QoS 2 exchanges).
    fn finished(&mut self, id: u64, e: &Entry, outcome: Delivery, b: &mut Batch) {
        match self.totals.count.checked_sub(1) {
            Some(n) => self.totals.count = n,
            // A message a joined `pub` added, delivered before this writer
            // read the counts again (every 200 ms): its next look reads
            // them from the store (its summary row is kept in the same
            // commits as the rows). Found under load: the count wrapped.
            None => self.data_version = self.data_version.wrapping_sub(1),
        }
        if !self.refused_by.is_empty() {
            self.refused_by.remove(&id);
        }
        self.totals.bytes = self.totals.bytes.saturating_sub(e.size);
        if held_for(e.route.as_deref()).is_some() {
            self.held = self.held.saturating_sub(1);
        }
        if e.route.as_deref() == Some(crate::POISON_ROUTE) {
            // Poison that left another way (its deadline passed): no
            // longer kept aside.
            self.poisoned = self.poisoned.saturating_sub(1);
        }
        if let Some(t) = self.deadline_totals.as_mut().filter(|_| e.expires_ms.is_some()) {
            t.count = t.count.saturating_sub(1);
            t.bytes = t.bytes.saturating_sub(e.size);
        }
        match outcome {
            // The brokers' acknowledgement is the delivery: its waiter is
            // told once the batch is applied, before its commit and sync,
            // which only spare a resend after a crash (docs/design.md,
            // "Delivered is told at the acknowledgement").
            Delivery::Delivered => b.delivered_now.push(id),
            Delivery::Dropped(reason) => b.dropped_now.push((id, reason)),
        }
    }

    /// Removes a message that reached its end; false if it was gone already.
    fn remove_one(&mut self, id: u64, outcome: Delivery, b: &mut Batch) -> Result<bool, StoreError> {
        match self.store.entry(id)? {
            Some(e) if e.done => {
                self.store.remove(id)?;
                Ok(false)
            }
            Some(e) => {
                if outcome == Delivery::Delivered {
                    self.count_delivered(&e, b);
                }
                self.finish(id, &e, outcome, b)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Drops a message undelivered: counted by reason and announced (G3).
    pub(super) fn drop_one(&mut self, id: u64, reason: DropReason, b: &mut Batch) -> Result<(), StoreError> {
        let Some(e) = self.store.entry(id)? else { return Ok(()) };
        if e.done {
            return Ok(());
        }
        let topic = self.store.topic(id)?.unwrap_or_default();
        self.finish(id, &e, Delivery::Dropped(reason), b)?;
        self.store.add_drop(reason, Some(id))?;
        b.drops.push(Dropped { id, topic, reason });
        Ok(())
    }

    /// Deadlines and the age bound: what outlived them leaves, counted as
    /// `expired` (G3). The sweeper says when and from which cutoffs; a
    /// sender also checks the deadline before each send, so nothing goes
    /// out after it.
    pub(super) fn sweep_expired(&mut self, sweep: &Sweep, b: &mut Batch) -> Result<(), StoreError> {
        const PAGE: usize = 4096;
        if let Some(cutoff) = sweep.deadlines_at {
            loop {
                let ids = self.store.expired(cutoff, PAGE)?;
                for id in &ids {
                    self.drop_one(*id, DropReason::Expired, b)?;
                }
                if ids.len() < PAGE {
                    break;
                }
            }
            self.sweeper.handle_next_expiry(self.store.next_expiry()?);
        }
        if let Some(cutoff) = sweep.created_before {
            'pages: while self.store.oldest_created_ms()?.is_some_and(|c| c < cutoff) {
                for (id, _) in self.store.oldest(PAGE, None)? {
                    match self.store.entry(id)? {
                        Some(e) if e.created_ms < cutoff => self.drop_one(id, DropReason::Expired, b)?,
                        _ => break 'pages,
                    }
                }
            }
        }
        Ok(())
    }

    /// Fanout catch-up: a message older than its route's window that some
    /// member acknowledged leaves the outbox; each member that had not is
    /// counted as having missed it, so a long-dead broker cannot pin the
    /// backlog for ever.
    pub(super) fn sweep_lapsed(&mut self, sweep: &Sweep, b: &mut Batch) -> Result<(), StoreError> {
        for q in self.quorums.clone() {
            let Some((window, cutoff)) = q.catch_up_ms.and_then(|w| Some((w, sweep.catch_up_cutoff(w)?))) else {
                continue;
            };
            let mask = q.mask();
            let mut missed: HashMap<&str, u64> = HashMap::new();
            let mut waits = Vec::new();
            for (id, acks) in self.store.lapsed(q.route.as_deref(), mask, cutoff, 4096)? {
                for (slot, url) in &q.members {
                    if acks & (1 << slot) == 0 {
                        *missed.entry(url.as_str()).or_default() += 1;
                    }
                }
                if let Some(e) = self.store.entry(id)? {
                    waits.extend(self.deliver(id, &e, q.need.max(1), b)?.map(|due| (id, due)));
                }
            }
            self.await_all(&waits, b)?;
            for (url, n) in missed {
                self.store.add_missed(url, n)?;
                tracing::warn!(broker = url, missed = n, catch_up_ms = window, "a broker was down longer than its catch-up window; these messages were delivered to the others and counted as missed by it");
            }
        }
        Ok(())
    }
}
