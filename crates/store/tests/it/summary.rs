//! The summary row (format 4): the queued count and bytes kept in the same
//! commits as the rows, so that opening a large backlog reads one row. It
//! must always equal what the rows say, whatever mix of operations, failed
//! transactions and reopenings came before.

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
    Commit,
    Rollback,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..200).prop_map(Op::Insert),
        2 => (0usize..50).prop_map(Op::Remove),
        1 => (0usize..50).prop_map(Op::Done),
        1 => (0usize..50).prop_map(Op::Bind),
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
        let slot = s.assign_slots(&["mqtt://127.0.0.1:1".into()]).unwrap()[0];
        s.begin().unwrap();
        let mut ids: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Insert(n) => ids.push(s.insert(&msg("t", vec![b'x'; n])).unwrap()),
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
                    if let Some(&id) = ids.get(i % ids.len().max(1)) {
                        s.set_wire(slot, id, Some((1 + (i as u16), Stage::Published))).unwrap();
                    }
                }
                Op::Commit => {
                    s.commit().unwrap();
                    check(&mut s)?;
                    s.begin().unwrap();
                }
                Op::Rollback => {
                    s.rollback();
                    check(&mut s)?;
                    s.begin().unwrap();
                }
                Op::Reopen => {
                    s.commit().unwrap();
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
