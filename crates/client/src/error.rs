//! Errors, one enum per operation.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use steadfast_core::TopicError;
use steadfast_store::{AppendError, StoreError};

/// A configuration value is unusable. The words describe the problem and
/// name the setting in prose; a front end (the CLI) adds its own name for
/// the setting (a flag, a key) by matching the variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A broker URL with a scheme other than mqtt, mqtts, ws or wss.
    #[error("invalid broker URL `{url}`: unknown scheme `{scheme}`; use mqtt://, mqtts://, ws:// or wss:// followed by host:port")]
    UrlScheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// A path in a URL that is not a WebSocket one.
    #[error("invalid broker URL `{url}`: only ws:// and wss:// URLs have a path; use mqtt://host:port")]
    UrlPath {
        /// The URL as given.
        url: String,
    },
    /// User name or password in the URL.
    #[error("invalid broker URL `{url}`: credentials do not belong in the URL; give them as the client's user name and password")]
    UrlCredentials {
        /// The URL as given.
        url: String,
    },
    /// No host in the URL.
    #[error("invalid broker URL `{url}`: the host is empty")]
    UrlHost {
        /// The URL as given.
        url: String,
    },
    /// An IPv6 address without its closing bracket.
    #[error("invalid broker URL `{url}`: unclosed `[` in IPv6 address")]
    UrlBracket {
        /// The URL as given.
        url: String,
    },
    /// A port that is not 1 to 65535.
    #[error("invalid broker URL `{url}`: `{port}` is not a port number (1-65535)")]
    UrlPort {
        /// The URL as given.
        url: String,
        /// The port as given.
        port: String,
    },
    /// The client id is empty or longer than MQTT allows.
    #[error("invalid client id: it must be 1 to 65535 bytes long, not {len}")]
    ClientId {
        /// Its length in bytes.
        len: usize,
    },
    /// Keep-alive out of range.
    #[error("keep-alive {0:?} is out of range; use 1 s to 65535 s")]
    KeepAlive(Duration),
    /// A routing mode that does not exist.
    #[error("unknown mode `{0}`; use failover, fanout or balance")]
    UnknownMode(String),
    /// An ack quorum that does not parse.
    #[error("unknown ack quorum `{0}`; use all, any or a count such as 2")]
    UnknownAckQuorum(String),
    /// A broker set without a broker.
    #[error("broker set {set}: it has no broker; give at least one")]
    NoBroker {
        /// `default` or the route's name.
        set: String,
    },
    /// A broker listed twice in one set.
    #[error("broker set {set}: {broker} is listed twice")]
    DuplicateBroker {
        /// `default` or the route's name.
        set: String,
        /// The broker.
        broker: crate::BrokerUrl,
    },
    /// An ack quorum of 0, or of more brokers than the set has.
    #[error("broker set {set}: ack = {ack} but the set has {brokers} brokers; use 1 to {brokers}")]
    AckQuorumOutOfRange {
        /// `default` or the route's name.
        set: String,
        /// The quorum.
        ack: u32,
        /// The set's size.
        brokers: usize,
    },
    /// An ack quorum on a set that is not in fanout mode.
    #[error("broker set {set}: an ack quorum only applies to fanout; set the mode to fanout or drop the quorum")]
    AckQuorumWithoutFanout {
        /// `default` or the route's name.
        set: String,
    },
    /// A catch-up window of zero.
    #[error("broker set {set}: catch_up_for must be above zero")]
    ZeroCatchUp {
        /// `default` or the route's name.
        set: String,
    },
    /// A broker set's delivery policy is invalid.
    #[error("broker set {set}: its policy: {error}")]
    SetPolicy {
        /// `default` or the route's name.
        set: String,
        /// What is wrong with it.
        error: crate::PolicyError,
    },
    /// The client's default delivery policy is invalid.
    #[error("the default policy: {0}")]
    Policy(crate::PolicyError),
    /// A route with an empty name.
    #[error("a route name is empty; name it (e.g. `home`)")]
    EmptyRouteName,
    /// Route names starting with `@` are the outbox's own.
    #[error("the route name `{0}` starts with `@`, which is reserved; name it without (e.g. `home`)")]
    ReservedRouteName(String),
    /// The outbox holds messages accepted for other brokers (G9).
    #[error("the outbox holds {queued} message(s) accepted for other brokers ({brokers}); they are never sent elsewhere without your word: open it with those brokers to send them, or choose OtherSets::Keep (leave them queued) or OtherSets::Retarget (send them to the brokers configured now)")]
    HeldForOtherBrokers {
        /// How many.
        queued: u64,
        /// Their broker sets, `;`-separated.
        brokers: String,
    },
    /// The outbox is in use by a process that sends to other brokers: its
    /// messages would go there (G9).
    #[error("the outbox is in use by another process that sends to {theirs}, not to the brokers given here; wait for it to end, or use an outbox of your own (--outbox DIR, or another -i)")]
    JoinedOtherBrokers {
        /// The holder's default broker set.
        theirs: String,
    },
    /// More distinct brokers than one client can keep state for.
    #[error("{count} distinct brokers configured; one client talks to at most {max}")]
    TooManyBrokers {
        /// How many were configured.
        count: usize,
        /// The most there can be.
        max: usize,
    },
    /// An in-flight window of 0.
    #[error("max_inflight 0 would let nothing through; use 1 or more")]
    ZeroInflight,
    /// An ack timeout (or an adaptive one's floor) under 100 ms.
    #[error("ack timeout {0:?} is too short; use at least 100ms")]
    AckTimeout(Duration),
    /// An adaptive ack timeout whose ceiling is under its floor.
    #[error("adaptive ack timeout: the ceiling {max:?} is under the floor {floor:?}; give a ceiling at least as long")]
    AckTimeoutBounds {
        /// The floor.
        floor: Duration,
        /// The ceiling.
        max: Duration,
    },
    /// A receipt rule that cannot be used.
    #[error("receipts: {0}")]
    Receipts(steadfast_core::RuleError),
    /// MQTT 3.1.1 without the envelope carries no identity to receipt.
    #[error("receipts need each message's identity on the wire: over MQTT 3.1.1 turn the payload envelope on (--envelope), or use MQTT 5")]
    ReceiptsWithoutIdentity,
    /// A receipts topic prefix that makes no valid topic.
    #[error("receipt prefix `{prefix}` makes no valid topic: {error}; choose one without wildcards")]
    ReceiptPrefix {
        /// The prefix.
        prefix: String,
        /// Why.
        error: steadfast_core::TopicError,
    },
    /// A producer id whose receipts topic is not a valid topic.
    #[error("the receipts topic `{topic}` is not a valid topic: {error}; choose a producer id without `+`, `#` or NUL (--producer-id)")]
    ReceiptTopic {
        /// The topic.
        topic: String,
        /// Why.
        error: steadfast_core::TopicError,
    },
    /// A producer id the payload envelope cannot carry.
    #[error("the payload envelope carries producer ids up to 255 bytes, not {len}; choose a shorter producer id")]
    ProducerIdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A maximum packet size too small for any message.
    #[error("a maximum packet size of {0} bytes leaves no room for a message; use 128 or more")]
    MaxPacketSize(u32),
    /// The outbox holds messages for a route that is not configured.
    #[error("the outbox holds {queued} message(s) for the route `{route}`, which is not configured; configure it again (ClientConfig::route) so they can be sent")]
    UnconfiguredRoute {
        /// The route.
        route: String,
        /// Messages waiting for it.
        queued: u64,
    },
    /// A consumer with no topic filter.
    #[error("no topic to subscribe to; give at least one filter")]
    NoTopic,
    /// A consumer group name that cannot be part of `$share/NAME/FILTER`.
    #[error("consumer group name `{0}` is empty or contains `/`, `+` or `#`; choose a plain name such as line1")]
    GroupName(String),
    /// A shared inbox without a group: members share it, a lone consumer
    /// has its own.
    #[error("a shared inbox (postgres://...) belongs to a consumer group; add --group NAME (ConsumerConfig::group), or give a directory for a consumer of its own")]
    SharedInboxWithoutGroup,
    /// A shared inbox URL that is not a PostgreSQL one.
    #[error("shared inbox `{url}`: {reason}; use postgres://USER@HOST:PORT/DATABASE")]
    SharedInboxUrl {
        /// The URL (its password, if any, hidden).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A shared inbox on a consumer that de-duplicates nothing.
    #[error("a shared inbox de-duplicates across the group, and this consumer is told not to de-duplicate (inbox(false), --no-dedup): choose one")]
    SharedInboxWithoutDedup,
    /// Records in the application's transaction without a shared inbox
    /// to record in.
    #[error("records in the application's transaction (records_in_transaction) go to a group's shared inbox; add ConsumerConfig::shared_inbox (--inbox postgres://...)")]
    RecordsInTransactionWithoutSharedInbox,
    /// A claim that lasts no time.
    #[error("a group member's claim must last longer than 0 (--claim-for); it is how long a copy at another member waits, 60s by default")]
    ZeroClaim,
    /// A shared inbox asked of a library built without PostgreSQL.
    #[error(
        "this build of steadfast has no PostgreSQL support; build the steadfast crate with the `postgres` feature"
    )]
    NoPostgres,
    /// A topic filter MQTT does not allow.
    #[error("topic filter `{filter}`: {error}")]
    TopicFilter {
        /// The filter.
        filter: String,
        /// What is wrong with it.
        error: steadfast_core::FilterError,
    },
    /// An inbox bound of zero bytes or identities.
    #[error("an inbox bound of 0 {unit} de-duplicates nothing; give a larger bound")]
    ZeroInbox {
        /// "bytes" or "identities".
        unit: &'static str,
    },
    /// rustls offers no TLS protocol version.
    #[error("TLS: no TLS protocol version available: {0}")]
    TlsProtocols(String),
    /// The CA file cannot be read or holds no certificate.
    #[error("TLS: CA file {}: {problem}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A certificate in the CA file cannot be a trust anchor.
    #[error("TLS: CA file {}: not a usable CA certificate: {reason}", path.display())]
    CaCertificate {
        /// The file.
        path: PathBuf,
        /// rustls's words.
        reason: String,
    },
    /// The client certificate file cannot be read or holds no certificate.
    #[error("TLS: client certificate {}: {problem}", path.display())]
    ClientCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The client key file cannot be read or holds no private key.
    #[error("TLS: client key {}: {problem}; give the client certificate's private key as PEM", path.display())]
    ClientKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The client key does not belong to the client certificate.
    #[error("TLS: client certificate {} with its key: {reason}; the key must be the certificate's own", cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// rustls's words.
        reason: String,
    },
    /// No CA file given, and the system has no trusted roots.
    #[error("TLS: no trusted CA certificates found on this system{}; install the `ca-certificates` package or give the broker's CA certificate as the CA file", reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    NoTrustedRoots {
        /// Why loading them failed, if it said.
        reason: Option<String>,
    },
    /// Backoff bounds are inverted or zero.
    #[error("backoff bounds {min:?}..{max:?} are invalid; min must be above zero and not above max")]
    Backoff {
        /// Minimum.
        min: Duration,
        /// Maximum.
        max: Duration,
    },
}

/// Why [`crate::Client::open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The outbox cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a message was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic is invalid.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// A property cannot be carried by MQTT.
    #[error("invalid message property: {0}")]
    Properties(steadfast_core::PropertyError),
    /// The message's delivery policy is invalid (priority, budget, TTL).
    #[error("invalid delivery policy: {0}")]
    Policy(crate::PolicyError),
    /// The message names a route the client does not have.
    #[error("no route named `{0}`: configure it with ClientConfig::route")]
    UnknownRoute(String),
    /// The message is larger than the broker accepts.
    #[error("message to `{topic}` is {size} bytes on the wire, over the broker's maximum packet size of {max} bytes; send a smaller payload or raise the broker's max_packet_size")]
    TooLarge {
        /// Its topic.
        topic: String,
        /// Its encoded size.
        size: usize,
        /// The broker's limit.
        max: u32,
    },
    /// The message is retained, and a broker said it takes no retained
    /// message (MQTT 5's Retain Available = 0; it would end the link on it).
    #[error("message to `{topic}` is retained, and the broker takes no retained messages (its CONNACK says Retain Available = 0): publish it without the retain flag, or allow retain on the broker (Mosquitto: retain_available true)")]
    RetainUnavailable {
        /// Its topic.
        topic: String,
    },
    /// The message asks for receipts, but the client listens for none.
    #[error("the message asks for receipts, but this client was not configured for them: set ClientConfig::receipts (steadfast pub --receipts)")]
    ReceiptsOff,
    /// The message's receipt rule cannot be used.
    #[error("receipts: {0}")]
    Receipts(steadfast_core::RuleError),
    /// The outbox refused or failed.
    #[error(transparent)]
    Outbox(#[from] AppendError),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// This client joined an outbox another process holds, to add messages
    /// to it; a best-effort message is never stored.
    #[error("the outbox is in use by another process, which this one joined to add messages to it; best-effort messages are never stored: publish them in another class, or from an outbox of your own (--outbox DIR, or another -i)")]
    JoinedBestEffort,
}

impl PublishError {
    /// True when trying again later may succeed (outbox full, disk full).
    pub fn is_retryable(&self) -> bool {
        match self {
            PublishError::Outbox(AppendError::Full { .. }) => true,
            PublishError::Outbox(AppendError::Store(e)) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Why the broker refused a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// It does not speak this protocol version.
    ProtocolVersion,
    /// Bad user name or password.
    BadCredentials,
    /// This client may not connect.
    NotAuthorized,
    /// The client id was rejected.
    ClientId,
    /// The broker is unavailable or busy.
    Unavailable,
    /// Another MQTT 5 reason code.
    Other(u8),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ProtocolVersion => f.write_str("the broker does not accept this MQTT protocol version"),
            Refusal::BadCredentials => f.write_str("bad user name or password"),
            Refusal::NotAuthorized => f.write_str(
                "not authorised: the broker does not allow this client to connect; check its ACL and credentials",
            ),
            Refusal::ClientId => f.write_str("the client id was rejected"),
            Refusal::Unavailable => f.write_str("the broker says it is unavailable or busy"),
            Refusal::Other(code) => write!(f, "refused with reason code 0x{code:02x}"),
        }
    }
}

/// Why a connection to a broker failed or ended.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The connection (TCP, then TLS or WebSocket when used) could not be
    /// made: refused, unroutable, or not made within the connect timeout.
    #[error("cannot reach {broker}: {reason}")]
    Unreachable {
        /// The broker.
        broker: String,
        /// The OS error, or the timeout.
        reason: String,
    },
    /// What answered the CONNECT is not an MQTT broker (its first bytes
    /// are no CONNACK: an HTTP server, SSH, a mail server).
    #[error("{broker} is not an MQTT broker: it answered CONNECT with `{sent}`; check the host and port")]
    NotMqtt {
        /// The broker URL.
        broker: String,
        /// Its first bytes, escaped.
        sent: String,
    },
    /// The connection was made, but no answer to `packet` (CONNECT or
    /// SUBSCRIBE) came in time.
    #[error("{broker} did not answer {packet} within {timeout:?}")]
    Timeout {
        /// The broker.
        broker: String,
        /// What went unanswered.
        packet: &'static str,
        /// The limit.
        timeout: Duration,
        /// Whether it was sent in MQTT 5: a broker that speaks only 3.1.1
        /// can wait for ever on an MQTT 5 CONNECT (amqtt 0.12 does).
        mqtt5: bool,
    },
    /// The broker refused the session.
    #[error("{broker} refused the connection: {refusal}")]
    Refused {
        /// The broker.
        broker: String,
        /// Why.
        refusal: Refusal,
    },
    /// TLS: a certificate was refused, by us or by the broker.
    #[error("{broker}: {reason}")]
    Certificate {
        /// The broker.
        broker: String,
        /// What was wrong and how to fix it.
        reason: String,
        /// The problem, when the handshake named one.
        problem: Option<crate::transport::CertificateProblem>,
    },
    /// Messages were in flight and none was acknowledged for this long.
    #[error("no acknowledgement for {0:?} with messages in flight (ack timeout): considered dead")]
    AckTimeout(Duration),
    /// Nothing arrived for a whole keep-alive interval.
    #[error("the link went silent for {0:?} (keep-alive): considered dead")]
    DeadLink(Duration),
    /// The broker closed the connection.
    #[error("the broker closed the connection{0}")]
    Closed(CloseReason),
    /// A socket or TLS error.
    #[error("connection error: {0}")]
    Io(Arc<std::io::Error>),
    /// The task writing to the socket ended.
    #[error("connection error: the writer stopped")]
    WriterStopped,
    /// The outbox (or a consumer's inbox) failed under the link.
    #[error("connection error: {store}: {source}")]
    Store {
        /// `outbox` or `inbox`.
        store: &'static str,
        /// What it said.
        source: Arc<StoreError>,
    },
    /// The broker broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The broker refused a subscription (its SUBACK's code 0x80 or more):
    /// not authorised, or a filter it does not take.
    #[error("{broker} refused the subscription to `{filter}` (not authorised, or an invalid filter for this broker)")]
    SubscriptionRefused {
        /// The broker.
        broker: String,
        /// The filter as subscribed.
        filter: String,
    },
    /// The broker sent a packet over the maximum packet size we announced.
    #[error("the broker sent a packet over our maximum packet size of {max} bytes (ClientConfig::max_packet_size)")]
    IncomingTooLarge {
        /// Our maximum packet size.
        max: u32,
    },
}

/// How a broker ended a connection, as far as we can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The connection ended without a word.
    Eof,
    /// Before its CONNACK; `mqtt5`: we asked for MQTT 5, which a broker
    /// without it answers so.
    BeforeConnack {
        /// The CONNECT was MQTT 5.
        mqtt5: bool,
    },
    /// Before its SUBACK.
    BeforeSuback,
    /// With a DISCONNECT packet carrying this reason (MQTT 5).
    Disconnect(String),
    /// Closed this way while a QoS 2 message was in flight with no PUBREC
    /// yet: the broker may not support QoS 2.
    Qos2InFlight(Box<CloseReason>),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Eof => Ok(()),
            CloseReason::BeforeConnack { mqtt5: true } => {
                f.write_str(" before CONNACK (a broker without MQTT 5, such as RabbitMQ before 3.13, does that)")
            }
            CloseReason::BeforeConnack { mqtt5: false } => f.write_str(" before CONNACK"),
            CloseReason::BeforeSuback => f.write_str(" before SUBACK"),
            CloseReason::Disconnect(reason) => write!(f, " with DISCONNECT ({reason})"),
            CloseReason::Qos2InFlight(how) => write!(
                f,
                "{how} with a QoS 2 message in flight and no PUBREC yet; if this repeats, the broker does not support QoS 2 (NATS does not): publish at QoS 1"
            ),
        }
    }
}

impl From<std::io::Error> for ConnectError {
    fn from(e: std::io::Error) -> Self {
        ConnectError::Io(Arc::new(e))
    }
}

impl ConnectError {
    /// The outbox failed under a link.
    pub(crate) fn outbox(e: StoreError) -> Self {
        ConnectError::Store { store: "outbox", source: Arc::new(e) }
    }

    /// A consumer's inbox failed under a link.
    pub(crate) fn inbox(e: StoreError) -> Self {
        ConnectError::Store { store: "inbox", source: Arc::new(e) }
    }

    /// False when retrying cannot help without a change of configuration
    /// (credentials, authorisation, protocol version, client id,
    /// certificates, a subscription the broker refuses).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ConnectError::Certificate { .. }
                | ConnectError::NotMqtt { .. }
                | ConnectError::SubscriptionRefused { .. }
                | ConnectError::Refused {
                    refusal: Refusal::ProtocolVersion
                        | Refusal::BadCredentials
                        | Refusal::NotAuthorized
                        | Refusal::ClientId,
                    ..
                }
        )
    }
}
