//! Client configuration: required values in the constructor, the rest
//! defaulted and set with methods; validated once, here.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use steadfast_core::{validate_topic_name, AckTimeout, BackoffConfig, ReceiptRule};
use steadfast_store::OutboxConfig;

use crate::error::ConfigError;
use crate::policy::Policy;
use crate::transport::{TlsConfig, Transport};

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.0.
    #[default]
    V5,
}

/// A broker address, parsed from `mqtt://host:port` (port 1883 by default).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TCP, TLS or WebSocket, from the scheme.
    pub transport: Transport,
}

impl BrokerUrl {
    /// `host:port` for connecting.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.transport.scheme(), self.authority(), self.transport.path().unwrap_or(""))
    }
}

impl FromStr for BrokerUrl {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = || s.to_owned();
        let (mut transport, rest) = match s.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (Transport::Tcp, rest),
            Some(("mqtts" | "ssl" | "tls", rest)) => (Transport::Tls, rest),
            Some(("ws", rest)) => (Transport::Ws { path: String::new() }, rest),
            Some(("wss", rest)) => (Transport::Wss { path: String::new() }, rest),
            Some((scheme, _)) => return Err(ConfigError::UrlScheme { url: url(), scheme: scheme.to_owned() }),
            None => (Transport::Tcp, s),
        };
        // Only WebSocket URLs have a path (default /mqtt).
        let (rest, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        match &mut transport {
            Transport::Ws { path: p } | Transport::Wss { path: p } => {
                *p = if path.is_empty() || path == "/" { "/mqtt".to_owned() } else { path.to_owned() };
            }
            _ if !path.is_empty() && path != "/" => {
                return Err(ConfigError::UrlPath { url: url() });
            }
            _ => {}
        }
        if rest.contains('@') {
            return Err(ConfigError::UrlCredentials { url: url() });
        }
        if rest.is_empty() {
            return Err(ConfigError::UrlHost { url: url() });
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| ConfigError::UrlBracket { url: url() })?;
            (h.to_owned(), after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (rest.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(ConfigError::UrlHost { url: url() });
        }
        let port = match port {
            None => transport.default_port(),
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(ConfigError::UrlPort { url: url(), port: p.to_owned() }),
            },
        };
        Ok(BrokerUrl { host, port, transport })
    }
}

/// How a broker set carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// To the first healthy broker in priority order; switch on failure, go
    /// back to a higher one once it stayed healthy for `failback_after`.
    #[default]
    Failover,
    /// To every broker; a message leaves the outbox when `ack` of them
    /// acknowledged it.
    Fanout,
    /// Each message to one healthy broker, spreading load; a topic stays on
    /// one broker while it is healthy, so its order is kept.
    Balance,
}

impl FromStr for Mode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "failover" => Ok(Mode::Failover),
            "fanout" => Ok(Mode::Fanout),
            "balance" => Ok(Mode::Balance),
            other => Err(ConfigError::UnknownMode(other.to_owned())),
        }
    }
}

/// How many brokers of a fanout set must acknowledge a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckQuorum {
    /// Every broker of the set (a broker that is down catches up later).
    #[default]
    All,
    /// Any one broker.
    Any,
    /// This many brokers.
    Count(u32),
}

impl FromStr for AckQuorum {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(AckQuorum::All),
            "any" => Ok(AckQuorum::Any),
            n => match n.parse::<u32>() {
                Ok(n) if n > 0 => Ok(AckQuorum::Count(n)),
                _ => Err(ConfigError::UnknownAckQuorum(n.to_owned())),
            },
        }
    }
}

/// Brokers used together, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSet {
    pub(crate) brokers: Vec<BrokerUrl>,
    pub(crate) mode: Mode,
    pub(crate) ack: AckQuorum,
    pub(crate) failback_after: Duration,
    pub(crate) catch_up_for: Option<Duration>,
    pub(crate) policy: Option<Policy>,
}

impl BrokerSet {
    /// These brokers, in priority order, in failover mode.
    pub fn new(brokers: impl IntoIterator<Item = BrokerUrl>) -> Self {
        Self {
            brokers: brokers.into_iter().collect(),
            mode: Mode::Failover,
            ack: AckQuorum::All,
            failback_after: Duration::from_secs(30),
            catch_up_for: None,
            policy: None,
        }
    }
    /// The default delivery policy of messages sent through this set
    /// (instead of the client's, [`ClientConfig::policy`]).
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = Some(p);
        self
    }
    /// The routing mode (default failover).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
    /// Fanout: acknowledgements needed before a message leaves (default all).
    pub fn ack(mut self, ack: AckQuorum) -> Self {
        self.ack = ack;
        self
    }
    /// Failover: how long a higher-priority broker must stay connected
    /// before traffic goes back to it (default 30 s).
    pub fn failback_after(mut self, d: Duration) -> Self {
        self.failback_after = d;
        self
    }
    /// Fanout: a message this old that at least one broker acknowledged
    /// leaves the outbox; the brokers still missing it are counted as having
    /// missed it (default: none, they catch up however long it takes).
    pub fn catch_up_for(mut self, d: Duration) -> Self {
        self.catch_up_for = Some(d);
        self
    }
    /// The brokers, in priority order.
    pub fn brokers(&self) -> &[BrokerUrl] {
        &self.brokers
    }
    /// The routing mode.
    pub fn routing(&self) -> Mode {
        self.mode
    }
    /// Acknowledgements a message needs before it leaves the outbox.
    pub fn needed_acks(&self) -> u32 {
        match (self.mode, self.ack) {
            (Mode::Fanout, AckQuorum::All) => self.brokers.len() as u32,
            (Mode::Fanout, AckQuorum::Count(n)) => n,
            _ => 1,
        }
    }

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let set = || name.to_owned();
        if self.brokers.is_empty() {
            return Err(ConfigError::NoBroker { set: set() });
        }
        for (i, b) in self.brokers.iter().enumerate() {
            if self.brokers[..i].contains(b) {
                return Err(ConfigError::DuplicateBroker { set: set(), broker: b.clone() });
            }
        }
        if let AckQuorum::Count(n) = self.ack {
            if n == 0 || n as usize > self.brokers.len() {
                return Err(ConfigError::AckQuorumOutOfRange { set: set(), ack: n, brokers: self.brokers.len() });
            }
        }
        if self.ack != AckQuorum::All && self.mode != Mode::Fanout {
            return Err(ConfigError::AckQuorumWithoutFanout { set: set() });
        }
        if self.catch_up_for.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroCatchUp { set: set() });
        }
        if let Some(p) = &self.policy {
            p.validate().map_err(|error| ConfigError::SetPolicy { set: set(), error })?;
        }
        Ok(())
    }
}

/// Messages in flight per broker unless configured otherwise.
pub const DEFAULT_MAX_INFLIGHT: u16 = 1024;

/// Everything a [`crate::Client`] needs.
#[derive(Clone)]
pub struct ClientConfig {
    pub(crate) client_id: String,
    pub(crate) set: BrokerSet,
    pub(crate) routes: Vec<(String, BrokerSet)>,
    pub(crate) ack_timeout: AckTimeout,
    pub(crate) envelope: bool,
    pub(crate) outbox_dir: PathBuf,
    pub(crate) version: ProtocolVersion,
    pub(crate) auto_version: bool,
    pub(crate) keep_alive: Duration,
    pub(crate) clean_start: bool,
    pub(crate) session_expiry: Duration,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Vec<u8>>,
    pub(crate) backoff: BackoffConfig,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_inflight: u16,
    pub(crate) poison_after: u32,
    /// `max_inflight` was configured (not the default).
    pub(crate) inflight_set: bool,
    pub(crate) join: bool,
    pub(crate) outbox: OutboxConfig,
    pub(crate) producer_id: Option<String>,
    pub(crate) seed: Option<u64>,
    pub(crate) policy: Policy,
    pub(crate) tls: TlsConfig,
    pub(crate) max_packet_size: Option<u32>,
    pub(crate) other_sets: OtherSets,
    /// The receipts every message asks for unless it says otherwise.
    pub(crate) receipts: Option<ReceiptRule>,
    /// Receipts topics are `PREFIX/PRODUCER_ID`.
    pub(crate) receipt_prefix: String,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials are never printed.
        f.debug_struct("ClientConfig")
            .field("client_id", &self.client_id)
            .field("brokers", &self.set)
            .field("routes", &self.routes)
            .field("outbox_dir", &self.outbox_dir)
            .field("version", &self.version)
            .field("keep_alive", &self.keep_alive)
            .field("clean_start", &self.clean_start)
            .field("username", &self.username.as_ref().map(|_| "<set>"))
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

/// What opening a client does with messages its outbox holds for another
/// default broker set than the one configured now (G9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtherSets {
    /// Refuse to open ([`ConfigError::HeldForOtherBrokers`]).
    #[default]
    Refuse,
    /// Open; they stay queued and are never sent to these brokers (a run
    /// with their own set sends them). [`crate::Client::held`] lists them.
    Keep,
    /// Send them to the brokers configured now.
    Retarget,
}

impl ClientConfig {
    /// The identity of the default broker set: its URLs, sorted, each once.
    pub(crate) fn default_set_key(&self) -> String {
        let mut urls: Vec<String> = self.set.brokers.iter().map(|u| u.to_string()).collect();
        urls.sort();
        urls.dedup();
        urls.join(" ")
    }

    /// A client `client_id` that talks to `broker` and keeps its outbox in
    /// `outbox_dir`. The client id is also the MQTT session: keep it stable.
    pub fn new(client_id: impl Into<String>, broker: BrokerUrl, outbox_dir: impl Into<PathBuf>) -> Self {
        Self {
            client_id: client_id.into(),
            set: BrokerSet::new([broker]),
            routes: Vec::new(),
            ack_timeout: AckTimeout::DEFAULT,
            envelope: false,
            outbox_dir: outbox_dir.into(),
            version: ProtocolVersion::V5,
            auto_version: false,
            keep_alive: Duration::from_secs(30),
            clean_start: false,
            session_expiry: Duration::from_secs(24 * 3600),
            username: None,
            password: None,
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(10),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            poison_after: 3,
            inflight_set: false,
            join: false,
            outbox: OutboxConfig::default(),
            producer_id: None,
            seed: None,
            other_sets: OtherSets::Refuse,
            receipts: None,
            receipt_prefix: steadfast_core::receipt::DEFAULT_RECEIPT_PREFIX.to_owned(),
            policy: Policy::default(),
            tls: TlsConfig::default(),
            max_packet_size: None,
        }
    }

    /// The largest packet this client takes from a broker, in bytes
    /// (default: no limit below MQTT's 256 MB). On MQTT 5 it is announced,
    /// so the broker skips bigger messages for this client; a bigger packet
    /// that arrives anyway ends the connection with an error.
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = Some(bytes);
        self
    }

    /// TLS settings for `mqtts://` and `wss://` brokers (default: verify
    /// against the platform's roots, no client certificate).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = tls;
        self
    }

    /// The default delivery policy of messages (default: persistent,
    /// priority 0, no budget); a route's own policy takes precedence.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    /// The default policy of messages of `route` (`None`: the default set).
    pub(crate) fn policy_for(&self, route: Option<&str>) -> Policy {
        let set = match route {
            None => &self.set,
            Some(r) => self.routes.iter().find(|(n, _)| n == r).map_or(&self.set, |(_, s)| s),
        };
        set.policy.unwrap_or(self.policy)
    }

    /// MQTT version (default 5.0).
    pub fn version(mut self, v: ProtocolVersion) -> Self {
        self.version = v;
        self
    }
    /// With MQTT 5: a broker that does not take version 5 (a refusal of
    /// the version, a close before CONNACK, or an MQTT 5 CONNECT left
    /// unanswered for the connect timeout) is spoken to in 3.1.1; a refusal
    /// is remembered per broker in the store, and after a close or a
    /// silence each new connection tries 5 first again. A producer whose
    /// messages ask for receipts without [`ClientConfig::envelope`] does
    /// not fall back (the receipts would never come). Default off: the
    /// version given is the one spoken. Identities travel on 3.1.1 only
    /// with [`ClientConfig::envelope`].
    pub fn auto_version(mut self, on: bool) -> Self {
        self.auto_version = on;
        self
    }
    /// Keep-alive interval (default 30 s). A link on which nothing arrives
    /// for this long is declared dead and reconnected.
    pub fn keep_alive(mut self, d: Duration) -> Self {
        self.keep_alive = d;
        self
    }
    /// Start a fresh session instead of resuming one (default false).
    pub fn clean_start(mut self, clean: bool) -> Self {
        self.clean_start = clean;
        self
    }
    /// MQTT 5 session expiry interval (default 1 day).
    pub fn session_expiry(mut self, d: Duration) -> Self {
        self.session_expiry = d;
        self
    }
    /// User name and password.
    pub fn credentials(mut self, username: impl Into<String>, password: Option<Vec<u8>>) -> Self {
        self.username = Some(username.into());
        self.password = password;
        self
    }
    /// Reconnect backoff bounds.
    pub fn backoff(mut self, b: BackoffConfig) -> Self {
        self.backoff = b;
        self
    }
    /// Time allowed for TCP connect plus CONNACK (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// When another process holds the outbox (a `pub` already running on
    /// it), open it beside that process instead of failing with
    /// `StoreError::Locked`: messages are accepted into it (on disk, as
    /// always) and that process sends them; this client connects to no
    /// broker and learns what becomes of them ([`crate::Client::is_joined`]).
    /// Its default broker set must be the holder's (G9); best-effort
    /// messages, which are never stored, are refused. Off by default.
    pub fn join_busy_outbox(mut self, yes: bool) -> Self {
        self.join = yes;
        self
    }

    /// Poison isolation: a message alone in flight each time a broker ends
    /// the link, this many times in a row, is moved aside (kept on disk,
    /// listed by `steadfast poison`) so that it no longer blocks the
    /// messages behind it (default 3; 0: never).
    pub fn poison_after(mut self, n: u32) -> Self {
        self.poison_after = n;
        self
    }

    /// Most QoS 1/2 messages in flight per broker (default 1024; towards an
    /// MQTT 3.1.1 broker, which cannot announce its limit, 20 unless set
    /// here); a broker's receive maximum lowers it, and a broker that ends
    /// links with many in flight makes it shrink (docs/interop.md, "Brokers
    /// with limits").
    pub fn max_inflight(mut self, n: u16) -> Self {
        self.max_inflight = n;
        self.inflight_set = true;
        self
    }
    /// Outbox bounds and overflow policy.
    pub fn outbox(mut self, o: OutboxConfig) -> Self {
        self.outbox = o;
        self
    }
    /// The producer id of message identities (default: the client id and a
    /// random suffix, chosen once and kept in the outbox).
    pub fn producer_id(mut self, p: impl Into<String>) -> Self {
        self.producer_id = Some(p.into());
        self
    }
    /// The default broker set, replacing the broker given to
    /// [`ClientConfig::new`]: several brokers in failover, fanout or
    /// balance mode.
    pub fn brokers(mut self, set: BrokerSet) -> Self {
        self.set = set;
        self
    }
    /// A named broker set that messages can choose with
    /// [`crate::Message::route`] (`home` vs `office`).
    pub fn route(mut self, name: impl Into<String>, set: BrokerSet) -> Self {
        let name = name.into();
        self.routes.retain(|(n, _)| *n != name);
        self.routes.push((name, set));
        self
    }
    /// With messages in flight, a link on which no acknowledgement arrives
    /// for this long is declared dead, reconnected, and (failover) its
    /// messages go to the next broker. Fixed: by default the ack timeout
    /// adapts to the round-trip time measured on each link (see
    /// [`ClientConfig::ack_timeout_adaptive`]).
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = AckTimeout::Fixed(d);
        self
    }
    /// The default ack timeout: per link, the smoothed round-trip time plus
    /// four times its mean deviation (as TCP's retransmission timeout),
    /// never under `floor` (default 750 ms) and never over `max` (default
    /// 60 s); each timeout in a row doubles the next until a message is
    /// acknowledged again. A black hole under load is found about `floor`
    /// after the last acknowledgement; a slow link raises its own timeout.
    pub fn ack_timeout_adaptive(mut self, floor: Duration, max: Duration) -> Self {
        self.ack_timeout = AckTimeout::Adaptive { floor, max };
        self
    }
    /// MQTT 3.1.1: carry each message's identity in a payload envelope
    /// (`steadfast_core::Identity::wrap`), for receivers that de-duplicate.
    /// Receivers must unwrap it. MQTT 5 carries it as a user property.
    pub fn envelope(mut self, on: bool) -> Self {
        self.envelope = on;
        self
    }
    /// End-to-end receipts (docs/guarantees.md, "Receipts"): every
    /// message (QoS 1 or 2) asks its consumers for a receipt by `rule`
    /// and stays in the outbox, *awaiting receipt*, after the broker's
    /// acknowledgement; without a receipt in time it is published again
    /// under the same identity. The client subscribes to its receipts
    /// topic on every broker with a second session (client id
    /// `CLIENT_ID-receipts`). A message may ask otherwise
    /// ([`crate::Message::receipts`], [`crate::Message::without_receipts`]).
    pub fn receipts(mut self, rule: ReceiptRule) -> Self {
        self.receipts = Some(rule);
        self
    }
    /// The prefix of receipts topics (default `steadfast/receipts`): a
    /// producer's receipts go to `PREFIX/PRODUCER_ID`. MQTT 3.1.1
    /// consumers derive the topic from it, so both sides must agree.
    pub fn receipt_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.receipt_prefix = prefix.into();
        self
    }
    /// What opening does with messages the outbox holds for another default
    /// broker set (an earlier run with other brokers): refuse to open
    /// (the default), keep them queued and unsent, or send them to this
    /// run's brokers (G9: never without the user's word).
    pub fn other_sets(mut self, o: OtherSets) -> Self {
        self.other_sets = o;
        self
    }
    /// Seeds the backoff jitter, for reproducible tests.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    /// The outbox directory.
    pub fn outbox_dir(&self) -> &std::path::Path {
        &self.outbox_dir
    }
    /// The default broker set.
    pub fn broker_set(&self) -> &BrokerSet {
        &self.set
    }
    /// Every broker set with its route name: the default set (`None`)
    /// first, then the named routes.
    pub fn sets(&self) -> impl Iterator<Item = (Option<&str>, &BrokerSet)> {
        std::iter::once((None, &self.set)).chain(self.routes.iter().map(|(n, s)| (Some(n.as_str()), s)))
    }
    /// Every broker the client talks to (the default set's first, then
    /// those only named routes use), each once: one connection each.
    pub fn all_brokers(&self) -> Vec<BrokerUrl> {
        let mut all: Vec<BrokerUrl> = Vec::new();
        for (_, set) in self.sets() {
            for b in &set.brokers {
                if !all.contains(b) {
                    all.push(b.clone());
                }
            }
        }
        all
    }
    /// The named routes.
    pub fn routes(&self) -> &[(String, BrokerSet)] {
        &self.routes
    }

    /// Checks the configuration as [`crate::Client::open`] would, without
    /// opening anything.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.validate()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.client_id.is_empty() || self.client_id.len() > 65535 {
            return Err(ConfigError::ClientId { len: self.client_id.len() });
        }
        if self.keep_alive < Duration::from_secs(1) || self.keep_alive.as_secs() > u16::MAX as u64 {
            return Err(ConfigError::KeepAlive(self.keep_alive));
        }
        self.policy.validate().map_err(ConfigError::Policy)?;
        self.set.validate("default")?;
        for (name, set) in &self.routes {
            if name.is_empty() {
                return Err(ConfigError::EmptyRouteName);
            }
            if name.starts_with('@') {
                return Err(ConfigError::ReservedRouteName(name.clone()));
            }
            set.validate(name)?;
        }
        let count = self.all_brokers().len();
        if count > steadfast_store::MAX_SLOTS {
            return Err(ConfigError::TooManyBrokers { count, max: steadfast_store::MAX_SLOTS });
        }
        if self.max_inflight == 0 {
            return Err(ConfigError::ZeroInflight);
        }
        match self.ack_timeout {
            AckTimeout::Fixed(d) | AckTimeout::Adaptive { floor: d, .. } if d < Duration::from_millis(100) => {
                return Err(ConfigError::AckTimeout(d));
            }
            AckTimeout::Adaptive { floor, max } if max < floor => {
                return Err(ConfigError::AckTimeoutBounds { floor, max });
            }
            _ => {}
        }
        if let Some(len) = self.producer_id.as_ref().map(String::len).filter(|len| self.envelope && *len > 255) {
            return Err(ConfigError::ProducerIdTooLong { len });
        }
        if let Some(rule) = &self.receipts {
            rule.validate().map_err(ConfigError::Receipts)?;
            if self.version == ProtocolVersion::V311 && !self.envelope {
                return Err(ConfigError::ReceiptsWithoutIdentity);
            }
        }
        // Consumers (over MQTT 3.1.1) and bridges use it too.
        validate_topic_name(&steadfast_core::receipt::receipt_topic(&self.receipt_prefix, "p"))
            .map_err(|error| ConfigError::ReceiptPrefix { prefix: self.receipt_prefix.clone(), error })?;
        if self.backoff.min.is_zero() || self.backoff.max < self.backoff.min {
            return Err(ConfigError::Backoff { min: self.backoff.min, max: self.backoff.max });
        }
        if let Some(max) = self.max_packet_size.filter(|m| *m < 128) {
            return Err(ConfigError::MaxPacketSize(max));
        }
        // Certificate files are read now so that a mistake shows at start.
        if self.all_brokers().iter().any(|b| b.transport.is_tls()) {
            self.tls.rustls()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_and_bad_ones_say_why() {
        let u: BrokerUrl = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1884));
        let u: BrokerUrl = "localhost".parse().unwrap();
        assert_eq!(u.port, 1883);
        let u: BrokerUrl = "mqtt://[::1]:1999".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.authority()), ("::1", 1999, "[::1]:1999".to_owned()));
        let u: BrokerUrl = "mqtts://broker.example".parse().unwrap();
        assert_eq!(
            (u.port, u.transport.clone(), u.to_string()),
            (8883, Transport::Tls, "mqtts://broker.example:8883".into())
        );
        let u: BrokerUrl = "ws://127.0.0.1:9001".parse().unwrap();
        assert_eq!((u.port, u.to_string()), (9001, "ws://127.0.0.1:9001/mqtt".into()));
        let u: BrokerUrl = "wss://h/ws".parse().unwrap();
        assert_eq!((u.port, u.transport), (443, Transport::Wss { path: "/ws".into() }));
        for bad in ["http://x:1", "mqtt://:1", "mqtt://h:0", "mqtt://h:99999", "mqtt://h:1/path", "mqtt://u:p@h:1"] {
            let e = bad.parse::<BrokerUrl>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
