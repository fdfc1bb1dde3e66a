//! `steadfast demo`: a producer publishing in fanout to two brokers, a
//! consumer with an inbox on both, and a schedule of faults — `kill -9` of
//! a broker, of the consumer, a broker restart — with a live table and a
//! verdict that says how many accepted messages were lost and how that was
//! checked. Everything on 127.0.0.1, in a temporary directory.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use steadfast::{AckQuorum, BackoffConfig, BrokerSet, BrokerUrl, Client, ClientConfig, Message, Mode, Qos};

use crate::children::{duplicates_removed, handled, run_dir, Consumer};
use crate::launch::{Broker, BrokerKind, BrokerOptions};
use crate::LabError;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long, in seconds (publishing for two thirds of it); 20 or more.
    pub seconds: u64,
    /// Messages per second, above 0.
    pub rate: u32,
    /// Which brokers.
    pub brokers: BrokerKind,
}

/// What the demo found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoOutcome {
    /// Accepted identities the consumer never handled.
    pub lost: Vec<String>,
    /// Identities handled more than once.
    pub twice: usize,
}

/// Runs the demo, printing its table; the outcome says what was lost.
pub async fn run(a: DemoOptions) -> Result<DemoOutcome, LabError> {
    let kind = a.brokers;
    if a.seconds < 20 || a.rate == 0 {
        return Err(LabError::TooShort { what: "the demo", min_seconds: 20 });
    }
    let tmp = run_dir("demo")?;
    let root = tmp.path().to_owned();
    // Mosquitto with persistence, saved every second.
    let opts = BrokerOptions { persistence: true, autosave_secs: Some(1), extra: vec![] };
    let mut a_broker = Broker::start(kind, opts.clone(), Some(&root)).await?;
    let mut b_broker = Broker::start(kind, opts, Some(&root)).await?;
    println!(
        "steadfast demo: two {} brokers ({} and {}{}), a producer in fanout (ack = all), a consumer with an inbox; {} s at {} msg/s",
        match kind {
            BrokerKind::Embedded => "embedded (rumqttd)",
            BrokerKind::Mosquitto => "Mosquitto",
        },
        a_broker.url(),
        b_broker.url(),
        match kind {
            BrokerKind::Embedded => "; a restart forgets all they held",
            BrokerKind::Mosquitto => "; persistence on",
        },
        a.seconds,
        a.rate
    );
    let out = root.join("consumer.out");
    let inbox = root.join("inbox");
    let mut consumer = Consumer {
        args: ["sub", "-b", &a_broker.url(), "-b", &b_broker.url(), "-t", "demo/#", "-i", "demo-consumer", "--inbox"]
            .iter()
            .map(|s| s.to_string())
            .chain([inbox.display().to_string(), "-F".into(), "%I".into(), "--backoff".into(), "50ms..500ms".into()])
            .collect(),
        out: out.clone(),
        child: None,
    };
    // The consumer's sessions exist before the first message.
    consumer.register()?;
    consumer.start()?;

    let urls: Vec<BrokerUrl> =
        [a_broker.url(), b_broker.url()].iter().map(|u| u.parse().expect("loopback URL")).collect();
    let cfg = ClientConfig::new("demo-producer", urls[0].clone(), root.join("outbox"))
        .brokers(BrokerSet::new(urls).mode(Mode::Fanout).ack(AckQuorum::All))
        .backoff(BackoffConfig {
            min: Duration::from_millis(50),
            max: Duration::from_millis(500),
            ..Default::default()
        });
    let (client, _) = Client::open(cfg).await?;
    let producer = client.producer_id().to_owned();

    // The schedule, as fractions of the publishing time.
    let publish_for = Duration::from_secs(a.seconds * 2 / 3);
    let schedule = [
        (0.15, "kill -9 broker A"),
        (0.35, "restart broker A"),
        (0.45, "kill -9 the consumer"),
        (0.55, "restart the consumer"),
        (0.65, "kill -9 broker B"),
        (0.85, "restart broker B"),
    ];
    let mut next_fault = 0;
    let mut log: Vec<String> = Vec::new();
    // After a fault: when the consumer's output grows again (the delivery
    // gap, the failover time the consumer sees).
    let mut gap: Option<(usize, Instant, u64)> = None;
    let output_len = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / a.rate as f64);
    let (mut sent, mut accepted) = (0u64, 0u64);
    let mut pending = std::collections::VecDeque::new();
    let mut next_row = Duration::from_secs(1);
    println!(
        "{:>5}  {:>7}  {:>8}  {:>9}  {:>7}  {:>10}  {:>7}  event",
        "time", "sent", "accepted", "delivered", "handled", "dups gone", "missing"
    );
    // delivered: acknowledged by both brokers; handled: identities the
    // consumer printed; dups gone: copies its inbox removed; missing:
    // accepted, not (yet) handled.
    let row = |t: Duration, sent: u64, accepted: u64, queued: u64, seen: &HashMap<String, u32>, ev: &str| {
        println!(
            "{:>4}s  {sent:>7}  {accepted:>8}  {:>9}  {:>7}  {:>10}  {:>7}  {ev}",
            t.as_secs(),
            accepted.saturating_sub(queued),
            seen.len(),
            duplicates_removed(&inbox),
            accepted.saturating_sub(seen.len() as u64)
        );
    };
    while start.elapsed() < publish_for {
        let t = start.elapsed();
        if let Some((at, what)) = schedule.get(next_fault) {
            if t.as_secs_f64() >= at * publish_for.as_secs_f64() {
                match *what {
                    "kill -9 broker A" => a_broker.kill9(),
                    "restart broker A" => a_broker.spawn().await?,
                    "kill -9 the consumer" => consumer.kill9(),
                    "restart the consumer" => consumer.start()?,
                    "kill -9 broker B" => b_broker.kill9(),
                    _ => b_broker.spawn().await?,
                }
                log.push(format!("{:.1}s {what}", t.as_secs_f64()));
                if *what != "kill -9 the consumer" {
                    gap = Some((log.len() - 1, Instant::now(), output_len()));
                }
                row(t, sent, accepted, client.outbox_state().borrow().totals.count, &handled(&out), what);
                next_fault += 1;
            }
        }
        if let Some((i, at, len)) = gap {
            if output_len() > len {
                log[i].push_str(&format!(" (deliveries {} ms later)", at.elapsed().as_millis()));
                gap = None;
            }
        }
        let m = Message::new(format!("demo/{}", sent % 4), format!("{sent}")).qos(Qos::AtLeastOnce);
        sent += 1;
        pending.push_back(client.enqueue(m)?);
        while pending.len() > 64 {
            if pending.pop_front().expect("non-empty").await.is_ok() {
                accepted += 1;
            }
        }
        if t >= next_row {
            next_row += Duration::from_secs(1);
            row(t, sent, accepted, client.outbox_state().borrow().totals.count, &handled(&out), "");
        }
        tokio::time::sleep_until((start + interval * sent as u32).into()).await;
    }
    for p in pending {
        if p.await.is_ok() {
            accepted += 1;
        }
    }
    // Drain: until the consumer handled every accepted identity, or time.
    let want: HashSet<String> = (1..=accepted).map(|s| format!("{producer}/{s}")).collect();
    let deadline = start + Duration::from_secs(a.seconds);
    loop {
        let seen = handled(&out);
        let missing = want.iter().filter(|w| !seen.contains_key(*w)).count();
        if missing == 0 || Instant::now() >= deadline {
            break;
        }
        if start.elapsed() >= next_row {
            next_row += Duration::from_secs(1);
            row(start.elapsed(), sent, accepted, client.outbox_state().borrow().totals.count, &seen, "draining");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = handled(&out);
    let lost: Vec<&String> = want.iter().filter(|w| !seen.contains_key(*w)).collect();
    let twice = seen.values().filter(|c| **c > 1).count();
    row(start.elapsed(), sent, accepted, client.outbox_state().borrow().totals.count, &seen, "end");
    consumer.kill9();
    client.close().await;
    println!("faults: {}", log.join(", "));
    println!(
        "verdict: {} of {accepted} accepted messages lost; {twice} handled twice. Checked: every accepted identity {producer}/1..{accepted} was looked for in the consumer's output (its inbox removes the copies from the two brokers and the redeliveries; a message handled just before a kill -9 of the consumer, whose inbox record died with it, is handled again).",
        lost.len()
    );
    Ok(DemoOutcome { lost: lost.into_iter().cloned().collect(), twice })
}
