//! The store's directory: the names of its files, its owner and
//! permissions (0700 and 0600, another user's refused), the lock that
//! keeps a second process out, and the rename of an inbox written before
//! inboxes had their own file name.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::queries::recorded_last_id;
use super::StoreKind;
use crate::StoreError;

/// A store's directory and the stem of its file names.
#[derive(Debug, Clone)]
pub(super) struct Files {
    pub(super) dir: PathBuf,
    pub(super) stem: &'static str,
}

impl Files {
    pub(super) fn new(dir: &Path, kind: StoreKind) -> Files {
        Files { dir: dir.to_owned(), stem: kind.name() }
    }

    /// `STEM.EXT`, e.g. `inbox.db-wal`.
    pub(super) fn name(&self, ext: &str) -> String {
        format!("{}.{ext}", self.stem)
    }

    pub(super) fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(self.name(ext))
    }
}

/// Creates the store directory (0700), refuses one that belongs to another
/// user, and makes its files private: the database is created 0600 before
/// SQLite opens it, and SQLite gives its WAL and shared-memory files the
/// database's mode. Files left wider by an older steadfast are narrowed.
pub(super) fn create_private_dir(files: &Files) -> Result<(), StoreError> {
    let dir = files.dir.as_path();
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    // A directory that exists and holds no store yet may be anything
    // (the current directory, say): its mode and other files are left alone.
    let ours = !dir.exists() || files.path("db").exists();
    if dir.exists() && !dir.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::NotADirectory, "it exists and is not a directory");
        return Err(StoreError::Io { path: dir.to_owned(), source });
    }
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
pub(super) fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(path).map_err(io_err(path))?;
    Ok(())
}

/// Makes the store's own files in its directory (`outbox.*` or `inbox.*`) private to their
/// owner (0600); other files are not ours to change.
pub(super) fn narrow(files: &Files) -> Result<(), StoreError> {
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

pub(super) fn take_lock(files: &Files) -> Result<File, StoreError> {
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

pub(super) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

pub(super) fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

pub(super) fn sync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// An inbox written before inboxes had their own file name is an
/// `outbox.db` (with its lock) in the consumer's directory: renamed to
/// `inbox.db` under its old lock (a consumer of the older release still
/// running on it makes this fail as "in use"), after its log was
/// checkpointed into it, so that no `-wal` file has to follow it. A crash
/// before the rename leaves the old name (renamed at the next open), after
/// it the new one; the old log's leftovers are removed (its lock is kept).
pub(super) fn rename_legacy_inbox(dir: &Path) -> Result<(), StoreError> {
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
