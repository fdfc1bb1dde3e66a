//! Plain inserts written together, many rows a statement (docs/design.md,
//! "Inserts written together"): every statement of the transaction sees
//! them as if each had been written at once, the commit writes them all,
//! a rollback none. The same for a first broker's acknowledgements.

use steadfast_core::{Properties, Qos};
use steadfast_store::{Entry, NewMessage, SqliteStore, Store};

use crate::msg;

/// A plain message (content and properties only) that says which it is.
fn plain(n: usize) -> NewMessage {
    let mut m = msg(&format!("p/{}", n % 3), format!("plain {n}"));
    m.qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][n % 3];
    m.retain = n % 2 == 1;
    m.created_ms += n as u64;
    if n.is_multiple_of(4) {
        m.props = Properties { user: vec![("n".into(), n.to_string())], ..Properties::default() };
    }
    m
}

/// Inserts the plain messages `range`, noting each with its id in `want`.
fn insert(store: &mut SqliteStore, want: &mut Vec<(u64, NewMessage)>, range: std::ops::Range<usize>) {
    for n in range {
        let m = plain(n);
        want.push((store.insert(&m).unwrap(), m));
    }
}

/// Everything the store in `dir` queues once opened again (the handle
/// before it dropped), as stored, in id order.
fn queued_after_reopen(dir: &std::path::Path) -> Vec<(u64, NewMessage)> {
    let (mut store, _) = SqliteStore::open(dir).unwrap();
    queued(&mut store)
}

/// Everything `store` queues, as stored, in id order.
fn queued(store: &mut SqliteStore) -> Vec<(u64, NewMessage)> {
    let all = store.read_after(0, usize::MAX >> 1, None, None).unwrap();
    all.into_iter().map(|m| (m.id, (*m.msg).clone())).collect()
}

#[test]
fn waiting_inserts_are_seen_by_every_statement_and_committed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = SqliteStore::open(dir.path()).unwrap();
    // Without the tail, every read goes to SQLite: a row still waiting
    // would be missed.
    let mut store = store.without_tail();
    let slot = store.assign_slots(&["mqtt://127.0.0.1:1".into()]).unwrap()[0];
    let mut want: Vec<(u64, NewMessage)> = Vec::new();

    store.begin().unwrap();
    // 45 waiting (32 + 8 + 4 + 1 when they go), then a message that is
    // not plain: written at once, after them.
    insert(&mut store, &mut want, 0..45);
    let mut routed = plain(45);
    routed.route = Some("b".into());
    routed.policy.priority = 2;
    want.push((store.insert(&routed).unwrap(), routed));
    // 16 waiting, then a read by key of the newest: one 16-row statement.
    insert(&mut store, &mut want, 46..62);
    let (newest, m) = want.last().unwrap().clone();
    assert_eq!(store.topic(newest).unwrap(), Some(m.topic.clone()));
    assert_eq!(store.entry(newest).unwrap().map(|e| e.size), Some(m.size()));
    // 14 waiting (8 + 4 + 2), acknowledgements of older ones (by key,
    // below them: nothing written for them), then a read of everything.
    insert(&mut store, &mut want, 62..76);
    let first_ten: Vec<u64> = want[..10].iter().map(|(id, _)| *id).collect();
    let answers = store.ack_or_remove_many(&first_ten, slot, &mut |_| true).unwrap();
    assert!(answers.iter().all(|(_, a)| matches!(a, Some((_, true)))), "{answers:?}");
    want.drain(..10);
    assert_eq!(queued(&mut store), want, "a read inside the transaction sees every row");
    // Waiting again at the commit (2 + 1).
    insert(&mut store, &mut want, 76..79);
    store.commit().unwrap();
    assert_eq!(store.totals().unwrap().count, want.len() as u64);
    drop(store);
    assert_eq!(queued_after_reopen(dir.path()), want, "the commit wrote them all, each as it was inserted");
}

#[test]
fn a_rollback_writes_none_of_the_waiting_inserts_and_hands_their_ids_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = SqliteStore::open(dir.path()).unwrap();
    let kept = store.insert(&plain(0)).unwrap();
    store.begin().unwrap();
    let gone: Vec<u64> = (1..20).map(|n| store.insert(&plain(n)).unwrap()).collect();
    // Written by a read, then more waiting.
    assert!(store.entry(gone[18]).unwrap().is_some());
    let gone_too: Vec<u64> = (20..40).map(|n| store.insert(&plain(n)).unwrap()).collect();
    assert_eq!(gone_too[0], gone[18] + 1);
    store.rollback();
    store.begin().unwrap();
    let again = store.insert(&plain(99)).unwrap();
    store.commit().unwrap();
    assert_eq!(again, gone[0], "a rolled-back id is handed out again");
    drop(store);
    assert_eq!(queued_after_reopen(dir.path()), vec![(kept, plain(0)), (again, plain(99))]);
}

#[test]
fn a_waiting_row_sqlite_cannot_take_fails_the_commit_and_the_next_transaction_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = SqliteStore::open(dir.path()).unwrap();
    let kept = store.insert(&plain(0)).unwrap();
    store.begin().unwrap();
    let before: Vec<u64> = (1..10).map(|n| store.insert(&plain(n)).unwrap()).collect();
    // A creation time beyond SQLite's 64-bit signed integers: refused
    // when it is bound, that is when the waiting rows are written.
    let mut bad = plain(10);
    bad.created_ms = u64::MAX;
    store.insert(&bad).unwrap();
    let e = store.commit().unwrap_err();
    assert!(!e.to_string().is_empty());
    store.rollback();
    // The next transaction is whole, and starts at the first id of the
    // failed one.
    store.begin().unwrap();
    let next = store.insert(&plain(11)).unwrap();
    store.commit().unwrap();
    assert_eq!(next, before[0]);
    drop(store);
    assert_eq!(queued_after_reopen(dir.path()), vec![(kept, plain(0)), (next, plain(11))]);
}

#[test]
fn waiting_acknowledgements_are_seen_by_every_statement_and_written_unless_their_row_went() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = SqliteStore::open(dir.path()).unwrap();
    // Without the tail, every read goes to SQLite.
    let mut store = store.without_tail();
    let slots = store.assign_slots(&["mqtt://127.0.0.1:1".into(), "mqtt://127.0.0.1:2".into()]).unwrap();
    let (a, b) = (slots[0], slots[1]);
    let ids: Vec<u64> = (0..7).map(|n| store.insert(&plain(n)).unwrap()).collect();
    // Fanout to both: only the second acknowledgement finishes a message.
    let mut both = |e: &Entry| e.acks.count_ones() == 2;
    let ids_of = |page: Vec<steadfast_store::StoredMessage>| page.into_iter().map(|m| m.id).collect::<Vec<_>>();

    store.begin().unwrap();
    // A acknowledges all but the fourth: three runs, none finished.
    let by_a = [ids[0], ids[1], ids[2], ids[4], ids[5], ids[6]];
    let answers = store.ack_or_remove_many(&by_a, a, &mut both).unwrap();
    assert!(answers.iter().all(|(_, x)| matches!(x, Some((_, false)))), "{answers:?}");
    // A read of what A lacks (any row) sees them.
    assert_eq!(ids_of(store.read_after(0, 100, Some(a), None).unwrap()), vec![ids[3]]);
    // B finishes the first three (their rows go) and acknowledges the
    // fourth, which A has not: a read by key sees that.
    let answers = store.ack_or_remove_many(&ids[..4], b, &mut both).unwrap();
    let finished: Vec<bool> = answers.iter().map(|(_, x)| matches!(x, Some((_, true)))).collect();
    assert_eq!(finished, [true, true, true, false]);
    assert_eq!(store.entry(ids[3]).unwrap().map(|e| e.acks), Some(1 << b));
    assert_eq!(ids_of(store.read_after(0, 100, Some(b), None).unwrap()), ids[4..].to_vec());
    store.commit().unwrap();
    assert_eq!(store.totals().unwrap().count, 4);

    // What a rollback undoes is not written.
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[5..], b, &mut |_| false).unwrap();
    store.rollback();
    drop(store);

    let (mut store, _) = SqliteStore::open(dir.path()).unwrap();
    let acks: Vec<Option<u64>> = ids.iter().map(|id| store.entry(*id).unwrap().map(|e| e.acks)).collect();
    let (on_a, on_b) = (Some(1u64 << a), Some(1u64 << b));
    assert_eq!(acks, [None, None, None, on_b, on_a, on_a, on_a], "each row as the committed transaction left it");
}

/// The acknowledgements the outbox file holds, by id, read by a
/// connection of its own (what a restart after a crash would find).
fn acks_on_disk(dir: &std::path::Path) -> Vec<(u64, u64)> {
    let raw = rusqlite::Connection::open(dir.join("outbox.db")).unwrap();
    let mut stmt = raw.prepare("SELECT id, acks FROM outbox ORDER BY id").unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// A store in `dir` that holds acknowledgements unlogged for `hold` and
/// logged for `keep` (`SqliteStore::hold_acks_for`), with two brokers:
/// the store and their bits.
fn two_brokers(
    dir: &std::path::Path,
    hold: std::time::Duration,
    keep: std::time::Duration,
) -> (SqliteStore, [u32; 2], [u64; 2]) {
    let (mut store, _) = SqliteStore::open(dir).unwrap();
    store.hold_acks_for(hold, keep);
    let slots = store.assign_slots(&["mqtt://127.0.0.1:1".into(), "mqtt://127.0.0.1:2".into()]).unwrap();
    let slots = [slots[0], slots[1]];
    (store, slots, [1 << slots[0], 1 << slots[1]])
}

#[test]
fn a_held_acknowledgement_is_written_once_due_before_any_read_and_at_close() {
    let dir = tempfile::tempdir().unwrap();
    // Held until the test says they are due (an hour, then nothing).
    let hour = std::time::Duration::from_secs(3600);
    let (mut store, slots, [a, b]) = two_brokers(dir.path(), hour, hour);
    let ids: Vec<u64> = (0..4).map(|n| store.insert(&plain(n)).unwrap()).collect();
    let mut never = |_: &Entry| false;
    let due = |store: &mut SqliteStore| {
        store.hold_acks_for(std::time::Duration::ZERO, std::time::Duration::ZERO);
        store.begin().unwrap();
        store.commit().unwrap();
        store.hold_acks_for(std::time::Duration::from_secs(3600), std::time::Duration::from_secs(3600));
    };

    // Held past their commit...
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[..3], slots[0], &mut never).unwrap();
    store.commit().unwrap();
    assert!(store.acks_due_at().is_some());
    assert_eq!(acks_on_disk(dir.path()), [(ids[0], 0), (ids[1], 0), (ids[2], 0), (ids[3], 0)]);
    // ... past a transaction rolled back (which drops only its own)...
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[3..], slots[0], &mut never).unwrap();
    store.rollback();
    // ... and written by the first commit once due.
    due(&mut store);
    assert_eq!(store.acks_due_at(), None);
    assert_eq!(acks_on_disk(dir.path()), [(ids[0], a), (ids[1], a), (ids[2], a), (ids[3], 0)]);

    // A read between transactions writes them first, in a transaction of
    // their own.
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[1..2], slots[1], &mut never).unwrap();
    store.commit().unwrap();
    assert!(store.acks_due_at().is_some());
    assert_eq!(store.entry(ids[1]).unwrap().map(|e| e.acks), Some(a | b));
    assert_eq!(acks_on_disk(dir.path())[1], (ids[1], a | b));

    // Another process's change made meanwhile stands (a joined `pub`
    // publishing the message again clears its acknowledgements).
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[..1], slots[1], &mut never).unwrap();
    store.commit().unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    raw.execute("UPDATE outbox SET acks = 0 WHERE id = ?1", [ids[0]]).unwrap();
    drop(raw);
    due(&mut store);
    assert_eq!(acks_on_disk(dir.path())[0], (ids[0], 0));

    // The store closes with what it still holds written.
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[2..3], slots[1], &mut never).unwrap();
    store.commit().unwrap();
    drop(store);
    assert_eq!(acks_on_disk(dir.path()), [(ids[0], 0), (ids[1], a | b), (ids[2], a | b), (ids[3], 0)]);
}

/// The rows of the acknowledgement log the outbox file holds.
fn log_rows(dir: &std::path::Path) -> u64 {
    let raw = rusqlite::Connection::open(dir.join("outbox.db")).unwrap();
    raw.query_row("SELECT count(*) FROM ack_log", [], |r| r.get(0)).unwrap()
}

/// The outbox's files copied as they are now into a new directory: what
/// a restart would find had the process been killed at this point.
fn as_after_a_kill(dir: &std::path::Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for name in ["outbox.db", "outbox.db-wal"] {
        if dir.join(name).exists() {
            std::fs::copy(dir.join(name), copy.path().join(name)).unwrap();
        }
    }
    copy
}

#[test]
fn a_logged_acknowledgement_outlives_a_kill_and_is_written_into_its_row_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    // Logged at the first commit, written into rows only when a read
    // needs it or the store closes.
    let (mut store, slots, [a, b]) =
        two_brokers(dir.path(), std::time::Duration::ZERO, std::time::Duration::from_secs(3600));
    let ids: Vec<u64> = (0..6).map(|n| store.insert(&plain(n)).unwrap()).collect();
    let mut never = |_: &Entry| false;

    // A acknowledges the second to the fourth: one log row, no row changed.
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[1..4], slots[0], &mut never).unwrap();
    store.commit().unwrap();
    assert_eq!((log_rows(dir.path()), acks_on_disk(dir.path()).iter().all(|(_, acks)| *acks == 0)), (1, true));
    // B acknowledges the third (a second record of it), and finishes the
    // second (its row goes, its record stays behind in the log).
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[2..3], slots[1], &mut never).unwrap();
    store.ack_or_remove_many(&ids[1..2], slots[1], &mut |_| true).unwrap();
    store.commit().unwrap();
    // A rolled-back transaction's acknowledgements are logged by none.
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[4..5], slots[0], &mut never).unwrap();
    store.rollback();
    store.begin().unwrap();
    store.commit().unwrap();
    assert_eq!(log_rows(dir.path()), 2);

    // Killed here: the next open writes the log into the rows and empties it.
    let killed = as_after_a_kill(dir.path());
    let (mut after, report) = SqliteStore::open(killed.path()).unwrap();
    let want = [(ids[0], 0), (ids[2], a | b), (ids[3], a), (ids[4], 0), (ids[5], 0)];
    assert_eq!(acks_on_disk(killed.path()), want, "{report:?}");
    assert_eq!(log_rows(killed.path()), 0);
    assert_eq!(after.entry(ids[2]).unwrap().map(|e| e.acks), Some(a | b));
    drop(after);

    // Not killed: a read that needs them writes them first, the close
    // the rest; the log is left empty.
    assert_eq!(store.entry(ids[3]).unwrap().map(|e| e.acks), Some(a));
    store.begin().unwrap();
    store.ack_or_remove_many(&ids[5..], slots[0], &mut never).unwrap();
    store.commit().unwrap();
    drop(store);
    let want = [(ids[0], 0), (ids[2], a | b), (ids[3], a), (ids[4], 0), (ids[5], a)];
    assert_eq!(acks_on_disk(dir.path()), want);
    assert_eq!(log_rows(dir.path()), 0);
}

#[test]
fn a_logged_acknowledgement_is_written_into_its_row_once_kept_long_enough() {
    let dir = tempfile::tempdir().unwrap();
    let keep = std::time::Duration::from_millis(50);
    let (mut store, slots, _) = two_brokers(dir.path(), std::time::Duration::ZERO, keep);
    let ids: Vec<u64> = (0..3).map(|n| store.insert(&plain(n)).unwrap()).collect();
    store.begin().unwrap();
    store.ack_or_remove_many(&ids, slots[0], &mut |_| false).unwrap();
    store.commit().unwrap();
    assert_eq!(log_rows(dir.path()), 1);
    // A read inside a transaction writes them into their rows first and
    // empties the log; rolled back, all of that is undone, in memory as
    // in the database: they are held and logged again, due as before.
    let due = store.acks_due_at();
    store.begin().unwrap();
    assert_eq!(store.entry(ids[1]).unwrap().map(|e| e.acks), Some(1 << slots[0]));
    store.rollback();
    assert_eq!(log_rows(dir.path()), 1);
    assert!(acks_on_disk(dir.path()).iter().all(|(_, acks)| *acks == 0));
    assert_eq!(store.acks_due_at(), due);
    // Due when the log row has been kept that long: the writer's wait ends
    // then (`acks_due_at`), and its commit writes them.
    let due = store.acks_due_at().expect("the log row is due some time");
    let now = std::time::Instant::now();
    assert!(due > now && due <= now + keep, "due in at most {keep:?}");
    std::thread::sleep(due - now);
    store.begin().unwrap();
    store.commit().unwrap();
    assert_eq!(log_rows(dir.path()), 0);
    assert!(acks_on_disk(dir.path()).iter().all(|(_, acks)| *acks == 1 << slots[0]));
    assert_eq!(store.acks_due_at(), None);
}

/// The catch-up sweep's read (`lapsed`) and a broker's lag (`status`)
/// take the held acknowledgements into account without writing them: a
/// broker whose acknowledgement is held is neither counted as having
/// missed the message nor as lagging behind on it.
#[test]
fn the_catch_up_sweep_and_the_lag_see_held_acknowledgements_without_writing_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, slots, [a, b]) =
        two_brokers(dir.path(), std::time::Duration::ZERO, std::time::Duration::from_secs(3600));
    let mut old = plain(0);
    old.created_ms = 1_000;
    let id = store.insert(&old).unwrap();
    let never = |_: &Entry| false;
    // A's acknowledgement written into the row; B's held.
    store.begin().unwrap();
    store.ack_or_remove_many(&[id], slots[0], &mut { never }).unwrap();
    store.commit().unwrap();
    store.write_held_acks().unwrap();
    store.begin().unwrap();
    store.ack_or_remove_many(&[id], slots[1], &mut { never }).unwrap();
    store.commit().unwrap();
    assert_eq!(acks_on_disk(dir.path()), [(id, a)]);
    let now = steadfast_store::now_ms();
    assert_eq!(store.lapsed(None, a | b, now, 10).unwrap(), [(id, a | b)], "B acknowledged it: not missed");
    assert_eq!((store.lag(slots[0]).unwrap(), store.lag(slots[1]).unwrap()), (0, 0));
    assert_eq!(acks_on_disk(dir.path()), [(id, a)], "nothing was written to answer");
    drop(store);
    assert_eq!(acks_on_disk(dir.path()), [(id, a | b)], "the close writes it");
}

/// A wait for receipts writes the held acknowledgements of its run in
/// its own statement only while no log row holds them: a logged one is
/// written first, which empties the log, so that a requeue for receipts
/// (which clears the row's set) is not undone by the log at the open
/// after a kill.
#[test]
fn a_wait_for_receipts_leaves_no_log_record_behind_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let hour = std::time::Duration::from_secs(3600);
    // Logged at the first commit, kept in the log for an hour.
    let (mut store, slots, [a, _]) = two_brokers(dir.path(), std::time::Duration::ZERO, hour);
    let ids: Vec<u64> = (0..3).map(|n| store.insert(&plain(n)).unwrap()).collect();
    let mut never = |_: &Entry| false;
    store.begin().unwrap();
    store.ack_or_remove_many(&ids, slots[0], &mut never).unwrap();
    store.commit().unwrap();
    assert_eq!(log_rows(dir.path()), 1);
    store.begin().unwrap();
    store.await_receipts_many(&ids, 5_000, 4_000).unwrap();
    store.requeue_for_receipts(ids[0]).unwrap();
    store.commit().unwrap();
    let killed = as_after_a_kill(dir.path());
    let (after, _) = SqliteStore::open(killed.path()).unwrap();
    drop(after);
    assert_eq!(acks_on_disk(killed.path()), [(ids[0], 0), (ids[1], a), (ids[2], a)], "the requeue stands");
}

/// When the wait's statement writes the run's held acknowledgements, it
/// does so as the held write would: a set another process changed
/// meanwhile (a joined `pub` publishing the message again) stands.
#[test]
fn a_wait_for_receipts_keeps_another_processs_change_of_a_set() {
    let dir = tempfile::tempdir().unwrap();
    let hour = std::time::Duration::from_secs(3600);
    // Held unlogged for an hour.
    let (mut store, slots, [a, b]) = two_brokers(dir.path(), hour, hour);
    let ids: Vec<u64> = (0..2).map(|n| store.insert(&plain(n)).unwrap()).collect();
    let mut never = |_: &Entry| false;
    // Outside a transaction: written at once.
    store.ack_or_remove_many(&ids, slots[0], &mut never).unwrap();
    // B's, held past the commit, alike for both rows (a, then a and b).
    store.begin().unwrap();
    store.ack_or_remove_many(&ids, slots[1], &mut never).unwrap();
    store.commit().unwrap();
    assert_eq!(acks_on_disk(dir.path()), [(ids[0], a), (ids[1], a)]);
    let raw = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    raw.execute("UPDATE outbox SET acks = 0 WHERE id = ?1", [ids[0]]).unwrap();
    drop(raw);
    store.begin().unwrap();
    store.await_receipts_many(&ids, 5_000, 4_000).unwrap();
    store.commit().unwrap();
    assert_eq!(acks_on_disk(dir.path()), [(ids[0], 0), (ids[1], a | b)]);
    let awaiting: Vec<Option<u64>> = ids.iter().map(|id| store.entry(*id).unwrap().unwrap().awaiting_ms).collect();
    assert_eq!(awaiting, [Some(5_000), Some(5_000)]);
}
