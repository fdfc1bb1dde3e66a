//! The chaos harness's two halves that need no processes: a seeded,
//! reproducible schedule of faults, and the verdict over what the two ends
//! logged. `steadfast chaos` runs the schedule against real processes.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

/// One fault. Brokers are numbered from 0 (A, B, ...).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// `kill -9` of a broker, started again after `down`; with
    /// `persistence` (Mosquitto only) it restarts from what it saved.
    KillBroker {
        /// Which.
        broker: usize,
        /// How long it stays down.
        down: Duration,
        /// Restart with persistence on.
        persistence: bool,
    },
    /// Every connection through the broker's proxy is reset (RST).
    Reset {
        /// Which.
        broker: usize,
    },
    /// The broker's link drops every byte, without FIN or RST.
    BlackHole {
        /// Which.
        broker: usize,
        /// For how long.
        lasting: Duration,
    },
    /// Each chunk through the broker's link is delayed.
    Latency {
        /// Which.
        broker: usize,
        /// The delay per chunk.
        delay: Duration,
        /// For how long.
        lasting: Duration,
    },
    /// The broker's link carries at most this many bytes per second.
    Bandwidth {
        /// Which.
        broker: usize,
        /// The cap, each way.
        bytes_per_sec: u64,
        /// For how long.
        lasting: Duration,
    },
    /// `kill -9` of the producer, restarted on the same outbox.
    KillProducer {
        /// How long it stays down.
        down: Duration,
    },
    /// `kill -9` of the consumer, restarted on the same inbox.
    KillConsumer {
        /// How long it stays down.
        down: Duration,
    },
}

/// A, B, C...
pub fn broker_name(i: usize) -> char {
    (b'A' + i as u8) as char
}

impl Fault {
    /// How long the fault lasts (a reset is instant).
    pub fn lasting(&self) -> Duration {
        match *self {
            Fault::KillBroker { down, .. } | Fault::KillProducer { down } | Fault::KillConsumer { down } => down,
            Fault::Reset { .. } => Duration::ZERO,
            Fault::BlackHole { lasting, .. } | Fault::Latency { lasting, .. } | Fault::Bandwidth { lasting, .. } => {
                lasting
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: Duration| format!("{:.1}s", d.as_secs_f64());
        match *self {
            Fault::KillBroker { broker, down, persistence } => write!(
                f,
                "kill -9 broker {} (back after {}, persistence {})",
                broker_name(broker),
                s(down),
                if persistence { "on" } else { "off" }
            ),
            Fault::Reset { broker } => write!(f, "reset broker {}'s connections", broker_name(broker)),
            Fault::BlackHole { broker, lasting } => {
                write!(f, "black-hole broker {}'s link for {}", broker_name(broker), s(lasting))
            }
            Fault::Latency { broker, delay, lasting } => write!(
                f,
                "{} ms latency on broker {}'s link for {}",
                delay.as_millis(),
                broker_name(broker),
                s(lasting)
            ),
            Fault::Bandwidth { broker, bytes_per_sec, lasting } => write!(
                f,
                "cap broker {}'s link at {} kB/s for {}",
                broker_name(broker),
                bytes_per_sec / 1000,
                s(lasting)
            ),
            Fault::KillProducer { down } => write!(f, "kill -9 the producer (back after {})", s(down)),
            Fault::KillConsumer { down } => write!(f, "kill -9 the consumer (back after {})", s(down)),
        }
    }
}

/// A fault at a time from the start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// When.
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

/// A reproducible list of faults.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The seed it came from.
    pub seed: u64,
    /// The faults, by time.
    pub steps: Vec<Step>,
}

impl Schedule {
    /// The schedule for `seed` over `length` with `brokers` brokers: a fault
    /// every 1.5 to 4 s from the second second, none in the last fifth (the
    /// end is for draining). The first seven are one of each kind, in a
    /// seeded order, so that even a short run meets them all; then kinds
    /// are drawn by weight. `persistence`: whether broker restarts may keep
    /// what they saved (Mosquitto) or never do (the embedded broker).
    pub fn generate(seed: u64, length: Duration, brokers: usize, persistence: bool) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut steps = Vec::new();
        let mut t = 2.0;
        let end = length.as_secs_f64() * 0.8;
        let secs = |rng: &mut fastrand::Rng, lo: f64, hi: f64| Duration::from_secs_f64(lo + rng.f64() * (hi - lo));
        // One of each kind first: points inside each kind's weight band.
        let mut first: Vec<u32> = vec![0, 20, 35, 48, 60, 70, 85];
        rng.shuffle(&mut first);
        while t < end {
            let broker = rng.usize(..brokers.max(1));
            let pick = if steps.len() < first.len() { first[steps.len()] } else { rng.u32(..100) };
            let fault = match pick {
                0..=19 => {
                    Fault::KillBroker { broker, down: secs(&mut rng, 0.5, 3.0), persistence: persistence && rng.bool() }
                }
                20..=34 => Fault::Reset { broker },
                35..=47 => Fault::BlackHole { broker, lasting: secs(&mut rng, 1.0, 4.0) },
                48..=59 => Fault::Latency {
                    broker,
                    delay: Duration::from_millis(rng.u64(20..300)),
                    lasting: secs(&mut rng, 1.0, 4.0),
                },
                60..=69 => Fault::Bandwidth {
                    broker,
                    bytes_per_sec: rng.u64(2_000..50_000),
                    lasting: secs(&mut rng, 1.0, 4.0),
                },
                70..=84 => Fault::KillProducer { down: secs(&mut rng, 0.3, 2.0) },
                _ => Fault::KillConsumer { down: secs(&mut rng, 0.3, 2.0) },
            };
            steps.push(Step { at: Duration::from_secs_f64(t), fault });
            t += 1.5 + rng.f64() * 2.5;
        }
        Schedule { seed, steps }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "schedule (seed {}):", self.seed)?;
        for s in &self.steps {
            writeln!(f, "  {:>6.1}s  {}", s.at.as_secs_f64(), s.fault)?;
        }
        Ok(())
    }
}

/// The line the runner writes into the consumer's log when it kills it.
pub const CONSUMER_KILLED: &str = "# consumer killed";

/// The payload of the `n`th line fed to the producer: `n`, then a digest
/// of it. A payload that arrives changed fails its digest; two payloads
/// swapped between identities break the order of `n` (the producer takes
/// its lines in order, so a higher sequence number carries a higher `n`).
pub fn payload_for(n: u64) -> String {
    format!("{n}:{:016x}", digest(n))
}

/// FNV-1a of the decimal `n`.
fn digest(n: u64) -> u64 {
    n.to_string().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The `n` a payload was made from, if it is one [`payload_for`] made.
fn fed_number(payload: &str) -> Option<u64> {
    let (n, _) = payload.split_once(':')?;
    let n = n.parse().ok()?;
    (payload_for(n) == payload).then_some(n)
}

/// The kinds of fault, as the tally names them.
pub const FAULT_KINDS: [&str; 7] =
    ["kill-broker", "reset", "black-hole", "latency", "bandwidth", "kill-producer", "kill-consumer"];

impl Fault {
    /// This fault's kind, one of [`FAULT_KINDS`].
    pub fn kind(&self) -> &'static str {
        FAULT_KINDS[match self {
            Fault::KillBroker { .. } => 0,
            Fault::Reset { .. } => 1,
            Fault::BlackHole { .. } => 2,
            Fault::Latency { .. } => 3,
            Fault::Bandwidth { .. } => 4,
            Fault::KillProducer { .. } => 5,
            Fault::KillConsumer { .. } => 6,
        }]
    }
}

/// Faults applied and skipped, by kind: what a run really did, not what
/// its schedule said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultTally {
    /// Applied, per kind in [`FAULT_KINDS`] order.
    pub applied: [u32; 7],
    /// Skipped (the gate gave up, or the process was already down).
    pub skipped: [u32; 7],
}

impl FaultTally {
    const APPLIED: &'static str = "faults applied:";
    const SKIPPED: &'static str = "faults skipped:";

    /// Counts `fault` as applied.
    pub fn applied(&mut self, fault: &Fault) {
        self.applied[Self::index(fault)] += 1;
    }

    /// Counts `fault` as skipped.
    pub fn skipped(&mut self, fault: &Fault) {
        self.skipped[Self::index(fault)] += 1;
    }

    fn index(fault: &Fault) -> usize {
        FAULT_KINDS.iter().position(|k| *k == fault.kind()).expect("every kind is listed")
    }

    /// The kinds never applied.
    pub fn never_applied(&self) -> Vec<&'static str> {
        FAULT_KINDS.iter().zip(self.applied).filter(|(_, n)| *n == 0).map(|(k, _)| *k).collect()
    }

    /// Reads the two lines [`FaultTally`]'s `Display` writes, from a run's
    /// whole output; `None` when they are not there.
    pub fn parse(output: &str) -> Option<FaultTally> {
        let counts = |prefix: &str| -> Option<[u32; 7]> {
            let line = output.lines().find_map(|l| l.trim().strip_prefix(prefix))?;
            let mut out = [0; 7];
            for pair in line.split_whitespace() {
                let (kind, n) = pair.split_once('=')?;
                out[FAULT_KINDS.iter().position(|k| *k == kind)?] = n.parse().ok()?;
            }
            Some(out)
        };
        Some(FaultTally { applied: counts(Self::APPLIED)?, skipped: counts(Self::SKIPPED)? })
    }
}

impl fmt::Display for FaultTally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |counts: &[u32; 7]| {
            FAULT_KINDS.iter().zip(counts).map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" ")
        };
        writeln!(f, "{} {}", Self::APPLIED, line(&self.applied))?;
        write!(f, "{} {}", Self::SKIPPED, line(&self.skipped))
    }
}

/// What the logs of both ends show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Identities the producer accepted: `producer/1..=accepted`.
    pub accepted: u64,
    /// Of those, how many the consumer handled.
    pub handled: u64,
    /// Accepted, never handled, and not dropped by the producer's policy:
    /// lost.
    pub missing: Vec<u64>,
    /// Accepted, never handled, and in the producer's drop log (G3): each
    /// excused by its own drop, none by a count.
    pub dropped: Vec<u64>,
    /// Handled again after a `kill -9` of the consumer took the record of
    /// the first handling with it (printed, not yet in the inbox).
    pub again_after_kill: u64,
    /// Handled twice otherwise: a broken promise (G5).
    pub twice: Vec<String>,
    /// Handled with a payload that is not the one fed (changed in transit
    /// or in a store), or a repeat whose payload differs from the first.
    pub corrupt: Vec<String>,
    /// Sequence numbers whose payload came from a line fed out of order
    /// (payloads swapped between identities).
    pub swapped: Vec<u64>,
    /// First handlings below the highest sequence seen before them.
    pub out_of_order: u64,
    /// Lines that are not identities of this producer.
    pub foreign: u64,
}

impl Verdict {
    /// Reads the consumer's log: one line `producer/seq payload` per
    /// handled message, [`CONSUMER_KILLED`] where the runner killed it.
    /// `drop_log` holds the sequence numbers the producer dropped by its
    /// policy. A copy handled again is excused when the first handling was
    /// among the `window` last lines before a kill (the deliveries in
    /// flight then).
    pub fn check(producer: &str, accepted: u64, drop_log: &HashSet<u64>, log: &str, window: usize) -> Verdict {
        let mut v = Verdict { accepted, ..Verdict::default() };
        let prefix = format!("{producer}/");
        // seq -> (incarnation, line index within it, payload)
        let mut first: HashMap<u64, (usize, usize, &str)> = HashMap::new();
        let mut killed_at: Vec<Option<usize>> = vec![None];
        let mut incarnation = 0;
        let mut line_no = 0;
        let mut highest = 0;
        // (seq, incarnation and line of the first handling, incarnation of the repeat)
        let mut seen_again: Vec<(u64, usize, usize, usize)> = Vec::new();
        for line in log.lines() {
            if line == CONSUMER_KILLED {
                killed_at[incarnation] = Some(line_no);
                incarnation += 1;
                killed_at.push(None);
                line_no = 0;
                continue;
            }
            let (identity, payload) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
            let Some(seq) = identity.strip_prefix(&prefix).and_then(|s| s.parse::<u64>().ok()) else {
                if !line.trim().is_empty() {
                    v.foreign += 1;
                }
                continue;
            };
            if seq == 0 || seq > accepted {
                v.foreign += 1;
            } else if let Some(&(inc, at, was)) = first.get(&seq) {
                if was != payload {
                    v.corrupt.push(format!("{prefix}{seq} (again, with `{payload}` instead of `{was}`)"));
                }
                seen_again.push((seq, inc, at, incarnation));
            } else {
                if fed_number(payload).is_none() {
                    v.corrupt.push(format!("{prefix}{seq} (`{payload}`)"));
                }
                first.insert(seq, (incarnation, line_no, payload));
                if seq < highest {
                    v.out_of_order += 1;
                }
                highest = highest.max(seq);
            }
            line_no += 1;
        }
        for (seq, inc, at, again_in) in seen_again {
            // Only a later incarnation may handle it again, and only when
            // the first handling was among the last lines before the kill.
            let excused = again_in > inc && killed_at[inc].is_some_and(|end| end.saturating_sub(at) <= window);
            if excused {
                v.again_after_kill += 1;
            } else {
                v.twice.push(format!("{prefix}{seq}"));
            }
        }
        v.swapped = swapped(&first);
        v.handled = first.len() as u64;
        let (dropped, missing) = (1..=accepted).filter(|s| !first.contains_key(s)).partition(|s| drop_log.contains(s));
        (v.dropped, v.missing) = (dropped, missing);
        v
    }

    /// True when the promises held: something was accepted, everything
    /// accepted was handled or dropped by its own policy, with the payload
    /// it was fed, nothing twice, nothing from nowhere.
    pub fn passed(&self) -> bool {
        self.accepted > 0
            && self.missing.is_empty()
            && self.twice.is_empty()
            && self.corrupt.is_empty()
            && self.swapped.is_empty()
            && self.foreign == 0
    }
}

/// Sequence numbers whose fed number is not above the one of the sequence
/// number before them: the producer took its lines in order, so sequence
/// order and feeding order agree unless payloads were swapped.
fn swapped(first: &HashMap<u64, (usize, usize, &str)>) -> Vec<u64> {
    let mut by_seq: Vec<(u64, u64)> =
        first.iter().filter_map(|(seq, (_, _, p))| Some((*seq, fed_number(p)?))).collect();
    by_seq.sort_unstable();
    by_seq.windows(2).filter(|w| w[1].1 <= w[0].1).map(|w| w[1].0).collect()
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} accepted messages lost ({} dropped by their policy, each in the drop log); {} handled twice; {} handled with a wrong payload; {} handled again after a consumer kill -9 (printed before its inbox record); {} first arrivals out of order",
            self.missing.len(),
            self.accepted,
            self.dropped.len(),
            self.twice.len(),
            self.corrupt.len() + self.swapped.len(),
            self.again_after_kill,
            self.out_of_order
        )?;
        let list = |v: Vec<String>| v.into_iter().take(10).collect::<Vec<_>>().join(", ");
        if self.accepted == 0 {
            write!(f, "; nothing was accepted, so nothing was checked")?;
        }
        if !self.missing.is_empty() {
            write!(f, "; missing seq {}", list(self.missing.iter().map(|s| s.to_string()).collect()))?;
        }
        if !self.twice.is_empty() {
            write!(f, "; twice: {}", list(self.twice.clone()))?;
        }
        if !self.corrupt.is_empty() {
            write!(f, "; wrong payload: {}", list(self.corrupt.clone()))?;
        }
        if !self.swapped.is_empty() {
            write!(
                f,
                "; payload fed out of order at seq {}",
                list(self.swapped.iter().map(|s| s.to_string()).collect())
            )?;
        }
        if self.foreign > 0 {
            write!(f, "; {} lines from no accepted message", self.foreign)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = Schedule::generate(42, Duration::from_secs(60), 2, true);
        assert_eq!(a, Schedule::generate(42, Duration::from_secs(60), 2, true));
        assert_ne!(a, Schedule::generate(43, Duration::from_secs(60), 2, true));
        assert!(a.steps.len() >= 10, "{a}");
        let kinds: std::collections::HashSet<_> =
            a.steps.iter().take(7).map(|s| std::mem::discriminant(&s.fault)).collect();
        assert_eq!(kinds.len(), 7, "the first seven are one of each kind: {a}");
        assert!(a.steps.iter().all(|s| s.at.as_secs_f64() < 48.0));
        assert!(!Schedule::generate(42, Duration::from_secs(60), 2, false)
            .steps
            .iter()
            .any(|s| matches!(s.fault, Fault::KillBroker { persistence: true, .. })));
    }

    fn line(seq: u64, n: u64) -> String {
        format!("p/{seq} {}\n", payload_for(n))
    }

    fn log(lines: &[(u64, u64)]) -> String {
        lines.iter().map(|&(s, n)| if s == 0 { format!("{CONSUMER_KILLED}\n") } else { line(s, n) }).collect()
    }

    #[test]
    fn the_verdict_finds_losses_duplicates_and_excuses_a_kill() {
        // (0, _) is a kill of the consumer.
        let text = log(&[(1, 1), (2, 2), (3, 3), (0, 0), (3, 3), (4, 4), (2, 2), (6, 7)]) + "q/1 1:0\n";
        let v = Verdict::check("p", 6, &HashSet::new(), &text, 1);
        assert_eq!(v.missing, vec![5]);
        assert_eq!(v.again_after_kill, 1, "p/3 was the last line before the kill");
        assert_eq!(v.twice, vec!["p/2".to_owned()], "p/2 was two lines before the kill, outside the window");
        assert_eq!((v.handled, v.foreign), (5, 1));
        assert!(!v.passed());
        let same_process = Verdict::check("p", 1, &HashSet::new(), &log(&[(1, 1), (1, 1), (0, 0)]), 4);
        assert_eq!(same_process.twice, vec!["p/1".to_owned()], "a repeat before the kill is not excused");
        let ok = Verdict::check("p", 2, &HashSet::new(), &log(&[(1, 1), (2, 5)]), 4);
        assert!(ok.passed(), "{ok}");
    }

    #[test]
    fn a_loss_is_excused_only_by_a_drop_of_that_message() {
        let text = log(&[(1, 1), (3, 3)]);
        let dropped_2 = Verdict::check("p", 3, &HashSet::from([2]), &text, 4);
        assert!(dropped_2.passed(), "{dropped_2}");
        assert_eq!(dropped_2.dropped, vec![2]);
        // One drop of another message does not excuse this loss (the old
        // verdict compared counts: one loss, one drop, passed).
        let other = Verdict::check("p", 3, &HashSet::from([3]), &text, 4);
        assert!(!other.passed(), "{other}");
        assert_eq!(other.missing, vec![2]);
    }

    #[test]
    fn a_run_that_accepted_nothing_fails() {
        let v = Verdict::check("p", 0, &HashSet::new(), "", 4);
        assert!(!v.passed());
        assert!(v.to_string().contains("nothing was accepted"), "{v}");
    }

    #[test]
    fn a_changed_or_swapped_payload_fails() {
        let good = log(&[(1, 1), (2, 4), (3, 9)]);
        assert!(Verdict::check("p", 3, &HashSet::new(), &good, 4).passed());
        let changed = good.replace(&payload_for(4), "4:0000000000000000");
        let v = Verdict::check("p", 3, &HashSet::new(), &changed, 4);
        assert_eq!(v.corrupt.len(), 1, "{v}");
        assert!(!v.passed());
        let swapped = log(&[(1, 1), (2, 9), (3, 4)]);
        let v = Verdict::check("p", 3, &HashSet::new(), &swapped, 4);
        assert_eq!(v.swapped, vec![3], "{v}");
        assert!(!v.passed());
        let no_payload = Verdict::check("p", 1, &HashSet::new(), "p/1\n", 4);
        assert!(!no_payload.passed(), "an identity without its payload");
        let repeat_changed = log(&[(1, 1), (0, 0)]) + &line(1, 2);
        let v = Verdict::check("p", 1, &HashSet::new(), &repeat_changed, 4);
        assert_eq!((v.again_after_kill, v.corrupt.len()), (1, 1), "{v}");
    }

    #[test]
    fn the_tally_reads_back_and_names_kinds_never_applied() {
        let mut t = FaultTally::default();
        for step in Schedule::generate(42, Duration::from_secs(60), 2, true).steps.iter().take(7) {
            t.applied(&step.fault);
        }
        let back = FaultTally::parse(&format!("noise\n  {t}\nmore")).unwrap();
        assert_eq!(back, t);
        assert!(back.never_applied().is_empty(), "{back}");
        let mut gated = FaultTally::default();
        gated.skipped(&Fault::KillBroker { broker: 0, down: Duration::ZERO, persistence: false });
        gated.applied(&Fault::Reset { broker: 1 });
        let back = FaultTally::parse(&gated.to_string()).unwrap();
        assert!(back.never_applied().contains(&"kill-broker"), "a skipped kill is not an applied one: {back}");
        assert_eq!(FaultTally::parse("kill -9 broker A (back after 1s)"), None, "schedule lines are no tally");
    }
}
