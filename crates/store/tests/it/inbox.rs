//! The consumer's inbox in the store: what was handled, within a window.

use steadfast_store::{InboxBounds, InboxStore, Outbox, OutboxConfig, SqliteStore, Store};

#[test]
fn the_inbox_remembers_handled_identities_within_its_window_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids = |from: u64, to: u64| (from..=to).map(|s| ("gw-7".to_owned(), s)).collect::<Vec<_>>();
    {
        let (mut s, _) = SqliteStore::open_inbox(dir.path()).unwrap();
        s.begin().unwrap();
        s.inbox_record(&ids(1, 5), 1_000).unwrap();
        s.inbox_record(&ids(6, 10), 2_000).unwrap();
        s.inbox_record(&[("other".to_owned(), 3)], 2_000).unwrap();
        s.commit().unwrap();
    }
    let (mut s, _) = SqliteStore::open_inbox(dir.path()).unwrap();
    assert_eq!(
        s.inbox_seen(&[("gw-7".into(), 3), ("gw-7".into(), 11), ("other".into(), 3)]).unwrap(),
        [true, false, true]
    );
    assert_eq!(s.inbox_high().unwrap(), vec![("gw-7".to_owned(), 10), ("other".to_owned(), 3)]);
    s.begin().unwrap();
    // By age: what was handled before 1500 goes.
    assert_eq!(s.inbox_prune(1_500, 100).unwrap(), 5);
    // By count: the newest 3 stay.
    assert_eq!(s.inbox_prune(0, 3).unwrap(), 3);
    s.commit().unwrap();
    assert_eq!(s.inbox_len().unwrap(), 3);
    assert_eq!(s.inbox_seen(&[("gw-7".into(), 5)]).unwrap(), [false], "forgotten: outside the window");
}

/// A byte bound on the inbox: recording beyond it forgets the oldest
/// identities until the inbox is under it again.
#[test]
fn the_inbox_is_bounded_by_bytes_too() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = SqliteStore::open_inbox(dir.path()).unwrap();
    let o = Outbox::start(Box::new(store), OutboxConfig::default()).unwrap();
    crate::block_on(async {
        // "producer-1" is 10 bytes: each identity counts 34.
        let bounds = InboxBounds { max_age_ms: u64::MAX / 2, max_count: 1_000_000, max_bytes: Some(34 * 100) };
        o.inbox_bounds(bounds).await.unwrap();
        for chunk in 0..5u64 {
            let ids: Vec<_> = (chunk * 50..(chunk + 1) * 50).map(|s| ("producer-1".to_owned(), s)).collect();
            o.inbox_record(ids).await.unwrap();
        }
        let r = o.report().await.unwrap();
        assert!(r.inbox <= 100, "{} identities kept over a bound of 100", r.inbox);
        assert!(r.inbox >= 50, "only {} kept: it prunes to 90 %, not to nothing", r.inbox);
        let newest = o.inbox_seen(vec![("producer-1".into(), 249)]).await.unwrap();
        let oldest = o.inbox_seen(vec![("producer-1".into(), 0)]).await.unwrap();
        assert_eq!((newest, oldest), (vec![true], vec![false]), "the oldest go first");
    });
}

mod ranges {
    //! The inbox keeps identities as non-overlapping ranges: whatever is
    //! recorded (repeats, overlaps, out of order, several producers), it
    //! answers as a set of identities would.

    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use steadfast_store::{InboxStore, SqliteStore, Store};

    #[derive(Debug, Clone)]
    enum Op {
        /// Records these identities (producer 0 or 1, small sequence
        /// numbers, so that they overlap what is held).
        Record(Vec<(u8, u64)>),
        /// Forgets what was handled before the `n`th record.
        PruneAge(usize),
        /// Keeps the newest `n`.
        PruneCount(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => prop::collection::vec((0u8..2, 0u64..60), 1..40).prop_map(Op::Record),
            1 => (0usize..10).prop_map(Op::PruneAge),
            1 => (0u64..80).prop_map(Op::PruneCount),
        ]
    }

    fn name(p: u8) -> String {
        ["gw-7", "sensor-12"][p as usize].to_owned()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn the_ranges_answer_as_the_set_of_identities_recorded(ops in prop::collection::vec(op(), 1..30)) {
            let dir = tempfile::tempdir().unwrap();
            let (mut s, _) = SqliteStore::open_inbox(dir.path()).unwrap();
            let raw = rusqlite::Connection::open(dir.path().join("inbox.db")).unwrap();
            // The model: each identity and when it was first recorded.
            let mut model: BTreeMap<(String, u64), u64> = BTreeMap::new();
            let mut clock = 1_000u64;
            for op in ops {
                s.begin().unwrap();
                match op {
                    Op::Record(ids) => {
                        clock += 10;
                        let ids: Vec<(String, u64)> = ids.into_iter().map(|(p, q)| (name(p), q)).collect();
                        s.inbox_record(&ids, clock).unwrap();
                        for id in ids {
                            model.entry(id).or_insert(clock);
                        }
                    }
                    Op::PruneAge(n) => {
                        let cutoff = 1_000 + 10 * n as u64;
                        let before = model.len();
                        model.retain(|_, t| *t >= cutoff);
                        prop_assert_eq!(s.inbox_prune(cutoff, u64::MAX / 2).unwrap(), (before - model.len()) as u64);
                    }
                    Op::PruneCount(keep) => {
                        let before = model.len() as u64;
                        let pruned = s.inbox_prune(0, keep).unwrap();
                        prop_assert_eq!(pruned, before.saturating_sub(keep));
                        let kept: Vec<bool> = {
                            let ids: Vec<(String, u64)> = model.keys().cloned().collect();
                            s.inbox_seen(&ids).unwrap()
                        };
                        // What went is older than (or as old as) what stayed.
                        let (mut newest_gone, mut oldest_kept) = (0, u64::MAX);
                        for ((_, t), k) in model.iter().zip(&kept) {
                            if *k { oldest_kept = oldest_kept.min(*t) } else { newest_gone = newest_gone.max(*t) }
                        }
                        prop_assert!(newest_gone <= oldest_kept, "{} gone, {} kept", newest_gone, oldest_kept);
                        let mut k = kept.into_iter();
                        model.retain(|_, _| k.next().unwrap());
                    }
                }
                s.commit().unwrap();
                let overlaps: u64 = raw.query_row(
                    "SELECT count(*) FROM inbox_ranges a JOIN inbox_ranges b ON a.producer = b.producer AND a.first < b.first AND a.last >= b.first",
                    [],
                    |r| r.get(0),
                ).unwrap();
                prop_assert_eq!(overlaps, 0);
                let all: Vec<(String, u64)> = (0..2).flat_map(|p| (0..62).map(move |q| (name(p), q))).collect();
                let seen = s.inbox_seen(&all).unwrap();
                for (id, seen) in all.iter().zip(seen) {
                    prop_assert_eq!(seen, model.contains_key(id), "{:?}", id);
                }
                prop_assert_eq!(s.inbox_len().unwrap(), model.len() as u64);
                let bytes: u64 = model.keys().map(|(p, _)| p.len() as u64 + steadfast_store::INBOX_ENTRY_BYTES).sum();
                prop_assert_eq!(s.inbox_bytes().unwrap(), bytes);
                let mut high: BTreeMap<String, u64> = BTreeMap::new();
                for (p, q) in model.keys() {
                    high.insert(p.clone(), *q);
                }
                prop_assert_eq!(s.inbox_high().unwrap(), high.into_iter().collect::<Vec<_>>());
            }
        }
    }
}
