//! What the constructors take: broker sets, TLS, backoff, delivery
//! policies, receipt rules and outbox bounds, each checked here and turned
//! into the library's configuration. A bad value raises `ConfigError`
//! naming the setting and the fix.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::prelude::*;
use steadfast::{
    AckQuorum, BackoffConfig, BrokerSet, BrokerUrl, Class, ClientConfig, Message, Mode, OutboxConfig, Overflow, Policy,
    ProtocolVersion, Qos, ReceiptRule, TlsConfig,
};

use crate::{config_error, seconds, ConfigError};

/// A `TypeError` from a settings constructor called for `publish` or
/// `Consumer`, worded as the user's call: `publish() got ...`.
pub(crate) fn as_call(py: Python<'_>, e: PyErr) -> PyErr {
    if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) {
        let msg = e.value(py).to_string().replacen(".__new__()", "()", 1);
        return pyo3::exceptions::PyTypeError::new_err(msg);
    }
    e
}

pub(crate) fn qos(q: u8) -> PyResult<Qos> {
    match q {
        0 => Ok(Qos::AtMostOnce),
        1 => Ok(Qos::AtLeastOnce),
        2 => Ok(Qos::ExactlyOnce),
        _ => Err(ConfigError::new_err(format!("qos {q} does not exist; use 0, 1 or 2"))),
    }
}

fn version(v: u16) -> PyResult<ProtocolVersion> {
    match v {
        5 => Ok(ProtocolVersion::V5),
        3 | 4 | 31 | 311 => Ok(ProtocolVersion::V311),
        _ => Err(ConfigError::new_err(format!("version {v} is not an MQTT version; use 5 or 311"))),
    }
}

/// A fanout set's `ack`: `"all"`, `"any"` or a count of brokers.
#[derive(FromPyObject, Clone)]
pub(crate) enum Ack {
    Count(u32),
    Name(String),
}

impl Ack {
    fn quorum(&self) -> PyResult<AckQuorum> {
        match self {
            Ack::Count(n) => Ok(AckQuorum::Count(*n)),
            Ack::Name(s) => s.parse().map_err(config_error),
        }
    }
}

/// The way a set of brokers is used (the default set, or a route's).
pub(crate) struct SetArgs<'a> {
    pub brokers: &'a [String],
    pub mode: &'a str,
    pub ack: Option<Ack>,
    pub failback_after: Option<f64>,
    pub catch_up_for: Option<f64>,
}

impl SetArgs<'_> {
    fn urls(&self) -> PyResult<Vec<BrokerUrl>> {
        if self.brokers.is_empty() {
            return Err(ConfigError::new_err("brokers is empty; give at least one, say [\"mqtt://127.0.0.1:1883\"]"));
        }
        self.brokers
            .iter()
            .map(|b| b.parse::<BrokerUrl>().map_err(|e| ConfigError::new_err(format!("broker `{b}`: {e}"))))
            .collect()
    }

    fn set(&self) -> PyResult<BrokerSet> {
        let mode: Mode = self.mode.parse().map_err(|_| {
            ConfigError::new_err(format!("mode `{}` is unknown; use failover, fanout or balance", self.mode))
        })?;
        let mut set = BrokerSet::new(self.urls()?).mode(mode);
        if let Some(a) = &self.ack {
            set = set.ack(a.quorum()?);
        }
        if let Some(s) = self.failback_after {
            set = set.failback_after(seconds("failback_after", s, 0.0)?);
        }
        if let Some(s) = self.catch_up_for {
            set = set.catch_up_for(seconds("catch_up_for", s, 0.0)?);
        }
        Ok(set)
    }
}

/// The connection settings shared by `Client` and `Consumer`.
pub(crate) struct Connection<'a> {
    pub client_id: &'a str,
    pub set: SetArgs<'a>,
    pub dir: PathBuf,
    pub version: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub keep_alive: Option<f64>,
    pub tls: Option<&'a Tls>,
    pub backoff: Option<&'a str>,
}

impl Connection<'_> {
    pub(crate) fn config(&self) -> PyResult<ClientConfig> {
        let set = self.set.set()?;
        let mut cfg = ClientConfig::new(self.client_id, set.brokers()[0].clone(), self.dir.clone())
            .brokers(set)
            .version(version(self.version)?);
        if let Some(u) = self.username {
            cfg = cfg.credentials(u, self.password.map(|p| p.as_bytes().to_vec()));
        } else if self.password.is_some() {
            return Err(ConfigError::new_err("password without username; give username= as well"));
        }
        if let Some(k) = self.keep_alive {
            cfg = cfg.keep_alive(seconds("keep_alive", k, 1.0)?);
        }
        if let Some(t) = self.tls {
            cfg = cfg.tls(t.config());
        }
        if let Some(b) = self.backoff {
            let b = BackoffConfig::parse(b).map_err(|e| ConfigError::new_err(format!("backoff `{b}`: {e}")))?;
            cfg = cfg.backoff(b);
        }
        Ok(cfg)
    }
}

/// TLS settings for `mqtts://` and `wss://` brokers.
#[pyclass(module = "steadfast", frozen)]
pub(crate) struct Tls {
    #[pyo3(get)]
    ca_file: Option<PathBuf>,
    #[pyo3(get)]
    cert: Option<PathBuf>,
    #[pyo3(get)]
    key: Option<PathBuf>,
    #[pyo3(get)]
    insecure: bool,
    #[pyo3(get)]
    alpn: Vec<String>,
}

impl Tls {
    fn config(&self) -> TlsConfig {
        let mut t = TlsConfig::new().insecure(self.insecure).alpn(self.alpn.clone());
        if let Some(ca) = &self.ca_file {
            t = t.ca_file(ca);
        }
        if let (Some(c), Some(k)) = (&self.cert, &self.key) {
            t = t.client_cert(c, k);
        }
        t
    }
}

#[pymethods]
impl Tls {
    /// `ca_file`: trust only the CA certificates in this PEM file (default:
    /// the platform's roots); `cert` and `key`: a client certificate (PEM)
    /// for mutual TLS; `insecure`: do not verify the broker at all; `alpn`:
    /// protocol names to offer.
    #[new]
    #[pyo3(signature = (*, ca_file = None, cert = None, key = None, insecure = false, alpn = None))]
    fn new(
        ca_file: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        insecure: bool,
        alpn: Option<Vec<String>>,
    ) -> PyResult<Self> {
        if cert.is_some() != key.is_some() {
            return Err(ConfigError::new_err("a client certificate needs both cert= and key= (PEM files)"));
        }
        for (name, path) in [("ca_file", &ca_file), ("cert", &cert), ("key", &key)] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(ConfigError::new_err(format!("{name} `{}` is not a readable file", p.display())));
                }
            }
        }
        Ok(Tls { ca_file, cert, key, insecure, alpn: alpn.unwrap_or_default() })
    }

    fn __repr__(&self) -> String {
        let path =
            |p: &Option<PathBuf>| p.as_ref().map_or("None".to_owned(), |p| format!("{:?}", p.display().to_string()));
        let insecure = if self.insecure { "True" } else { "False" };
        format!("Tls(ca_file={}, cert={}, insecure={insecure})", path(&self.ca_file), path(&self.cert))
    }
}

/// What a message asks of its consumers: receipts once they handled it.
#[pyclass(module = "steadfast", frozen)]
pub(crate) struct Receipts {
    pub(crate) rule: ReceiptRule,
}

#[pymethods]
impl Receipts {
    /// `consumers`: the names that count (their `receipt_as`, or client
    /// ids; default: any consumer); `need`: `"any"`, `"all"` or a count
    /// (default: all of `consumers`, or one from any); `timeout`: seconds
    /// after the broker's acknowledgement before the message is published
    /// again (doubled after each resend).
    #[new]
    #[pyo3(signature = (*, consumers = None, need = None, timeout = 30.0))]
    fn new(consumers: Option<Vec<String>>, need: Option<Ack>, timeout: f64) -> PyResult<Self> {
        let need = need.map(|n| match n {
            Ack::Count(n) => n.to_string(),
            Ack::Name(s) => s,
        });
        let rule =
            ReceiptRule::from_parts(seconds("timeout", timeout, 0.0)?, need.as_deref(), consumers.unwrap_or_default())
                .map_err(|e| ConfigError::new_err(format!("receipts: {e}")))?;
        Ok(Receipts { rule })
    }

    fn __repr__(&self) -> String {
        format!("Receipts({})", self.rule)
    }
}

/// The receipts setting of a client or a message: `True` (one from any
/// consumer within 30 s), `False`, or a `Receipts`.
#[derive(FromPyObject)]
pub(crate) enum ReceiptsArg<'py> {
    On(bool),
    Rule(Bound<'py, Receipts>),
}

impl ReceiptsArg<'_> {
    /// `None`: no receipts.
    pub(crate) fn rule(&self) -> Option<ReceiptRule> {
        match self {
            ReceiptsArg::On(false) => None,
            ReceiptsArg::On(true) => Some(ReceiptRule::any(Duration::from_secs(30))),
            ReceiptsArg::Rule(r) => Some(r.get().rule.clone()),
        }
    }
}

/// Delivery class, time to live, priority, retry budget and keep-latest,
/// as given (each `None`: the default of the route or the client).
#[derive(Clone, Copy, Default)]
pub(crate) struct PolicyArgs {
    class: Option<Class>,
    max_attempts: Option<u32>,
    keep_latest: Option<bool>,
    priority: Option<u8>,
}

impl PolicyArgs {
    pub(crate) fn new(
        delivery_class: Option<&str>,
        ttl: Option<f64>,
        priority: Option<u8>,
        max_attempts: Option<u32>,
        keep_latest: Option<bool>,
    ) -> PyResult<Self> {
        let ttl = ttl.map(|t| seconds("ttl", t, 0.0)).transpose()?;
        let class = match (delivery_class, ttl) {
            (None, None) => None,
            (None, Some(t)) => Some(Class::Deadline(t)),
            (Some(c), t) => {
                Some(Class::parse(c, t).map_err(|e| ConfigError::new_err(format!("delivery_class `{c}`: {e}")))?)
            }
        };
        let args = PolicyArgs { class, max_attempts, keep_latest, priority };
        args.over(Policy::default()).validate().map_err(config_error)?;
        Ok(args)
    }

    fn is_empty(&self) -> bool {
        self.class.is_none() && self.max_attempts.is_none() && self.keep_latest.is_none() && self.priority.is_none()
    }

    /// These settings over `base`.
    fn over(self, base: Policy) -> Policy {
        Policy {
            class: self.class.unwrap_or(base.class),
            max_attempts: self.max_attempts.or(base.max_attempts),
            keep_latest: self.keep_latest.unwrap_or(base.keep_latest),
            priority: self.priority.unwrap_or(base.priority),
        }
    }

    /// The default policy they make, if any was given.
    pub(crate) fn policy(self) -> Option<Policy> {
        (!self.is_empty()).then(|| self.over(Policy::default()))
    }

    /// A message with these settings (the others stay its route's).
    pub(crate) fn apply(self, mut m: Message) -> Message {
        if let Some(c) = self.class {
            m = m.class(c);
        }
        if let Some(n) = self.max_attempts {
            m = m.max_attempts(n);
        }
        if let Some(k) = self.keep_latest {
            m = m.keep_latest(k);
        }
        if let Some(p) = self.priority {
            m = m.priority(p);
        }
        m
    }
}

/// A named set of brokers that messages can be sent through
/// (`publish(..., route=NAME)`), with its own mode and default policy.
#[pyclass(module = "steadfast", frozen)]
pub(crate) struct Route {
    pub(crate) set: BrokerSet,
}

#[pymethods]
impl Route {
    #[new]
    #[pyo3(signature = (brokers, *, mode = "failover", ack = None, failback_after = None, catch_up_for = None, delivery_class = None, ttl = None, priority = None, max_attempts = None, keep_latest = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        brokers: Vec<String>,
        mode: &str,
        ack: Option<Ack>,
        failback_after: Option<f64>,
        catch_up_for: Option<f64>,
        delivery_class: Option<&str>,
        ttl: Option<f64>,
        priority: Option<u8>,
        max_attempts: Option<u32>,
        keep_latest: Option<bool>,
    ) -> PyResult<Self> {
        let mut set = SetArgs { brokers: &brokers, mode, ack, failback_after, catch_up_for }.set()?;
        if let Some(p) = PolicyArgs::new(delivery_class, ttl, priority, max_attempts, keep_latest)?.policy() {
            set = set.policy(p);
        }
        Ok(Route { set })
    }

    fn __repr__(&self) -> String {
        let urls: Vec<String> = self.set.brokers().iter().map(|b| b.to_string()).collect();
        let mode = match self.set.routing() {
            Mode::Failover => "failover",
            Mode::Fanout => "fanout",
            Mode::Balance => "balance",
        };
        format!("Route({urls:?}, mode={mode:?})")
    }
}

/// A route given as a `Route` or as a list of broker URLs (failover).
#[derive(FromPyObject)]
pub(crate) enum RouteArg<'py> {
    Route(Bound<'py, Route>),
    Brokers(Vec<String>),
}

impl RouteArg<'_> {
    pub(crate) fn set(&self) -> PyResult<BrokerSet> {
        match self {
            RouteArg::Route(r) => Ok(r.get().set.clone()),
            RouteArg::Brokers(b) => {
                SetArgs { brokers: b, mode: "failover", ack: None, failback_after: None, catch_up_for: None }.set()
            }
        }
    }
}

/// The outbox bounds and what happens when one is reached.
pub(crate) fn outbox(
    max_messages: Option<u64>,
    max_bytes: Option<u64>,
    max_age: Option<f64>,
    overflow: Option<&str>,
) -> PyResult<Option<OutboxConfig>> {
    if max_messages.is_none() && max_bytes.is_none() && max_age.is_none() && overflow.is_none() {
        return Ok(None);
    }
    let overflow =
        overflow.map(|o| Overflow::parse(o).map_err(|e| ConfigError::new_err(format!("overflow: {e}")))).transpose()?;
    Ok(Some(OutboxConfig {
        max_messages,
        max_bytes,
        max_age_ms: max_age.map(|a| seconds("max_age", a, 0.0)).transpose()?.map(|d| d.as_millis() as u64),
        overflow: overflow.unwrap_or_default(),
        deadline_overflow: None,
    }))
}
