//! `steadfast demo`: a producer publishing in fanout to two brokers, a
//! consumer with an inbox on both, and a schedule of faults — `kill -9` of
//! a broker, of the consumer, a broker restart — with a live table and a
//! verdict that says how many accepted messages were lost and how that was
//! checked. Everything on 127.0.0.1, in a temporary directory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use steadfast::{AckQuorum, BackoffConfig, BrokerSet, BrokerUrl, Client, ClientConfig, Message, Mode, Qos};
use steadfast_store::AcceptFuture;

use crate::children::{duplicates_removed, handled, run_dir, Consumer};
use crate::launch::{Broker, BrokerKind, BrokerOptions};
use crate::LabError;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long, in seconds (publishing for two thirds of it); 20 or more.
    pub seconds: u64,
    /// Messages per second, above 0.
    pub rate: u32,
    /// Which brokers.
    pub brokers: BrokerKind,
}

/// What the demo found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoOutcome {
    /// Accepted identities the consumer never handled.
    pub lost: Vec<String>,
    /// Identities handled more than once.
    pub twice: usize,
}

/// Runs the demo, printing its table; the outcome says what was lost.
pub async fn run(a: DemoOptions) -> Result<DemoOutcome, LabError> {
    if a.seconds < 20 || a.rate == 0 {
        return Err(LabError::TooShort { what: "the demo", min_seconds: 20 });
    }
    let tmp = run_dir("demo")?;
    let mut demo = Demo::start(a.brokers, tmp.path()).await?;
    demo.introduce(&a);
    print_header();
    demo.publish(a.rate, Duration::from_secs(a.seconds * 2 / 3)).await?;
    let want = demo.wanted();
    demo.drain(&want, Duration::from_secs(a.seconds)).await;
    Ok(demo.verdict(&want).await)
}

/// The faults, in the order the schedule plays them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillA,
    RestartA,
    KillConsumer,
    RestartConsumer,
    KillB,
    RestartB,
}

/// The schedule, as fractions of the publishing time.
const SCHEDULE: [(f64, Fault); 6] = [
    (0.15, Fault::KillA),
    (0.35, Fault::RestartA),
    (0.45, Fault::KillConsumer),
    (0.55, Fault::RestartConsumer),
    (0.65, Fault::KillB),
    (0.85, Fault::RestartB),
];

impl Fault {
    /// As the table and the fault log say it.
    fn name(self) -> &'static str {
        match self {
            Fault::KillA => "kill -9 broker A",
            Fault::RestartA => "restart broker A",
            Fault::KillConsumer => "kill -9 the consumer",
            Fault::RestartConsumer => "restart the consumer",
            Fault::KillB => "kill -9 broker B",
            Fault::RestartB => "restart broker B",
        }
    }
}

/// After a fault: when the consumer's output grows again (the delivery
/// gap, the failover time the consumer sees).
#[derive(Debug, Clone, Copy)]
struct Gap {
    /// The fault's entry in the log.
    entry: usize,
    /// When the fault happened.
    since: Instant,
    /// The consumer's output length then.
    output: u64,
}

/// Producer in-flight enqueues awaiting their disk sync, at most.
const PENDING: usize = 64;

/// The demo's processes and counts: two brokers, the consumer (a child
/// process printing `%I` lines), the producer in fanout to both.
struct Demo {
    kind: BrokerKind,
    broker_a: Broker,
    broker_b: Broker,
    consumer: Consumer,
    client: Client,
    /// The consumer's output.
    out: PathBuf,
    /// The consumer's inbox.
    inbox: PathBuf,
    /// When publishing started.
    start: Instant,
    sent: u64,
    accepted: u64,
    /// Enqueued, not yet on disk.
    pending: VecDeque<AcceptFuture>,
    /// When the next once-a-second row is due (from `start`).
    next_row: Duration,
    /// The faults so far, each with its time (and the gap after it).
    log: Vec<String>,
}

impl Demo {
    /// Starts the brokers (Mosquitto with persistence, saved every second),
    /// registers and starts the consumer, opens the producer.
    async fn start(kind: BrokerKind, root: &Path) -> Result<Demo, LabError> {
        let opts = BrokerOptions { persistence: true, autosave_secs: Some(1), extra: vec![] };
        let broker_a = Broker::start(kind, opts.clone(), Some(root)).await?;
        let broker_b = Broker::start(kind, opts, Some(root)).await?;
        let (out, inbox) = (root.join("consumer.out"), root.join("inbox"));
        let mut consumer = consumer(&broker_a, &broker_b, &out, &inbox);
        // The consumer's sessions exist before the first message.
        consumer.register()?;
        consumer.start()?;
        let client = producer(&broker_a, &broker_b, root).await?;
        Ok(Demo {
            kind,
            broker_a,
            broker_b,
            consumer,
            client,
            out,
            inbox,
            start: Instant::now(),
            sent: 0,
            accepted: 0,
            pending: VecDeque::new(),
            next_row: Duration::from_secs(1),
            log: Vec::new(),
        })
    }

    /// The first line: what runs, and for how long.
    fn introduce(&self, a: &DemoOptions) {
        println!(
            "steadfast demo: two {} brokers ({} and {}{}), a producer in fanout (ack = all), a consumer with an inbox; publishing for {} s at {} msg/s, then until every accepted message is handled (at most {} s in all)",
            match self.kind {
                BrokerKind::Embedded => "embedded (rumqttd)",
                BrokerKind::Mosquitto => "Mosquitto",
            },
            self.broker_a.url(),
            self.broker_b.url(),
            match self.kind {
                BrokerKind::Embedded => "; a restart forgets all they held",
                BrokerKind::Mosquitto => "; persistence on",
            },
            a.seconds * 2 / 3,
            a.rate,
            a.seconds
        );
        println!("columns: sent, handed to the outbox; accepted, on disk (synced); delivered, acknowledged by both brokers; handled, printed by the consumer; dups gone, copies its inbox removed; waiting, accepted and not handled yet (nothing is lost while it drains)");
    }

    /// Publishes at `rate` for `publish_for`, playing the schedule; then
    /// waits for every enqueued message's sync.
    async fn publish(&mut self, rate: u32, publish_for: Duration) -> Result<(), LabError> {
        self.start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let mut schedule = SCHEDULE.iter().peekable();
        let mut gap: Option<Gap> = None;
        while self.start.elapsed() < publish_for {
            let t = self.start.elapsed();
            if let Some(&&(at, fault)) = schedule.peek() {
                if t.as_secs_f64() >= at * publish_for.as_secs_f64() {
                    schedule.next();
                    if let Some(g) = self.apply(fault, t).await? {
                        gap = Some(g);
                    }
                }
            }
            if gap.is_some_and(|g| self.output_len() > g.output) {
                let g = gap.take().expect("checked");
                self.log[g.entry].push_str(&format!(" (deliveries {} ms later)", g.since.elapsed().as_millis()));
            }
            self.enqueue_next().await?;
            if t >= self.next_row {
                self.next_row += Duration::from_secs(1);
                self.row(t, &handled(&self.out), "");
            }
            tokio::time::sleep_until((self.start + interval * self.sent as u32).into()).await;
        }
        self.settle(0).await;
        Ok(())
    }

    /// Plays one fault, logs it and prints its row; a gap to time, unless
    /// the consumer itself was killed.
    async fn apply(&mut self, fault: Fault, t: Duration) -> Result<Option<Gap>, LabError> {
        match fault {
            Fault::KillA => self.broker_a.kill9(),
            Fault::RestartA => self.broker_a.spawn().await?,
            Fault::KillConsumer => self.consumer.kill9(),
            Fault::RestartConsumer => self.consumer.start()?,
            Fault::KillB => self.broker_b.kill9(),
            Fault::RestartB => self.broker_b.spawn().await?,
        }
        // Tenths cut, not rounded: 1.98 s is 1.9 s, in the table's row 1s.
        self.log.push(format!("{}.{}s {}", t.as_secs(), t.subsec_millis() / 100, fault.name()));
        let gap = (fault != Fault::KillConsumer).then(|| Gap {
            entry: self.log.len() - 1,
            since: Instant::now(),
            output: self.output_len(),
        });
        self.row(t, &handled(&self.out), fault.name());
        Ok(gap)
    }

    /// Enqueues the next message; at most [`PENDING`] await their sync.
    async fn enqueue_next(&mut self) -> Result<(), LabError> {
        let m = Message::new(format!("demo/{}", self.sent % 4), format!("{}", self.sent)).qos(Qos::AtLeastOnce);
        self.sent += 1;
        self.pending.push_back(self.client.enqueue(m)?);
        self.settle(PENDING).await;
        Ok(())
    }

    /// Waits for enqueued messages until `keep` remain, counting those
    /// accepted.
    async fn settle(&mut self, keep: usize) {
        while self.pending.len() > keep {
            if self.pending.pop_front().expect("non-empty").await.is_ok() {
                self.accepted += 1;
            }
        }
    }

    /// Every accepted identity, `producer/1` to `producer/accepted`.
    fn wanted(&self) -> HashSet<String> {
        let producer = self.client.producer_id();
        (1..=self.accepted).map(|s| format!("{producer}/{s}")).collect()
    }

    /// Until the consumer handled every identity in `want`, or `until`
    /// (from the start) passed.
    async fn drain(&mut self, want: &HashSet<String>, until: Duration) {
        loop {
            let seen = handled(&self.out);
            let missing = want.iter().filter(|w| !seen.contains_key(*w)).count();
            if missing == 0 || self.start.elapsed() >= until {
                return;
            }
            if self.start.elapsed() >= self.next_row {
                self.next_row += Duration::from_secs(1);
                self.row(self.start.elapsed(), &seen, "draining");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last row, the fault log and the verdict; stops the consumer
    /// and the producer.
    async fn verdict(mut self, want: &HashSet<String>) -> DemoOutcome {
        let seen = handled(&self.out);
        let lost: Vec<String> = want.iter().filter(|w| !seen.contains_key(*w)).cloned().collect();
        let twice = seen.values().filter(|c| **c > 1).count();
        self.row(self.start.elapsed(), &seen, "end");
        self.consumer.kill9();
        let producer = self.client.producer_id().to_owned();
        self.client.close().await;
        println!("faults: {}", self.log.join(", "));
        println!(
            "verdict: {} of {} accepted messages lost; {twice} handled twice. Checked: every accepted identity {producer}/1..{} was looked for in the consumer's output (its inbox removes the copies from the two brokers and the redeliveries; a message handled just before a kill -9 of the consumer, whose inbox record died with it, is handled again).",
            lost.len(),
            self.accepted,
            self.accepted
        );
        DemoOutcome { lost, twice }
    }

    fn output_len(&self) -> u64 {
        std::fs::metadata(&self.out).map(|m| m.len()).unwrap_or(0)
    }

    /// A row of the table at `t`, every column from the same moment and
    /// none going backwards: accepted is what the outbox committed (its
    /// newest id: ids start at 1 and are never reused), delivered what
    /// left it acknowledged by both brokers (nothing else leaves it here),
    /// handled the identities the consumer printed, dups gone the copies
    /// its inbox removed, waiting accepted and not handled yet.
    fn row(&self, t: Duration, seen: &HashMap<String, u32>, event: &str) {
        let state = *self.client.outbox_state().borrow();
        let accepted = state.last_id;
        println!(
            "{:>4}s  {:>7}  {:>8}  {:>9}  {:>7}  {:>10}  {:>7}  {event}",
            t.as_secs(),
            self.sent,
            accepted,
            accepted.saturating_sub(state.totals.count),
            seen.len(),
            duplicates_removed(&self.inbox),
            accepted.saturating_sub(seen.len() as u64)
        );
    }
}

fn print_header() {
    println!(
        "{:>5}  {:>7}  {:>8}  {:>9}  {:>7}  {:>10}  {:>7}  event",
        "time", "sent", "accepted", "delivered", "handled", "dups gone", "waiting"
    );
}

/// `steadfast sub` on both brokers with an inbox, printing identities.
fn consumer(broker_a: &Broker, broker_b: &Broker, out: &Path, inbox: &Path) -> Consumer {
    let (a, b) = (broker_a.url(), broker_b.url());
    let args = ["sub", "-b", &a, "-b", &b, "-t", "demo/#", "-i", "demo-consumer", "--inbox"]
        .iter()
        .map(|s| s.to_string())
        .chain([inbox.display().to_string(), "-F".into(), "%I".into(), "--backoff".into(), "50ms..500ms".into()])
        .collect();
    Consumer { args, out: out.to_owned(), child: None }
}

/// The producer: fanout to both brokers, `ack = all`, a short backoff.
async fn producer(broker_a: &Broker, broker_b: &Broker, root: &Path) -> Result<Client, LabError> {
    let urls: Vec<BrokerUrl> =
        [broker_a.url(), broker_b.url()].iter().map(|u| u.parse().expect("loopback URL")).collect();
    let cfg = ClientConfig::new("demo-producer", urls[0].clone(), root.join("outbox"))
        .brokers(BrokerSet::new(urls).mode(Mode::Fanout).ack(AckQuorum::All))
        .backoff(BackoffConfig {
            min: Duration::from_millis(50),
            max: Duration::from_millis(500),
            ..Default::default()
        });
    let (client, _) = Client::open(cfg).await?;
    Ok(client)
}
