//! The bridge's TOML configuration: parsed, then checked as a whole, every
//! error named with its line (`steadfast bridge --check FILE`).
//!
//! ```toml
//! [store]
//! dir = "/var/lib/steadfast/bridge"
//!
//! [[route]]
//! name = "telemetry-up"
//! [route.source]
//! brokers = ["mqtt://127.0.0.1:1883"]
//! topics = ["sensors/#"]
//! qos = 1
//! client_id = "edge-bridge"
//! [route.destination]
//! brokers = ["mqtt://primary.example:8883", "mqtt://backup.example:8883"]
//! mode = "failover"
//! topic_prefix = "site-7/"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use steadfast::bridge::{route_dirs, Bridge, Rewrite, RewriteError, Route};
use steadfast::{
    BackoffConfig, BrokerSet, BrokerUrl, Class, ClientConfig, ConsumerConfig, OtherSets, OutboxConfig, Overflow,
    Policy, Qos,
};
use steadfast_core::parse_duration;
use steadfast_core::topic::validate_topic_filter;
use toml::Spanned;

use crate::conn::Secrets;
use crate::routes::{Ack, SetKey, SetSpec};
use crate::values::{parse_bounds, parse_qos, parse_version, Version};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    store: Spanned<StoreSpec>,
    #[serde(default)]
    route: Vec<Spanned<RouteSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSpec {
    dir: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    name: Spanned<String>,
    source: Spanned<SourceSpec>,
    destination: Spanned<DestSpec>,
    class: Option<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    max_attempts: Option<Spanned<u32>>,
    keep_latest: Option<bool>,
    priority: Option<Spanned<u8>>,
    max_queue: Option<Spanned<Vec<String>>>,
    max_age: Option<Spanned<String>>,
    overflow: Option<Spanned<String>>,
    deadline_overflow: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceSpec {
    brokers: Spanned<Vec<Spanned<String>>>,
    topics: Spanned<Vec<Spanned<String>>>,
    /// MQTT 3.1.1: unwrap the identity envelope.
    envelope: Option<bool>,
    qos: Option<Spanned<u8>>,
    client_id: Spanned<String>,
    version: Option<Spanned<String>>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    cafile: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure: Option<bool>,
    #[serde(default)]
    alpn: Vec<String>,
    /// Start with a fresh session instead of resuming the one the broker kept.
    clean: Option<bool>,
    session_expiry: Option<Spanned<String>>,
    backoff: Option<Spanned<String>>,
    /// MQTT 3.1.1: where producers here listen for receipts
    /// (`PREFIX/PRODUCER`); MQTT 5 messages name their topic.
    receipt_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestSpec {
    brokers: Spanned<Vec<Spanned<String>>>,
    /// MQTT 3.1.1: carry identities in the payload envelope.
    envelope: Option<bool>,
    mode: Option<Spanned<String>>,
    ack: Option<Spanned<Ack>>,
    failback_after: Option<Spanned<String>>,
    catch_up_for: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    cafile: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure: Option<bool>,
    #[serde(default)]
    alpn: Vec<String>,
    qos: Option<Spanned<u8>>,
    /// Most messages in flight per broker.
    max_inflight: Option<Spanned<u16>>,
    /// Failed links in a row with a message alone in flight that make it
    /// poison (0: never).
    poison_after: Option<u32>,
    /// A fixed ack timeout (default: adaptive to the round-trip time).
    ack_timeout: Option<Spanned<String>>,
    topic_prefix: Option<Spanned<String>>,
    strip_prefix: Option<Spanned<String>>,
    #[serde(default)]
    map: Vec<Spanned<MapSpec>>,
    backoff: Option<Spanned<String>>,
    /// Where consumers upstream send receipts for the producers behind
    /// this route (`PREFIX/PRODUCER`; the route listens at `PREFIX/#`).
    receipt_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapSpec {
    from: String,
    to: String,
}

/// Errors with the line they are on.
struct Errors<'a> {
    path: &'a Path,
    text: &'a str,
    list: Vec<String>,
}

impl Errors<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, msg: impl std::fmt::Display) {
        let line = self.text[..span.start.min(self.text.len())].matches('\n').count() + 1;
        self.list.push(format!("{}:{line}: {msg}", self.path.display()));
    }
}

/// `text` as a [`File`]. Every unknown key is reported, not only the first:
/// each one serde stops at is recorded with its line, its line blanked
/// (so that every line keeps its number), and the text read again (at most
/// 100 times). Any other error ends the reading, with the unknown keys
/// found so far. Returns the text as read last, for the lines of the
/// value errors.
fn parse_listing_unknown_keys(text: &str, path: &Path) -> Result<(File, Vec<String>, String), Vec<String>> {
    let mut unknown = Vec::new();
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_owned).collect();
    loop {
        let now: String = lines.concat();
        let e = match toml::from_str::<File>(&now) {
            Ok(file) => return Ok((file, unknown, now)),
            Err(e) => e,
        };
        let at = e.span().map(|s| now[..s.start.min(now.len())].matches('\n').count());
        let msg = e.message().trim().to_owned();
        let shown = match at {
            Some(i) => format!("{}:{}: {msg}", path.display(), i + 1),
            None => format!("{}: {msg}", path.display()),
        };
        unknown.push(shown);
        // A table header (`[[rout]]`) cannot be left out alone: its keys
        // would join the table before it.
        match at {
            Some(i)
                if msg.starts_with("unknown field")
                    && lines.get(i).is_some_and(|l| !l.trim_start().starts_with('['))
                    && unknown.len() <= 100 =>
            {
                lines[i] = "\n".into();
            }
            _ => return Err(unknown),
        }
    }
}

/// Reads and checks a bridge configuration; on error, every problem found,
/// each with its line.
pub fn load(path: &Path) -> Result<Bridge, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    let (file, unknown, text) = parse_listing_unknown_keys(&text, path)?;
    let mut errs = Errors { path, text: &text, list: unknown };
    let dir = PathBuf::from(file.store.get_ref().dir.get_ref());
    if file.store.get_ref().dir.get_ref().is_empty() {
        errs.at(
            file.store.get_ref().dir.span(),
            "store.dir is empty; give the directory the bridge keeps its state in",
        );
    }
    if file.route.is_empty() {
        errs.list.push(format!("{}: no [[route]]; define at least one", path.display()));
    }
    let mut routes = Vec::new();
    let mut names = Vec::new();
    let mut client_ids: Vec<String> = Vec::new();
    for r in &file.route {
        let name = r.get_ref().name.get_ref().clone();
        if names.contains(&name) {
            errs.at(r.get_ref().name.span(), format!("route `{name}` is defined twice; give each route its own name"));
        }
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            errs.at(
                r.get_ref().name.span(),
                format!("route name `{name}` must be a plain non-empty name (it names a directory)"),
            );
        }
        names.push(name);
        if let Some(route) = route(r.get_ref(), &dir, &mut errs) {
            // Two sessions under one client id take each other over for ever.
            // The route's receipts listener has a session of its own.
            let listener = format!("{}-receipts", route.destination.client_id());
            for id in [route.source.client().client_id(), route.destination.client_id(), listener.as_str()] {
                if client_ids.iter().any(|c| c == id) {
                    errs.at(r.get_ref().name.span(), format!("client id `{id}` is used twice; every route needs its own source and destination client ids"));
                }
                client_ids.push(id.to_owned());
            }
            routes.push(route);
        }
    }
    if errs.list.is_empty() {
        Ok(Bridge { dir, routes })
    } else {
        Err(errs.list)
    }
}

/// The credentials and TLS keys of a source or destination table.
macro_rules! secrets {
    ($side:expr) => {
        Secrets {
            username: $side.username.clone(),
            password: $side.password.clone(),
            password_file: $side.password_file.clone(),
            password_env: $side.password_env.clone(),
            cafile: $side.cafile.clone(),
            cert: $side.cert.clone(),
            key: $side.key.clone(),
            insecure: $side.insecure.unwrap_or(false),
            alpn: $side.alpn.clone(),
            flags: false,
        }
    };
}

/// One route, every mistake recorded with its line; `None` when there was
/// any. The tables are checked key by key first, then built, then checked
/// as a whole.
fn route(r: &RouteSpec, dir: &Path, errs: &mut Errors<'_>) -> Option<Route> {
    let name = r.name.get_ref().clone();
    let before = errs.list.len();
    let (outbox_dir, inbox_dir) = route_dirs(dir, &name);
    let source = SourceKeys::check(r.source.get_ref(), errs);
    let destination = DestinationKeys::check(r.destination.get_ref(), errs);
    let (policy, outbox) = delivery(r, errs);
    if errs.list.len() > before {
        return None;
    }
    let (source, destination) = (source?, destination?);
    let qos = destination.qos;
    let rewrite = destination.rewrite.clone();
    let source_cfg = source.build(r, inbox_dir, errs);
    let destination = destination.build(r, outbox_dir, policy, outbox, errs);
    // What only the whole configuration can tell (a broker listed twice,
    // an ack quorum over the set's size...).
    if let Err(e) = source_cfg.check() {
        errs.at(r.source.span(), format!("source: {e}"));
    }
    if let Err(e) = destination.check() {
        errs.at(r.destination.span(), format!("destination: {e}"));
    }
    if errs.list.len() > before {
        return None;
    }
    // Through `Route::new`: what every route's source asks of its brokers.
    let mut route = Route::new(name, source_cfg, destination).rewrite(rewrite);
    route.qos = qos;
    Some(route)
}

/// The source table's values, each checked: a consumer with an inbox.
struct SourceKeys {
    urls: Vec<BrokerUrl>,
    qos: Qos,
    version: Version,
    backoff: BackoffConfig,
    session_expiry: Option<Duration>,
}

impl SourceKeys {
    /// Every key checked (each mistake recorded) before any is given up on.
    fn check(s: &SourceSpec, errs: &mut Errors<'_>) -> Option<SourceKeys> {
        let urls = urls(&s.brokers, "source.brokers", errs);
        let qos = match &s.qos {
            Some(q) => parse_qos(*q.get_ref()).map_err(|e| errs.at(q.span(), e)).ok(),
            None => Some(Qos::AtLeastOnce),
        };
        if s.topics.get_ref().is_empty() {
            errs.at(s.topics.span(), "source.topics is empty; give at least one filter such as \"sensors/#\"");
        }
        for f in s.topics.get_ref() {
            if let Err(e) = validate_topic_filter(f.get_ref()) {
                errs.at(f.span(), format!("source topic filter `{}`: {e}", f.get_ref()));
            }
        }
        if s.client_id.get_ref().is_empty() {
            errs.at(s.client_id.span(), "source.client_id is empty; give the bridge a stable client id (its session)");
        }
        let version = version(&s.version, errs);
        let backoff = backoff(&s.backoff, errs);
        let session_expiry = duration(&s.session_expiry, "source.session_expiry", errs);
        Some(SourceKeys { urls: urls?, qos: qos?, version: version?, backoff: backoff?, session_expiry })
    }

    /// The route's consumer, its inbox in `inbox_dir`; a credential or TLS
    /// mistake is recorded.
    fn build(self, r: &RouteSpec, inbox_dir: PathBuf, errs: &mut Errors<'_>) -> ConsumerConfig {
        let s = r.source.get_ref();
        let several = self.urls.len() > 1;
        let mut client = ClientConfig::new(s.client_id.get_ref().clone(), self.urls[0].clone(), inbox_dir)
            .brokers(BrokerSet::new(self.urls))
            .version(self.version.version)
            .auto_version(self.version.auto)
            .clean_start(s.clean.unwrap_or(false))
            .envelope(s.envelope.unwrap_or(false))
            .backoff(self.backoff);
        if let Some(e) = self.session_expiry {
            client = client.session_expiry(e);
        }
        if let Some(p) = &s.receipt_prefix {
            client = client.receipt_prefix(p.clone());
        }
        match secrets!(s).apply(client.clone()) {
            Ok(c) => client = c,
            Err(e) => errs.at(r.source.span(), format!("source: {e}")),
        }
        // With one source broker, a redelivery is recognised by its packet id
        // (the outbox's `sources`), and an identity is kept upstream for the
        // consumers' inboxes: the route's own inbox would only add a sync per
        // batch. With several, it recognises the copies each broker sends.
        let mut source = ConsumerConfig::new(client).inbox(several);
        for f in s.topics.get_ref() {
            source = source.topic(f.get_ref().clone(), self.qos);
        }
        source
    }
}

/// The destination table's values, each checked: a publisher with an
/// outbox.
struct DestinationKeys {
    set: BrokerSet,
    qos: Option<Qos>,
    version: Version,
    backoff: BackoffConfig,
    rewrite: Rewrite,
    ack_timeout: Option<Duration>,
}

impl DestinationKeys {
    /// Every key checked (each mistake recorded) before any is given up on.
    fn check(d: &DestSpec, errs: &mut Errors<'_>) -> Option<DestinationKeys> {
        let set = broker_set(d, errs);
        if set.as_ref().is_some_and(|s| s.brokers().len() > 1 && s.routing() == steadfast::Mode::Balance) {
            errs.at(
                d.mode.as_ref().map_or(d.brokers.span(), |m| m.span()),
                "destination.mode balance is not for a bridge (per-topic order across brokers); use failover or fanout",
            );
        }
        let qos = d.qos.as_ref().and_then(|q| parse_qos(*q.get_ref()).map_err(|e| errs.at(q.span(), e)).ok());
        let version = version(&d.version, errs);
        let backoff = backoff(&d.backoff, errs);
        let rewrite = rewrite(d, errs);
        if let Some(m) = d.max_inflight.as_ref().filter(|m| *m.get_ref() == 0) {
            errs.at(m.span(), "max_inflight = 0 would let nothing through; use 1 or more");
        }
        let ack_timeout = duration(&d.ack_timeout, "destination.ack_timeout", errs);
        if let (Some(t), Some(key)) = (ack_timeout.filter(|t| *t < Duration::from_millis(100)), &d.ack_timeout) {
            errs.at(key.span(), format!("destination.ack_timeout {t:?} is too short; use at least 100ms"));
        }
        Some(DestinationKeys { set: set?, qos, version: version?, backoff: backoff?, rewrite, ack_timeout })
    }

    /// The route's publisher, its outbox in `outbox_dir`; a credential or
    /// TLS mistake is recorded.
    fn build(
        self,
        r: &RouteSpec,
        outbox_dir: PathBuf,
        policy: Policy,
        outbox: OutboxConfig,
        errs: &mut Errors<'_>,
    ) -> ClientConfig {
        let (s, d) = (r.source.get_ref(), r.destination.get_ref());
        let id = d.client_id.as_ref().map_or_else(|| format!("{}-out", s.client_id.get_ref()), |c| c.get_ref().clone());
        let mut destination = ClientConfig::new(id, self.set.brokers()[0].clone(), outbox_dir)
            .brokers(self.set)
            .version(self.version.version)
            .auto_version(self.version.auto)
            .envelope(d.envelope.unwrap_or(false))
            .backoff(self.backoff)
            .policy(policy)
            .outbox(outbox)
            // A changed destination keeps what was accepted for the old
            // one queued for it (and says so at start), never sends it on.
            .other_sets(OtherSets::Keep);
        if let Some(m) = d.max_inflight.as_ref().filter(|m| *m.get_ref() > 0) {
            destination = destination.max_inflight(*m.get_ref());
        }
        if let Some(n) = d.poison_after {
            destination = destination.poison_after(n);
        }
        if let Some(t) = self.ack_timeout {
            destination = destination.ack_timeout(t);
        }
        if let Some(p) = &d.receipt_prefix {
            destination = destination.receipt_prefix(p.clone());
        }
        match secrets!(d).apply(destination.clone()) {
            Ok(c) => destination = c,
            Err(e) => errs.at(r.destination.span(), format!("destination: {e}")),
        }
        destination
    }
}

/// The destination's broker set; a mistake is recorded on the key at
/// fault, with its line.
fn broker_set(d: &DestSpec, errs: &mut Errors<'_>) -> Option<BrokerSet> {
    let spec = SetSpec {
        brokers: d.brokers.get_ref().iter().map(|b| b.get_ref().clone()).collect(),
        mode: d.mode.as_ref().map(|m| m.get_ref().clone()),
        ack: d.ack.as_ref().map(|a| match a.get_ref() {
            Ack::Count(n) => Ack::Count(*n),
            Ack::Word(w) => Ack::Word(w.clone()),
        }),
        failback_after: duration(&d.failback_after, "destination.failback_after", errs),
        catch_up_for: duration(&d.catch_up_for, "destination.catch_up_for", errs),
    };
    urls(&d.brokers, "destination.brokers", errs)?;
    match spec.build("destination") {
        Ok(set) => Some(set),
        Err(e) => {
            let span = match e.key {
                SetKey::Ack => d.ack.as_ref().map(|m| m.span()),
                SetKey::Mode => d.mode.as_ref().map(|m| m.span()),
                SetKey::Brokers => None,
            };
            errs.at(span.unwrap_or(d.brokers.span()), e);
            None
        }
    }
}

/// The route's delivery policy and the bounds of what waits for the
/// destination.
fn delivery(r: &RouteSpec, errs: &mut Errors<'_>) -> (Policy, OutboxConfig) {
    let ttl = duration(&r.ttl, "ttl", errs);
    let class = match &r.class {
        Some(c) => Class::parse(c.get_ref(), ttl).map_err(|e| errs.at(c.span(), e)).ok(),
        None if ttl.is_some() => Some(Class::Deadline(ttl.expect("checked"))),
        None => Some(Class::Persistent),
    };
    let policy = Policy {
        class: class.unwrap_or_default(),
        max_attempts: r.max_attempts.as_ref().map(|m| *m.get_ref()),
        keep_latest: r.keep_latest.unwrap_or(false),
        priority: r.priority.as_ref().map_or(0, |p| *p.get_ref()),
    };
    if let Err(e) = policy.validate() {
        let span = r.priority.as_ref().map(|p| p.span()).or(r.max_attempts.as_ref().map(|m| m.span()));
        errs.at(span.unwrap_or(r.name.span()), e);
    }
    let (max_messages, max_bytes) = match &r.max_queue {
        Some(q) => parse_bounds("max_queue", q.get_ref()).map_err(|e| errs.at(q.span(), e)).unwrap_or_default(),
        None => (None, None),
    };
    let max_age = duration(&r.max_age, "max_age", errs);
    let outbox = OutboxConfig {
        max_messages,
        max_bytes,
        max_age_ms: max_age.map(|a| a.as_millis() as u64),
        overflow: overflow(&r.overflow, errs).unwrap_or_default(),
        deadline_overflow: overflow_opt(&r.deadline_overflow, errs),
    };
    (policy, outbox)
}

/// The destination's topic rewriting; each bad rule recorded with its line.
fn rewrite(d: &DestSpec, errs: &mut Errors<'_>) -> Rewrite {
    let mut rewrite = Rewrite::new();
    for m in &d.map {
        let MapSpec { from, to } = m.get_ref();
        match rewrite.clone().map(from, to) {
            Ok(r) => rewrite = r,
            Err(e) => errs.at(m.span(), e),
        }
    }
    type Setter = fn(Rewrite, &str) -> Result<Rewrite, RewriteError>;
    let prefixes: [(&Option<Spanned<String>>, Setter); 2] =
        [(&d.strip_prefix, Rewrite::strip_prefix), (&d.topic_prefix, Rewrite::prefix)];
    for (value, set) in prefixes {
        let Some(v) = value else { continue };
        match set(rewrite.clone(), v.get_ref()) {
            Ok(r) => rewrite = r,
            Err(e) => errs.at(v.span(), format!("destination.{e}")),
        }
    }
    rewrite
}

fn urls(list: &Spanned<Vec<Spanned<String>>>, what: &str, errs: &mut Errors<'_>) -> Option<Vec<BrokerUrl>> {
    if list.get_ref().is_empty() {
        errs.at(list.span(), format!("{what} is empty; list at least one mqtt://host:port"));
        return None;
    }
    let mut out = Vec::new();
    for u in list.get_ref() {
        match u.get_ref().parse::<BrokerUrl>() {
            Ok(url) => out.push(url),
            Err(e) => errs.at(u.span(), format!("{what}: {e}")),
        }
    }
    (out.len() == list.get_ref().len()).then_some(out)
}

fn version(v: &Option<Spanned<String>>, errs: &mut Errors<'_>) -> Option<Version> {
    match v {
        Some(v) => parse_version(v.get_ref()).map_err(|e| errs.at(v.span(), e)).ok(),
        // As `pub` and `sub`: a route whose broker speaks only 3.1.1
        // works, with a warning that says what becomes of identities.
        None => Some(Version::AUTO),
    }
}

/// A duration key, in the one syntax of every flag; `None` when absent or
/// wrong (the error is recorded with its line).
fn duration(v: &Option<Spanned<String>>, key: &str, errs: &mut Errors<'_>) -> Option<Duration> {
    let v = v.as_ref()?;
    parse_duration(v.get_ref()).map_err(|e| errs.at(v.span(), format!("{key}: {e}"))).ok()
}

fn backoff(v: &Option<Spanned<String>>, errs: &mut Errors<'_>) -> Option<BackoffConfig> {
    match v {
        Some(v) => BackoffConfig::parse(v.get_ref()).map_err(|e| errs.at(v.span(), e)).ok(),
        None => Some(BackoffConfig::default()),
    }
}

fn overflow_opt(v: &Option<Spanned<String>>, errs: &mut Errors<'_>) -> Option<Overflow> {
    let v = v.as_ref()?;
    Overflow::parse(v.get_ref()).map_err(|e| errs.at(v.span(), e)).ok()
}

fn overflow(v: &Option<Spanned<String>>, errs: &mut Errors<'_>) -> Option<Overflow> {
    overflow_opt(v, errs).or(Some(Overflow::Block))
}
