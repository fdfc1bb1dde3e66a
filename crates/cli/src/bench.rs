//! `steadfast bench`: the benchmark scenarios of `steadfast-bench`, each
//! against a baseline measured in the same run; tables, `--json`, and an
//! SVG latency histogram with `--plot`.

use anyhow::anyhow;

use crate::args::BenchArgs;
use crate::Failure;

pub async fn run(a: BenchArgs) -> Result<(), Failure> {
    if a.messages == 0 || a.runs == 0 || a.rate == 0 || a.inflight == 0 || a.windows.contains(&0) {
        return Err(Failure::usage(anyhow!("--messages, --runs, --rate, --inflight and --windows must be above 0")));
    }
    if a.plot.is_some() && !a.scenarios.is_empty() && !a.scenarios.iter().any(|s| s == "publish" || s == "all") {
        return Err(Failure::usage(anyhow!("--plot draws the publish scenario's latencies: add `publish`")));
    }
    let args = steadfast_bench::Args {
        messages: a.messages,
        payload: a.payload,
        runs: a.runs,
        inflight: a.inflight,
        windows: a.windows,
        rate: a.rate,
        steadfast: std::env::current_exe().ok(),
        outbox_dir: a.outbox_dir.unwrap_or_else(std::env::temp_dir),
        allow_tmpfs: a.allow_tmpfs,
    };
    let report = steadfast_bench::run(&a.scenarios, &args).await.map_err(|e| {
        // A scenario that does not exist, an outbox directory that is
        // missing or on tmpfs: the command line must change.
        if e.is_usage() {
            Failure::usage(e)
        } else {
            Failure::other(e)
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report.json()).map_err(|e| Failure::other(anyhow!(e)))?);
    } else {
        print!("{}", report.text());
    }
    if let Some(path) = &a.plot {
        let svg = report.svg().ok_or_else(|| Failure::other(anyhow!("no latencies were measured")))?;
        std::fs::write(path, svg).map_err(|e| Failure::other(anyhow!("--plot {}: {e}", path.display())))?;
        eprintln!("latency histogram written to {}", path.display());
    }
    Ok(())
}
