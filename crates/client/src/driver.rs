//! One driver task per broker: connects, resumes, streams the outbox into
//! the send window, and reconnects with backoff when the link is lost.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use steadfast_core::{Backoff, Identity, Inflight, KeepAlive, KeepAliveAction, Qos, Resume, SendWindow, Stage};
use steadfast_store::{now_ms, BrokerRecord, Delivery, Outbox, StoreError, StoredMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::config::{BrokerUrl, ClientConfig};
use crate::error::ConnectError;
use crate::link::{ConnAck, Incoming, Link};
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
            inflight: 0,
            attempts: 0,
        };
        Self { status: Mutex::new(status), max_packet: AtomicU32::new(0) }
    }

    fn update(&self, f: impl FnOnce(&mut BrokerStatus)) -> BrokerStatus {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        s.clone()
    }
}

type Fetch = Pin<Box<dyn Future<Output = Result<Vec<StoredMessage>, StoreError>> + Send>>;

/// How a session ended without error.
enum End {
    Stopped,
}

pub(crate) struct Driver {
    pub cfg: Arc<ClientConfig>,
    pub url: BrokerUrl,
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
    /// Highest outbox id read so far.
    cursor: u64,
    backoff: Backoff,
    rng: fastrand::Rng,
    max_packet: Option<u32>,
    last_recorded: Instant,
    last_logged: Option<String>,
}

impl Driver {
    pub fn new(
        cfg: Arc<ClientConfig>,
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
            url: cfg.brokers[0].clone(),
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
            cursor: 0,
            rng,
            max_packet: None,
            last_recorded: Instant::now(),
            last_logged: None,
        }
    }

    pub async fn run(mut self) {
        if let Err(e) = self.restore_bindings().await {
            tracing::error!(error = %e, "cannot read QoS 2 bindings from the outbox");
        }
        loop {
            if self.stopping() {
                break;
            }
            self.set_state(LinkState::Connecting, None, None);
            let mut connected_at = None;
            let result = self.session(&mut connected_at).await;
            let error = match result {
                Ok(End::Stopped) => break,
                Err(e) => e,
            };
            if let Some(at) = connected_at {
                self.backoff.link_lost_after(at.elapsed());
            }
            let delay = self.backoff.next_delay(&mut self.rng);
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
        self.set_state(LinkState::Stopped, None, None);
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// QoS 2 messages keep their packet id across restarts of the process:
    /// the broker may hold the exchange in its session.
    async fn restore_bindings(&mut self) -> Result<(), StoreError> {
        let mut after = 0;
        loop {
            let page = self.outbox.read_after(after, 4096).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for m in page.into_iter().filter(|m| m.wire.is_some()) {
                let (pid, stage) = m.wire.expect("filtered");
                self.window.restore(pid, Inflight { id: m.id, qos: Qos::ExactlyOnce, stage });
                self.inflight.insert(m.id, m);
            }
            if self.window.len() >= u16::MAX as usize {
                break;
            }
        }
        Ok(())
    }

    fn set_state(&self, state: LinkState, error: Option<String>, retry_at: Option<SystemTime>) {
        let inflight = self.window.len();
        let s = self.shared.update(|s| {
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

    fn identity(&self, id: u64) -> Identity {
        Identity { producer: self.producer.to_string(), seq: id }
    }

    async fn session(&mut self, connected_at: &mut Option<Instant>) -> Result<End, ConnectError> {
        let broker = self.url.to_string();
        let connect = TcpStream::connect(self.url.authority());
        let stream = match timeout(self.cfg.connect_timeout, connect).await {
            Err(_) => return Err(ConnectError::Timeout { broker, timeout: self.cfg.connect_timeout }),
            Ok(Err(e)) => return Err(ConnectError::Unreachable { broker, reason: e.to_string() }),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let mut link = Link::new(self.cfg.version);
        link.connect(&self.cfg)?;
        let mut buf = vec![0u8; 64 * 1024];
        let handshake = async {
            wr.write_all(&link.out).await.map_err(|e| ConnectError::Io(e.to_string()))?;
            link.out.clear();
            loop {
                let n = rd.read(&mut buf).await.map_err(|e| ConnectError::Io(e.to_string()))?;
                if n == 0 {
                    return Err(ConnectError::Closed(" before CONNACK".into()));
                }
                for inc in link.receive(&buf[..n])? {
                    if let Incoming::ConnAck(ack) = inc {
                        return Ok(ack);
                    }
                }
            }
        };
        let ack = match timeout(self.cfg.connect_timeout, handshake).await {
            Err(_) => return Err(ConnectError::Timeout { broker, timeout: self.cfg.connect_timeout }),
            Ok(r) => r?,
        };
        if let Some(refusal) = ack.refused {
            return Err(ConnectError::Refused { broker, refusal });
        }
        *connected_at = Some(Instant::now());
        let resent = self.on_connack(&mut link, ack).await?;
        self.shared.update(|s| s.connects += 1);
        self.set_state(LinkState::Connected, None, None);
        tracing::info!(%broker, session_present = ack.session_present, resent, "connected");
        self.last_logged = None;
        let _ = self.events.send(Event::Connected { broker, session_present: ack.session_present, resent });

        let (wtx, mut wrx) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut writer = tokio::spawn(async move {
            while let Some(bytes) = wrx.recv().await {
                wr.write_all(&bytes).await?;
            }
            wr.shutdown().await
        });
        let r = self.pump_loop(&mut link, &mut rd, &wtx, &mut writer, &mut buf).await;
        if matches!(r, Ok(End::Stopped)) {
            link.disconnect();
            let _ = wtx.send(std::mem::take(&mut link.out));
            drop(wtx);
            let _ = timeout(Duration::from_secs(1), &mut writer).await;
        }
        writer.abort();
        r
    }

    /// Resumes or restarts the session after CONNACK; returns how many
    /// messages were sent again.
    async fn on_connack(&mut self, link: &mut Link, ack: ConnAck) -> Result<usize, ConnectError> {
        let limit = ack.receive_maximum.unwrap_or(u16::MAX).min(self.cfg.max_inflight);
        self.window.set_limit(limit);
        self.max_packet = ack.maximum_packet_size;
        self.shared.max_packet.store(ack.maximum_packet_size.unwrap_or(u32::MAX), Ordering::Relaxed);
        match self.window.on_connected(ack.session_present) {
            Resume::Resend(list) => {
                for (pid, e) in &list {
                    match e.stage {
                        Stage::Published => {
                            let m = self.inflight.get(&e.id).expect("in-flight message kept");
                            link.publish(m, &self.identity(e.id), Some(*pid), true)?;
                        }
                        Stage::Released => link.pubrel(*pid)?,
                    }
                }
                Ok(list.len())
            }
            Resume::Restart { delivered } => {
                // Bindings of QoS 2 messages are void in the new session;
                // clear them durably before any of them is bound again.
                let stale: Vec<_> =
                    self.inflight.values().filter(|m| m.msg.qos == Qos::ExactlyOnce).map(|m| (m.id, None)).collect();
                if !stale.is_empty() {
                    self.outbox.set_wire(stale).await.map_err(store_failed)?;
                }
                self.outbox.remove(delivered, Delivery::Delivered);
                let republish = self.inflight.len() as u64;
                let expected = !self.cfg.clean_start && (republish > 0 || self.shared.update(|_| {}).connects > 0);
                self.inflight.clear();
                self.queue.clear();
                self.cursor = 0;
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
        rd: &mut tokio::net::tcp::OwnedReadHalf,
        wtx: &mpsc::UnboundedSender<Vec<u8>>,
        writer: &mut tokio::task::JoinHandle<std::io::Result<()>>,
        buf: &mut [u8],
    ) -> Result<End, ConnectError> {
        let mut keepalive = KeepAlive::new(self.cfg.keep_alive, Instant::now().into_std());
        let mut fetch: Option<Fetch> = None;
        let mut state_rx = self.outbox.watch();
        let mut stop = self.stop.clone();
        loop {
            self.fill_window(link).await?;
            if !link.out.is_empty() {
                wtx.send(std::mem::take(&mut link.out)).map_err(|_| ConnectError::Io("writer stopped".into()))?;
            }
            let last_id = state_rx.borrow_and_update().last_id;
            if fetch.is_none() && self.queue.len() < LOW_WATER && self.cursor < last_id {
                let outbox = self.outbox.clone();
                let after = self.cursor;
                fetch = Some(Box::pin(async move { outbox.read_after(after, PAGE).await }));
            }
            let deadline = Instant::from_std(keepalive.poll_timeout());
            tokio::select! {
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return Ok(End::Stopped);
                    }
                }
                r = rd.read(buf) => {
                    let n = r.map_err(|e| ConnectError::Io(e.to_string()))?;
                    if n == 0 {
                        return Err(ConnectError::Closed(String::new()));
                    }
                    keepalive.on_receive(Instant::now().into_std());
                    let incoming = link.receive(&buf[..n])?;
                    self.on_incoming(link, incoming).await?;
                }
                page = async { fetch.as_mut().expect("guarded").await }, if fetch.is_some() => {
                    fetch = None;
                    let page = page.map_err(store_failed)?;
                    if page.is_empty() {
                        // Everything after the cursor left the outbox meanwhile.
                        self.cursor = self.cursor.max(last_id);
                    }
                    for m in page {
                        self.cursor = self.cursor.max(m.id);
                        if !self.inflight.contains_key(&m.id) {
                            self.queue.push_back(m);
                        }
                    }
                }
                r = state_rx.changed(), if fetch.is_none() => {
                    if r.is_err() {
                        return Err(ConnectError::Io("the outbox was closed".into()));
                    }
                }
                _ = sleep_until(deadline) => {
                    match keepalive.poll(Instant::now().into_std()) {
                        Some(KeepAliveAction::SendPing) => link.ping()?,
                        Some(KeepAliveAction::Dead) => return Err(ConnectError::DeadLink(self.cfg.keep_alive)),
                        None => {}
                    }
                }
                r = &mut *writer => {
                    let why = match r {
                        Ok(Err(e)) => e.to_string(),
                        _ => "writer stopped".into(),
                    };
                    return Err(ConnectError::Io(why));
                }
            }
        }
    }

    /// Moves messages from the queue onto the wire while the window has room.
    async fn fill_window(&mut self, link: &mut Link) -> Result<(), ConnectError> {
        let mut sent_qos0 = Vec::new();
        let mut bind = Vec::new();
        while let Some(front) = self.queue.front() {
            let qos = front.msg.qos;
            if qos != Qos::AtMostOnce && !self.window.has_room() {
                break;
            }
            let m = self.queue.pop_front().expect("front exists");
            if self.too_large(link, &m)? {
                continue;
            }
            match qos {
                Qos::AtMostOnce => {
                    link.publish(&m, &self.identity(m.id), None, false)?;
                    sent_qos0.push(m.id);
                }
                Qos::AtLeastOnce => {
                    let pid = self.window.assign(m.id, qos).expect("room checked");
                    link.publish(&m, &self.identity(m.id), Some(pid), false)?;
                    self.inflight.insert(m.id, m);
                }
                Qos::ExactlyOnce => {
                    let pid = self.window.assign(m.id, qos).expect("room checked");
                    bind.push((m, pid));
                }
            }
        }
        if !bind.is_empty() {
            // The packet id of a QoS 2 message is on disk before the PUBLISH
            // leaves: after a crash it is resumed under the same id, so the
            // broker can never take it for another message.
            let updates = bind.iter().map(|(m, pid)| (m.id, Some((*pid, Stage::Published)))).collect();
            self.outbox.set_wire(updates).await.map_err(store_failed)?;
            for (m, pid) in bind {
                link.publish(&m, &self.identity(m.id), Some(pid), false)?;
                self.inflight.insert(m.id, m);
            }
        }
        // QoS 0 is best-effort: written once, then it leaves the outbox.
        self.outbox.remove(sent_qos0, Delivery::Delivered);
        Ok(())
    }

    fn too_large(&self, link: &Link, m: &StoredMessage) -> Result<bool, ConnectError> {
        let Some(max) = self.max_packet else {
            return Ok(false);
        };
        let size = link.publish_size(m, &self.identity(m.id), Some(1))?;
        if size as u64 <= max as u64 {
            return Ok(false);
        }
        tracing::error!(id = m.id, topic = %m.msg.topic, size, max, "message larger than the broker's maximum packet size; dropped");
        self.outbox.remove(vec![m.id], Delivery::Dropped(steadfast_core::DropReason::TooLarge));
        Ok(true)
    }

    async fn on_incoming(&mut self, link: &mut Link, incoming: Vec<Incoming>) -> Result<(), ConnectError> {
        let mut done = Vec::new();
        let mut released = Vec::new();
        for inc in incoming {
            match inc {
                Incoming::PubAck { pid, ok: true } => {
                    if let Some(id) = self.window.on_puback(pid) {
                        self.inflight.remove(&id);
                        done.push(id);
                    }
                }
                Incoming::PubRec { pid, ok: true } => {
                    if let Some(id) = self.window.on_pubrec(pid) {
                        released.push((id, pid));
                    }
                }
                Incoming::PubComp { pid } => {
                    if let Some(id) = self.window.on_pubcomp(pid) {
                        self.inflight.remove(&id);
                        done.push(id);
                    }
                }
                Incoming::PubAck { pid, ok: false } | Incoming::PubRec { pid, ok: false } => {
                    if let Some(id) = self.window.on_refused(pid) {
                        // Kept in the outbox; sent again in the next session.
                        self.inflight.remove(&id);
                        tracing::warn!(
                            id,
                            pid,
                            "the broker refused a message; it stays queued and is sent again after the next reconnect"
                        );
                    }
                }
                Incoming::Disconnect { reason } => {
                    return Err(ConnectError::Closed(format!(" with DISCONNECT ({reason})")));
                }
                Incoming::ConnAck(_) => return Err(ConnectError::Protocol("a second CONNACK arrived".into())),
                Incoming::Publish | Incoming::PingResp | Incoming::Other => {}
            }
        }
        if !released.is_empty() {
            let updates = released.iter().map(|(id, pid)| (*id, Some((*pid, Stage::Released)))).collect();
            self.outbox.set_wire(updates).await.map_err(store_failed)?;
            for (_, pid) in released {
                link.pubrel(pid)?;
            }
        }
        if !done.is_empty() {
            let n = done.len() as u64;
            self.outbox.remove(done, Delivery::Delivered);
            let inflight = self.window.len();
            let s = self.shared.update(|s| {
                s.acked += n;
                s.inflight = inflight;
            });
            if self.last_recorded.elapsed() > Duration::from_secs(1) {
                self.last_recorded = Instant::now();
                self.outbox.record_broker(record(&s));
            }
        }
        Ok(())
    }
}

fn store_failed(e: StoreError) -> ConnectError {
    ConnectError::Io(format!("outbox: {e}"))
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
        acked: s.acked,
        connects: s.connects,
    }
}
