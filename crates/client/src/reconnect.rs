//! The one reconnect loop of every link (a publisher's driver, a
//! consumer's receiver): after a connection ends, the backoff's delay, one
//! log line per distinct error while the broker cannot be reached, the
//! event, and the wait that a stop cuts short.

use std::time::Duration;

use steadfast_core::{Backoff, BackoffConfig};
use tokio::sync::{broadcast, watch};
use tokio::time::{sleep, Instant};

use crate::clock;
use crate::error::ConnectError;
use crate::Event;

/// The reconnect state of one link.
pub(crate) struct Reconnect {
    backoff: Backoff,
    config: BackoffConfig,
    rng: fastrand::Rng,
    /// The last "cannot connect" error logged at warning level.
    last_logged: Option<String>,
    /// What the log calls the link: "" (a publisher's), "consumer ".
    prefix: &'static str,
}

impl Reconnect {
    pub fn new(config: BackoffConfig, seed: Option<u64>, prefix: &'static str) -> Self {
        let rng = match seed {
            Some(s) => fastrand::Rng::with_seed(s),
            None => fastrand::Rng::new(),
        };
        Self { backoff: Backoff::new(config), config, rng, last_logged: None, prefix }
    }

    /// The delay before trying again something that is not a connection
    /// (reading the store before the first one).
    pub fn retry_delay(&mut self) -> Duration {
        self.backoff.next_delay(&mut self.rng, clock::instant())
    }

    /// Starts the backoff afresh (the retries before the first connection
    /// are over).
    pub fn reset(&mut self) {
        self.backoff = Backoff::new(self.config);
    }

    /// The broker accepted a connection: the next "cannot connect" is
    /// news again.
    pub fn connected(&mut self) {
        self.last_logged = None;
    }

    /// A connection to `broker` ended with `error` (`connected_at`: when the
    /// broker had accepted it, if it had): logs it, announces it, and
    /// returns the delay before the next attempt.
    pub fn after(
        &mut self,
        broker: &str,
        error: ConnectError,
        connected_at: Option<Instant>,
        events: &broadcast::Sender<Event>,
    ) -> Duration {
        if let Some(at) = connected_at {
            self.backoff.link_lost_after(at.elapsed());
        }
        let delay = self.backoff.next_delay(&mut self.rng, clock::instant());
        let broker = broker.to_owned();
        let prefix = self.prefix;
        if connected_at.is_some() {
            tracing::warn!(%broker, error = %error, retry_in = ?delay, "{prefix}link lost; reconnecting");
            let _ = events.send(Event::Disconnected { broker, error, retry_in: delay });
            return delay;
        }
        // Said once per distinct error, not on every attempt.
        let text = error.to_string();
        if self.last_logged.as_deref() != Some(text.as_str()) {
            if error.is_retryable() {
                tracing::warn!(%broker, error = %error, retry_in = ?delay, "{prefix}cannot connect; will keep retrying");
            } else {
                // The broker's answer stands until the configuration
                // changes (credentials, version, client id, certificates).
                tracing::error!(%broker, error = %error, retry_in = ?delay, "{prefix}cannot connect, and trying again will not help until the configuration changes");
            }
            self.last_logged = Some(text);
        } else {
            tracing::debug!(%broker, error = %error, retry_in = ?delay, "{prefix}cannot connect; will retry");
        }
        let _ = events.send(Event::ConnectFailed { broker, error, retry_in: delay });
        delay
    }
}

/// Waits `delay`, or less if a stop is asked; true when stopping.
pub(crate) async fn wait(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = sleep(delay) => {}
        _ = stop.changed() => {}
    }
    *stop.borrow() || stop.has_changed().is_err()
}

/// `attempt` (a connection being opened), unless a stop is asked first:
/// `None` then, at once (a broker that never answers CONNECT must not hold
/// a stop up for the connect timeout).
pub(crate) async fn unless_stopped<T>(
    attempt: impl std::future::Future<Output = T>,
    stop: &mut watch::Receiver<bool>,
) -> Option<T> {
    if *stop.borrow() {
        return None;
    }
    tokio::select! {
        t = attempt => Some(t),
        _ = stop.wait_for(|s| *s) => None,
    }
}
