//! A broker's receiver: one task per broker that keeps a session, forwards
//! each PUBLISH to the dispatcher, and writes the acknowledgements the
//! dispatcher sends back in the order the PUBLISHes came.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use steadfast_core::engine::{must_subscribe, Ack, ReceiveSession};
use steadfast_core::{reason, Qos};
use steadfast_store::Outbox;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{sleep_until, Instant};

use super::{send_queued, ConsumerConfig, DriverCmd, FromBroker};
use crate::clock;
use crate::config::{BrokerUrl, ProtocolVersion};
use crate::error::{CloseReason, ConnectError};
use crate::link::{first_version, open_auto, Incoming, Link, LinkAcks, Opened, Side};
use crate::reconnect::Reconnect;
use crate::transport::{send, ReadHalf, WriteHalf};
use crate::Event;

/// One broker's session: receives, and acknowledges in order.
pub(super) struct Receiver {
    pub(super) outbox: Outbox,
    pub(super) cfg: Arc<ConsumerConfig>,
    pub(super) url: BrokerUrl,
    pub(super) index: usize,
    pub(super) out: mpsc::Sender<FromBroker>,
    pub(super) acks: mpsc::UnboundedReceiver<DriverCmd>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) stop: watch::Receiver<bool>,
    /// The MQTT version this broker is spoken to in.
    pub(super) version: ProtocolVersion,
    /// Receipts this broker refused (an ACL that denies the receipt
    /// topics; Mosquitto also closes the link after each): the first is
    /// said as a warning, the others at debug.
    pub(super) receipts_refused: std::sync::atomic::AtomicU64,
}

/// The filters configured for a broker, and the key under which the inbox
/// records them once the broker granted them.
struct Subscription {
    key: String,
    want: String,
}

/// One connection to the broker: its socket and codec, the
/// acknowledgements it owes, what waits to be forwarded, and its clocks.
struct Connection {
    epoch: u64,
    rd: ReadHalf,
    wr: WriteHalf,
    link: Link,
    buf: Vec<u8>,
    keep_alive: Duration,
    /// The engine: acknowledgements in arrival order, PUBCOMPs, keep-alive.
    session: ReceiveSession,
    /// Received, waiting for room towards the dispatcher: while any
    /// wait, the socket is not read (back-pressure), but acks, pings and
    /// stop are still served.
    to_forward: VecDeque<FromBroker>,
    /// How many of those the broker waits an acknowledgement for (QoS 1
    /// and 2).
    to_forward_acked: usize,
    /// The packet id of the last receipt sent.
    next_pid: u16,
    /// The broker went past the Receive Maximum once on this connection
    /// (said once).
    over_window: bool,
}

impl Receiver {
    /// Connects, serves the session, and reconnects after the backoff
    /// until the consumer stops.
    pub(super) async fn run(mut self) {
        let mut reconnect = Reconnect::new(self.cfg.client.backoff, None, "consumer ");
        self.version = first_version(&self.cfg.client, &self.url, Some(&self.outbox)).await;
        let mut epoch = 0u64;
        while !*self.stop.borrow() {
            epoch += 1;
            let clean = self.cfg.client.clean_start && epoch == 1;
            let mut connected_at = None;
            // Ok: the consumer stops.
            let Err(error) = self.session(epoch, clean, &mut connected_at).await else { return };
            if connected_at.is_some() {
                reconnect.connected();
            }
            let delay = reconnect.after(&self.url.to_string(), error, connected_at, &self.events);
            between_links(&mut self.acks, &mut self.stop, tokio::time::sleep(delay)).await;
        }
    }

    /// One connection: `Ok` once the consumer stops, the error that ended
    /// it otherwise; `connected_at` is set once the broker accepted it.
    async fn session(
        &mut self,
        epoch: u64,
        clean: bool,
        connected_at: &mut Option<Instant>,
    ) -> Result<(), ConnectError> {
        let attempt =
            open_auto(&self.cfg.client, &self.url, clean, &mut self.version, Some(&self.outbox), Side::Consumer);
        let Some(opened) = between_links(&mut self.acks, &mut self.stop, attempt).await else { return Ok(()) };
        let Opened { rd, wr, mut link, ack, after, buf, .. } = opened?;
        *connected_at = Some(Instant::now());
        let subscription = self.subscribe_unless_kept(&mut link, ack.session_present, clean).await?;
        let broker = self.url.to_string();
        tracing::info!(%broker, session_present = ack.session_present, "consumer connected");
        let _ = self.events.send(Event::Connected { broker, session_present: ack.session_present, resent: 0 });
        let mut conn = Connection::new(epoch, rd, wr, link, buf, self.cfg.client.keep_alive);
        // Stale acks of an earlier connection are ignored.
        while self.acks.try_recv().is_ok() {}
        self.serve(&mut conn, after, &subscription).await
    }

    /// Subscribes unless the broker kept a session subscribed to exactly
    /// the configured filters; returns what to record once it grants them.
    async fn subscribe_unless_kept(
        &self,
        link: &mut Link,
        session_present: bool,
        clean: bool,
    ) -> Result<Subscription, ConnectError> {
        // A kept session keeps its subscriptions; a new one gets them now,
        // and so does a kept one whose filters are not the ones configured
        // (recorded per broker once the broker granted them).
        let key = format!("subscribed {}", self.url);
        let filters = self.cfg.filters();
        let want = self.cfg.subscription_record();
        let have = self.outbox.meta_or_init(&key, "").await.map_err(ConnectError::inbox)?;
        // A session this consumer had, not kept (a broker restarted
        // without persistence, an expiry, a failover to another node):
        // what was queued for it while it was away is gone. Not said when
        // the configuration asks for no kept session (a clean start, or
        // an MQTT 5 session expiry of 0).
        let c = &self.cfg.client;
        let kept_by_nobody = self.version == ProtocolVersion::V5 && c.session_expiry.is_zero();
        let keeps = !(c.clean_start || kept_by_nobody);
        if keeps && !session_present && !clean && !have.is_empty() {
            tracing::warn!(broker = %self.url, "the broker did not keep this consumer's session: messages queued for it while it was away are lost, unless their producers ask for receipts (published again); subscribing again");
        }
        if must_subscribe(session_present, &have, &want) {
            link.subscribe(1, &filters, self.cfg.retain_as_published)?;
        }
        Ok(Subscription { key, want })
    }

    /// Serves a connection until it ends: reads and forwards while the
    /// dispatcher has room, writes the acknowledgements due, pings, and
    /// says goodbye on stop.
    async fn serve(
        &mut self,
        conn: &mut Connection,
        mut pending_in: Vec<Incoming>,
        subscription: &Subscription,
    ) -> Result<(), ConnectError> {
        loop {
            // Drained, not replaced: the next read fills the same vector.
            for inc in pending_in.drain(..) {
                self.on_incoming(conn, inc, subscription)?;
            }
            conn.write_due().await?;
            let wake = conn.session.poll_timeout().map_or_else(far_future, Instant::from_std);
            let out = self.out.clone();
            let room = conn.room(self.cfg.client.max_inflight);
            tokio::select! {
                permit = out.reserve(), if room > 0 => {
                    let Ok(permit) = permit else { return Ok(()) };
                    let acked = |f: &FromBroker| f.msg.pid.is_some();
                    let Some(sent) = send_queued(&out, permit, &mut conn.to_forward, room, acked) else {
                        return Ok(());
                    };
                    conn.to_forward_acked -= sent;
                }
                r = conn.rd.read(&mut conn.buf), if conn.to_forward.is_empty() => {
                    let n = r?;
                    if n == 0 {
                        return Err(ConnectError::Closed(CloseReason::Eof));
                    }
                    conn.session.handle_received(clock::instant());
                    conn.link.receive_into(&conn.buf[..n], &mut pending_in);
                }
                cmd = self.acks.recv() => match cmd {
                    None => return Ok(()),
                    Some(cmd) => {
                        conn.on_driver_cmd(cmd).await?;
                        // And the ones queued behind it: their PUBACKs go
                        // out in one write, not one each.
                        for _ in 0..MAX_CMDS_PER_WRITE {
                            let Ok(cmd) = self.acks.try_recv() else { break };
                            conn.on_driver_cmd(cmd).await?;
                        }
                    }
                },
                _ = sleep_until(wake) => conn.on_timeout()?,
                r = self.stop.changed() => {
                    if r.is_err() || *self.stop.borrow() {
                        conn.disconnect().await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// What one packet from the broker asks for: a PUBLISH waits to be
    /// forwarded (its ack takes its place in the order), PUBREL is answered,
    /// a SUBACK is checked and recorded; an error ends the connection.
    fn on_incoming(
        &self,
        conn: &mut Connection,
        inc: Incoming,
        subscription: &Subscription,
    ) -> Result<(), ConnectError> {
        match inc {
            Incoming::Publish(msg) => {
                conn.session.handle_publish(msg.pid, msg.qos);
                let (open, max) = (conn.session.unacknowledged(), self.cfg.client.max_inflight);
                if open > max as usize && !std::mem::replace(&mut conn.over_window, true) {
                    // Mosquitto 2.0.11 does, after a PUBACK of its oldest:
                    // the rest waits here, unread, until there is room.
                    tracing::debug!(broker = %self.url, unacknowledged = open, receive_maximum = max, "the broker sent more unacknowledged messages than the Receive Maximum; only that many are handed over at a time");
                }
                conn.to_forward_acked += usize::from(msg.pid.is_some());
                conn.to_forward.push_back(FromBroker { broker: self.index, epoch: conn.epoch, msg });
            }
            Incoming::PubRel { pid } => conn.session.handle_pubrel(pid, &mut LinkAcks(&mut conn.link)),
            Incoming::SubAck { granted } => {
                if let Err(e) = check_granted(&self.url, &self.cfg.filters(), &granted) {
                    let broker = self.url.to_string();
                    tracing::error!(%broker, error = %e, "subscription refused");
                    return Err(e);
                }
                self.outbox.set_meta(&subscription.key, &subscription.want);
            }
            Incoming::Disconnect { reason } => return Err(ConnectError::Closed(CloseReason::Disconnect(reason))),
            Incoming::Broken(e) => return Err(e),
            Incoming::ConnAck(_) => return Err(ConnectError::Protocol("a second CONNACK arrived".into())),
            // The only messages a consumer publishes are receipts.
            Incoming::Ack(Ack::PubAck { code, .. }) if reason::is_refusal(code) => {
                let refused = self.receipts_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let (broker, reason) = (&self.url, reason::describe(code));
                if refused == 1 {
                    tracing::warn!(%broker, %reason, "the broker refused a receipt: its producer gets none and publishes the message again when its wait ends (the inbox removes the copy); if it is an ACL, allow this client to publish to the producers' receipt topics (steadfast/receipts/#)");
                } else {
                    tracing::debug!(%broker, %reason, refused, "the broker refused a receipt");
                }
            }
            Incoming::Ack(_) | Incoming::PingResp | Incoming::Other => {}
        }
        Ok(())
    }
}

/// The most dispatcher commands taken before the acknowledgements they
/// made due are written.
const MAX_CMDS_PER_WRITE: usize = 1024;

impl Connection {
    /// How many more deliveries may go to the dispatcher now: at most
    /// `max` (the Receive Maximum this side asked for) are handed over
    /// and not yet acknowledged, whatever the broker sends, so that a
    /// crash hands over again at most that many (a broker that ignores
    /// the Receive Maximum only fills the socket, which is not read while
    /// anything waits here).
    fn room(&self, max: u16) -> usize {
        let open = self.session.unacknowledged().saturating_sub(self.to_forward_acked);
        let room = (max as usize).saturating_sub(open);
        // QoS 0 deliveries need no acknowledgement: they never wait for one.
        match self.to_forward.front() {
            None => 0,
            Some(f) if f.msg.pid.is_none() => room.max(1),
            Some(_) => room,
        }
    }

    /// A connection just opened: it owes nothing, forwards nothing yet,
    /// and its keep-alive and ping clocks start now.
    fn new(epoch: u64, rd: ReadHalf, wr: WriteHalf, link: Link, buf: Vec<u8>, keep_alive: Duration) -> Self {
        Self {
            epoch,
            rd,
            wr,
            link,
            buf,
            keep_alive,
            session: ReceiveSession::new(keep_alive, clock::instant()),
            to_forward: VecDeque::new(),
            to_forward_acked: 0,
            next_pid: 1,
            over_window: false,
        }
    }

    /// Writes the acknowledgements now due, with whatever else the link
    /// queued (a SUBSCRIBE, a PUBCOMP, a ping), if anything.
    async fn write_due(&mut self) -> Result<(), ConnectError> {
        let now = clock::instant();
        if let Some(bytes) = self.session.poll_transmit(now, &mut LinkAcks(&mut self.link)) {
            self.link.out.extend_from_slice(&bytes);
        }
        if !self.link.out.is_empty() {
            send(&mut self.wr, &self.link.out).await?;
            self.link.out.clear();
        }
        Ok(())
    }

    /// An ack from the dispatcher marks its delivery handled (one for an
    /// earlier connection is ignored); a flush writes what is due now and
    /// answers.
    async fn on_driver_cmd(&mut self, cmd: DriverCmd) -> Result<(), ConnectError> {
        match cmd {
            DriverCmd::Ack { epoch, pid } => {
                if epoch == self.epoch {
                    self.session.handle_handled(pid);
                }
            }
            DriverCmd::Flush(tx) => {
                self.write_due().await?;
                let _ = tx.send(());
            }
            DriverCmd::Publish { topic, payload, count } => {
                // Client-to-broker packet ids are this side's own; 1 is
                // the SUBSCRIBE's.
                self.next_pid = self.next_pid.checked_add(1).unwrap_or(2).max(2);
                let m = crate::link::loose_message(0, &topic, &payload, Qos::AtLeastOnce, false);
                match steadfast_core::validate_topic_name(&topic) {
                    Ok(()) => match self.link.encode_publish(&m, "", None, Some(self.next_pid), false) {
                        Ok(bytes) => self.link.out.extend_from_slice(&bytes),
                        Err(e) => tracing::warn!(%topic, error = %e, "a receipt cannot be encoded; not sent"),
                    },
                    Err(e) => {
                        tracing::warn!(%topic, error = %e, receipts = count, "a producer asked for receipts at a topic that is not valid; not sent")
                    }
                }
            }
        }
        Ok(())
    }

    /// A timer of the session: a ping, or the link declared dead; while the
    /// socket is not read (the application is slow), silence counts for
    /// nothing.
    fn on_timeout(&mut self) -> Result<(), ConnectError> {
        let reading = self.to_forward.is_empty();
        let now = clock::instant();
        self.session
            .handle_timeout(now, reading, &mut LinkAcks(&mut self.link))
            .map_err(|_| ConnectError::DeadLink(self.keep_alive))
    }

    /// Stop: DISCONNECT and close the socket, whatever fails on the way.
    async fn disconnect(&mut self) {
        self.link.disconnect();
        let _ = send(&mut self.wr, &self.link.out).await;
        let _ = self.wr.shutdown().await;
    }
}

/// A wake-up that never comes (a session always has its timers; this is
/// the fallback).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Checks a SUBACK against the filters asked for: a refused one is an
/// error, a lower QoS a warning.
pub(super) fn check_granted(
    url: &BrokerUrl,
    topics: &[(String, Qos)],
    granted: &[Option<u8>],
) -> Result<(), ConnectError> {
    for (i, (filter, asked)) in topics.iter().enumerate() {
        match granted.get(i).copied().flatten() {
            None => return Err(ConnectError::SubscriptionRefused { broker: url.to_string(), filter: filter.clone() }),
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

/// `f` (a link being opened, or the backoff before the next), answering
/// what the dispatcher asks meanwhile: nothing is written between links,
/// so a flush is done at once and an ack is stale (the broker sends its
/// message again). `None`, at once, when a stop is asked.
async fn between_links<T>(
    acks: &mut mpsc::UnboundedReceiver<DriverCmd>,
    stop: &mut watch::Receiver<bool>,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(f);
    loop {
        tokio::select! {
            t = &mut f => return Some(t),
            _ = stop.wait_for(|s| *s) => return None,
            Some(cmd) = acks.recv() => {
                if let DriverCmd::Flush(done) = cmd {
                    let _ = done.send(());
                }
            }
        }
    }
}
