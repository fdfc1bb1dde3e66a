//! What carries the MQTT bytes: TCP, TLS (rustls) and WebSocket over
//! either. One entry point, [`connect`], returns the two halves the driver
//! and the consumer read and write; the rest of the client does not know
//! which transport it talks through.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite;

use crate::config::BrokerUrl;
use crate::error::{ConfigError, ConnectError};

/// How the bytes reach a broker, from the URL's scheme.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// `mqtt://` (or `tcp://`): plain TCP, port 1883 by default.
    #[default]
    Tcp,
    /// `mqtts://` (or `ssl://`, `tls://`): TLS over TCP, port 8883.
    Tls,
    /// `ws://host:port/path`: WebSocket (subprotocol `mqtt`), port 80, path `/mqtt`.
    Ws {
        /// The HTTP path of the upgrade request.
        path: String,
    },
    /// `wss://host:port/path`: WebSocket over TLS, port 443, path `/mqtt`.
    Wss {
        /// The HTTP path of the upgrade request.
        path: String,
    },
}

impl Transport {
    /// The URL scheme.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Tcp => "mqtt",
            Transport::Tls => "mqtts",
            Transport::Ws { .. } => "ws",
            Transport::Wss { .. } => "wss",
        }
    }

    /// The port used when the URL gives none.
    pub fn default_port(&self) -> u16 {
        match self {
            Transport::Tcp => 1883,
            Transport::Tls => 8883,
            Transport::Ws { .. } => 80,
            Transport::Wss { .. } => 443,
        }
    }

    /// True when TLS is under it.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss { .. })
    }

    /// The WebSocket path, if any.
    pub(crate) fn path(&self) -> Option<&str> {
        match self {
            Transport::Ws { path } | Transport::Wss { path } => Some(path),
            _ => None,
        }
    }
}

/// TLS settings for `mqtts://` and `wss://` brokers.
///
/// By default the broker's certificate is verified against the platform's
/// trusted roots (`/etc/ssl/certs` on Debian) and must be valid for the
/// host name in the URL (sent as SNI when it is a name, not an address).
/// Files are read at every connection, so a renewed certificate is picked
/// up at the next reconnect.
///
/// ```
/// use steadfast::{ClientConfig, TlsConfig};
///
/// let tls = TlsConfig::new().ca_file("/etc/gw7/ca.pem").client_cert("/etc/gw7/gw7.pem", "/etc/gw7/gw7.key");
/// let cfg = ClientConfig::new("gw7", "mqtts://broker.lan".parse().unwrap(), "/var/lib/gw7/outbox").tls(tls);
/// assert_eq!(cfg.all_brokers()[0].port, 8883);
/// ```
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    ca_file: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    insecure: bool,
    alpn: Vec<String>,
    /// Verify the chain but not the name (PostgreSQL's
    /// `sslmode=verify-ca`).
    any_name: bool,
}

impl TlsConfig {
    /// Verify against the platform's roots; no client certificate.
    pub fn new() -> Self {
        Self::default()
    }
    /// Trust only the CA certificates in this PEM file instead of the
    /// platform's roots.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }
    /// Present this client certificate chain (PEM) with its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1) for mutual TLS.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }
    /// Do not verify the broker's certificate at all. Anyone on the path
    /// can then read and change the traffic; a warning is logged at every
    /// connection.
    pub fn insecure(mut self, on: bool) -> Self {
        self.insecure = on;
        self
    }
    /// ALPN protocol names to offer (for example `x-amzn-mqtt-ca` for AWS
    /// IoT on port 443).
    pub fn alpn(mut self, protocols: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.alpn = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// True when certificate verification is off.
    pub fn is_insecure(&self) -> bool {
        self.insecure
    }

    /// Verify the certificate chain but accept any name in it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn any_name(mut self, on: bool) -> Self {
        self.any_name = on;
        self
    }

    /// The rustls configuration, reading the files now.
    pub(crate) fn rustls(&self) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::TlsProtocols(e.to_string()))?;
        let builder = if self.insecure {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(Lenient { provider, chain: None }))
        } else if self.any_name {
            let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots()?, provider.clone())
                .build()
                .map_err(|e| ConfigError::TlsProtocols(e.to_string()))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(Lenient { provider, chain: Some(chain) }))
        } else {
            builder.with_root_certificates(self.roots()?)
        };
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert)
                    .map_err(|problem| ConfigError::ClientCertificate { path: cert.clone(), problem })?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| ConfigError::ClientKey { path: key.clone(), problem: pem_error(e) })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ConfigError::KeyMismatch { cert: cert.clone(), reason: e.to_string() })?
            }
        };
        config.alpn_protocols = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The CAs to trust: those of the CA file, or the platform's.
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, ConfigError> {
        let Some(path) = &self.ca_file else { return platform_roots() };
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(path).map_err(|problem| ConfigError::CaFile { path: path.clone(), problem })? {
            roots.add(cert).map_err(|e| ConfigError::CaCertificate { path: path.clone(), reason: e.to_string() })?;
        }
        Ok(Arc::new(roots))
    }
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the right kind in it".into(),
        e => format!("not valid PEM ({e:?})"),
    }
}

/// The certificates of a PEM file; what is wrong with it, in words.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs =
        CertificateDer::pem_file_iter(path).map_err(pem_error)?.collect::<Result<Vec<_>, _>>().map_err(pem_error)?;
    if certs.is_empty() {
        return Err("no certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(certs)
}

/// The platform's trusted roots, read once per process once found (not
/// finding any is tried again at the next connection: they may be
/// installed meanwhile).
fn platform_roots() -> Result<Arc<rustls::RootCertStore>, ConfigError> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (_, _) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(ConfigError::NoTrustedRoots { reason: found.errors.first().map(|e| e.to_string()) });
    }
    Ok(ROOTS.get_or_init(|| Arc::new(roots)).clone())
}

/// A verifier that checks less than webpki's default, for
/// [`TlsConfig::insecure`] (no certificate check: `chain` is `None`) and
/// [`TlsConfig::any_name`] (the chain as usual, any name accepted). Both
/// still check the handshake's signatures, so that the session keys
/// belong to whoever sent the certificate.
#[derive(Debug)]
struct Lenient {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl rustls::client::danger::ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else { return Ok(rustls::client::danger::ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Any byte stream under MQTT.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The reading half of a connection. After each read it acknowledges at
/// once what arrived ([`quick_ack`]), or, once [`ReadHalf::defer_acks`]
/// was called, leaves the ACK owed to its reader ([`AckDebt`]).
pub(crate) struct ReadHalf {
    stream: ReadStream,
    debt: Option<AckDebt>,
}

enum ReadStream {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    /// TLS or WebSocket, with a handle on the TCP socket underneath (for
    /// [`quick_ack`]).
    Other(tokio::io::ReadHalf<Box<dyn Io>>, Option<socket2::Socket>),
}

impl ReadHalf {
    fn new(stream: ReadStream) -> ReadHalf {
        ReadHalf { stream, debt: None }
    }

    /// The TCP socket underneath, where there is a handle on it.
    fn socket(&self) -> Option<socket2::SockRef<'_>> {
        match &self.stream {
            ReadStream::Tcp(r) => Some(socket2::SockRef::from(r.as_ref())),
            ReadStream::Other(_, socket) => socket.as_ref().map(socket2::SockRef::from),
        }
    }

    /// From now on a read does not acknowledge at once: it leaves the ACK
    /// owed in the debt returned, which the reader pays with its next bytes
    /// or settles before it waits (docs/design.md, "A publishing link
    /// acknowledges with its data"). The debt holds a duplicate of the
    /// socket's descriptor: drop it with the connection.
    pub(crate) fn defer_acks(&mut self) -> AckDebt {
        let socket = self.socket().and_then(|s| s.try_clone().ok());
        let debt = AckDebt(Arc::new(Debt { owed: AtomicBool::new(false), socket }));
        self.debt = Some(debt.clone());
        debt
    }
}

/// The ACK that a deferred reader's reads owe TCP ([`ReadHalf::defer_acks`]).
/// A publishing link answers most reads of PUBACKs with PUBLISHes, which
/// carry the ACK: it saves a `setsockopt` and a bare ACK segment per read.
/// Whatever its bytes did not pay is acknowledged with [`quick_ack`] before
/// anything that may wait, so that a broker holding its next packet for
/// our ACK (Nagle's algorithm) does not wait for our delayed ACK.
#[derive(Clone)]
pub(crate) struct AckDebt(Arc<Debt>);

struct Debt {
    /// Bytes were read whose ACK has not gone yet.
    owed: AtomicBool,
    socket: Option<socket2::Socket>,
}

impl AckDebt {
    /// Bytes just went into the socket at once: they carried the ACK of
    /// everything read before.
    pub(crate) fn paid(&self) {
        self.0.owed.store(false, Ordering::Relaxed);
    }

    /// Acknowledges at once what was read and not paid for.
    pub(crate) fn settle(&self) {
        if self.0.owed.swap(false, Ordering::Relaxed) {
            if let Some(socket) = &self.0.socket {
                quick_ack(socket2::SockRef::from(socket));
            }
        }
    }

    #[cfg(test)]
    fn is_owed(&self) -> bool {
        self.0.owed.load(Ordering::Relaxed)
    }
}

/// The writing half of a connection. Call [`send`] (write and flush):
/// TLS and WebSocket buffer until flushed.
pub(crate) enum WriteHalf {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Other(tokio::io::WriteHalf<Box<dyn Io>>),
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match &mut this.stream {
            ReadStream::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadStream::Other(r, _) => Pin::new(r).poll_read(cx, buf),
        };
        if matches!(polled, Poll::Ready(Ok(()))) {
            match &this.debt {
                Some(debt) => debt.0.owed.store(true, Ordering::Relaxed),
                None => {
                    if let Some(socket) = this.socket() {
                        quick_ack(socket);
                    }
                }
            }
        }
        polled
    }
}

/// Acknowledges what arrives at once instead of waiting to carry the
/// acknowledgement on our next packet (TCP's delayed ACK). A broker that
/// leaves Nagle's algorithm on (Mosquitto's default, `set_tcp_nodelay
/// false`) holds each small PUBACK until its previous one is acknowledged:
/// with delayed ACKs, until our next PUBLISH; at a low rate that cost a
/// whole interval between messages per acknowledgement (5 ms at 200 msg/s).
/// Linux leaves quick-ack mode by itself: it is set again after each read.
fn quick_ack(socket: socket2::SockRef<'_>) {
    #[cfg(target_os = "linux")]
    {
        let _ = socket.set_tcp_quickack(true);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Other(w) => Pin::new(w).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Other(w) => Pin::new(w).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Other(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// Where a publishing link's bytes go, in order, while its task keeps
/// reading. Plain TCP: written straight into the socket from the link's
/// task as far as the socket takes them, the rest kept and written as it
/// drains ([`Sender::progress`]); no hand-off to another task on the way
/// to the broker. TLS and WebSocket, which buffer and must be flushed: a
/// task of their own writes and flushes them.
pub(crate) enum Sender {
    Direct { wr: tokio::net::tcp::OwnedWriteHalf, queued: Vec<u8>, at: usize },
    Task { tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>, task: WriterTask },
}

impl Sender {
    pub(crate) fn new(wr: WriteHalf) -> Sender {
        match wr {
            WriteHalf::Tcp(wr) => Sender::Direct { wr, queued: Vec::new(), at: 0 },
            other => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                let task = tokio::spawn(async move {
                    let mut wr = other;
                    while let Some(bytes) = rx.recv().await {
                        wr.write_all(&bytes).await?;
                        // Flushed once the queue is empty.
                        if rx.is_empty() {
                            wr.flush().await?;
                        }
                    }
                    wr.shutdown().await
                });
                Sender::Task { tx, task: WriterTask(Some(task)) }
            }
        }
    }

    /// Sends `bytes` after everything sent before: at once as far as the
    /// socket takes them. Leaves `bytes` empty (with its capacity, on
    /// plain TCP, for the next packets). An error of the socket ends the
    /// link. `Ok(true)`: all of them went into the socket now (and with
    /// them the ACK of what was read before).
    pub(crate) fn send(&mut self, bytes: &mut Vec<u8>) -> Result<bool, ConnectError> {
        match self {
            Sender::Direct { wr, queued, at } => {
                let done = if *at < queued.len() { 0 } else { write_now(wr, bytes)? };
                let all = done == bytes.len();
                queued.extend_from_slice(&bytes[done..]);
                bytes.clear();
                Ok(all)
            }
            Sender::Task { tx, .. } => {
                tx.send(std::mem::take(bytes)).map_err(|_| ConnectError::WriterStopped)?;
                Ok(false)
            }
        }
    }

    /// Writes what the socket did not take yet, as it drains; resolves
    /// when it wrote some (`Ok`) or the socket failed. Pending for ever
    /// while nothing waits. Cancel-safe: a `select!` branch.
    pub(crate) async fn progress(&mut self) -> Result<(), ConnectError> {
        match self {
            Sender::Direct { wr, queued, at } => {
                if *at >= queued.len() {
                    return std::future::pending().await;
                }
                wr.writable().await?;
                *at += write_now(wr, &queued[*at..])?;
                if *at >= queued.len() {
                    queued.clear();
                    *at = 0;
                } else if *at > queued.len() / 2 {
                    // What was written leaves the buffer once it is half
                    // of it: a socket that never quite drains must not make
                    // it grow with all ever sent.
                    queued.drain(..*at);
                    *at = 0;
                }
                Ok(())
            }
            Sender::Task { task, .. } => {
                let Some(handle) = task.0.as_mut() else { return std::future::pending().await };
                let ended = handle.await;
                task.0 = None;
                match ended {
                    Ok(Err(e)) => Err(e.into()),
                    Ok(Ok(())) | Err(_) => Err(ConnectError::WriterStopped),
                }
            }
        }
    }

    /// Writes what is left, flushes and closes the sending side, within
    /// `limit` (a graceful end of the link).
    pub(crate) async fn finish(self, limit: std::time::Duration) {
        match self {
            Sender::Direct { mut wr, queued, at } => {
                let _ = tokio::time::timeout(limit, async {
                    wr.write_all(&queued[at..]).await?;
                    wr.shutdown().await
                })
                .await;
            }
            Sender::Task { tx, mut task } => {
                drop(tx);
                if let Some(handle) = task.0.as_mut() {
                    let _ = tokio::time::timeout(limit, handle).await;
                }
            }
        }
    }
}

/// Writes as much of `bytes` as the socket takes now, without waiting:
/// how much it took.
fn write_now(wr: &tokio::net::tcp::OwnedWriteHalf, bytes: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match wr.try_write(&bytes[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A writer task, stopped when its link is dropped (a socket that takes
/// nothing must not keep it waiting for ever).
pub(crate) struct WriterTask(Option<tokio::task::JoinHandle<io::Result<()>>>);

impl Drop for WriterTask {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Writes all of `bytes` and flushes them to the socket.
pub(crate) async fn send(wr: &mut WriteHalf, bytes: &[u8]) -> io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// TCP connect, then the TLS handshake and the WebSocket upgrade where the
/// URL asks for them. The caller bounds it with the connect timeout.
pub(crate) async fn connect(url: &BrokerUrl, tls: &TlsConfig) -> Result<(ReadHalf, WriteHalf), ConnectError> {
    let broker = url.to_string();
    let tcp = tokio::net::TcpStream::connect(url.authority())
        .await
        .map_err(|e| ConnectError::Unreachable { broker: broker.clone(), reason: e.to_string() })?;
    let _ = tcp.set_nodelay(true);
    if url.transport == Transport::Tcp {
        let (rd, wr) = tcp.into_split();
        return Ok((ReadHalf::new(ReadStream::Tcp(rd)), WriteHalf::Tcp(wr)));
    }
    // The same socket, for quick ACKs under TLS and WebSocket.
    let socket = socket2::SockRef::from(&tcp).try_clone().ok();
    let mut stream: Box<dyn Io> = Box::new(tcp);
    if url.transport.is_tls() {
        let config = tls.rustls().map_err(|e| ConnectError::Certificate {
            broker: broker.clone(),
            reason: e.to_string(),
            problem: None,
        })?;
        if tls.insecure {
            tracing::warn!(%broker, "TLS certificate verification is OFF (the insecure setting): anyone on the path can read and change this traffic");
        }
        let name = ServerName::try_from(url.host.clone()).map_err(|_| ConnectError::Certificate {
            broker: broker.clone(),
            reason: format!("`{}` is not a valid TLS server name", url.host),
            problem: None,
        })?;
        let tls =
            tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| io_error(&broker, e))?;
        stream = Box::new(tls);
    }
    if let Some(path) = url.transport.path() {
        stream = Box::new(websocket(url, path, stream, &broker).await?);
    }
    let (rd, wr) = tokio::io::split(stream);
    Ok((ReadHalf::new(ReadStream::Other(rd, socket)), WriteHalf::Other(wr)))
}

/// A socket or TLS error, told in words: a certificate the other side
/// refused is not worth retrying without a change of configuration.
pub(crate) fn io_error(broker: &str, e: io::Error) -> ConnectError {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<R>()) else {
        return e.into();
    };
    let problem = match tls {
        R::InvalidCertificate(C::UnknownIssuer) => CertificateProblem::UnknownIssuer,
        R::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => CertificateProblem::Expired,
        R::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => CertificateProblem::NotValidYet,
        R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => CertificateProblem::WrongHost,
        R::InvalidCertificate(_) => CertificateProblem::Refused,
        R::AlertReceived(A::CertificateRequired) => CertificateProblem::ClientCertificateRequired,
        R::AlertReceived(A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::AccessDenied) => {
            CertificateProblem::ClientCertificateRefused
        }
        R::AlertReceived(A::CertificateExpired) => CertificateProblem::ClientCertificateExpired,
        _ => return std::io::Error::new(e.kind(), format!("TLS: {tls}")).into(),
    };
    // A front end adds its name for the setting after the problem's words.
    ConnectError::Certificate {
        broker: broker.to_owned(),
        reason: format!("TLS: {tls}: {problem}"),
        problem: Some(problem),
    }
}

/// What a TLS handshake found wrong with a certificate, in words that
/// describe it; [`CertificateProblem::setting`] names the fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateProblem {
    /// The broker's certificate is not signed by a CA we trust.
    UnknownIssuer,
    /// The broker's certificate has expired.
    Expired,
    /// The broker's certificate is not valid yet.
    NotValidYet,
    /// The broker's certificate is not valid for the host name.
    WrongHost,
    /// The broker's certificate was refused for another reason.
    Refused,
    /// The broker requires a client certificate.
    ClientCertificateRequired,
    /// The broker refused our client certificate.
    ClientCertificateRefused,
    /// The broker says our client certificate has expired.
    ClientCertificateExpired,
}

impl CertificateProblem {
    #[cfg(test)]
    const ALL: [CertificateProblem; 8] = [
        CertificateProblem::UnknownIssuer,
        CertificateProblem::Expired,
        CertificateProblem::NotValidYet,
        CertificateProblem::WrongHost,
        CertificateProblem::Refused,
        CertificateProblem::ClientCertificateRequired,
        CertificateProblem::ClientCertificateRefused,
        CertificateProblem::ClientCertificateExpired,
    ];

    /// The [`TlsConfig`] setting that fixes it, if one does: `"ca_file"`
    /// or `"client_cert"`.
    pub fn setting(self) -> Option<&'static str> {
        match self {
            CertificateProblem::UnknownIssuer => Some("ca_file"),
            CertificateProblem::ClientCertificateRequired
            | CertificateProblem::ClientCertificateRefused
            | CertificateProblem::ClientCertificateExpired => Some("client_cert"),
            _ => None,
        }
    }
}

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertificateProblem::UnknownIssuer => "the broker's certificate is not signed by a CA we trust",
            CertificateProblem::Expired => {
                "the broker's certificate has expired; renew it on the broker (or check this machine's clock)"
            }
            CertificateProblem::NotValidYet => "the broker's certificate is not valid yet; check this machine's clock",
            CertificateProblem::WrongHost => {
                "the broker's certificate is not valid for this host name; use the name it was issued for in the URL"
            }
            CertificateProblem::Refused => "the broker's certificate was refused",
            CertificateProblem::ClientCertificateRequired => "the broker requires a client certificate",
            CertificateProblem::ClientCertificateRefused => {
                "the broker refused our client certificate; is it signed by a CA the broker trusts?"
            }
            CertificateProblem::ClientCertificateExpired => "the broker says our client certificate has expired",
        })
    }
}

impl ConnectError {
    /// For a certificate refused in the TLS handshake, the [`TlsConfig`]
    /// setting that would fix it: `"ca_file"` (the broker's certificate is
    /// not signed by a CA we trust) or `"client_cert"` (the broker wants,
    /// refused, or found expired our client certificate). A front end adds
    /// its own name for the setting (the CLI: `--cafile`, `--cert`).
    pub fn tls_setting(&self) -> Option<&'static str> {
        let ConnectError::Certificate { problem, .. } = self else { return None };
        problem.and_then(CertificateProblem::setting)
    }
}

/// The WebSocket upgrade, asking for the `mqtt` subprotocol.
async fn websocket(url: &BrokerUrl, path: &str, stream: Box<dyn Io>, broker: &str) -> Result<WsIo, ConnectError> {
    use tungstenite::client::IntoClientRequest;
    let scheme = if url.transport.is_tls() { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{}{path}", url.authority())
        .into_client_request()
        .map_err(|e| ConnectError::Protocol(format!("{broker}: cannot build the WebSocket request: {e}")))?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", tungstenite::http::HeaderValue::from_static("mqtt"));
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(WsIo { ws, buf: tungstenite::Bytes::new() }),
        Err(tungstenite::Error::Http(response)) => Err(ConnectError::Protocol(format!(
            "{broker} answered the WebSocket upgrade with HTTP {}: check the path in the URL (ws://host:port/PATH)",
            response.status()
        ))),
        Err(tungstenite::Error::Io(e)) => Err(io_error(broker, e)),
        Err(e) => Err(ConnectError::Protocol(format!("{broker}: WebSocket upgrade failed: {e}"))),
    }
}

/// MQTT bytes in binary WebSocket messages.
struct WsIo {
    ws: tokio_tungstenite::WebSocketStream<Box<dyn Io>>,
    /// What is left of the last message read.
    buf: tungstenite::Bytes,
}

impl fmt::Debug for WsIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WsIo")
    }
}

fn ws_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl AsyncRead for WsIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.buf.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Ok(tungstenite::Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(ws_io(e))),
                Some(Ok(tungstenite::Message::Binary(b))) => this.buf = b,
                // Pings are answered by tungstenite; text is not MQTT.
                Some(Ok(_)) => {}
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_io)?;
        Pin::new(&mut this.ws)
            .start_send(tungstenite::Message::Binary(tungstenite::Bytes::copy_from_slice(buf)))
            .map_err(ws_io)?;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(ws_io)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_close(cx).map_err(ws_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain TCP link to a listener on loopback: its two halves, and the
    /// listener's end.
    async fn linked() -> (ReadHalf, WriteHalf, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: BrokerUrl = format!("mqtt://127.0.0.1:{}", listener.local_addr().unwrap().port()).parse().unwrap();
        let (rd, wr) = connect(&url, &TlsConfig::default()).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (rd, wr, peer)
    }

    /// Each read leaves the socket in quick-ACK mode, which Linux leaves
    /// by itself after a while (the option reads back as the mode now).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_read_puts_the_socket_back_in_quick_ack_mode() {
        use tokio::io::AsyncReadExt;
        let (mut rd, _wr, mut peer) = linked().await;
        rd.socket().expect("a plain TCP URL gives a TCP half").set_tcp_quickack(false).unwrap();
        for round in 0..3 {
            peer.write_all(b"x").await.unwrap();
            let mut buf = [0u8; 8];
            assert_eq!(rd.read(&mut buf).await.unwrap(), 1);
            assert!(rd.socket().unwrap().tcp_quickack().unwrap(), "after read {round}");
            rd.socket().unwrap().set_tcp_quickack(false).unwrap();
        }
    }

    /// Deferred (a publishing link): a read leaves its ACK owed; bytes
    /// the socket takes at once pay it; what no bytes paid is settled with
    /// a quick ACK, once.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_deferred_read_owes_its_ack_until_data_pays_it_or_it_is_settled() {
        use tokio::io::AsyncReadExt;
        let (mut rd, wr, mut peer) = linked().await;
        let mut out = Sender::new(wr);
        let debt = rd.defer_acks();
        let mut buf = [0u8; 8];
        // Answered by data: paid.
        peer.write_all(b"x").await.unwrap();
        assert_eq!(rd.read(&mut buf).await.unwrap(), 1);
        assert!(debt.is_owed(), "a deferred read owes its ACK");
        assert!(out.send(&mut b"answer".to_vec()).unwrap(), "a socket with room takes it all at once");
        debt.paid();
        assert!(!debt.is_owed());
        let mut answer = [0u8; 6];
        peer.read_exact(&mut answer).await.unwrap();
        // Not answered: settled with a quick ACK on the socket underneath.
        peer.write_all(b"y").await.unwrap();
        assert_eq!(rd.read(&mut buf).await.unwrap(), 1);
        assert!(debt.is_owed());
        rd.socket().unwrap().set_tcp_quickack(false).unwrap();
        debt.settle();
        assert!(!debt.is_owed());
        assert!(rd.socket().unwrap().tcp_quickack().unwrap(), "settled with a quick ACK");
        // Settled once: nothing is owed until the next read.
        rd.socket().unwrap().set_tcp_quickack(false).unwrap();
        debt.settle();
        assert!(!debt.is_owed());
    }

    /// A peer that reads nothing: every send returns at once and what the
    /// socket did not take waits. Then the peer reads and the socket has
    /// room again while bytes still wait: later sends queue behind them.
    /// `progress` writes it all, and the peer gets every byte in the order
    /// sent.
    #[tokio::test]
    async fn a_send_never_waits_for_the_socket_and_the_bytes_keep_their_order() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncReadExt;
        let (_rd, wr, mut peer) = linked().await;
        let mut out = Sender::new(wr);
        // 64 chunks of 256 KiB, half of them far more than the two
        // sockets' buffers hold.
        let chunks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 256 * 1024]).collect();
        for c in &chunks[..32] {
            out.send(&mut c.clone()).unwrap();
        }
        let Sender::Direct { queued, at, .. } = &out else { panic!("plain TCP is written directly") };
        assert!(queued.len() > *at, "the socket took only part of it");
        let expected = chunks.concat();
        let n = expected.len();
        let read = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn({
            let read = read.clone();
            async move {
                let mut got = Vec::with_capacity(n);
                let mut buf = vec![0u8; 64 * 1024];
                while got.len() < n {
                    let k = peer.read(&mut buf).await?;
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                    read.store(got.len(), Ordering::Relaxed);
                }
                Ok::<_, io::Error>(got)
            }
        });
        let drained = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            // The peer reads a first megabyte: the socket has room, and
            // the rest of the first half still waits here.
            while read.load(Ordering::Relaxed) < 1 << 20 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            for c in &chunks[32..] {
                out.send(&mut c.clone()).unwrap();
            }
            while matches!(&out, Sender::Direct { queued, at, .. } if *at < queued.len()) {
                out.progress().await.unwrap();
            }
        });
        drained.await.expect("everything written once the peer reads");
        let got = reader.await.unwrap().unwrap();
        assert!(got == expected, "the bytes arrive whole and in the order sent");
    }

    /// The fix is read from the error's typed problem, never its words.
    #[test]
    fn a_certificate_error_names_the_setting_that_fixes_it() {
        for p in CertificateProblem::ALL {
            let e = ConnectError::Certificate {
                broker: "mqtts://h:8883".into(),
                reason: format!("TLS: x: {p}"),
                problem: Some(p),
            };
            assert_eq!(e.tls_setting(), p.setting(), "{p:?}");
        }
        assert_eq!(CertificateProblem::UnknownIssuer.setting(), Some("ca_file"));
        assert_eq!(CertificateProblem::ClientCertificateRequired.setting(), Some("client_cert"));
        let other = ConnectError::Certificate {
            broker: "mqtts://h:8883".into(),
            reason: "not a valid name".into(),
            problem: None,
        };
        assert_eq!(other.tls_setting(), None);
    }
}
