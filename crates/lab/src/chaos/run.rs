//! The runner: a seeded schedule of faults over a producer (`steadfast pub`
//! in fanout to two brokers, a child process), the brokers (each behind a
//! fault proxy) and a consumer (`steadfast sub` with an inbox), then a
//! verdict from both ends' logs: every accepted identity handled exactly
//! once, or the promise it broke.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use steadfast_store::{SqliteStore, Store};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::plan::{payload_for, Fault, FaultTally, Schedule, Verdict, CONSUMER_KILLED};
use crate::children::{current_exe, run_dir, Consumer};
use crate::launch::{Broker, BrokerKind, BrokerOptions};
use crate::proxy::{FaultProxy, ProxyMode};
use crate::LabError;

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The schedule's seed (`None`: a random one, printed).
    pub seed: Option<u64>,
    /// How long the schedule runs (then it drains); 20 s or more.
    pub length: Duration,
    /// Messages per second, above 0.
    pub rate: u32,
    /// Which brokers.
    pub brokers: BrokerKind,
    /// Copy the run's files here at the end.
    pub keep: Option<PathBuf>,
}

/// What a chaos run found.
#[derive(Debug, Clone)]
pub struct ChaosOutcome {
    /// The seed it ran (to run it again).
    pub seed: u64,
    /// What both ends' logs show.
    pub verdict: Verdict,
    /// Faults applied and skipped, by kind.
    pub tally: FaultTally,
}

/// Deliveries the consumer may have in flight per broker (its
/// `--max-inflight`): the most it can have printed and not yet recorded
/// when it is killed.
const INFLIGHT: usize = 64;

/// The producer: `steadfast pub -l`, fed lines through a pipe.
struct Producer {
    args: Vec<String>,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    stdin: Option<tokio::process::ChildStdin>,
}

impl Producer {
    fn start(&mut self) -> Result<(), LabError> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.log).map_err(LabError::io(&self.log))?;
        let mut child = tokio::process::Command::new(current_exe()?)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LabError::Spawn { what: "the producer".into(), source })?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        Ok(())
    }

    async fn kill9(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// One line, if the producer takes it within 50 ms (a producer that
    /// is down or blocked takes nothing: the line was never accepted).
    async fn feed(&mut self, line: &str) -> bool {
        let Some(stdin) = self.stdin.as_mut() else { return false };
        matches!(tokio::time::timeout(Duration::from_millis(50), stdin.write_all(line.as_bytes())).await, Ok(Ok(())))
    }
}

/// Something to undo at a time: a fault's end.
enum Heal {
    Broker(usize),
    Proxy(usize),
    Producer,
    Consumer,
}

/// The producer's identity and how many messages it accepted so far.
fn accepted(outbox: &Path) -> Option<(String, u64)> {
    let mut store = SqliteStore::open_read_only(outbox).ok()?;
    let producer = store.meta("producer").ok()??;
    Some((producer, store.last_id().ok()?))
}

/// Sequence numbers the producer dropped by its policy: its drop log
/// (an outbox id is the sequence number of the identity it carries).
fn dropped(outbox: &Path) -> Result<HashSet<u64>, LabError> {
    let log = SqliteStore::open_read_only(outbox).and_then(|mut s| s.drop_log())?;
    Ok(log.into_iter().map(|(id, _)| id).collect())
}

/// Sequence numbers of `producer` the consumer printed (`identity payload`).
fn handled(out: &Path, producer: &str) -> HashSet<u64> {
    let prefix = format!("{producer}/");
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).and_then(|s| s.split(' ').next()?.parse().ok()))
        .collect()
}

/// True when the consumer handled every message up to `upto`.
fn caught_up(out: &Path, producer: &str, upto: u64) -> bool {
    let seen = handled(out, producer);
    (1..=upto).all(|s| seen.contains(&s))
}

/// Runs the schedule, printing what it does; the outcome holds the verdict.
pub async fn run(a: ChaosOptions) -> Result<ChaosOutcome, LabError> {
    if a.length < Duration::from_secs(20) || a.rate == 0 {
        return Err(LabError::TooShort { what: "the run", min_seconds: 20 });
    }
    let seed = a.seed.unwrap_or_else(|| fastrand::u64(..));
    let schedule = Schedule::generate(seed, a.length, 2, a.brokers == BrokerKind::Mosquitto);
    let tmp = run_dir("chaos")?;
    println!(
        "steadfast chaos: seed {seed} (run it again with --seed {seed}), {} s at {} msg/s; two {} brokers behind fault proxies; a producer in fanout (ack = all); a consumer with an inbox",
        a.length.as_secs(),
        a.rate,
        a.brokers.name()
    );
    print!("{schedule}");
    let mut rig = Rig::start(a.brokers, tmp.path()).await?;
    let (sent, tally) = rig.play(&schedule, a.length, a.rate).await?;
    rig.heal_all().await?;
    println!("{:>6.1}s  end of the schedule; draining", a.length.as_secs_f64());
    println!("{tally}");
    let verdict = rig.verdict(sent).await?;
    if let Some(keep) = &a.keep {
        copy_dir(tmp.path(), keep).map_err(LabError::io(keep))?;
        println!("the run's files are kept in {}", keep.display());
    }
    Ok(ChaosOutcome { seed, verdict, tally })
}

/// The processes of a run and the faults that wait to be undone.
struct Rig {
    brokers: [Broker; 2],
    proxies: [FaultProxy; 2],
    producer: Producer,
    consumer: Consumer,
    /// The consumer's output: one `identity payload` line per handling.
    out: PathBuf,
    /// The producer's outbox.
    outbox: PathBuf,
    heals: Vec<(Instant, Heal)>,
    /// When a broker last came back (a broker kill waits a while after).
    last_restart: Instant,
}

impl Rig {
    /// Two brokers behind their proxies, the consumer registered and
    /// started, the producer started; all under `root`.
    async fn start(kind: BrokerKind, root: &Path) -> Result<Rig, LabError> {
        // Mosquitto with persistence (saved every second) until the
        // schedule restarts it without.
        let opts = BrokerOptions { persistence: true, autosave_secs: Some(1), extra: vec![] };
        let brokers =
            [Broker::start(kind, opts.clone(), Some(root)).await?, Broker::start(kind, opts, Some(root)).await?];
        let proxies = [
            FaultProxy::start(brokers[0].port()).await.map_err(LabError::NoPort)?,
            FaultProxy::start(brokers[1].port()).await.map_err(LabError::NoPort)?,
        ];
        let urls: Vec<String> = proxies.iter().map(|p| p.url()).collect();
        let (out, outbox) = (root.join("consumer.out"), root.join("outbox"));
        let mut consumer = Consumer {
            args: ["sub", "-b", &urls[0], "-b", &urls[1], "-t", "chaos/#", "-i", "chaos-consumer", "-F", "%I %p"]
                .iter()
                .map(|s| s.to_string())
                .chain(["--inbox".into(), root.join("inbox").display().to_string()])
                .chain(["--backoff", "50ms..500ms", "--max-inflight", &INFLIGHT.to_string()].map(String::from))
                .collect(),
            out: out.clone(),
            child: None,
        };
        consumer.register()?;
        consumer.start()?;
        let mut producer = Producer {
            args: ["pub", "-b", &urls[0], "-b", &urls[1], "--mode", "fanout", "--ack", "all", "-t", "chaos/p", "-l"]
                .iter()
                .map(|s| s.to_string())
                .chain(
                    ["-q", "1", "-i", "chaos-producer", "--backoff", "50ms..500ms", "--ack-timeout", "2s"]
                        .map(String::from),
                )
                .chain(["--wait-timeout".into(), "120".into(), "--outbox".into(), outbox.display().to_string()])
                .collect(),
            log: root.join("producer.log"),
            child: None,
            stdin: None,
        };
        producer.start()?;
        let last_restart = Instant::now() - Duration::from_secs(60);
        Ok(Rig { brokers, proxies, producer, consumer, out, outbox, heals: Vec::new(), last_restart })
    }

    /// Feeds the producer at `rate` and applies the schedule for `length`:
    /// the lines fed, and what was applied and skipped.
    async fn play(&mut self, schedule: &Schedule, length: Duration, rate: u32) -> Result<(u64, FaultTally), LabError> {
        let start = Instant::now();
        let mut steps = schedule.steps.iter().peekable();
        let mut gate = Gate::default();
        let (mut sent, mut tally) = (0u64, FaultTally::default());
        let mut next_report = Duration::from_secs(5);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while start.elapsed() < length {
            tick.tick().await;
            let now = Instant::now();
            let t = now - start;
            let due = (t.as_secs_f64() * rate as f64) as u64;
            while sent < due {
                sent += 1;
                self.producer.feed(&format!("{}\n", payload_for(sent))).await;
            }
            self.heal_due(now).await?;
            if t >= next_report {
                next_report += Duration::from_secs(5);
                report(t, sent, &self.outbox, &self.out).await;
            }
            let Some(step) = steps.peek().filter(|s| t >= s.at) else { continue };
            let fault = step.fault;
            if let Fault::KillBroker { .. } = fault {
                match gate.check(self, now).await {
                    Gated::Wait => continue,
                    Gated::Open => {}
                    Gated::GaveUp => {
                        let at = t.as_secs_f64();
                        println!("{at:>6.1}s  skipped: {fault} (the consumer had not caught up within 20 s)");
                        tally.skipped(&fault);
                        steps.next();
                        continue;
                    }
                }
            }
            steps.next();
            if self.apply(fault, now + fault.lasting()).await? {
                tally.applied(&fault);
                println!("{:>6.1}s  {fault}", t.as_secs_f64());
            } else {
                tally.skipped(&fault);
                println!("{:>6.1}s  skipped: {fault} (it was already down)", t.as_secs_f64());
            }
        }
        Ok((sent, tally))
    }

    /// Applies a fault, to be undone at `until`; false when its target was
    /// already down (nothing done).
    async fn apply(&mut self, fault: Fault, until: Instant) -> Result<bool, LabError> {
        let mut proxy = |broker: usize, mode: ProxyMode| {
            self.proxies[broker].set(mode);
            self.heals.push((until, Heal::Proxy(broker)));
            true
        };
        Ok(match fault {
            Fault::BlackHole { broker, .. } => proxy(broker, ProxyMode::BlackHole),
            Fault::Latency { broker, delay, .. } => proxy(broker, ProxyMode::Latency(delay)),
            Fault::Bandwidth { broker, bytes_per_sec, .. } => proxy(broker, ProxyMode::Bandwidth(bytes_per_sec)),
            Fault::Reset { broker } => {
                self.proxies[broker].reset_connections();
                true
            }
            Fault::KillBroker { broker, persistence, .. } => {
                self.brokers[broker].kill9();
                self.brokers[broker].set_persistence(persistence);
                self.heals.push((until, Heal::Broker(broker)));
                true
            }
            Fault::KillProducer { .. } => {
                let up = self.producer.child.is_some();
                if up {
                    self.producer.kill9().await;
                    self.heals.push((until, Heal::Producer));
                }
                up
            }
            Fault::KillConsumer { .. } => {
                let up = self.consumer.child.is_some();
                if up {
                    self.consumer.kill9();
                    append_line(&self.out, CONSUMER_KILLED)?;
                    self.heals.push((until, Heal::Consumer));
                }
                up
            }
        })
    }

    /// Undoes the faults whose time has come.
    async fn heal_due(&mut self, now: Instant) -> Result<(), LabError> {
        let mut i = 0;
        while i < self.heals.len() {
            if self.heals[i].0 <= now {
                let (_, heal) = self.heals.swap_remove(i);
                self.heal(heal).await?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Undoes every fault still in force: the end of the schedule.
    async fn heal_all(&mut self) -> Result<(), LabError> {
        for (_, heal) in std::mem::take(&mut self.heals) {
            self.heal(heal).await?;
        }
        Ok(())
    }

    async fn heal(&mut self, heal: Heal) -> Result<(), LabError> {
        match heal {
            Heal::Broker(b) => {
                self.brokers[b].spawn().await?;
                self.last_restart = Instant::now();
            }
            Heal::Proxy(b) => self.proxies[b].set(ProxyMode::Pass),
            Heal::Producer => self.producer.start()?,
            Heal::Consumer => self.consumer.start()?,
        }
        Ok(())
    }

    /// A broker is down, or came back less than 3 s ago.
    fn broker_down(&self, now: Instant) -> bool {
        self.heals.iter().any(|(_, h)| matches!(h, Heal::Broker(_))) || now - self.last_restart < Duration::from_secs(3)
    }

    /// The end: the producer's input closed, it exits once its outbox is
    /// empty (this run's messages and any an earlier incarnation left);
    /// then the consumer has a minute to catch up, and both ends' records
    /// are compared.
    async fn verdict(&mut self, sent: u64) -> Result<Verdict, LabError> {
        self.producer.stdin = None;
        let drained = match self.producer.child.as_mut() {
            Some(c) => tokio::time::timeout(Duration::from_secs(120), c.wait()).await.ok().and_then(|r| r.ok()),
            None => None,
        };
        if !drained.is_some_and(|s| s.success()) {
            self.producer.kill9().await;
            let log = self.producer.log.display();
            println!("the producer did not finish delivering (see {log}): what it holds counts as missing");
        }
        let Some((producer_id, last)) = accepted(&self.outbox) else {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidData, "the producer's outbox cannot be read");
            return Err(LabError::Io { path: self.outbox.clone(), source });
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !caught_up(&self.out, &producer_id, last) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.consumer.kill9();
        let log = std::fs::read_to_string(&self.out).unwrap_or_default();
        let verdict = Verdict::check(&producer_id, last, &dropped(&self.outbox)?, &log, 2 * INFLIGHT);
        println!(
            "checked: {sent} lines fed, {last} accepted by the producer (identities {producer_id}/1..{last}, from its outbox), looked up with their payloads in the consumer's output ({}); a message not handled is excused only by its own entry in the producer's drop log; order is not promised across the two brokers of a fanout, so it is reported, not required",
            self.out.display()
        );
        println!("verdict: {verdict}");
        Ok(verdict)
    }
}

/// What the broker-kill gate says.
enum Gated {
    /// Not yet: look again later.
    Wait,
    /// Kill it now.
    Open,
    /// It did not open within 20 s: skip this kill.
    GaveUp,
}

/// A broker kill waits until the consumer has everything accepted so far
/// and no broker is down: with ack = all, the other broker then holds
/// whatever the killed one had not delivered. A broker that came back
/// empty must have its consumer session again (the consumer resubscribes
/// within its 500 ms backoff) before the other one may go: until then what
/// the restarted one took went nowhere, and only the other holds it.
#[derive(Default)]
struct Gate {
    /// Since when it waits, and the catch-up point (the producer's last
    /// id when the wait began).
    pending: Option<(Instant, u64)>,
    next_check: Option<Instant>,
}

impl Gate {
    async fn check(&mut self, rig: &Rig, now: Instant) -> Gated {
        let broker_down = rig.broker_down(now);
        // The catch-up point must be taken after the last restart.
        if self.pending.is_some_and(|(since, _)| since < rig.last_restart + Duration::from_secs(3)) {
            self.pending = None;
        }
        // Checked every 250 ms, not at every 10 ms tick: one read of the
        // producer's outbox (its id, and the catch-up point when none is
        // set) and, unless a broker is down, of the output.
        if self.next_check.is_some_and(|at| now < at) {
            return Gated::Wait;
        }
        self.next_check = Some(now + Duration::from_millis(250));
        let (o, c, pending) = (rig.outbox.clone(), rig.out.clone(), self.pending.map(|(_, upto)| upto));
        let read = tokio::task::spawn_blocking(move || {
            let (producer, last) = accepted(&o)?;
            let upto = pending.unwrap_or(last);
            Some((upto, !broker_down && caught_up(&c, &producer, upto)))
        })
        .await
        .ok()
        .flatten();
        let (since, _) = *self.pending.get_or_insert((now, read.map_or(0, |(upto, _)| upto)));
        if read.is_some_and(|(_, caught)| caught) {
            self.pending = None;
            Gated::Open
        } else if now - since > Duration::from_secs(20) {
            self.pending = None;
            Gated::GaveUp
        } else {
            Gated::Wait
        }
    }
}

async fn report(t: Duration, sent: u64, outbox: &Path, out: &Path) {
    let (o, c) = (outbox.to_owned(), out.to_owned());
    let line = tokio::task::spawn_blocking(move || {
        let (producer, last) = accepted(&o).unwrap_or_default();
        let seen = handled(&c, &producer).len();
        format!("{sent} fed, {last} accepted, {seen} handled")
    })
    .await
    .unwrap_or_default();
    println!("{:>6.1}s  ({line})", t.as_secs_f64());
}

fn append_line(path: &Path, line: &str) -> Result<(), LabError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(LabError::io(path))?;
    writeln!(f, "{line}").map_err(LabError::io(path))
}

/// Copies the files of a run (logs, stores) for a look afterwards.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
