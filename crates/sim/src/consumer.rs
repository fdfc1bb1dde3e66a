//! The consumer process: its inbox (what is committed survives a crash,
//! but what a record without a sync committed only once a synced record
//! followed it: a crash here may be a power cut), the dispatch engine that
//! the real consumer runs, and an application that takes a while to handle
//! each delivery.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use steadfast_core::engine::{Delivered, Dispatch, DispatchConfig, Record as InboxRecord};
use steadfast_core::Identity;

/// The producer's id in every identity.
pub const PRODUCER: &str = "sim-producer";

/// Where a delivery's acknowledgement goes: the broker, its connection's
/// number and the packet id.
pub type Token = (usize, u64, u16);

/// A delivery as the engine sees it.
#[derive(Debug, Clone)]
pub struct Del {
    pub id: u64,
    pub identity: Identity,
    pub token: Token,
    /// Its producer asks for a receipt.
    pub receipt: bool,
}

impl Delivered for Del {
    type Token = Token;
    fn identity(&self) -> Option<&Identity> {
        Some(&self.identity)
    }
    fn token(&self) -> Token {
        self.token
    }
    fn receipt(&self) -> Option<&str> {
        self.receipt.then_some("receipts/sim-producer")
    }
}

/// An inbox record under way: when it lands, and, synced, the number of
/// unsynced landings before it was asked for (what its sync covers).
pub type Record = (u64, u64, InboxRecord<Token>);

/// The consumer process.
pub struct Consumer {
    pub engine: Option<Dispatch<Del>>,
    /// Identities in the inbox (those in `unsynced` too).
    pub inbox: BTreeSet<u64>,
    /// Identities recorded without a sync, in the order they landed (with
    /// the landing's number), that no synced record covers yet.
    pub unsynced: VecDeque<(u64, u64)>,
    /// Unsynced landings so far.
    pub landings: u64,
    /// Deliveries in the application's hands, and when it is done with each.
    pub app: VecDeque<(u64, Del)>,
    /// Inbox records being written.
    pub records: VecDeque<Record>,
    /// Identities whose record failed, waiting for the engine to try again.
    pub rerecord: BTreeSet<u64>,
    /// Per broker, the current connection's number (acks of older ones
    /// are void).
    pub epochs: Vec<u64>,
    /// Acknowledgements that may leave ahead of their record.
    acks_ahead: usize,
}

impl Consumer {
    pub fn new(brokers: usize, acks_ahead: usize) -> Self {
        let mut c = Consumer {
            engine: None,
            inbox: BTreeSet::new(),
            unsynced: VecDeque::new(),
            landings: 0,
            app: VecDeque::new(),
            records: VecDeque::new(),
            rerecord: BTreeSet::new(),
            epochs: vec![0; brokers],
            acks_ahead,
        };
        c.start();
        c
    }

    /// The engine's settings.
    fn config(&self) -> DispatchConfig {
        DispatchConfig {
            gap_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
            record_retry: Duration::from_secs(1),
            relay: false,
            shared: false,
            reask_after: Duration::from_millis(200),
            acks_ahead: self.acks_ahead,
        }
    }

    /// The process starts on its inbox.
    pub fn start(&mut self) {
        let high = self.inbox.last().map(|s| (PRODUCER.to_owned(), *s));
        self.engine = Some(Dispatch::new(self.config(), high));
    }

    /// kill -9 (or a power cut): the engine and the application's work are
    /// gone; a record being written either landed whole or not at all (the
    /// commit is atomic, and the process never learned which). Returns the
    /// identities handled whose record did not land, and those whose
    /// record landed without a sync and was taken back.
    pub fn crash(&mut self, rng: &mut fastrand::Rng) -> (Vec<u64>, Vec<u64>) {
        // Handled identities waiting in the engine for the record under
        // way, and failed records waiting to be tried again: gone too.
        let waiting: Vec<u64> = self.engine.take().map_or_else(Vec::new, |e| e.to_record().map(|i| i.seq).collect());
        self.app.clear();
        let mut unwritten: Vec<u64> = std::mem::take(&mut self.rerecord).into_iter().collect();
        unwritten.extend(waiting);
        for (_, _, record) in self.records.drain(..) {
            let ids = record.ids.into_iter().map(|(i, _)| i.seq);
            if rng.bool() {
                self.inbox.extend(ids);
            } else {
                unwritten.extend(ids);
            }
        }
        // A power cut: what no sync covered may be gone, each record's
        // identities or not (modelled per identity: a superset).
        let mut taken_back = Vec::new();
        for (_, seq) in self.unsynced.drain(..) {
            if rng.bool() {
                self.inbox.remove(&seq);
                taken_back.push(seq);
            }
        }
        (unwritten, taken_back)
    }

    /// How many identities acknowledged ahead may be recorded without a
    /// sync that covers them: what a power cut may take back of records
    /// that landed (docs/guarantees.md, "Consumers").
    pub fn unsynced_bound(&self) -> usize {
        self.config().unsynced_at_most()
    }

    pub fn alive(&self) -> bool {
        self.engine.is_some()
    }

    /// Nothing in the application's hands or being written.
    pub fn idle(&self) -> bool {
        self.app.is_empty() && self.records.is_empty() && self.engine.as_ref().is_none_or(|e| e.recording() == 0)
    }
}
