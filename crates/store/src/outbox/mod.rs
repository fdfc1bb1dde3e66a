//! The outbox: a handle, cheap to clone, over a single writer thread that
//! does group commit.
//!
//! Every request goes through one channel to one thread. The thread takes
//! everything that queued up while it was busy, applies it in one
//! transaction and syncs once: a thousand concurrent publishes cost one
//! fsync, not a thousand. Replies go out only after the commit, so
//! "accepted" always means "on disk". Requests are applied in the order they
//! were sent, which the client relies on: a removal sent before a read is
//! seen by that read.
//!
//! This file holds the handle ([`Outbox`]) and the types it hands out. The
//! rest, by role:
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | bounds, overflow policy, quorums, inbox bounds |
//! | `report.rs` | what `steadfast status` and metrics read |
//! | `request.rs` | the requests from the handle to the writer |
//! | `writer.rs` | the writer thread: batches, one transaction each |
//! | `replies.rs` | what a batch collects, answered after its commit |
//! | `policy.rs` | admission: bounds, overflow, keep-latest, waiting for room |
//! | `departure.rs` | how messages leave: quorum, QoS 2 bindings, expiry |
//! | `inbox.rs` | a consumer's inbox: recording, pruning to its bounds |

mod config;
mod departure;
mod inbox;
mod policy;
mod replies;
mod report;
mod request;
mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use steadfast_core::{DropReason, Stage};
use tokio::sync::{broadcast, oneshot, watch};

pub use config::{InboxBounds, OutboxConfig, Overflow, Quorum, UnknownOverflow};
pub use departure::{RECEIPTS_COUNTED, RECEIPTS_HANDLED, RECEIPTS_REPUBLISHED};
pub use report::{BrokerLag, Glance, Report};
use request::Request;
use writer::Writer;

use crate::{BrokerRecord, NewMessage, PoisonCause, Store, StoreError, StoredMessage, Totals, PRIORITIES};

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
    /// The outbox is full and the overflow policy is `drop-newest` (or
    /// `drop-oldest` found nothing of the message's class to drop): the
    /// message was not accepted, and is counted as dropped (`overflow`).
    #[error("the outbox is full ({what}); the message was dropped (policy {policy}) and counted as `overflow`")]
    Dropped {
        /// Which bound was hit.
        what: String,
        /// The overflow policy that chose it.
        policy: &'static str,
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

/// How a message that asks for receipts reached its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handling {
    /// Its consumers handled it: these sent the receipts that completed
    /// it.
    Handled(Vec<String>),
    /// It was dropped by its own policy before that (G3).
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
    /// The highest id committed so far of each priority (0 to
    /// [`crate::MAX_PRIORITY`]): a sender reads each priority on its own.
    pub newest: [u64; PRIORITIES],
    /// Queued messages held for another broker set (counted in `totals`;
    /// this run never sends them).
    pub held: u64,
    /// Queued messages moved aside as poison (counted in `totals`; never
    /// sent until requeued).
    pub poisoned: u64,
    /// Messages that went back into the queue for lack of receipts, by
    /// this process: when it goes up, senders read the outbox again from
    /// the oldest.
    pub requeued: u64,
}

impl OutboxState {
    /// Nothing this run may send is queued: everything accepted was
    /// delivered or dropped, or is held for another broker set, or is
    /// poison.
    pub fn is_idle(&self) -> bool {
        self.totals.count <= self.held + self.poisoned
    }
}

/// A page read for a broker link by [`Outbox::next_page`].
#[derive(Debug)]
pub struct Page {
    /// Queued messages of one priority the link's broker has not
    /// acknowledged, oldest first.
    pub messages: Vec<StoredMessage>,
    /// Their priority.
    pub priority: usize,
    /// The newest id of that priority committed when the page was read:
    /// an empty page means nothing is left unread up to there.
    pub upto: u64,
}

/// Resolves when the message is accepted (synced), with its id.
pub struct AcceptFuture {
    rx: oneshot::Receiver<Result<u64, AppendError>>,
}

impl AcceptFuture {
    /// A future already resolved with `r` (for what never enters the
    /// outbox, such as a best-effort message).
    pub fn ready(r: Result<u64, AppendError>) -> AcceptFuture {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(r);
        AcceptFuture { rx }
    }
}

impl Future for AcceptFuture {
    type Output = Result<u64, AppendError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| r.unwrap_or(Err(AppendError::Store(StoreError::Closed))))
    }
}

/// Where a bridged message came from: the delivery `pid` from the source
/// broker `url`, with a digest of its content; `resent` when the broker
/// marked it as a redelivery (DUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The source broker (shared by its deliveries).
    pub url: std::sync::Arc<str>,
    /// Its packet id there.
    pub pid: u16,
    /// A hash of what makes the delivery this message (topic, payload,
    /// QoS, retain, identity), stable across releases.
    pub digest: u64,
    /// The broker sent it as a redelivery.
    pub resent: bool,
}

/// What configuring the brokers found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configured {
    /// The slot of each broker URL, in the order given.
    pub slots: Vec<u32>,
    /// Queued messages per route (`None`: the default broker set; a held
    /// set's messages under its [`HELD_PREFIX`] route).
    pub queued: Vec<(Option<String>, u64)>,
    /// Queued messages accepted for another default broker set than this
    /// run's, per set (its key, as [`DefaultSet::key`] was then): held,
    /// never sent to this run's brokers.
    pub held: Vec<(String, u64)>,
}

/// The broker set the default route stands for in this run, and what to
/// do with messages accepted for another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DefaultSet {
    /// The set's identity: its broker URLs, sorted, space-separated.
    pub key: String,
    /// Send messages held for other sets to this one (the user said so).
    pub retarget: bool,
}

/// Route prefix of messages held for another default broker set; no route
/// the user names may start with `@`.
pub const HELD_PREFIX: &str = "@brokers ";

/// The set key a held route stands for.
pub fn held_for(route: Option<&str>) -> Option<&str> {
    route?.strip_prefix(HELD_PREFIX)
}

pub(super) fn held_count(routes: &[(Option<String>, u64)]) -> u64 {
    routes.iter().filter(|(r, _)| held_for(r.as_deref()).is_some()).map(|(_, n)| n).sum()
}

/// A handle to the outbox; cheap to clone. The writer thread ends when the
/// last handle is dropped or [`Outbox::close`] is called.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Request>,
    state: watch::Receiver<OutboxState>,
    idle: watch::Receiver<bool>,
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
    pub fn start(store: Box<dyn Store>, config: OutboxConfig) -> Result<Outbox, StoreError> {
        let (dropped, _) = broadcast::channel(1024);
        let (mut writer, state, idle) = Writer::new(store, config, dropped.clone())?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("steadfast-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Io { path: "<writer thread>".into(), source })?;
        let thread = Arc::new(Mutex::new(Some(thread)));
        Ok(Outbox { tx, state, idle, dropped, thread })
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
        self.send(Request::Append {
            msg: Arc::new(msg),
            reply,
            delivery,
            handled: None,
            source: None,
            at: std::time::Instant::now(),
        });
        (AcceptFuture { rx }, drx)
    }

    /// [`Outbox::append`] of a message that asks for receipts, tracked
    /// until it is delivered (first receiver) and handled (second).
    pub fn append_awaiting(
        &self,
        msg: NewMessage,
    ) -> (AcceptFuture, oneshot::Receiver<Delivery>, oneshot::Receiver<Handling>) {
        let (reply, rx) = oneshot::channel();
        let (delivery, drx) = oneshot::channel();
        let (handled, hrx) = oneshot::channel();
        self.send(Request::Append {
            msg: Arc::new(msg),
            reply,
            delivery: Some(delivery),
            handled: Some(handled),
            source: None,
            at: std::time::Instant::now(),
        });
        (AcceptFuture { rx }, drx, hrx)
    }

    /// Applies a receipt from a consumer: each message it names that asks
    /// for receipts from that consumer counts it, and those whose rule is
    /// met are handled and leave. Resolves after the commit.
    /// The request leaves at once: several receipts handed over before
    /// any is awaited share one commit.
    pub fn receipt(
        &self,
        receipt: steadfast_core::ConsumerReceipt,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Receipt { receipt, reply });
        async move { rx.await.unwrap_or(Err(StoreError::Closed)) }
    }

    /// Bridge: queues a message that came from `source`, recording where
    /// it came from in the same transaction. A broker's redelivery of what
    /// was queued before a crash (its acknowledgement died with the
    /// process) is recognised in the same round trip: it resolves to the
    /// id the first copy got, and is not queued again. A first copy still
    /// waiting for room (overflow `block`) is not recorded yet, so its
    /// resend is not recognised: a known gap (docs/design.md).
    pub fn append_from(&self, msg: NewMessage, source: Source) -> AcceptFuture {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Append {
            msg: Arc::new(msg),
            reply,
            delivery: None,
            handled: None,
            source: Some(source),
            at: std::time::Instant::now(),
        });
        AcceptFuture { rx }
    }

    /// Removes messages that reached their end, whatever acknowledged them
    /// (or dropped by their policy). Not awaited: a removal lost in a crash
    /// only means a resend (at-least-once), never a loss.
    pub fn remove(&self, ids: Vec<u64>, outcome: Delivery) {
        if !ids.is_empty() {
            self.send(Request::Remove { ids, outcome });
        }
    }

    /// The broker in `slot` acknowledged these (and closed its QoS 2
    /// exchanges of them). Each leaves the outbox once its route's quorum
    /// acknowledged it. Not awaited, like [`Outbox::remove`].
    pub fn ack(&self, slot: u32, ids: Vec<u64>) {
        if !ids.is_empty() {
            self.send(Request::Ack { slot, ids });
        }
    }

    /// Records QoS 2 wire bindings on the broker in `slot` durably;
    /// resolves after the sync with the ids whose new binding was refused
    /// because the message already left (another broker completed its
    /// quorum): those must not be sent, their packet ids stay free.
    pub async fn set_wire(&self, slot: u32, updates: Vec<(u64, Option<(u16, Stage)>)>) -> Result<Vec<u64>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::SetWire { slot, updates, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Up to `limit` queued messages with id above `after`, oldest first;
    /// with a slot, only those that broker has not acknowledged; with a
    /// priority, only those of that priority.
    pub async fn read_after(
        &self,
        after: u64,
        limit: usize,
        slot: Option<u32>,
        priority: Option<u8>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Read { after, limit, slot, priority, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// The next page a broker link wants (`want`, from its engine): read
    /// at once when the outbox holds something the want picks, else as
    /// soon as a commit gives it something, by the writer thread right
    /// after that commit (no wake-up of the link in between). `None` when
    /// messages went back into the queue since the link saw `requeued`:
    /// the link must read again from the oldest. A page holds `limit`'s
    /// count of messages at most, and ends at the message that reaches its
    /// bytes. Dropping the future withdraws the request.
    pub async fn next_page(
        &self,
        want: steadfast_core::engine::ReadWant,
        requeued: u64,
        limit: crate::ReadLimit,
        slot: u32,
    ) -> Result<Option<Page>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Follow(request::Follow { want, requeued, limit, slot, reply }));
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Counts one more send of each message against its retry budget.
    /// Not awaited: a count lost in a crash allows one more send.
    pub fn attempted(&self, ids: Vec<u64>) {
        if !ids.is_empty() {
            self.send(Request::Attempt { ids });
        }
    }

    /// Moves a message aside as poison, for `cause`, at the broker in
    /// `slot`. Not awaited.
    pub fn poison(&self, slot: u32, id: u64, cause: PoisonCause) {
        self.send(Request::Poison { slot, id, cause });
    }

    /// The messages moved aside as poison, oldest first.
    pub async fn poisoned(&self) -> Result<Vec<crate::Poisoned>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Poisoned { reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Puts poisoned messages (`None`: all) back in the queue, or with
    /// `delete` removes them (counted as `poison` when they were moved
    /// aside). Resolves after the commit with the ids handled.
    pub async fn unpoison(&self, ids: Option<Vec<u64>>, delete: bool) -> Result<Vec<u64>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Unpoison { ids, delete, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Clears QoS 2 bindings on the broker in `slot` (not awaited).
    pub fn unbind(&self, slot: u32, ids: Vec<u64>) {
        if !ids.is_empty() {
            let (reply, _) = oneshot::channel();
            self.send(Request::SetWire { slot, updates: ids.into_iter().map(|id| (id, None)).collect(), reply });
        }
    }

    /// Counts a message that never entered the outbox as dropped (a
    /// best-effort message with no broker up), and announces it.
    pub fn count_drop(&self, reason: DropReason, topic: String) {
        self.send(Request::CountDrop { reason, topic });
    }

    /// Every QoS 2 message bound to a packet id on the broker in `slot`,
    /// oldest first.
    pub async fn bound(&self, slot: u32) -> Result<Vec<StoredMessage>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Bound { slot, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Gives each broker URL its slot (kept across restarts) and sets the
    /// quorum of each route, whose `members` slots are filled in from the
    /// URLs. Call before any acknowledgement. Returns the slots, and the
    /// queued messages per route, for the caller to check that it knows
    /// every route.
    pub async fn configure(
        &self,
        urls: Vec<String>,
        quorums: Vec<Quorum>,
        set: DefaultSet,
    ) -> Result<Configured, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Slots { urls, quorums, set, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// The cheap part of a report, for metrics every second: drops by
    /// reason, and the creation time of the oldest queued message.
    pub async fn glance(&self) -> Result<Glance, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Glance { reply });
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

    /// Inbox: which of these identities were handled already. A read:
    /// answered without waiting for a sync when no write precedes it.
    pub async fn inbox_seen(&self, ids: Vec<(String, u64)>) -> Result<Vec<bool>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::InboxSeen { ids, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Inbox: records identities as handled; resolves once on disk (many
    /// calls share one sync).
    pub async fn inbox_record(&self, ids: Vec<(String, u64)>) -> Result<(), StoreError> {
        self.inbox_record_runs(crate::inbox_runs(&ids, |(p, s)| (p.as_str(), *s)), true).await
    }

    /// Inbox: records runs of identities as handled ([`crate::inbox_runs`]),
    /// synced or not. Without a sync of their own they are committed as
    /// the writer commits bookkeeping (docs/design.md, "The writer
    /// thread"), but at once (never left open for more): resolved, the
    /// record is committed and survives a crash of the process, and a
    /// power cut once a synced commit followed (the next synced record,
    /// any synced commit, or the writer's own within a second). For
    /// identities whose acknowledgement left ahead of their record and
    /// that nothing else waits for.
    /// A run with `first > last` holds no identity and is left out.
    pub async fn inbox_record_runs(&self, mut runs: Vec<crate::InboxRun>, synced: bool) -> Result<(), StoreError> {
        runs.retain(|(_, first, last)| first <= last);
        let (reply, rx) = oneshot::channel();
        self.send(Request::InboxRecord { runs, synced, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Inbox: keep identities at most this long, this many and this many
    /// bytes (checked once a minute while identities are recorded, and
    /// whenever the count or bytes are over). Returns the highest sequence
    /// number recorded per producer.
    pub async fn inbox_bounds(&self, bounds: InboxBounds) -> Result<Vec<(String, u64)>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::InboxBounds { bounds, reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// The metadata value of `key`, if set (a read: nothing is written).
    pub async fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::GetMeta { key: key.into(), reply });
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Sets a metadata value (committed with the next batch).
    pub fn set_meta(&self, key: &str, value: &str) {
        self.send(Request::SetMeta { key: key.into(), value: value.into() });
    }

    /// Adds to a named persistent counter (committed with the next batch).
    pub fn count(&self, name: &'static str, n: u64) {
        if n > 0 {
            self.send(Request::Counter { name, n });
        }
    }

    /// Watches the outbox state (last id, depth).
    pub fn watch(&self) -> watch::Receiver<OutboxState> {
        self.state.clone()
    }

    /// Waits until nothing this run may send is queued: everything
    /// accepted was delivered or dropped, or is held for other brokers, or
    /// is poison ([`OutboxState::is_idle`]). Woken when that changes, not at
    /// every batch of the writer, as a wait on [`Outbox::watch`] would be
    /// (a wake-up of the waiting thread every few messages, for nothing).
    /// Sees the appends whose acceptance was answered before the call.
    pub async fn wait_idle(&self) {
        let _ = self.watch_idle().wait_for(|idle| *idle).await;
    }

    /// Watches [`OutboxState::is_idle`]: it changes only when the outbox
    /// empties or fills (what [`Outbox::wait_idle`] waits on).
    pub fn watch_idle(&self) -> watch::Receiver<bool> {
        self.idle.clone()
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
