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
