//! The sync behind the writer: commits go unsynced, a thread of their own
//! syncs the log, and nobody hears of a commit (its acceptance, a page
//! that holds it) before that sync returned. A broker's acknowledgement
//! does not wait for it. The log here is a gate the test opens and shuts;
//! the power-cut tests (`power.rs`) run the same path on SQLite's log.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use steadfast_store::{Delivery, LogSync, MemoryStore, StoreError};

use crate::{block_on, msg, on_one_broker};

#[derive(Default)]
struct GateState {
    shut: bool,
    failing: bool,
    entered: u64,
}

/// A log whose syncs wait while the gate is shut, and fail once told to.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<GateState>, Condvar)>);

impl Gate {
    fn set(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.0 .0.lock().unwrap());
        self.0 .1.notify_all();
    }

    fn entered(&self) -> u64 {
        self.0 .0.lock().unwrap().entered
    }

    /// Waits until `n` syncs have begun.
    fn wait_entered(&self, n: u64) {
        let (state, cv) = &*self.0;
        let (s, timeout) =
            cv.wait_timeout_while(state.lock().unwrap(), Duration::from_secs(10), |s| s.entered < n).unwrap();
        assert!(!timeout.timed_out(), "sync {n} never began (entered {})", s.entered);
    }
}

impl LogSync for Gate {
    fn sync(&mut self) -> Result<(), StoreError> {
        let (state, cv) = &*self.0;
        let mut s = state.lock().unwrap();
        s.entered += 1;
        cv.notify_all();
        let s = cv.wait_while(s, |s| s.shut && !s.failing).unwrap();
        if s.failing {
            let source = std::io::Error::other("the test's disk failed");
            return Err(StoreError::Io { path: "gate".into(), source });
        }
        Ok(())
    }
}

/// Whether `f` is still pending after a moment (it must be: what it
/// waits for is sent only after a sync that the gate holds).
async fn still_pending<F: std::future::Future + Unpin>(f: &mut F) -> bool {
    tokio::time::timeout(Duration::from_millis(50), f).await.is_err()
}

#[test]
fn nothing_is_told_of_a_commit_before_its_sync_and_an_acknowledgement_does_not_wait_for_it() {
    let gate = Gate::default();
    let store = MemoryStore::new().syncing_with(Box::new(gate.clone()));
    block_on(async {
        let (o, slot) = on_one_broker(Box::new(store)).await;
        let (accepted, first) = o.append(msg("t", "one"), true);
        let one = accepted.await.unwrap();

        // The next commit's sync is held.
        gate.set(|s| s.shut = true);
        let entered = gate.entered();
        let (mut accepted, _) = o.append(msg("t", "two"), false);
        gate.wait_entered(entered + 1);
        assert!(still_pending(&mut accepted).await, "accepted before its sync");

        // The broker acknowledges the first: told at once, not after the
        // second's sync.
        o.ack(slot, vec![one]);
        let told = tokio::time::timeout(Duration::from_secs(10), first.unwrap()).await;
        assert_eq!(told.expect("delivery waited for another commit's sync").unwrap(), Delivery::Delivered);
        assert!(still_pending(&mut accepted).await);

        // A read sees the second message committed: answered after its sync.
        let mut read = Box::pin(o.read_after(0, 10, Some(slot), None));
        assert!(still_pending(&mut read).await, "a page told before its sync");

        gate.set(|s| s.shut = false);
        let two = accepted.await.unwrap();
        let page: Vec<u64> = read.await.unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(page, vec![two]);
        // The acknowledgement's commit was synced by a later sync, or is
        // now (the idle writer syncs within 0.1 s).
        gate.wait_entered(entered + 2);
    });
}

#[test]
fn a_log_that_cannot_be_synced_ends_the_promises() {
    let gate = Gate::default();
    let store = MemoryStore::new().syncing_with(Box::new(gate.clone()));
    block_on(async {
        let (o, _) = on_one_broker(Box::new(store)).await;
        o.append(msg("t", "one"), false).0.await.unwrap();
        gate.set(|s| s.failing = true);
        let err = o.append(msg("t", "two"), false).0.await.unwrap_err();
        assert!(err.to_string().contains("the test's disk failed"), "{err}");
        // Nothing more is accepted: the writer stopped.
        let err = o.append(msg("t", "three"), false).0.await.unwrap_err();
        assert!(err.to_string().contains("the test's disk failed") || err.to_string().contains("closed"), "{err}");
        assert!(o.report().await.is_err());
    });
}
