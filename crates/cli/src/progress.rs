//! A progress line on stderr for long runs (`pub -l` of a big file,
//! `--drain` of a big backlog): accepted, queued, delivered, the delivery
//! rate and the time left. Drawn only when asked (by default: when stderr
//! is a terminal), at most five times a second, and cleared at the end.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use steadfast::{BrokerStatus, Client, LinkState};
use tokio::task::JoinHandle;

/// The running progress line.
pub struct Progress {
    task: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing when `on`; `accepted` is the run's accepted count.
    pub fn start(on: bool, client: &Client, accepted: Arc<AtomicU64>) -> Progress {
        if !on {
            return Progress { task: None };
        }
        let state = client.outbox_state();
        let queued_at_start = state.borrow().totals.count;
        let client = client.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut last = (Instant::now(), 0u64);
            let mut rate = 0.0f64;
            loop {
                tick.tick().await;
                let queued = state.borrow().totals.count;
                let acc = accepted.load(Ordering::Relaxed);
                let delivered = (queued_at_start + acc).saturating_sub(queued);
                let dt = last.0.elapsed().as_secs_f64();
                if dt >= 1.0 {
                    let now_rate = delivered.saturating_sub(last.1) as f64 / dt;
                    // Smoothed, so the ETA does not jump with every tick.
                    rate = if rate == 0.0 { now_rate } else { 0.7 * rate + 0.3 * now_rate };
                    last = (Instant::now(), delivered);
                }
                // Within the first second: the rate so far (it said 0 msg/s
                // while thousands were being delivered).
                let shown = if rate == 0.0 && dt > 0.0 { delivered.saturating_sub(last.1) as f64 / dt } else { rate };
                let mut line = render(acc, queued, delivered, shown, started.elapsed());
                if queued > 0 {
                    line += &links(&client.broker_status(), std::time::SystemTime::now());
                }
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
            }
        });
        Progress { task: Some(task) }
    }

    /// Stops and clears the line.
    pub fn finish(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

fn render(accepted: u64, queued: u64, delivered: u64, rate: f64, elapsed: Duration) -> String {
    let eta = if queued == 0 {
        "done".to_owned()
    } else if rate > 0.0 {
        format!("ETA {}", clock(Duration::from_secs_f64(queued as f64 / rate)))
    } else {
        "ETA --:--".to_owned()
    };
    format!(
        "steadfast: {accepted} accepted · {queued} queued · {delivered} delivered · {:.0} msg/s · {} · {eta}",
        rate,
        clock(elapsed)
    )
}

/// With messages queued and no broker connected, why: the first broker's
/// state, when it is tried next, and its last error (empty otherwise).
fn links(brokers: &[BrokerStatus], now: std::time::SystemTime) -> String {
    if brokers.iter().any(|b| b.state == LinkState::Connected) {
        return String::new();
    }
    let Some(b) = brokers.first() else { return String::new() };
    let next = b.retry_at.and_then(|t| t.duration_since(now).ok()).map(|d| format!(", next try in {}s", d.as_secs()));
    let error: Option<String> = b.last_error.as_ref().map(|e| format!(": {}", e.chars().take(60).collect::<String>()));
    let more = if brokers.len() > 1 { format!(" (+{} more)", brokers.len() - 1) } else { String::new() };
    format!(" · {} {}{}{}{more}", b.url, b.state.as_str(), next.unwrap_or_default(), error.unwrap_or_default())
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_counts_rate_and_time_left() {
        let line = render(1000, 500, 2500, 250.0, Duration::from_secs(75));
        assert_eq!(line, "steadfast: 1000 accepted · 500 queued · 2500 delivered · 250 msg/s · 01:15 · ETA 00:02");
        assert!(render(1, 0, 1, 0.0, Duration::ZERO).ends_with("done"));
        assert!(render(1, 5, 0, 0.0, Duration::ZERO).ends_with("ETA --:--"));
        assert_eq!(clock(Duration::from_secs(3 * 3600 + 61)), "3:01:01");
    }

    /// A publish to a broker that is down says so on the line, with when
    /// it is tried next and why it failed; once one is connected, nothing.
    #[test]
    fn the_line_says_why_nothing_is_delivered() {
        let now = std::time::SystemTime::now();
        let mut b = BrokerStatus {
            url: "mqtt://127.0.0.1:1883".into(),
            state: LinkState::Backoff,
            last_error: Some("cannot reach mqtt://127.0.0.1:1883: Connection refused (os error 111)".into()),
            since: now,
            retry_at: Some(now + Duration::from_millis(3_500)),
            acked: 0,
            connects: 0,
            sessions_lost: 0,
            refused: 0,
            inflight: 0,
            attempts: 4,
            active: false,
            ack_timeout: Duration::from_millis(750),
            round_trip: None,
        };
        let said = links(std::slice::from_ref(&b), now);
        assert!(said.starts_with(" · mqtt://127.0.0.1:1883 backoff, next try in 3s: cannot reach"), "{said}");
        b.state = LinkState::Connected;
        assert_eq!(links(&[b], now), "");
    }
}
