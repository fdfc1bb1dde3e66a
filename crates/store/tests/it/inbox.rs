//! The consumer's inbox in the store: what was handled, within a window.

use steadfast_store::{SqliteStore, Store};

#[test]
fn the_inbox_remembers_handled_identities_within_its_window_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids = |from: u64, to: u64| (from..=to).map(|s| ("gw-7".to_owned(), s)).collect::<Vec<_>>();
    {
        let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
        s.begin().unwrap();
        s.inbox_record(&ids(1, 5), 1_000).unwrap();
        s.inbox_record(&ids(6, 10), 2_000).unwrap();
        s.inbox_record(&[("other".to_owned(), 3)], 2_000).unwrap();
        s.commit().unwrap();
    }
    let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
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
