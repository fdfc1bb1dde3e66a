//! `backlog` (`restart` and `drain`): a backlog queued with no broker,
//! then a restart on it with the broker up, against bare rumqttc live.

use std::path::Path;
use std::time::{Duration, Instant};

use steadfast::{BrokerUrl, Client, ClientConfig, Message, ProtocolVersion};
use steadfast_lab::Broker;

use crate::clients::{bare_rumqttc_v5, enqueue_all, Carried, Timed};
use crate::measure::{at_par, bounded, broker, median, median_run, mib, rate, rss, state_dir, url, Cpu, RssPeak, Span};
use crate::{Args, BenchError, Row, Scenario};

pub(crate) async fn backlog(mut a: Args) -> Result<Scenario, BenchError> {
    if a.messages == 100_000 {
        a.messages = 1_000_000;
    }
    let mut broker = broker(0).await?;
    let before = rss();
    let mut runs = Vec::with_capacity(a.runs);
    for run in 0..a.runs {
        eprintln!("backlog: run {}/{}", run + 1, a.runs);
        runs.push(Run::measure(&a, &mut broker).await?);
    }
    Ok(scenario(&a, before, &runs))
}

/// One run: the backlog queued, opened as after a crash, drained; then the
/// baselines live.
struct Run {
    fill: Fill,
    after_crash: Duration,
    drain: Drain,
    /// Bare rumqttc 5 with nothing besides topic and payload.
    bare: Timed,
    /// The same carrying steadfast's identity property, as the drained
    /// messages do.
    carrying: Timed,
}

impl Run {
    async fn measure(a: &Args, broker: &mut Broker) -> Result<Run, BenchError> {
        // The broker is down while the backlog queues, and comes back on
        // the same address: the messages were accepted for it (an outbox
        // never sends to other brokers what it accepted for these).
        broker.kill9();
        let dir = state_dir(a)?;
        let fill = Fill::queue(a, dir.path(), broker.port()).await?;
        let after_crash = open_after_crash(a, dir.path(), broker.port()).await?;
        broker.restart().await?;
        let drain = Drain::restart(a, dir.path(), broker).await?;
        // The baselines do the same work from memory: the same messages
        // (count, payload, topics), MQTT 5, the same window, the same
        // broker, timed by the same rule (first acknowledgement to last).
        eprintln!(
            "backlog: bare rumqttc, MQTT 5, {} messages live, without and with the identity property",
            a.messages
        );
        let port = broker.port();
        let bare = bare_rumqttc_v5(port, a, "backlog", a.inflight, backlog_topic, Carried::Nothing).await?;
        let carrying = bare_rumqttc_v5(port, a, "backlog-id", a.inflight, backlog_topic, Carried::Identity).await?;
        Ok(Run { fill, after_crash, drain, bare, carrying })
    }

    fn drain_rate(&self, n: usize) -> f64 {
        rate(n, self.drain.drained - self.drain.to_first)
    }
}

/// Opening the backlog as after a crash: without the clean-close marker,
/// the open runs the integrity check (the broker is still down: nothing is
/// sent; the close writes the marker again for the restart that follows).
async fn open_after_crash(a: &Args, dir: &Path, port: u16) -> Result<Duration, BenchError> {
    let marker = dir.join("outbox.clean");
    std::fs::remove_file(&marker).map_err(|source| BenchError::Write { path: marker.clone(), source })?;
    let t0 = Instant::now();
    let (client, report) = Client::open(config(a, dir, url(port))).await?;
    let took = t0.elapsed();
    client.close().await;
    if !report.checked {
        eprintln!("backlog: the open after a simulated crash skipped the integrity check: its figure means nothing");
    }
    Ok(took)
}

/// The backlog's client, on the outbox in `dir`, to `broker`.
fn config(a: &Args, dir: &Path, broker: BrokerUrl) -> ClientConfig {
    ClientConfig::new("bench-backlog", broker, dir).version(ProtocolVersion::V5).max_inflight(a.inflight)
}

/// Queueing the backlog while no broker is reachable.
struct Fill {
    /// Until every message was accepted (on disk).
    took: Duration,
    /// Peak RSS meanwhile, bytes.
    peak: u64,
}

impl Fill {
    async fn queue(a: &Args, dir: &Path, port: u16) -> Result<Fill, BenchError> {
        let n = a.messages;
        // Nothing listens there now.
        let nowhere = url(port);
        let fill = RssPeak::start();
        let t0 = Instant::now();
        let (client, _) = Client::open(config(a, dir, nowhere)).await?;
        let payload = vec![b'q'; a.payload];
        let message = |i| Message::new(backlog_topic(i), payload.clone());
        let queued = bounded("backlog: queueing", n, enqueue_all(&client, n, message)).await;
        let took = t0.elapsed();
        let peak = fill.stop();
        client.close().await;
        queued?;
        eprintln!("backlog: queued {n} in {:.1} s ({:.0} msg/s accepted)", took.as_secs_f64(), rate(n, took));
        Ok(Fill { took, peak })
    }
}

/// The restart on the backlog with the broker up, and the drain: each
/// time from the start of `Client::open`.
struct Drain {
    /// Until the outbox was open.
    opened: Duration,
    /// Until the first acknowledgement (the queue shrank).
    to_first: Duration,
    /// Until the outbox was empty.
    drained: Duration,
    /// Peak RSS meanwhile, bytes.
    peak: u64,
    /// CPU per message from the first acknowledgement to the last.
    cpu: Option<Cpu>,
}

impl Drain {
    async fn restart(a: &Args, dir: &Path, broker: &Broker) -> Result<Drain, BenchError> {
        let n = a.messages;
        let drain = RssPeak::start();
        let wall = std::time::SystemTime::now();
        let t0 = Instant::now();
        let (client, _) = Client::open(config(a, dir, url(broker.port()))).await?;
        let opened = t0.elapsed();
        let mut state = client.outbox_state();
        let drained = bounded("backlog: draining", n, async {
            state.wait_for(|s| s.totals.count < n as u64).await.map_err(|_| BenchError::Ended("the client"))?;
            let to_first = t0.elapsed();
            let since_first = Span::start(n);
            let link = client.broker_status().remove(0);
            let connected = link.since.duration_since(wall).unwrap_or_default();
            eprintln!(
                "backlog: restart: open {:.1} ms, connected at {:.1} ms, first acknowledgement counted at {:.1} ms",
                opened.as_secs_f64() * 1e3,
                connected.as_secs_f64() * 1e3,
                to_first.as_secs_f64() * 1e3
            );
            // As a user waits for the drain: woken once, when it is done
            // (a watch of the state wakes this thread at every batch).
            client.wait_idle().await;
            if client.outbox_state().borrow().totals.count != 0 {
                return Err(BenchError::Ended("the client"));
            }
            Ok((to_first, t0.elapsed(), since_first.stop().cpu))
        })
        .await;
        let peak = drain.stop();
        client.close().await;
        let (to_first, drained, cpu) = drained?;
        Ok(Drain { opened, to_first, drained, peak, cpu })
    }
}

/// The rows: the restart's times and the rates, the median of the runs;
/// the baseline's; `before`: the RSS before the first backlog was queued.
fn scenario(a: &Args, before: u64, runs: &[Run]) -> Scenario {
    let n = a.messages;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median_ms = |f: fn(&Run) -> Duration| median(runs.iter().map(|r| ms(f(r))).collect());
    let drains: Vec<f64> = runs.iter().map(|r| r.drain_rate(n)).collect();
    let bares: Vec<f64> = runs.iter().map(|r| rate(n, r.bare.from_first_ack.elapsed)).collect();
    let carrying: Vec<f64> = runs.iter().map(|r| rate(n, r.carrying.from_first_ack.elapsed)).collect();
    let (drain_rate, drain_cpu) = median_run(&drains, &runs.iter().map(|r| r.drain.cpu).collect::<Vec<_>>());
    let (bare_rate, bare_cpu) = median_run(&bares, &runs.iter().map(|r| r.bare.from_first_ack.cpu).collect::<Vec<_>>());
    let listed = |v: Vec<f64>| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    let over = |base: &[f64]| drains.iter().zip(base).map(|(d, b)| d / b).collect::<Vec<f64>>();
    let (by_run, by_run_carrying) = (over(&bares), over(&carrying));
    let to_first: Vec<String> = runs.iter().map(|r| format!("{:.0}", ms(r.drain.to_first))).collect();
    Scenario {
        name: "restart+drain",
        title: format!(
            "{n} QoS 1 messages of {} bytes queued with no broker reachable, then a restart on that outbox with the broker up (restart and drain), MQTT 5, in-flight window {}, {} runs, median (the first acknowledgement's p99 column: the longest)",
            a.payload, a.inflight, a.runs
        ),
        ratio_to: "drain: bare rumqttc (MQTT 5) publishing the same messages live to the same broker, same run, both timed from the first acknowledgement to the last".into(),
        rows: vec![
            Row {
                name: "restart: open the outbox".into(),
                value: Some((median_ms(|r| r.drain.opened), "ms")),
                rss_mib: Some(mib(before)),
                ..Row::default()
            },
            Row {
                name: "restart: open to the first acknowledgement (target <= 100 ms)".into(),
                value: Some((median_ms(|r| r.drain.to_first), "ms")),
                p50_ms: Some(median_ms(|r| r.drain.to_first)),
                p99_ms: runs.iter().map(|r| ms(r.drain.to_first)).max_by(f64::total_cmp),
                ..Row::default()
            },
            Row {
                name: "restart after a crash: open (integrity check of the whole file)".into(),
                value: Some((median_ms(|r| r.after_crash), "ms")),
                ..Row::default()
            },
            Row {
                name: "restart: open to the outbox empty".into(),
                value: Some((median_ms(|r| r.drain.drained), "ms")),
                ..Row::default()
            },
            Row {
                name: "queue the backlog (accepted, peak RSS)".into(),
                rate: Some(median(runs.iter().map(|r| rate(n, r.fill.took)).collect())),
                rss_mib: runs.iter().map(|r| r.fill.peak).max().map(mib),
                ..Row::default()
            },
            Row {
                name: format!("bare rumqttc, MQTT 5, {n} live, first to last ack"),
                rate: Some(bare_rate),
                baseline: true,
                window: Some(a.inflight),
                cpu: bare_cpu,
                cpu_max: bare_cpu.map(|c| c.max_ratio(bare_rate)),
                ..Row::default()
            },
            Row {
                name: "drain: first to last acknowledgement (peak RSS)".into(),
                rate: Some(drain_rate),
                rss_mib: runs.iter().map(|r| r.drain.peak).max().map(mib),
                ratio: Some(drain_rate / bare_rate),
                window: Some(a.inflight),
                cpu: drain_cpu,
                cpu_max: drain_cpu.map(|c| c.max_ratio(bare_rate)),
                par_max: at_par(drain_cpu, bare_cpu, bare_rate),
                ..Row::default()
            },
        ],
        latencies: vec![],
        notes: vec![
            format!("drain over bare rumqttc, run by run: {} (the runs alternate: backlog, drain, bare rumqttc)", listed(by_run)),
            format!(
                "drain over bare rumqttc 5 carrying steadfast's identity property on every message (as the drained messages do; the broker parses and keeps it): median {:.2}, run by run {}; bare rumqttc 5 with the property: median {:.0} msg/s",
                median(by_run_carrying.clone()),
                listed(by_run_carrying),
                median(carrying.clone())
            ),
            format!("open to the first acknowledgement, run by run: {} ms", to_first.join(", ")),
            format!(
                "bare rumqttc including its connect (first publish call to last ack): median {:.0} msg/s; the drain's first acknowledgement is seen when the outbox's count first drops (after that removal's commit)",
                median(runs.iter().map(|r| rate(n, r.bare.total.elapsed)).collect())
            ),
        ],
    }
}

pub(crate) fn backlog_topic(i: usize) -> String {
    format!("bench/backlog/{}", i % 16)
}
