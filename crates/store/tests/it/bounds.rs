use std::time::Duration;

use steadfast_core::DropReason;
use steadfast_store::{
    AppendError, Delivery, MemoryStore, NewMessage, Outbox, OutboxConfig, Overflow, Policy, SqliteStore, Store,
};

use crate::{block_on, msg};

fn outbox(max_messages: u64, overflow: Overflow) -> Outbox {
    let cfg = OutboxConfig { max_messages: Some(max_messages), overflow, ..OutboxConfig::default() };
    Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap()
}

/// True when `waiting` has no answer after the writer handled every
/// request sent before this call. The barrier is a write whose reply comes
/// after its commit, and after the replies of every append that commit
/// admitted: a positive signal, where a pause would pass without looking
/// on a busy machine.
async fn still_waiting<F: std::future::Future + Unpin>(o: &Outbox, waiting: &mut F) -> bool {
    o.meta_or_init("test-barrier", "x").await.unwrap();
    tokio::time::timeout(Duration::ZERO, waiting).await.is_err()
}

#[test]
fn reject_refuses_the_message_that_does_not_fit() {
    block_on(async {
        let o = outbox(3, Overflow::Reject);
        for i in 0..3 {
            o.append(msg("t", format!("{i}")), false).0.await.unwrap();
        }
        let err = o.append(msg("t", "x"), false).0.await.unwrap_err();
        assert!(matches!(err, AppendError::Full { .. }), "{err}");
        assert!(err.to_string().contains("3 messages"), "{err}");
        assert_eq!(o.state().totals.count, 3);
    });
}

#[test]
fn drop_oldest_makes_room_and_counts_every_drop() {
    block_on(async {
        let o = outbox(3, Overflow::DropOldest);
        let mut drops = o.subscribe_drops();
        let (first, delivery) = o.append(msg("t", "0"), true);
        let first = first.await.unwrap();
        for i in 1..5 {
            o.append(msg("t", format!("{i}")), false).0.await.unwrap();
        }
        assert_eq!(delivery.unwrap().await.unwrap(), Delivery::Dropped(DropReason::Overflow));
        let d = drops.recv().await.unwrap();
        assert_eq!((d.id, d.reason), (first, DropReason::Overflow));
        let left: Vec<Vec<u8>> =
            o.read_after(0, 10, None, None).await.unwrap().into_iter().map(|m| m.msg.payload.clone()).collect();
        assert_eq!(left, vec![b"2".to_vec(), b"3".to_vec(), b"4".to_vec()]);
        let report = o.report().await.unwrap();
        assert!(report.drops.contains(&(DropReason::Overflow, 2)), "{:?}", report.drops);
    });
}

#[test]
fn block_waits_for_room_and_keeps_order() {
    block_on(async {
        let o = outbox(2, Overflow::Block);
        let a = o.append(msg("t", "a"), false).0.await.unwrap();
        o.append(msg("t", "b"), false).0.await.unwrap();
        let mut c = o.append(msg("t", "c"), false).0;
        let mut d = o.append(msg("t", "d"), false).0;
        assert!(still_waiting(&o, &mut c).await, "c must wait for room");
        o.remove(vec![a], Delivery::Delivered);
        let c = c.await.unwrap();
        assert!(still_waiting(&o, &mut d).await, "d still waits");
        let page = o.read_after(0, 10, None, None).await.unwrap();
        assert_eq!(page.last().unwrap().id, c);
        assert_eq!(o.state().totals.count, 2);
    });
}

#[test]
fn bytes_are_bounded_too() {
    block_on(async {
        let cfg = OutboxConfig { max_bytes: Some(100), overflow: Overflow::Reject, ..OutboxConfig::default() };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        o.append(msg("t", vec![0u8; 60]), false).0.await.unwrap();
        assert!(o.append(msg("t", vec![0u8; 60]), false).0.await.is_err());
        let err = o.append(msg("t", vec![0u8; 500]), false).0.await.unwrap_err();
        assert!(err.to_string().contains("alone"), "{err}");
    });
}

fn with(m: NewMessage, policy: Policy) -> NewMessage {
    NewMessage { policy, ..m }
}

fn deadline(topic: &str, payload: &str, expires_ms: u64) -> NewMessage {
    with(msg(topic, payload), Policy { expires_ms: Some(expires_ms), ..Policy::default() })
}

fn payloads(page: Vec<steadfast_store::StoredMessage>) -> Vec<String> {
    page.into_iter().map(|m| String::from_utf8(m.msg.payload.clone()).unwrap()).collect()
}

/// Through SQLite: a dropped message is reported with its topic, read
/// from its row (an acknowledgement's answer carries none).
#[test]
fn a_message_dropped_from_sqlite_is_reported_with_its_topic() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = SqliteStore::open(dir.path()).unwrap();
    let cfg = OutboxConfig { max_messages: Some(1), overflow: Overflow::DropOldest, ..OutboxConfig::default() };
    let o = Outbox::start(Box::new(store), cfg).unwrap();
    block_on(async {
        let mut drops = o.subscribe_drops();
        let first = o.append(msg("t/first", "0"), false).0.await.unwrap();
        o.append(msg("t/second", "1"), false).0.await.unwrap();
        let d = drops.recv().await.unwrap();
        assert_eq!((d.id, d.topic.as_str(), d.reason), (first, "t/first", DropReason::Overflow));
    });
}

#[test]
fn drop_newest_keeps_the_queue_and_counts_the_newcomer() {
    block_on(async {
        let o = outbox(2, Overflow::DropNewest);
        let mut drops = o.subscribe_drops();
        for i in 0..2 {
            o.append(msg("t", format!("{i}")), false).0.await.unwrap();
        }
        let err = o.append(msg("t/new", "2"), false).0.await.unwrap_err();
        assert!(matches!(err, AppendError::Dropped { policy: "drop-newest", .. }), "{err}");
        assert!(err.to_string().contains("2 messages"), "{err}");
        let d = drops.recv().await.unwrap();
        assert_eq!((d.topic.as_str(), d.reason), ("t/new", DropReason::Overflow));
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["0", "1"]);
        let report = o.report().await.unwrap();
        assert!(report.drops.contains(&(DropReason::Overflow, 1)), "{:?}", report.drops);
    });
}

/// Drop-oldest evicts only messages of the newcomer's class: telemetry
/// with a deadline never pushes out a persistent alarm.
#[test]
fn drop_oldest_stays_within_the_class() {
    block_on(async {
        let cfg = OutboxConfig { max_messages: Some(3), overflow: Overflow::DropOldest, ..OutboxConfig::default() };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        let far = u64::MAX / 2;
        o.append(msg("alarm", "a0"), false).0.await.unwrap();
        o.append(deadline("temp", "t0", far), false).0.await.unwrap();
        o.append(deadline("temp", "t1", far), false).0.await.unwrap();
        o.append(deadline("temp", "t2", far), false).0.await.unwrap();
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["a0", "t1", "t2"]);
        // A persistent newcomer finds only one of its class to evict.
        o.append(msg("alarm", "a1"), false).0.await.unwrap();
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["t1", "t2", "a1"]);
        // No persistent message left to evict for... a deadline class one
        // evicts its own.
        o.append(deadline("temp", "t3", far), false).0.await.unwrap();
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["t2", "a1", "t3"]);
        let report = o.report().await.unwrap();
        assert!(report.drops.contains(&(DropReason::Overflow, 3)), "{:?}", report.drops);
    });
}

/// Per class: deadline messages drop-oldest, persistent ones are rejected.
#[test]
fn each_class_has_its_own_overflow_policy() {
    block_on(async {
        let cfg = OutboxConfig {
            max_messages: Some(2),
            overflow: Overflow::Reject,
            deadline_overflow: Some(Overflow::DropOldest),
            ..OutboxConfig::default()
        };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        let far = u64::MAX / 2;
        o.append(msg("alarm", "a0"), false).0.await.unwrap();
        o.append(deadline("temp", "t0", far), false).0.await.unwrap();
        assert!(matches!(o.append(msg("alarm", "a1"), false).0.await, Err(AppendError::Full { .. })));
        o.append(deadline("temp", "t1", far), false).0.await.unwrap();
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["a0", "t1"]);
    });
}

#[test]
fn deadlines_and_the_age_bound_expire_messages() {
    block_on(async {
        let cfg = OutboxConfig { max_age_ms: Some(60_000), ..OutboxConfig::default() };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        let mut drops = o.subscribe_drops();
        let now = steadfast_store::now_ms();
        o.append(NewMessage { created_ms: now - 120_000, ..msg("old", "o") }, false).0.await.unwrap();
        o.append(NewMessage { created_ms: now, ..deadline("soon", "s", now + 300) }, false).0.await.unwrap();
        o.append(NewMessage { created_ms: now, ..deadline("later", "l", now + 3_600_000) }, false).0.await.unwrap();
        o.append(NewMessage { created_ms: now, ..msg("keep", "k") }, false).0.await.unwrap();
        let mut reasons = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(5), drops.recv()).await.expect("a sweep").unwrap();
            reasons.push((d.topic, d.reason));
        }
        reasons.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(reasons, [("old".to_string(), DropReason::Expired), ("soon".to_string(), DropReason::Expired)]);
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["l", "k"]);
        let report = o.report().await.unwrap();
        assert!(report.drops.contains(&(DropReason::Expired, 2)), "{:?}", report.drops);
    });
}

#[test]
fn keep_latest_leaves_one_value_per_topic_and_route() {
    block_on(async {
        let o = Outbox::start(Box::new(MemoryStore::new()), OutboxConfig::default()).unwrap();
        let latest = Policy { keep_latest: true, ..Policy::default() };
        let (_, first) = o.append(with(msg("temp/1", "10"), latest), true);
        for v in ["11", "12"] {
            o.append(with(msg("temp/1", v), latest), false).0.await.unwrap();
        }
        o.append(with(msg("temp/2", "20"), latest), false).0.await.unwrap();
        o.append(msg("temp/1", "plain"), false).0.await.unwrap();
        let routed = NewMessage { route: Some("cloud".into()), ..with(msg("temp/1", "r"), latest) };
        o.append(routed, false).0.await.unwrap();
        o.append(with(msg("temp/1", "13"), latest), false).0.await.unwrap();
        assert_eq!(first.unwrap().await.unwrap(), Delivery::Dropped(DropReason::Superseded));
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["20", "plain", "r", "13"]);
        let report = o.report().await.unwrap();
        assert!(report.drops.contains(&(DropReason::Superseded, 3)), "{:?}", report.drops);
    });
}

#[test]
fn each_priority_is_read_on_its_own_and_tracked_in_the_state() {
    block_on(async {
        let o = Outbox::start(Box::new(MemoryStore::new()), OutboxConfig::default()).unwrap();
        let urgent = Policy { priority: 7, ..Policy::default() };
        let mut ids = Vec::new();
        for (i, p) in [0, 7, 0, 7].into_iter().enumerate() {
            let m = with(msg("t", format!("{i}")), if p == 7 { urgent } else { Policy::default() });
            ids.push(o.append(m, false).0.await.unwrap());
        }
        assert_eq!(payloads(o.read_after(0, 10, None, Some(7)).await.unwrap()), ["1", "3"]);
        assert_eq!(payloads(o.read_after(0, 10, None, Some(0)).await.unwrap()), ["0", "2"]);
        let s = o.state();
        assert_eq!((s.newest[0], s.newest[7], s.newest[1]), (ids[2], ids[3], 0));
    });
}

/// Policies and attempts survive a restart of the SQLite store.
#[test]
fn policies_and_attempts_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy { expires_ms: Some(u64::MAX / 4), max_attempts: Some(3), keep_latest: true, priority: 5 };
    let id = {
        let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
        s.begin().unwrap();
        let id = s.insert(&with(msg("t", "x"), policy)).unwrap();
        s.add_attempt(id).unwrap();
        s.add_attempt(id).unwrap();
        s.commit().unwrap();
        id
    };
    let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
    let m = s.read_after(0, 10, None, Some(5)).unwrap().remove(0);
    assert_eq!((m.id, m.msg.policy, m.attempts), (id, policy, 2));
    assert!(s.newest_by_priority().unwrap().contains(&(5, id)));
    assert_eq!(s.next_expiry().unwrap(), policy.expires_ms);
    assert_eq!(s.superseded("t", None).unwrap(), [id]);
    assert!(s.read_after(0, 10, None, Some(0)).unwrap().is_empty());
}

/// Keep-latest replaces the old value only when the new one gets in: a new
/// value refused by the bounds leaves the old one queued.
#[test]
fn keep_latest_replaces_only_when_the_new_value_is_accepted() {
    block_on(async {
        let cfg = OutboxConfig { max_bytes: Some(100), overflow: Overflow::Reject, ..OutboxConfig::default() };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        let latest = Policy { keep_latest: true, ..Policy::default() };
        o.append(with(msg("t", "old"), latest), false).0.await.unwrap();
        assert!(o.append(with(msg("t", vec![b'x'; 200]), latest), false).0.await.is_err());
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["old"]);
        // One that fits once the old value's room is counted replaces it.
        o.append(msg("other", vec![b'y'; 60]), false).0.await.unwrap();
        o.append(with(msg("t", vec![b'z'; 33]), latest), false).0.await.unwrap();
        let report = o.report().await.unwrap();
        assert_eq!(report.totals.count, 2);
        assert!(report.drops.contains(&(DropReason::Superseded, 1)), "{:?}", report.drops);
    });
}

/// A deadline message whose class drops the oldest does not wait behind
/// persistent messages blocked for room.
#[test]
fn a_class_with_its_own_policy_does_not_wait_behind_blocked_ones() {
    block_on(async {
        let cfg = OutboxConfig {
            max_messages: Some(2),
            overflow: Overflow::Block,
            deadline_overflow: Some(Overflow::DropOldest),
            ..OutboxConfig::default()
        };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        let far = u64::MAX / 2;
        o.append(msg("p", "1"), false).0.await.unwrap();
        o.append(deadline("d", "old", far), false).0.await.unwrap();
        let mut blocked = o.append(msg("p", "2"), false).0;
        assert!(still_waiting(&o, &mut blocked).await, "p2 waits");
        let d = tokio::time::timeout(Duration::from_secs(2), o.append(deadline("d", "new", far), false).0).await;
        d.expect("not behind the blocked one").unwrap();
        assert_eq!(payloads(o.read_after(0, 10, None, None).await.unwrap()), ["1", "new"]);
    });
}

/// Drop-oldest never loses two where one would do: when dropping its whole
/// class cannot make room, only the new message is dropped.
#[test]
fn drop_oldest_does_not_evict_when_it_cannot_make_room() {
    block_on(async {
        let cfg = OutboxConfig { max_bytes: Some(1000), overflow: Overflow::DropOldest, ..OutboxConfig::default() };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        let far = u64::MAX / 2;
        o.append(msg("p", vec![b'p'; 899]), false).0.await.unwrap();
        o.append(deadline("d", "small-deadline-message-of-about-forty-nine-bytes", far), false).0.await.unwrap();
        let big = deadline("d", &"b".repeat(199), far);
        let err = o.append(big, false).0.await.unwrap_err();
        assert!(matches!(err, AppendError::Dropped { policy: "drop-oldest", .. }), "{err}");
        let report = o.report().await.unwrap();
        assert_eq!(report.totals.count, 2, "nothing evicted");
        assert!(report.drops.contains(&(DropReason::Overflow, 1)), "{:?}", report.drops);
    });
}

/// A bridge's redelivery after a crash is recognised inside the append, in
/// one round trip: it resolves to the id the first copy got and queues
/// nothing; the same content under a reused packet id that the broker did
/// not mark as resent is a new message.
#[test]
fn a_resent_delivery_is_known_in_the_same_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    resent_delivery_is_known(Box::new(MemoryStore::new()));
    resent_delivery_is_known(Box::new(SqliteStore::open(dir.path()).unwrap().0));
}

fn resent_delivery_is_known(store: Box<dyn Store>) {
    use steadfast_store::Source;
    block_on(async {
        let o = Outbox::start(store, OutboxConfig::default()).unwrap();
        let source = |resent| Source { url: "mqtt://src:1883".into(), pid: 7, digest: 42, resent };
        let first = o.append_from(msg("t", "x"), source(false)).await.unwrap();
        let again = o.append_from(msg("t", "x"), source(true)).await.unwrap();
        assert_eq!(again, first, "the resend resolves to the first copy's id");
        assert_eq!(o.state().totals.count, 1, "and queues nothing");
        let other = Source { digest: 43, ..source(true) };
        let changed = o.append_from(msg("t", "y"), other).await.unwrap();
        assert_ne!(changed, first, "another content under the same packet id is another message");
        let reused = o.append_from(msg("t", "x"), source(false)).await.unwrap();
        assert_ne!(reused, first, "not marked as resent: a new message that looks the same");
        assert_eq!(o.state().totals.count, 3);
    });
}

/// SQLite keys a bridge's source records by the broker's number and the
/// packet id (format 7): brokers stay apart at every packet id, the
/// records outlive a reopen, and a broker numbered in a transaction that
/// rolled back is numbered again, never given a number another broker
/// then takes.
#[test]
fn source_records_keep_their_brokers_apart_across_rollbacks_and_reopens() {
    use steadfast_store::SourceStore;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = ("mqtt://a:1883", "mqtt://b:1883", "mqtt://c:1883");
    let mut s = SqliteStore::open(dir.path()).unwrap().0;
    s.begin().unwrap();
    s.source_record(a, 1, 10, 100).unwrap();
    s.rollback();
    s.begin().unwrap();
    s.source_record(b, 1, 20, 200).unwrap();
    s.source_record(b, u16::MAX, 21, 201).unwrap();
    s.commit().unwrap();
    s.begin().unwrap();
    s.source_record(a, 1, 10, 101).unwrap();
    s.source_record(a, 0, 11, 102).unwrap();
    s.source_record(c, 1, 10, 300).unwrap();
    s.commit().unwrap();
    for reopened in [false, true] {
        if reopened {
            drop(s);
            s = SqliteStore::open(dir.path()).unwrap().0;
        }
        let seen = |s: &mut SqliteStore, url, pid, digest| s.source_seen(url, pid, digest).unwrap();
        assert_eq!(seen(&mut s, a, 1, 10), Some(101), "reopened: {reopened}");
        assert_eq!(seen(&mut s, a, 0, 11), Some(102));
        assert_eq!(seen(&mut s, b, 1, 20), Some(200));
        assert_eq!(seen(&mut s, b, u16::MAX, 21), Some(201));
        assert_eq!(seen(&mut s, c, 1, 10), Some(300));
        assert_eq!(seen(&mut s, a, 1, 20), None, "b's record is not a's");
        assert_eq!(seen(&mut s, c, 0, 11), None, "nor is a's c's");
        assert_eq!(seen(&mut s, "mqtt://d:1883", 1, 10), None);
    }
    s.begin().unwrap();
    s.source_record(a, 1, 12, 103).unwrap();
    s.commit().unwrap();
    assert_eq!(s.source_seen(a, 1, 10).unwrap(), None, "a packet id's new delivery replaces its old one");
    assert_eq!(s.source_seen(a, 1, 12).unwrap(), Some(103));
}
