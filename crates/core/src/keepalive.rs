//! Keep-alive and dead-link detection.
//!
//! A link can go silent without FIN or RST (a cable pulled, a NAT entry
//! expired, a black-holing middlebox). TCP alone notices that only after
//! minutes. Here the rule is about what we *receive*: when nothing arrived
//! for half the keep-alive interval, send PINGREQ; when nothing arrived for
//! the whole interval, the link is dead. A busy publisher therefore detects a
//! black hole as fast as an idle one: its own sends do not hide the silence.

use std::time::{Duration, Instant};

/// What the driver must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAliveAction {
    /// Send a PINGREQ.
    SendPing,
    /// Nothing received for a whole interval: close the link.
    Dead,
}

/// Keep-alive state of one connection.
#[derive(Debug, Clone)]
pub struct KeepAlive {
    interval: Duration,
    last_rx: Instant,
    ping_sent: bool,
}

impl KeepAlive {
    /// Starts the clock for a connection established at `now`.
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self { interval, last_rx: now, ping_sent: false }
    }

    /// Something arrived from the broker.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = now;
        self.ping_sent = false;
    }

    /// When something last arrived from the broker (or the link came up).
    pub fn heard_at(&self) -> Instant {
        self.last_rx
    }

    /// When `poll` next has something to say.
    pub fn poll_timeout(&self) -> Instant {
        if self.ping_sent {
            self.last_rx + self.interval
        } else {
            self.last_rx + self.interval / 2
        }
    }

    /// What to do at `now`, if anything.
    pub fn poll(&mut self, now: Instant) -> Option<KeepAliveAction> {
        let silent = now.saturating_duration_since(self.last_rx);
        if silent >= self.interval {
            Some(KeepAliveAction::Dead)
        } else if silent >= self.interval / 2 && !self.ping_sent {
            self.ping_sent = true;
            Some(KeepAliveAction::SendPing)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_interval_and_dies_at_full_silence() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = KeepAlive::new(10 * s, t0);
        assert_eq!(k.poll(t0 + 4 * s), None);
        assert_eq!(k.poll_timeout(), t0 + 5 * s);
        assert_eq!(k.poll(t0 + 5 * s), Some(KeepAliveAction::SendPing));
        assert_eq!(k.poll(t0 + 6 * s), None);
        assert_eq!(k.poll_timeout(), t0 + 10 * s);
        assert_eq!(k.poll(t0 + 10 * s), Some(KeepAliveAction::Dead));
    }

    #[test]
    fn receiving_keeps_the_link_alive() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut k = KeepAlive::new(10 * s, t0);
        assert_eq!(k.poll(t0 + 5 * s), Some(KeepAliveAction::SendPing));
        k.on_receive(t0 + 6 * s);
        assert_eq!(k.poll(t0 + 10 * s), None);
        assert_eq!(k.poll(t0 + 11 * s), Some(KeepAliveAction::SendPing));
    }
}
