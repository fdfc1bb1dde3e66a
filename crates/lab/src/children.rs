//! The demo's and the chaos harness's client processes: the consumer
//! (`steadfast sub` with an inbox) and what it printed, and a private
//! temporary directory for a run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::launch::kill9;
use crate::LabError;

/// The consumer: `steadfast sub` (this executable) with an inbox, printing
/// each message (flushed before its acknowledgement) to `out`.
pub struct Consumer {
    /// Its arguments, `sub` first.
    pub args: Vec<String>,
    /// Where its standard output goes (appended).
    pub out: PathBuf,
    /// The process, while it runs.
    pub child: Option<Child>,
}

impl Consumer {
    /// Creates its sessions and subscriptions (`--register`), so that what
    /// is published from now on waits for it.
    pub fn register(&self) -> Result<(), LabError> {
        let out = Command::new(current_exe()?)
            .args(&self.args)
            .arg("--register")
            .output()
            .map_err(|source| LabError::Spawn { what: "the consumer".into(), source })?;
        if out.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            Err(LabError::Child { what: "registering the consumer", stderr })
        }
    }

    /// Starts it (again), appending to `out`.
    pub fn start(&mut self) -> Result<(), LabError> {
        let out =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.out).map_err(LabError::io(&self.out))?;
        let child = Command::new(current_exe()?)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| LabError::Spawn { what: "the consumer".into(), source })?;
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        kill9(&mut self.child);
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// This executable: the demo and chaos run `steadfast pub`, `sub` and
/// `broker` as children of the `steadfast` binary that runs them.
pub fn current_exe() -> Result<PathBuf, LabError> {
    std::env::current_exe().map_err(LabError::io("the current executable"))
}

/// What the consumer printed (`%I` lines): identity -> times.
pub fn handled(out: &Path) -> HashMap<String, u32> {
    let mut m = HashMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        if line.contains('/') {
            *m.entry(line.to_owned()).or_default() += 1;
        }
    }
    m
}

/// Copies the consumer's inbox removed (its counter, kept on disk).
pub fn duplicates_removed(inbox: &Path) -> u64 {
    let Ok(mut store) = steadfast_store::SqliteStore::open_read_only(inbox) else { return 0 };
    let counters = steadfast_store::InboxStore::counters(&mut store).unwrap_or_default();
    counters.iter().filter(|(k, _)| k.contains("duplicates")).map(|(_, v)| *v).sum()
}

/// A private temporary directory for a run, removed at the end.
pub fn run_dir(what: &str) -> Result<tempfile::TempDir, LabError> {
    let tmp = std::env::temp_dir();
    tempfile::Builder::new().prefix(&format!("steadfast-{what}-")).tempdir_in(&tmp).map_err(LabError::io(tmp))
}
