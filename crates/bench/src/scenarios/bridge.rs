//! `bridge`: local Mosquitto -> `steadfast bridge` -> upstream Mosquitto,
//! against steadfast publishing straight to the upstream broker.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steadfast::ProtocolVersion;
use steadfast_lab::{mosquitto_program, Broker};

use crate::clients::steadfast_durable;
use crate::measure::{broker, median, rate, state_dir, versus};
use crate::{Args, BenchError, Scenario};

/// `mosquitto_sub` on `port` that exits after `n` messages; returns once
/// its subscription is granted.
pub(crate) async fn counting_subscriber(port: u16, filter: &str, n: usize) -> Result<std::process::Child, BenchError> {
    let mut sub = Command::new("stdbuf")
        .arg("-oL")
        .arg(mosquitto_program("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", filter, "-q", "1", "-C", &n.to_string(), "-d"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(BenchError::run("mosquitto_sub"))?;
    let out = sub.stdout.take().expect("stdout is piped");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("received SUBACK") {
                tx.take().map(|t| t.send(()));
            }
        }
    });
    let limit = Duration::from_secs(10);
    let granted = tokio::time::timeout(limit, rx)
        .await
        .map_err(|_| BenchError::TimedOut { what: "mosquitto_sub: its subscription".into(), limit })?;
    granted.map_err(|_| BenchError::Ended("mosquitto_sub"))?;
    Ok(sub)
}

/// The in-flight window of a `steadfast bridge` route (the client's
/// default; the bridge's configuration has no setting for it).
pub(crate) const BRIDGE_DEFAULT_WINDOW: u16 = 1024;

pub(crate) async fn bridge(a: Args) -> Result<Scenario, BenchError> {
    let exe = steadfast_binary(&a)?;
    // The bridge has no window setting of its own (its default is 1,024):
    // the brokers set it, by announcing `window` as their receive maximum
    // (upstream) and by sending no more than `window` at once (local); the
    // direct publisher gets the same.
    let window = a.inflight.min(BRIDGE_DEFAULT_WINDOW);
    let local = broker(window).await?;
    let upstream = broker(window).await?;
    let (mut bridged, mut direct) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("bridge: run {}/{}", run + 1, a.runs);
        let route = BridgeRun::register(&exe, &a, run, &local, &upstream)?;
        route.feed(&local, &a)?;
        bridged.push(rate(a.messages, route.forward(&upstream, a.messages).await?));
        let d = steadfast_durable(upstream.port(), &a, &format!("direct-{run}"), ProtocolVersion::V5, window).await?;
        direct.push(rate(a.messages, d));
    }
    Ok(scenario(&a, window, median(bridged), median(direct)))
}

/// The `steadfast` binary the scenario runs: `Args::steadfast`, or the one
/// beside this program.
fn steadfast_binary(a: &Args) -> Result<PathBuf, BenchError> {
    let exe = match &a.steadfast {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().map_err(BenchError::run("steadfast"))?.with_file_name("steadfast"),
    };
    if !exe.exists() {
        return Err(BenchError::NoSteadfastBinary { path: exe });
    }
    Ok(exe)
}

/// One run's route from the local broker to the upstream one: its
/// configuration and state in a fresh directory.
struct BridgeRun<'a> {
    exe: &'a Path,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl<'a> BridgeRun<'a> {
    /// Writes the route's configuration and registers its source session
    /// (`bridge --register`), so that the local broker queues for it.
    fn register(exe: &'a Path, a: &Args, run: usize, local: &Broker, upstream: &Broker) -> Result<Self, BenchError> {
        let dir = state_dir(a)?;
        let config = dir.path().join("bridge.toml");
        let text = format!(
            "[store]\ndir = \"{}\"\n[[route]]\nname = \"up\"\n[route.source]\nbrokers = [\"{}\"]\ntopics = [\"bench/bridge/#\"]\nclient_id = \"bench-bridge-{run}\"\n[route.destination]\nbrokers = [\"{}\"]\ntopic_prefix = \"up/\"\n",
            dir.path().join("state").display(),
            local.url(),
            upstream.url()
        );
        std::fs::write(&config, text).map_err(|source| BenchError::Write { path: config.clone(), source })?;
        let register = Command::new(exe)
            .args(["bridge", "--register", "--config"])
            .arg(&config)
            .output()
            .map_err(BenchError::run("steadfast bridge --register"))?;
        if !register.status.success() {
            let detail = String::from_utf8_lossy(&register.stderr).into_owned();
            return Err(BenchError::Failed { what: "bridge --register".into(), detail });
        }
        Ok(BridgeRun { exe, dir, config })
    }

    /// Queues `a.messages` at the local broker for the route's session, by
    /// a publisher that makes sure the broker has every one.
    fn feed(&self, local: &Broker, a: &Args) -> Result<(), BenchError> {
        let line = "b".repeat(a.payload) + "\n";
        let mut feed = Command::new(self.exe)
            .args(["pub", "-b", &local.url(), "-t", "bench/bridge/t", "-l", "--progress", "never", "--outbox"])
            .arg(self.dir.path().join("feed"))
            .stdin(Stdio::piped())
            .spawn()
            .map_err(BenchError::run("steadfast pub"))?;
        let mut stdin = feed.stdin.take().expect("stdin is piped");
        let fed = stdin.write_all(line.repeat(a.messages).as_bytes());
        drop(stdin); // end of input: the publisher finishes
        let status = feed.wait().map_err(BenchError::run("steadfast pub"))?;
        fed.map_err(BenchError::run("steadfast pub"))?;
        if !status.success() {
            return Err(BenchError::Failed { what: "feeding the local broker".into(), detail: status.to_string() });
        }
        Ok(())
    }

    /// Runs the bridge until an upstream subscriber got all `n` messages;
    /// the time from the bridge's start.
    async fn forward(&self, upstream: &Broker, n: usize) -> Result<Duration, BenchError> {
        let mut sub = counting_subscriber(upstream.port(), "up/bench/bridge/#", n).await?;
        let t0 = Instant::now();
        let mut bridge = Command::new(self.exe)
            .args(["bridge", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .spawn()
            .map_err(BenchError::run("steadfast bridge"))?;
        let sub_pid = sub.id();
        let limit = Duration::from_secs(300);
        let done = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || sub.wait())).await;
        let elapsed = t0.elapsed();
        let _ = Command::new("kill").args(["-TERM", &bridge.id().to_string()]).status();
        let _ = bridge.wait();
        let Ok(done) = done else {
            let _ = Command::new("kill").args(["-KILL", &sub_pid.to_string()]).status();
            return Err(BenchError::TimedOut { what: format!("the upstream subscriber: {n} messages"), limit });
        };
        let status = done?.map_err(BenchError::run("mosquitto_sub"))?;
        if !status.success() {
            return Err(BenchError::Failed { what: "the upstream subscriber".into(), detail: status.to_string() });
        }
        Ok(elapsed)
    }
}

/// The scenario's rows from the median rates, bridged and direct.
fn scenario(a: &Args, window: u16, bridged: f64, direct: f64) -> Scenario {
    Scenario {
        name: "bridge",
        title: format!(
            "{} QoS 1 messages of {} bytes, local Mosquitto -> steadfast bridge (durable) -> upstream Mosquitto, in-flight window {window} on both hops and for the direct publisher, {} runs, median",
            a.messages, a.payload, a.runs
        ),
        ratio_to: "steadfast publishing straight to the upstream broker, same run".into(),
        rows: versus(
            window,
            ("steadfast straight to upstream (durable, MQTT 5)", direct, None),
            ("local -> steadfast bridge (durable) -> upstream", bridged, None),
        ),
        latencies: vec![],
        notes: if window < a.inflight {
            vec![format!("window {window}, not {}: the bridge's own default caps it", a.inflight)]
        } else {
            vec![]
        },
    }
}
