//! Several brokers on one outbox: a message leaves when its route's quorum
//! acknowledged it, never while a broker still holds a QoS 2 exchange of it,
//! and a fanout member that stays away past the catch-up window is counted
//! as having missed what the others took.

use steadfast_core::Stage;
use steadfast_store::{DefaultSet, Delivery, MemoryStore, Outbox, OutboxConfig, Quorum, SqliteStore, Store};

use crate::{block_on, msg};

const A: &str = "mqtt://127.0.0.1:1";
const B: &str = "mqtt://127.0.0.1:2";

fn quorum(need: u32, catch_up_ms: Option<u64>) -> Quorum {
    Quorum { route: None, members: vec![(0, A.into()), (0, B.into())], need, catch_up_ms, fanout: true }
}

async fn routed(store: Box<dyn Store>, q: Quorum) -> (Outbox, u32, u32) {
    let o = Outbox::start(store, OutboxConfig::default()).unwrap();
    let slots = o.configure(vec![A.into(), B.into()], vec![q], DefaultSet::default()).await.unwrap().slots;
    (o, slots[0], slots[1])
}

#[test]
fn ack_all_waits_for_every_member_and_each_reads_only_what_it_lacks() {
    block_on(async {
        let (o, a, b) = routed(Box::new(MemoryStore::new()), quorum(2, None)).await;
        let (id, delivered) = o.append(msg("t", "x"), true);
        let id = id.await.unwrap();
        o.ack(a, vec![id]);
        assert_eq!(o.read_after(0, 10, Some(a), None).await.unwrap().len(), 0, "A has it");
        assert_eq!(o.read_after(0, 10, Some(b), None).await.unwrap().len(), 1, "B still needs it");
        assert_eq!(o.state().totals.count, 1, "queued until B acknowledges");
        o.ack(b, vec![id]);
        assert_eq!(delivered.unwrap().await.unwrap(), Delivery::Delivered);
        assert_eq!(o.state().totals.count, 0);
    });
}

#[test]
fn a_delivered_message_stays_on_disk_while_another_broker_holds_its_qos2_exchange() {
    block_on(async {
        let (o, a, b) = routed(Box::new(MemoryStore::new()), quorum(1, None)).await;
        let id = o.append(msg("t", "x"), false).0.await.unwrap();
        o.set_wire(b, vec![(id, Some((5, Stage::Published)))]).await.unwrap();
        o.ack(a, vec![id]);
        assert!(o.read_after(0, 10, Some(b), None).await.unwrap().is_empty(), "nothing new to send to B");
        assert_eq!(o.state().totals.count, 0, "delivered through A (the read came after the commit)");
        let bound = o.bound(b).await.unwrap();
        assert_eq!(bound.iter().map(|m| (m.id, m.wire)).collect::<Vec<_>>(), vec![(id, Some((5, Stage::Published)))]);
        // B completes its exchange: the row goes.
        o.ack(b, vec![id]);
        assert!(o.bound(b).await.unwrap().is_empty());
        assert_eq!(o.read_after(0, 10, None, None).await.unwrap().len(), 0);
    });
}

#[test]
fn a_member_away_past_the_catch_up_window_is_counted_as_missing_what_the_others_took() {
    let dir = tempfile::tempdir().unwrap();
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let (o, a, _b) = routed(Box::new(store), quorum(2, Some(1))).await;
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut m = msg("t", format!("{i}"));
            m.created_ms = steadfast_store::now_ms();
            ids.push(o.append(m, false).0.await.unwrap());
        }
        o.ack(a, ids[..2].to_vec());
        let mut state = o.watch();
        let left = tokio::time::timeout(std::time::Duration::from_secs(10), state.wait_for(|s| s.totals.count == 1));
        left.await.expect("the sweep runs within seconds").unwrap();
        let report = o.report().await.unwrap();
        let lag: Vec<_> = report.lag.iter().map(|l| (l.url.as_str(), l.lag, l.missed)).collect();
        assert_eq!(lag, vec![(A, 1, 0), (B, 1, 2)], "B missed the two A took; the third waits for anyone");
        let o2 = o.clone();
        tokio::task::spawn_blocking(move || o2.close()).await.unwrap();
    });
    // Counted durably.
    let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.missed().unwrap(), vec![(B.to_owned(), 2)]);
}

#[test]
fn a_new_qos2_binding_for_a_message_that_already_left_is_refused() {
    block_on(async {
        let (o, a, b) = routed(Box::new(MemoryStore::new()), quorum(1, None)).await;
        let id = o.append(msg("t", "x"), false).0.await.unwrap();
        o.ack(a, vec![id]);
        // B read it before A's acknowledgement; its binding comes late.
        let refused = o.set_wire(b, vec![(id, Some((5, Stage::Published)))]).await.unwrap();
        assert_eq!(refused, vec![id], "B must not send it: packet id 5 stays free");
        assert!(o.bound(b).await.unwrap().is_empty());
    });
}

#[test]
fn the_catch_up_sweep_of_one_route_is_not_starved_by_another_routes_backlog() {
    block_on(async {
        let other = Quorum {
            route: None,
            members: vec![(0, A.into()), (0, B.into())],
            need: 2,
            catch_up_ms: None,
            fanout: true,
        };
        let mut swept = quorum(2, Some(1));
        swept.route = Some("r".into());
        let o = Outbox::start(Box::new(MemoryStore::new()), OutboxConfig::default()).unwrap();
        let slots =
            o.configure(vec![A.into(), B.into()], vec![other, swept], DefaultSet::default()).await.unwrap().slots;
        let a = slots[0];
        // More half-acknowledged default-route messages than one sweep reads.
        let mut ids = Vec::new();
        for i in 0..5000 {
            let mut m = msg("t", format!("{i}"));
            m.created_ms = 1;
            ids.push(o.append(m, false).0.await.unwrap());
        }
        let mut m = msg("t", "routed");
        m.created_ms = 1;
        m.route = Some("r".into());
        let routed_id = o.append(m, false).0.await.unwrap();
        ids.push(routed_id);
        o.ack(a, ids);
        let mut state = o.watch();
        let swept =
            tokio::time::timeout(std::time::Duration::from_secs(10), state.wait_for(|s| s.totals.count == 5000));
        swept.await.expect("the routed message lapses within seconds").unwrap();
    });
}

/// A binding whose clearing failed (a refused QoS 2 message) is void once
/// its packet id is bound to another message on the same broker: after a
/// restart the window must not hold two messages under one id.
#[test]
fn a_packet_id_holds_one_exchange_per_broker() {
    let dir = tempfile::tempdir().unwrap();
    let stores: [Box<dyn Store>; 2] =
        [Box::new(MemoryStore::new()), Box::new(SqliteStore::open(dir.path()).unwrap().0)];
    for store in stores {
        block_on(async {
            let (o, a, b) = routed(store, quorum(1, None)).await;
            let first = o.append(msg("t", "1"), false).0.await.unwrap();
            let second = o.append(msg("t", "2"), false).0.await.unwrap();
            o.set_wire(a, vec![(first, Some((7, Stage::Published)))]).await.unwrap();
            o.set_wire(b, vec![(first, Some((7, Stage::Published)))]).await.unwrap();
            o.set_wire(a, vec![(second, Some((7, Stage::Published)))]).await.unwrap();
            let on_a: Vec<_> = o.bound(a).await.unwrap().iter().map(|m| (m.id, m.wire)).collect();
            assert_eq!(on_a, vec![(second, Some((7, Stage::Published)))], "the old binding under 7 is void on A");
            let on_b: Vec<_> = o.bound(b).await.unwrap().iter().map(|m| m.id).collect();
            assert_eq!(on_b, vec![first], "another broker's binding under the same id stays");
        });
    }
}

/// G9: opened with another default broker set, what was queued for the old
/// one is held: no acknowledgement completes it there (a QoS 2 exchange the
/// old set left open may close on a broker both sets share), and back with
/// its own set it is its own again, the acknowledgement counted.
#[test]
fn a_message_held_for_another_broker_set_is_not_completed_by_this_sets_acks() {
    const C: &str = "mqtt://127.0.0.1:3";
    let dir = tempfile::tempdir().unwrap();
    let open = |urls: [&str; 2], key: &str| {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let o = Outbox::start(Box::new(store), OutboxConfig::default()).unwrap();
        let q = Quorum {
            route: None,
            members: urls.iter().map(|u| (0, u.to_string())).collect(),
            need: 2,
            catch_up_ms: None,
            fanout: true,
        };
        let set = DefaultSet { key: key.into(), retarget: false };
        (o, urls.map(str::to_owned).to_vec(), q, set)
    };
    let close = |o: Outbox| async move { tokio::task::spawn_blocking(move || o.close()).await.unwrap() };
    block_on(async {
        let (o, urls, q, set) = open([A, B], "AB");
        o.configure(urls, vec![q], set).await.unwrap();
        let id = o.append(msg("t", "x"), false).0.await.unwrap();
        close(o).await;

        let (o, urls, q, set) = open([A, C], "AC");
        let configured = o.configure(urls, vec![q.clone()], set).await.unwrap();
        assert_eq!(configured.held, vec![("AB".to_owned(), 1)]);
        assert_eq!(o.state().held, 1);
        // Both of this set's brokers acknowledge it (A and C): still held.
        o.ack(configured.slots[0], vec![id]);
        o.ack(configured.slots[1], vec![id]);
        assert_eq!(o.read_after(0, 10, None, None).await.unwrap().len(), 1, "still queued, held");
        assert_eq!(o.state().totals.count, 1);
        close(o).await;

        let (o, urls, q, set) = open([A, B], "AB");
        let configured = o.configure(urls, vec![q], set).await.unwrap();
        assert!(configured.held.is_empty(), "its own set again");
        // A's acknowledgement counted; B's completes it.
        o.ack(configured.slots[1], vec![id]);
        assert!(o.read_after(0, 10, None, None).await.unwrap().is_empty());
        assert_eq!(o.state().totals.count, 0);
        close(o).await;
    });
}

#[test]
fn a_first_brokers_acknowledgement_reaches_the_disk_when_nothing_else_comes() {
    let dir = tempfile::tempdir().unwrap();
    let on_disk = |id: u64| -> u64 {
        let raw = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
        raw.query_row("SELECT acks FROM outbox WHERE id = ?1", [id], |r| r.get(0)).unwrap()
    };
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let (o, a, _b) = routed(Box::new(store), quorum(2, None)).await;
        let id = o.append(msg("t", "x"), false).0.await.unwrap();
        // A's acknowledgement does not finish it; the store holds it
        // unwritten for a moment, past the synced commit of the message
        // after it (the writer's idle sync then has nothing to do), and
        // the idle writer then commits it.
        o.ack(a, vec![id]);
        o.append(msg("t", "y"), false).0.await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while on_disk(id) != 1 << a {
            assert!(std::time::Instant::now() < deadline, "A's acknowledgement never reached the file");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(o.state().totals.count, 2, "queued until B acknowledges");
        let o2 = o.clone();
        tokio::task::spawn_blocking(move || o2.close()).await.unwrap();
    });
}

/// In fanout each broker's link may move the same message aside (every
/// broker refuses it, or closes on it): the second changes nothing, and a
/// requeue gives the message its own route back. Before, the second kept
/// `@poison` as its own route, and a requeue left it queued under
/// `@poison`, never sent and no longer listed.
#[test]
fn a_message_two_brokers_move_aside_is_poison_once_and_requeued_to_its_route() {
    use steadfast_store::PoisonCause;
    for (kind, mut s, _dir) in crate::both_stores() {
        let slots = s.assign_slots(&["mqtt://127.0.0.1:1".into(), "mqtt://127.0.0.1:2".into()]).unwrap();
        let mut m = crate::msg("t", "x");
        m.route = Some("home".into());
        let id = s.insert(&m).unwrap();
        assert!(s.poison(id, slots[0], PoisonCause::Refused(0x87), 1_000).unwrap(), "{kind}");
        assert!(!s.poison(id, slots[1], PoisonCause::Refused(0x87), 2_000).unwrap(), "{kind}: once");
        let listed = s.poisoned().unwrap();
        assert_eq!(listed.len(), 1, "{kind}");
        assert_eq!((listed[0].cause, listed[0].at_ms), (PoisonCause::Refused(0x87), 1_000), "{kind}");
        assert!(s.unpoison(id).unwrap(), "{kind}");
        let back = s.read_after(0, 10, None, None).unwrap();
        assert_eq!(back[0].msg.route.as_deref(), Some("home"), "{kind}: its own route again");
        assert!(s.poisoned().unwrap().is_empty(), "{kind}");
    }
}

/// A member of a fanout that refuses a message for good (its ACL, its size
/// limit) takes itself out of that message's quorum: with `ack = any` the
/// other member still delivers it; once the members left cannot meet the
/// quorum, it is moved aside as poison. With `ack = all` and in failover,
/// the first refusal does.
#[test]
fn a_refusal_for_good_in_fanout_is_poison_only_once_the_quorum_cannot_be_met() {
    use steadfast_store::PoisonCause;
    let refused = PoisonCause::Refused(0x87);
    block_on(async {
        let (o, a, b) = routed(Box::new(MemoryStore::new()), quorum(1, None)).await;
        let (id, delivered) = o.append(msg("t", "x"), true);
        let id = id.await.unwrap();
        o.poison(a, id, refused);
        assert_eq!(o.report().await.unwrap().poisoned.len(), 0, "B may still take it");
        assert_eq!(o.read_after(0, 10, Some(b), None).await.unwrap().len(), 1, "queued for B");
        o.ack(b, vec![id]);
        assert_eq!(delivered.unwrap().await.unwrap(), Delivery::Delivered);

        let id = o.append(msg("t", "y"), false).0.await.unwrap();
        o.poison(a, id, refused);
        o.poison(b, id, refused);
        let report = o.report().await.unwrap();
        assert_eq!(
            report.poisoned.iter().map(|p| (p.id, p.cause)).collect::<Vec<_>>(),
            [(id, refused)],
            "both refused"
        );
    });
    for q in [quorum(2, None), Quorum { fanout: false, ..quorum(1, None) }] {
        block_on(async {
            let (o, a, _) = routed(Box::new(MemoryStore::new()), q.clone()).await;
            let id = o.append(msg("t", "x"), false).0.await.unwrap();
            o.poison(a, id, refused);
            assert_eq!(o.report().await.unwrap().poisoned.len(), 1, "{q:?}: at the first refusal");
        });
    }
    // With `ack = all`, B's acknowledgement of a message A refused (B had
    // it in flight) does not finish it: it stays aside, and once requeued
    // it goes to A alone.
    block_on(async {
        let (o, a, b) = routed(Box::new(MemoryStore::new()), quorum(2, None)).await;
        let id = o.append(msg("t", "x"), false).0.await.unwrap();
        o.poison(a, id, refused);
        o.ack(b, vec![id]);
        assert_eq!(o.report().await.unwrap().poisoned.len(), 1, "one acknowledgement does not finish poison");
        assert_eq!(o.unpoison(Some(vec![id]), false).await.unwrap(), [id]);
        assert_eq!(o.read_after(0, 10, Some(b), None).await.unwrap().len(), 0, "B has it");
        assert_eq!(o.read_after(0, 10, Some(a), None).await.unwrap().len(), 1, "A is sent it again");
        o.ack(a, vec![id]);
        assert_eq!(o.report().await.unwrap().totals.count, 0, "its quorum met");
    });
}
