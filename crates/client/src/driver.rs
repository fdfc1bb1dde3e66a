//! One driver task per broker: the thin I/O loop around the publishing
//! engine ([`PublishSession`]). It connects, hands the engine what the
//! socket, the outbox and the clock bring, carries out what the engine
//! asks (bytes to write, store operations, events), and reconnects with
//! backoff when the link is lost. Every delivery decision is the engine's.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use steadfast_core::engine::{
    Ack, Bound, ConnAckInfo, Connected, Downgrade, End, LinkEnd, PoisonCause, PublishSession, ReadWant, SessionConfig,
    SessionEvent, StoreOp, WindowChange, Wire,
};
use steadfast_core::{reason, AckTimeout, DropReason, Qos};
use steadfast_store::SMALLEST_SIZE_LIMIT;
use steadfast_store::{
    now_ms, AckTiming, BrokerMeta, BrokerRecord, Delivery, NewMessage, Outbox, Page, ReadLimit, StoreError,
    StoredMessage,
};
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{sleep_until, timeout, Instant};

use crate::clock::{self, now};
use crate::config::{BrokerUrl, ClientConfig, ProtocolVersion};
use crate::error::{CloseReason, ConnectError};
use crate::link::{first_version, open_auto, ConnAck, Incoming, Link, Opened, Side};
use crate::reconnect::{self, Reconnect};
use crate::router::Router;
use crate::transport::{AckDebt, Sender};
use crate::{BrokerStatus, Event, LinkState};

/// Messages read from the outbox per page at most, and the bytes of topics
/// and payloads after which a page ends. The queue a link reads ahead of
/// its window holds about one and a half pages: enough to go on sending
/// while the outbox's writer inserts and syncs a large batch of new
/// messages, which a publisher at full speed makes it do (docs/design.md,
/// "Reading the outbox").
const PAGE: ReadLimit = ReadLimit { count: 4096, bytes: 8 << 20 };
/// The window towards an MQTT 3.1.1 broker, which cannot announce its
/// limit on messages in flight, unless `max_inflight` is configured:
/// Mosquitto's default `max_inflight_messages`. Not probed past: past its
/// limit Mosquitto (with `max_queued_messages 0`) drops a QoS 2 message
/// while answering PUBREC to a 3.1.1 client (docs/interop.md).
const WINDOW_311: u16 = 20;

/// State of one broker shared with the [`crate::Client`] handle.
pub(crate) struct BrokerShared {
    pub status: Mutex<BrokerStatus>,
    /// The broker's maximum packet size, 0 while unknown.
    pub max_packet: AtomicU32,
    /// Its last CONNACK said Retain Available = 0 (MQTT 5).
    pub retain_unavailable: std::sync::atomic::AtomicBool,
}

impl BrokerShared {
    pub fn new(url: &BrokerUrl) -> Self {
        let status = BrokerStatus {
            url: url.to_string(),
            state: LinkState::Connecting,
            last_error: None,
            since: SystemTime::now(),
            retry_at: None,
            acked: 0,
            connects: 0,
            sessions_lost: 0,
            refused: 0,
            inflight: 0,
            attempts: 0,
            active: false,
            ack_timeout: Duration::ZERO,
            round_trip: None,
        };
        Self {
            status: Mutex::new(status),
            max_packet: AtomicU32::new(0),
            retain_unavailable: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn update(&self, f: impl FnOnce(&mut BrokerStatus)) -> BrokerStatus {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        s.clone()
    }
}

/// The standing read: a page of one priority, or `None` when messages
/// went back into the queue (read again from the oldest).
type Fetch = Pin<Box<dyn Future<Output = Result<Option<Page>, StoreError>> + Send>>;

/// A best-effort message handed straight to a connected broker's driver:
/// never stored; `done` learns whether it was written.
pub(crate) struct Direct {
    pub msg: NewMessage,
    pub done: Option<oneshot::Sender<Delivery>>,
}

/// A bound on what the client may hand a driver directly: beyond it, a
/// best-effort message is dropped (counted) rather than queued in memory.
pub(crate) const DIRECT_QUEUE: usize = 1024;

pub(crate) struct Driver {
    pub cfg: Arc<ClientConfig>,
    pub url: BrokerUrl,
    /// This broker's place among the client's brokers (for the router).
    index: usize,
    /// Its slot in the outbox (whose acknowledgements are whose).
    slot: u32,
    router: Arc<Router>,
    pub outbox: Outbox,
    pub producer: Arc<str>,
    pub events: broadcast::Sender<Event>,
    pub shared: Arc<BrokerShared>,
    pub stop: watch::Receiver<bool>,
    /// The engine: every decision about what goes on the wire.
    session: PublishSession<StoredMessage>,
    /// Best-effort messages from the client.
    direct: mpsc::Receiver<Direct>,
    direct_closed: bool,
    /// Backoff, logs and events between connections.
    reconnect: Reconnect,
    /// The broker's maximum packet size, this connection.
    max_packet: Option<u32>,
    /// The MQTT version this broker is spoken to in.
    version: ProtocolVersion,
    last_recorded: Instant,
    /// The window learned of this broker by an earlier run, and whether
    /// the window was started (at the first CONNACK).
    learned_window: Option<u16>,
    window_started: bool,
    /// The MQTT 3.1.1 window used when nothing was learned (not a finding
    /// to remember).
    default_311: Option<u16>,
    /// The smallest message (topic and payload bytes) a link to this
    /// broker that stated no maximum packet size was found to close on
    /// (poison), as learned.
    poison_size: Option<u64>,
    /// `poison_size` while the link states no maximum packet size: it
    /// speaks 3.1.1, which cannot, or its MQTT 5 CONNACK did not (rumqttd
    /// closes the link on a PUBLISH over its `max_payload_size`).
    poison_unstated: Option<u64>,
    /// How the last link ended (a size is learned only from closes).
    last_end: LinkEnd,
    /// The last link ended in a way a message too large could explain: a
    /// bare close or reset, or an MQTT 5 DISCONNECT that says so (or says
    /// nothing more precise); not one naming another reason (a topic
    /// name, a quota, a rate).
    closed_on_size: bool,
    /// The producer's receipts topic, carried by every message that asks
    /// for receipts (whichever run queued it).
    receipts: Arc<str>,
    /// The ACK this connection's reads owe TCP, paid by our bytes or
    /// settled before anything that may wait (`AckDebt`).
    ack_debt: Option<AckDebt>,
    /// What the last read held, kept empty between reads so that each
    /// read fills the same vector.
    incoming: Vec<Incoming>,
    /// The acknowledgements of the last read, kept the same way.
    acks: Vec<Ack>,
}

/// Where a driver sits among the client's brokers.
pub(crate) struct Place {
    pub index: usize,
    pub slot: u32,
    pub url: BrokerUrl,
    pub router: Arc<Router>,
    pub direct: mpsc::Receiver<Direct>,
}

impl Driver {
    pub fn new(
        cfg: Arc<ClientConfig>,
        place: Place,
        outbox: Outbox,
        producer: Arc<str>,
        events: broadcast::Sender<Event>,
        shared: Arc<BrokerShared>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let session = PublishSession::new(
            SessionConfig {
                max_inflight: cfg.max_inflight,
                keep_alive: cfg.keep_alive,
                ack_timeout: cfg.ack_timeout,
                refused_pause: cfg.backoff.max,
                page: PAGE,
                poison_after: cfg.poison_after,
            },
            clock::instant(),
        );
        // Every message that asks for receipts carries the topic, whether
        // this run or an earlier one queued it.
        let cfg_receipts = Arc::from(steadfast_core::receipt::receipt_topic(&cfg.receipt_prefix, &producer));
        Self {
            url: place.url,
            index: place.index,
            slot: place.slot,
            router: place.router,
            direct: place.direct,
            direct_closed: false,
            session,
            reconnect: Reconnect::new(cfg.backoff, cfg.seed, ""),
            cfg,
            outbox,
            producer,
            events,
            shared,
            stop,
            max_packet: None,
            version: ProtocolVersion::V5,
            last_recorded: Instant::now(),
            learned_window: None,
            window_started: false,
            default_311: None,
            poison_size: None,
            poison_unstated: None,
            last_end: LinkEnd::Ours,
            closed_on_size: false,
            receipts: cfg_receipts,
            ack_debt: None,
            incoming: Vec::new(),
            acks: Vec::new(),
        }
    }

    fn window_key(&self) -> String {
        BrokerMeta::Window.key(&self.url.to_string())
    }

    /// The first CONNACK sets the window: what an earlier run learned of
    /// this broker, a moderate start for MQTT 3.1.1 (no limit announced),
    /// or the configured maximum.
    fn start_window(&mut self) {
        if std::mem::replace(&mut self.window_started, true) {
            return;
        }
        // Towards 3.1.1 a configured max_inflight is the user's word on the
        // broker's limit; the default is not, and a moderate one is used.
        let v311 = (self.version == ProtocolVersion::V311).then(|| {
            if self.cfg.inflight_set {
                self.cfg.max_inflight
            } else {
                WINDOW_311.min(self.cfg.max_inflight)
            }
        });
        self.default_311 = v311;
        match (self.learned_window, v311) {
            (Some(n), Some(w)) => self.session.learned_window(n.min(w)),
            (Some(n), None) | (None, Some(n)) => self.session.learned_window(n),
            (None, None) => {}
        }
    }

    pub async fn run(mut self) {
        // Without the QoS 2 bindings, a message could go out under a packet
        // id the broker holds for another: never connect before they load.
        while let Err(e) = self.restore_bindings().await {
            tracing::error!(error = %e, "cannot read QoS 2 bindings from the outbox; retrying");
            let delay = self.reconnect.retry_delay();
            if reconnect::wait(delay, &mut self.stop).await {
                self.set_state(LinkState::Stopped, None, None);
                return;
            }
        }
        self.version = first_version(&self.cfg, &self.url, Some(&self.outbox)).await;
        self.learned_window = self.outbox.meta(&self.window_key()).await.ok().flatten().and_then(|v| v.parse().ok());
        self.poison_size = self
            .outbox
            .meta(&BrokerMeta::PoisonSize.key(&self.url.to_string()))
            .await
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
            // Below any limit in use: learned from a close that was not
            // about size (before the floor existed).
            .filter(|&size| size >= SMALLEST_SIZE_LIMIT);
        self.reconnect.reset();
        while !self.stopping() {
            self.set_state(LinkState::Connecting, None, None);
            let mut connected_at = None;
            let result = self.one_link(&mut connected_at).await;
            self.drop_direct();
            // Ok: stopped on request.
            let Err(error) = result else { break };
            self.router.link_down(self.index);
            let text = error.to_string();
            let delay = self.reconnect.after(&self.url.to_string(), error, connected_at, &self.events);
            self.set_state(LinkState::Backoff, Some(text), Some(SystemTime::now() + delay));
            reconnect::wait(delay, &mut self.stop).await;
        }
        self.drop_direct();
        self.set_state(LinkState::Stopped, None, None);
    }

    /// Best-effort messages still waiting when the link is gone are
    /// dropped, counted and announced: they are never kept for later.
    fn drop_direct(&mut self) {
        while let Ok(d) = self.direct.try_recv() {
            self.outbox.count_drop(DropReason::BestEffort, d.msg.topic);
            if let Some(done) = d.done {
                let _ = done.send(Delivery::Dropped(DropReason::BestEffort));
            }
        }
    }

    /// Writes a best-effort message at QoS 0, without an identity.
    fn send_direct(&mut self, link: &mut Link, d: Direct) {
        let msg = NewMessage { qos: Qos::AtMostOnce, ..d.msg };
        let m = StoredMessage { id: 0, msg: std::sync::Arc::new(msg), wire: None, acks: 0, attempts: 0 };
        // The wire holds the link: its buffer is lent apart meanwhile.
        let mut out = std::mem::take(&mut link.out);
        let written = self.wire(link).publish(&m, None, false, &mut out);
        link.out = out;
        let outcome = match written {
            Ok(()) => Delivery::Delivered,
            Err(reason) => {
                self.outbox.count_drop(reason, m.msg.topic.clone());
                Delivery::Dropped(reason)
            }
        };
        if let Some(done) = d.done {
            let _ = done.send(outcome);
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// QoS 2 messages keep their packet id across restarts of the process:
    /// the broker may hold the exchange in its session.
    async fn restore_bindings(&mut self) -> Result<(), StoreError> {
        let bound = self.outbox.bound(self.slot).await?;
        self.session.restore(bound.into_iter().filter_map(|m| m.wire.map(|(pid, stage)| (m, pid, stage))));
        Ok(())
    }

    fn set_state(&self, state: LinkState, error: Option<String>, retry_at: Option<SystemTime>) {
        let inflight = self.session.in_flight();
        let active = self.router.is_active(self.index);
        let (ack_timeout, round_trip) = (self.session.ack_timeout(), self.session.round_trip());
        let s = self.shared.update(|s| {
            s.ack_timeout = ack_timeout;
            s.round_trip = round_trip;
            s.active = active;
            if s.state != state {
                s.since = SystemTime::now();
            }
            s.state = state;
            if error.is_some() || state == LinkState::Connected {
                s.last_error = error;
            }
            s.retry_at = retry_at;
            s.inflight = inflight;
            s.attempts =
                if state == LinkState::Connected { 0 } else { s.attempts + (state == LinkState::Connecting) as u64 };
        });
        self.outbox.record_broker(record(&s));
        self.record_timing();
    }

    /// Keeps the link's ack timeout and round-trip estimate in the outbox
    /// for `steadfast status` (committed with the next batch).
    fn record_timing(&self) {
        let micros = |d: Duration| d.as_micros().min(u64::MAX as u128) as u64;
        let timing = AckTiming {
            timeout_ms: self.session.ack_timeout().as_millis().min(u64::MAX as u128) as u64,
            adaptive: matches!(self.cfg.ack_timeout, AckTimeout::Adaptive { .. }),
            round_trip_us: self.session.round_trip().map(|(rt, dev)| (micros(rt), micros(dev))),
        };
        self.outbox.set_meta(&BrokerMeta::AckTimeout.key(&self.url.to_string()), &timing.to_string());
    }

    /// One connection, until it fails (the error) or a stop is asked (`Ok`).
    async fn one_link(&mut self, connected_at: &mut Option<Instant>) -> Result<(), ConnectError> {
        let r = self.connection(connected_at).await;
        // Whatever the end, nothing more goes out on this link; what the
        // engine still asks of the store is carried out (binds are void).
        self.last_end = link_end(&r);
        self.closed_on_size = could_be_size(&r);
        self.session.handle_link_lost(self.last_end);
        self.flush_detached();
        r
    }

    async fn connection(&mut self, connected_at: &mut Option<Instant>) -> Result<(), ConnectError> {
        let broker = self.url.to_string();
        // A clean start is asked for once per process: a reconnect must
        // resume the session this process started, or in-flight QoS 2
        // exchanges would be lost with it.
        let connects = self.shared.update(|_| {}).connects;
        let clean = self.cfg.clean_start && connects == 0;
        let attempt = open_auto(&self.cfg, &self.url, clean, &mut self.version, Some(&self.outbox), Side::Producer);
        let Some(opened) = reconnect::unless_stopped(attempt, &mut self.stop).await else { return Ok(()) };
        let Opened { mut rd, wr, mut link, ack, after: after_connack, mut buf, round_trip } = opened?;
        *connected_at = Some(Instant::now());
        self.session.handle_round_trip(round_trip);
        // The router decides first whether this broker takes messages now:
        // what it had in flight is resent only if it still does.
        let limit = ack.receive_maximum.unwrap_or(u16::MAX).min(self.cfg.max_inflight);
        self.router.link_up(self.index, limit as usize);
        let resent = self.on_connack(&mut link, ack, clean, connects > 0).await?;
        metrics::counter!("steadfast_resent_total").increment(resent as u64);
        self.on_incoming(&mut link, after_connack).await?;
        self.shared.update(|s| s.connects += 1);
        self.set_state(LinkState::Connected, None, None);
        tracing::info!(%broker, session_present = ack.session_present, resent, "connected");
        self.reconnect.connected();
        let _ = self.events.send(Event::Connected { broker, session_present: ack.session_present, resent });

        let mut out = Sender::new(wr);
        let pumped = self.pump_loop(&mut link, &mut rd, &mut out, &mut buf).await;
        // Its duplicate of the socket goes with the connection.
        self.ack_debt = None;
        let r = match pumped {
            // Some brokers close the connection on a QoS 2 PUBLISH they do
            // not support (NATS): say so, since the broker does not.
            Err(ConnectError::Closed(how)) if self.session.awaits_first_pubrec() => {
                Err(ConnectError::Closed(CloseReason::Qos2InFlight(Box::new(how))))
            }
            r => r,
        };
        if r.is_ok() {
            link.disconnect();
            let _ = out.send(&mut link.out);
            out.finish(Duration::from_secs(1)).await;
        }
        r
    }

    /// Hands the CONNACK to the engine, which resumes or restarts the
    /// session; returns how many messages were sent again.
    async fn on_connack(
        &mut self,
        link: &mut Link,
        ack: ConnAck,
        asked_clean: bool,
        reconnect: bool,
    ) -> Result<usize, ConnectError> {
        self.start_window();
        self.max_packet = ack.maximum_packet_size;
        self.poison_unstated = self.poison_size.filter(|_| self.size_unstated());
        self.shared.max_packet.store(ack.maximum_packet_size.unwrap_or(u32::MAX), Ordering::Relaxed);
        self.shared.retain_unavailable.store(ack.retain_available == Some(false), Ordering::Relaxed);
        let info = ConnAckInfo {
            session_present: ack.session_present,
            receive_maximum: ack.receive_maximum,
            maximum_qos: ack.maximum_qos,
            asked_clean,
            reconnect,
        };
        let (router, index) = (&self.router, self.index);
        let claims = |m: &StoredMessage| router.claims(index, m.msg.route.as_deref(), &m.msg.topic);
        let mut wire = LinkWire {
            link,
            producer: &self.producer,
            max_packet: self.max_packet,
            poison_size: self.poison_unstated,
            receipts: &self.receipts,
        };
        let Connected { resent } = self.session.handle_connack(info, now(), &claims, &mut wire);
        self.carry_out(link).await?;
        Ok(resent)
    }

    async fn pump_loop(
        &mut self,
        link: &mut Link,
        rd: &mut crate::transport::ReadHalf,
        out: &mut Sender,
        buf: &mut [u8],
    ) -> Result<(), ConnectError> {
        let mut fetch: Option<(ReadWant, Fetch)> = None;
        let mut state_rx = self.outbox.watch();
        let mut stop = self.stop.clone();
        let mut generation = self.router.generation();
        let mut requeued = state_rx.borrow().requeued;
        self.ack_debt = Some(rd.defer_acks());
        loop {
            // A change of owners seen before sending: what was read under
            // the old owners must not go out here.
            if generation.has_changed().unwrap_or(false) {
                generation.mark_unchanged();
                fetch = None;
                self.session.rewind();
            }
            self.fill(link).await?;
            self.session.transmit_into(&mut link.out);
            if !link.out.is_empty() && out.send(&mut link.out)? {
                if let Some(debt) = &self.ack_debt {
                    debt.paid();
                }
            }
            let state = *state_rx.borrow_and_update();
            // Messages went back into the queue for lack of receipts:
            // read again from the oldest.
            if state.requeued != requeued {
                requeued = state.requeued;
                fetch = None;
                self.session.rewind();
            }
            // The standing read follows what the engine wants: a new want
            // (a page handled, room made, a rewind) replaces it. One that
            // stands while the engine wants nothing (a QoS 2 bind pending,
            // or no room at any priority) stays, as a read under way did
            // before: its cursors are still the engine's, and the queue
            // takes at most that one page more.
            if let Some(want) = self.read_want() {
                if fetch.as_ref().is_none_or(|(w, _)| *w != want) {
                    fetch = Some((want, self.fetch(want, requeued)));
                }
            }
            let wake = self.session.poll_timeout().map(Instant::from_std);
            // What was read and not answered by a packet is acknowledged
            // before the wait (docs/interop.md, Nagle's algorithm).
            self.settle_ack();
            tokio::select! {
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return Ok(());
                    }
                }
                r = generation.changed() => {
                    if r.is_ok() {
                        // Messages may have changed owner: read everything
                        // this broker has not acknowledged again, and keep
                        // what is ours now. A page on its way is stale.
                        fetch = None;
                        self.session.rewind();
                    }
                }
                _ = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    // What already arrived counts first: after a stall of
                    // this process (a busy machine) the acknowledgements
                    // may be waiting in the socket, and the broker is not
                    // to blame for our lateness.
                    if let Ok(r) = timeout(Duration::ZERO, rd.read(buf)).await {
                        self.on_read(link, r, buf).await?;
                        continue;
                    }
                    let fired = self.session.ack_timeout();
                    let mut wire = LinkWire { link: &mut *link, producer: &self.producer, max_packet: self.max_packet, poison_size: self.poison_unstated, receipts: &self.receipts };
                    self.session.handle_timeout(now(), &mut wire).map_err(|e| self.ended(e, fired))?;
                }
                r = rd.read(buf) => self.on_read(link, r, buf).await?,
                page = async { (&mut fetch.as_mut().expect("guarded").1).await }, if fetch.is_some() => {
                    fetch = None;
                    // None: messages went back into the queue; the loop
                    // rewinds on the new state.
                    if let Some(page) = page.map_err(store_failed)? {
                        let (router, index) = (&self.router, self.index);
                        let claims = |m: &StoredMessage| router.claims(index, m.msg.route.as_deref(), &m.msg.topic);
                        self.session.handle_page(page.messages, page.priority, page.upto, &claims);
                    }
                }
                d = self.direct.recv(), if !self.direct_closed => {
                    match d {
                        Some(d) => self.send_direct(link, d),
                        // The client handle is gone: nothing more comes.
                        None => self.direct_closed = true,
                    }
                }
                r = state_rx.changed(), if fetch.is_none() => {
                    if r.is_err() {
                        return Err(ConnectError::outbox(StoreError::Closed));
                    }
                }
                r = out.progress() => r?,
            }
        }
    }

    /// What the engine wants read next. A broker that takes no new
    /// messages now (a failover standby) reads nothing: it is rewound when
    /// that changes.
    fn read_want(&self) -> Option<ReadWant> {
        if !self.router.is_active(self.index) {
            return None;
        }
        self.session.read_want()
    }

    /// The standing read of `want`: the outbox's writer answers it right
    /// after the commit that gives it something (at once if there is
    /// something already), so that a new message reaches the wire with one
    /// hand-off from the writer thread, not three.
    fn fetch(&self, want: ReadWant, requeued: u64) -> Fetch {
        let outbox = self.outbox.clone();
        let slot = self.slot;
        Box::pin(async move { outbox.next_page(want, requeued, PAGE, slot).await })
    }

    /// Bytes from the socket (`Ok(0)`: the broker closed it).
    async fn on_read(&mut self, link: &mut Link, read: std::io::Result<usize>, buf: &[u8]) -> Result<(), ConnectError> {
        let n = read?;
        if n == 0 {
            return Err(ConnectError::Closed(CloseReason::Eof));
        }
        self.session.handle_received(now());
        let mut incoming = std::mem::take(&mut self.incoming);
        link.receive_into(&buf[..n], &mut incoming);
        let r = self.on_incoming(link, incoming.drain(..)).await;
        self.incoming = incoming;
        r
    }

    /// Lets the engine move messages from its queue onto the wire, and
    /// carries out the store operations that asks for.
    async fn fill(&mut self, link: &mut Link) -> Result<(), ConnectError> {
        let (router, index) = (&self.router, self.index);
        let claims = |m: &StoredMessage| router.claims(index, m.msg.route.as_deref(), &m.msg.topic);
        let mut wire = LinkWire {
            link: &mut *link,
            producer: &self.producer,
            max_packet: self.max_packet,
            poison_size: self.poison_unstated,
            receipts: &self.receipts,
        };
        self.session.fill(now(), &claims, &mut wire);
        let r = self.carry_out(link).await;
        let inflight = self.session.in_flight();
        self.shared.update(|s| s.inflight = inflight);
        self.router.progress(self.index, inflight);
        r
    }

    /// Handles what the broker sent. Acknowledgements are applied even when
    /// a later packet in the same read ends the link.
    async fn on_incoming(
        &mut self,
        link: &mut Link,
        incoming: impl IntoIterator<Item = Incoming>,
    ) -> Result<(), ConnectError> {
        let mut acks = std::mem::take(&mut self.acks);
        let mut end = None;
        for inc in incoming {
            match inc {
                Incoming::Ack(ack) => acks.push(ack),
                Incoming::Disconnect { reason } => {
                    end = Some(ConnectError::Closed(CloseReason::Disconnect(reason)));
                    break;
                }
                Incoming::ConnAck(_) => {
                    end = Some(ConnectError::Protocol("a second CONNACK arrived".into()));
                    break;
                }
                Incoming::Broken(e) => {
                    end = Some(e);
                    break;
                }
                Incoming::Publish(_)
                | Incoming::PubRel { .. }
                | Incoming::SubAck { .. }
                | Incoming::PingResp
                | Incoming::Other => {}
            }
        }
        let r = self.session.handle_acks(acks.drain(..), now());
        self.acks = acks;
        self.carry_out(link).await?;
        r.map_err(|e| self.ended(e, self.session.ack_timeout()))?;
        end.map_or(Ok(()), Err)
    }

    /// Carries out the store operations the engine asked for, in order,
    /// and reports its events. A bind is awaited and its outcome handed
    /// back; if it failed, the link ends with the store's error.
    async fn carry_out(&mut self, link: &mut Link) -> Result<(), ConnectError> {
        let mut failed = None;
        while let Some(op) = self.session.poll_store() {
            match op {
                StoreOp::Bind(updates) => {
                    // A commit may take a while: the broker is not to wait
                    // for our ACK meanwhile.
                    self.settle_ack();
                    let r = self.outbox.set_wire(self.slot, updates).await;
                    let bound = match &r {
                        Ok(gone) => Bound::Written { gone: gone.clone() },
                        Err(_) => Bound::Failed,
                    };
                    let mut wire = LinkWire {
                        link: &mut *link,
                        producer: &self.producer,
                        max_packet: self.max_packet,
                        poison_size: self.poison_unstated,
                        receipts: &self.receipts,
                    };
                    self.session.handle_bound(bound, now(), &mut wire);
                    if let Err(e) = r {
                        failed = Some(e);
                        break;
                    }
                }
                op => self.apply(op),
            }
        }
        self.report();
        failed.map_or(Ok(()), |e| Err(store_failed(e)))
    }

    /// Acknowledges at once what this connection read and no bytes of ours
    /// paid for (`AckDebt::settle`).
    fn settle_ack(&self) {
        if let Some(debt) = &self.ack_debt {
            debt.settle();
        }
    }

    /// Store operations left when the link is gone (binds are void then).
    fn flush_detached(&mut self) {
        while let Some(op) = self.session.poll_store() {
            self.apply(op);
        }
        self.report();
    }

    /// A store operation that needs no answer.
    fn apply(&self, op: StoreOp) {
        match op {
            StoreOp::Ack(ids) => self.outbox.ack(self.slot, ids),
            StoreOp::Drop(ids, reason) => self.outbox.remove(ids, Delivery::Dropped(reason)),
            StoreOp::Attempted(ids) => self.outbox.attempted(ids),
            StoreOp::Unbind(ids) => self.outbox.unbind(self.slot, ids),
            StoreOp::Poison(id, cause) => self.outbox.poison(self.slot, id, cause),
            StoreOp::Bind(updates) => {
                tracing::debug!(n = updates.len(), "a QoS 2 binding of a link that ended is not written");
            }
        }
    }

    /// Logs, counts and announces what the engine reported.
    fn report(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                SessionEvent::Acked(n) => self.acked(n),
                SessionEvent::Downgraded(Downgrade::MaximumQos) => {
                    tracing::warn!(broker = %self.url, "the broker takes QoS 1 at most (Maximum QoS in its CONNACK): QoS 2 messages go to it at QoS 1");
                }
                SessionEvent::Downgraded(Downgrade::ClosesLink) => {
                    tracing::warn!(
                        broker = %self.url,
                        "the broker ended the link each time a QoS 2 message was alone in flight and never answered one with PUBREC: it does not do QoS 2 (NATS does not); QoS 2 messages go to it at QoS 1 (a consumer may see one twice; its inbox removes the copy)"
                    );
                }
                SessionEvent::Window(WindowChange { from, to, in_flight, ceiling }) => {
                    let upto = ceiling.map_or(String::new(), |c| format!(" up to {c}"));
                    tracing::warn!(
                        broker = %self.url, from, to, in_flight, ?ceiling,
                        "the broker ended the link with many messages in flight (a limit it does not announce?): at most {to} in flight from now on, growing by one per {to} acknowledged{upto}"
                    );
                }
                SessionEvent::CeilingHeld(c) => {
                    // Written once every message in flight at the closes
                    // went through: a poison message's chase, which
                    // narrows the window to one, writes nothing.
                    if Some(c) != self.default_311 {
                        tracing::info!(broker = %self.url, ceiling = c, "the window's ceiling held: at most {c} in flight to this broker, remembered for the next run");
                        self.outbox.set_meta(&self.window_key(), &c.to_string());
                    }
                }
                SessionEvent::WindowRestored(n) => {
                    tracing::info!(broker = %self.url, window = n, "the links that failed were one message's doing: the window is back to {n}");
                    // Nothing learned (or only the 3.1.1 default): an empty
                    // value reads as none.
                    let ceiling = self.session.window_ceiling().filter(|c| Some(*c) != self.default_311);
                    self.outbox.set_meta(&self.window_key(), &ceiling.map(|c| c.to_string()).unwrap_or_default());
                }
                SessionEvent::Poisoned { message, cause } => self.poisoned(&message, cause),
                SessionEvent::Downgraded(Downgrade::PubAck) => {
                    tracing::warn!(
                        broker = %self.url,
                        "the broker answered a QoS 2 PUBLISH with PUBACK: it does not do QoS 2 and took the message at QoS 1 (a consumer may see it twice; its inbox removes the copy); publish at QoS 1 to this broker"
                    );
                }
                SessionEvent::Refused(m, code) => {
                    let reason = reason::describe(code);
                    tracing::warn!(broker = %self.url, id = m.id, topic = %m.msg.topic, %reason, retry_in = ?self.cfg.backoff.max, "the broker refused a message with a code a retry may change; it stays queued and is sent again");
                    self.shared.update(|s| s.refused += 1);
                    let broker = self.url.to_string();
                    let _ = self.events.send(Event::Refused { broker, id: m.id, topic: m.msg.topic.clone(), reason });
                }
                SessionEvent::Republished(n) => metrics::counter!("steadfast_resent_total").increment(n),
                SessionEvent::SessionLost { in_flight } => {
                    self.shared.update(|s| s.sessions_lost += 1);
                    let broker = self.url.to_string();
                    let queued = self.outbox.state().totals.count;
                    tracing::warn!(%broker, in_flight, queued, "the broker lost our session: publishing every unacknowledged message again");
                    let _ = self.events.send(Event::SessionLost { broker, republish: queued });
                }
                SessionEvent::Stranded { id, reason } => {
                    tracing::error!(broker = %self.url, id, reason = reason.as_str(), "a QoS 2 message in flight can no longer be sent to this broker (its maximum packet size shrank?); its packet id stays reserved until the broker loses the session");
                }
                SessionEvent::Missing(id) => {
                    tracing::error!(id, "in-flight message missing; it will be read again");
                }
            }
        }
    }

    /// A message moved aside as poison: said, with its cause, in the log
    /// (the outbox's drop event follows once it is on disk). A close by a
    /// broker that states no maximum packet size on a message larger than
    /// any it took teaches a size.
    fn poisoned(&mut self, message: &StoredMessage, cause: PoisonCause) {
        let (id, topic) = (message.id, &message.msg.topic);
        let kept = "kept; `steadfast poison` lists, requeues or deletes it";
        match cause {
            PoisonCause::Size => {
                let size = message.msg.size();
                tracing::error!(
                    broker = %self.url, id, %topic, size,
                    "moved aside as poison at once: this broker, which states no maximum packet size, closed the link on a message this large before ({kept})"
                );
            }
            PoisonCause::Refused(code) => {
                let reason = reason::describe(code);
                tracing::error!(
                    broker = %self.url, id, %topic, %reason,
                    "the broker refused a message with a code no retry changes: not sent to it again; moved aside as poison ({kept}) so that the messages behind it go on, unless other brokers of its fanout may still meet its quorum"
                );
            }
            PoisonCause::Closed(failures) => {
                tracing::error!(
                    broker = %self.url, id, %topic, failures,
                    "the broker ended the link {failures} times in a row with this message alone in flight: moved aside as poison ({kept}) so that the messages behind it go on"
                );
                self.learn_size(message.msg.size());
            }
        }
    }

    /// A poison message the broker closed the link on: towards a broker
    /// that states no maximum packet size (MQTT 3.1.1 cannot; an MQTT 5
    /// CONNACK may leave it out), its size is most likely that limit, and
    /// messages this large go aside at once.
    fn learn_size(&mut self, size: u64) {
        // Only the broker closing on it tells of a size; an ack timeout
        // does not. Nor does a close on a message no larger than one it
        // took, or smaller than any limit on size seen in use: a 3.1.1
        // broker closes on what it refuses (a topic it denies, retain it
        // does not offer), and a size learned from that put every later
        // message aside.
        let closed = self.last_end == LinkEnd::Closed && self.closed_on_size;
        let sized = size > self.session.largest_acked() && size >= SMALLEST_SIZE_LIMIT;
        if closed && sized && self.size_unstated() && self.poison_size.is_none_or(|p| size < p) {
            self.poison_size = Some(size);
            self.poison_unstated = Some(size);
            self.outbox.set_meta(&BrokerMeta::PoisonSize.key(&self.url.to_string()), &size.to_string());
            tracing::warn!(broker = %self.url, size, "from now on messages of {size} bytes (topic and payload) or more are moved aside at once for this broker, which states no maximum packet size; remembered in the outbox (`steadfast poison --requeue` forgets it)");
        }
    }

    /// This link's broker stated no maximum packet size: it speaks MQTT
    /// 3.1.1, which cannot, or its MQTT 5 CONNACK did not.
    fn size_unstated(&self) -> bool {
        self.version == ProtocolVersion::V311 || self.max_packet.is_none()
    }

    /// Messages acknowledged: the router and the status learn of it.
    fn acked(&mut self, n: u64) {
        let inflight = self.session.in_flight();
        self.router.progress(self.index, inflight);
        let active = self.router.is_active(self.index);
        let (ack_timeout, round_trip) = (self.session.ack_timeout(), self.session.round_trip());
        let s = self.shared.update(|s| {
            s.acked += n;
            s.inflight = inflight;
            s.active = active;
            s.ack_timeout = ack_timeout;
            s.round_trip = round_trip;
        });
        if self.last_recorded.elapsed() > Duration::from_secs(1) {
            self.last_recorded = Instant::now();
            self.outbox.record_broker(record(&s));
            self.record_timing();
        }
    }

    /// The error that ends the link, for the engine's reason.
    fn ended(&self, end: End, ack_timeout: Duration) -> ConnectError {
        match end {
            End::Stray { packet, pid, kind } => ConnectError::Protocol(format!(
                "the broker sent a {packet} for packet id {pid}, which has no {kind} in flight (a broker bug); reconnecting"
            )),
            End::AckTimeout => ConnectError::AckTimeout(ack_timeout),
            End::DeadLink => ConnectError::DeadLink(self.cfg.keep_alive),
        }
    }

    fn wire<'a>(&'a self, link: &'a mut Link) -> LinkWire<'a> {
        LinkWire {
            link,
            producer: &self.producer,
            max_packet: self.max_packet,
            poison_size: self.poison_unstated,
            receipts: &self.receipts,
        }
    }
}

/// The engine's view of a link's codec.
struct LinkWire<'a> {
    link: &'a mut Link,
    producer: &'a str,
    max_packet: Option<u32>,
    /// MQTT 3.1.1: messages this large or larger are poison (learned).
    poison_size: Option<u64>,
    /// The producer's receipts topic, for messages that ask for receipts.
    receipts: &'a str,
}

impl Wire<StoredMessage> for LinkWire<'_> {
    fn publish(&mut self, m: &StoredMessage, pid: Option<u16>, dup: bool, out: &mut Vec<u8>) -> Result<(), DropReason> {
        if self.poison_size.is_some_and(|s| m.msg.size() >= s) {
            return Err(DropReason::Poison);
        }
        let start = out.len();
        if let Err(e) = self.link.encode_publish_into(out, m, self.producer, Some(self.receipts), pid, dup) {
            tracing::error!(id = m.id, topic = %m.msg.topic, error = %e, "message cannot be encoded; dropped");
            return Err(DropReason::Invalid);
        }
        let size = out.len() - start;
        match self.max_packet {
            Some(max) if size as u64 > max as u64 => {
                out.truncate(start);
                tracing::error!(id = m.id, topic = %m.msg.topic, size, max, "message larger than the broker's maximum packet size; dropped");
                Err(DropReason::TooLarge)
            }
            _ => Ok(()),
        }
    }

    fn pubrel(&mut self, pid: u16) -> Vec<u8> {
        self.link.encoded("PUBREL", |l| l.pubrel(pid))
    }

    fn ping(&mut self) -> Vec<u8> {
        self.link.encoded("PINGREQ", Link::ping)
    }
}

/// How a link's end bears on the messages in flight: a broker that
/// closed it or broke it, the engine's own verdict, or ours.
fn link_end(r: &Result<(), ConnectError>) -> LinkEnd {
    match r {
        Err(ConnectError::AckTimeout(_)) => LinkEnd::Ended(End::AckTimeout),
        Err(ConnectError::DeadLink(_)) => LinkEnd::Ended(End::DeadLink),
        // A DISCONNECT counts when its reason is about what was sent; a
        // session taken over, a shutdown or a busy server say nothing of it.
        Err(ConnectError::Closed(CloseReason::Disconnect(reason))) => {
            const ABOUT_A_MESSAGE: [&str; 10] = [
                "MalformedPacket",
                "ProtocolError",
                "ImplementationSpecificError",
                "UnspecifiedError",
                "TopicNameInvalid",
                "ReceiveMaximumExceeded",
                "PacketTooLarge",
                "MessageRateTooHigh",
                "QuotaExceeded",
                "PayloadFormatInvalid",
            ];
            if ABOUT_A_MESSAGE.iter().any(|r| reason.contains(r)) {
                LinkEnd::Closed
            } else {
                LinkEnd::Ours
            }
        }
        // The broker closed the connection or reset it: a 3.1.1 broker's
        // only way to refuse what it was sent.
        Err(ConnectError::Closed(_) | ConnectError::Io(_) | ConnectError::WriterStopped) => LinkEnd::Closed,
        // Our stop, our store, our codec, a broker's stray acknowledgement
        // or oversized packet: nothing to do with one message in flight.
        Ok(()) | Err(_) => LinkEnd::Ours,
    }
}

/// A link's end a message too large could explain ([`Driver::learn_size`]).
fn could_be_size(r: &Result<(), ConnectError>) -> bool {
    match r {
        Err(ConnectError::Closed(CloseReason::Disconnect(reason))) => {
            ["PacketTooLarge", "UnspecifiedError", "ImplementationSpecificError"].iter().any(|r| reason.contains(r))
        }
        Err(ConnectError::Closed(_) | ConnectError::Io(_) | ConnectError::WriterStopped) => true,
        _ => false,
    }
}

fn store_failed(e: StoreError) -> ConnectError {
    ConnectError::outbox(e)
}

fn record(s: &BrokerStatus) -> BrokerRecord {
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_else(|_| now_ms())
    };
    BrokerRecord {
        url: s.url.clone(),
        state: s.state.as_str().to_owned(),
        last_error: s.last_error.clone(),
        since_ms: ms(s.since),
        retry_ms: s.retry_at.map(ms),
        acked: s.acked,
        connects: s.connects,
        active: s.active,
    }
}
