//! The public handle.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use steadfast_core::receipt::receipt_topic;
use steadfast_core::{validate_topic_name, ConsumerReceipt, DropReason, Identity, Properties, Qos, ReceiptRule};
use steadfast_store::{
    now_ms, AcceptFuture, DefaultSet, Delivery, Dropped, Handling, NewMessage, OpenReport, Outbox, OutboxState,
    Poisoned, Quorum, Source, SqliteStore, Store, StoreError,
};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{ClientConfig, OtherSets};
use crate::consumer::{Consumer, ConsumerConfig};
use crate::driver::{BrokerShared, Direct, Driver, Place, DIRECT_QUEUE};
use crate::error::{ConfigError, ConnectError, OpenError, PublishError};
use crate::policy::{Class, Policy};
use crate::router::Router;

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS (default 1).
    pub qos: Qos,
    /// Retain flag.
    pub retain: bool,
    /// MQTT 5 properties.
    pub props: Properties,
    /// The named broker set it goes to (`None`: the default set).
    pub route: Option<String>,
    /// Its delivery class (`None`: the route's or client's default).
    pub class: Option<Class>,
    /// Its retry budget (`None`: the default; `Some(0)`: no budget).
    pub max_attempts: Option<u32>,
    /// Keep only the newest undelivered value of its topic (`None`: the
    /// default).
    pub keep_latest: Option<bool>,
    /// Its priority, 0 to 9 (`None`: the default).
    pub priority: Option<u8>,
    /// The receipts it asks for (`None`: the client's default;
    /// `Some(None)`: none).
    pub receipts: Option<Option<ReceiptRule>>,
}

impl Message {
    /// A QoS 1 message, not retained.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos: Qos::AtLeastOnce,
            retain: false,
            props: Properties::default(),
            route: None,
            class: None,
            max_attempts: None,
            keep_latest: None,
            priority: None,
            receipts: None,
        }
    }
    /// Sets the QoS.
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }
    /// Sets the retain flag.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }
    /// Sets the MQTT 5 properties.
    pub fn props(mut self, props: Properties) -> Self {
        self.props = props;
        self
    }
    /// Sends it through the named broker set ([`ClientConfig::route`]).
    pub fn route(mut self, name: impl Into<String>) -> Self {
        self.route = Some(name.into());
        self
    }
    /// Sets its delivery class.
    pub fn class(mut self, class: Class) -> Self {
        self.class = Some(class);
        self
    }
    /// The deadline class with this time to live.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.class(Class::Deadline(ttl))
    }
    /// At most `n` sends (0: no budget, whatever the default).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    /// Keep only the newest undelivered value of its topic.
    pub fn keep_latest(mut self, on: bool) -> Self {
        self.keep_latest = Some(on);
        self
    }
    /// Its priority, 0 (default) to 9: higher goes first after an outage.
    pub fn priority(mut self, p: u8) -> Self {
        self.priority = Some(p);
        self
    }
    /// Asks its consumers for receipts by `rule` instead of the client's
    /// default ([`ClientConfig::receipts`] must be set: the client listens
    /// for receipts only then).
    pub fn receipts(mut self, rule: ReceiptRule) -> Self {
        self.receipts = Some(Some(rule));
        self
    }
    /// Asks for no receipt: the broker's acknowledgement ends its way.
    pub fn without_receipts(mut self) -> Self {
        self.receipts = Some(None);
        self
    }
    /// Sends it under the identity it already has (a bridge forwarding a
    /// producer's message) instead of this client's: a receiver with an
    /// inbox then recognises copies that took different ways.
    pub fn origin(mut self, id: &Identity) -> Self {
        // Properties copied from a message that carried this very identity
        // property keep it where it stands, nothing built again; another
        // identity property is replaced (the first) or dropped. A bridge's
        // source takes the property out as it decodes, so there it is
        // added at the end.
        let mut found = false;
        self.props.user.retain_mut(|(k, v)| {
            if k != Identity::USER_PROPERTY {
                return true;
            }
            if std::mem::replace(&mut found, true) {
                return false;
            }
            if !id.is_property_value(v) {
                *v = id.to_property_value();
            }
            true
        });
        if !found {
            self.props.user.push((Identity::USER_PROPERTY.to_owned(), id.to_property_value()));
        }
        self
    }

    /// Its policy: its own settings over the `default`.
    fn policy(&self, default: Policy) -> Policy {
        Policy {
            class: self.class.unwrap_or(default.class),
            max_attempts: match self.max_attempts {
                Some(0) => None,
                Some(n) => Some(n),
                None => default.max_attempts,
            },
            keep_latest: self.keep_latest.unwrap_or(default.keep_latest),
            priority: self.priority.unwrap_or(default.priority),
        }
    }
}

/// A message checked and handed to the outbox (or, best-effort, sent).
enum Started {
    Sent(Receipt),
    Queued {
        producer: String,
        accepted: AcceptFuture,
        delivered: oneshot::Receiver<Delivery>,
        handled: Option<oneshot::Receiver<Handling>>,
    },
}

impl Started {
    /// Once on disk: its receipt.
    async fn accepted(self) -> Result<Receipt, PublishError> {
        match self {
            Started::Sent(r) => Ok(r),
            Started::Queued { producer, accepted, delivered, handled } => {
                let id = accepted.await?;
                Ok(Receipt { identity: Identity { producer, seq: id }, delivered, handled })
            }
        }
    }
}

/// Proof that a message is in the outbox on disk.
#[derive(Debug)]
pub struct Receipt {
    /// Its identity on the wire (producer id and sequence number).
    pub identity: Identity,
    delivered: oneshot::Receiver<Delivery>,
    handled: Option<oneshot::Receiver<Handling>>,
}

impl Receipt {
    /// The outbox id (equal to the sequence number).
    pub fn id(&self) -> u64 {
        self.identity.seq
    }

    /// Waits until the message is delivered: acknowledged by the brokers
    /// its route requires (told at once; its removal from the outbox is
    /// committed with the writer's next batch, and a crash before that
    /// publishes it again), or dropped by its policy (with the reason,
    /// once the drop is committed).
    pub async fn delivered(self) -> Result<Delivery, PublishError> {
        self.delivered.await.map_err(|_| PublishError::Closed)
    }

    /// Both ends at once, for a caller that follows the message past its
    /// delivery: the broker's acknowledgement (or a drop), and, when it
    /// asks for receipts, its handling.
    #[allow(clippy::type_complexity)]
    pub fn into_outcomes(
        self,
    ) -> (
        impl std::future::Future<Output = Result<Delivery, PublishError>> + Send + 'static,
        Option<impl std::future::Future<Output = Result<Handling, PublishError>> + Send + 'static>,
    ) {
        let delivered = async move { self.delivered.await.map_err(|_| PublishError::Closed) };
        let handled = self.handled.map(|h| async move { h.await.map_err(|_| PublishError::Closed) });
        (delivered, handled)
    }

    /// True when the message asks its consumers for receipts.
    pub fn awaits_receipts(&self) -> bool {
        self.handled.is_some()
    }

    /// Waits until the message was handled: its consumers' receipts met
    /// its rule (with the names of those that sent them), or it was
    /// dropped by its policy first. A message that asks for no receipt
    /// resolves as [`Receipt::delivered`] does, with no names.
    pub async fn handled(self) -> Result<Handling, PublishError> {
        match self.handled {
            Some(h) => h.await.map_err(|_| PublishError::Closed),
            None => match self.delivered.await.map_err(|_| PublishError::Closed)? {
                Delivery::Delivered => Ok(Handling::Handled(Vec::new())),
                Delivery::Dropped(r) => Ok(Handling::Dropped(r)),
            },
        }
    }
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Its identity (the sequence number is its outbox id).
    pub identity: Identity,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: Qos,
    /// When it was accepted.
    pub created: SystemTime,
}

/// State of a broker link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting.
    Connecting,
    /// Connected: messages flow.
    Connected,
    /// Waiting before the next attempt.
    Backoff,
    /// The client was closed.
    Stopped,
}

impl LinkState {
    /// The name used in `steadfast status`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Backoff => "backoff",
            LinkState::Stopped => "stopped",
        }
    }
}

/// What a client knows about one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The broker URL.
    pub url: String,
    /// The link state.
    pub state: LinkState,
    /// The last error, cleared on connect.
    pub last_error: Option<String>,
    /// When `state` began.
    pub since: SystemTime,
    /// In backoff: when the next attempt starts.
    pub retry_at: Option<SystemTime>,
    /// Messages acknowledged by this broker since the client started,
    /// counted by its link right after it hands them to the outbox: for a
    /// moment it can trail `queued` (the link tells the outbox first, so
    /// that a fail-back never resends what the outbox has not yet removed).
    pub acked: u64,
    /// Successful connections.
    pub connects: u64,
    /// Connections on which the broker had lost our session.
    pub sessions_lost: u64,
    /// Messages the broker refused with an error reason code (each is kept
    /// and sent again later).
    pub refused: u64,
    /// Messages in flight.
    pub inflight: usize,
    /// Failed attempts since the last success.
    pub attempts: u64,
    /// Whether new messages go to it now (failover: it is the active
    /// broker of a set; fanout and balance: it is connected).
    pub active: bool,
    /// The ack timeout of its link now (adaptive by default: from the
    /// round trips measured; zero before the first connection attempt).
    pub ack_timeout: Duration,
    /// The smoothed round-trip time of its link and its mean deviation,
    /// once measured (CONNECT to CONNACK, then one PUBLISH at a time).
    pub round_trip: Option<(Duration, Duration)>,
}

/// Something that happened, for applications that watch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A session is up.
    Connected {
        /// The broker.
        broker: String,
        /// Whether the broker kept our session.
        session_present: bool,
        /// In-flight messages sent again with DUP.
        resent: usize,
    },
    /// A connection attempt failed.
    ConnectFailed {
        /// The broker.
        broker: String,
        /// Why.
        error: ConnectError,
        /// The next attempt is in this long.
        retry_in: Duration,
    },
    /// An established link was lost.
    Disconnected {
        /// The broker.
        broker: String,
        /// Why.
        error: ConnectError,
        /// The next attempt is in this long.
        retry_in: Duration,
    },
    /// The broker had no session: every queued message is published again.
    SessionLost {
        /// The broker.
        broker: String,
        /// Messages that will be published again.
        republish: u64,
    },
    /// The broker refused a message with an error reason code a retry may
    /// change (0x97 quota exceeded, 0x80 unspecified); it stays queued and
    /// is sent again after a pause. A code no retry changes (0x87 not
    /// authorized, 0x90, 0x95, 0x99) moves it aside as poison instead:
    /// [`Event::Dropped`] with the reason `poison`, and
    /// [`Client::poisoned`] says why.
    Refused {
        /// The broker.
        broker: String,
        /// The message's outbox id (its sequence number).
        id: u64,
        /// Its topic.
        topic: String,
        /// The reason code it gave (MQTT 5, 0x80 or more), with its name.
        reason: String,
    },
    /// A message left the outbox without delivery (G3).
    Dropped(Dropped),
    /// Failover: the active broker of a set failed; its unacknowledged
    /// messages go to `to` (`None`: no broker of the set is up; they wait).
    Failover {
        /// The route (`None`: the default set).
        route: Option<String>,
        /// The broker that failed.
        from: String,
        /// The broker that takes over.
        to: Option<String>,
    },
    /// Consumer: a gap in a producer's sequence did not fill within the
    /// gap timeout (G6).
    SuspectedLoss {
        /// The producer.
        producer: String,
        /// First missing sequence number.
        first: u64,
        /// Last missing sequence number.
        last: u64,
    },
    /// Failover: a higher-priority broker stayed healthy for
    /// `failback_after` and gets the traffic back.
    Failback {
        /// The route (`None`: the default set).
        route: Option<String>,
        /// The broker that was active.
        from: String,
        /// The broker traffic returns to.
        to: String,
    },
    /// Receipts: no receipt came in time for these messages; they are
    /// published again under the same identity.
    Republished {
        /// How many.
        messages: u64,
    },
}

/// The state of a client: outbox and brokers.
#[derive(Debug, Clone)]
pub struct Status {
    /// Messages queued (accepted, not yet delivered).
    pub queued: u64,
    /// Bytes queued.
    pub bytes: u64,
    /// Age of the oldest queued message.
    pub oldest_age: Option<Duration>,
    /// Drops by reason since the outbox was created.
    pub drops: Vec<(DropReason, u64)>,
    /// Each broker.
    pub brokers: Vec<BrokerStatus>,
    /// Per broker (in the order of `brokers`): queued messages it has not
    /// acknowledged yet.
    pub lag: Vec<u64>,
    /// Per broker (in the order of `brokers`): messages it missed because
    /// it stayed away past the fanout catch-up window (persistent).
    pub missed: Vec<u64>,
    /// Receipts: what awaits them, and what they did so far.
    pub receipts: ReceiptStatus,
}

/// Where end-to-end receipts stand (docs/guarantees.md, "Receipts").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiptStatus {
    /// Messages delivered and awaiting receipts (counted in `queued`).
    pub awaiting: u64,
    /// How long the oldest of them has waited since its first
    /// acknowledgement.
    pub oldest_wait: Option<Duration>,
    /// Receipts counted towards a message's rule (persistent).
    pub counted: u64,
    /// Messages handled: their receipts met their rule (persistent).
    pub handled: u64,
    /// Messages published again for lack of a receipt (persistent).
    pub republished: u64,
    /// A bridge route's outbox: messages it passed on asking for receipts
    /// for their producers (persistent).
    pub relayed: u64,
    /// A bridge route's outbox: receipts it handed back to the producers
    /// behind it (persistent).
    pub returned: u64,
}

impl ReceiptStatus {
    /// From an outbox report.
    pub fn of(r: &steadfast_store::Report, now_ms: u64) -> Self {
        let get = |name: &str| r.counters.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v);
        ReceiptStatus {
            awaiting: r.awaiting.count,
            oldest_wait: r.awaiting.oldest_acked_ms.map(|a| Duration::from_millis(now_ms.saturating_sub(a))),
            counted: get(steadfast_store::RECEIPTS_COUNTED),
            handled: get(steadfast_store::RECEIPTS_HANDLED),
            republished: get(steadfast_store::RECEIPTS_REPUBLISHED),
            relayed: get(crate::bridge::receipts::RELAYED_ASKS),
            returned: get(crate::bridge::receipts::RETURNED),
        }
    }
}

struct Inner {
    cfg: Arc<ClientConfig>,
    /// Joined a busy outbox: no drivers; the holder sends.
    joined: bool,
    /// Messages held for other default broker sets, per set, at open.
    held: Vec<(String, u64)>,
    outbox: Outbox,
    producer: Arc<str>,
    events: broadcast::Sender<Event>,
    first_events: Mutex<Option<broadcast::Receiver<Event>>>,
    brokers: Vec<Arc<BrokerShared>>,
    /// Per broker: the way in for best-effort messages.
    direct: Vec<tokio::sync::mpsc::Sender<Direct>>,
    router: Arc<Router>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The producer id, the broker slots, and what is held for other sets.
type Prepared = (Arc<str>, Vec<u32>, Vec<(String, u64)>);

/// A reliable MQTT publisher. Cheap to clone; all clones share one outbox
/// and one driver per broker.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("config", &self.inner.cfg).finish()
    }
}

impl Client {
    /// Opens the outbox in the configured directory (recovering it if it
    /// was damaged: see the report) and starts connecting in the
    /// background. Never waits for a broker.
    pub async fn open(cfg: ClientConfig) -> Result<(Client, OpenReport), OpenError> {
        cfg.validate()?;
        // Joining a busy outbox waits for its holder to finish opening it
        // (recovery), or takes it if the holder went away meanwhile.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let dir = cfg.outbox_dir.clone();
            let opened = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
                .await
                .map_err(|e| StoreError::WriteFailed(format!("outbox open task failed: {e}")))?;
            let locked = match opened {
                Ok((store, report)) => return Ok((Self::with_store(cfg, Box::new(store)).await?, report)),
                Err(e @ StoreError::Locked { .. }) if cfg.join => e,
                Err(e) => return Err(e.into()),
            };
            let dir = cfg.outbox_dir.clone();
            let guest = tokio::task::spawn_blocking(move || SqliteStore::open_guest(&dir))
                .await
                .map_err(|e| StoreError::WriteFailed(format!("outbox open task failed: {e}")))?;
            match guest {
                Ok(store) => return Ok((Self::joined(cfg, Box::new(store)).await?, OpenReport::default())),
                Err(StoreError::Locked { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(StoreError::Locked { .. }) => return Err(locked.into()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A client beside the process that holds the outbox: it accepts
    /// messages into it and follows them; the holder sends them.
    async fn joined(cfg: ClientConfig, store: Box<dyn Store>) -> Result<Client, OpenError> {
        let outbox = Outbox::start(store, cfg.outbox)?;
        let checked = async {
            // A holder that has just taken the lock writes these a moment
            // later (several `pub` started at once).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let producer = outbox.meta("producer").await?;
                let theirs = outbox.meta("default brokers").await?;
                match (producer, theirs) {
                    (Some(p), Some(set)) if set == cfg.default_set_key() => return Ok(p),
                    (Some(_), Some(theirs)) => {
                        return Err(OpenError::from(ConfigError::JoinedOtherBrokers { theirs }));
                    }
                    _ if tokio::time::Instant::now() >= deadline => {
                        let theirs = "brokers it has not recorded yet".to_owned();
                        return Err(OpenError::from(ConfigError::JoinedOtherBrokers { theirs }));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        };
        let producer = match checked.await {
            Ok(p) => p,
            Err(e) => {
                let o = outbox.clone();
                let _ = tokio::task::spawn_blocking(move || o.close()).await;
                return Err(e);
            }
        };
        Ok(Self::assemble(cfg, outbox, producer.into(), Vec::new(), None, false))
    }

    /// Like [`Client::open`] over any store (the in-memory one in tests).
    pub async fn with_store(cfg: ClientConfig, store: Box<dyn Store>) -> Result<Client, OpenError> {
        cfg.validate()?;
        let outbox = Outbox::start(store, cfg.outbox)?;
        let (producer, slots, held) = match Self::prepare(&cfg, &outbox).await {
            Ok(p) => p,
            Err(e) => {
                // Release the store (and its lock) before reporting: the
                // caller may fix the configuration and open again at once.
                let o = outbox.clone();
                let _ = tokio::task::spawn_blocking(move || o.close()).await;
                return Err(e);
            }
        };
        for (set, queued) in &held {
            tracing::info!(brokers = %set, queued, "messages accepted for other brokers stay queued; they are never sent to these");
        }
        // Messages an earlier run queued with receipts get them even when
        // this run asks for none.
        let asking = match outbox.glance().await {
            Ok(g) => g.awaiting.asking,
            Err(e) => {
                let o = outbox.clone();
                let _ = tokio::task::spawn_blocking(move || o.close()).await;
                return Err(e.into());
            }
        };
        Ok(Self::assemble(cfg, outbox, producer, held, Some(slots), asking))
    }

    /// The client around its outbox: one driver per broker with `slots`
    /// (none for a client that joined a busy outbox).
    fn assemble(
        cfg: ClientConfig,
        outbox: Outbox,
        producer: Arc<str>,
        held: Vec<(String, u64)>,
        slots: Option<Vec<u32>>,
        asking: bool,
    ) -> Client {
        let joined = slots.is_none();
        let urls = if joined { Vec::new() } else { cfg.all_brokers() };
        let slots = slots.unwrap_or_default();
        let cfg = Arc::new(cfg);
        // The first receiver exists before any driver runs, so the first
        // `events()` call sees everything from the start (the first
        // connection included).
        let (events, first_events) = broadcast::channel(4096);
        let (stop, stop_rx) = watch::channel(false);
        let router = Arc::new(Router::new(&cfg, events.clone()));
        let mut tasks = vec![tokio::spawn(router.clone().run(stop_rx.clone()))];
        let mut brokers = Vec::new();
        let mut direct = Vec::new();
        for (index, (url, slot)) in urls.into_iter().zip(slots).enumerate() {
            let shared = Arc::new(BrokerShared::new(&url));
            let (tx, rx) = tokio::sync::mpsc::channel(DIRECT_QUEUE);
            direct.push(tx);
            let place = Place { index, slot, url, router: router.clone(), direct: rx };
            let d = Driver::new(
                cfg.clone(),
                place,
                outbox.clone(),
                producer.clone(),
                events.clone(),
                shared.clone(),
                stop_rx.clone(),
            );
            tasks.push(tokio::spawn(d.run()));
            brokers.push(shared);
        }
        tasks.push(tokio::spawn(forward_drops(outbox.subscribe_drops(), events.clone(), stop_rx.clone())));
        if !joined && (cfg.receipts.is_some() || asking) {
            let listen =
                listen_for_receipts(cfg.clone(), outbox.clone(), producer.clone(), events.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(listen));
        }
        let first_events = Mutex::new(Some(first_events));
        let inner = Inner {
            cfg,
            joined,
            held,
            outbox,
            producer,
            events,
            first_events,
            brokers,
            direct,
            router,
            stop,
            tasks: Mutex::new(tasks),
        };
        let client = Client { inner: Arc::new(inner) };
        let weak = Arc::downgrade(&client.inner);
        let ticker = tokio::spawn(export_every_second(weak, stop_rx));
        client.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(ticker);
        client
    }

    /// True when this client joined an outbox another process holds
    /// ([`ClientConfig::join_busy_outbox`]): it connects to no broker; that
    /// process sends what this one accepts.
    pub fn is_joined(&self) -> bool {
        self.inner.joined
    }

    /// The producer id and the broker slots; refuses an outbox holding
    /// messages of a route this configuration lacks (they would wait for
    /// ever).
    async fn prepare(cfg: &ClientConfig, outbox: &Outbox) -> Result<Prepared, OpenError> {
        let default_producer = format!("{}-{:08x}", cfg.client_id, fastrand::u32(..));
        let producer = match &cfg.producer_id {
            Some(p) => p.clone(),
            None => outbox.meta_or_init("producer", &default_producer).await?,
        };
        if cfg.envelope && producer.len() > Identity::ENVELOPE_MAX_PRODUCER {
            return Err(ConfigError::ProducerIdTooLong { len: producer.len() }.into());
        }
        if cfg.receipts.is_some() {
            let topic = receipt_topic(&cfg.receipt_prefix, &producer);
            validate_topic_name(&topic).map_err(|error| ConfigError::ReceiptTopic { topic, error })?;
        }
        let urls = cfg.all_brokers().iter().map(|u| u.to_string()).collect();
        let set = DefaultSet { key: cfg.default_set_key(), retarget: cfg.other_sets == OtherSets::Retarget };
        let steadfast_store::Configured { slots, queued, held } = outbox.configure(urls, quorums(cfg), set).await?;
        for (route, n) in queued {
            let route = route.filter(|r| !steadfast_store::set_aside(r));
            if let Some(name) = route.filter(|r| !cfg.routes().iter().any(|(n, _)| n == r)) {
                return Err(ConfigError::UnconfiguredRoute { route: name, queued: n }.into());
            }
        }
        if !held.is_empty() && cfg.other_sets == OtherSets::Refuse {
            let queued = held.iter().map(|(_, n)| n).sum();
            let brokers = held.iter().map(|(set, _)| set.as_str()).collect::<Vec<_>>().join("; ");
            return Err(ConfigError::HeldForOtherBrokers { queued, brokers }.into());
        }
        Ok((producer.into(), slots, held))
    }

    /// Checks a message and works out its policy.
    fn check(&self, msg: &Message) -> Result<Policy, PublishError> {
        validate_topic_name(&msg.topic)?;
        if !self.inner.router.knows(msg.route.as_deref()) {
            return Err(PublishError::UnknownRoute(msg.route.clone().unwrap_or_default()));
        }
        msg.props.validate().map_err(PublishError::Properties)?;
        if matches!(msg.receipts, Some(Some(_))) && self.inner.cfg.receipts.is_none() {
            return Err(PublishError::ReceiptsOff);
        }
        if let Some(Some(rule)) = &msg.receipts {
            rule.validate().map_err(PublishError::Receipts)?;
        }
        let policy = msg.policy(self.inner.cfg.policy_for(msg.route.as_deref()));
        policy.validate().map_err(PublishError::Policy)?;
        if self.inner.joined && policy.class == Class::BestEffort {
            return Err(PublishError::JoinedBestEffort);
        }
        // A broker that said it takes no retained message (MQTT 5's
        // Retain Available = 0) ends the link on one: refused before it is
        // accepted, as a message over its size limit is.
        if msg.retain && self.inner.brokers.iter().any(|b| b.retain_unavailable.load(Ordering::Relaxed)) {
            return Err(PublishError::RetainUnavailable { topic: msg.topic.clone() });
        }
        // When a broker told us its limit, refuse what it can never take
        // before accepting it. An approximate size errs on the safe side:
        // fixed header, topic, packet id, properties and identity.
        let max = self.inner.brokers.iter().map(|b| b.max_packet.load(Ordering::Relaxed)).filter(|m| *m > 0).min();
        if let Some(max) = max {
            let size = 5
                + 2
                + msg.topic.len()
                + 2
                + 4
                + msg.props.encoded_len()
                + 32
                + self.inner.producer.len()
                + msg.payload.len();
            if size > max as usize {
                return Err(PublishError::TooLarge { topic: msg.topic.clone(), size, max });
            }
        }
        Ok(policy)
    }

    fn to_new(&self, msg: Message, policy: Policy) -> NewMessage {
        let created_ms = now_ms();
        // Receipts make sense for what is kept until acknowledged, under
        // this producer's identity (a forwarded message keeps its
        // origin's, whose receipts would go to its origin).
        let forwarded = msg.props.user.iter().any(|(k, _)| k == Identity::USER_PROPERTY);
        let receipts = match (&msg.receipts, msg.qos, policy.class) {
            _ if forwarded => None,
            (_, Qos::AtMostOnce, _) | (_, _, Class::BestEffort) => None,
            (Some(own), _, _) => own.as_ref().map(ReceiptRule::to_text),
            (None, _, _) => self.inner.cfg.receipts.as_ref().map(ReceiptRule::to_text),
        };
        let mut new = NewMessage {
            receipts,
            topic: msg.topic,
            payload: msg.payload,
            qos: msg.qos,
            retain: msg.retain,
            props: msg.props,
            created_ms,
            route: msg.route,
            policy: policy.stored(created_ms),
        };
        if new.clears_retained() {
            new.receipts = None;
        }
        new
    }

    /// Queues a message without waiting: the future resolves with its id
    /// once it is on disk. Many enqueued together share one disk sync. A
    /// best-effort message is never stored: it resolves at once with id 0
    /// (sent if a broker that takes it is connected, otherwise counted as
    /// dropped).
    pub fn enqueue(&self, msg: Message) -> Result<AcceptFuture, PublishError> {
        self.queue(msg, None)
    }

    /// Checks and queues a message (with the delivery it came as, for a
    /// bridge); a best-effort one is handed to the drivers instead.
    fn queue(&self, msg: Message, source: Option<Source>) -> Result<AcceptFuture, PublishError> {
        let policy = self.check(&msg)?;
        let new = self.to_new(msg, policy);
        if policy.class == Class::BestEffort {
            self.send_now(new, None);
            return Ok(AcceptFuture::ready(Ok(0)));
        }
        Ok(match source {
            Some(source) => self.inner.outbox.append_from(new, source),
            None => self.inner.outbox.append(new, false).0,
        })
    }

    /// Publishes a message: returns once it is accepted (on disk); the
    /// receipt tells when it is delivered. A best-effort message returns at
    /// once, with sequence number 0 (it has no identity); its receipt tells
    /// whether it was written to a broker or dropped.
    pub async fn publish(&self, msg: Message) -> Result<Receipt, PublishError> {
        self.start_publish(msg)?.accepted().await
    }

    /// Publishes messages in order, each checked and queued before the
    /// next: returns once all are accepted (they share the disk syncs),
    /// with a receipt each. The first message refused ends it with its
    /// error; those before it are accepted.
    pub async fn publish_many(&self, msgs: impl IntoIterator<Item = Message>) -> Result<Vec<Receipt>, PublishError> {
        let mut started = Vec::new();
        let mut refused = None;
        for m in msgs {
            match self.start_publish(m) {
                Ok(s) => started.push(s),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let mut receipts = Vec::with_capacity(started.len());
        for s in started {
            receipts.push(s.accepted().await?);
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(receipts),
        }
    }

    /// Checks and queues a message (what [`Client::publish`] waits on).
    fn start_publish(&self, msg: Message) -> Result<Started, PublishError> {
        let policy = self.check(&msg)?;
        let producer = self.inner.producer.to_string();
        if policy.class == Class::BestEffort {
            let (tx, delivered) = oneshot::channel();
            self.send_now(self.to_new(msg, policy), Some(tx));
            let identity = Identity { producer, seq: 0 };
            return Ok(Started::Sent(Receipt { identity, delivered, handled: None }));
        }
        let new = self.to_new(msg, policy);
        let (accepted, delivered, handled) = if new.receipts.is_some() {
            let (accepted, delivered, handled) = self.inner.outbox.append_awaiting(new);
            (accepted, delivered, Some(handled))
        } else {
            let (accepted, delivered) = self.inner.outbox.append(new, true);
            (accepted, delivered.expect("tracked"), None)
        };
        Ok(Started::Queued { producer, accepted, delivered, handled })
    }

    /// For a bridge: queues a message that arrived from `source` (a
    /// delivery of a source broker), recording that in the same disk sync.
    /// The broker's redelivery of it after a crash (before its
    /// acknowledgement left) is recognised in the same round trip and
    /// resolves to the id the first copy got, and is not queued again
    /// (a first copy still waiting for room, under overflow `block`, is not
    /// on disk yet and not recognised).
    /// Best-effort messages are sent as by [`Client::enqueue`].
    pub fn enqueue_from(&self, msg: Message, source: Source) -> Result<AcceptFuture, PublishError> {
        self.queue(msg, Some(source))
    }

    /// Counts a message that cannot be sent at all (a bridge that cannot
    /// rewrite its topic into a valid one) as dropped, and announces it.
    pub fn count_dropped(&self, reason: DropReason, topic: String) {
        self.inner.outbox.count_drop(reason, topic);
    }

    /// Best-effort: hands the message to every connected broker that would
    /// take it now (the active one in failover, all in fanout, its topic's
    /// in balance); with none, or none with room, it is dropped and
    /// counted (`best-effort`).
    fn send_now(&self, msg: NewMessage, done: Option<oneshot::Sender<Delivery>>) {
        let inner = &self.inner;
        let route = msg.route.as_deref();
        let up =
            |i: usize| inner.brokers[i].status.lock().unwrap_or_else(|e| e.into_inner()).state == LinkState::Connected;
        let targets: Vec<usize> =
            (0..inner.brokers.len()).filter(|&i| up(i) && inner.router.claims(i, route, &msg.topic)).collect();
        let mut done = done;
        let mut handed = false;
        for (n, i) in targets.iter().enumerate() {
            let last = n + 1 == targets.len();
            let d = Direct { msg: msg.clone(), done: if last { done.take() } else { None } };
            match inner.direct[*i].try_send(d) {
                Ok(()) => handed = true,
                Err(e) => {
                    // Full or gone: this broker does not get it. The
                    // receipt stays with the caller when it was the last.
                    if last {
                        done = e.into_inner().done;
                    }
                }
            }
        }
        if !handed {
            inner.outbox.count_drop(DropReason::BestEffort, msg.topic);
        }
        if let Some(done) = done {
            let outcome = if handed { Delivery::Delivered } else { Delivery::Dropped(DropReason::BestEffort) };
            let _ = done.send(outcome);
        }
    }

    /// The producer id carried in every message identity.
    pub fn producer_id(&self) -> &str {
        &self.inner.producer
    }

    /// Subscribes to events (connects, losses, refusals, drops). The first
    /// call receives every event since the client was opened; later calls
    /// receive events from the moment of the call.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        let first = self.inner.first_events.lock().unwrap_or_else(|e| e.into_inner()).take();
        first.unwrap_or_else(|| self.inner.events.subscribe())
    }

    /// The messages moved aside as poison, oldest first, each with its
    /// cause (the reason code of a refusal no retry changes, or the link
    /// closings); `steadfast poison` requeues or deletes them.
    pub async fn poisoned(&self) -> Result<Vec<Poisoned>, StoreError> {
        self.inner.outbox.poisoned().await
    }

    /// The outbox itself (for a bridge's own bookkeeping).
    pub(crate) fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// Watches the outbox (depth, last id).
    pub fn outbox_state(&self) -> watch::Receiver<OutboxState> {
        self.inner.outbox.watch()
    }

    /// Waits until the outbox is empty: everything accepted was delivered
    /// or dropped by its policy (or is held for other brokers, or moved
    /// aside as poison: kept, and never sent in this run). Messages
    /// enqueued before the call count, accepted yet or not.
    pub async fn wait_idle(&self) {
        // A read goes through the writer after every append sent before
        // it: once answered, the state counts them.
        let _ = self.inner.outbox.meta("producer").await;
        self.inner.outbox.wait_idle().await;
    }

    /// Messages the outbox held at open for other default broker sets than
    /// this client's (with [`crate::OtherSets::Keep`]): each set's brokers
    /// (URLs, space-separated) and how many. They stay queued, unsent.
    pub fn held(&self) -> &[(String, u64)] {
        &self.inner.held
    }

    /// Messages still queued (accepted, not delivered) with id above
    /// `after`, oldest first, at most `limit`. Sees every acknowledgement
    /// processed before the call.
    pub async fn queued(&self, after: u64, limit: usize) -> Result<Vec<QueuedMessage>, StoreError> {
        let page = self.inner.outbox.read_after(after, limit, None, None).await?;
        let to = |m: steadfast_store::StoredMessage| {
            // The page's own copy when nothing else holds it; the tail's
            // (and a row it keeps from a page read from SQLite) is shared
            // and copied here.
            let msg = std::sync::Arc::unwrap_or_clone(m.msg);
            QueuedMessage {
                identity: Identity { producer: self.inner.producer.to_string(), seq: m.id },
                topic: msg.topic,
                payload: msg.payload,
                qos: msg.qos,
                created: SystemTime::UNIX_EPOCH + Duration::from_millis(msg.created_ms),
            }
        };
        Ok(page.into_iter().map(to).collect())
    }

    /// Each broker's status.
    pub fn broker_status(&self) -> Vec<BrokerStatus> {
        let router = &self.inner.router;
        let lock = |(i, b): (usize, &Arc<BrokerShared>)| {
            let mut s = b.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
            s.active = router.is_active(i);
            s
        };
        self.inner.brokers.iter().enumerate().map(lock).collect()
    }

    /// Outbox and broker status.
    pub async fn status(&self) -> Result<Status, StoreError> {
        let r = self.inner.outbox.report().await?;
        let now = now_ms();
        let brokers = self.broker_status();
        let of = |url: &str| r.lag.iter().find(|l| l.url == url);
        Ok(Status {
            queued: r.totals.count,
            bytes: r.totals.bytes,
            oldest_age: r.oldest_created_ms.map(|c| Duration::from_millis(now.saturating_sub(c))),
            drops: r.drops.clone(),
            lag: brokers.iter().map(|b| of(&b.url).map_or(0, |l| l.lag)).collect(),
            missed: brokers.iter().map(|b| of(&b.url).map_or(0, |l| l.missed)).collect(),
            receipts: ReceiptStatus::of(&r, now),
            brokers,
        })
    }

    /// Sets the metrics that describe a state (queue depth and bytes,
    /// oldest message age, drops by reason as kept in the outbox across
    /// restarts, each broker's link) from the current figures. The client
    /// does this every second; an exporter can also call it right before
    /// a scrape so that what it serves is exact.
    pub async fn export_metrics(&self) -> Result<(), StoreError> {
        let steadfast_store::Glance { drops, oldest_created_ms: oldest, awaiting } = self.inner.outbox.glance().await?;
        let totals = self.inner.outbox.state().totals;
        let brokers = self.broker_status();
        let age = oldest.map_or(0.0, |c| now_ms().saturating_sub(c) as f64 / 1000.0);
        let snapshot = crate::metrics::Snapshot {
            queued: totals.count,
            bytes: totals.bytes,
            oldest_age_secs: if totals.count == 0 { 0.0 } else { age },
            drops: &drops,
            brokers: &brokers,
            awaiting: awaiting.count,
            oldest_wait_secs: awaiting.oldest_acked_ms.map_or(0.0, |a| now_ms().saturating_sub(a) as f64 / 1000.0),
        };
        crate::metrics::export(&snapshot);
        Ok(())
    }

    /// Stops the drivers (sending DISCONNECT where connected) and closes the
    /// outbox. Queued messages stay on disk for the next run.
    pub async fn close(self) {
        let _ = self.inner.stop.send(true);
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        let outbox = self.inner.outbox.clone();
        let _ = tokio::task::spawn_blocking(move || outbox.close()).await;
    }
}

/// The quorum of each broker set, for the outbox writer (slots are filled
/// in by [`Outbox::configure`]).
fn quorums(cfg: &ClientConfig) -> Vec<Quorum> {
    cfg.sets()
        .map(|(route, set)| Quorum {
            route: route.map(str::to_owned),
            members: set.brokers().iter().map(|b| (0, b.to_string())).collect(),
            need: set.needed_acks(),
            fanout: set.routing() == crate::config::Mode::Fanout,
            catch_up_ms: set.catch_up_for.map(|d| d.as_millis() as u64),
        })
        .collect()
}

/// A session for receipts at `filter` on `cfg`'s brokers: client id
/// `CLIENT_ID-receipts`, persistent, nothing on disk (a receipt that is
/// not applied is not acknowledged, and comes again).
pub(crate) async fn receipts_session(cfg: &ClientConfig, filter: &str) -> Result<Consumer, OpenError> {
    let mut client = cfg.clone();
    client.client_id = format!("{}-receipts", cfg.client_id);
    client.clean_start = false;
    let ccfg = ConsumerConfig::new(client).topic(filter, Qos::AtLeastOnce).inbox(false);
    Consumer::with_store(ccfg, Box::new(steadfast_store::MemoryStore::new())).await
}

/// The receipts of this client's messages: a consumer session of its own
/// (client id `CLIENT_ID-receipts`, persistent, on every broker) on its
/// receipts topic. Each receipt is applied to the outbox, and acknowledged
/// to the broker after that commit.
async fn listen_for_receipts(
    cfg: Arc<ClientConfig>,
    outbox: Outbox,
    producer: Arc<str>,
    events: broadcast::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let topic = receipt_topic(&cfg.receipt_prefix, &producer);
    let consumer = match receipts_session(&cfg, &topic).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, %topic, "cannot listen for receipts; messages that ask for them will be published again until this is fixed");
            return;
        }
    };
    tracing::info!(%topic, "listening for receipts");
    let mut state = outbox.watch();
    let mut requeued = state.borrow_and_update().requeued;
    loop {
        let first = tokio::select! {
            d = consumer.next() => d,
            r = state.changed() => {
                if r.is_err() {
                    break;
                }
                let now = state.borrow_and_update().requeued;
                if now > requeued {
                    let _ = events.send(Event::Republished { messages: now - requeued });
                    requeued = now;
                }
                continue;
            }
            _ = stop.changed() => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while let Some(d) = consumer.try_next() {
            batch.push(d);
        }
        // Every receipt of the batch is handed to the writer at once (one
        // commit for all), then each is acknowledged after it.
        let mut applied = Vec::with_capacity(batch.len());
        for d in batch {
            let applying = match ConsumerReceipt::decode(d.payload()) {
                Ok(r) if *r.producer == *producer => Some(outbox.receipt(r)),
                Ok(r) => {
                    tracing::warn!(producer = %r.producer, by = %r.by, "a receipt for another producer on this producer's receipts topic; ignored");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, topic = d.topic(), "not a receipt; ignored");
                    None
                }
            };
            applied.push((d, applying));
        }
        for (d, applying) in applied {
            if let Some(f) = applying {
                if let Err(e) = f.await {
                    // Not acknowledged: the broker hands it over again.
                    tracing::error!(error = %e, "cannot record a receipt; it comes again");
                    continue;
                }
            }
            d.ack();
        }
    }
    consumer.close().await;
}

/// Runs [`Client::export_metrics`] every second while the client lives.
async fn export_every_second(inner: std::sync::Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
        }
        let Some(inner) = inner.upgrade() else { return };
        let _ = Client { inner }.export_metrics().await;
    }
}

async fn forward_drops(
    mut drops: broadcast::Receiver<Dropped>,
    events: broadcast::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            d = drops.recv() => match d {
                Ok(d) => { let _ = events.send(Event::Dropped(d)); }
                Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!(missed = n, "drop events lagged; counts in status stay exact"),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(pairs: &[(&str, &str)]) -> Properties {
        Properties { user: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Default::default() }
    }

    #[test]
    fn origin_keeps_the_identity_property_in_place_and_replaces_any_other() {
        let id = Identity { producer: "gw-7".into(), seq: 42 };
        let k = Identity::USER_PROPERTY;
        let with = |pairs: &[(&str, &str)]| Message::new("t", b"x".to_vec()).props(user(pairs)).origin(&id).props;
        // The same identity: left where it stands, among the others.
        assert_eq!(with(&[("a", "1"), (k, "gw-7/42"), ("b", "2")]), user(&[("a", "1"), (k, "gw-7/42"), ("b", "2")]));
        // Another: the first replaced in place, any further one dropped.
        assert_eq!(with(&[(k, "other/1"), ("a", "1"), (k, "gw-7/42")]), user(&[(k, "gw-7/42"), ("a", "1")]));
        // None: added at the end.
        assert_eq!(with(&[("a", "1")]), user(&[("a", "1"), (k, "gw-7/42")]));
    }
}
