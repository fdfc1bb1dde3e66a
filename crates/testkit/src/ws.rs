//! A WebSocket front for a TCP broker: accepts `ws://127.0.0.1:PORT/...`
//! with the `mqtt` subprotocol (tungstenite's server role) and carries the
//! binary messages to and from the broker's TCP port. Debian's Mosquitto is
//! built without WebSocket support; this puts a real broker behind a real
//! WebSocket server.

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, handshake::server};

/// The WebSocket front; stops on drop.
pub struct WsFront {
    port: u16,
    task: JoinHandle<()>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl WsFront {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: u16) -> WsFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws front");
        let port = listener.local_addr().expect("addr").port();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let seen = paths.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, upstream, seen).await;
                });
            }
        });
        WsFront { port, task, paths }
    }

    /// `ws://127.0.0.1:PORT/mqtt`.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/mqtt", self.port)
    }

    /// The request paths of the upgrades so far.
    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().expect("paths").clone()
    }
}

impl Drop for WsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(sock: TcpStream, upstream: u16, seen: Arc<Mutex<Vec<String>>>) -> Result<(), tungstenite::Error> {
    // tungstenite's callback type returns its (large) HTTP error response.
    #[allow(clippy::result_large_err)]
    let callback = |req: &server::Request, mut resp: server::Response| {
        seen.lock().expect("paths").push(req.uri().path().to_owned());
        let asked = req.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()).unwrap_or("");
        if asked.split(',').any(|p| p.trim() == "mqtt") {
            resp.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().expect("header"));
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(sock, callback).await?;
    let tcp = TcpStream::connect(("127.0.0.1", upstream)).await?;
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let (mut ws_tx, mut ws_rx) = ws.split();
    let up = async move {
        while let Some(m) = ws_rx.next().await {
            match m? {
                tungstenite::Message::Binary(b) => tcp_wr.write_all(&b).await?,
                tungstenite::Message::Close(_) => break,
                _ => {}
            }
        }
        Ok::<_, tungstenite::Error>(())
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tcp_rd.read(&mut buf).await?;
            if n == 0 {
                let _ = ws_tx.close().await;
                return Ok::<_, tungstenite::Error>(());
            }
            ws_tx.send(tungstenite::Message::Binary(buf[..n].to_vec().into())).await?;
        }
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}
