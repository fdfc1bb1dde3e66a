//! The ack timeout of a broker link, adapted to the round-trip time
//! measured on it, the way TCP sets its retransmission timeout (RFC 6298):
//! a smoothed mean and a smoothed mean deviation of the samples, and a
//! timeout of `mean + 4 × deviation`, never below a floor and never above a
//! ceiling. A timeout that fires doubles the next one until a message is
//! acknowledged again (a broker that is slow, not gone, gets the time it
//! needs after a false alarm or two).
//!
//! A black hole under load is then found within the floor plus a few round
//! trips, instead of a fixed 15 s; a link that is merely slow raises its own
//! timeout with every sample.

use std::time::Duration;

/// The timeout before any sample (RFC 6298's initial 1 s).
const INITIAL: Duration = Duration::from_secs(1);
/// The most doublings after timeouts in a row.
const MAX_BACKOFF: u32 = 6;

/// How the ack timeout of a link is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckTimeout {
    /// Always this long (the user said so).
    Fixed(Duration),
    /// From the measured round-trip time, within these bounds.
    Adaptive {
        /// Never shorter than this.
        floor: Duration,
        /// Never longer than this, backoff included.
        max: Duration,
    },
}

impl AckTimeout {
    /// The default: adaptive, at least 750 ms, at most 60 s. The floor is
    /// what a black hole under load costs; a round trip that jumps at once
    /// by more than it (a link that stalls) is taken for dead once, and the
    /// next link's timeout is twice as long.
    pub const DEFAULT: AckTimeout =
        AckTimeout::Adaptive { floor: Duration::from_millis(750), max: Duration::from_secs(60) };

    /// The longest it can be (the fixed value, or the adaptive ceiling).
    pub fn longest(&self) -> Duration {
        match *self {
            AckTimeout::Fixed(d) => d,
            AckTimeout::Adaptive { max, .. } => max,
        }
    }
}

impl Default for AckTimeout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The round-trip estimate of one link and the ack timeout it gives.
#[derive(Debug, Clone, Copy)]
pub struct RoundTrip {
    mode: AckTimeout,
    /// Smoothed mean and mean deviation, once sampled.
    smoothed: Option<(Duration, Duration)>,
    /// Timeouts in a row since the last acknowledged sample.
    backoff: u32,
}

impl RoundTrip {
    /// No sample yet.
    pub fn new(mode: AckTimeout) -> Self {
        Self { mode, smoothed: None, backoff: 0 }
    }

    /// A measured round trip: a request and its answer.
    pub fn sample(&mut self, r: Duration) {
        self.smoothed = Some(match self.smoothed {
            None => (r, r / 2),
            Some((mean, dev)) => {
                let err = r.abs_diff(mean);
                ((mean * 7 + r) / 8, (dev * 3 + err) / 4)
            }
        });
    }

    /// A message was acknowledged: the backoff of earlier timeouts ends.
    pub fn answered(&mut self) {
        self.backoff = 0;
    }

    /// The timeout fired: the next one is twice as long (up to the ceiling).
    pub fn expired(&mut self) {
        self.backoff = (self.backoff + 1).min(MAX_BACKOFF);
    }

    /// The ack timeout now.
    pub fn timeout(&self) -> Duration {
        match self.mode {
            AckTimeout::Fixed(d) => d,
            AckTimeout::Adaptive { floor, max } => {
                let base = self.smoothed.map_or(INITIAL, |(mean, dev)| mean + dev * 4).max(floor);
                (base * (1 << self.backoff)).min(max)
            }
        }
    }

    /// The smoothed round-trip time and its mean deviation, once measured.
    pub fn estimate(&self) -> Option<(Duration, Duration)> {
        self.smoothed
    }

    /// True when the timeout follows the measurements.
    pub fn adaptive(&self) -> bool {
        matches!(self.mode, AckTimeout::Adaptive { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_fast_link_sits_at_the_floor_and_a_slow_one_rises_above_it() {
        let mut fast = RoundTrip::new(AckTimeout::DEFAULT);
        assert_eq!(fast.timeout(), INITIAL, "before any sample");
        for _ in 0..50 {
            fast.sample(MS * 2);
        }
        assert_eq!(fast.timeout(), MS * 750);
        let mut slow = RoundTrip::new(AckTimeout::DEFAULT);
        for r in [300, 500, 400, 600, 350] {
            slow.sample(MS * r);
        }
        let (mean, dev) = slow.estimate().unwrap();
        assert!(mean > MS * 300 && mean < MS * 600, "{mean:?}");
        assert_eq!(slow.timeout(), mean + dev * 4);
        assert!(slow.timeout() > MS * 700);
    }

    #[test]
    fn timeouts_in_a_row_double_it_until_a_message_is_answered() {
        let mut rt = RoundTrip::new(AckTimeout::DEFAULT);
        rt.sample(MS);
        rt.expired();
        assert_eq!(rt.timeout(), MS * 1500);
        rt.expired();
        assert_eq!(rt.timeout(), MS * 3000);
        for _ in 0..20 {
            rt.expired();
        }
        assert_eq!(rt.timeout(), Duration::from_secs(48), "six doublings at most");
        rt.sample(MS);
        assert_eq!(rt.timeout(), Duration::from_secs(48), "a connect's sample alone keeps the backoff");
        rt.answered();
        assert_eq!(rt.timeout(), MS * 750);
        let mut capped = RoundTrip::new(AckTimeout::Adaptive { floor: MS * 500, max: Duration::from_secs(3) });
        (0..4).for_each(|_| capped.expired());
        assert_eq!(capped.timeout(), Duration::from_secs(3));
    }

    #[test]
    fn a_fixed_timeout_ignores_the_samples() {
        let mut rt = RoundTrip::new(AckTimeout::Fixed(Duration::from_secs(15)));
        rt.sample(MS);
        rt.expired();
        assert_eq!(rt.timeout(), Duration::from_secs(15));
        assert!(!rt.adaptive());
    }
}
