//! `steadfast-sim --seeds N [--from S] [--mutate BUG|list] [--threads T] [--messages M --faults F]`:
//! runs the seeds, prints a line per failing one and the story of the
//! first failure, the totals, and `N schedules from seed S: F failed`.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use steadfast_core::mutate::{plant, Bug};
use steadfast_sim::Size;

/// The deterministic simulator of steadfast's delivery engine: each seed
/// is a world of a producer, one to three brokers and a consumer under
/// faults, in simulated time. Exit 1 when a seed breaks a promise.
#[derive(Parser)]
#[command(name = "steadfast-sim", version)]
struct Args {
    /// How many seeds (worlds) to run.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// The first seed (replay one with `--seeds 1 --from SEED`).
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Plant a deliberate bug (`list` names them); the run should fail.
    #[arg(long, value_name = "BUG|list", value_parser = parse_bug)]
    mutate: Option<Mutate>,
    /// Worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// Every world publishes this many messages (instead of 20 to 300) —
    /// with `--faults`, to measure the simulator on heavy worlds.
    #[arg(long, requires = "faults", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    messages: Option<u64>,
    /// Every world gets this many faults (instead of 1 to 7).
    #[arg(long, requires = "messages", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    faults: Option<u64>,
}

#[derive(Clone, Copy)]
enum Mutate {
    List,
    Plant(Bug),
}

fn parse_bug(s: &str) -> Result<Mutate, String> {
    if s == "list" {
        return Ok(Mutate::List);
    }
    let names: Vec<_> = Bug::ALL.iter().map(|b| b.name()).collect();
    Bug::parse(s)
        .map(Mutate::Plant)
        .ok_or_else(|| format!("no planted bug `{s}`; use `list`, or one of: {}", names.join(", ")))
}

fn main() -> ExitCode {
    let a = Args::parse();
    let bug = match a.mutate {
        Some(Mutate::List) => {
            for b in Bug::ALL {
                println!("{:<34} {}", b.name(), b.describe());
            }
            return ExitCode::SUCCESS;
        }
        Some(Mutate::Plant(b)) => Some(b),
        None => None,
    };
    plant(bug);
    if let Some(b) = bug {
        println!("planted bug: {} ({})", b.name(), b.describe());
    }
    if a.from.checked_add(a.seeds).and_then(|end| end.checked_add(u64::from(a.threads))).is_none() {
        eprintln!("error: --from {} with --seeds {} runs past the last seed; start lower", a.from, a.seeds);
        return ExitCode::from(2);
    }
    let mut lines = Vec::new();
    let started = std::time::Instant::now();
    let size = a.messages.zip(a.faults).map(|(m, f)| Size { messages: m as usize, faults: f as usize });
    let (failed, t) = steadfast_sim::run_range_totals(a.from, a.seeds, a.threads as usize, size, &mut |v| {
        lines.push((v.seed, format!("FAILED {}", v.summary())));
    });
    // In seed order, whatever thread ran them; a closed pipe (`| head`)
    // ends the output, not the run's verdict.
    lines.sort();
    let mut out = std::io::stdout();
    for (_, line) in &lines {
        let _ = writeln!(out, "{line}");
    }
    if let Some(first) = failed.first() {
        // The first failure replays identically: its story.
        let v = steadfast_sim::run_sized(*first, size);
        let id = v.culprit().unwrap_or(0);
        let _ = writeln!(out, "replay of seed {first}: the story of message {id}");
        let _ = writeln!(out, "  {}", steadfast_sim::Schedule::sized(*first, size).describe());
        let _ = write!(out, "{}", v.trace.story(id));
        let _ = writeln!(out, "  end of the run: message {id} {}", v.fate(id));
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "{} faults applied ({} skipped: their target was down); {} messages accepted, {} handled; drops: {} expired, {} out of budget; {} lost by the brokers themselves (a message can be handled through one broker and dropped or lost at another), {} more lost by them but published again for lack of a receipt and handled; {} moved aside as poison (larger than the brokers take, or refused for good)",
        t.faults, t.skipped, t.accepted, t.handled, t.expired, t.budget, t.broker_lost, t.rescued, t.poisoned
    );
    let _ = writeln!(
        out,
        "speed: {:.1} s, {:.0} schedules/s on {} thread(s), {:.0} per thread",
        secs,
        a.seeds as f64 / secs.max(1e-9),
        a.threads,
        a.seeds as f64 / secs.max(1e-9) / f64::from(a.threads)
    );
    let noun = if a.seeds == 1 { "schedule" } else { "schedules" };
    let _ = writeln!(out, "{} {noun} from seed {}: {} failed", a.seeds, a.from, failed.len());
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
