//! A bridge's source records (format 8: a log, a row per transaction, the
//! standing records in memory) answer as a plain map would, across
//! commits, rollbacks and reopens, and the log keeps no row whose records
//! were all replaced.

use std::collections::HashMap;

use proptest::prelude::*;
use steadfast_store::{SourceStore, SqliteStore, Store};

const URLS: [&str; 3] = ["mqtt://a:1883", "mqtt://b:1883", "mqtt://c:1883"];
const PIDS: u16 = 6;
const DIGESTS: u64 = 3;

#[derive(Debug, Clone)]
enum Op {
    Record(usize, u16, u64),
    Commit,
    Rollback,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..URLS.len(), 0..PIDS, 0..DIGESTS).prop_map(|(u, p, d)| Op::Record(u, p, d)),
        2 => Just(Op::Commit),
        1 => Just(Op::Rollback),
        1 => Just(Op::Reopen),
    ]
}

/// Rows of the log, read beside the store's own connection.
fn log_rows(dir: &std::path::Path) -> (u64, u64) {
    let conn = rusqlite::Connection::open(dir.join("outbox.db")).unwrap();
    conn.query_row("SELECT count(*), coalesce(sum(length(entries)), 0) FROM source_log", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .unwrap()
}

type Model = HashMap<(usize, u16), (u64, u64)>;

fn check(s: &mut SqliteStore, model: &Model) -> Result<(), TestCaseError> {
    for (u, url) in URLS.iter().enumerate() {
        for pid in 0..PIDS {
            for digest in 0..DIGESTS {
                let want = model.get(&(u, pid)).filter(|(d, _)| *d == digest).map(|(_, id)| *id);
                prop_assert_eq!(s.source_seen(url, pid, digest).unwrap(), want, "{} {} {}", url, pid, digest);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_source_log_answers_as_a_map_and_keeps_only_rows_that_stand(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path()).unwrap().0;
        let (mut committed, mut pending): (Model, Model) = Default::default();
        let mut next_id = 1u64;
        s.begin().unwrap();
        for op in ops {
            match op {
                Op::Record(u, pid, digest) => {
                    s.source_record(URLS[u], pid, digest, next_id).unwrap();
                    pending.insert((u, pid), (digest, next_id));
                    next_id += 1;
                    // Inside the transaction, its own records count.
                    let mut now = committed.clone();
                    now.extend(pending.iter().map(|(k, v)| (*k, *v)));
                    check(&mut s, &now)?;
                }
                Op::Commit => {
                    s.commit().unwrap();
                    committed.extend(pending.drain());
                    check(&mut s, &committed)?;
                    // Every row has a record that stands.
                    let (rows, bytes) = log_rows(dir.path());
                    prop_assert!(rows <= committed.len() as u64, "{} rows for {} records", rows, committed.len());
                    prop_assert_eq!(bytes % 24, 0);
                    s.begin().unwrap();
                }
                Op::Rollback => {
                    s.rollback();
                    pending.clear();
                    check(&mut s, &committed)?;
                    s.begin().unwrap();
                }
                Op::Reopen => {
                    s.rollback();
                    pending.clear();
                    drop(s);
                    s = SqliteStore::open(dir.path()).unwrap().0;
                    check(&mut s, &committed)?;
                    s.begin().unwrap();
                }
            }
        }
        s.commit().unwrap();
        committed.extend(pending.drain());
        drop(s);
        let mut s = SqliteStore::open(dir.path()).unwrap().0;
        check(&mut s, &committed)?;
    }
}

/// Records that no longer stand are rewritten away once there are many
/// more of them than of standing ones: one packet id's 70,000 deliveries
/// leave one record of 24 bytes, which still answers after a reopen.
#[test]
fn a_log_of_replaced_records_is_rewritten_as_what_stands() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap().0;
    s.begin().unwrap();
    s.source_record(URLS[1], 2, 9, 1).unwrap();
    s.commit().unwrap();
    s.begin().unwrap();
    for id in 2..=70_001u64 {
        s.source_record(URLS[0], 7, id % 5, id).unwrap();
    }
    s.commit().unwrap();
    assert_eq!(log_rows(dir.path()), (1, 48), "one row: a's last delivery and b's");
    drop(s);
    let mut s = SqliteStore::open(dir.path()).unwrap().0;
    assert_eq!(s.source_seen(URLS[0], 7, 70_001 % 5).unwrap(), Some(70_001));
    assert_eq!(s.source_seen(URLS[0], 7, 70_000 % 5).unwrap(), None);
    assert_eq!(s.source_seen(URLS[1], 2, 9).unwrap(), Some(1));
}

/// More source brokers than the store gives tables of their own (say a
/// damaged log's keys, kept by a salvage): the rest answer from a map, the
/// same after a reopen.
#[test]
fn records_of_many_source_brokers_answer_beyond_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(dir.path()).unwrap().0;
    let urls: Vec<String> = (0..12).map(|i| format!("mqtt://b{i}:1883")).collect();
    let id = |i: usize, pid: u16| 100 * i as u64 + u64::from(pid % 7) + 1;
    s.begin().unwrap();
    for (i, url) in urls.iter().enumerate() {
        for pid in [0u16, 1, 65535] {
            s.source_record(url, pid, i as u64, id(i, pid)).unwrap();
        }
    }
    s.commit().unwrap();
    for reopen in [false, true] {
        if reopen {
            drop(s);
            s = SqliteStore::open(dir.path()).unwrap().0;
        }
        for (i, url) in urls.iter().enumerate() {
            for pid in [0u16, 1, 65535] {
                assert_eq!(s.source_seen(url, pid, i as u64).unwrap(), Some(id(i, pid)), "{url} {pid}");
                assert_eq!(s.source_seen(url, pid, 99).unwrap(), None, "another digest");
            }
            assert_eq!(s.source_seen(url, 2, i as u64).unwrap(), None, "no record");
        }
    }
}
