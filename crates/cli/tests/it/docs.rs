//! The README and `--help` agree (issue 21): every flag a command's
//! `--help` lists is in the command's README section (by its long or its
//! short form), and every flag the section's tables and command lines use
//! exists.

use std::collections::BTreeSet;

use super::run;

const README: &str = include_str!("../../../../README.md");
/// Flags of every command, documented once (README, "Logs").
const GLOBAL: [&str; 5] = ["--help", "-d", "--debug", "--log-format", "--version"];

/// `## \`steadfast CMD\`` up to the next `## `.
fn section(cmd: &str) -> &'static str {
    let head = format!("\n## `steadfast {cmd}`");
    let start = README.find(&head).unwrap_or_else(|| panic!("README has no section {head}"));
    let rest = &README[start + head.len()..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// Every `-x` and `--long` in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        let long = word.strip_prefix("--").is_some_and(|w| w.starts_with(|c: char| c.is_ascii_lowercase()));
        let short = word.len() == 2 && word.starts_with('-') && word.as_bytes()[1].is_ascii_alphabetic();
        if long || short {
            out.insert(word.to_owned());
        }
    }
    out
}

/// The options `steadfast CMD --help` lists: (short, long, visible
/// aliases) per line.
async fn help(cmd: &str) -> Vec<(Option<String>, String, Vec<String>)> {
    let out = run(&[cmd, "--help"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            let head = l.split("  ").next().unwrap_or(l);
            let fl = flags(head);
            let long = fl.iter().find(|f| f.starts_with("--"))?.clone();
            let short = fl.iter().find(|f| !f.starts_with("--")).cloned();
            // clap's `[alias: --x]` / `[aliases: --x, --y]` at the end.
            let aliases = l.rfind("[alias").map_or_else(BTreeSet::new, |i| flags(&l[i..]));
            Some((short, long, aliases.into_iter().filter(|f| f.starts_with("--")).collect()))
        })
        .collect()
}

/// Flags the section uses as flags: first cells of its tables, and its
/// `steadfast CMD ...` command lines.
fn used(cmd: &str, text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(row) = t.strip_prefix('|') {
            out.extend(flags(row.split('|').next().unwrap_or("")));
        } else if t.starts_with(&format!("steadfast {cmd} ")) {
            out.extend(flags(t.split(" #").next().unwrap_or(t)));
        }
    }
    out.into_iter().filter(|f| f.starts_with("--")).collect()
}

#[tokio::test]
async fn every_flag_of_help_is_in_the_readme_and_every_readme_flag_exists() {
    let mut problems = Vec::new();
    for cmd in ["pub", "sub", "status", "doctor", "poison", "bridge", "chaos", "bench"] {
        let text = section(cmd);
        let mut documented = flags(text);
        if text.contains("as for `pub`") || text.contains("as `pub`") {
            documented.extend(flags(section("pub")));
        }
        let listed = help(cmd).await;
        assert!(!listed.is_empty(), "{cmd} --help lists options");
        for (short, long, _) in &listed {
            let global = GLOBAL.contains(&long.as_str());
            let known = documented.contains(long) || short.as_ref().is_some_and(|s| documented.contains(s));
            if !global && !known {
                problems.push(format!("`steadfast {cmd}`: {long} is in --help, not in the README"));
            }
        }
        let longs: BTreeSet<&String> = listed.iter().flat_map(|(_, l, a)| std::iter::once(l).chain(a)).collect();
        for f in used(cmd, text) {
            if !longs.contains(&f) && !GLOBAL.contains(&f.as_str()) {
                problems.push(format!("`steadfast {cmd}`: the README uses {f}, which --help does not list"));
            }
        }
    }
    assert!(problems.is_empty(), "README and --help disagree:\n{}", problems.join("\n"));
}
