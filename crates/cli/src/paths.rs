//! Where stores live by default, and the default client ids.

use std::path::PathBuf;

/// `$XDG_STATE_HOME/steadfast/outbox/<id>`, else `~/.local/state/...`.
pub fn default_outbox(client_id: &str) -> PathBuf {
    state_dir("outbox", client_id)
}

/// `$XDG_STATE_HOME/steadfast/inbox/<id>`, else `~/.local/state/...`.
pub fn default_inbox(client_id: &str) -> PathBuf {
    state_dir("inbox", client_id)
}

fn state_dir(kind: &str, client_id: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
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
    base.join("steadfast").join(kind).join(safe)
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
}
