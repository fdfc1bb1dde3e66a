//! Receipts through a bridge (docs/design.md, "Receipts through a
//! bridge"). A route is a relay: a message whose producer asks for a
//! receipt goes upstream asking for one at the route's receipts topic of
//! that producer (the destination's receipt prefix), and the receipts that
//! come back there are published, as they are, at the topic the producer
//! asked at on the source brokers. The route's own outbox is not the end
//! of the way: it never answers an ask, and it passes a copy on again when
//! the producer publishes it again for lack of a receipt.
//!
//! Only receipts of producers whose asks the route passed on go back, and
//! a route hands back no receipt it handed back before (each adds a line
//! `via ROUTE_ID`): two routes in opposite directions would otherwise hand
//! each other's receipts round for ever. Those producers and their topics
//! are kept in the destination outbox's metadata, so receipts that arrive
//! after a restart still find their way. A receipt the route hands back
//! that its own source subscription matches is not forwarded as a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use steadfast_core::receipt::{receipt_topic, ConsumerReceipt, RECEIPT_PROPERTY};
use steadfast_core::Identity;
use tokio::sync::watch;

use crate::consumer::Relayer;
use crate::{Client, ClientConfig, Message};

/// Where the producers a route relayed for are kept (metadata of the
/// destination outbox): a line `PRODUCER<TAB>TOPIC` each.
const ASKED_KEY: &str = "relay.asked";

/// Receipt counters of a route (in its destination outbox).
pub const RELAYED_ASKS: &str = "receipts.relayed";
/// See [`RELAYED_ASKS`]: receipts handed back to the source brokers.
pub const RETURNED: &str = "receipts.returned";

/// A route's relay of asks and receipts.
pub(super) struct Relay {
    /// The destination client's receipt prefix: asks go upstream at
    /// `PREFIX/PRODUCER`.
    prefix: String,
    /// Per producer: the topic it asked at on the source brokers.
    asked: Arc<Mutex<HashMap<String, String>>>,
    /// Where producers at the source listen (MQTT 3.1.1 asks).
    source_prefix: String,
    destination: ClientConfig,
    relayer: Relayer,
    /// Stops the receipts listener.
    stop: watch::Sender<bool>,
    listener: Option<tokio::task::JoinHandle<()>>,
    client: Client,
    /// Said once: the destination cannot carry an ask.
    warned: bool,
}

impl Relay {
    /// The relay of a route, with what an earlier run relayed for: when
    /// it relayed for anyone, the receipts listener starts at once.
    pub(super) async fn start(
        route: &str,
        source: &ClientConfig,
        destination: ClientConfig,
        client: Client,
        relayer: Relayer,
    ) -> Relay {
        let asked = match client.outbox().meta(ASKED_KEY).await {
            Ok(v) => parse(v.as_deref().unwrap_or("")),
            Err(e) => {
                tracing::error!(%route, error = %e, "cannot read whom this route relayed receipts for; receipts for them are dropped until they publish again");
                HashMap::new()
            }
        };
        let mut relay = Relay {
            prefix: destination.receipt_prefix.clone(),
            asked: Arc::new(Mutex::new(asked)),
            source_prefix: format!("{}/", source.receipt_prefix),
            destination,
            relayer,
            stop: watch::channel(false).0,
            listener: None,
            client,
            warned: false,
        };
        if !relay.asked.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            relay.listen();
        }
        relay
    }

    /// Passes the ask of `id`'s producer (at `topic` on the source) on
    /// with `m`: it asks for receipts at the route's topic for that
    /// producer.
    pub(super) fn pass_on(&mut self, m: &mut Message, id: &Identity, topic: &str) {
        let d = &self.destination;
        if d.version == crate::ProtocolVersion::V311 && !d.envelope && !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(producer = %id.producer, "a producer asks for receipts, but this route's destination speaks MQTT 3.1.1 without the envelope: the ask cannot go upstream, and the producer will publish again until its deadline; set envelope = true on the destination (and --envelope on the consumers)");
        }
        m.props.user.push((RECEIPT_PROPERTY.to_owned(), receipt_topic(&self.prefix, &id.producer)));
        let changed = {
            let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
            let old = asked.insert(id.producer.clone(), topic.to_owned());
            (old.as_deref() != Some(topic)).then(|| format(&asked))
        };
        if let Some(all) = changed {
            self.client.outbox().set_meta(ASKED_KEY, &all);
        }
        self.client.outbox().count(RELAYED_ASKS, 1);
        if self.listener.is_none() {
            self.listen();
        }
    }

    /// True for a receipt this route (or another) hands back at the
    /// source: not a message to forward.
    pub(super) fn is_handed_back(&self, topic: &str, payload: &[u8]) -> bool {
        // The payload first: the topics are looked at only for receipts.
        payload.starts_with(ConsumerReceipt::HEADER.as_bytes())
            && (topic.starts_with(&self.source_prefix)
                || self.asked.lock().unwrap_or_else(|e| e.into_inner()).values().any(|t| t == topic))
    }

    fn listen(&mut self) {
        let filter = format!("{}/#", self.prefix);
        let (cfg, asked, relayer) = (self.destination.clone(), self.asked.clone(), self.relayer.clone());
        let (client, stop) = (self.client.clone(), self.stop.subscribe());
        self.listener = Some(tokio::spawn(hand_back(cfg, filter, asked, relayer, client, stop)));
    }

    /// Stops the receipts listener.
    pub(super) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(l) = self.listener.take() {
            let _ = l.await;
        }
    }
}

/// The receipts listener: a session of its own on the destination set
/// (client id `CLIENT_ID-receipts`); each receipt of a producer the route
/// relayed for is published at its topic on the source brokers.
async fn hand_back(
    cfg: ClientConfig,
    filter: String,
    asked: Arc<Mutex<HashMap<String, String>>>,
    relayer: Relayer,
    client: Client,
    mut stop: watch::Receiver<bool>,
) {
    let consumer = match crate::client::receipts_session(&cfg, &filter).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, %filter, "cannot listen for receipts to hand back; producers behind this route will publish again until this is fixed");
            return;
        }
    };
    tracing::info!(%filter, "listening for receipts to hand back");
    loop {
        let d = tokio::select! {
            d = consumer.next() => d,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(d) = d else { break };
        if via(d.payload()).any(|v| v == cfg.client_id) {
            tracing::debug!(topic = d.topic(), "a receipt this route handed back before; not again");
            d.ack();
            continue;
        }
        match ConsumerReceipt::decode(d.payload()) {
            Ok(r) => {
                let to = asked.lock().unwrap_or_else(|e| e.into_inner()).get(&r.producer).cloned();
                match to {
                    Some(topic) => {
                        let n = r.count();
                        let mut payload = d.payload().to_vec();
                        if !payload.ends_with(b"\n") {
                            payload.push(b'\n');
                        }
                        payload.extend_from_slice(format!("via {}\n", cfg.client_id).as_bytes());
                        relayer.relay(topic, payload, n);
                        client.outbox().count(RETURNED, n);
                    }
                    None => {
                        tracing::debug!(producer = %r.producer, "a receipt for a producer this route did not relay for; not handed back")
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, topic = d.topic(), "not a receipt; ignored"),
        }
        d.ack();
    }
    consumer.close().await;
}

/// The routes a receipt was handed back through (its `via` lines).
fn via(payload: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(payload).unwrap_or("").lines().filter_map(|l| l.strip_prefix("via "))
}

fn parse(text: &str) -> HashMap<String, String> {
    text.lines().filter_map(|l| l.split_once('\t')).map(|(p, t)| (p.to_owned(), t.to_owned())).collect()
}

fn format(asked: &HashMap<String, String>) -> String {
    let mut lines: Vec<String> = asked.iter().map(|(p, t)| format!("{p}\t{t}\n")).collect();
    lines.sort();
    lines.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producers_relayed_for_read_back_as_written() {
        let asked: HashMap<String, String> =
            [("gw-1", "steadfast/receipts/gw-1"), ("gw 2", "site/r/gw 2")].map(|(p, t)| (p.into(), t.into())).into();
        assert_eq!(parse(&format(&asked)), asked);
        assert!(parse("").is_empty());
    }

    /// A receipt handed back through routes names them in `via` lines,
    /// which producers skip: the receipt reads the same.
    #[test]
    fn a_handed_back_receipt_names_its_routes_and_still_reads_as_a_receipt() {
        let r = ConsumerReceipt { by: "line1".into(), producer: "gw".into(), ranges: vec![(1, 5)] };
        let mut payload = r.encode();
        payload.extend_from_slice(b"via site-7-out\nvia hub-out\n");
        assert_eq!(via(&payload).collect::<Vec<_>>(), ["site-7-out", "hub-out"]);
        assert_eq!(ConsumerReceipt::decode(&payload).unwrap(), r);
        assert_eq!(via(&r.encode()).count(), 0);
    }
}
