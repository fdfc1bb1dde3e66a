//! Waiting for an empty outbox ([`Outbox::wait_idle`]): it returns once
//! nothing this run may send is queued, and the watch behind it changes
//! only when the outbox empties or fills, not at every batch of the writer
//! (a wake-up of the waiting thread every few messages otherwise,
//! docs/performance.md, session 32).

use std::time::Duration;

use crate::{block_on, both_stores, msg, on_one_broker};

#[test]
fn the_idle_watch_changes_only_when_the_outbox_empties_or_fills() {
    for (kind, store, _dir) in both_stores() {
        block_on(async {
            let (o, slot) = on_one_broker(store).await;
            let mut idle = o.watch_idle();
            assert!(*idle.borrow_and_update(), "{kind}: an empty outbox is idle");
            let a = o.append(msg("t", "a"), false).0.await.unwrap();
            let b = o.append(msg("t", "b"), false).0.await.unwrap();
            let c = o.append(msg("t", "c"), false).0.await.unwrap();
            assert!(idle.has_changed().unwrap(), "{kind}: the first message made it busy");
            assert!(!*idle.borrow_and_update(), "{kind}: three queued");
            let mut state = o.watch();
            state.mark_unchanged();
            // Two batches that deliver one message each: the state moves,
            // the idle watch does not.
            for id in [a, b] {
                o.ack(slot, vec![id]);
                o.report().await.unwrap();
            }
            assert!(state.has_changed().unwrap(), "{kind}: deliveries change the state");
            assert_eq!(state.borrow_and_update().totals.count, 1, "{kind}");
            assert!(!idle.has_changed().unwrap(), "{kind}: still busy: nothing to tell");
            let waiting = o.wait_idle();
            o.ack(slot, vec![c]);
            tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("idle once every message was delivered");
            assert!(idle.has_changed().unwrap() && *idle.borrow_and_update(), "{kind}");
            assert_eq!(o.state().totals.count, 0, "{kind}: idle is told with the counts");
            // A message moved aside as poison is kept, and never sent in
            // this run: idle again once it is the only one.
            let d = o.append(msg("t", "d"), false).0.await.unwrap();
            assert!(idle.has_changed().unwrap() && !*idle.borrow_and_update(), "{kind}");
            let waiting = o.wait_idle();
            o.poison(slot, d, steadfast_store::PoisonCause::Closed(3));
            tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("idle once the last one is poison");
            let s = o.state();
            assert_eq!((s.totals.count, s.poisoned), (1, 1), "{kind}: idle is told after the state");
        });
    }
}
