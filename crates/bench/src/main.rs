//! `steadfast-bench`: the benchmarks without the CLI (same as `steadfast
//! bench`). `cargo run --release -p steadfast-bench -- [SCENARIO...|all]
//! [--messages N] [--payload BYTES] [--runs R] [--inflight N] [--windows LIST]
//! [--rate N] [--outbox-dir DIR] [--allow-tmpfs] [--json] [--plot FILE]`

#![forbid(unsafe_code)]

use anyhow::{bail, Context};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut a = steadfast_bench::Args::default();
    let (mut names, mut json, mut plot) = (Vec::new(), false, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("the flag needs a value");
        match flag.as_str() {
            "--scenario" => names.push(value()?),
            "--messages" => a.messages = value()?.parse()?,
            "--payload" => a.payload = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--inflight" => a.inflight = value()?.parse()?,
            "--windows" => a.windows = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--outbox-dir" => a.outbox_dir = value()?.into(),
            "--allow-tmpfs" => a.allow_tmpfs = true,
            "--rate" => a.rate = value()?.parse()?,
            "--json" => json = true,
            "--plot" => plot = Some(value()?),
            f if f.starts_with("--") => bail!("unknown flag {f}"),
            name => names.push(name.to_owned()),
        }
    }
    let report = steadfast_bench::run(&names, &a).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.text());
    }
    if let Some(path) = plot {
        let svg = report.svg().context("no latencies measured: run the publish scenario to plot")?;
        std::fs::write(&path, svg).with_context(|| format!("--plot {path}"))?;
    }
    Ok(())
}
