//! Sans-I/O building blocks of steadfast.
//!
//! Nothing in this crate does I/O, reads a clock or owns a runtime: time is
//! passed in as `now`, randomness as a seeded generator. The tokio driver in
//! the `steadfast` crate feeds these state machines and carries out what they
//! decide.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod duration;
pub mod engine;
pub mod keepalive;
pub mod message;
pub mod mutate;
pub mod reason;
pub mod receipt;
pub mod rtt;
pub mod topic;
pub mod window;

pub use backoff::{Backoff, BackoffConfig, BackoffError};
pub use duration::{parse_duration, DurationError};
pub use keepalive::{KeepAlive, KeepAliveAction};
pub use message::{DropReason, Identity, Properties, PropertyError, Qos, MAX_PRIORITY, PRIORITIES};
pub use receipt::{ConsumerReceipt, Need, ReceiptBatcher, ReceiptRule, RuleError};
pub use rtt::{AckTimeout, RoundTrip};
pub use topic::{validate_topic_filter, validate_topic_name, FilterError, TopicError};
pub use window::{Inflight, Resume, SendWindow, Stage};
