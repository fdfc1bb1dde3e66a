//! A link's standing read ([`Outbox::next_page`]): the writer answers it
//! at once when something is there to read, and otherwise right after the
//! commit that brings it (its own, or another process's), with the page
//! the link wants: the highest priority it has room for, only what its
//! broker lacks, and how far the page answers.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use steadfast_core::engine::ReadWant;
use steadfast_store::{Outbox, OutboxConfig, Page, ReadLimit, SqliteStore, StoreError};

use crate::{block_on, both_stores, msg, on_one_broker};

pub(crate) type Follow<'a> = Pin<Box<dyn Future<Output = Result<Option<Page>, StoreError>> + 'a>>;

/// A want read after `after` (per priority, from the lowest; the rest 0),
/// with room for every priority from `lowest` up.
pub(crate) fn want(after: &[u64], lowest: usize) -> ReadWant {
    ReadWant {
        after: std::array::from_fn(|p| after.get(p).copied().unwrap_or(0)),
        room: std::array::from_fn(|p| p >= lowest),
    }
}

/// Sends the standing read and makes sure the writer has taken it and
/// holds it: a read sent after it is answered after it, in order.
async fn park<'a>(o: &'a Outbox, w: ReadWant, requeued: u64, slot: u32) -> Follow<'a> {
    let mut f: Follow<'a> = Box::pin(o.next_page(w, requeued, ReadLimit::messages(100), slot));
    assert!(poll_once(&mut f).await.is_none(), "answered with nothing to read");
    o.report().await.unwrap();
    assert!(poll_once(&mut f).await.is_none(), "answered with nothing to read");
    f
}

async fn poll_once<T>(f: &mut Pin<Box<dyn Future<Output = T> + '_>>) -> Option<T> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match f.as_mut().poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

pub(crate) async fn answered(f: Follow<'_>) -> Option<Page> {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("not answered within 10 s").unwrap()
}

fn ids(p: &Page) -> Vec<u64> {
    p.messages.iter().map(|m| m.id).collect()
}

fn with_priority(topic: &str, priority: u8) -> steadfast_store::NewMessage {
    let mut m = msg(topic, "x");
    m.policy.priority = priority;
    m
}

#[test]
fn a_standing_read_is_answered_by_the_commit_that_brings_something_to_read() {
    for (kind, store, _dir) in both_stores() {
        block_on(async {
            let (o, slot) = on_one_broker(store).await;
            let f = park(&o, want(&[], 0), 0, slot).await;
            let id = o.append(msg("t", "x"), false).0.await.unwrap();
            let page = answered(f).await.expect("a page, not a rewind");
            assert_eq!((ids(&page), page.priority, page.upto), (vec![id], 0, id), "{kind}");
            // With something unread already, the answer comes at once.
            let page = o.next_page(want(&[], 0), 0, ReadLimit::messages(100), slot).await.unwrap().unwrap();
            assert_eq!(ids(&page), vec![id], "{kind}");
            // Read up to there: the next one waits again.
            let f = park(&o, want(&[id], 0), 0, slot).await;
            let next = o.append(msg("t", "y"), false).0.await.unwrap();
            assert_eq!(ids(&answered(f).await.unwrap()), vec![next], "{kind}");
        });
    }
}

#[test]
fn a_standing_read_takes_only_the_priorities_it_has_room_for_and_what_its_broker_lacks() {
    for (kind, store, _dir) in both_stores() {
        block_on(async {
            let (o, slot) = on_one_broker(store).await;
            // No room for the lowest priority: its message does not answer.
            let f = park(&o, want(&[], 1), 0, slot).await;
            let mut f = f;
            o.append(with_priority("low", 0), false).0.await.unwrap();
            o.report().await.unwrap();
            assert!(poll_once(&mut f).await.is_none(), "{kind}: answered with a priority it has no room for");
            let high = o.append(with_priority("high", 2), false).0.await.unwrap();
            let page = answered(f).await.unwrap();
            assert_eq!((ids(&page), page.priority, page.upto), (vec![high], 2, high), "{kind}");
            // What the broker already acknowledged is not in the page; the
            // page still says how far it answers, so the link moves on.
            let acked = o.append(with_priority("high", 2), false).0.await.unwrap();
            o.ack(slot, vec![acked]);
            let page = o.next_page(want(&[0, 0, high], 1), 0, ReadLimit::messages(100), slot).await.unwrap().unwrap();
            assert_eq!((ids(&page), page.upto), (vec![], acked), "{kind}");
        });
    }
}

/// The outbox of a `pub` that joined the one in `dir`: its own connection,
/// its own writer.
fn guest_outbox(dir: &std::path::Path) -> Outbox {
    Outbox::start(Box::new(SqliteStore::open_guest(dir).unwrap()), OutboxConfig::default()).unwrap()
}

#[test]
fn another_process_s_commit_answers_a_standing_read() {
    let dir = tempfile::tempdir().unwrap();
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let (o, slot) = on_one_broker(Box::new(store)).await;
        let f = park(&o, want(&[], 0), 0, slot).await;
        let guest = guest_outbox(dir.path());
        let id = guest.append(msg("t", "from the guest"), false).0.await.unwrap();
        let page = answered(f).await.unwrap();
        assert_eq!((ids(&page), page.upto), (vec![id], id));
        assert_eq!(page.messages[0].msg.payload, b"from the guest");
    });
}

/// A joined `pub`'s message can be read, sent and acknowledged by the
/// holder before the holder's writer reads the counts again (every 200
/// ms): its count was at 0 and wrapped (the writer thread panicked in a
/// debug build; found with both cores loaded). It now reads them again.
#[test]
fn a_joined_pub_s_message_delivered_before_the_holder_counted_it_leaves_the_counts_right() {
    let dir = tempfile::tempdir().unwrap();
    block_on(async {
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let (o, slot) = on_one_broker(Box::new(store)).await;
        let guest = guest_outbox(dir.path());
        let id = guest.append(msg("t", "from the guest"), false).0.await.unwrap();
        // Read and acknowledged at once, as a link whose page came with
        // the holder's own commit would.
        assert_eq!(o.read_after(0, 10, Some(slot), None).await.unwrap().len(), 1);
        o.ack(slot, vec![id]);
        let report = o.report().await.expect("the writer lives on");
        assert_eq!(report.totals.count, 0, "{:?}", report.totals);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while o.state().totals.count != 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(o.state().totals.count, 0, "read again from the store");
        // And the outbox goes on counting.
        o.append(msg("t", "mine"), false).0.await.unwrap();
        assert_eq!(o.report().await.unwrap().totals.count, 1);
    });
}

#[test]
fn a_page_ends_at_the_message_that_reaches_its_bytes_read_from_memory_or_from_disk() {
    // Topic "t" and payloads of 9, 19, 29 and 39 bytes: 10, 20, 30, 40.
    let page_of = |o: &Outbox, slot, bytes| {
        let limit = ReadLimit { count: 3, bytes };
        block_on(async { ids(&o.next_page(want(&[], 0), 0, limit, slot).await.unwrap().unwrap()) })
    };
    let check = |kind: &str, o: &Outbox, slot| {
        assert_eq!(page_of(o, slot, 1), [1], "{kind}: one message at least");
        assert_eq!(page_of(o, slot, 11), [1, 2], "{kind}");
        assert_eq!(page_of(o, slot, 31), [1, 2, 3], "{kind}");
        assert_eq!(page_of(o, slot, u64::MAX), [1, 2, 3], "{kind}: the count still bounds it");
    };
    for (kind, store, dir) in both_stores() {
        let (o, slot) = block_on(async {
            let (o, slot) = on_one_broker(store).await;
            for n in [9, 19, 29, 39] {
                o.append(msg("t", vec![b'x'; n]), false).0.await.unwrap();
            }
            (o, slot)
        });
        check(kind, &o, slot);
        o.close();
        // Opened again, the outbox reads its pages from SQLite, not from
        // the tail it keeps of what it inserted.
        if let Some(dir) = dir {
            let (store, _) = SqliteStore::open(dir.path()).unwrap();
            let (o, slot) = block_on(on_one_broker(Box::new(store)));
            check("sqlite, opened again", &o, slot);
            o.close();
        }
    }
}
