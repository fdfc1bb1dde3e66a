//! The delivery engine: every decision that keeps a message safe, as state
//! machines without I/O.
//!
//! An engine is driven from outside. Its inputs are method calls named
//! `handle_*` that carry the time as [`Now`]; its outputs are pulled with
//! `poll_*`: bytes to write ([`PublishSession::poll_transmit`]), store
//! operations to carry out ([`StoreOp`]), events to report, and the next
//! instant it needs to be woken ([`PublishSession::poll_timeout`]). A store
//! operation whose outcome matters is a request: the engine is told how it
//! went and never assumes that a write succeeded.
//!
//! The tokio driver of the `steadfast` crate and the deterministic
//! simulator (`crates/sim`) drive the same engine: the simulator proves the
//! decisions the product makes, not a copy of them.

mod admit;
mod commit;
mod inbox;
mod publish;
mod receive;
mod route;
mod sweep;

use std::time::Instant;

pub use admit::{admit, Admission, Bounds, Candidate, Limit, Overflow, Totals, UnknownOverflow};
pub use commit::accept_after_sync;
pub use inbox::{Answer, Counter, Delivered, Dispatch, DispatchConfig, DispatchOp, Record, UNSYNCED_ROOMS};
pub use publish::{
    Ack, Bound, ConnAckInfo, Connected, Downgrade, End, LinkEnd, PoisonCause, PublishSession, Queued, ReadLimit,
    ReadWant, SessionConfig, SessionEvent, StoreOp, WindowChange, Wire, WireUpdate,
};
pub use receive::{must_subscribe, AckWire, ReceiveSession};
pub use route::{quorum_met, Decision, Routes, Routing, SetSpec, Switch};
pub use sweep::{deadline_passed, expiry_cutoff, Sweep, SweepConfig, Sweeper};

/// The clocks an engine reads, handed in with every input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time: timers and timeouts.
    pub at: Instant,
    /// Wall-clock time in milliseconds since the Unix epoch: message
    /// deadlines, which outlive the process.
    pub wall_ms: u64,
}

/// Every timer an engine keeps, in one table: the engine's
/// `poll_timeout` is the earliest of them, and `handle_timeout` acts on
/// those that are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// Half the keep-alive interval of silence: PINGREQ; a whole interval:
    /// the link is dead.
    KeepAlive,
    /// Messages in flight and no acknowledgement for the ack timeout: the
    /// link is given up and what is in flight is sent again elsewhere or
    /// later.
    AckTimeout,
    /// A message the broker refused goes back into the queue.
    Retry,
    /// A consumer link that wrote nothing for half the keep-alive pings.
    PingIdle,
    /// A delivery the application gave back is handed over again.
    Redeliver,
    /// An inbox record that failed is tried again.
    Rerecord,
    /// A delivery another group member held a claim on: the inbox is
    /// asked about it again.
    Reask,
    /// A gap in a producer's sequence that did not fill is reported.
    Gap,
    /// Failover: a higher-priority broker has been up long enough to get
    /// the traffic back, or the old one's drain time is over.
    FailBack,
    /// The outbox looks for messages past their deadline, their age bound
    /// or a fanout catch-up window.
    Sweep,
}
