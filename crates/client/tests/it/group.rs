//! Consumer groups with a shared inbox on PostgreSQL (the `postgres`
//! feature; the workspace's test run has it, through the CLI).

use std::time::Duration;

use steadfast::tokio_postgres::{Client as Db, NoTls};
use steadfast::{BrokerSet, Consumer, ConsumerConfig, Message, Qos, Received};
use steadfast_testkit::{Mosquitto, Pki, Postgres};

use crate::{config, open};

fn member(id: &str, group: &str, url: &str, dir: &std::path::Path, inbox: &str) -> ConsumerConfig {
    let set = BrokerSet::new([url.parse().unwrap()]);
    let client = config(id, url, dir).brokers(set);
    ConsumerConfig::new(client).topic("g/#", Qos::AtLeastOnce).group(group).shared_inbox(inbox)
}

/// Publishes `payload` on `g/t` at the broker on `port` with the identity
/// `id` (`producer/seq`), as a steadfast producer would (`mosquitto_pub`,
/// MQTT 5): copies and gaps made to order.
fn publish_as(port: u16, payload: &str, id: &str) {
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "5", "-q", "1", "-t", "g/t", "-m", payload])
        .args(["-D", "publish", "user-property", "steadfast-id", id])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

async fn next(c: &Consumer) -> Received {
    tokio::time::timeout(Duration::from_secs(20), c.next()).await.expect("a delivery within 20 s").expect("open")
}

async fn db(pg: &Postgres) -> Db {
    let (client, conn) = steadfast::tokio_postgres::connect(&pg.url(), NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A handler's transaction that rolls back takes the inbox record with
/// it: the message comes again, and is written once. A delivery recorded
/// (committed) before is recognised in a later transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_handler_gets_the_message_again_and_writes_it_once() {
    let pg = Postgres::start().await;
    let mut app = db(&pg).await;
    app.batch_execute("CREATE TABLE t (body text)").await.unwrap();
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = member("m1", "g1", &broker.url(), &dir.path().join("m1"), &pg.url());
    Consumer::register(&cfg).await.unwrap();
    let producer = open(config("p", &broker.url(), &dir.path().join("p"))).await;
    for i in 0..3 {
        producer.publish(Message::new("g/t", format!("job-{i}"))).await.unwrap();
    }
    producer.wait_idle().await;

    let (consumer, _) = Consumer::open(cfg).await.unwrap();
    let first = next(&consumer).await;
    let body = String::from_utf8(first.payload().to_vec()).unwrap();
    let tx = app.transaction().await.unwrap();
    assert!(first.record_in(&tx).await.unwrap(), "new to the group");
    tx.execute("INSERT INTO t (body) VALUES ($1)", &[&body]).await.unwrap();
    tx.rollback().await.unwrap();
    drop(first); // not handled: it comes again

    let mut written = Vec::new();
    while written.len() < 3 {
        let d = next(&consumer).await;
        let body = String::from_utf8(d.payload().to_vec()).unwrap();
        let tx = app.transaction().await.unwrap();
        assert!(d.record_in(&tx).await.unwrap(), "{body} is new: its first record was rolled back");
        tx.execute("INSERT INTO t (body) VALUES ($1)", &[&body]).await.unwrap();
        tx.commit().await.unwrap();
        // Recorded now: a later transaction knows it.
        let again = app.transaction().await.unwrap();
        assert!(!d.record_in(&again).await.unwrap(), "{body} was recorded");
        again.rollback().await.unwrap();
        d.ack();
        written.push(body);
    }
    written.sort();
    assert_eq!(written, ["job-0", "job-1", "job-2"]);
    let rows: i64 = app.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(rows, 3);
    consumer.close().await;
    producer.close().await;
}

/// A copy of a message that one member handled, reaching another member
/// (here through a second broker), is acknowledged there without being
/// handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_another_member_handled_is_not_handed_over() {
    let pg = Postgres::start().await;
    let (a, b) = (Mosquitto::plain().await, Mosquitto::plain().await);
    let dir = tempfile::tempdir().unwrap();
    let m1 = member("m1", "g2", &a.url(), &dir.path().join("m1"), &pg.url());
    let m2 = member("m2", "g2", &b.url(), &dir.path().join("m2"), &pg.url());
    Consumer::register(&m1).await.unwrap();
    Consumer::register(&m2).await.unwrap();
    let producer = open(config("p", &a.url(), &dir.path().join("p"))).await;
    producer.publish(Message::new("g/t", "once")).await.unwrap();
    producer.wait_idle().await;
    let (c1, _) = Consumer::open(m1).await.unwrap();
    let d = next(&c1).await;
    let id = d.identity().cloned().expect("an identity");
    d.ack();
    c1.close().await; // its record is written before close returns

    // The same identity through broker b (as a fanout copy would come),
    // then a new message.
    publish_as(b.port(), "once", &id.to_property_value());
    publish_as(b.port(), "new", &format!("{}/{}", id.producer, id.seq + 1));
    let (c2, _) = Consumer::open(m2).await.unwrap();
    let d = next(&c2).await;
    assert_eq!(d.payload(), b"new", "the copy m1 handled was not handed over to m2");
    d.ack();
    c2.close().await;
    let db = db(&pg).await;
    let rows = db.query("SELECT member, handled FROM steadfast_members WHERE grp = 'g2' ORDER BY member", &[]).await;
    let rows: Vec<(String, i64)> = rows.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [("m1".to_owned(), 1), ("m2".to_owned(), 1)]);
    producer.close().await;
}

/// A shared inbox over TLS, with libpq's settings: against a server that
/// takes TLS only and wants a client certificate, `sslmode=verify-full`
/// with `sslrootcert`, `sslcert` and `sslkey` works end to end; a wrong
/// CA, a missing client certificate and no TLS at all are each refused,
/// in words that name the setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_inbox_over_tls_checks_the_server_and_shows_the_client_certificate() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let pg = Postgres::start_tls(&pki.path("server.pem"), &pki.path("server.key"), Some(&ca)).await;
    let client = format!("sslcert={}&sslkey={}", pki.path("client.pem").display(), pki.path("client.key").display());
    let good = format!("{}?sslmode=verify-full&sslrootcert={}&{client}", pg.url(), ca.display());
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = member("m1", "gtls", &broker.url(), &dir.path().join("m1"), &good);
    Consumer::register(&cfg).await.unwrap();
    let producer = open(config("p", &broker.url(), &dir.path().join("p"))).await;
    producer.publish(Message::new("g/t", "over tls")).await.unwrap();
    producer.wait_idle().await;
    let (consumer, _) = Consumer::open(cfg).await.unwrap();
    let d = next(&consumer).await;
    assert_eq!(d.payload(), b"over tls");
    d.ack();
    consumer.close().await;
    let groups = steadfast::group_status(&good, Some("gtls")).await.unwrap();
    assert_eq!(groups[0].handled(), 1, "recorded over TLS");

    let refused = |url: String| async move { steadfast::group_status(&url, None).await.unwrap_err().to_string() };
    let other = pki.path("other-ca.pem");
    let e = refused(format!("{}?sslmode=verify-full&sslrootcert={}&{client}", pg.url(), other.display())).await;
    assert!(e.contains("not signed by a CA we trust") && e.contains("sslrootcert="), "{e}");
    let e = refused(format!("{}?sslmode=verify-full&sslrootcert={}", pg.url(), ca.display())).await;
    assert!(e.contains("certificate"), "without a client certificate: {e}");
    let e = refused(format!("{}?sslmode=disable", pg.url())).await;
    assert!(e.contains("no encryption"), "without TLS: {e}");
    producer.close().await;
}

/// The shared inbox keeps to the consumer's bounds: identities handled
/// longer ago than the age bound are forgotten by the members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_inbox_forgets_what_is_older_than_its_bound() {
    let pg = Postgres::start().await;
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = member("m1", "g3", &broker.url(), &dir.path().join("m1"), &pg.url())
        .inbox_window(Duration::from_millis(600), 1_000_000);
    Consumer::register(&cfg).await.unwrap();
    let producer = open(config("p", &broker.url(), &dir.path().join("p"))).await;
    for i in 0..5 {
        producer.publish(Message::new("g/t", format!("m-{i}"))).await.unwrap();
    }
    producer.wait_idle().await;
    let (consumer, _) = Consumer::open(cfg).await.unwrap();
    for _ in 0..5 {
        next(&consumer).await.ack();
    }
    let db = db(&pg).await;
    let rows = || async {
        db.query_one("SELECT count(*) FROM steadfast_inbox WHERE grp = 'g3'", &[]).await.map(|r| r.get::<_, i64>(0))
    };
    let handled = || async {
        let r = db.query_opt("SELECT handled FROM steadfast_members WHERE grp = 'g3'", &[]).await.unwrap();
        r.map_or(0, |r| r.get::<_, i64>(0))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while handled().await < 5 {
        assert!(tokio::time::Instant::now() < deadline, "the 5 messages were not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while rows().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the rows older than 600 ms were not forgotten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.close().await;
    producer.close().await;
}

/// A producer's message that no member of the group received is reported
/// once, for the group, by one member; the numbers each member misses
/// because the others got them are not gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_the_whole_group_lacks_is_reported_once() {
    let pg = Postgres::start().await;
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cfgs: Vec<ConsumerConfig> = (1..=2)
        .map(|i| {
            member(&format!("m{i}"), "g4", &broker.url(), &dir.path().join(format!("m{i}")), &pg.url())
                .gap_timeout(Duration::from_millis(800))
        })
        .collect();
    for c in &cfgs {
        Consumer::register(c).await.unwrap();
    }
    let mut members = Vec::new();
    for c in cfgs {
        members.push(Consumer::open(c).await.unwrap().0);
    }
    let mut events: Vec<_> = members.iter().map(|m| m.events()).collect();
    // p/1 to p/8 without p/5: round robin gives each member every other one.
    for seq in (1..=8).filter(|s| *s != 5) {
        publish_as(broker.port(), &format!("m-{seq}"), &format!("p/{seq}"));
    }
    let mut handled = 0;
    while handled < 7 {
        let got = tokio::select! {
            d = members[0].next() => d,
            d = members[1].next() => d,
            _ = tokio::time::sleep(Duration::from_secs(20)) => panic!("{handled} of 7 handled"),
        };
        got.expect("open").ack();
        handled += 1;
    }
    let db = db(&pg).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let reported = loop {
        let rows = db.query("SELECT producer, first, last, reporter FROM steadfast_gaps WHERE grp = 'g4'", &[]).await;
        let rows: Vec<(String, i64, i64, String)> =
            rows.unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
        if !rows.is_empty() {
            break rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "no gap reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reported.len(), 1, "{reported:?}");
    let (producer, first, last, reporter) = &reported[0];
    assert_eq!((producer.as_str(), *first, *last), ("p", 5, 5));
    // The reporter announced it; nobody announced anything else.
    let who = if reporter == "m1" { 0 } else { 1 };
    let loss = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(steadfast::Event::SuspectedLoss { producer, first, last }) = events[who].recv().await {
                return (producer, first, last);
            }
        }
    })
    .await
    .expect("the reporter's event");
    assert_eq!(loss, ("p".to_owned(), 5, 5));
    for e in &mut events {
        while let Ok(ev) = e.try_recv() {
            assert!(!matches!(ev, steadfast::Event::SuspectedLoss { .. }), "reported twice: {ev:?}");
        }
    }
    for m in members {
        m.close().await;
    }
}

/// A mixed group: a member that records in its own transaction
/// (`records_in_transaction`, as `--sql`) does not take over a copy that a
/// claiming member is handling now: `record_in` says so (roll back, try
/// again), and once that member recorded it, the copy is not new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_recording_in_its_transaction_does_not_take_a_copy_another_member_handles() {
    let pg = Postgres::start().await;
    let app = db(&pg).await;
    let (a, b) = (Mosquitto::plain().await, Mosquitto::plain().await);
    let dir = tempfile::tempdir().unwrap();
    let m1 = member("m1", "g6", &a.url(), &dir.path().join("m1"), &pg.url());
    let m2 = member("m2", "g6", &b.url(), &dir.path().join("m2"), &pg.url()).records_in_transaction(true);
    Consumer::register(&m1).await.unwrap();
    Consumer::register(&m2).await.unwrap();
    publish_as(a.port(), "job", "p/1");
    publish_as(b.port(), "job", "p/1");
    let (c1, _) = Consumer::open(m1).await.unwrap();
    let held = next(&c1).await; // claimed by m1, being handled
    let (c2, _) = Consumer::open(m2).await.unwrap();
    let copy = next(&c2).await; // m2 claims nothing: handed over
    let mut app = app;
    let tx = app.transaction().await.unwrap();
    let e = copy.record_in(&tx).await.expect_err("m1 handles it now");
    assert!(matches!(e, steadfast::RecordInError::ClaimedElsewhere { n: 1 }), "{e}");
    tx.rollback().await.unwrap();
    held.ack();
    c1.close().await; // its record is written before close returns
    let tx = app.transaction().await.unwrap();
    assert!(!copy.record_in(&tx).await.unwrap(), "m1 recorded it: a copy here");
    tx.commit().await.unwrap();
    copy.ack();
    c2.close().await;
    let handled: i64 = app
        .query_one(
            "SELECT count(*) FROM steadfast_inbox WHERE grp = 'g6' AND claimed_until IS NULL AND member = 'm1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(handled, 1);
}

/// A member that handles a message for longer than its claim lasts keeps
/// the claim (renewed): the copy at another member waits and is dropped
/// once the first member recorded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_claim_and_the_copy_elsewhere_waits() {
    let pg = Postgres::start().await;
    let (a, b) = (Mosquitto::plain().await, Mosquitto::plain().await);
    let dir = tempfile::tempdir().unwrap();
    let claim = Duration::from_millis(600);
    let m1 = member("m1", "g5", &a.url(), &dir.path().join("m1"), &pg.url()).claim_for(claim);
    let m2 = member("m2", "g5", &b.url(), &dir.path().join("m2"), &pg.url()).claim_for(claim);
    Consumer::register(&m1).await.unwrap();
    Consumer::register(&m2).await.unwrap();
    // The same message through both brokers, as fanout sends it.
    publish_as(a.port(), "slow", "p/1");
    publish_as(b.port(), "slow", "p/1");
    let (c1, _) = Consumer::open(m1).await.unwrap();
    let d = next(&c1).await;
    let (c2, _) = Consumer::open(m2).await.unwrap();
    // Handling takes more than three claim lengths.
    let c2_first = tokio::time::timeout(claim * 3, c2.next()).await;
    assert!(c2_first.is_err(), "the copy was handed over while m1 still handled it: {c2_first:?}");
    d.ack();
    publish_as(b.port(), "new", "p/2");
    let first = next(&c2).await;
    assert_eq!(first.payload(), b"new", "m2 dropped the copy once m1 recorded it");
    first.ack();
    c1.close().await;
    c2.close().await;
}

/// A group's settings that cannot work are refused before anything opens,
/// each naming its fix.
#[test]
fn group_settings_that_cannot_work_are_refused_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let base = || {
        let client = config("m", "mqtt://127.0.0.1:1883", dir.path());
        ConsumerConfig::new(client).topic("g/#", Qos::AtLeastOnce)
    };
    let url = "postgres://steadfast@127.0.0.1:5432/postgres";
    let cases = [
        (base().shared_inbox(url), "add --group NAME"),
        (base().group("a/b"), "consumer group name `a/b`"),
        (base().group("g").shared_inbox(url).claim_for(Duration::ZERO), "--claim-for"),
        (base().group("g").shared_inbox(url).inbox(false), "--no-dedup"),
        (base().group("g").records_in_transaction(true), "add ConsumerConfig::shared_inbox"),
        (base().group("g").shared_inbox(format!("{url}?sslmode=verify-ca")), "needs sslrootcert=PATH"),
    ];
    for (cfg, want) in cases {
        let e = cfg.check().unwrap_err().to_string();
        assert!(e.contains(want), "wanted `{want}` in: {e}");
    }
}
