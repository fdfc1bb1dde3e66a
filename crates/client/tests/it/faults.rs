//! Faults: links reset and black-holed, brokers terminated and killed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use steadfast::{Client, ConnectError, Event, LinkState, Message};
use steadfast_testkit::{wait_until, FaultProxy, Mosquitto, MosquittoOptions, ProxyMode, Subscriber};
use tokio::sync::broadcast;

use crate::{assert_all_in_order, config, next_event, open, payloads};

fn persistent() -> MosquittoOptions {
    MosquittoOptions { persistence: true, extra: vec![] }
}

async fn dead_link(events: &mut broadcast::Receiver<Event>) {
    let dead = |e: &Event| matches!(e, Event::Disconnected { error: ConnectError::DeadLink(_), .. }).then_some(());
    next_event(events, "dead link", Duration::from_secs(20), dead).await
}

/// A silent link found dead: by the keep-alive, or, with messages in
/// flight, by the ack timeout (adaptive by default: usually first).
async fn found_dead(events: &mut broadcast::Receiver<Event>) {
    let dead = |e: &Event| {
        matches!(e, Event::Disconnected { error: ConnectError::DeadLink(_) | ConnectError::AckTimeout(_), .. })
            .then_some(())
    };
    next_event(events, "dead link or ack timeout", Duration::from_secs(20), dead).await
}

async fn connected(events: &mut broadcast::Receiver<Event>) -> bool {
    next_event(events, "Connected", Duration::from_secs(30), |e| match e {
        Event::Connected { session_present, .. } => Some(*session_present),
        _ => None,
    })
    .await
}

async fn enqueue_all(c: &Client, topic: &str, msgs: &[String]) {
    let mut pending = Vec::new();
    for m in msgs {
        pending.push(c.enqueue(Message::new(topic, m.clone())).unwrap());
    }
    for p in pending {
        p.await.unwrap();
    }
}

async fn idle(c: &Client, limit: Duration) {
    tokio::time::timeout(limit, c.wait_idle()).await.expect("outbox did not drain in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_survive_resets_black_holes_and_broker_restarts() {
    let mut broker = Mosquitto::start(persistent()).await;
    let sub = Subscriber::start(broker.port(), "chaos", 1, Some("chaos-sub")).await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("chaos-pub", &proxy.url(), dir.path())
        .keep_alive(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2));
    let c = open(cfg).await;
    let mut events = c.events();
    connected(&mut events).await;
    let want = payloads("c", 10_000);
    let mut faults_done = 0;
    for (i, batch) in want.chunks(1000).enumerate() {
        enqueue_all(&c, "chaos", batch).await;
        if [1, 3, 5, 7, 8].contains(&i) {
            // Every fault hits a new, live link with messages flowing (not
            // the one the previous fault already broke).
            let c2 = c.clone();
            wait_until("reconnected after the last fault", Duration::from_secs(30), move || {
                let s = &c2.broker_status()[0];
                s.state == LinkState::Connected && s.connects > faults_done
            })
            .await;
            faults_done += 1;
        }
        match i {
            1 | 7 => proxy.reset_connections(),
            3 => {
                proxy.set(ProxyMode::BlackHole);
                found_dead(&mut events).await;
                proxy.set(ProxyMode::Pass);
            }
            5 | 8 => {
                broker.terminate();
                broker.restart().await;
            }
            _ => {}
        }
    }
    idle(&c, Duration::from_secs(90)).await;
    sub.wait_all(&want, Duration::from_secs(60)).await;
    assert_all_in_order(&sub.lines(), &want);
    let st = c.status().await.unwrap();
    assert_eq!(st.queued, 0);
    assert!(st.drops.iter().all(|(_, n)| *n == 0), "{:?}", st.drops);
    assert!(st.brokers[0].connects >= 6, "{:?}", st.brokers[0]);
    c.close().await;
}

/// The expected set comes from the wire, not from the outbox under test: a
/// client that forgot in-flight messages at the disconnect would shrink
/// its own outbox, never the proxy's record of what the broker took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_broker_every_message_it_did_not_acknowledge_reaches_a_subscriber() {
    let mut broker = Mosquitto::start(persistent()).await;
    let first_sub = Subscriber::start(broker.port(), "k9", 1, None).await;
    let proxy = FaultProxy::start_tapped(broker.port()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("k9-pub", &proxy.url(), dir.path()).keep_alive(Duration::from_secs(2));
    let c = open(cfg).await;
    let mut events = c.events();
    connected(&mut events).await;
    let want = payloads("k", 20_000);
    let mut pending = Vec::new();
    for m in &want {
        pending.push(c.enqueue(Message::new("k9", m.clone())).unwrap());
    }
    first_sub.wait_count(300, Duration::from_secs(30)).await;
    broker.kill9();
    proxy.set(ProxyMode::Reset);
    next_event(&mut events, "Disconnected", Duration::from_secs(30), |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;
    for p in pending {
        p.await.unwrap();
    }
    // What the dead broker acknowledged on the wire it may have lost with
    // its memory (no client can resend that: docs/guarantees.md). Every
    // other accepted message must reach a subscriber.
    let acknowledged: HashSet<String> =
        proxy.acknowledged().into_iter().map(|p| String::from_utf8(p).unwrap()).collect();
    let owed: Vec<String> = want.iter().filter(|m| !acknowledged.contains(*m)).cloned().collect();
    assert!(!owed.is_empty(), "the kill came after everything was acknowledged; nothing to show");
    broker.restart().await;
    let second_sub = Subscriber::start(broker.port(), "k9", 1, None).await;
    proxy.set(ProxyMode::Pass);
    idle(&c, Duration::from_secs(60)).await;
    wait_until("every message the broker had not acknowledged at a subscriber", Duration::from_secs(30), || {
        let got: HashSet<String> = first_sub.lines().into_iter().chain(second_sub.lines()).collect();
        owed.iter().all(|m| got.contains(m))
    })
    .await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_the_session_gets_every_in_flight_message_again() {
    let mut broker = Mosquitto::plain().await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("sp0-pub", &proxy.url(), dir.path())
        .keep_alive(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2));
    let c = open(cfg).await;
    let mut events = c.events();
    assert!(!connected(&mut events).await, "a new session cannot be present");
    proxy.set(ProxyMode::BlackHole);
    let want = payloads("s", 100);
    enqueue_all(&c, "sp0", &want).await;
    let c2 = c.clone();
    wait_until("messages in flight", Duration::from_secs(10), move || c2.broker_status()[0].inflight > 0).await;
    broker.kill9();
    broker.restart().await;
    let sub = Subscriber::start(broker.port(), "sp0", 1, None).await;
    proxy.set(ProxyMode::Pass);
    proxy.reset_connections();
    assert!(!connected(&mut events).await, "a restarted broker without persistence has no session");
    idle(&c, Duration::from_secs(30)).await;
    sub.wait_all(&want, Duration::from_secs(30)).await;
    assert!(c.broker_status()[0].sessions_lost >= 1);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_link_is_detected_within_the_keep_alive_window() {
    let broker = Mosquitto::plain().await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keep_alive = Duration::from_secs(2);
    // The ack timeout set long: the keep-alive alone is under test here
    // (routing.rs shows the adaptive ack timeout finding it sooner).
    let cfg = config("bh-pub", &proxy.url(), dir.path())
        .keep_alive(keep_alive)
        .ack_timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(2));
    let c = open(cfg).await;
    let mut events = c.events();
    connected(&mut events).await;
    // Busy publishing does not hide the silence.
    let feeder = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                let _ = c.enqueue(Message::new("bh", format!("{i}")));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    proxy.set(ProxyMode::BlackHole);
    let t0 = Instant::now();
    dead_link(&mut events).await;
    let detected = t0.elapsed();
    assert!(detected <= keep_alive + Duration::from_millis(750), "dead link noticed after {detected:?}");
    proxy.set(ProxyMode::Pass);
    connected(&mut events).await;
    feeder.await.unwrap();
    idle(&c, Duration::from_secs(30)).await;
    c.close().await;
}
