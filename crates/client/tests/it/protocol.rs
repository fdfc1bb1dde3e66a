//! Protocol corner cases against a scripted broker, with a store that can
//! fail or stall on command. Each test pins a bug found in review.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use steadfast::{Client, Delivery, Message, ProtocolVersion, PublishError, Qos};
use steadfast_core::{DropReason, Properties, Stage};
use steadfast_store::{
    BrokerRecord, Entry, InboxStore, MemoryStore, NewMessage, Outbox, OutboxConfig, ReadLimit, SourceStore, Store,
    StoreError, StoredMessage, Totals,
};
use steadfast_testkit::{wait_until, Reply, ScriptedBroker};

use crate::{config, connect_failed, next_event};

/// Faults to inject into the store.
#[derive(Default)]
struct Faults {
    /// This many `set_wire` calls fail.
    fail_set_wire: AtomicU32,
    /// This many `remove` calls fail.
    fail_remove: AtomicU32,
    /// This many commits fail.
    fail_commit: AtomicU32,
    /// The n-th `read_after` call (1-based) stalls until `release` is set.
    stall_read: AtomicU32,
    stalled: AtomicBool,
    release: AtomicBool,
    reads: AtomicU32,
    /// Every commit, in order, and the one under way.
    commits: Mutex<(Vec<Commit>, Commit)>,
}

/// What a commit held, and whether it was to be synced.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Commit {
    /// When it ended.
    at: Option<std::time::Instant>,
    synced: bool,
    /// A message was added.
    inserted: bool,
    /// Brokers' acknowledgements applied.
    acks: u32,
    /// The writer's sync mark (`meta.synced_ms`) was written.
    marked: bool,
}

impl Faults {
    fn note(&self, f: impl FnOnce(&mut Commit)) {
        f(&mut self.commits.lock().unwrap().1);
    }

    fn commits(&self) -> Vec<Commit> {
        self.commits.lock().unwrap().0.clone()
    }
}

/// The in-memory store with faults.
struct FaultyStore {
    inner: MemoryStore,
    faults: Arc<Faults>,
}

impl Store for FaultyStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.inner.begin()
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        let f = &self.faults.fail_commit;
        if f.load(SeqCst) > 0 {
            f.fetch_sub(1, SeqCst);
            return Err(StoreError::WriteFailed("injected fault".into()));
        }
        self.inner.commit()?;
        let mut c = self.faults.commits.lock().unwrap();
        let next = Commit { synced: c.1.synced, ..Commit::default() };
        let done = std::mem::replace(&mut c.1, next);
        c.0.push(Commit { at: Some(std::time::Instant::now()), ..done });
        Ok(())
    }
    fn set_synced(&mut self, synced: bool) {
        self.faults.note(|c| c.synced = synced);
    }
    fn rollback(&mut self) {
        self.inner.rollback()
    }
    fn insert(&mut self, m: &NewMessage) -> Result<u64, StoreError> {
        self.faults.note(|c| c.inserted = true);
        self.inner.insert(m)
    }
    fn entry(&mut self, id: u64) -> Result<Option<Entry>, StoreError> {
        self.inner.entry(id)
    }
    fn topic(&mut self, id: u64) -> Result<Option<String>, StoreError> {
        self.inner.topic(id)
    }
    fn ack(&mut self, id: u64, slot: u32) -> Result<Option<Entry>, StoreError> {
        self.faults.note(|c| c.acks += 1);
        self.inner.ack(id, slot)
    }
    fn set_done(&mut self, id: u64) -> Result<(), StoreError> {
        self.inner.set_done(id)
    }
    fn await_receipts(&mut self, id: u64, due_ms: u64, now_ms: u64) -> Result<(), StoreError> {
        self.inner.await_receipts(id, due_ms, now_ms)
    }
    fn add_receipt(&mut self, id: u64, by: &str) -> Result<Vec<String>, StoreError> {
        self.inner.add_receipt(id, by)
    }
    fn asking_between(&mut self, first: u64, last: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        self.inner.asking_between(first, last, limit)
    }
    fn receipts_of(&mut self, id: u64) -> Result<Vec<String>, StoreError> {
        self.inner.receipts_of(id)
    }
    fn clear_receipts(&mut self, id: u64) -> Result<(), StoreError> {
        self.inner.clear_receipts(id)
    }
    fn receipts_due(&mut self, now_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        self.inner.receipts_due(now_ms, limit)
    }
    fn requeue_for_receipts(&mut self, id: u64) -> Result<(), StoreError> {
        self.inner.requeue_for_receipts(id)
    }
    fn awaiting(&mut self) -> Result<steadfast_store::Awaiting, StoreError> {
        self.inner.awaiting()
    }
    fn lapsed(&mut self, r: Option<&str>, m: u64, cutoff: u64, n: usize) -> Result<Vec<(u64, u64)>, StoreError> {
        self.inner.lapsed(r, m, cutoff, n)
    }
    fn routes(&mut self) -> Result<Vec<(Option<String>, u64)>, StoreError> {
        self.inner.routes()
    }
    fn retag(&mut self, from: Option<&str>, to: Option<&str>) -> Result<u64, StoreError> {
        self.inner.retag(from, to)
    }
    fn lag(&mut self, slot: u32) -> Result<u64, StoreError> {
        self.inner.lag(slot)
    }
    fn poison(
        &mut self,
        id: u64,
        slot: u32,
        cause: steadfast_store::PoisonCause,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        self.inner.poison(id, slot, cause, at_ms)
    }
    fn poisoned(&mut self) -> Result<Vec<steadfast_store::Poisoned>, StoreError> {
        self.inner.poisoned()
    }
    fn unpoison(&mut self, id: u64) -> Result<bool, StoreError> {
        self.inner.unpoison(id)
    }
    fn assign_slots(&mut self, urls: &[String]) -> Result<Vec<u32>, StoreError> {
        self.inner.assign_slots(urls)
    }
    fn slots(&mut self) -> Result<Vec<(String, u32)>, StoreError> {
        self.inner.slots()
    }
    fn add_missed(&mut self, url: &str, n: u64) -> Result<(), StoreError> {
        self.inner.add_missed(url, n)
    }
    fn missed(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.missed()
    }
    fn remove(&mut self, id: u64) -> Result<bool, StoreError> {
        let f = &self.faults.fail_remove;
        if f.load(SeqCst) > 0 {
            f.fetch_sub(1, SeqCst);
            return Err(StoreError::WriteFailed("injected fault".into()));
        }
        self.inner.remove(id)
    }
    fn set_wire(&mut self, slot: u32, id: u64, w: Option<(u16, Stage)>) -> Result<(), StoreError> {
        let f = &self.faults.fail_set_wire;
        if f.load(SeqCst) > 0 {
            f.fetch_sub(1, SeqCst);
            return Err(StoreError::WriteFailed("injected fault".into()));
        }
        self.inner.set_wire(slot, id, w)
    }
    fn read_page(
        &mut self,
        after: u64,
        limit: ReadLimit,
        slot: Option<u32>,
        priority: Option<u8>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let page = self.inner.read_page(after, limit, slot, priority);
        let n = self.faults.reads.fetch_add(1, SeqCst) + 1;
        if n == self.faults.stall_read.load(SeqCst) {
            self.faults.stalled.store(true, SeqCst);
            while !self.faults.release.load(SeqCst) {
                std::thread::yield_now();
            }
        }
        page
    }
    fn bound(&mut self, slot: u32) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.bound(slot)
    }
    fn oldest(&mut self, limit: usize, deadline: Option<bool>) -> Result<Vec<(u64, u64)>, StoreError> {
        self.inner.oldest(limit, deadline)
    }
    fn newest_by_priority(&mut self) -> Result<Vec<(u8, u64)>, StoreError> {
        self.inner.newest_by_priority()
    }
    fn add_attempt(&mut self, id: u64) -> Result<(), StoreError> {
        self.inner.add_attempt(id)
    }
    fn expired(&mut self, now_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        self.inner.expired(now_ms, limit)
    }
    fn next_expiry(&mut self) -> Result<Option<u64>, StoreError> {
        self.inner.next_expiry()
    }
    fn deadline_totals(&mut self) -> Result<Totals, StoreError> {
        self.inner.deadline_totals()
    }
    fn superseded(&mut self, topic: &str, route: Option<&str>) -> Result<Vec<u64>, StoreError> {
        self.inner.superseded(topic, route)
    }
    fn newest_id(&mut self) -> Result<Option<u64>, StoreError> {
        self.inner.newest_id()
    }
    fn last_id(&mut self) -> Result<u64, StoreError> {
        self.inner.last_id()
    }
    fn totals(&mut self) -> Result<Totals, StoreError> {
        self.inner.totals()
    }
    fn oldest_created_ms(&mut self) -> Result<Option<u64>, StoreError> {
        self.inner.oldest_created_ms()
    }
    fn add_drop(&mut self, r: DropReason, id: Option<u64>) -> Result<(), StoreError> {
        self.inner.add_drop(r, id)
    }
    fn drop_log(&mut self) -> Result<Vec<(u64, DropReason)>, StoreError> {
        self.inner.drop_log()
    }
    fn drops(&mut self) -> Result<Vec<(DropReason, u64)>, StoreError> {
        self.inner.drops()
    }
    fn meta(&mut self, k: &str) -> Result<Option<String>, StoreError> {
        self.inner.meta(k)
    }
    fn set_meta(&mut self, k: &str, v: &str) -> Result<(), StoreError> {
        if k == "synced_ms" {
            self.faults.note(|c| c.marked = true);
        }
        self.inner.set_meta(k, v)
    }
    fn set_broker(&mut self, r: &BrokerRecord) -> Result<(), StoreError> {
        self.inner.set_broker(r)
    }
    fn brokers(&mut self) -> Result<Vec<BrokerRecord>, StoreError> {
        self.inner.brokers()
    }
}

impl InboxStore for FaultyStore {
    fn inbox_seen(&mut self, ids: &[(String, u64)]) -> Result<Vec<bool>, StoreError> {
        self.inner.inbox_seen(ids)
    }
    fn inbox_high(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.inbox_high()
    }
    fn inbox_record_runs(&mut self, runs: &[steadfast_store::InboxRun], now_ms: u64) -> Result<(), StoreError> {
        self.inner.inbox_record_runs(runs, now_ms)
    }
    fn inbox_prune(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        self.inner.inbox_prune(before_ms, keep)
    }
    fn inbox_len(&mut self) -> Result<u64, StoreError> {
        self.inner.inbox_len()
    }
    fn inbox_bytes(&mut self) -> Result<u64, StoreError> {
        self.inner.inbox_bytes()
    }
    fn add_counter(&mut self, name: &str, n: u64) -> Result<(), StoreError> {
        self.inner.add_counter(name, n)
    }
    fn counters(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.counters()
    }
}

impl SourceStore for FaultyStore {
    fn source_record(&mut self, url: &str, pid: u16, digest: u64, id: u64) -> Result<(), StoreError> {
        self.inner.source_record(url, pid, digest, id)
    }
    fn source_seen(&mut self, url: &str, pid: u16, digest: u64) -> Result<Option<u64>, StoreError> {
        self.inner.source_seen(url, pid, digest)
    }
}

async fn client(broker: &ScriptedBroker, v: ProtocolVersion, inner: MemoryStore, faults: &Arc<Faults>) -> Client {
    let dir = std::env::temp_dir();
    let cfg = config("scripted", &broker.url(), &dir).version(v);
    let store = FaultyStore { inner, faults: faults.clone() };
    Client::with_store(cfg, Box::new(store)).await.expect("client")
}

async fn delivered(r: steadfast::Receipt) -> Delivery {
    tokio::time::timeout(Duration::from_secs(20), r.delivered()).await.expect("delivered in time").unwrap()
}

/// A QoS 2 message already bound to a packet id in a previous run.
fn store_with_bound_qos2(payload: &str, stage: Stage) -> MemoryStore {
    let mut mem = MemoryStore::new();
    mem.begin().unwrap();
    let msg = NewMessage {
        topic: "t".into(),
        payload: payload.into(),
        qos: Qos::ExactlyOnce,
        retain: false,
        props: Properties::default(),
        created_ms: 1,
        route: None,
        policy: Default::default(),
        receipts: None,
    };
    let id = mem.insert(&msg).unwrap();
    mem.set_wire(0, id, Some((7, stage))).unwrap();
    mem.commit().unwrap();
    mem
}

/// The writer's sync rule (docs/design.md, "The writer thread"): a message
/// is accepted only by a synced commit; a batch of brokers'
/// acknowledgements alone may go without a sync; and once the writer is
/// idle a synced commit that changed something (SQLite syncs nothing for a
/// commit that changed nothing) puts them on the disk too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_alone_go_unsynced_and_an_idle_writer_syncs_them() {
    let broker = ScriptedBroker::start(false, |_| true, |_, _| Reply::Ack);
    let faults = Arc::new(Faults::default());
    let c = client(&broker, ProtocolVersion::V311, MemoryStore::new(), &faults).await;
    // One at a time: each acknowledgement has a batch of its own, well
    // within a second of the synced append before it.
    for i in 0..20 {
        let r = c.publish(Message::new("t", format!("m{i}"))).await.unwrap();
        assert_eq!(delivered(r).await, Delivery::Delivered);
    }
    // Delivery is told before the acknowledgement's commit: wait for all
    // 20 to be committed; the last one's commit, if unsynced, is followed
    // by the idle writer's synced, marked one.
    let settled = || {
        let c = faults.commits();
        let Some(k) = c.iter().rposition(|c| c.acks > 0) else { return false };
        c.iter().map(|c| c.acks).sum::<u32>() == 20 && (c[k].synced || c[k + 1..].iter().any(|c| c.synced && c.marked))
    };
    wait_until("every acknowledgement committed and synced", Duration::from_secs(10), settled).await;
    let commits = faults.commits();
    assert!(commits.iter().filter(|c| c.inserted).all(|c| c.synced), "an append went unsynced: {commits:?}");
    let unsynced_acks = commits.iter().filter(|c| c.acks > 0 && !c.inserted && !c.synced).count();
    assert!(unsynced_acks > 0, "no acknowledgement went unsynced: {commits:?}");
    for w in commits.windows(2) {
        if !w[0].synced && w[1].synced {
            assert!(w[1].marked, "a synced commit after unsynced ones wrote no mark: {commits:?}");
        }
    }
    c.close().await;
}

/// The bound on the sync rule: while a backlog drains (acknowledgements
/// only, for seconds), a synced commit still comes at least once a second,
/// so a power cut takes back about a second of removals, not the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stretch_of_acknowledgements_is_synced_at_least_once_a_second() {
    // A slow broker: 2 ms per acknowledgement, 1,600 messages: 3.2 s of
    // acknowledgements, nearly all of them after the last append.
    let broker = ScriptedBroker::start(
        false,
        |_| true,
        |_, _| {
            std::thread::sleep(Duration::from_millis(2));
            Reply::Ack
        },
    );
    let faults = Arc::new(Faults::default());
    let c = client(&broker, ProtocolVersion::V311, MemoryStore::new(), &faults).await;
    let mut accepted = Vec::new();
    for i in 0..1600 {
        accepted.push(c.enqueue(Message::new("t", format!("m{i}"))).unwrap());
    }
    for a in accepted {
        a.await.unwrap();
    }
    let state = c.outbox_state();
    wait_until("the backlog drained", Duration::from_secs(60), || state.borrow().totals.count == 0).await;
    let commits = faults.commits();
    let last_append = commits.iter().rposition(|c| c.inserted).expect("appends were committed");
    let stretch = &commits[last_append..];
    let (first, last) = (stretch[0].at.unwrap(), stretch.last().unwrap().at.unwrap());
    assert!(last - first > Duration::from_secs(2), "the drain took {:?}: too short to test", last - first);
    // Each commit ends within a second of the last synced one (the rule
    // looks at the time when a batch begins: half a second for the batch).
    let mut synced_at = first;
    for c in stretch {
        let at = c.at.unwrap();
        assert!(at - synced_at < Duration::from_millis(1500), "{:?} without a sync: {stretch:?}", at - synced_at);
        if c.synced {
            synced_at = at;
        }
    }
    c.close().await;
}

/// Acknowledgements are applied in a transaction left open for the ones
/// after them (docs/design.md, "A transaction of bookkeeping is left open
/// for more"). When its commit fails, every removal it held is applied
/// again: the messages still leave, and each was told delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_held_open_whose_commit_fails_are_applied_again() {
    // The broker acknowledges nothing until `go`: the appends are all
    // committed first, so the first commit after it is one of
    // acknowledgements alone.
    let go = Arc::new(AtomicBool::new(false));
    let gate = go.clone();
    let broker = ScriptedBroker::start(
        false,
        |_| true,
        move |_, _| {
            while !gate.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Reply::Ack
        },
    );
    let faults = Arc::new(Faults::default());
    let c = client(&broker, ProtocolVersion::V311, MemoryStore::new(), &faults).await;
    let mut receipts = Vec::new();
    for i in 0..50 {
        receipts.push(c.publish(Message::new("t", format!("m{i}"))).await.unwrap());
    }
    faults.fail_commit.store(1, SeqCst);
    go.store(true, SeqCst);
    for r in receipts {
        assert_eq!(delivered(r).await, Delivery::Delivered);
    }
    wait_until("the held commit failed", Duration::from_secs(10), || faults.fail_commit.load(SeqCst) == 0).await;
    let state = c.outbox_state();
    wait_until("every message left, its removal applied again", Duration::from_secs(10), || {
        state.borrow().totals.count == 0
    })
    .await;
    // The count falls as the removals are applied; their commit follows
    // within the hold (a millisecond).
    let committed = || faults.commits().iter().map(|c| c.acks).sum::<u32>() >= 50;
    wait_until("every acknowledgement committed", Duration::from_secs(10), committed).await;
    let commits = faults.commits();
    assert!(commits.iter().filter(|c| c.inserted).all(|c| c.synced), "an append went unsynced: {commits:?}");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_qos2_binding_write_is_retried_on_the_next_connection() {
    let broker = ScriptedBroker::start(false, |conn| conn > 0, |_, _| Reply::Ack);
    let faults = Arc::new(Faults::default());
    faults.fail_set_wire.store(1, SeqCst);
    let c = client(&broker, ProtocolVersion::V311, MemoryStore::new(), &faults).await;
    let r = c.publish(Message::new("t", "q2").qos(Qos::ExactlyOnce)).await.unwrap();
    assert_eq!(delivered(r).await, Delivery::Delivered);
    let pubs = broker.publishes();
    assert_eq!(pubs.len(), 1, "published once, after the binding was on disk: {pubs:?}");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_sent_again_while_the_session_is_kept() {
    let broker = ScriptedBroker::start(
        true,
        |_| true,
        |conn, nth| if conn == 0 && nth == 0 { Reply::Refuse } else { Reply::Ack },
    );
    let c = client(&broker, ProtocolVersion::V5, MemoryStore::new(), &Arc::default()).await;
    let r = c.publish(Message::new("t", "refused once")).await.unwrap();
    assert_eq!(delivered(r).await, Delivery::Delivered);
    assert_eq!(broker.publishes().len(), 2);
    assert_eq!(broker.connections(), 1, "no reconnect was needed");
    assert_eq!(c.broker_status()[0].refused, 1);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_and_a_disconnect_in_one_read_still_remove_the_message() {
    let broker = ScriptedBroker::start(
        true,
        |conn| conn > 0,
        |conn, _| if conn == 0 { Reply::AckThenDisconnect } else { Reply::Ack },
    );
    let c = client(&broker, ProtocolVersion::V5, MemoryStore::new(), &Arc::default()).await;
    let r = c.publish(Message::new("t", "acked")).await.unwrap();
    assert_eq!(delivered(r).await, Delivery::Delivered);
    assert_eq!(broker.publishes().len(), 1, "acknowledged once, never resent");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_qos2_exchange_that_completes_during_the_first_read_is_not_published_again() {
    // PUBREL goes out at CONNACK; PUBCOMP comes back while the first page
    // read (which still holds the message) is stalled.
    let broker = ScriptedBroker::start(false, |_| true, |_, _| Reply::Ack);
    let faults = Arc::new(Faults::default());
    faults.stall_read.store(1, SeqCst); // the first page read
    let c = client(&broker, ProtocolVersion::V311, store_with_bound_qos2("restored", Stage::Released), &faults).await;
    let f = faults.clone();
    wait_until("first page read stalled", Duration::from_secs(10), move || f.stalled.load(SeqCst)).await;
    let f = faults.clone();
    let c2 = c.clone();
    tokio::spawn(async move {
        // Release the read once the exchange completed (PUBCOMP processed).
        while c2.broker_status()[0].acked == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        f.release.store(true, SeqCst);
    });
    let marker = c.publish(Message::new("t", "marker")).await.unwrap();
    assert_eq!(delivered(marker).await, Delivery::Delivered);
    let payloads: Vec<Vec<u8>> = broker.publishes().into_iter().map(|p| p.payload).collect();
    assert_eq!(payloads, vec![b"marker".to_vec()], "the completed exchange was published again");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_committed_while_an_empty_page_is_read_is_not_skipped() {
    // The session is lost: the restored Released message counts as
    // delivered, and the first page comes back empty. A message accepted
    // while that read is stalled must still be sent.
    let broker = ScriptedBroker::start(false, |_| false, |_, _| Reply::Ack);
    let faults = Arc::new(Faults::default());
    faults.stall_read.store(1, SeqCst);
    let c = client(&broker, ProtocolVersion::V311, store_with_bound_qos2("old", Stage::Released), &faults).await;
    let f = faults.clone();
    wait_until("first page read stalled", Duration::from_secs(10), move || f.stalled.load(SeqCst)).await;
    // Appends queue behind the stalled read in the writer; release it from
    // a thread once the append is on its way.
    let accepted = c.enqueue(Message::new("t", "new")).unwrap();
    let f = faults.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        f.release.store(true, SeqCst);
    });
    accepted.await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), c.wait_idle()).await.expect("the new message was skipped");
    let payloads: Vec<Vec<u8>> = broker.publishes().into_iter().map(|p| p.payload).collect();
    assert_eq!(payloads, vec![b"new".to_vec()]);
    c.close().await;
}

#[tokio::test]
async fn properties_mqtt_cannot_carry_are_refused_before_acceptance() {
    let broker = ScriptedBroker::start(true, |_| true, |_, _| Reply::Ack);
    let c = client(&broker, ProtocolVersion::V5, MemoryStore::new(), &Arc::default()).await;
    let props = Properties { user: vec![("k".into(), "v".repeat(70_000))], ..Properties::default() };
    let err = c.publish(Message::new("t", "x").props(props)).await.unwrap_err();
    assert!(matches!(err, PublishError::Properties(_)), "{err}");
    assert!(err.to_string().contains("65535"), "{err}");
    assert_eq!(c.status().await.unwrap().queued, 0);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_gets_in_flight_messages_again_under_their_packet_ids_with_dup() {
    // First connection: the first message gets no answer, the second closes
    // the link. The broker keeps the session: both come again, DUP set, same ids.
    let broker = ScriptedBroker::start(
        true,
        |conn| conn > 0,
        |conn, nth| match (conn, nth) {
            (0, 0) => Reply::Silent,
            (0, _) => Reply::Close,
            _ => Reply::Ack,
        },
    );
    let c = client(&broker, ProtocolVersion::V5, MemoryStore::new(), &Arc::default()).await;
    let a = c.publish(Message::new("t", "a")).await.unwrap();
    let b = c.publish(Message::new("t", "b")).await.unwrap();
    assert_eq!(delivered(a).await, Delivery::Delivered);
    assert_eq!(delivered(b).await, Delivery::Delivered);
    let pubs = broker.publishes();
    let first: Vec<_> = pubs.iter().filter(|p| p.conn == 0).map(|p| (p.pid, p.payload.clone(), p.dup)).collect();
    let again: Vec<_> = pubs.iter().filter(|p| p.conn == 1).map(|p| (p.pid, p.payload.clone(), p.dup)).collect();
    assert_eq!(first.len(), 2, "{pubs:?}");
    let expected: Vec<_> = first.iter().map(|(pid, payload, _)| (*pid, payload.clone(), true)).collect();
    assert_eq!(again, expected, "resent in order, same packet ids, DUP set");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_exchange_from_a_previous_process_resumes_under_its_packet_id() {
    let broker = ScriptedBroker::start(false, |_| true, |_, _| Reply::Ack);
    let c = client(&broker, ProtocolVersion::V311, store_with_bound_qos2("resumed", Stage::Published), &Arc::default())
        .await;
    tokio::time::timeout(Duration::from_secs(20), c.wait_idle()).await.expect("delivered");
    let pubs = broker.publishes();
    assert_eq!(pubs.len(), 1, "{pubs:?}");
    assert_eq!((pubs[0].pid, pubs[0].dup, pubs[0].payload.as_slice()), (7, true, &b"resumed"[..]));
    c.close().await;
}

/// A broker that leaves an MQTT 5 CONNECT unanswered (amqtt 0.12 waits for
/// ever on its properties): with `auto_version` the client speaks 3.1.1 to
/// it after the connect timeout and delivers; the silence is not
/// remembered, so the next start tries 5 again (it may have been a busy
/// broker). Without `auto_version` the error says what went unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_silent_to_an_mqtt_5_connect_gets_mqtt_3_1_1_with_auto_version() {
    let broker = ScriptedBroker::silent_to_mqtt_5();
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        config("silent5", &broker.url(), dir.path())
            .version(ProtocolVersion::V5)
            .auto_version(true)
            .connect_timeout(Duration::from_millis(500))
    };
    for (start, payload) in ["first start", "second start"].into_iter().enumerate() {
        let (c, _) = Client::open(cfg()).await.expect("client");
        let r = c.publish(Message::new("t", payload)).await.unwrap();
        assert_eq!(delivered(r).await, Delivery::Delivered);
        c.close().await;
        // Each start: the MQTT 5 CONNECT left unanswered, then 3.1.1.
        let conn = 2 * start + 1;
        assert_eq!(broker.connections(), conn + 1, "{payload}");
        let got = broker.publishes();
        assert_eq!((got.last().unwrap().conn, got.last().unwrap().payload.as_slice()), (conn, payload.as_bytes()));
    }
    let c = Client::with_store(cfg().auto_version(false), Box::new(MemoryStore::new())).await.expect("client");
    let mut events = c.events();
    let error = connect_failed(&mut events).await;
    assert!(error.is_retryable());
    assert!(error.to_string().ends_with("did not answer CONNECT within 500ms"), "{error}");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connack_refusing_the_protocol_version_says_so() {
    for (v5, code) in [(true, 0x84u8), (false, 1u8)] {
        let broker = ScriptedBroker::refusing(v5, code);
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
        let c = client(&broker, version, MemoryStore::new(), &Arc::default()).await;
        let mut events = c.events();
        let error = connect_failed(&mut events).await;
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("does not accept this MQTT protocol version"), "{error}");
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_before_a_malformed_packet_still_counts_and_the_link_restarts() {
    let broker = ScriptedBroker::start(
        true,
        |conn| conn > 0,
        |conn, _| if conn == 0 { Reply::AckThenGarbage } else { Reply::Ack },
    );
    let c = client(&broker, ProtocolVersion::V5, MemoryStore::new(), &Arc::default()).await;
    let mut events = c.events();
    let r = c.publish(Message::new("t", "acked")).await.unwrap();
    assert_eq!(delivered(r).await, Delivery::Delivered);
    let error = next_event(&mut events, "Disconnected", Duration::from_secs(10), |e| match e {
        steadfast::Event::Disconnected { error, .. } => Some(error.clone()),
        _ => None,
    })
    .await;
    assert!(error.to_string().contains("packet type 0"), "{error}");
    assert_eq!(broker.publishes().len(), 1, "acknowledged once, never resent");
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_message_leaves_the_outbox_even_when_its_removal_first_fails() {
    let broker = ScriptedBroker::start(true, |_| true, |_, _| Reply::Ack);
    let faults = Arc::new(Faults::default());
    faults.fail_remove.store(1, SeqCst);
    let c = client(&broker, ProtocolVersion::V5, MemoryStore::new(), &faults).await;
    let r = c.publish(Message::new("t", "acked")).await.unwrap();
    assert_eq!(delivered(r).await, Delivery::Delivered);
    assert_eq!(c.status().await.unwrap().queued, 0);
    assert_eq!(broker.publishes().len(), 1);
    c.close().await;
}

/// A failed commit hands its ids out again: what the writer believed of
/// them in memory (the newest id per priority, which senders read up to)
/// must go back too, or the next message, under the same id, would be
/// skipped by a sender that already read past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_leaves_no_phantom_ids_for_the_senders() {
    let faults = Arc::new(Faults::default());
    let store = FaultyStore { inner: MemoryStore::new(), faults: faults.clone() };
    let o = Outbox::start(Box::new(store), OutboxConfig::default()).unwrap();
    let m = |p: &str| NewMessage {
        topic: "t".into(),
        payload: p.into(),
        qos: Qos::AtLeastOnce,
        retain: false,
        props: Properties::default(),
        created_ms: 1,
        route: None,
        policy: Default::default(),
        receipts: None,
    };
    let first = o.append(m("1"), false).0.await.unwrap();
    faults.fail_commit.store(1, SeqCst);
    assert!(o.append(m("lost"), false).0.await.is_err(), "the failed batch accepts nothing");
    // A commit that inserts nothing publishes the state again.
    o.count("probe", 1);
    o.report().await.unwrap();
    assert_eq!(o.state().newest[0], first, "no id above the last accepted one is announced");
    let next = o.append(m("2"), false).0.await.unwrap();
    assert_eq!(next, first + 1, "the failed id is handed out again");
    assert_eq!(o.state().newest[0], next);
    o.close();
}

/// An expiry sweep whose commit fails is swept again: the deadline passed
/// is not forgotten with the rolled-back batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_sweep_that_fails_to_commit_is_tried_again() {
    let faults = Arc::new(Faults::default());
    let store = FaultyStore { inner: MemoryStore::new(), faults: faults.clone() };
    let o = Outbox::start(Box::new(store), OutboxConfig::default()).unwrap();
    let mut m = NewMessage {
        topic: "t".into(),
        payload: "soon".into(),
        qos: Qos::AtLeastOnce,
        retain: false,
        props: Properties::default(),
        created_ms: steadfast_store::now_ms(),
        route: None,
        policy: Default::default(),
        receipts: None,
    };
    m.policy.expires_ms = Some(m.created_ms + 200);
    let (accepted, outcome) = o.append(m, true);
    accepted.await.unwrap();
    // The next commit is the sweep's: it fails.
    faults.fail_commit.store(1, SeqCst);
    let outcome = tokio::time::timeout(Duration::from_secs(10), outcome.unwrap()).await.expect("swept again");
    assert_eq!(outcome.unwrap(), Delivery::Dropped(DropReason::Expired));
    assert_eq!(faults.fail_commit.load(SeqCst), 0, "the first sweep did fail");
    o.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_qos_messages_go_out_in_publish_order() {
    let broker = ScriptedBroker::start(true, |_| true, |_, _| Reply::Ack);
    let c = client(&broker, ProtocolVersion::V5, MemoryStore::new(), &Arc::default()).await;
    let plan = [
        (Qos::AtLeastOnce, "1"),
        (Qos::ExactlyOnce, "2"),
        (Qos::AtLeastOnce, "3"),
        (Qos::AtMostOnce, "4"),
        (Qos::ExactlyOnce, "5"),
        (Qos::AtMostOnce, "6"),
    ];
    let mut accepted = Vec::new();
    for (qos, payload) in plan {
        accepted.push(c.enqueue(Message::new("t", payload).qos(qos)).unwrap());
    }
    for a in accepted {
        a.await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), c.wait_idle()).await.expect("delivered");
    let got: Vec<Vec<u8>> = broker.publishes().into_iter().map(|p| p.payload).collect();
    let want: Vec<Vec<u8>> = plan.iter().map(|(_, p)| p.as_bytes().to_vec()).collect();
    assert_eq!(got, want);
    c.close().await;
}

/// A hostile broker, one misbehaviour per case on the first connection and
/// a correct broker on the next: each is a named error and a reconnect,
/// never a panic, a hang or a lost message; the message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_broker_gets_a_clear_error_and_a_reconnect_and_loses_nothing() {
    let cases: [(Reply, bool, &str); 4] = [
        (Reply::AckWrongPid, true, "which has no QoS 1 message in flight"),
        (Reply::AckWrongPid, false, "which has no QoS 1 message in flight"),
        (Reply::AckThenGarbage, true, "packet type 0"),
        (Reply::Oversize, true, "over our maximum packet size of 65536 bytes"),
    ];
    for (reply, v5, want) in cases {
        let broker =
            ScriptedBroker::start(v5, |conn| conn > 0, move |conn, _| if conn == 0 { reply } else { Reply::Ack });
        let v = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
        let cfg = config("hostile", &broker.url(), &std::env::temp_dir()).version(v).max_packet_size(65536);
        let c = Client::with_store(cfg, Box::new(MemoryStore::new())).await.expect("client");
        let mut events = c.events();
        let r = c.publish(Message::new("t", format!("{reply:?}"))).await.unwrap();
        if reply != Reply::AckThenGarbage {
            let error = next_event(&mut events, "Disconnected", Duration::from_secs(10), |e| match e {
                steadfast::Event::Disconnected { error, .. } => Some(error.clone()),
                _ => None,
            })
            .await;
            assert!(error.to_string().contains(want), "{reply:?}: {error}");
            assert!(error.is_retryable(), "{reply:?}: a broker bug is worth a reconnect");
        }
        assert_eq!(delivered(r).await, Delivery::Delivered, "{reply:?}");
        assert!(broker.connections() >= if reply == Reply::AckThenGarbage { 1 } else { 2 }, "{reply:?}");
        c.close().await;
    }
}

/// The same acknowledgement twice: the first delivers the message, the
/// second (nothing left under that id) ends the link with the error; the
/// message is not sent again under a fresh id as if it were new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_acknowledgement_is_an_error_not_a_second_delivery() {
    let broker =
        ScriptedBroker::start(true, |conn| conn > 0, |conn, _| if conn == 0 { Reply::AckTwice } else { Reply::Ack });
    let cfg = config("dup-ack", &broker.url(), &std::env::temp_dir());
    let c = Client::with_store(cfg, Box::new(MemoryStore::new())).await.expect("client");
    let mut events = c.events();
    let first = c.publish(Message::new("t", "one")).await.unwrap();
    assert_eq!(delivered(first).await, Delivery::Delivered);
    let error = next_event(&mut events, "Disconnected", Duration::from_secs(10), |e| match e {
        steadfast::Event::Disconnected { error, .. } => Some(error.clone()),
        _ => None,
    })
    .await;
    assert!(error.to_string().contains("PUBACK for packet id 1, which has no QoS 1 message in flight"), "{error}");
    let second = c.publish(Message::new("t", "two")).await.unwrap();
    assert_eq!(delivered(second).await, Delivery::Delivered);
    let payloads: Vec<Vec<u8>> = broker.publishes().into_iter().map(|p| p.payload).collect();
    assert_eq!(payloads.iter().filter(|p| p.as_slice() == b"one").count(), 1, "{payloads:?}");
    c.close().await;
}

/// An MQTT 5 broker whose CONNACK says it takes QoS 1 at most gets QoS 2
/// messages at QoS 1 (instead of refusing them for ever); they are
/// delivered once it acknowledges them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_goes_at_qos_1_to_a_broker_that_takes_qos_1_at_most() {
    let broker = ScriptedBroker::with_max_qos(1, |_, _| Reply::Ack);
    let cfg = config("max-qos", &broker.url(), &std::env::temp_dir());
    let c = Client::with_store(cfg, Box::new(MemoryStore::new())).await.expect("client");
    let r = c.publish(Message::new("t", "exactly-once wanted").qos(Qos::ExactlyOnce)).await.unwrap();
    assert_eq!(delivered(r).await, Delivery::Delivered);
    let got = broker.publishes();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].qos, 1, "sent at the broker's maximum QoS");
    c.close().await;
}

/// The doctor's in-flight probe finds the limit of a 3.1.1 broker that
/// closes the connection past 40 unfinished QoS 2 messages without a word
/// (issue 17), and releases nothing it was not given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_finds_an_unannounced_qos2_limit() {
    let broker = ScriptedBroker::limiting_qos2(40);
    let cfg = config("doctor", &broker.url(), &std::env::temp_dir()).version(ProtocolVersion::V311);
    let url = broker.url().parse().unwrap();
    let (check, closes_at) = steadfast::doctor::probe_inflight(&cfg, &url, "t1").await;
    assert_eq!(closes_at, Some(40), "{check:?}");
    assert_eq!(check.ok, Some(false), "{check:?}");
    assert!(
        check.detail.contains("closed the connection after taking 40") && check.detail.contains("--max-inflight 40")
    );
}

/// Mosquitto as the test kit runs it (`max_queued_messages 0`) closes an
/// MQTT 3.1.1 client's connection past its `max_inflight_messages` (20)
/// unfinished QoS 2 messages, announcing nothing: the probe finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_finds_mosquittos_qos2_limit_over_mqtt_311() {
    let broker = steadfast_testkit::Mosquitto::plain().await;
    let cfg = config("doctor", &broker.url(), &std::env::temp_dir()).version(ProtocolVersion::V311);
    let url = broker.url().parse().unwrap();
    let (check, closes_at) = steadfast::doctor::probe_inflight(&cfg, &url, "t2").await;
    assert_eq!(check.ok, Some(false), "{check:?}");
    assert!(closes_at.is_some_and(|n| (16..=24).contains(&n)), "{check:?}");
}
