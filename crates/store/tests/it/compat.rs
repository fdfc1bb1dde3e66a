//! Files written by earlier releases must stay readable (docs/design.md,
//! "Outbox format"). The fixture was written by format 1; set
//! STEADFAST_WRITE_FIXTURE=1 to write it again (only when adding a format).

use std::path::PathBuf;

use steadfast_core::{DropReason, Properties, Qos, Stage};
use steadfast_store::{SqliteStore, Store};

use crate::msg;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/outbox-format-1")
}

fn write_fixture(dir: &std::path::Path) {
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
    let id = s.insert(&with_props).unwrap();
    s.set_wire(id, Some((7, Stage::Released))).unwrap();
    let removed = s.insert(&msg("gone", "x")).unwrap();
    s.remove(removed).unwrap();
    s.add_drops(DropReason::Overflow, 4).unwrap();
    s.commit().unwrap();
    drop(s);
    let _ = std::fs::remove_file(dir.join("outbox.lock"));
}

#[test]
fn reads_an_outbox_written_by_format_1() {
    if std::env::var_os("STEADFAST_WRITE_FIXTURE").is_some() {
        write_fixture(&fixture());
    }
    // Work on a copy: opening may touch the files.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("outbox.db"), dir.path().join("outbox.db")).unwrap();
    let (mut s, report) = SqliteStore::open(dir.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(s.meta("producer").unwrap().as_deref(), Some("gw-7-0000beef"));
    assert_eq!(s.meta("format").unwrap().as_deref(), Some("1"));
    let all = s.read_after(0, 10).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].id, all[0].msg.topic.as_str(), all[0].msg.payload.as_slice()), (1, "plain/qos1", &b"hello"[..]));
    let m = &all[1];
    assert_eq!((m.id, m.msg.qos, m.msg.retain, m.wire), (2, Qos::ExactlyOnce, true, Some((7, Stage::Released))));
    assert_eq!(m.msg.props.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(m.msg.props.user, vec![("k".to_owned(), "v".to_owned())]);
    assert!(s.drops().unwrap().contains(&(DropReason::Overflow, 4)));
    assert_eq!(
        s.bound().unwrap().iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![2],
        "bindings found through the index"
    );
    s.begin().unwrap();
    assert_eq!(s.insert(&msg("next", "y")).unwrap(), 4, "sequence numbers continue after the removed id 3");
    s.commit().unwrap();
}
