//! Reaching a shared inbox's PostgreSQL: libpq's connection string (a
//! `postgres://` URL or `key=value` words) with libpq's TLS settings,
//! over rustls. tokio-postgres knows `sslmode=disable|prefer|require`;
//! the settings it does not know (`sslmode=verify-ca|verify-full`,
//! `sslrootcert`, `sslcert`, `sslkey`) are taken out of the string here
//! and served by the same TLS code as the brokers' (docs/design.md,
//! "Consumer groups").

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Config};

use crate::error::ConfigError;
use crate::transport::TlsConfig;

/// The settings taken out of the string for rustls.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// A shared inbox's address: what tokio-postgres connects to, and how
/// TLS checks the server.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: Config,
    tls: Tls,
    /// The string, its password hidden (for messages).
    pub(crate) shown: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.shown).finish_non_exhaustive()
    }
}

/// True for the URL form (else libpq's `key=value` words).
fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The string with every password in it hidden: a URL's `user:PASSWORD@`
/// and each `password` setting, in either form.
pub(crate) fn shown(url: &str) -> String {
    let mut out = url.to_owned();
    // From the end, so that the places found stay right.
    for w in words(url).iter().rev().filter(|w| w.key == "password") {
        out.replace_range(w.start..w.end, "password=***");
    }
    if let Some(s) = is_url(&out).then(|| out.find("://")).flatten() {
        let rest = s + 3;
        // Up to the query, not the path: an unescaped `/` in a password
        // is hidden too (a path with `@` is hidden more than needed).
        let authority_end = out[rest..].find('?').map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@').map(|i| rest + i) {
            if let Some(colon) = out[rest..at].find(':').map(|i| rest + i) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    out
}

/// One `key=value` setting of a connection string: its place in the
/// string and its value, unquoted and unescaped.
struct Word {
    key: String,
    value: String,
    start: usize,
    end: usize,
}

/// The settings of a connection string: a URL's query parameters, or
/// libpq's `key=value` words (values quoted with `'` and escaped with
/// `\`).
fn words(s: &str) -> Vec<Word> {
    if is_url(s) {
        let Some(q) = s.find('?') else { return Vec::new() };
        let mut out = Vec::new();
        let mut start = q + 1;
        for part in s[q + 1..].split('&') {
            let end = start + part.len();
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            out.push(Word { key: unescape_url(k), value: unescape_url(v), start, end });
            start = end + 1;
        }
        return out;
    }
    let b = s.as_bytes();
    let (mut i, mut out) = (0, Vec::new());
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return out;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_owned();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'=' {
            i += 1;
        }
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = Vec::new();
        let quoted = i < b.len() && b[i] == b'\'';
        if quoted {
            i += 1;
        }
        while i < b.len() {
            match b[i] {
                b'\\' if i + 1 < b.len() => {
                    value.push(b[i + 1]);
                    i += 2;
                    continue;
                }
                b'\'' if quoted => {
                    i += 1;
                    break;
                }
                c if !quoted && c.is_ascii_whitespace() => break,
                c => value.push(c),
            }
            i += 1;
        }
        out.push(Word { key, value: String::from_utf8_lossy(&value).into_owned(), start, end: i });
    }
}

/// A URL part with its `%XX` escapes undone (as libpq: `+` stays).
fn unescape_url(s: &str) -> String {
    let b = s.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(b.len()), 0);
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The string without the settings whose key is in `keys` (a URL keeps
/// its `?` only while parameters are left).
fn without(s: &str, keys: &[&str]) -> String {
    if is_url(s) {
        let Some(q) = s.find('?') else { return s.to_owned() };
        let kept: Vec<&str> = s[q + 1..]
            .split('&')
            .filter(|part| {
                let key = part.split_once('=').map_or(*part, |(k, _)| k);
                !part.is_empty() && !keys.contains(&unescape_url(key).as_str())
            })
            .collect();
        return if kept.is_empty() { s[..q].to_owned() } else { format!("{}?{}", &s[..q], kept.join("&")) };
    }
    let mut out = s.to_owned();
    for w in words(s).iter().rev().filter(|w| keys.contains(&w.key.as_str())) {
        out.replace_range(w.start..w.end, "");
    }
    out
}

impl Target {
    /// Reads a connection string: tokio-postgres parses all but the TLS
    /// settings, which become a rustls configuration (its files read
    /// now, so that a wrong path is told before anything connects).
    pub(crate) fn parse(url: &str) -> Result<Target, ConfigError> {
        let shown = shown(url);
        let bad = |reason: String| ConfigError::SharedInboxUrl { url: shown.clone(), reason };
        let found = words(url);
        // The last of a setting given twice counts, as in libpq.
        let setting = |key: &str| found.iter().rev().find(|w| w.key == key).map(|w| w.value.clone());
        let mut config: Config = without(url, &TLS_KEYS).parse().map_err(|e| bad(format!("{e}")))?;
        let mode = setting("sslmode").unwrap_or_else(|| "prefer".to_owned());
        let root = setting("sslrootcert");
        if root.as_deref() == Some("system") && mode != "verify-full" {
            // As libpq 16: any public CA's certificate for any name would do.
            return Err(bad(format!(
                "sslrootcert=system trusts every public CA: it needs sslmode=verify-full, not {mode}"
            )));
        }
        let (ssl, verify_chain, verify_name) = match mode.as_str() {
            "disable" => (SslMode::Disable, false, false),
            // As libpq: with a root certificate, `prefer` and `require`
            // verify the chain (as verify-ca); without one, they only
            // encrypt.
            "prefer" => (SslMode::Prefer, root.is_some(), false),
            "require" => (SslMode::Require, root.is_some(), false),
            "verify-ca" if root.is_none() => {
                return Err(bad("sslmode=verify-ca needs sslrootcert=PATH, the CA to trust (against the platform's roots any public certificate would pass: use verify-full for those)".into()))
            }
            "verify-ca" => (SslMode::Require, true, false),
            "verify-full" => (SslMode::Require, true, true),
            "allow" => {
                return Err(bad(
                    "sslmode=allow (plain first, TLS if refused) is not supported; use prefer, require or verify-full".into(),
                ))
            }
            other => {
                return Err(bad(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        config.ssl_mode(ssl);
        let mut tls = TlsConfig::new().insecure(!verify_chain).any_name(!verify_name);
        match root.as_deref() {
            // libpq 16: the platform's roots, as without the setting here.
            None | Some("system") => {}
            Some(path) => tls = tls.ca_file(path),
        }
        match (setting("sslcert"), setting("sslkey")) {
            (Some(cert), Some(key)) => tls = tls.client_cert(cert, key),
            (None, None) => {}
            (Some(_), None) => return Err(bad("sslcert without sslkey; give the client certificate's key too".into())),
            (None, Some(_)) => return Err(bad("sslkey without sslcert; give the client certificate too".into())),
        }
        let rustls = if ssl == SslMode::Disable { None } else { Some(tls.rustls()?) };
        Ok(Target { config, tls: Tls(rustls), shown })
    }

    /// Connects with `config` (this target's, changed as the caller
    /// needs); the connection is driven by a task of its own, which
    /// `on_end` is told of when it ends with an error.
    pub(crate) async fn connect(
        &self,
        config: &Config,
        on_end: impl FnOnce(tokio_postgres::Error) + Send + 'static,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                on_end(e);
            }
        });
        Ok(client)
    }
}

/// What is wrong, in words that name the setting to change: PostgreSQL's
/// message and code for a refused statement, a certificate's problem for
/// a failed TLS handshake.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    use rustls::CertificateError as C;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        let tls = s.downcast_ref::<rustls::Error>().or_else(|| {
            s.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            let fix = match tls {
                rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
                    "the server's certificate is not signed by a CA we trust; give its CA with sslrootcert=PATH"
                }
                rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                    "the server's certificate does not name this host; connect by a name it holds, or use sslmode=verify-ca"
                }
                rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                    "the server's certificate has expired; renew it (or check this machine's clock)"
                }
                rustls::Error::AlertReceived(_) => {
                    "the server refused the handshake; does it want a client certificate (sslcert=, sslkey=) signed by a CA it trusts?"
                }
                _ => "",
            };
            return if fix.is_empty() { format!("TLS: {tls}") } else { format!("TLS: {tls}: {fix}") };
        }
        source = s.source();
    }
    e.to_string()
}

/// tokio-postgres's TLS through rustls (`None`: `sslmode=disable`).
#[derive(Clone)]
struct Tls(Option<Arc<rustls::ClientConfig>>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for Tls {
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
        // Asked for every host, TLS or not (a Unix socket's is empty):
        // a name unfit for TLS is an error only if a handshake starts.
        Ok(Connect { config: self.0.clone(), host: host.to_owned() })
    }
}

/// One TLS handshake to come.
pub(crate) struct Connect {
    config: Option<Arc<rustls::ClientConfig>>,
    host: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for Connect {
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| io::Error::other("TLS asked for with sslmode=disable"))?;
            let name = ServerName::try_from(self.host.clone())
                .map_err(|_| io::Error::other(format!("`{}` is not a valid TLS server name", self.host)))?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, stream).await?;
            Ok(Stream(tls))
        })
    }
}

/// A TLS connection to PostgreSQL. No channel binding is offered (SCRAM
/// then authenticates without it, as libpq's `channel_binding=prefer`
/// does with a server that has none).
pub(crate) struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_out_of_a_url_and_the_rest_kept() {
        let cut = |s: &str| without(s, &TLS_KEYS);
        assert_eq!(cut("postgres://u@h/db?sslmode=verify-full"), "postgres://u@h/db");
        assert_eq!(
            cut("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=3"),
            "postgres://u@h/db?connect_timeout=3"
        );
        assert_eq!(
            cut("postgres://u@h/db?application_name=x&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3"),
            "postgres://u@h/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(cut("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem"), "postgres://u@h/db");
        assert_eq!(
            cut("host=h user=u sslmode=verify-ca sslrootcert='/a b/ca.pem' dbname=d"),
            "host=h user=u   dbname=d"
        );
        assert_eq!(words("postgres://u@h/db?sslrootcert=/a+b.pem")[0].value, "/a+b.pem");
        let w = words("postgres://u@h/db?sslrootcert=%2Fetc%2Fca%20x.pem");
        assert_eq!(w[0].value, "/etc/ca x.pem");
        let w = words("host=h sslrootcert = 'it\\'s.pem'");
        assert_eq!((w[1].key.as_str(), w[1].value.as_str()), ("sslrootcert", "it's.pem"));
    }

    #[test]
    fn passwords_are_hidden_in_both_forms() {
        assert_eq!(shown("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(shown("host=h password=secret user=u"), "host=h password=*** user=u");
        assert_eq!(shown("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(shown("postgres://u:pw@h/db?password=p@ss&x=1"), "postgres://u:***@h/db?password=***&x=1");
        assert_eq!(shown("password=a host=h password='b c'"), "password=*** host=h password=***");
        assert_eq!(shown("postgres://u:pa/ss@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn tls_mistakes_are_named_with_their_fix() {
        let e = |s: &str| Target::parse(s).unwrap_err().to_string();
        assert!(e("postgres://u@h/db?sslmode=allow").contains("use prefer, require or verify-full"));
        assert!(e("postgres://u@h/db?sslmode=strict").contains("not one of disable"));
        assert!(e("postgres://u@h/db?sslmode=verify-full&sslcert=/c.pem").contains("sslcert without sslkey"));
        let missing = e("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nowhere/ca.pem");
        assert!(missing.contains("/nowhere/ca.pem"), "{missing}");
        assert!(e("postgres://u@h/db?sslmode=verify-ca").contains("needs sslrootcert=PATH"));
        assert!(e("postgres://u@h/db?sslmode=require&sslrootcert=system").contains("needs sslmode=verify-full"));
        assert!(Target::parse("postgres://u@h/db?sslmode=disable").is_ok());
        assert!(Target::parse("host=/var/run/postgresql user=u sslmode=disable").is_ok());
        assert!(Target::parse("postgres://u@h/db?sslmode=require").is_ok());
    }
}
