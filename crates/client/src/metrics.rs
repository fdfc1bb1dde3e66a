//! Metrics through the `metrics` facade (README, "Metrics"). Counters of
//! events are recorded where they happen; states (queue depth, drops that
//! survive restarts, broker links) are set from the outbox and the drivers
//! by [`crate::Client::export_metrics`], which the client runs every second
//! and an exporter may run before each scrape. Without a recorder installed
//! every call is a no-op.

use metrics::{counter, gauge};
use steadfast_core::DropReason;

use crate::{BrokerStatus, LinkState};

/// What one export sets.
pub(crate) struct Snapshot<'a> {
    pub queued: u64,
    pub bytes: u64,
    pub oldest_age_secs: f64,
    pub drops: &'a [(DropReason, u64)],
    pub brokers: &'a [BrokerStatus],
    pub awaiting: u64,
    pub oldest_wait_secs: f64,
}

pub(crate) fn export(s: &Snapshot<'_>) {
    gauge!("steadfast_queue_depth").set(s.queued as f64);
    gauge!("steadfast_queue_bytes").set(s.bytes as f64);
    gauge!("steadfast_oldest_message_age_seconds").set(s.oldest_age_secs);
    gauge!("steadfast_awaiting_receipt").set(s.awaiting as f64);
    gauge!("steadfast_oldest_receipt_wait_seconds").set(s.oldest_wait_secs);
    for (reason, n) in s.drops {
        counter!("steadfast_dropped_total", "reason" => reason.as_str()).absolute(*n);
    }
    for b in s.brokers {
        let url = b.url.clone();
        gauge!("steadfast_broker_connected", "broker" => url.clone()).set(f64::from(b.state == LinkState::Connected));
        gauge!("steadfast_broker_active", "broker" => url.clone()).set(f64::from(b.active));
        gauge!("steadfast_broker_inflight", "broker" => url.clone()).set(b.inflight as f64);
        gauge!("steadfast_broker_ack_timeout_seconds", "broker" => url.clone()).set(b.ack_timeout.as_secs_f64());
        if let Some((rt, _)) = b.round_trip {
            gauge!("steadfast_broker_round_trip_seconds", "broker" => url.clone()).set(rt.as_secs_f64());
        }
        counter!("steadfast_broker_acked_total", "broker" => url.clone()).absolute(b.acked);
        counter!("steadfast_broker_connects_total", "broker" => url).absolute(b.connects);
    }
}

/// Consumer figures (persistent counters of its inbox).
pub(crate) fn export_consumer(s: &crate::ConsumerStats) {
    counter!("steadfast_consumer_handled_total").absolute(s.handled);
    counter!("steadfast_duplicates_removed_total").absolute(s.duplicates);
    counter!("steadfast_gaps_suspected_total").absolute(s.gaps_suspected);
    counter!("steadfast_out_of_order_total").absolute(s.out_of_order);
    gauge!("steadfast_inbox_identities").set(s.inbox as f64);
}
