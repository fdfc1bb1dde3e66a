//! `--metrics ADDR`: the Prometheus exporter of the `metrics` family as the
//! recorder, served over plain HTTP at `/metrics` by a small handler here
//! (one GET per connection; no web framework needed for that).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Failure;

/// Sets the state metrics right before a scrape.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A refresh that runs `f` on a copy of `t` (a client, a consumer's
/// figures, the bridge's clients).
pub fn refresh_with<T, F, Fut>(t: T, f: F) -> Refresh
where
    T: Clone + Send + Sync + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move || Box::pin(f(t.clone())))
}

/// Parses `--metrics`: `127.0.0.1:9464`, `[::1]:9464`, or `:9464` for
/// 127.0.0.1.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') { format!("127.0.0.1{s}") } else { s.to_owned() };
    full.parse().map_err(|_| format!("--metrics `{s}` is not an address; use HOST:PORT such as 127.0.0.1:9464"))
}

/// The metrics' listening socket and recorder, installed before the
/// client or consumer opens, so that nothing it counts from its first
/// moment is lost (a recorder installed later misses what came before: a
/// group member's first claims, a publisher's first acknowledgements).
pub struct Listening {
    listener: TcpListener,
    handle: PrometheusHandle,
}

/// Binds `addr` and installs the recorder; [`Listening::serve`] answers
/// once the client exists.
pub async fn listen(addr: SocketAddr) -> Result<Listening, Failure> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::usage(anyhow!("cannot listen on {addr} for --metrics: {e}; choose a free port")))?;
    let sync = [0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
    // An acceptance takes a sync, or as long as a full outbox makes its
    // publisher wait for room; a delivery from a millisecond on a live
    // link to hours after an outage.
    let accept = [0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0, 3600.0];
    let delivery = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("steadfast_disk_sync_seconds".into()), &sync)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("steadfast_accept_seconds".into()), &accept))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("steadfast_delivery_seconds".into()), &delivery))
        .and_then(|b| b.install_recorder())
        .map_err(|e| Failure::other(anyhow!("cannot install the metrics recorder: {e}")))?;
    Ok(Listening { listener, handle })
}

impl Listening {
    /// Starts serving; returns the bound address (the port may have been 0).
    pub fn serve(self, refresh: Refresh) -> Result<SocketAddr, Failure> {
        let bound = self.listener.local_addr().map_err(|e| Failure::other(anyhow!(e)))?;
        tokio::spawn(upkeep(self.handle.clone()));
        tokio::spawn(accept_loop(self.listener, self.handle, refresh));
        tracing::info!(%bound, "metrics served at http://{bound}/metrics");
        Ok(bound)
    }
}

/// Folds the histograms' samples into their buckets every few seconds:
/// the recorder keeps each sample until then (or until a scrape), so a
/// process that nobody scrapes would otherwise grow by every message.
async fn upkeep(handle: PrometheusHandle) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}

/// How often [`upkeep`] runs.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

async fn accept_loop(listener: TcpListener, handle: PrometheusHandle, refresh: Refresh) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (handle, refresh) = (handle.clone(), refresh.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, handle, refresh)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, handle: PrometheusHandle, refresh: Refresh) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            refresh().await;
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", handle.render())
        }
        ("GET", _) => ("404 Not Found", "text/plain", "metrics are at /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}
