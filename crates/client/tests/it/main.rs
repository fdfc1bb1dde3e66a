//! Integration tests of the steadfast client against real Mosquitto.

#![allow(missing_docs)]

mod backlog;
mod bridge;
mod consumer;
mod faults;
#[cfg(feature = "postgres")]
mod group;
mod policy;
mod protocol;
mod receipts;
mod routing;
mod session;

use std::path::Path;
use std::time::Duration;

use steadfast::{BackoffConfig, BrokerUrl, Client, ClientConfig, ConnectError, Event};
use tokio::sync::broadcast;

pub fn config(id: &str, url: &str, dir: &Path) -> ClientConfig {
    let url: BrokerUrl = url.parse().expect("url");
    ClientConfig::new(id, url, dir).backoff(BackoffConfig {
        min: Duration::from_millis(50),
        max: Duration::from_millis(500),
        stable_after: Duration::from_secs(5),
        per_hour: None,
    })
}

pub async fn open(cfg: ClientConfig) -> Client {
    let (c, report) = Client::open(cfg).await.expect("open client");
    assert!(report.is_clean(), "{report:?}");
    c
}

/// Waits for the first event that `pick` accepts.
pub async fn next_event<T>(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    limit: Duration,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let fut = async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(t) = pick(&e) {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    };
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| panic!("no {what} event within {limit:?}"))
}

/// The error of the next failed connection attempt.
pub async fn connect_failed(events: &mut broadcast::Receiver<Event>) -> ConnectError {
    next_event(events, "ConnectFailed", Duration::from_secs(10), |e| match e {
        Event::ConnectFailed { error, .. } => Some(error.clone()),
        _ => None,
    })
    .await
}

pub fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:06}")).collect()
}

/// Checks that `got` holds every one of `want`, and that after removing
/// repeats (QoS 1 may deliver twice) the first arrivals are in order.
pub fn assert_all_in_order(got: &[String], want: &[String]) {
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<&String> = got.iter().filter(|g| seen.insert(g.as_str())).collect();
    let missing: Vec<_> = want.iter().filter(|w| !seen.contains(w.as_str())).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} of {} missing, first: {missing:?}",
        want.len() - want.iter().filter(|w| seen.contains(w.as_str())).count(),
        want.len()
    );
    let wanted: Vec<&String> = firsts.into_iter().filter(|f| want.contains(f)).collect();
    let expected: Vec<&String> = want.iter().collect();
    assert!(wanted == expected, "messages arrived out of order");
}
