//! `publish`: every client at the common in-flight window and at its
//! best window, against bare rumqttc of the same MQTT version; then the
//! paced latency runs.

use steadfast::ProtocolVersion;

use crate::clients::{
    bare_rumqttc, bare_rumqttc_v5, latency_rumqttc_v5, latency_steadfast, mosquitto_pub, steadfast_durable, Carried,
    SteadfastLatency,
};
use crate::measure::{at_par, bounded, broker, median, median_run, mib, rate, Cpu, RssPeak, Took};
use crate::{percentile, Args, BenchError, Row, Scenario};

/// The clients of the `publish` scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Publisher {
    Rumqttc311,
    Rumqttc5,
    /// Bare rumqttc, MQTT 5, each message carrying steadfast's identity
    /// property: the fastest a client that carries G5's identity can go.
    Rumqttc5Id,
    MosquittoPub,
    Steadfast311,
    Steadfast5,
}

impl Publisher {
    const ALL: [Publisher; 6] = [
        Publisher::Rumqttc311,
        Publisher::Rumqttc5,
        Publisher::Rumqttc5Id,
        Publisher::MosquittoPub,
        Publisher::Steadfast311,
        Publisher::Steadfast5,
    ];

    fn name(self) -> &'static str {
        match self {
            Publisher::Rumqttc311 => "bare rumqttc 0.25, MQTT 3.1.1 (no durability)",
            Publisher::Rumqttc5 => "bare rumqttc 0.25, MQTT 5 (no durability)",
            Publisher::Rumqttc5Id => {
                "bare rumqttc 0.25, MQTT 5, with steadfast's identity property (no durability, x rumqttc 5)"
            }
            Publisher::MosquittoPub => "mosquitto_pub -l -q 1, MQTT 3.1.1 (no durability, x rumqttc 3.1.1)",
            Publisher::Steadfast311 => "steadfast, durable outbox, MQTT 3.1.1 (x rumqttc 3.1.1)",
            Publisher::Steadfast5 => "steadfast, durable outbox, MQTT 5 (x rumqttc 5)",
        }
    }

    /// The same, for the "best window" rows.
    fn short(self) -> &'static str {
        match self {
            Publisher::Rumqttc311 => "bare rumqttc 0.25, MQTT 3.1.1",
            Publisher::Rumqttc5 => "bare rumqttc 0.25, MQTT 5",
            Publisher::Rumqttc5Id => "bare rumqttc 0.25, MQTT 5, with the identity property",
            Publisher::MosquittoPub => "mosquitto_pub -l -q 1, MQTT 3.1.1",
            Publisher::Steadfast311 => "steadfast, durable outbox, MQTT 3.1.1",
            Publisher::Steadfast5 => "steadfast, durable outbox, MQTT 5",
        }
    }

    /// Its place in [`Publisher::ALL`].
    fn index(self) -> usize {
        Publisher::ALL.iter().position(|q| *q == self).expect("every client is in ALL")
    }

    /// The baseline of its ratio: bare rumqttc with the same MQTT version.
    fn baseline(self) -> Publisher {
        match self {
            Publisher::Rumqttc5 | Publisher::Rumqttc5Id | Publisher::Steadfast5 => Publisher::Rumqttc5,
            _ => Publisher::Rumqttc311,
        }
    }

    /// One run of `a.messages` with in-flight window `window`.
    async fn run(self, port: u16, a: &Args, run: usize, window: u16) -> Result<Took, BenchError> {
        let id = format!("{run}-w{window}");
        Ok(match self {
            Publisher::Rumqttc311 => bare_rumqttc(port, a, &id, window, |_| "bench/rumqttc".into()).await?.total,
            Publisher::Rumqttc5 => {
                bare_rumqttc_v5(port, a, &id, window, |_| "bench/rumqttc5".into(), Carried::Nothing).await?.total
            }
            Publisher::Rumqttc5Id => {
                let id = format!("{id}-id");
                bare_rumqttc_v5(port, a, &id, window, |_| "bench/rumqttc5".into(), Carried::Identity).await?.total
            }
            // A process of its own: this one does not see its time.
            Publisher::MosquittoPub => {
                let took = mosquitto_pub(port, a, window)?;
                Took { cpu: took.cpu.map(Cpu::without_own), ..took }
            }
            Publisher::Steadfast311 => steadfast_durable(port, a, &id, ProtocolVersion::V311, window).await?,
            Publisher::Steadfast5 => steadfast_durable(port, a, &id, ProtocolVersion::V5, window).await?,
        })
    }
}

/// The windows `publish` measures every client at: `--windows` and
/// `--inflight`, ascending.
pub(crate) fn sweep(a: &Args) -> Vec<u16> {
    let mut w: Vec<u16> = a.windows.iter().copied().chain([a.inflight]).filter(|w| *w > 0).collect();
    w.sort_unstable();
    w.dedup();
    w
}

/// The window with the highest rate, and that rate.
pub(crate) fn best(by_window: &[(u16, f64)]) -> (u16, f64) {
    by_window.iter().copied().max_by(|x, y| x.1.total_cmp(&y.1)).expect("at least one window")
}

pub(crate) async fn publish(a: Args) -> Result<Scenario, BenchError> {
    let broker = broker(0).await?;
    let port = broker.port();
    let rates = WindowRates::measure(port, &a, sweep(&a)).await?;
    eprintln!("publish: latency runs");
    let mut latency = Latencies::measure(port, &a).await?;
    let mut rows = rates.rows(&a);
    rows.extend(latency.rows(&a));
    Ok(Scenario {
        name: "publish",
        title: title(&a, &rates.windows),
        ratio_to:
            "rates: bare rumqttc with the same MQTT version and window, same run; latency: p50 over rumqttc's p50"
                .into(),
        rows,
        notes: rates.notes().into_iter().chain(latency.notes(&a)).collect(),
        latencies: vec![
            ("steadfast, durable, MQTT 5".into(), latency.steadfast.total),
            ("bare rumqttc, MQTT 5".into(), latency.rumqttc),
        ],
    })
}

/// Messages of the paced latency runs.
fn latency_messages(a: &Args) -> usize {
    a.messages.min(20_000)
}

fn title(a: &Args, windows: &[u16]) -> String {
    let list = windows.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    format!(
        "{} QoS 1 messages of {} bytes to Mosquitto (no receive maximum announced), in-flight window {} for every client, and each client at its best of {list}; {} runs, median rate; latency: {} messages paced at {} msg/s, enqueue to acknowledgement",
        a.messages,
        a.payload,
        a.inflight,
        a.runs,
        latency_messages(a),
        a.rate
    )
}

/// Every client's median rate at every window of the sweep, and its peak
/// RSS at the common window (`a.inflight`).
struct WindowRates {
    windows: Vec<u16>,
    /// The window every client is measured at (`a.inflight`).
    common: u16,
    /// By client (in `Publisher::ALL` order): (window, median msg/s).
    medians: Vec<Vec<(u16, f64)>>,
    /// By client: peak RSS, bytes.
    rss: [u64; Publisher::ALL.len()],
    /// By client: CPU per message at the common window, median of the runs.
    cpu: Vec<Option<Cpu>>,
}

impl WindowRates {
    /// Runs every client at every window, `a.runs` times: every window and
    /// client in each run, so a busy spell of the machine spreads over all
    /// of them.
    async fn measure(port: u16, a: &Args, windows: Vec<u16>) -> Result<WindowRates, BenchError> {
        // rates[client][window] over the runs.
        let mut rates = vec![vec![Vec::new(); windows.len()]; Publisher::ALL.len()];
        let mut rss = [0u64; Publisher::ALL.len()];
        let mut cpu = vec![Vec::new(); Publisher::ALL.len()];
        for run in 0..a.runs {
            for (wi, &w) in windows.iter().enumerate() {
                eprintln!("publish: run {}/{}, window {w}", run + 1, a.runs);
                for (ci, p) in Publisher::ALL.iter().enumerate() {
                    let peak = RssPeak::start();
                    let took = p.run(port, a, run, w).await;
                    let peak = peak.stop();
                    let took = took?;
                    rates[ci][wi].push(rate(a.messages, took.elapsed));
                    if w == a.inflight {
                        rss[ci] = rss[ci].max(peak);
                        cpu[ci].push(took.cpu);
                    }
                }
            }
        }
        // The CPU figures of the run with the median rate at the common
        // window.
        let common = windows.iter().position(|w| *w == a.inflight).expect("the sweep holds the common window");
        let cpu = rates.iter().zip(&cpu).map(|(by_w, cpu)| median_run(&by_w[common], cpu).1).collect();
        let medians =
            rates.into_iter().map(|by_w| windows.iter().copied().zip(by_w.into_iter().map(median)).collect()).collect();
        Ok(WindowRates { windows, common: a.inflight, medians, rss, cpu })
    }

    fn of(&self, p: Publisher) -> &[(u16, f64)] {
        &self.medians[p.index()]
    }

    /// The median rate of `p` at window `w`.
    fn at(&self, p: Publisher, w: u16) -> f64 {
        self.of(p).iter().find(|(x, _)| *x == w).expect("measured").1
    }

    /// A row per client at the common window, then (with several windows)
    /// a row per client at its best window.
    fn rows(&self, a: &Args) -> Vec<Row> {
        let common = Publisher::ALL.iter().map(|&p| {
            let cpu = self.cpu[p.index()];
            Row {
                name: p.name().into(),
                rate: Some(self.at(p, a.inflight)),
                rss_mib: (p != Publisher::MosquittoPub).then(|| mib(self.rss[p.index()])),
                ratio: Some(self.at(p, a.inflight) / self.at(p.baseline(), a.inflight)),
                baseline: p == p.baseline(),
                window: Some(a.inflight),
                cpu,
                cpu_max: cpu.map(|c| c.max_ratio(self.at(p.baseline(), a.inflight))),
                par_max: (p != p.baseline())
                    .then(|| at_par(cpu, self.cpu[p.baseline().index()], self.at(p.baseline(), a.inflight)))
                    .flatten(),
                ..Row::default()
            }
        });
        let mut rows: Vec<Row> = common.collect();
        if self.windows.len() > 1 {
            rows.extend(Publisher::ALL.iter().map(|&p| {
                let (w, r) = best(self.of(p));
                Row {
                    name: format!("best window: {}", p.short()),
                    rate: Some(r),
                    ratio: Some(r / best(self.of(p.baseline())).1),
                    baseline: p == p.baseline(),
                    window: Some(w),
                    ..Row::default()
                }
            }));
        }
        rows
    }

    /// How the rates were taken, and every client's rate by window.
    fn notes(&self) -> Vec<String> {
        let mut notes = vec![
            "rates: rumqttc from its first publish call (connect included) to its last PUBACK; steadfast from its first enqueue to an empty outbox (every message synced to disk before it is sent); mosquitto_pub the whole process".to_owned(),
            "\"best window\" rows: each client at the window that gave it the highest median; ratio: best over the best of rumqttc with the same MQTT version".into(),
        ];
        let (id, v5) = (Publisher::Rumqttc5Id, Publisher::Steadfast5);
        notes.push(format!(
            "MQTT 5 against a client that carries the same identity (G5's user property, which the broker parses and keeps with every message): steadfast over bare rumqttc 5 with the property {:.2} at window {}, {:.2} each at its best window; the property alone takes bare rumqttc 5 to {:.2} of its rate",
            self.at(v5, self.common) / self.at(id, self.common),
            self.common,
            best(self.of(v5)).1 / best(self.of(id)).1,
            self.at(id, self.common) / self.at(Publisher::Rumqttc5, self.common),
        ));
        for (p, by_w) in Publisher::ALL.iter().zip(&self.medians) {
            let each = by_w.iter().map(|(w, r)| format!("{w}: {r:.0}")).collect::<Vec<_>>().join(", ");
            notes.push(format!("msg/s by window, {}: {each}", p.short()));
        }
        notes
    }
}

/// The paced latency runs, milliseconds per message.
struct Latencies {
    steadfast: SteadfastLatency,
    rumqttc: Vec<f64>,
    /// The disk alone at the same pace ([`PACED_DISK_BYTES`] appended and
    /// synced per message), milliseconds.
    disk: Vec<f64>,
}

/// What a paced message's commit adds to the outbox's log: three pages
/// (its row's, the summary row's, the id record's; docs/performance.md).
const PACED_DISK_BYTES: usize = 3 * 4096;
/// The most paced disk writes timed after the latency runs.
const PACED_DISK_SAMPLES: usize = 5_000;

impl Latencies {
    async fn measure(port: u16, a: &Args) -> Result<Latencies, BenchError> {
        let n = latency_messages(a);
        let steadfast = bounded("latency: steadfast", n, latency_steadfast(port, a, n)).await?;
        let rumqttc = bounded("latency: rumqttc", n, latency_rumqttc_v5(port, a, n)).await?;
        let (dir, rate, samples) = (a.outbox_dir.clone(), a.rate, n.min(PACED_DISK_SAMPLES));
        let disk = tokio::task::spawn_blocking(move || {
            crate::disk::paced_append_fsync(&dir, samples, rate, PACED_DISK_BYTES, std::time::Duration::from_secs(30))
        })
        .await
        .expect("the paced disk probe does not panic")
        .map_err(|error| crate::disk::OutboxDirError::Io { dir: a.outbox_dir.clone(), error })?;
        Ok(Latencies { steadfast, rumqttc, disk })
    }

    /// Where steadfast's latency goes, p50 and p99 of each part (the p99
    /// says which part the tail comes from), and the disk's own figures at
    /// the same pace.
    fn notes(&mut self, a: &Args) -> Vec<String> {
        let mut notes: Vec<String> = self.stages().into_iter().collect();
        let d = &mut self.disk;
        if let (Some(p50), Some(p99), Some(p999), Some(max)) =
            (percentile(d, 50.0), percentile(d, 99.0), percentile(d, 99.9), percentile(d, 100.0))
        {
            notes.push(format!(
                "the disk alone at the latency runs' pace: {} appends of {} KiB to a file in the outbox directory (what a message's commit adds to the log), each synced, {} per second: p50 {p50:.2} ms, p99 {p99:.2}, p99.9 {p999:.2}, max {max:.2}: the floor under publish to accepted, and through the acknowledgement's wait for the writer, under the whole",
                d.len(),
                PACED_DISK_BYTES / 1024,
                a.rate
            ));
        }
        notes
    }

    fn stages(&mut self) -> Option<String> {
        let s = &mut self.steadfast;
        let mut after: Vec<f64> = s.total.iter().zip(&s.accepted).map(|(t, a)| t - a).collect();
        let accepted = (percentile(&mut s.accepted, 50.0)?, percentile(&mut s.accepted, 99.0)?);
        let delivered = (percentile(&mut after, 50.0)?, percentile(&mut after, 99.0)?);
        let total = (percentile(&mut s.total, 50.0)?, percentile(&mut s.total, 99.0)?);
        let round_trip = s.round_trip.map_or("not measured".to_owned(), |rt| format!("{rt:.2} ms"));
        let pair = |(p50, p99): (f64, f64)| format!("{p50:.2} ms (p99 {p99:.2})");
        Some(format!(
            "latency stages, steadfast (p50 and p99 of each): publish to accepted (outbox commit and sync) {}; accepted to delivered {}, of which the round trip as the engine sees it (PUBLISH handed to the socket's writer task to PUBACK handled; its smoothed estimate at p50, median of readings every 500 messages) {round_trip}, the rest the page read by the outbox writer right after the commit and the hand-off to the link (delivery is told at the acknowledgement, before the removal's commit); total {}",
            pair(accepted),
            pair(delivered),
            pair(total)
        ))
    }

    /// rumqttc's row (the baseline), then steadfast's.
    fn rows(&mut self, a: &Args) -> [Row; 2] {
        let (p50, p99) = (percentile(&mut self.steadfast.total, 50.0), percentile(&mut self.steadfast.total, 99.0));
        [
            Row {
                name: format!("latency: bare rumqttc, MQTT 5, {} msg/s", a.rate),
                p50_ms: percentile(&mut self.rumqttc, 50.0),
                p99_ms: percentile(&mut self.rumqttc, 99.0),
                baseline: true,
                window: Some(a.inflight),
                ..Row::default()
            },
            Row {
                name: format!("latency: steadfast, durable (disk sync included), MQTT 5, {} msg/s", a.rate),
                p50_ms: p50,
                p99_ms: p99,
                ratio: p50.zip(percentile(&mut self.rumqttc, 50.0)).map(|(s, r)| s / r),
                window: Some(a.inflight),
                ..Row::default()
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_always_holds_the_common_window_once() {
        let a = Args { inflight: 300, windows: vec![4096, 64, 256, 64, 0], ..Args::default() };
        assert_eq!(sweep(&a), [64, 256, 300, 4096]);
        let a = Args { inflight: 256, windows: vec![], ..Args::default() };
        assert_eq!(sweep(&a), [256]);
        assert_eq!(sweep(&Args::default()), [64, 256, 1024, 4096]);
    }

    #[test]
    fn the_best_window_is_the_fastest() {
        assert_eq!(best(&[(64, 10.0), (256, 30.0), (1024, 20.0)]), (256, 30.0));
        assert_eq!(best(&[(64, 10.0)]), (64, 10.0));
    }

    #[test]
    fn every_client_is_compared_with_rumqttc_of_its_own_mqtt_version() {
        use Publisher::*;
        let pairs: Vec<_> = Publisher::ALL.iter().map(|p| (*p, p.baseline())).collect();
        assert_eq!(
            pairs,
            [
                (Rumqttc311, Rumqttc311),
                (Rumqttc5, Rumqttc5),
                (Rumqttc5Id, Rumqttc5),
                (MosquittoPub, Rumqttc311),
                (Steadfast311, Rumqttc311),
                (Steadfast5, Rumqttc5)
            ]
        );
    }
}
