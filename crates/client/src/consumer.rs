//! The consumer: persistent sessions on every broker of a set, deliveries
//! acknowledged to the broker only after the application handled them (G4),
//! and a durable inbox that hands each identity over once (G5), with gap
//! detection per producer (G6).
//!
//! One driver task per broker receives PUBLISHes and sends acknowledgements
//! in the order MQTT requires. One dispatcher task merges what all brokers
//! deliver, drops what the inbox says was handled, holds a second copy that
//! arrives while the first is being handled, and records each handled
//! identity in the inbox (group commit) *before* the broker's ack leaves.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use steadfast_core::{Backoff, Identity, KeepAlive, KeepAliveAction, Properties, Qos};
use steadfast_store::{InboxBounds, OpenReport, Outbox, SqliteStore, Store, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use crate::config::{BrokerUrl, ClientConfig};
use crate::error::{CloseReason, ConfigError, ConnectError, OpenError};
use crate::link::{open_session, Inbound, Incoming, Opened};
use crate::transport::send;
use crate::Event;

/// Deliveries the dispatcher queues for the application before it stops
/// reading from the brokers (back-pressure).
const READY_MAX: usize = 256;

/// Counter names in the store (persistent across restarts).
const HANDLED: &str = "consumer.handled";
const DUPLICATES: &str = "consumer.duplicates";
const GAPS: &str = "consumer.gaps_suspected";
const OUT_OF_ORDER: &str = "consumer.out_of_order";

/// Everything a [`Consumer`] needs: the connection settings of a
/// [`ClientConfig`] (its brokers, client id, session, and its directory,
/// which holds the inbox) and the subscriptions.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    client: ClientConfig,
    topics: Vec<(String, Qos)>,
    inbox: bool,
    inbox_max_age: Duration,
    inbox_max_count: u64,
    inbox_max_bytes: Option<u64>,
    gap_timeout: Duration,
    retry_after: Duration,
}

impl ConsumerConfig {
    /// A consumer with `client`'s brokers, session and directory.
    pub fn new(client: ClientConfig) -> Self {
        Self {
            client,
            topics: Vec::new(),
            inbox: true,
            inbox_max_age: Duration::from_secs(7 * 24 * 3600),
            inbox_max_count: 1_000_000,
            inbox_max_bytes: None,
            gap_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
        }
    }
    /// Subscribes to `filter` with at most `qos` (repeatable).
    pub fn topic(mut self, filter: impl Into<String>, qos: Qos) -> Self {
        self.topics.push((filter.into(), qos));
        self
    }
    /// De-duplicate by identity through the durable inbox (default on).
    pub fn inbox(mut self, on: bool) -> Self {
        self.inbox = on;
        self
    }
    /// How long and how many handled identities the inbox remembers
    /// (default 7 days, 1,000,000). A copy arriving later than that is
    /// handed over again.
    pub fn inbox_window(mut self, max_age: Duration, max_count: u64) -> Self {
        self.inbox_max_age = max_age;
        self.inbox_max_count = max_count;
        self
    }
    /// At most this many bytes of identities in the inbox (each counts its
    /// producer id plus 24 bytes); default: no byte bound.
    pub fn inbox_max_bytes(mut self, max: u64) -> Self {
        self.inbox_max_bytes = Some(max);
        self
    }
    /// A gap in a producer's sequence not filled within this long is
    /// reported as a suspected loss (default 30 s).
    pub fn gap_timeout(mut self, d: Duration) -> Self {
        self.gap_timeout = d;
        self
    }
    /// A delivery the application dropped or refused comes again after
    /// this long (default 1 s).
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = d;
        self
    }
    /// The connection settings.
    pub fn client(&self) -> &ClientConfig {
        &self.client
    }

    /// Checks the configuration as [`Consumer::open`] would, without
    /// opening anything.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.client.validate()?;
        if self.topics.is_empty() {
            return Err(ConfigError::Invalid("no topic to subscribe to; give at least one filter (-t)".into()));
        }
        for (f, _) in &self.topics {
            steadfast_core::topic::validate_topic_filter(f)
                .map_err(|e| ConfigError::Invalid(format!("topic filter `{f}`: {e}")))?;
        }
        if self.inbox_max_bytes == Some(0) {
            return Err(ConfigError::Invalid("an inbox of 0 bytes de-duplicates nothing; give a larger bound".into()));
        }
        if self.inbox_max_count == 0 {
            return Err(ConfigError::Invalid("an inbox of 0 identities de-duplicates nothing; use 1 or more".into()));
        }
        Ok(())
    }
}

/// Reads a consumer's figures from its inbox; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsumerMetrics {
    outbox: Outbox,
}

impl ConsumerMetrics {
    /// Handled, duplicates, gaps, out of order (kept across restarts) and
    /// the inbox size.
    pub async fn stats(&self) -> Result<ConsumerStats, StoreError> {
        let r = self.outbox.report().await?;
        let get = |name: &str| r.counters.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v);
        Ok(ConsumerStats {
            handled: get(HANDLED),
            duplicates: get(DUPLICATES),
            gaps_suspected: get(GAPS),
            out_of_order: get(OUT_OF_ORDER),
            inbox: r.inbox,
        })
    }

    /// Sets the consumer's metrics from its inbox.
    pub async fn export(&self) -> Result<(), StoreError> {
        crate::metrics::export_consumer(&self.stats().await?);
        Ok(())
    }
}

/// A message handed to the application. Acknowledge it with
/// [`Received::ack`] once handled; dropping it unacknowledged (or
/// [`Received::retry`]) makes it come again.
#[derive(Debug)]
pub struct Received {
    topic: String,
    payload: Vec<u8>,
    qos: Qos,
    retain: bool,
    identity: Option<Identity>,
    broker: String,
    redelivered: bool,
    /// The broker's DUP flag: it sent this packet id before.
    broker_dup: bool,
    props: Properties,
    expiry_secs: Option<u32>,
    token: Option<Token>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

/// Where a delivery's acknowledgement goes.
#[derive(Debug, Clone, Copy)]
struct Token {
    broker: usize,
    epoch: u64,
    pid: Option<u16>,
}

impl Received {
    /// Topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// Payload (without the envelope, if it had one).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// QoS as delivered.
    pub fn qos(&self) -> Qos {
        self.qos
    }
    /// Retain flag.
    pub fn retain(&self) -> bool {
        self.retain
    }
    /// The producer's identity, when the message carries one.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }
    /// The broker it came from.
    pub fn broker(&self) -> &str {
        &self.broker
    }
    /// Handed over before (the application dropped or refused it, or the
    /// broker sent it again).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
    /// The broker sent it with DUP set: a resend of a packet id it had
    /// sent before without getting its acknowledgement (not set for a
    /// delivery the application gave back).
    pub fn broker_resent(&self) -> bool {
        self.broker_dup
    }
    /// Its MQTT 5 properties (content type, user properties...; the
    /// identity is [`Received::identity`]).
    pub fn properties(&self) -> &Properties {
        &self.props
    }
    /// MQTT 5: the message expiry interval it came with, in seconds (the
    /// time it had left when the broker sent it).
    pub fn expiry(&self) -> Option<Duration> {
        self.expiry_secs.map(|s| Duration::from_secs(u64::from(s)))
    }
    /// The packet id it came under (QoS 1 and 2), until it is acknowledged.
    pub fn packet_id(&self) -> Option<u16> {
        self.token.and_then(|t| t.pid)
    }

    /// Handled: the identity is recorded in the inbox, then the broker gets
    /// its PUBACK (QoS 1) or PUBREC (QoS 2). Returns at once; the
    /// acknowledgements of many deliveries share one disk sync.
    pub fn ack(mut self) {
        if let Some(token) = self.token.take() {
            let _ = self.cmds.send(Cmd::Ack { token, identity: self.identity.take() });
        }
    }

    /// Not handled: it comes again after the configured pause.
    pub fn retry(self) {
        drop(self);
    }

    fn retry_copy(&mut self) -> Option<Pending> {
        let token = self.token.take()?;
        Some(Pending {
            token,
            msg: Inbound {
                topic: std::mem::take(&mut self.topic),
                payload: std::mem::take(&mut self.payload),
                qos: self.qos,
                pid: token.pid,
                retain: self.retain,
                // The wire's own flag: a retry here is not a resend there.
                dup: self.broker_dup,
                identity: None,
                props: std::mem::take(&mut self.props),
                expiry_secs: self.expiry_secs,
            },
            identity: self.identity.take(),
        })
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if let Some(p) = self.retry_copy() {
            let _ = self.cmds.send(Cmd::Retry(p));
        }
    }
}

/// Counters of a consumer (kept in its store across restarts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Deliveries the application acknowledged.
    pub handled: u64,
    /// Copies dropped because their identity was handled already.
    pub duplicates: u64,
    /// Gaps in a producer's sequence reported as suspected losses.
    pub gaps_suspected: u64,
    /// Messages that arrived after a later one of the same producer.
    pub out_of_order: u64,
    /// Identities the inbox remembers now.
    pub inbox: u64,
}

enum Cmd {
    Ack {
        token: Token,
        identity: Option<Identity>,
    },
    Retry(Pending),
    Recorded(Vec<(Identity, Token)>, bool),
    /// A failed record, tried again.
    RecordAgain(Vec<(Identity, Token)>),
    /// Close: finish the acknowledgements under way, then answer.
    Flush(oneshot::Sender<()>),
}

struct Pending {
    token: Token,
    msg: Inbound,
    identity: Option<Identity>,
}

impl Pending {
    fn into_received(self, broker: String, redelivered: bool, cmds: mpsc::UnboundedSender<Cmd>) -> Received {
        Received {
            topic: self.msg.topic,
            payload: self.msg.payload,
            qos: self.msg.qos,
            retain: self.msg.retain,
            identity: self.identity,
            broker,
            redelivered: redelivered || self.msg.dup,
            broker_dup: self.msg.dup,
            props: self.msg.props,
            expiry_secs: self.msg.expiry_secs,
            token: Some(self.token),
            cmds,
        }
    }
}

/// A message from one broker's driver.
struct FromBroker {
    broker: usize,
    epoch: u64,
    msg: Inbound,
}

enum DriverCmd {
    Ack {
        epoch: u64,
        pid: u16,
    },
    /// Answered once every acknowledgement before it is written.
    Flush(oneshot::Sender<()>),
}

/// A reliable MQTT consumer. See the module documentation.
pub struct Consumer {
    cmds: mpsc::UnboundedSender<Cmd>,
    deliveries: Mutex<mpsc::Receiver<Received>>,
    events: broadcast::Sender<Event>,
    first_events: std::sync::Mutex<Option<broadcast::Receiver<Event>>>,
    outbox: Outbox,
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    handled: Arc<AtomicU64>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").finish_non_exhaustive()
    }
}

impl Consumer {
    /// Opens the inbox in the client's directory and starts a session on
    /// every broker in the background. Never waits for a broker.
    pub async fn open(cfg: ConsumerConfig) -> Result<(Consumer, OpenReport), OpenError> {
        cfg.validate()?;
        let dir = cfg.client.outbox_dir.clone();
        let opened = tokio::task::spawn_blocking(move || SqliteStore::open_inbox(&dir))
            .await
            .map_err(|e| StoreError::WriteFailed(format!("inbox open task failed: {e}")))?;
        let (store, report) = opened?;
        Ok((Self::with_store(cfg, Box::new(store)).await?, report))
    }

    /// Like [`Consumer::open`] over any store.
    pub async fn with_store(cfg: ConsumerConfig, store: Box<dyn Store>) -> Result<Consumer, OpenError> {
        cfg.validate()?;
        let outbox = Outbox::start(store, Default::default())?;
        let bounds = InboxBounds {
            max_age_ms: cfg.inbox_max_age.as_millis() as u64,
            max_count: cfg.inbox_max_count,
            max_bytes: cfg.inbox_max_bytes,
        };
        let high = match outbox.inbox_bounds(bounds).await {
            Ok(h) => h,
            Err(e) => {
                let o = outbox.clone();
                let _ = tokio::task::spawn_blocking(move || o.close()).await;
                return Err(e.into());
            }
        };
        let cfg = Arc::new(cfg);
        // The first `events()` call gets everything from the start.
        let (events, first_events) = broadcast::channel(4096);
        let (stop, stop_rx) = watch::channel(false);
        let (from_brokers, inbound) = mpsc::channel(1024);
        let (app_tx, app_rx) = mpsc::channel(256);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let urls = cfg.client.all_brokers();
        let mut tasks = Vec::new();
        let mut to_drivers = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            to_drivers.push(tx);
            let d = Receiver {
                outbox: outbox.clone(),
                cfg: cfg.clone(),
                url: url.clone(),
                index: i,
                out: from_brokers.clone(),
                acks: rx,
                events: events.clone(),
                stop: stop_rx.clone(),
            };
            tasks.push(tokio::spawn(d.run()));
        }
        let handled = Arc::new(AtomicU64::new(0));
        let cmds = cmd_tx.clone();
        let dispatcher = Dispatcher {
            cfg: cfg.clone(),
            urls: urls.iter().map(|u| u.to_string()).collect(),
            outbox: outbox.clone(),
            events: events.clone(),
            app: app_tx,
            cmds: cmd_tx,
            to_drivers,
            handling: HashMap::new(),
            producers: HashMap::new(),
            handled: handled.clone(),
            recording: 0,
            flush: None,
            ready: VecDeque::new(),
            high: high.into_iter().collect(),
        };
        tasks.push(tokio::spawn(dispatcher.run(inbound, cmd_rx, stop_rx)));
        let consumer = Consumer {
            cmds,
            deliveries: Mutex::new(app_rx),
            events,
            first_events: std::sync::Mutex::new(Some(first_events)),
            outbox,
            stop,
            tasks: std::sync::Mutex::new(tasks),
            handled,
        };
        Ok(consumer)
    }

    /// The next delivery; `None` once the consumer is closed.
    pub async fn next(&self) -> Option<Received> {
        self.deliveries.lock().await.recv().await
    }

    /// A delivery that is ready now, without waiting.
    pub fn try_next(&self) -> Option<Received> {
        self.deliveries.try_lock().ok()?.try_recv().ok()
    }

    /// Connection events and suspected losses. The first call receives
    /// every event since the consumer was opened; later calls, from then on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        let first = self.first_events.lock().unwrap_or_else(|e| e.into_inner()).take();
        first.unwrap_or_else(|| self.events.subscribe())
    }

    /// Deliveries acknowledged by this process so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Counters, kept across restarts.
    pub async fn stats(&self) -> Result<ConsumerStats, StoreError> {
        self.metrics().stats().await
    }

    /// A handle that reads the figures and exports them as metrics, for an
    /// exporter that runs beside the consumer.
    pub fn metrics(&self) -> ConsumerMetrics {
        ConsumerMetrics { outbox: self.outbox.clone() }
    }

    /// Sets the consumer's metrics (handled, duplicates removed, gaps
    /// suspected, out of order, inbox size) from its inbox; an exporter
    /// calls it before a scrape.
    pub async fn export_metrics(&self) -> Result<(), StoreError> {
        self.metrics().export().await
    }

    /// Creates the session and its subscriptions on every broker, then
    /// disconnects: messages published from now on wait in the brokers for
    /// this consumer's first real run.
    pub async fn register(cfg: &ConsumerConfig) -> Result<(), ConnectError> {
        cfg.validate().map_err(|e| ConnectError::Protocol(e.to_string()))?;
        for url in cfg.client.all_brokers() {
            let Opened { mut rd, mut wr, mut link, ack: _, after, mut buf } =
                open_session(&cfg.client, &url, cfg.client.clean_start).await?;
            link.subscribe(1, &cfg.topics)?;
            send(&mut wr, &link.out).await?;
            link.out.clear();
            let mut pending = after;
            let granted = loop {
                if let Some(g) = pending.iter().find_map(|i| match i {
                    Incoming::SubAck { granted } => Some(granted.clone()),
                    _ => None,
                }) {
                    break g;
                }
                let n = tokio::time::timeout(cfg.client.connect_timeout, rd.read(&mut buf)).await.map_err(|_| {
                    ConnectError::Timeout { broker: url.to_string(), timeout: cfg.client.connect_timeout }
                })??;
                if n == 0 {
                    return Err(ConnectError::Closed(CloseReason::BeforeSuback));
                }
                pending = link.receive(&buf[..n]);
            };
            check_granted(&url, &cfg.topics, &granted)?;
            link.disconnect();
            let _ = send(&mut wr, &link.out).await;
            let _ = wr.shutdown().await;
        }
        Ok(())
    }

    /// Finishes the acknowledgements of what was acknowledged (inbox record,
    /// then the broker's ack), stops the sessions (unacknowledged deliveries
    /// come again next time) and closes the inbox.
    pub async fn close(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        let outbox = self.outbox.clone();
        let _ = tokio::task::spawn_blocking(move || outbox.close()).await;
    }
}

fn check_granted(url: &BrokerUrl, topics: &[(String, Qos)], granted: &[Option<u8>]) -> Result<(), ConnectError> {
    for (i, (filter, asked)) in topics.iter().enumerate() {
        match granted.get(i).copied().flatten() {
            None => {
                return Err(ConnectError::Protocol(format!(
                "{url} refused the subscription to `{filter}` (not authorised, or an invalid filter for this broker)"
            )))
            }
            Some(g) if g < *asked as u8 => tracing::warn!(
                broker = %url,
                filter = %filter,
                "the broker granted QoS {g} instead of {}: messages come at most at QoS {g} (the inbox still removes copies)",
                *asked as u8
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Per producer: the highest sequence number seen and the gaps below it.
#[derive(Default)]
struct Sequence {
    highest: u64,
    /// Missing ranges (first, last) and when they were noticed.
    gaps: BTreeMap<u64, (u64, Instant)>,
}

struct Dispatcher {
    cfg: Arc<ConsumerConfig>,
    urls: Vec<String>,
    outbox: Outbox,
    events: broadcast::Sender<Event>,
    app: mpsc::Sender<Received>,
    cmds: mpsc::UnboundedSender<Cmd>,
    to_drivers: Vec<mpsc::UnboundedSender<DriverCmd>>,
    /// Identities handed to the application and not yet recorded, with the
    /// copies that arrived meanwhile (acknowledged once it is recorded).
    handling: HashMap<Identity, Vec<Token>>,
    producers: HashMap<String, Sequence>,
    handled: Arc<AtomicU64>,
    /// Inbox records under way.
    recording: usize,
    /// Close is waiting for them.
    flush: Option<oneshot::Sender<()>>,
    /// Deliveries waiting for the application to take them.
    ready: VecDeque<Received>,
    /// Per producer, a sequence number at or above every one the inbox
    /// holds or that was handed over: anything above it is new without
    /// asking the store (the common case).
    high: HashMap<String, u64>,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<FromBroker>,
        mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let app = self.app.clone();
        loop {
            // Commands (acks, close) are served whatever the application
            // does; brokers are read only while few deliveries wait for it.
            tokio::select! {
                first = inbound.recv(), if self.ready.len() < READY_MAX => {
                    let Some(first) = first else { return };
                    let mut batch = vec![first];
                    while batch.len() < 512 {
                        match inbound.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    self.take(batch).await;
                }
                permit = app.reserve(), if !self.ready.is_empty() => {
                    let Ok(permit) = permit else { return };
                    permit.send(self.ready.pop_front().expect("not empty"));
                    // And whatever else fits now.
                    while let Some(d) = self.ready.pop_front() {
                        if let Err(e) = app.try_send(d) {
                            match e {
                                mpsc::error::TrySendError::Full(d) => self.ready.push_front(d),
                                mpsc::error::TrySendError::Closed(_) => return,
                            }
                            break;
                        }
                    }
                }
                cmd = cmd_rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    let mut cmds = vec![cmd];
                    while let Ok(c) = cmd_rx.try_recv() {
                        cmds.push(c);
                    }
                    self.on_cmds(cmds);
                }
                _ = tick.tick() => self.check_gaps(),
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            }
        }
    }

    fn ack_broker(&self, token: Token) {
        if let Some(pid) = token.pid {
            let _ = self.to_drivers[token.broker].send(DriverCmd::Ack { epoch: token.epoch, pid });
        }
    }

    /// Messages from the brokers: drop what was handled, hold second copies
    /// of what is being handled, queue the rest for the application.
    async fn take(&mut self, batch: Vec<FromBroker>) {
        let mut items = Vec::with_capacity(batch.len());
        for FromBroker { broker, epoch, mut msg } in batch {
            let token = Token { broker, epoch, pid: msg.pid };
            let mut identity = msg.identity.as_deref().and_then(Identity::parse_property_value);
            if identity.is_none() && self.cfg.client.envelope {
                if let Some((id, payload)) = Identity::unwrap(&msg.payload) {
                    let payload = payload.to_vec();
                    msg.payload = payload;
                    identity = Some(id);
                }
            }
            let identity = identity.filter(|_| self.cfg.inbox);
            items.push(Pending { token, msg, identity });
        }
        // Decided for the whole batch before anything in it is handed over.
        let fresh: Vec<bool> = items
            .iter()
            .map(|p| p.identity.as_ref().is_some_and(|i| self.high.get(&i.producer).is_none_or(|h| i.seq > *h)))
            .collect();
        let ids: Vec<(String, u64)> = items
            .iter()
            .zip(&fresh)
            .filter(|(_, fresh)| !**fresh)
            .filter_map(|(p, _)| p.identity.as_ref())
            .map(|i| (i.producer.clone(), i.seq))
            .collect();
        let seen = if ids.is_empty() {
            Vec::new()
        } else {
            match self.outbox.inbox_seen(ids).await {
                Ok(s) => s,
                Err(e) => {
                    // Without the inbox nothing is known handled: hand over
                    // (at least once) rather than stall.
                    tracing::error!(error = %e, "cannot read the inbox; delivering without de-duplication");
                    Vec::new()
                }
            }
        };
        let mut seen = seen.into_iter();
        let mut duplicates = 0;
        for (p, fresh) in items.into_iter().zip(fresh) {
            let Some(id) = p.identity.clone() else {
                self.hand_over(p, false);
                continue;
            };
            let known = !fresh && seen.next().unwrap_or(false);
            if known {
                duplicates += 1;
                self.ack_broker(p.token);
                continue;
            }
            if let Some(copies) = self.handling.get_mut(&id) {
                copies.push(p.token);
                duplicates += 1;
                continue;
            }
            self.handling.insert(id.clone(), Vec::new());
            let h = self.high.entry(id.producer.clone()).or_default();
            *h = (*h).max(id.seq);
            self.note_sequence(&id);
            self.hand_over(p, false);
        }
        self.outbox.count(DUPLICATES, duplicates);
    }

    /// Queues a delivery for the application. Every delivery has a token:
    /// a QoS 0 one has no packet id to acknowledge, but its identity is
    /// still recorded when it is handled.
    fn hand_over(&mut self, p: Pending, redelivered: bool) {
        let broker = self.urls[p.token.broker].clone();
        self.ready.push_back(p.into_received(broker, redelivered, self.cmds.clone()));
    }

    fn on_cmds(&mut self, cmds: Vec<Cmd>) {
        let mut record = Vec::new();
        let mut plain = 0;
        for cmd in cmds {
            match cmd {
                Cmd::Ack { token, identity: Some(id) } => record.push((id, token)),
                Cmd::Ack { token, identity: None } => {
                    plain += 1;
                    self.ack_broker(token);
                }
                Cmd::Retry(p) => {
                    let app = self.app.clone();
                    let urls = self.urls.clone();
                    let cmds = self.cmds.clone();
                    let after = self.cfg.retry_after;
                    tokio::spawn(async move {
                        sleep(after).await;
                        let broker = urls[p.token.broker].clone();
                        let _ = app.send(p.into_received(broker, true, cmds)).await;
                    });
                }
                Cmd::Flush(tx) => self.flush = Some(tx),
                Cmd::Recorded(done, true) => {
                    self.recording -= 1;
                    for (id, token) in done {
                        let copies = self.handling.remove(&id).unwrap_or_default();
                        self.ack_broker(token);
                        for c in copies {
                            self.ack_broker(c);
                        }
                    }
                }
                Cmd::Recorded(done, false) => {
                    // Not acknowledged until recorded: tried again (the
                    // deliveries stay in flight, and the record stays
                    // counted as under way, meanwhile).
                    let back = self.cmds.clone();
                    tokio::spawn(async move {
                        sleep(Duration::from_secs(1)).await;
                        let _ = back.send(Cmd::RecordAgain(done));
                    });
                }
                Cmd::RecordAgain(done) => {
                    self.recording -= 1;
                    self.record(done);
                }
            }
        }
        self.handled.fetch_add(plain, Ordering::Relaxed);
        self.outbox.count(HANDLED, plain);
        if !record.is_empty() {
            self.record(record);
        }
        if self.recording == 0 {
            if let Some(tx) = self.flush.take() {
                // Every ack is queued to its driver: they answer once written.
                let drivers = self.to_drivers.clone();
                tokio::spawn(async move {
                    for d in drivers {
                        let (t, r) = oneshot::channel();
                        // A driver between sessions has nothing to write.
                        if d.send(DriverCmd::Flush(t)).is_ok() {
                            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
                        }
                    }
                    let _ = tx.send(());
                });
            }
        }
    }

    fn record(&mut self, record: Vec<(Identity, Token)>) {
        self.recording += 1;
        // The inbox record is on disk before any broker ack leaves (G4, G5).
        let n = record.len() as u64;
        self.handled.fetch_add(n, Ordering::Relaxed);
        self.outbox.count(HANDLED, n);
        let outbox = self.outbox.clone();
        let back = self.cmds.clone();
        tokio::spawn(async move {
            let ids = record.iter().map(|(i, _)| (i.producer.clone(), i.seq)).collect();
            let ok = match outbox.inbox_record(ids).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record handled messages in the inbox; not acknowledged yet, trying again");
                    false
                }
            };
            let _ = back.send(Cmd::Recorded(record, ok));
        });
    }

    /// G6: a jump ahead opens a gap; an arrival below the highest fills one
    /// (or is out of order).
    fn note_sequence(&mut self, id: &Identity) {
        let s = self.producers.entry(id.producer.clone()).or_default();
        let now = Instant::now();
        if s.highest == 0 {
            s.highest = id.seq;
            return;
        }
        if id.seq > s.highest + 1 {
            s.gaps.insert(s.highest + 1, (id.seq - 1, now));
        }
        if id.seq > s.highest {
            s.highest = id.seq;
            return;
        }
        self.outbox.count(OUT_OF_ORDER, 1);
        // Fill: split the range holding seq.
        let Some((&first, &(last, since))) = s.gaps.range(..=id.seq).next_back() else { return };
        if id.seq > last {
            return;
        }
        s.gaps.remove(&first);
        if first < id.seq {
            s.gaps.insert(first, (id.seq - 1, since));
        }
        if id.seq < last {
            s.gaps.insert(id.seq + 1, (last, since));
        }
    }

    fn check_gaps(&mut self) {
        let timeout = self.cfg.gap_timeout;
        let mut reported = 0;
        for (producer, s) in &mut self.producers {
            let old: Vec<u64> = s.gaps.iter().filter(|(_, (_, t))| t.elapsed() >= timeout).map(|(f, _)| *f).collect();
            for first in old {
                let (last, _) = s.gaps.remove(&first).expect("listed");
                reported += 1;
                tracing::warn!(%producer, first, last, "suspected loss: a gap in this producer's sequence did not fill");
                let _ = self.events.send(Event::SuspectedLoss { producer: producer.clone(), first, last });
            }
        }
        self.outbox.count(GAPS, reported);
    }
}

/// One broker's session: receives, and acknowledges in order.
struct Receiver {
    outbox: Outbox,
    cfg: Arc<ConsumerConfig>,
    url: BrokerUrl,
    index: usize,
    out: mpsc::Sender<FromBroker>,
    acks: mpsc::UnboundedReceiver<DriverCmd>,
    events: broadcast::Sender<Event>,
    stop: watch::Receiver<bool>,
}

impl Receiver {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.cfg.client.backoff);
        let mut rng = fastrand::Rng::new();
        let mut epoch = 0u64;
        loop {
            if *self.stop.borrow() {
                return;
            }
            epoch += 1;
            let clean = self.cfg.client.clean_start && epoch == 1;
            let mut connected_at = None;
            let r = self.session(epoch, clean, &mut connected_at).await;
            let error = match r {
                Ok(()) => return,
                Err(e) => e,
            };
            if let Some(at) = connected_at {
                backoff.link_lost_after(at.elapsed());
            }
            let delay = backoff.next_delay(&mut rng, tokio::time::Instant::now().into_std());
            let broker = self.url.to_string();
            if connected_at.is_some() {
                tracing::warn!(%broker, error = %error, retry_in = ?delay, "consumer link lost; reconnecting");
                let _ = self.events.send(Event::Disconnected { broker, error, retry_in: delay });
            } else {
                tracing::debug!(%broker, error = %error, retry_in = ?delay, "consumer cannot connect; will retry");
                let _ = self.events.send(Event::ConnectFailed { broker, error, retry_in: delay });
            }
            tokio::select! {
                _ = sleep(delay) => {}
                _ = self.stop.changed() => {}
            }
        }
    }

    async fn session(
        &mut self,
        epoch: u64,
        clean: bool,
        connected_at: &mut Option<Instant>,
    ) -> Result<(), ConnectError> {
        let cfg = &self.cfg.client;
        let Opened { mut rd, mut wr, mut link, ack, after, mut buf } = open_session(cfg, &self.url, clean).await?;
        *connected_at = Some(Instant::now());
        let broker = self.url.to_string();
        // A kept session keeps its subscriptions; a new one gets them now,
        // and so does a kept one whose filters are not the ones configured
        // (recorded per broker once the broker granted them).
        let key = format!("subscribed {broker}");
        let want: String = self.cfg.topics.iter().map(|(f, q)| format!("{} {f}\n", *q as u8)).collect();
        let have = self.outbox.meta_or_init(&key, "").await.map_err(ConnectError::inbox)?;
        if !ack.session_present || have != want {
            link.subscribe(1, &self.cfg.topics)?;
        }
        tracing::info!(%broker, session_present = ack.session_present, "consumer connected");
        let _ = self.events.send(Event::Connected {
            broker: broker.clone(),
            session_present: ack.session_present,
            resent: 0,
        });
        // Acknowledgements must leave in the order the PUBLISHes came.
        let mut order: VecDeque<(u16, Qos, bool)> = VecDeque::new();
        let mut keepalive = KeepAlive::new(cfg.keep_alive, Instant::now().into_std());
        let mut pending_in = after;
        // Received, waiting for room towards the dispatcher: while any
        // wait, the socket is not read (back-pressure), but acks, pings and
        // stop are still served.
        let mut to_forward: VecDeque<FromBroker> = VecDeque::new();
        // A consumer may have nothing to send for a long time (QoS 0): it
        // pings when it has written nothing for half the keep-alive, or the
        // broker would take it for dead.
        let mut written_at = Instant::now();
        // Stale acks of an earlier connection are ignored.
        while self.acks.try_recv().is_ok() {}
        loop {
            for inc in std::mem::take(&mut pending_in) {
                match inc {
                    Incoming::Publish(msg) => {
                        if let Some(pid) = msg.pid {
                            order.push_back((pid, msg.qos, false));
                        }
                        to_forward.push_back(FromBroker { broker: self.index, epoch, msg });
                    }
                    Incoming::PubRel { pid } => link.pubcomp(pid)?,
                    Incoming::SubAck { granted } => {
                        if let Err(e) = check_granted(&self.url, &self.cfg.topics, &granted) {
                            tracing::error!(%broker, error = %e, "subscription refused");
                            return Err(e);
                        }
                        self.outbox.set_meta(&key, &want);
                    }
                    Incoming::Disconnect { reason } => {
                        return Err(ConnectError::Closed(CloseReason::Disconnect(reason)))
                    }
                    Incoming::Broken(e) => return Err(e),
                    Incoming::ConnAck(_) => return Err(ConnectError::Protocol("a second CONNACK arrived".into())),
                    Incoming::PubAck { .. }
                    | Incoming::PubRec { .. }
                    | Incoming::PubComp { .. }
                    | Incoming::PingResp
                    | Incoming::Other => {}
                }
            }
            ack_prefix(&mut order, &mut link)?;
            if !link.out.is_empty() {
                send(&mut wr, &link.out).await?;
                link.out.clear();
                written_at = Instant::now();
            }
            let keepalive_at = Instant::from_std(keepalive.poll_timeout());
            let ping_at = written_at + cfg.keep_alive / 2;
            let out = self.out.clone();
            tokio::select! {
                permit = out.reserve(), if !to_forward.is_empty() => {
                    let Ok(permit) = permit else { return Ok(()) };
                    permit.send(to_forward.pop_front().expect("not empty"));
                    while let Some(m) = to_forward.pop_front() {
                        if let Err(e) = out.try_send(m) {
                            match e {
                                mpsc::error::TrySendError::Full(m) => to_forward.push_front(m),
                                mpsc::error::TrySendError::Closed(_) => return Ok(()),
                            }
                            break;
                        }
                    }
                }
                r = rd.read(&mut buf), if to_forward.is_empty() => {
                    let n = r?;
                    if n == 0 {
                        return Err(ConnectError::Closed(CloseReason::Eof));
                    }
                    keepalive.on_receive(Instant::now().into_std());
                    pending_in = link.receive(&buf[..n]);
                }
                cmd = self.acks.recv() => match cmd {
                    None => return Ok(()),
                    Some(DriverCmd::Ack { epoch: e, pid }) => {
                        if e == epoch {
                            if let Some(entry) = order.iter_mut().find(|(p, _, done)| *p == pid && !*done) {
                                entry.2 = true;
                            }
                        }
                    }
                    Some(DriverCmd::Flush(tx)) => {
                        ack_prefix(&mut order, &mut link)?;
                        send(&mut wr, &link.out).await?;
                        link.out.clear();
                        let _ = tx.send(());
                    }
                },
                _ = sleep_until(ping_at) => {
                    link.ping()?;
                }
                _ = sleep_until(keepalive_at) => {
                    if !to_forward.is_empty() {
                        // Not reading (the application is slow): silence
                        // says nothing about the link.
                        keepalive.on_receive(Instant::now().into_std());
                        continue;
                    }
                    match keepalive.poll(Instant::now().into_std()) {
                        Some(KeepAliveAction::SendPing) => link.ping()?,
                        Some(KeepAliveAction::Dead) => return Err(ConnectError::DeadLink(cfg.keep_alive)),
                        None => {}
                    }
                }
                r = self.stop.changed() => {
                    if r.is_err() || *self.stop.borrow() {
                        link.disconnect();
                        let _ = send(&mut wr, &link.out).await;
                        let _ = wr.shutdown().await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Queues the acks of the acknowledged messages at the front of the
/// arrival order: MQTT wants them in the order the PUBLISHes came.
fn ack_prefix(order: &mut VecDeque<(u16, Qos, bool)>, link: &mut crate::link::Link) -> Result<(), ConnectError> {
    while order.front().is_some_and(|(_, _, done)| *done) {
        let (pid, qos, _) = order.pop_front().expect("front exists");
        link.ack_publish(pid, qos)?;
    }
    Ok(())
}
