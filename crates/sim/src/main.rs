//! `steadfast-sim --seeds N [--from S] [--mutate BUG|list] [--threads T]`:
//! runs the seeds, prints a line per failing one and the story of the
//! first failure, the totals, and `N schedules from seed S: F failed`.

use std::io::Write;
use std::process::ExitCode;

use steadfast_core::mutate::{plant, Bug};

struct Args {
    seeds: u64,
    from: u64,
    mutate: Option<Bug>,
    threads: usize,
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("steadfast-sim: {problem}");
    eprintln!("usage: steadfast-sim --seeds N [--from S] [--mutate BUG|list] [--threads T]");
    ExitCode::from(2)
}

fn parse() -> Result<Option<Args>, String> {
    let mut a = Args { seeds: 1_000, from: 0, mutate: None, threads: 2 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("{flag}: `{v}` is not a whole number"));
        match flag.as_str() {
            "--seeds" => a.seeds = number(value()?)?,
            "--from" => a.from = number(value()?)?,
            "--threads" => a.threads = number(value()?)?.clamp(1, 64) as usize,
            "--mutate" => {
                let v = value()?;
                if v == "list" {
                    for b in Bug::ALL {
                        println!("{:<34} {}", b.name(), b.describe());
                    }
                    return Ok(None);
                }
                let names: Vec<_> = Bug::ALL.iter().map(|b| b.name()).collect();
                a.mutate =
                    Some(Bug::parse(&v).ok_or_else(|| format!("no planted bug `{v}`; one of: {}", names.join(", ")))?);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => return usage(&e),
    };
    plant(a.mutate);
    if let Some(b) = a.mutate {
        println!("planted bug: {} ({})", b.name(), b.describe());
    }
    // A closed pipe (`| head`) ends the output, not the run's verdict.
    let (failed, t) = steadfast_sim::run_range_totals(a.from, a.seeds, a.threads, &mut |v| {
        let _ = writeln!(std::io::stdout(), "FAILED {}", v.summary());
    });
    if let Some(first) = failed.first() {
        // The first failure replays identically: its story.
        let v = steadfast_sim::run(*first);
        let id = v.culprit().unwrap_or(0);
        let mut out = std::io::stdout();
        let _ = writeln!(out, "replay of seed {first}: the story of message {id}");
        let _ = write!(out, "{}", v.trace.story(id));
    }
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "{} faults; {} messages accepted, {} handled, {} expired and {} out of budget (each in the drop log), {} lost by the brokers themselves",
        t.faults, t.accepted, t.handled, t.expired, t.budget, t.broker_lost
    );
    let _ = writeln!(out, "{} schedules from seed {}: {} failed", a.seeds, a.from, failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
