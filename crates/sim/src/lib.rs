//! A deterministic simulator of steadfast's delivery engine.
//!
//! One seed is one world: a producer process with its outbox, one to three
//! model MQTT brokers (failover or fanout), a consumer process with its
//! inbox subscribed on every broker, and the connections between them,
//! all in simulated time. The seed decides everything: the brokers' quirks
//! and persistence, the latency, the traffic and its delivery classes, and
//! a schedule of faults (broker kill -9, resets that cut a packet at any
//! byte, black holes, partitions, crashes of both processes, refusals,
//! failed store writes). Both processes run the engines the real drivers
//! run ([`steadfast_core::engine`]); only their I/O is simulated.
//!
//! The verdict: every accepted message was handled by the consumer,
//! dropped with a reason that held, or lost by the brokers themselves
//! after they acknowledged it (reported apart); nothing is stuck once the
//! faults heal; nothing is handled twice unless a crash took the first
//! inbox record. A failing seed replays identically and prints the story
//! of the first lost, repeated or stuck message.

#![forbid(unsafe_code)]

mod broker;
mod consumer;
mod producer;
mod schedule;
mod trace;
mod world;

pub use schedule::{Fault, Publish, Schedule, Size, Spread};
pub use trace::Trace;
pub use world::{run, run_sized, Verdict};

/// What a range of seeds did, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Messages accepted.
    pub accepted: usize,
    /// Accepted and handled by the consumer.
    pub handled: usize,
    /// Dropped as expired (deadline class).
    pub expired: usize,
    /// Dropped with their retry budget spent.
    pub budget: usize,
    /// Lost by the brokers themselves (beyond steadfast's promise).
    pub broker_lost: usize,
    /// Lost by the brokers, published again for lack of a receipt, and
    /// handled (worlds with receipts).
    pub rescued: usize,
    /// Moved aside as poison: messages larger than the brokers take or
    /// refused by them for good (kept and reported, not delivered).
    pub poisoned: usize,
    /// Faults applied.
    pub faults: usize,
    /// Faults skipped (their target was down or absent).
    pub skipped: usize,
}

impl Totals {
    fn add(&mut self, v: &Verdict) {
        self.accepted += v.accepted;
        self.handled += v.handled;
        self.expired += v.dropped.0;
        self.budget += v.dropped.1;
        self.broker_lost += v.broker_lost;
        self.rescued += v.rescued;
        self.poisoned += v.poisoned.len();
        self.faults += v.faults;
        self.skipped += v.skipped;
    }
}

/// Runs seeds `from..from + count` on `threads` threads; calls `failed`
/// for each failing verdict (in seed order within a thread) and returns
/// the failing seeds, sorted.
pub fn run_range(from: u64, count: u64, threads: usize, failed: &mut (dyn FnMut(&Verdict) + Send)) -> Vec<u64> {
    run_range_totals(from, count, threads, None, failed).0
}

/// [`run_range`] with worlds of `size` (seeded sizes when `None`), and
/// what the seeds did, summed.
pub fn run_range_totals(
    from: u64,
    count: u64,
    threads: usize,
    size: Option<Size>,
    failed: &mut (dyn FnMut(&Verdict) + Send),
) -> (Vec<u64>, Totals) {
    let totals = std::sync::Mutex::new(Totals::default());
    let failed = std::sync::Mutex::new(failed);
    let next = std::sync::atomic::AtomicU64::new(from);
    let end = from.saturating_add(count);
    let mut bad = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut bad = Vec::new();
                    loop {
                        let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if seed >= end {
                            return bad;
                        }
                        let v = run_sized(seed, size);
                        totals.lock().unwrap_or_else(|e| e.into_inner()).add(&v);
                        if !v.passed() {
                            bad.push(seed);
                            (failed.lock().unwrap_or_else(|e| e.into_inner()))(&v);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a simulation thread panicked")).collect::<Vec<_>>()
    });
    bad.sort_unstable();
    (bad, totals.into_inner().unwrap_or_else(|e| e.into_inner()))
}
