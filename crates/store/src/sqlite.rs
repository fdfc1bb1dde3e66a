//! The SQLite outbox: WAL, `synchronous=FULL`, recovery with quarantine.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use steadfast_core::{DropReason, Properties, Qos, Stage};

use crate::{
    now_ms, reserve, BrokerRecord, Entry, InboxStore, NewMessage, Policy, SourceStore, Store, StoreError,
    StoredMessage, Totals, MAX_SLOTS,
};

/// The on-disk format version (docs/design.md, "Outbox format").
pub const FORMAT_VERSION: u32 = 3;

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

/// A store's directory and the stem of its file names.
#[derive(Debug, Clone)]
struct Files {
    dir: PathBuf,
    stem: &'static str,
}

impl Files {
    fn new(dir: &Path, kind: StoreKind) -> Files {
        Files { dir: dir.to_owned(), stem: kind.name() }
    }

    /// `STEM.EXT`, e.g. `inbox.db-wal`.
    fn name(&self, ext: &str) -> String {
        format!("{}.{ext}", self.stem)
    }

    fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(self.name(ext))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    props BLOB,
    created_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    route TEXT,
    acks INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    expires_ms INTEGER,
    priority INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    latest INTEGER NOT NULL DEFAULT 0
);
-- One row per open QoS 2 exchange: (message, broker slot) -> packet id.
CREATE TABLE IF NOT EXISTS wire (
    id INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    PRIMARY KEY (id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (url TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS missed (url TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS drops (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- The newest messages dropped undelivered, and why (the drop log).
CREATE TABLE IF NOT EXISTS dropped (id INTEGER PRIMARY KEY, reason TEXT NOT NULL, at_ms INTEGER NOT NULL);
-- The consumer's inbox (G5): identities already handled.
CREATE TABLE IF NOT EXISTS inbox (
    producer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    handled_ms INTEGER NOT NULL,
    PRIMARY KEY (producer, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- A bridge's source deliveries (broker, packet id, content digest) and the
-- message each became.
CREATE TABLE IF NOT EXISTS sources (
    url TEXT NOT NULL,
    pid INTEGER NOT NULL,
    digest INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (url, pid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS brokers (
    url TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_error TEXT,
    since_ms INTEGER NOT NULL,
    acked INTEGER NOT NULL,
    connects INTEGER NOT NULL,
    retry_ms INTEGER,
    active INTEGER NOT NULL DEFAULT 0
);
";

/// Format 1 kept one QoS 2 binding per message in the outbox row (one
/// broker per client). It moves to the `wire` table under slot 0, which
/// goes to the broker format 1 last recorded (the only one it could use).
const MIGRATE_1_TO_2: &str = "
ALTER TABLE outbox ADD COLUMN route TEXT;
ALTER TABLE outbox ADD COLUMN acks INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN done INTEGER NOT NULL DEFAULT 0;
INSERT INTO wire (id, slot, pid, stage) SELECT id, 0, pid, stage FROM outbox WHERE pid IS NOT NULL AND stage IS NOT NULL;
DROP INDEX IF EXISTS outbox_bound;
ALTER TABLE outbox DROP COLUMN pid;
ALTER TABLE outbox DROP COLUMN stage;
ALTER TABLE brokers ADD COLUMN retry_ms INTEGER;
ALTER TABLE brokers ADD COLUMN active INTEGER NOT NULL DEFAULT 0;
INSERT OR IGNORE INTO slots (url, slot) SELECT url, 0 FROM brokers ORDER BY since_ms DESC LIMIT 1;
UPDATE meta SET value = '2' WHERE key = 'format';
";

/// Format 3 adds the delivery policy of each message: deadline, priority,
/// retry budget and the attempts so far, keep-latest. Old messages get the
/// defaults (persistent, priority 0, no budget).
const MIGRATE_2_TO_3: &str = "
ALTER TABLE outbox ADD COLUMN expires_ms INTEGER;
ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN max_attempts INTEGER;
ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN latest INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET value = '3' WHERE key = 'format';
";

/// Indexes on the format 3 columns, made once the table has them. Partial:
/// messages without a deadline, keep-latest or priority cost nothing.
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS outbox_expiry ON outbox (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_latest ON outbox (topic) WHERE latest = 1;
CREATE INDEX IF NOT EXISTS outbox_priority ON outbox (priority, id) WHERE priority != 0;
";

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
    conn: Connection,
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
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("dir", &self.dir).finish()
    }
}

impl SqliteStore {
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

    fn open_kind(dir: &Path, kind: StoreKind) -> Result<(SqliteStore, OpenReport), StoreError> {
        let files = Files::new(dir, kind);
        create_private_dir(&files)?;
        let lock = take_lock(&files)?;
        let mut report = OpenReport::default();
        resume_interrupted_salvage(&files, &mut report)?;
        check_wal_tail(&files, &mut report)?;
        cut_partial_page(&files, &mut report)?;
        let conn = match open_checked(&files) {
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
        let store = SqliteStore {
            conn,
            dir: dir.to_owned(),
            kind,
            _lock: Some(lock),
            unreadable: Vec::new(),
            synced: true,
            reserved,
            drops_logged: 0,
        };
        Ok((store, report))
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
            let why = if old > 0 {
                "its outbox.db is in format 1, from an earlier steadfast; it is converted when its owner opens it (run `steadfast pub --drain` with it once)"
            } else {
                "its outbox.db holds no outbox (yet: is it being created?)"
            };
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, why);
            return Err(StoreError::Io { path: dir.to_owned(), source });
        }
        Ok(SqliteStore {
            conn,
            dir: dir.to_owned(),
            kind,
            _lock: None,
            unreadable: Vec::new(),
            synced: true,
            reserved: 0,
            drops_logged: 0,
        })
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

    fn map(&self, e: rusqlite::Error) -> StoreError {
        map_error(&self.dir, e)
    }
}

/// The highest id the database says it ever handed out (0 for none).
fn recorded_last_id(conn: &Connection) -> rusqlite::Result<u64> {
    let sql = "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'";
    Ok(conn.query_row(sql, [], |r| r.get(0)).optional()?.unwrap_or(0))
}

/// Keeps the newest [`crate::DROP_LOG_KEEP`] entries of the drop log.
fn trim_drop_log(conn: &Connection) -> rusqlite::Result<()> {
    let sql = "DELETE FROM dropped WHERE id <= (SELECT id FROM dropped ORDER BY id DESC LIMIT 1 OFFSET ?1)";
    conn.execute(sql, [crate::DROP_LOG_KEEP]).map(|_| ())
}

/// A database that opened sound but is far behind its id reservation was
/// emptied or cut back (a file replaced, a truncation SQLite did not see):
/// new ids start above the reservation, so none is handed out twice.
fn continue_above_reservation(conn: &Connection, reserved: u64, report: &mut OpenReport) -> rusqlite::Result<()> {
    let recorded = recorded_last_id(conn)?;
    let Some(floor) = reserve::lost_floor(recorded, reserved) else { return Ok(()) };
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'", [])?;
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?1)", [floor])?;
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

fn map_error(dir: &Path, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::DiskFull { path: dir.to_owned() },
        _ => e.into(),
    }
}

/// An inbox written before inboxes had their own file name is an
/// `outbox.db` (with its lock) in the consumer's directory: renamed to
/// `inbox.db` under its old lock (a consumer of the older release still
/// running on it makes this fail as "in use"), after its log was
/// checkpointed into it, so that no `-wal` file has to follow it. A crash
/// before the rename leaves the old name (renamed at the next open), after
/// it the new one; the old log's leftovers are removed (its lock is kept).
fn rename_legacy_inbox(dir: &Path) -> Result<(), StoreError> {
    let (old, new) = (Files::new(dir, StoreKind::Outbox), Files::new(dir, StoreKind::Inbox));
    if new.path("db").exists() || !old.path("db").exists() {
        return Ok(());
    }
    check_owner(dir)?;
    // The old lock is kept (not removed after), so that no opener can
    // take it between our release and its removal.
    private_file(&old.path("lock"))?;
    let _lock = take_lock(&old)?;
    if new.path("db").exists() || !old.path("db").exists() {
        return Ok(());
    }
    if old.path("ids").exists() || holds_outbox_messages(&old.path("db")) {
        return Err(StoreError::OutboxNotInbox { path: dir.to_owned() });
    }
    // Its log goes into it first, so that no `-wal` has to follow the new
    // name; a database too damaged for that moves with its log as it is,
    // and the recovery of the inbox's open takes it from there.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let checkpointed = Connection::open_with_flags(old.path("db"), flags)
        .and_then(|c| c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())));
    if checkpointed.is_err() && old.path("db-wal").exists() {
        fs::rename(old.path("db-wal"), new.path("db-wal")).map_err(io_err(dir))?;
    }
    fs::rename(old.path("db"), new.path("db")).map_err(io_err(dir))?;
    sync_path(dir)?;
    for ext in ["db-wal", "db-shm"] {
        remove_if_present(&old.path(ext))?;
    }
    tracing::info!(dir = %dir.display(), "inbox renamed from outbox.db to inbox.db");
    Ok(())
}

/// True when the database at `db` ever held an outbox message (so it is a
/// producer's outbox, not an old inbox). One that cannot be read is not
/// taken for a producer's: it moves, and the inbox's recovery takes it.
fn holds_outbox_messages(db: &Path) -> bool {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let Ok(conn) = Connection::open_with_flags(db, flags) else { return false };
    let rows: rusqlite::Result<u64> = conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0));
    match (recorded_last_id(&conn), rows) {
        (Ok(seq), Ok(rows)) => seq > 0 || rows > 0,
        // No outbox table: an empty or unreadable file, not a producer's.
        _ => false,
    }
}

/// Creates the store directory (0700), refuses one that belongs to another
/// user, and makes its files private: the database is created 0600 before
/// SQLite opens it, and SQLite gives its WAL and shared-memory files the
/// database's mode. Files left wider by an older steadfast are narrowed.
fn create_private_dir(files: &Files) -> Result<(), StoreError> {
    let dir = files.dir.as_path();
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    // A directory that exists and holds no store yet may be anything
    // (`--outbox .`): its mode and other files are left alone.
    let ours = !dir.exists() || files.path("db").exists();
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    let meta = check_owner(dir)?;
    if ours && meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    for name in ["db", "lock"] {
        private_file(&files.path(name))?;
    }
    narrow(files)
}

/// Refuses a store directory that belongs to another user, before
/// anything in it is touched.
fn check_owner(dir: &Path) -> Result<fs::Metadata, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StoreError::NotOwner { path: dir.to_owned(), owner: meta.uid(), user: me });
    }
    Ok(meta)
}

/// Creates `path` with mode 0600 unless it exists.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(path).map_err(io_err(path))?;
    Ok(())
}

/// Makes the store's own files in its directory (`outbox.*` or `inbox.*`) private to their
/// owner (0600); other files are not ours to change.
fn narrow(files: &Files) -> Result<(), StoreError> {
    let dir = files.dir.as_path();
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{}.", files.stem))) {
            continue;
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o077 != 0 => {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn take_lock(files: &Files) -> Result<File, StoreError> {
    let dir = files.dir.as_path();
    let path = files.path("lock");
    let io = |source| StoreError::Io { path: path.clone(), source };
    let file = fs::OpenOptions::new().truncate(false).write(true).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path: dir.to_owned() }),
        Err(fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

enum Opened {
    Corrupt(String),
    Failed(StoreError),
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

fn open_checked(files: &Files) -> Result<Connection, Opened> {
    let dir = files.dir.as_path();
    let classify = |e: rusqlite::Error| {
        if is_corruption(&e) {
            Opened::Corrupt(format!("the database is damaged ({e})"))
        } else {
            Opened::Failed(map_error(dir, e))
        }
    };
    let conn = open_connection(&files.path("db")).map_err(classify)?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(classify)?;
    if check != "ok" {
        return Err(Opened::Corrupt(format!("the integrity check failed: {check}")));
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

fn open_connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: a commit appends to one file and syncs it once; readers (status)
    // never block the writer. FULL: the sync happens at every commit, which
    // is what makes "accepted" mean "on disk" (G1).
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    debug_assert_eq!(mode.to_lowercase(), "wal");
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")?;
    Ok(conn)
}

fn init_schema(conn: &Connection, dir: &Path) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    let found: Option<String> =
        conn.query_row("SELECT value FROM meta WHERE key='format'", [], |r| r.get(0)).optional()?;
    match found.and_then(|v| v.parse::<u32>().ok()) {
        None => {
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?1)", [FORMAT_VERSION.to_string()])?;
        }
        Some(v) if v > FORMAT_VERSION => {
            let path = dir.to_owned();
            return Err(StoreError::FormatTooNew { path, found: v, supported: FORMAT_VERSION });
        }
        Some(v) if v < FORMAT_VERSION => {
            let steps = [MIGRATE_1_TO_2, MIGRATE_2_TO_3];
            let sql: String = steps[(v.max(1) - 1) as usize..].concat();
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql} COMMIT;")).inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })?;
            tracing::info!(dir = %dir.display(), from = v, to = FORMAT_VERSION, "outbox converted to the current format");
        }
        Some(_) => {}
    }
    conn.execute_batch(INDEXES)?;
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
fn cut_partial_page(files: &Files, report: &mut OpenReport) -> Result<(), StoreError> {
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

fn check_wal_tail(files: &Files, report: &mut OpenReport) -> Result<(), StoreError> {
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

fn quarantine_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    let q = dir.join("quarantine").join(format!("{}-{:04x}", now_ms(), fastrand::u16(..)));
    fs::create_dir_all(&q).map_err(|source| StoreError::Io { path: q.clone(), source })?;
    Ok(q)
}

const SALVAGE_DONE: &str = "salvage-complete";

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn sync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// Finishes or undoes a recovery that a crash interrupted, before anything
/// else looks at the files.
fn resume_interrupted_salvage(files: &Files, report: &mut OpenReport) -> Result<(), StoreError> {
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
fn quarantine_and_salvage(files: &Files, report: &mut OpenReport) -> Result<Connection, StoreError> {
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

/// Copies what can be read from the damaged database `from` into `to`;
/// new ids start above `reserved` and above every id seen.
fn salvage(from: &Path, to: &Connection, reserved: u64) -> u64 {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let Ok(old) = Connection::open_with_flags(from, flags) else {
        return 0;
    };
    for table in ["meta", "drops", "dropped", "slots", "missed", "wire"] {
        let _ = copy_table(&old, to, table);
    }
    let floor: u64 =
        old.query_row("SELECT seq FROM sqlite_sequence WHERE name='outbox'", [], |r| r.get(0)).unwrap_or(0);
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
    let seq = floor.max(max_id).max(reserved);
    let _ = to.execute("INSERT OR REPLACE INTO sqlite_sequence(name, seq) VALUES ('outbox', ?1)", [seq]);
    let _ = to.execute(
        "DELETE FROM sqlite_sequence WHERE rowid NOT IN (SELECT max(rowid) FROM sqlite_sequence GROUP BY name)",
        [],
    );
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
    let extra = match (v1, v3) {
        (true, _) => "NULL, 0, 0, pid, stage, NULL, 0, NULL, 0, 0",
        (false, false) => "route, acks, done, NULL, NULL, NULL, 0, NULL, 0, 0",
        (false, true) => "route, acks, done, NULL, NULL, expires_ms, priority, max_attempts, attempts, latest",
    };
    let sql = format!(
        "SELECT id, topic, payload, qos, retain, props, created_ms, size, {extra} FROM outbox WHERE id > ?1 ORDER BY id"
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
                let values: rusqlite::Result<Vec<rusqlite::types::Value>> = (0..18).map(|i| r.get(i)).collect();
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
                    "INSERT OR IGNORE INTO outbox (id, topic, payload, qos, retain, props, created_ms, size, route, acks, done, expires_ms, priority, max_attempts, attempts, latest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
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

fn stage_to_sql(s: Stage) -> i64 {
    match s {
        Stage::Published => 1,
        Stage::Released => 2,
    }
}

fn stage_from_sql(s: i64) -> Option<Stage> {
    match s {
        1 => Some(Stage::Published),
        2 => Some(Stage::Released),
        _ => None,
    }
}

const SELECT_MESSAGE: &str = "SELECT outbox.id, topic, payload, qos, retain, props, created_ms, route, acks, NULL, NULL, expires_ms, priority, max_attempts, attempts, latest FROM outbox";
const SELECT_BOUND: &str = "SELECT outbox.id, topic, payload, qos, retain, props, created_ms, route, acks, wire.pid, wire.stage, expires_ms, priority, max_attempts, attempts, latest FROM outbox JOIN wire ON wire.id = outbox.id";

/// Runs a query of `SELECT_MESSAGE` or `SELECT_BOUND`; records that do not
/// decode are skipped and noted in `unreadable`, so one damaged row never
/// blocks the rest.
fn read_messages(
    conn: &Connection,
    unreadable: &mut Vec<(u64, String)>,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, row_to_message)?;
    let mut out = Vec::new();
    for row in rows {
        match row? {
            Ok(m) => out.push(m),
            Err(StoreError::Malformed { id, what }) => unreadable.push((id, what)),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredMessage, StoreError>> {
    let id: u64 = r.get(0)?;
    let qos: u8 = r.get(3)?;
    let props: Option<Vec<u8>> = r.get(5)?;
    let pid: Option<u16> = r.get(9)?;
    let stage: Option<i64> = r.get(10)?;
    let bad = |what: String| Err(StoreError::Malformed { id, what });
    let Some(qos) = Qos::from_u8(qos) else {
        return Ok(bad(format!("QoS {qos}")));
    };
    let props = match props.map(|p| Properties::decode(&p)).transpose() {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => return Ok(bad(e.to_string())),
    };
    let priority: i64 = r.get(12)?;
    let max_attempts: Option<i64> = r.get(13)?;
    let attempts: i64 = r.get(14)?;
    if !(0..=crate::MAX_PRIORITY as i64).contains(&priority) {
        return Ok(bad(format!("priority {priority}")));
    }
    if max_attempts.is_some_and(|m| !(1..=u32::MAX as i64).contains(&m)) || !(0..=u32::MAX as i64).contains(&attempts) {
        return Ok(bad(format!("retry budget {max_attempts:?}, attempts {attempts}")));
    }
    let wire = match (pid, stage.and_then(stage_from_sql)) {
        (Some(p), Some(s)) => Some((p, s)),
        _ => None,
    };
    let msg = NewMessage {
        topic: r.get(1)?,
        payload: r.get(2)?,
        qos,
        retain: r.get(4)?,
        props,
        created_ms: r.get(6)?,
        route: r.get(7)?,
        policy: Policy {
            expires_ms: r.get::<_, Option<i64>>(11)?.map(|e| e.max(0) as u64),
            priority: priority as u8,
            max_attempts: max_attempts.map(|m| m as u32),
            keep_latest: r.get::<_, i64>(15)? != 0,
        },
    };
    let acks = r.get::<_, i64>(8)? as u64;
    Ok(Ok(StoredMessage { id, msg, wire, acks, attempts: attempts as u32 }))
}

impl Store for SqliteStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| self.map(e))
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT").map_err(|e| self.map(e))
    }

    fn set_synced(&mut self, synced: bool) {
        if synced != self.synced {
            let pragma = if synced { "PRAGMA synchronous=FULL" } else { "PRAGMA synchronous=NORMAL" };
            if self.conn.execute_batch(pragma).is_ok() {
                self.synced = synced;
            }
        }
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn insert(&mut self, m: &NewMessage) -> Result<u64, StoreError> {
        let props = (!m.props.is_empty()).then(|| m.props.encode());
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO outbox (topic, payload, qos, retain, props, created_ms, size, route, expires_ms, priority, max_attempts, latest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let p = &m.policy;
        let r = stmt.execute(params![
            m.topic,
            m.payload,
            m.qos as u8,
            m.retain,
            props,
            m.created_ms,
            m.size(),
            m.route,
            p.expires_ms,
            p.priority,
            p.max_attempts,
            p.keep_latest
        ]);
        drop(stmt);
        r.map_err(|e| self.map(e))?;
        let id = self.conn.last_insert_rowid() as u64;
        // Reserved before the commit that hands it out: a recovery that
        // lost the database's own record still starts above it.
        if id > self.reserved {
            let upto = id + reserve::BLOCK;
            reserve::write(&self.dir, upto)?;
            self.reserved = upto;
        }
        Ok(id)
    }

    fn entry(&mut self, id: u64) -> Result<Option<Entry>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT topic, route, acks, done, size, created_ms, (SELECT count(*) FROM wire WHERE wire.id = ?1), expires_ms FROM outbox WHERE id = ?1",
        )?;
        let r = stmt.query_row([id], |r| {
            Ok(Entry {
                topic: r.get(0)?,
                route: r.get(1)?,
                acks: r.get::<_, i64>(2)? as u64,
                done: r.get(3)?,
                size: r.get(4)?,
                created_ms: r.get(5)?,
                bindings: r.get(6)?,
                expires_ms: r.get(7)?,
            })
        });
        Ok(r.optional()?)
    }

    fn remove(&mut self, id: u64) -> Result<bool, StoreError> {
        let mut wire = self.conn.prepare_cached("DELETE FROM wire WHERE id = ?1")?;
        let r = wire.execute([id]);
        drop(wire);
        r.map_err(|e| self.map(e))?;
        let mut stmt = self.conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
        let r = stmt.execute([id]);
        drop(stmt);
        Ok(r.map_err(|e| self.map(e))? > 0)
    }

    fn ack(&mut self, id: u64, slot: u32) -> Result<(), StoreError> {
        let bit = (1u64 << slot) as i64;
        let mut stmt = self.conn.prepare_cached("UPDATE outbox SET acks = acks | ?2 WHERE id = ?1")?;
        let r = stmt.execute(params![id, bit]);
        drop(stmt);
        r.map_err(|e| self.map(e))?;
        let mut wire = self.conn.prepare_cached("DELETE FROM wire WHERE id = ?1 AND slot = ?2")?;
        let r = wire.execute(params![id, slot]);
        drop(wire);
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    fn set_done(&mut self, id: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached("UPDATE outbox SET done = 1 WHERE id = ?1")?;
        let r = stmt.execute([id]);
        drop(stmt);
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    fn set_wire(&mut self, slot: u32, id: u64, wire: Option<(u16, Stage)>) -> Result<(), StoreError> {
        let r = match wire {
            Some((pid, stage)) => {
                let mut stmt = self.conn.prepare_cached("INSERT OR REPLACE INTO wire VALUES (?1, ?2, ?3, ?4)")?;
                stmt.execute(params![id, slot, pid, stage_to_sql(stage)])
            }
            None => {
                let mut stmt = self.conn.prepare_cached("DELETE FROM wire WHERE id = ?1 AND slot = ?2")?;
                stmt.execute(params![id, slot])
            }
        };
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    fn read_after(
        &mut self,
        after: u64,
        limit: usize,
        slot: Option<u32>,
        priority: Option<u8>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mask = slot.map_or(0, |s| (1u64 << s) as i64);
        let sql = match priority {
            None => format!("{SELECT_MESSAGE} WHERE id > ?1 AND done = 0 AND acks & ?3 = 0 ORDER BY id LIMIT ?2"),
            // The literal `priority != 0` lets SQLite use the partial index.
            Some(0) => format!(
                "{SELECT_MESSAGE} WHERE priority = 0 AND id > ?1 AND done = 0 AND acks & ?3 = 0 ORDER BY id LIMIT ?2"
            ),
            Some(_) => format!(
                "{SELECT_MESSAGE} WHERE priority != 0 AND priority = ?4 AND id > ?1 AND done = 0 AND acks & ?3 = 0 ORDER BY id LIMIT ?2"
            ),
        };
        match priority {
            None | Some(0) => read_messages(&self.conn, &mut self.unreadable, &sql, params![after, limit as i64, mask]),
            Some(p) => read_messages(&self.conn, &mut self.unreadable, &sql, params![after, limit as i64, mask, p]),
        }
    }

    fn newest_by_priority(&mut self) -> Result<Vec<(u8, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            // Upper bounds, which is all a reader needs: level 0 gets the
            // newest id of all (the primary key's end), the others come
            // from their partial index. No scan of the table.
            "SELECT 0, max(id) FROM outbox UNION ALL SELECT priority, max(id) FROM outbox WHERE priority != 0 GROUP BY priority",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, u8>(0)?, r.get::<_, Option<u64>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            if let (p, Some(id)) = row? {
                out.push((p.min(crate::MAX_PRIORITY), id));
            }
        }
        Ok(out)
    }

    fn add_attempt(&mut self, id: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?1")?;
        let r = stmt.execute([id]);
        drop(stmt);
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    fn expired(&mut self, now_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM outbox WHERE expires_ms IS NOT NULL AND expires_ms <= ?1 AND done = 0 AND NOT EXISTS (SELECT 1 FROM wire WHERE wire.id = outbox.id) ORDER BY expires_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now_ms, limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn next_expiry(&mut self) -> Result<Option<u64>, StoreError> {
        // Bound messages count too: the sweep keeps coming back for them
        // until their QoS 2 exchange closes (then they go, or are gone).
        let sql = "SELECT min(expires_ms) FROM outbox WHERE expires_ms IS NOT NULL AND done = 0";
        Ok(self.conn.query_row(sql, [], |r| r.get(0))?)
    }

    fn deadline_totals(&mut self) -> Result<Totals, StoreError> {
        let sql = "SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE expires_ms IS NOT NULL AND done = 0";
        let (count, bytes) = self.conn.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Totals { count, bytes })
    }

    fn superseded(&mut self, topic: &str, route: Option<&str>) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM outbox WHERE topic = ?1 AND latest = 1 AND route IS ?2 AND done = 0 AND NOT EXISTS (SELECT 1 FROM wire WHERE wire.id = outbox.id) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![topic, route], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn bound(&mut self, slot: u32) -> Result<Vec<StoredMessage>, StoreError> {
        let sql = format!("{SELECT_BOUND} WHERE wire.slot = ?1 ORDER BY outbox.id");
        read_messages(&self.conn, &mut self.unreadable, &sql, [slot])
    }

    fn oldest(&mut self, limit: usize, deadline: Option<bool>) -> Result<Vec<(u64, u64)>, StoreError> {
        let sql = match deadline {
            None => "SELECT id, size FROM outbox WHERE done = 0 ORDER BY id LIMIT ?1",
            Some(false) => "SELECT id, size FROM outbox WHERE done = 0 AND expires_ms IS NULL ORDER BY id LIMIT ?1",
            // Through the partial index on deadlines: they may be few.
            Some(true) => "SELECT id, size FROM outbox WHERE expires_ms IS NOT NULL AND done = 0 ORDER BY id LIMIT ?1",
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params![limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn last_id(&mut self) -> Result<u64, StoreError> {
        Ok(recorded_last_id(&self.conn)?)
    }

    fn newest_id(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.conn.query_row("SELECT max(id) FROM outbox", [], |r| r.get(0))?)
    }

    fn totals(&mut self) -> Result<Totals, StoreError> {
        let sql = "SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE done = 0";
        let (count, bytes) = self.conn.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Totals { count, bytes })
    }

    fn oldest_created_ms(&mut self) -> Result<Option<u64>, StoreError> {
        let sql = "SELECT created_ms FROM outbox WHERE done = 0 ORDER BY id LIMIT 1";
        Ok(self.conn.query_row(sql, [], |r| r.get(0)).optional()?)
    }

    fn lapsed(
        &mut self,
        route: Option<&str>,
        mask: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, acks FROM outbox WHERE done = 0 AND route IS ?1 AND acks & ?2 != 0 AND created_ms < ?3 ORDER BY id LIMIT ?4",
        )?;
        let p = params![route, mask as i64, cutoff_ms, limit as i64];
        let rows = stmt.query_map(p, |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn routes(&mut self) -> Result<Vec<(Option<String>, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT route, count(*) FROM outbox WHERE done = 0 GROUP BY route ORDER BY route")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn lag(&mut self, slot: u32) -> Result<u64, StoreError> {
        let sql = "SELECT count(*) FROM outbox WHERE done = 0 AND acks & ?1 = 0";
        Ok(self.conn.query_row(sql, [(1u64 << slot) as i64], |r| r.get(0))?)
    }

    fn assign_slots(&mut self, urls: &[String]) -> Result<Vec<u32>, StoreError> {
        let mut taken: Vec<(String, u32)> = {
            let mut stmt = self.conn.prepare_cached("SELECT url, slot FROM slots")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for url in urls {
            if let Some((_, slot)) = taken.iter().find(|(u, _)| u == url) {
                out.push(*slot);
                continue;
            }
            let slot = match (0..MAX_SLOTS as u32).find(|s| !taken.iter().any(|(_, t)| t == s)) {
                Some(s) => s,
                None => {
                    // Reuse the slot of a broker no longer configured: what
                    // it acknowledged or held must not count for the new one.
                    let Some(pos) = taken.iter().position(|(u, _)| !urls.contains(u)) else {
                        return Err(StoreError::WriteFailed(format!(
                            "more than {MAX_SLOTS} brokers configured at once; an outbox tells at most {MAX_SLOTS} apart"
                        )));
                    };
                    let (gone, slot) = taken.remove(pos);
                    let bit = (1u64 << slot) as i64;
                    self.conn.execute("UPDATE outbox SET acks = acks & ~?1 WHERE acks & ?1 != 0", [bit])?;
                    self.conn.execute("DELETE FROM wire WHERE slot = ?1", [slot])?;
                    self.conn.execute("DELETE FROM slots WHERE url = ?1", [&gone])?;
                    slot
                }
            };
            self.conn
                .execute("INSERT INTO slots (url, slot) VALUES (?1, ?2)", params![url, slot])
                .map_err(|e| self.map(e))?;
            taken.push((url.clone(), slot));
            out.push(slot);
        }
        Ok(out)
    }

    fn slots(&mut self) -> Result<Vec<(String, u32)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT url, slot FROM slots ORDER BY slot")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_missed(&mut self, url: &str, n: u64) -> Result<(), StoreError> {
        let sql = "INSERT INTO missed VALUES (?1, ?2) ON CONFLICT(url) DO UPDATE SET count = count + ?2";
        self.conn.execute(sql, params![url, n]).map_err(|e| self.map(e))?;
        Ok(())
    }

    fn missed(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT url, count FROM missed ORDER BY url")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_drop(&mut self, reason: DropReason, id: Option<u64>) -> Result<(), StoreError> {
        let sql = "INSERT INTO drops VALUES (?1, 1) ON CONFLICT(reason) DO UPDATE SET count = count + 1";
        self.conn.prepare_cached(sql)?.execute(params![reason.as_str()]).map_err(|e| self.map(e))?;
        let Some(id) = id else { return Ok(()) };
        let sql = "INSERT OR REPLACE INTO dropped (id, reason, at_ms) VALUES (?1, ?2, ?3)";
        self.conn.prepare_cached(sql)?.execute(params![id, reason.as_str(), now_ms()]).map_err(|e| self.map(e))?;
        // Trimmed now and then, not at every drop (finding the cut-off
        // walks the kept records).
        self.drops_logged += 1;
        if self.drops_logged.is_multiple_of(1024) {
            trim_drop_log(&self.conn).map_err(|e| self.map(e))?;
        }
        Ok(())
    }

    fn drop_log(&mut self) -> Result<Vec<(u64, DropReason)>, StoreError> {
        // A store read (not opened) by this release may predate the log.
        let exists: bool =
            self.conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'dropped'", [], |r| r.get(0))?;
        if !exists {
            return Ok(Vec::new());
        }
        let mut stmt = self.conn.prepare("SELECT id, reason FROM dropped ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, reason) = row?;
            out.push((id, DropReason::parse(&reason).unwrap_or(DropReason::Corrupt)));
        }
        Ok(out)
    }

    fn drops(&mut self) -> Result<Vec<(DropReason, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT count FROM drops WHERE reason = ?1")?;
        let mut out = Vec::new();
        for r in DropReason::ALL {
            let n: Option<u64> = stmt.query_row([r.as_str()], |row| row.get(0)).optional()?;
            out.push((r, n.unwrap_or(0)));
        }
        Ok(out)
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        let sql = "SELECT value FROM meta WHERE key = ?1";
        Ok(self.conn.query_row(sql, [key], |r| r.get(0)).optional()?)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        let sql = "INSERT OR REPLACE INTO meta VALUES (?1, ?2)";
        self.conn.execute(sql, [key, value]).map_err(|e| self.map(e))?;
        Ok(())
    }

    fn set_broker(&mut self, b: &BrokerRecord) -> Result<(), StoreError> {
        let sql = "INSERT OR REPLACE INTO brokers VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
        let p = params![b.url, b.state, b.last_error, b.since_ms, b.acked, b.connects, b.retry_ms, b.active];
        self.conn.execute(sql, p).map_err(|e| self.map(e))?;
        Ok(())
    }

    fn take_unreadable(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.unreadable)
    }

    fn brokers(&mut self) -> Result<Vec<BrokerRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT url, state, last_error, since_ms, acked, connects, retry_ms, active FROM brokers ORDER BY url",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(BrokerRecord {
                url: r.get(0)?,
                state: r.get(1)?,
                last_error: r.get(2)?,
                since_ms: r.get(3)?,
                acked: r.get(4)?,
                connects: r.get(5)?,
                retry_ms: r.get(6)?,
                active: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl InboxStore for SqliteStore {
    fn inbox_seen(&mut self, ids: &[(String, u64)]) -> Result<Vec<bool>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT 1 FROM inbox WHERE producer = ?1 AND seq = ?2")?;
        let mut out = Vec::with_capacity(ids.len());
        for (p, s) in ids {
            out.push(stmt.exists(params![p, s])?);
        }
        Ok(out)
    }
    fn inbox_high(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT producer, max(seq) FROM inbox GROUP BY producer")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    fn inbox_record(&mut self, ids: &[(String, u64)], now_ms: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached("INSERT OR IGNORE INTO inbox VALUES (?1, ?2, ?3)")?;
        for (p, s) in ids {
            let r = stmt.execute(params![p, s, now_ms]);
            if let Err(e) = r {
                drop(stmt);
                return Err(self.map(e));
            }
        }
        Ok(())
    }
    fn inbox_prune(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        let aged =
            self.conn.execute("DELETE FROM inbox WHERE handled_ms < ?1", [before_ms]).map_err(|e| self.map(e))?;
        let over = self
            .conn
            .execute(
                "DELETE FROM inbox WHERE (producer, seq) IN (SELECT producer, seq FROM inbox ORDER BY handled_ms DESC, seq DESC LIMIT -1 OFFSET ?1)",
                [keep as i64],
            )
            .map_err(|e| self.map(e))?;
        Ok((aged + over) as u64)
    }
    fn inbox_len(&mut self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM inbox", [], |r| r.get(0))?)
    }
    fn inbox_bytes(&mut self) -> Result<u64, StoreError> {
        let sql = "SELECT coalesce(sum(length(CAST(producer AS BLOB)) + ?1), 0) FROM inbox";
        Ok(self.conn.query_row(sql, [crate::INBOX_ENTRY_BYTES], |r| r.get(0))?)
    }
    fn add_counter(&mut self, name: &str, n: u64) -> Result<(), StoreError> {
        let sql = "INSERT INTO counters VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET count = count + ?2";
        self.conn.execute(sql, params![name, n]).map_err(|e| self.map(e))?;
        Ok(())
    }
    fn counters(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT name, count FROM counters ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl SourceStore for SqliteStore {
    fn source_record(&mut self, url: &str, pid: u16, digest: u64, id: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached("INSERT OR REPLACE INTO sources VALUES (?1, ?2, ?3, ?4)")?;
        let r = stmt.execute(params![url, pid, digest as i64, id]);
        drop(stmt);
        r.map(|_| ()).map_err(|e| self.map(e))
    }
    fn source_seen(&mut self, url: &str, pid: u16, digest: u64) -> Result<Option<u64>, StoreError> {
        let sql = "SELECT id FROM sources WHERE url = ?1 AND pid = ?2 AND digest = ?3";
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.query_row(params![url, pid, digest as i64], |r| r.get(0)).optional()?)
    }
}
