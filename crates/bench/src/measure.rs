//! What every scenario measures with: Mosquitto brokers, fresh state
//! directories, time limits on load loops, rates and medians, the RSS of
//! this process, and baseline-versus rows.

use std::future::Future;
use std::time::Duration;

use steadfast::BrokerUrl;
use steadfast_lab::{Broker, BrokerKind, BrokerOptions};

use crate::{Args, BenchError, Row};

/// How long a load loop of `n` messages may take: a minute, plus 200 µs a
/// message (at least 5,000 msg/s beyond the first minute).
pub(crate) fn limit_for(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_micros(200 * n as u64)
}

/// Fails a load loop that is not done within [`limit_for`] (a lost
/// acknowledgement, a broker gone) instead of letting the bench hang.
pub(crate) async fn bounded<T>(
    what: &str,
    n: usize,
    f: impl Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    let limit = limit_for(n);
    let timed_out = || BenchError::TimedOut { what: format!("{what}: {n} messages"), limit };
    tokio::time::timeout(limit, f).await.map_err(|_| timed_out())?
}

/// A fresh directory under `--outbox-dir` for one outbox (or inbox, or
/// bridge state); removed when dropped.
pub(crate) fn state_dir(a: &Args) -> Result<tempfile::TempDir, BenchError> {
    tempfile::Builder::new()
        .prefix("steadfast-bench-")
        .tempdir_in(&a.outbox_dir)
        .map_err(|source| BenchError::StateDir { dir: a.outbox_dir.clone(), source })
}

/// A Mosquitto whose CONNACK announces no receive maximum (`0`), or
/// `window`: by default it announces its `max_inflight_messages` of 20,
/// which caps every MQTT 5 client at 20 whatever it asks for (MQTT 3.1.1
/// clients are not capped). Without a cap the client's own window holds.
/// The broker's window towards subscribers is the same figure.
pub(crate) async fn broker(window: u16) -> Result<Broker, BenchError> {
    let opts = BrokerOptions { extra: vec![format!("max_inflight_messages {window}")], ..BrokerOptions::default() };
    Ok(Broker::start(BrokerKind::Mosquitto, opts, None).await?)
}

pub(crate) fn url(port: u16) -> BrokerUrl {
    format!("mqtt://127.0.0.1:{port}").parse().expect("loopback URL")
}

/// A baseline row and the row measured against it: (name, msg/s, peak
/// RSS), both with in-flight window `window`.
pub(crate) fn versus(window: u16, base: (&str, f64, Option<u64>), other: (&str, f64, Option<u64>)) -> Vec<Row> {
    let row = |(name, rate, rss): (&str, f64, Option<u64>)| Row {
        name: name.into(),
        rate: Some(rate),
        rss_mib: rss.map(mib),
        window: Some(window),
        ..Row::default()
    };
    vec![Row { baseline: true, ..row(base) }, Row { ratio: Some(other.1 / base.1), ..row(other) }]
}

pub(crate) fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Resident set size of this process, in bytes.
pub(crate) fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kb.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// Samples the peak RSS every 50 ms until dropped.
pub(crate) struct RssPeak {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    pub(crate) fn start() -> RssPeak {
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss()));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                p.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssPeak { peak, task }
    }
    pub(crate) fn stop(self) -> u64 {
        self.task.abort();
        self.peak.load(std::sync::atomic::Ordering::Relaxed).max(rss())
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}
