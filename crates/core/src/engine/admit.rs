//! Admission of a new message into a bounded outbox (G7): whether it fits
//! once the keep-latest values it replaces leave, and when it does not,
//! what its class's overflow policy decides. The outbox's writer finds the
//! numbers (what is queued, what the message replaces, what its class
//! holds) and carries the decision out.

use std::fmt;

/// Count and bytes of what an outbox holds (or of a part of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages queued.
    pub count: u64,
    /// Bytes queued (topic + payload).
    pub bytes: u64,
}

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
    /// Every policy, with its name.
    pub const ALL: [(Overflow, &'static str); 4] = [
        (Overflow::Block, "block"),
        (Overflow::Reject, "reject"),
        (Overflow::DropOldest, "drop-oldest"),
        (Overflow::DropNewest, "drop-newest"),
    ];

    /// The policy of that name; the error names the choices.
    pub fn parse(s: &str) -> Result<Overflow, UnknownOverflow> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(o, _)| *o).ok_or_else(|| UnknownOverflow(s.to_owned()))
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(o, _)| *o == self).map_or("block", |(_, n)| n)
    }
}

/// The bounds of an outbox (`None`: unbounded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounds {
    /// Most messages queued.
    pub max_messages: Option<u64>,
    /// Most bytes queued.
    pub max_bytes: Option<u64>,
}

/// The bound a message would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The message count.
    Messages(u64),
    /// The byte count.
    Bytes(u64),
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Messages(n) => write!(f, "{n} messages"),
            Limit::Bytes(n) => write!(f, "{n} bytes"),
        }
    }
}

impl Bounds {
    /// The bound that one more message of `extra` bytes would break, with
    /// `queued` in the outbox once `freed` left.
    pub fn broken_by(&self, extra: u64, queued: Totals, freed: Totals) -> Option<Limit> {
        let count = queued.count.saturating_sub(freed.count);
        let bytes = queued.bytes.saturating_sub(freed.bytes);
        if let Some(max) = self.max_messages.filter(|m| count + 1 > *m) {
            return Some(Limit::Messages(max));
        }
        if let Some(max) = self.max_bytes.filter(|m| bytes + extra > *m) {
            return Some(Limit::Bytes(max));
        }
        None
    }
}

/// A message asking to be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its size (topic + payload).
    pub size: u64,
    /// What the keep-latest values it replaces take (they leave with its
    /// insertion, and only then).
    pub replaces: Totals,
    /// The part of `replaces` in its own class (deadline or not).
    pub replaces_own: Totals,
    /// Its class's overflow policy.
    pub overflow: Overflow,
}

/// What becomes of a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It fits: the values it replaces leave, it is queued.
    Admit,
    /// Refused: it alone is over the byte bound, whatever the policy.
    TooBigAlone(Limit),
    /// Refused with an error (`reject`).
    Refuse(Limit),
    /// The publisher waits for room (`block`).
    Wait,
    /// The values it replaces leave, then its class's oldest until it fits
    /// (`drop-oldest`); if it still does not, it is dropped.
    Evict(Limit),
    /// It is dropped, nothing queued is touched (`drop-newest`, or
    /// `drop-oldest` when even its whole class could not make room: never
    /// two losses where one would do).
    DropNew(Limit),
}

/// Decides a candidate's admission. `queued` is what the outbox holds;
/// `class` answers what its class holds (asked only for `drop-oldest`).
pub fn admit<E>(
    bounds: Bounds,
    queued: Totals,
    c: Candidate,
    class: impl FnOnce() -> Result<Totals, E>,
) -> Result<Admission, E> {
    let Some(bound) = bounds.broken_by(c.size, queued, c.replaces) else { return Ok(Admission::Admit) };
    if bounds.max_bytes.is_some_and(|m| c.size > m) {
        return Ok(Admission::TooBigAlone(bound));
    }
    Ok(match c.overflow {
        Overflow::Reject => Admission::Refuse(bound),
        Overflow::Block => Admission::Wait,
        Overflow::DropNewest => Admission::DropNew(bound),
        Overflow::DropOldest => {
            let class = class()?;
            let all = Totals {
                count: class.count + c.replaces.count - c.replaces_own.count,
                bytes: class.bytes + c.replaces.bytes - c.replaces_own.bytes,
            };
            match bounds.broken_by(c.size, queued, all) {
                None => Admission::Evict(bound),
                Some(_) => Admission::DropNew(bound),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(count: u64, bytes: u64) -> Totals {
        Totals { count, bytes }
    }

    fn candidate(size: u64, overflow: Overflow) -> Candidate {
        Candidate { size, replaces: Totals::default(), replaces_own: Totals::default(), overflow }
    }

    fn decide(bounds: Bounds, queued: Totals, c: Candidate, class: Totals) -> Admission {
        admit::<()>(bounds, queued, c, || Ok(class)).expect("no error")
    }

    #[test]
    fn each_policy_decides_when_the_outbox_is_full() {
        let b = Bounds { max_messages: Some(3), max_bytes: None };
        let full = t(3, 30);
        let m = Limit::Messages(3);
        assert_eq!(decide(b, t(2, 20), candidate(10, Overflow::Reject), t(0, 0)), Admission::Admit);
        assert_eq!(decide(b, full, candidate(10, Overflow::Reject), t(3, 30)), Admission::Refuse(m));
        assert_eq!(decide(b, full, candidate(10, Overflow::Block), t(3, 30)), Admission::Wait);
        assert_eq!(decide(b, full, candidate(10, Overflow::DropNewest), t(3, 30)), Admission::DropNew(m));
        assert_eq!(decide(b, full, candidate(10, Overflow::DropOldest), t(3, 30)), Admission::Evict(m));
    }

    #[test]
    fn drop_oldest_never_makes_two_losses_where_one_would_do() {
        let b = Bounds { max_messages: None, max_bytes: Some(100) };
        // The class holds 20 bytes of the 95 queued: dropping all of it
        // still leaves no room for 40 more.
        let c = candidate(40, Overflow::DropOldest);
        assert_eq!(decide(b, t(5, 95), c, t(1, 20)), Admission::DropNew(Limit::Bytes(100)));
        assert_eq!(decide(b, t(5, 95), c, t(3, 60)), Admission::Evict(Limit::Bytes(100)));
    }

    #[test]
    fn a_message_alone_over_the_byte_bound_is_refused_whatever_the_policy() {
        let b = Bounds { max_messages: None, max_bytes: Some(100) };
        let a = decide(b, t(0, 0), candidate(101, Overflow::DropOldest), t(0, 0));
        assert_eq!(a, Admission::TooBigAlone(Limit::Bytes(100)));
    }

    #[test]
    fn the_values_it_replaces_make_room() {
        let b = Bounds { max_messages: Some(3), max_bytes: None };
        let c = Candidate { replaces: t(1, 10), replaces_own: t(1, 10), ..candidate(10, Overflow::Reject) };
        assert_eq!(decide(b, t(3, 30), c, t(0, 0)), Admission::Admit);
    }
}
