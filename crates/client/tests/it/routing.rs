//! Several brokers: failover with fail-back, fanout with a quorum, balance,
//! per-message routes; real Mosquitto brokers killed, stopped and
//! black-holed under a steady publisher.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use steadfast::{
    AckQuorum, BrokerSet, Client, ClientConfig, Event, Identity, Message, Mode, OtherSets, ProtocolVersion,
};
use steadfast_testkit::{FaultProxy, Mosquitto, MosquittoOptions, ProxyMode, Reply, ScriptedBroker, Subscriber};
use tokio::sync::broadcast;

use crate::{config, next_event, open, payloads};

fn persistent() -> MosquittoOptions {
    MosquittoOptions { persistence: true, extra: vec![] }
}

fn set(urls: &[String]) -> BrokerSet {
    BrokerSet::new(urls.iter().map(|u| u.parse().expect("url")))
}

/// A client over `set`, with short timeouts so faults show quickly.
fn routed(id: &str, set: BrokerSet, dir: &std::path::Path) -> ClientConfig {
    let first = set.brokers()[0].to_string();
    config(id, &first, dir)
        .brokers(set)
        .keep_alive(Duration::from_secs(2))
        .ack_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
}

/// Publishes `msgs` at a steady pace (a batch every 20 ms), each accepted
/// before the next batch.
async fn publish_steadily(c: &Client, topic: &str, msgs: &[String]) {
    for batch in msgs.chunks(20) {
        let pending: Vec<_> = batch.iter().map(|m| c.enqueue(Message::new(topic, m.clone())).unwrap()).collect();
        for p in pending {
            p.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The client's status once `cond` holds (within 10 s).
async fn status_when(c: &Client, what: &str, cond: impl Fn(&steadfast::Status) -> bool) -> steadfast::Status {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = c.status().await.unwrap();
        if cond(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s; status {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn idle(c: &Client, limit: Duration) {
    tokio::time::timeout(limit, c.wait_idle()).await.expect("outbox did not drain in time");
}

/// Every one of `want` arrived at one of the subscribers at least once.
async fn assert_union_has_all(subs: &[&Subscriber], want: &[String], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let seen: HashSet<String> = subs.iter().flat_map(|s| s.lines()).collect();
        let missing: Vec<&String> = want.iter().filter(|w| !seen.contains(*w)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} messages reached no broker, first: {:?}",
            missing.len(),
            want.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `n` sessions came up.
async fn connected_to(events: &mut broadcast::Receiver<Event>, n: u32) {
    let mut up = 0;
    next_event(events, "Connected", Duration::from_secs(10), move |e| {
        up += matches!(e, Event::Connected { .. }) as u32;
        (up == n).then_some(())
    })
    .await
}

/// A balance client over `a` and `b`, once both are connected.
async fn balanced(id: &str, a: &Mosquitto, b: &Mosquitto, dir: &std::path::Path) -> Client {
    let c = open(routed(id, set(&[a.url(), b.url()]).mode(Mode::Balance), dir)).await;
    connected_to(&mut c.events(), 2).await;
    c
}

async fn failover_event(events: &mut broadcast::Receiver<Event>, limit: Duration) -> (String, Option<String>) {
    next_event(events, "Failover", limit, |e| match e {
        Event::Failover { from, to, .. } => Some((from.clone(), to.clone())),
        _ => None,
    })
    .await
}

async fn failback_event(events: &mut broadcast::Receiver<Event>, limit: Duration) -> (String, String) {
    next_event(events, "Failback", limit, |e| match e {
        Event::Failback { from, to, .. } => Some((from.clone(), to.clone())),
        _ => None,
    })
    .await
}

async fn failover_and_back(kill: bool) {
    let mut a = Mosquitto::start(persistent()).await;
    let b = Mosquitto::start(persistent()).await;
    let tag = if kill { "k" } else { "t" };
    let sub_a = Subscriber::start(a.port(), "fo", 1, Some(&format!("fo-sub-a-{tag}"))).await;
    let sub_b = Subscriber::start(b.port(), "fo", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let s = set(&[a.url(), b.url()]).failback_after(Duration::from_secs(2));
    let c = open(routed(&format!("fo-pub-{tag}"), s, dir.path())).await;
    let mut events = c.events();
    let want = payloads(&format!("fo{tag}"), 1500);
    publish_steadily(&c, "fo", &want[..300]).await;
    sub_a.wait_count(200, Duration::from_secs(10)).await;
    assert_eq!(sub_b.count(), 0, "the backup gets nothing while the primary is healthy");
    if kill {
        a.kill9();
    } else {
        a.terminate();
    }
    let (from, to) = failover_event(&mut events, Duration::from_secs(10)).await;
    assert_eq!((from, to), (a.url(), Some(b.url())));
    publish_steadily(&c, "fo", &want[300..800]).await;
    sub_b.wait_count(400, Duration::from_secs(10)).await;
    a.restart().await;
    // After a kill -9 the primary comes back empty: its subscriber's session
    // is gone until mosquitto_sub reconnects at its own pace. A second
    // subscriber, in place before traffic returns, sees what follows.
    let sub_a2 = Subscriber::start(a.port(), "fo", 1, None).await;
    let (from, to) = failback_event(&mut events, Duration::from_secs(20)).await;
    assert_eq!((from, to), (b.url(), a.url()));
    let on_b = sub_b.count();
    publish_steadily(&c, "fo", &want[800..]).await;
    idle(&c, Duration::from_secs(20)).await;
    // After the fail-back, new traffic goes to the primary again.
    let last = want.last().unwrap();
    sub_a2.wait_all(std::slice::from_ref(last), Duration::from_secs(10)).await;
    assert!(sub_b.count() <= on_b + 50, "the backup kept getting traffic after the fail-back");
    assert_union_has_all(&[&sub_a, &sub_a2, &sub_b], &want, Duration::from_secs(20)).await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_primary_stop_and_fail_back_after_it_stayed_healthy() {
    failover_and_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_primary_kill9_resends_what_it_had_not_acknowledged() {
    failover_and_back(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_primary_is_detected_by_the_ack_timeout_and_traffic_moves() {
    let a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let proxy = FaultProxy::start(a.port()).await.unwrap();
    let sub_a = Subscriber::start(a.port(), "bh", 1, None).await;
    let sub_b = Subscriber::start(b.port(), "bh", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = routed("bh-pub", set(&[proxy.url(), b.url()]), dir.path()).keep_alive(Duration::from_secs(30));
    let c = open(cfg).await;
    let mut events = c.events();
    let want = payloads("bh", 600);
    publish_steadily(&c, "bh", &want[..200]).await;
    sub_a.wait_count(150, Duration::from_secs(10)).await;
    proxy.set(ProxyMode::BlackHole);
    let started = Instant::now();
    publish_steadily(&c, "bh", &want[200..]).await;
    let (from, _) = failover_event(&mut events, Duration::from_secs(10)).await;
    assert_eq!(from, proxy.url());
    // Keep-alive is 30 s here: only the ack timeout (2 s) can have seen it.
    assert!(started.elapsed() < Duration::from_secs(8), "failover took {:?}", started.elapsed());
    idle(&c, Duration::from_secs(20)).await;
    assert_union_has_all(&[&sub_a, &sub_b], &want, Duration::from_secs(10)).await;
    c.close().await;
}

/// A failover pair whose primary is behind a fault proxy, a subscriber on
/// each broker, and a client with every timeout left at its default except
/// the keep-alive (30 s): only the ack timeout can notice a black hole.
/// Bind every field by name (`_brokers`, `_dir` too): `..` would drop the
/// brokers and the outbox at once.
struct ProxiedPair {
    _brokers: (Mosquitto, Mosquitto),
    proxy: FaultProxy,
    sub_a: Subscriber,
    sub_b: Subscriber,
    _dir: tempfile::TempDir,
    c: Client,
}

impl ProxiedPair {
    async fn start(topic: &str) -> ProxiedPair {
        let a = Mosquitto::plain().await;
        let b = Mosquitto::plain().await;
        let proxy = FaultProxy::start(a.port()).await.unwrap();
        let sub_a = Subscriber::start(a.port(), topic, 1, None).await;
        let sub_b = Subscriber::start(b.port(), topic, 1, None).await;
        let dir = tempfile::tempdir().unwrap();
        let urls = [proxy.url(), b.url()];
        let cfg = config(&format!("{topic}-pub"), &urls[0], dir.path())
            .brokers(set(&urls))
            .keep_alive(Duration::from_secs(30));
        let c = open(cfg).await;
        ProxiedPair { _brokers: (a, b), proxy, sub_a, sub_b, _dir: dir, c }
    }
}

/// The default ack timeout follows the round trips measured on the link:
/// on loopback it sits at its 750 ms floor, so a black hole under load is
/// left within a second of silence, not after the 15 s of a fixed default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_default_settings_a_black_holed_primary_is_left_within_a_second_or_so() {
    let ProxiedPair { _brokers, proxy, sub_a, sub_b, _dir, c } = ProxiedPair::start("adapt").await;
    let mut events = c.events();
    let want = payloads("adapt", 600);
    publish_steadily(&c, "adapt", &want[..200]).await;
    sub_a.wait_count(150, Duration::from_secs(10)).await;
    let primary = c.broker_status().remove(0);
    assert_eq!(primary.ack_timeout, Duration::from_millis(750), "loopback round trips: the floor; {primary:?}");
    assert!(primary.round_trip.is_some_and(|(rt, _)| rt < Duration::from_millis(100)), "{primary:?}");
    proxy.set(ProxyMode::BlackHole);
    let silent = Instant::now();
    let publisher = {
        let (c, rest) = (c.clone(), want[200..].to_vec());
        tokio::spawn(async move { publish_steadily(&c, "adapt", &rest).await })
    };
    let (from, _) = failover_event(&mut events, Duration::from_secs(10)).await;
    let took = silent.elapsed();
    assert_eq!(from, proxy.url());
    // 750 ms after the first unanswered send, plus a busy machine's slack.
    assert!(took < Duration::from_secs(2), "failover took {took:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        match c.broker_status()[0].last_error.clone() {
            Some(e) => break e,
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
            None => panic!("the primary's link error was never recorded"),
        }
    };
    assert!(error.contains("ack timeout"), "{error}");
    publisher.await.unwrap();
    idle(&c, Duration::from_secs(20)).await;
    assert_union_has_all(&[&sub_a, &sub_b], &want, Duration::from_secs(10)).await;
    c.close().await;
}

/// A link that turns slow (250 ms each way, then 4 kB/s) keeps the
/// primary: its acknowledgements still come, and the ack timeout grows with
/// the round trips measured. No reconnect, nothing to the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_turns_slow_is_not_taken_for_a_dead_one() {
    let ProxiedPair { _brokers, proxy, sub_a, sub_b, _dir, c } = ProxiedPair::start("slow").await;
    connected_to(&mut c.events(), 1).await;
    let want = payloads("slow", 600);
    publish_steadily(&c, "slow", &want[..200]).await;
    // At the jump nothing comes back for two latencies (500 ms), under
    // the timeout's floor; then the samples raise the timeout.
    proxy.set(ProxyMode::Latency(Duration::from_millis(250)));
    publish_steadily(&c, "slow", &want[200..400]).await;
    idle(&c, Duration::from_secs(60)).await;
    let slow = c.broker_status().remove(0);
    let measured = slow.round_trip.map(|(rt, _)| rt).unwrap_or_default();
    assert!(measured > Duration::from_millis(100), "the round trips measured follow the latency: {slow:?}");
    proxy.set(ProxyMode::Bandwidth(4_000));
    publish_steadily(&c, "slow", &want[400..]).await;
    idle(&c, Duration::from_secs(60)).await;
    let primary = c.broker_status().remove(0);
    assert_eq!((primary.connects, primary.last_error.as_deref()), (1, None), "{primary:?}");
    assert_eq!(sub_b.count(), 0, "nothing went to the backup");
    sub_a.wait_all(&want, Duration::from_secs(10)).await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_all_catches_a_broker_up_after_it_comes_back() {
    let a = Mosquitto::start(persistent()).await;
    let mut b = Mosquitto::start(persistent()).await;
    let sub_a = Subscriber::start(a.port(), "fan", 1, None).await;
    let sub_b = Subscriber::start(b.port(), "fan", 1, Some("fan-sub-b")).await;
    let dir = tempfile::tempdir().unwrap();
    let s = set(&[a.url(), b.url()]).mode(Mode::Fanout).ack(AckQuorum::All);
    let c = open(routed("fan-pub", s, dir.path())).await;
    let want = payloads("fan", 1000);
    publish_steadily(&c, "fan", &want[..200]).await;
    b.terminate();
    publish_steadily(&c, "fan", &want[200..]).await;
    sub_a.wait_all(&want, Duration::from_secs(20)).await;
    // A's acknowledgements may still be on their way to the outbox.
    let st = status_when(&c, "A acknowledged everything", |s| s.lag[0] == 0).await;
    assert!(st.queued > 0, "with ack=all, what B lacks stays queued");
    assert_eq!(st.lag[1], st.queued, "B lacks exactly what is queued");
    b.restart().await;
    idle(&c, Duration::from_secs(30)).await;
    sub_b.wait_all(&want, Duration::from_secs(20)).await;
    let st = c.status().await.unwrap();
    assert_eq!((st.queued, st.lag.clone()), (0, vec![0, 0]));
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_any_does_not_wait_for_a_silent_broker() {
    let a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let proxy = FaultProxy::start(b.port()).await.unwrap();
    let sub_a = Subscriber::start(a.port(), "any", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let s = set(&[a.url(), proxy.url()]).mode(Mode::Fanout).ack(AckQuorum::Any);
    let c = open(routed("any-pub", s, dir.path()).ack_timeout(Duration::from_secs(60))).await;
    let mut events = c.events();
    connected_to(&mut events, 2).await;
    proxy.set(ProxyMode::BlackHole);
    let want = payloads("any", 500);
    publish_steadily(&c, "any", &want).await;
    // B acknowledges nothing (and its 60 s ack timeout is far away): the
    // outbox drains through A alone.
    idle(&c, Duration::from_secs(15)).await;
    sub_a.wait_all(&want, Duration::from_secs(10)).await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_every_broker_down_then_one_comes_up() {
    let mut a = Mosquitto::start(persistent()).await;
    let mut b = Mosquitto::start(persistent()).await;
    let sub_b = Subscriber::start(b.port(), "down", 1, Some("down-sub-b")).await;
    a.terminate();
    b.terminate();
    let dir = tempfile::tempdir().unwrap();
    let c = open(routed("down-pub", set(&[a.url(), b.url()]), dir.path())).await;
    let want = payloads("down", 300);
    publish_steadily(&c, "down", &want).await;
    assert_eq!(c.status().await.unwrap().queued, 300, "queued durably while no broker is up");
    b.restart().await;
    idle(&c, Duration::from_secs(30)).await;
    sub_b.wait_all(&want, Duration::from_secs(20)).await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_failing_in_turns_lose_nothing() {
    let mut brokers = Vec::new();
    let mut subs = Vec::new();
    for i in 0..3 {
        let b = Mosquitto::start(persistent()).await;
        subs.push(Subscriber::start(b.port(), "turns", 1, Some(&format!("turns-sub-{i}"))).await);
        brokers.push(b);
    }
    let urls: Vec<String> = brokers.iter().map(|b| b.url()).collect();
    let dir = tempfile::tempdir().unwrap();
    let s = set(&urls).failback_after(Duration::from_secs(1));
    let c = open(routed("turns-pub", s, dir.path()).seed(7)).await;
    // A seeded schedule: each round stops one broker, restarts the one
    // stopped before; at least one broker is up at any time.
    // STEADFAST_SOAK_ROUNDS and STEADFAST_SEED make a longer or another run.
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (rounds, seed) = (env("STEADFAST_SOAK_ROUNDS", 12) as usize, env("STEADFAST_SEED", 0x5eed));
    eprintln!("fault schedule: seed {seed}, {rounds} rounds");
    let want = payloads("turns", rounds * 250);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut down: Option<usize> = None;
    for chunk in want.chunks(250) {
        publish_steadily(&c, "turns", chunk).await;
        if let Some(d) = down.take() {
            brokers[d].restart().await;
        }
        // Stops (SIGTERM: the broker saves its sessions and what it
        // acknowledged). A `kill -9` would also take the subscribers'
        // sessions and what the broker acknowledged but had not delivered:
        // the gap docs/guarantees.md describes, which no client can close;
        // the failover tests cover kill -9 with live subscribers.
        let victim = rng.usize(0..3);
        brokers[victim].terminate();
        down = Some(victim);
    }
    if let Some(d) = down {
        brokers[d].restart().await;
    }
    idle(&c, Duration::from_secs(60)).await;
    let subs: Vec<&Subscriber> = subs.iter().collect();
    assert_union_has_all(&subs, &want, Duration::from_secs(30)).await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_spreads_topics_and_keeps_each_topic_on_one_broker_in_order() {
    let a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let sub_a = Subscriber::start(a.port(), "bal/#", 1, None).await;
    let sub_b = Subscriber::start(b.port(), "bal/#", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let c = balanced("bal-pub", &a, &b, dir.path()).await;
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    for t in 0..8 {
        let topic = format!("bal/{t}");
        let msgs = payloads(&format!("b{t}"), 100);
        for m in &msgs {
            c.enqueue(Message::new(&topic, m.clone())).unwrap();
        }
        want.insert(topic, msgs);
    }
    idle(&c, Duration::from_secs(20)).await;
    let all: Vec<String> = want.values().flatten().cloned().collect();
    assert_union_has_all(&[&sub_a, &sub_b], &all, Duration::from_secs(10)).await;
    let (la, lb) = (sub_a.lines(), sub_b.lines());
    assert!(!la.is_empty() && !lb.is_empty(), "load went to one broker only: {} / {}", la.len(), lb.len());
    for msgs in want.values() {
        let on_a = la.iter().filter(|l| msgs.contains(l)).cloned().collect::<Vec<_>>();
        let on_b = lb.iter().filter(|l| msgs.contains(l)).cloned().collect::<Vec<_>>();
        let (got, other) = if on_a.is_empty() { (on_b, on_a) } else { (on_a, on_b) };
        assert!(other.is_empty(), "a topic was split across brokers");
        assert_eq!(&got, msgs, "a topic's messages arrived out of order");
    }
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_goes_through_the_route_it_names() {
    let home = Mosquitto::plain().await;
    let office = Mosquitto::plain().await;
    let sub_home = Subscriber::start(home.port(), "r", 1, None).await;
    let sub_office = Subscriber::start(office.port(), "r", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("route-pub", &office.url(), dir.path()).route("home", set(&[home.url()]));
    let c = open(cfg).await;
    c.publish(Message::new("r", "to-home").route("home")).await.unwrap().delivered().await.unwrap();
    c.publish(Message::new("r", "to-office")).await.unwrap().delivered().await.unwrap();
    sub_home.wait_all(&["to-home".to_owned()], Duration::from_secs(10)).await;
    sub_office.wait_all(&["to-office".to_owned()], Duration::from_secs(10)).await;
    assert_eq!((sub_home.lines(), sub_office.lines()), (vec!["to-home".to_owned()], vec!["to-office".to_owned()]));
    let Err(e) = c.enqueue(Message::new("r", "x").route("nowhere")) else { panic!("an unknown route was accepted") };
    assert!(e.to_string().contains("no route named `nowhere`"), "{e}");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_carries_the_identity_in_an_envelope_when_asked() {
    let broker = ScriptedBroker::start(false, |_| false, |_, _| Reply::Ack);
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        config("env-pub", &broker.url(), dir.path()).version(ProtocolVersion::V311).envelope(true).producer_id("gw-7");
    let c = open(cfg).await;
    let r = c.publish(Message::new("e", "21.5")).await.unwrap();
    let seq = r.id();
    r.delivered().await.unwrap();
    let got = broker.publishes();
    let (identity, payload) = Identity::unwrap(&got[0].payload).expect("an envelope");
    assert_eq!((identity, payload), (Identity { producer: "gw-7".into(), seq }, &b"21.5"[..]));
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_moves_the_topics_of_a_failed_broker_to_the_others() {
    let mut a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let sub_a = Subscriber::start(a.port(), "balf/#", 1, None).await;
    let sub_b = Subscriber::start(b.port(), "balf/#", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let c = balanced("balf-pub", &a, &b, dir.path()).await;
    let topics: Vec<String> = (0..6).map(|t| format!("balf/{t}")).collect();
    let mut all = Vec::new();
    for round in 0..20 {
        for t in &topics {
            let m = format!("{t}-{round:03}");
            c.enqueue(Message::new(t, m.clone())).unwrap().await.unwrap();
            all.push(m);
        }
        if round == 5 {
            idle(&c, Duration::from_secs(10)).await;
            assert!(sub_a.count() > 0 && sub_b.count() > 0, "both brokers carry topics");
            a.kill9();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    idle(&c, Duration::from_secs(20)).await;
    assert_union_has_all(&[&sub_a, &sub_b], &all, Duration::from_secs(10)).await;
    // After the kill every topic lives on B.
    let late: Vec<&String> = all.iter().filter(|m| m.ends_with("-019")).collect();
    let on_b: HashSet<String> = sub_b.lines().into_iter().collect();
    assert!(late.iter().all(|m| on_b.contains(*m)), "the last round went to the surviving broker");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_holding_messages_of_a_route_no_longer_configured_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("mqtt://127.0.0.1:{}", steadfast_testkit::free_port());
    let cfg = config("gone-route", &nowhere, dir.path()).route("home", set(std::slice::from_ref(&nowhere)));
    let c = open(cfg.clone()).await;
    c.publish(Message::new("t", "for home").route("home")).await.unwrap();
    c.close().await;
    let without = config("gone-route", &nowhere, dir.path());
    let e = Client::open(without).await.unwrap_err().to_string();
    assert!(e.contains("1 message(s) for the route `home`, which is not configured"), "{e}");
    // With the route back, it opens and still holds the message.
    let c = open(cfg).await;
    assert_eq!(c.status().await.unwrap().queued, 1);
    c.close().await;
}

/// G9 in the library: an outbox holding messages accepted for another
/// default broker set refuses to open without a choice; `Keep` leaves them
/// queued (listed by `held`, not waited for), `Retarget` takes them over,
/// and a reserved route name is refused. No broker is needed: nothing here
/// may be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_of_other_brokers_opens_only_with_a_choice() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = ("mqtt://127.0.0.1:1", "mqtt://127.0.0.1:2");
    let c = open(config("sets", a, dir.path())).await;
    c.enqueue(Message::new("for/a", b"x".to_vec())).unwrap().await.unwrap();
    c.close().await;
    let err = Client::open(config("sets", b, dir.path())).await.expect_err("refused without a choice");
    let text = err.to_string();
    assert!(text.contains("1 message(s) accepted for other brokers (mqtt://127.0.0.1:1)"), "{text}");
    assert!(matches!(err, steadfast::OpenError::Config(steadfast::ConfigError::HeldForOtherBrokers { queued: 1, .. })));
    // Kept: listed, never waited for, not sent.
    let c = open(config("sets", b, dir.path()).other_sets(OtherSets::Keep)).await;
    assert_eq!(c.held(), [("mqtt://127.0.0.1:1".to_owned(), 1)]);
    tokio::time::timeout(Duration::from_secs(10), c.wait_idle()).await.expect("held messages are not waited for");
    c.close().await;
    // Back with A's set: its message is its own again.
    let c = open(config("sets", a, dir.path())).await;
    assert!(c.held().is_empty());
    assert_eq!(c.status().await.unwrap().queued, 1);
    c.close().await;
    // Retargeted: B's now, nothing held.
    let c = open(config("sets", b, dir.path()).other_sets(OtherSets::Retarget)).await;
    assert!(c.held().is_empty());
    c.close().await;
    let c = open(config("sets", b, dir.path())).await;
    assert!(c.held().is_empty(), "the message is B's now");
    c.close().await;
    let reserved = config("sets", a, dir.path()).route("@x", set(&[b.to_owned()]));
    let err = Client::open(reserved).await.expect_err("reserved route name");
    assert!(err.to_string().contains("`@x` starts with `@`"), "{err}");
}
