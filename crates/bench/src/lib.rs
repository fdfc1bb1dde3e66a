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

mod disk;
mod report;

pub use disk::{filesystem_of, is_memory_backed, probe as probe_outbox_dir, OutboxDirError, OutboxDisk};
pub use report::{percentile, Report, Row, Scenario};

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use steadfast::{
    AckQuorum, BackoffConfig, BrokerSet, BrokerUrl, Client, ClientConfig, Consumer, ConsumerConfig, Message, Mode,
    ProtocolVersion, Qos,
};
use steadfast_lab::{mosquitto_program, Broker, BrokerKind, BrokerOptions};

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

/// Fails a load loop that is not done in time (a lost acknowledgement, a
/// broker gone) instead of letting the bench hang: a minute, plus 200 µs
/// a message (at least 5,000 msg/s beyond the first minute).
async fn bounded<T>(what: &str, n: usize, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let limit = Duration::from_secs(60) + Duration::from_micros(200 * n as u64);
    tokio::time::timeout(limit, f).await.map_err(|_| anyhow!("{what}: {n} messages not done within {limit:?}"))?
}

/// A fresh directory under `--outbox-dir` for one outbox (or inbox, or
/// bridge state); removed when dropped.
fn state_dir(a: &Args) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("steadfast-bench-")
        .tempdir_in(&a.outbox_dir)
        .with_context(|| format!("a directory in {}", a.outbox_dir.display()))
}

/// A Mosquitto whose CONNACK announces no receive maximum (`0`), or
/// `window`: by default it announces its `max_inflight_messages` of 20,
/// which caps every MQTT 5 client at 20 whatever it asks for (MQTT 3.1.1
/// clients are not capped). Without a cap the client's own window holds.
/// The broker's window towards subscribers is the same figure.
async fn broker(window: u16) -> anyhow::Result<Broker> {
    let opts = BrokerOptions { extra: vec![format!("max_inflight_messages {window}")], ..BrokerOptions::default() };
    Ok(Broker::start(BrokerKind::Mosquitto, opts, None).await?)
}

/// How long a bare rumqttc run took: in all (from before the connect to
/// the last PUBACK), and from its first PUBACK to its last.
#[derive(Debug, Clone, Copy)]
struct Timed {
    total: Duration,
    from_first_ack: Duration,
}

/// `a.messages` QoS 1 messages through bare rumqttc, MQTT 3.1.1, window
/// `window`, on `topic(i)`.
async fn bare_rumqttc(port: u16, a: &Args, id: &str, window: u16, topic: fn(usize) -> String) -> anyhow::Result<Timed> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(format!("bench-rumqttc-{id}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(window);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let n = a.messages;
    let payload = vec![b'r'; a.payload];
    let t0 = Instant::now();
    let producer = tokio::spawn(async move {
        for i in 0..n {
            client.publish(topic(i), QoS::AtLeastOnce, false, payload.clone()).await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let acks = bounded("bare rumqttc 3.1.1", n, async {
        let (mut acked, mut first) = (0, None);
        while acked < n {
            match eventloop.poll().await.context("rumqttc event loop")? {
                Event::Incoming(Packet::PubAck(_)) => {
                    acked += 1;
                    first.get_or_insert_with(Instant::now);
                }
                Event::Outgoing(Outgoing::Disconnect) => bail!("rumqttc disconnected"),
                _ => {}
            }
        }
        Ok(first)
    });
    let first = acks.await;
    let end = Instant::now();
    let first = first_ack(first, end, &producer)?;
    let client = producer.await??;
    let _ = client.disconnect().await;
    Ok(Timed { total: end - t0, from_first_ack: end - first })
}

/// When a bare run's first acknowledgement came (its end, with none); on
/// an error the producer is stopped.
fn first_ack<T>(
    first: anyhow::Result<Option<Instant>>,
    end: Instant,
    producer: &tokio::task::JoinHandle<T>,
) -> anyhow::Result<Instant> {
    first.map(|f| f.unwrap_or(end)).inspect_err(|_| producer.abort())
}

/// The same through bare rumqttc, MQTT 5.
async fn bare_rumqttc_v5(
    port: u16,
    a: &Args,
    id: &str,
    window: u16,
    topic: fn(usize) -> String,
) -> anyhow::Result<Timed> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(format!("bench-rumqttc5-{id}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_outgoing_inflight_upper_limit(window);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let n = a.messages;
    let payload = vec![b'r'; a.payload];
    let t0 = Instant::now();
    let producer = tokio::spawn(async move {
        for i in 0..n {
            client.publish(topic(i), QoS::AtLeastOnce, false, payload.clone()).await?;
        }
        Ok::<_, rumqttc::v5::ClientError>(client)
    });
    let acks = bounded("bare rumqttc 5", n, async {
        let (mut acked, mut first) = (0, None);
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.context("rumqttc v5 event loop")? {
                acked += 1;
                first.get_or_insert_with(Instant::now);
            }
        }
        Ok(first)
    });
    let first = acks.await;
    let end = Instant::now();
    let first = first_ack(first, end, &producer)?;
    let client = producer.await??;
    let _ = client.disconnect().await;
    Ok(Timed { total: end - t0, from_first_ack: end - first })
}

fn url(port: u16) -> BrokerUrl {
    format!("mqtt://127.0.0.1:{port}").parse().expect("loopback URL")
}

async fn steadfast_durable(
    port: u16,
    a: &Args,
    name: &str,
    version: ProtocolVersion,
    window: u16,
) -> anyhow::Result<Duration> {
    steadfast_set(BrokerSet::new([url(port)]), a, &format!("{name}-{version:?}"), version, window).await
}

/// `a.messages` through a durable steadfast client with in-flight window
/// `window`: from the first `enqueue` to an empty outbox.
async fn steadfast_set(
    set: BrokerSet,
    a: &Args,
    name: &str,
    version: ProtocolVersion,
    window: u16,
) -> anyhow::Result<Duration> {
    let dir = state_dir(a)?;
    let cfg = ClientConfig::new(format!("bench-steadfast-{name}"), set.brokers()[0].clone(), dir.path())
        .brokers(set)
        .version(version)
        .max_inflight(window)
        .backoff(BackoffConfig { min: Duration::from_millis(10), ..BackoffConfig::default() });
    let (client, _) = Client::open(cfg).await?;
    let payload = vec![b's'; a.payload];
    let t0 = Instant::now();
    let run = bounded("steadfast", a.messages, async {
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
        Ok(accepted)
    });
    let accepted = run.await;
    let elapsed = t0.elapsed();
    client.close().await;
    let accepted = accepted?;
    eprintln!(
        "    steadfast {name}, window {window}: all accepted (on disk) after {accepted:.2?}, all delivered after {elapsed:.2?}"
    );
    Ok(elapsed)
}

/// `mosquitto_pub -l -q 1 -M window`, MQTT 3.1.1, timed as a whole process.
fn mosquitto_pub(port: u16, a: &Args, window: u16) -> anyhow::Result<Duration> {
    let line = "m".repeat(a.payload) + "\n";
    let input = line.repeat(a.messages);
    let t0 = Instant::now();
    let mut child = Command::new(mosquitto_program("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "bench/mosquitto_pub", "-q", "1", "-l"])
        .args(["-M", &window.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(input.as_bytes())?;
    let limit = Duration::from_secs(60) + Duration::from_micros(200 * a.messages as u64);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("mosquitto_pub failed: {status}");
            }
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mosquitto_pub: {} messages not done within {limit:?}", a.messages);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A baseline row and the row measured against it: (name, msg/s, peak
/// RSS), both with in-flight window `window`.
fn versus(window: u16, base: (&str, f64, Option<u64>), other: (&str, f64, Option<u64>)) -> Vec<Row> {
    let row = |(name, rate, rss): (&str, f64, Option<u64>)| Row {
        name: name.into(),
        rate: Some(rate),
        rss_mib: rss.map(mib),
        window: Some(window),
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
    let (b1, b2) = (broker(0).await?, broker(0).await?);
    let title = format!(
        "{} QoS 1 messages of {} bytes, one broker vs a fanout set of two (ack = all), in-flight window {} to each broker, {} runs, median",
        a.messages, a.payload, a.inflight, a.runs
    );
    let (mut one, mut two, mut rss_one, mut rss_two) = (vec![], vec![], 0, 0);
    for run in 0..a.runs {
        eprintln!("fanout: run {}/{}", run + 1, a.runs);
        let single = BrokerSet::new([url(b1.port())]);
        let peak = RssPeak::start();
        let d = steadfast_set(single, &a, &format!("one-{run}"), ProtocolVersion::V5, a.inflight).await?;
        one.push(rate(a.messages, d));
        rss_one = rss_one.max(peak.stop());
        let pair = BrokerSet::new([url(b1.port()), url(b2.port())]).mode(Mode::Fanout).ack(AckQuorum::All);
        let peak = RssPeak::start();
        let d = steadfast_set(pair, &a, &format!("two-{run}"), ProtocolVersion::V5, a.inflight).await?;
        two.push(rate(a.messages, d));
        rss_two = rss_two.max(peak.stop());
    }
    let (one, two) = (median(one), median(two));
    Ok(Scenario {
        name: "fanout",
        title,
        ratio_to: "steadfast to one broker, same run".into(),
        rows: versus(
            a.inflight,
            ("steadfast, durable, MQTT 5, one broker", one, Some(rss_one)),
            ("steadfast, durable, fanout to two brokers, ack = all", two, Some(rss_two)),
        ),
        latencies: vec![],
        notes: vec![],
    })
}

/// Publishes at 1,000 msg/s to a failover pair whose primary (behind a
/// fault proxy) fails after a second; returns the time from the fault to
/// the first message the backup acknowledged.
async fn failover_gap(a: &Args, kill: bool, ack_timeout: Duration, run: usize) -> anyhow::Result<Duration> {
    use steadfast_lab::{FaultProxy, ProxyMode};
    let mut primary = broker(0).await?;
    let backup = broker(0).await?;
    let proxy = FaultProxy::start(primary.port()).await?;
    let dir = state_dir(a)?;
    // A kill goes straight to the broker (the kernel closes its sockets);
    // a black hole needs the proxy.
    let first = if kill { url(primary.port()) } else { url(proxy.port()) };
    let set = BrokerSet::new([first.clone(), url(backup.port())]);
    let cfg = ClientConfig::new(format!("bench-failover-{run}"), first, dir.path())
        .brokers(set)
        .ack_timeout(ack_timeout)
        .max_inflight(a.inflight)
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
            gaps.push(failover_gap(&a, kill, ack_timeout, run).await?);
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
            window: Some(a.inflight),
            ..Row::default()
        });
    }
    Ok(Scenario {
        name: "failover",
        title,
        ratio_to: "median gap over its target".into(),
        rows,
        latencies: vec![],
        notes: vec![],
    })
}

/// Queues `a.messages` for consumer `id` (registered first), then times
/// how long the consumer takes to handle them all.
async fn consume_once(port: u16, a: &Args, id: &str, inbox: bool) -> anyhow::Result<Duration> {
    let dir = state_dir(a)?;
    let client = ClientConfig::new(id, url(port), dir.path().join("inbox")).max_inflight(a.inflight);
    let cfg = ConsumerConfig::new(client).topic(format!("bench/consume/{id}"), Qos::AtLeastOnce).inbox(inbox);
    Consumer::register(&cfg).await?;
    let pcfg =
        ClientConfig::new(format!("{id}-producer"), url(port), dir.path().join("outbox")).max_inflight(a.inflight);
    let (producer, _) = Client::open(pcfg).await?;
    let payload = vec![b'c'; a.payload];
    let queued = bounded("consume: queueing", a.messages, async {
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
        Ok(())
    })
    .await;
    producer.close().await;
    queued?;
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
    let broker = broker(0).await?;
    let title = format!(
        "{} QoS 1 messages of {} bytes queued for a consumer, drained with and without the inbox, receive maximum (window) {}, {} runs, median",
        a.messages, a.payload, a.inflight, a.runs
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
            a.inflight,
            ("steadfast consumer without inbox (no de-duplication)", without, Some(rss_without)),
            ("steadfast consumer with the durable inbox", with, Some(rss_with)),
        ),
        latencies: vec![],
        notes: vec![],
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

/// The in-flight window of a `steadfast bridge` route (the client's
/// default; the bridge's configuration has no setting for it).
const BRIDGE_DEFAULT_WINDOW: u16 = 1024;

async fn bridge(a: Args) -> anyhow::Result<Scenario> {
    let exe = match &a.steadfast {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()?.with_file_name("steadfast"),
    };
    if !exe.exists() {
        bail!("{} is missing: build it first with `cargo build --release -p steadfast-cli`", exe.display());
    }
    // The bridge has no window setting of its own (its default is 1,024):
    // the brokers set it, by announcing `window` as their receive maximum
    // (upstream) and by sending no more than `window` at once (local); the
    // direct publisher gets the same.
    let window = a.inflight.min(BRIDGE_DEFAULT_WINDOW);
    let local = broker(window).await?;
    let upstream = broker(window).await?;
    let title = format!(
        "{} QoS 1 messages of {} bytes, local Mosquitto -> steadfast bridge (durable) -> upstream Mosquitto, in-flight window {window} on both hops and for the direct publisher, {} runs, median",
        a.messages, a.payload, a.runs
    );
    let (mut bridged, mut direct) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("bridge: run {}/{}", run + 1, a.runs);
        let dir = state_dir(&a)?;
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
        let d = steadfast_durable(upstream.port(), &a, &format!("direct-{run}"), ProtocolVersion::V5, window).await?;
        direct.push(rate(a.messages, d));
    }
    let (bridged, direct) = (median(bridged), median(direct));
    Ok(Scenario {
        name: "bridge",
        title,
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

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

async fn backlog(mut a: Args) -> anyhow::Result<Scenario> {
    if a.messages == 100_000 {
        a.messages = 1_000_000;
    }
    let broker = broker(0).await?;
    let dir = state_dir(&a)?;
    let n = a.messages;
    let title = format!(
        "{n} QoS 1 messages of {} bytes queued with no broker reachable, then a restart on that outbox with the broker up (restart and drain), MQTT 5, in-flight window {}",
        a.payload, a.inflight
    );
    let before = rss();
    // Queue the backlog: the broker address leads nowhere.
    let nowhere = url(steadfast_lab::free_port()?);
    let fill = RssPeak::start();
    let t0 = Instant::now();
    let config = |broker: BrokerUrl| {
        ClientConfig::new("bench-backlog", broker, dir.path()).version(ProtocolVersion::V5).max_inflight(a.inflight)
    };
    let (client, _) = Client::open(config(nowhere)).await?;
    let payload = vec![b'q'; a.payload];
    let queued = bounded("backlog: queueing", n, async {
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            pending.push_back(client.enqueue(Message::new(backlog_topic(i), payload.clone()))?);
            if pending.len() >= 8192 {
                pending.pop_front().expect("non-empty").await?;
            }
        }
        for p in pending {
            p.await?;
        }
        Ok(())
    })
    .await;
    let filled = t0.elapsed();
    let queued_peak = fill.stop();
    client.close().await;
    queued?;
    eprintln!("backlog: queued {n} in {:.1} s ({:.0} msg/s accepted)", filled.as_secs_f64(), rate(n, filled));

    // The restart: the broker is up now. The first send shows as the first
    // acknowledgement (the queue shrinks); the drain ends when it is empty.
    let drain = RssPeak::start();
    let t0 = Instant::now();
    let (client, _) = Client::open(config(url(broker.port()))).await?;
    let opened = t0.elapsed();
    let mut state = client.outbox_state();
    let drained = bounded("backlog: draining", n, async {
        state.wait_for(|s| s.totals.count < n as u64).await?;
        let to_first = t0.elapsed();
        state.wait_for(|s| s.totals.count == 0).await?;
        Ok((to_first, t0.elapsed()))
    })
    .await;
    let drain_peak = drain.stop();
    client.close().await;
    let (to_first, drained) = drained?;
    let drain_time = drained - to_first;
    // The baseline does the same work from memory: the same messages (count,
    // payload, topics), MQTT 5, the same window, the same broker, timed by
    // the same rule (first acknowledgement to last).
    eprintln!("backlog: bare rumqttc, MQTT 5, {n} messages live");
    let bare = bare_rumqttc_v5(broker.port(), &a, "backlog", a.inflight, backlog_topic).await?;
    let bare_rate = rate(n, bare.from_first_ack);
    let drain_rate = rate(n, drain_time);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Scenario {
        name: "restart+drain",
        title,
        ratio_to: "drain: bare rumqttc (MQTT 5) publishing the same messages live to the same broker, same run, both timed from the first acknowledgement to the last".into(),
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
                name: format!("bare rumqttc, MQTT 5, {n} live, first to last ack"),
                rate: Some(bare_rate),
                baseline: true,
                window: Some(a.inflight),
                ..Row::default()
            },
            Row {
                name: "drain: first to last acknowledgement (peak RSS)".into(),
                rate: Some(drain_rate),
                rss_mib: Some(mib(drain_peak)),
                ratio: Some(drain_rate / bare_rate),
                window: Some(a.inflight),
                ..Row::default()
            },
        ],
        latencies: vec![],
        notes: vec![format!(
            "bare rumqttc including its connect (first publish call to last ack): {:.0} msg/s; the drain's first acknowledgement is seen when the outbox's count first drops (after that removal's commit)",
            rate(n, bare.total)
        )],
    })
}

fn backlog_topic(i: usize) -> String {
    format!("bench/backlog/{}", i % 16)
}

/// The clients of the `publish` scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publisher {
    Rumqttc311,
    Rumqttc5,
    MosquittoPub,
    Steadfast311,
    Steadfast5,
}

impl Publisher {
    const ALL: [Publisher; 5] = [
        Publisher::Rumqttc311,
        Publisher::Rumqttc5,
        Publisher::MosquittoPub,
        Publisher::Steadfast311,
        Publisher::Steadfast5,
    ];

    fn name(self) -> &'static str {
        match self {
            Publisher::Rumqttc311 => "bare rumqttc 0.25, MQTT 3.1.1 (no durability)",
            Publisher::Rumqttc5 => "bare rumqttc 0.25, MQTT 5 (no durability)",
            Publisher::MosquittoPub => "mosquitto_pub -l -q 1, MQTT 3.1.1 (no durability, x rumqttc 3.1.1)",
            Publisher::Steadfast311 => "steadfast, durable outbox, MQTT 3.1.1 (x rumqttc 3.1.1)",
            Publisher::Steadfast5 => "steadfast, durable outbox, MQTT 5 (x rumqttc 5)",
        }
    }

    /// The same, for the "best window" rows.
    fn short(self) -> &'static str {
        match self {
            Publisher::Rumqttc311 => "bare rumqttc 0.25, MQTT 3.1.1",
            Publisher::Rumqttc5 => "bare rumqttc 0.25, MQTT 5",
            Publisher::MosquittoPub => "mosquitto_pub -l -q 1, MQTT 3.1.1",
            Publisher::Steadfast311 => "steadfast, durable outbox, MQTT 3.1.1",
            Publisher::Steadfast5 => "steadfast, durable outbox, MQTT 5",
        }
    }

    /// The baseline of its ratio: bare rumqttc with the same MQTT version.
    fn baseline(self) -> Publisher {
        match self {
            Publisher::Rumqttc5 | Publisher::Steadfast5 => Publisher::Rumqttc5,
            _ => Publisher::Rumqttc311,
        }
    }

    /// One run of `a.messages` with in-flight window `window`.
    async fn run(self, port: u16, a: &Args, run: usize, window: u16) -> anyhow::Result<Duration> {
        let id = format!("{run}-w{window}");
        Ok(match self {
            Publisher::Rumqttc311 => bare_rumqttc(port, a, &id, window, |_| "bench/rumqttc".into()).await?.total,
            Publisher::Rumqttc5 => bare_rumqttc_v5(port, a, &id, window, |_| "bench/rumqttc5".into()).await?.total,
            Publisher::MosquittoPub => mosquitto_pub(port, a, window)?,
            Publisher::Steadfast311 => steadfast_durable(port, a, &id, ProtocolVersion::V311, window).await?,
            Publisher::Steadfast5 => steadfast_durable(port, a, &id, ProtocolVersion::V5, window).await?,
        })
    }
}

/// The windows `publish` measures every client at: `--windows` and
/// `--inflight`, ascending.
fn sweep(a: &Args) -> Vec<u16> {
    let mut w: Vec<u16> = a.windows.iter().copied().chain([a.inflight]).filter(|w| *w > 0).collect();
    w.sort_unstable();
    w.dedup();
    w
}

/// The window with the highest rate, and that rate.
fn best(by_window: &[(u16, f64)]) -> (u16, f64) {
    by_window.iter().copied().max_by(|x, y| x.1.total_cmp(&y.1)).expect("at least one window")
}

async fn publish(a: Args) -> anyhow::Result<Scenario> {
    let broker = broker(0).await?;
    let port = broker.port();
    let windows = sweep(&a);
    let list = windows.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let title = format!(
        "{} QoS 1 messages of {} bytes to Mosquitto (no receive maximum announced), in-flight window {} for every client, and each client at its best of {list}; {} runs, median rate; latency: {} messages paced at {} msg/s, enqueue to acknowledgement",
        a.messages,
        a.payload,
        a.inflight,
        a.runs,
        a.messages.min(20_000),
        a.rate
    );
    // rates[client][window] over the runs; every window and client in
    // each run, so a busy spell of the machine spreads over all of them.
    let mut rates = vec![vec![Vec::new(); windows.len()]; Publisher::ALL.len()];
    let mut rss = [0u64; Publisher::ALL.len()];
    for run in 0..a.runs {
        for (wi, &w) in windows.iter().enumerate() {
            eprintln!("publish: run {}/{}, window {w}", run + 1, a.runs);
            for (ci, p) in Publisher::ALL.iter().enumerate() {
                let peak = RssPeak::start();
                let took = p.run(port, &a, run, w).await;
                let peak = peak.stop();
                rates[ci][wi].push(rate(a.messages, took?));
                if w == a.inflight {
                    rss[ci] = rss[ci].max(peak);
                }
            }
        }
    }
    let medians: Vec<Vec<(u16, f64)>> =
        rates.into_iter().map(|by_w| windows.iter().copied().zip(by_w.into_iter().map(median)).collect()).collect();
    let at = |p: Publisher, w: u16| -> f64 {
        let ci = Publisher::ALL.iter().position(|q| *q == p).expect("a client");
        medians[ci].iter().find(|(x, _)| *x == w).expect("measured").1
    };
    let best_of = |p: Publisher| best(&medians[Publisher::ALL.iter().position(|q| *q == p).expect("a client")]);
    let mut rows: Vec<Row> = Publisher::ALL
        .iter()
        .enumerate()
        .map(|(ci, &p)| Row {
            name: p.name().into(),
            rate: Some(at(p, a.inflight)),
            rss_mib: (p != Publisher::MosquittoPub).then(|| mib(rss[ci])),
            ratio: Some(at(p, a.inflight) / at(p.baseline(), a.inflight)),
            baseline: p == p.baseline(),
            window: Some(a.inflight),
            ..Row::default()
        })
        .collect();
    if windows.len() > 1 {
        rows.extend(Publisher::ALL.iter().map(|&p| {
            let (w, r) = best_of(p);
            Row {
                name: format!("best window: {}", p.short()),
                rate: Some(r),
                ratio: Some(r / best_of(p.baseline()).1),
                baseline: p == p.baseline(),
                window: Some(w),
                ..Row::default()
            }
        }));
    }
    let mut notes = vec![
        "rates: rumqttc from its first publish call (connect included) to its last PUBACK; steadfast from its first enqueue to an empty outbox (every message synced to disk before it is sent); mosquitto_pub the whole process".to_owned(),
        "\"best window\" rows: each client at the window that gave it the highest median; ratio: best over the best of rumqttc with the same MQTT version".into(),
    ];
    for (p, by_w) in Publisher::ALL.iter().zip(&medians) {
        let each = by_w.iter().map(|(w, r)| format!("{w}: {r:.0}")).collect::<Vec<_>>().join(", ");
        notes.push(format!("msg/s by window, {}: {each}", p.short()));
    }
    eprintln!("publish: latency runs");
    let n = a.messages.min(20_000);
    let mut lat_steadfast = bounded("latency: steadfast", n, latency_steadfast(port, &a, n)).await?;
    let mut lat_rumqttc = bounded("latency: rumqttc", n, latency_rumqttc_v5(port, &a, n)).await?;
    rows.push(Row {
        name: format!("latency: bare rumqttc, MQTT 5, {} msg/s", a.rate),
        p50_ms: percentile(&mut lat_rumqttc, 50.0),
        p99_ms: percentile(&mut lat_rumqttc, 99.0),
        baseline: true,
        window: Some(a.inflight),
        ..Row::default()
    });
    let (p50, p99) = (percentile(&mut lat_steadfast, 50.0), percentile(&mut lat_steadfast, 99.0));
    rows.push(Row {
        name: format!("latency: steadfast, durable (disk sync included), MQTT 5, {} msg/s", a.rate),
        p50_ms: p50,
        p99_ms: p99,
        ratio: p50.zip(percentile(&mut lat_rumqttc, 50.0)).map(|(s, r)| s / r),
        window: Some(a.inflight),
        ..Row::default()
    });
    Ok(Scenario {
        name: "publish",
        title,
        ratio_to:
            "rates: bare rumqttc with the same MQTT version and window, same run; latency: p50 over rumqttc's p50"
                .into(),
        rows,
        latencies: vec![
            ("steadfast, durable, MQTT 5".into(), lat_steadfast),
            ("bare rumqttc, MQTT 5".into(), lat_rumqttc),
        ],
        notes,
    })
}

/// `n` messages paced at `a.rate`, each timed from `publish` (accepted on
/// disk) to its acknowledgement; milliseconds.
async fn latency_steadfast(port: u16, a: &Args, n: usize) -> anyhow::Result<Vec<f64>> {
    let dir = state_dir(a)?;
    let cfg = ClientConfig::new("bench-latency", url(port), dir.path()).max_inflight(a.inflight);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_always_holds_the_common_window_once() {
        let a = Args { inflight: 300, windows: vec![4096, 64, 256, 64, 0], ..Args::default() };
        assert_eq!(sweep(&a), [64, 256, 300, 4096]);
        let a = Args { inflight: 256, windows: vec![], ..Args::default() };
        assert_eq!(sweep(&a), [256]);
        assert_eq!(sweep(&Args::default()), [64, 256, 1024, 4096]);
    }

    #[test]
    fn the_best_window_is_the_fastest() {
        assert_eq!(best(&[(64, 10.0), (256, 30.0), (1024, 20.0)]), (256, 30.0));
        assert_eq!(best(&[(64, 10.0)]), (64, 10.0));
    }

    #[test]
    fn every_client_is_compared_with_rumqttc_of_its_own_mqtt_version() {
        use Publisher::*;
        let pairs: Vec<_> = Publisher::ALL.iter().map(|p| (*p, p.baseline())).collect();
        assert_eq!(
            pairs,
            [
                (Rumqttc311, Rumqttc311),
                (Rumqttc5, Rumqttc5),
                (MosquittoPub, Rumqttc311),
                (Steadfast311, Rumqttc311),
                (Steadfast5, Rumqttc5)
            ]
        );
    }

    /// The refusal comes before any scenario runs, and names the fix.
    #[tokio::test]
    async fn a_missing_outbox_directory_is_refused_before_any_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let a = Args { outbox_dir: dir.path().join("missing"), ..Args::default() };
        let e = run(&["publish".into()], &a).await.unwrap_err();
        assert!(e.is::<OutboxDirError>(), "{e:#}");
        // An unknown scenario is reported first.
        let e = run(&["nonsense".into()], &a).await.unwrap_err();
        assert!(e.to_string().starts_with("unknown scenario"), "{e:#}");
    }
}
