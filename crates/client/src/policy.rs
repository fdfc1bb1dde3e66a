//! Delivery classes and the per-message policy (docs/guarantees.md,
//! "Delivery classes").

use std::time::Duration;

use steadfast_store::MAX_PRIORITY;

/// How hard steadfast tries to deliver a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Class {
    /// Sent (at QoS 0) if a broker that takes it is connected, never
    /// stored; counted as dropped (`best-effort`) otherwise.
    BestEffort,
    /// Stored, retried until acknowledged or until its time to live has
    /// passed, then dropped as `expired`. On MQTT 5 every send carries the
    /// time it has left as its message expiry interval.
    Deadline(Duration),
    /// Stored and retried until a broker acknowledged it (the default).
    #[default]
    Persistent,
}

impl Class {
    /// Parses the CLI form: `best-effort`, `deadline` (needs a TTL) or
    /// `persistent`.
    pub fn parse(name: &str, ttl: Option<Duration>) -> Result<Class, PolicyError> {
        match (name, ttl) {
            ("best-effort", _) => Ok(Class::BestEffort),
            ("persistent", None) => Ok(Class::Persistent),
            ("persistent", Some(_)) => Err(PolicyError::TtlWithoutDeadline),
            ("deadline", Some(t)) => Ok(Class::Deadline(t)),
            ("deadline", None) => Err(PolicyError::DeadlineWithoutTtl),
            (other, _) => Err(PolicyError::UnknownClass(other.to_owned())),
        }
    }

    /// Its name, as the CLI and status show it.
    pub fn name(self) -> &'static str {
        match self {
            Class::BestEffort => "best-effort",
            Class::Deadline(_) => "deadline",
            Class::Persistent => "persistent",
        }
    }
}

/// Delivery class, retry budget, keep-latest and priority of a message.
/// Set per client ([`crate::ClientConfig::policy`]), per route
/// ([`crate::BrokerSet::policy`]) and per message ([`crate::Message`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// The delivery class (default persistent).
    pub class: Class,
    /// At most this many sends; then it is dropped as `budget` (default:
    /// no budget). Every PUBLISH counts, to any broker.
    pub max_attempts: Option<u32>,
    /// Only the newest undelivered value of its topic is kept (telemetry
    /// conflation); the older ones are dropped as `superseded`.
    pub keep_latest: bool,
    /// 0 (default) to 9: after an outage, higher priorities are sent first.
    pub priority: u8,
}

impl Policy {
    /// Checks the values; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.priority > MAX_PRIORITY {
            return Err(PolicyError::Priority(self.priority));
        }
        if self.max_attempts == Some(0) {
            return Err(PolicyError::ZeroBudget);
        }
        if let Class::Deadline(ttl) = self.class {
            if ttl.is_zero() {
                return Err(PolicyError::ZeroTtl);
            }
        }
        Ok(())
    }

    /// What the outbox keeps of it, for a message accepted at `now_ms`.
    pub(crate) fn stored(&self, now_ms: u64) -> steadfast_store::Policy {
        steadfast_store::Policy {
            expires_ms: match self.class {
                Class::Deadline(ttl) => Some(now_ms.saturating_add(ttl.as_millis() as u64)),
                _ => None,
            },
            max_attempts: self.max_attempts,
            keep_latest: self.keep_latest,
            priority: self.priority,
        }
    }
}
/// Why a delivery policy is unusable; each says the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not one of the classes.
    #[error("`{0}` is not a delivery class; use best-effort, deadline or persistent")]
    UnknownClass(String),
    /// The deadline class without its time to live.
    #[error("the deadline class needs a time to live (for example 15s)")]
    DeadlineWithoutTtl,
    /// A time to live for a class that has none.
    #[error("a time to live applies to the deadline class only")]
    TtlWithoutDeadline,
    /// A time to live of zero.
    #[error("a deadline (time to live) must be above zero")]
    ZeroTtl,
    /// A priority above the highest.
    #[error("priority {0} is out of range; use 0 to {MAX_PRIORITY}")]
    Priority(u8),
    /// A retry budget of no attempt.
    #[error("a retry budget of 0 attempts would never send; use 1 or more, or no budget")]
    ZeroBudget,
}
