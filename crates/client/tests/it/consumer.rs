//! The consumer against real Mosquitto: ack after handling, the inbox,
//! several brokers merged, gaps.

use std::collections::HashSet;
use std::time::Duration;

use steadfast::{
    AckQuorum, BrokerSet, Client, Consumer, ConsumerConfig, Event, Message, Mode, ProtocolVersion, Qos, Received,
};
use steadfast_testkit::{Mosquitto, MosquittoOptions};

use crate::{config, next_event, open, payloads};

fn persistent() -> MosquittoOptions {
    MosquittoOptions { persistence: true, extra: vec![] }
}

fn consumer_config(id: &str, urls: &[String], dir: &std::path::Path, topic: &str) -> ConsumerConfig {
    let set = BrokerSet::new(urls.iter().map(|u| u.parse().unwrap()));
    let client = config(id, &urls[0], dir).brokers(set).keep_alive(Duration::from_secs(5));
    ConsumerConfig::new(client).topic(topic, Qos::AtLeastOnce)
}

async fn consumer(cfg: ConsumerConfig) -> Consumer {
    let (c, report) = Consumer::open(cfg).await.expect("open consumer");
    assert!(report.is_clean(), "{report:?}");
    c
}

async fn next(c: &Consumer) -> Received {
    tokio::time::timeout(Duration::from_secs(20), c.next()).await.expect("a delivery in time").expect("open")
}

/// The consumer's counters once `cond` holds (acks are counted as the
/// dispatcher takes them, a moment after `ack()`).
async fn stats_when(c: &Consumer, cond: impl Fn(&steadfast::ConsumerStats) -> bool) -> steadfast::ConsumerStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.stats().await.unwrap();
        if cond(&s) || tokio::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `n` consumer sessions came up.
async fn sessions_up(c: &Consumer, n: u32) {
    let mut events = c.events();
    let mut up = 0;
    next_event(&mut events, "consumer sessions", Duration::from_secs(10), move |e| {
        up += matches!(e, Event::Connected { .. }) as u32;
        (up == n).then_some(())
    })
    .await;
}

/// Receives and acknowledges `n` deliveries; returns their payloads.
async fn take(c: &Consumer, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        let d = next(c).await;
        got.push(String::from_utf8(d.payload().to_vec()).unwrap());
        d.ack();
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_consumer_gets_everything_in_order_and_a_restart_re_handles_nothing() {
    let broker = Mosquitto::start(persistent()).await;
    let cdir = tempfile::tempdir().unwrap();
    let ccfg = consumer_config("c1", &[broker.url()], cdir.path(), "in/#");
    Consumer::register(&ccfg).await.unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let p = open(config("p1", &broker.url(), pdir.path())).await;
    let want = payloads("in", 500);
    for m in &want {
        p.enqueue(Message::new("in/a", m.clone())).unwrap();
    }
    p.wait_idle().await;
    let c = consumer(ccfg.clone()).await;
    assert_eq!(take(&c, 500).await, want, "published before the first run, received in order");
    assert_eq!(stats_when(&c, |s| s.handled == 500).await.handled, 500);
    c.close().await;
    // Published while the consumer is away, then new ones.
    let more = payloads("more", 100);
    for m in &more {
        p.enqueue(Message::new("in/a", m.clone())).unwrap();
    }
    p.wait_idle().await;
    let c = consumer(ccfg).await;
    assert_eq!(take(&c, 100).await, more, "nothing handled before comes again");
    c.close().await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_unacknowledged_comes_again_and_is_acknowledged_only_after_handling() {
    let broker = Mosquitto::start(persistent()).await;
    let cdir = tempfile::tempdir().unwrap();
    let ccfg = consumer_config("c2", &[broker.url()], cdir.path(), "retry").retry_after(Duration::from_millis(100));
    let c = consumer(ccfg.clone()).await;
    let pdir = tempfile::tempdir().unwrap();
    let p = open(config("p2", &broker.url(), pdir.path())).await;
    p.publish(Message::new("retry", "once")).await.unwrap().delivered().await.unwrap();
    let first = next(&c).await;
    assert!(!first.redelivered());
    drop(first); // the handler failed
    let again = next(&c).await;
    assert_eq!((again.payload(), again.redelivered()), (&b"once"[..], true));
    // Not acknowledged yet: a crash now (close without ack) brings it back
    // from the broker in the next run.
    drop(again);
    c.close().await;
    let c = consumer(ccfg).await;
    let d = next(&c).await;
    assert_eq!(d.payload(), b"once");
    d.ack();
    c.close().await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_to_two_brokers_reaches_a_consumer_on_both_exactly_once() {
    let a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let urls = [a.url(), b.url()];
    let cdir = tempfile::tempdir().unwrap();
    let c = consumer(consumer_config("c3", &urls, cdir.path(), "fan")).await;
    sessions_up(&c, 2).await;
    let pdir = tempfile::tempdir().unwrap();
    let set = BrokerSet::new(urls.iter().map(|u| u.parse().unwrap())).mode(Mode::Fanout).ack(AckQuorum::All);
    let p = open(config("p3", &a.url(), pdir.path()).brokers(set)).await;
    let want = payloads("f", 2000);
    for m in &want {
        p.enqueue(Message::new("fan", m.clone())).unwrap();
    }
    p.wait_idle().await;
    let got = take(&c, 2000).await;
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), 2000, "each message handed over once");
    // Every second copy is dropped by the inbox.
    let stats = stats_when(&c, |s| s.handled == 2000 && s.duplicates == 2000).await;
    assert_eq!((stats.handled, stats.duplicates), (2000, 2000));
    nothing_more_before_a_marker(&c, &p, "fan", 2).await;
    c.close().await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_with_the_envelope_is_de_duplicated_and_unwrapped() {
    let broker = Mosquitto::plain().await;
    let cdir = tempfile::tempdir().unwrap();
    let client = config("c4", &broker.url(), cdir.path()).version(ProtocolVersion::V311).envelope(true);
    let c = consumer(ConsumerConfig::new(client).topic("env", Qos::AtLeastOnce)).await;
    let pdir = tempfile::tempdir().unwrap();
    let pcfg = config("p4", &broker.url(), pdir.path()).version(ProtocolVersion::V311).envelope(true);
    let p = open(pcfg).await;
    let r = p.publish(Message::new("env", "21.5")).await.unwrap();
    let seq = r.id();
    r.delivered().await.unwrap();
    let d = next(&c).await;
    assert_eq!(d.payload(), b"21.5", "the envelope is removed");
    assert_eq!(d.identity().map(|i| i.seq), Some(seq));
    d.ack();
    c.close().await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_that_does_not_fill_is_reported_as_a_suspected_loss() {
    let broker = Mosquitto::plain().await;
    let cdir = tempfile::tempdir().unwrap();
    let ccfg = consumer_config("c5", &[broker.url()], cdir.path(), "gap/kept").gap_timeout(Duration::from_millis(500));
    let c = consumer(ccfg).await;
    let mut events = c.events();
    let pdir = tempfile::tempdir().unwrap();
    let p = open(config("p5", &broker.url(), pdir.path())).await;
    // The middle message goes to a topic the consumer does not see: from
    // its side, sequence number 2 is missing.
    for (t, m) in [("gap/kept", "1"), ("gap/other", "2"), ("gap/kept", "3")] {
        p.publish(Message::new(t, m)).await.unwrap().delivered().await.unwrap();
    }
    let got = take(&c, 2).await;
    assert_eq!(got, ["1", "3"]);
    let (first, last) = next_event(&mut events, "SuspectedLoss", Duration::from_secs(10), |e| match e {
        Event::SuspectedLoss { first, last, .. } => Some((*first, *last)),
        _ => None,
    })
    .await;
    assert_eq!((first, last), (2, 2));
    c.close().await;
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_copies_through_two_brokers_are_handed_over_once() {
    let a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let urls = [a.url(), b.url()];
    let cdir = tempfile::tempdir().unwrap();
    let set = BrokerSet::new(urls.iter().map(|u| u.parse().unwrap()));
    let client = config("c6", &urls[0], cdir.path()).brokers(set);
    let c = consumer(ConsumerConfig::new(client).topic("q0", Qos::AtMostOnce)).await;
    sessions_up(&c, 2).await;
    let pdir = tempfile::tempdir().unwrap();
    let pset = BrokerSet::new(urls.iter().map(|u| u.parse().unwrap())).mode(Mode::Fanout);
    let p = open(config("p6", &a.url(), pdir.path()).brokers(pset)).await;
    for i in 0..50 {
        p.enqueue(Message::new("q0", format!("z{i}")).qos(Qos::AtMostOnce)).unwrap();
    }
    p.wait_idle().await;
    let got = take(&c, 50).await;
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), 50);
    nothing_more_before_a_marker(&c, &p, "q0", 2).await;
    c.close().await;
    p.close().await;
}

/// Checks that nothing is handed over after what a test took, by a
/// positive signal instead of a quiet pause: a marker published now through
/// every one of the `brokers` reaches the consumer on each link behind
/// whatever those links still carried (a broker delivers in order per
/// session, and the consumer reads each link in order). Once its last copy
/// was removed as a duplicate, every earlier copy had its chance: the
/// marker must be the next and only thing handed over.
async fn nothing_more_before_a_marker(c: &Consumer, p: &Client, topic: &str, brokers: u64) {
    let before = c.stats().await.unwrap().duplicates;
    p.publish(Message::new(topic, "marker")).await.unwrap().delivered().await.unwrap();
    let d = next(c).await;
    assert_eq!(d.payload(), b"marker", "something else was handed over before the marker");
    d.ack();
    let s = stats_when(c, |s| s.duplicates >= before + brokers - 1).await;
    assert!(s.duplicates >= before + brokers - 1, "the marker's other copies never arrived: {s:?}");
    let late = tokio::time::timeout(Duration::ZERO, c.next()).await;
    assert!(
        late.is_err(),
        "a copy came through after the marker's: {:?}",
        late.ok().flatten().map(|d| String::from_utf8_lossy(d.payload()).into_owned())
    );
}

/// At most the Receive Maximum is in the application's hands and not yet
/// acknowledged, whatever the broker sends: Mosquitto 2.0.11 sends up to
/// that many more after each acknowledgement of its oldest message in
/// flight, so without the consumer's own bound a crash would hand over
/// again many more than the window (seen as 1,531 lines printed again by a
/// `kill -9`ed `sub`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_the_receive_maximum_is_handed_over_unacknowledged_whatever_the_broker_sends() {
    const MAX: u16 = 8;
    const N: usize = 300;
    let broker = Mosquitto::plain().await;
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let cfg = consumer_config("windowed", std::slice::from_ref(&url), dir.path(), "w/#");
    let cfg = ConsumerConfig::new(cfg.client().clone().max_inflight(MAX)).topic("w/#", Qos::AtLeastOnce);
    Consumer::register(&cfg).await.unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let p = open(config("windowed-p", &url, pdir.path())).await;
    for i in 0..N {
        p.enqueue(Message::new("w/t", format!("{i:04}"))).unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), p.wait_idle()).await.expect("all queued in the broker");
    let c = consumer(cfg).await;
    let mut seen = HashSet::new();
    let mut held = Vec::new();
    // Acknowledge one at a time (the broker's oldest), and each time hold
    // whatever else comes meanwhile, without acknowledging it.
    for _ in 0..4 {
        let first = next(&c).await;
        seen.insert(first.payload().to_vec());
        first.ack();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(700), c.next()).await {
            seen.insert(d.payload().to_vec());
            held.push(d);
            assert!(held.len() <= MAX as usize, "{} handed over unacknowledged, more than {MAX}", held.len());
        }
        // The oldest of those held is acknowledged next.
        if !held.is_empty() {
            held.remove(0).ack();
        }
    }
    for d in held.drain(..) {
        d.ack();
    }
    while seen.len() < N {
        let d = next(&c).await;
        seen.insert(d.payload().to_vec());
        d.ack();
    }
    p.close().await;
    c.close().await;
}
