use std::time::Duration;

use steadfast::{Delivery, Message, ProtocolVersion, Qos};
use steadfast_testkit::{FaultProxy, Mosquitto, ProxyMode, Subscriber};

use crate::{assert_all_in_order, config, connect_failed, open, payloads};

#[tokio::test]
async fn qos1_messages_arrive_in_order_on_mqtt5_and_311() {
    let broker = Mosquitto::plain().await;
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let topic = format!("t/{version:?}");
        let sub = Subscriber::start(broker.port(), &topic, 1, None).await;
        let dir = tempfile::tempdir().unwrap();
        let c = open(config("p1", &broker.url(), dir.path()).version(version)).await;
        let want = payloads("m", 500);
        for p in &want {
            c.enqueue(Message::new(&topic, p.clone())).unwrap();
        }
        let last = c.publish(Message::new(&topic, "last")).await.unwrap();
        assert_eq!(last.delivered().await.unwrap(), Delivery::Delivered);
        sub.wait_count(501, Duration::from_secs(20)).await;
        assert_all_in_order(&sub.lines(), &want);
        c.wait_idle().await;
        assert_eq!(c.status().await.unwrap().queued, 0);
        c.close().await;
    }
}

#[tokio::test]
async fn qos2_messages_arrive_exactly_once() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "q2", 2, None).await;
    let dir = tempfile::tempdir().unwrap();
    let c = open(config("p2", &broker.url(), dir.path())).await;
    let want = payloads("x", 1000);
    let mut accepted = Vec::new();
    for p in &want {
        accepted.push(c.enqueue(Message::new("q2", p.clone()).qos(Qos::ExactlyOnce)).unwrap());
    }
    for a in accepted {
        a.await.unwrap();
    }
    c.wait_idle().await;
    sub.wait_count(1000, Duration::from_secs(20)).await;
    // Give a duplicate every chance to show up behind the last message.
    let probe = c.publish(Message::new("q2", "probe").qos(Qos::ExactlyOnce)).await.unwrap();
    probe.delivered().await.unwrap();
    sub.wait_count(1001, Duration::from_secs(10)).await;
    let got = sub.lines();
    assert_eq!(got.len(), 1001, "duplicates arrived");
    assert_eq!(&got[..1000], &want[..]);
    c.close().await;
}

#[tokio::test]
async fn publishing_with_the_broker_down_queues_and_delivers_later() {
    let mut broker = Mosquitto::plain().await;
    broker.kill9();
    // The client reaches the broker only through the proxy, held shut until
    // a subscriber is in place, so every queued message can be checked.
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    proxy.set(ProxyMode::Reset);
    let dir = tempfile::tempdir().unwrap();
    let c = open(config("p3", &proxy.url(), dir.path())).await;
    let mut events = c.events();
    let want = payloads("d", 200);
    for p in &want {
        c.publish(Message::new("down", p.clone())).await.unwrap();
    }
    // The attempt failing is visible, and nothing is lost meanwhile.
    connect_failed(&mut events).await;
    assert_eq!(c.status().await.unwrap().queued, 200);
    broker.restart().await;
    let sub = Subscriber::start(broker.port(), "down", 1, None).await;
    proxy.set(ProxyMode::Pass);
    c.wait_idle().await;
    let later = payloads("late", 10);
    for p in &later {
        c.publish(Message::new("down", p.clone())).await.unwrap();
    }
    c.wait_idle().await;
    let all: Vec<String> = want.iter().chain(&later).cloned().collect();
    sub.wait_all(&all, Duration::from_secs(10)).await;
    assert_all_in_order(&sub.lines(), &all);
    c.close().await;
}

#[tokio::test]
async fn a_refused_connack_says_why() {
    let broker = Mosquitto::with_password("alice", "secret").await;
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let out = tempfile::tempdir().unwrap();
        let cfg =
            config("p4", &broker.url(), out.path()).version(version).credentials("alice", Some(b"wrong".to_vec()));
        let c = open(cfg).await;
        let mut events = c.events();
        let err = connect_failed(&mut events).await;
        assert!(!err.is_retryable(), "{err}");
        let text = err.to_string();
        assert!(text.contains("bad user name or password") || text.contains("not authorised"), "{version:?}: {text}");
        c.close().await;
        let ok = tempfile::tempdir().unwrap();
        let cfg =
            config("p5", &broker.url(), ok.path()).version(version).credentials("alice", Some(b"secret".to_vec()));
        let c = open(cfg).await;
        let r = c.publish(Message::new("auth", "x")).await.unwrap();
        assert_eq!(r.delivered().await.unwrap(), Delivery::Delivered);
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_receive_maximum_bounds_what_is_in_flight() {
    use steadfast::LinkState;
    use steadfast_testkit::{wait_until, FaultProxy, MosquittoOptions, ProxyMode};
    let opts = MosquittoOptions { persistence: false, extra: vec!["max_inflight_messages 5".into()] };
    let broker = Mosquitto::start(opts).await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("rm", &proxy.url(), dir.path())
        .keep_alive(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2));
    let c = open(cfg).await;
    let c2 = c.clone();
    wait_until("connected", Duration::from_secs(10), move || c2.broker_status()[0].state == LinkState::Connected).await;
    // No acks come back through a black hole: the window fills and stops.
    proxy.set(ProxyMode::BlackHole);
    for i in 0..50 {
        c.enqueue(Message::new("rm", format!("{i}"))).unwrap().await.unwrap();
    }
    let c2 = c.clone();
    wait_until("window full", Duration::from_secs(10), move || c2.broker_status()[0].inflight >= 5).await;
    assert_eq!(c.broker_status()[0].inflight, 5, "more in flight than the broker's receive maximum");
    proxy.set(ProxyMode::Pass);
    proxy.reset_connections();
    tokio::time::timeout(Duration::from_secs(30), c.wait_idle()).await.expect("all delivered");
    c.close().await;
}

#[tokio::test]
async fn qos0_is_sent_once_and_leaves_the_outbox() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "q0", 0, None).await;
    let dir = tempfile::tempdir().unwrap();
    let c = open(config("q0", &broker.url(), dir.path())).await;
    let want = payloads("z", 100);
    for p in &want {
        c.enqueue(Message::new("q0", p.clone()).qos(Qos::AtMostOnce)).unwrap().await.unwrap();
    }
    c.wait_idle().await;
    sub.wait_count(100, Duration::from_secs(10)).await;
    assert_eq!(sub.lines(), want);
    c.close().await;
}

/// `wait_idle` right after `enqueue` (nothing awaited) waits for those
/// messages too: it used to see the outbox empty before the writer had
/// taken them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_right_after_enqueue_waits_for_what_was_enqueued() {
    let broker = steadfast_testkit::Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let c = crate::open(crate::config("idle", &broker.url(), dir.path())).await;
    for i in 0..2_000 {
        c.enqueue(steadfast::Message::new("idle/t", format!("{i}"))).unwrap();
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), c.wait_idle()).await.expect("idle");
    assert_eq!(c.status().await.unwrap().queued, 0, "every enqueued message delivered");
    // The link counts what it handed to the outbox right after handing it
    // (a moment later on a busy machine): it comes to every one.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let acked = loop {
        let acked = c.status().await.unwrap().brokers[0].acked;
        if acked >= 2_000 || tokio::time::Instant::now() > deadline {
            break acked;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!(acked, 2_000, "every enqueued message acknowledged, once");
    c.close().await;
}
