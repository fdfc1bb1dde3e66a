//! The store's errors: what went wrong with the directory, the disk or
//! the database, in words that name the path and the way out. Which flag
//! or setting picks another directory is for the caller to add.

use std::path::PathBuf;
use std::sync::Arc;

/// Why the outbox store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk (or the filesystem quota) is full.
    #[error("the disk holding the outbox {path} is full; messages accepted before are safe; free space there, or move the outbox to another disk")]
    DiskFull {
        /// The store directory.
        path: PathBuf,
    },
    /// Another process holds the store directory (an outbox or an inbox).
    #[error(
        "the store directory {path} is in use by another process; stop that process, or give this one a directory of its own"
    )]
    Locked {
        /// The store directory.
        path: PathBuf,
    },
    /// The store directory belongs to another user.
    #[error("the store {path} belongs to another user (uid {owner}, this process runs as uid {user}); run steadfast as its owner, or give this user its own directory")]
    NotOwner {
        /// The store directory.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        user: u32,
    },
    /// The store directory cannot be created, read or written.
    #[error("cannot use the store directory {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store was written by a newer steadfast.
    #[error(
        "the outbox {path} has format {found}, newer than this steadfast understands ({supported}); upgrade steadfast"
    )]
    FormatTooNew {
        /// The store directory.
        path: PathBuf,
        /// Format version found.
        found: u32,
        /// Newest supported format.
        supported: u32,
    },
    /// The store was written by an older steadfast and is converted only
    /// when its owner opens it for writing (a read-only open cannot).
    #[error(
        "the outbox {path} has format {found}, from an earlier steadfast; it is converted when its owner opens it for writing"
    )]
    FormatTooOld {
        /// The store directory.
        path: PathBuf,
        /// Format version found.
        found: u32,
    },
    /// A stored record could not be decoded.
    #[error("outbox record {id} is malformed: {what}")]
    Malformed {
        /// The record id.
        id: u64,
        /// What is wrong with it.
        what: String,
    },
    /// A consumer's inbox was asked of a directory that holds a producer's
    /// outbox.
    #[error("{path} holds a producer's outbox, not an inbox; give the consumer a directory of its own")]
    OutboxNotInbox {
        /// The directory.
        path: PathBuf,
    },
    /// The writer thread is gone (the outbox was closed).
    #[error("the outbox is closed")]
    Closed,
    /// A batch could not be committed; its messages were not accepted.
    #[error("the outbox could not commit: {0}")]
    WriteFailed(String),
    /// Any other error of the database under the store.
    #[error("outbox database error: {0}")]
    Database(DatabaseError),
}

/// An error of the database under the store (SQLite today), in its words.
/// Which library it comes from is not part of the API.
#[derive(Debug, Clone)]
pub struct DatabaseError(Arc<rusqlite::Error>);

impl std::fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DatabaseError {}

impl DatabaseError {
    pub(crate) fn sqlite(&self) -> &rusqlite::Error {
        &self.0
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(DatabaseError(Arc::new(e)))
    }
}

impl StoreError {
    /// The same failure, for one more waiting caller (an I/O error keeps
    /// its kind and words).
    pub(crate) fn clone_for_reply(&self) -> StoreError {
        match self {
            StoreError::DiskFull { path } => StoreError::DiskFull { path: path.clone() },
            StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
            StoreError::NotOwner { path, owner, user } => {
                StoreError::NotOwner { path: path.clone(), owner: *owner, user: *user }
            }
            StoreError::Io { path, source } => {
                StoreError::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
            }
            StoreError::FormatTooNew { path, found, supported } => {
                StoreError::FormatTooNew { path: path.clone(), found: *found, supported: *supported }
            }
            StoreError::FormatTooOld { path, found } => StoreError::FormatTooOld { path: path.clone(), found: *found },
            StoreError::Malformed { id, what } => StoreError::Malformed { id: *id, what: what.clone() },
            StoreError::OutboxNotInbox { path } => StoreError::OutboxNotInbox { path: path.clone() },
            StoreError::Closed => StoreError::Closed,
            StoreError::WriteFailed(why) => StoreError::WriteFailed(why.clone()),
            StoreError::Database(e) => StoreError::Database(e.clone()),
        }
    }

    /// True when the same operation may succeed later without a change of
    /// configuration (space freed, lock released).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. } | StoreError::Locked { .. })
    }
}
