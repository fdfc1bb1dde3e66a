//! Where stores live by default, the default client ids, and the flag
//! that puts a store elsewhere when its directory cannot be used.

use std::path::PathBuf;

use steadfast_store::StoreError;

/// `$XDG_STATE_HOME/steadfast/outbox/<id>`, else `~/.local/state/...`.
pub fn default_outbox(client_id: &str) -> PathBuf {
    state_dir("outbox", client_id)
}

/// `$XDG_STATE_HOME/steadfast/inbox/<id>`, else `~/.local/state/...`.
pub fn default_inbox(client_id: &str) -> PathBuf {
    state_dir("inbox", client_id)
}

/// `$XDG_STATE_HOME/steadfast`, else `~/.local/state/steadfast`: where the
/// default outboxes and inboxes live.
pub fn state_root() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("steadfast")
}

fn state_dir(kind: &str, client_id: &str) -> PathBuf {
    // One directory per client id, never outside `outbox/` and never shared
    // by two ids: anything but letters, digits, `-` and `_` (and `.` past
    // the first character) is written as %XX.
    let mut safe = String::new();
    for (i, b) in client_id.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            safe.push(b as char);
        } else {
            safe.push_str(&format!("%{b:02X}"));
        }
    }
    state_root().join(kind).join(safe)
}

/// A stable default client id for this machine: `steadfast-<role>-<host>`.
pub fn default_client_id_for(role: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty());
    format!("steadfast-{role}-{}", host.unwrap_or_else(|| "local".into()))
}

/// The publisher's default client id.
pub fn default_client_id() -> String {
    default_client_id_for("pub")
}

/// A store error as the CLI shows it: the library says what is wrong
/// with the directory; where another directory is the way out, this names
/// the flag (`--outbox`, `--inbox`) that gives one.
pub fn store_error(e: StoreError, flag: &str) -> anyhow::Error {
    match e {
        StoreError::Locked { .. } | StoreError::DiskFull { .. } => anyhow::anyhow!("{e} ({flag} DIR)"),
        StoreError::Io { .. } => anyhow::anyhow!("{e}; give a directory this user can create and write ({flag} DIR)"),
        e => anyhow::Error::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_escape_the_client_id() {
        let base = default_outbox("x").parent().unwrap().to_owned();
        for (id, dir) in [("gw-7", "gw-7"), ("a/b", "a%2Fb"), ("a_b", "a_b"), ("..", "%2E."), (".hidden", "%2Ehidden")]
        {
            assert_eq!(default_outbox(id), base.join(dir), "{id}");
        }
    }

    #[test]
    fn a_locked_or_full_store_is_told_the_flag_that_moves_it() {
        let path = PathBuf::from("/x");
        let locked = store_error(StoreError::Locked { path: path.clone() }, "--outbox").to_string();
        assert!(locked.starts_with("the store directory /x is in use by another process;"), "{locked}");
        assert!(locked.ends_with("a directory of its own (--outbox DIR)"), "{locked}");
        let full = store_error(StoreError::DiskFull { path }, "--inbox").to_string();
        assert!(full.ends_with("move the outbox to another disk (--inbox DIR)"), "{full}");
        assert_eq!(store_error(StoreError::Closed, "--outbox").to_string(), "the outbox is closed");
    }
}
