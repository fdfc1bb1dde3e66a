//! The connection flags shared by `pub`, `sub` and `doctor` (`-b`/`-h`/`-p`,
//! version, keep-alive, credentials, TLS) applied to a `ClientConfig`, and
//! the secrets they name (read, never logged).

use std::path::PathBuf;

use crate::values::{parse_keepalive, parse_size, parse_version};

impl crate::args::ConnArgs {
    /// The broker URLs of `-b` flags and of mosquitto-style `-h`/`-p`.
    pub fn urls(&self) -> Result<Vec<String>, String> {
        broker_urls(&self.brokers, self.host.as_deref(), self.port)
    }

    /// `client` with the version, keep-alive, credentials and TLS settings
    /// of the flags.
    pub fn apply(&self, client: steadfast::ClientConfig) -> Result<steadfast::ClientConfig, String> {
        let mut client = parse_version(&self.version)?.apply(client).keep_alive(parse_keepalive(self.keepalive)?);
        if let Some(max) = &self.max_packet {
            let bytes = parse_size(max).map_err(|e| format!("--max-packet: {e}"))?;
            let bytes = u32::try_from(bytes).map_err(|_| format!("--max-packet {max}: MQTT packets stop at 256 MB"))?;
            client = client.max_packet_size(bytes);
        }
        let secrets = Secrets {
            username: self.username.clone(),
            password: self.password.clone(),
            password_file: self.password_file.clone(),
            password_env: None,
            cafile: self.cafile.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            insecure: self.insecure,
            alpn: self.alpn.clone(),
            flags: true,
        };
        secrets.apply(client)
    }
}

/// Credentials and TLS settings, from flags or a bridge configuration.
#[derive(Debug, Default)]
pub struct Secrets {
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The variable holding the password (bridge `password_env`).
    pub password_env: Option<String>,
    pub cafile: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: bool,
    pub alpn: Vec<String>,
    /// Name things as flags (`--pw-file`) rather than as keys (`password_file`).
    pub flags: bool,
}

impl Secrets {
    fn name(&self, flag: &'static str, key: &'static str) -> &'static str {
        if self.flags {
            flag
        } else {
            key
        }
    }

    /// The password: given, from a file (its first line), or from the
    /// environment ($STEADFAST_PASSWORD for flags). Never logged.
    fn password(&self) -> Result<Option<Vec<u8>>, String> {
        let given = [self.password.is_some(), self.password_file.is_some(), self.password_env.is_some()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(format!(
                "give the password one way only: {}, {} or {}",
                self.name("-P", "password"),
                self.name("--pw-file", "password_file"),
                self.name("$STEADFAST_PASSWORD", "password_env")
            ));
        }
        if let Some(p) = &self.password {
            return Ok(Some(p.clone().into_bytes()));
        }
        if let Some(path) = &self.password_file {
            let flag = self.name("--pw-file", "password_file");
            let text = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
            let first = text.split(|b| *b == b'\n').next().unwrap_or_default();
            let first = first.strip_suffix(b"\r").unwrap_or(first);
            if first.is_empty() {
                return Err(format!(
                    "{flag} {}: the file is empty; put the password on its first line",
                    path.display()
                ));
            }
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                tracing::warn!(file = %path.display(), "the password file can be read by other users; chmod 600 it");
            }
            return Ok(Some(first.to_vec()));
        }
        // $STEADFAST_PASSWORD is for the command line only: a bridge reads
        // the variable its configuration names, never a stray one.
        let var = match (&self.password_env, self.flags) {
            (Some(v), _) => v.as_str(),
            (None, true) => "STEADFAST_PASSWORD",
            (None, false) => return Ok(None),
        };
        match std::env::var_os(var) {
            Some(v) => Ok(Some(v.into_encoded_bytes())),
            None if self.password_env.is_some() => {
                Err(format!("password_env = \"{var}\": the variable is not set in the bridge's environment"))
            }
            None => Ok(None),
        }
    }

    /// The TLS settings.
    fn tls(&self) -> Result<steadfast::TlsConfig, String> {
        let mut tls = steadfast::TlsConfig::new().insecure(self.insecure).alpn(self.alpn.clone());
        if let Some(ca) = &self.cafile {
            if self.insecure {
                return Err(format!(
                    "{} and {} contradict each other: drop {}",
                    self.name("--cafile", "cafile"),
                    self.name("--insecure", "insecure"),
                    self.name("--insecure", "insecure")
                ));
            }
            tls = tls.ca_file(ca);
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => tls = tls.client_cert(c, k),
            (None, None) => {}
            _ => {
                return Err(format!(
                    "{} and {} go together: give both (the client certificate and its private key)",
                    self.name("--cert", "cert"),
                    self.name("--key", "key")
                ))
            }
        }
        Ok(tls)
    }

    /// `client` with these credentials and TLS settings. TLS settings for
    /// brokers that are not `mqtts://` or `wss://` are refused.
    pub fn apply(&self, client: steadfast::ClientConfig) -> Result<steadfast::ClientConfig, String> {
        let password = self.password()?;
        let client = match (&self.username, password) {
            (Some(u), p) => client.credentials(u.clone(), p),
            (None, Some(_)) if self.password.is_some() || self.password_file.is_some() => {
                return Err(format!("a password needs a user name: give {}", self.name("-u", "username")))
            }
            // $STEADFAST_PASSWORD alone is for when -u is given.
            (None, _) => client,
        };
        let wants_tls = self.cafile.is_some() || self.cert.is_some() || self.insecure || !self.alpn.is_empty();
        if wants_tls && !client.all_brokers().iter().any(|b| b.transport.is_tls()) {
            return Err(format!(
                "TLS settings ({}) but no mqtts:// or wss:// broker: use mqtts://host:8883",
                self.name("--cafile, --cert, --insecure, --alpn", "cafile, cert, insecure, alpn")
            ));
        }
        Ok(client.tls(self.tls()?))
    }
}

/// mosquitto's `-L mqtt(s)://[user[:password]@]host[:port]/topic`, split.
#[derive(Debug, PartialEq, Eq)]
pub struct UrlFlag {
    /// The broker, without credentials.
    pub broker: String,
    /// The user name, if given.
    pub username: Option<String>,
    /// The password, if given.
    pub password: Option<String>,
    /// The topic (or filter).
    pub topic: String,
}

/// Parses `-L`.
pub fn parse_url_flag(s: &str) -> Result<UrlFlag, String> {
    let form = "use mqtt://[user[:password]@]host[:port]/topic (or mqtts://)";
    let (scheme, rest) = s.split_once("://").ok_or_else(|| format!("-L {s}: {form}"))?;
    if !matches!(scheme, "mqtt" | "mqtts") {
        return Err(format!("-L {s}: unknown scheme `{scheme}`; {form}"));
    }
    let (authority, topic) = rest.split_once('/').ok_or_else(|| format!("-L {s}: no topic; {form}"))?;
    if topic.is_empty() || authority.is_empty() {
        return Err(format!("-L {s}: {form}"));
    }
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some((u, p)) => (Some(u.to_owned()), (!p.is_empty()).then(|| p.to_owned())),
        None => (None, None),
    };
    Ok(UrlFlag { broker: format!("{scheme}://{host}"), username, password, topic: topic.to_owned() })
}

impl crate::args::ConnArgs {
    /// Folds `-L` into the broker, credential flags; returns its topic.
    pub fn take_url(&mut self) -> Result<Option<String>, String> {
        let Some(l) = self.url.take() else { return Ok(None) };
        if !self.brokers.is_empty() || self.host.is_some() || self.port.is_some() {
            return Err("-L gives the broker already; drop -b, -h and -p".into());
        }
        let f = parse_url_flag(&l)?;
        if f.username.is_some() && self.username.is_some() || f.password.is_some() && self.password.is_some() {
            return Err("-L gives the credentials already; drop -u and -P".into());
        }
        self.brokers.push(f.broker);
        self.username = f.username.or(self.username.take());
        self.password = f.password.or(self.password.take());
        Ok(Some(f.topic))
    }
}

/// The broker when none is given, as mosquitto_pub and mosquitto_sub.
pub const DEFAULT_BROKER: &str = "mqtt://localhost:1883";

/// `urls`, or the default broker when there are none.
pub fn or_default(urls: Vec<String>) -> Vec<String> {
    if urls.is_empty() {
        vec![DEFAULT_BROKER.to_owned()]
    } else {
        urls
    }
}

fn broker_urls(brokers: &[String], host: Option<&str>, port: Option<u16>) -> Result<Vec<String>, String> {
    let mut urls = brokers.to_vec();
    if host.is_some_and(|h| h.contains(':') && h.parse::<std::net::Ipv6Addr>().is_err()) {
        return Err("-h takes a host name or address only; give the port with -p".into());
    }
    if host.is_some() || port.is_some() {
        urls.push(format!("mqtt://{}:{}", host.unwrap_or("127.0.0.1"), port.unwrap_or(1883)));
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_flag_splits_as_mosquitto_reads_it() {
        let f = parse_url_flag("mqtt://u:p%w@host:1884/a/b/#").unwrap();
        let want = UrlFlag {
            broker: "mqtt://host:1884".into(),
            username: Some("u".into()),
            password: Some("p%w".into()),
            topic: "a/b/#".into(),
        };
        assert_eq!(f, want);
        let f = parse_url_flag("mqtts://host/t").unwrap();
        assert_eq!((f.broker.as_str(), f.username, f.topic.as_str()), ("mqtts://host", None, "t"));
        assert_eq!(parse_url_flag("mqtt://me@h/t").unwrap().username.as_deref(), Some("me"));
        for bad in ["host/t", "http://h/t", "mqtt://h", "mqtt://h/", "mqtt:///t"] {
            assert!(parse_url_flag(bad).is_err(), "{bad}");
        }
    }
}
