//! steadfast: reliable MQTT delivery.
//!
//! A [`Client`] publishes through a durable outbox: [`Client::publish`]
//! returns once the message is synced to disk (*accepted*, G1), and the
//! message stays there until the broker acknowledged it (*delivered*, G2),
//! across reconnects, broker restarts that lose the session, and restarts of
//! this process. See `docs/guarantees.md` for what each fault does.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use steadfast::{BrokerUrl, Client, ClientConfig, Message};
//! let cfg = ClientConfig::new("gateway-7", "mqtt://127.0.0.1:1883".parse::<BrokerUrl>()?, "/var/lib/gw7/outbox");
//! let (client, _report) = Client::open(cfg).await?;
//! let receipt = client.publish(Message::new("sensors/t", b"21.5".to_vec())).await?; // on disk now
//! receipt.delivered().await?; // acknowledged by the broker
//! client.close().await;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod bridge;
mod client;
mod clock;
mod config;
mod consumer;
mod decode;
pub mod doctor;
mod driver;
mod error;
mod frame;
mod link;
mod metrics;
mod policy;
#[doc(hidden)]
pub mod readme;
mod reconnect;
mod router;
mod transport;

pub use client::{BrokerStatus, Client, Event, LinkState, Message, QueuedMessage, Receipt, ReceiptStatus, Status};
pub use config::{AckQuorum, BrokerSet, BrokerUrl, ClientConfig, Mode, OtherSets, ProtocolVersion};
#[cfg(feature = "postgres")]
pub use consumer::{connect_postgres, group_status, GroupStatus, GroupStatusError, MemberStatus, RecordInError};
pub use consumer::{
    Consumer, ConsumerConfig, ConsumerMetrics, ConsumerStats, GroupInbox, Received, SharedInboxStats, StatementStats,
};
pub use error::{CloseReason, ConfigError, ConnectError, OpenError, PublishError, Refusal};
pub use policy::{Class, Policy, PolicyError};
/// MQTT 5 reason codes of PUBACK and PUBREC: which refuse a message, which
/// for good, and their names.
pub use steadfast_core::reason;
pub use steadfast_core::{
    AckTimeout, BackoffConfig, DropReason, Identity, Need, Properties, PropertyError, Qos, ReceiptRule, RuleError,
};
pub use steadfast_store::{
    AppendError, Delivery, Handling, OpenReport, OutboxConfig, Overflow, PoisonCause, Poisoned, StoreError,
};
/// The PostgreSQL client a consumer group's shared inbox uses, for
/// [`Received::record_in`] in the application's own transaction.
#[cfg(feature = "postgres")]
pub use tokio_postgres;
pub use transport::{CertificateProblem, TlsConfig, Transport};
