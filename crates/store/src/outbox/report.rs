//! What the outbox reports: everything `steadfast status` shows
//! ([`Report`]), the cheap part that metrics read every second
//! ([`Glance`]), and how far behind each broker is ([`BrokerLag`]).

use steadfast_core::DropReason;

use crate::{BrokerMeta, BrokerRecord, Store, StoreError, Totals};

/// How far behind one broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLag {
    /// The broker URL.
    pub url: String,
    /// Queued messages it has not acknowledged.
    pub lag: u64,
    /// Messages it missed: its catch-up window passed first (persistent).
    pub missed: u64,
}

/// The cheap part of a report: what metrics read every second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glance {
    /// Drop counters by reason.
    pub drops: Vec<(DropReason, u64)>,
    /// Creation time of the oldest queued message (ms since the epoch).
    pub oldest_created_ms: Option<u64>,
    /// Messages delivered and awaiting receipts.
    pub awaiting: crate::Awaiting,
}

/// Everything `steadfast status` shows about an outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Count and bytes queued.
    pub totals: Totals,
    /// Creation time of the oldest queued message (ms since the epoch).
    pub oldest_created_ms: Option<u64>,
    /// Messages delivered and awaiting receipts (counted in `totals`).
    pub awaiting: crate::Awaiting,
    /// Drop counters by reason, since the outbox was created.
    pub drops: Vec<(DropReason, u64)>,
    /// Broker states recorded by the owner.
    pub brokers: Vec<BrokerRecord>,
    /// Per broker that ever had a slot: lag and missed messages.
    pub lag: Vec<BrokerLag>,
    /// Queued messages per route (`None`: the default broker set).
    pub routes: Vec<(Option<String>, u64)>,
    /// Named counters (consumer: handled, duplicates, gaps...).
    pub counters: Vec<(String, u64)>,
    /// Identities the inbox remembers.
    pub inbox: u64,
    /// The producer id of this outbox's messages (`None` for an inbox).
    pub producer: Option<String>,
    /// The sequence number of the newest message ever accepted.
    pub last_id: u64,
    /// Messages moved aside as poison, oldest first.
    pub poisoned: Vec<crate::Poisoned>,
    /// Per broker, the in-flight window learned from it (it ended links
    /// with many messages in flight).
    pub windows: Vec<(String, u16)>,
    /// Per broker (MQTT 3.1.1), the message size from which messages are
    /// moved aside at once: it closed the link on a message that large.
    pub poison_sizes: Vec<(String, u64)>,
    /// Per broker, its link's ack timeout and round-trip estimate as last
    /// recorded.
    pub ack_timeouts: Vec<(String, crate::AckTiming)>,
    /// The brokers of the last run's configuration (`None`: not recorded,
    /// an outbox of an earlier release or an inbox).
    pub configured: Option<Vec<String>>,
}

impl Report {
    /// Reads a report straight from a store.
    pub fn read(store: &mut dyn Store) -> Result<Report, StoreError> {
        Ok(Report {
            totals: store.totals()?,
            oldest_created_ms: store.oldest_created_ms()?,
            awaiting: store.awaiting()?,
            drops: store.drops()?,
            brokers: store.brokers()?,
            lag: {
                let missed = store.missed()?;
                let mut lag = Vec::new();
                for (url, slot) in store.slots()? {
                    let m = missed.iter().find(|(u, _)| *u == url).map_or(0, |(_, n)| *n);
                    lag.push(BrokerLag { lag: store.lag(slot)?, missed: m, url });
                }
                lag
            },
            routes: store.routes()?,
            counters: store.counters()?,
            inbox: store.inbox_len()?,
            producer: store.meta("producer")?,
            last_id: store.last_id()?,
            poisoned: store.poisoned()?,
            poison_sizes: per_broker(store, BrokerMeta::PoisonSize)?
                .into_iter()
                .filter(|&(_, size)| size >= crate::SMALLEST_SIZE_LIMIT)
                .collect(),
            configured: store
                .meta("brokers")?
                .map(|v| v.split(' ').filter(|u| !u.is_empty()).map(str::to_owned).collect()),
            windows: per_broker(store, BrokerMeta::Window)?,
            ack_timeouts: per_broker(store, BrokerMeta::AckTimeout)?,
        })
    }
}

/// A number kept per broker under `what`'s metadata key, for each broker
/// that has one.
fn per_broker<T: std::str::FromStr>(store: &mut dyn Store, what: BrokerMeta) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    for (url, _) in store.slots()? {
        if let Some(n) = store.meta(&what.key(&url))?.and_then(|v| v.parse().ok()) {
            out.push((url, n));
        }
    }
    Ok(out)
}
