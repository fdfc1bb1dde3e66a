//! Salvage: copying every record that can still be read out of a damaged
//! database (of any format) into a fresh one, walking past damaged pages,
//! so that ids continue above everything ever handed out.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::queries::{record_last_id, ID_RECORDS};
use super::sources::{append_row, key, numbered_source, push_entry, read_records};

/// Copies what can be read from the damaged database `from` into `to`;
/// new ids start above `reserved` and above every id seen.
pub(super) fn salvage(from: &Path, to: &Connection, reserved: u64) -> u64 {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let Ok(old) = Connection::open_with_flags(from, flags) else {
        return 0;
    };
    // An inbox's identities and counters, a bridge's source records and
    // receipt names go along: without them a salvaged inbox would hand
    // every message it ever handled over again.
    for table in [
        "meta",
        "drops",
        "dropped",
        "slots",
        "missed",
        "wire",
        "inbox_ranges",
        "counters",
        "source_brokers",
        "source_log",
        "receipts",
    ] {
        let _ = copy_table(&old, to, table);
    }
    // An inbox of format 5 or older: each identity a range of its own.
    let _ = copy_legacy_inbox(&old, to);
    // Source records of format 7, a row each; of format 6 or older, keyed
    // by the broker's URL.
    let _ = read_records(&old).and_then(|row| append_row(to, &row));
    let _ = copy_legacy_sources(&old, to);
    // The records of the highest id handed out that can still be read.
    let floor =
        ID_RECORDS.iter().filter_map(|(_, sql)| old.query_row(sql, [], |r| r.get::<_, u64>(0)).ok()).max().unwrap_or(0);
    let mut count = 0;
    let mut after = 0u64;
    let mut max_id = 0u64;
    let mut jump = 1u64;
    // Walk the ids upwards; a damaged page stops a scan, so on error jump
    // ahead by a growing step and go on from there.
    while jump < (1u64 << 50) {
        let scan = copy_rows_after(&old, to, after);
        count += scan.copied;
        if let Some(last) = scan.last {
            max_id = max_id.max(last);
            after = last;
            jump = 1;
        }
        if scan.complete {
            break;
        }
        after += jump;
        jump *= 2;
    }
    // Ids are the producer's sequence numbers: never hand one out twice.
    // The database's own record of the highest may be among what was
    // lost; the reservation beside it is not.
    let _ = record_last_id(to, floor.max(max_id).max(reserved));
    count
}

/// Copies what can be read of a small table, whatever its columns (the
/// format version stays the new database's own).
fn copy_table(old: &Connection, to: &Connection, table: &str) -> rusqlite::Result<()> {
    let mut stmt = old.prepare(&format!("SELECT * FROM {table}"))?;
    let n = stmt.column_count();
    let marks = (1..=n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    let insert = format!("INSERT OR REPLACE INTO {table} VALUES ({marks})");
    let mut rows = stmt.query([])?;
    while let Ok(Some(r)) = rows.next() {
        let Ok(values) = (0..n).map(|i| r.get::<_, rusqlite::types::Value>(i)).collect::<rusqlite::Result<Vec<_>>>()
        else {
            continue;
        };
        if table == "meta" && values[0] == rusqlite::types::Value::Text("format".into()) {
            continue;
        }
        let _ = to.execute(&insert, rusqlite::params_from_iter(values.iter()));
    }
    Ok(())
}

/// Copies what can be read of a format 5 (or older) inbox, one identity
/// per row, as ranges of one.
fn copy_legacy_inbox(old: &Connection, to: &Connection) -> rusqlite::Result<()> {
    let mut stmt = old.prepare("SELECT producer, seq, handled_ms FROM inbox")?;
    let mut rows = stmt.query([])?;
    while let Ok(Some(r)) = rows.next() {
        let Ok((p, s, t)) =
            (|| Ok::<_, rusqlite::Error>((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))()
        else {
            continue;
        };
        let _ = to.execute("INSERT OR IGNORE INTO inbox_ranges VALUES (?1, ?2, ?2, ?3)", rusqlite::params![p, s, t]);
    }
    Ok(())
}

/// Copies what can be read of format 6's (or older) source records, keyed
/// by their broker's URL, as one row of the log.
fn copy_legacy_sources(old: &Connection, to: &Connection) -> rusqlite::Result<()> {
    let mut stmt = old.prepare("SELECT url, pid, digest, id FROM sources")?;
    let mut rows = stmt.query([])?;
    let mut log = Vec::new();
    while let Ok(Some(r)) = rows.next() {
        let row =
            || Ok::<_, rusqlite::Error>((r.get::<_, String>(0)?, r.get::<_, u16>(1)?, r.get::<_, i64>(2)?, r.get(3)?));
        let Ok((url, pid, digest, id)) = row() else { continue };
        if let Ok(n) = numbered_source(to, &url) {
            push_entry(&mut log, key(n, pid), digest as u64, id);
        }
    }
    append_row(to, &log)
}

struct Scan {
    copied: u64,
    last: Option<u64>,
    complete: bool,
}

/// Copies rows after `after` until the end (complete) or an error. A
/// format 1 source keeps its QoS 2 bindings in the row: they go to the
/// `wire` table under slot 0, as the migration does.
fn copy_rows_after(old: &Connection, to: &Connection, after: u64) -> Scan {
    let mut scan = Scan { copied: 0, last: None, complete: false };
    let v1 = old.prepare("SELECT pid FROM outbox LIMIT 0").is_ok();
    let v3 = old.prepare("SELECT priority FROM outbox LIMIT 0").is_ok();
    let v5 = old.prepare("SELECT receipts FROM outbox LIMIT 0").is_ok();
    let extra = match (v1, v3) {
        (true, _) => "NULL, 0, 0, pid, stage, NULL, 0, NULL, 0, 0",
        (false, false) => "route, acks, done, NULL, NULL, NULL, 0, NULL, 0, 0",
        (false, true) => "route, acks, done, NULL, NULL, expires_ms, priority, max_attempts, attempts, latest",
    };
    let receipts = if v5 { "receipts, awaiting_ms, acked_ms, resends" } else { "NULL, NULL, NULL, 0" };
    let sql = format!(
        "SELECT id, topic, payload, qos, retain, props, created_ms, size, {extra}, {receipts} FROM outbox WHERE id > ?1 ORDER BY id"
    );
    let Ok(mut stmt) = old.prepare(&sql) else {
        return scan;
    };
    let Ok(mut rows) = stmt.query([after]) else {
        return scan;
    };
    loop {
        match rows.next() {
            Ok(Some(r)) => {
                let values: rusqlite::Result<Vec<rusqlite::types::Value>> = (0..22).map(|i| r.get(i)).collect();
                let Ok(v) = values else { return scan };
                let rusqlite::types::Value::Integer(id) = v[0] else {
                    return scan;
                };
                // Ids only go up in a sound table: one that does not means
                // damaged pages (a scan of a cut file can come round again),
                // so the scan stops here as on any other error.
                if id as u64 <= scan.last.unwrap_or(after) {
                    return scan;
                }
                let copied = to.execute(
                    "INSERT OR IGNORE INTO outbox (id, topic, payload, qos, retain, props, created_ms, size, route, acks, done, expires_ms, priority, max_attempts, attempts, latest, receipts, awaiting_ms, acked_ms, resends) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
                    rusqlite::params_from_iter(v[..11].iter().chain(&v[13..])),
                );
                if copied.is_ok() {
                    scan.copied += 1;
                }
                if v1 && v[11] != rusqlite::types::Value::Null {
                    let _ = to.execute(
                        "INSERT OR IGNORE INTO wire VALUES (?1, 0, ?2, ?3)",
                        rusqlite::params![v[0], v[11], v[12]],
                    );
                }
                scan.last = Some(id as u64);
            }
            Ok(None) => {
                scan.complete = true;
                return scan;
            }
            Err(_) => return scan,
        }
    }
}
