//! What every scenario measures with: Mosquitto brokers, fresh state
//! directories, time limits on load loops, rates and medians, the RSS of
//! this process, and baseline-versus rows.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use steadfast::BrokerUrl;
use steadfast_lab::{Broker, BrokerKind, BrokerOptions};

use crate::{Args, BenchError, Row};

/// How long a load loop of `n` messages may take: a minute, plus 200 µs a
/// message (at least 5,000 msg/s beyond the first minute).
pub(crate) fn limit_for(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_micros(200 * n as u64)
}

/// Fails a load loop that is not done within [`limit_for`] (a lost
/// acknowledgement, a broker gone) instead of letting the bench hang.
pub(crate) async fn bounded<T>(
    what: &str,
    n: usize,
    f: impl Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    let limit = limit_for(n);
    let timed_out = || BenchError::TimedOut { what: format!("{what}: {n} messages"), limit };
    tokio::time::timeout(limit, f).await.map_err(|_| timed_out())?
}

/// A fresh directory under `--outbox-dir` for one outbox (or inbox, or
/// bridge state); removed when dropped.
pub(crate) fn state_dir(a: &Args) -> Result<tempfile::TempDir, BenchError> {
    tempfile::Builder::new()
        .prefix("steadfast-bench-")
        .tempdir_in(&a.outbox_dir)
        .map_err(|source| BenchError::StateDir { dir: a.outbox_dir.clone(), source })
}

/// A Mosquitto whose CONNACK announces no receive maximum (`0`), or
/// `window`: by default it announces its `max_inflight_messages` of 20,
/// which caps every MQTT 5 client at 20 whatever it asks for (MQTT 3.1.1
/// clients are not capped). Without a cap the client's own window holds.
/// The broker's window towards subscribers is the same figure.
pub(crate) async fn broker(window: u16) -> Result<Broker, BenchError> {
    let opts = BrokerOptions { extra: vec![format!("max_inflight_messages {window}")], ..BrokerOptions::default() };
    Ok(Broker::start(BrokerKind::Mosquitto, opts, None).await?)
}

pub(crate) fn url(port: u16) -> BrokerUrl {
    format!("mqtt://127.0.0.1:{port}").parse().expect("loopback URL")
}

/// One side of [`versus`]: its name, median msg/s, peak RSS and CPU.
pub(crate) type Side<'a> = (&'a str, f64, Option<u64>, Option<Cpu>);

/// A baseline row and the row measured against it, both with in-flight
/// window `window`.
pub(crate) fn versus(window: u16, base: Side, other: Side) -> Vec<Row> {
    let row = |(name, rate, rss, cpu): Side| Row {
        name: name.into(),
        rate: Some(rate),
        rss_mib: rss.map(mib),
        window: Some(window),
        cpu,
        cpu_max: cpu.map(|c| c.max_ratio(base.1)),
        ..Row::default()
    };
    let par_max = at_par(other.3, base.3, base.1);
    vec![Row { baseline: true, ..row(base) }, Row { ratio: Some(other.1 / base.1), par_max, ..row(other) }]
}

/// [`Cpu::par_ratio`] of a row's CPU against its baseline's (own CPU and
/// rate `baseline`), when both own figures are known.
pub(crate) fn at_par(cpu: Option<Cpu>, base: Option<Cpu>, baseline: f64) -> Option<f64> {
    cpu?.par_ratio(base?.own_us?, baseline)
}

/// CPU time spent on the whole machine (every process: brokers, clients,
/// this bench), by this process, and by the processes it started (its
/// children: brokers, the bridge, mosquitto_pub), counted from
/// `/proc/stat` and `/proc/PID/stat` between [`CpuMeter::start`] and
/// [`CpuMeter::stop`].
#[derive(Debug, Clone)]
struct CpuMeter {
    start: Option<Ticks>,
}

/// Clock ticks since boot: the machine's busy and total (all cores), this
/// process's user and system time, its children's (those still running,
/// by process id, and those it reaped), and how many cores.
#[derive(Debug, Clone)]
struct Ticks {
    busy: u64,
    total: u64,
    own: u64,
    reaped: u64,
    children: HashMap<u32, u64>,
    cores: usize,
}

/// A process's user and system time, and that of its children it reaped,
/// in clock ticks, and its parent: from `/proc/PID/stat`.
struct ProcTicks {
    parent: u32,
    own: u64,
    reaped: u64,
}

impl ProcTicks {
    fn read(pid: &str) -> Option<ProcTicks> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command may hold spaces: the fields count from its ')'
        // (state, parent, ..., user 14th, system, children's user, system).
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().take(15).collect();
        let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        Some(ProcTicks { parent: at(1)? as u32, own: at(11)? + at(12)?, reaped: at(13)? + at(14)? })
    }
}

/// The running children of process `me` and their ticks (a scan of
/// `/proc`: a few hundred entries).
fn children_of(me: u32) -> HashMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return HashMap::new() };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name().into_string().ok()?;
        let pid: u32 = name.parse().ok()?;
        let t = ProcTicks::read(&name)?;
        (t.parent == me).then_some((pid, t.own))
    })
    .collect()
}

impl Ticks {
    /// `None` where `/proc` cannot be read (not Linux): no CPU figures then.
    fn now() -> Option<Ticks> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let mut lines = stat.lines();
        // cpu  user nice system idle iowait irq softirq steal guest guest_nice
        let all: Vec<u64> = lines.next()?.split_whitespace().skip(1).take(8).filter_map(|v| v.parse().ok()).collect();
        if all.len() < 8 {
            return None;
        }
        let cores = lines.filter(|l| l.starts_with("cpu")).count().max(1);
        let total: u64 = all.iter().sum();
        // Work: user, nice, system, interrupts. Not idle, waiting for the
        // disk, or time the hypervisor gave to other machines (steal).
        let busy = all[0] + all[1] + all[2] + all[5] + all[6];
        let own = ProcTicks::read("self")?;
        let children = children_of(std::process::id());
        Some(Ticks { busy, total, own: own.own, reaped: own.reaped, children, cores })
    }

    /// The children's ticks since `start`: a child that started since
    /// counts whole; one reaped since counts through `reaped` (whole, from
    /// its start: a child ending inside a span started inside it here).
    /// Without `except`'s.
    fn children_since(&self, start: &Ticks, except: Option<u32>) -> u64 {
        let running: u64 = self
            .children
            .keys()
            .filter(|pid| Some(**pid) != except)
            .filter_map(|pid| self.child_since(start, *pid))
            .sum();
        running + self.reaped.saturating_sub(start.reaped)
    }

    /// The ticks of running child `pid` since `start` (whole if it started
    /// since); `None` when it is not running now.
    fn child_since(&self, start: &Ticks, pid: u32) -> Option<u64> {
        let now = self.children.get(&pid)?;
        Some(now.saturating_sub(start.children.get(&pid).copied().unwrap_or(0)))
    }
}

impl CpuMeter {
    fn start() -> CpuMeter {
        CpuMeter { start: Ticks::now() }
    }

    /// CPU per message over the `n` messages of the span since the start;
    /// with `client`, the measured client is that child process (its
    /// time is the row's own, and not among the children's).
    fn stop(self, n: usize, wall: Duration, client: Option<u32>) -> Option<Cpu> {
        let (a, b) = (self.start?, Ticks::now()?);
        let total = b.total.checked_sub(a.total).filter(|t| *t > 0)? as f64;
        // Ticks to seconds without the tick rate: the machine's ticks over
        // the span are `cores` seconds per second of wall time.
        let seconds = |ticks: u64| ticks as f64 / total * a.cores as f64 * wall.as_secs_f64();
        let n = n.max(1) as f64;
        let us = |ticks: u64| seconds(ticks) / n * 1e6;
        let own = match client {
            Some(pid) => b.child_since(&a, pid),
            None => Some(b.own.saturating_sub(a.own)),
        };
        // The children that ran through the span, the costliest first.
        let mut each: Vec<(u32, u64)> =
            b.children.keys().filter_map(|pid| Some((*pid, b.child_since(&a, *pid)?))).collect();
        each.sort_by_key(|(pid, ticks)| (std::cmp::Reverse(*ticks), *pid));
        let mut by_process = [None; BY_PROCESS];
        for (slot, (pid, ticks)) in by_process.iter_mut().zip(each) {
            *slot = Some((pid, us(ticks)));
        }
        Some(Cpu {
            machine_us: us(b.busy.saturating_sub(a.busy)),
            own_us: own.map(us),
            child_us: Some(us(b.children_since(&a, client))),
            busy: (b.busy.saturating_sub(a.busy)) as f64 / total,
            cores: a.cores,
            by_process,
        })
    }
}

/// How many child processes [`Cpu::by_process`] names.
const BY_PROCESS: usize = 4;

/// What a timed span cost in CPU, per message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cpu {
    /// Microseconds of CPU on the whole machine (brokers, clients, this
    /// bench, anything else running) per message.
    pub machine_us: f64,
    /// Of which the client measured: this process (the in-process clients
    /// and the bench), or the process of its own that it is (the bridge);
    /// `None` where that is not known (mosquitto_pub).
    pub own_us: Option<f64>,
    /// Of which the other processes this bench started (the brokers, and
    /// any client that is a process of its own and not `own_us`); the rest
    /// of `machine_us` is the kernel's own threads and interrupts, and
    /// anything else running.
    pub child_us: Option<f64>,
    /// The machine's cores in use over the span, as a share of all (1.0:
    /// every core busy all the time).
    pub busy: f64,
    /// Cores on the machine.
    pub cores: usize,
    /// The children still running at the span's end (the brokers, a
    /// bridge): process id and CPU per message over the span, the
    /// costliest first, up to four; the rest `None`.
    pub by_process: [Option<(u32, f64)>; BY_PROCESS],
}

impl Cpu {
    /// The highest rate the machine's cores allow at this CPU per message,
    /// over `baseline` msg/s: no row can go past it here without spending
    /// less CPU per message.
    pub fn max_ratio(&self, baseline: f64) -> f64 {
        self.cores as f64 / (self.machine_us * 1e-6) / baseline
    }

    /// [`Self::max_ratio`] were the client measured to spend no more CPU
    /// of its own per message than the baseline's client does
    /// (`base_own_us`): what the rest of the machine's work per message
    /// (brokers, the kernel) leaves it here. A target above it cannot be
    /// met on this machine by cutting the client's own work, only by
    /// making the rest cheaper.
    pub fn par_ratio(&self, base_own_us: f64, baseline: f64) -> Option<f64> {
        let rest = (self.machine_us - self.own_us?).max(0.0);
        Some(self.cores as f64 / ((rest + base_own_us) * 1e-6) / baseline)
    }

    /// Microseconds of CPU per message of child process `pid` (a broker),
    /// when it ran through the span.
    pub fn of_process(&self, pid: u32) -> Option<f64> {
        self.by_process.iter().flatten().find(|(p, _)| *p == pid).map(|(_, us)| *us)
    }

    /// The same without this process's share: the client measured ran as
    /// a process of its own, whose time this process does not see.
    pub(crate) fn without_own(self) -> Cpu {
        Cpu { own_us: None, ..self }
    }
}

/// Microseconds for a note under a table ("5.5"), or "-" where not known.
pub(crate) fn us_text(us: Option<f64>) -> String {
    us.map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"))
}

/// Process `pid`'s CPU per message in `cpu` ([`us_text`]): for the notes
/// that split a row's children by process.
pub(crate) fn process_us(cpu: Option<Cpu>, pid: Option<u32>) -> String {
    us_text(cpu.zip(pid).and_then(|(c, pid)| c.of_process(pid)))
}

/// The median rate of several runs, and the CPU figures of the run that
/// gave it (one run's, so that rate × CPU per message = busy × cores
/// holds within a row).
pub(crate) fn median_run(rates: &[f64], cpu: &[Option<Cpu>]) -> (f64, Option<Cpu>) {
    let mut order: Vec<usize> = (0..rates.len()).collect();
    order.sort_by(|x, y| rates[*x].total_cmp(&rates[*y]));
    let mid = order[order.len() / 2];
    (rates[mid], cpu.get(mid).copied().flatten())
}

/// How long a run took and what it cost in CPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Took {
    pub(crate) elapsed: Duration,
    pub(crate) cpu: Option<Cpu>,
}

/// Times a span of `n` messages: wall time and CPU.
#[derive(Debug, Clone)]
pub(crate) struct Span {
    t0: Instant,
    cpu: CpuMeter,
    n: usize,
}

impl Span {
    pub(crate) fn start(n: usize) -> Span {
        // The CPU reading first: its scan of `/proc` for the children takes
        // a few milliseconds, which must not count in the span's time.
        let cpu = CpuMeter::start();
        Span { t0: Instant::now(), cpu, n }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// The same span, its CPU per message over `n` messages instead.
    pub(crate) fn counting(self, n: usize) -> Span {
        Span { n, ..self }
    }

    pub(crate) fn stop(self) -> Took {
        let elapsed = self.t0.elapsed();
        Took { elapsed, cpu: self.cpu.stop(self.n, elapsed, None) }
    }

    /// Like [`Self::stop`] for a client that is a child process of its
    /// own, `pid`, still running: its time is the row's own.
    pub(crate) fn stop_for(self, pid: u32) -> Took {
        let elapsed = self.t0.elapsed();
        Took { elapsed, cpu: self.cpu.stop(self.n, elapsed, Some(pid)) }
    }
}

pub(crate) fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Resident set size of this process, in bytes.
pub(crate) fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kb.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// Samples the peak RSS every 50 ms until dropped.
pub(crate) struct RssPeak {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    pub(crate) fn start() -> RssPeak {
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss()));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                p.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssPeak { peak, task }
    }
    pub(crate) fn stop(self) -> u64 {
        self.task.abort();
        self.peak.load(std::sync::atomic::Ordering::Relaxed).max(rss())
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_done_in_this_process_is_counted_as_its_own_and_the_machines() {
        let span = Span::start(1_000);
        let start = Ticks::now().expect("/proc is readable on Linux");
        // Spins until this process has 30 clock ticks more CPU time (however
        // busy the machine), for at most a minute.
        let mut x = 0u64;
        while Ticks::now().expect("readable").own < start.own + 30 && span.elapsed() < Duration::from_secs(60) {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        let cpu = span.stop().cpu.expect("/proc is readable on Linux");
        assert!(cpu.cores >= 1);
        // 30 ticks (0.3 s at Linux's 100 per second) over 1,000 messages.
        let own = cpu.own_us.expect("in this process");
        assert!(own > 250.0, "own {own} µs");
        assert!(cpu.machine_us >= own * 0.9, "machine {} < own {own}", cpu.machine_us);
        assert!(cpu.busy > 0.0 && cpu.busy <= 1.0, "busy {}", cpu.busy);
    }

    #[test]
    fn the_ceiling_is_the_cores_over_the_cpu_per_message_over_the_baseline() {
        let cpu = Cpu {
            machine_us: 20.0,
            own_us: Some(10.0),
            child_us: Some(8.0),
            busy: 0.8,
            cores: 2,
            by_process: [None; BY_PROCESS],
        };
        // Two cores at 20 µs a message: 100,000 msg/s at most.
        assert!((cpu.max_ratio(50_000.0) - 2.0).abs() < 1e-9);
        assert!((cpu.max_ratio(100_000.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn at_par_the_client_spends_what_the_baseline_spends_of_its_own() {
        // 20 µs a message, 12 of them the client's: the rest is 8; at the
        // baseline's own 2 µs, 10 µs a message, so 200,000 msg/s on two
        // cores.
        let cpu = Cpu {
            machine_us: 20.0,
            own_us: Some(12.0),
            child_us: Some(6.0),
            busy: 0.9,
            cores: 2,
            by_process: [None; BY_PROCESS],
        };
        assert!((cpu.par_ratio(2.0, 100_000.0).expect("own known") - 2.0).abs() < 1e-9);
        assert_eq!(Cpu { own_us: None, ..cpu }.par_ratio(2.0, 100_000.0), None);
    }

    /// A child process's CPU time counts among the children's, or as the
    /// row's own when it is the client measured.
    #[test]
    fn a_child_process_counts_as_a_child_or_as_the_client() {
        // A busy loop of its own that ends by itself (30 million turns of
        // sh, about 20 s alone here); stopped once it has 30 clock ticks.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 30000000 ]; do i=$((i+1)); done"])
            .spawn()
            .expect("sh is there");
        let pid = child.id();
        let span = Span::start(1_000);
        let ticks = || children_of(std::process::id()).get(&pid).copied().unwrap_or(0);
        let first = ticks();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ticks() < first + 30 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (as_child, as_client) = (span.clone().stop().cpu, span.stop_for(pid).cpu);
        let _ = child.kill();
        let _ = child.wait();
        let (as_child, as_client) = (as_child.expect("/proc"), as_client.expect("/proc"));
        // 30 ticks (0.3 s) over 1,000 messages: 300 µs each.
        let (child_us, own_us) = (as_child.child_us.expect("counted"), as_child.own_us.expect("counted"));
        assert!(child_us > 250.0 && own_us < child_us, "child {child_us} µs, own {own_us} µs");
        let (child_us, own_us) = (as_client.child_us.expect("counted"), as_client.own_us.expect("counted"));
        assert!(own_us > 250.0 && child_us < own_us, "the loop as the client: own {own_us} µs, children {child_us} µs");
        // Named by process either way, with the same figure as the row's.
        let named = as_child.of_process(pid).expect("named");
        assert!(named > 250.0 && named <= as_child.child_us.expect("counted") + 1e-9, "the loop named: {named} µs");
        assert_eq!(as_client.of_process(pid), as_client.own_us);
    }

    #[test]
    fn the_cpu_figures_are_those_of_the_run_with_the_median_rate() {
        let c = |m: f64| {
            Some(Cpu {
                machine_us: m,
                own_us: Some(m / 2.0),
                child_us: Some(m / 4.0),
                busy: 0.5,
                cores: 2,
                by_process: [None; BY_PROCESS],
            })
        };
        let (rate, cpu) = median_run(&[300.0, 100.0, 200.0], &[c(3.0), c(1.0), c(2.0)]);
        assert_eq!((rate, cpu), (200.0, c(2.0)));
        // A run without figures (no /proc) gives none.
        assert_eq!(median_run(&[1.0, 2.0, 3.0], &[c(1.0), None, c(3.0)]), (2.0, None));
    }
}
