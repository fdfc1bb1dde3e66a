//! The outbox handle and its single writer thread (group commit).
//!
//! Every request goes through one channel to one thread. The thread takes
//! everything that queued up while it was busy, applies it in one
//! transaction and syncs once: a thousand concurrent publishes cost one
//! fsync, not a thousand. Replies go out only after the commit, so
//! "accepted" always means "on disk". Requests are applied in the order they
//! were sent, which the client relies on: a removal sent before a read is
//! seen by that read.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use steadfast_core::{DropReason, Stage};
use tokio::sync::{broadcast, oneshot, watch};

use crate::{BrokerRecord, NewMessage, Store, StoreError, StoredMessage, Totals};

/// What happens to a new message when the outbox is full (G7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// The publisher waits until there is room.
    #[default]
    Block,
    /// The new message is refused with an error.
    Reject,
    /// The oldest messages are dropped (counted as `overflow`) to make room.
    DropOldest,
}

/// Bounds of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxConfig {
    /// Most messages queued at once; `None` for no bound.
    pub max_messages: Option<u64>,
    /// Most bytes (topic + payload) queued at once; `None` for no bound.
    pub max_bytes: Option<u64>,
    /// What to do when a bound is reached.
    pub overflow: Overflow,
}

/// Why a message was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The outbox is full and the overflow policy is `reject`.
    #[error(
        "the outbox is full ({what}); the message was not accepted. Raise the bound or choose another overflow policy"
    )]
    Full {
        /// Which bound was hit.
        what: String,
    },
    /// The store failed; the message was not accepted.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a message left the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Acknowledged by the broker (or written, for QoS 0).
    Delivered,
    /// Dropped by its own policy, for this reason (G3).
    Dropped(DropReason),
}

/// A message dropped without delivery, as announced to listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Its outbox id (sequence number).
    pub id: u64,
    /// Its topic.
    pub topic: String,
    /// Why.
    pub reason: DropReason,
}

/// A snapshot of the outbox, updated after every commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxState {
    /// The highest id committed so far.
    pub last_id: u64,
    /// Count and bytes queued.
    pub totals: Totals,
}

/// Resolves when the message is accepted (synced), with its id.
pub struct AcceptFuture {
    rx: oneshot::Receiver<Result<u64, AppendError>>,
}

impl Future for AcceptFuture {
    type Output = Result<u64, AppendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(AppendError::Store(StoreError::Closed))))
    }
}

enum Request {
    Append {
        msg: NewMessage,
        reply: oneshot::Sender<Result<u64, AppendError>>,
        delivery: Option<oneshot::Sender<Delivery>>,
    },
    Remove {
        ids: Vec<u64>,
        outcome: Delivery,
    },
    SetWire {
        updates: Vec<(u64, Option<(u16, Stage)>)>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Read {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>,
    },
    Query {
        reply: oneshot::Sender<Result<Report, StoreError>>,
    },
    Bound {
        reply: oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>,
    },
    Broker(BrokerRecord),
    Meta {
        key: String,
        default: String,
        reply: oneshot::Sender<Result<String, StoreError>>,
    },
    Close,
}

/// Everything `steadfast status` shows about an outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Count and bytes queued.
    pub totals: Totals,
    /// Creation time of the oldest queued message (ms since the epoch).
    pub oldest_created_ms: Option<u64>,
    /// Drop counters by reason, since the outbox was created.
    pub drops: Vec<(DropReason, u64)>,
    /// Broker states recorded by the owner.
    pub brokers: Vec<BrokerRecord>,
}

impl Report {
    /// Reads a report straight from a store.
    pub fn read(store: &mut dyn Store) -> Result<Report, StoreError> {
        Ok(Report {
            totals: store.totals()?,
            oldest_created_ms: store.oldest_created_ms()?,
            drops: store.drops()?,
            brokers: store.brokers()?,
        })
    }
}

/// A handle to the outbox; cheap to clone. The writer thread ends when the
/// last handle is dropped or [`Outbox::close`] is called.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Request>,
    state: watch::Receiver<OutboxState>,
    dropped: broadcast::Sender<Dropped>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("state", &*self.state.borrow()).finish()
    }
}

impl Outbox {
    /// Starts the writer thread over `store`.
    pub fn start(mut store: Box<dyn Store>, config: OutboxConfig) -> Result<Outbox, StoreError> {
        let totals = store.totals()?;
        let last_id = store.newest_id()?.unwrap_or(0);
        let (tx, rx) = mpsc::channel();
        let (state_tx, state) = watch::channel(OutboxState { last_id, totals });
        let (dropped, _) = broadcast::channel(1024);
        let mut writer = Writer {
            store,
            config,
            totals,
            state: state_tx,
            dropped: dropped.clone(),
            waiters: HashMap::new(),
            waiters_pruned_at: 1024,
            last_id,
            pending_removes: Vec::new(),
            blocked: VecDeque::new(),
        };
        let thread = std::thread::Builder::new()
            .name("steadfast-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Io { path: "<writer thread>".into(), source })?;
        let thread = Arc::new(Mutex::new(Some(thread)));
        Ok(Outbox { tx, state, dropped, thread })
    }

    fn send(&self, r: Request) {
        // A send fails only when the writer thread is gone; every request
        // carries a reply channel whose sender is then dropped, so the
        // caller sees `StoreError::Closed`.
        let _ = self.tx.send(r);
    }

    /// Queues a message; the future resolves once it is on disk. With
    /// `track`, the returned receiver resolves when it leaves the outbox.
    pub fn append(&self, msg: NewMessage, track: bool) -> (AcceptFuture, Option<oneshot::Receiver<Delivery>>) {
        let (reply, rx) = oneshot::channel();
        let (delivery, drx) = if track {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        self.send(Request::Append { msg, reply, delivery });
        (AcceptFuture { rx }, drx)
    }

    /// Removes messages that reached their end. Not awaited: a removal lost
    /// in a crash only means a resend (at-least-once), never a loss.
    pub fn remove(&self, ids: Vec<u64>, outcome: Delivery) {
        if !ids.is_empty() {
            self.send(Request::Remove { ids, outcome });
        }
    }

    /// Records QoS 2 wire bindings durably; resolves after the sync.
    pub async fn set_wire(&self, updates: Vec<(u64, Option<(u16, Stage)>)>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::SetWire { updates, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Up to `limit` queued messages with id above `after`, oldest first.
    pub async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Read { after, limit, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Every QoS 2 message bound to a packet id, oldest first.
    pub async fn bound(&self) -> Result<Vec<StoredMessage>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Bound { reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Depth, age, drops and broker states.
    pub async fn report(&self) -> Result<Report, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Query { reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Records a broker's state for `steadfast status` (committed with the
    /// next batch).
    pub fn record_broker(&self, rec: BrokerRecord) {
        self.send(Request::Broker(rec));
    }

    /// The metadata value of `key`, set to `default` (durably) if absent.
    pub async fn meta_or_init(&self, key: &str, default: &str) -> Result<String, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Meta { key: key.into(), default: default.into(), reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Watches the outbox state (last id, depth).
    pub fn watch(&self) -> watch::Receiver<OutboxState> {
        self.state.clone()
    }

    /// The current state.
    pub fn state(&self) -> OutboxState {
        *self.state.borrow()
    }

    /// Subscribes to drop announcements.
    pub fn subscribe_drops(&self) -> broadcast::Receiver<Dropped> {
        self.dropped.subscribe()
    }

    /// Finishes what was sent so far, closes the store and waits for the
    /// writer thread. Blocking: call from a blocking context.
    pub fn close(&self) {
        self.send(Request::Close);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

struct PendingAppend {
    msg: NewMessage,
    reply: oneshot::Sender<Result<u64, AppendError>>,
    delivery: Option<oneshot::Sender<Delivery>>,
}

struct Writer {
    store: Box<dyn Store>,
    config: OutboxConfig,
    totals: Totals,
    state: watch::Sender<OutboxState>,
    dropped: broadcast::Sender<Dropped>,
    waiters: HashMap<u64, oneshot::Sender<Delivery>>,
    waiters_pruned_at: usize,
    last_id: u64,
    /// Removals undone by a failed commit, applied again with the next batch.
    pending_removes: Vec<(Vec<u64>, Delivery)>,
    blocked: VecDeque<PendingAppend>,
}

type AcceptReply = (oneshot::Sender<Result<u64, AppendError>>, Result<u64, AppendError>);

/// Replies that may go out only after the commit.
#[derive(Default)]
struct Batch {
    accepted: Vec<AcceptReply>,
    new_waiters: Vec<(u64, oneshot::Sender<Delivery>)>,
    resolved: Vec<(u64, Delivery)>,
    wire_replies: Vec<oneshot::Sender<Result<(), StoreError>>>,
    meta_replies: Vec<(oneshot::Sender<Result<String, StoreError>>, String)>,
    reads: Vec<Request>,
    drops: Vec<Dropped>,
    close: bool,
}

const MAX_BATCH: usize = 8192;

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        loop {
            // Removals that a failed commit undid are tried again, even
            // when nothing else comes: a delivered message must leave.
            let first = if self.pending_removes.is_empty() {
                match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut requests: Vec<Request> = first.into_iter().collect();
            while requests.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            if self.apply(requests) {
                break;
            }
        }
        // Whatever still waits for room is not accepted.
        for p in self.blocked.drain(..) {
            let _ = p.reply.send(Err(AppendError::Store(StoreError::Closed)));
        }
    }

    /// Applies one batch in one transaction. Returns true on `Close`.
    fn apply(&mut self, mut requests: Vec<Request>) -> bool {
        // Reads that no write precedes in this batch see nothing new from
        // it: answer them now instead of after the sync, so the driver's
        // next page never waits for a disk flush.
        let first_write = requests
            .iter()
            .position(|r| !matches!(r, Request::Read { .. } | Request::Query { .. } | Request::Bound { .. }));
        let early: Vec<Request> = requests.drain(..first_write.unwrap_or(requests.len())).collect();
        self.serve_reads(early);
        if requests.is_empty() && self.pending_removes.is_empty() {
            return false;
        }
        let retried = std::mem::take(&mut self.pending_removes);
        let removes: Vec<(Vec<u64>, Delivery)> = requests
            .iter()
            .filter_map(|r| match r {
                Request::Remove { ids, outcome } => Some((ids.clone(), *outcome)),
                _ => None,
            })
            .collect();
        let mut b = Batch::default();
        let before = self.totals;
        if let Err(e) = self.store.begin() {
            self.pending_removes = retried.into_iter().chain(removes).collect();
            return self.fail_batch(requests, e);
        }
        let mut result = Ok(());
        for (ids, outcome) in &retried {
            if result.is_ok() {
                result = self.apply_one(Request::Remove { ids: ids.clone(), outcome: *outcome }, &mut b);
            }
        }
        let mut rest = requests.into_iter();
        while result.is_ok() {
            let Some(r) = rest.next() else { break };
            result = self.apply_one(r, &mut b);
        }
        if result.is_ok() {
            result = self.admit_blocked(&mut b);
        }
        let result = result.and_then(|()| self.store.commit());
        match result {
            Ok(()) => {
                let close = b.close;
                self.after_commit(b);
                close
            }
            Err(e) => {
                self.store.rollback();
                self.totals = self.store.totals().unwrap_or(before);
                self.last_id = self.store.newest_id().ok().flatten().unwrap_or(0).max(self.state.borrow().last_id);
                tracing::error!(error = %e, "outbox commit failed; nothing in this batch was accepted; removals will be retried");
                // Acknowledged messages must still leave: their removals are
                // applied again with the next batch.
                self.pending_removes = retried.into_iter().chain(removes).collect();
                let close = b.close;
                self.fail_replies(b, e.clone_for_reply());
                let rest_close = self.fail_batch(rest.collect(), e);
                close || rest_close
            }
        }
    }

    fn apply_one(&mut self, r: Request, b: &mut Batch) -> Result<(), StoreError> {
        match r {
            Request::Append { msg, reply, delivery } => {
                let p = PendingAppend { msg, reply, delivery };
                if self.blocked.is_empty() {
                    self.try_append(p, b)?;
                } else {
                    self.blocked.push_back(p);
                }
            }
            Request::Remove { ids, outcome } => {
                for id in ids {
                    match outcome {
                        Delivery::Delivered => drop(self.remove_one(id, outcome, b)?),
                        Delivery::Dropped(reason) => self.drop_one(id, reason, b)?,
                    }
                }
            }
            Request::SetWire { updates, reply } => {
                for (id, wire) in updates {
                    self.store.set_wire(id, wire)?;
                }
                b.wire_replies.push(reply);
            }
            Request::Broker(rec) => self.store.set_broker(&rec)?,
            Request::Meta { key, default, reply } => {
                let v = match self.store.meta(&key)? {
                    Some(v) => v,
                    None => {
                        self.store.set_meta(&key, &default)?;
                        default
                    }
                };
                // Answered after the commit: a value handed out must be on disk.
                b.meta_replies.push((reply, v));
            }
            Request::Close => b.close = true,
            r @ (Request::Read { .. } | Request::Query { .. } | Request::Bound { .. }) => b.reads.push(r),
        }
        Ok(())
    }

    fn over_bounds(&self, extra: u64) -> Option<String> {
        let c = self.config;
        if let Some(max) = c.max_messages.filter(|m| self.totals.count + 1 > *m) {
            return Some(format!("{max} messages"));
        }
        if let Some(max) = c.max_bytes.filter(|m| self.totals.bytes + extra > *m) {
            return Some(format!("{max} bytes"));
        }
        None
    }

    fn try_append(&mut self, p: PendingAppend, b: &mut Batch) -> Result<(), StoreError> {
        let size = p.msg.size();
        if let Some(what) = self.over_bounds(size) {
            let alone_too_big = self.config.max_bytes.is_some_and(|m| size > m);
            match self.config.overflow {
                _ if alone_too_big => {
                    let what = format!("the message alone is {size} bytes, over the bound of {what}");
                    let _ = p.reply.send(Err(AppendError::Full { what }));
                    return Ok(());
                }
                Overflow::Reject => {
                    let _ = p.reply.send(Err(AppendError::Full { what }));
                    return Ok(());
                }
                Overflow::Block => {
                    self.blocked.push_back(p);
                    return Ok(());
                }
                Overflow::DropOldest => self.drop_oldest_for(size, b)?,
            }
        }
        let id = self.store.insert(&p.msg)?;
        self.last_id = self.last_id.max(id);
        self.totals.count += 1;
        self.totals.bytes += size;
        b.accepted.push((p.reply, Ok(id)));
        if let Some(d) = p.delivery {
            b.new_waiters.push((id, d));
        }
        Ok(())
    }

    fn drop_oldest_for(&mut self, size: u64, b: &mut Batch) -> Result<(), StoreError> {
        while self.over_bounds(size).is_some() && self.totals.count > 0 {
            for (id, _) in self.store.oldest(64)? {
                if self.over_bounds(size).is_none() {
                    break;
                }
                self.drop_one(id, DropReason::Overflow, b)?;
            }
        }
        Ok(())
    }

    /// Removes a message that reached its end; false if it was gone already.
    fn remove_one(&mut self, id: u64, outcome: Delivery, b: &mut Batch) -> Result<bool, StoreError> {
        let Some(size) = self.store.remove(id)? else { return Ok(false) };
        self.totals.count -= 1;
        self.totals.bytes = self.totals.bytes.saturating_sub(size);
        b.resolved.push((id, outcome));
        Ok(true)
    }

    /// Drops a message undelivered: counted by reason and announced (G3).
    fn drop_one(&mut self, id: u64, reason: DropReason, b: &mut Batch) -> Result<(), StoreError> {
        let topic = self.store.read_after(id.saturating_sub(1), 1)?.pop().filter(|m| m.id == id).map(|m| m.msg.topic);
        if self.remove_one(id, Delivery::Dropped(reason), b)? {
            self.store.add_drops(reason, 1)?;
            b.drops.push(Dropped { id, topic: topic.unwrap_or_default(), reason });
        }
        Ok(())
    }

    fn admit_blocked(&mut self, b: &mut Batch) -> Result<(), StoreError> {
        while let Some(p) = self.blocked.front() {
            if self.over_bounds(p.msg.size()).is_some() {
                break;
            }
            let p = self.blocked.pop_front().expect("front exists");
            self.try_append(p, b)?;
        }
        Ok(())
    }

    fn after_commit(&mut self, b: Batch) {
        // The state first: whoever learns that a message was accepted must
        // find it counted (a publisher that waits for an empty outbox right
        // after acceptance must not see the old, empty state).
        self.state.send_replace(OutboxState { last_id: self.last_id, totals: self.totals });
        for (reply, r) in b.accepted {
            let _ = reply.send(r);
        }
        for (id, tx) in b.new_waiters {
            self.waiters.insert(id, tx);
        }
        for (id, outcome) in b.resolved {
            if let Some(tx) = self.waiters.remove(&id) {
                let _ = tx.send(outcome);
            }
        }
        self.prune_waiters();
        for reply in b.wire_replies {
            let _ = reply.send(Ok(()));
        }
        for (reply, v) in b.meta_replies {
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
        for d in b.drops {
            let _ = self.dropped.send(d);
        }
        self.serve_reads(b.reads);
    }

    fn serve_reads(&mut self, reads: Vec<Request>) {
        for r in reads {
            match r {
                Request::Read { after, limit, reply } => {
                    let _ = reply.send(self.store.read_after(after, limit));
                }
                Request::Query { reply } => {
                    let _ = reply.send(Report::read(self.store.as_mut()));
                }
                Request::Bound { reply } => {
                    let _ = reply.send(self.store.bound());
                }
                _ => unreachable!("only reads are deferred"),
            }
        }
        self.drop_unreadable();
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
        let result = self.store.begin().and_then(|()| {
            for (id, _) in &bad {
                self.drop_one(*id, DropReason::Corrupt, &mut b)?;
            }
            self.store.commit()
        });
        match result {
            Ok(()) => self.after_commit(b),
            Err(e) => {
                self.store.rollback();
                tracing::error!(error = %e, "cannot drop unreadable records; they stay in the outbox");
            }
        }
    }

    fn prune_waiters(&mut self) {
        if self.waiters.len() > self.waiters_pruned_at {
            self.waiters.retain(|_, tx| !tx.is_closed());
            self.waiters_pruned_at = (self.waiters.len() * 2).max(1024);
        }
    }

    fn fail_batch(&mut self, requests: Vec<Request>, e: StoreError) -> bool {
        let mut b = Batch::default();
        for r in requests {
            match r {
                Request::Append { reply, .. } => b.accepted.push((reply, Ok(0))),
                Request::SetWire { reply, .. } => b.wire_replies.push(reply),
                Request::Meta { reply, .. } => b.meta_replies.push((reply, String::new())),
                Request::Close => b.close = true,
                r @ (Request::Read { .. } | Request::Query { .. } | Request::Bound { .. }) => b.reads.push(r),
                Request::Remove { .. } | Request::Broker(_) => {}
            }
        }
        let close = b.close;
        self.fail_replies(b, e);
        close
    }

    fn fail_replies(&mut self, b: Batch, e: StoreError) {
        let again = StoreError::clone_for_reply;
        for (reply, _) in b.accepted {
            let _ = reply.send(Err(AppendError::Store(again(&e))));
        }
        for reply in b.wire_replies {
            let _ = reply.send(Err(again(&e)));
        }
        for (reply, _) in b.meta_replies {
            let _ = reply.send(Err(again(&e)));
        }
        self.serve_reads(b.reads);
    }
}
