//! The durable outbox of steadfast.
//!
//! A message is *accepted* once it is in the outbox and the outbox is synced
//! to disk (G1). It leaves the outbox only when a broker acknowledged it or
//! when its own policy drops it, and every drop is counted by reason (G2,
//! G3). The backlog lives on disk and is read in pages, so memory stays flat
//! however many messages are queued (G7).
//!
//! Storage sits behind the small synchronous [`Store`] trait: [`SqliteStore`]
//! is the real one, [`MemoryStore`] serves tests. [`Outbox`] runs the single
//! writer thread that does group commit over either.

#![forbid(unsafe_code)]

mod error;
mod memory;
mod outbox;
mod queued;
mod reserve;
mod sqlite;

pub use error::{DatabaseError, StoreError};
pub use memory::MemoryStore;
pub use outbox::{
    held_for, AcceptFuture, AppendError, BrokerLag, Configured, DefaultSet, Delivery, Dropped, Glance, Handling,
    InboxBounds, Outbox, OutboxConfig, OutboxState, Overflow, Page, Quorum, Report, Source, UnknownOverflow,
    HELD_PREFIX, RECEIPTS_COUNTED, RECEIPTS_HANDLED, RECEIPTS_REPUBLISHED,
};
pub use sqlite::{OpenReport, SqliteStore, StoreKind};
/// A page's bound in messages and bytes, as the delivery engine reads.
pub use steadfast_core::engine::ReadLimit;

/// The smallest size limit (topic and payload, bytes) an MQTT 3.1.1
/// broker's close is taken to mean ([`BrokerMeta::PoisonSize`]): a broker
/// that closes the link on a smaller message refuses it for another
/// reason (a topic it denies, retain it does not offer), and no broker in
/// use limits messages below this. A size below it, remembered by an
/// earlier release, is ignored.
pub const SMALLEST_SIZE_LIMIT: u64 = 1024;

/// What an outbox learned of one broker, kept in its metadata under
/// `"{what} URL"`: read by the client's drivers and by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerMeta {
    /// The in-flight ceiling learned from closes past a limit ('' = none).
    Window,
    /// MQTT 3.1.1: messages this large or larger are poison at once.
    PoisonSize,
    /// The link's ack timeout and round-trip estimate ([`AckTiming`]).
    AckTimeout,
}

impl BrokerMeta {
    /// The metadata key for the broker `url`.
    pub fn key(self, url: &str) -> String {
        let what = match self {
            BrokerMeta::Window => "window",
            BrokerMeta::PoisonSize => "poison size",
            BrokerMeta::AckTimeout => "ack timeout",
        };
        format!("{what} {url}")
    }
}

/// A broker link's ack timeout and the round trips it follows, as its
/// driver last recorded them (for `steadfast status`; kept as metadata
/// text "TIMEOUT_MS adaptive|fixed [ROUND_TRIP_US DEVIATION_US]").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckTiming {
    /// The ack timeout in force, in milliseconds.
    pub timeout_ms: u64,
    /// True when it follows the round trips measured (the default).
    pub adaptive: bool,
    /// The smoothed round-trip time and its mean deviation, in
    /// microseconds, once measured.
    pub round_trip_us: Option<(u64, u64)>,
}

impl std::fmt::Display for AckTiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.adaptive { "adaptive" } else { "fixed" };
        write!(f, "{} {mode}", self.timeout_ms)?;
        if let Some((rt, dev)) = self.round_trip_us {
            write!(f, " {rt} {dev}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for AckTiming {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut words = s.split(' ');
        let timeout_ms = words.next().and_then(|w| w.parse().ok()).ok_or(())?;
        let adaptive = match words.next() {
            Some("adaptive") => true,
            Some("fixed") => false,
            _ => return Err(()),
        };
        let mut number = || words.next().map(|w| w.parse::<u64>().map_err(|_| ()));
        let round_trip_us = match (number(), number()) {
            (Some(rt), Some(dev)) => Some((rt?, dev?)),
            (None, None) => None,
            _ => return Err(()),
        };
        Ok(AckTiming { timeout_ms, adaptive, round_trip_us })
    }
}

/// True for a route this crate sets itself (held for another broker set,
/// or poison): no configuration names it, no broker set claims it.
pub fn set_aside(route: &str) -> bool {
    route.starts_with('@')
}

pub use steadfast_core::engine::PoisonCause;
use steadfast_core::{DropReason, Properties, Qos, Stage};

pub use steadfast_core::{MAX_PRIORITY, PRIORITIES};

/// How a queued message may leave without delivery, and when it goes out
/// (docs/guarantees.md, "Delivery classes"). The default is persistent:
/// no deadline, no budget, priority 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Deadline class: dropped as `expired` at this time (ms since the
    /// epoch) unless a broker acknowledged it before.
    pub expires_ms: Option<u64>,
    /// Retry budget: dropped as `budget` instead of a send beyond this many.
    pub max_attempts: Option<u32>,
    /// Keep-latest: a newer keep-latest message of the same topic and route
    /// replaces it while it waits (dropped as `superseded`).
    pub keep_latest: bool,
    /// 0 (default) to [`MAX_PRIORITY`]: higher goes first after an outage.
    pub priority: u8,
}

/// A message on its way into the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Topic name (already validated).
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// QoS 0, 1 or 2.
    pub qos: Qos,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 properties.
    pub props: Properties,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The named broker set it goes to; `None` for the client's default.
    pub route: Option<String>,
    /// Deadline, budget, keep-latest, priority.
    pub policy: Policy,
    /// The receipts it asks its consumers for, in the stored form of
    /// [`steadfast_core::ReceiptRule::to_text`]; `None`: the broker's
    /// acknowledgement ends its way.
    pub receipts: Option<String>,
}

impl NewMessage {
    /// Bytes this message counts against the outbox bound.
    pub fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }

    /// An empty retained message: it clears the topic's retained message,
    /// a command to the broker rather than a message (over MQTT 3.1.1 it
    /// goes without the identity envelope, so it asks for no receipts).
    pub fn clears_retained(&self) -> bool {
        self.retain && self.payload.is_empty()
    }
}

/// A message read back from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Outbox id: also the per-producer sequence number (never reused).
    pub id: u64,
    /// The message itself, shared: a page read from the outbox's tail in
    /// memory hands out the tail's own copy, not a new one.
    pub msg: std::sync::Arc<NewMessage>,
    /// QoS 2 only: the packet id and stage it is bound to on the wire of
    /// the broker that asked ([`Store::bound`]); `None` in other reads.
    pub wire: Option<(u16, Stage)>,
    /// Broker slots that acknowledged it so far (bit `1 << slot`).
    pub acks: u64,
    /// Sends so far (counted against its retry budget).
    pub attempts: u32,
}

/// Where a queued message stands, for the writer's quorum decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its route (`None`: the default broker set).
    pub route: Option<String>,
    /// Broker slots that acknowledged it (bit `1 << slot`).
    pub acks: u64,
    /// Delivered (its quorum acknowledged it) but kept because a broker
    /// still holds a QoS 2 exchange of it.
    pub done: bool,
    /// QoS 2 exchanges of it still open, one per broker at most.
    pub bindings: u32,
    /// Bytes it counts against the bound.
    pub size: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Its deadline, if it has one (deadline class).
    pub expires_ms: Option<u64>,
    /// The receipts it asks for (stored form), if any.
    pub receipts: Option<String>,
    /// Delivered and awaiting receipts: when the wait ends (ms since the
    /// epoch).
    pub awaiting_ms: Option<u64>,
    /// When a broker's acknowledgement first made it wait for receipts.
    pub acked_ms: Option<u64>,
    /// Times it was published again for lack of a receipt.
    pub resends: u32,
}

/// `ids` in ascending order, each once: the order in which
/// [`Store::ack_or_remove_many`] answers.
pub(crate) fn sorted_distinct(ids: &[u64]) -> Vec<u64> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

/// What an acknowledgement found ([`Store::ack_or_remove`]): the message
/// as it is now and whether it was removed; `None` if it was gone.
pub type AckAnswer = Option<(Entry, bool)>;

/// Messages delivered and awaiting receipts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Awaiting {
    /// How many.
    pub count: u64,
    /// The first acknowledgement of the one that has waited longest (ms
    /// since the epoch).
    pub oldest_acked_ms: Option<u64>,
    /// When the first wait ends (ms since the epoch).
    pub next_due_ms: Option<u64>,
    /// Some queued message asks for receipts (awaiting them or not yet
    /// delivered).
    pub asking: bool,
}

/// What one inbox identity counts against a byte bound besides its
/// producer id: the sequence number, the time, and SQLite's row and index
/// overhead, roughly.
pub const INBOX_ENTRY_BYTES: u64 = 24;

/// A run of a producer's consecutive sequence numbers, `(producer, first,
/// last)`: what an inbox record is made of.
pub type InboxRun = (String, u64, u64);

/// `ids` (each an identity `(producer, seq)`, through `id`) as runs, each
/// producer id copied once per run: in one pass when they come in order
/// (one producer's, ascending: the common case), else sorted first, so
/// that interleaved producers still make one run each where they can.
pub fn inbox_runs<T>(ids: &[T], id: impl Fn(&T) -> (&str, u64)) -> Vec<InboxRun> {
    let ordered = ids.windows(2).all(|w| id(&w[0]) < id(&w[1]));
    let mut out: Vec<InboxRun> = Vec::new();
    let mut add = |p: &str, s: u64| match out.last_mut() {
        Some((q, _, last)) if q == p && last.checked_add(1) == Some(s) => *last = s,
        Some((q, _, last)) if q == p && *last == s => {}
        _ => out.push((p.to_owned(), s, s)),
    };
    if ordered {
        ids.iter().for_each(|i| {
            let (p, s) = id(i);
            add(p, s);
        });
    } else {
        let mut sorted: Vec<(&str, u64)> = ids.iter().map(&id).collect();
        sorted.sort_unstable();
        sorted.into_iter().for_each(|(p, s)| add(p, s));
    }
    out
}

/// The most brokers one outbox can tell apart (acknowledgements are a
/// 64-bit mask per message).
pub const MAX_SLOTS: usize = 64;

pub use steadfast_core::engine::Totals;

/// Per-broker state as last reported by the client that owns the outbox, so
/// that `steadfast status` can show it from another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerRecord {
    /// The broker URL.
    pub url: String,
    /// `connected`, `connecting` or `backoff`.
    pub state: String,
    /// The last error, if the link is not up.
    pub last_error: Option<String>,
    /// When `state` began, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// In backoff: when the next attempt starts (ms since the epoch).
    pub retry_ms: Option<u64>,
    /// Messages this broker acknowledged since the client started.
    pub acked: u64,
    /// Successful connections since the client started.
    pub connects: u64,
    /// Whether new messages go to this broker now (failover: the active
    /// one; fanout and balance: every connected member).
    pub active: bool,
}

/// A consumer's inbox (G5): identities already handled, bounded by count,
/// bytes and age, and the consumer's persistent counters. Part of every
/// [`Store`], in the same transactions.
pub trait InboxStore {
    /// For each identity `(producer, seq)`, whether it was handled already.
    fn inbox_seen(&mut self, ids: &[(String, u64)]) -> Result<Vec<bool>, StoreError>;
    /// The highest sequence number recorded per producer (a bound:
    /// anything above it was never handled).
    fn inbox_high(&mut self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Records these identities as handled at `now_ms`.
    fn inbox_record(&mut self, ids: &[(String, u64)], now_ms: u64) -> Result<(), StoreError> {
        self.inbox_record_runs(&inbox_runs(ids, |(p, s)| (p.as_str(), *s)), now_ms)
    }
    /// Records these runs of identities as handled at `now_ms` (in any
    /// order, overlapping or not; each with `first <= last`).
    fn inbox_record_runs(&mut self, runs: &[InboxRun], now_ms: u64) -> Result<(), StoreError>;
    /// Forgets identities handled before `before_ms`, and the oldest
    /// beyond the `keep` newest; returns how many went.
    fn inbox_prune(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError>;
    /// Identities remembered.
    fn inbox_len(&mut self) -> Result<u64, StoreError>;
    /// The bytes its identities count against a byte bound, each
    /// [`INBOX_ENTRY_BYTES`] plus its producer id.
    fn inbox_bytes(&mut self) -> Result<u64, StoreError>;
    /// Adds to a named persistent counter (duplicates removed, gaps...).
    fn add_counter(&mut self, name: &str, n: u64) -> Result<(), StoreError>;
    /// Every named counter.
    fn counters(&mut self) -> Result<Vec<(String, u64)>, StoreError>;
}

/// A bridge's source records: which delivery of which source broker each
/// queued message came as, so that a broker's resend is recognised. Part
/// of every [`Store`], in the same transactions.
pub trait SourceStore {
    /// Records that the delivery with packet id `pid` and content digest
    /// `digest` from the source broker `url` became the queued message `id`
    /// (in the same transaction as its insertion).
    fn source_record(&mut self, url: &str, pid: u16, digest: u64, id: u64) -> Result<(), StoreError>;
    /// The id the delivery with packet id `pid` and this content from
    /// `url` got when it was queued, if it was (a resend of it is a
    /// duplicate).
    fn source_seen(&mut self, url: &str, pid: u16, digest: u64) -> Result<Option<u64>, StoreError>;
}

/// Storage of the outbox. All calls between [`Store::begin`] and
/// [`Store::commit`] form one transaction; only a successful commit makes
/// them durable.
pub trait Store: InboxStore + SourceStore + Send + 'static {
    /// Opens a transaction.
    fn begin(&mut self) -> Result<(), StoreError>;
    /// Commits and syncs the transaction.
    fn commit(&mut self) -> Result<(), StoreError>;
    /// Whether the next commits sync to disk (the default) or only reach
    /// the operating system (bookkeeping that may be lost at a power loss,
    /// never at a crash of the process).
    fn set_synced(&mut self, synced: bool) {
        let _ = synced;
    }
    /// Whether the transaction under way has changed anything so far: a
    /// commit that changed nothing syncs nothing (SQLite writes no log
    /// frame for it). `false` when the store cannot tell.
    fn changed(&self) -> bool {
        false
    }
    /// When the acknowledgements this store holds unwritten past commits
    /// are due: a commit from then on writes them, and the writer commits
    /// by then even when nothing else comes. `None`: it holds none.
    fn acks_due_at(&self) -> Option<std::time::Instant> {
        None
    }
    /// Abandons the transaction (and what the store held unwritten).
    fn rollback(&mut self);
    /// Adds a message; returns its id, greater than any id ever handed out.
    fn insert(&mut self, msg: &NewMessage) -> Result<u64, StoreError>;
    /// [`Store::insert`] of a message the caller shares: a store that
    /// keeps its newest messages in memory keeps this one, uncopied.
    fn insert_shared(&mut self, msg: std::sync::Arc<NewMessage>) -> Result<u64, StoreError> {
        self.insert(&msg)
    }
    /// Where a message stands; `None` if it is gone.
    fn entry(&mut self, id: u64) -> Result<Option<Entry>, StoreError>;
    /// A message's topic, for the report of its drop; `None` if it is
    /// gone. Not in [`Entry`]: every acknowledgement answers with one,
    /// and a copy of the topic in each cost about 500 instructions a
    /// fanned-out message (docs/performance.md, session 30).
    fn topic(&mut self, id: u64) -> Result<Option<String>, StoreError>;
    /// Removes a message and its wire bindings; false if it was gone.
    fn remove(&mut self, id: u64) -> Result<bool, StoreError>;
    /// [`Store::remove`] of a message bound to no packet id, read as `e`
    /// in this transaction just before: a store may delete it without
    /// reading it again (one statement instead of two).
    fn remove_as_read(&mut self, id: u64, e: &Entry) -> Result<(), StoreError> {
        debug_assert_eq!(e.bindings, 0, "message {id} is bound to a packet id");
        self.remove(id).map(drop)
    }
    /// [`Store::remove_as_read`] of several messages, ascending by id and
    /// distinct: a store may delete a run of consecutive ids in one
    /// statement (a receipt's page hands over up to 4,096 at once).
    fn remove_many_as_read(&mut self, rows: &[(u64, &Entry)]) -> Result<(), StoreError> {
        rows.iter().try_for_each(|&(id, e)| self.remove_as_read(id, e))
    }
    /// Records that the broker in `slot` acknowledged the message, and
    /// closes that broker's QoS 2 exchange of it; the message as it is now
    /// (`None`: gone already).
    fn ack(&mut self, id: u64, slot: u32) -> Result<Option<Entry>, StoreError>;
    /// [`Store::ack`], and when `finishes` says that the message, so
    /// acknowledged, is done (and no QoS 2 exchange of it is open, and it
    /// is not delivered already), it is removed in the same step, as
    /// [`Store::remove`] would: a store may then skip recording an
    /// acknowledgement on a row about to go. Returns the message as it
    /// is now, and whether it was removed.
    fn ack_or_remove(
        &mut self,
        id: u64,
        slot: u32,
        finishes: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<AckAnswer, StoreError> {
        let Some(e) = self.ack(id, slot)? else { return Ok(None) };
        let removed = e.bindings == 0 && !e.done && finishes(&e) && self.remove(id)?;
        Ok(Some((e, removed)))
    }
    /// [`Store::ack_or_remove`] for each of `ids`, acknowledged by the
    /// broker in `slot`: the answers in ascending id order, each id once.
    /// A store may read and delete a run of consecutive ids with one
    /// statement each (a broker acknowledges in the order it was sent).
    fn ack_or_remove_many(
        &mut self,
        ids: &[u64],
        slot: u32,
        finishes: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<Vec<(u64, AckAnswer)>, StoreError> {
        sorted_distinct(ids).into_iter().map(|id| Ok((id, self.ack_or_remove(id, slot, finishes)?))).collect()
    }
    /// Marks a message delivered while QoS 2 exchanges of it stay open.
    fn set_done(&mut self, id: u64) -> Result<(), StoreError>;
    /// A message that asks for receipts was delivered: it waits for them
    /// until `due_ms` (no sender reads it meanwhile); `now_ms` is kept as
    /// the time of its first acknowledgement.
    fn await_receipts(&mut self, id: u64, due_ms: u64, now_ms: u64) -> Result<(), StoreError>;
    /// [`Store::await_receipts`] of several messages, ascending by id and
    /// distinct, all until `due_ms`: a store may update a run of consecutive ids in
    /// one statement (an acknowledgement delivers up to a window at once).
    fn await_receipts_many(&mut self, ids: &[u64], due_ms: u64, now_ms: u64) -> Result<(), StoreError> {
        ids.iter().try_for_each(|&id| self.await_receipts(id, due_ms, now_ms))
    }
    /// Notes a receipt from consumer `by`; returns the distinct consumers
    /// that sent one for this message so far.
    fn add_receipt(&mut self, id: u64, by: &str) -> Result<Vec<String>, StoreError>;
    /// Up to `limit` queued messages that ask for receipts with ids from
    /// `first` to `last`, in order (what a receipt's range can name).
    fn asking_between(&mut self, first: u64, last: u64, limit: usize) -> Result<Vec<u64>, StoreError>;
    /// [`Store::asking_between`] with where each message stands
    /// ([`Store::entry`]): fewer than `limit` only when no more ask in
    /// the range. A store may read them in one statement instead of one
    /// each (a receipt names up to a thousand).
    fn entries_asking_between(&mut self, first: u64, last: u64, limit: usize) -> Result<Vec<(u64, Entry)>, StoreError> {
        let mut out = Vec::new();
        let mut from = first;
        while out.len() < limit && from <= last {
            let want = limit - out.len();
            let ids = self.asking_between(from, last, want)?;
            for &id in &ids {
                out.extend(self.entry(id)?.map(|e| (id, e)));
            }
            match ids.last() {
                Some(&id) if ids.len() == want && id < last => from = id + 1,
                _ => break,
            }
        }
        Ok(out)
    }
    /// The consumers whose receipts were noted for a message.
    fn receipts_of(&mut self, id: u64) -> Result<Vec<String>, StoreError>;
    /// Forgets the receipts noted for a message.
    fn clear_receipts(&mut self, id: u64) -> Result<(), StoreError>;
    /// Up to `limit` messages whose wait for receipts ended at or before
    /// `now_ms`.
    fn receipts_due(&mut self, now_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError>;
    /// Queues a message again for lack of receipts: no longer awaiting,
    /// no broker's acknowledgement counts, one more resend.
    fn requeue_for_receipts(&mut self, id: u64) -> Result<(), StoreError>;
    /// What awaits receipts.
    fn awaiting(&mut self) -> Result<Awaiting, StoreError>;
    /// Records (or clears) the wire binding of a QoS 2 message on the broker
    /// in `slot`. A packet id holds one exchange per broker: recording it
    /// for `id` voids another message's binding under the same id there.
    fn set_wire(&mut self, slot: u32, id: u64, wire: Option<(u16, Stage)>) -> Result<(), StoreError>;
    /// Up to `limit` queued (not done) messages with id greater than
    /// `after`, oldest first; with a slot, only those that broker has not
    /// acknowledged; with a priority, only those of that priority.
    fn read_after(
        &mut self,
        after: u64,
        limit: usize,
        slot: Option<u32>,
        priority: Option<u8>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.read_page(after, ReadLimit::messages(limit), slot, priority)
    }
    /// [`Store::read_after`] that also ends at the message that brings
    /// what the page holds to `page.bytes` ([`NewMessage::size`],
    /// [`ReadLimit::cut`]): one message at least, when there is one and
    /// the count is not 0.
    fn read_page(
        &mut self,
        after: u64,
        page: ReadLimit,
        slot: Option<u32>,
        priority: Option<u8>,
    ) -> Result<Vec<StoredMessage>, StoreError>;
    /// For each priority with messages, an id that no queued message of
    /// that priority is above (its newest id, or a larger one).
    fn newest_by_priority(&mut self) -> Result<Vec<(u8, u64)>, StoreError>;
    /// Counts one more send of a message against its retry budget.
    fn add_attempt(&mut self, id: u64) -> Result<(), StoreError>;
    /// Up to `limit` queued messages whose deadline is at or before
    /// `cutoff_ms` (the engine's [`steadfast_core::engine::Sweep::deadlines_at`]).
    fn expired(&mut self, cutoff_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError>;
    /// The earliest deadline among queued messages.
    fn next_expiry(&mut self) -> Result<Option<u64>, StoreError>;
    /// Count and bytes of the queued messages that have a deadline.
    fn deadline_totals(&mut self) -> Result<Totals, StoreError>;
    /// Queued keep-latest messages of `topic` and `route` that no broker
    /// holds a QoS 2 exchange of (a newer value replaces them).
    fn superseded(&mut self, topic: &str, route: Option<&str>) -> Result<Vec<u64>, StoreError>;
    /// Every message bound to a packet id on the wire of the broker in
    /// `slot` (QoS 2), oldest first, with its binding.
    fn bound(&mut self, slot: u32) -> Result<Vec<StoredMessage>, StoreError>;
    /// Ids and sizes of the `limit` oldest messages; with `deadline`, only
    /// those that have (`true`) or lack (`false`) a deadline.
    fn oldest(&mut self, limit: usize, deadline: Option<bool>) -> Result<Vec<(u64, u64)>, StoreError>;
    /// The highest id still queued.
    fn newest_id(&mut self) -> Result<Option<u64>, StoreError>;
    /// The highest id ever handed out: the sequence number of the newest
    /// message ever accepted (ids are never reused), 0 for none.
    fn last_id(&mut self) -> Result<u64, StoreError>;
    /// Count and bytes queued, as kept with every commit (no scan: a
    /// restart on a large backlog starts at once).
    fn totals(&mut self) -> Result<Totals, StoreError>;
    /// Count and bytes queued, counted row by row (a scan): what
    /// [`Store::totals`] must equal.
    fn counted_totals(&mut self) -> Result<Totals, StoreError> {
        self.totals()
    }
    /// Creation time of the oldest queued message.
    fn oldest_created_ms(&mut self) -> Result<Option<u64>, StoreError>;
    /// Counts one drop of `reason`; a message that was in the outbox
    /// (`id`) is also written to the drop log, which keeps the newest
    /// [`DROP_LOG_KEEP`] so that a check can tell *which* messages left
    /// undelivered, not only how many.
    fn add_drop(&mut self, reason: DropReason, id: Option<u64>) -> Result<(), StoreError>;
    /// Drop counters, every reason listed.
    fn drops(&mut self) -> Result<Vec<(DropReason, u64)>, StoreError>;
    /// The drop log: `(id, reason)` of the newest dropped messages, by id.
    fn drop_log(&mut self) -> Result<Vec<(u64, DropReason)>, StoreError>;
    /// Queued messages of `route` older than `cutoff_ms` that at least one
    /// of the brokers in `mask` acknowledged: `(id, acks)`, oldest first, at
    /// most `limit`.
    fn lapsed(
        &mut self,
        route: Option<&str>,
        mask: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Queued messages per route (`None`: the default set).
    fn routes(&mut self) -> Result<Vec<(Option<String>, u64)>, StoreError>;
    /// Moves the queued messages of route `from` to route `to` (`None`:
    /// the default set); returns how many.
    fn retag(&mut self, from: Option<&str>, to: Option<&str>) -> Result<u64, StoreError>;
    /// Queued messages the broker in `slot` has not acknowledged.
    fn lag(&mut self, slot: u32) -> Result<u64, StoreError>;
    /// Moves a queued message aside as poison: it keeps its place on disk
    /// under the route [`POISON_ROUTE`] (no broker set claims it), its own
    /// route is kept beside it, and its QoS 2 binding on `slot` is cleared.
    /// False when it is gone or delivered.
    fn poison(&mut self, id: u64, slot: u32, cause: PoisonCause, at_ms: u64) -> Result<bool, StoreError>;
    /// The messages moved aside as poison and still queued, oldest first.
    fn poisoned(&mut self) -> Result<Vec<Poisoned>, StoreError>;
    /// Puts a poisoned message back under its own route; false when it is
    /// not poison.
    fn unpoison(&mut self, id: u64) -> Result<bool, StoreError>;
    /// The slot of each broker URL, assigning free ones to new URLs. When
    /// all are taken, slots of URLs not in `urls` are reused (their
    /// acknowledgements and bindings are cleared first).
    fn assign_slots(&mut self, urls: &[String]) -> Result<Vec<u32>, StoreError>;
    /// Every broker URL with its slot.
    fn slots(&mut self) -> Result<Vec<(String, u32)>, StoreError>;
    /// Adds to the count of messages a broker missed (its catch-up window
    /// passed before it acknowledged them).
    fn add_missed(&mut self, url: &str, n: u64) -> Result<(), StoreError>;
    /// Messages missed per broker URL.
    fn missed(&mut self) -> Result<Vec<(String, u64)>, StoreError>;
    /// A metadata value.
    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError>;
    /// Sets a metadata value.
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Records a broker's state.
    fn set_broker(&mut self, rec: &BrokerRecord) -> Result<(), StoreError>;
    /// Every broker's last recorded state.
    fn brokers(&mut self) -> Result<Vec<BrokerRecord>, StoreError>;
    /// Changes when another connection (another process on the same
    /// outbox) committed since the last call; never for this one's own.
    fn data_version(&mut self) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Why a message that left the outbox was dropped, if the drop log
    /// says it was (it keeps the newest [`DROP_LOG_KEEP`]).
    fn dropped_as(&mut self, _id: u64) -> Result<Option<DropReason>, StoreError> {
        Ok(None)
    }
    /// Ids (and what is wrong) of records that reads skipped because they
    /// could not be decoded, since the last call.
    fn take_unreadable(&mut self) -> Vec<(u64, String)> {
        Vec::new()
    }
}

/// The route of messages moved aside as poison.
pub const POISON_ROUTE: &str = "@poison";

/// A message moved aside as poison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned {
    /// Its outbox id.
    pub id: u64,
    /// Its topic.
    pub topic: String,
    /// Topic and payload bytes.
    pub size: u64,
    /// Its QoS.
    pub qos: u8,
    /// The broker whose links it ended or that refused it (its URL, if its
    /// slot is known).
    pub broker: String,
    /// Why it was moved aside.
    pub cause: PoisonCause,
    /// When it was moved aside (ms since the epoch).
    pub at_ms: u64,
}

/// How many dropped messages the drop log keeps (the newest).
pub const DROP_LOG_KEEP: u64 = 100_000;

/// Milliseconds since the Unix epoch, for creation times and state changes.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{inbox_runs, AckTiming};

    /// Runs cover exactly the identities given, each producer's ascending
    /// and merged where consecutive, whatever the order they came in.
    #[test]
    fn identities_become_runs_in_order_or_not() {
        let runs = |ids: &[(&str, u64)]| inbox_runs(ids, |(p, s)| (*p, *s));
        let owned = |v: &[(&str, u64, u64)]| v.iter().map(|(p, f, l)| (p.to_string(), *f, *l)).collect::<Vec<_>>();
        assert_eq!(
            runs(&[("p", 1), ("p", 2), ("p", 3), ("p", 7), ("q", 1)]),
            owned(&[("p", 1, 3), ("p", 7, 7), ("q", 1, 1)])
        );
        // Interleaved producers, a repeat and a step back: sorted first.
        assert_eq!(
            runs(&[("q", 5), ("p", 1), ("q", 6), ("p", 2), ("p", 2), ("p", 0), ("q", 4)]),
            owned(&[("p", 0, 2), ("q", 4, 6)])
        );
        assert_eq!(runs(&[]), owned(&[]));
        assert_eq!(runs(&[("p", u64::MAX - 1), ("p", u64::MAX)]), owned(&[("p", u64::MAX - 1, u64::MAX)]));
    }

    #[test]
    fn an_ack_timing_reads_back_as_written_and_bad_text_is_none() {
        for t in [
            AckTiming { timeout_ms: 750, adaptive: true, round_trip_us: Some((210, 40)) },
            AckTiming { timeout_ms: 3000, adaptive: false, round_trip_us: None },
        ] {
            assert_eq!(t.to_string().parse::<AckTiming>(), Ok(t));
        }
        assert_eq!(
            AckTiming { timeout_ms: 1, adaptive: true, round_trip_us: Some((2, 3)) }.to_string(),
            "1 adaptive 2 3"
        );
        for bad in ["", "x adaptive", "750 maybe", "750 adaptive 12", "750 fixed a b"] {
            assert!(bad.parse::<AckTiming>().is_err(), "{bad}");
        }
    }
}
