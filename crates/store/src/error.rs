use std::path::PathBuf;

/// Why the outbox store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk (or the filesystem quota) is full.
    #[error("the disk holding the outbox {path} is full; free space there or move the outbox with --outbox; messages accepted before are safe")]
    DiskFull {
        /// The store directory.
        path: PathBuf,
    },
    /// Another process holds the outbox.
    #[error("the outbox {path} is in use by another process; stop it or give this one its own --outbox")]
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
    #[error("cannot use the outbox directory {path}: {source}")]
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
    /// A stored record could not be decoded.
    #[error("outbox record {id} is malformed: {what}")]
    Malformed {
        /// The record id.
        id: u64,
        /// What is wrong with it.
        what: String,
    },
    /// The writer thread is gone (the outbox was closed).
    #[error("the outbox is closed")]
    Closed,
    /// A batch could not be committed; its messages were not accepted.
    #[error("the outbox could not commit: {0}")]
    WriteFailed(String),
    /// Any other SQLite error.
    #[error("outbox database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl StoreError {
    /// The same failure, for one more waiting caller (the SQLite error
    /// itself cannot be cloned; its text is kept).
    pub(crate) fn clone_for_reply(&self) -> StoreError {
        match self {
            StoreError::DiskFull { path } => StoreError::DiskFull { path: path.clone() },
            StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
            StoreError::NotOwner { path, owner, user } => {
                StoreError::NotOwner { path: path.clone(), owner: *owner, user: *user }
            }
            StoreError::Closed => StoreError::Closed,
            other => StoreError::WriteFailed(other.to_string()),
        }
    }

    /// True when the same operation may succeed later without a change of
    /// configuration (space freed, lock released).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. } | StoreError::Locked { .. })
    }
}
