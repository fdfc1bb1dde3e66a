//! End-to-end receipts (docs/design.md, "Receipts"): what a producer asks
//! of its consumers, the receipt a consumer sends back once it handled a
//! message, and how a consumer batches receipts so that a fast stream
//! costs a few receipts per second, not one per message.
//!
//! A message's life with receipts: *accepted* (on the producer's disk),
//! *delivered* (a broker acknowledged it), *handled* (the consumers it
//! names recorded it in their inbox). Until then it waits in the outbox;
//! when no receipt comes within the receipt timeout it is published again
//! under the same identity, and the consumer's inbox removes the copy.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The MQTT 5 user property that asks for a receipt: its value is the
/// topic the receipt goes to.
pub const RECEIPT_PROPERTY: &str = "steadfast-receipt";

/// The topic prefix receipts go under by default: a producer's receipts
/// topic is `PREFIX/PRODUCER_ID`.
pub const DEFAULT_RECEIPT_PREFIX: &str = "steadfast/receipts";

/// The receipts topic of `producer` under `prefix`.
pub fn receipt_topic(prefix: &str, producer: &str) -> String {
    format!("{prefix}/{producer}")
}

/// The longest the doubling of a receipt wait goes.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// How many receipts a message needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// One, from any consumer (or any of the names listed).
    Any,
    /// One from every name listed.
    All,
    /// This many, from distinct consumers (of the names listed, if any).
    AtLeast(u32),
}

/// What a producer asks of the consumers of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRule {
    /// How long after the broker's acknowledgement a receipt may take
    /// before the message is published again (doubled after each resend,
    /// up to 16 times).
    pub timeout: Duration,
    /// How many receipts.
    pub need: Need,
    /// The consumers that count (empty: any consumer).
    pub from: Vec<String>,
}

/// Why a receipt rule cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// `all` without names.
    #[error("receipts from `all` consumers need their names (--receipt-from NAME,...)")]
    AllWithoutNames,
    /// More receipts asked for than names listed, or none.
    #[error("{need} receipts asked for, but {names} consumer names listed; ask for 1 to {names}")]
    NeedTooHigh {
        /// Receipts asked for.
        need: u32,
        /// Names listed.
        names: usize,
    },
    /// Zero receipts.
    #[error("a receipt rule needs at least 1 receipt")]
    NeedZero,
    /// A consumer name that cannot be carried.
    #[error("consumer name {0:?} is empty or contains a space, comma or line break")]
    Name(String),
    /// A zero timeout.
    #[error("the receipt timeout must be longer than 0")]
    ZeroTimeout,
    /// A need that is none of `any`, `all` or a count.
    #[error("receipts needed `{0}` is not any, all or a count of receipts")]
    UnknownNeed(String),
}

impl ReceiptRule {
    /// One receipt from any consumer within `timeout`.
    pub fn any(timeout: Duration) -> Self {
        ReceiptRule { timeout, need: Need::Any, from: Vec::new() }
    }

    /// The rule users write: `need` is `any`, `all` or a count (`None`:
    /// all of `from` when names are listed, else any one), checked.
    pub fn from_parts(timeout: Duration, need: Option<&str>, from: Vec<String>) -> Result<Self, RuleError> {
        let need = match need {
            None if from.is_empty() => Need::Any,
            None | Some("all") => Need::All,
            Some("any") => Need::Any,
            Some(n) => Need::AtLeast(n.parse().map_err(|_| RuleError::UnknownNeed(n.to_owned()))?),
        };
        let rule = ReceiptRule { timeout, need, from };
        rule.validate()?;
        Ok(rule)
    }

    /// True when `name` can name a consumer in a rule or a receipt.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty() && !name.contains([' ', ',', '\n', '\r', '\0'])
    }

    /// Checks the rule.
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.timeout.is_zero() {
            return Err(RuleError::ZeroTimeout);
        }
        if let Some(bad) = self.from.iter().find(|n| !Self::valid_name(n)) {
            return Err(RuleError::Name(bad.clone()));
        }
        match self.need {
            Need::All if self.from.is_empty() => Err(RuleError::AllWithoutNames),
            Need::AtLeast(0) => Err(RuleError::NeedZero),
            Need::AtLeast(n) if !self.from.is_empty() && n as usize > self.from.len() => {
                Err(RuleError::NeedTooHigh { need: n, names: self.from.len() })
            }
            _ => Ok(()),
        }
    }

    /// True when a receipt from `by` counts.
    pub fn accepts(&self, by: &str) -> bool {
        self.from.is_empty() || self.from.iter().any(|n| n == by)
    }

    /// How many distinct consumers must have sent a receipt.
    pub fn needed(&self) -> usize {
        match self.need {
            Need::Any => 1,
            Need::All => self.from.len(),
            Need::AtLeast(n) => n as usize,
        }
    }

    /// True when receipts from `distinct` consumers that count suffice.
    pub fn met(&self, distinct: usize) -> bool {
        distinct >= self.needed()
    }

    /// How long to wait for receipts after the `resends`-th resend: the
    /// timeout, doubled for each resend so far, up to an hour (or the
    /// timeout itself, when that is longer). A consumer that is away gets
    /// a copy per resend (its inbox removes them): the doubling keeps
    /// that to about the logarithm of the outage, then one an hour.
    pub fn wait(&self, resends: u32) -> Duration {
        let factor = 1u32 << resends.min(20);
        self.timeout.saturating_mul(factor).min(MAX_WAIT.max(self.timeout))
    }

    /// The stored form: `TIMEOUT_MS any|all|N [NAME,NAME...]`.
    pub fn to_text(&self) -> String {
        let need = match self.need {
            Need::Any => "any".to_owned(),
            Need::All => "all".to_owned(),
            Need::AtLeast(n) => n.to_string(),
        };
        let mut s = format!("{} {need}", self.timeout.as_millis());
        if !self.from.is_empty() {
            s.push(' ');
            s.push_str(&self.from.join(","));
        }
        s
    }

    /// Reads what [`ReceiptRule::to_text`] wrote.
    pub fn parse(text: &str) -> Option<ReceiptRule> {
        let mut words = text.split(' ');
        let timeout = Duration::from_millis(words.next()?.parse().ok()?);
        let need = match words.next()? {
            "any" => Need::Any,
            "all" => Need::All,
            n => Need::AtLeast(n.parse().ok()?),
        };
        let from = match words.next() {
            Some(list) => list.split(',').map(str::to_owned).collect(),
            None => Vec::new(),
        };
        if words.next().is_some() {
            return None;
        }
        let rule = ReceiptRule { timeout, need, from };
        rule.validate().ok().map(|()| rule)
    }
}

impl fmt::Display for ReceiptRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = if self.from.is_empty() { "any consumer".to_owned() } else { self.from.join(", ") };
        match self.need {
            Need::Any => write!(f, "one receipt from {from}")?,
            Need::All => write!(f, "receipts from all of {from}")?,
            Need::AtLeast(n) => write!(f, "{n} receipts from {from}")?,
        }
        write!(f, " within {} ms", self.timeout.as_millis())
    }
}

/// What a message's quorum of acknowledgements means for it
/// ([`ReceiptRule::on_quorum`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// It asks for no receipts: it leaves, delivered.
    Delivered,
    /// The receipts noted before its quorum already meet its rule: it
    /// leaves, handled.
    Handled,
    /// It stays in the outbox, awaiting receipts, until `due_ms` (then it
    /// is published again).
    Await {
        /// When the wait ends (ms, the clock of `now_ms`).
        due_ms: u64,
    },
}

impl ReceiptRule {
    /// The brokers of a message's route acknowledged it (its quorum):
    /// with `rule` (`None`: it asks for no receipts), `noted` distinct
    /// receipts that count already noted, after `resends` resends, at
    /// `now_ms`. The outbox's writer and the simulator both decide here.
    pub fn on_quorum(rule: Option<&ReceiptRule>, noted: usize, resends: u32, now_ms: u64) -> Settle {
        let Some(rule) = rule else { return Settle::Delivered };
        if crate::mutate::planted(crate::mutate::Bug::ReceiptsEndAtTheAck) {
            return Settle::Delivered;
        }
        if noted > 0 && rule.met(noted) {
            return Settle::Handled;
        }
        Settle::Await { due_ms: now_ms.saturating_add(rule.wait(resends).as_millis() as u64) }
    }

    /// A receipt that counts came for a message: it leaves, handled, when
    /// `distinct` receipts now meet the rule and the receipt may complete
    /// it: it awaits receipts, or its route needs one broker (a receipt
    /// proves a broker took it), or its quorum of acknowledgements came.
    pub fn completes(&self, distinct: usize, awaiting: bool, need: u32, quorum_met: bool) -> bool {
        let may = awaiting || need <= 1 || quorum_met;
        may && self.met(distinct) && !crate::mutate::planted(crate::mutate::Bug::ReceiptsNeverComplete)
    }
}

/// A receipt: consumer `by` handled these sequence numbers of `producer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerReceipt {
    /// The consumer (its configured name, or its client id).
    pub by: String,
    /// The producer whose messages it handled.
    pub producer: String,
    /// Inclusive ranges of sequence numbers, ascending, not overlapping.
    pub ranges: Vec<(u64, u64)>,
}

/// Why a receipt payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a steadfast receipt: {0}")]
pub struct ReceiptDecodeError(pub &'static str);

impl ConsumerReceipt {
    /// The first line of every receipt (format 1).
    pub const HEADER: &'static str = "steadfast-receipt 1";

    /// The sequence numbers `seqs` as ascending inclusive ranges.
    pub fn ranges_of(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
        let sorted: BTreeSet<u64> = seqs.into_iter().collect();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for s in sorted {
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 == s => *last = s,
                _ => ranges.push((s, s)),
            }
        }
        ranges
    }

    /// How many sequence numbers it covers.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// Every sequence number it covers, in order.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|&(a, b)| a..=b)
    }

    /// The payload: text lines, readable with any MQTT tool.
    ///
    /// ```text
    /// steadfast-receipt 1
    /// by line1
    /// producer gw-1-5e0c9a1b
    /// seq 1-50,52,60-99
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let seq: Vec<String> =
            self.ranges.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        format!("{}\nby {}\nproducer {}\nseq {}\n", Self::HEADER, self.by, self.producer, seq.join(",")).into_bytes()
    }

    /// Reads what [`ConsumerReceipt::encode`] wrote; lines it does not know are
    /// skipped (a later format may add some).
    pub fn decode(payload: &[u8]) -> Result<ConsumerReceipt, ReceiptDecodeError> {
        let text = std::str::from_utf8(payload).map_err(|_| ReceiptDecodeError("not UTF-8"))?;
        let mut lines = text.lines();
        if lines.next() != Some(Self::HEADER) {
            return Err(ReceiptDecodeError("no `steadfast-receipt 1` header"));
        }
        let (mut by, mut producer, mut ranges) = (None, None, None);
        for line in lines {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "by" => by = Some(value.to_owned()),
                "producer" => producer = Some(value.to_owned()),
                "seq" => ranges = Some(parse_ranges(value).ok_or(ReceiptDecodeError("bad `seq` line"))?),
                _ => {}
            }
        }
        let by = by.filter(|b| ReceiptRule::valid_name(b)).ok_or(ReceiptDecodeError("no consumer name"))?;
        let producer = producer.filter(|p| !p.is_empty()).ok_or(ReceiptDecodeError("no producer"))?;
        let ranges = ranges.ok_or(ReceiptDecodeError("no `seq` line"))?;
        Ok(ConsumerReceipt { by, producer, ranges })
    }
}

fn parse_ranges(s: &str) -> Option<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let v = part.parse().ok()?;
                (v, v)
            }
        };
        if a > b || out.last().is_some_and(|&(_, last)| a <= last) {
            return None;
        }
        out.push((a, b));
    }
    Some(out)
}

/// Settings of a [`ReceiptBatcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// A batch leaves this long after its first identity at the latest.
    pub linger: Duration,
    /// A batch leaves at once when it holds this many identities.
    pub max_ids: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { linger: Duration::from_millis(50), max_ids: 1000 }
    }
}

#[derive(Debug)]
struct Pending {
    producer: String,
    seqs: BTreeSet<u64>,
    since: Instant,
}

/// A batch of receipts ready to leave: where to, whose, which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptBatch<K> {
    /// Its destination (a broker and a receipts topic).
    pub to: K,
    /// The producer whose sequence numbers it names.
    pub producer: String,
    /// Inclusive ranges of sequence numbers, ascending.
    pub ranges: Vec<(u64, u64)>,
}

/// A consumer's receipts on their way: identities owed a receipt are
/// gathered per destination `K` (a broker and a receipts topic), and a
/// batch leaves when it is full or has lingered long enough.
#[derive(Debug)]
pub struct ReceiptBatcher<K> {
    cfg: BatchConfig,
    pending: HashMap<K, Pending>,
}

impl<K: Clone + Eq + Hash> ReceiptBatcher<K> {
    /// An empty batcher.
    pub fn new(cfg: BatchConfig) -> Self {
        ReceiptBatcher { cfg, pending: HashMap::new() }
    }

    /// `seq` of `producer` is owed a receipt at `to`; a batch that is full
    /// now comes back at once.
    pub fn add(&mut self, to: K, producer: &str, seq: u64, now: Instant) -> Option<ReceiptBatch<K>> {
        let p = self.pending.entry(to.clone()).or_insert_with(|| Pending {
            producer: producer.to_owned(),
            seqs: BTreeSet::new(),
            since: now,
        });
        p.seqs.insert(seq);
        if p.seqs.len() >= self.cfg.max_ids {
            let p = self.pending.remove(&to).expect("just added");
            return Some(ReceiptBatch { to, producer: p.producer, ranges: ConsumerReceipt::ranges_of(p.seqs) });
        }
        None
    }

    /// When the oldest batch must leave.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.since + self.cfg.linger).min()
    }

    /// The batches due at `now` (every batch when `all`).
    pub fn take_due(&mut self, now: Instant, all: bool) -> Vec<ReceiptBatch<K>> {
        let linger = self.cfg.linger;
        let due: Vec<K> =
            self.pending.iter().filter(|(_, p)| all || p.since + linger <= now).map(|(k, _)| k.clone()).collect();
        due.into_iter()
            .map(|to| {
                let p = self.pending.remove(&to).expect("listed");
                ReceiptBatch { to, producer: p.producer, ranges: ConsumerReceipt::ranges_of(p.seqs) }
            })
            .collect()
    }

    /// Identities waiting for their batch to leave.
    pub fn waiting(&self) -> usize {
        self.pending.values().map(|p| p.seqs.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_round_trips_through_its_stored_form_and_bad_rules_are_refused() {
        let any = ReceiptRule::any(Duration::from_secs(30));
        assert_eq!(any.to_text(), "30000 any");
        let all =
            ReceiptRule { timeout: Duration::from_millis(1500), need: Need::All, from: vec!["a".into(), "b".into()] };
        let two = ReceiptRule { need: Need::AtLeast(2), ..all.clone() };
        for r in [&any, &all, &two] {
            assert_eq!(ReceiptRule::parse(&r.to_text()).as_ref(), Some(r), "{}", r.to_text());
        }
        assert_eq!(all.needed(), 2);
        assert!(all.accepts("a") && !all.accepts("c") && any.accepts("c"));
        assert_eq!(ReceiptRule { from: vec![], ..all.clone() }.validate(), Err(RuleError::AllWithoutNames));
        assert_eq!(
            ReceiptRule { need: Need::AtLeast(3), ..all.clone() }.validate().unwrap_err().to_string(),
            "3 receipts asked for, but 2 consumer names listed; ask for 1 to 2"
        );
        assert_eq!(
            ReceiptRule { from: vec!["a b".into()], ..any.clone() }.validate(),
            Err(RuleError::Name("a b".into()))
        );
        for bad in ["", "x any", "10 some", "10 0", "10 all", "10 any a,b extra"] {
            assert_eq!(ReceiptRule::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_wait_doubles_with_each_resend_up_to_an_hour() {
        let r = ReceiptRule::any(Duration::from_secs(30));
        let waits: Vec<u64> = [0, 1, 2, 6, 7, 8, 40].into_iter().map(|n| r.wait(n).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 1920, 3600, 3600, 3600]);
        assert_eq!(ReceiptRule::any(Duration::from_secs(86_400)).wait(3), Duration::from_secs(86_400));
    }

    #[test]
    fn a_receipt_round_trips_and_garbage_is_refused() {
        let r = ConsumerReceipt {
            by: "line1".into(),
            producer: "gw/1-ab".into(),
            ranges: ConsumerReceipt::ranges_of([5, 1, 2, 3, 9, 10]),
        };
        assert_eq!(r.ranges, [(1, 3), (5, 5), (9, 10)]);
        assert_eq!(r.count(), 6);
        assert_eq!(r.seqs().collect::<Vec<_>>(), [1, 2, 3, 5, 9, 10]);
        let text = String::from_utf8(r.encode()).unwrap();
        assert_eq!(text, "steadfast-receipt 1\nby line1\nproducer gw/1-ab\nseq 1-3,5,9-10\n");
        assert_eq!(ConsumerReceipt::decode(text.as_bytes()), Ok(r));
        let future = "steadfast-receipt 1\nby a\nproducer p\nseq 7\nnew thing\n";
        assert_eq!(ConsumerReceipt::decode(future.as_bytes()).unwrap().ranges, [(7, 7)]);
        for bad in [
            "",
            "hello",
            "steadfast-receipt 1\nproducer p\nseq 1\n",
            "steadfast-receipt 1\nby a\nseq 1\n",
            "steadfast-receipt 1\nby a\nproducer p\n",
            "steadfast-receipt 1\nby a\nproducer p\nseq 3-1\n",
            "steadfast-receipt 1\nby a\nproducer p\nseq 1-5,4\n",
            "steadfast-receipt 1\nby a\nproducer p\nseq x\n",
        ] {
            assert!(ConsumerReceipt::decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_batch_leaves_when_full_or_after_lingering() {
        let t0 = Instant::now();
        let mut b = ReceiptBatcher::new(BatchConfig { linger: Duration::from_millis(50), max_ids: 3 });
        assert_eq!(b.add("x", "p", 1, t0), None);
        assert_eq!(b.add("y", "q", 7, t0 + Duration::from_millis(10)), None);
        assert_eq!(b.add("x", "p", 2, t0), None);
        assert_eq!(b.add("x", "p", 2, t0), None, "a repeat adds nothing");
        let batch =
            |to, producer: &str, ranges: Vec<(u64, u64)>| ReceiptBatch { to, producer: producer.into(), ranges };
        assert_eq!(b.add("x", "p", 4, t0), Some(batch("x", "p", vec![(1, 2), (4, 4)])));
        assert_eq!(b.poll_timeout(), Some(t0 + Duration::from_millis(60)));
        assert!(b.take_due(t0 + Duration::from_millis(59), false).is_empty());
        assert_eq!(b.waiting(), 1);
        assert_eq!(b.take_due(t0 + Duration::from_millis(60), false), [batch("y", "q", vec![(7, 7)])]);
        assert_eq!(b.poll_timeout(), None);
    }
}
