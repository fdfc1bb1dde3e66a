//! The clocks the engine is handed: tokio's monotonic time (paused in
//! tests, so timers and the engine agree), and the wall clock for message
//! deadlines, which outlive the process.

use steadfast_core::engine::Now;
use steadfast_store::now_ms;

/// Monotonic time now, as the engine takes it.
pub(crate) fn instant() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Both clocks now.
pub(crate) fn now() -> Now {
    Now { at: instant(), wall_ms: now_ms() }
}
