//! What the scenarios found, as tables, JSON, or an SVG latency histogram.

use std::fmt::Write;

use crate::disk::OutboxDisk;
pub use crate::measure::Cpu;

/// One line of a scenario's table.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// What was measured (client, path, fault).
    pub name: String,
    /// Messages per second, when it is a rate.
    pub rate: Option<f64>,
    /// Another measure and its unit (a gap, a restart time).
    pub value: Option<(f64, &'static str)>,
    /// Latency percentiles, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile, milliseconds.
    pub p99_ms: Option<f64>,
    /// Peak resident memory of the bench process during the run, MiB.
    pub rss_mib: Option<f64>,
    /// This row's measure over the baseline's (same run).
    pub ratio: Option<f64>,
    /// True for the baseline row.
    pub baseline: bool,
    /// The in-flight window the row's client had (when it sends).
    pub window: Option<u16>,
    /// CPU per message over the timed span (median of the runs).
    pub cpu: Option<Cpu>,
    /// The ratio the machine's cores allow at this row's CPU per message
    /// ([`Cpu::max_ratio`] over the baseline's rate).
    pub cpu_max: Option<f64>,
    /// The same were this row's client to spend no more CPU of its own per
    /// message than the baseline's ([`Cpu::par_ratio`]).
    pub par_max: Option<f64>,
}

/// One scenario's results.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    /// Its name (`publish`, `fanout`...).
    pub name: &'static str,
    /// What it does, in one line.
    pub title: String,
    /// What the ratio column divides by.
    pub ratio_to: String,
    /// The rows.
    pub rows: Vec<Row>,
    /// Per-message latencies (ms) by series, for `--plot`.
    pub latencies: Vec<(String, Vec<f64>)>,
    /// Lines printed under the table (how the rows were timed, the
    /// figures behind a "best window" row).
    pub notes: Vec<String>,
}

/// Every scenario run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Where the outboxes were, and what a raw sync cost there.
    pub outbox: Option<OutboxDisk>,
    /// The in-flight window every client had (the "best window" rows
    /// aside).
    pub inflight: Option<u16>,
    /// In the order run.
    pub scenarios: Vec<Scenario>,
}

/// What the CPU columns mean (printed above the tables).
pub const CPU_COLUMNS: &str = "CPU us: CPU time per message on the whole machine over the timed span (brokers, clients, this bench: /proc/stat), from the run with the median rate; own us: of which the client measured (this process, for the clients that run inside it; the bridge's process; - for mosquitto_pub); child us: of which the other processes this bench started (the brokers, mosquitto_pub); the rest is the kernel's threads and interrupts; busy: the share of the machine's cores in use; CPU max: the ratio the machine's cores would allow at that CPU per message (cores / CPU per message / the baseline's msg/s): a row cannot pass it here without spending less CPU per message, and a baseline near 100% busy is bound by the machine; at par: the CPU max were the row's client to spend no more CPU of its own per message than the baseline's client (the rest of its CPU per message, brokers and kernel, as measured): a target above it is beyond what this machine allows however cheap the client's own work gets";

fn opt(v: Option<f64>, width: usize, prec: usize) -> String {
    v.map_or_else(|| format!("{:>width$}", "-"), |v| format!("{v:>width$.prec$}"))
}

/// The `p`-th percentile (0..=100) of `v` (sorted here).
pub fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

impl Report {
    /// What every table shares: the outbox's filesystem and raw sync
    /// latency, the in-flight window.
    pub fn header(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(d) = &self.outbox {
            out.push(format!(
                "outbox directory {}: {} (mounted at {}){}; raw write+fsync of 64 bytes there: p50 {:.3} ms, p99 {:.3} ms ({} writes)",
                d.dir.display(),
                d.filesystem,
                d.mount_point.display(),
                if d.memory_backed { ", MEMORY-BACKED (--allow-tmpfs): durable figures are flattered" } else { "" },
                d.fsync_p50_ms,
                d.fsync_p99_ms,
                d.fsync_samples
            ));
        }
        if let Some(w) = self.inflight {
            out.push(format!(
                "in-flight window: {w} for every client (column `window`; \"best window\" rows: each client at the window that suited it best)"
            ));
        }
        out.push(CPU_COLUMNS.into());
        out
    }

    /// Tables for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for line in self.header() {
            let _ = writeln!(out, "{line}");
        }
        for s in &self.scenarios {
            let _ = writeln!(out, "\n{}: {}", s.name, s.title);
            let _ = writeln!(
                out,
                "  {:<72} {:>6} {:>10} {:>12} {:>9} {:>9} {:>8} {:>9} {:>7} {:>7} {:>8} {:>5} {:>7} {:>6}",
                "",
                "window",
                "msg/s",
                "value",
                "p50 ms",
                "p99 ms",
                "RSS MiB",
                "ratio",
                "CPU us",
                "own us",
                "child us",
                "busy",
                "CPU max",
                "at par"
            );
            for r in &s.rows {
                let value = r.value.map_or_else(
                    || "-".to_owned(),
                    // Microseconds a message are a few: one decimal.
                    |(v, unit)| if unit == "us" { format!("{v:.1} {unit}") } else { format!("{v:.0} {unit}") },
                );
                let ratio = if r.baseline { "baseline".to_owned() } else { opt(r.ratio, 0, 2) };
                let window = r.window.map_or_else(|| "-".to_owned(), |w| w.to_string());
                let busy = r.cpu.map_or_else(|| "-".to_owned(), |c| format!("{:.0}%", c.busy * 100.0));
                let _ = writeln!(
                    out,
                    "  {:<72} {:>6} {} {:>12} {} {} {} {:>9} {} {} {} {:>5} {} {}",
                    r.name,
                    window,
                    opt(r.rate, 10, 0),
                    value,
                    opt(r.p50_ms, 9, 2),
                    opt(r.p99_ms, 9, 2),
                    opt(r.rss_mib, 8, 1),
                    ratio,
                    opt(r.cpu.map(|c| c.machine_us), 7, 1),
                    opt(r.cpu.and_then(|c| c.own_us), 7, 1),
                    opt(r.cpu.and_then(|c| c.child_us), 8, 1),
                    busy,
                    opt(r.cpu_max, 7, 2),
                    opt(r.par_max, 6, 2)
                );
            }
            if !s.ratio_to.is_empty() {
                let _ = writeln!(out, "  ratio: {}", s.ratio_to);
            }
            for n in &s.notes {
                let _ = writeln!(out, "  {n}");
            }
        }
        out
    }

    /// The same for machines.
    pub fn json(&self) -> serde_json::Value {
        let scenarios: Vec<serde_json::Value> = self
            .scenarios
            .iter()
            .map(|s| {
                let rows: Vec<serde_json::Value> = s
                    .rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "name": r.name,
                            "msgs_per_sec": r.rate,
                            "value": r.value.map(|v| v.0),
                            "unit": r.value.map(|v| v.1),
                            "p50_ms": r.p50_ms,
                            "p99_ms": r.p99_ms,
                            "rss_mib": r.rss_mib,
                            "ratio": r.ratio,
                            "baseline": r.baseline,
                            "window": r.window,
                            "cpu_us_per_msg": r.cpu.map(|c| c.machine_us),
                            "own_cpu_us_per_msg": r.cpu.and_then(|c| c.own_us),
                            "child_cpu_us_per_msg": r.cpu.and_then(|c| c.child_us),
                            "machine_busy": r.cpu.map(|c| c.busy),
                            "cores": r.cpu.map(|c| c.cores),
                            "cpu_max_ratio": r.cpu_max,
                            "cpu_max_ratio_at_par": r.par_max,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "scenario": s.name,
                    "title": s.title,
                    "ratio_to": s.ratio_to,
                    "rows": rows,
                    "notes": s.notes,
                })
            })
            .collect();
        let outbox = self.outbox.as_ref().map(|d| {
            serde_json::json!({
                "dir": d.dir,
                "filesystem": d.filesystem,
                "mount_point": d.mount_point,
                "memory_backed": d.memory_backed,
                "write_fsync_p50_ms": d.fsync_p50_ms,
                "write_fsync_p99_ms": d.fsync_p99_ms,
                "write_fsync_samples": d.fsync_samples,
            })
        });
        serde_json::json!({ "outbox": outbox, "inflight": self.inflight, "scenarios": scenarios })
    }

    /// A latency histogram (log-scaled buckets, one bar colour per series),
    /// as SVG; `None` when no scenario measured latencies.
    pub fn svg(&self) -> Option<String> {
        let series: Vec<&(String, Vec<f64>)> =
            self.scenarios.iter().flat_map(|s| s.latencies.iter()).filter(|(_, v)| !v.is_empty()).collect();
        if series.is_empty() {
            return None;
        }
        // Buckets from 0.05 ms to 5 s, four per decade.
        let edges: Vec<f64> = (0..=20).map(|i| 0.05 * 10f64.powf(i as f64 / 4.0)).collect();
        let counts: Vec<Vec<f64>> = series
            .iter()
            .map(|(_, v)| {
                let mut c = vec![0.0; edges.len()];
                for x in v {
                    let i = edges.iter().position(|e| x < e).unwrap_or(edges.len() - 1);
                    c[i] += 1.0;
                }
                c.iter().map(|n| n / v.len() as f64 * 100.0).collect()
            })
            .collect();
        let top = counts.iter().flatten().copied().fold(1.0, f64::max);
        let (w, h, left, bottom) = (900.0, 420.0, 60.0, 60.0);
        let plot_w = w - left - 20.0;
        let plot_h = h - bottom - 50.0;
        let slot = plot_w / edges.len() as f64;
        let bar = slot / (series.len() as f64 + 0.5);
        let colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"];
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"20\" font-size=\"14\">publish latency, enqueue to acknowledgement (% of messages per bucket)</text>\n"
        );
        for (si, c) in counts.iter().enumerate() {
            for (i, pct) in c.iter().enumerate() {
                let bh = pct / top * plot_h;
                let x = left + i as f64 * slot + si as f64 * bar;
                let y = h - bottom - bh;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>",
                    bar * 0.95,
                    colours[si % colours.len()]
                );
            }
        }
        for (i, e) in edges.iter().enumerate().step_by(4) {
            let x = left + i as f64 * slot;
            let label = if *e < 1.0 { format!("{e:.2}") } else { format!("{e:.0}") };
            let _ = writeln!(svg, "<text x=\"{x:.1}\" y=\"{:.1}\">&lt;{label} ms</text>", h - bottom + 16.0);
        }
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"black\"/>",
            y = h - bottom,
            x2 = w - 20.0
        );
        let _ = writeln!(svg, "<text x=\"10\" y=\"{:.1}\">{top:.0}%</text>", h - bottom - plot_h);
        for (si, (name, v)) in series.iter().enumerate() {
            let mut sorted = v.clone();
            let (p50, p99) = (percentile(&mut sorted, 50.0), percentile(&mut sorted, 99.0));
            let y = h - 24.0 + 0.0 * si as f64;
            let x = left + si as f64 * 420.0;
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{y:.1}\">{} (p50 {:.2} ms, p99 {:.2} ms, n = {})</text>",
                y - 9.0,
                colours[si % colours.len()],
                x + 14.0,
                escape(name),
                p50.unwrap_or(0.0),
                p99.unwrap_or(0.0),
                v.len()
            );
        }
        svg.push_str("</svg>\n");
        Some(svg)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
