//! The bridge: store-and-forward between brokers, as a library feature.
//!
//! Each [`Route`] is a consumer on its source brokers and a publisher on
//! its destination set, each with its own store under `dir/ROUTE/`
//! ([`route_dirs`]). A message is acknowledged to the source only once it
//! is in the outbox on disk (G1 across the hop), together with a note of
//! the delivery it came as (source broker, packet id, content digest): the
//! broker's redelivery of it after a crash, before the acknowledgement
//! left, is recognised in the same round trip and acknowledged without
//! being queued twice. A message that carries a producer identity keeps it
//! upstream, so a receiver with an inbox recognises copies that came
//! through two source brokers or two bridges. A producer's ask for
//! receipts goes upstream with its message, and the receipts come back
//! ([`receipts`]).
//!
//! Build a [`Bridge`] in code (or read one from TOML with `steadfast
//! bridge --config`), [`Bridge::start`] it, and [`RunningBridge::stop`] it:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use steadfast::bridge::{route_dirs, Bridge, Rewrite, Route};
//! use steadfast::{ClientConfig, ConsumerConfig, Qos};
//!
//! let dir = std::path::PathBuf::from("/var/lib/steadfast/bridge");
//! let (outbox, inbox) = route_dirs(&dir, "up");
//! let source = ConsumerConfig::new(ClientConfig::new("edge-bridge", "mqtt://127.0.0.1:1883".parse()?, inbox))
//!     .topic("sensors/#", Qos::AtLeastOnce);
//! let destination = ClientConfig::new("edge-bridge-up", "mqtt://cloud.example:1883".parse()?, outbox);
//! let route = Route::new("up", source, destination).rewrite(Rewrite::new().prefix("site-7/")?);
//! let running = Bridge { dir, routes: vec![route] }.start().await?;
//! // ... until it is time to stop:
//! running.stop().await;
//! # Ok(())
//! # }
//! ```

pub mod receipts;
mod rewrite;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::FutureExt;

use steadfast_core::message::decimal;
use steadfast_core::{DropReason, Identity, Qos};
use steadfast_store::AcceptFuture;
pub use steadfast_store::Source;
use tokio::sync::{mpsc, watch};

pub use rewrite::{Rewrite, RewriteError, TemplateProblem};

use crate::{AppendError, Client, ClientConfig, Consumer, ConsumerConfig, Message, OpenError, Received};
use receipts::Relay;

/// Deliveries queued but not yet acknowledged to the source, per route.
const PIPELINE: usize = 8192;

/// Deliveries a route takes in a row without an await.
const BATCH: usize = 128;

/// How long a stop waits for in-flight work before it aborts a route
/// (what it had not acknowledged to its source comes again).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// One route: from a set of source brokers to a destination set.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its name (its stores live under `dir/NAME/`).
    pub name: String,
    /// The consumer on the source brokers: a persistent session with the
    /// route's subscriptions and its inbox.
    pub source: ConsumerConfig,
    /// The publisher on the destination set, with its outbox.
    pub destination: ClientConfig,
    /// How topics are rewritten on the way.
    pub rewrite: Rewrite,
    /// The QoS messages are sent with upstream; `None`: the one they came with.
    pub qos: Option<Qos>,
}

impl Route {
    /// A route that forwards every message as it came. Its source asks
    /// MQTT 5 brokers for Retain As Published
    /// ([`ConsumerConfig::retain_as_published`]), from its registration
    /// on: a retained message published while the bridge runs is
    /// retained upstream too. (Mosquitto 2.0 keeps the options of a
    /// subscription its session holds when the same filter is subscribed
    /// again: a route registered without it keeps it off until its
    /// session is made again.)
    pub fn new(name: impl Into<String>, source: ConsumerConfig, destination: ClientConfig) -> Route {
        let source = source.retain_as_published(true);
        Route { name: name.into(), source, destination, rewrite: Rewrite::new(), qos: None }
    }

    /// Rewrites topics on the way.
    pub fn rewrite(mut self, rewrite: Rewrite) -> Route {
        self.rewrite = rewrite;
        self
    }

    /// Sends every message upstream with this QoS.
    pub fn qos(mut self, qos: Qos) -> Route {
        self.qos = Some(qos);
        self
    }
}

/// The whole bridge: its routes, and the directory their stores live in.
#[derive(Debug, Clone)]
pub struct Bridge {
    /// Where the routes keep their stores ([`route_dirs`]).
    pub dir: PathBuf,
    /// The routes.
    pub routes: Vec<Route>,
}

/// Where a route keeps its stores: `(outbox, inbox)`.
pub fn route_dirs(dir: &Path, route: &str) -> (PathBuf, PathBuf) {
    (dir.join(route).join("outbox"), dir.join(route).join("inbox"))
}

/// Why a bridge could not start or went on no longer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// A route's source consumer or destination client cannot be opened.
    #[error("route `{route}`: {cause}")]
    Open {
        /// The route.
        route: String,
        /// Why.
        cause: OpenError,
    },
    /// A route ended by itself.
    #[error("route `{route}` stopped: {why}")]
    Stopped {
        /// The route.
        route: String,
        /// Why.
        why: RouteEnd,
    },
}

impl BridgeError {
    /// True when the configuration is at fault (it would fail again as it is).
    pub fn is_config(&self) -> bool {
        matches!(self, BridgeError::Open { cause: OpenError::Config(_), .. })
    }
}

/// Why a route ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteEnd {
    /// Its source consumer closed.
    #[error("the consumer closed")]
    ConsumerClosed,
    /// It ended without saying why.
    #[error("it ended")]
    Ended,
}

/// The routes of a bridge, running.
pub struct RunningBridge {
    stop: watch::Sender<bool>,
    /// Each route's task says here how it ended.
    ended: mpsc::UnboundedReceiver<(String, Result<(), RouteEnd>)>,
    count: usize,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    clients: Vec<Client>,
}

impl Bridge {
    /// Opens every route's stores and starts forwarding. When a route
    /// cannot open, the routes started before it stop cleanly and the
    /// error names the route.
    pub async fn start(self) -> Result<RunningBridge, BridgeError> {
        let (stop, stop_rx) = watch::channel(false);
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let mut running = RunningBridge { stop, ended, count: 0, tasks: Vec::new(), clients: Vec::new() };
        for r in self.routes {
            let name = r.name.clone();
            let (client, consumer) = match open_route(&r).await {
                Ok(o) => o,
                Err(cause) => {
                    running.stop().await;
                    return Err(BridgeError::Open { route: name, cause });
                }
            };
            running.clients.push(client.clone());
            tracing::info!(route = %name, dir = %self.dir.display(), "route started");
            let (tx, stop_rx) = (ended_tx.clone(), stop_rx.clone());
            running.tasks.push(tokio::spawn(async move {
                let r = forward(r, consumer, client, stop_rx).await;
                let _ = tx.send((name, r));
            }));
            running.count += 1;
        }
        Ok(running)
    }
}

/// A route's destination client and source consumer, or why not.
async fn open_route(r: &Route) -> Result<(Client, Consumer), OpenError> {
    let (client, report) = Client::open(r.destination.clone()).await?;
    if !report.is_clean() {
        tracing::error!(route = %r.name, problem = ?report.problem, "the outbox was damaged and repaired");
    }
    // A bridge's outbox is not a consumer's handling: it answers no ask
    // for a receipt, it passes it on.
    match Consumer::open(r.source.clone().relay()).await {
        Ok((consumer, _)) => Ok((client, consumer)),
        Err(e) => {
            client.close().await;
            Err(e)
        }
    }
}

impl RunningBridge {
    /// The destination clients of the routes (for metrics and status).
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// Waits until a route ends by itself (it cannot go on).
    pub async fn failed(&mut self) -> BridgeError {
        match self.ended.recv().await {
            Some((route, r)) => {
                self.count -= 1;
                BridgeError::Stopped { route, why: r.err().unwrap_or(RouteEnd::Ended) }
            }
            None => std::future::pending().await,
        }
    }

    /// Stops every route: in-flight acknowledgements are finished, the
    /// stores closed; what waits for a destination stays on disk. A route
    /// that does not stop within [`STOP_GRACE`] is aborted (what it had not
    /// acknowledged to its source comes again).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let all = async {
            while self.count > 0 {
                match self.ended.recv().await {
                    Some((name, r)) => {
                        self.count -= 1;
                        if let Err(e) = r {
                            tracing::error!(route = %name, error = %e, "route ended with an error");
                        }
                    }
                    None => break,
                }
            }
        };
        if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
            tracing::error!("a route did not stop in time; it is aborted");
            for t in &self.tasks {
                t.abort();
            }
            for t in self.tasks {
                let _ = t.await;
            }
        }
    }
}

/// One route: take from the source, queue for the destination, and
/// acknowledge to the source once queued on disk, in arrival order. One
/// task does all three: the deliveries waiting for the disk are its own
/// queue, the oldest first, and each is acknowledged as its message's
/// acceptance comes (the writer accepts in order); no second task and no
/// channel between them (docs/performance.md, session 26).
async fn forward(
    r: Route,
    consumer: Consumer,
    client: Client,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RouteEnd> {
    let mut relay =
        Relay::start(&r.name, r.source.client(), r.destination.clone(), client.clone(), consumer.relayer()).await;
    // Queued for the destination, not yet acknowledged to the source.
    let mut waiting: VecDeque<(AcceptFuture, Received)> = VecDeque::new();
    let result = loop {
        // Seen here too, not only in the select below: under the
        // runtime's budget every branch there may be pending at once.
        if *stop.borrow() {
            break Ok(());
        }
        // Deliveries ready now are taken without a wait each, a batch at
        // most (the awaits below let the runtime's other tasks in).
        for _ in 0..BATCH {
            if waiting.len() >= PIPELINE {
                break;
            }
            let Some(d) = consumer.try_next() else { break };
            waiting.extend(take(&r, &client, &mut relay, d));
        }
        let (oldest, room) = (!waiting.is_empty(), waiting.len() < PIPELINE);
        tokio::select! {
            // What is on disk is acknowledged first.
            biased;
            accepted = accepted_oldest(&mut waiting), if oldest => {
                let (_, d) = waiting.pop_front().expect("the oldest was waited for");
                settle(&r.name, accepted, d);
                // Every later one already accepted, at once.
                settle_accepted(&r.name, &mut waiting);
            }
            _ = stop.wait_for(|s| *s) => break Ok(()),
            d = consumer.next(), if room => match d {
                Some(d) => waiting.extend(take(&r, &client, &mut relay, d)),
                None => break Err(RouteEnd::ConsumerClosed),
            },
        }
    };
    // At a stop, what is on disk already is acknowledged, in order; a
    // message still waiting for room (overflow `block`) or for its sync is
    // given up: unacknowledged, the source sends it again after the
    // restart.
    settle_accepted(&r.name, &mut waiting);
    drop(waiting);
    relay.stop().await;
    consumer.close().await;
    client.close().await;
    result
}

/// The acceptance of the oldest delivery waiting (there is one).
fn accepted_oldest(
    waiting: &mut VecDeque<(AcceptFuture, Received)>,
) -> impl std::future::Future<Output = Result<u64, AppendError>> + '_ {
    std::future::poll_fn(move |cx| match waiting.front_mut() {
        Some((f, _)) => f.poll_unpin(cx),
        None => std::task::Poll::Pending,
    })
}

/// Settles the oldest deliveries whose acceptance came already, in
/// order, up to the first still waiting.
fn settle_accepted(route: &str, waiting: &mut VecDeque<(AcceptFuture, Received)>) {
    while let Some(accepted) = waiting.front_mut().and_then(|(f, _)| f.now_or_never()) {
        let (_, d) = waiting.pop_front().expect("the oldest was polled");
        settle(route, accepted, d);
    }
}

/// Acknowledges a delivery to its source once its message is queued on
/// disk, or gives it back when it could not be.
fn settle(route: &str, accepted: Result<u64, AppendError>, d: Received) {
    match accepted {
        Ok(_) => d.ack(),
        // Dropped by the route's own overflow policy: counted; the
        // source is done with it.
        Err(AppendError::Dropped { .. }) => d.ack(),
        Err(e) => {
            tracing::error!(route = %route, error = %e, "cannot queue a message; the source sends it again");
            d.retry();
        }
    }
}

/// Queues a delivery for the destination: its acceptance, to acknowledge
/// it to the source by, or nothing when it is settled already (a receipt
/// handed back, a message given back for now or that can never be sent).
fn take(r: &Route, client: &Client, relay: &mut Relay, mut d: Received) -> Option<(AcceptFuture, Received)> {
    if relay.is_handed_back(d.topic(), d.payload()) {
        d.ack();
        return None;
    }
    let mut m = Message::new(r.rewrite.apply(d.topic()), d.payload().to_vec())
        .qos(r.qos.unwrap_or(d.qos()))
        .retain(d.retain())
        .props(d.properties().clone());
    let value = d.take_identity_value();
    if let Some(id) = d.identity() {
        // The value the source read goes back where `origin` looks: kept
        // when it names this identity (always, but for a value written
        // otherwise than steadfast writes it), so it is not written again.
        m.props.user.extend(value.map(|v| (Identity::USER_PROPERTY.to_owned(), v)));
        m = m.origin(id);
        if let Some(topic) = d.receipt_topic() {
            relay.pass_on(&mut m, id, topic);
        }
    }
    // A message that came with an expiry keeps it: what it had left then
    // is its deadline here (the route's class otherwise).
    if let Some(left) = d.expiry().filter(|t| !t.is_zero()) {
        m = m.ttl(left);
    }
    // With the delivery it came as: the broker's resend of what was queued
    // before a crash (its acknowledgement died with the process) is
    // recognised by the outbox in the same round trip, and only acked.
    let queued = match d.packet_id() {
        Some(pid) => {
            let source = Source { url: d.broker_shared().clone(), pid, digest: digest(&d), resent: d.broker_resent() };
            client.enqueue_from(m, source)
        }
        None => client.enqueue(m),
    };
    match queued {
        Ok(f) => Some((f, d)),
        Err(e) if e.is_retryable() => {
            tracing::warn!(route = %r.name, error = %e, "cannot queue now; the source sends it again");
            d.retry();
            None
        }
        Err(e) => {
            // It can never be sent (say the rewritten topic is invalid):
            // counted and announced, and the source is done with it.
            let topic = r.rewrite.apply(d.topic());
            tracing::error!(route = %r.name, topic = %topic, error = %e, "message cannot be forwarded; dropped");
            client.count_dropped(DropReason::Invalid, topic);
            d.ack();
            None
        }
    }
}

/// FNV-1a over what makes a delivery this message and not another under
/// the same packet id: topic, payload, QoS, retain, identity. Stable across
/// releases (it is kept on disk).
fn digest(d: &Received) -> u64 {
    // The identity as the route's inbox sees it: a route without one (one
    // source broker) kept none in its records before.
    let id = d.identity().filter(|_| d.inbox());
    digest_of(d.topic(), d.payload(), d.qos(), d.retain(), id)
}

fn digest_of(topic: &str, payload: &[u8], qos: Qos, retain: bool, id: Option<&Identity>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |parts: &[&[u8]]| {
        for part in parts {
            for b in *part {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(&[topic.as_bytes()]);
    eat(&[payload]);
    eat(&[&[qos as u8, u8::from(retain)]]);
    // Its user property value, fed in pieces: no string built.
    if let Some(id) = id {
        eat(&[id.producer.as_bytes(), b"/", decimal(id.seq, &mut [0; 20])]);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is kept on disk: the same bytes give the same value in
    /// every release. The reference is FNV-1a over each part and a
    /// separator, the identity as its user property value.
    #[test]
    fn a_delivery_digest_is_fnv_over_its_parts_and_stays_the_same() {
        fn reference(parts: &[&[u8]]) -> u64 {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for part in parts {
                for b in part.iter().chain([0xffu8].iter()) {
                    h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
                }
            }
            h
        }
        let id = Identity { producer: "gw-7/a".into(), seq: 1_234_567_890 };
        let value = id.to_property_value();
        let with = digest_of("t/1", b"21.5", Qos::AtLeastOnce, true, Some(&id));
        assert_eq!(with, reference(&[b"t/1", b"21.5", &[1, 1], value.as_bytes()]));
        let without = digest_of("t/1", b"21.5", Qos::AtLeastOnce, true, None);
        assert_eq!(without, reference(&[b"t/1", b"21.5", &[1, 1]]));
        assert_eq!(without, 0xbf85_19aa_cd98_fafc, "a value kept on disk must not change");
        let zero = Identity { producer: "p".into(), seq: 0 };
        assert_eq!(digest_of("", b"", Qos::AtMostOnce, false, Some(&zero)), reference(&[b"", b"", &[0, 0], b"p/0"]));
    }
}
