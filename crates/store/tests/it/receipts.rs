//! Receipts in the outbox: a message that asks for them waits after its
//! broker's acknowledgement, is handled by the receipts its rule names,
//! goes back into the queue when none come in time, and keeps all of that
//! across a restart.

use std::time::Duration;

use steadfast_core::{ConsumerReceipt, DropReason, Need, ReceiptRule};
use steadfast_store::{
    Delivery, Handling, InboxStore, MemoryStore, NewMessage, Outbox, OutboxConfig, Quorum, ReadLimit, SqliteStore,
    Store,
};

use tokio::sync::oneshot;

use crate::follow::{answered, want};
use crate::{block_on, msg, on_one_broker};

fn asking(rule: &ReceiptRule) -> NewMessage {
    NewMessage { receipts: Some(rule.to_text()), ..msg("t", "x") }
}

/// An in-memory outbox for two brokers whose default route needs `need`
/// acknowledgements, with the catch-up window given, and their slots.
async fn on_two_brokers(need: u32, catch_up_ms: Option<u64>) -> (Outbox, Vec<u32>) {
    const A: &str = "mqtt://127.0.0.1:1";
    const B: &str = "mqtt://127.0.0.1:2";
    let o = Outbox::start(Box::new(MemoryStore::new()), OutboxConfig::default()).unwrap();
    let q = Quorum { route: None, members: vec![(0, A.into()), (0, B.into())], need, catch_up_ms, fanout: true };
    let slots = o.configure(vec![A.into(), B.into()], vec![q], Default::default()).await.unwrap().slots;
    (o, slots)
}

fn receipt(by: &str, ids: &[u64]) -> ConsumerReceipt {
    ConsumerReceipt { by: by.into(), producer: "p".into(), ranges: ConsumerReceipt::ranges_of(ids.iter().copied()) }
}

/// A message asking for any one receipt within `wait`, accepted and
/// acknowledged by the broker in `slot`: its id and its handling waiter.
async fn acknowledged_awaiting(o: &Outbox, slot: u32, wait: Duration) -> (u64, oneshot::Receiver<Handling>) {
    let (accepted, _delivered, handled) = o.append_awaiting(asking(&ReceiptRule::any(wait)));
    let id = accepted.await.unwrap();
    o.ack(slot, vec![id]);
    (id, handled)
}

/// A link's standing read of everything after `id`, answered within 10 s
/// (`None`: read again from the oldest).
async fn standing_read_past(o: &Outbox, id: u64, slot: u32) -> Option<steadfast_store::Page> {
    answered(Box::pin(o.next_page(want(&[id], 0), 0, ReadLimit::messages(10), slot))).await
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_message_waits_after_its_acknowledgement_until_a_receipt_counts() {
    block_on(async {
        let (o, slot) = on_one_broker(Box::new(MemoryStore::new())).await;
        let rule =
            ReceiptRule { timeout: Duration::from_secs(60), need: Need::All, from: vec!["a".into(), "b".into()] };
        let (accepted, delivered, handled) = o.append_awaiting(asking(&rule));
        let id = accepted.await.unwrap();
        let plain = o.append(msg("t", "y"), false).0.await.unwrap();
        o.ack(slot, vec![id, plain]);
        assert_eq!(delivered.await.unwrap(), Delivery::Delivered);
        assert_eq!(o.state().totals.count, 1, "delivered, still in the outbox");
        assert!(o.read_after(0, 10, None, None).await.unwrap().is_empty(), "no sender reads what awaits receipts");
        let r = o.report().await.unwrap();
        assert_eq!(r.awaiting.count, 1);
        // A consumer the rule does not name counts for nothing; a repeat
        // of one it names counts once.
        o.receipt(receipt("c", &[id])).await.unwrap();
        o.receipt(receipt("a", &[id, 999])).await.unwrap();
        o.receipt(receipt("a", &[id])).await.unwrap();
        assert_eq!(o.state().totals.count, 1, "one receipt of two");
        o.receipt(receipt("b", &[id])).await.unwrap();
        assert_eq!(handled.await.unwrap(), Handling::Handled(vec!["a".into(), "b".into()]));
        assert_eq!(o.state().totals.count, 0);
        let counters = o.report().await.unwrap().counters;
        let get = |n: &str| counters.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        assert_eq!(get(steadfast_store::RECEIPTS_COUNTED), Some(3));
        assert_eq!(get(steadfast_store::RECEIPTS_HANDLED), Some(1));
    });
}

#[test]
fn without_a_receipt_in_time_a_message_goes_back_into_the_queue_and_keeps_its_id() {
    let dir = tempfile::tempdir().unwrap();
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let (o, slot) = on_one_broker(Box::new(store)).await;
        let (id, handled) = acknowledged_awaiting(&o, slot, Duration::from_millis(300)).await;
        // A link that read it waits for more: the requeue answers that
        // standing read with nothing read (the link reads again from the
        // oldest).
        assert!(standing_read_past(&o, id, slot).await.is_none(), "a page instead of a rewind");
        let mut state = o.watch();
        until("sent again", || state.borrow_and_update().requeued >= 1).await;
        let again = o.read_after(0, 10, Some(slot), None).await.unwrap();
        assert_eq!(again.iter().map(|m| (m.id, m.acks)).collect::<Vec<_>>(), [(id, 0)], "same id, no ack counts");
        o.ack(slot, vec![id]);
        o.receipt(receipt("line1", &[id])).await.unwrap();
        assert_eq!(handled.await.unwrap(), Handling::Handled(vec!["line1".into()]));
        let r = o.report().await.unwrap();
        assert_eq!((r.totals.count, r.awaiting.count), (0, 0));
        assert_eq!(
            r.counters.iter().find(|(k, _)| k == steadfast_store::RECEIPTS_REPUBLISHED).map(|(_, v)| *v),
            Some(1)
        );
        let o2 = o.clone();
        tokio::task::spawn_blocking(move || o2.close()).await.unwrap();
    });
}

/// A joined process (a second `pub` on the same outbox) may be the one
/// whose sweep puts a message back into the queue: the holder's links
/// read it again all the same (their standing reads are answered with a
/// rewind).
#[test]
fn a_requeue_by_another_process_is_read_again_by_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let (o, slot) = on_one_broker(Box::new(store)).await;
        // A wait that no sweep of the holder reaches during the test.
        let (id, _handled) = acknowledged_awaiting(&o, slot, Duration::from_secs(3600)).await;
        assert_eq!(o.report().await.unwrap().awaiting.count, 1);
        // The other process's sweep, as its writer makes it.
        let mut guest = SqliteStore::open_guest(dir.path()).unwrap();
        guest.begin().unwrap();
        guest.requeue_for_receipts(id).unwrap();
        guest.add_counter(steadfast_store::RECEIPTS_REPUBLISHED, 1).unwrap();
        guest.commit().unwrap();
        assert!(standing_read_past(&o, id, slot).await.is_none(), "a page instead of a rewind");
        assert_eq!(o.state().requeued, 1);
        let again = o.read_after(0, 10, Some(slot), None).await.unwrap();
        assert_eq!(again.iter().map(|m| m.id).collect::<Vec<_>>(), [id]);
    });
}

#[test]
fn what_awaits_receipts_survives_a_restart_and_a_deadline_still_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let rule = ReceiptRule::any(Duration::from_secs(3600));
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let (o, slot) = on_one_broker(Box::new(store)).await;
        let mut m = asking(&rule);
        m.policy.expires_ms = Some(steadfast_store::now_ms() + 2_000);
        let (accepted, delivered, _) = o.append_awaiting(m);
        let id = accepted.await.unwrap();
        o.ack(slot, vec![id]);
        assert_eq!(delivered.await.unwrap(), Delivery::Delivered);
        tokio::task::spawn_blocking(move || o.close()).await.unwrap();
    });
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let o = Outbox::start(Box::new(store), OutboxConfig::default()).unwrap();
        let r = o.report().await.unwrap();
        assert_eq!((r.totals.count, r.awaiting.count), (1, 1), "still awaiting its receipt after a restart");
        assert!(o.read_after(0, 10, None, None).await.unwrap().is_empty(), "and not sent again before its wait ends");
        let mut state = o.watch();
        until("expired", || state.borrow_and_update().totals.count == 0).await;
        let r = o.report().await.unwrap();
        assert!(r.drops.contains(&(DropReason::Expired, 1)), "{:?}", r.drops);
        assert_eq!(r.awaiting.count, 0);
        tokio::task::spawn_blocking(move || o.close()).await.unwrap();
    });
}

/// A receipt names ranges, not rows: one that names every sequence number
/// there is visits only the messages that ask for receipts.
#[test]
fn a_receipt_naming_every_number_visits_only_real_rows() {
    block_on(async {
        let (o, slot) = on_one_broker(Box::new(MemoryStore::new())).await;
        let rule = ReceiptRule::any(Duration::from_secs(60));
        let (accepted, _, handled) = o.append_awaiting(asking(&rule));
        let id = accepted.await.unwrap();
        let plain = o.append(msg("t", "y"), false).0.await.unwrap();
        o.ack(slot, vec![id]);
        let everything = ConsumerReceipt { by: "c".into(), producer: "p".into(), ranges: vec![(0, u64::MAX)] };
        let t0 = std::time::Instant::now();
        o.receipt(everything).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
        assert_eq!(handled.await.unwrap(), Handling::Handled(vec!["c".into()]));
        assert_eq!(o.read_after(0, 10, None, None).await.unwrap().iter().map(|m| m.id).collect::<Vec<_>>(), [plain]);
    });
}

/// Fanout that needs both brokers: a receipt that comes before the second
/// acknowledgement is noted, and the message leaves, handled, once both
/// brokers have it; never before, so no broker of the set misses it.
#[test]
fn in_fanout_a_receipt_before_the_quorum_waits_for_it() {
    block_on(async {
        let (o, slots) = on_two_brokers(2, None).await;
        let (accepted, _, handled) = o.append_awaiting(asking(&ReceiptRule::any(Duration::from_secs(60))));
        let id = accepted.await.unwrap();
        o.ack(slots[0], vec![id]);
        o.receipt(receipt("c", &[id])).await.unwrap();
        assert_eq!(o.read_after(0, 10, Some(slots[1]), None).await.unwrap().len(), 1, "B still gets it");
        assert_eq!(o.state().totals.count, 1);
        o.ack(slots[1], vec![id]);
        assert_eq!(handled.await.unwrap(), Handling::Handled(vec!["c".into()]));
        let r = o.report().await.unwrap();
        assert_eq!((r.totals.count, r.awaiting.count), (0, 0));
    });
}

/// A fanout catch-up window that passes while a message awaits receipts
/// does not end its wait: the catch-up is about brokers, not consumers.
#[test]
fn the_catch_up_sweep_leaves_what_awaits_receipts() {
    block_on(async {
        let (o, slots) = on_two_brokers(1, Some(1)).await;
        let (accepted, delivered, _handled) = o.append_awaiting(asking(&ReceiptRule::any(Duration::from_secs(3600))));
        let id = accepted.await.unwrap();
        o.ack(slots[0], vec![id]);
        assert_eq!(delivered.await.unwrap(), Delivery::Delivered);
        // An absence has no event to wait for: two sweeps (one a second,
        // the message's window long past) get their chance to end it.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let r = o.report().await.unwrap();
        assert_eq!((r.totals.count, r.awaiting.count), (1, 1), "still awaiting its receipt");
    });
}
