//! The sync behind the writer. With a store whose commits can be synced
//! from another thread ([`crate::Store::log_sync`]: SQLite's write-ahead
//! log), the writer commits without syncing and hands the batch's replies
//! to this thread, which syncs the log once for every batch that came
//! since its last sync and only then sends them. The writer goes on with
//! the next batch meanwhile: a broker's acknowledgement no longer waits
//! for the sync of a commit that holds nothing of it (docs/design.md,
//! "The writer thread").
//!
//! Replies go out in the order of their batches, whichever thread sends
//! them: a batch that needs no sync is answered by the writer itself
//! only when nothing waits here, else it queues behind what does. So
//! nobody hears of a commit (an acceptance, a page to send) before it is
//! on the disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{broadcast, oneshot};

use super::request::AcceptReply;
use super::{AppendError, Delivery, Dropped, Handling};
use crate::{LogSync, StoreError};

/// A reply that carries a value, or the error that took its batch's sync.
type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// What one batch tells its callers, taken out of the writer so that it
/// can go after the batch's sync.
#[derive(Default)]
pub(super) struct Replies {
    pub(super) accepted: Vec<AcceptReply>,
    /// Redeliveries of what a bridge queued before: the id it got.
    pub(super) known: Vec<(oneshot::Sender<Result<u64, AppendError>>, u64)>,
    pub(super) deliveries: Vec<(oneshot::Sender<Delivery>, Delivery)>,
    pub(super) handlings: Vec<(oneshot::Sender<Handling>, Handling)>,
    pub(super) drops: Vec<Dropped>,
    /// Every other reply: writes' confirmations, reads' answers.
    pub(super) answers: Vec<Answer>,
}

/// Where replies are told: the acceptance histogram and the drop events.
#[derive(Clone)]
pub(super) struct Tellers {
    pub(super) accept: metrics::Histogram,
    pub(super) dropped: broadcast::Sender<Dropped>,
}

impl Replies {
    /// A reply of `value` (an error instead if the batch's sync fails).
    pub(super) fn answer<T: Send + 'static>(&mut self, reply: oneshot::Sender<Result<T, StoreError>>, value: T) {
        self.answers.push(Box::new(move |failed: Option<&StoreError>| {
            let _ = reply.send(match failed {
                None => Ok(value),
                Some(e) => Err(e.clone_for_reply()),
            });
        }));
    }

    /// A read's answer, as it came (an error instead if the sync fails).
    pub(super) fn read<T: Send + 'static>(
        &mut self,
        reply: oneshot::Sender<Result<T, StoreError>>,
        value: Result<T, StoreError>,
    ) {
        self.answers.push(Box::new(move |failed: Option<&StoreError>| {
            let _ = reply.send(match failed {
                None => value,
                Some(e) => Err(e.clone_for_reply()),
            });
        }));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.accepted.is_empty()
            && self.known.is_empty()
            && self.deliveries.is_empty()
            && self.handlings.is_empty()
            && self.drops.is_empty()
            && self.answers.is_empty()
    }

    /// Sends every reply: the values, or, when the sync they needed
    /// failed, the error (waiters of deliveries and drops are then left to
    /// see the outbox closed: what was committed is no longer known to be
    /// on the disk).
    pub(super) fn send(self, tell: &Tellers, failed: Option<&StoreError>) {
        for (reply, r, at) in self.accepted {
            let r = match (failed, r) {
                (Some(e), Ok(_)) => Err(AppendError::Store(e.clone_for_reply())),
                (_, r) => r,
            };
            if r.is_ok() {
                tell.accept.record(at.elapsed().as_secs_f64());
            }
            let _ = reply.send(r);
        }
        for (reply, id) in self.known {
            let _ = reply.send(match failed {
                None => Ok(id),
                Some(e) => Err(AppendError::Store(e.clone_for_reply())),
            });
        }
        for a in self.answers {
            a(failed);
        }
        if failed.is_some() {
            return;
        }
        for (tx, d) in self.deliveries {
            let _ = tx.send(d);
        }
        for (tx, h) in self.handlings {
            let _ = tx.send(h);
        }
        for d in self.drops {
            let _ = tell.dropped.send(d);
        }
    }
}

struct Item {
    replies: Replies,
    /// The batch committed something that must be on the disk before its
    /// replies go.
    sync: bool,
}

/// The writer's handle on the sync thread.
pub(super) struct Syncer {
    tx: Option<mpsc::Sender<Item>>,
    /// Items handed over, and (by the thread) items sent.
    queued: u64,
    sent: Arc<AtomicU64>,
    /// The sync that failed: the writer stops (docs/design.md).
    failed: Arc<Mutex<Option<StoreError>>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    pub(super) fn start(log: Box<dyn LogSync>, tell: Tellers) -> Result<Syncer, StoreError> {
        let (tx, rx) = mpsc::channel();
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(None));
        let (s, f) = (sent.clone(), failed.clone());
        let thread = std::thread::Builder::new()
            .name("steadfast-sync".into())
            .spawn(move || run(rx, log, tell, s, f))
            .map_err(|source| StoreError::Io { path: "<sync thread>".into(), source })?;
        Ok(Syncer { tx: Some(tx), queued: 0, sent, failed, thread: Some(thread) })
    }

    /// Whether replies handed over earlier are still to go.
    pub(super) fn pending(&self) -> bool {
        self.sent.load(Ordering::Acquire) < self.queued
    }

    /// Hands over a batch's replies, to go after a sync if `sync`.
    pub(super) fn push(&mut self, replies: Replies, sync: bool) {
        if let Some(tx) = &self.tx {
            if tx.send(Item { replies, sync }).is_ok() {
                self.queued += 1;
            }
        }
    }

    /// Why the log could not be synced, once it could not.
    pub(super) fn failure(&self) -> Option<StoreError> {
        self.failed.lock().ok().and_then(|f| f.as_ref().map(StoreError::clone_for_reply))
    }

    /// Sends what is handed over, after its sync, and ends the thread.
    pub(super) fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.finish();
    }
}

fn run(
    rx: mpsc::Receiver<Item>,
    mut log: Box<dyn LogSync>,
    tell: Tellers,
    sent: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<StoreError>>>,
) {
    let disk_sync = metrics::histogram!("steadfast_disk_sync_seconds");
    let mut broken: Option<StoreError> = None;
    while let Ok(first) = rx.recv() {
        // Everything handed over by now was committed before it: one sync
        // covers them all.
        let mut items = vec![first];
        items.extend(rx.try_iter());
        if broken.is_none() && items.iter().any(|i| i.sync) {
            let at = std::time::Instant::now();
            if let Err(e) = log.sync() {
                tracing::error!(error = %e, "outbox: the log cannot be synced; nothing more is accepted until the outbox is opened again");
                if let Ok(mut f) = failed.lock() {
                    *f = Some(e.clone_for_reply());
                }
                broken = Some(e);
            }
            disk_sync.record(at.elapsed().as_secs_f64());
        }
        // After a failed sync nothing is told as done: even a read may
        // have seen what the disk may not hold.
        let n = items.len() as u64;
        for i in items {
            i.replies.send(&tell, broken.as_ref());
        }
        sent.fetch_add(n, Ordering::Release);
    }
}
