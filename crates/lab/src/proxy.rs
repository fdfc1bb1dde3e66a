//! A TCP proxy that breaks links on command: resets, black holes, latency,
//! a bandwidth cap; optionally reading the MQTT packets that pass to tell
//! what the broker acknowledged.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::wiretap::{Acknowledged, Connection};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Pass,
    /// Reset every open connection and every new one.
    Reset,
    /// Keep sockets open and silently drop every byte, both ways: a link
    /// that dies without FIN or RST.
    BlackHole,
    /// Forward, delaying each chunk by this long.
    Latency(Duration),
    /// Forward at most this many bytes per second, each way.
    Bandwidth(u64),
}

#[derive(Debug, Clone, Copy)]
struct State {
    mode: ProxyMode,
    /// Bumped to reset the connections that exist now.
    generation: u64,
}

/// A TCP proxy on a free loopback port in front of an upstream port.
pub struct FaultProxy {
    port: u16,
    state: Arc<watch::Sender<State>>,
    task: JoinHandle<()>,
    acknowledged: Option<Acknowledged>,
}

impl FaultProxy {
    /// Starts proxying 127.0.0.1:`upstream` on a free loopback port.
    pub async fn start(upstream: u16) -> std::io::Result<FaultProxy> {
        Self::listen(upstream, None).await
    }

    /// Starts proxying 127.0.0.1:`upstream`, reading the MQTT packets that
    /// pass for [`FaultProxy::acknowledged`].
    pub async fn start_tapped(upstream: u16) -> std::io::Result<FaultProxy> {
        Self::listen(upstream, Some(Acknowledged::default())).await
    }

    async fn listen(upstream: u16, acknowledged: Option<Acknowledged>) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (tx, _) = watch::channel(State { mode: ProxyMode::Pass, generation: 0 });
        let state = Arc::new(tx);
        let s = state.clone();
        let tap = acknowledged.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = s.subscribe();
                let conn = tap.clone().map(|a| Arc::new(Mutex::new(Connection::new(a))));
                tokio::spawn(serve(client, upstream, rx, conn));
            }
        });
        Ok(FaultProxy { port, state, task, acknowledged })
    }

    /// Payloads of the QoS 1 and 2 messages that the broker acknowledged
    /// (PUBACK or PUBREC sent) through this proxy so far, as seen on the
    /// wire: what the broker took, whatever the client recorded. Only for
    /// a proxy made with [`FaultProxy::start_tapped`] (empty otherwise).
    pub fn acknowledged(&self) -> Vec<Vec<u8>> {
        self.acknowledged.as_ref().map(|tap| lock(tap).clone()).unwrap_or_default()
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Switches the mode for open and new connections.
    pub fn set(&self, mode: ProxyMode) {
        self.state.send_modify(|s| s.mode = mode);
    }

    /// Resets the connections open now; new ones are served by the mode.
    pub fn reset_connections(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reset(s: TcpStream) {
    // Linger 0 turns close into RST.
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

type Tap = Option<Arc<Mutex<Connection>>>;

async fn serve(client: TcpStream, upstream: u16, mut rx: watch::Receiver<State>, tap: Tap) {
    let start = *rx.borrow_and_update();
    if start.mode == ProxyMode::Reset {
        return reset(client);
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = pump(&mut cr, &mut sw, rx.clone(), tap.clone(), Side::ToBroker);
    let down = pump(&mut sr, &mut cw, rx.clone(), tap, Side::FromBroker);
    let killed = async {
        loop {
            if rx.changed().await.is_err() {
                return;
            }
            let s = *rx.borrow();
            if s.generation != start.generation || s.mode == ProxyMode::Reset {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = killed => {}
    }
    let client = cr.reunite(cw).ok();
    let server = sr.reunite(sw).ok();
    if let Some(c) = client {
        reset(c);
    }
    if let Some(s) = server {
        reset(s);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    ToBroker,
    FromBroker,
}

async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    rx: watch::Receiver<State>,
    tap: Tap,
    side: Side,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // The broker said it, whether or not the client hears it (or the
        // mode below drops it).
        if side == Side::FromBroker {
            if let Some(t) = &tap {
                lock(t).broker_sent(&buf[..n]);
            }
        }
        let mode = rx.borrow().mode;
        // A bandwidth cap passes bytes as a slow link does: a slice every
        // 20 ms, not a whole read after a long pause.
        let slice = match mode {
            ProxyMode::Pass => n,
            ProxyMode::BlackHole => continue,
            ProxyMode::Latency(d) => {
                tokio::time::sleep(d).await;
                n
            }
            ProxyMode::Bandwidth(bps) => (bps / 50).max(1) as usize,
            ProxyMode::Reset => return,
        };
        for part in buf[..n].chunks(slice) {
            if let ProxyMode::Bandwidth(bps) = mode {
                tokio::time::sleep(Duration::from_secs_f64(part.len() as f64 / bps.max(1) as f64)).await;
            }
            // Read before the write: the broker cannot answer a packet
            // before it has it, so its acknowledgement never finds the tap
            // unaware.
            if side == Side::ToBroker {
                if let Some(t) = &tap {
                    lock(t).client_sent(part);
                }
            }
            if to.write_all(part).await.is_err() {
                return;
            }
        }
    }
}

/// A poisoned lock only means a pump panicked mid-update: the record is
/// still the best there is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
