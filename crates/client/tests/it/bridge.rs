//! The bridge as a library feature: a program builds one in code and runs
//! it, without the CLI.

use std::collections::HashSet;
use std::time::Duration;

use steadfast::bridge::{route_dirs, Bridge, Rewrite, Route};
use steadfast::{ConsumerConfig, Message, Qos};
use steadfast_testkit::{Mosquitto, Subscriber};

use crate::{config, open, payloads};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_runs_a_bridge_built_in_code() {
    let local = Mosquitto::plain().await;
    let upstream = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let (outbox, inbox) = route_dirs(dir.path(), "up");
    let source = ConsumerConfig::new(config("lib-bridge", &local.url(), &inbox)).topic("sensors/#", Qos::AtLeastOnce);
    let destination = config("lib-bridge-up", &upstream.url(), &outbox);
    let rewrite = Rewrite::new().map("sensors/+/temp", "t/{1}").unwrap().prefix("site-7/").unwrap();
    let route = Route::new("up", source.clone(), destination).rewrite(rewrite);
    // Its session exists before anything is published (as `--register`).
    steadfast::Consumer::register(&source).await.unwrap();
    let bridge = Bridge { dir: dir.path().to_owned(), routes: vec![route] }.start().await.unwrap();
    let sub = Subscriber::start(upstream.port(), "site-7/#", 1, None).await;
    let pdir = tempfile::tempdir().unwrap();
    let producer = open(config("lib-bridge-producer", &local.url(), pdir.path())).await;
    let want = payloads("b", 500);
    for (i, p) in want.iter().enumerate() {
        let topic = if i % 2 == 0 { format!("sensors/k{i}/temp") } else { "sensors/other".to_owned() };
        producer.enqueue(Message::new(topic, p.clone())).unwrap();
    }
    producer.wait_idle().await;
    sub.wait_all(&want, Duration::from_secs(30)).await;
    assert_eq!(sub.lines().iter().collect::<HashSet<_>>().len(), 500);
    // The route's destination client is the program's to watch: once idle,
    // upstream acknowledged everything.
    tokio::time::timeout(Duration::from_secs(30), bridge.clients()[0].wait_idle()).await.expect("route idle");
    bridge.stop().await;
    producer.close().await;
    // Nothing is left in the route's outbox: all of it went upstream.
    let (mut store, _) = steadfast_store::SqliteStore::open(&outbox).unwrap();
    assert_eq!(steadfast_store::Report::read(&mut store).unwrap().totals.count, 0);
}
