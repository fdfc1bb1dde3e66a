//! `bridge`: local Mosquitto -> `steadfast bridge` -> upstream Mosquitto,
//! against steadfast publishing straight to the upstream broker. Both end
//! the same way: when the upstream broker has acknowledged every message
//! (the direct publisher's outbox is empty; the bridge's
//! `steadfast_broker_acked_total` reaches the count). No subscriber runs
//! upstream in either: before 2026-12-02 one did in the bridged runs only,
//! and its CPU (a third of the bridge's own) was charged to the bridge.
//!
//! Both start where their messages start to flow: the direct publisher at
//! its first `enqueue` (its client already open), the bridge at its first
//! upstream acknowledgement, the messages acknowledged before that left
//! out of the count. The bridge's own start (the process, its stores, its
//! two connections and the source's session) is a row of its own; until
//! 2026-12-05 it was inside the bridged time, 70 to 100 ms of about 3 s
//! here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steadfast::ProtocolVersion;
use steadfast_lab::{free_port, Broker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clients::steadfast_durable;
use crate::measure::{broker, median, median_run, process_us, rate, state_dir, us_text, versus, Cpu, Span, Took};
use crate::scenarios::consume::consume_once;
use crate::{Args, BenchError, Row, Scenario};

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
    let (mut bridged, mut direct, mut cpu_bridged, mut cpu_direct) = (vec![], vec![], vec![], vec![]);
    let (mut starts, mut receiving) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("bridge: run {}/{}", run + 1, a.runs);
        let route = BridgeRun::register(&exe, &a, run, &local, &upstream)?;
        route.feed(&local, &a)?;
        let forwarded = route.forward(&upstream, a.messages).await?;
        bridged.push(rate(forwarded.counted, forwarded.took.elapsed));
        cpu_bridged.push(forwarded.took.cpu);
        starts.extend(forwarded.start.map(|d| d.as_secs_f64() * 1e3));
        let took =
            steadfast_durable(upstream.port(), &a, &format!("direct-{run}"), ProtocolVersion::V5, window).await?;
        direct.push(rate(a.messages, took.elapsed));
        cpu_direct.push(took.cpu);
        // The bridge's receiving side alone: a consumer without an inbox
        // draining a backlog as large from the same local broker. Its own
        // CPU and the publisher's are the floor of the bridge's own.
        let took = consume_once(local.port(), &a, &format!("bridge-receiving-{run}"), false).await?;
        receiving.extend(took.cpu.and_then(|c| c.own_us));
    }
    let start = (!starts.is_empty()).then(|| median(starts));
    let receiving = (!receiving.is_empty()).then(|| median(receiving));
    let brokers = [local.pid(), upstream.pid()];
    let (bridged, direct) = (median_run(&bridged, &cpu_bridged), median_run(&direct, &cpu_direct));
    Ok(scenario(&a, window, bridged, direct, start, receiving, brokers))
}

/// The bridge's floor: what its own CPU a message would be, were it to
/// spend no more than a publisher straight to the upstream broker plus a
/// consumer (without an inbox) on the local broker, each measured in the
/// same run; and the ceiling that leaves, the ratio the machine's cores
/// allow with the bridge at its floor and the rest of the bridged run's
/// CPU (both brokers, the kernel) as measured (docs/performance.md,
/// session 36).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Floor {
    own_us: f64,
    ceiling: f64,
}

fn floor(bridged: Option<Cpu>, direct: (f64, Option<Cpu>), receiving: Option<f64>) -> Option<Floor> {
    let own_us = direct.1?.own_us? + receiving?;
    Some(Floor { own_us, ceiling: bridged?.par_ratio(own_us, direct.0)? })
}

/// One bridged run: the span timed and the messages it counts, and the
/// bridge's start (spawned to its first upstream acknowledgement seen).
struct Forwarded {
    took: Took,
    counted: usize,
    /// `None` when the first reading that found an acknowledgement (or the
    /// one right after it) found every message acknowledged: then the span
    /// is the whole run, start included, and no start is reported.
    start: Option<Duration>,
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

    /// Runs the bridge until the upstream broker has acknowledged all `n`
    /// messages (read from the bridge's `--metrics`: [`pause`]). The span starts at the
    /// first acknowledgement seen and counts the messages acknowledged
    /// after the reading that follows its start (what it leaves out is
    /// left out of the count, not of the time).
    async fn forward(&self, upstream: &Broker, n: usize) -> Result<Forwarded, BenchError> {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        // The fallback, should the first reading find every message
        // acknowledged already.
        let whole = Span::start(n);
        let spawned = Instant::now();
        let mut bridge = Command::new(self.exe)
            .args(["bridge", "--metrics", &metrics, "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .spawn()
            .map_err(BenchError::run("steadfast bridge"))?;
        let limit = Duration::from_secs(300);
        let counter = format!("steadfast_broker_acked_total{{broker=\"{}\"}}", upstream.url());
        let mut acked = 0;
        let mut exited = None;
        let mut flowing: Option<(Span, u64, Duration)> = None;
        while acked < n as u64 && spawned.elapsed() < limit && exited.is_none() {
            tokio::time::sleep(pause(flowing.as_ref().map(|(span, at, _)| (span, *at)), acked, n)).await;
            acked = scrape(&metrics, &counter).await.unwrap_or(acked);
            if flowing.is_none() && acked > 0 && acked < n as u64 {
                let start = spawned.elapsed();
                let span = Span::start(n - acked as usize);
                // Read again after the span's start: what was acknowledged
                // while it read the CPU counters is not counted.
                acked = scrape(&metrics, &counter).await.unwrap_or(acked);
                flowing = Some((span.counting(n - acked.min(n as u64) as usize), acked, start));
            }
            exited = bridge.try_wait().map_err(BenchError::run("steadfast bridge"))?;
        }
        // Read while it runs: the bridge's own time is the row's own.
        let pid = bridge.id();
        let forwarded = match flowing {
            Some((span, at, start)) if at < n as u64 => {
                Forwarded { took: span.stop_for(pid), counted: n - at as usize, start: Some(start) }
            }
            _ => Forwarded { took: whole.stop_for(pid), counted: n, start: None },
        };
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let _ = bridge.wait();
        if let Some(status) = exited.filter(|_| acked < n as u64) {
            return Err(BenchError::Failed { what: "steadfast bridge".into(), detail: status.to_string() });
        }
        if acked < n as u64 {
            let what = format!("the bridge: {n} messages acknowledged upstream ({acked} were)");
            return Err(BenchError::TimedOut { what, limit });
        }
        Ok(forwarded)
    }
}

/// How long to wait before the next reading of the bridge's count: 5 ms
/// until the first acknowledgement; then until the last one is due at the
/// rate so far, between 2 and 20 ms. The span ends at the reading that
/// finds them all: a fixed 20 ms charged the bridge 10 ms a run on
/// average, about 1 % of a run here.
fn pause(flowing: Option<(&Span, u64)>, acked: u64, n: usize) -> Duration {
    let Some((span, at)) = flowing else { return Duration::from_millis(5) };
    let (min, max) = (Duration::from_millis(2), Duration::from_millis(20));
    let done = acked.saturating_sub(at);
    if done == 0 {
        return max;
    }
    let left = (n as u64).saturating_sub(acked) as f64 * span.elapsed().as_secs_f64() / done as f64;
    Duration::from_secs_f64(left).clamp(min, max)
}

/// The value of `counter` (its full name with labels) at a `--metrics`
/// address; `None` while the exporter does not answer or has no such line.
async fn scrape(addr: &str, counter: &str) -> Option<u64> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    let line = body.lines().find(|l| l.starts_with(counter))?;
    line[counter.len()..].trim().parse::<f64>().ok().map(|v| v as u64)
}

/// The scenario's rows from the median rates, bridged and direct.
fn scenario(
    a: &Args,
    window: u16,
    bridged: (f64, Option<Cpu>),
    direct: (f64, Option<Cpu>),
    start_ms: Option<f64>,
    receiving_us: Option<f64>,
    [local, upstream]: [Option<u32>; 2],
) -> Scenario {
    let floor = floor(bridged.1, direct, receiving_us);
    let mut rows = versus(
        window,
        ("steadfast straight to upstream (durable, MQTT 5)", direct.0, None, direct.1),
        ("local -> steadfast bridge (durable) -> upstream", bridged.0, None, bridged.1),
    );
    rows.extend(start_ms.map(|ms| Row {
        name: "the bridge's start: spawned to its first upstream acknowledgement seen (read every 5 ms)".into(),
        value: Some((ms, "ms")),
        ..Row::default()
    }));
    rows.extend(floor.map(|f| Row {
        name: "the bridge's floor: its own CPU at a publisher's + a consumer's (value)".into(),
        value: Some((f.own_us, "us")),
        cpu_max: Some(f.ceiling),
        ..Row::default()
    }));
    let mut notes = vec![
        "rates: the direct publisher from its first enqueue (its client open) to an empty outbox; the bridge from its first upstream acknowledgement seen to the first reading that finds them all (read every 20 ms, every 2 ms once the rate so far says the last is near), the messages acknowledged before left out of the count (its start is the row of its own; the direct publisher's first sync and round trip, a few ms, stay in its time)".to_owned(),
    ];
    // What the bridged path adds to the machine's work, by process
    // (docs/performance.md, session 31: the local broker's delivery, a
    // wake-up of its loop for each PUBACK it reads, is the largest part,
    // and no client can cut it).
    let own = |c: Option<Cpu>| us_text(c.and_then(|c| c.own_us));
    notes.push(format!(
        "CPU us a message by process, median runs: bridged, the bridge {} + the local broker {} (delivering to it) + the upstream broker {}; straight, the publisher {} + the upstream broker {}",
        own(bridged.1),
        process_us(bridged.1, local),
        process_us(bridged.1, upstream),
        own(direct.1),
        process_us(direct.1, upstream),
    ));
    if let (Some(f), Some(b)) = (floor, bridged.1) {
        notes.push(format!(
            "the bridge's floor: the publisher's own {} (its median run) + a steadfast consumer's own {} (median of the runs; no inbox, draining as many messages from the same local broker, same window) = {:.1} us a message, against the bridge's {}; with the bridge at its floor and the rest as measured, the cores allow {:.2} with every core busy, {:.2} at the bridged run's {:.0}% busy",
            own(direct.1),
            us_text(receiving_us),
            f.own_us,
            own(bridged.1),
            f.ceiling,
            f.ceiling * b.busy,
            b.busy * 100.0,
        ));
    }
    if window < a.inflight {
        notes.push(format!("window {window}, not {}: the bridge's own default caps it", a.inflight));
    }
    Scenario {
        name: "bridge",
        title: format!(
            "{} QoS 1 messages of {} bytes, local Mosquitto -> steadfast bridge (durable) -> upstream Mosquitto, in-flight window {window} on both hops and for the direct publisher, {} runs, median",
            a.messages, a.payload, a.runs
        ),
        ratio_to: "steadfast publishing straight to the upstream broker, same run".into(),
        rows,
        latencies: vec![],
        notes,
    }
}
