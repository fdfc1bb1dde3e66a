//! One driver task per broker: connects, resumes, streams the outbox into
//! the send window, and reconnects with backoff when the link is lost.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use steadfast_core::{Backoff, DropReason, Inflight, KeepAlive, KeepAliveAction, Qos, Resume, SendWindow, Stage};
use steadfast_store::{
    now_ms, BrokerRecord, Delivery, NewMessage, Outbox, OutboxState, StoreError, StoredMessage, PRIORITIES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::config::{BrokerUrl, ClientConfig};
use crate::error::{CloseReason, ConnectError};
use crate::link::{open_session, ConnAck, Incoming, Link, Opened};
use crate::router::Router;
use crate::{BrokerStatus, Event, LinkState};

/// Messages read from the outbox per page.
const PAGE: usize = 1024;
/// Fetch the next page when fewer than this many wait in memory.
const LOW_WATER: usize = 512;

/// State of one broker shared with the [`crate::Client`] handle.
pub(crate) struct BrokerShared {
    pub status: Mutex<BrokerStatus>,
    /// The broker's maximum packet size, 0 while unknown.
    pub max_packet: AtomicU32,
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
        };
        Self { status: Mutex::new(status), max_packet: AtomicU32::new(0) }
    }

    fn update(&self, f: impl FnOnce(&mut BrokerStatus)) -> BrokerStatus {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        s.clone()
    }
}

/// A page of one priority, and the last id of that priority committed
/// before it was read.
type Fetch = Pin<Box<dyn Future<Output = Result<(Vec<StoredMessage>, usize, u64), StoreError>> + Send>>;

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
    window: SendWindow,
    /// Contents of what is in flight, for resends.
    inflight: HashMap<u64, StoredMessage>,
    /// Read from the outbox, not yet on the wire.
    queue: VecDeque<StoredMessage>,
    /// Highest outbox id read so far, per priority (each is read on its
    /// own, highest first).
    cursors: [u64; PRIORITIES],
    /// Per priority, ids above its cursor that already left (restored QoS 2
    /// exchanges that completed): a page read before they left must not
    /// queue them again.
    done_ahead: [BTreeSet<u64>; PRIORITIES],
    /// Best-effort messages from the client.
    direct: mpsc::Receiver<Direct>,
    direct_closed: bool,
    /// Messages the broker refused (error reason code), with the time they
    /// go back to the front of the queue. They stay in the outbox meanwhile.
    retry: VecDeque<(Instant, StoredMessage)>,
    backoff: Backoff,
    rng: fastrand::Rng,
    max_packet: Option<u32>,
    last_recorded: Instant,
    last_logged: Option<String>,
    /// The broker downgraded a QoS 2 message to QoS 1 (warned once).
    warned_downgrade: bool,
    /// A PUBREC arrived on this connection (the broker does QoS 2).
    pubrec_seen: bool,
    /// MQTT 5: the highest QoS the broker takes (CONNACK), this connection.
    max_qos: Option<u8>,
    /// When the window last made progress (an acknowledgement, or the
    /// first message into an empty window): the ack timeout counts from it.
    progress_at: Instant,
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
        let rng = match cfg.seed {
            Some(s) => fastrand::Rng::with_seed(s),
            None => fastrand::Rng::new(),
        };
        Self {
            url: place.url,
            index: place.index,
            slot: place.slot,
            router: place.router,
            direct: place.direct,
            direct_closed: false,
            progress_at: Instant::now(),
            window: SendWindow::new(cfg.max_inflight),
            backoff: Backoff::new(cfg.backoff),
            cfg,
            outbox,
            producer,
            events,
            shared,
            stop,
            inflight: HashMap::new(),
            queue: VecDeque::new(),
            cursors: [0; PRIORITIES],
            done_ahead: Default::default(),
            retry: VecDeque::new(),
            rng,
            max_packet: None,
            last_recorded: Instant::now(),
            last_logged: None,
            warned_downgrade: false,
            pubrec_seen: false,
            max_qos: None,
        }
    }

    pub async fn run(mut self) {
        // Without the QoS 2 bindings, a message could go out under a packet
        // id the broker holds for another: never connect before they load.
        while let Err(e) = self.restore_bindings().await {
            tracing::error!(error = %e, "cannot read QoS 2 bindings from the outbox; retrying");
            let delay = self.backoff.next_delay(&mut self.rng, Instant::now().into_std());
            tokio::select! {
                _ = sleep(delay) => {}
                _ = self.stop.changed() => {}
            }
            if self.stopping() {
                self.set_state(LinkState::Stopped, None, None);
                return;
            }
        }
        self.backoff = Backoff::new(self.cfg.backoff);
        loop {
            if self.stopping() {
                break;
            }
            self.set_state(LinkState::Connecting, None, None);
            let mut connected_at = None;
            let result = self.session(&mut connected_at).await;
            self.drop_direct();
            let error = match result {
                // Stopped on request.
                Ok(()) => break,
                Err(e) => e,
            };
            self.router.link_down(self.index);
            if let Some(at) = connected_at {
                self.backoff.link_lost_after(at.elapsed());
            }
            let delay = self.backoff.next_delay(&mut self.rng, Instant::now().into_std());
            let retry_at = SystemTime::now() + delay;
            self.set_state(LinkState::Backoff, Some(error.to_string()), Some(retry_at));
            let broker = self.url.to_string();
            if connected_at.is_some() {
                tracing::warn!(%broker, error = %error, retry_in = ?delay, "link lost; reconnecting");
                let _ = self.events.send(Event::Disconnected { broker, error, retry_in: delay });
            } else {
                // Said once per distinct error, not on every attempt.
                let text = error.to_string();
                if self.last_logged.as_deref() != Some(text.as_str()) {
                    tracing::warn!(%broker, error = %error, retry_in = ?delay, "cannot connect; will keep retrying");
                    self.last_logged = Some(text);
                } else {
                    tracing::debug!(%broker, error = %error, retry_in = ?delay, "cannot connect; will retry");
                }
                let _ = self.events.send(Event::ConnectFailed { broker, error, retry_in: delay });
            }
            tokio::select! {
                _ = sleep(delay) => {}
                _ = self.stop.changed() => {}
            }
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
        let m = StoredMessage { id: 0, msg, wire: None, acks: 0, attempts: 0 };
        let outcome = match self.encode(link, &m, None) {
            Ok(bytes) => {
                link.out.extend_from_slice(&bytes);
                Delivery::Delivered
            }
            Err(reason) => {
                self.outbox.count_drop(reason, m.msg.topic);
                Delivery::Dropped(reason)
            }
        };
        if let Some(done) = d.done {
            let _ = done.send(outcome);
        }
    }

    /// Why `m` must leave instead of being sent (again): its deadline
    /// passed, or its retry budget is spent.
    fn spent(m: &StoredMessage) -> Option<DropReason> {
        let p = &m.msg.policy;
        if p.expires_ms.is_some_and(|e| e <= now_ms()) {
            return Some(DropReason::Expired);
        }
        if p.max_attempts.is_some_and(|max| m.attempts >= max) {
            return Some(DropReason::Budget);
        }
        None
    }

    /// The priority to read next: the highest with unread messages, as
    /// long as the queue has room for it (the lowest waits for the queue
    /// to run low, higher ones only for a hard cap).
    fn next_read(&self, state: &OutboxState) -> Option<usize> {
        (0..PRIORITIES).rev().find(|&p| {
            let room = if p == 0 { LOW_WATER } else { 2 * PAGE };
            self.cursors[p] < state.newest[p] && self.queue.len() < room
        })
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// QoS 2 messages keep their packet id across restarts of the process:
    /// the broker may hold the exchange in its session.
    async fn restore_bindings(&mut self) -> Result<(), StoreError> {
        self.window = SendWindow::new(self.cfg.max_inflight);
        self.inflight.clear();
        for m in self.outbox.bound(self.slot).await? {
            let Some((pid, stage)) = m.wire else { continue };
            self.window.restore(pid, Inflight { id: m.id, qos: Qos::ExactlyOnce, stage });
            self.inflight.insert(m.id, m);
        }
        Ok(())
    }

    fn set_state(&self, state: LinkState, error: Option<String>, retry_at: Option<SystemTime>) {
        let inflight = self.window.len();
        let active = self.router.is_active(self.index);
        let s = self.shared.update(|s| {
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
    }

    /// One connection, until it fails (the error) or a stop is asked (`Ok`).
    async fn session(&mut self, connected_at: &mut Option<Instant>) -> Result<(), ConnectError> {
        let broker = self.url.to_string();
        // A clean start is asked for once per process: a reconnect must
        // resume the session this process started, or in-flight QoS 2
        // exchanges would be lost with it.
        let clean = self.cfg.clean_start && self.shared.update(|_| {}).connects == 0;
        let Opened { mut rd, mut wr, mut link, ack, after: after_connack, mut buf } =
            open_session(&self.cfg, &self.url, clean).await?;
        *connected_at = Some(Instant::now());
        self.pubrec_seen = false;
        // The router decides first whether this broker takes messages now:
        // what it had in flight is resent only if it still does.
        let limit = ack.receive_maximum.unwrap_or(u16::MAX).min(self.cfg.max_inflight);
        self.router.link_up(self.index, limit as usize);
        let resent = self.on_connack(&mut link, ack).await?;
        metrics::counter!("steadfast_resent_total").increment(resent as u64);
        self.on_incoming(&mut link, after_connack).await?;
        self.shared.update(|s| s.connects += 1);
        self.set_state(LinkState::Connected, None, None);
        tracing::info!(%broker, session_present = ack.session_present, resent, "connected");
        self.last_logged = None;
        let _ = self.events.send(Event::Connected { broker, session_present: ack.session_present, resent });

        let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut writer = tokio::spawn(async move {
            while let Some(bytes) = wrx.recv().await {
                wr.write_all(&bytes).await?;
                // TLS and WebSocket buffer: flush once the queue is empty.
                if wrx.is_empty() {
                    wr.flush().await?;
                }
            }
            wr.shutdown().await
        });
        let r = match self.pump_loop(&mut link, &mut rd, &wtx, &mut writer, &mut buf).await {
            // Some brokers close the connection on a QoS 2 PUBLISH they do
            // not support (NATS): say so, since the broker does not.
            Err(ConnectError::Closed(how)) if !self.pubrec_seen && self.window.awaits_pubrec() => {
                Err(ConnectError::Closed(CloseReason::Qos2InFlight(Box::new(how))))
            }
            r => r,
        };
        if r.is_ok() {
            link.disconnect();
            let _ = wtx.send(std::mem::take(&mut link.out));
            drop(wtx);
            let _ = timeout(Duration::from_secs(1), &mut writer).await;
        }
        writer.abort();
        r
    }

    /// Resumes or restarts the session after CONNACK; returns how many
    /// messages were sent again. Works on a copy of the window so that a
    /// failure half-way (a store error) leaves the state as it was, to be
    /// decided again at the next CONNACK.
    async fn on_connack(&mut self, link: &mut Link, ack: ConnAck) -> Result<usize, ConnectError> {
        let limit = ack.receive_maximum.unwrap_or(u16::MAX).min(self.cfg.max_inflight);
        self.max_packet = ack.maximum_packet_size;
        self.max_qos = ack.maximum_qos;
        self.shared.max_packet.store(ack.maximum_packet_size.unwrap_or(u32::MAX), Ordering::Relaxed);
        let mut window = self.window.clone();
        window.set_limit(limit);
        match window.on_connected(ack.session_present) {
            Resume::Resend(list) => {
                let mut resent = 0;
                let mut requeue = Vec::new();
                let mut taken_over = Vec::new();
                let mut spent = Vec::new();
                let mut budgeted = Vec::new();
                for (n, (pid, e)) in list.iter().enumerate() {
                    let Some(m) = self.inflight.get(&e.id) else {
                        // Cannot happen (window and contents change together);
                        // never resend blind: free the id, re-read the message.
                        tracing::error!(id = e.id, pid, "in-flight message missing; it will be read again");
                        window.release(*pid);
                        for c in &mut self.cursors {
                            *c = (*c).min(e.id.saturating_sub(1));
                        }
                        self.queue.clear();
                        continue;
                    };
                    // A QoS 1 message that another broker took over (a
                    // failover while this link was down) is not sent
                    // here again; QoS 2 exchanges always finish where they
                    // began, their packet id is held by this broker.
                    if e.qos == Qos::AtLeastOnce && !self.claims(m) {
                        window.release(*pid);
                        taken_over.push(e.id);
                        continue;
                    }
                    // A broker whose receive maximum shrank gets the QoS 1
                    // messages beyond it later, as new sends.
                    if n >= limit as usize && e.qos == Qos::AtLeastOnce {
                        window.release(*pid);
                        requeue.push(m.clone());
                        continue;
                    }
                    // A QoS 1 message past its deadline or budget leaves
                    // instead (a QoS 2 exchange under way always finishes).
                    if e.qos == Qos::AtLeastOnce {
                        if let Some(reason) = Self::spent(m) {
                            window.release(*pid);
                            spent.push((e.id, reason));
                            continue;
                        }
                        budgeted.extend(m.msg.policy.max_attempts.map(|_| e.id));
                    }
                    match e.stage {
                        Stage::Published => link.publish(m, &self.producer, Some(*pid), true)?,
                        Stage::Released => link.pubrel(*pid)?,
                    };
                    resent += 1;
                }
                for m in requeue.into_iter().rev() {
                    self.inflight.remove(&m.id);
                    self.queue.push_front(m);
                }
                for id in taken_over {
                    self.inflight.remove(&id);
                }
                for (id, reason) in spent {
                    self.inflight.remove(&id);
                    self.outbox.remove(vec![id], Delivery::Dropped(reason));
                }
                for id in &budgeted {
                    if let Some(m) = self.inflight.get_mut(id) {
                        m.attempts += 1;
                    }
                }
                self.outbox.attempted(budgeted);
                self.window = window;
                Ok(resent)
            }
            Resume::Restart { delivered } => {
                // Bindings of QoS 2 messages are void in the new session;
                // clear them durably before any of them is bound again.
                let stale: Vec<_> =
                    self.inflight.values().filter(|m| m.msg.qos == Qos::ExactlyOnce).map(|m| (m.id, None)).collect();
                if !stale.is_empty() {
                    self.outbox.set_wire(self.slot, stale).await.map_err(store_failed)?;
                }
                self.window = window;
                self.outbox.ack(self.slot, delivered);
                let republish = self.inflight.len() as u64;
                metrics::counter!("steadfast_resent_total").increment(republish);
                let connects = self.shared.update(|_| {}).connects;
                let asked_clean = self.cfg.clean_start && connects == 0;
                let expected = !asked_clean && (republish > 0 || connects > 0);
                self.inflight.clear();
                self.queue.clear();
                self.retry.clear();
                self.rewind();
                if expected {
                    self.shared.update(|s| s.sessions_lost += 1);
                    let broker = self.url.to_string();
                    let queued = self.outbox.state().totals.count;
                    tracing::warn!(%broker, in_flight = republish, queued, "the broker lost our session: publishing every unacknowledged message again");
                    let _ = self.events.send(Event::SessionLost { broker, republish: queued });
                }
                Ok(0)
            }
        }
    }

    async fn pump_loop(
        &mut self,
        link: &mut Link,
        rd: &mut crate::transport::ReadHalf,
        wtx: &mpsc::UnboundedSender<Vec<u8>>,
        writer: &mut tokio::task::JoinHandle<std::io::Result<()>>,
        buf: &mut [u8],
    ) -> Result<(), ConnectError> {
        let mut keepalive = KeepAlive::new(self.cfg.keep_alive, Instant::now().into_std());
        let mut fetch: Option<Fetch> = None;
        let mut state_rx = self.outbox.watch();
        let mut stop = self.stop.clone();
        // Owners may have changed while the link was down: start from the
        // oldest message this broker has not acknowledged.
        let mut generation = self.router.generation();
        self.rewind();
        self.progress_at = Instant::now();
        loop {
            // A change of owners seen before sending: what was read under
            // the old owners must not go out here.
            if generation.has_changed().unwrap_or(false) {
                generation.mark_unchanged();
                fetch = None;
                self.rewind();
            }
            self.requeue_due_retries();
            self.fill_window(link).await?;
            if !link.out.is_empty() {
                wtx.send(std::mem::take(&mut link.out)).map_err(|_| ConnectError::WriterStopped)?;
            }
            let state = *state_rx.borrow_and_update();
            // A broker that takes no new messages now (a failover standby)
            // reads nothing: it is rewound when that changes.
            let takes = self.router.is_active(self.index);
            if let Some(p) = self.next_read(&state).filter(|_| fetch.is_none() && takes) {
                let outbox = self.outbox.clone();
                let after = self.cursors[p];
                let last = state.newest[p];
                let slot = self.slot;
                // The page answers for ids up to `last` as of now: it is
                // read after every commit up to there.
                fetch = Some(Box::pin(async move {
                    outbox.read_after(after, PAGE, Some(slot), Some(p as u8)).await.map(|page| (page, p, last))
                }));
            }
            let keepalive_at = Instant::from_std(keepalive.poll_timeout());
            let retry_at = self.retry.front().map(|(t, _)| *t);
            let ack_due = (!self.window.is_empty()).then(|| self.progress_at + self.cfg.ack_timeout);
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
                        self.rewind();
                    }
                }
                _ = sleep_until(ack_due.unwrap_or(keepalive_at)), if ack_due.is_some() => {
                    if !self.window.is_empty() && self.progress_at.elapsed() >= self.cfg.ack_timeout {
                        return Err(ConnectError::AckTimeout(self.cfg.ack_timeout));
                    }
                }
                r = rd.read(buf) => {
                    let n = r?;
                    if n == 0 {
                        return Err(ConnectError::Closed(CloseReason::Eof));
                    }
                    keepalive.on_receive(Instant::now().into_std());
                    let incoming = link.receive(&buf[..n]);
                    self.on_incoming(link, incoming).await?;
                }
                page = async { fetch.as_mut().expect("guarded").await }, if fetch.is_some() => {
                    fetch = None;
                    let (page, p, upto) = page.map_err(store_failed)?;
                    self.take_page(page, p, upto);
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
                _ = sleep_until(retry_at.unwrap_or(keepalive_at)), if retry_at.is_some() => {}
                _ = sleep_until(keepalive_at) => {
                    match keepalive.poll(Instant::now().into_std()) {
                        Some(KeepAliveAction::SendPing) => link.ping()?,
                        Some(KeepAliveAction::Dead) => return Err(ConnectError::DeadLink(self.cfg.keep_alive)),
                        None => {}
                    }
                }
                r = &mut *writer => {
                    return Err(match r {
                        Ok(Err(e)) => e.into(),
                        _ => ConnectError::WriterStopped,
                    });
                }
            }
        }
    }

    /// Whether `m` is this broker's to send now (its route and mode).
    fn claims(&self, m: &StoredMessage) -> bool {
        self.router.claims(self.index, m.msg.route.as_deref(), &m.msg.topic)
    }

    /// Forgets what was read but not sent, to read it again from the
    /// oldest message (in-flight messages stay in flight; refused ones keep
    /// their pause).
    fn rewind(&mut self) {
        self.queue.clear();
        self.done_ahead.iter_mut().for_each(BTreeSet::clear);
        self.cursors = [0; PRIORITIES];
    }

    /// Queues a page of priority `p` read from the outbox: the messages
    /// that are this broker's, ahead of any of a lower priority. `upto` is
    /// the last id of that priority committed before the read: an empty
    /// page means nothing is left up to there.
    fn take_page(&mut self, page: Vec<StoredMessage>, p: usize, upto: u64) {
        let last = page.last().map(|m| m.id);
        let mut fresh = Vec::with_capacity(page.len());
        // A refused message may be back in the queue already (its pause
        // ended after a rewind): it must not be queued twice.
        let queued: std::collections::HashSet<u64> = self.queue.iter().map(|m| m.id).collect();
        for m in page {
            let waiting = self.retry.iter().any(|(_, r)| r.id == m.id);
            let gone = self.done_ahead[p].contains(&m.id) || queued.contains(&m.id);
            if !self.inflight.contains_key(&m.id) && !gone && !waiting && self.claims(&m) {
                fresh.push(m);
            }
        }
        if p == 0 {
            self.queue.extend(fresh);
        } else {
            let at = self.queue.iter().position(|q| (q.msg.policy.priority as usize) < p).unwrap_or(self.queue.len());
            let tail = self.queue.split_off(at);
            self.queue.extend(fresh);
            self.queue.extend(tail);
        }
        self.cursors[p] = match last {
            Some(id) => self.cursors[p].max(id),
            None => self.cursors[p].max(upto),
        };
        self.done_ahead[p] = self.done_ahead[p].split_off(&(self.cursors[p] + 1));
    }

    /// Refused messages whose wait is over go back to the front of the queue.
    fn requeue_due_retries(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        while self.retry.front().is_some_and(|(t, _)| *t <= now) {
            due.push(self.retry.pop_front().expect("front exists").1);
        }
        due.retain(|m| self.claims(m));
        due.sort_by_key(|m| m.id);
        for m in due.into_iter().rev() {
            self.queue.push_front(m);
        }
    }

    /// Moves messages from the queue onto the wire while the window has room,
    /// in outbox order.
    async fn fill_window(&mut self, link: &mut Link) -> Result<(), ConnectError> {
        let mut sent_qos0 = Vec::new();
        let mut attempted = Vec::new();
        // From the first QoS 2 message on, packets wait here (in order) until
        // the bindings are on disk.
        let mut held: Vec<(StoredMessage, Option<u16>, Vec<u8>)> = Vec::new();
        while let Some(front) = self.queue.front() {
            let qos = front.msg.qos;
            if qos != Qos::AtMostOnce && !self.window.has_room() {
                break;
            }
            let mut m = self.queue.pop_front().expect("front exists");
            // A broker that takes QoS 1 at most (its CONNACK says so) gets
            // QoS 2 messages at QoS 1: a consumer's inbox removes the
            // copies QoS 1 allows. Never lower than 1: QoS 0 would give
            // up the acknowledgement.
            if m.msg.qos == Qos::ExactlyOnce && self.max_qos == Some(1) {
                if !self.warned_downgrade {
                    self.warned_downgrade = true;
                    tracing::warn!(broker = %self.url, "the broker takes QoS 1 at most (Maximum QoS in its CONNACK): QoS 2 messages go to it at QoS 1");
                }
                m.msg.qos = Qos::AtLeastOnce;
            }
            let qos = m.msg.qos;
            if let Some(reason) = Self::spent(&m) {
                self.outbox.remove(vec![m.id], Delivery::Dropped(reason));
                continue;
            }
            if qos != Qos::AtMostOnce && m.msg.policy.max_attempts.is_some() {
                m.attempts += 1;
                attempted.push(m.id);
            }
            if self.window.is_empty() && qos != Qos::AtMostOnce {
                self.progress_at = Instant::now();
            }
            let pid = (qos != Qos::AtMostOnce).then(|| self.window.assign(m.id, qos).expect("room checked"));
            let bytes = match self.encode(link, &m, pid) {
                Ok(bytes) => bytes,
                Err(reason) => {
                    if let Some(pid) = pid {
                        self.window.release(pid);
                    }
                    self.outbox.remove(vec![m.id], Delivery::Dropped(reason));
                    continue;
                }
            };
            if qos == Qos::ExactlyOnce || !held.is_empty() {
                held.push((m, pid, bytes));
                continue;
            }
            link.out.extend_from_slice(&bytes);
            match pid {
                Some(_) => {
                    self.inflight.insert(m.id, m);
                }
                // QoS 0 is best-effort: handed to the socket once, then it
                // leaves the outbox.
                None => sent_qos0.push(m),
            }
        }
        // Counted before the sends they count are acknowledged (the same
        // channel keeps the order).
        self.outbox.attempted(attempted);
        if held.is_empty() {
            self.outbox.ack(self.slot, sent_qos0.into_iter().map(|m| m.id).collect());
        } else {
            self.release_held(link, sent_qos0, held).await?;
        }
        self.shared.update(|s| s.inflight = self.window.len());
        self.router.progress(self.index, self.window.len());
        Ok(())
    }

    /// Records the QoS 2 bindings among `held` on disk, then sends all of
    /// `held` in order. The packet id of a QoS 2 message is on disk before
    /// its PUBLISH leaves: after a crash it is resumed under the same id,
    /// so the broker can never take it for another message. If the write
    /// fails, nothing held goes out: ids are given back and the messages
    /// return to the front of the queue.
    async fn release_held(
        &mut self,
        link: &mut Link,
        qos0_before: Vec<StoredMessage>,
        held: Vec<(StoredMessage, Option<u16>, Vec<u8>)>,
    ) -> Result<(), ConnectError> {
        let updates = held
            .iter()
            .filter(|(m, _, _)| m.msg.qos == Qos::ExactlyOnce)
            .filter_map(|(m, pid, _)| pid.map(|pid| (m.id, Some((pid, Stage::Published)))))
            .collect();
        let left = match self.outbox.set_wire(self.slot, updates).await {
            Ok(left) => left,
            Err(e) => {
                // The link ends without sending this pass: QoS 0 messages of it
                // have not gone out either.
                for (m, pid, _) in held.into_iter().rev() {
                    if let Some(pid) = pid {
                        self.window.release(pid);
                    }
                    self.queue.push_front(m);
                }
                for m in qos0_before.into_iter().rev() {
                    self.queue.push_front(m);
                }
                self.shared.update(|s| s.inflight = self.window.len());
                return Err(store_failed(e));
            }
        };
        let mut sent_qos0: Vec<u64> = qos0_before.into_iter().map(|m| m.id).collect();
        for (m, pid, bytes) in held {
            if left.contains(&m.id) {
                // Delivered through other brokers meanwhile: not sent here.
                if let Some(pid) = pid {
                    self.window.release(pid);
                }
                continue;
            }
            link.out.extend_from_slice(&bytes);
            match pid {
                Some(_) => {
                    self.inflight.insert(m.id, m);
                }
                None => sent_qos0.push(m.id),
            }
        }
        self.outbox.ack(self.slot, sent_qos0);
        Ok(())
    }

    /// The PUBLISH for `m`, or why it can never be sent (G3).
    fn encode(&self, link: &Link, m: &StoredMessage, pid: Option<u16>) -> Result<Vec<u8>, DropReason> {
        let bytes = match link.encode_publish(m, &self.producer, pid, false) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(id = m.id, topic = %m.msg.topic, error = %e, "message cannot be encoded; dropped");
                return Err(DropReason::Invalid);
            }
        };
        match self.max_packet {
            Some(max) if bytes.len() as u64 > max as u64 => {
                let size = bytes.len();
                tracing::error!(id = m.id, topic = %m.msg.topic, size, max, "message larger than the broker's maximum packet size; dropped");
                Err(DropReason::TooLarge)
            }
            _ => Ok(bytes),
        }
    }

    /// Handles what the broker sent. Acknowledgements are applied even when
    /// a later packet in the same read ends the link.
    async fn on_incoming(&mut self, link: &mut Link, incoming: Vec<Incoming>) -> Result<(), ConnectError> {
        let mut done = Vec::new();
        let mut released = Vec::new();
        let mut refused = Vec::new();
        let mut end = None;
        for inc in incoming {
            match inc {
                // An acknowledgement of nothing we sent under that packet
                // id is a broker bug: the link ends with the error (what is
                // in flight is sent again), it is never taken for another
                // message's.
                Incoming::PubAck { pid, ok: true } => match self.window.on_puback(pid) {
                    Some(id) => done.push(id),
                    // Only a broker that never answered QoS 2 properly on
                    // this link downgrades; after a PUBREC a PUBACK under a
                    // QoS 2 id is a stray, not a delivery.
                    None => match (!self.pubrec_seen).then(|| self.window.on_downgraded_puback(pid)).flatten() {
                        Some(id) => {
                            if !self.warned_downgrade {
                                self.warned_downgrade = true;
                                tracing::warn!(
                                    broker = %self.url,
                                    "the broker answered a QoS 2 PUBLISH with PUBACK: it does not do QoS 2 and took the message at QoS 1 (a consumer may see it twice; its inbox removes the copy). Publish with -q 1 to this broker"
                                );
                            }
                            done.push(id);
                        }
                        None => {
                            end = Some(stray("PUBACK", pid, "QoS 1 message"));
                            break;
                        }
                    },
                },
                Incoming::PubRec { pid, ok: true } => match self.window.on_pubrec(pid) {
                    Some(id) => {
                        self.pubrec_seen = true;
                        released.push((id, pid));
                    }
                    None => {
                        end = Some(stray("PUBREC", pid, "QoS 2 message"));
                        break;
                    }
                },
                Incoming::PubComp { pid } => {
                    if let Some(id) = self.window.on_pubcomp(pid) {
                        done.push(id);
                    }
                }
                Incoming::PubAck { pid, ok: false } | Incoming::PubRec { pid, ok: false } => {
                    match self.window.on_refused(pid) {
                        Some(id) => refused.push(id),
                        None => {
                            end = Some(stray("refusal", pid, "message"));
                            break;
                        }
                    }
                }
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
        // Completed ones first: nothing below may fail before they are
        // handed to the outbox.
        self.complete(done);
        self.hold_refused(refused).await?;
        if !released.is_empty() {
            let updates = released.iter().map(|(id, pid)| (*id, Some((*pid, Stage::Released)))).collect();
            self.outbox.set_wire(self.slot, updates).await.map_err(store_failed)?;
            for (_, pid) in released {
                link.pubrel(pid)?;
            }
        }
        end.map_or(Ok(()), Err)
    }

    /// Messages acknowledged: they leave the outbox.
    fn complete(&mut self, done: Vec<u64>) {
        if done.is_empty() {
            return;
        }
        for id in &done {
            if let Some(m) = self.inflight.remove(id) {
                let p = m.msg.policy.priority as usize;
                if *id > self.cursors[p] {
                    self.done_ahead[p].insert(*id);
                }
            }
        }
        let n = done.len() as u64;
        self.outbox.ack(self.slot, done);
        self.progress_at = Instant::now();
        let inflight = self.window.len();
        self.router.progress(self.index, inflight);
        let active = self.router.is_active(self.index);
        let s = self.shared.update(|s| {
            s.acked += n;
            s.inflight = inflight;
            s.active = active;
        });
        if self.last_recorded.elapsed() > Duration::from_secs(1) {
            self.last_recorded = Instant::now();
            self.outbox.record_broker(record(&s));
        }
    }

    /// The broker refused these (an error reason code): they stay in the
    /// outbox and are sent again, as new messages, after a pause. A QoS 2
    /// binding is cleared first: its packet id is free on the broker.
    async fn hold_refused(&mut self, ids: Vec<u64>) -> Result<(), ConnectError> {
        if ids.is_empty() {
            return Ok(());
        }
        let at = Instant::now() + self.cfg.backoff.max;
        let mut unbind = Vec::new();
        for id in ids {
            if let Some(m) = self.inflight.remove(&id) {
                tracing::warn!(id, topic = %m.msg.topic, retry_in = ?self.cfg.backoff.max, "the broker refused a message; it stays queued and is sent again");
                self.shared.update(|s| s.refused += 1);
                let _ =
                    self.events.send(Event::Refused { broker: self.url.to_string(), id, topic: m.msg.topic.clone() });
                if m.msg.qos == Qos::ExactlyOnce {
                    unbind.push((id, None));
                }
                self.retry.push_back((at, m));
            }
        }
        if !unbind.is_empty() {
            self.outbox.set_wire(self.slot, unbind).await.map_err(store_failed)?;
        }
        Ok(())
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

/// The error for an acknowledgement of a packet id with nothing of that
/// kind in flight.
fn stray(what: &str, pid: u16, kind: &str) -> ConnectError {
    ConnectError::Protocol(format!(
        "the broker sent a {what} for packet id {pid}, which has no {kind} in flight (a broker bug); reconnecting"
    ))
}
