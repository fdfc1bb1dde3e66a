//! The chaos harness's two halves that need no processes: a seeded,
//! reproducible schedule of faults, and the verdict over what the two ends
//! logged. `steadfast chaos` runs the schedule against real processes.

use std::collections::HashMap;
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

/// What the logs of both ends show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Identities the producer accepted: `producer/1..=accepted`.
    pub accepted: u64,
    /// Of those, how many the consumer handled.
    pub handled: u64,
    /// Accepted, never handled.
    pub missing: Vec<u64>,
    /// Drops the producer counted (by its policy, with a reason: G3).
    pub dropped: u64,
    /// Handled again after a `kill -9` of the consumer took the record of
    /// the first handling with it (printed, not yet in the inbox).
    pub again_after_kill: u64,
    /// Handled twice otherwise: a broken promise (G5).
    pub twice: Vec<String>,
    /// First handlings below the highest sequence seen before them.
    pub out_of_order: u64,
    /// Lines that are not identities of this producer.
    pub foreign: u64,
}

impl Verdict {
    /// Reads the consumer's log: one identity (`producer/seq`) per handled
    /// message, [`CONSUMER_KILLED`] where the runner killed it. A copy
    /// handled again is excused when the first handling was among the
    /// `window` last lines before a kill (the deliveries in flight then).
    pub fn check(producer: &str, accepted: u64, dropped: u64, log: &str, window: usize) -> Verdict {
        let mut v = Verdict { accepted, dropped, ..Verdict::default() };
        let prefix = format!("{producer}/");
        // seq -> (incarnation, line index within it)
        let mut first: HashMap<u64, (usize, usize)> = HashMap::new();
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
            let Some(seq) = line.strip_prefix(&prefix).and_then(|s| s.trim().parse::<u64>().ok()) else {
                if !line.trim().is_empty() {
                    v.foreign += 1;
                }
                continue;
            };
            if seq == 0 || seq > accepted {
                v.foreign += 1;
            } else if let Some(&(inc, at)) = first.get(&seq) {
                seen_again.push((seq, inc, at, incarnation));
            } else {
                first.insert(seq, (incarnation, line_no));
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
        v.handled = first.len() as u64;
        v.missing = (1..=accepted).filter(|s| !first.contains_key(s)).collect();
        v
    }

    /// True when the promises held: nothing missing beyond the counted
    /// drops, nothing handled twice, nothing from nowhere.
    pub fn passed(&self) -> bool {
        self.missing.len() as u64 <= self.dropped && self.twice.is_empty() && self.foreign == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {} accepted messages lost ({} counted drops); {} handled twice; {} handled again after a consumer kill -9 (printed before its inbox record); {} first arrivals out of order",
            self.missing.len(),
            self.accepted,
            self.dropped,
            self.twice.len(),
            self.again_after_kill,
            self.out_of_order
        )?;
        if !self.missing.is_empty() {
            let shown: Vec<String> = self.missing.iter().take(10).map(|s| s.to_string()).collect();
            write!(f, "; missing seq {}", shown.join(", "))?;
        }
        if !self.twice.is_empty() {
            write!(f, "; twice: {}", self.twice.iter().take(5).cloned().collect::<Vec<_>>().join(", "))?;
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

    #[test]
    fn the_verdict_finds_losses_duplicates_and_excuses_a_kill() {
        let log = "p/1\np/2\np/3\n# consumer killed\np/3\np/4\np/2\np/6\nq/1\n";
        let v = Verdict::check("p", 6, 0, log, 1);
        assert_eq!(v.missing, vec![5]);
        assert_eq!(v.again_after_kill, 1, "p/3 was the last line before the kill");
        assert_eq!(v.twice, vec!["p/2".to_owned()], "p/2 was two lines before the kill, outside the window");
        assert_eq!((v.handled, v.foreign), (5, 1));
        assert!(!v.passed());
        let same_process = Verdict::check("p", 1, 0, "p/1\np/1\n# consumer killed\n", 4);
        assert_eq!(same_process.twice, vec!["p/1".to_owned()], "a repeat before the kill is not excused");
        let ok = Verdict::check("p", 2, 0, "p/1\np/2\n", 4);
        assert!(ok.passed(), "{ok}");
        assert!(Verdict::check("p", 3, 1, "p/1\np/3\n", 4).passed(), "one loss, one counted drop");
    }
}
