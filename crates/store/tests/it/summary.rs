//! The summary row (format 4): the queued count and bytes kept in the same
//! commits as the rows, so that opening a large backlog reads one row. It
//! must always equal what the rows say, whatever mix of operations, failed
//! transactions and reopenings came before. And an acknowledgement's answer
//! (one statement for QoS 1) is the message as a fresh read sees it; one
//! that finishes the message (`ack_or_remove`) leaves no row; so does each
//! of many acknowledged together (`ack_or_remove_many`, which reads and
//! deletes runs of consecutive ids with one statement each).

use proptest::prelude::*;
use steadfast_core::Stage;
use steadfast_store::{SqliteStore, Store};

use crate::msg;

#[derive(Debug, Clone)]
enum Op {
    Insert(usize),
    Remove(usize),
    Done(usize),
    Bind(usize),
    Ack(usize, u32),
    AckOrRemove(usize, u32, bool),
    /// From the `usize`-th id, that many (plus a repeat and an id never
    /// handed out); `finishes` for every message when the flag says so,
    /// else for those of an even size only.
    AckOrRemoveMany(usize, usize, u32, bool),
    Commit,
    Rollback,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..200).prop_map(Op::Insert),
        2 => (0usize..50).prop_map(Op::Remove),
        1 => (0usize..50).prop_map(Op::Done),
        2 => (0usize..50).prop_map(Op::Bind),
        2 => ((0usize..50), (0u32..2)).prop_map(|(i, slot)| Op::Ack(i, slot)),
        2 => ((0usize..50), (0u32..2), any::<bool>()).prop_map(|(i, slot, f)| Op::AckOrRemove(i, slot, f)),
        2 => ((0usize..50), (1usize..12), (0u32..2), any::<bool>()).prop_map(|(i, n, slot, f)| Op::AckOrRemoveMany(i, n, slot, f)),
        2 => Just(Op::Commit),
        1 => Just(Op::Rollback),
        1 => Just(Op::Reopen),
    ]
}

fn check(s: &mut SqliteStore) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.totals().unwrap(), s.counted_totals().unwrap());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_summary_always_equals_the_rows(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
        let slots = s.assign_slots(&["mqtt://127.0.0.1:1".into(), "mqtt://127.0.0.1:2".into()]).unwrap();
        s.begin().unwrap();
        let mut ids: Vec<u64> = Vec::new();
        // Only QoS 2 messages are ever bound to packet ids.
        let mut qos2: Vec<u64> = Vec::new();
        // What the last commit kept: a rollback takes the rest back (and
        // their ids are handed out again).
        let mut committed = (ids.clone(), qos2.clone());
        for op in ops {
            match op {
                Op::Insert(n) => {
                    let mut m = msg("t", vec![b'x'; n]);
                    if n % 3 == 0 {
                        m.qos = steadfast_core::Qos::ExactlyOnce;
                    }
                    // A rule that needs two receipts keeps their names.
                    if n % 5 == 0 {
                        m.receipts = Some("1000 all a,b".into());
                    }
                    let id = s.insert(&m).unwrap();
                    ids.push(id);
                    if n % 3 == 0 {
                        qos2.push(id);
                    }
                }
                Op::Remove(i) => {
                    if let Some(&id) = ids.get(i % ids.len().max(1)) {
                        s.remove(id).unwrap();
                    }
                }
                Op::Done(i) => {
                    if let Some(&id) = ids.get(i % ids.len().max(1)) {
                        s.set_done(id).unwrap();
                    }
                }
                Op::Bind(i) => {
                    if let Some(&id) = qos2.get(i % qos2.len().max(1)) {
                        let slot = slots[i % 2];
                        s.set_wire(slot, id, Some((1 + (i as u16), Stage::Published))).unwrap();
                    }
                }
                Op::Ack(i, slot) => {
                    if let Some(&id) = ids.get(i % ids.len().max(1)) {
                        let answered = s.ack(id, slots[slot as usize]).unwrap();
                        prop_assert_eq!(answered, s.entry(id).unwrap());
                    }
                }
                Op::AckOrRemove(i, slot, finishes) => {
                    if let Some(&id) = ids.get(i % ids.len().max(1)) {
                        let before = s.entry(id).unwrap();
                        let answered = s.ack_or_remove(id, slots[slot as usize], &mut |_| finishes).unwrap();
                        match answered {
                            Some((e, true)) => {
                                // Only what was queued, with no exchange open, goes.
                                let before = before.unwrap();
                                prop_assert!(finishes && !before.done && e.bindings == 0);
                                prop_assert_eq!(s.entry(id).unwrap(), None);
                            }
                            Some((e, false)) => {
                                prop_assert_eq!(Some(e.clone()), s.entry(id).unwrap());
                                prop_assert!(!finishes || e.done || e.bindings > 0);
                            }
                            None => prop_assert_eq!(before, None),
                        }
                    }
                }
                Op::AckOrRemoveMany(i, n, slot, all) => {
                    let from = i % ids.len().max(1);
                    let mut asked: Vec<u64> = ids.iter().skip(from).take(n).copied().collect();
                    asked.extend(asked.first().copied());
                    asked.push(ids.iter().max().unwrap_or(&0) + 3);
                    let mut distinct = asked.clone();
                    distinct.sort_unstable();
                    distinct.dedup();
                    let before: Vec<_> = distinct.iter().map(|&id| s.entry(id).unwrap()).collect();
                    let answers =
                        s.ack_or_remove_many(&asked, slots[slot as usize], &mut |e| all || e.size % 2 == 0).unwrap();
                    prop_assert_eq!(answers.iter().map(|(id, _)| *id).collect::<Vec<_>>(), distinct.clone());
                    for ((id, answer), before) in answers.into_iter().zip(before) {
                        match answer {
                            Some((e, true)) => {
                                let before = before.unwrap();
                                prop_assert!((all || e.size % 2 == 0) && !before.done && e.bindings == 0);
                                prop_assert_eq!(s.entry(id).unwrap(), None);
                            }
                            Some((e, false)) => {
                                prop_assert_eq!(Some(e.clone()), s.entry(id).unwrap());
                                prop_assert!(!(all || e.size % 2 == 0) || e.done || e.bindings > 0);
                            }
                            None => prop_assert_eq!(before, None),
                        }
                    }
                }
                Op::Commit => {
                    s.commit().unwrap();
                    committed = (ids.clone(), qos2.clone());
                    check(&mut s)?;
                    s.begin().unwrap();
                }
                Op::Rollback => {
                    s.rollback();
                    (ids, qos2) = committed.clone();
                    check(&mut s)?;
                    s.begin().unwrap();
                }
                Op::Reopen => {
                    s.commit().unwrap();
                    committed = (ids.clone(), qos2.clone());
                    drop(s);
                    s = SqliteStore::open(dir.path()).unwrap().0;
                    check(&mut s)?;
                    s.begin().unwrap();
                }
            }
        }
        s.commit().unwrap();
        check(&mut s)?;
        // Outside a transaction, each statement is its own commit.
        let id = s.insert(&msg("t", "autocommit")).unwrap();
        check(&mut s)?;
        s.remove(id).unwrap();
        check(&mut s)?;
    }
}
