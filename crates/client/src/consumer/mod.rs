//! The consumer: persistent sessions on every broker of a set, deliveries
//! acknowledged to the broker only after the application handled them (G4),
//! and a durable inbox that hands each identity over once (G5), with gap
//! detection per producer (G6).
//!
//! One driver task per broker receives PUBLISHes and sends acknowledgements
//! in the order MQTT requires. One dispatcher task merges what all brokers
//! deliver, drops what the inbox says was handled, holds a second copy that
//! arrives while the first is being handled, and records each handled
//! identity in the inbox (group commit; the broker's ack leaves ahead of
//! the record for at most four windows of messages, then waits for it).
//!
//! Each role has its file: [`ConsumerConfig`] in `config`, a delivery in the
//! application's hands ([`Received`]) in `received`, the dispatcher in
//! `dispatcher`, a broker's session in `receiver`. This file holds the
//! [`Consumer`] handle and the messages between the tasks.

mod config;
mod dispatcher;
mod group;
#[cfg(feature = "postgres")]
mod pg;
mod received;
mod receiver;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use steadfast_core::engine::{Dispatch, DispatchConfig};
use steadfast_core::{Identity, ReceiptBatcher};
use steadfast_store::{InboxBounds, OpenReport, Outbox, SqliteStore, Store, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;

pub use self::config::ConsumerConfig;
use self::dispatcher::Dispatcher;
#[cfg(feature = "postgres")]
pub use self::group::{connect_postgres, group_status, GroupStatus, GroupStatusError, MemberStatus};
pub use self::group::{GroupInbox, SharedInboxStats, StatementStats};
pub use self::received::Received;
#[cfg(feature = "postgres")]
pub use self::received::RecordInError;
use self::received::{Pending, Token};
use self::receiver::{check_granted, Receiver};
use crate::error::{CloseReason, ConnectError, OpenError};
use crate::link::{open_auto, Inbound, Incoming, Opened, Side};
use crate::transport::send;
use crate::Event;

/// Counter names in the store (persistent across restarts).
const HANDLED: &str = "consumer.handled";
const DUPLICATES: &str = "consumer.duplicates";
const GAPS: &str = "consumer.gaps_suspected";
const OUT_OF_ORDER: &str = "consumer.out_of_order";

/// A group member's upkeep of the shared inbox: it says it is there (at
/// once, then at every check, and as it closes, with the copies it
/// removed since its last record), looks for gaps the
/// group as a whole lacks (G6 for the group; twice per gap timeout) and
/// keeps the inbox within the consumer's bounds, its age and count, as
/// the directory's inbox is kept (every minute, or twice per age bound).
async fn maintain_shared(
    group: Arc<GroupInbox>,
    cfg: Arc<ConsumerConfig>,
    events: broadcast::Sender<Event>,
    outbox: Outbox,
    mut stop: watch::Receiver<bool>,
) {
    let gaps_every = (cfg.gap_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let prune_every = (cfg.inbox_max_age / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut next_prune = tokio::time::Instant::now() + prune_every;
    loop {
        // There (last seen), with the copies removed since the last record.
        if let Err(e) = group.heartbeat().await {
            tracing::debug!(error = %e, "cannot tell the shared inbox this member is there now");
        }
        tokio::select! {
            _ = tokio::time::sleep(gaps_every) => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() {
                // The last copies removed are counted before it goes.
                let _ = tokio::time::timeout(Duration::from_secs(2), group.heartbeat()).await;
                return;
            },
        }
        // The dispatcher says when the shared inbox is down: failures
        // here are only debug lines.
        match group.lasting_gaps(cfg.gap_timeout, gaps_every * 3).await {
            Ok(gaps) => {
                for (producer, first, last) in gaps {
                    tracing::warn!(%producer, first, last, "suspected loss: no member of the group received these, and later ones came more than the gap timeout ago");
                    outbox.count(GAPS, 1);
                    let _ = events.send(Event::SuspectedLoss { producer, first, last });
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot look for the group's gaps now"),
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune = tokio::time::Instant::now() + prune_every;
            match group.prune(cfg.inbox_max_age, cfg.inbox_max_count).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(forgotten = n, "shared inbox pruned"),
                Err(e) => tracing::debug!(error = %e, "cannot prune the shared inbox now"),
            }
        }
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

/// What the dispatcher is told: by a delivery (acknowledged, given back),
/// by its own inbox records, and by close.
enum Cmd {
    Ack {
        token: Token,
        identity: Option<Identity>,
    },
    Retry(Box<Pending>),
    Recorded(steadfast_core::engine::Record<Token>, bool),
    /// Close: finish the acknowledgements under way, then answer.
    Flush(oneshot::Sender<()>),
    /// Publish this on every broker's session (QoS 1, not stored): a
    /// bridge hands receipts back to their producers this way.
    Relay {
        topic: String,
        payload: Vec<u8>,
        count: u64,
    },
}

/// A message from one broker's driver.
struct FromBroker {
    broker: usize,
    epoch: u64,
    msg: Inbound,
}

/// What the dispatcher tells a broker's receiver.
enum DriverCmd {
    Ack {
        epoch: u64,
        pid: u16,
    },
    /// Answered once every acknowledgement before it is written.
    Flush(oneshot::Sender<()>),
    /// A receipt batch to publish (QoS 1, not stored).
    Publish {
        topic: String,
        payload: Vec<u8>,
        count: u64,
    },
}

/// Publishes on a consumer's sessions: see [`Consumer::relayer`].
#[derive(Clone)]
pub(crate) struct Relayer(mpsc::UnboundedSender<Cmd>);

impl Relayer {
    /// Publishes `payload` at `topic` (QoS 1, not stored) on the session of
    /// every broker that has one now; `count`: the receipts it carries,
    /// for the log. What finds no session is not sent: a receipt lost is a
    /// message published again, and answered again.
    pub(crate) fn relay(&self, topic: String, payload: Vec<u8>, count: u64) {
        let _ = self.0.send(Cmd::Relay { topic, payload, count });
    }
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
    /// A group member's shared inbox.
    group: Option<Arc<GroupInbox>>,
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
        let group = match (&cfg.shared_inbox, &cfg.group) {
            (Some(url), Some(name)) => {
                Some(Arc::new(GroupInbox::new(url, name, &cfg.client.client_id, cfg.claim_for)?))
            }
            _ => None,
        };
        let group_for_pruning = group.clone();
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
                version: cfg.client.version,
                receipts_refused: std::sync::atomic::AtomicU64::new(0),
            };
            tasks.push(tokio::spawn(d.run()));
        }
        let handled = Arc::new(AtomicU64::new(0));
        let cmds = cmd_tx.clone();
        let dispatcher = Dispatcher {
            cfg: cfg.clone(),
            urls: urls.iter().map(|u| Arc::from(u.to_string())).collect(),
            outbox: outbox.clone(),
            events: events.clone(),
            app: app_tx,
            cmds: cmd_tx,
            to_drivers,
            engine: Dispatch::new(
                DispatchConfig {
                    gap_timeout: cfg.gap_timeout,
                    retry_after: cfg.retry_after,
                    record_retry: Duration::from_secs(1),
                    relay: cfg.relay,
                    shared: group.is_some(),
                    reask_after: Duration::from_millis(200),
                    acks_ahead: cfg.acks_ahead(),
                },
                high,
            ),
            handled: handled.clone(),
            flush: None,
            ready: VecDeque::new(),
            receipts: ReceiptBatcher::new(Default::default()),
            warned_receipts: false,
            group: group.clone(),
            asks: Vec::new(),
        };
        if let Some(g) = &group_for_pruning {
            let upkeep = maintain_shared(g.clone(), cfg.clone(), events.clone(), outbox.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(upkeep));
        }
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
            group: group_for_pruning,
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

    /// A handle that publishes on this consumer's sessions (a bridge hands
    /// receipts back to their producers with it).
    pub(crate) fn relayer(&self) -> Relayer {
        Relayer(self.cmds.clone())
    }

    /// A group member with a shared inbox: what it asked of PostgreSQL
    /// so far (round trips; claims and records, with their times).
    pub fn shared_inbox_stats(&self) -> Option<SharedInboxStats> {
        self.group.as_ref().map(|g| g.stats())
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
            let mut version = cfg.client.version;
            let Opened { mut rd, mut wr, mut link, ack: _, after, mut buf, .. } =
                open_auto(&cfg.client, &url, cfg.client.clean_start, &mut version, None, Side::Consumer).await?;
            link.subscribe(1, &cfg.filters(), cfg.retain_as_published)?;
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
                    ConnectError::Timeout {
                        broker: url.to_string(),
                        packet: "SUBSCRIBE",
                        timeout: cfg.client.connect_timeout,
                        mqtt5: version == crate::ProtocolVersion::V5,
                    }
                })??;
                if n == 0 {
                    return Err(ConnectError::Closed(CloseReason::BeforeSuback));
                }
                pending = link.receive(&buf[..n]);
            };
            check_granted(&url, &cfg.filters(), &granted)?;
            link.disconnect();
            let _ = send(&mut wr, &link.out).await;
            let _ = wr.shutdown().await;
        }
        Ok(())
    }

    /// Finishes the acknowledgements of what was acknowledged (the inbox
    /// records and the broker's acks), stops the sessions (unacknowledged deliveries
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

/// Sends `queue`'s front through the reserved `permit`, then as many more
/// as `tx` has room for now; how many of those sent `counts` (`None` when
/// the channel is closed).
fn send_queued<T>(
    tx: &mpsc::Sender<T>,
    permit: mpsc::Permit<'_, T>,
    queue: &mut VecDeque<T>,
    limit: usize,
    counts: impl Fn(&T) -> bool,
) -> Option<usize> {
    let first = queue.pop_front().expect("not empty");
    let mut counted = usize::from(counts(&first));
    permit.send(first);
    // And whatever else fits now, up to `limit` in all.
    for _ in 1..limit {
        let Some(m) = queue.pop_front() else { break };
        let c = counts(&m);
        if let Err(e) = tx.try_send(m) {
            match e {
                mpsc::error::TrySendError::Full(m) => queue.push_front(m),
                mpsc::error::TrySendError::Closed(_) => return None,
            }
            break;
        }
        counted += usize::from(c);
    }
    Some(counted)
}
