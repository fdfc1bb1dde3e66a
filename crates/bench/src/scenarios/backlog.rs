//! `backlog` (`restart` and `drain`): a backlog queued with no broker,
//! then a restart on it with the broker up, against bare rumqttc live.

use std::time::{Duration, Instant};

use steadfast::{BrokerUrl, Client, ClientConfig, Message, ProtocolVersion};

use crate::clients::bare_rumqttc_v5;
use crate::measure::{bounded, broker, mib, rate, rss, state_dir, url, RssPeak};
use crate::{Args, Row, Scenario};

pub(crate) async fn backlog(mut a: Args) -> anyhow::Result<Scenario> {
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

pub(crate) fn backlog_topic(i: usize) -> String {
    format!("bench/backlog/{}", i % 16)
}
