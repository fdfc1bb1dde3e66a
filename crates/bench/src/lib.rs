//! Benchmarks, each with its baseline measured in the same run so that a
//! noisy machine does not lie:
//!
//! - `publish` (default): N QoS 1 messages to one local Mosquitto through
//!   steadfast's durable outbox, through bare rumqttc (no durability), and
//!   through `mosquitto_pub -l`. Both clients get the same in-flight window.
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
//!   rumqttc publishing live in the same run.
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
//! Each scenario gives rows (messages/s, latency p50/p99, peak RSS, the
//! ratio to its same-run baseline); `steadfast bench` prints them as tables
//! or JSON and can plot the publish latencies as an SVG histogram.
//!
//! `steadfast bench [SCENARIO...|all] [--messages N] [--payload BYTES] [--runs R] [--inflight N] [--rate N] [--json] [--plot FILE]`

#![forbid(unsafe_code)]

mod report;

pub use report::{percentile, Report, Row, Scenario};

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use steadfast::{
    AckQuorum, BackoffConfig, BrokerSet, BrokerUrl, Client, ClientConfig, Consumer, ConsumerConfig, Message, Mode,
    ProtocolVersion, Qos,
};
use steadfast_testkit::{mosquitto_program, Mosquitto};

/// Every scenario, in the order `all` runs them.
pub const SCENARIOS: [&str; 8] = ["publish", "fanout", "failover", "restart", "drain", "consume", "bridge", "backlog"];

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
    /// Messages per second of the paced latency runs.
    pub rate: u32,
    /// The `steadfast` binary (the bridge scenario runs it).
    pub steadfast: Option<std::path::PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Args { messages: 100_000, payload: 64, runs: 3, inflight: 256, rate: 2_000, steadfast: None }
    }
}

/// Runs the scenarios named (`all`: every one; `restart` and `drain`
/// share one `backlog` run).
pub async fn run(names: &[String], a: &Args) -> anyhow::Result<Report> {
    let mut names: Vec<String> = names.to_vec();
    if names.is_empty() {
        names.push("publish".into());
    }
    if names.iter().any(|n| n == "all") {
        names = ["publish", "fanout", "failover", "backlog", "consume", "bridge"].map(String::from).to_vec();
    }
    for n in &names {
        if !SCENARIOS.contains(&n.as_str()) {
            bail!("unknown scenario `{n}`; use {} or all", SCENARIOS.join(", "));
        }
    }
    let backlog_wanted = names.iter().any(|n| matches!(n.as_str(), "restart" | "drain" | "backlog"));
    let mut report = Report::default();
    let mut backlog_done = false;
    for n in &names {
        let a = a.clone();
        let scenario = match n.as_str() {
            "publish" => publish(a).await?,
            "fanout" => fanout(a).await?,
            "failover" => failover(a).await?,
            "consume" => consume(a).await?,
            "bridge" => bridge(a).await?,
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

async fn bare_rumqttc(port: u16, a: &Args, run: usize) -> anyhow::Result<Duration> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(format!("bench-rumqttc-{run}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(a.inflight);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let n = a.messages;
    let payload = vec![b'r'; a.payload];
    let t0 = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            client.publish("bench/rumqttc", QoS::AtLeastOnce, false, payload.clone()).await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let mut acked = 0;
    while acked < n {
        match eventloop.poll().await.context("rumqttc event loop")? {
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            Event::Outgoing(Outgoing::Disconnect) => bail!("rumqttc disconnected"),
            _ => {}
        }
    }
    let elapsed = t0.elapsed();
    let client = producer.await??;
    let _ = client.disconnect().await;
    Ok(elapsed)
}

async fn bare_rumqttc_v5(port: u16, a: &Args, run: usize) -> anyhow::Result<Duration> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(format!("bench-rumqttc5-{run}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_outgoing_inflight_upper_limit(a.inflight);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let n = a.messages;
    let payload = vec![b'r'; a.payload];
    let t0 = Instant::now();
    let producer = tokio::spawn(async move {
        for _ in 0..n {
            client.publish("bench/rumqttc5", QoS::AtLeastOnce, false, payload.clone()).await?;
        }
        Ok::<_, rumqttc::v5::ClientError>(client)
    });
    let mut acked = 0;
    while acked < n {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.context("rumqttc v5 event loop")? {
            acked += 1;
        }
    }
    let elapsed = t0.elapsed();
    let client = producer.await??;
    let _ = client.disconnect().await;
    Ok(elapsed)
}

fn url(port: u16) -> BrokerUrl {
    format!("mqtt://127.0.0.1:{port}").parse().expect("loopback URL")
}

async fn steadfast_durable(port: u16, a: &Args, run: usize, version: ProtocolVersion) -> anyhow::Result<Duration> {
    steadfast_set(BrokerSet::new([url(port)]), a, &format!("{run}-{version:?}"), version).await
}

async fn steadfast_set(set: BrokerSet, a: &Args, name: &str, version: ProtocolVersion) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let cfg = ClientConfig::new(format!("bench-steadfast-{name}"), set.brokers()[0].clone(), dir.path())
        .brokers(set)
        .version(version)
        .backoff(BackoffConfig { min: Duration::from_millis(10), ..BackoffConfig::default() });
    let (client, _) = Client::open(cfg).await?;
    let payload = vec![b's'; a.payload];
    let t0 = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..a.messages {
        pending.push_back(client.enqueue(Message::new("bench/steadfast", payload.clone()))?);
        if pending.len() >= 8192 {
            pending.pop_front().expect("non-empty").await?;
        }
    }
    for p in pending {
        p.await?;
    }
    let accepted = t0.elapsed();
    client.wait_idle().await;
    let elapsed = t0.elapsed();
    eprintln!("    steadfast {name}: all accepted (on disk) after {accepted:.2?}, all delivered after {elapsed:.2?}");
    client.close().await;
    Ok(elapsed)
}

fn mosquitto_pub(port: u16, a: &Args) -> anyhow::Result<Duration> {
    let line = "m".repeat(a.payload) + "\n";
    let input = line.repeat(a.messages);
    let t0 = Instant::now();
    let mut child = Command::new(mosquitto_program("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "bench/mosquitto_pub", "-q", "1", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("mosquitto_pub failed: {status}");
    }
    Ok(t0.elapsed())
}

/// A baseline row and the row measured against it: (name, msg/s, peak RSS).
fn versus(base: (&str, f64, Option<u64>), other: (&str, f64, Option<u64>)) -> Vec<Row> {
    let row = |(name, rate, rss): (&str, f64, Option<u64>)| Row {
        name: name.into(),
        rate: Some(rate),
        rss_mib: rss.map(mib),
        ..Row::default()
    };
    vec![Row { baseline: true, ..row(base) }, Row { ratio: Some(other.1 / base.1), ..row(other) }]
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn fanout(a: Args) -> anyhow::Result<Scenario> {
    let (b1, b2) = (Mosquitto::plain().await, Mosquitto::plain().await);
    let title = format!(
        "{} QoS 1 messages of {} bytes, one broker vs a fanout set of two (ack = all), {} runs, median",
        a.messages, a.payload, a.runs
    );
    let (mut one, mut two, mut rss_one, mut rss_two) = (vec![], vec![], 0, 0);
    for run in 0..a.runs {
        eprintln!("fanout: run {}/{}", run + 1, a.runs);
        let single = BrokerSet::new([url(b1.port())]);
        let peak = RssPeak::start();
        one.push(rate(a.messages, steadfast_set(single, &a, &format!("one-{run}"), ProtocolVersion::V5).await?));
        rss_one = rss_one.max(peak.stop());
        let pair = BrokerSet::new([url(b1.port()), url(b2.port())]).mode(Mode::Fanout).ack(AckQuorum::All);
        let peak = RssPeak::start();
        two.push(rate(a.messages, steadfast_set(pair, &a, &format!("two-{run}"), ProtocolVersion::V5).await?));
        rss_two = rss_two.max(peak.stop());
    }
    let (one, two) = (median(one), median(two));
    Ok(Scenario {
        name: "fanout",
        title,
        ratio_to: "steadfast to one broker, same run".into(),
        rows: versus(
            ("steadfast, durable, MQTT 5, one broker", one, Some(rss_one)),
            ("steadfast, durable, fanout to two brokers, ack = all", two, Some(rss_two)),
        ),
        latencies: vec![],
    })
}

/// Publishes at 1,000 msg/s to a failover pair whose primary (behind a
/// fault proxy) fails after a second; returns the time from the fault to
/// the first message the backup acknowledged.
async fn failover_gap(kill: bool, ack_timeout: Duration, run: usize) -> anyhow::Result<Duration> {
    use steadfast_testkit::{FaultProxy, ProxyMode};
    let mut primary = Mosquitto::plain().await;
    let backup = Mosquitto::plain().await;
    let proxy = FaultProxy::start(primary.port()).await;
    let dir = tempfile::tempdir()?;
    // A kill goes straight to the broker (the kernel closes its sockets);
    // a black hole needs the proxy.
    let first = if kill { url(primary.port()) } else { url(proxy.port()) };
    let set = BrokerSet::new([first.clone(), url(backup.port())]);
    let cfg = ClientConfig::new(format!("bench-failover-{run}"), first, dir.path())
        .brokers(set)
        .ack_timeout(ack_timeout)
        .keep_alive(Duration::from_secs(30))
        .backoff(BackoffConfig { min: Duration::from_millis(10), ..BackoffConfig::default() });
    let (client, _) = Client::open(cfg).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut fault_at = None;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(30);
    loop {
        tick.tick().await;
        client.enqueue(Message::new("bench/failover", b"x".to_vec()))?;
        if fault_at.is_none() && t0.elapsed() >= Duration::from_secs(1) {
            if kill {
                primary.kill9();
            } else {
                proxy.set(ProxyMode::BlackHole);
            }
            fault_at = Some(Instant::now());
        }
        if let Some(at) = fault_at {
            if client.broker_status()[1].acked > 0 {
                let gap = at.elapsed();
                client.close().await;
                return Ok(gap);
            }
        }
        if Instant::now() > deadline {
            bail!("the backup acknowledged nothing within 30 s");
        }
    }
}

async fn failover(a: Args) -> anyhow::Result<Scenario> {
    let ack_timeout = Duration::from_secs(1);
    let title = format!(
        "1,000 msg/s to a failover pair; the primary fails; the gap until the backup acknowledges a message; {} runs (value: median gap; p99 column: the longest)",
        a.runs
    );
    let mut rows = Vec::new();
    for (kill, name, target) in [
        (true, "primary killed (kill -9)", Duration::from_millis(200)),
        (false, "primary black-holed (ack timeout 1 s)", ack_timeout + Duration::from_millis(200)),
    ] {
        let mut gaps = Vec::new();
        for run in 0..a.runs {
            gaps.push(failover_gap(kill, ack_timeout, run).await?);
        }
        gaps.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let median_gap = ms(gaps[gaps.len() / 2]);
        rows.push(Row {
            name: format!("{name} (target <= {} ms)", target.as_millis()),
            value: Some((median_gap, "ms")),
            p50_ms: Some(median_gap),
            p99_ms: Some(ms(gaps[gaps.len() - 1])),
            ratio: Some(median_gap / ms(target)),
            ..Row::default()
        });
    }
    Ok(Scenario { name: "failover", title, ratio_to: "median gap over its target".into(), rows, latencies: vec![] })
}

/// Queues `a.messages` for consumer `id` (registered first), then times
/// how long the consumer takes to handle them all.
async fn consume_once(port: u16, a: &Args, id: &str, inbox: bool) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let client = ClientConfig::new(id, url(port), dir.path().join("inbox")).max_inflight(a.inflight);
    let cfg = ConsumerConfig::new(client).topic(format!("bench/consume/{id}"), Qos::AtLeastOnce).inbox(inbox);
    Consumer::register(&cfg).await?;
    let pcfg = ClientConfig::new(format!("{id}-producer"), url(port), dir.path().join("outbox"));
    let (producer, _) = Client::open(pcfg).await?;
    let payload = vec![b'c'; a.payload];
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..a.messages {
        pending.push_back(producer.enqueue(Message::new(format!("bench/consume/{id}"), payload.clone()))?);
        if pending.len() >= 8192 {
            pending.pop_front().expect("non-empty").await?;
        }
    }
    for p in pending {
        p.await?;
    }
    producer.wait_idle().await;
    producer.close().await;
    let t0 = Instant::now();
    let (consumer, _) = Consumer::open(cfg).await?;
    for _ in 0..a.messages {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await?.context("consumer closed")?;
        d.ack();
    }
    let elapsed = t0.elapsed();
    consumer.close().await;
    Ok(elapsed)
}

async fn consume(a: Args) -> anyhow::Result<Scenario> {
    // The test kit's broker queues without limit for an absent session; its
    // in-flight window to the consumer is the consumer's receive maximum
    // (Mosquitto's own default of 20 would cap both runs alike).
    let broker = Mosquitto::start(steadfast_testkit::MosquittoOptions {
        persistence: false,
        extra: vec!["max_inflight_messages 0".into()],
    })
    .await;
    let title = format!(
        "{} QoS 1 messages of {} bytes queued for a consumer, drained with and without the inbox, {} runs, median",
        a.messages, a.payload, a.runs
    );
    let (mut with, mut without, mut rss_with, mut rss_without) = (vec![], vec![], 0, 0);
    for run in 0..a.runs {
        eprintln!("consume: run {}/{}", run + 1, a.runs);
        let peak = RssPeak::start();
        without.push(rate(a.messages, consume_once(broker.port(), &a, &format!("plain-{run}"), false).await?));
        rss_without = rss_without.max(peak.stop());
        let peak = RssPeak::start();
        with.push(rate(a.messages, consume_once(broker.port(), &a, &format!("inbox-{run}"), true).await?));
        rss_with = rss_with.max(peak.stop());
    }
    let (with, without) = (median(with), median(without));
    Ok(Scenario {
        name: "consume",
        title,
        ratio_to: "the consumer without an inbox, same run".into(),
        rows: versus(
            ("steadfast consumer without inbox (no de-duplication)", without, Some(rss_without)),
            ("steadfast consumer with the durable inbox", with, Some(rss_with)),
        ),
        latencies: vec![],
    })
}

/// `mosquitto_sub` on `port` that exits after `n` messages; returns once
/// its subscription is granted.
async fn counting_subscriber(port: u16, filter: &str, n: usize) -> anyhow::Result<std::process::Child> {
    let mut sub = Command::new("stdbuf")
        .arg("-oL")
        .arg(mosquitto_program("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", filter, "-q", "1", "-C", &n.to_string(), "-d"])
        .stdout(Stdio::piped())
        .spawn()?;
    let out = sub.stdout.take().context("stdout")?;
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
    tokio::time::timeout(Duration::from_secs(10), rx).await?.context("mosquitto_sub ended")?;
    Ok(sub)
}

async fn bridge(a: Args) -> anyhow::Result<Scenario> {
    let exe = match &a.steadfast {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()?.with_file_name("steadfast"),
    };
    if !exe.exists() {
        bail!("{} is missing: build it first with `cargo build --release -p steadfast-cli`", exe.display());
    }
    // The local broker hands the bridge as many as its receive maximum
    // allows (not Mosquitto's default window of 20).
    let local = Mosquitto::start(steadfast_testkit::MosquittoOptions {
        persistence: false,
        extra: vec!["max_inflight_messages 0".into()],
    })
    .await;
    let upstream = Mosquitto::plain().await;
    let title = format!(
        "{} QoS 1 messages of {} bytes, local Mosquitto -> steadfast bridge (durable) -> upstream Mosquitto, {} runs, median",
        a.messages, a.payload, a.runs
    );
    let (mut bridged, mut direct) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("bridge: run {}/{}", run + 1, a.runs);
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("bridge.toml");
        std::fs::write(
            &cfg,
            format!(
                "[store]\ndir = \"{}\"\n[[route]]\nname = \"up\"\n[route.source]\nbrokers = [\"{}\"]\ntopics = [\"bench/bridge/#\"]\nclient_id = \"bench-bridge-{run}\"\n[route.destination]\nbrokers = [\"{}\"]\ntopic_prefix = \"up/\"\n",
                dir.path().join("state").display(),
                local.url(),
                upstream.url()
            ),
        )?;
        let register = Command::new(&exe).args(["bridge", "--register", "--config"]).arg(&cfg).output()?;
        if !register.status.success() {
            bail!("bridge --register: {}", String::from_utf8_lossy(&register.stderr));
        }
        // Queued at the local broker for the bridge's session, by a
        // publisher that makes sure the broker has every one.
        let line = "b".repeat(a.payload) + "\n";
        let mut feed = Command::new(&exe)
            .args(["pub", "-b", &local.url(), "-t", "bench/bridge/t", "-l", "--progress", "never", "--outbox"])
            .arg(dir.path().join("feed"))
            .stdin(Stdio::piped())
            .spawn()?;
        feed.stdin.take().context("stdin")?.write_all(line.repeat(a.messages).as_bytes())?;
        if !feed.wait()?.success() {
            bail!("feeding the local broker failed");
        }
        let mut sub = counting_subscriber(upstream.port(), "up/bench/bridge/#", a.messages).await?;
        let t0 = Instant::now();
        let mut bridge = Command::new(&exe).args(["bridge", "--config"]).arg(&cfg).stdout(Stdio::null()).spawn()?;
        let sub_pid = sub.id();
        let done =
            tokio::time::timeout(Duration::from_secs(300), tokio::task::spawn_blocking(move || sub.wait())).await;
        let elapsed = t0.elapsed();
        let _ = Command::new("kill").args(["-TERM", &bridge.id().to_string()]).status();
        let _ = bridge.wait();
        let Ok(done) = done else {
            let _ = Command::new("kill").args(["-KILL", &sub_pid.to_string()]).status();
            bail!("the upstream subscriber did not get {} messages within 300 s", a.messages);
        };
        let done = done??;
        if !done.success() {
            bail!("the upstream subscriber failed");
        }
        bridged.push(rate(a.messages, elapsed));
        direct.push(rate(a.messages, steadfast_durable(upstream.port(), &a, run, ProtocolVersion::V5).await?));
    }
    let (bridged, direct) = (median(bridged), median(direct));
    Ok(Scenario {
        name: "bridge",
        title,
        ratio_to: "steadfast publishing straight to the upstream broker, same run".into(),
        rows: versus(
            ("steadfast straight to upstream (durable, MQTT 5)", direct, None),
            ("local -> steadfast bridge (durable) -> upstream", bridged, None),
        ),
        latencies: vec![],
    })
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kb.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// Samples the peak RSS every 50 ms until dropped.
struct RssPeak {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    fn start() -> RssPeak {
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
    fn stop(self) -> u64 {
        self.task.abort();
        self.peak.load(std::sync::atomic::Ordering::Relaxed).max(rss())
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

async fn backlog(mut a: Args) -> anyhow::Result<Scenario> {
    if a.messages == 100_000 {
        a.messages = 1_000_000;
    }
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir()?;
    let n = a.messages;
    let title = format!(
        "{n} QoS 1 messages of {} bytes queued with no broker reachable, then a restart on that outbox with the broker up (restart and drain)",
        a.payload
    );
    let before = rss();
    // Queue the backlog: the broker address leads nowhere.
    let nowhere = url(steadfast_testkit::free_port());
    let fill = RssPeak::start();
    let t0 = Instant::now();
    let cfg = ClientConfig::new("bench-backlog", nowhere, dir.path());
    let (client, _) = Client::open(cfg).await?;
    let payload = vec![b'q'; a.payload];
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        pending.push_back(client.enqueue(Message::new(format!("bench/backlog/{}", i % 16), payload.clone()))?);
        if pending.len() >= 8192 {
            pending.pop_front().expect("non-empty").await?;
        }
    }
    for p in pending {
        p.await?;
    }
    let filled = t0.elapsed();
    let queued_peak = fill.stop();
    client.close().await;
    eprintln!("backlog: queued {n} in {:.1} s ({:.0} msg/s accepted)", filled.as_secs_f64(), rate(n, filled));

    // The restart: the broker is up now. The first send shows as the first
    // acknowledgement (the queue shrinks); the drain ends when it is empty.
    let drain = RssPeak::start();
    let t0 = Instant::now();
    let cfg = ClientConfig::new("bench-backlog", url(broker.port()), dir.path());
    let (client, _) = Client::open(cfg).await?;
    let opened = t0.elapsed();
    let mut state = client.outbox_state();
    state.wait_for(|s| s.totals.count < n as u64).await?;
    let to_first = t0.elapsed();
    state.wait_for(|s| s.totals.count == 0).await?;
    let drained = t0.elapsed();
    let drain_peak = drain.stop();
    client.close().await;
    let drain_time = drained - to_first;
    let mut base = Args { messages: 100_000.min(n), ..a };
    base.runs = 1;
    let bare = rate(base.messages, bare_rumqttc(broker.port(), &base, 0).await?);
    let drain_rate = rate(n, drain_time);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Scenario {
        name: "restart+drain",
        title,
        ratio_to: "drain: bare rumqttc publishing live to the same broker, same run".into(),
        rows: vec![
            Row {
                name: "restart: open the outbox".into(),
                value: Some((ms(opened), "ms")),
                rss_mib: Some(mib(before)),
                ..Row::default()
            },
            Row {
                name: "restart: open to the first acknowledgement (target <= 1 s)".into(),
                value: Some((ms(to_first), "ms")),
                ..Row::default()
            },
            Row {
                name: "restart: open to the outbox empty".into(),
                value: Some((ms(drained), "ms")),
                ..Row::default()
            },
            Row {
                name: "queue the backlog (accepted, peak RSS)".into(),
                rate: Some(rate(n, filled)),
                rss_mib: Some(mib(queued_peak)),
                ..Row::default()
            },
            Row {
                name: "bare rumqttc live publish, same broker".into(),
                rate: Some(bare),
                baseline: true,
                ..Row::default()
            },
            Row {
                name: "drain: first to last acknowledgement (peak RSS)".into(),
                rate: Some(drain_rate),
                rss_mib: Some(mib(drain_peak)),
                ratio: Some(drain_rate / bare),
                ..Row::default()
            },
        ],
        latencies: vec![],
    })
}

async fn publish(a: Args) -> anyhow::Result<Scenario> {
    let broker = Mosquitto::plain().await;
    let port = broker.port();
    let title = format!(
        "{} QoS 1 messages of {} bytes to Mosquitto, in-flight window {}, {} runs, median rate; latency: {} messages paced at {} msg/s, enqueue to acknowledgement",
        a.messages,
        a.payload,
        a.inflight,
        a.runs,
        a.messages.min(20_000),
        a.rate
    );
    let (mut bare, mut bare5, mut durable5, mut durable311, mut mpub) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut rss_bare, mut rss_durable) = (0, 0);
    for run in 0..a.runs {
        eprintln!("publish: run {}/{}", run + 1, a.runs);
        let peak = RssPeak::start();
        bare.push(rate(a.messages, bare_rumqttc(port, &a, run).await?));
        bare5.push(rate(a.messages, bare_rumqttc_v5(port, &a, run).await?));
        rss_bare = rss_bare.max(peak.stop());
        let peak = RssPeak::start();
        durable311.push(rate(a.messages, steadfast_durable(port, &a, run, ProtocolVersion::V311).await?));
        durable5.push(rate(a.messages, steadfast_durable(port, &a, run, ProtocolVersion::V5).await?));
        rss_durable = rss_durable.max(peak.stop());
        mpub.push(rate(a.messages, mosquitto_pub(port, &a)?));
    }
    let (bare, bare5, d311, d5, mpub) =
        (median(bare), median(bare5), median(durable311), median(durable5), median(mpub));
    eprintln!("publish: latency runs");
    let n = a.messages.min(20_000);
    let mut lat_steadfast = latency_steadfast(port, &a, n).await?;
    let mut lat_rumqttc = latency_rumqttc_v5(port, &a, n).await?;
    let row = |name: &str, r: f64, base: f64, rss: Option<u64>| Row {
        name: name.into(),
        rate: Some(r),
        rss_mib: rss.map(mib),
        ratio: Some(r / base),
        baseline: r == base,
        ..Row::default()
    };
    let mut rows = vec![
        row("bare rumqttc 0.25, MQTT 3.1.1 (no durability)", bare, bare, Some(rss_bare)),
        row("bare rumqttc 0.25, MQTT 5 (no durability)", bare5, bare5, Some(rss_bare)),
        row("mosquitto_pub -l -q 1 (no durability, x rumqttc 3.1.1)", mpub, bare, None),
        row("steadfast, durable outbox, MQTT 3.1.1 (x rumqttc 3.1.1)", d311, bare, Some(rss_durable)),
        row("steadfast, durable outbox, MQTT 5 (x rumqttc 5)", d5, bare5, Some(rss_durable)),
    ];
    rows.push(Row {
        name: format!("latency: bare rumqttc, MQTT 5, {} msg/s", a.rate),
        p50_ms: percentile(&mut lat_rumqttc, 50.0),
        p99_ms: percentile(&mut lat_rumqttc, 99.0),
        baseline: true,
        ..Row::default()
    });
    let (p50, p99) = (percentile(&mut lat_steadfast, 50.0), percentile(&mut lat_steadfast, 99.0));
    rows.push(Row {
        name: format!("latency: steadfast, durable (disk sync included), {} msg/s", a.rate),
        p50_ms: p50,
        p99_ms: p99,
        ratio: p50.zip(percentile(&mut lat_rumqttc, 50.0)).map(|(s, r)| s / r),
        ..Row::default()
    });
    Ok(Scenario {
        name: "publish",
        title,
        ratio_to: "rates: bare rumqttc with the same MQTT version, same run; latency: p50 over rumqttc's p50".into(),
        rows,
        latencies: vec![
            ("steadfast, durable, MQTT 5".into(), lat_steadfast),
            ("bare rumqttc, MQTT 5".into(), lat_rumqttc),
        ],
    })
}

/// `n` messages paced at `a.rate`, each timed from `publish` (accepted on
/// disk) to its acknowledgement; milliseconds.
async fn latency_steadfast(port: u16, a: &Args, n: usize) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let cfg = ClientConfig::new("bench-latency", url(port), dir.path());
    let (client, _) = Client::open(cfg).await?;
    let payload = vec![b'l'; a.payload];
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(i as f64 / a.rate.max(1) as f64)).into()).await;
        let (client, payload) = (client.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let receipt = client.publish(Message::new("bench/latency", payload)).await?;
            receipt.delivered().await?;
            Ok::<_, anyhow::Error>(start.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    client.close().await;
    Ok(out)
}

/// The same through bare rumqttc (MQTT 5): from the `publish` call to its
/// PUBACK, matched by order of sending and packet id.
async fn latency_rumqttc_v5(port: u16, a: &Args, n: usize) -> anyhow::Result<Vec<f64>> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    use rumqttc::Outgoing;
    let mut opts = MqttOptions::new("bench-latency-rumqttc", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_outgoing_inflight_upper_limit(a.inflight);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let called = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::<Instant>::new()));
    let (rate_, payload, c) = (a.rate.max(1), vec![b'l'; a.payload], called.clone());
    let producer = tokio::spawn(async move {
        let t0 = Instant::now();
        for i in 0..n {
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(i as f64 / rate_ as f64)).into()).await;
            c.lock().expect("times").push_back(Instant::now());
            client.publish("bench/latency-rumqttc", QoS::AtLeastOnce, false, payload.clone()).await?;
        }
        Ok::<_, rumqttc::v5::ClientError>(client)
    });
    let mut sent: std::collections::HashMap<u16, Instant> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match eventloop.poll().await.context("rumqttc v5 event loop")? {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(t) = called.lock().expect("times").pop_front() {
                    sent.insert(pkid, t);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(t) = sent.remove(&ack.pkid) {
                    out.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            _ => {}
        }
    }
    let client = producer.await??;
    let _ = client.disconnect().await;
    Ok(out)
}
