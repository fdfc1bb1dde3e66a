//! What opening a store checks and repairs before it is used: a recovery a
//! crash interrupted, a torn write at the end of the log, a database file
//! cut short, a database that fails its integrity check (kept aside in
//! `quarantine/`, what can be read salvaged into a fresh one), and a
//! database behind its id reservation. Damage is reported, never a reason
//! to refuse to start.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode};

use super::files::{io_err, narrow, private_file, remove_if_present, sync_path, Files};
use super::queries::{record_last_id, recorded_last_id};
use super::salvage::salvage;
use super::schema::{init_schema, open_connection, recount};
use super::{map_error, OpenReport};
use crate::{now_ms, reserve, StoreError};

pub(super) enum Opened {
    Corrupt(String),
    Failed(StoreError),
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// What the clean-close marker (`outbox.clean`, `inbox.clean`) holds: the
/// database file's length and modification time once its holder closed
/// it (every commit checkpointed into it, the log gone).
fn file_stamp(db: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(db).ok()?;
    Some(format!("{} {} {}", m.len(), m.mtime(), m.mtime_nsec()))
}

/// The holder closed the store: records the stamp of its file, synced, so
/// that the next open can skip the integrity check. Called with the
/// connection closed.
pub(super) fn mark_closed(files: &Files) -> Result<(), StoreError> {
    let db = files.path("db");
    let wal = files.path("db-wal");
    if fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        // Not checkpointed: say nothing, the next open checks.
        return Ok(());
    }
    let Some(stamp) = file_stamp(&db) else { return Ok(()) };
    let marker = files.path("clean");
    private_file(&marker)?;
    fs::write(&marker, stamp).map_err(io_err(&marker))?;
    sync_path(&marker)?;
    sync_path(&files.dir)
}

/// True when the marker matches the database file as it is now and no
/// log holds commits beside it.
fn closed_cleanly(files: &Files) -> bool {
    let Ok(said) = fs::read_to_string(files.path("clean")) else { return false };
    let no_log = fs::metadata(files.path("db-wal")).map_or(true, |m| m.len() == 0);
    no_log && file_stamp(&files.path("db")).is_some_and(|now| now == said)
}

pub(super) fn open_checked(files: &Files, report: &mut OpenReport) -> Result<Connection, Opened> {
    let dir = files.dir.as_path();
    let classify = |e: rusqlite::Error| {
        if is_corruption(&e) {
            Opened::Corrupt(format!("the database is damaged ({e})"))
        } else {
            Opened::Failed(map_error(dir, e))
        }
    };
    // The integrity check reads the whole file (a quarter of a second for
    // a million queued messages here): it runs unless the last holder
    // closed the store and the file is as it left it (a crash, a power
    // loss, a copy, a cut: the check runs).
    let clean = closed_cleanly(files);
    // From here on a crash means the check again.
    remove_if_present(&files.path("clean")).map_err(Opened::Failed)?;
    let conn = open_connection(&files.path("db")).map_err(classify)?;
    report.checked = !clean;
    if !clean {
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(classify)?;
        if check != "ok" {
            return Err(Opened::Corrupt(format!("the integrity check failed: {check}")));
        }
    }
    init_schema(&conn, dir).map_err(|e| match e {
        StoreError::Database(e) if is_corruption(e.sqlite()) => {
            Opened::Corrupt(format!("the database is damaged ({e})"))
        }
        StoreError::Database(e) if e.sqlite().sqlite_error_code() == Some(ErrorCode::DiskFull) => {
            Opened::Failed(StoreError::DiskFull { path: dir.to_owned() })
        }
        other => Opened::Failed(other),
    })?;
    Ok(conn)
}

pub(super) fn check_wal_tail(files: &Files, report: &mut OpenReport) -> Result<(), StoreError> {
    let dir = files.dir.as_path();
    let wal = dir.join(files.name("db-wal"));
    let Ok(meta) = fs::metadata(&wal) else {
        return Ok(());
    };
    let len = meta.len();
    if len == 0 {
        return Ok(());
    }
    let mut header = [0u8; 32];
    let io = |source| StoreError::Io { path: wal.clone(), source };
    let torn = if len < 32 {
        len
    } else {
        File::open(&wal).and_then(|mut f| f.read_exact(&mut header)).map_err(io)?;
        let page = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as u64;
        if !(512..=65536).contains(&page) {
            len - 32
        } else {
            (len - 32) % (24 + page)
        }
    };
    if torn > 0 {
        // Keep a copy for inspection when there is room; a full disk (the
        // usual cause of a torn write) must not stop the outbox from opening.
        let kept = quarantine_dir(dir).and_then(|q| {
            let kept = q.join(files.name("db-wal.torn"));
            fs::copy(&wal, &kept).map(|_| kept).map_err(|source| StoreError::Io { path: wal.clone(), source })
        });
        match kept {
            Ok(kept) => report.quarantined.push(kept),
            Err(e) => tracing::warn!(error = %e, "cannot keep a copy of the torn write-ahead log"),
        }
        report.torn_wal_bytes = Some(torn);
        report.problem = Some(format!(
            "the write-ahead log ends in a torn write of {torn} bytes (a crash during a commit that was never acknowledged); committed messages are kept"
        ));
        tracing::warn!(dir = %dir.display(), torn, "outbox WAL has a torn tail; ignored and kept aside");
    }
    Ok(())
}

/// A WAL file is a 32-byte header and whole frames of `24 + page size`
/// bytes. Anything after the last whole frame is a write torn by a crash.
/// A database file that does not end on a whole page was cut short (a
/// damaged disk, a bad copy). SQLite would read the missing bytes of its
/// last page as zeros and hand over rows with changed payloads; the partial
/// page is cut off instead (its rows are lost, never altered), after a copy
/// of the file is kept aside. The open that follows finds the missing page
/// and recovers the rest.
pub(super) fn cut_partial_page(files: &Files, report: &mut OpenReport) -> Result<(), StoreError> {
    let dir = files.dir.as_path();
    let db = files.path("db");
    let io = |source| StoreError::Io { path: db.clone(), source };
    let len = fs::metadata(&db).map_err(io)?.len();
    let mut header = [0u8; 18];
    let page = match File::open(&db).and_then(|mut f| f.read_exact(&mut header)) {
        // Bytes 16-17: the page size (1 means 65536).
        Ok(()) => match u16::from_be_bytes([header[16], header[17]]) {
            1 => 65536,
            p if p >= 512 && p.is_power_of_two() => p as u64,
            _ => 4096,
        },
        Err(_) => 4096,
    };
    let partial = len % page;
    if len == 0 || partial == 0 {
        return Ok(());
    }
    let q = quarantine_dir(dir)?;
    let kept = q.join(files.name("db"));
    fs::copy(&db, &kept).map_err(io)?;
    sync_path(&kept)?;
    report.quarantined.push(kept);
    let file = fs::OpenOptions::new().write(true).open(&db).map_err(io)?;
    file.set_len(len - partial).and_then(|_| file.sync_all()).map_err(io)?;
    report.problem = Some(format!(
        "the database file ends in a partial page ({partial} of {page} bytes): the page was cut off, its rows are lost, the file is kept aside"
    ));
    tracing::error!(dir = %dir.display(), partial, page, "outbox database ends in a partial page; cut off and kept aside");
    Ok(())
}

fn quarantine_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    let q = dir.join("quarantine").join(format!("{}-{:04x}", now_ms(), fastrand::u16(..)));
    fs::create_dir_all(&q).map_err(|source| StoreError::Io { path: q.clone(), source })?;
    Ok(q)
}

const SALVAGE_DONE: &str = "salvage-complete";

/// Finishes or undoes a recovery that a crash interrupted, before anything
/// else looks at the files.
pub(super) fn resume_interrupted_salvage(files: &Files, report: &mut OpenReport) -> Result<(), StoreError> {
    let dir = files.dir.as_path();
    if dir.join(SALVAGE_DONE).exists() {
        report.problem = Some("a recovery of a damaged outbox was interrupted; it was completed now".into());
        return swap_in_salvaged(files);
    }
    // A salvage that did not complete: the damaged original is still in
    // place and is recovered again from scratch.
    for f in ["", "-journal", "-wal", "-shm"] {
        remove_if_present(&dir.join(format!("{}{f}", files.name("db.salvaged"))))?;
    }
    Ok(())
}

/// Replaces the damaged database by the complete salvaged one. Idempotent:
/// safe to run again after a crash at any point.
fn swap_in_salvaged(files: &Files) -> Result<(), StoreError> {
    let dir = files.dir.as_path();
    // The damaged database's log belongs to it alone (a copy is in the
    // quarantine): it must never be replayed into the new file.
    remove_if_present(&dir.join(files.name("db-wal")))?;
    remove_if_present(&dir.join(files.name("db-shm")))?;
    let tmp = files.path("db.salvaged");
    if tmp.exists() {
        fs::rename(&tmp, files.path("db")).map_err(io_err(&tmp))?;
    }
    sync_path(dir)?;
    remove_if_present(&dir.join(SALVAGE_DONE))?;
    sync_path(dir)
}

/// Keeps a copy of the damaged database aside, builds a fresh one from every
/// record that can still be read (in one transaction, in a separate file),
/// and swaps it in. A crash at any point leaves either the damaged original
/// (recovered again at the next open) or the complete replacement.
pub(super) fn quarantine_and_salvage(files: &Files, report: &mut OpenReport) -> Result<Connection, StoreError> {
    let dir = files.dir.as_path();
    let q = quarantine_dir(dir)?;
    for suffix in ["", "-wal"] {
        let from = dir.join(format!("{}{suffix}", files.name("db")));
        if from.exists() {
            let to = q.join(format!("{}{suffix}", files.name("db")));
            fs::copy(&from, &to).map_err(io_err(&from))?;
            narrow(&Files { dir: q.clone(), stem: files.stem })?;
            sync_path(&to)?;
            if suffix.is_empty() {
                report.quarantined.push(to);
            }
        }
    }
    let tmp = files.path("db.salvaged");
    let salvaged = {
        private_file(&tmp)?;
        let conn = Connection::open(&tmp).map_err(|e| map_error(dir, e))?;
        conn.execute_batch("PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;")?;
        init_schema(&conn, dir)?;
        conn.execute_batch("BEGIN")?;
        let n = salvage(&q.join(files.name("db")), &conn, reserve::read(dir));
        recount(&conn).map_err(|e| map_error(dir, e))?;
        conn.execute_batch("COMMIT").map_err(|e| map_error(dir, e))?;
        n
    };
    sync_path(&tmp)?;
    let done = dir.join(SALVAGE_DONE);
    fs::write(&done, b"").map_err(io_err(&done))?;
    sync_path(&done)?;
    sync_path(dir)?;
    swap_in_salvaged(files)?;
    report.salvaged = salvaged;
    tracing::error!(
        dir = %dir.display(),
        quarantine = %q.display(),
        salvaged,
        problem = report.problem.as_deref().unwrap_or(""),
        "outbox was damaged: a copy is kept aside, readable messages recovered"
    );
    let conn = open_connection(&files.path("db")).map_err(|e| map_error(dir, e))?;
    init_schema(&conn, dir)?;
    Ok(conn)
}

/// A database that opened sound but is far behind its id reservation was
/// emptied or cut back (a file replaced, a truncation SQLite did not see):
/// new ids start above the reservation, so none is handed out twice.
pub(super) fn continue_above_reservation(
    conn: &Connection,
    reserved: u64,
    report: &mut OpenReport,
) -> rusqlite::Result<()> {
    let recorded = recorded_last_id(conn)?;
    let Some(floor) = reserve::lost_floor(recorded, reserved) else { return Ok(()) };
    record_last_id(conn, floor)?;
    let rows: u64 = conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?;
    if recorded == 0 && rows == 0 {
        // Either the first batch never committed (a crash or a full disk
        // during the first publish) or the database was emptied: the two
        // look the same, and continuing above the reservation is safe for
        // both. Not reported as damage.
        tracing::info!(floor, "new ids continue above the ids reserved before");
        return Ok(());
    }
    let why = format!(
        "the database says it handed out ids up to {recorded}, but {} reserved ids up to {floor}: it was emptied or cut back; new ids start above {floor}",
        reserve::FILE
    );
    tracing::error!(problem = %why, "outbox behind its id reservation");
    report.add_problem(why);
    Ok(())
}
