//! What one batch collects while its transaction runs, and the replies
//! that go out after its commit (or, with the error, after its failure):
//! a caller never hears "accepted" before its message is on disk. Reads
//! are answered here too, from what is committed.

use steadfast_core::DropReason;
use tokio::sync::oneshot;

use super::request::{AcceptReply, HighReply, IdsReply, Request, SlotReply, WireReply};
use super::writer::{Writer, KEPT_BATCH};
use super::{AppendError, Configured, Delivery, Dropped, Glance, Handling, OutboxState, Page, Report};
use crate::StoreError;

/// Replies that may go out only after the commit.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) accepted: Vec<AcceptReply>,
    /// Redeliveries of what a bridge queued before: the id it got.
    pub(super) known: Vec<(oneshot::Sender<Result<u64, AppendError>>, u64)>,
    pub(super) new_waiters: Vec<(u64, oneshot::Sender<Delivery>)>,
    /// Dropped in this batch: their waiters are told after the commit (the
    /// drop itself is the news).
    pub(super) dropped_now: Vec<(u64, DropReason)>,
    /// Delivered in this batch: their waiters are told before the commit.
    pub(super) delivered_now: Vec<u64>,
    pub(super) new_handled: Vec<(u64, oneshot::Sender<Handling>)>,
    /// Delivered and now awaiting receipts: their delivery waiters are
    /// told, their handling waiters wait on.
    pub(super) awaiting: Vec<u64>,
    /// Handled: the consumers whose receipts completed them.
    pub(super) handled: Vec<(u64, Vec<String>)>,
    /// Messages delivered (a broker's first acknowledgement of what asks
    /// for receipts counts; its handling and resends do not again).
    pub(super) delivered: u64,
    /// Of each message delivered, its time from enqueue, in milliseconds.
    pub(super) delivery_ms: Vec<u64>,
    /// The wall clock as the batch first read it: one read per batch, not
    /// per message (a batch lasts well under a millisecond to a few).
    pub(super) wall_ms: Option<u64>,
    pub(super) wire_replies: Vec<(WireReply, Vec<u64>)>,
    pub(super) meta_replies: Vec<(oneshot::Sender<Result<String, StoreError>>, String)>,
    pub(super) slot_replies: Vec<(SlotReply, Configured)>,
    pub(super) inbox_replies: Vec<oneshot::Sender<Result<(), StoreError>>>,
    pub(super) high_replies: Vec<(HighReply, Vec<(String, u64)>)>,
    pub(super) unpoison_replies: Vec<(IdsReply, Vec<u64>)>,
    pub(super) reads: Vec<Request>,
    pub(super) drops: Vec<Dropped>,
    pub(super) close: bool,
}

impl Batch {
    /// The wall clock as the batch first read it (`wall_ms`), read now if
    /// not yet.
    pub(super) fn now_ms(&mut self) -> u64 {
        *self.wall_ms.get_or_insert_with(crate::now_ms)
    }

    /// This batch emptied for the next one, its vectors' room kept up to
    /// [`KEPT_BATCH`] each: a batch of acknowledgements grew a few of them
    /// again from nothing, each growth past a kilobyte a walk of the
    /// allocator's free lists; what a burst grew beyond that (a sweep of a
    /// million expired messages is one batch) is not kept for good.
    /// Every field is named, so that a new one cannot be carried over.
    fn recycled(self) -> Batch {
        fn empty<T>(mut v: Vec<T>) -> Vec<T> {
            v.clear();
            v.shrink_to(KEPT_BATCH);
            v
        }
        let Batch {
            accepted,
            known,
            new_waiters,
            dropped_now,
            delivered_now,
            new_handled,
            awaiting,
            handled,
            delivered: _,
            delivery_ms,
            wall_ms: _,
            wire_replies,
            meta_replies,
            slot_replies,
            inbox_replies,
            high_replies,
            unpoison_replies,
            reads,
            drops,
            close: _,
        } = self;
        Batch {
            accepted: empty(accepted),
            known: empty(known),
            new_waiters: empty(new_waiters),
            dropped_now: empty(dropped_now),
            delivered_now: empty(delivered_now),
            new_handled: empty(new_handled),
            awaiting: empty(awaiting),
            handled: empty(handled),
            delivered: 0,
            delivery_ms: empty(delivery_ms),
            wall_ms: None,
            wire_replies: empty(wire_replies),
            meta_replies: empty(meta_replies),
            slot_replies: empty(slot_replies),
            inbox_replies: empty(inbox_replies),
            high_replies: empty(high_replies),
            unpoison_replies: empty(unpoison_replies),
            reads: empty(reads),
            drops: empty(drops),
            close: false,
        }
    }
}

impl Writer {
    /// What the handles watch: the state as the writer knows it now.
    pub(super) fn publish_state(&self) {
        let state = OutboxState {
            last_id: self.last_id,
            totals: self.totals,
            newest: self.newest,
            held: self.held,
            poisoned: self.poisoned,
            requeued: self.requeued,
        };
        // The state first: whoever is told that the outbox emptied finds
        // it so.
        self.state.send_replace(state);
        self.publish_idle(&state);
    }

    /// Tells a change of [`OutboxState::is_idle`], and only a change.
    fn publish_idle(&self, state: &OutboxState) {
        let idle = state.is_idle();
        self.idle.send_if_modified(|was| std::mem::replace(was, idle) != idle);
    }

    /// Tells the waiters of what this batch delivered, before its commit:
    /// with the counts first, so that whoever learns of a delivery finds
    /// the message no longer counted as queued. The ids stay as last
    /// committed (a failed commit hands this batch's ids out again).
    pub(super) fn tell_delivered(&mut self, b: &mut Batch) {
        if b.delivered_now.is_empty() {
            return;
        }
        let (totals, held, poisoned, requeued) = (self.totals, self.held, self.poisoned, self.requeued);
        self.state.send_modify(|s| {
            s.totals = totals;
            s.held = held;
            s.poisoned = poisoned;
            s.requeued = requeued;
            self.publish_idle(s);
        });
        for id in b.delivered_now.drain(..) {
            if let Some(tx) = self.waiters.remove(&id) {
                let _ = tx.send(Delivery::Delivered);
            }
        }
    }

    /// Sends what waited for the commit; the batch comes back empty, for
    /// the next one.
    pub(super) fn after_commit(&mut self, mut b: Batch) -> Batch {
        // The state first: whoever learns that a message was accepted must
        // find it counted (a publisher that waits for an empty outbox right
        // after acceptance must not see the old, empty state).
        self.publish_state();
        let accepted = b.accepted.iter().filter(|(_, r, _)| r.is_ok()).count() as u64;
        metrics::counter!("steadfast_accepted_total").increment(accepted);
        metrics::counter!("steadfast_delivered_total").increment(b.delivered);
        for ms in &b.delivery_ms {
            self.timings.delivery.record(*ms as f64 / 1000.0);
        }
        for (reply, ids) in b.unpoison_replies.drain(..) {
            let _ = reply.send(Ok(ids));
        }
        // One reading of the clock for the batch, not one per message.
        let now = std::time::Instant::now();
        for (reply, r, at) in b.accepted.drain(..) {
            if r.is_ok() {
                self.timings.accept.record(now.saturating_duration_since(at).as_secs_f64());
            }
            let _ = reply.send(r);
        }
        for (reply, id) in b.known.drain(..) {
            let _ = reply.send(Ok(id));
        }
        for (id, tx) in b.new_waiters.drain(..) {
            self.waiters.insert(id, tx);
        }
        for (id, h) in b.new_handled.drain(..) {
            self.handled_waiters.insert(id, h);
        }
        for id in b.awaiting.drain(..) {
            if let Some(tx) = self.waiters.remove(&id) {
                let _ = tx.send(Delivery::Delivered);
            }
        }
        for (id, reason) in b.dropped_now.drain(..) {
            if let Some(tx) = self.waiters.remove(&id) {
                let _ = tx.send(Delivery::Dropped(reason));
            }
            if let Some(tx) = self.handled_waiters.remove(&id) {
                let _ = tx.send(Handling::Dropped(reason));
            }
        }
        for (id, by) in b.handled.drain(..) {
            if let Some(tx) = self.handled_waiters.remove(&id) {
                let _ = tx.send(Handling::Handled(by));
            }
        }
        self.prune_waiters();
        for (reply, refused) in b.wire_replies.drain(..) {
            let _ = reply.send(Ok(refused));
        }
        for (reply, v) in b.meta_replies.drain(..) {
            let _ = reply.send(Ok(v));
        }
        for (reply, v) in b.slot_replies.drain(..) {
            let _ = reply.send(Ok(v));
        }
        for reply in b.inbox_replies.drain(..) {
            let _ = reply.send(Ok(()));
        }
        for (reply, v) in b.high_replies.drain(..) {
            let _ = reply.send(Ok(v));
        }
        // One log line per reason and batch (a flood of overflow drops
        // must not flood the log); one event per message.
        for reason in DropReason::ALL {
            let mut of_reason = b.drops.iter().filter(|d| d.reason == reason);
            if let Some(first) = of_reason.next() {
                let count = 1 + of_reason.count();
                tracing::warn!(count, first_id = first.id, topic = %first.topic, %reason, "messages dropped from the outbox");
            }
        }
        for d in b.drops.drain(..) {
            let _ = self.dropped.send(d);
        }
        self.serve_reads(b.reads.drain(..));
        b.recycled()
    }

    pub(super) fn serve_reads(&mut self, reads: impl IntoIterator<Item = Request>) {
        for r in reads {
            match r {
                Request::Read { after, limit, slot, priority, reply } => {
                    let _ = reply.send(self.store.read_after(after, limit, slot, priority));
                }
                Request::Follow(f) => self.follows.push(f),
                Request::Query { reply } => {
                    let _ = reply.send(Report::read(self.store.as_mut()));
                }
                Request::Glance { reply } => {
                    let s = self.store.as_mut();
                    let glance = s.drops().and_then(|drops| {
                        Ok(Glance { drops, oldest_created_ms: s.oldest_created_ms()?, awaiting: s.awaiting()? })
                    });
                    let _ = reply.send(glance);
                }
                Request::Bound { slot, reply } => {
                    let _ = reply.send(self.store.bound(slot));
                }
                Request::InboxSeen { ids, reply } => {
                    let _ = reply.send(self.store.inbox_seen(&ids));
                }
                Request::Poisoned { reply } => {
                    let _ = reply.send(self.store.poisoned());
                }
                Request::GetMeta { key, reply } => {
                    let _ = reply.send(self.store.meta(&key));
                }
                _ => unreachable!("only reads are deferred"),
            }
        }
        self.answer_follows();
        self.drop_unreadable();
    }

    /// Answers the standing reads that can be answered now: those whose
    /// want picks something committed, and all of them once messages went
    /// back into the queue. The others wait; withdrawn ones go.
    pub(super) fn answer_follows(&mut self) {
        if self.follows.is_empty() {
            return;
        }
        for f in std::mem::take(&mut self.follows) {
            if f.reply.is_closed() {
                continue;
            }
            if f.requeued != self.requeued {
                let _ = f.reply.send(Ok(None));
                continue;
            }
            match f.want.pick(&self.newest) {
                Some((p, after)) => {
                    let page = self.store.read_page(after, f.limit, Some(f.slot), Some(p as u8));
                    let upto = self.newest[p];
                    let _ = f.reply.send(page.map(|messages| Some(Page { messages, priority: p, upto })));
                }
                None => self.follows.push(f),
            }
        }
    }

    /// Records the store could not decode are skipped by reads; they would
    /// sit in the outbox for ever, so they leave it, counted as `corrupt`.
    fn drop_unreadable(&mut self) {
        let bad = self.store.take_unreadable();
        if bad.is_empty() {
            return;
        }
        for (id, what) in &bad {
            tracing::error!(id, problem = %what, "outbox record cannot be read back; dropped as corrupt");
        }
        let mut b = Batch::default();
        // A drop is announced: it must not come back after a power cut.
        self.store.set_synced(true);
        let result = self.store.begin().and_then(|()| {
            for (id, _) in &bad {
                self.drop_one(*id, DropReason::Corrupt, &mut b)?;
            }
            self.store.commit()
        });
        match result {
            Ok(()) => {
                self.after_commit(b);
            }
            Err(e) => {
                self.store.rollback();
                tracing::error!(error = %e, "cannot drop unreadable records; they stay in the outbox");
            }
        }
    }

    fn prune_waiters(&mut self) {
        if self.waiters.len() > self.waiters_pruned_at {
            self.waiters.retain(|_, tx| !tx.is_closed());
            self.handled_waiters.retain(|_, tx| !tx.is_closed());
            self.waiters_pruned_at = (self.waiters.len() * 2).max(1024);
        }
    }

    pub(super) fn fail_batch(&mut self, requests: impl IntoIterator<Item = Request>, e: StoreError) -> bool {
        let mut b = Batch::default();
        for r in requests {
            match r {
                Request::Append { reply, at, .. } => b.accepted.push((reply, Ok(0), at)),
                Request::SetWire { reply, .. } => b.wire_replies.push((reply, Vec::new())),
                Request::Meta { reply, .. } => b.meta_replies.push((reply, String::new())),
                Request::Slots { reply, .. } => b.slot_replies.push((reply, Default::default())),
                Request::InboxRecord { reply, .. } | Request::Receipt { reply, .. } => b.inbox_replies.push(reply),
                Request::InboxBounds { reply, .. } => b.high_replies.push((reply, Vec::new())),
                Request::Unpoison { reply, .. } => b.unpoison_replies.push((reply, Vec::new())),
                Request::Close => b.close = true,
                r @ (Request::Read { .. }
                | Request::Follow(_)
                | Request::Query { .. }
                | Request::Glance { .. }
                | Request::Bound { .. }
                | Request::InboxSeen { .. }
                | Request::Poisoned { .. }
                | Request::GetMeta { .. }) => b.reads.push(r),
                Request::Poison { .. }
                | Request::Remove { .. }
                | Request::Ack { .. }
                | Request::Broker(_)
                | Request::Counter { .. }
                | Request::Attempt { .. }
                | Request::CountDrop { .. }
                | Request::SetMeta { .. } => {}
            }
        }
        let close = b.close;
        self.fail_replies(b, e);
        close
    }

    pub(super) fn fail_replies(&mut self, b: Batch, e: StoreError) {
        let again = StoreError::clone_for_reply;
        for (reply, _, _) in b.accepted {
            let _ = reply.send(Err(AppendError::Store(again(&e))));
        }
        for (reply, _) in b.known {
            let _ = reply.send(Err(AppendError::Store(again(&e))));
        }
        for (reply, _) in b.wire_replies {
            let _ = reply.send(Err(again(&e)));
        }
        for (reply, _) in b.meta_replies {
            let _ = reply.send(Err(again(&e)));
        }
        for (reply, _) in b.slot_replies {
            let _ = reply.send(Err(again(&e)));
        }
        for reply in b.inbox_replies {
            let _ = reply.send(Err(again(&e)));
        }
        for (reply, _) in b.high_replies {
            let _ = reply.send(Err(again(&e)));
        }
        for (reply, _) in b.unpoison_replies {
            let _ = reply.send(Err(again(&e)));
        }
        self.serve_reads(b.reads);
    }
}
