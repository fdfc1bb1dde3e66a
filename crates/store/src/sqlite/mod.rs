//! The SQLite store: an outbox (`outbox.db`) or a consumer's inbox
//! (`inbox.db`) in a directory of its own, in WAL mode with
//! `synchronous=FULL`, locked by one process at a time, recovered with
//! quarantine when damaged.
//!
//! This file holds [`SqliteStore`] and how it is opened. The rest, by role:
//!
//! | file | what |
//! |---|---|
//! | `files.rs` | the directory: file names, owner and permissions, the lock, the legacy inbox rename |
//! | `schema.rs` | the format: tables, migrations from older formats, the connection's settings |
//! | `recovery.rs` | what opening checks and repairs: torn logs, partial pages, quarantine, the id reservation |
//! | `salvage.rs` | copying what can still be read out of a damaged database |
//! | `rows.rs` | reading messages back: the selects, decoding a row |
//! | `tail.rs` | the newest messages kept in memory, for reads and acknowledgements |
//! | `queries.rs` | the `Store` trait over SQL |
//! | `deferred.rs` | plain inserts written together, many rows a statement, before anything could see them |
//! | `inbox.rs`, `sources.rs` | the `InboxStore` and `SourceStore` parts |

mod deferred;
mod files;
mod inbox;
mod queries;
mod recovery;
mod rows;
mod salvage;
mod schema;
mod sources;
mod tail;

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use crate::{reserve, StoreError};
use files::{create_private_dir, remove_if_present, rename_legacy_inbox, take_lock, Files};
use queries::trim_drop_log;
use recovery::{
    check_wal_tail, continue_above_reservation, cut_partial_page, open_checked, quarantine_and_salvage,
    resume_interrupted_salvage, Opened,
};

/// What a store directory holds, and so the names of its files:
/// `outbox.db` and `outbox.lock` for a producer's outbox, `inbox.db` and
/// `inbox.lock` for a consumer's inbox (format 3 in both; an inbox written
/// before it had its own name is renamed when its owner opens it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A producer's outbox (or a bridge route's).
    Outbox,
    /// A consumer's inbox (or a bridge route's).
    Inbox,
}

impl StoreKind {
    /// `outbox` or `inbox`: the stem of its file names, and its name in
    /// messages.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Outbox => "outbox",
            StoreKind::Inbox => "inbox",
        }
    }
}

/// What opening the outbox found and did about damage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Files moved aside because they were damaged. Kept, never deleted.
    pub quarantined: Vec<PathBuf>,
    /// Messages recovered from a quarantined database.
    pub salvaged: u64,
    /// Bytes of an incomplete last write-ahead-log frame (a torn write at
    /// power loss). SQLite ignores such a frame; what was committed before
    /// it is kept.
    pub torn_wal_bytes: Option<u64>,
    /// What was wrong, in words, when something was.
    pub problem: Option<String>,
    /// The integrity check ran (it is skipped when the last holder closed
    /// the store and the file is as it left it).
    pub checked: bool,
}

impl OpenReport {
    /// True when the store was opened without finding damage.
    pub fn is_clean(&self) -> bool {
        self.quarantined.is_empty() && self.problem.is_none()
    }

    /// Adds a problem after those found before it.
    fn add_problem(&mut self, why: String) {
        self.problem = Some(match self.problem.take() {
            Some(before) => format!("{before}; then {why}"),
            None => why,
        });
    }
}

/// The outbox in a SQLite database in its own directory.
pub struct SqliteStore {
    /// The connection: reached through [`SqliteStore::conn`] (or, for
    /// statements that cannot see a waiting insert, `conn_below` and
    /// `conn_apart`), which writes the waiting inserts first.
    db: Connection,
    /// Plain inserts of the transaction under way not written yet
    /// ([`deferred`]), ids ascending.
    waiting: Vec<deferred::Waiting>,
    /// Acknowledgements not written yet ([`deferred`]), held past commits
    /// for at most [`deferred::ACKS_HELD_AT_MOST`].
    held_acks: deferred::HeldAcks,
    dir: PathBuf,
    kind: StoreKind,
    _lock: Option<File>,
    unreadable: Vec<(u64, String)>,
    /// `synchronous=FULL` now (else NORMAL, for bookkeeping commits).
    synced: bool,
    /// Ids up to this one are reserved on disk ([`crate::reserve`]).
    reserved: u64,
    /// Drop log records written by this handle (trimmed every 1,024).
    drops_logged: u64,
    /// What the transaction under way queued (+) and removed (-): count
    /// and bytes, written to the summary row at its commit.
    queued_delta: (i64, i64),
    /// The connection's count of changed rows when the transaction under
    /// way began ([`Store::changed`]).
    changes_at_begin: u64,
    /// The newest messages, in memory ([`tail`]); off in a guest or a
    /// read-only handle.
    tail: tail::Tail,
    /// `PRAGMA data_version` when the tail last looked: it changes when
    /// another connection commits.
    seen_version: Option<u64>,
    /// The ids this handle hands out ([`Ids`]).
    ids: Ids,
    /// A bridge's source broker URLs and their numbers in `source_brokers`
    /// (committed ones only: emptied at a rollback).
    source_numbers: Vec<(String, u64)>,
    /// A bridge's source records, as the log holds them (format 8).
    source_log: sources::SourceLog,
    /// Per slot: its reads below the tail are masked (not first tried
    /// without its mask) until their cursor reaches this id
    /// (`Store::read_page`).
    masked_until: [u64; crate::MAX_SLOTS],
}

/// What a handle knows of the ids it hands out (format 7: the store, not
/// SQLite, picks them, always inside a transaction). The highest one is
/// trusted only as long as no other connection committed since (`PRAGMA
/// data_version`, looked at in each transaction's `begin`).
#[derive(Debug, Default)]
struct Ids {
    /// The highest id handed out, when known.
    last: Option<u64>,
    /// The highest id handed out in the transaction under way, written to
    /// `ids` at its commit.
    unrecorded: Option<u64>,
}

impl Drop for SqliteStore {
    /// The holder of the store says it closed it: the next open skips the
    /// integrity check (a crash leaves this unsaid). A guest or a
    /// read-only handle says nothing.
    fn drop(&mut self) {
        // Acknowledgements still held go in before the store closes.
        if (!self.held_acks.is_empty() || self.held_acks.has_log()) && self.db.is_autocommit() {
            if let Err(e) = self.write_acks_before_read() {
                tracing::warn!(error = %e, "outbox: the last acknowledgements could not be written; their messages are sent again to those brokers");
            }
        }
        if self._lock.is_none() || !self.db.is_autocommit() {
            return;
        }
        // Closed first: the last connection checkpoints the log into the
        // file and removes it, and the marker records the file as it is.
        let Ok(spare) = rusqlite::Connection::open_in_memory() else { return };
        if std::mem::replace(&mut self.db, spare).close().is_err() {
            return;
        }
        if let Err(e) = recovery::mark_closed(&Files::new(&self.dir, self.kind)) {
            tracing::debug!(error = %e, "cannot record the clean close; the next open checks the store");
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("dir", &self.dir).finish()
    }
}

impl SqliteStore {
    /// Counts rows that became queued (+) or stopped being queued (-):
    /// inside a transaction, at its commit; outside one, at once.
    pub(super) fn count_queued(&mut self, count: i64, bytes: i64) -> Result<(), StoreError> {
        if self.db.is_autocommit() {
            return self.add_to_summary(count, bytes);
        }
        self.queued_delta.0 += count;
        self.queued_delta.1 += bytes;
        Ok(())
    }

    pub(super) fn add_to_summary(&mut self, count: i64, bytes: i64) -> Result<(), StoreError> {
        let sql = "UPDATE summary SET queued = queued + ?1, bytes = bytes + ?2 WHERE k = 0";
        let r = self.conn_apart().prepare_cached(sql).and_then(|mut s| s.execute([count, bytes]));
        r.map(|_| ()).map_err(|e| map_error(&self.dir, e))
    }

    /// Opens (or creates) the outbox in `dir` for writing, taking its lock.
    /// A damaged database is moved to `dir/quarantine/`, what can be read
    /// from it is copied into a fresh one, and the report says so: damage
    /// is never a reason to refuse to start.
    pub fn open(dir: &Path) -> Result<(SqliteStore, OpenReport), StoreError> {
        Self::open_kind(dir, StoreKind::Outbox)
    }

    /// Opens (or creates) a consumer's inbox in `dir` (`inbox.db`), as
    /// [`SqliteStore::open`] does an outbox. An inbox written before it had
    /// its own file name (`outbox.db` holding only the inbox) is renamed.
    pub fn open_inbox(dir: &Path) -> Result<(SqliteStore, OpenReport), StoreError> {
        rename_legacy_inbox(dir)?;
        Self::open_kind(dir, StoreKind::Inbox)
    }

    /// A handle on `db`, opened and checked: nothing in memory yet.
    fn with(db: Connection, dir: &Path, kind: StoreKind, lock: Option<File>, reserved: u64, tail: tail::Tail) -> Self {
        SqliteStore {
            db,
            waiting: Vec::new(),
            held_acks: deferred::HeldAcks::new(),
            dir: dir.to_owned(),
            kind,
            _lock: lock,
            unreadable: Vec::new(),
            synced: true,
            reserved,
            drops_logged: 0,
            queued_delta: (0, 0),
            changes_at_begin: 0,
            tail,
            seen_version: None,
            ids: Ids::default(),
            source_numbers: Vec::new(),
            source_log: sources::SourceLog::default(),
            masked_until: [0; crate::MAX_SLOTS],
        }
    }

    fn open_kind(dir: &Path, kind: StoreKind) -> Result<(SqliteStore, OpenReport), StoreError> {
        let files = Files::new(dir, kind);
        create_private_dir(&files)?;
        let lock = take_lock(&files)?;
        // Not ready for a joining process until recovery is done.
        remove_if_present(&files.path("ready"))?;
        let mut report = OpenReport::default();
        resume_interrupted_salvage(&files, &mut report)?;
        check_wal_tail(&files, &mut report)?;
        cut_partial_page(&files, &mut report)?;
        let conn = match open_checked(&files, &mut report) {
            Ok(conn) => conn,
            Err(Opened::Corrupt(why)) => {
                report.add_problem(why);
                quarantine_and_salvage(&files, &mut report)?
            }
            Err(Opened::Failed(e)) => return Err(e),
        };
        // Only an outbox hands out ids.
        let reserved = if kind == StoreKind::Outbox { reserve::read(dir) } else { 0 };
        continue_above_reservation(&conn, reserved, &mut report).map_err(|e| map_error(dir, e))?;
        // Bounded across restarts too (each handle trims every 1,024 drops).
        trim_drop_log(&conn).map_err(|e| map_error(dir, e))?;
        // What a process that did not close the store had logged of its
        // brokers' acknowledgements goes into the rows first.
        deferred::write_log_at_open(&conn).map_err(|e| map_error(dir, e))?;
        if kind == StoreKind::Outbox {
            use std::os::unix::fs::OpenOptionsExt;
            let ready = files.path("ready");
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&ready)
                .map_err(|source| StoreError::Io { path: ready.clone(), source })?;
        }
        Ok((SqliteStore::with(conn, dir, kind, Some(lock), reserved, tail::Tail::default()), report))
    }

    /// Opens the outbox in `dir` beside the process that holds its lock, to
    /// add messages to it and follow what becomes of them (a `pub` that
    /// joins one already running on the outbox). SQLite's log takes one
    /// writer at a time; each waits for the other (the busy timeout). No
    /// recovery runs: the holder did that when it opened.
    ///
    /// Until the holder has finished opening (recovery, migration: it
    /// writes `outbox.ready` then), this answers [`StoreError::Locked`]:
    /// try again. A format other than this release's is refused (a guest
    /// never migrates).
    pub fn open_guest(dir: &Path) -> Result<SqliteStore, StoreError> {
        let files = Files::new(dir, StoreKind::Outbox);
        let path = files.path("db");
        if !files.path("ready").exists() || !path.exists() {
            return Err(StoreError::Locked { path: dir.to_owned() });
        }
        let conn = schema::open_connection(&path).map_err(|e| map_error(dir, e))?;
        let format: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| r.get(0))
            .optional()
            .map_err(|e| map_error(dir, e))?;
        match format.and_then(|v| v.parse::<u32>().ok()) {
            Some(schema::FORMAT_VERSION) => {}
            Some(found) if found > schema::FORMAT_VERSION => {
                let supported = schema::FORMAT_VERSION;
                return Err(StoreError::FormatTooNew { path: dir.to_owned(), found, supported });
            }
            found => return Err(StoreError::FormatTooOld { path: dir.to_owned(), found: found.unwrap_or(0) }),
        }
        Ok(SqliteStore::with(conn, dir, StoreKind::Outbox, None, reserve::read(dir), tail::Tail::off()))
    }

    /// Opens an existing outbox read-only, without its lock, to report on
    /// it while its owner runs (`steadfast status`).
    pub fn open_read_only(dir: &Path) -> Result<SqliteStore, StoreError> {
        let kind = Self::kind_in(dir).ok_or_else(|| {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no outbox.db or inbox.db in it");
            StoreError::Io { path: dir.to_owned(), source }
        })?;
        let path = Files::new(dir, kind).path("db");
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let tables: u32 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN ('outbox', 'drops', 'brokers', 'wire', 'missed')",
            [],
            |r| r.get(0),
        )?;
        if tables < 5 {
            let old: u32 =
                conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'outbox'", [], |r| r.get(0))?;
            if old > 0 {
                return Err(StoreError::FormatTooOld { path: dir.to_owned(), found: 1 });
            }
            let why = "its outbox.db holds no outbox (yet: is it being created?)";
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, why);
            return Err(StoreError::Io { path: dir.to_owned(), source });
        }
        Ok(SqliteStore::with(conn, dir, kind, None, 0, tail::Tail::off()))
    }

    /// True when a process holds the store's lock (outbox or inbox) now.
    pub fn is_in_use(dir: &Path) -> bool {
        [StoreKind::Outbox, StoreKind::Inbox].into_iter().any(|kind| {
            let Ok(file) = File::open(Files::new(dir, kind).path("lock")) else {
                return false;
            };
            match file.try_lock_shared() {
                Ok(()) => {
                    let _ = file.unlock();
                    false
                }
                Err(_) => true,
            }
        })
    }

    /// What `dir` holds: an inbox (`inbox.db`), an outbox (`outbox.db`), or
    /// no store.
    pub fn kind_in(dir: &Path) -> Option<StoreKind> {
        [StoreKind::Inbox, StoreKind::Outbox].into_iter().find(|k| Files::new(dir, *k).path("db").exists())
    }

    /// What this store holds.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The directory of this outbox.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This store without its in-memory tail: every read goes to SQLite
    /// (for tests that compare the two).
    #[doc(hidden)]
    pub fn without_tail(mut self) -> Self {
        self.tail = tail::Tail::off();
        self
    }

    /// This store with a tail of at most `rows` rows (and as many rows
    /// kept from pages), so that tests reach its bounds with few messages.
    #[doc(hidden)]
    pub fn with_tail_of(mut self, rows: usize) -> Self {
        self.tail = tail::Tail::of(rows);
        self
    }

    /// This store holding acknowledgements unlogged for `hold` and logged
    /// for `logged` instead of [`deferred::ACKS_HELD_AT_MOST`] and
    /// [`deferred::ACKS_LOGGED_AT_MOST`], so that tests decide when they
    /// are due.
    #[doc(hidden)]
    pub fn hold_acks_for(&mut self, hold: std::time::Duration, logged: std::time::Duration) {
        self.held_acks.set_hold(hold, logged);
    }

    /// Writes the held acknowledgements into their rows now, as a read
    /// that must see them would: tests compare what a store answers
    /// without writing them with what SQLite answers after.
    #[doc(hidden)]
    pub fn write_held_acks(&mut self) -> Result<(), StoreError> {
        if self.held_acks.is_empty() {
            return Ok(());
        }
        self.write_acks_before_read()
    }

    /// Whether the tail may answer now. Inside a transaction, `begin`
    /// looked for other connections' commits (none can come before its
    /// end); outside one, this looks now.
    fn tail_trusted(&mut self) -> bool {
        if self.tail.is_known() && self.db.is_autocommit() {
            self.follow_other_commits();
        }
        self.tail.is_known()
    }

    /// Forgets the tail when another connection committed since the last
    /// look (a guest's insert, or a holder's removals seen from a guest).
    fn follow_other_commits(&mut self) {
        let version = self.read_data_version();
        self.saw_version(version.ok());
    }

    /// `PRAGMA data_version`: it changes when another connection commits.
    fn read_data_version(&self) -> rusqlite::Result<u64> {
        self.conn_apart().prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))
    }

    fn saw_version(&mut self, version: Option<u64>) {
        if version.is_none() || version != self.seen_version {
            // A bridge's source records stay: only their holder writes
            // them (a guest never does).
            self.forget_ids();
        }
        self.seen_version = version;
    }

    /// Forgets the newest rows ([`tail`]) and the highest id ([`Ids`]):
    /// another connection may have written, or this one rolled back. What
    /// the transaction under way handed out is still recorded at its
    /// commit (only a rollback drops it).
    fn forget_ids(&mut self) {
        self.tail.forget();
        self.ids.last = None;
    }

    /// The id the next insert gets (inside a transaction: `insert` makes
    /// one): one above the highest ever handed out.
    fn next_id(&mut self) -> Result<u64, StoreError> {
        let last = match self.ids.last {
            Some(last) => last,
            None => {
                let r = queries::recorded_last_id(self.conn()?);
                r.map_err(|e| self.map(e))?
            }
        };
        Ok(last + 1)
    }

    /// `id` was handed out: recorded at the transaction's commit.
    fn handed_out(&mut self, id: u64) {
        self.ids.last = Some(id);
        self.ids.unrecorded = Some(id);
    }

    /// The connection, the waiting inserts and acknowledgements
    /// ([`deferred`]) written first: for every statement that may read or
    /// write an `outbox` row it cannot rule out.
    fn conn(&mut self) -> Result<&Connection, StoreError> {
        self.conn_for_inserts()?;
        if !self.held_acks.is_empty() {
            self.write_acks_before_read()?;
        }
        Ok(&self.db)
    }

    /// The connection for a statement that neither reads nor writes
    /// `acks`, or whose caller gives each row it reads the set it would
    /// have read ([`deferred::HeldAcks::patch`]): only the waiting inserts
    /// are written first (a metrics gauge's read of the oldest message
    /// wrote every waiting acknowledgement at each report).
    fn conn_for_inserts(&mut self) -> Result<&Connection, StoreError> {
        if !self.waiting.is_empty() {
            self.write_waiting()?;
        }
        Ok(&self.db)
    }

    /// [`SqliteStore::conn_for_inserts`] for a read of rows with ids up
    /// to `id`.
    fn conn_below_for_inserts(&mut self, id: u64) -> Result<&Connection, StoreError> {
        if self.waiting.first().is_some_and(|w| w.id <= id) {
            self.write_waiting()?;
        }
        Ok(&self.db)
    }

    /// The connection for a statement on `outbox` rows with ids up to
    /// `id` only (by key, or a range that ends there): the waiting inserts
    /// and acknowledgements are written first only when one of them is
    /// among those.
    fn conn_below(&mut self, id: u64) -> Result<&Connection, StoreError> {
        self.conn_below_for_inserts(id)?;
        if self.held_acks.any_at_or_below(id) {
            self.write_acks_before_read()?;
        }
        Ok(&self.db)
    }

    /// The connection for a statement that neither reads nor writes the
    /// `outbox` table: a waiting insert cannot change what it does.
    fn conn_apart(&self) -> &Connection {
        &self.db
    }

    /// Writes the waiting inserts. When that fails they stay waiting, so
    /// that the commit fails too (a part written meanwhile makes the
    /// next try collide): the writer rolls the batch back either way, and
    /// nothing whose id was handed out is ever committed without its row.
    fn write_waiting(&mut self) -> Result<(), StoreError> {
        match deferred::write(&self.db, &self.waiting) {
            Ok(()) => {
                self.waiting.clear();
                Ok(())
            }
            Err(e) => Err(self.map(e)),
        }
    }

    /// Writes the waiting acknowledgements before a statement that may
    /// read them: in the transaction under way, or, between transactions
    /// (held past a commit, and a read comes first), in one of their own.
    ///
    /// All of them are written, those above the row a statement names
    /// too ([`SqliteStore::conn_below`]): when one is for a row whose
    /// insert still waits, the waiting inserts go first, or its `UPDATE`
    /// would find no row and the acknowledgement would be lost (the
    /// message sent again to that broker).
    fn write_acks_before_read(&mut self) -> Result<(), StoreError> {
        if self.db.is_autocommit() {
            return self.in_own_transaction(|s| s.write_acks());
        }
        if self.waiting.first().is_some_and(|w| self.held_acks.any_at_or_above(w.id)) {
            self.write_waiting()?;
        }
        self.write_acks()
    }

    /// Writes the waiting acknowledgements; when that fails they stay
    /// waiting, so that the commit fails too (as `write_waiting`).
    fn write_acks(&mut self) -> Result<(), StoreError> {
        let r = self.held_acks.write(&self.db);
        r.map_err(|e| self.map(e))
    }

    /// At a commit: logs the waiting acknowledgements held long enough,
    /// and writes into their rows those logged long enough
    /// ([`deferred::HeldAcks::write_due`]); as `write_acks` on failure.
    pub(super) fn write_acks_due(&mut self) -> Result<(), StoreError> {
        let r = self.held_acks.write_due(&self.db);
        r.map_err(|e| self.map(e))
    }

    fn map(&self, e: rusqlite::Error) -> StoreError {
        map_error(&self.dir, e)
    }
}

fn map_error(dir: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::DiskFull { path: dir.to_owned() },
        _ => e.into(),
    }
}
