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
//! `cargo run --release -p steadfast-bench -- [--scenario publish|fanout|failover|consume|backlog|bridge] [--messages N] [--payload BYTES] [--runs R] [--inflight N]`

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use steadfast::{
    AckQuorum, BackoffConfig, BrokerSet, BrokerUrl, Client, ClientConfig, Consumer, ConsumerConfig, Message, Mode,
    ProtocolVersion, Qos,
};
use steadfast_testkit::{mosquitto_program, Mosquitto};

struct Args {
    scenario: String,
    messages: usize,
    payload: usize,
    runs: usize,
    inflight: u16,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { scenario: "publish".into(), messages: 100_000, payload: 64, runs: 3, inflight: 256 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--scenario" {
            a.scenario = it.next().context("--scenario needs publish, fanout or failover")?;
            continue;
        }
        let mut value = || it.next().context("flag needs a value")?.parse::<usize>().context("not a number");
        match flag.as_str() {
            "--messages" => a.messages = value()?,
            "--payload" => a.payload = value()?,
            "--runs" => a.runs = value()?,
            "--inflight" => a.inflight = value()?.try_into().context("--inflight is at most 65535")?,
            other => bail!("unknown flag {other}; use --messages N, --payload BYTES, --runs R, --inflight N"),
        }
    }
    Ok(a)
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

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    match a.scenario.as_str() {
        "publish" => publish(a).await,
        "fanout" => fanout(a).await,
        "failover" => failover(a).await,
        "consume" => consume(a).await,
        "backlog" => backlog(a).await,
        "bridge" => bridge(a).await,
        other => bail!("unknown scenario {other}; use publish, fanout, failover, consume, backlog or bridge"),
    }
}

async fn fanout(a: Args) -> anyhow::Result<()> {
    let (b1, b2) = (Mosquitto::plain().await, Mosquitto::plain().await);
    println!(
        "fanout benchmark: {} QoS 1 messages of {} bytes, one broker vs a fanout set of two (ack = all), {} runs, median rate",
        a.messages, a.payload, a.runs
    );
    let (mut one, mut two) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("run {}/{}", run + 1, a.runs);
        let single = BrokerSet::new([url(b1.port())]);
        one.push(rate(a.messages, steadfast_set(single, &a, &format!("one-{run}"), ProtocolVersion::V5).await?));
        let pair = BrokerSet::new([url(b1.port()), url(b2.port())]).mode(Mode::Fanout).ack(AckQuorum::All);
        two.push(rate(a.messages, steadfast_set(pair, &a, &format!("two-{run}"), ProtocolVersion::V5).await?));
    }
    let (one, two) = (median(one), median(two));
    println!("{:<48} {:>10} {:>14}", "steadfast, durable outbox, MQTT 5", "msg/s", "x one broker");
    println!("{:<48} {one:>10.0} {:>14.2}", "one broker", 1.0);
    println!("{:<48} {two:>10.0} {:>14.2}", "fanout to two brokers, ack = all", two / one);
    Ok(())
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

async fn failover(a: Args) -> anyhow::Result<()> {
    let ack_timeout = Duration::from_secs(1);
    println!(
        "failover benchmark: 1,000 msg/s to a failover pair; the primary fails; time to the first message acknowledged by the backup; {} runs",
        a.runs
    );
    for (kill, name, target) in [
        (true, "primary killed (kill -9)", Duration::from_millis(200)),
        (false, "primary black-holed (ack timeout 1 s)", ack_timeout + Duration::from_millis(200)),
    ] {
        let mut gaps = Vec::new();
        for run in 0..a.runs {
            gaps.push(failover_gap(kill, ack_timeout, run).await?);
        }
        gaps.sort();
        println!(
            "{name:<48} median {:>8.1?}  max {:>8.1?}  target <= {target:?}",
            gaps[gaps.len() / 2],
            gaps[gaps.len() - 1]
        );
    }
    Ok(())
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

async fn consume(a: Args) -> anyhow::Result<()> {
    // The test kit's broker queues without limit for an absent session; its
    // in-flight window to the consumer is the consumer's receive maximum
    // (Mosquitto's own default of 20 would cap both runs alike).
    let broker = Mosquitto::start(steadfast_testkit::MosquittoOptions {
        persistence: false,
        extra: vec!["max_inflight_messages 0".into()],
    })
    .await;
    println!(
        "consume benchmark: {} QoS 1 messages of {} bytes queued for a consumer, drained with and without the inbox, {} runs, median rate",
        a.messages, a.payload, a.runs
    );
    let (mut with, mut without) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("run {}/{}", run + 1, a.runs);
        without.push(rate(a.messages, consume_once(broker.port(), &a, &format!("plain-{run}"), false).await?));
        with.push(rate(a.messages, consume_once(broker.port(), &a, &format!("inbox-{run}"), true).await?));
    }
    let (with, without) = (median(with), median(without));
    println!("{:<56} {:>10} {:>16}", "steadfast consumer, MQTT 5, ack after handling", "msg/s", "x without inbox");
    println!("{:<56} {without:>10.0} {:>16.2}", "without inbox (no de-duplication)", 1.0);
    println!("{:<56} {with:>10.0} {:>16.2}", "with the durable inbox (record synced before each ack)", with / without);
    Ok(())
}

/// `mosquitto_sub` on `port` that exits after `n` messages; returns once
/// its subscription is granted.
async fn counting_subscriber(port: u16, filter: &str, n: usize) -> anyhow::Result<std::process::Child> {
    let mut sub = Command::new("stdbuf")
        .arg("-oL")
        .arg(mosquitto_program("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", filter, "-q", "0", "-C", &n.to_string(), "-d"])
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

async fn bridge(a: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("steadfast");
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
    println!(
        "bridge benchmark: {} QoS 1 messages of {} bytes, local Mosquitto -> steadfast bridge (durable) -> upstream Mosquitto, {} runs, median rate",
        a.messages, a.payload, a.runs
    );
    let (mut bridged, mut direct) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("run {}/{}", run + 1, a.runs);
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
        let done = tokio::task::spawn_blocking(move || sub.wait()).await??;
        let elapsed = t0.elapsed();
        let _ = Command::new("kill").args(["-TERM", &bridge.id().to_string()]).status();
        let _ = bridge.wait();
        if !done.success() {
            bail!("the upstream subscriber failed");
        }
        bridged.push(rate(a.messages, elapsed));
        direct.push(rate(a.messages, steadfast_durable(upstream.port(), &a, run, ProtocolVersion::V5).await?));
    }
    let (bridged, direct) = (median(bridged), median(direct));
    println!("{:<64} {:>10} {:>20}", "path", "msg/s", "x steadfast direct");
    println!("{:<64} {direct:>10.0} {:>20.2}", "steadfast pub straight to upstream (durable outbox, MQTT 5)", 1.0);
    println!(
        "{:<64} {bridged:>10.0} {:>20.2}",
        "local -> steadfast bridge (durable outbox) -> upstream",
        bridged / direct
    );
    Ok(())
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

async fn backlog(mut a: Args) -> anyhow::Result<()> {
    if a.messages == 100_000 {
        a.messages = 1_000_000;
    }
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir()?;
    let n = a.messages;
    println!(
        "backlog benchmark: {n} QoS 1 messages of {} bytes queued with no broker reachable, then drained",
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
    println!("queued {n} in {:.1} s ({:.0} msg/s accepted)", filled.as_secs_f64(), rate(n, filled));

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
    println!("{:<62} {:>14}", "measure", "value");
    println!("{:<62} {:>11.0} ms", "restart: open the outbox (1M queued)", opened.as_secs_f64() * 1000.0);
    println!("{:<62} {:>11.0} ms", "restart: open to the first message acknowledged", to_first.as_secs_f64() * 1000.0);
    println!("{:<62} {:>11.0} ms", "restart: open to the outbox empty", drained.as_secs_f64() * 1000.0);
    println!("{:<62} {:>10.0}/s", "drain rate (first to last acknowledgement)", drain_rate);
    println!("{:<62} {:>10.0}/s", "bare rumqttc live publish, same broker (baseline)", bare);
    println!("{:<62} {:>12.2}x", "drain rate / bare rumqttc", drain_rate / bare);
    println!("{:<62} {:>10.1} MiB", "RSS before the outbox opened", mib(before));
    println!("{:<62} {:>10.1} MiB", "peak RSS while queueing the backlog", mib(queued_peak));
    println!("{:<62} {:>10.1} MiB", "peak RSS while draining the backlog", mib(drain_peak));
    Ok(())
}

async fn publish(a: Args) -> anyhow::Result<()> {
    let broker = Mosquitto::plain().await;
    let port = broker.port();
    println!(
        "publish benchmark: {} QoS 1 messages of {} bytes to Mosquitto on 127.0.0.1:{port}, in-flight window {}, {} runs, median rate",
        a.messages, a.payload, a.inflight, a.runs
    );
    let (mut bare, mut bare5, mut durable5, mut durable311, mut mpub) = (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("run {}/{}", run + 1, a.runs);
        bare.push(rate(a.messages, bare_rumqttc(port, &a, run).await?));
        bare5.push(rate(a.messages, bare_rumqttc_v5(port, &a, run).await?));
        durable311.push(rate(a.messages, steadfast_durable(port, &a, run, ProtocolVersion::V311).await?));
        durable5.push(rate(a.messages, steadfast_durable(port, &a, run, ProtocolVersion::V5).await?));
        mpub.push(rate(a.messages, mosquitto_pub(port, &a)?));
    }
    let (bare, bare5, d311, d5, mpub) =
        (median(bare), median(bare5), median(durable311), median(durable5), median(mpub));
    println!("{:<48} {:>10} {:>22} {:>16}", "client", "msg/s", "x rumqttc (same MQTT)", "x mosquitto_pub");
    for (name, r, base) in [
        ("bare rumqttc 0.25, MQTT 3.1.1 (no durability)", bare, bare),
        ("bare rumqttc 0.25, MQTT 5 (no durability)", bare5, bare5),
        ("mosquitto_pub -l -q 1 (no durability)", mpub, bare),
        ("steadfast, durable outbox, MQTT 3.1.1", d311, bare),
        ("steadfast, durable outbox, MQTT 5", d5, bare5),
    ] {
        println!("{name:<48} {r:>10.0} {:>22.2} {:>16.2}", r / base, r / mpub);
    }
    Ok(())
}
