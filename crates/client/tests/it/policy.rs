//! Delivery policies through the library: best-effort, deadlines as the
//! broker sees them, the retry budget, and the backoff profiles on paused
//! time.

use std::time::Duration;

use steadfast::{
    BackoffConfig, BrokerUrl, Class, Client, ClientConfig, Delivery, DropReason, Event, LinkState, Message,
};
use steadfast_store::MemoryStore;
use steadfast_testkit::{free_port, wait_until, FaultProxy, Mosquitto, ProxyMode, Reply, ScriptedBroker, Subscriber};

use crate::{config, open};

fn drops(s: &steadfast::Status, reason: DropReason) -> u64 {
    s.drops.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
}

/// Best-effort goes out while a broker is connected and is dropped,
/// counted and announced when none is; it never waits in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_is_sent_when_a_broker_is_up_and_counted_when_not() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "be/#", 0, None).await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = open(config("be", &proxy.url(), dir.path())).await;
    wait_until("connected", Duration::from_secs(10), || client.broker_status()[0].state == LinkState::Connected).await;
    let r = client.publish(Message::new("be/up", "1").class(Class::BestEffort)).await.unwrap();
    assert_eq!(r.id(), 0, "never stored");
    assert_eq!(r.delivered().await.unwrap(), Delivery::Delivered);
    sub.wait_count(1, Duration::from_secs(5)).await;

    proxy.set(ProxyMode::Reset);
    proxy.reset_connections();
    wait_until("link lost", Duration::from_secs(10), || client.broker_status()[0].state != LinkState::Connected).await;
    let mut events = client.events();
    let r = client.publish(Message::new("be/down", "2").class(Class::BestEffort)).await.unwrap();
    assert_eq!(r.delivered().await.unwrap(), Delivery::Dropped(DropReason::BestEffort));
    crate::next_event(&mut events, "Dropped", Duration::from_secs(5), |e| match e {
        Event::Dropped(d) if d.reason == DropReason::BestEffort => Some(()),
        _ => None,
    })
    .await;
    let s = client.status().await.unwrap();
    assert_eq!((s.queued, drops(&s, DropReason::BestEffort)), (0, 1));
    assert_eq!(sub.lines(), ["1"]);
    client.close().await;
}

/// The deadline travels as the MQTT 5 message expiry interval: a message
/// whose time ran out while queued for an absent subscriber is discarded
/// by the broker itself, one with time left is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_honours_the_time_left_of_a_deadline_message() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "dl/#", 1, Some("dl-sub")).await;
    drop(sub);
    let dir = tempfile::tempdir().unwrap();
    let client = open(config("dl", &broker.url(), dir.path())).await;
    let short = client.publish(Message::new("dl/short", "short").ttl(Duration::from_secs(1))).await.unwrap();
    let long = client.publish(Message::new("dl/long", "long").ttl(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(short.delivered().await.unwrap(), Delivery::Delivered);
    assert_eq!(long.delivered().await.unwrap(), Delivery::Delivered);
    // The condition is the passing of time itself: the short one's second.
    let sent = std::time::Instant::now();
    wait_until("the 1 s deadline to pass", Duration::from_secs(5), || sent.elapsed() > Duration::from_millis(2100))
        .await;
    let sub = Subscriber::start(broker.port(), "dl/#", 1, Some("dl-sub")).await;
    sub.wait_count(1, Duration::from_secs(5)).await;
    assert_eq!(sub.lines()[0], "long", "queued in order: the expired one would have come first");
    client.close().await;
}

/// A message with a budget of N sends is sent N times to a broker that
/// never acknowledges, then leaves as `budget`, whether the session
/// resumes (a resend) or restarts (read again from the outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_the_sends_then_drops_counted() {
    for resume in [false, true] {
        let broker = ScriptedBroker::start(true, move |conn| resume && conn > 0, |_, _| Reply::Close);
        let dir = tempfile::tempdir().unwrap();
        let client = open(config("budget", &broker.url(), dir.path())).await;
        let r = client.publish(Message::new("b/t", "x").max_attempts(3)).await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(20), r.delivered()).await.expect("dropped in time");
        assert_eq!(outcome.unwrap(), Delivery::Dropped(DropReason::Budget), "resume={resume}");
        assert_eq!(broker.publishes().len(), 3, "resume={resume}: {:?}", broker.publishes());
        let s = client.status().await.unwrap();
        assert_eq!((s.queued, drops(&s, DropReason::Budget)), (0, 1), "resume={resume}");
        client.close().await;
    }
}

/// The client's reconnect schedule under the battery profile, on paused
/// time: every delay at least 30 s, at most 12 attempts in any hour.
#[tokio::test(start_paused = true)]
async fn the_battery_profile_paces_reconnects_on_paused_time() {
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = ClientConfig::new("battery", url, "/nonexistent").backoff(BackoffConfig::battery()).seed(9);
    let client = Client::with_store(cfg, Box::new(MemoryStore::new())).await.unwrap();
    let mut events = client.events();
    let start = tokio::time::Instant::now();
    let mut starts = Vec::new();
    while starts.len() < 40 {
        if let Ok(Event::ConnectFailed { retry_in, .. }) = events.recv().await {
            assert!(retry_in >= Duration::from_secs(30), "{retry_in:?}");
            assert!(retry_in <= Duration::from_secs(3600), "{retry_in:?}");
            starts.push(tokio::time::Instant::now() + retry_in);
        }
    }
    let hour = Duration::from_secs(3600);
    for (i, t) in starts.iter().enumerate() {
        let within = starts[i..].iter().take_while(|u| u.duration_since(*t) < hour).count();
        assert!(within <= 12, "{within} attempts within the hour from attempt {i}");
    }
    assert!(starts.last().unwrap().duration_since(start) >= 3 * hour);
    client.close().await;
}

/// The default profile on paused time: delays grow from 100 ms and never
/// pass 30 s.
#[tokio::test(start_paused = true)]
async fn the_default_profile_grows_to_its_cap_on_paused_time() {
    let url: BrokerUrl = format!("mqtt://127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = ClientConfig::new("default", url, "/nonexistent").seed(4);
    let client = Client::with_store(cfg, Box::new(MemoryStore::new())).await.unwrap();
    let mut events = client.events();
    let mut delays = Vec::new();
    while delays.len() < 20 {
        if let Ok(Event::ConnectFailed { retry_in, .. }) = events.recv().await {
            delays.push(retry_in);
        }
    }
    for (n, d) in delays.iter().enumerate() {
        let cap = Duration::from_millis((100u64 << n.min(20)).min(30_000));
        assert!(*d >= Duration::from_millis(100) && *d <= cap, "attempt {n}: {d:?} outside 100ms..{cap:?}");
    }
    assert!(delays[12..].iter().any(|d| *d > Duration::from_secs(10)), "it grew: {delays:?}");
    client.close().await;
}
