//! What the outbox is told: its bounds and what happens when one is
//! reached (the overflow policy), how many brokers must acknowledge the
//! messages of each route (the quorum), and the bounds of a consumer's
//! inbox.

pub use steadfast_core::engine::{Overflow, UnknownOverflow};

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
    /// Fanout: every member is sent every message (failover and balance
    /// send each message to one member at a time). A member's refusal for
    /// good then moves a message aside only once the members left cannot
    /// meet `need`.
    pub fanout: bool,
    /// Fanout: once a message is this old and at least one member
    /// acknowledged it, it leaves; the members that had not are counted as
    /// having missed it.
    pub catch_up_ms: Option<u64>,
}

impl Quorum {
    pub(super) fn mask(&self) -> u64 {
        self.members.iter().fold(0, |m, (s, _)| m | 1u64 << s)
    }
}

/// Bounds of a consumer's inbox (G7): the oldest identities are forgotten
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxBounds {
    /// Identities handled longer ago than this are forgotten.
    pub max_age_ms: u64,
    /// At most this many identities.
    pub max_count: u64,
    /// At most this many bytes ([`crate::InboxStore::inbox_bytes`]).
    pub max_bytes: Option<u64>,
}
