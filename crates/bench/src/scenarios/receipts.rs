//! `receipts`: a producer and a consumer live on one broker, the producer
//! waiting for the consumer's receipt of every message, against the same
//! run without receipts; and the receipt traffic it costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use steadfast::{Client, ClientConfig, Consumer, ConsumerConfig, Message, Qos, ReceiptRule};

use crate::clients::enqueue_all;
use crate::measure::{bounded, broker, median, median_run, rate, state_dir, url, versus, Span, Took};
use crate::{Args, BenchError, Row, Scenario};

/// One run: `a.messages` published while the consumer handles them; done
/// when the producer's outbox is empty (with receipts: every message
/// handled) and the consumer handled them all. Returns the time and the
/// receipt messages seen on the broker.
async fn run_once(port: u16, a: &Args, id: &str, receipts: bool) -> Result<(Took, u64), BenchError> {
    let dir = state_dir(a)?;
    let topic = format!("bench/receipts/{id}");
    let client = ClientConfig::new(id, url(port), dir.path().join("inbox")).max_inflight(a.inflight);
    let cfg = ConsumerConfig::new(client).topic(topic.clone(), Qos::AtLeastOnce);
    Consumer::register(&cfg).await?;
    // Counts what goes to any receipts topic (a plain subscriber, no inbox).
    let watch = ClientConfig::new(format!("{id}-watch"), url(port), dir.path().join("watch")).clean_start(true);
    let watch = ConsumerConfig::new(watch).topic("steadfast/receipts/#", Qos::AtMostOnce).inbox(false);
    let (watcher, _) = Consumer::open(watch).await?;
    let seen = Arc::new(AtomicU64::new(0));
    let counter = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(d) = watcher.next().await {
                seen.fetch_add(1, Ordering::Relaxed);
                d.ack();
            }
            watcher.close().await;
        })
    };
    let mut pcfg =
        ClientConfig::new(format!("{id}-producer"), url(port), dir.path().join("outbox")).max_inflight(a.inflight);
    if receipts {
        pcfg = pcfg.receipts(ReceiptRule::any(Duration::from_secs(30)));
    }
    let (consumer, _) = Consumer::open(cfg).await?;
    let (producer, _) = Client::open(pcfg).await?;
    let n = a.messages;
    let span = Span::start(n);
    let handle = async {
        for _ in 0..n {
            let limit = Duration::from_secs(30);
            let next = tokio::time::timeout(limit, consumer.next())
                .await
                .map_err(|_| BenchError::TimedOut { what: "receipts: the next message".into(), limit })?;
            next.ok_or(BenchError::Ended("the consumer"))?.ack();
        }
        Ok::<_, BenchError>(())
    };
    let payload = vec![b'r'; a.payload];
    let publish = async {
        enqueue_all(&producer, n, |_| Message::new(topic.clone(), payload.clone())).await?;
        producer.wait_idle().await;
        Ok(())
    };
    let done = bounded("receipts: published and handled", n, async {
        let (h, p) = tokio::join!(handle, publish);
        h.and(p)
    })
    .await;
    let took = span.stop();
    producer.close().await;
    consumer.close().await;
    done?;
    // The receipts a close flushed have had a moment to arrive: the last
    // batch is counted or not, a rounding at 1,000 messages a receipt.
    counter.abort();
    Ok((took, seen.load(Ordering::Relaxed)))
}

pub(crate) async fn receipts(a: Args) -> Result<Scenario, BenchError> {
    let broker = broker(0).await?;
    let title = format!(
        "{} QoS 1 messages of {} bytes, producer and consumer (with its inbox) live on one broker, published until handled, with and without receipts, window {}, {} runs, median",
        a.messages, a.payload, a.inflight, a.runs
    );
    let (mut with, mut without, mut receipts_seen) = (vec![], vec![], vec![]);
    let (mut cpu_with, mut cpu_without) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("receipts: run {}/{}", run + 1, a.runs);
        let (took, _) = run_once(broker.port(), &a, &format!("plain-{run}"), false).await?;
        without.push(rate(a.messages, took.elapsed));
        cpu_without.push(took.cpu);
        let (took, seen) = run_once(broker.port(), &a, &format!("receipts-{run}"), true).await?;
        with.push(rate(a.messages, took.elapsed));
        cpu_with.push(took.cpu);
        receipts_seen.push(seen as f64);
    }
    let ((with, cpu_with), (without, cpu_without)) = (median_run(&with, &cpu_with), median_run(&without, &cpu_without));
    let seen = median(receipts_seen);
    let mut rows = versus(
        a.inflight,
        ("without receipts: the broker's acknowledgement ends the producer's wait", without, None, cpu_without),
        ("with receipts: each message waits for the consumer's receipt", with, None, cpu_with),
    );
    rows.push(Row {
        name: "receipt messages per 1,000 messages published".into(),
        value: Some((1000.0 * seen / a.messages as f64, "per 1k")),
        ..Row::default()
    });
    Ok(Scenario {
        name: "receipts",
        title,
        ratio_to: "the same run without receipts".into(),
        rows,
        latencies: vec![],
        notes: vec![format!(
            "{seen:.0} receipt messages for {} messages (a receipt names up to 1,000 sequence numbers and leaves 50 ms after its first); target: at least 0.8x the rate without receipts, receipts at most 1% of the messages",
            a.messages
        )],
    })
}
