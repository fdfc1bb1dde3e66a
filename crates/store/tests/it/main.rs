//! Outbox tests: durability, bounds, damage recovery, full disk, and
//! reading files written by earlier releases.

#![allow(missing_docs)]

mod bounds;
mod compat;
mod deferred;
mod follow;
mod idle;
mod inbox;
mod power;
mod quorum;
mod receipts;
mod recovery;
mod sources;
mod summary;
mod tail;

use steadfast_core::{Properties, Qos};
use steadfast_store::{NewMessage, Policy};

pub fn msg(topic: &str, payload: impl Into<Vec<u8>>) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        payload: payload.into(),
        qos: Qos::AtLeastOnce,
        retain: false,
        props: Properties::default(),
        created_ms: 1_700_000_000_000,
        route: None,
        policy: Policy::default(),
        receipts: None,
    }
}

/// Each kind of store, named, for tests that must hold for both: the
/// SQLite one's directory goes with it (kept until the caller drops it).
pub fn both_stores() -> Vec<(&'static str, Box<dyn steadfast_store::Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, _) = steadfast_store::SqliteStore::open(dir.path()).unwrap();
    vec![("memory", Box::new(steadfast_store::MemoryStore::new()), None), ("sqlite", Box::new(sqlite), Some(dir))]
}

/// An outbox over `store` configured for one broker, and its slot.
pub async fn on_one_broker(store: Box<dyn steadfast_store::Store>) -> (steadfast_store::Outbox, u32) {
    let o = steadfast_store::Outbox::start(store, steadfast_store::OutboxConfig::default()).unwrap();
    let slot = o.configure(vec!["mqtt://127.0.0.1:1".into()], vec![], Default::default()).await.unwrap().slots[0];
    (o, slot)
}

/// Runs a future to completion on a small runtime (the outbox is sync
/// underneath; its replies are futures).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// The ids an outbox holds, in order.
pub fn recovery_ids(store: &mut steadfast_store::SqliteStore) -> Vec<u64> {
    use steadfast_store::Store;
    store.read_after(0, usize::MAX >> 1, None, None).unwrap().into_iter().map(|m| m.id).collect()
}
