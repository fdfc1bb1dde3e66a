//! Benchmarks, each with its baseline measured in the same run so that a
//! noisy machine does not lie:
//!
//! - `publish` (default): N QoS 1 messages to one local Mosquitto through
//!   steadfast's durable outbox, through bare rumqttc (no durability), and
//!   through `mosquitto_pub -l`. Every client gets the same in-flight
//!   window (`--inflight`), and each is also measured at a few windows
//!   (`--windows`) and reported at the one that suited it best.
//! - `fanout`: the same messages through a fanout set of two brokers
//!   (`ack = all`), against one broker.
//! - `failover`: a publisher at 1,000 msg/s to a failover pair; the primary
//!   is killed (`kill -9`) or black-holed, and the gap until the backup
//!   acknowledges the first message is measured.
//!
//! - `consume`: N QoS 1 messages queued for a registered consumer, drained
//!   with the durable inbox (de-duplication, a record synced before each
//!   ack, group commit) and without it, in the same run.
//!
//! - `backlog`: N messages (default 1,000,000) queued while no broker is
//!   reachable; then a restart on that outbox with the broker up: the time
//!   from opening the outbox to the first acknowledged message, the
//!   drain rate, and the RSS of this process while the backlog sits and
//!   while it drains (sampled from /proc every 50 ms), against bare
//!   rumqttc publishing live in the same run, without and with
//!   steadfast's identity property; `--runs` such runs, the median
//!   reported and every run's ratio in a note.
//!
//! - `bridge`: N QoS 1 messages queued in a local Mosquitto for a
//!   registered `steadfast bridge` route, then forwarded (durably, each
//!   acknowledged to the source only once on disk) to an upstream
//!   Mosquitto; against steadfast publishing the same N straight to the
//!   upstream broker in the same run. Needs the `steadfast` binary beside
//!   this one: `cargo build --release -p steadfast-cli` first.
//!
//! - `restart` and `drain` are the two halves of `backlog`: the time from
//!   opening an outbox with 1,000,000 queued to the first acknowledgement,
//!   and the rate at which it then drains.
//!
//! Windows: Mosquitto announces a receive maximum of its own
//! `max_inflight_messages` (20 by default) to MQTT 5 clients, which would
//! cap every MQTT 5 client at 20 whatever it asked for; the brokers here
//! are started so that the client's window is the one in force.
//!
//! Outboxes go in fresh directories under `--outbox-dir` (default the
//! temp dir). Every run reports that directory's filesystem and its raw
//! `write` + `fsync` latency, and refuses a tmpfs or ramfs directory
//! (where a sync costs nothing) unless `--allow-tmpfs` is given.
//!
//! Each scenario gives rows (messages/s, latency p50/p99, peak RSS, the
//! ratio to its same-run baseline); `steadfast bench` prints them as tables
//! or JSON and can plot the publish latencies as an SVG histogram.
//!
//! `steadfast bench [SCENARIO...|all] [--messages N] [--payload BYTES] [--runs R] [--inflight N] [--windows LIST] [--rate N] [--outbox-dir DIR] [--allow-tmpfs] [--json] [--plot FILE]`

#![forbid(unsafe_code)]

mod clients;
mod disk;
mod error;
mod measure;
mod report;
mod scenarios;

pub use disk::{filesystem_of, is_memory_backed, probe as probe_outbox_dir, OutboxDirError, OutboxDisk};
pub use error::BenchError;
pub use report::{percentile, Report, Row, Scenario};

use std::path::PathBuf;

use scenarios::{backlog, bridge, consume, failover, fanout, group, publish, receipts};

/// Every scenario, in the order `all` runs them.
pub const SCENARIOS: [&str; 10] =
    ["publish", "fanout", "failover", "restart", "drain", "consume", "bridge", "backlog", "receipts", "group"];

/// What to run and how big.
#[derive(Debug, Clone)]
pub struct Args {
    /// Messages per run.
    pub messages: usize,
    /// Payload bytes.
    pub payload: usize,
    /// Runs per scenario (the median is reported).
    pub runs: usize,
    /// In-flight window of every client.
    pub inflight: u16,
    /// The windows at which `publish` also measures each client, to report
    /// each at its best (`inflight` is always among them).
    pub windows: Vec<u16>,
    /// Messages per second of the paced latency runs.
    pub rate: u32,
    /// The `steadfast` binary (the bridge scenario runs it).
    pub steadfast: Option<PathBuf>,
    /// Where the outboxes (and inboxes, and bridge state) go, each in a
    /// fresh directory.
    pub outbox_dir: PathBuf,
    /// Run even if `outbox_dir` is on tmpfs or ramfs.
    pub allow_tmpfs: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            messages: 100_000,
            payload: 64,
            runs: 3,
            inflight: 256,
            windows: vec![64, 256, 1024, 4096],
            rate: 2_000,
            steadfast: None,
            outbox_dir: std::env::temp_dir(),
            allow_tmpfs: false,
        }
    }
}

/// Runs the scenarios named (`all`: every one; `restart` and `drain`
/// share one `backlog` run).
pub async fn run(names: &[String], a: &Args) -> Result<Report, BenchError> {
    let mut names: Vec<String> = names.to_vec();
    if names.is_empty() {
        names.push("publish".into());
    }
    if names.iter().any(|n| n == "all") {
        names = ["publish", "fanout", "failover", "backlog", "consume", "bridge", "receipts", "group"]
            .map(String::from)
            .to_vec();
    }
    for n in &names {
        if !SCENARIOS.contains(&n.as_str()) {
            return Err(BenchError::UnknownScenario { name: n.clone() });
        }
    }
    let outbox = disk::probe(&a.outbox_dir, a.allow_tmpfs)?;
    eprintln!(
        "outbox directory {} on {}: raw write+fsync p50 {:.3} ms, p99 {:.3} ms",
        outbox.dir.display(),
        outbox.filesystem,
        outbox.fsync_p50_ms,
        outbox.fsync_p99_ms
    );
    let backlog_wanted = names.iter().any(|n| matches!(n.as_str(), "restart" | "drain" | "backlog"));
    let mut report = Report { outbox: Some(outbox), inflight: Some(a.inflight), scenarios: vec![] };
    let mut backlog_done = false;
    for n in &names {
        let a = a.clone();
        let scenario = match n.as_str() {
            "publish" => publish(a).await?,
            "fanout" => fanout(a).await?,
            "failover" => failover(a).await?,
            "consume" => consume(a).await?,
            "bridge" => bridge(a).await?,
            "receipts" => receipts(a).await?,
            "group" => group(a).await?,
            _ if backlog_wanted && !backlog_done => {
                backlog_done = true;
                backlog(a).await?
            }
            _ => continue,
        };
        report.scenarios.push(scenario);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal comes before any scenario runs, and names the fix.
    #[tokio::test]
    async fn a_missing_outbox_directory_is_refused_before_any_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let a = Args { outbox_dir: dir.path().join("missing"), ..Args::default() };
        let e = run(&["publish".into()], &a).await.unwrap_err();
        assert!(matches!(e, BenchError::OutboxDir(_)), "{e:#}");
        // An unknown scenario is reported first.
        let e = run(&["nonsense".into()], &a).await.unwrap_err();
        assert!(e.to_string().starts_with("unknown scenario"), "{e:#}");
    }
}
