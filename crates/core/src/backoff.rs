//! Exponential backoff with full jitter.
//!
//! The delay before attempt `n` (counting from 0) is drawn uniformly from
//! `[min, min(max, min * 2^n)]`. The floor of `min` keeps a flapping broker
//! from being hammered; the jitter keeps a fleet of clients that lost the
//! same broker from reconnecting in lockstep.

use std::time::Duration;

/// Bounds of the reconnect delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Shortest delay, and the base of the exponential growth.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A link that stayed up at least this long resets the growth.
    pub stable_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { min: Duration::from_millis(100), max: Duration::from_secs(30), stable_after: Duration::from_secs(10) }
    }
}

/// The state of one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A fresh backoff: the next delay is drawn from `[min, min]`.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The delay to wait before the next attempt; grows the window.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let min = self.config.min.as_millis() as u64;
        let max = self.config.max.as_millis().max(min as u128) as u64;
        let cap = min.saturating_mul(1u64 << self.attempt.min(32)).min(max);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(rng.u64(min..=cap.max(min)))
    }

    /// Tells the backoff that a link went down after being up for `uptime`.
    /// Only a link that stayed up long enough resets the growth, so a broker
    /// that accepts and then drops every connection is still backed off.
    pub fn link_lost_after(&mut self, uptime: Duration) {
        if uptime >= self.config.stable_after {
            self.attempt = 0;
        }
    }

    /// How many attempts were made since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BackoffConfig {
        BackoffConfig {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
            stable_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn delays_stay_within_the_growing_window_and_the_cap() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut b = Backoff::new(config());
        for n in 0..40u32 {
            let d = b.next_delay(&mut rng).as_millis() as u64;
            let cap = (100u64 << n.min(32)).min(5000);
            assert!((100..=cap).contains(&d), "attempt {n}: {d} ms outside [100, {cap}]");
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = fastrand::Rng::with_seed(1);
        let delays: std::collections::HashSet<_> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(config());
                for _ in 0..6 {
                    b.next_delay(&mut rng);
                }
                b.next_delay(&mut rng)
            })
            .collect();
        assert!(delays.len() > 25, "only {} distinct delays", delays.len());
    }

    #[test]
    fn only_a_stable_link_resets_the_growth() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut b = Backoff::new(config());
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        b.link_lost_after(Duration::from_secs(1));
        assert_eq!(b.attempts(), 5);
        b.link_lost_after(Duration::from_secs(11));
        assert_eq!(b.attempts(), 0);
    }
}
