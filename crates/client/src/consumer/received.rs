//! A delivery in the application's hands ([`Received`]) and the token that
//! routes its acknowledgement back to the broker it came from; dropped
//! unacknowledged, it goes back to the dispatcher for a retry.

use std::sync::Arc;
use std::time::Duration;

use steadfast_core::{Identity, Properties, Qos};
use tokio::sync::mpsc;

use super::group::GroupInbox;
use super::Cmd;
use crate::link::{InProps, Inbound};

/// A message handed to the application. Acknowledge it with
/// [`Received::ack`] once handled; dropping it unacknowledged (or
/// [`Received::retry`]) makes it come again.
#[derive(Debug)]
pub struct Received {
    topic: String,
    payload: Vec<u8>,
    qos: Qos,
    retain: bool,
    identity: Option<Identity>,
    /// The identity's user property value as the broker sent it (MQTT 5):
    /// a bridge moves it back into the properties instead of writing it
    /// again.
    identity_value: Option<String>,
    /// Its identity is recorded in the inbox once it is acknowledged.
    inbox: bool,
    /// Shared by every delivery from that broker.
    broker: Arc<str>,
    redelivered: bool,
    /// The broker's DUP flag: it sent this packet id before.
    broker_dup: bool,
    props: InProps,
    expiry_secs: Option<u32>,
    /// The receipts topic its producer asked a receipt at.
    receipt: Option<String>,
    token: Option<Token>,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// A group member's shared inbox.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    group: Option<Arc<GroupInbox>>,
}

/// Where a delivery's acknowledgement goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Token {
    pub(super) broker: usize,
    pub(super) epoch: u64,
    pub(super) pid: Option<u16>,
}

impl Received {
    /// Topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
    /// Payload (without the envelope, if it had one).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// QoS as delivered.
    pub fn qos(&self) -> Qos {
        self.qos
    }
    /// Retain flag.
    pub fn retain(&self) -> bool {
        self.retain
    }
    /// The producer's identity, when the message carries one.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }
    /// The identity's user property value as it came, taken (a relay
    /// forwarding the message moves it into the properties it sends).
    pub(crate) fn take_identity_value(&mut self) -> Option<String> {
        self.identity_value.take()
    }
    /// Where its producer asked for a receipt, if it asks for one. A
    /// consumer sends the receipt by itself once the message is recorded
    /// in its inbox; this is for a relay that passes the ask on.
    pub fn receipt_topic(&self) -> Option<&str> {
        self.receipt.as_deref()
    }
    /// Its identity goes to the inbox when it is acknowledged.
    pub(crate) fn inbox(&self) -> bool {
        self.inbox
    }
    /// The broker it came from.
    pub fn broker(&self) -> &str {
        &self.broker
    }
    /// The broker it came from, shared.
    pub(crate) fn broker_shared(&self) -> &Arc<str> {
        &self.broker
    }
    /// Handed over before (the application dropped or refused it, or the
    /// broker sent it again).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
    /// The broker sent it with DUP set: a resend of a packet id it had
    /// sent before without getting its acknowledgement (not set for a
    /// delivery the application gave back).
    pub fn broker_resent(&self) -> bool {
        self.broker_dup
    }
    /// Its MQTT 5 properties (content type, user properties...; the
    /// identity is [`Received::identity`]).
    pub fn properties(&self) -> &Properties {
        self.props.get()
    }
    /// MQTT 5: the message expiry interval it came with, in seconds (the
    /// time it had left when the broker sent it).
    pub fn expiry(&self) -> Option<Duration> {
        self.expiry_secs.map(|s| Duration::from_secs(u64::from(s)))
    }
    /// The packet id it came under (QoS 1 and 2), until it is acknowledged.
    pub fn packet_id(&self) -> Option<u16> {
        self.token.and_then(|t| t.pid)
    }

    /// Handled: the broker gets its PUBACK (QoS 1) or PUBREC (QoS 2) and
    /// the identity is recorded in the inbox (the ack waits for that record
    /// only beyond [`ConsumerConfig::acks_ahead_of_records`](super::ConsumerConfig::acks_ahead_of_records);
    /// a receipt always does). Returns at once; the records of many
    /// deliveries share one disk sync.
    pub fn ack(mut self) {
        if let Some(token) = self.token.take() {
            let identity = self.identity.take().filter(|_| self.inbox);
            let _ = self.cmds.send(Cmd::Ack { token, identity });
        }
    }

    /// A group member with a shared inbox: records these deliveries in the
    /// caller's own PostgreSQL transaction, so that the record and the
    /// caller's writes commit or roll back together (exactly-once
    /// effects). True for each that no member of the group recorded
    /// before: do its work in `tx`, commit, then [`Received::ack`] each
    /// (false: skip the work, ack it too: it is a copy). A delivery
    /// without an identity cannot be recognised and is always true. A
    /// copy another member records at the same moment waits for that
    /// transaction's end. Rolled back: [`Received::retry`] or drop them.
    #[cfg(feature = "postgres")]
    pub async fn record_all_in(
        tx: &tokio_postgres::Transaction<'_>,
        deliveries: &[&Received],
    ) -> Result<Vec<bool>, RecordInError> {
        let with_id: Vec<&Received> = deliveries.iter().copied().filter(|d| d.identity.is_some()).collect();
        let Some(first) = with_id.first() else { return Ok(vec![true; deliveries.len()]) };
        let group = first.group.as_ref().ok_or(RecordInError::NoSharedInbox)?;
        let ids: Vec<&Identity> = with_id.iter().filter_map(|d| d.identity.as_ref()).collect();
        group.ready().await.map_err(|e| RecordInError::SharedInbox(e.to_string()))?;
        let new = group
            .record_in(tx, &ids)
            .await
            .map_err(RecordInError::Postgres)?
            .map_err(|n| RecordInError::ClaimedElsewhere { n })?;
        let mut new = new.into_iter();
        Ok(deliveries.iter().map(|d| d.identity.is_none() || new.next().unwrap_or(true)).collect())
    }

    /// [`Received::record_all_in`] of this delivery alone.
    #[cfg(feature = "postgres")]
    pub async fn record_in(&self, tx: &tokio_postgres::Transaction<'_>) -> Result<bool, RecordInError> {
        Ok(Self::record_all_in(tx, &[self]).await?[0])
    }

    /// Not handled: it comes again after the configured pause.
    pub fn retry(self) {
        drop(self);
    }

    fn retry_copy(&mut self) -> Option<Pending> {
        let token = self.token.take()?;
        Some(Pending {
            token,
            msg: Inbound {
                topic: std::mem::take(&mut self.topic),
                payload: std::mem::take(&mut self.payload),
                qos: self.qos,
                pid: token.pid,
                retain: self.retain,
                // The wire's own flag: a retry here is not a resend there.
                dup: self.broker_dup,
                identity: self.identity_value.take(),
                receipt: self.receipt.take(),
                props: std::mem::take(&mut self.props),
                expiry_secs: self.expiry_secs,
            },
            identity: self.identity.take(),
            inbox: self.inbox,
        })
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if let Some(p) = self.retry_copy() {
            let _ = self.cmds.send(Cmd::Retry(Box::new(p)));
        }
    }
}

/// A delivery the dispatcher holds: where its acknowledgement goes, the
/// message, and the identity it carries (which the dispatcher and the
/// inbox look at only when the inbox is on; a bridge without an inbox
/// still keeps it upstream).
pub(super) struct Pending {
    pub(super) token: Token,
    pub(super) msg: Inbound,
    pub(super) identity: Option<Identity>,
    pub(super) inbox: bool,
}

impl Pending {
    pub(super) fn into_received(
        self,
        broker: Arc<str>,
        redelivered: bool,
        cmds: mpsc::UnboundedSender<Cmd>,
        group: Option<Arc<GroupInbox>>,
    ) -> Received {
        Received {
            topic: self.msg.topic,
            payload: self.msg.payload,
            qos: self.msg.qos,
            retain: self.msg.retain,
            // Only the value of the identity it is handed over with (none
            // when that came from an envelope, or was set aside).
            identity_value: self.msg.identity.filter(|_| self.identity.is_some()),
            identity: self.identity,
            inbox: self.inbox,
            broker,
            redelivered: redelivered || self.msg.dup,
            broker_dup: self.msg.dup,
            props: self.msg.props,
            expiry_secs: self.msg.expiry_secs,
            receipt: self.msg.receipt,
            token: Some(self.token),
            cmds,
            group,
        }
    }
}

/// Why [`Received::record_all_in`] failed.
#[cfg(feature = "postgres")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordInError {
    /// The consumer has no shared inbox ([`super::ConsumerConfig::shared_inbox`]).
    #[error("this consumer has no shared inbox: give it one (ConsumerConfig::shared_inbox, --inbox postgres://...)")]
    NoSharedInbox,
    /// PostgreSQL refused or failed the statement (the transaction is to
    /// be rolled back).
    #[error("recording in the shared inbox failed: {}", super::pg::describe(.0))]
    Postgres(tokio_postgres::Error),
    /// The shared inbox's tables could not be made ready (created or
    /// migrated) before the first record.
    #[error("{0}")]
    SharedInbox(String),
    /// Another member of the group holds a live claim on `n` of these
    /// (it hands them over outside a transaction of its own): roll back
    /// and let them come again ([`Received::retry`]); by then that member
    /// recorded them (false) or its claim expired (true).
    #[error("another member of the group is handling {n} of these deliveries now; roll back and try them again later")]
    ClaimedElsewhere {
        /// How many.
        n: usize,
    },
}
