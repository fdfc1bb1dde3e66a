//! What happened, step by step, for the story of a lost message.

use std::fmt::Write;

/// Every step of a run: what happened to which message, and the faults.
#[derive(Debug, Default)]
pub struct Trace {
    lines: Vec<(u64, Option<u64>, String)>,
}

impl Trace {
    /// Records a step at `t` (ms) that touched message `id` (`None`: the
    /// whole world, such as a fault).
    pub fn note(&mut self, t: u64, id: Option<u64>, what: impl Into<String>) {
        self.lines.push((t, id, what.into()));
    }

    /// The steps that touched `id`, with the world's events among them.
    pub fn story(&self, id: u64) -> String {
        let mut out = String::new();
        for (t, about, what) in &self.lines {
            if *about == Some(id) || about.is_none() {
                let _ = writeln!(out, "  {:>6}.{:03}s  {}", t / 1000, t % 1000, what);
            }
        }
        out
    }
}
