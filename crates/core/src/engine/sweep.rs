//! The outbox's sweeps: when a message's deadline has passed, when the
//! outbox must look for what outlived its deadline, its age bound or a
//! fanout catch-up window, and what each sweep removes. The store carries
//! a sweep out (a query per rule); the decisions are here, shared by the
//! outbox writer, every sender (a PUBLISH never leaves after its deadline)
//! and the simulator.

use std::time::{Duration, Instant};

use super::{Now, Timer};

/// The wall-clock instant (ms) at or before which a deadline has passed.
pub fn expiry_cutoff(wall_ms: u64) -> u64 {
    let early = if crate::mutate::planted(crate::mutate::Bug::ExpiresEarly) { 2_000 } else { 0 };
    wall_ms + early
}

/// True when a message whose deadline is `expires_ms` must leave at
/// `wall_ms` instead of being sent (again).
pub fn deadline_passed(expires_ms: u64, wall_ms: u64) -> bool {
    expires_ms <= expiry_cutoff(wall_ms)
}

/// What the outbox asks of its sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepConfig {
    /// How often a sweep runs while there is something to sweep.
    pub every: Duration,
    /// The age bound: a message older than this leaves as expired.
    pub max_age_ms: Option<u64>,
}

/// One sweep: each rule that applies, with its cutoff (wall ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Messages whose deadline is at or before this leave as expired
    /// (`None`: no deadline has passed).
    pub deadlines_at: Option<u64>,
    /// Messages created before this leave as expired (the age bound).
    pub created_before: Option<u64>,
    /// The sweep's wall-clock time, for the fanout catch-up windows (a
    /// message older than `at - window` that some member acknowledged
    /// leaves); `None` when no route has a window.
    pub catch_up_at: Option<u64>,
    /// Messages whose wait for receipts ended by this wall-clock time go
    /// out again.
    pub receipts_at: Option<u64>,
}

impl Sweep {
    /// The catch-up cutoff of a window of `window_ms`.
    pub fn catch_up_cutoff(&self, window_ms: u64) -> Option<u64> {
        self.catch_up_at.map(|at| at.saturating_sub(window_ms))
    }
}

/// When the outbox sweeps, from what it holds.
#[derive(Debug, Clone)]
pub struct Sweeper {
    cfg: SweepConfig,
    last: Instant,
    /// The earliest deadline queued.
    next_expiry: Option<u64>,
    /// Messages are queued.
    queued: bool,
    /// A route has a fanout catch-up window.
    catch_up: bool,
    /// The earliest end of a wait for receipts.
    next_receipt: Option<u64>,
}

impl Sweeper {
    /// A sweeper that last swept at `now`.
    pub fn new(cfg: SweepConfig, now: Instant) -> Self {
        Self { cfg, last: now, next_expiry: None, queued: false, catch_up: false, next_receipt: None }
    }

    /// Whether anything is queued (the age bound has something to check).
    pub fn handle_queued(&mut self, queued: bool) {
        self.queued = queued;
    }

    /// The earliest deadline queued, as the store reads it.
    pub fn handle_next_expiry(&mut self, next_expiry: Option<u64>) {
        self.next_expiry = next_expiry;
    }

    /// A message with a deadline was queued.
    pub fn handle_deadline(&mut self, expires_ms: u64) {
        self.next_expiry = Some(self.next_expiry.map_or(expires_ms, |n| n.min(expires_ms)));
        self.queued = true;
    }

    /// The earliest time a message's wait for receipts ends (`None`:
    /// nothing awaits receipts).
    pub fn handle_next_receipt(&mut self, due_ms: Option<u64>) {
        self.next_receipt = due_ms;
    }

    /// A message awaits receipts until `due_ms`.
    pub fn handle_awaiting(&mut self, due_ms: u64) {
        self.next_receipt = Some(self.next_receipt.map_or(due_ms, |n| n.min(due_ms)));
    }

    /// The routes now have (or no longer have) a catch-up window.
    pub fn handle_routes(&mut self, catch_up: bool) {
        self.catch_up = catch_up;
    }

    /// The earliest deadline queued, as last told.
    pub fn next_expiry(&self) -> Option<u64> {
        self.next_expiry
    }

    /// True while there is anything a sweep could remove.
    pub fn active(&self) -> bool {
        self.catch_up
            || self.next_expiry.is_some()
            || self.next_receipt.is_some()
            || (self.cfg.max_age_ms.is_some() && self.queued)
    }

    /// The sweeper's timer.
    pub fn timers(&self) -> [(Timer, Option<Instant>); 1] {
        [(Timer::Sweep, self.active().then(|| self.last + self.cfg.every))]
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers()[0].1
    }

    /// The sweep due at `now`, if one is.
    pub fn handle_timeout(&mut self, now: Now) -> Option<Sweep> {
        if self.poll_timeout().is_none_or(|due| due > now.at) {
            return None;
        }
        self.last = now.at;
        let deadlines_at =
            self.next_expiry.filter(|e| deadline_passed(*e, now.wall_ms)).map(|_| expiry_cutoff(now.wall_ms));
        let created_before = self.cfg.max_age_ms.filter(|_| self.queued).map(|age| now.wall_ms.saturating_sub(age));
        let receipts_at = self.next_receipt.filter(|due| *due <= now.wall_ms).map(|_| now.wall_ms);
        Some(Sweep { deadlines_at, created_before, catch_up_at: self.catch_up.then_some(now.wall_ms), receipts_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(base: Instant, ms: u64) -> Now {
        Now { at: base + Duration::from_millis(ms), wall_ms: 1_000_000 + ms }
    }

    #[test]
    fn nothing_to_sweep_sets_no_timer() {
        let base = Instant::now();
        let mut s = Sweeper::new(SweepConfig { every: Duration::from_secs(1), max_age_ms: Some(500) }, base);
        assert_eq!(s.poll_timeout(), None, "an empty outbox with an age bound has nothing to sweep");
        assert_eq!(s.handle_timeout(now(base, 5_000)), None);
        s.handle_queued(true);
        assert_eq!(s.poll_timeout(), Some(base + Duration::from_secs(1)));
    }

    #[test]
    fn a_deadline_is_swept_once_it_passed_and_not_before() {
        let base = Instant::now();
        let mut s = Sweeper::new(SweepConfig { every: Duration::from_secs(1), max_age_ms: None }, base);
        s.handle_deadline(1_002_500);
        assert_eq!(s.handle_timeout(now(base, 999)), None, "not due before a second");
        let first = s.handle_timeout(now(base, 1_000)).expect("due");
        assert_eq!(first.deadlines_at, None, "the deadline has not passed at 1,001,000");
        assert_eq!(s.poll_timeout(), Some(base + Duration::from_secs(2)), "the next sweep a second later");
        let later = s.handle_timeout(now(base, 3_000)).expect("due");
        assert_eq!(later.deadlines_at, Some(1_003_000));
        assert!(deadline_passed(1_002_500, 1_003_000) && !deadline_passed(1_002_500, 1_002_499));
        assert!(deadline_passed(1_002_500, 1_002_500), "a deadline passes at its instant");
    }

    #[test]
    fn the_age_bound_and_catch_up_windows_get_their_cutoffs() {
        let base = Instant::now();
        let mut s = Sweeper::new(SweepConfig { every: Duration::from_millis(100), max_age_ms: Some(400) }, base);
        s.handle_queued(true);
        s.handle_routes(true);
        let sweep = s.handle_timeout(now(base, 100)).expect("due");
        assert_eq!(sweep.created_before, Some(1_000_100 - 400));
        assert_eq!(sweep.catch_up_cutoff(50), Some(1_000_050));
        s.handle_routes(false);
        s.handle_queued(false);
        assert_eq!(s.poll_timeout(), None, "nothing queued, no window: no sweep");
    }
}
