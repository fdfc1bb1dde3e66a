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

use crate::{BrokerRecord, Entry, NewMessage, Store, StoreError, StoredMessage, Totals, PRIORITIES};

/// What happens to a new message when the outbox is full (G7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// The publisher waits until there is room.
    #[default]
    Block,
    /// The new message is refused with an error.
    Reject,
    /// The oldest messages of the same class are dropped (counted as
    /// `overflow`) to make room; a class never evicts another's messages:
    /// with none of its own left, the new message is dropped instead.
    DropOldest,
    /// The new message is dropped (counted as `overflow`, announced) and
    /// the publisher told so; nothing queued is touched.
    DropNewest,
}

/// An overflow policy name that is none of [`Overflow::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("overflow policy `{0}` is unknown; use block, reject, drop-oldest or drop-newest")]
pub struct UnknownOverflow(pub String);

impl Overflow {
    /// Every policy, with its CLI name.
    pub const ALL: [(Overflow, &'static str); 4] = [
        (Overflow::Block, "block"),
        (Overflow::Reject, "reject"),
        (Overflow::DropOldest, "drop-oldest"),
        (Overflow::DropNewest, "drop-newest"),
    ];

    /// The policy for its CLI name; the error names the choices.
    pub fn parse(s: &str) -> Result<Overflow, UnknownOverflow> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(o, _)| *o).ok_or_else(|| UnknownOverflow(s.to_owned()))
    }

    /// Its CLI name.
    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(o, _)| *o == self).map_or("block", |(_, n)| n)
    }
}

/// Bounds of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxConfig {
    /// Most messages queued at once; `None` for no bound.
    pub max_messages: Option<u64>,
    /// Most bytes (topic + payload) queued at once; `None` for no bound.
    pub max_bytes: Option<u64>,
    /// Messages older than this many milliseconds leave, counted as
    /// `expired`; `None` for no bound.
    pub max_age_ms: Option<u64>,
    /// What to do when a bound is reached (persistent messages, and
    /// deadline ones unless `deadline_overflow` says otherwise).
    pub overflow: Overflow,
    /// The overflow policy of deadline messages, if not `overflow`.
    pub deadline_overflow: Option<Overflow>,
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

/// How many brokers must acknowledge the messages of one route before they
/// leave the outbox (fanout `ack = all | any | N`; 1 for failover and
/// balance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quorum {
    /// The route (`None`: the default broker set).
    pub route: Option<String>,
    /// Its brokers: slot and URL.
    pub members: Vec<(u32, String)>,
    /// Acknowledgements needed.
    pub need: u32,
    /// Fanout: once a message is this old and at least one member
    /// acknowledged it, it leaves; the members that had not are counted as
    /// having missed it.
    pub catch_up_ms: Option<u64>,
}

impl Quorum {
    fn mask(&self) -> u64 {
        self.members.iter().fold(0, |m, (s, _)| m | 1u64 << s)
    }
}

/// How far behind one broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLag {
    /// The broker URL.
    pub url: String,
    /// Queued messages it has not acknowledged.
    pub lag: u64,
    /// Messages it missed: its catch-up window passed first (persistent).
    pub missed: u64,
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

enum Request {
    Append {
        msg: NewMessage,
        reply: oneshot::Sender<Result<u64, AppendError>>,
        delivery: Option<oneshot::Sender<Delivery>>,
        source: Option<Source>,
    },
    Remove {
        ids: Vec<u64>,
        outcome: Delivery,
    },
    Ack {
        slot: u32,
        ids: Vec<u64>,
    },
    SetWire {
        slot: u32,
        updates: Vec<(u64, Option<(u16, Stage)>)>,
        reply: WireReply,
    },
    Attempt {
        ids: Vec<u64>,
    },
    CountDrop {
        reason: DropReason,
        topic: String,
    },
    Read {
        after: u64,
        limit: usize,
        slot: Option<u32>,
        priority: Option<u8>,
        reply: oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>,
    },
    Query {
        reply: oneshot::Sender<Result<Report, StoreError>>,
    },
    Glance {
        reply: oneshot::Sender<Result<Glance, StoreError>>,
    },
    Bound {
        slot: u32,
        reply: oneshot::Sender<Result<Vec<StoredMessage>, StoreError>>,
    },
    Slots {
        urls: Vec<String>,
        quorums: Vec<Quorum>,
        reply: SlotReply,
    },
    Broker(BrokerRecord),
    InboxSeen {
        ids: Vec<(String, u64)>,
        reply: oneshot::Sender<Result<Vec<bool>, StoreError>>,
    },
    InboxRecord {
        ids: Vec<(String, u64)>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    InboxBounds {
        bounds: InboxBounds,
        reply: HighReply,
    },
    Counter {
        name: &'static str,
        n: u64,
    },
    SetMeta {
        key: String,
        value: String,
    },
    Meta {
        key: String,
        default: String,
        reply: oneshot::Sender<Result<String, StoreError>>,
    },
    Close,
}

/// Bounds of a consumer's inbox (G7): the oldest identities are forgotten
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxBounds {
    /// Identities handled longer ago than this are forgotten.
    pub max_age_ms: u64,
    /// At most this many identities.
    pub max_count: u64,
    /// At most this many bytes ([`Store::inbox_bytes`]).
    pub max_bytes: Option<u64>,
}

/// The cheap part of a report: what metrics read every second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glance {
    /// Drop counters by reason.
    pub drops: Vec<(DropReason, u64)>,
    /// Creation time of the oldest queued message (ms since the epoch).
    pub oldest_created_ms: Option<u64>,
}

impl Request {
    /// A read: changes nothing, answered from what is committed.
    fn is_read(&self) -> bool {
        matches!(
            self,
            Request::Read { .. }
                | Request::Query { .. }
                | Request::Glance { .. }
                | Request::Bound { .. }
                | Request::InboxSeen { .. }
        )
    }
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
    /// Per broker that ever had a slot: lag and missed messages.
    pub lag: Vec<BrokerLag>,
    /// Queued messages per route (`None`: the default broker set).
    pub routes: Vec<(Option<String>, u64)>,
    /// Named counters (consumer: handled, duplicates, gaps...).
    pub counters: Vec<(String, u64)>,
    /// Identities the inbox remembers.
    pub inbox: u64,
    /// The producer id of this outbox's messages (`None` for an inbox).
    pub producer: Option<String>,
    /// The sequence number of the newest message ever accepted.
    pub last_id: u64,
}

impl Report {
    /// Reads a report straight from a store.
    pub fn read(store: &mut dyn Store) -> Result<Report, StoreError> {
        Ok(Report {
            totals: store.totals()?,
            oldest_created_ms: store.oldest_created_ms()?,
            drops: store.drops()?,
            brokers: store.brokers()?,
            lag: {
                let missed = store.missed()?;
                let mut lag = Vec::new();
                for (url, slot) in store.slots()? {
                    let m = missed.iter().find(|(u, _)| *u == url).map_or(0, |(_, n)| *n);
                    lag.push(BrokerLag { lag: store.lag(slot)?, missed: m, url });
                }
                lag
            },
            routes: store.routes()?,
            counters: store.counters()?,
            inbox: store.inbox_len()?,
            producer: store.meta("producer")?,
            last_id: store.last_id()?,
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
        let mut newest = [0; PRIORITIES];
        for (p, id) in store.newest_by_priority()? {
            newest[p as usize] = id;
        }
        let next_expiry = store.next_expiry()?;
        let (tx, rx) = mpsc::channel();
        let (state_tx, state) = watch::channel(OutboxState { last_id, totals, newest });
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
            newest,
            next_expiry,
            deadline_totals: None,
            pending_removes: Vec::new(),
            blocked: VecDeque::new(),
            quorums: Vec::new(),
            swept_at: std::time::Instant::now(),
            inbox_bounds: None,
            pruned_at: std::time::Instant::now(),
            inbox_len: 0,
            inbox_bytes: 0,
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
        self.send(Request::Append { msg, reply, delivery, source: None });
        (AcceptFuture { rx }, drx)
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
        self.send(Request::Append { msg, reply, delivery: None, source: Some(source) });
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

    /// Counts one more send of each message against its retry budget.
    /// Not awaited: a count lost in a crash allows one more send.
    pub fn attempted(&self, ids: Vec<u64>) {
        if !ids.is_empty() {
            self.send(Request::Attempt { ids });
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
    pub async fn configure(&self, urls: Vec<String>, quorums: Vec<Quorum>) -> Result<Configured, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Slots { urls, quorums, reply });
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
        let (reply, rx) = oneshot::channel();
        self.send(Request::InboxRecord { ids, reply });
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
    source: Option<Source>,
}

/// Where a bridged message came from: the delivery `pid` from the source
/// broker `url`, with a digest of its content; `resent` when the broker
/// marked it as a redelivery (DUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The source broker.
    pub url: String,
    /// Its packet id there.
    pub pid: u16,
    /// A hash of what makes the delivery this message (topic, payload,
    /// QoS, retain, identity), stable across releases.
    pub digest: u64,
    /// The broker sent it as a redelivery.
    pub resent: bool,
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
    newest: [u64; PRIORITIES],
    /// The earliest deadline queued (a sweep is due then).
    next_expiry: Option<u64>,
    /// Count and bytes of queued deadline messages, once needed.
    deadline_totals: Option<Totals>,
    /// Removals undone by a failed commit, applied again with the next batch.
    pending_removes: Vec<Request>,
    blocked: VecDeque<PendingAppend>,
    quorums: Vec<Quorum>,
    swept_at: std::time::Instant,
    inbox_bounds: Option<InboxBounds>,
    pruned_at: std::time::Instant,
    /// Identities in the inbox (an over-estimate between prunes).
    inbox_len: u64,
    /// Their bytes (an over-estimate between prunes).
    inbox_bytes: u64,
}

type HighReply = oneshot::Sender<Result<Vec<(String, u64)>, StoreError>>;
type WireReply = oneshot::Sender<Result<Vec<u64>, StoreError>>;
type SlotReply = oneshot::Sender<Result<Configured, StoreError>>;
/// What configuring the brokers found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configured {
    /// The slot of each broker URL, in the order given.
    pub slots: Vec<u32>,
    /// Queued messages per route (`None`: the default broker set).
    pub queued: Vec<(Option<String>, u64)>,
}
type AcceptReply = (oneshot::Sender<Result<u64, AppendError>>, Result<u64, AppendError>);

/// Replies that may go out only after the commit.
#[derive(Default)]
struct Batch {
    accepted: Vec<AcceptReply>,
    /// Redeliveries of what a bridge queued before: the id it got.
    known: Vec<(oneshot::Sender<Result<u64, AppendError>>, u64)>,
    new_waiters: Vec<(u64, oneshot::Sender<Delivery>)>,
    resolved: Vec<(u64, Delivery)>,
    wire_replies: Vec<(WireReply, Vec<u64>)>,
    meta_replies: Vec<(oneshot::Sender<Result<String, StoreError>>, String)>,
    slot_replies: Vec<(SlotReply, Configured)>,
    inbox_replies: Vec<oneshot::Sender<Result<(), StoreError>>>,
    high_replies: Vec<(HighReply, Vec<(String, u64)>)>,
    reads: Vec<Request>,
    drops: Vec<Dropped>,
    close: bool,
}

const MAX_BATCH: usize = 8192;
/// How often the inbox is pruned by age.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the fanout catch-up windows are checked.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A copy of a removal or acknowledgement, kept to apply again when its
/// commit failed: an acknowledged message must still leave.
fn removal_copy(r: &Request) -> Option<Request> {
    match r {
        Request::Remove { ids, outcome } => Some(Request::Remove { ids: ids.clone(), outcome: *outcome }),
        Request::Ack { slot, ids } => Some(Request::Ack { slot: *slot, ids: ids.clone() }),
        _ => None,
    }
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        loop {
            // Removals that a failed commit undid are tried again, even
            // when nothing else comes: a delivered message must leave.
            let first = if self.pending_removes.is_empty() && !self.sweeps() {
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
        let first_write = requests.iter().position(|r| !r.is_read());
        let early: Vec<Request> = requests.drain(..first_write.unwrap_or(requests.len())).collect();
        self.serve_reads(early);
        let sweep = self.sweeps() && self.swept_at.elapsed() >= SWEEP_EVERY;
        if requests.is_empty() && self.pending_removes.is_empty() && !sweep {
            return false;
        }
        let retried = std::mem::take(&mut self.pending_removes);
        let removes: Vec<Request> = requests.iter().filter_map(removal_copy).collect();
        let mut b = Batch::default();
        let before = self.totals;
        // Only bookkeeping (counters, broker states, attempts, metadata
        // nobody waits for) is committed without a sync: it survives a
        // crash of the process, and at worst a power loss takes a few
        // counts back. Everything a promise rests on is synced.
        let bookkeeping = retried.is_empty()
            && !sweep
            && requests.iter().all(|r| {
                r.is_read()
                    || matches!(
                        r,
                        Request::Counter { .. }
                            | Request::Broker(_)
                            | Request::Attempt { .. }
                            | Request::SetMeta { .. }
                    )
            });
        self.store.set_synced(!bookkeeping);
        if let Err(e) = self.store.begin() {
            self.pending_removes = retried.into_iter().chain(removes).collect();
            return self.fail_batch(requests, e);
        }
        let mut result = Ok(());
        for r in &retried {
            if result.is_ok() {
                result = self.apply_one(removal_copy(r).expect("only removals are retried"), &mut b);
            }
        }
        let mut rest = requests.into_iter();
        while result.is_ok() {
            let Some(r) = rest.next() else { break };
            result = self.apply_one(r, &mut b);
        }
        if result.is_ok() && sweep {
            self.swept_at = std::time::Instant::now();
            result = self.sweep_lapsed(&mut b).and_then(|()| self.sweep_expired(&mut b));
        }
        if result.is_ok() {
            result = self.admit_blocked(&mut b);
        }
        let synced = std::time::Instant::now();
        let result = result.and_then(|()| self.store.commit());
        metrics::histogram!("steadfast_disk_sync_seconds").record(synced.elapsed().as_secs_f64());
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
                // What this batch set in memory goes back to what is on
                // disk: ids of rolled-back messages are handed out again.
                self.newest = self.state.borrow().newest;
                self.deadline_totals = None;
                self.next_expiry = self.store.next_expiry().ok().flatten().or(self.next_expiry);
                self.inbox_len = self.store.inbox_len().unwrap_or(self.inbox_len);
                self.inbox_bytes = self.store.inbox_bytes().unwrap_or(self.inbox_bytes);
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
            Request::Append { msg, reply, delivery, source } => {
                if let Some(id) = self.queued_before(source.as_ref())? {
                    b.known.push((reply, id));
                    return Ok(());
                }
                // Behind the messages waiting for room, in order, when it
                // would wait too; a class with another policy goes ahead.
                let p = PendingAppend { msg, reply, delivery, source };
                if self.blocked.is_empty() || self.policy_of(&p.msg) != Overflow::Block {
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
            Request::Ack { slot, ids } => {
                for id in ids {
                    self.store.ack(id, slot)?;
                    self.settle(id, b)?;
                }
            }
            Request::SetWire { slot, updates, reply } => {
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
                b.wire_replies.push((reply, refused));
            }
            Request::Slots { urls, mut quorums, reply } => {
                let slots = self.store.assign_slots(&urls)?;
                for q in &mut quorums {
                    for (slot, url) in &mut q.members {
                        if let Some(i) = urls.iter().position(|u| u == url) {
                            *slot = slots[i];
                        }
                    }
                }
                self.quorums = quorums;
                let routes = self.store.routes()?;
                b.slot_replies.push((reply, Configured { slots, queued: routes }));
            }
            Request::Broker(rec) => self.store.set_broker(&rec)?,
            Request::InboxRecord { ids, reply } => {
                self.store.inbox_record(&ids, crate::now_ms())?;
                self.inbox_len += ids.len() as u64;
                self.inbox_bytes += ids.iter().map(|(p, _)| p.len() as u64 + crate::INBOX_ENTRY_BYTES).sum::<u64>();
                b.inbox_replies.push(reply);
                if let Some(bounds) = self.inbox_bounds {
                    // Pruning scans the inbox: by age once a minute, by
                    // count or bytes when the (over-)estimate says so.
                    let by_age = self.pruned_at.elapsed() >= PRUNE_EVERY;
                    let over_bytes = bounds.max_bytes.is_some_and(|m| self.inbox_bytes > m);
                    if by_age || self.inbox_len > bounds.max_count || over_bytes {
                        self.pruned_at = std::time::Instant::now();
                        let cutoff = if by_age { crate::now_ms().saturating_sub(bounds.max_age_ms) } else { 0 };
                        // A byte bound becomes a count at the current mean
                        // size of an identity.
                        let mut keep = bounds.max_count;
                        if let Some(max) = bounds.max_bytes.filter(|_| self.inbox_len > 0) {
                            let mean = (self.inbox_bytes / self.inbox_len).max(1);
                            keep = keep.min(max / mean);
                        }
                        // Down to 90 %: the next prune by count is a while
                        // away (each one sorts the inbox).
                        self.store.inbox_prune(cutoff, keep - keep / 10)?;
                        self.inbox_len = self.store.inbox_len()?;
                        self.inbox_bytes = self.store.inbox_bytes()?;
                    }
                }
            }
            Request::InboxBounds { bounds, reply } => {
                self.inbox_bounds = Some(bounds);
                self.inbox_len = self.store.inbox_len()?;
                self.inbox_bytes = self.store.inbox_bytes()?;
                b.high_replies.push((reply, self.store.inbox_high()?));
            }
            Request::Counter { name, n } => self.store.add_counter(name, n)?,
            Request::Attempt { ids } => {
                for id in ids {
                    self.store.add_attempt(id)?;
                }
            }
            Request::CountDrop { reason, topic } => {
                self.store.add_drop(reason, None)?;
                b.drops.push(Dropped { id: 0, topic, reason });
            }
            Request::SetMeta { key, value } => self.store.set_meta(&key, &value)?,
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
            r @ (Request::Read { .. }
            | Request::Query { .. }
            | Request::Glance { .. }
            | Request::Bound { .. }
            | Request::InboxSeen { .. }) => b.reads.push(r),
        }
        Ok(())
    }

    /// The bound that `extra` more bytes would break once `freed` (count
    /// and bytes) left.
    fn over_bounds(&self, extra: u64, freed: Totals) -> Option<String> {
        let c = self.config;
        let count = self.totals.count.saturating_sub(freed.count);
        let bytes = self.totals.bytes.saturating_sub(freed.bytes);
        if let Some(max) = c.max_messages.filter(|m| count + 1 > *m) {
            return Some(format!("{max} messages"));
        }
        if let Some(max) = c.max_bytes.filter(|m| bytes + extra > *m) {
            return Some(format!("{max} bytes"));
        }
        None
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

    fn try_append(&mut self, p: PendingAppend, b: &mut Batch) -> Result<(), StoreError> {
        let size = p.msg.size();
        let deadline = p.msg.policy.expires_ms.is_some();
        // Keep-latest: the values this one replaces leave with its
        // insertion (and only then), which may be all the room it needs.
        let (replaced, freed, freed_own) = self.replaced_by(&p.msg)?;
        if let Some(what) = self.over_bounds(size, freed) {
            let alone_too_big = self.config.max_bytes.is_some_and(|m| size > m);
            let policy = self.policy_of(&p.msg);
            let evict = match policy {
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
                // Only when dropping its whole class could make room: never
                // two losses where one would do.
                Overflow::DropOldest => {
                    let class = self.class_totals(deadline)?;
                    let all = Totals {
                        count: class.count + freed.count - freed_own.count,
                        bytes: class.bytes + freed.bytes - freed_own.bytes,
                    };
                    self.over_bounds(size, all).is_none()
                }
                Overflow::DropNewest => false,
            };
            if evict {
                self.supersede(&replaced, b)?;
                self.drop_oldest_for(size, deadline, b)?;
            }
            if !evict || self.over_bounds(size, Totals::default()).is_some() {
                self.store.add_drop(DropReason::Overflow, None)?;
                b.drops.push(Dropped { id: 0, topic: p.msg.topic, reason: DropReason::Overflow });
                b.accepted.push((p.reply, Err(AppendError::Dropped { what, policy: policy.as_str() })));
                return Ok(());
            }
        } else {
            self.supersede(&replaced, b)?;
        }
        let id = self.store.insert(&p.msg)?;
        if let Some(s) = &p.source {
            self.store.source_record(&s.url, s.pid, s.digest, id)?;
        }
        self.last_id = self.last_id.max(id);
        let prio = p.msg.policy.priority.min(crate::MAX_PRIORITY) as usize;
        self.newest[prio] = self.newest[prio].max(id);
        if let Some(e) = p.msg.policy.expires_ms {
            self.next_expiry = Some(self.next_expiry.map_or(e, |n| n.min(e)));
            if let Some(t) = &mut self.deadline_totals {
                t.count += 1;
                t.bytes += size;
            }
        }
        self.totals.count += 1;
        self.totals.bytes += size;
        b.accepted.push((p.reply, Ok(id)));
        if let Some(d) = p.delivery {
            b.new_waiters.push((id, d));
        }
        Ok(())
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

    /// The acknowledgements a message of `route` needs, and from which
    /// slots. Without routes (one broker), any acknowledgement will do.
    fn rule(&self, route: Option<&str>) -> (u64, u32, Option<u64>) {
        match self.quorums.iter().find(|q| q.route.as_deref() == route) {
            Some(q) => (q.mask(), q.need.max(1), q.catch_up_ms),
            None => (u64::MAX, 1, None),
        }
    }

    /// After an acknowledgement or a closed QoS 2 exchange: a message whose
    /// quorum is complete is delivered; its row goes once no broker holds
    /// an exchange of it any more.
    fn settle(&mut self, id: u64, b: &mut Batch) -> Result<(), StoreError> {
        let Some(e) = self.store.entry(id)? else { return Ok(()) };
        if e.done {
            if e.bindings == 0 {
                self.store.remove(id)?;
            }
            return Ok(());
        }
        let (mask, need, _) = self.rule(e.route.as_deref());
        if (e.acks & mask).count_ones() >= need {
            self.finish(id, &e, Delivery::Delivered, b)?;
        }
        Ok(())
    }

    /// A queued message reached its end. While a broker holds a QoS 2
    /// exchange of it (even one dropped by its policy), the row stays, so
    /// that its packet id is not reused after a restart.
    fn finish(&mut self, id: u64, e: &Entry, outcome: Delivery, b: &mut Batch) -> Result<(), StoreError> {
        if e.bindings == 0 {
            self.store.remove(id)?;
        } else {
            self.store.set_done(id)?;
        }
        self.totals.count -= 1;
        self.totals.bytes = self.totals.bytes.saturating_sub(e.size);
        if let Some(t) = self.deadline_totals.as_mut().filter(|_| e.expires_ms.is_some()) {
            t.count = t.count.saturating_sub(1);
            t.bytes = t.bytes.saturating_sub(e.size);
        }
        b.resolved.push((id, outcome));
        Ok(())
    }

    /// Removes a message that reached its end; false if it was gone already.
    fn remove_one(&mut self, id: u64, outcome: Delivery, b: &mut Batch) -> Result<bool, StoreError> {
        match self.store.entry(id)? {
            Some(e) if e.done => {
                self.store.remove(id)?;
                Ok(false)
            }
            Some(e) => {
                self.finish(id, &e, outcome, b)?;
                Ok(true)
            }
            None => Ok(false),
        }
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

    /// Drops a message undelivered: counted by reason and announced (G3).
    fn drop_one(&mut self, id: u64, reason: DropReason, b: &mut Batch) -> Result<(), StoreError> {
        let Some(e) = self.store.entry(id)? else { return Ok(()) };
        if e.done {
            return Ok(());
        }
        self.finish(id, &e, Delivery::Dropped(reason), b)?;
        self.store.add_drop(reason, Some(id))?;
        b.drops.push(Dropped { id, topic: e.topic, reason });
        Ok(())
    }

    fn sweeps(&self) -> bool {
        self.quorums.iter().any(|q| q.catch_up_ms.is_some())
            || self.next_expiry.is_some()
            || (self.config.max_age_ms.is_some() && self.totals.count > 0)
    }

    /// Deadlines and the age bound: what outlived them leaves, counted as
    /// `expired` (G3). Checked once a second; a sender also checks the
    /// deadline before each send, so nothing goes out after it.
    fn sweep_expired(&mut self, b: &mut Batch) -> Result<(), StoreError> {
        const PAGE: usize = 4096;
        let now = crate::now_ms();
        if self.next_expiry.is_some_and(|e| e <= now) {
            loop {
                let ids = self.store.expired(now, PAGE)?;
                for id in &ids {
                    self.drop_one(*id, DropReason::Expired, b)?;
                }
                if ids.len() < PAGE {
                    break;
                }
            }
            self.next_expiry = self.store.next_expiry()?;
        }
        if let Some(age) = self.config.max_age_ms {
            let cutoff = now.saturating_sub(age);
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
    fn sweep_lapsed(&mut self, b: &mut Batch) -> Result<(), StoreError> {
        let now = crate::now_ms();
        for q in self.quorums.clone() {
            let Some(window) = q.catch_up_ms else { continue };
            let mask = q.mask();
            let mut missed: HashMap<&str, u64> = HashMap::new();
            for (id, acks) in self.store.lapsed(q.route.as_deref(), mask, now.saturating_sub(window), 4096)? {
                for (slot, url) in &q.members {
                    if acks & (1 << slot) == 0 {
                        *missed.entry(url.as_str()).or_default() += 1;
                    }
                }
                if let Some(e) = self.store.entry(id)? {
                    self.finish(id, &e, Delivery::Delivered, b)?;
                }
            }
            for (url, n) in missed {
                self.store.add_missed(url, n)?;
                tracing::warn!(broker = url, missed = n, catch_up_ms = window, "a broker was down longer than its catch-up window; these messages were delivered to the others and counted as missed by it");
            }
        }
        Ok(())
    }

    fn admit_blocked(&mut self, b: &mut Batch) -> Result<(), StoreError> {
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

    fn after_commit(&mut self, b: Batch) {
        // The state first: whoever learns that a message was accepted must
        // find it counted (a publisher that waits for an empty outbox right
        // after acceptance must not see the old, empty state).
        self.state.send_replace(OutboxState { last_id: self.last_id, totals: self.totals, newest: self.newest });
        let accepted = b.accepted.iter().filter(|(_, r)| r.is_ok()).count() as u64;
        let delivered = b.resolved.iter().filter(|(_, o)| *o == Delivery::Delivered).count() as u64;
        metrics::counter!("steadfast_accepted_total").increment(accepted);
        metrics::counter!("steadfast_delivered_total").increment(delivered);
        for (reply, r) in b.accepted {
            let _ = reply.send(r);
        }
        for (reply, id) in b.known {
            let _ = reply.send(Ok(id));
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
        for (reply, refused) in b.wire_replies {
            let _ = reply.send(Ok(refused));
        }
        for (reply, v) in b.meta_replies {
            let _ = reply.send(Ok(v));
        }
        for (reply, v) in b.slot_replies {
            let _ = reply.send(Ok(v));
        }
        for reply in b.inbox_replies {
            let _ = reply.send(Ok(()));
        }
        for (reply, v) in b.high_replies {
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
                Request::Read { after, limit, slot, priority, reply } => {
                    let _ = reply.send(self.store.read_after(after, limit, slot, priority));
                }
                Request::Query { reply } => {
                    let _ = reply.send(Report::read(self.store.as_mut()));
                }
                Request::Glance { reply } => {
                    let s = self.store.as_mut();
                    let glance =
                        s.drops().and_then(|drops| Ok(Glance { drops, oldest_created_ms: s.oldest_created_ms()? }));
                    let _ = reply.send(glance);
                }
                Request::Bound { slot, reply } => {
                    let _ = reply.send(self.store.bound(slot));
                }
                Request::InboxSeen { ids, reply } => {
                    let _ = reply.send(self.store.inbox_seen(&ids));
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
                Request::SetWire { reply, .. } => b.wire_replies.push((reply, Vec::new())),
                Request::Meta { reply, .. } => b.meta_replies.push((reply, String::new())),
                Request::Slots { reply, .. } => b.slot_replies.push((reply, Default::default())),
                Request::InboxRecord { reply, .. } => b.inbox_replies.push(reply),
                Request::InboxBounds { reply, .. } => b.high_replies.push((reply, Vec::new())),
                Request::Close => b.close = true,
                r @ (Request::Read { .. }
                | Request::Query { .. }
                | Request::Glance { .. }
                | Request::Bound { .. }
                | Request::InboxSeen { .. }) => b.reads.push(r),
                Request::Remove { .. }
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

    fn fail_replies(&mut self, b: Batch, e: StoreError) {
        let again = StoreError::clone_for_reply;
        for (reply, _) in b.accepted {
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
        self.serve_reads(b.reads);
    }
}
