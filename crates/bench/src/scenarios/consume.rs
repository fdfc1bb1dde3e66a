//! `consume`: a queued backlog drained by a consumer with and without
//! its durable inbox.

use std::path::Path;
use std::time::Duration;

use steadfast::{Client, ClientConfig, Consumer, ConsumerConfig, Message, Qos};

use crate::clients::enqueue_all;
use crate::measure::{bounded, broker, median_run, rate, state_dir, url, versus, RssPeak, Span, Took};
use crate::{Args, BenchError, Scenario};

/// Queues `a.messages` for consumer `id` (registered first), then times
/// how long the consumer takes to handle them all.
pub(crate) async fn consume_once(port: u16, a: &Args, id: &str, inbox: bool) -> Result<Took, BenchError> {
    let dir = state_dir(a)?;
    let client = ClientConfig::new(id, url(port), dir.path().join("inbox")).max_inflight(a.inflight);
    let cfg = ConsumerConfig::new(client).topic(format!("bench/consume/{id}"), Qos::AtLeastOnce).inbox(inbox);
    Consumer::register(&cfg).await?;
    queue(port, a, dir.path(), id, &format!("bench/consume/{id}")).await?;
    let span = Span::start(a.messages);
    let (consumer, _) = Consumer::open(cfg).await?;
    for _ in 0..a.messages {
        let limit = Duration::from_secs(30);
        let next = tokio::time::timeout(limit, consumer.next())
            .await
            .map_err(|_| BenchError::TimedOut { what: "consume: the next message".into(), limit })?;
        let d = next.ok_or(BenchError::Ended("the consumer"))?;
        d.ack();
    }
    let took = span.stop();
    consumer.close().await;
    Ok(took)
}

/// Publishes `a.messages` to `topic` with a producer of its own (outbox
/// in `dir`) and waits until the broker took them all: a backlog for the
/// consumers registered before.
pub(crate) async fn queue(port: u16, a: &Args, dir: &Path, id: &str, topic: &str) -> Result<(), BenchError> {
    let pcfg = ClientConfig::new(format!("{id}-producer"), url(port), dir.join("outbox")).max_inflight(a.inflight);
    let (producer, _) = Client::open(pcfg).await?;
    let payload = vec![b'c'; a.payload];
    let queued = bounded("queueing a backlog", a.messages, async {
        enqueue_all(&producer, a.messages, |_| Message::new(topic, payload.clone())).await?;
        producer.wait_idle().await;
        Ok(())
    })
    .await;
    producer.close().await;
    queued
}

pub(crate) async fn consume(a: Args) -> Result<Scenario, BenchError> {
    let title = format!(
        "{} QoS 1 messages of {} bytes queued for a consumer, drained with and without the inbox, receive maximum (window) {}, {} runs, median",
        a.messages, a.payload, a.inflight, a.runs
    );
    let (mut with, mut without, mut rss_with, mut rss_without) = (vec![], vec![], 0, 0);
    let (mut cpu_with, mut cpu_without) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("consume: run {}/{}", run + 1, a.runs);
        // Each arm drains a broker of its own, first in every other run, so
        // that neither inherits what the other left in the broker (its
        // heap, its sessions) nor always runs on a warmer machine.
        for inbox in [run % 2 == 1, run % 2 == 0] {
            // The test kit's broker queues without limit for an absent
            // session; its in-flight window to the consumer is the
            // consumer's receive maximum (Mosquitto's own default of 20
            // would cap both arms alike).
            let broker = broker(0).await?;
            let peak = RssPeak::start();
            let name = format!("{}-{run}", if inbox { "inbox" } else { "plain" });
            let took = consume_once(broker.port(), &a, &name, inbox).await?;
            let r = rate(a.messages, took.elapsed);
            let rss = peak.stop();
            if inbox {
                with.push(r);
                rss_with = rss_with.max(rss);
                cpu_with.push(took.cpu);
            } else {
                without.push(r);
                rss_without = rss_without.max(rss);
                cpu_without.push(took.cpu);
            }
        }
    }
    let ((with, cpu_with), (without, cpu_without)) = (median_run(&with, &cpu_with), median_run(&without, &cpu_without));
    Ok(Scenario {
        name: "consume",
        title,
        ratio_to: "the consumer without an inbox, same run".into(),
        rows: versus(
            a.inflight,
            ("steadfast consumer without inbox (no de-duplication)", without, Some(rss_without), cpu_without),
            ("steadfast consumer with the durable inbox", with, Some(rss_with), cpu_with),
        ),
        latencies: vec![],
        notes: vec![],
    })
}
