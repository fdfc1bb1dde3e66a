//! The requests the handle sends to the writer thread: one channel for
//! all of them, in order, each carrying its own reply channel where the
//! caller waits for an answer.

use std::sync::Arc;

use steadfast_core::{DropReason, Stage};
use tokio::sync::oneshot;

use super::{AppendError, Configured, DefaultSet, Delivery, Glance, Handling, InboxBounds, Quorum, Report, Source};
use crate::{BrokerRecord, NewMessage, PoisonCause, StoreError, StoredMessage};

pub(super) enum Request {
    Append {
        /// Shared from the start: the store keeps this allocation in its
        /// tail, and the channel moves a pointer, not the message (its
        /// blocks hold 31 requests each, allocated and zeroed as it grows).
        msg: Arc<NewMessage>,
        reply: oneshot::Sender<Result<u64, AppendError>>,
        delivery: Option<oneshot::Sender<Delivery>>,
        handled: Option<oneshot::Sender<Handling>>,
        source: Option<Source>,
        /// When it was sent: its acceptance time is measured from here.
        at: std::time::Instant,
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
    Poison {
        slot: u32,
        id: u64,
        cause: PoisonCause,
    },
    GetMeta {
        key: String,
        reply: oneshot::Sender<Result<Option<String>, StoreError>>,
    },
    Poisoned {
        reply: oneshot::Sender<Result<Vec<crate::Poisoned>, StoreError>>,
    },
    Unpoison {
        ids: Option<Vec<u64>>,
        delete: bool,
        reply: IdsReply,
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
    /// A link's standing read: answered once a commit gives it something
    /// to read (see [`super::Outbox::next_page`]).
    Follow(Follow),
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
        set: DefaultSet,
        reply: SlotReply,
    },
    Broker(BrokerRecord),
    InboxSeen {
        ids: Vec<(String, u64)>,
        reply: oneshot::Sender<Result<Vec<bool>, StoreError>>,
    },
    InboxRecord {
        runs: Vec<crate::InboxRun>,
        /// Synced before the reply; without, committed as bookkeeping is.
        synced: bool,
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
    Receipt {
        receipt: steadfast_core::ConsumerReceipt,
        reply: oneshot::Sender<Result<(), StoreError>>,
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

impl Request {
    /// A removal or an acknowledgement: kept to apply again when its
    /// commit failed (an acknowledged message must still leave).
    pub(super) fn is_removal(&self) -> bool {
        matches!(self, Request::Remove { .. } | Request::Ack { .. })
    }

    /// A read: changes nothing. A report is answered from what is
    /// committed; a page of messages from what the writer's connection
    /// sees, a transaction left open included.
    pub(super) fn is_read(&self) -> bool {
        matches!(
            self,
            Request::Read { .. }
                | Request::Follow(_)
                | Request::Query { .. }
                | Request::Glance { .. }
                | Request::Bound { .. }
                | Request::InboxSeen { .. }
                | Request::Poisoned { .. }
                | Request::GetMeta { .. }
        )
    }

    /// A read that reports on the outbox (not a page of messages): it
    /// reads the summary and counts written at a commit, so it is answered
    /// between transactions only.
    pub(super) fn reports(&self) -> bool {
        self.is_read() && !matches!(self, Request::Read { .. } | Request::Follow(_))
    }

    /// What a batch may commit without a sync: a read, bookkeeping
    /// (counters, broker states, attempts, metadata nobody waits for), and
    /// a broker's acknowledgements. A power loss can take these back, and
    /// nothing a promise rests on goes with them: an acknowledgement lost
    /// so only sends its message again after the restart (under the same
    /// identity, which an inbox removes), as a crash before it was written
    /// would. The writer bounds how long such commits go unsynced, and
    /// syncs a batch that may admit waiting publishers (docs/design.md,
    /// "The writer thread").
    pub(super) fn is_bookkeeping(&self) -> bool {
        self.is_read()
            || matches!(
                self,
                Request::Counter { .. }
                    | Request::Broker(_)
                    | Request::Attempt { .. }
                    | Request::SetMeta { .. }
                    | Request::Ack { .. }
                    | Request::InboxRecord { synced: false, .. }
            )
    }
}

/// A link's standing read, parked in the writer until it can be answered.
pub(super) struct Follow {
    pub(super) want: steadfast_core::engine::ReadWant,
    /// The requeue count the link last saw: a different one answers at
    /// once, with nothing read (the link must read again from the oldest).
    pub(super) requeued: u64,
    pub(super) limit: crate::ReadLimit,
    pub(super) slot: u32,
    pub(super) reply: oneshot::Sender<Result<Option<super::Page>, StoreError>>,
}

/// A message on its way in, with the channels its publisher waits on.
pub(super) struct PendingAppend {
    pub(super) msg: Arc<NewMessage>,
    pub(super) reply: oneshot::Sender<Result<u64, AppendError>>,
    pub(super) delivery: Option<oneshot::Sender<Delivery>>,
    pub(super) handled: Option<oneshot::Sender<Handling>>,
    pub(super) source: Option<Source>,
    pub(super) at: std::time::Instant,
}

/// A reply to an append, and when the append was sent.
pub(super) type AcceptReply = (oneshot::Sender<Result<u64, AppendError>>, Result<u64, AppendError>, std::time::Instant);
pub(super) type HighReply = oneshot::Sender<Result<Vec<(String, u64)>, StoreError>>;
pub(super) type WireReply = oneshot::Sender<Result<Vec<u64>, StoreError>>;
pub(super) type IdsReply = oneshot::Sender<Result<Vec<u64>, StoreError>>;
pub(super) type SlotReply = oneshot::Sender<Result<Configured, StoreError>>;

#[cfg(test)]
mod tests {
    /// The writer's channel allocates and zeroes its blocks of 31
    /// requests as it grows, and moves each request in and out: an append
    /// carries its message behind a pointer, so a request stays small.
    #[test]
    fn a_request_stays_small() {
        // 136 bytes in session 20 (a message alone is 248).
        let size = std::mem::size_of::<super::Request>();
        assert!(size <= 160, "a request is {size} bytes");
    }
}
