//! Files written by earlier releases must stay readable (docs/design.md,
//! "Outbox format"). One fixture per format, each written by the release
//! that introduced it; set STEADFAST_WRITE_FIXTURE=1 to write the current
//! format's fixture again (only when adding a format).

use std::path::{Path, PathBuf};

use steadfast_core::{DropReason, Properties, Qos, Stage};
use steadfast_store::{InboxStore, Policy, SourceStore, SqliteStore, Store, StoreError};

use crate::msg;

fn fixture(format: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/outbox-format-{format}"))
}

/// Every fixture holds the same messages: a QoS 1 one, a retained QoS 2 one
/// with properties bound to packet id 7 (released), and a removed one.
/// From format 3 on, the QoS 2 one has a delivery policy too.
fn write_fixture(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let (mut s, _) = SqliteStore::open(dir).unwrap();
    s.begin().unwrap();
    s.set_meta("producer", "gw-7-0000beef").unwrap();
    s.insert(&msg("plain/qos1", "hello")).unwrap();
    let mut with_props = msg("props/qos2", vec![0u8, 1, 2, 255]);
    with_props.qos = Qos::ExactlyOnce;
    with_props.retain = true;
    with_props.props = Properties {
        content_type: Some("application/octet-stream".into()),
        user: vec![("k".into(), "v".into())],
        ..Properties::default()
    };
    with_props.route = Some("home".into());
    with_props.policy = policy_3();
    let id = s.insert(&with_props).unwrap();
    assert_eq!(s.assign_slots(&["mqtt://127.0.0.1:1883".into()]).unwrap(), vec![0]);
    s.set_wire(0, id, Some((7, Stage::Released))).unwrap();
    // From format 6 on: where a bridge's messages came from (format 6's
    // fixture got these two rows with the sqlite3 shell, in its layout).
    s.source_record("mqtt://other:1883", 9, 4243, 1).unwrap();
    s.source_record("mqtt://src:1883", 9, 4242, id).unwrap();
    let removed = s.insert(&msg("gone", "x")).unwrap();
    s.remove(removed).unwrap();
    for _ in 0..4 {
        s.add_drop(DropReason::Overflow, None).unwrap();
    }
    s.commit().unwrap();
    drop(s);
    let _ = std::fs::remove_file(dir.join("outbox.lock"));
}

fn policy_3() -> Policy {
    Policy { expires_ms: Some(4_000_000_000_000), max_attempts: Some(5), keep_latest: true, priority: 4 }
}

fn open_copy(format: u32) -> (tempfile::TempDir, SqliteStore) {
    // Work on a copy: opening converts and touches the files.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(format).join("outbox.db"), dir.path().join("outbox.db")).unwrap();
    let (s, report) = SqliteStore::open(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    (dir, s)
}

fn check_common(s: &mut SqliteStore) {
    assert_eq!(s.meta("producer").unwrap().as_deref(), Some("gw-7-0000beef"));
    assert_eq!(s.meta("format").unwrap().as_deref(), Some("9"));
    assert_eq!(s.totals().unwrap(), s.counted_totals().unwrap(), "the summary counted at conversion");
    assert_eq!(s.totals().unwrap().count, 2);
    let all = s.read_after(0, 10, None, None).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].id, all[0].msg.topic.as_str(), all[0].msg.payload.as_slice()), (1, "plain/qos1", &b"hello"[..]));
    let m = &all[1];
    assert_eq!((m.id, m.msg.qos, m.msg.retain, m.acks), (2, Qos::ExactlyOnce, true, 0));
    assert!(all.iter().all(|m| m.msg.receipts.is_none()), "no message of an older format asks for receipts");
    assert_eq!(s.awaiting().unwrap(), steadfast_store::Awaiting::default());
    assert_eq!(m.msg.props.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(m.msg.props.user, vec![("k".to_owned(), "v".to_owned())]);
    assert!(s.drops().unwrap().contains(&(DropReason::Overflow, 4)));
    // The binding belongs to the broker this outbox used, under its slot.
    let slot = s.assign_slots(&["mqtt://127.0.0.1:1883".into()]).unwrap()[0];
    let bound = s.bound(slot).unwrap();
    assert_eq!(bound.iter().map(|m| (m.id, m.wire)).collect::<Vec<_>>(), vec![(2, Some((7, Stage::Released)))]);
    s.begin().unwrap();
    assert_eq!(s.insert(&msg("next", "y")).unwrap(), 4, "sequence numbers continue after the removed id 3");
    s.commit().unwrap();
}

#[test]
fn converts_an_outbox_written_by_format_1() {
    let (_dir, mut s) = open_copy(1);
    check_common(&mut s);
    assert_eq!(s.read_after(0, 10, None, None).unwrap()[1].msg.route, None, "format 1 had no routes");
}

/// A read-only open (status) cannot convert: a format 1 outbox is refused
/// as too old, and its file is left as it was.
#[test]
fn a_format_1_outbox_read_only_is_refused_as_too_old_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    std::fs::copy(fixture(1).join("outbox.db"), &db).unwrap();
    let before = std::fs::read(&db).unwrap();
    let err = SqliteStore::open_read_only(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::FormatTooOld { found: 1, .. }), "{err}");
    assert!(err.to_string().contains("converted when its owner opens it for writing"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before);
}

#[test]
fn reads_an_outbox_written_by_format_2() {
    let (_dir, mut s) = open_copy(2);
    check_common(&mut s);
    let m = s.read_after(0, 10, None, None).unwrap().remove(1);
    assert_eq!(m.msg.route.as_deref(), Some("home"));
    assert_eq!((m.msg.policy, m.attempts), (Policy::default(), 0), "format 2 messages are persistent");
}

/// Formats 3 on: the messages and their delivery policies.
fn reads_format_with_policies(format: u32) {
    let (_dir, mut s) = open_copy(format);
    check_common(&mut s);
    let m = s.read_after(0, 10, None, None).unwrap().remove(1);
    assert_eq!((m.msg.route.as_deref(), m.msg.policy), (Some("home"), policy_3()));
}

#[test]
fn reads_an_outbox_written_by_format_3() {
    reads_format_with_policies(3);
}

/// Format 4 keeps the queued count and bytes in a summary row.
#[test]
fn reads_an_outbox_written_by_format_4() {
    reads_format_with_policies(4);
}

/// Format 5 adds receipts: the rule a message asks for, its wait, its
/// resends.
#[test]
fn reads_an_outbox_written_by_format_5() {
    reads_format_with_policies(5);
}

/// Formats 6 on: a bridge's source records, each under its broker, are
/// still known after a conversion and a reopen, and a new broker gets a
/// number of its own.
fn reads_source_records(format: u32) {
    let (dir, s) = open_copy(format);
    drop(s);
    let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
    let seen = |s: &mut SqliteStore, url: &str, digest| s.source_seen(url, 9, digest).unwrap();
    assert_eq!(seen(&mut s, "mqtt://src:1883", 4242), Some(2));
    assert_eq!(seen(&mut s, "mqtt://other:1883", 4243), Some(1));
    assert_eq!(seen(&mut s, "mqtt://src:1883", 4243), None, "another content under the same packet id");
    assert_eq!(seen(&mut s, "mqtt://new:1883", 4242), None, "another broker");
    s.begin().unwrap();
    s.source_record("mqtt://new:1883", 9, 4242, 5).unwrap();
    s.commit().unwrap();
    assert_eq!(seen(&mut s, "mqtt://new:1883", 4242), Some(5));
    assert_eq!(seen(&mut s, "mqtt://src:1883", 4242), Some(2), "the old broker's record is its own still");
}

/// Format 6 keeps the inbox as ranges (the outbox's tables are those of
/// format 5).
#[test]
fn reads_an_outbox_written_by_format_6() {
    reads_format_with_policies(6);
    reads_source_records(6);
}

/// An older release's guest still connected while the holder's successor
/// converts the outbox inserts as format 6 did, leaving the id to SQLite:
/// without AUTOINCREMENT that could be an id handed out before (the
/// removed 3 here). It is refused, and the ids continue above 3.
#[test]
fn an_insert_that_leaves_the_id_to_sqlite_is_refused_after_the_conversion() {
    let (dir, mut s) = open_copy(6);
    let old = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    let format_6 = "INSERT INTO outbox (topic, payload, qos, retain, props, created_ms, size, route, expires_ms, priority, max_attempts, latest, receipts) VALUES ('late', x'00', 1, 0, NULL, 1, 5, NULL, NULL, 0, NULL, 0, NULL)";
    let err = old.execute(format_6, []).unwrap_err();
    assert!(err.to_string().contains("NOT NULL constraint failed: outbox.acks"), "{err}");
    drop(old);
    s.begin().unwrap();
    assert_eq!(s.insert(&msg("next", "y")).unwrap(), 4);
    s.commit().unwrap();
    assert_eq!(crate::recovery_ids(&mut s), vec![1, 2, 4]);
}

/// Format 7 hands ids out itself (no AUTOINCREMENT: the highest in `ids`)
/// and keys a bridge's source records by integers.
#[test]
fn reads_an_outbox_written_by_format_7() {
    reads_format_with_policies(7);
    reads_source_records(7);
}

/// Format 8 keeps a bridge's source records as a log, a row per
/// transaction.
#[test]
fn reads_an_outbox_written_by_format_8() {
    if std::env::var_os("STEADFAST_WRITE_FIXTURE").is_some() {
        write_fixture(&fixture(8));
    }
    reads_format_with_policies(8);
    reads_source_records(8);
}

/// An inbox written by format 5 (one row per identity; the fixture holds
/// gw-7's 1 to 5 handled at 1,000 ms, 7, 9 and 10 at 2,000 ms, other's 3
/// at 3,000 ms, and 4 duplicates counted) becomes ranges when its owner
/// opens it: every identity and counter kept, the gaps still gaps, the
/// runs joined (four ranges), and pruning by age still by each run's age.
/// `status` reads it before that, as it was.
#[test]
fn an_inbox_written_by_format_5_becomes_ranges_and_keeps_every_identity() {
    use steadfast_store::StoreKind;
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inbox-format-5/inbox.db");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture, dir.path().join("inbox.db")).unwrap();
    let mut read = SqliteStore::open_read_only(dir.path()).unwrap();
    assert_eq!((read.kind(), read.inbox_len().unwrap()), (StoreKind::Inbox, 9));
    assert_eq!(read.inbox_bytes().unwrap(), 8 * (4 + 24) + (5 + 24));
    drop(read);
    let (mut s, report) = SqliteStore::open_inbox(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(s.meta("format").unwrap().as_deref(), Some("9"));
    let ids = |p: &str, r: std::ops::RangeInclusive<u64>| r.map(|q| (p.to_owned(), q)).collect::<Vec<_>>();
    let mut all = ids("gw-7", 0..=11);
    all.extend(ids("other", 2..=4));
    let seen = s.inbox_seen(&all).unwrap();
    let want = [false, true, true, true, true, true, false, true, false, true, true, false, false, true, false];
    assert_eq!(seen, want);
    assert_eq!(s.inbox_high().unwrap(), vec![("gw-7".to_owned(), 10), ("other".to_owned(), 3)]);
    assert_eq!((s.inbox_len().unwrap(), s.inbox_bytes().unwrap()), (9, 8 * (4 + 24) + (5 + 24)));
    assert!(s.counters().unwrap().contains(&("consumer.duplicates".to_owned(), 4)));
    let rows: u64 = {
        drop(s);
        let c = rusqlite::Connection::open(dir.path().join("inbox.db")).unwrap();
        c.query_row("SELECT count(*) FROM inbox_ranges", [], |r| r.get(0)).unwrap()
    };
    assert_eq!(rows, 4, "1-5, 7, 9-10 and other's 3");
    let (mut s, _) = SqliteStore::open_inbox(dir.path()).unwrap();
    s.begin().unwrap();
    assert_eq!(s.inbox_prune(1_500, 100).unwrap(), 5, "1 to 5 were handled before 1,500 ms");
    s.commit().unwrap();
    assert_eq!(s.inbox_seen(&ids("gw-7", 5..=7)).unwrap(), [false, false, true]);
}

/// An inbox written before inboxes had their own file name is an
/// `outbox.db` in the consumer's directory (the same format): opened as an
/// inbox it is renamed to `inbox.db`, keeps every identity and counter, and
/// its write-ahead log (a crash image, still holding the last commit) is
/// checkpointed into it first.
#[test]
fn an_inbox_written_under_the_old_name_is_renamed_and_keeps_everything() {
    use steadfast_store::StoreKind;
    let live = tempfile::tempdir().unwrap();
    let (mut old, _) = SqliteStore::open(live.path()).unwrap();
    old.begin().unwrap();
    old.inbox_record(&[("p".into(), 1), ("p".into(), 2)], steadfast_store::now_ms()).unwrap();
    old.add_counter("consumer.duplicates", 3).unwrap();
    old.commit().unwrap();
    // A crash image: the database and its log as they are while it runs.
    let dir = tempfile::tempdir().unwrap();
    for f in ["outbox.db", "outbox.db-wal", "outbox.lock"] {
        std::fs::copy(live.path().join(f), dir.path().join(f)).unwrap();
    }
    drop(old);
    assert!(std::fs::metadata(dir.path().join("outbox.db-wal")).unwrap().len() > 0, "the last commit is in the log");
    assert_eq!(SqliteStore::kind_in(dir.path()), Some(StoreKind::Outbox));
    let (mut inbox, report) = SqliteStore::open_inbox(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(inbox.kind(), StoreKind::Inbox);
    let ids = [("p".to_owned(), 1), ("p".to_owned(), 2), ("p".to_owned(), 3)];
    assert_eq!(inbox.inbox_seen(&ids).unwrap(), [true, true, false]);
    assert!(inbox.counters().unwrap().contains(&("consumer.duplicates".to_owned(), 3)));
    for gone in ["outbox.db", "outbox.db-wal"] {
        assert!(!dir.path().join(gone).exists(), "{gone} is left");
    }
    assert_eq!(SqliteStore::kind_in(dir.path()), Some(StoreKind::Inbox));
    drop(inbox);
    let (mut again, _) = SqliteStore::open_inbox(dir.path()).unwrap();
    assert_eq!(again.inbox_seen(&ids).unwrap(), [true, true, false]);
    let read = SqliteStore::open_read_only(dir.path()).unwrap();
    assert_eq!(read.kind(), StoreKind::Inbox);
}

/// A producer's outbox is never taken for an old inbox: a consumer
/// pointed at it is refused, and the outbox keeps its messages and its
/// id reservation.
#[test]
fn an_outbox_is_never_renamed_into_an_inbox() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
        s.begin().unwrap();
        s.insert(&msg("t", "queued")).unwrap();
        s.commit().unwrap();
    }
    let err = SqliteStore::open_inbox(dir.path()).unwrap_err();
    assert!(matches!(err, steadfast_store::StoreError::OutboxNotInbox { .. }), "{err}");
    assert!(err.to_string().contains("holds a producer's outbox"), "{err}");
    let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.read_after(0, 10, None, None).unwrap().len(), 1);
    assert!(dir.path().join("outbox.ids").exists());
}

/// The id reservation is no damage report when the first batch never
/// committed (a crash during the first publish): the outbox opens clean
/// and its ids start above the reservation (safe whichever it was). An
/// inbox never reads an outbox's reservation.
#[test]
fn a_reservation_without_a_first_commit_is_no_damage() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_s, _) = SqliteStore::open(dir.path()).unwrap();
    }
    std::fs::write(dir.path().join("outbox.ids"), "65537\n").unwrap();
    let (mut s, report) = SqliteStore::open(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    s.begin().unwrap();
    assert!(s.insert(&msg("t", "first")).unwrap() > 65537);
    s.commit().unwrap();
    drop(s);
    let inbox = tempfile::tempdir().unwrap();
    std::fs::write(inbox.path().join("outbox.ids"), "900000\n").unwrap();
    let (_i, report) = SqliteStore::open_inbox(inbox.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// The reason code beside a poisoned message came within format 9, as a
/// nullable column: a `poison` table from before it (the previous
/// release's) is read as it is by a read-only open (`status`), and gets
/// the column at the next writable open, its rows keeping their cause.
#[test]
fn a_poison_table_from_before_refusal_codes_is_read_and_given_the_column() {
    use steadfast_store::PoisonCause;
    let (dir, mut s) = open_copy(8);
    let slot = s.assign_slots(&["mqtt://127.0.0.1:1883".into()]).unwrap()[0];
    assert!(s.poison(1, slot, PoisonCause::Closed(3), 5_000).unwrap());
    drop(s);
    let db = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    db.execute_batch("ALTER TABLE poison DROP COLUMN code").unwrap();
    drop(db);
    let causes = |s: &mut SqliteStore| s.poisoned().unwrap().iter().map(|p| p.cause).collect::<Vec<_>>();
    let mut ro = SqliteStore::open_read_only(dir.path()).unwrap();
    assert_eq!(causes(&mut ro), [PoisonCause::Closed(3)]);
    drop(ro);
    let (mut s, _) = SqliteStore::open(dir.path()).unwrap();
    assert!(s.poison(2, slot, PoisonCause::Refused(0x87), 6_000).unwrap());
    assert_eq!(causes(&mut s), [PoisonCause::Closed(3), PoisonCause::Refused(0x87)]);
}
