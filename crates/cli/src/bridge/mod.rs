//! `steadfast bridge`: store-and-forward between brokers.
//!
//! Each route is a consumer on its source brokers and a publisher on its
//! destination set, each with its own store under `store.dir/ROUTE/`. A
//! message is acknowledged to the source only once it is in the outbox on
//! disk (G1 across the hop), together with a note of the delivery it came
//! as (source broker, packet id): a redelivery of it after a crash, before
//! the acknowledgement left, is recognised and acknowledged without being
//! queued twice. A message that carries a producer identity keeps it
//! upstream, so a receiver with an inbox recognises copies that came
//! through two source brokers or two bridges.

mod config;
mod notify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use steadfast::{AppendError, Client, Consumer, DropReason, Message, Received};
use steadfast_store::AcceptFuture;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

pub use config::{load, Bridge, Route};

use crate::args::BridgeArgs;
use crate::Failure;

/// Deliveries queued but not yet acknowledged to the source, per route.
const PIPELINE: usize = 8192;

pub async fn run(a: BridgeArgs) -> Result<(), Failure> {
    let path = a.config.clone();
    let bridge = load(&path).map_err(|errs| config_failure(&errs))?;
    if a.check {
        println!("{}: {} route(s), ok", path.display(), bridge.routes.len());
        return Ok(());
    }
    if a.register {
        for r in &bridge.routes {
            Consumer::register(&r.source).await.map_err(|e| Failure::other(anyhow!("route `{}`: {e}", r.name)))?;
            eprintln!("steadfast: registered route `{}` on its source broker(s)", r.name);
        }
        return Ok(());
    }
    let mut term = signal(SignalKind::terminate()).map_err(|e| Failure::other(anyhow!("cannot watch SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Failure::other(anyhow!("cannot watch SIGINT: {e}")))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Failure::other(anyhow!("cannot watch SIGHUP: {e}")))?;
    let notify = notify::Notifier::from_env();
    let metrics =
        a.metrics.as_deref().map(crate::metrics::parse_addr).transpose().map_err(|e| Failure::usage(anyhow!(e)))?;
    // The destination clients of the running routes, for the metrics (the
    // list is replaced at each reload).
    let clients: Arc<std::sync::Mutex<Vec<Client>>> = Arc::default();
    let mut running = start(bridge.clone(), clients.clone()).await?;
    let mut current = bridge;
    if let Some(addr) = metrics {
        let refresh = crate::metrics::refresh_with(clients.clone(), |clients| async move {
            let clients = clients.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for c in clients {
                let _ = c.export_metrics().await;
            }
        });
        crate::metrics::start(addr, refresh).await?;
    }
    notify.ready();
    let watchdog = notify.watchdog_interval();
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // A new configuration replaces the old only when it is valid.
                match load(&path) {
                    Ok(next) => {
                        notify.reloading();
                        tracing::warn!(config = %path.display(), "SIGHUP: reloading the configuration");
                        running.stop().await;
                        running = match start(next.clone(), clients.clone()).await {
                            Ok(r) => {
                                current = next;
                                r
                            }
                            Err(f) => {
                                // Back to the configuration that ran.
                                tracing::error!(error = %f.message(), "SIGHUP: the new configuration cannot start; going back to the previous one");
                                start(current.clone(), clients.clone()).await?
                            }
                        };
                        notify.ready();
                    }
                    Err(errs) => {
                        for e in &errs {
                            tracing::error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the running one");
                        }
                    }
                }
            }
            _ = tick.tick(), if watchdog.is_some() => notify.watchdog(),
            r = running.failed() => {
                notify.stopping();
                running.stop().await;
                return Err(r);
            }
        }
    }
    notify.stopping();
    tracing::info!("stopping: finishing in-flight work; the outboxes stay on disk");
    running.stop().await;
    Ok(())
}

fn config_failure(errs: &[String]) -> Failure {
    for e in &errs[..errs.len().saturating_sub(1)] {
        eprintln!("steadfast: error: {e}");
    }
    Failure::usage(anyhow!("{}", errs.last().cloned().unwrap_or_default()))
}

/// The routes running now.
struct Running {
    stop: watch::Sender<bool>,
    /// Each route's task says here how it ended.
    ended: mpsc::UnboundedReceiver<(String, Result<(), String>)>,
    count: usize,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits until a route ends by itself (it cannot go on).
    async fn failed(&mut self) -> Failure {
        match self.ended.recv().await {
            Some((name, r)) => {
                self.count -= 1;
                let why = r.err().unwrap_or_else(|| "it ended".to_owned());
                Failure::other(anyhow!("route `{name}` stopped: {why}"))
            }
            None => std::future::pending().await,
        }
    }

    /// Stops every route: in-flight acknowledgements are finished, the
    /// stores closed; what waits for a destination stays on disk.
    async fn stop(mut self) {
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
        if tokio::time::timeout(config::STOP_GRACE, all).await.is_err() {
            // What it had not acknowledged to its source comes again.
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

async fn start(b: Bridge, clients: Arc<std::sync::Mutex<Vec<Client>>>) -> Result<Running, Failure> {
    let (stop, stop_rx) = watch::channel(false);
    let (ended_tx, ended) = mpsc::unbounded_channel();
    clients.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let mut running = Running { stop, ended, count: 0, tasks: Vec::new() };
    for r in b.routes {
        let name = r.name.clone();
        let opened = match Client::open(r.destination.clone()).await {
            Ok((client, report)) => {
                if !report.is_clean() {
                    tracing::error!(route = %name, problem = ?report.problem, "the outbox was damaged and repaired");
                }
                match Consumer::open(r.source.clone()).await {
                    Ok((consumer, _)) => Ok((client, consumer)),
                    Err(e) => {
                        client.close().await;
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        let (client, consumer) = match opened {
            Ok(o) => o,
            Err(e) => {
                // The routes started so far stop cleanly too.
                running.stop().await;
                return Err(open_failure(&name, e));
            }
        };
        clients.lock().unwrap_or_else(|e| e.into_inner()).push(client.clone());
        tracing::info!(route = %name, dir = %b.dir.display(), "route started");
        let (tx, stop_rx) = (ended_tx.clone(), stop_rx.clone());
        running.tasks.push(tokio::spawn(async move {
            let r = forward(r, consumer, client, stop_rx).await;
            let _ = tx.send((name, r));
        }));
        running.count += 1;
    }
    Ok(running)
}

fn open_failure(route: &str, e: steadfast::OpenError) -> Failure {
    match e {
        steadfast::OpenError::Config(e) => Failure::usage(anyhow!("route `{route}`: {e}")),
        e => Failure::other(anyhow!("route `{route}`: {e}")),
    }
}

/// One route: take from the source, queue for the destination, and
/// acknowledge to the source once queued on disk, in arrival order.
async fn forward(r: Route, consumer: Consumer, client: Client, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel::<(AcceptFuture, Received)>(PIPELINE);
    let name = r.name.clone();
    let mut acker_stop = stop.clone();
    let acker = tokio::spawn(async move {
        while let Some((accepted, d)) = rx.recv().await {
            // At a stop, a message still waiting for room (overflow
            // `block`) is given up: unacknowledged, the source sends it
            // again after the restart.
            let accepted = tokio::select! {
                // What is on disk is acknowledged, stop or not.
                biased;
                a = accepted => a,
                _ = acker_stop.wait_for(|s| *s) => break,
            };
            match accepted {
                Ok(_) => d.ack(),
                // Dropped by the route's own overflow policy: counted; the
                // source is done with it.
                Err(AppendError::Dropped { .. }) => d.ack(),
                Err(e) => {
                    tracing::error!(route = %name, error = %e, "cannot queue a message; the source sends it again");
                    d.retry();
                }
            }
        }
    });
    let result = loop {
        let d = tokio::select! {
            d = consumer.next() => d,
            _ = stop.changed() => break Ok(()),
        };
        let Some(d) = d else { break Err("the consumer closed".to_owned()) };
        let taken = tokio::select! {
            biased;
            t = take(&r, &client, &tx, d) => t,
            _ = stop.wait_for(|s| *s) => break Ok(()),
        };
        if let Err(e) = taken {
            break Err(e);
        }
    };
    drop(tx);
    let _ = acker.await;
    consumer.close().await;
    client.close().await;
    result
}

async fn take(
    r: &Route,
    client: &Client,
    tx: &mpsc::Sender<(AcceptFuture, Received)>,
    d: Received,
) -> Result<(), String> {
    let pid = d.packet_id();
    let digest = digest(&d);
    // The broker's resend of what was queued before a crash (its
    // acknowledgement died with the process): acknowledge only.
    if let Some(pid) = pid.filter(|_| d.broker_resent()) {
        match client.seen_from(d.broker(), pid, digest).await {
            Ok(true) => {
                d.ack();
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => return Err(format!("outbox: {e}")),
        }
    }
    let topic = r.rewrite.apply(d.topic());
    let mut m = Message::new(topic.clone(), d.payload().to_vec())
        .qos(r.qos.unwrap_or(d.qos()))
        .retain(d.retain())
        .props(d.properties().clone());
    if let Some(id) = d.identity() {
        m = m.origin(id);
    }
    // A message that came with an expiry keeps it: what it had left then
    // is its deadline here (the route's class otherwise).
    if let Some(left) = d.expiry().filter(|t| !t.is_zero()) {
        m = m.ttl(left);
    }
    let queued = match pid {
        Some(pid) => client.enqueue_from(m, d.broker(), pid, digest),
        None => client.enqueue(m),
    };
    match queued {
        Ok(f) => tx.send((f, d)).await.map_err(|_| "the acknowledger stopped".to_owned()),
        Err(e) if e.is_retryable() => {
            tracing::warn!(route = %r.name, error = %e, "cannot queue now; the source sends it again");
            d.retry();
            Ok(())
        }
        Err(e) => {
            // It can never be sent (say the rewritten topic is invalid):
            // counted and announced, and the source is done with it.
            tracing::error!(route = %r.name, topic = %topic, error = %e, "message cannot be forwarded; dropped");
            client.count_dropped(DropReason::Invalid, topic);
            d.ack();
            Ok(())
        }
    }
}

/// FNV-1a over what makes a delivery this message and not another under
/// the same packet id: topic, payload, QoS, retain, identity. Stable across
/// releases (it is kept on disk).
fn digest(d: &Received) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(d.topic().as_bytes());
    eat(d.payload());
    eat(&[d.qos() as u8, u8::from(d.retain())]);
    if let Some(id) = d.identity() {
        eat(id.to_property_value().as_bytes());
    }
    h
}

/// Where a route keeps its stores.
pub fn route_dirs(dir: &Path, route: &str) -> (PathBuf, PathBuf) {
    (dir.join(route).join("outbox"), dir.join(route).join("inbox"))
}
