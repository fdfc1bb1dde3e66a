//! The clients timed: bare rumqttc (MQTT 3.1.1 and 5), `mosquitto_pub`,
//! and steadfast's durable client, each with `a.messages` messages or paced
//! for latency.

use std::collections::VecDeque;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use steadfast::{BackoffConfig, BrokerSet, Client, ClientConfig, Message, ProtocolVersion};
use steadfast_lab::mosquitto_program;

use crate::measure::{bounded, limit_for, state_dir, url, Span, Took};
use crate::{Args, BenchError};

/// How long a bare rumqttc run took: in all (from before the connect to
/// the last PUBACK), and from its first PUBACK to its last.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timed {
    pub(crate) total: Took,
    pub(crate) from_first_ack: Took,
}

/// `a.messages` QoS 1 messages through bare rumqttc, MQTT 3.1.1, window
/// `window`, on `topic(i)`.
pub(crate) async fn bare_rumqttc(
    port: u16,
    a: &Args,
    id: &str,
    window: u16,
    topic: fn(usize) -> String,
) -> Result<Timed, BenchError> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(format!("bench-rumqttc-{id}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(window);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let n = a.messages;
    let payload = vec![b'r'; a.payload];
    let span = Span::start(n);
    let producer = tokio::spawn(async move {
        for i in 0..n {
            client.publish(topic(i), QoS::AtLeastOnce, false, payload.clone()).await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let acks = bounded("bare rumqttc 3.1.1", n, async {
        let (mut acked, mut first) = (0, None);
        while acked < n {
            match eventloop.poll().await.map_err(BenchError::rumqttc("bare rumqttc 3.1.1"))? {
                Event::Incoming(Packet::PubAck(_)) => {
                    acked += 1;
                    first.get_or_insert_with(|| Span::start(n));
                }
                Event::Outgoing(Outgoing::Disconnect) => return Err(BenchError::Ended("the rumqttc connection")),
                _ => {}
            }
        }
        Ok(first)
    });
    let first = acks.await;
    let total = span.stop();
    let from_first_ack = first_ack(first, Span::start(n), &producer)?.stop();
    let client = producer.await?.map_err(BenchError::rumqttc("bare rumqttc 3.1.1"))?;
    let _ = client.disconnect().await;
    Ok(Timed { total, from_first_ack })
}

/// The span from a bare run's first acknowledgement (`none`, with none);
/// on an error the producer is stopped.
pub(crate) fn first_ack<T>(
    first: Result<Option<Span>, BenchError>,
    none: Span,
    producer: &tokio::task::JoinHandle<T>,
) -> Result<Span, BenchError> {
    first.map(|f| f.unwrap_or(none)).inspect_err(|_| producer.abort())
}

/// What bare rumqttc's MQTT 5 messages carry besides topic and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carried {
    Nothing,
    /// A `steadfast-id` user property, `producer/seq`, as steadfast's MQTT 5
    /// messages carry it (G5): what a broker spends on the identity.
    Identity,
}

/// The same through bare rumqttc, MQTT 5.
pub(crate) async fn bare_rumqttc_v5(
    port: u16,
    a: &Args,
    id: &str,
    window: u16,
    topic: fn(usize) -> String,
    carried: Carried,
) -> Result<Timed, BenchError> {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(format!("bench-rumqttc5-{id}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_outgoing_inflight_upper_limit(window);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let n = a.messages;
    let payload = vec![b'r'; a.payload];
    let span = Span::start(n);
    let producer_id = format!("bench-rumqttc5-{id}");
    let producer = tokio::spawn(async move {
        for i in 0..n {
            let (topic, payload) = (topic(i), payload.clone());
            match carried {
                Carried::Nothing => client.publish(topic, QoS::AtLeastOnce, false, payload).await?,
                Carried::Identity => {
                    let value = steadfast::Identity::property_value(&producer_id, i as u64 + 1);
                    let user_properties = vec![(steadfast::Identity::USER_PROPERTY.to_owned(), value)];
                    let properties = PublishProperties { user_properties, ..PublishProperties::default() };
                    client.publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties).await?
                }
            }
        }
        Ok::<_, rumqttc::v5::ClientError>(client)
    });
    let acks = bounded("bare rumqttc 5", n, async {
        let (mut acked, mut first) = (0, None);
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) =
                eventloop.poll().await.map_err(BenchError::rumqttc("bare rumqttc 5"))?
            {
                acked += 1;
                first.get_or_insert_with(|| Span::start(n));
            }
        }
        Ok(first)
    });
    let first = acks.await;
    let total = span.stop();
    let from_first_ack = first_ack(first, Span::start(n), &producer)?.stop();
    let client = producer.await?.map_err(BenchError::rumqttc("bare rumqttc 5"))?;
    let _ = client.disconnect().await;
    Ok(Timed { total, from_first_ack })
}

pub(crate) async fn steadfast_durable(
    port: u16,
    a: &Args,
    name: &str,
    version: ProtocolVersion,
    window: u16,
) -> Result<Took, BenchError> {
    steadfast_set(BrokerSet::new([url(port)]), a, &format!("{name}-{version:?}"), version, window).await
}

/// `a.messages` through a durable steadfast client with in-flight window
/// `window`: from the first `enqueue` to an empty outbox.
pub(crate) async fn steadfast_set(
    set: BrokerSet,
    a: &Args,
    name: &str,
    version: ProtocolVersion,
    window: u16,
) -> Result<Took, BenchError> {
    let dir = state_dir(a)?;
    let cfg = ClientConfig::new(format!("bench-steadfast-{name}"), set.brokers()[0].clone(), dir.path())
        .brokers(set)
        .version(version)
        .max_inflight(window)
        .backoff(BackoffConfig { min: Duration::from_millis(10), ..BackoffConfig::default() });
    let (client, _) = Client::open(cfg).await?;
    let payload = vec![b's'; a.payload];
    let span = Span::start(a.messages);
    let run = bounded("steadfast", a.messages, async {
        enqueue_all(&client, a.messages, |_| Message::new("bench/steadfast", payload.clone())).await?;
        let accepted = span.elapsed();
        client.wait_idle().await;
        Ok(accepted)
    });
    let accepted = run.await;
    let took = span.stop();
    client.close().await;
    let accepted = accepted?;
    eprintln!(
        "    steadfast {name}, window {window}: all accepted (on disk) after {accepted:.2?}, all delivered after {:.2?}",
        took.elapsed
    );
    Ok(took)
}

/// Messages awaiting their disk sync at most, in a load loop: enough to
/// keep the outbox's group commit busy, few enough to keep memory flat.
const PIPELINE_DEPTH: usize = 8192;

/// Enqueues `n` messages (`message(i)`), at most [`PIPELINE_DEPTH`]
/// awaiting their sync at a time; returns once every one is accepted (on
/// disk).
pub(crate) async fn enqueue_all(
    client: &Client,
    n: usize,
    message: impl Fn(usize) -> Message,
) -> Result<(), BenchError> {
    let mut pending = VecDeque::new();
    for i in 0..n {
        pending.push_back(client.enqueue(message(i))?);
        if pending.len() >= PIPELINE_DEPTH {
            pending.pop_front().expect("non-empty").await?;
        }
    }
    for p in pending {
        p.await?;
    }
    Ok(())
}

/// `mosquitto_pub -l -q 1 -M window`, MQTT 3.1.1, timed as a whole process.
pub(crate) fn mosquitto_pub(port: u16, a: &Args, window: u16) -> Result<Took, BenchError> {
    let line = "m".repeat(a.payload) + "\n";
    let input = line.repeat(a.messages);
    let span = Span::start(a.messages);
    let mut child = Command::new(mosquitto_program("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "bench/mosquitto_pub", "-q", "1", "-l"])
        .args(["-M", &window.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(BenchError::run("mosquitto_pub"))?;
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).map_err(BenchError::run("mosquitto_pub"))?;
    let limit = limit_for(a.messages);
    loop {
        if let Some(status) = child.try_wait().map_err(BenchError::run("mosquitto_pub"))? {
            if !status.success() {
                return Err(BenchError::Failed { what: "mosquitto_pub".into(), detail: status.to_string() });
            }
            return Ok(span.stop());
        }
        if span.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::TimedOut { what: format!("mosquitto_pub: {} messages", a.messages), limit });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Where a steadfast message's latency goes, as far as the benchmark can
/// see from outside: milliseconds per message, and the link's smoothed
/// round trip (PUBLISH written to PUBACK read) at the end.
pub(crate) struct SteadfastLatency {
    /// `publish` called to accepted (in the outbox, synced).
    pub accepted: Vec<f64>,
    /// `publish` called to the delivered receipt.
    pub total: Vec<f64>,
    /// The broker link's smoothed round trip, ms: the median of its
    /// readings every 500 messages.
    pub round_trip: Option<f64>,
}

/// `n` messages paced at `a.rate`, each timed from `publish` (accepted on
/// disk) to its acknowledgement; milliseconds.
pub(crate) async fn latency_steadfast(port: u16, a: &Args, n: usize) -> Result<SteadfastLatency, BenchError> {
    let dir = state_dir(a)?;
    let cfg = ClientConfig::new("bench-latency", url(port), dir.path()).max_inflight(a.inflight);
    let (client, _) = Client::open(cfg).await?;
    let payload = vec![b'l'; a.payload];
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    let mut round_trips = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(i as f64 / a.rate.max(1) as f64)).into()).await;
        // The link's round-trip estimate while the run goes on (at its end
        // it holds the last samples only).
        if i % 500 == 499 {
            round_trips.extend(client.broker_status().first().and_then(|b| b.round_trip).map(|(rt, _)| rt));
        }
        let (client, payload) = (client.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let receipt = client.publish(Message::new("bench/latency", payload)).await?;
            let accepted = start.elapsed().as_secs_f64() * 1000.0;
            receipt.delivered().await?;
            Ok::<_, steadfast::PublishError>((accepted, start.elapsed().as_secs_f64() * 1000.0))
        }));
    }
    let mut out = SteadfastLatency { accepted: Vec::with_capacity(n), total: Vec::with_capacity(n), round_trip: None };
    for t in tasks {
        let (accepted, total) = t.await??;
        out.accepted.push(accepted);
        out.total.push(total);
    }
    let mut round_trips: Vec<f64> = round_trips.iter().map(|rt| rt.as_secs_f64() * 1000.0).collect();
    out.round_trip = crate::report::percentile(&mut round_trips, 50.0);
    client.close().await;
    Ok(out)
}

/// The same through bare rumqttc (MQTT 5): from the `publish` call to its
/// PUBACK, matched by order of sending and packet id.
pub(crate) async fn latency_rumqttc_v5(port: u16, a: &Args, n: usize) -> Result<Vec<f64>, BenchError> {
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
        match eventloop.poll().await.map_err(BenchError::rumqttc("latency: rumqttc"))? {
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
    let client = producer.await?.map_err(BenchError::rumqttc("latency: rumqttc"))?;
    let _ = client.disconnect().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    /// The like-for-like MQTT 5 baseline carries what steadfast's messages
    /// carry: every message its `steadfast-id` property, `producer/seq`
    /// from 1, as a subscriber receives it; the plain baseline carries none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bare_rumqttc_5_carries_the_identity_property_only_when_asked() {
        let broker = crate::measure::broker(0).await.unwrap();
        let port = broker.port();
        let (sub, mut events) = AsyncClient::new(MqttOptions::new("bench-test-sub", "127.0.0.1", port), 64);
        sub.subscribe("bench/carried/#", QoS::AtLeastOnce).await.unwrap();
        let subscribed = async { while !matches!(events.poll().await.unwrap(), Event::Incoming(Packet::SubAck(_))) {} };
        tokio::time::timeout(Duration::from_secs(10), subscribed).await.expect("the SUBACK within 10 s");
        let a = Args { messages: 3, ..Args::default() };
        bare_rumqttc_v5(port, &a, "plain", 16, |_| "bench/carried/plain".into(), Carried::Nothing).await.unwrap();
        bare_rumqttc_v5(port, &a, "id", 16, |_| "bench/carried/id".into(), Carried::Identity).await.unwrap();
        let received = async {
            let mut got = Vec::new();
            while got.len() < 6 {
                if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                    let user = p.properties.map(|p| p.user_properties).unwrap_or_default();
                    got.push((String::from_utf8(p.topic.to_vec()).unwrap(), user));
                }
            }
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(10), received).await.expect("6 messages within 10 s");
        let key = steadfast::Identity::USER_PROPERTY.to_owned();
        let want: Vec<(String, Vec<(String, String)>)> =
            (0..3)
                .map(|_| ("bench/carried/plain".to_owned(), vec![]))
                .chain((1..=3).map(|seq| {
                    ("bench/carried/id".to_owned(), vec![(key.clone(), format!("bench-rumqttc5-id/{seq}"))])
                }))
                .collect();
        assert_eq!(got, want);
    }
}
