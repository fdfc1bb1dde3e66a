//! The consumer's dispatcher: what every broker delivers, merged. It drops
//! what the inbox says was handled, holds a copy that arrives while the
//! first is in the application's hands, acknowledges a delivery to its
//! broker once the application handled it (G4) and has its identity
//! recorded in the inbox (G5): the acknowledgement may leave before the
//! record is committed for at most [`DispatchConfig::acks_ahead`]
//! identities at a time, so that the inbox's commit is not on the broker's
//! round trip; receipts always wait for the record (a synced one for the
//! receipt of the first hand-over). A record of identities that were
//! all acknowledged ahead needs no sync of its own ([`Record::sync`]): a
//! synced record follows once [`UNSYNCED_ROOMS`] rooms of them wait for
//! one, so that the disk syncs once per so many identities, not once per
//! commit. It gives refused deliveries back
//! after a pause, and watches each producer's sequence for gaps (G6).
//!
//! Inputs: deliveries with what the inbox said of them
//! ([`Dispatch::handle_delivered`]), the application's acknowledgements and
//! refusals, the outcome of each inbox record, and the clock. Outputs:
//! [`DispatchOp`]s, pulled with [`Dispatch::poll_op`], and the next timer.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

// Identities are hashed several times per delivery: foldhash, not SipHash
// (docs/design.md, "Dependencies").
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::time::{Duration, Instant};

use super::{Now, Timer};
use crate::message::Identity;

/// What the dispatcher needs to know of a delivery.
pub trait Delivered {
    /// Where its acknowledgement goes (a broker, a connection, a packet id).
    type Token: Clone;
    /// The producer's identity it carries, if any (and the inbox is on).
    fn identity(&self) -> Option<&Identity>;
    /// Its token.
    fn token(&self) -> Self::Token;
    /// Where its producer wants a receipt once it is handled, if it asks
    /// for one (docs/design.md, "Receipts").
    fn receipt(&self) -> Option<&str> {
        None
    }
}

/// A counter the dispatcher moves (kept in the store across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Deliveries the application acknowledged.
    Handled,
    /// Copies of something handled or being handled.
    Duplicates,
    /// Arrivals below a producer's highest sequence number.
    OutOfOrder,
    /// Gaps that did not fill in time.
    Gaps,
}

/// What the inbox says of an identity the dispatcher asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Not handled: it is handed over (for a group member, the inbox
    /// noted the member's claim on it).
    New,
    /// Handled already, by this consumer or by another member of its
    /// group.
    Handled,
    /// A group member: another member holds a claim on it now. It is held
    /// here, unacknowledged, and asked about again after a pause
    /// ([`DispatchOp::Ask`]): handled there by then, it is a duplicate;
    /// the claim gone (that member crashed and its claim expired), it is
    /// handed over here.
    Elsewhere,
}

/// What the dispatcher asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DispatchOp<P, T> {
    /// Ask the inbox again about these deliveries (held while another
    /// member of the group handled them), and hand them back with
    /// [`Dispatch::handle_answers`].
    Ask(Vec<P>),
    /// Give this delivery to the application.
    HandOver {
        /// The delivery.
        delivery: P,
        /// It was handed over before.
        redelivered: bool,
    },
    /// Send the broker's acknowledgement for this token.
    AckBroker(T),
    /// Record these identities in the inbox ([`Record::sync`]: on the
    /// disk, or committed for a later sync to cover), and report the
    /// outcome with [`Dispatch::handle_recorded`], giving the record back.
    Record(Record<T>),
    /// Add to a counter.
    Count(Counter, u64),
    /// This identity is handled (recorded in the inbox now, or before):
    /// its producer asked for a receipt at `topic`, through the broker of
    /// `token`.
    Receipt {
        /// The delivery's token (its broker).
        token: T,
        /// What was handled.
        identity: Identity,
        /// The receipts topic it asked for.
        topic: String,
    },
    /// A gap in a producer's sequence did not fill within the gap timeout.
    SuspectedLoss {
        /// The producer.
        producer: String,
        /// First missing sequence number.
        first: u64,
        /// Last missing sequence number.
        last: u64,
    },
}

/// An identity handed over and not yet recorded.
#[derive(Debug)]
struct Handling<T> {
    /// Copies that arrived meanwhile, acknowledged with it.
    copies: Vec<T>,
    /// The receipts topic it asked for.
    receipt: Option<String>,
    /// Its broker's acknowledgement left ahead of its record.
    acked: bool,
}

impl<T> Default for Handling<T> {
    fn default() -> Self {
        Self { copies: Vec::new(), receipt: None, acked: false }
    }
}

/// Identities to record, each with the token of its delivery.
type Batch<T> = Vec<(Identity, T)>;

/// How many rooms of acknowledgements ahead ([`DispatchConfig::acks_ahead`])
/// may be recorded without a sync before a synced record covers them: what
/// a power cut can take back of the inbox's records of handled messages
/// whose acknowledgement left (a crash of the process takes back only
/// what was not committed, at most one room).
pub const UNSYNCED_ROOMS: usize = 4;

/// An inbox record the dispatcher asks for ([`DispatchOp::Record`]), given
/// back with its outcome ([`Dispatch::handle_recorded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<T> {
    /// The identities, each with the token of its delivery.
    pub ids: Vec<(Identity, T)>,
    /// Whether the record must be synced to the disk before it is reported:
    /// a broker's acknowledgement or a receipt waits for it, or
    /// [`UNSYNCED_ROOMS`] rooms were recorded without a sync since the last
    /// synced record was asked for. Without: once reported, committed (it
    /// survives a crash of the process), and on the disk once a later
    /// synced record (or any synced commit of the store) follows.
    pub sync: bool,
}

impl<T> Record<T> {
    /// A synced record of `ids` (what a test reports).
    pub fn synced(ids: Vec<(Identity, T)>) -> Self {
        Record { ids, sync: true }
    }
}

/// Per producer: the highest sequence number seen and the gaps below it.
#[derive(Debug, Default)]
struct Sequence {
    highest: u64,
    /// Missing ranges (first -> last) and when they were noticed.
    gaps: BTreeMap<u64, (u64, Instant)>,
}

impl Sequence {
    /// Notes `seq` in a producer's sequence: a number past a gap opens
    /// one, a number in a gap fills it. True when it came out of order.
    fn note(&mut self, seq: u64, now: Instant) -> bool {
        if self.highest == 0 {
            self.highest = seq;
            return false;
        }
        if seq > self.highest + 1 {
            self.gaps.insert(self.highest + 1, (seq - 1, now));
        }
        if seq > self.highest {
            self.highest = seq;
            return false;
        }
        // Fill: split the range holding seq.
        let Some((&first, &(last, since))) = self.gaps.range(..=seq).next_back() else { return true };
        if seq > last {
            return true;
        }
        self.gaps.remove(&first);
        if first < seq {
            self.gaps.insert(first, (seq - 1, since));
        }
        if seq < last {
            self.gaps.insert(seq + 1, (last, since));
        }
        true
    }
}

/// An identity as the dispatcher keys it: its producer's place in the
/// [`Producers`] table, and its sequence number. A delivery's identity is
/// looked up once, neither cloned nor hashed as a string again.
type Key = (u32, u64);

/// A producer the dispatcher knows of.
#[derive(Debug)]
struct Producer {
    id: String,
    /// A sequence number at or above every one the inbox holds or that
    /// was handed over: anything above it is new without asking the store
    /// (the common case).
    high: Option<u64>,
    /// Its sequence as handed over in this process (G6).
    sequence: Sequence,
}

/// Every producer the dispatcher knows of, in the order it learnt of them.
#[derive(Debug, Default)]
struct Producers {
    list: Vec<Producer>,
    index: HashMap<String, u32>,
    /// The one found last: a batch's deliveries mostly come from one
    /// producer, whose id is compared instead of hashed.
    last: Cell<u32>,
}

impl Producers {
    fn find(&self, id: &str) -> Option<u32> {
        let last = self.last.get();
        if self.list.get(last as usize).is_some_and(|p| p.id == id) {
            return Some(last);
        }
        let found = self.index.get(id).copied();
        if let Some(i) = found {
            self.last.set(i);
        }
        found
    }

    /// The place of `id`, added when it is new.
    fn intern(&mut self, id: &str) -> u32 {
        if let Some(i) = self.find(id) {
            return i;
        }
        let i = u32::try_from(self.list.len()).expect("fewer than 2^32 producers");
        self.list.push(Producer { id: id.to_owned(), high: None, sequence: Sequence::default() });
        self.index.insert(id.to_owned(), i);
        self.last.set(i);
        i
    }

    fn get(&self, i: u32) -> &Producer {
        &self.list[i as usize]
    }

    fn get_mut(&mut self, i: u32) -> &mut Producer {
        &mut self.list[i as usize]
    }

    /// The identity `key` stands for.
    fn identity(&self, (p, seq): Key) -> Identity {
        Identity { producer: self.get(p).id.clone(), seq }
    }
}

/// Settings of a dispatcher.
#[derive(Debug, Clone, Copy)]
pub struct DispatchConfig {
    /// How long a gap may stay open before it is reported.
    pub gap_timeout: Duration,
    /// How long a refused delivery waits before it is handed over again.
    pub retry_after: Duration,
    /// How long a failed inbox record waits before it is tried again.
    pub record_retry: Duration,
    /// A relay (a bridge's source): it sends no receipt, and a copy of
    /// something it handled before is handed over again when the copy asks
    /// for a receipt. Its producer publishing again means no receipt came
    /// back: what the relay passed on may have been lost further on, and
    /// only the consumer at the end can tell.
    pub relay: bool,
    /// A member of a consumer group with a shared inbox: other members
    /// handle the same producers' messages, so nothing is new without
    /// asking the inbox, and a member's own view of a sequence has gaps
    /// that are the others' share (it reports none).
    pub shared: bool,
    /// A group member: how long a delivery another member holds a claim
    /// on waits before the inbox is asked about it again.
    pub reask_after: Duration,
    /// At most this many handled identities may have their broker's
    /// acknowledgement sent before their inbox record is committed; beyond
    /// that (the inbox slow or failing), acknowledgements wait for the
    /// record, synced. 0: every acknowledgement waits for its record, and
    /// every record is synced. Records of identities acknowledged ahead go
    /// unsynced for up to [`UNSYNCED_ROOMS`] times this many.
    ///
    /// Waiting buys nothing against duplicates: a crash before the record
    /// may hand the message over again either way (its broker sends it
    /// again when it was not acknowledged; otherwise only a copy through
    /// another broker or a producer's resend for lack of a receipt brings
    /// it back), and nothing is lost, since the application handled it
    /// first. A relay (a bridge's source) never acknowledges ahead: it may
    /// hand over a second copy of an identity it is still recording.
    pub acks_ahead: usize,
}

impl DispatchConfig {
    /// The most identities acknowledged ahead that may be recorded
    /// without a sync covering them: [`UNSYNCED_ROOMS`] rooms.
    pub fn unsynced_at_most(&self) -> usize {
        self.acks_ahead.saturating_mul(UNSYNCED_ROOMS)
    }
}

/// The consumer's dispatcher.
#[derive(Debug)]
pub struct Dispatch<P: Delivered> {
    cfg: DispatchConfig,
    /// Identities handed over and not yet recorded, with the copies that
    /// arrived meanwhile (acknowledged once it is recorded) and the
    /// receipts topic it asked for.
    handling: HashMap<Key, Handling<P::Token>>,
    /// Every producer known: what the inbox holds of it, its sequence.
    producers: Producers,
    /// The producers with gaps open in their sequence.
    gapped: BTreeSet<u32>,
    /// Inbox records asked for and not yet reported, or waiting to be
    /// tried again.
    recording: usize,
    /// Records asked for and not yet reported (one, and a failed one
    /// being tried again: what is acknowledged meanwhile waits in
    /// `unsent` and goes in the next, so that a record carries everything
    /// acknowledged during the one before it, however often the
    /// application acknowledges).
    in_flight: usize,
    /// Acknowledged identities waiting for the record under way to end.
    unsent: Batch<P::Token>,
    /// Handled identities whose broker's acknowledgement left before their
    /// record was reported (at most `cfg.acks_ahead`; each marked in
    /// `handling`).
    acked_ahead: usize,
    /// Identities recorded without a sync since the last synced record
    /// was asked for (its sync covers those before it).
    unsynced: usize,
    /// What waits in `unsent` needs a synced record: an acknowledgement or
    /// a receipt waits for it.
    unsent_sync: bool,
    /// Refused deliveries and when they come back.
    redeliver: VecDeque<(Instant, P)>,
    /// Deliveries another group member holds a claim on, and when the
    /// inbox is asked about them again.
    reask: VecDeque<(Instant, P)>,
    /// A group member: what it recorded lately, and when. The inbox's
    /// answer for a copy may have been given before the record (claims are
    /// asked while earlier ones are being handled): a `New` for one of
    /// these is a copy of what was just handled.
    recorded_lately: (VecDeque<(Instant, Key)>, HashSet<Key>),
    /// Failed records and when they are tried again.
    rerecord: VecDeque<(Instant, Record<P::Token>)>,
    ops: VecDeque<DispatchOp<P, P::Token>>,
}

impl<P: Delivered> Dispatch<P> {
    /// A dispatcher over an inbox whose highest recorded sequence number
    /// per producer is `high`.
    pub fn new(cfg: DispatchConfig, high: impl IntoIterator<Item = (String, u64)>) -> Self {
        let mut producers = Producers::default();
        for (id, seq) in high {
            let p = producers.intern(&id);
            producers.get_mut(p).high = Some(seq);
        }
        Self {
            cfg,
            handling: HashMap::new(),
            producers,
            gapped: BTreeSet::new(),
            recording: 0,
            in_flight: 0,
            unsent: Vec::new(),
            acked_ahead: 0,
            unsynced: 0,
            unsent_sync: false,
            redeliver: VecDeque::new(),
            reask: VecDeque::new(),
            recorded_lately: (VecDeque::new(), HashSet::new()),
            rerecord: VecDeque::new(),
            ops: VecDeque::new(),
        }
    }

    /// The identities among `items` the inbox must be asked about, in
    /// order: those at or below what this process knows of their producer.
    /// Anything above is new without asking.
    pub fn to_ask(&self, items: &[P]) -> Vec<(String, u64)> {
        items
            .iter()
            .filter_map(Delivered::identity)
            .filter(|i| !self.is_fresh(i))
            .map(|i| (i.producer.clone(), i.seq))
            .collect()
    }

    fn is_fresh(&self, i: &Identity) -> bool {
        self.producers.find(&i.producer).map_or(!self.cfg.shared, |p| self.fresh_at((p, i.seq)))
    }

    /// [`Self::is_fresh`] of an identity already placed.
    fn fresh_at(&self, (p, seq): Key) -> bool {
        !self.cfg.shared && self.producers.get(p).high.is_none_or(|h| seq > h)
    }

    /// Deliveries from the brokers, with the inbox's answer for
    /// [`Self::to_ask`] of them (`seen`, in that order; empty when the
    /// inbox could not be read: then nothing counts as handled, and
    /// delivery is at least once rather than stalled).
    pub fn handle_delivered(&mut self, items: Vec<P>, seen: &[bool], now: Now) {
        let answers: Vec<Answer> = seen.iter().map(|s| if *s { Answer::Handled } else { Answer::New }).collect();
        self.handle_answers(items, &answers, now);
    }

    /// Like [`Self::handle_delivered`] with the answers of a group's
    /// shared inbox, which may say that another member handles one now.
    pub fn handle_answers(&mut self, items: Vec<P>, answers: &[Answer], now: Now) {
        // Each identity's place, and whether it is fresh: decided for the
        // whole batch before anything in it is handed over.
        let mut placed = Vec::with_capacity(items.len());
        for p in &items {
            placed.push(p.identity().map(|id| {
                let key = (self.producers.intern(&id.producer), id.seq);
                (key, self.fresh_at(key))
            }));
        }
        let mut answers = answers.iter().copied();
        let mut duplicates = 0;
        for (p, placed) in items.into_iter().zip(placed) {
            let Some((key, fresh)) = placed else {
                self.ops.push_back(DispatchOp::HandOver { delivery: p, redelivered: false });
                continue;
            };
            let mut answer = if fresh { Answer::New } else { answers.next().unwrap_or(Answer::New) };
            if answer == Answer::New && self.cfg.shared && self.recorded_lately.1.contains(&key) {
                // Claimed before this member's record of it went through.
                answer = Answer::Handled;
            }
            if answer == Answer::Elsewhere && !self.handling.contains_key(&key) {
                self.reask.push_back((now.at + self.cfg.reask_after, p));
                continue;
            }
            let known = answer == Answer::Handled;
            if known && !crate::mutate::planted(crate::mutate::Bug::InboxForgets) {
                if self.cfg.relay && p.receipt().is_some() {
                    self.ops.push_back(DispatchOp::HandOver { delivery: p, redelivered: true });
                    continue;
                }
                duplicates += 1;
                self.ops.push_back(DispatchOp::AckBroker(p.token()));
                // Handled before: its receipt may be what was lost.
                if let Some(topic) = p.receipt() {
                    let identity = self.producers.identity(key);
                    self.ops.push_back(DispatchOp::Receipt { token: p.token(), identity, topic: topic.to_owned() });
                }
                continue;
            }
            let owed = p.receipt().filter(|_| !self.cfg.relay).map(str::to_owned);
            if let Some(h) = self.handling.get_mut(&key) {
                if h.acked {
                    // Handled already; only its record is under way.
                    self.ops.push_back(DispatchOp::AckBroker(p.token()));
                } else {
                    h.copies.push(p.token());
                }
                if h.receipt.is_none() {
                    h.receipt = owed;
                }
                duplicates += 1;
                continue;
            }
            let producer = self.producers.get_mut(key.0);
            producer.high = Some(producer.high.map_or(key.1, |h| h.max(key.1)));
            if !self.cfg.shared {
                self.note_sequence(key, now.at);
            }
            self.handling.insert(key, Handling { copies: Vec::new(), receipt: owed, acked: false });
            if crate::mutate::planted(crate::mutate::Bug::AckBeforeHandling) {
                self.ops.push_back(DispatchOp::AckBroker(p.token()));
            }
            self.ops.push_back(DispatchOp::HandOver { delivery: p, redelivered: false });
        }
        if duplicates > 0 {
            self.ops.push_back(DispatchOp::Count(Counter::Duplicates, duplicates));
        }
    }

    /// The application acknowledged these: without an identity the broker's
    /// ack leaves at once; with one, at once while fewer than
    /// [`DispatchConfig::acks_ahead`] wait for their record, otherwise once
    /// the inbox recorded it.
    pub fn handle_acks(&mut self, acks: impl IntoIterator<Item = (P::Token, Option<Identity>)>) {
        let before = self.unsent.len();
        let mut plain = 0;
        for (token, identity) in acks {
            match identity {
                Some(id) => {
                    // Not for a relay: it may hand over a second copy of an
                    // identity outside `handling` (a copy asking for a
                    // receipt), whose ack must not take the first's mark.
                    let ahead =
                        self.acked_ahead < self.cfg.acks_ahead && !self.cfg.relay && self.ack_ahead(&id, token.clone());
                    // Its ack or its receipt waits for the record.
                    self.unsent_sync |= !ahead;
                    self.unsent.push((id, token));
                }
                None => {
                    plain += 1;
                    self.ops.push_back(DispatchOp::AckBroker(token));
                }
            }
        }
        let handled = plain + (self.unsent.len() - before) as u64;
        if handled > 0 {
            self.ops.push_back(DispatchOp::Count(Counter::Handled, handled));
        }
        self.send_record();
    }

    /// Asks for the record of what waits, unless one is under way. It is
    /// synced when anything waits for it, when [`UNSYNCED_ROOMS`] rooms
    /// would otherwise wait for a sync, and always for a group's shared
    /// inbox (its commits are synced anyway).
    fn send_record(&mut self) {
        if self.in_flight == 0 && !self.unsent.is_empty() {
            self.recording += 1;
            self.in_flight += 1;
            let sync = std::mem::take(&mut self.unsent_sync)
                || self.cfg.shared
                || self.unsynced + self.unsent.len() > self.cfg.unsynced_at_most();
            if sync {
                // Its sync puts those recorded before it on the disk.
                self.unsynced = 0;
            }
            self.ops.push_back(DispatchOp::Record(Record { ids: std::mem::take(&mut self.unsent), sync }));
        }
    }

    /// The application gave a delivery back: it comes again after a pause.
    pub fn handle_refused(&mut self, delivery: P, now: Now) {
        self.redeliver.push_back((now.at + self.cfg.retry_after, delivery));
    }

    /// The outcome of a [`DispatchOp::Record`]. Recorded: the broker's acks
    /// leave, for the delivery and every copy held meanwhile (a record
    /// without a sync had none waiting). Not recorded: nothing is
    /// acknowledged, and the record is tried again.
    pub fn handle_recorded(&mut self, mut record: Record<P::Token>, ok: bool, now: Now) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if !ok {
            // A synced record that failed covered nothing: the next one
            // is synced too, and so is every record tried again (it lands
            // after records counted without it), so that what went
            // unsynced stays within its bound.
            self.unsent_sync |= record.sync;
            record.sync = true;
            self.rerecord.push_back((now.at + self.cfg.record_retry, record));
            self.send_record();
            return;
        }
        self.recording -= 1;
        if self.cfg.shared {
            self.forget_recorded(now.at);
        }
        for (id, token) in record.ids {
            let key = (self.producers.intern(&id.producer), id.seq);
            if !record.sync {
                match self.handling.remove(&key) {
                    // A copy that came meanwhile asked for a receipt: it
                    // waits for a synced record of the identity.
                    Some(h) if h.receipt.is_some() => {
                        self.handling.insert(key, h);
                        self.unsent.push((id, token));
                        self.unsent_sync = true;
                        continue;
                    }
                    // Acknowledged ahead (so are copies since): done, its
                    // sync is the next synced record's.
                    Some(h) if h.acked => self.acked_ahead -= 1,
                    _ => {}
                }
                self.unsynced += 1;
                continue;
            }
            if self.cfg.shared && self.recorded_lately.1.insert(key) {
                self.recorded_lately.0.push_back((now.at, key));
            }
            let h = self.handling.remove(&key).unwrap_or_default();
            if h.acked {
                // Acknowledged when handled; copies since were at arrival.
                self.acked_ahead -= 1;
            } else {
                self.ack_handled(token.clone(), h.copies);
            }
            if let Some(topic) = h.receipt {
                self.ops.push_back(DispatchOp::Receipt { token, identity: id, topic });
            }
        }
        self.send_record();
    }

    /// Acknowledges a handled delivery (and the copies held meanwhile)
    /// ahead of its record. One not in `handling` (a relay's second
    /// hand-over of something recorded) waits for its record instead.
    /// True when the record may go without a sync of its own: acknowledged
    /// ahead, and no receipt waits for it.
    fn ack_ahead(&mut self, id: &Identity, token: P::Token) -> bool {
        let Some(p) = self.producers.find(&id.producer) else { return false };
        let Some(h) = self.handling.get_mut(&(p, id.seq)).filter(|h| !h.acked) else { return false };
        h.acked = true;
        let copies = std::mem::take(&mut h.copies);
        let receipt = h.receipt.is_some();
        self.acked_ahead += 1;
        self.ack_handled(token, copies);
        !receipt
    }

    /// The broker's acknowledgement of a handled delivery, and of the
    /// copies held while it was in the application's hands.
    fn ack_handled(&mut self, token: P::Token, copies: Vec<P::Token>) {
        if !crate::mutate::planted(crate::mutate::Bug::AckBeforeHandling) {
            self.ops.push_back(DispatchOp::AckBroker(token));
        }
        self.ops.extend(copies.into_iter().map(DispatchOp::AckBroker));
    }

    /// Forgets what was recorded longer ago than any answer can be late
    /// (25 re-ask pauses, 5 s by default).
    fn forget_recorded(&mut self, now: Instant) {
        let keep = self.cfg.reask_after * 25;
        let (order, set) = &mut self.recorded_lately;
        while order.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep) {
            let (_, id) = order.pop_front().expect("front");
            set.remove(&id);
        }
    }

    /// The identities handed over and not yet recorded (in the
    /// application's hands, waiting to come again, or being recorded): a
    /// group member renews its claims on them.
    pub fn handling(&self) -> impl Iterator<Item = (&str, u64)> {
        self.handling.keys().map(|(p, seq)| (self.producers.get(*p).id.as_str(), *seq))
    }

    /// Handled identities waiting for the record under way to end before
    /// their own is asked for.
    pub fn to_record(&self) -> impl Iterator<Item = &Identity> {
        self.unsent.iter().map(|(i, _)| i)
    }

    /// Inbox records asked for and not yet written (with the one that
    /// waits for the record under way).
    pub fn recording(&self) -> usize {
        self.recording + usize::from(!self.unsent.is_empty())
    }

    /// The next thing to do.
    pub fn poll_op(&mut self) -> Option<DispatchOp<P, P::Token>> {
        self.ops.pop_front()
    }

    /// Every timer of the dispatcher and when it fires.
    pub fn timers(&self) -> [(Timer, Option<Instant>); 4] {
        let gaps = self.gapped.iter().flat_map(|p| self.producers.get(*p).sequence.gaps.values());
        let gap = gaps.map(|(_, t)| *t + self.cfg.gap_timeout).min();
        [
            (Timer::Redeliver, self.redeliver.front().map(|(t, _)| *t)),
            (Timer::Reask, self.reask.front().map(|(t, _)| *t)),
            (Timer::Rerecord, self.rerecord.front().map(|(t, _)| *t)),
            (Timer::Gap, gap),
        ]
    }

    /// When the dispatcher next needs [`Self::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers().into_iter().filter_map(|(_, t)| t).min()
    }

    /// Acts on the timers that are due.
    pub fn handle_timeout(&mut self, now: Now) {
        while self.redeliver.front().is_some_and(|(t, _)| *t <= now.at) {
            let (_, delivery) = self.redeliver.pop_front().expect("front");
            self.ops.push_back(DispatchOp::HandOver { delivery, redelivered: true });
        }
        let mut ask = Vec::new();
        while self.reask.front().is_some_and(|(t, _)| *t <= now.at) {
            ask.push(self.reask.pop_front().expect("front").1);
        }
        if !ask.is_empty() {
            self.ops.push_back(DispatchOp::Ask(ask));
        }
        while self.rerecord.front().is_some_and(|(t, _)| *t <= now.at) {
            let (_, record) = self.rerecord.pop_front().expect("front");
            self.in_flight += 1;
            self.ops.push_back(DispatchOp::Record(record));
        }
        self.report_gaps(now.at);
    }

    /// G6: a jump ahead opens a gap; an arrival below the highest fills one
    /// (or is out of order).
    fn note_sequence(&mut self, (p, seq): Key, now: Instant) {
        let s = &mut self.producers.get_mut(p).sequence;
        let out_of_order = s.note(seq, now);
        if !s.gaps.is_empty() {
            self.gapped.insert(p);
        } else if !self.gapped.is_empty() {
            self.gapped.remove(&p);
        }
        if out_of_order {
            self.ops.push_back(DispatchOp::Count(Counter::OutOfOrder, 1));
        }
    }

    fn report_gaps(&mut self, now: Instant) {
        if self.gapped.is_empty() {
            return;
        }
        let timeout = self.cfg.gap_timeout;
        let mut reported = 0;
        let gapped: Vec<u32> = self.gapped.iter().copied().collect();
        for p in gapped {
            let Producer { id, sequence: s, .. } = self.producers.get_mut(p);
            let old: Vec<u64> = s.gaps.iter().filter(|(_, (_, t))| now >= *t + timeout).map(|(f, _)| *f).collect();
            for first in old {
                let (last, _) = s.gaps.remove(&first).expect("listed");
                reported += 1;
                self.ops.push_back(DispatchOp::SuspectedLoss { producer: id.clone(), first, last });
            }
            if s.gaps.is_empty() {
                self.gapped.remove(&p);
            }
        }
        if reported > 0 {
            self.ops.push_back(DispatchOp::Count(Counter::Gaps, reported));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct D {
        id: Identity,
        token: u16,
        receipt: Option<String>,
    }

    impl Delivered for D {
        type Token = u16;
        fn identity(&self) -> Option<&Identity> {
            Some(&self.id)
        }
        fn token(&self) -> u16 {
            self.token
        }
        fn receipt(&self) -> Option<&str> {
            self.receipt.as_deref()
        }
    }

    fn d(seq: u64, token: u16, receipt: Option<&str>) -> D {
        D { id: Identity { producer: "p".into(), seq }, token, receipt: receipt.map(str::to_owned) }
    }

    fn receipts(e: &mut Dispatch<D>) -> Vec<(u16, u64, String)> {
        std::iter::from_fn(|| e.poll_op())
            .filter_map(|op| match op {
                DispatchOp::Receipt { token, identity, topic } => Some((token, identity.seq, topic)),
                _ => None,
            })
            .collect()
    }

    /// A receipt is owed once the inbox recorded the message, and again
    /// for a copy of something handled before (its first receipt may be
    /// what was lost), never for what asked for none.
    fn config(relay: bool) -> DispatchConfig {
        DispatchConfig {
            gap_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
            record_retry: Duration::from_secs(1),
            relay,
            shared: false,
            reask_after: Duration::from_millis(200),
            acks_ahead: 0,
        }
    }

    fn ops(e: &mut Dispatch<D>) -> Vec<DispatchOp<D, u16>> {
        std::iter::from_fn(|| e.poll_op()).collect()
    }

    fn from(producer: &str, seq: u64, token: u16) -> D {
        D { id: Identity { producer: producer.into(), seq }, token, receipt: None }
    }

    /// Producers interleaved in one batch keep apart: what the inbox
    /// holds of one says nothing of the other, a copy is a copy only of
    /// its own producer's number, and each producer's gaps are its own
    /// (the dispatcher finds a producer by comparing it with the one found
    /// last before it hashes: a stale "last" would mix them up).
    #[test]
    fn interleaved_producers_keep_their_own_sequences_and_copies() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let mut e: Dispatch<D> = Dispatch::new(config(false), [("a".to_owned(), 5)]);
        let items = vec![from("a", 5, 1), from("b", 5, 2), from("a", 6, 3), from("b", 8, 4), from("a", 6, 5)];
        // Only a's 5 is at or below what the inbox holds.
        assert_eq!(e.to_ask(&items), vec![("a".to_owned(), 5)]);
        e.handle_delivered(items, &[true], now);
        let first = ops(&mut e);
        let handed: Vec<(String, u64)> = first
            .iter()
            .filter_map(|op| match op {
                DispatchOp::HandOver { delivery, .. } => Some((delivery.id.producer.clone(), delivery.id.seq)),
                _ => None,
            })
            .collect();
        assert_eq!(handed, vec![("b".to_owned(), 5), ("a".to_owned(), 6), ("b".to_owned(), 8)]);
        // a's 5 was handled before; the second a 6 is a copy of the one handed over.
        assert!(first.contains(&DispatchOp::AckBroker(1)), "{first:?}");
        assert!(first.contains(&DispatchOp::Count(Counter::Duplicates, 2)), "{first:?}");
        // Handled and recorded: a's 6 and its copy are acknowledged, b's are not yet.
        e.handle_acks([(3, Some(Identity { producer: "a".into(), seq: 6 }))]);
        let Some(DispatchOp::Record(batch)) = ops(&mut e).into_iter().find(|op| matches!(op, DispatchOp::Record(_)))
        else {
            panic!("no record asked for");
        };
        e.handle_recorded(batch, true, now);
        let acked: Vec<u16> = ops(&mut e)
            .into_iter()
            .filter_map(|op| match op {
                DispatchOp::AckBroker(t) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(acked, vec![3, 5]);
        let handling: Vec<(String, u64)> = e.handling().map(|(p, s)| (p.to_owned(), s)).collect();
        assert_eq!(handling.len(), 2);
        assert!(handling.contains(&("b".to_owned(), 5)) && handling.contains(&("b".to_owned(), 8)));
        // b's 6 and 7 are missing, a has no gap: one loss, b's.
        e.handle_timeout(Now { at: now.at + Duration::from_secs(31), wall_ms: 31_000 });
        let losses: Vec<_> =
            ops(&mut e).into_iter().filter(|op| matches!(op, DispatchOp::SuspectedLoss { .. })).collect();
        assert_eq!(losses, vec![DispatchOp::SuspectedLoss { producer: "b".into(), first: 6, last: 7 }]);
        assert_eq!(e.poll_timeout(), None);
    }

    /// A relay never acknowledges ahead of the record, whatever its room:
    /// a second copy it hands over (one asking for a receipt) would share
    /// the identity, and its ack must not stand for the first's.
    #[test]
    fn a_relay_acknowledges_only_once_recorded() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let mut e: Dispatch<D> = Dispatch::new(DispatchConfig { acks_ahead: 4, ..config(true) }, [("p".to_owned(), 1)]);
        e.handle_delivered(vec![d(2, 10, Some("r/p"))], &[], now);
        let _ = ops(&mut e);
        e.handle_acks([(10, Some(d(2, 0, None).id))]);
        let got = ops(&mut e);
        assert!(!got.iter().any(|op| matches!(op, DispatchOp::AckBroker(_))), "{got:?}");
        let batch = got.into_iter().find_map(|op| match op {
            DispatchOp::Record(b) => Some(b),
            _ => None,
        });
        e.handle_recorded(batch.expect("a record"), true, now);
        assert_eq!(ops(&mut e), [DispatchOp::AckBroker(10)]);
    }

    /// While a record is under way, what the application acknowledges
    /// waits and goes in one record when it ends: records are as few as
    /// the store's commits, not as the application's acks.
    #[test]
    fn acks_during_a_record_go_together_in_the_next() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let mut e: Dispatch<D> = Dispatch::new(config(false), [("p".to_owned(), 1)]);
        e.handle_delivered((2..6).map(|s| d(s, s as u16, None)).collect(), &[], now);
        let _ = ops(&mut e);
        let records = |ops: Vec<DispatchOp<D, u16>>| -> Vec<Vec<u64>> {
            ops.into_iter()
                .filter_map(|op| match op {
                    DispatchOp::Record(b) => Some(b.ids.iter().map(|(i, _)| i.seq).collect()),
                    _ => None,
                })
                .collect()
        };
        e.handle_acks([(2, Some(d(2, 0, None).id))]);
        assert_eq!(records(ops(&mut e)), [vec![2]]);
        e.handle_acks([(3, Some(d(3, 0, None).id))]);
        e.handle_acks([(4, Some(d(4, 0, None).id)), (5, Some(d(5, 0, None).id))]);
        assert_eq!(records(ops(&mut e)), Vec::<Vec<u64>>::new(), "the first record is under way");
        assert_eq!(e.recording(), 2);
        e.handle_recorded(Record::synced(vec![(d(2, 0, None).id, 2)]), true, now);
        let got = ops(&mut e);
        assert_eq!(got[0], DispatchOp::AckBroker(2));
        assert_eq!(records(got), [vec![3, 4, 5]]);
    }

    /// With room ahead, the broker's acknowledgement leaves when the
    /// application acknowledges (with the copies held meanwhile, and any
    /// copy arriving before the record lands); the receipt still waits for
    /// the record. Without room, acknowledgements wait for the record, and
    /// a failed record keeps its identities counted against the room.
    #[test]
    fn acks_leave_ahead_of_the_record_within_their_room_and_receipts_never_do() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let mut e: Dispatch<D> =
            Dispatch::new(DispatchConfig { acks_ahead: 2, ..config(false) }, [("p".to_owned(), 1)]);
        e.handle_delivered(vec![d(2, 10, Some("r/p")), d(3, 11, None), d(4, 12, None), d(2, 20, None)], &[], now);
        let _ = ops(&mut e);
        e.handle_acks([(10, Some(d(2, 0, None).id)), (11, Some(d(3, 0, None).id)), (12, Some(d(4, 0, None).id))]);
        let got = ops(&mut e);
        let acked: Vec<u16> = got
            .iter()
            .filter_map(|op| match op {
                DispatchOp::AckBroker(t) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(acked, [10, 20, 11], "seq 2 (and its copy) and 3 at once; 4 is beyond the room");
        assert!(!got.iter().any(|op| matches!(op, DispatchOp::Receipt { .. })), "{got:?}");
        let batch = got
            .into_iter()
            .find_map(|op| match op {
                DispatchOp::Record(b) => Some(b),
                _ => None,
            })
            .expect("a record");
        // A copy of 3 arrives while its record is under way: acknowledged
        // as it comes, not handed over.
        e.handle_delivered(vec![d(3, 21, None)], &[], now);
        assert_eq!(ops(&mut e), [DispatchOp::AckBroker(21), DispatchOp::Count(Counter::Duplicates, 1)]);
        // The record fails: nothing more is acknowledged, the room stays taken.
        e.handle_recorded(batch, false, now);
        assert_eq!(ops(&mut e), []);
        e.handle_delivered(vec![d(5, 13, None)], &[], now);
        let _ = ops(&mut e);
        e.handle_acks([(13, Some(d(5, 0, None).id))]);
        assert!(!ops(&mut e).iter().any(|op| matches!(op, DispatchOp::AckBroker(_))));
        // Tried again, it lands: 4 is acknowledged now, 2 and 3 not again,
        // and 2's receipt leaves.
        let later = Now { at: now.at + Duration::from_secs(1), wall_ms: 1000 };
        e.handle_timeout(later);
        let Some(DispatchOp::Record(batch)) = e.poll_op() else { panic!("tried again") };
        e.handle_recorded(batch, true, later);
        assert_eq!(
            ops(&mut e),
            [
                DispatchOp::Receipt { token: 10, identity: d(2, 0, None).id, topic: "r/p".into() },
                DispatchOp::AckBroker(12)
            ]
        );
        // 5 was handled while the room was full: it waited for its record.
        e.handle_recorded(Record::synced(vec![(d(5, 0, None).id, 13)]), true, later);
        assert_eq!(ops(&mut e), [DispatchOp::AckBroker(13)]);
        assert_eq!(e.recording(), 0);
    }

    /// A record of identities all acknowledged ahead goes without a sync,
    /// and frees their room as any record does; a synced record follows
    /// once `UNSYNCED_ROOMS` rooms of them went unsynced, and whenever an
    /// acknowledgement or a receipt waits (a copy that asks for a receipt
    /// while its identity's unsynced record is under way included). So a
    /// power cut takes back the records of at most that many identities
    /// acknowledged ahead.
    #[test]
    fn records_of_what_was_acknowledged_ahead_go_unsynced_up_to_a_bound() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let mut e: Dispatch<D> =
            Dispatch::new(DispatchConfig { acks_ahead: 2, ..config(false) }, [("p".to_owned(), 1)]);
        e.handle_delivered((2..=40).map(|s| d(s, s as u16, None)).collect(), &[], now);
        let _ = ops(&mut e);
        let split = |got: Vec<DispatchOp<D, u16>>| {
            let mut acked = Vec::new();
            let mut record = None;
            for op in got {
                match op {
                    DispatchOp::AckBroker(t) => acked.push(t),
                    DispatchOp::Record(r) => record = Some(r),
                    _ => {}
                }
            }
            (acked, record)
        };
        let seqs = |r: &Record<u16>| r.ids.iter().map(|(i, _)| i.seq).collect::<Vec<_>>();
        let ack = |e: &mut Dispatch<D>, seqs: &[u64]| {
            e.handle_acks(seqs.iter().map(|s| (*s as u16, Some(d(*s, 0, None).id))))
        };
        // One at a time, each acknowledged ahead: unsynced records, until
        // the next would leave more than 4 rooms of 2 (8) unsynced.
        let mut synced = Vec::new();
        for seq in 2..=19 {
            ack(&mut e, &[seq]);
            let (acked, r) = split(ops(&mut e));
            let r = r.expect("a record");
            assert_eq!((acked, seqs(&r)), (vec![seq as u16], vec![seq]));
            if r.sync {
                synced.push(seq);
            }
            e.handle_recorded(r, true, now);
            assert_eq!(ops(&mut e), []);
        }
        assert_eq!(UNSYNCED_ROOMS * 2, 8);
        assert_eq!(synced, [10, 19], "every ninth: eight unsynced, then one synced that covers them");
        // Beyond the room, an acknowledgement waits: its record is synced.
        ack(&mut e, &[20, 21, 22]);
        let (acked, r) = split(ops(&mut e));
        let r = r.expect("a record");
        assert_eq!((acked, seqs(&r), r.sync), (vec![20, 21], vec![20, 21, 22], true));
        e.handle_recorded(r, true, now);
        assert_eq!(ops(&mut e), [DispatchOp::AckBroker(22)]);
        // 23 goes ahead, unsynced; a copy of it asks for a receipt while its
        // record is under way: acknowledged at once, and its receipt waits
        // for a synced record of 23.
        ack(&mut e, &[23]);
        let (acked, f) = split(ops(&mut e));
        let f = f.expect("a record");
        assert_eq!((acked, f.sync), (vec![23], false));
        e.handle_delivered(vec![d(23, 63, Some("r/p"))], &[], now);
        assert_eq!(ops(&mut e), [DispatchOp::AckBroker(63), DispatchOp::Count(Counter::Duplicates, 1)]);
        e.handle_recorded(f, true, now);
        let got = ops(&mut e);
        assert!(!got.iter().any(|op| matches!(op, DispatchOp::Receipt { .. })), "{got:?}");
        let (_, g) = split(got);
        let g = g.expect("23 again, synced");
        assert_eq!((seqs(&g), g.sync), (vec![23], true));
        e.handle_recorded(g, true, now);
        assert_eq!(receipts(&mut e), [(23, 23, "r/p".to_owned())]);
        assert_eq!(e.recording(), 0);
        // The room is whole again: 24 and 25 go ahead.
        ack(&mut e, &[24, 25]);
        let (acked, h) = split(ops(&mut e));
        let h = h.expect("a record");
        assert_eq!((acked, h.sync), (vec![24, 25], false));
        e.handle_recorded(h, true, now);
        // A synced record that fails covers nothing: the one after it is
        // synced too.
        for seq in 26..=31 {
            ack(&mut e, &[seq]);
            let (_, r) = split(ops(&mut e));
            let r = r.expect("a record");
            assert!(!r.sync, "{seq}");
            e.handle_recorded(r, true, now);
        }
        ack(&mut e, &[32]);
        let (_, r) = split(ops(&mut e));
        let r = r.expect("a record");
        assert!(r.sync, "24 to 31 went unsynced");
        e.handle_recorded(r, false, now);
        ack(&mut e, &[33]);
        let (acked, r) = split(ops(&mut e));
        let r = r.expect("a record");
        assert_eq!((acked, r.sync), (vec![33], true));
        e.handle_recorded(r, true, now);
        // An unsynced record that fails is tried again synced: it lands
        // after records counted without it.
        ack(&mut e, &[34]);
        let (_, r) = split(ops(&mut e));
        let r = r.expect("a record");
        assert!(!r.sync);
        e.handle_recorded(r, false, now);
        let later = Now { at: now.at + Duration::from_secs(1), wall_ms: 1000 };
        e.handle_timeout(later);
        let (_, r) = split(ops(&mut e));
        let r = r.expect("tried again");
        assert_eq!((seqs(&r), r.sync), (vec![34], true));
    }

    /// A copy another member holds a claim on is held, unacknowledged,
    /// then asked about again: handled there by then, it is acknowledged
    /// as a duplicate; the claim expired, it is handed over here.
    #[test]
    fn a_copy_claimed_elsewhere_waits_then_is_a_duplicate_or_handed_over() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let shared = DispatchConfig { shared: true, ..config(false) };
        let mut e: Dispatch<D> = Dispatch::new(shared, []);
        e.handle_answers(vec![d(1, 1, None), d(2, 2, None)], &[Answer::Elsewhere, Answer::Elsewhere], now);
        assert_eq!(e.poll_op(), None, "held: neither handed over nor acknowledged");
        assert_eq!(e.poll_timeout(), Some(now.at + Duration::from_millis(200)));
        let later = Now { at: now.at + Duration::from_millis(200), wall_ms: 200 };
        e.handle_timeout(later);
        let Some(DispatchOp::Ask(held)) = e.poll_op() else { panic!("asked again") };
        assert_eq!(held.iter().map(|d| d.id.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(e.to_ask(&held).len(), 2);
        e.handle_answers(held, &[Answer::Handled, Answer::New], later);
        let ops: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        assert!(ops.contains(&DispatchOp::AckBroker(1)), "{ops:?}");
        assert!(
            ops.iter().any(|op| matches!(op, DispatchOp::HandOver { delivery, .. } if delivery.id.seq == 2)),
            "{ops:?}"
        );
        assert!(!ops.iter().any(|op| matches!(op, DispatchOp::HandOver { delivery, .. } if delivery.id.seq == 1)));
    }

    /// A group member's claim for a copy may be answered after the first
    /// copy was handled and recorded (claims are asked while earlier
    /// deliveries are handled): a late `New` for what it just recorded is
    /// a duplicate, not a second hand-over.
    #[test]
    fn a_late_answer_for_what_was_just_recorded_is_a_duplicate() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let shared = DispatchConfig { shared: true, ..config(false) };
        let mut e: Dispatch<D> = Dispatch::new(shared, []);
        e.handle_answers(vec![d(1, 1, None)], &[Answer::New], now);
        let _: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        e.handle_acks([(1, Some(d(1, 0, None).id))]);
        let batch = std::iter::from_fn(|| e.poll_op())
            .find_map(|op| match op {
                DispatchOp::Record(b) => Some(b),
                _ => None,
            })
            .expect("a record");
        e.handle_recorded(batch, true, now);
        let _: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        // The copy through the other broker, claimed before the record.
        e.handle_answers(vec![d(1, 2, None)], &[Answer::New], now);
        let ops: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        assert!(ops.contains(&DispatchOp::AckBroker(2)), "{ops:?}");
        assert!(!ops.iter().any(|op| matches!(op, DispatchOp::HandOver { .. })), "{ops:?}");
    }

    /// A group member asks the shared inbox about every identity, even
    /// above what it handled itself (another member may have handled it),
    /// and reports no gap of its own: the missing numbers are the others'
    /// share.
    #[test]
    fn a_group_member_asks_about_everything_and_reports_no_gap_of_its_own() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let shared = DispatchConfig { shared: true, ..config(false) };
        let mut e: Dispatch<D> = Dispatch::new(shared, [("p".to_owned(), 5)]);
        let items = vec![d(3, 1, None), d(9, 2, None), d(20, 3, None)];
        assert_eq!(e.to_ask(&items).len(), 3);
        // The inbox says 9 was handled by another member.
        e.handle_delivered(items, &[false, true, false], now);
        let ops: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        assert!(ops.contains(&DispatchOp::AckBroker(2)), "{ops:?}");
        let handed: Vec<u64> = ops
            .iter()
            .filter_map(|op| match op {
                DispatchOp::HandOver { delivery, .. } => Some(delivery.id.seq),
                _ => None,
            })
            .collect();
        assert_eq!(handed, vec![3, 20]);
        let later = Now { at: now.at + Duration::from_secs(60), wall_ms: 60_000 };
        e.handle_timeout(later);
        let ops: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        assert!(!ops.iter().any(|op| matches!(op, DispatchOp::SuspectedLoss { .. })), "{ops:?}");
        assert_eq!(e.poll_timeout(), None);
    }

    #[test]
    fn a_receipt_follows_the_inbox_record_and_answers_every_later_copy() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let mut e: Dispatch<D> = Dispatch::new(config(false), [("p".to_owned(), 1)]);
        e.handle_delivered(vec![d(2, 10, Some("r/p")), d(3, 11, None)], &[], now);
        assert!(receipts(&mut e).is_empty(), "nothing is owed while in the application's hands");
        e.handle_acks([(10, Some(d(2, 0, None).id)), (11, Some(d(3, 0, None).id))]);
        let batch = std::iter::from_fn(|| e.poll_op())
            .find_map(|op| match op {
                DispatchOp::Record(b) => Some(b),
                _ => None,
            })
            .unwrap();
        e.handle_recorded(batch, true, now);
        assert_eq!(receipts(&mut e), [(10, 2, "r/p".to_owned())]);
        // A copy of seq 1, which the inbox holds.
        e.handle_delivered(vec![d(1, 12, Some("r/p"))], &[true], now);
        assert_eq!(receipts(&mut e), [(12, 1, "r/p".to_owned())]);
    }

    /// A relay owes no receipt, and passes on again a copy of what it
    /// handled when the copy asks for a receipt (its producer got none);
    /// a copy that asks for none is dropped as by any consumer.
    #[test]
    fn a_relay_passes_on_again_what_its_producer_publishes_again_for_lack_of_a_receipt() {
        let now = Now { at: Instant::now(), wall_ms: 0 };
        let mut e: Dispatch<D> = Dispatch::new(config(true), [("p".to_owned(), 1)]);
        e.handle_delivered(vec![d(2, 10, Some("r/p"))], &[], now);
        e.handle_acks([(10, Some(d(2, 0, None).id))]);
        let ops: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        let batch = ops.iter().find_map(|op| match op {
            DispatchOp::Record(b) => Some(b.clone()),
            _ => None,
        });
        e.handle_recorded(batch.expect("recorded"), true, now);
        assert!(receipts(&mut e).is_empty(), "a relay sends no receipt");
        e.handle_delivered(vec![d(1, 12, Some("r/p")), d(1, 13, None)], &[true, true], now);
        let ops: Vec<_> = std::iter::from_fn(|| e.poll_op()).collect();
        assert_eq!(
            ops,
            [
                DispatchOp::HandOver { delivery: d(1, 12, Some("r/p")), redelivered: true },
                DispatchOp::AckBroker(13),
                DispatchOp::Count(Counter::Duplicates, 1),
            ]
        );
    }
}
