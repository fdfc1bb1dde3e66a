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
    let (kind, length) = (a.brokers, a.length);
    if length < Duration::from_secs(20) || a.rate == 0 {
        return Err(LabError::TooShort { what: "the run", min_seconds: 20 });
    }
    let seed = a.seed.unwrap_or_else(|| fastrand::u64(..));
    let schedule = Schedule::generate(seed, length, 2, kind == BrokerKind::Mosquitto);
    let tmp = run_dir("chaos")?;
    let root = tmp.path().to_owned();
    println!(
        "steadfast chaos: seed {seed} (run it again with --seed {seed}), {} s at {} msg/s; two {} brokers behind fault proxies; a producer in fanout (ack = all); a consumer with an inbox",
        length.as_secs(),
        a.rate,
        kind.name()
    );
    print!("{schedule}");

    // Mosquitto with persistence (saved every second) until the schedule
    // restarts it without.
    let opts = BrokerOptions { persistence: true, autosave_secs: Some(1), extra: vec![] };
    let mut brokers =
        [Broker::start(kind, opts.clone(), Some(&root)).await?, Broker::start(kind, opts, Some(&root)).await?];
    let proxies = [
        FaultProxy::start(brokers[0].port()).await.map_err(LabError::NoPort)?,
        FaultProxy::start(brokers[1].port()).await.map_err(LabError::NoPort)?,
    ];
    let urls: Vec<String> = proxies.iter().map(|p| p.url()).collect();
    let inbox = root.join("inbox");
    let out = root.join("consumer.out");
    let outbox = root.join("outbox");
    let mut consumer = Consumer {
        args: ["sub", "-b", &urls[0], "-b", &urls[1], "-t", "chaos/#", "-i", "chaos-consumer", "-F", "%I %p"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--inbox".into(), inbox.display().to_string()])
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

    let start = Instant::now();
    let mut next_step = 0;
    let mut heals: Vec<(Instant, Heal)> = Vec::new();
    // A broker kill waits until the consumer has everything accepted so
    // far and no broker is down: with ack = all, the other broker then
    // holds whatever the killed one had not delivered.
    let mut gate: Option<(Instant, u64)> = None;
    // A broker that came back empty must have its consumer session again
    // (the consumer resubscribes within its 500 ms backoff) before the
    // other one may go: until then what the restarted one took went
    // nowhere, and only the other holds it.
    let mut last_restart = start - Duration::from_secs(60);
    let mut next_gate_check = start;
    let mut sent = 0u64;
    let mut tally = FaultTally::default();
    let mut next_report = Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < length {
        tick.tick().await;
        let now = Instant::now();
        let t = now - start;
        let due = (t.as_secs_f64() * a.rate as f64) as u64;
        while sent < due {
            sent += 1;
            producer.feed(&format!("{}\n", payload_for(sent))).await;
        }
        let mut i = 0;
        while i < heals.len() {
            if heals[i].0 <= now {
                let (_, heal) = heals.swap_remove(i);
                match heal {
                    Heal::Broker(b) => {
                        brokers[b].spawn().await?;
                        last_restart = Instant::now();
                    }
                    Heal::Proxy(b) => proxies[b].set(ProxyMode::Pass),
                    Heal::Producer => producer.start()?,
                    Heal::Consumer => consumer.start()?,
                }
            } else {
                i += 1;
            }
        }
        if t >= next_report {
            next_report += Duration::from_secs(5);
            report(t, sent, &outbox, &out).await;
        }
        let Some(step) = schedule.steps.get(next_step) else { continue };
        if t < step.at {
            continue;
        }
        let fault = step.fault;
        if let Fault::KillBroker { .. } = fault {
            let broker_down =
                heals.iter().any(|(_, h)| matches!(h, Heal::Broker(_))) || now - last_restart < Duration::from_secs(3);
            // The catch-up point must be taken after the last restart.
            if gate.is_some_and(|(since, _)| since < last_restart + Duration::from_secs(3)) {
                gate = None;
            }
            // Checked every 250 ms, not at every 10 ms tick: one read of
            // the producer's outbox (its id, and the catch-up point when
            // none is set) and, unless a broker is down, of the output.
            if now < next_gate_check {
                continue;
            }
            next_gate_check = now + Duration::from_millis(250);
            let (o, c, pending) = (outbox.clone(), out.clone(), gate.map(|(_, upto)| upto));
            let read = tokio::task::spawn_blocking(move || {
                let (producer, last) = accepted(&o)?;
                let upto = pending.unwrap_or(last);
                Some((upto, !broker_down && caught_up(&c, &producer, upto)))
            })
            .await
            .ok()
            .flatten();
            if gate.is_none() {
                gate = Some((now, read.map_or(0, |(upto, _)| upto)));
            }
            let settled = read.is_some_and(|(_, caught)| caught);
            if !settled {
                if gate.is_some_and(|(since, _)| now - since > Duration::from_secs(20)) {
                    println!(
                        "{:>6.1}s  skipped: {fault} (the consumer had not caught up within 20 s)",
                        t.as_secs_f64()
                    );
                    tally.skipped(&fault);
                    next_step += 1;
                    gate = None;
                }
                continue;
            }
            gate = None;
        }
        next_step += 1;
        let until = now + fault.lasting();
        let applied = match fault {
            Fault::KillBroker { broker, persistence, .. } => {
                brokers[broker].kill9();
                brokers[broker].set_persistence(persistence);
                heals.push((until, Heal::Broker(broker)));
                true
            }
            Fault::Reset { broker } => {
                proxies[broker].reset_connections();
                true
            }
            Fault::BlackHole { broker, .. } => {
                proxy_fault(&proxies[broker], ProxyMode::BlackHole, until, broker, &mut heals)
            }
            Fault::Latency { broker, delay, .. } => {
                proxy_fault(&proxies[broker], ProxyMode::Latency(delay), until, broker, &mut heals)
            }
            Fault::Bandwidth { broker, bytes_per_sec, .. } => {
                proxy_fault(&proxies[broker], ProxyMode::Bandwidth(bytes_per_sec), until, broker, &mut heals)
            }
            Fault::KillProducer { .. } => {
                let up = producer.child.is_some();
                if up {
                    producer.kill9().await;
                    heals.push((until, Heal::Producer));
                }
                up
            }
            Fault::KillConsumer { .. } => {
                let up = consumer.child.is_some();
                if up {
                    consumer.kill9();
                    append_line(&out, CONSUMER_KILLED)?;
                    heals.push((until, Heal::Consumer));
                }
                up
            }
        };
        if applied {
            tally.applied(&fault);
            println!("{:>6.1}s  {fault}", t.as_secs_f64());
        } else {
            tally.skipped(&fault);
            println!("{:>6.1}s  skipped: {fault} (it was already down)", t.as_secs_f64());
        }
    }

    // The end: everything back up, the producer's input closed; it exits
    // once its outbox is empty (this run's messages and any an earlier
    // incarnation left).
    for (_, heal) in heals.drain(..) {
        match heal {
            Heal::Broker(b) => brokers[b].spawn().await?,
            Heal::Proxy(b) => proxies[b].set(ProxyMode::Pass),
            Heal::Producer => producer.start()?,
            Heal::Consumer => consumer.start()?,
        }
    }
    println!("{:>6.1}s  end of the schedule; draining", start.elapsed().as_secs_f64());
    println!("{tally}");
    producer.stdin = None;
    let drained = match producer.child.as_mut() {
        Some(c) => tokio::time::timeout(Duration::from_secs(120), c.wait()).await.ok().and_then(|r| r.ok()),
        None => None,
    };
    if !drained.is_some_and(|s| s.success()) {
        producer.kill9().await;
        println!(
            "the producer did not finish delivering (see {}): what it holds counts as missing",
            producer.log.display()
        );
    }
    let Some((producer_id, last)) = accepted(&outbox) else {
        let source = std::io::Error::new(std::io::ErrorKind::InvalidData, "the producer's outbox cannot be read");
        return Err(LabError::Io { path: outbox, source });
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !caught_up(&out, &producer_id, last) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.kill9();
    let log = std::fs::read_to_string(&out).unwrap_or_default();
    let verdict = Verdict::check(&producer_id, last, &dropped(&outbox)?, &log, 2 * INFLIGHT);
    println!(
        "checked: {} lines fed, {} accepted by the producer (identities {producer_id}/1..{last}, from its outbox), looked up with their payloads in the consumer's output ({}); a message not handled is excused only by its own entry in the producer's drop log; order is not promised across the two brokers of a fanout, so it is reported, not required",
        sent,
        last,
        out.display()
    );
    println!("verdict: {verdict}");
    if let Some(keep) = &a.keep {
        copy_dir(&root, keep).map_err(LabError::io(keep))?;
        println!("the run's files are kept in {}", keep.display());
    }
    Ok(ChaosOutcome { seed, verdict, tally })
}

/// Sets a proxy fault, healed at `until`.
fn proxy_fault(
    proxy: &FaultProxy,
    mode: ProxyMode,
    until: Instant,
    broker: usize,
    heals: &mut Vec<(Instant, Heal)>,
) -> bool {
    proxy.set(mode);
    heals.push((until, Heal::Proxy(broker)));
    true
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
