//! End-to-end receipts against real Mosquitto: a broker that forgets what
//! it acknowledged, receipts lost on their way back, MQTT 3.1.1 with the
//! envelope, who handled a message, and receipts through a bridge.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use steadfast::bridge::{route_dirs, Bridge, Route, RunningBridge};
use steadfast::{
    BrokerSet, Client, ClientConfig, Consumer, ConsumerConfig, Handling, Message, Need, ProtocolVersion, Qos,
    ReceiptRule,
};
use steadfast_testkit::{Mosquitto, MosquittoOptions};

use crate::{config, open};

fn consumer_config(id: &str, url: &str, dir: &Path, topic: &str) -> ConsumerConfig {
    consumer_on(id, &[url.to_owned()], dir, topic)
}

/// A consumer of `topic` with a session on each of `urls`.
fn consumer_on(id: &str, urls: &[String], dir: &Path, topic: &str) -> ConsumerConfig {
    let set = BrokerSet::new(urls.iter().map(|u| u.parse().unwrap()));
    let client = config(id, &urls[0], dir).brokers(set).keep_alive(Duration::from_secs(5));
    ConsumerConfig::new(client).topic(topic, Qos::AtLeastOnce)
}

/// Queues `n` messages `m-00000`, `m-00001`, ... on `e2e/t`; returns once
/// all are accepted (the last one's commit holds every one before it).
async fn enqueue(p: &Client, n: usize) {
    let mut last = None;
    for i in 0..n {
        last = Some(p.enqueue(Message::new("e2e/t", format!("m-{i:05}"))).unwrap());
    }
    if let Some(last) = last {
        last.await.expect("accepted");
    }
}

fn producer(id: &str, url: &str, dir: &Path, timeout: Duration) -> ClientConfig {
    config(id, url, dir).receipts(ReceiptRule::any(timeout))
}

/// Waits until `cond` holds for the client's status (at most `limit`).
async fn status_until(c: &Client, what: &str, limit: Duration, cond: impl Fn(&steadfast::Status) -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let s = c.status().await.expect("status");
        if cond(&s) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}; status {s:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Hands over and acknowledges deliveries until `n` distinct payloads were
/// handled; returns how often each payload was handed over.
async fn handle(c: &Consumer, n: usize, limit: Duration) -> HashMap<String, u32> {
    let mut seen: HashMap<String, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + limit;
    while seen.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let d = tokio::time::timeout(left, c.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} handled within {limit:?}", seen.len()))
            .expect("consumer open");
        *seen.entry(String::from_utf8(d.payload().to_vec()).unwrap()).or_default() += 1;
        d.ack();
    }
    seen
}

/// The seed's worst case: the consumer is away, the broker keeps nothing
/// on disk, acknowledges 5,000 messages and is killed. Without receipts
/// they are gone (shown with a message published after the restart, which
/// arrives first and alone); with receipts each is published again and
/// handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_forgets_what_it_acknowledged_loses_nothing_with_receipts() {
    const N: usize = 5_000;
    for receipts in [false, true] {
        let mut broker = Mosquitto::plain().await;
        let url = broker.url();
        let cdir = tempfile::tempdir().unwrap();
        let ccfg = consumer_config("line1", &url, cdir.path(), "e2e/#");
        Consumer::register(&ccfg).await.unwrap();
        let pdir = tempfile::tempdir().unwrap();
        let pcfg = if receipts {
            producer("gw", &url, pdir.path(), Duration::from_secs(2))
        } else {
            config("gw", &url, pdir.path())
        };
        let p = open(pcfg).await;
        // All accepted before waiting for the outbox to empty.
        enqueue(&p, N).await;
        if receipts {
            status_until(&p, "all acknowledged, awaiting receipts", Duration::from_secs(30), |s| {
                s.receipts.awaiting == N as u64
            })
            .await;
        } else {
            tokio::time::timeout(Duration::from_secs(30), p.wait_idle()).await.expect("all acknowledged");
        }
        // The broker acknowledged everything; it dies before anyone took
        // a message, and comes back with nothing.
        broker.restart().await;
        let c = Consumer::open(ccfg.clone()).await.unwrap().0;
        if !receipts {
            // Subscribed again (the broker forgot the session too): a
            // message published now is the first and only one to arrive.
            let up = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                p.publish(Message::new("e2e/t", "after")).await.unwrap().delivered().await.unwrap();
                if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), c.next()).await {
                    assert_eq!(d.payload(), b"after", "without receipts, nothing acknowledged before the crash comes");
                    d.ack();
                    break;
                }
                assert!(tokio::time::Instant::now() < up, "the consumer never subscribed again");
            }
            p.close().await;
            c.close().await;
            continue;
        }
        let seen = handle(&c, N, Duration::from_secs(60)).await;
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "handed over twice: {twice:?}");
        status_until(&p, "every message handled", Duration::from_secs(30), |s| s.queued == 0).await;
        let s = p.status().await.unwrap();
        assert_eq!((s.receipts.awaiting, s.receipts.handled), (0, N as u64), "{:?}", s.receipts);
        assert!(s.receipts.republished >= N as u64, "{:?}", s.receipts);
        assert_eq!(c.stats().await.unwrap().handled, N as u64);
        let mut events = p.events();
        let mut announced = 0;
        while let Ok(e) = events.try_recv() {
            if let steadfast::Event::Republished { messages } = e {
                announced += messages;
            }
        }
        assert_eq!(announced, s.receipts.republished, "every resend announced");
        p.close().await;
        c.close().await;
    }
}

/// Receipts lost on their way back (the broker's ACL refuses them): the
/// messages are published again until a receipt gets through, and the
/// consumer's inbox hands each over once, answering every copy with a
/// receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_lost_on_the_way_back_mean_resends_handled_once() {
    const N: usize = 300;
    // Anonymous clients may publish and read the messages and read
    // receipts, but not publish receipts.
    let mut broker = Mosquitto::with_acl("topic readwrite e2e/#\ntopic read steadfast/receipts/#\n", vec![]).await;
    let url = broker.url();
    let cdir = tempfile::tempdir().unwrap();
    let c = Consumer::open(consumer_config("line1", &url, cdir.path(), "e2e/#")).await.unwrap().0;
    let pdir = tempfile::tempdir().unwrap();
    let p = open(producer("gw", &url, pdir.path(), Duration::from_millis(1500))).await;
    // The consumer's session is up once a message gets through.
    let probe = p.publish(Message::new("e2e/probe", "probe").without_receipts()).await.unwrap();
    probe.delivered().await.unwrap();
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(p.publish(Message::new("e2e/t", format!("m-{i:04}"))).await.unwrap());
    }
    let mut seen = handle(&c, N + 1, Duration::from_secs(30)).await;
    // Published again for lack of a receipt: the inbox removes the copies.
    status_until(&p, "a first resend", Duration::from_secs(20), |s| s.receipts.republished >= N as u64).await;
    let dups = async {
        loop {
            if c.stats().await.unwrap().duplicates >= N as u64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), dups).await.expect("the resent copies were removed as duplicates");
    assert_eq!(p.status().await.unwrap().receipts.handled, 0, "no receipt got through yet");
    // Receipts may pass from now on.
    broker.set_acl("topic readwrite e2e/#\ntopic readwrite steadfast/receipts/#\n");
    status_until(&p, "every message handled", Duration::from_secs(30), |s| s.queued == 0).await;
    for r in receipts {
        assert_eq!(r.handled().await.unwrap(), Handling::Handled(vec!["line1".into()]));
    }
    // Nothing more comes: every copy was removed by the inbox.
    while let Some(d) = c.try_next() {
        *seen.entry(String::from_utf8(d.payload().to_vec()).unwrap()).or_default() += 1;
        d.ack();
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "handed over twice: {twice:?}");
    p.close().await;
    c.close().await;
}

/// MQTT 3.1.1 carries the request in the payload envelope; the consumer
/// derives the receipts topic from the producer id. A message that asks
/// for receipts from all of two named consumers is handled only once both
/// sent one, and says who did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_3_1_1_a_message_waits_for_every_consumer_it_names() {
    let broker = Mosquitto::plain().await;
    let url = broker.url();
    let v311 = |cfg: ClientConfig| cfg.version(ProtocolVersion::V311).envelope(true);
    let (adir, bdir, pdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ccfg = |id: &str, dir: &Path| {
        let client = v311(config(id, &url, dir).keep_alive(Duration::from_secs(5)));
        ConsumerConfig::new(client).topic("e2e/#", Qos::AtLeastOnce)
    };
    let a = Consumer::open(ccfg("a", adir.path()).receipt_as("archive")).await.unwrap().0;
    let b = Consumer::open(ccfg("b", bdir.path()).receipt_as("billing")).await.unwrap().0;
    let rule = ReceiptRule {
        timeout: Duration::from_secs(30),
        need: Need::All,
        from: vec!["archive".into(), "billing".into()],
    };
    let p = open(v311(config("gw", &url, pdir.path())).receipts(rule)).await;
    // Both sessions are up once a message reaches both.
    loop {
        p.publish(Message::new("e2e/probe", "probe").without_receipts()).await.unwrap().delivered().await.unwrap();
        let got_a = tokio::time::timeout(Duration::from_millis(300), a.next()).await;
        let got_b = tokio::time::timeout(Duration::from_millis(300), b.next()).await;
        let up = matches!((&got_a, &got_b), (Ok(Some(_)), Ok(Some(_))));
        for d in [got_a, got_b].into_iter().flatten().flatten() {
            d.ack();
        }
        if up {
            break;
        }
    }
    let r = p.publish(Message::new("e2e/t", "21.5")).await.unwrap();
    assert!(r.awaits_receipts());
    let first = handle(&a, 1, Duration::from_secs(10)).await;
    assert_eq!(first.keys().collect::<Vec<_>>(), ["21.5"], "the envelope is unwrapped for the application");
    status_until(&p, "delivered, one receipt of two", Duration::from_secs(10), |s| {
        s.receipts.counted == 1 && s.receipts.awaiting == 1
    })
    .await;
    handle(&b, 1, Duration::from_secs(10)).await;
    let handled = tokio::time::timeout(Duration::from_secs(10), r.handled()).await.expect("handled in time").unwrap();
    assert_eq!(handled, Handling::Handled(vec!["archive".into(), "billing".into()]));
    assert_eq!(p.status().await.unwrap().queued, 0);
    p.close().await;
    a.close().await;
    b.close().await;
}

fn set(urls: &[String]) -> BrokerSet {
    BrokerSet::new(urls.iter().map(|u| u.parse().unwrap()))
}

/// Failover: the primary acknowledges every message while the consumer is
/// away and dies with them; the messages go out again through the backup,
/// whose receipts count, and each is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_failover_what_a_dead_primary_acknowledged_is_handled_through_the_backup() {
    const N: usize = 1_000;
    let mut a = Mosquitto::plain().await;
    let b = Mosquitto::start(MosquittoOptions { persistence: true, extra: vec![] }).await;
    let urls = [a.url(), b.url()];
    let cdir = tempfile::tempdir().unwrap();
    let ccfg = consumer_on("line1", &urls, cdir.path(), "e2e/#");
    Consumer::register(&ccfg).await.unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let pcfg = producer("gw", &urls[0], pdir.path(), Duration::from_secs(2)).brokers(set(&urls));
    let p = open(pcfg).await;
    enqueue(&p, N).await;
    status_until(&p, "all acknowledged by the primary", Duration::from_secs(30), |s| {
        s.receipts.awaiting == N as u64 && s.brokers[0].acked >= N as u64
    })
    .await;
    // The primary dies with everything it acknowledged and stays away.
    a.kill9();
    let c = Consumer::open(ccfg).await.unwrap().0;
    let seen = handle(&c, N, Duration::from_secs(60)).await;
    assert!(seen.values().all(|n| *n == 1), "each handed over once");
    status_until(&p, "every message handled", Duration::from_secs(30), |s| s.queued == 0).await;
    let s = p.status().await.unwrap();
    assert_eq!(s.receipts.handled, N as u64, "{:?}", s.receipts);
    assert!(s.brokers[1].acked >= N as u64, "sent again through the backup: {:?}", s.brokers[1]);
    p.close().await;
    c.close().await;
}

/// Fanout to two brokers, one of them killed after both acknowledged: the
/// consumer gets every message through the other, and a receipt through
/// either broker completes a message; nothing is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fanout_a_receipt_through_the_surviving_broker_completes_the_message() {
    const N: usize = 1_000;
    let mut a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let urls = [a.url(), b.url()];
    let cdir = tempfile::tempdir().unwrap();
    let ccfg = consumer_on("line1", &urls, cdir.path(), "e2e/#");
    Consumer::register(&ccfg).await.unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let fanout = set(&urls).mode(steadfast::Mode::Fanout).ack(steadfast::AckQuorum::All);
    let p = open(producer("gw", &urls[0], pdir.path(), Duration::from_secs(60)).brokers(fanout)).await;
    enqueue(&p, N).await;
    status_until(&p, "all acknowledged by both", Duration::from_secs(30), |s| s.receipts.awaiting == N as u64).await;
    a.kill9();
    let c = Consumer::open(ccfg).await.unwrap().0;
    let seen = handle(&c, N, Duration::from_secs(30)).await;
    assert!(seen.values().all(|n| *n == 1), "each handed over once");
    status_until(&p, "every message handled", Duration::from_secs(30), |s| s.queued == 0).await;
    let s = p.status().await.unwrap();
    assert_eq!((s.receipts.handled, s.receipts.republished), (N as u64, 0), "{:?}", s.receipts);
    p.close().await;
    c.close().await;
}

/// A route from `local` to `upstream` for `e2e/#`, its stores under `dir`;
/// `inbox`: the source keeps one (as with several source brokers).
fn route(local: &str, upstream: &str, dir: &Path, inbox: bool, v311: bool) -> Route {
    let (outbox, inbox_dir) = route_dirs(dir, "up");
    let source = ConsumerConfig::new(config("br", local, &inbox_dir)).topic("e2e/#", Qos::AtLeastOnce).inbox(inbox);
    let mut destination = config("br-out", upstream, &outbox);
    if v311 {
        destination = destination.version(ProtocolVersion::V311).envelope(true);
    }
    Route::new("up", source, destination)
}

async fn start_bridge(route: &Route, dir: &Path) -> RunningBridge {
    Consumer::register(&route.source).await.unwrap();
    Bridge { dir: dir.to_owned(), routes: vec![route.clone()] }.start().await.unwrap()
}

/// Through a bridge: the upstream broker acknowledges every message the
/// route passed on while the consumer is away, and is killed. The producer
/// behind the bridge publishes again for lack of receipts, the route passes
/// the copies on (with an inbox of its own too, which knows them), the
/// consumer handles each once and its receipts come back through the route.
/// Once over MQTT 5, once over MQTT 3.1.1 with the envelope upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_bridge_what_an_upstream_broker_forgot_is_handled_once() {
    const N: usize = 1_000;
    for (inbox, v311) in [(false, false), (true, true)] {
        let local = Mosquitto::plain().await;
        let mut upstream = Mosquitto::plain().await;
        let (bdir, cdir, pdir) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut ccfg = consumer_config("line1", &upstream.url(), cdir.path(), "e2e/#");
        if v311 {
            let client = ccfg.client().clone().version(ProtocolVersion::V311).envelope(true);
            ccfg = ConsumerConfig::new(client).topic("e2e/#", Qos::AtLeastOnce);
        }
        Consumer::register(&ccfg).await.unwrap();
        let route = route(&local.url(), &upstream.url(), bdir.path(), inbox, v311);
        let bridge = start_bridge(&route, bdir.path()).await;
        let p = open(producer("gw", &local.url(), pdir.path(), Duration::from_secs(2))).await;
        enqueue(&p, N).await;
        status_until(&p, "all acknowledged by the local broker", Duration::from_secs(30), |s| {
            s.receipts.awaiting == N as u64
        })
        .await;
        status_until(&bridge.clients()[0], "all passed upstream", Duration::from_secs(30), |s| {
            s.brokers[0].acked >= N as u64 && s.queued == 0
        })
        .await;
        upstream.restart().await;
        let c = Consumer::open(ccfg).await.unwrap().0;
        let seen = handle(&c, N, Duration::from_secs(120)).await;
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "handed over twice: {twice:?}");
        status_until(&p, "every message handled", Duration::from_secs(60), |s| s.queued == 0).await;
        let s = p.status().await.unwrap().receipts;
        assert_eq!(s.handled, N as u64, "{s:?}");
        assert!(s.republished >= N as u64, "the upstream broker forgot them all: {s:?}");
        let r = bridge.clients()[0].status().await.unwrap().receipts;
        assert!(r.relayed >= 2 * N as u64 && r.returned >= N as u64, "{r:?}");
        assert_eq!(r.awaiting, 0, "the route's own outbox awaits nothing: {r:?}");
        bridge.stop().await;
        p.close().await;
        c.close().await;
    }
}

/// Receipts for what a route passed on before it was restarted come back
/// through the restarted route, without a resend: it remembers whom it
/// relayed for and listens again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_hands_back_receipts_for_what_it_passed_on_before() {
    const N: usize = 200;
    let local = Mosquitto::plain().await;
    let upstream = Mosquitto::start(MosquittoOptions { persistence: true, extra: vec![] }).await;
    let (bdir, cdir, pdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ccfg = consumer_config("line1", &upstream.url(), cdir.path(), "e2e/#");
    Consumer::register(&ccfg).await.unwrap();
    let route = route(&local.url(), &upstream.url(), bdir.path(), false, false);
    let bridge = start_bridge(&route, bdir.path()).await;
    let p = open(producer("gw", &local.url(), pdir.path(), Duration::from_secs(600))).await;
    enqueue(&p, N).await;
    status_until(&p, "all acknowledged", Duration::from_secs(30), |s| s.receipts.awaiting == N as u64).await;
    status_until(&bridge.clients()[0], "all passed upstream", Duration::from_secs(30), |s| {
        s.brokers[0].acked >= N as u64 && s.queued == 0
    })
    .await;
    bridge.stop().await;
    let bridge = Bridge { dir: bdir.path().to_owned(), routes: vec![route] }.start().await.unwrap();
    let c = Consumer::open(ccfg).await.unwrap().0;
    let seen = handle(&c, N, Duration::from_secs(30)).await;
    assert!(seen.values().all(|n| *n == 1), "each handed over once");
    status_until(&p, "every message handled", Duration::from_secs(30), |s| s.queued == 0).await;
    let s = p.status().await.unwrap().receipts;
    assert_eq!((s.handled, s.republished), (N as u64, 0), "{s:?}");
    bridge.stop().await;
    p.close().await;
    c.close().await;
}

/// A route whose source subscription also matches the receipts it hands
/// back does not forward them as messages: they would come back to its
/// own receipts listener and go round for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_does_not_forward_the_receipts_it_hands_back() {
    const N: usize = 100;
    let local = Mosquitto::plain().await;
    let upstream = Mosquitto::plain().await;
    let (bdir, cdir, pdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c = Consumer::open(consumer_config("line1", &upstream.url(), cdir.path(), "e2e/#")).await.unwrap().0;
    let mut route = route(&local.url(), &upstream.url(), bdir.path(), false, false);
    route.source = route.source.topic("steadfast/#", Qos::AtLeastOnce);
    let bridge = start_bridge(&route, bdir.path()).await;
    let p = open(producer("gw", &local.url(), pdir.path(), Duration::from_secs(30))).await;
    // The consumer's session is up once a message gets through.
    loop {
        p.publish(Message::new("e2e/probe", "probe").without_receipts()).await.unwrap().delivered().await.unwrap();
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
            d.ack();
            break;
        }
    }
    enqueue(&p, N).await;
    handle(&c, N, Duration::from_secs(30)).await;
    status_until(&p, "every message handled", Duration::from_secs(30), |s| s.queued == 0).await;
    let upstream_acked = |s: &steadfast::Status| s.brokers[0].acked;
    let before = upstream_acked(&bridge.clients()[0].status().await.unwrap());
    assert_eq!(before, N as u64 + 1, "the messages and the probe went upstream, no receipt");
    // A loop would forward each handed-back receipt upstream again within
    // a round trip; two seconds is many of them.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let now = upstream_acked(&bridge.clients()[0].status().await.unwrap());
        assert_eq!(now, before, "the route forwarded receipts it handed back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = bridge.clients()[0].status().await.unwrap().receipts;
    assert!(r.returned >= N as u64, "{r:?}");
    bridge.stop().await;
    p.close().await;
    c.close().await;
}
