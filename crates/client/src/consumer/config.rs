//! A consumer's configuration: the connection settings, the subscriptions,
//! the inbox's bounds and the timers of gap detection and redelivery.

use std::time::Duration;

use steadfast_core::Qos;

use crate::config::ClientConfig;
use crate::error::ConfigError;

/// Everything a [`Consumer`](super::Consumer) needs: the connection
/// settings of a [`ClientConfig`] (its brokers, client id, session, and its
/// directory, which holds the inbox) and the subscriptions.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub(super) client: ClientConfig,
    pub(super) topics: Vec<(String, Qos)>,
    pub(super) inbox: bool,
    pub(super) inbox_max_age: Duration,
    pub(super) inbox_max_count: u64,
    pub(super) inbox_max_bytes: Option<u64>,
    pub(super) gap_timeout: Duration,
    pub(super) retry_after: Duration,
    pub(super) receipt_name: String,
    pub(super) send_receipts: bool,
    /// A bridge's source: asks for receipts are passed on, not answered
    /// (docs/design.md, "Receipts through a bridge").
    pub(super) relay: bool,
    /// The consumer group: subscriptions are `$share/GROUP/FILTER`.
    pub(super) group: Option<String>,
    /// The group's shared inbox (a PostgreSQL URL) instead of the
    /// directory's.
    pub(super) shared_inbox: Option<String>,
    /// `receipt_as` was given (a group otherwise names receipts after
    /// itself).
    receipt_named: bool,
    /// How long a group member's claim on a message lasts.
    pub(super) claim_for: Duration,
    /// Every delivery is recorded in the application's transaction
    /// (`record_in`): no claims, no record of the member's own.
    pub(super) records_in_transaction: bool,
    /// Acknowledgements that may leave before their inbox record is on
    /// disk; `None`: four windows (`4 × max_inflight`).
    pub(super) acks_ahead: Option<usize>,
    /// MQTT 5 subscriptions ask for Retain As Published.
    pub(super) retain_as_published: bool,
}

impl ConsumerConfig {
    /// A consumer with `client`'s brokers, session and directory.
    pub fn new(client: ClientConfig) -> Self {
        // A name carries no space, comma or line break.
        let receipt_name = client.client_id.replace([' ', ',', '\n', '\r', '\0'], "_");
        Self {
            receipt_name,
            send_receipts: true,
            relay: false,
            group: None,
            shared_inbox: None,
            receipt_named: false,
            claim_for: Duration::from_secs(60),
            records_in_transaction: false,
            acks_ahead: None,
            retain_as_published: false,
            client,
            topics: Vec::new(),
            inbox: true,
            inbox_max_age: Duration::from_secs(7 * 24 * 3600),
            inbox_max_count: 1_000_000,
            inbox_max_bytes: None,
            gap_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
        }
    }
    /// Subscribes to `filter` with at most `qos` (repeatable).
    pub fn topic(mut self, filter: impl Into<String>, qos: Qos) -> Self {
        self.topics.push((filter.into(), qos));
        self
    }
    /// De-duplicate by identity through the durable inbox (default on).
    pub fn inbox(mut self, on: bool) -> Self {
        self.inbox = on;
        self
    }
    /// How long and how many handled identities the inbox remembers
    /// (default 7 days, 1,000,000). A copy arriving later than that is
    /// handed over again.
    pub fn inbox_window(mut self, max_age: Duration, max_count: u64) -> Self {
        self.inbox_max_age = max_age;
        self.inbox_max_count = max_count;
        self
    }
    /// At most this many bytes of identities in the inbox (each counts its
    /// producer id plus 24 bytes); default: no byte bound.
    pub fn inbox_max_bytes(mut self, max: u64) -> Self {
        self.inbox_max_bytes = Some(max);
        self
    }
    /// A gap in a producer's sequence not filled within this long is
    /// reported as a suspected loss (default 30 s).
    pub fn gap_timeout(mut self, d: Duration) -> Self {
        self.gap_timeout = d;
        self
    }
    /// A delivery the application dropped or refused comes again after
    /// this long (default 1 s).
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = d;
        self
    }
    /// The name this consumer gives in the receipts it sends (default:
    /// its client id). A producer that asks for receipts from named
    /// consumers counts only those names.
    pub fn receipt_as(mut self, name: impl Into<String>) -> Self {
        self.receipt_name = name.into();
        self.receipt_named = true;
        self
    }
    /// A member of the consumer group `name`: every filter is subscribed
    /// as `$share/NAME/FILTER`, so each broker gives each message to one
    /// member of the group (MQTT 5 shared subscriptions; Mosquitto also
    /// on 3.1.1). Each member keeps its own persistent session (its own
    /// client id). Receipts are sent in the group's name unless
    /// [`ConsumerConfig::receipt_as`] says otherwise. Without a shared
    /// inbox ([`ConsumerConfig::shared_inbox`]) each member de-duplicates
    /// only what reaches it.
    pub fn group(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.receipt_named {
            self.receipt_name = name.replace([' ', ',', '\n', '\r', '\0'], "_");
        }
        self.group = Some(name);
        self
    }
    /// The group's shared inbox on PostgreSQL (`postgres://USER@HOST:PORT/DB`,
    /// libpq's URL and key=value forms): every member records what it
    /// handled there, and a copy any member handled is not handed over
    /// again (docs/guarantees.md, "Consumer groups"). The consumer's
    /// directory still holds its counters. Needs the `postgres` feature.
    pub fn shared_inbox(mut self, url: impl Into<String>) -> Self {
        self.shared_inbox = Some(url.into());
        self
    }
    /// A group member with a shared inbox: how long its claim on a message
    /// it handed over lasts (default 60 s). A copy of that message at
    /// another member waits meanwhile; a member that crashed holding
    /// claims delays those copies this long. Longer than the slowest
    /// handling: a claim that expires while its member still handles the
    /// message lets another member handle it too.
    pub fn claim_for(mut self, d: Duration) -> Self {
        self.claim_for = d;
        self
    }
    /// A group member with a shared inbox whose application records
    /// every delivery with [`super::Received::record_in`] (or
    /// `record_all_in`) in its own transaction before it acks it, as
    /// `steadfast sub --sql` does. The member then claims nothing and
    /// writes no record of its own: the shared inbox's key decides
    /// between two copies (the second transaction waits for the first,
    /// then finds it recorded), which saves two statements per batch. A
    /// delivery acked without `record_in` is then not recorded in the
    /// group (at least once for it).
    pub fn records_in_transaction(mut self, on: bool) -> Self {
        self.records_in_transaction = on;
        self
    }
    /// How many handled messages may have their broker's acknowledgement
    /// sent before their identity is recorded in the inbox (default: four
    /// windows, 4 × [`ClientConfig::max_inflight`]; a relay, a bridge's
    /// source, never acknowledges ahead). The inbox's commit is then
    /// off the broker's round trip: the broker sends the next message
    /// while the record is being written, many records share a commit,
    /// and the consumer drains nearly as fast as without an inbox. Beyond
    /// this many (the disk slow or failing), acknowledgements wait for
    /// the record. `0`: every acknowledgement waits for its record.
    ///
    /// Either way nothing is lost (a message is acknowledged only once
    /// handled) and a crash can cost the same: what was handled and not
    /// yet recorded is handed over again if a copy comes (docs/guarantees.md,
    /// "Consumers"). Receipts always wait for the record.
    ///
    /// The records of such messages go without a sync of their own: a
    /// synced record follows once four times this many went unsynced, so a
    /// power cut can take back the records of up to five times this many
    /// (a crash, this many). `0` also syncs every record.
    pub fn acks_ahead_of_records(mut self, n: usize) -> Self {
        self.acks_ahead = Some(n);
        self
    }
    /// The acknowledgements that may leave ahead of their record.
    pub(super) fn acks_ahead(&self) -> usize {
        self.acks_ahead.unwrap_or(4 * usize::from(self.client.max_inflight))
    }
    /// The group, if a member of one.
    pub fn group_name(&self) -> Option<&str> {
        self.group.as_deref()
    }
    /// The filters as subscribed: `$share/GROUP/FILTER` in a group.
    pub(super) fn filters(&self) -> Vec<(String, Qos)> {
        match &self.group {
            None => self.topics.clone(),
            Some(g) => self.topics.iter().map(|(f, q)| (format!("$share/{g}/{f}"), *q)).collect(),
        }
    }
    /// Send receipts to producers that ask for them (default on; a
    /// bridge turns it off: its outbox is not the end of a message's way).
    pub fn send_receipts(mut self, on: bool) -> Self {
        self.send_receipts = on;
        self
    }
    /// Ask MQTT 5 brokers to keep the retain flag of what they forward as
    /// its publisher set it (Retain As Published), instead of clearing it
    /// on every message but those sent at a subscription's start. What a
    /// bridge does, so that the far broker retains what the near one does
    /// (a bridge's source always asks for it). Default off, as MQTT's.
    /// MQTT 3.1.1 has no such option: a broker clears it.
    pub fn retain_as_published(mut self, on: bool) -> Self {
        self.retain_as_published = on;
        self
    }
    /// A bridge's source: it answers no ask for a receipt but keeps it on
    /// the delivery ([`Received::receipt_topic`](super::Received::receipt_topic)),
    /// and hands over again a copy of something it handled when the copy
    /// asks for a receipt (the producer got none, so what was passed on
    /// may have been lost further on).
    pub(crate) fn relay(mut self) -> Self {
        self.send_receipts = false;
        self.relay = true;
        self.retain_as_published = true;
        self
    }
    /// How each filter is subscribed, as the consumer records what a
    /// broker granted (a change makes it subscribe again): the QoS, `r`
    /// for Retain As Published, the filter.
    pub(super) fn subscription_record(&self) -> String {
        let rap = if self.retain_as_published { "r" } else { "" };
        self.filters().iter().map(|(f, q)| format!("{}{rap} {f}\n", *q as u8)).collect()
    }
    /// The name in this consumer's receipts.
    pub fn receipt_name(&self) -> &str {
        &self.receipt_name
    }
    /// The connection settings.
    pub fn client(&self) -> &ClientConfig {
        &self.client
    }

    /// Checks the configuration as
    /// [`Consumer::open`](super::Consumer::open) would, without opening
    /// anything.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.validate()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.client.validate()?;
        if self.topics.is_empty() {
            return Err(ConfigError::NoTopic);
        }
        for (f, _) in &self.topics {
            steadfast_core::topic::validate_topic_filter(f)
                .map_err(|error| ConfigError::TopicFilter { filter: f.clone(), error })?;
        }
        if let Some(g) = &self.group {
            if g.is_empty() || g.contains(['/', '+', '#']) {
                return Err(ConfigError::GroupName(g.clone()));
            }
        }
        if let Some(url) = &self.shared_inbox {
            if self.group.is_none() {
                return Err(ConfigError::SharedInboxWithoutGroup);
            }
            super::group::check_url(url)?;
            if self.claim_for.is_zero() {
                return Err(ConfigError::ZeroClaim);
            }
            if !self.inbox {
                return Err(ConfigError::SharedInboxWithoutDedup);
            }
        } else if self.records_in_transaction {
            return Err(ConfigError::RecordsInTransactionWithoutSharedInbox);
        }
        if self.inbox_max_bytes == Some(0) {
            return Err(ConfigError::ZeroInbox { unit: "bytes" });
        }
        if self.inbox_max_count == 0 {
            return Err(ConfigError::ZeroInbox { unit: "identities" });
        }
        if !steadfast_core::ReceiptRule::valid_name(&self.receipt_name) {
            let name = self.receipt_name.clone();
            return Err(ConfigError::Receipts(steadfast_core::RuleError::Name(name)));
        }
        Ok(())
    }
}
