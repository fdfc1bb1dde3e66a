//! Errors, one enum per operation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use steadfast_core::TopicError;
use steadfast_store::{AppendError, StoreError};

/// A configuration value is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A broker URL does not parse.
    #[error("invalid broker URL `{url}`: {why}")]
    BrokerUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The client id is unusable.
    #[error("invalid client id: {0}")]
    ClientId(String),
    /// Keep-alive out of range.
    #[error("keep-alive {0:?} is out of range; use 1 s to 65535 s")]
    KeepAlive(Duration),
    /// A broker set is unusable.
    #[error("broker set {set}: {why}")]
    Brokers {
        /// `default` or the route's name.
        set: String,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// TLS settings are unusable (a file missing, no certificate in it).
    #[error("TLS: {0}")]
    Tls(String),
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
    #[error("no route named `{0}`: configure it with ClientConfig::route (CLI: a [routes.NAME] table in --config)")]
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
    /// The outbox refused or failed.
    #[error(transparent)]
    Outbox(#[from] AppendError),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
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
            Refusal::ProtocolVersion => {
                f.write_str("the broker does not accept this MQTT protocol version; try -V 311 or -V 5")
            }
            Refusal::BadCredentials => f.write_str("bad user name or password; check -u and -P"),
            Refusal::NotAuthorized => f.write_str(
                "not authorised: the broker does not allow this client to connect; check its ACL and credentials",
            ),
            Refusal::ClientId => f.write_str("the client id was rejected; choose another with -i"),
            Refusal::Unavailable => f.write_str("the broker says it is unavailable or busy"),
            Refusal::Other(code) => write!(f, "refused with reason code 0x{code:02x}"),
        }
    }
}

/// Why a connection to a broker failed or ended.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("cannot reach {broker}: {reason}")]
    Unreachable {
        /// The broker.
        broker: String,
        /// The OS error.
        reason: String,
    },
    /// No CONNACK in time.
    #[error("{broker} did not answer CONNECT within {timeout:?}")]
    Timeout {
        /// The broker.
        broker: String,
        /// The limit.
        timeout: Duration,
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
            CloseReason::BeforeConnack { mqtt5: true } => f.write_str(
                " before CONNACK (a broker without MQTT 5, such as RabbitMQ before 3.13, does that: try -V 311)",
            ),
            CloseReason::BeforeConnack { mqtt5: false } => f.write_str(" before CONNACK"),
            CloseReason::BeforeSuback => f.write_str(" before SUBACK"),
            CloseReason::Disconnect(reason) => write!(f, " with DISCONNECT ({reason})"),
            CloseReason::Qos2InFlight(how) => write!(
                f,
                "{how} with a QoS 2 message in flight and no PUBREC yet; if this repeats, the broker does not support QoS 2 (NATS does not): publish with -q 1"
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
    /// certificates).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ConnectError::Certificate { .. }
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
