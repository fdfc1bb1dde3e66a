//! The writer thread. It takes every request that queued up while it was
//! busy (up to [`MAX_BATCH`]), applies them in one transaction and syncs
//! once; the replies go out after the commit ([`super::replies`]). Reads
//! that no write precedes are answered at once, without waiting for a sync.

use std::collections::VecDeque;
use std::sync::mpsc;

// Keyed by outbox ids, looked up for every message delivered: foldhash,
// not SipHash (docs/design.md, "Dependencies").
use foldhash::{HashMap, HashMapExt};

use steadfast_core::engine::{quorum_met, Now, Sweep, SweepConfig, Sweeper};
use steadfast_core::{DropReason, Stage};
use tokio::sync::{broadcast, oneshot, watch};

use super::replies::Batch;
use super::request::{Follow, PendingAppend, Request};
use super::{
    held_count, held_for, AppendError, Configured, DefaultSet, Delivery, Dropped, Handling, InboxBounds, OutboxConfig,
    OutboxState, Quorum, HELD_PREFIX,
};
use crate::{PoisonCause, Store, StoreError, Totals, PRIORITIES};

/// The single owner of the store, behind the [`super::Outbox`] handles.
pub(super) struct Writer {
    pub(super) store: Box<dyn Store>,
    pub(super) config: OutboxConfig,
    pub(super) totals: Totals,
    pub(super) state: watch::Sender<OutboxState>,
    /// Whether nothing this run may send is queued ([`OutboxState::is_idle`]): told
    /// only when that changes, so that a wait for it is not woken at
    /// every batch (as a watch of `state` is).
    pub(super) idle: watch::Sender<bool>,
    pub(super) dropped: broadcast::Sender<Dropped>,
    pub(super) waiters: HashMap<u64, oneshot::Sender<Delivery>>,
    /// Who waits for a message to be handled (receipts).
    pub(super) handled_waiters: HashMap<u64, oneshot::Sender<Handling>>,
    /// Messages that went back into the queue for lack of receipts.
    pub(super) requeued: u64,
    /// The outbox's count of messages published again for lack of
    /// receipts (`RECEIPTS_REPUBLISHED`) as this writer last knew it: a
    /// rise it did not make is another process's requeue.
    pub(super) republished: u64,
    pub(super) waiters_pruned_at: usize,
    pub(super) last_id: u64,
    pub(super) newest: [u64; PRIORITIES],
    /// When the sweeps are due (the earliest deadline queued, the age
    /// bound, the catch-up windows) and what each removes.
    pub(super) sweeper: Sweeper,
    /// Count and bytes of queued deadline messages, once needed.
    pub(super) deadline_totals: Option<Totals>,
    /// Queued messages held for another broker set than this run's.
    pub(super) held: u64,
    /// Queued messages moved aside as poison.
    pub(super) poisoned: u64,
    /// Removals undone by a failed commit, applied again with the next batch.
    pub(super) pending_removes: Vec<Request>,
    pub(super) blocked: VecDeque<PendingAppend>,
    /// Links' standing reads, answered after the commit that gives them
    /// something to read.
    pub(super) follows: Vec<Follow>,
    /// The last batch's replies, emptied, room kept for the next
    /// ([`Batch::recycled`]).
    pub(super) spare: Batch,
    pub(super) quorums: Vec<Quorum>,
    /// Fanout: the members (slot bits) that refused a queued message for
    /// good while the others could still meet its quorum. In memory: after
    /// a restart those members are sent it again and refuse it again.
    pub(super) refused_by: HashMap<u64, u64>,
    pub(super) inbox_bounds: Option<InboxBounds>,
    pub(super) pruned_at: std::time::Instant,
    /// Identities in the inbox (an over-estimate between prunes).
    pub(super) inbox_len: u64,
    /// Their bytes (an over-estimate between prunes).
    pub(super) inbox_bytes: u64,
    /// The store's data version when last looked at: it changes when
    /// another process commits to the same outbox.
    pub(super) data_version: u64,
    pub(super) followed_at: std::time::Instant,
    /// Another process made room: a batch admits who waits for it.
    pub(super) admit_due: bool,
    /// When the last synced commit ended: acknowledgements go unsynced
    /// for at most [`UNSYNCED_AT_MOST`] after it.
    pub(super) synced_at: std::time::Instant,
    /// The last commit went without a sync: an idle writer syncs within
    /// [`IDLE_SYNC`].
    pub(super) unsynced: bool,
    /// Commits went without a sync since the last synced one succeeded
    /// (an idle sync that failed leaves it set): a synced batch that
    /// changes nothing writes a mark, so that its sync covers them.
    pub(super) sync_owed: bool,
    /// A transaction of bookkeeping left open for the batches after it.
    pub(super) open: Option<Open>,
    /// Held acknowledgements whose commit failed are tried again from
    /// then on ([`Writer::write_held_acks`]).
    pub(super) held_acks_retry: Option<std::time::Instant>,
    pub(super) timings: Timings,
}

/// A transaction that only bookkeeping and brokers' acknowledgements went
/// into, left open for the batches that follow (docs/design.md, "The
/// writer thread"): at a high rate, a broker's acknowledgements come a few
/// at a time, and a commit for each few rewrote the same pages of the log
/// (its frames, locks and wake-ups were most of the process's system
/// time). It is committed, without a sync as it would have been, after
/// [`HOLD_OPEN`] or [`HOLD_BATCHES`] batches, or before any batch that is
/// not bookkeeping. Nothing waits for it: deliveries are told before a
/// commit, and a crash takes back what it holds as it would take back an
/// acknowledgement still in the channel (its message is sent again).
pub(super) struct Open {
    since: std::time::Instant,
    /// The totals before its first batch, for a failed commit.
    before: Totals,
    /// The removals it applied: a failed commit applies them again.
    removes: Vec<Request>,
    batches: u32,
}

/// The histograms of a message's way through the outbox (README,
/// "Metrics"), registered when the writer starts: a recorder installed
/// later does not see them.
pub(super) struct Timings {
    /// From the append to the commit that accepted it (its sync included,
    /// and any wait for room under the `block` overflow policy).
    pub(super) accept: metrics::Histogram,
    /// From the message's creation (enqueue) to the acknowledgement that
    /// delivered it.
    pub(super) delivery: metrics::Histogram,
}

impl Timings {
    fn new() -> Timings {
        Timings {
            accept: metrics::histogram!("steadfast_accept_seconds"),
            delivery: metrics::histogram!("steadfast_delivery_seconds"),
        }
    }
}

/// The most requests one batch takes.
const MAX_BATCH: usize = 8192;

/// Requests the batch buffer keeps room for between batches.
pub(super) const KEPT_BATCH: usize = 1024;
/// The longest a transaction of bookkeeping is left open for more.
const HOLD_OPEN: std::time::Duration = std::time::Duration::from_millis(1);
/// The most batches a transaction of bookkeeping is left open for.
const HOLD_BATCHES: u32 = 64;
/// The longest stretch of commits without a sync: what a power cut can
/// take back of brokers' acknowledgements (their messages are sent again).
const UNSYNCED_AT_MOST: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a writer with unsynced commits waits for more work before it
/// syncs them.
const IDLE_SYNC: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the writer looks for commits of another process on the same
/// outbox (a `pub` that joined it, or, seen from that `pub`, the holder).
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// How often the sweeps run while there is anything to sweep.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Writer {
    /// A writer over `store`, and the watch of the state it starts from.
    pub(super) fn new(
        mut store: Box<dyn Store>,
        config: OutboxConfig,
        dropped: broadcast::Sender<Dropped>,
    ) -> Result<(Writer, watch::Receiver<OutboxState>, watch::Receiver<bool>), StoreError> {
        let totals = store.totals()?;
        let last_id = store.newest_id()?.unwrap_or(0);
        let mut newest = [0; PRIORITIES];
        for (p, id) in store.newest_by_priority()? {
            newest[p as usize] = id;
        }
        let mut sweeper =
            Sweeper::new(SweepConfig { every: SWEEP_EVERY, max_age_ms: config.max_age_ms }, std::time::Instant::now());
        sweeper.handle_next_expiry(store.next_expiry()?);
        sweeper.handle_next_receipt(store.awaiting()?.next_due_ms);
        sweeper.handle_queued(totals.count > 0);
        let poisoned = store.poisoned()?.len() as u64;
        let data_version = store.data_version()?;
        let republished = republished_of(store.as_mut())?;
        let first = OutboxState { last_id, totals, newest, held: 0, poisoned, requeued: 0 };
        let (idle_tx, idle) = watch::channel(first.is_idle());
        let (state_tx, state) = watch::channel(first);
        let writer = Writer {
            store,
            config,
            totals,
            state: state_tx,
            idle: idle_tx,
            dropped,
            waiters: HashMap::new(),
            handled_waiters: HashMap::new(),
            requeued: 0,
            republished,
            waiters_pruned_at: 1024,
            last_id,
            newest,
            sweeper,
            held: 0,
            poisoned,
            deadline_totals: None,
            pending_removes: Vec::new(),
            blocked: VecDeque::new(),
            follows: Vec::new(),
            spare: Batch::default(),
            quorums: Vec::new(),
            refused_by: HashMap::new(),
            inbox_bounds: None,
            pruned_at: std::time::Instant::now(),
            inbox_len: 0,
            inbox_bytes: 0,
            data_version,
            followed_at: std::time::Instant::now(),
            admit_due: false,
            synced_at: std::time::Instant::now(),
            unsynced: false,
            sync_owed: false,
            open: None,
            held_acks_retry: None,
            timings: Timings::new(),
        };
        Ok((writer, state, idle))
    }

    pub(super) fn run(&mut self, rx: mpsc::Receiver<Request>) {
        // One buffer for every batch, drained by each: no batch grows a
        // new one from nothing.
        let mut requests: Vec<Request> = Vec::new();
        loop {
            // Removals that a failed commit undid are tried again, even
            // when nothing else comes: a delivered message must leave.
            self.sweeper.handle_queued(self.totals.count > 0);
            let wait = if self.pending_removes.is_empty() {
                self.sweeper.poll_timeout().map(|t| t.saturating_duration_since(std::time::Instant::now()))
            } else {
                Some(std::time::Duration::from_secs(1))
            };
            let wait = wait.map_or(FOLLOW_EVERY, |w| w.min(FOLLOW_EVERY));
            let wait = if self.unsynced { wait.min(IDLE_SYNC) } else { wait };
            let wait = match &self.open {
                Some(o) => wait.min(HOLD_OPEN.saturating_sub(o.since.elapsed())),
                None => wait,
            };
            let wait = match self.held_acks_due() {
                Some(at) => wait.min(at.saturating_duration_since(std::time::Instant::now())),
                None => wait,
            };
            let first = match rx.recv_timeout(wait) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.commit_open();
                    // What an idle sync that failed left owed is tried
                    // once more.
                    self.unsynced |= self.sync_owed;
                    self.sync_idle();
                    break;
                }
            };
            if first.is_none() {
                // Nothing more came: what was left open is committed (and
                // synced later, when the writer stays idle), and so are
                // the acknowledgements the store held once they are due.
                if self.open.is_some() {
                    self.commit_open();
                } else if self.held_acks_due().is_some_and(|at| at <= std::time::Instant::now()) {
                    self.write_held_acks();
                } else {
                    self.sync_idle();
                }
            }
            if self.followed_at.elapsed() >= FOLLOW_EVERY {
                self.followed_at = std::time::Instant::now();
                // Room another process made: who waits for it goes in.
                if self.follow_others() && !self.blocked.is_empty() {
                    self.admit_due = true;
                }
            }
            requests.extend(first);
            while requests.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            if self.apply(&mut requests) {
                break;
            }
            // What a burst grew is not kept for good.
            requests.shrink_to(KEPT_BATCH);
        }
        // Whatever still waits for room is not accepted.
        for p in self.blocked.drain(..) {
            let _ = p.reply.send(Err(AppendError::Store(StoreError::Closed)));
        }
    }

    /// Applies one batch in one transaction (and empties `requests`).
    /// Returns true on `Close`.
    fn apply(&mut self, requests: &mut Vec<Request>) -> bool {
        // A report (a status, a glance, a look at poison or metadata)
        // reads the summary and the counts, which are written at the
        // commit: it never sees a transaction left open, nor is its batch
        // left open.
        let reports = requests.iter().any(Request::reports);
        if reports {
            self.commit_open();
        }
        self.answer_leading_reads(requests);
        // `run` told the sweeper what is queued just before it waited.
        let sweep = self.sweeper.handle_timeout(Now { at: std::time::Instant::now(), wall_ms: crate::now_ms() });
        let admit = std::mem::take(&mut self.admit_due);
        if requests.is_empty() && self.pending_removes.is_empty() && sweep.is_none() && !admit {
            return false;
        }
        // Only bookkeeping (counters, broker states, attempts, metadata
        // nobody waits for, inbox records of what was acknowledged ahead)
        // and brokers' acknowledgements are committed
        // without a sync: once committed they survive a crash of the
        // process (left open, see `Open`, at most the last millisecond is
        // taken back), and a power loss takes back at most the last second
        // of them (counts, and removals whose messages are then sent
        // again). Everything a promise rests on is synced, and so is a
        // batch that may admit messages waiting for room (an
        // acknowledgement makes room), and one with removals to retry.
        let bookkeeping = !reports
            && self.pending_removes.is_empty()
            && sweep.is_none()
            && !admit
            && self.blocked.is_empty()
            && self.synced_at.elapsed() < UNSYNCED_AT_MOST
            && requests.iter().all(Request::is_bookkeeping);
        // A consumer's inbox record is told when its batch is done: it is
        // committed then, not left open (a failure of a later batch
        // joining it would undo what was reported recorded).
        let records = requests.iter().any(|r| matches!(r, Request::InboxRecord { .. }));
        // Only more bookkeeping, within the unsynced bound, joins a
        // transaction left open; before anything else it is committed, so
        // that the removals of a failed commit are retried in this batch
        // and the totals below are taken after its roll-back.
        if !bookkeeping {
            self.commit_open();
        }
        let retried = std::mem::take(&mut self.pending_removes);
        // This batch's removals, kept (not copied) as they are applied.
        let mut removes = Vec::new();
        let mut b = std::mem::take(&mut self.spare);
        let before = self.totals;
        if self.open.is_none() {
            self.store.set_synced(!bookkeeping);
            if let Err(e) = self.store.begin() {
                let others = self.keep_removals(retried, removes, requests.drain(..));
                return self.fail_batch(others, e);
            }
        }
        let mut rest = requests.drain(..);
        let result = self.apply_all(&retried, &mut rest, &mut removes, sweep, &mut b);
        // SQLite syncs nothing for a commit that changed nothing: after
        // unsynced commits, a synced batch that changed nothing (a
        // message refused, a read) writes a mark so that its sync puts
        // them on the disk too. One that changed something is synced
        // whole, the log with it: no mark (a page fewer per commit).
        let result = result.and_then(|()| {
            if !bookkeeping && self.sync_owed && !self.store.changed() {
                self.mark_synced()
            } else {
                Ok(())
            }
        });
        if result.is_ok() {
            self.tell_delivered(&mut b);
        }
        if bookkeeping && result.is_ok() && !records && self.holds_open() {
            let o = self.open.get_or_insert_with(|| Open {
                since: std::time::Instant::now(),
                before,
                removes: Vec::new(),
                batches: 0,
            });
            o.removes.append(&mut removes);
            o.batches += 1;
            let close = b.close;
            self.spare = self.after_commit(b);
            return close;
        }
        // What an open transaction held commits (or fails) with this batch.
        let (before, retried) = match self.open.take() {
            Some(mut o) => {
                o.removes.extend(retried);
                (o.before, o.removes)
            }
            None => (before, retried),
        };
        let result = result.and_then(|()| self.commit_timed());
        if result.is_ok() {
            self.unsynced = bookkeeping;
            self.sync_owed = bookkeeping;
            if !bookkeeping {
                self.synced_at = std::time::Instant::now();
            }
        }
        match result {
            Ok(()) => {
                let close = b.close;
                self.spare = self.after_commit(b);
                close
            }
            Err(e) => {
                self.roll_back(before, &e);
                // Acknowledged messages must still leave: their removals are
                // applied again with the next batch.
                let others = self.keep_removals(retried, removes, rest);
                let close = b.close;
                self.fail_replies(b, e.clone_for_reply());
                let rest_close = self.fail_batch(others, e);
                close || rest_close
            }
        }
    }

    /// Whether a batch of bookkeeping leaves its transaction open for more
    /// (see [`Open`]).
    fn holds_open(&self) -> bool {
        self.open.as_ref().is_none_or(|o| o.batches + 1 < HOLD_BATCHES && o.since.elapsed() < HOLD_OPEN)
    }

    /// When the writer commits the acknowledgements the store holds past
    /// its commits, if nothing else does first: when they are due, or a
    /// second after a commit of them failed.
    fn held_acks_due(&self) -> Option<std::time::Instant> {
        let due = self.store.acks_due_at()?;
        Some(self.held_acks_retry.map_or(due, |retry| due.max(retry)))
    }

    /// Commits the acknowledgements the store held past its commits, now
    /// due, without a sync (as the acknowledgements they are). A failure
    /// leaves them held (the store's rollback keeps what earlier commits
    /// held), tried again a second later.
    fn write_held_acks(&mut self) {
        self.store.set_synced(false);
        match self.store.begin().and_then(|()| self.store.commit()) {
            Ok(()) => {
                self.unsynced = true;
                self.sync_owed = true;
                self.held_acks_retry = None;
            }
            Err(e) => {
                self.store.rollback();
                self.held_acks_retry = Some(std::time::Instant::now() + std::time::Duration::from_secs(1));
                tracing::warn!(error = %e, "outbox: writing held acknowledgements failed; tried again in a second");
            }
        }
    }

    /// Commits the transaction left open, without a sync; a failed commit
    /// undoes it, and its removals are applied again with the next batch.
    fn commit_open(&mut self) {
        let Some(o) = self.open.take() else { return };
        match self.commit_timed() {
            Ok(()) => {
                self.unsynced = true;
                self.sync_owed = true;
            }
            Err(e) => {
                self.roll_back(o.before, &e);
                let pending = std::mem::take(&mut self.pending_removes);
                self.keep_removals(o.removes, pending, std::iter::empty());
            }
        }
    }

    /// The store's commit, its time recorded (`steadfast_disk_sync_seconds`).
    fn commit_timed(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let result = self.store.commit();
        metrics::histogram!("steadfast_disk_sync_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    /// Nothing came for a while after a commit without a sync: one small
    /// synced commit puts it on the disk (the log is synced whole), so that
    /// a power cut long after takes nothing back.
    fn sync_idle(&mut self) {
        if !self.unsynced {
            return;
        }
        self.store.set_synced(true);
        let r = self.store.begin().and_then(|()| self.mark_synced());
        match r.and_then(|()| self.store.commit()) {
            Ok(()) => {
                self.synced_at = std::time::Instant::now();
                self.sync_owed = false;
            }
            Err(e) => {
                self.store.rollback();
                // Not tried again every 0.1 s on a failing disk: the next
                // synced commit covers them (`sync_owed` stays set).
                tracing::warn!(error = %e, "outbox: syncing the last acknowledgements failed; the next synced commit covers them");
            }
        }
        self.unsynced = false;
    }

    /// Writes the time of this synced commit (`meta.synced_ms`), which
    /// nothing reads: a change, so that the commit is synced.
    fn mark_synced(&mut self) -> Result<(), StoreError> {
        self.store.set_meta("synced_ms", &crate::now_ms().to_string())
    }

    /// Reads that no write precedes in this batch see nothing new from
    /// it: answer them now instead of after the sync, so the driver's
    /// next page never waits for a disk flush. Standing reads are looked
    /// at here too: another process's commit, just read again by
    /// `follow_others`, may have given them something.
    fn answer_leading_reads(&mut self, requests: &mut Vec<Request>) {
        let first_write = requests.iter().position(|r| !r.is_read());
        self.serve_reads(requests.drain(..first_write.unwrap_or(requests.len())));
    }

    /// Everything one transaction does: the removals a failed commit
    /// undid, the requests in order (up to the first failure, which leaves
    /// the others in `rest`), the sweeps when due, and then whatever
    /// waits for room and fits now.
    /// The removals among them go to `removes` as they are applied.
    fn apply_all(
        &mut self,
        retried: &[Request],
        rest: &mut std::vec::Drain<'_, Request>,
        removes: &mut Vec<Request>,
        sweep: Option<Sweep>,
        b: &mut Batch,
    ) -> Result<(), StoreError> {
        for r in retried {
            self.apply_removal(r, b)?;
        }
        for r in rest.by_ref() {
            if r.is_removal() {
                // Kept before it is applied: a failure keeps it too.
                removes.push(r);
                self.apply_removal(removes.last().expect("just pushed"), b)?;
            } else {
                self.apply_one(r, b)?;
            }
        }
        if let Some(sweep) = sweep {
            self.sweep_lapsed(&sweep, b)?;
            self.sweep_expired(&sweep, b)?;
            self.sweep_receipts(&sweep)?;
        }
        self.admit_blocked(b)
    }

    /// After a failed batch: the removals it undid (those tried again,
    /// those applied, those not reached in `rest`) wait for the next
    /// batch, in order; the other requests of `rest` are returned.
    fn keep_removals(
        &mut self,
        retried: Vec<Request>,
        applied: Vec<Request>,
        rest: impl Iterator<Item = Request>,
    ) -> Vec<Request> {
        let mut kept = retried;
        kept.extend(applied);
        let others = rest
            .filter_map(|r| {
                if r.is_removal() {
                    kept.push(r);
                    None
                } else {
                    Some(r)
                }
            })
            .collect();
        self.pending_removes = kept;
        others
    }

    /// A removal or a broker's acknowledgement.
    fn apply_removal(&mut self, r: &Request, b: &mut Batch) -> Result<(), StoreError> {
        match r {
            Request::Remove { ids, outcome } => self.remove_all(ids, *outcome, b),
            Request::Ack { slot, ids } => self.ack_all(*slot, ids, b),
            _ => unreachable!("only removals and acknowledgements are applied as removals"),
        }
    }

    /// After a failed commit: the transaction is rolled back, and what
    /// this batch set in memory goes back to what is on disk.
    fn roll_back(&mut self, before: Totals, e: &StoreError) {
        self.store.rollback();
        self.totals = self.store.totals().unwrap_or(before);
        self.last_id = self.store.newest_id().ok().flatten().unwrap_or(0).max(self.state.borrow().last_id);
        // Ids of rolled-back messages are handed out again.
        self.newest = self.state.borrow().newest;
        self.deadline_totals = None;
        self.held = self.store.routes().map(|r| held_count(&r)).unwrap_or(self.held);
        self.poisoned = self.store.poisoned().map(|p| p.len() as u64).unwrap_or(self.poisoned);
        let next_expiry = self.store.next_expiry().ok().flatten().or(self.sweeper.next_expiry());
        self.sweeper.handle_next_expiry(next_expiry);
        if let Ok(a) = self.store.awaiting() {
            self.sweeper.handle_next_receipt(a.next_due_ms);
        }
        self.republished = republished_of(self.store.as_mut()).unwrap_or(self.republished);
        self.inbox_len = self.store.inbox_len().unwrap_or(self.inbox_len);
        self.inbox_bytes = self.store.inbox_bytes().unwrap_or(self.inbox_bytes);
        tracing::error!(error = %e, "outbox commit failed; nothing in this batch was accepted; removals will be retried");
        // The counts told before the commit (deliveries) are taken back.
        self.publish_state();
    }

    /// Applies one request inside the batch's transaction; what waits for
    /// the commit (replies, announcements, reads) goes into `b`.
    fn apply_one(&mut self, r: Request, b: &mut Batch) -> Result<(), StoreError> {
        match r {
            Request::Append { msg, reply, delivery, handled, source, at } => {
                self.accept(PendingAppend { msg, reply, delivery, handled, source, at }, b)?;
            }
            r @ (Request::Remove { .. } | Request::Ack { .. }) => self.apply_removal(&r, b)?,
            Request::SetWire { slot, updates, reply } => {
                let refused = self.set_wires(slot, updates, b)?;
                b.wire_replies.push((reply, refused));
            }
            Request::Slots { urls, quorums, set, reply } => {
                let configured = self.configure(&urls, quorums, &set)?;
                b.slot_replies.push((reply, configured));
            }
            Request::Broker(rec) => self.store.set_broker(&rec)?,
            Request::InboxRecord { runs, reply, .. } => {
                self.inbox_record(&runs)?;
                b.inbox_replies.push(reply);
                self.prune_inbox_if_due()?;
            }
            Request::InboxBounds { bounds, reply } => {
                let high = self.set_inbox_bounds(bounds)?;
                b.high_replies.push((reply, high));
            }
            Request::Counter { name, n } => self.store.add_counter(name, n)?,
            Request::Receipt { receipt, reply } => {
                self.apply_receipt(&receipt, b)?;
                b.inbox_replies.push(reply);
            }
            Request::Attempt { ids } => {
                for id in ids {
                    self.store.add_attempt(id)?;
                }
            }
            Request::Poison { slot, id, cause } => self.poison(slot, id, cause, b)?,
            Request::Unpoison { ids, delete, reply } => {
                let done = self.unpoison(ids, delete, b)?;
                b.unpoison_replies.push((reply, done));
            }
            Request::CountDrop { reason, topic } => {
                self.store.add_drop(reason, None)?;
                b.drops.push(Dropped { id: 0, topic, reason });
            }
            Request::SetMeta { key, value } => self.store.set_meta(&key, &value)?,
            Request::Meta { key, default, reply } => {
                let v = self.meta_or_init(&key, default)?;
                // Answered after the commit: a value handed out must be on disk.
                b.meta_replies.push((reply, v));
            }
            Request::Close => b.close = true,
            r @ (Request::Read { .. }
            | Request::Follow(_)
            | Request::Query { .. }
            | Request::Glance { .. }
            | Request::Bound { .. }
            | Request::InboxSeen { .. }
            | Request::Poisoned { .. }
            | Request::GetMeta { .. }) => b.reads.push(r),
        }
        Ok(())
    }

    /// Another process committed to this outbox: a `pub` that joined it
    /// added messages (the holder's senders must see them), or the holder
    /// delivered some that a joined `pub` waits for. What the writer keeps
    /// in memory is read again, and waiters whose messages left are told.
    /// True when it read anything again.
    fn follow_others(&mut self) -> bool {
        match self.store.data_version() {
            Ok(v) if v != self.data_version => {
                self.data_version = v;
                if let Err(e) = self.reload() {
                    tracing::warn!(error = %e, "cannot read what another process added to the outbox; trying again");
                    self.data_version = v.wrapping_sub(1);
                    return false;
                }
                true
            }
            _ => false,
        }
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        self.totals = self.store.totals()?;
        self.deadline_totals = None;
        self.last_id = self.last_id.max(self.store.newest_id()?.unwrap_or(0));
        for (p, id) in self.store.newest_by_priority()? {
            self.newest[p as usize] = self.newest[p as usize].max(id);
        }
        self.held = held_count(&self.store.routes()?);
        self.poisoned = self.store.poisoned()?.len() as u64;
        // Messages another process put back into the queue (a joined
        // `pub` whose sweep found their receipts late): this process's
        // links must read them again too.
        let republished = republished_of(self.store.as_mut())?;
        self.requeued += republished.saturating_sub(self.republished);
        self.republished = republished;
        self.sweeper.handle_next_expiry(self.store.next_expiry()?);
        self.sweeper.handle_next_receipt(self.store.awaiting()?.next_due_ms);
        let mut left = Vec::new();
        for &id in self.waiters.keys() {
            match self.store.entry(id)? {
                None => left.push((id, None)),
                Some(e) if e.done => left.push((id, None)),
                // Moved aside by the other process: kept, not delivered.
                Some(e) if e.route.as_deref() == Some(crate::POISON_ROUTE) => left.push((id, Some(DropReason::Poison))),
                Some(_) => {}
            }
        }
        for (id, poison) in left {
            let dropped = match poison {
                Some(r) => Some(r),
                None => self.store.dropped_as(id)?,
            };
            let outcome = dropped.map_or(Delivery::Delivered, Delivery::Dropped);
            if let Some(tx) = self.waiters.remove(&id) {
                let _ = tx.send(outcome);
            }
        }
        self.publish_state();
        Ok(())
    }

    /// Gives each broker URL its slot and takes the quorum of each route,
    /// its members' slots filled in from the URLs.
    fn configure(
        &mut self,
        urls: &[String],
        mut quorums: Vec<Quorum>,
        set: &DefaultSet,
    ) -> Result<Configured, StoreError> {
        // Members and quorums may change: refusals counted under the old
        // ones go (those members refuse again if they must).
        self.refused_by.clear();
        let slots = self.store.assign_slots(urls)?;
        // What `status` tells apart from brokers of earlier runs.
        self.store.set_meta("brokers", &urls.join(" "))?;
        for q in &mut quorums {
            for (slot, url) in &mut q.members {
                if let Some(i) = urls.iter().position(|u| u == url) {
                    *slot = slots[i];
                }
            }
        }
        self.sweeper.handle_routes(quorums.iter().any(|q| q.catch_up_ms.is_some()));
        self.quorums = quorums;
        let routes = self.keep_to_their_set(set)?;
        let held = routes.iter().filter_map(|(r, n)| Some((held_for(r.as_deref())?.to_owned(), *n))).collect();
        self.held = held_count(&routes);
        Ok(Configured { slots, queued: routes, held })
    }

    /// Records QoS 2 wire bindings on the broker in `slot`; returns the
    /// ids whose new binding was refused because the message already left.
    fn set_wires(
        &mut self,
        slot: u32,
        updates: Vec<(u64, Option<(u16, Stage)>)>,
        b: &mut Batch,
    ) -> Result<Vec<u64>, StoreError> {
        let mut refused = Vec::new();
        for (id, wire) in updates {
            // A new exchange for a message that already left would
            // bind a packet id to nothing: after a restart the id
            // would look free while the broker still holds it.
            if matches!(wire, Some((_, Stage::Published))) {
                let left = self.store.entry(id)?.is_none_or(|e| e.done);
                if left {
                    refused.push(id);
                    continue;
                }
            }
            self.store.set_wire(slot, id, wire)?;
            if wire.is_none() {
                self.settle(id, b)?;
            }
        }
        Ok(refused)
    }

    /// A message whose links kept failing, or that its broker refused for
    /// good, is moved aside as poison: counted (`poison`), its waiter told,
    /// kept on disk.
    fn poison(&mut self, slot: u32, id: u64, cause: PoisonCause, b: &mut Batch) -> Result<(), StoreError> {
        let Some(e) = self.store.entry(id)? else { return Ok(()) };
        let (mask, need, _) = self.rule(e.route.as_deref());
        if e.done || quorum_met(e.acks, mask, need) {
            // Delivered through other members already (or now, with what
            // they acknowledged meanwhile): this member's exchange of it,
            // if any, is void, and the message leaves as delivered.
            self.set_wires(slot, vec![(id, None)], b)?;
            return Ok(());
        }
        if let PoisonCause::Refused(code) = cause {
            if self.others_may_deliver(slot, id, &e) {
                tracing::warn!(id, code, "a member of the fanout refused a message for good; it stays queued for the members that may still meet its quorum");
                // Its packet id is free on that broker: the binding goes
                // (as poison's would), so that the row can leave once the
                // others deliver it.
                self.set_wires(slot, vec![(id, None)], b)?;
                return Ok(());
            }
        }
        let Some(topic) = self.store.topic(id)? else { return Ok(()) };
        if self.store.poison(id, slot, cause, crate::now_ms())? {
            self.store.add_drop(DropReason::Poison, None)?;
            self.poisoned += 1;
            b.dropped_now.push((id, DropReason::Poison));
            b.drops.push(Dropped { id, topic, reason: DropReason::Poison });
        }
        Ok(())
    }

    /// Whether the broker in `slot` refusing `e` (message `id`) for good
    /// leaves members of its fanout that can still meet its quorum (those
    /// that refused it are counted out; those that acknowledged it count).
    /// Failover and balance send a message to one member at a time: there,
    /// no.
    fn others_may_deliver(&mut self, slot: u32, id: u64, e: &crate::Entry) -> bool {
        let route = e.route.as_deref();
        let Some(q) = self.quorums.iter().find(|q| q.fanout && q.route.as_deref() == route) else { return false };
        let refused = self.refused_by.entry(id).or_default();
        *refused |= 1u64 << slot;
        let left = (q.mask() & !*refused).count_ones();
        // With a catch-up window one member's acknowledgement is enough in
        // the end (the others are counted as having missed it).
        let need = if q.catch_up_ms.is_some() { 1 } else { q.need.max(1) };
        if left >= need {
            return true;
        }
        self.refused_by.remove(&id);
        false
    }

    /// Poisoned messages (all, or those of `ids`) go back to the queue,
    /// or with `delete` leave the outbox (they were counted as `poison`
    /// when moved aside). Returns the ids handled.
    fn unpoison(&mut self, ids: Option<Vec<u64>>, delete: bool, b: &mut Batch) -> Result<Vec<u64>, StoreError> {
        let ids = match ids {
            Some(ids) => ids,
            None => self.store.poisoned()?.into_iter().map(|p| p.id).collect(),
        };
        let mut done = Vec::new();
        for id in ids {
            if !self.store.unpoison(id)? {
                continue;
            }
            self.poisoned = self.poisoned.saturating_sub(1);
            if delete {
                let Some(e) = self.store.entry(id)? else { continue };
                self.finish(id, &e, Delivery::Dropped(DropReason::Poison), b)?;
            } else if !self.quorums.is_empty() {
                // Acknowledgements it got while aside count now (in fanout,
                // from the members that took it): its quorum may be met.
                // Only with the quorums known (`steadfast poison` opens
                // the outbox without them): one acknowledgement is not a
                // quorum.
                self.settle(id, b)?;
            }
            self.refused_by.remove(&id);
            done.push(id);
        }
        Ok(done)
    }

    /// Messages stay with the broker set they were accepted for: when the
    /// default set changed since the last run, what was queued for the old
    /// one is held (kept, never sent to the new one) unless `retarget`
    /// says to send it to the new one; what was held for this set is its
    /// own again. Returns the queued messages per route, as they are now
    /// (read once, and again only when something moved: a full scan).
    fn keep_to_their_set(&mut self, set: &DefaultSet) -> Result<Vec<(Option<String>, u64)>, StoreError> {
        const KEY: &str = "default brokers";
        let routes = self.store.routes()?;
        let mut moved = false;
        let queued = |r: Option<&str>| routes.iter().any(|(q, _)| q.as_deref() == r);
        match self.store.meta(KEY)? {
            Some(old) if old != set.key && queued(None) && !set.retarget => {
                self.store.retag(None, Some(&format!("{HELD_PREFIX}{old}")))?;
                moved = true;
            }
            _ => {}
        }
        for (route, _) in &routes {
            match held_for(route.as_deref()) {
                Some(key) if set.retarget || key == set.key => {
                    self.store.retag(route.as_deref(), None)?;
                    moved = true;
                }
                _ => {}
            }
        }
        self.store.set_meta(KEY, &set.key)?;
        if moved {
            self.store.routes()
        } else {
            Ok(routes)
        }
    }

    /// The metadata value of `key`, set to `default` if absent.
    fn meta_or_init(&mut self, key: &str, default: String) -> Result<String, StoreError> {
        match self.store.meta(key)? {
            Some(v) => Ok(v),
            None => {
                self.store.set_meta(key, &default)?;
                Ok(default)
            }
        }
    }
}

/// The outbox's persistent count of messages published again for lack of
/// receipts.
fn republished_of(store: &mut dyn Store) -> Result<u64, StoreError> {
    Ok(store.counters()?.into_iter().find(|(k, _)| k == super::RECEIPTS_REPUBLISHED).map_or(0, |(_, v)| v))
}
