//! Exponential backoff with full jitter.
//!
//! The delay before attempt `n` (counting from 0) is drawn uniformly from
//! `[min, min(max, min * 2^n)]`. The floor of `min` keeps a flapping broker
//! from being hammered; the jitter keeps a fleet of clients that lost the
//! same broker from reconnecting in lockstep. An optional hourly budget
//! (the `battery` profile) stretches a delay so that no more than that many
//! attempts start in any hour: a device on a battery does not wake its radio
//! every few seconds while its broker is down for a day.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Bounds of the reconnect delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Shortest delay, and the base of the exponential growth.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A link that stayed up at least this long resets the growth.
    pub stable_after: Duration,
    /// At most this many attempts start in any hour (`None`: no budget).
    pub per_hour: Option<u32>,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
            per_hour: None,
        }
    }
}

impl BackoffConfig {
    /// The `battery` profile: 30 s to 15 min, a link must stay up 2 min to
    /// reset the growth, and at most 12 attempts an hour.
    pub fn battery() -> Self {
        Self {
            min: Duration::from_secs(30),
            max: Duration::from_secs(15 * 60),
            stable_after: Duration::from_secs(120),
            per_hour: Some(12),
        }
    }

    /// Parses a profile: `default`, `battery`, or `MIN..MAX` with
    /// durations in the one syntax ([`crate::parse_duration`]: `200ms..1m`,
    /// `1h..1d`, `0.5s..2.5m`), optionally with an hourly budget:
    /// `1m..30m,6/h`.
    pub fn parse(s: &str) -> Result<BackoffConfig, BackoffError> {
        match s {
            "default" => return Ok(Self::default()),
            "battery" => return Ok(Self::battery()),
            _ => {}
        }
        let not_a_profile = || BackoffError::NotAProfile(s.to_owned());
        let (range, per_hour) = match s.split_once(',') {
            Some((range, budget)) => {
                let n = budget.strip_suffix("/h").and_then(|n| n.parse::<u32>().ok()).ok_or_else(not_a_profile)?;
                if n == 0 {
                    return Err(BackoffError::ZeroBudget(s.to_owned()));
                }
                (range, Some(n))
            }
            None => (s, None),
        };
        let (min, max) = range.split_once("..").ok_or_else(not_a_profile)?;
        let duration =
            |d: &str| crate::parse_duration(d).map_err(|cause| BackoffError::Duration { profile: s.to_owned(), cause });
        let (min, max) = (duration(min)?, duration(max)?);
        if min.is_zero() || max < min {
            return Err(BackoffError::Bounds(s.to_owned()));
        }
        Ok(Self { min, max, per_hour, ..Self::default() })
    }
}

/// Why a backoff profile does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackoffError {
    /// Not `default`, `battery` or `MIN..MAX[,N/h]`.
    #[error(
        "`{0}` is not a backoff profile; use `default`, `battery` or MIN..MAX[,N/h] such as 200ms..1m or 1m..30m,6/h"
    )]
    NotAProfile(String),
    /// An hourly budget of 0.
    #[error("backoff `{0}`: an hourly budget of 0 would never reconnect")]
    ZeroBudget(String),
    /// MIN of zero, or MAX below MIN.
    #[error("backoff `{0}`: MIN must be above zero and MAX at least MIN")]
    Bounds(String),
    /// MIN or MAX is not a duration.
    #[error("backoff `{profile}`: {cause}")]
    Duration {
        /// The profile as given.
        profile: String,
        /// Why the duration does not parse.
        cause: crate::DurationError,
    },
}

impl fmt::Display for BackoffConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}..{:?}", self.min, self.max)?;
        if let Some(n) = self.per_hour {
            write!(f, ", at most {n} attempts an hour")?;
        }
        Ok(())
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// The state of one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    /// When the attempts of the last hour start (hourly budget only).
    starts: VecDeque<Instant>,
}

impl Backoff {
    /// A fresh backoff: the next delay is drawn from `[min, min]`.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0, starts: VecDeque::new() }
    }

    /// The delay to wait from `now` before the next attempt; grows the
    /// window. With an hourly budget, the delay is stretched so that the
    /// attempt starts no sooner than an hour after the oldest of the last
    /// `per_hour` attempts.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng, now: Instant) -> Duration {
        let min = self.config.min.as_millis() as u64;
        let max = self.config.max.as_millis().max(min as u128) as u64;
        let cap = min.saturating_mul(1u64 << self.attempt.min(32)).min(max);
        self.attempt = self.attempt.saturating_add(1);
        let mut delay = Duration::from_millis(rng.u64(min..=cap.max(min)));
        if let Some(budget) = self.config.per_hour.filter(|n| *n > 0) {
            while self.starts.front().is_some_and(|t| now.saturating_duration_since(*t) >= HOUR) {
                self.starts.pop_front();
            }
            if self.starts.len() >= budget as usize {
                let oldest = self.starts[self.starts.len() - budget as usize];
                delay = delay.max((oldest + HOUR).saturating_duration_since(now));
            }
            self.starts.push_back(now + delay);
            while self.starts.len() > budget as usize {
                self.starts.pop_front();
            }
        }
        delay
    }

    /// Tells the backoff that a link went down after being up for `uptime`.
    /// Only a link that stayed up long enough resets the growth, so a broker
    /// that accepts and then drops every connection is still backed off.
    /// The hourly budget is never reset.
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
            per_hour: None,
        }
    }

    #[test]
    fn delays_stay_within_the_growing_window_and_the_cap() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut b = Backoff::new(config());
        for n in 0..40u32 {
            let d = b.next_delay(&mut rng, Instant::now()).as_millis() as u64;
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
                    b.next_delay(&mut rng, Instant::now());
                }
                b.next_delay(&mut rng, Instant::now())
            })
            .collect();
        assert!(delays.len() > 25, "only {} distinct delays", delays.len());
    }

    #[test]
    fn only_a_stable_link_resets_the_growth() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut b = Backoff::new(config());
        for _ in 0..5 {
            b.next_delay(&mut rng, Instant::now());
        }
        b.link_lost_after(Duration::from_secs(1));
        assert_eq!(b.attempts(), 5);
        b.link_lost_after(Duration::from_secs(11));
        assert_eq!(b.attempts(), 0);
    }

    /// The battery profile never starts more than 12 attempts in an hour,
    /// however often the link fails, and its delays stay within 30 s..15 min
    /// apart from the hourly stretch. Time is simulated.
    #[test]
    fn battery_profile_keeps_its_hourly_budget() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut b = Backoff::new(BackoffConfig::battery());
        let start = Instant::now();
        let mut now = start;
        let mut starts = Vec::new();
        for _ in 0..60 {
            let d = b.next_delay(&mut rng, now);
            assert!(d >= Duration::from_secs(30), "{d:?} under the 30 s floor");
            now += d;
            starts.push(now);
            // A connection that fails at once: no reset.
            b.link_lost_after(Duration::ZERO);
        }
        for (i, t) in starts.iter().enumerate() {
            let in_hour = starts[i..].iter().take_while(|u| u.duration_since(*t) < HOUR).count();
            assert!(in_hour <= 12, "{in_hour} attempts within the hour from attempt {i}");
        }
        // Sixty attempts need at least four hours and some.
        assert!(now.duration_since(start) >= 4 * HOUR, "{:?}", now.duration_since(start));
    }

    /// The default schedule for a fixed seed: the caps double from 100 ms
    /// up to 30 s and every delay falls within its cap.
    #[test]
    fn default_schedule_doubles_up_to_its_cap() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut b = Backoff::new(BackoffConfig::default());
        let now = Instant::now();
        let caps: Vec<u64> = (0..12u32).map(|n| (100u64 << n).min(30_000)).collect();
        for cap in caps {
            let d = b.next_delay(&mut rng, now).as_millis() as u64;
            assert!((100..=cap).contains(&d), "{d} ms outside [100, {cap}]");
        }
        assert_eq!(b.attempts(), 12);
    }

    #[test]
    fn profiles_parse() {
        assert_eq!(BackoffConfig::parse("default").unwrap(), BackoffConfig::default());
        assert_eq!(BackoffConfig::parse("battery").unwrap(), BackoffConfig::battery());
        let c = BackoffConfig::parse("200ms..1m").unwrap();
        assert_eq!((c.min, c.max), (Duration::from_millis(200), Duration::from_secs(60)));
        let c = BackoffConfig::parse("1m..30m,6/h").unwrap();
        assert_eq!((c.min, c.max, c.per_hour), (Duration::from_secs(60), Duration::from_secs(1800), Some(6)));
        for bad in ["fast", "1m..1s", "0..1s", "1s", "1x..2s", "1s..2s,0/h", "1s..2s,6", "1s..2s,x/h"] {
            assert!(BackoffConfig::parse(bad).is_err(), "{bad}");
        }
        assert!(BackoffConfig::parse("fast").unwrap_err().to_string().contains("battery"));
        // The one duration syntax: days and decimals too (`1d..2d` was refused).
        let c = BackoffConfig::parse("1d..2d").unwrap();
        assert_eq!((c.min, c.max), (Duration::from_secs(86_400), Duration::from_secs(172_800)));
        let c = BackoffConfig::parse("0.5s..1.5m").unwrap();
        assert_eq!((c.min, c.max), (Duration::from_millis(500), Duration::from_secs(90)));
        assert!(matches!(BackoffConfig::parse("1x..2s"), Err(BackoffError::Duration { .. })));
    }
}
