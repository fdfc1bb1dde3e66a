//! Publish benchmark: N QoS 1 messages to one local Mosquitto through
//! steadfast's durable outbox, through bare rumqttc (no durability), and
//! through `mosquitto_pub -l`, in the same run, with ratios against the
//! baselines so a noisy machine does not lie.
//!
//! `cargo run --release -p steadfast-bench -- [--messages N] [--payload BYTES] [--runs R] [--inflight N]`
//!
//! Both clients get the same in-flight window (default 256).

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use steadfast::{BackoffConfig, BrokerUrl, Client, ClientConfig, Message, ProtocolVersion};
use steadfast_testkit::{mosquitto_program, Mosquitto};

struct Args {
    messages: usize,
    payload: usize,
    runs: usize,
    inflight: u16,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { messages: 100_000, payload: 64, runs: 3, inflight: 256 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
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

async fn steadfast_durable(port: u16, a: &Args, run: usize, version: ProtocolVersion) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{port}").parse()?;
    let cfg = ClientConfig::new(format!("bench-steadfast-{run}-{version:?}"), url, dir.path())
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
    eprintln!(
        "    steadfast {version:?}: all accepted (on disk) after {accepted:.2?}, all delivered after {elapsed:.2?}"
    );
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
