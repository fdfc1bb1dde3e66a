//! Plain inserts written together, many rows a statement (docs/design.md,
//! "Inserts written together"): every statement of the transaction sees
//! them as if each had been written at once, the commit writes them all,
//! a rollback none.

use steadfast_core::{Properties, Qos};
use steadfast_store::{NewMessage, SqliteStore, Store};

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
    // 45 rows: a statement of each size (32, 8, 4, 1) when they go.
    for n in 0..45 {
        let m = plain(n);
        want.push((store.insert(&m).unwrap(), m));
    }
    assert!(store.changed(), "waiting rows are a change");
    // By key: the newest, still waiting.
    let (last, _) = want[44];
    assert_eq!(store.entry(last).unwrap().map(|e| e.topic), Some(want[44].1.topic.clone()));
    // A message that is not plain is written at once, after those before it.
    let mut routed = plain(45);
    routed.route = Some("b".into());
    routed.policy.priority = 2;
    want.push((store.insert(&routed).unwrap(), routed));
    // More waiting, then an acknowledgement of older ones (by key, below
    // them) and a read of all.
    for n in 46..60 {
        let m = plain(n);
        want.push((store.insert(&m).unwrap(), m));
    }
    let first_ten: Vec<u64> = want[..10].iter().map(|(id, _)| *id).collect();
    let answers = store.ack_or_remove_many(&first_ten, slot, &mut |_| true).unwrap();
    assert!(answers.iter().all(|(_, a)| matches!(a, Some((_, true)))), "{answers:?}");
    want.drain(..10);
    assert_eq!(queued(&mut store), want, "a read inside the transaction sees every row");
    // Waiting again at the commit.
    for n in 60..63 {
        let m = plain(n);
        want.push((store.insert(&m).unwrap(), m));
    }
    store.commit().unwrap();
    let totals = store.totals().unwrap();
    assert_eq!(totals.count, want.len() as u64);
    drop(store);

    let (mut store, _) = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(queued(&mut store), want, "the commit wrote them all, each as it was inserted");
}

#[test]
fn a_rollback_writes_none_of_the_waiting_inserts_and_hands_their_ids_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = SqliteStore::open(dir.path()).unwrap();
    let kept = store.insert(&plain(0)).unwrap();
    store.begin().unwrap();
    let gone: Vec<u64> = (1..40).map(|n| store.insert(&plain(n)).unwrap()).collect();
    store.rollback();
    assert!(!store.changed());
    store.begin().unwrap();
    let again = store.insert(&plain(99)).unwrap();
    store.commit().unwrap();
    assert_eq!(again, gone[0], "a rolled-back id is handed out again");
    drop(store);
    let (mut store, _) = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(queued(&mut store), vec![(kept, plain(0)), (again, plain(99))]);
}
