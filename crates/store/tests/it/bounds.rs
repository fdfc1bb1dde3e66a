use std::time::Duration;

use steadfast_core::DropReason;
use steadfast_store::{AppendError, Delivery, MemoryStore, Outbox, OutboxConfig, Overflow};

use crate::{block_on, msg};

fn outbox(max_messages: u64, overflow: Overflow) -> Outbox {
    let cfg = OutboxConfig { max_messages: Some(max_messages), max_bytes: None, overflow };
    Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap()
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
        let left: Vec<Vec<u8>> = o.read_after(0, 10, None).await.unwrap().into_iter().map(|m| m.msg.payload).collect();
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
        let d = o.append(msg("t", "d"), false).0;
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut c).await.is_err(), "c must wait for room");
        o.remove(vec![a], Delivery::Delivered);
        let c = c.await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(100), d).await.is_err(), "d still waits");
        let page = o.read_after(0, 10, None).await.unwrap();
        assert_eq!(page.last().unwrap().id, c);
        assert_eq!(o.state().totals.count, 2);
    });
}

#[test]
fn bytes_are_bounded_too() {
    block_on(async {
        let cfg = OutboxConfig { max_messages: None, max_bytes: Some(100), overflow: Overflow::Reject };
        let o = Outbox::start(Box::new(MemoryStore::new()), cfg).unwrap();
        o.append(msg("t", vec![0u8; 60]), false).0.await.unwrap();
        assert!(o.append(msg("t", vec![0u8; 60]), false).0.await.is_err());
        let err = o.append(msg("t", vec![0u8; 500]), false).0.await.unwrap_err();
        assert!(err.to_string().contains("alone"), "{err}");
    });
}
