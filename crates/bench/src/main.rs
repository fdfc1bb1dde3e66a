//! `steadfast-bench`: the benchmarks without the CLI (same as `steadfast
//! bench`). `cargo run --release -p steadfast-bench -- [SCENARIO...|all]
//! [--messages N] [--payload BYTES] [--runs R] [--inflight N] [--windows LIST]
//! [--rate N] [--outbox-dir DIR] [--allow-tmpfs] [--json] [--plot FILE]`

#![forbid(unsafe_code)]

use std::error::Error;
use std::process::ExitCode;

/// The command line, parsed.
struct Options {
    names: Vec<String>,
    args: steadfast_bench::Args,
    json: bool,
    plot: Option<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let o = match parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("steadfast-bench: error: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match steadfast_bench::run(&o.names, &o.args).await {
        Ok(report) => report,
        Err(e) => return failed(&e, if e.is_usage() { 2 } else { 1 }),
    };
    if o.json {
        println!("{:#}", report.json());
    } else {
        print!("{}", report.text());
    }
    if let Some(path) = o.plot {
        let Some(svg) = report.svg() else {
            eprintln!("steadfast-bench: error: no latencies measured: run the publish scenario to plot");
            return ExitCode::from(1);
        };
        if let Err(e) = std::fs::write(&path, svg) {
            eprintln!("steadfast-bench: error: --plot {path}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

/// Prints the error with its causes; the exit code.
fn failed(e: &dyn Error, code: u8) -> ExitCode {
    eprintln!("steadfast-bench: error: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        eprintln!("  caused by: {c}");
        cause = c.source();
    }
    ExitCode::from(code)
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut o = Options { names: Vec::new(), args: steadfast_bench::Args::default(), json: false, plot: None };
    let a = &mut o.args;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--scenario" => o.names.push(value()?),
            "--messages" => a.messages = number(&flag, &value()?)?,
            "--payload" => a.payload = number(&flag, &value()?)?,
            "--runs" => a.runs = number(&flag, &value()?)?,
            "--inflight" => a.inflight = number(&flag, &value()?)?,
            "--windows" => a.windows = value()?.split(',').map(|w| number(&flag, w)).collect::<Result<_, _>>()?,
            "--outbox-dir" => a.outbox_dir = value()?.into(),
            "--allow-tmpfs" => a.allow_tmpfs = true,
            "--rate" => a.rate = number(&flag, &value()?)?,
            "--json" => o.json = true,
            "--plot" => o.plot = Some(value()?),
            f if f.starts_with("--") => return Err(format!("unknown flag {f}")),
            name => o.names.push(name.to_owned()),
        }
    }
    Ok(o)
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.parse().map_err(|e| format!("{flag} {v}: {e}"))
}
