//! Small helpers: sizes, default paths, logging.

use std::path::PathBuf;
use std::time::Duration;

impl crate::args::ConnArgs {
    /// The broker URLs of `-b` flags and of mosquitto-style `-h`/`-p`.
    pub fn urls(&self) -> Result<Vec<String>, String> {
        broker_urls(&self.brokers, self.host.as_deref(), self.port)
    }

    /// `client` with the version, keep-alive, credentials and TLS settings
    /// of the flags.
    pub fn apply(&self, client: steadfast::ClientConfig) -> Result<steadfast::ClientConfig, String> {
        let mut client = client.version(parse_version(&self.version)?).keep_alive(parse_keepalive(self.keepalive)?);
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

/// A repeatable `COUNT|SIZE` bound (`10000`, `100MB`): the count and the
/// bytes given, the last of each winning; 0 is refused.
pub fn parse_bounds(flag: &str, values: &[String]) -> Result<(Option<u64>, Option<u64>), String> {
    let (mut count, mut bytes) = (None, None);
    for v in values {
        if v.chars().all(|c| c.is_ascii_digit()) {
            count = Some(v.parse::<u64>().map_err(|_| format!("{flag} {v} is too large"))?);
        } else {
            bytes = Some(parse_size(v).map_err(|e| format!("{flag}: {e}"))?);
        }
    }
    if count == Some(0) || bytes == Some(0) {
        return Err(format!("{flag}: a bound of 0 would hold nothing; give a bound of at least 1, or none"));
    }
    Ok((count, bytes))
}

/// `-q`.
pub fn parse_qos(q: u8) -> Result<steadfast::Qos, String> {
    match q {
        0 => Ok(steadfast::Qos::AtMostOnce),
        1 => Ok(steadfast::Qos::AtLeastOnce),
        2 => Ok(steadfast::Qos::ExactlyOnce),
        q => Err(format!("QoS {q} does not exist; use -q 0, 1 or 2")),
    }
}

/// `-V`.
pub fn parse_version(v: &str) -> Result<steadfast::ProtocolVersion, String> {
    match v {
        "5" | "mqttv5" | "50" => Ok(steadfast::ProtocolVersion::V5),
        "311" | "mqttv311" | "3.1.1" => Ok(steadfast::ProtocolVersion::V311),
        v => Err(format!("protocol version `{v}` is not supported; use -V 311 or -V 5")),
    }
}

/// `-k`.
pub fn parse_keepalive(k: u64) -> Result<Duration, String> {
    if k == 0 || k > 65535 {
        return Err(format!("keep-alive {k} s is out of range; use 1 to 65535"));
    }
    Ok(Duration::from_secs(k))
}

/// Parses `1024`, `64KB`, `100MB`, `2GB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size; use e.g. 1048576, 64KB, 100MB, 2GB"))?;
    let mult = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("`{s}` has an unknown unit; use KB, MB or GB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// `$XDG_STATE_HOME/steadfast/outbox/<id>`, else `~/.local/state/...`.
pub fn default_outbox(client_id: &str) -> PathBuf {
    state_dir("outbox", client_id)
}

/// `$XDG_STATE_HOME/steadfast/inbox/<id>`, else `~/.local/state/...`.
pub fn default_inbox(client_id: &str) -> PathBuf {
    state_dir("inbox", client_id)
}

fn state_dir(kind: &str, client_id: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    // One directory per client id, never outside `outbox/` and never shared
    // by two ids: anything but letters, digits, `-` and `_` (and `.` past
    // the first character) is written as %XX.
    let mut safe = String::new();
    for (i, b) in client_id.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            safe.push(b as char);
        } else {
            safe.push_str(&format!("%{b:02X}"));
        }
    }
    base.join("steadfast").join(kind).join(safe)
}

/// A stable default client id for this machine: `steadfast-<role>-<host>`.
pub fn default_client_id_for(role: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty());
    format!("steadfast-{role}-{}", host.unwrap_or_else(|| "local".into()))
}

/// The publisher's default client id.
pub fn default_client_id() -> String {
    default_client_id_for("pub")
}

/// Logs to stderr: warnings by default, debug with `-d`, RUST_LOG wins.
/// `format`: `human` (default) or `json`, one object per line with the
/// time, level, message and fields. Payloads and credentials are never in
/// a log field (README, "Logs").
pub fn init_logging(debug: bool, quiet: bool, format: &str) -> Result<(), String> {
    let default = match (debug, quiet) {
        (true, _) => "debug",
        (false, true) => "error",
        (false, false) => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let base = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        "human" => drop(base.with_ansi(ansi).try_init()),
        "json" => drop(base.json().flatten_event(true).try_init()),
        o => return Err(format!("--log-format `{o}`: use human or json")),
    }
    Ok(())
}

/// `1.5 KiB` style.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_default_paths() {
        assert_eq!(parse_size("64KB"), Ok(65536));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(parse_size("3XB").is_err());
        let base = default_outbox("x").parent().unwrap().to_owned();
        for (id, dir) in [("gw-7", "gw-7"), ("a/b", "a%2Fb"), ("a_b", "a_b"), ("..", "%2E."), (".hidden", "%2Ehidden")]
        {
            assert_eq!(default_outbox(id), base.join(dir), "{id}");
        }
    }
}
