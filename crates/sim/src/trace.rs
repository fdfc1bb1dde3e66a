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

    /// The steps that touched `id`, with the world's events among them;
    /// a run of lines that repeats (a link that keeps failing the same
    /// way) is told once, with its count.
    pub fn story(&self, id: u64) -> String {
        let lines: Vec<(u64, &str)> = self
            .lines
            .iter()
            .filter(|(_, about, _)| *about == Some(id) || about.is_none())
            .map(|(t, _, what)| (*t, what.as_str()))
            .collect();
        let mut out = String::new();
        let mut i = 0;
        while i < lines.len() {
            // The longest short cycle (1 to 3 lines) that repeats from here.
            let (period, repeats) = (1..=3)
                .map(|p| (p, repeats_of(&lines[i..], p)))
                .max_by_key(|(p, r)| (r * p, std::cmp::Reverse(*p)))
                .expect("periods");
            for (t, what) in &lines[i..i + period.min(lines.len() - i)] {
                let _ = writeln!(out, "  {:>6}.{:03}s  {}", t / 1000, t % 1000, what);
            }
            if repeats > 1 {
                let last = lines[i + period * repeats - 1].0;
                let _ = writeln!(
                    out,
                    "  {:>11}  ... the {} line(s) above, {} times in all, until {}.{:03}s",
                    "",
                    period,
                    repeats,
                    last / 1000,
                    last % 1000
                );
            }
            i += period * repeats.max(1);
        }
        out
    }
}

/// How many times the first `period` lines of `lines` occur in a row
/// (their text, not their times).
fn repeats_of(lines: &[(u64, &str)], period: usize) -> usize {
    if lines.len() < period {
        return 1;
    }
    let head: Vec<&str> = lines[..period].iter().map(|(_, w)| *w).collect();
    let mut n = 1;
    while lines.len() >= (n + 1) * period
        && lines[n * period..(n + 1) * period].iter().map(|(_, w)| *w).eq(head.iter().copied())
    {
        n += 1;
    }
    n
}
