//! The dispatcher task: the thin loop around the dispatch engine
//! ([`Dispatch`]). It hands the engine what every broker delivers (with
//! the inbox's answer for identities it must ask about), the
//! application's acknowledgements and refusals, and the outcome of each
//! inbox record; it carries out what the engine decides: hand a delivery
//! to the application, send a broker's ack, record identities, count,
//! report a suspected loss.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use steadfast_core::engine::{Answer, Counter, Delivered, Dispatch, DispatchOp, Record};
use steadfast_core::receipt::receipt_topic;
use steadfast_core::receipt::ReceiptBatch;
use steadfast_core::{ConsumerReceipt, Identity, ReceiptBatcher};
use steadfast_store::Outbox;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};

use super::group::GroupInbox;
use super::received::{Pending, Received, Token};
use super::{send_queued, Cmd, ConsumerConfig, DriverCmd, FromBroker, DUPLICATES, GAPS, HANDLED, OUT_OF_ORDER};
use crate::clock::now;
use crate::Event;

/// Deliveries the dispatcher queues for the application before it stops
/// reading from the brokers (back-pressure).
const READY_MAX: usize = 256;

impl Delivered for Pending {
    type Token = Token;

    fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref().filter(|_| self.inbox)
    }

    fn token(&self) -> Token {
        self.token
    }

    fn receipt(&self) -> Option<&str> {
        self.msg.receipt.as_deref().filter(|_| self.identity().is_some())
    }
}

/// Where a receipt batch goes: the broker, the receipts topic, and the
/// producer whose sequence numbers it names.
pub(super) type ReceiptTo = (usize, String, String);

/// The one task between the brokers' receivers and the application.
pub(super) struct Dispatcher {
    pub(super) cfg: Arc<ConsumerConfig>,
    pub(super) urls: Vec<Arc<str>>,
    pub(super) outbox: Outbox,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) app: mpsc::Sender<Received>,
    pub(super) cmds: mpsc::UnboundedSender<Cmd>,
    pub(super) to_drivers: Vec<mpsc::UnboundedSender<DriverCmd>>,
    /// Every decision: de-duplication, record before ack, gaps, retries.
    pub(super) engine: Dispatch<Pending>,
    pub(super) handled: Arc<AtomicU64>,
    /// Close is waiting for the records under way.
    pub(super) flush: Option<oneshot::Sender<()>>,
    /// Deliveries waiting for the application to take them.
    pub(super) ready: VecDeque<Received>,
    /// Receipts owed, per broker and receipts topic, until their batch
    /// leaves.
    pub(super) receipts: ReceiptBatcher<ReceiptTo>,
    /// A producer asked for a receipt that this consumer cannot give (no
    /// inbox), said once.
    pub(super) warned_receipts: bool,
    /// A consumer group's shared inbox, instead of the directory's.
    pub(super) group: Option<Arc<GroupInbox>>,
    /// Deliveries to ask the shared inbox about again (another member
    /// held a claim on them).
    pub(super) asks: Vec<Pending>,
}

impl Dispatcher {
    pub(super) async fn run(
        mut self,
        mut inbound: mpsc::Receiver<FromBroker>,
        mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
        mut stop: watch::Receiver<bool>,
    ) {
        let app = self.app.clone();
        // A group member's claims under way, answered in the order asked
        // (so that each broker's deliveries keep their order), several at
        // once on the shared inbox's connection.
        let mut claims: FuturesOrdered<Claim> = FuturesOrdered::new();
        // A group member renews its claims on what it handles still, three
        // times per claim's length, so that a slow handler keeps them.
        let mut renew = tokio::time::interval((self.cfg.claim_for / 3).max(Duration::from_millis(100)));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.asks.is_empty() {
                let items = std::mem::take(&mut self.asks);
                self.answer(items, &mut claims).await;
            }
            let wake = [self.engine.poll_timeout(), self.receipts.poll_timeout()].into_iter().flatten().min();
            let wake = wake.map(Instant::from_std);
            // Commands (acks, close) are served whatever the application
            // does; brokers are read only while few deliveries wait for it.
            tokio::select! {
                first = inbound.recv(), if self.ready.len() < READY_MAX && claims.len() < CLAIMS_MAX => {
                    let Some(first) = first else { return };
                    // Sized once for what waits (no regrowth as it fills).
                    let mut batch = Vec::with_capacity(inbound.len().min(511) + 1);
                    batch.push(first);
                    while batch.len() < 512 {
                        match inbound.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    self.take(batch, &mut claims).await;
                }
                Some((items, answers)) = claims.next(), if !claims.is_empty() => {
                    self.engine.handle_answers(items, &answers, now());
                    self.carry_out();
                }
                permit = app.reserve(), if !self.ready.is_empty() => {
                    let Ok(permit) = permit else { return };
                    if send_queued(&app, permit, &mut self.ready, usize::MAX, |_| false).is_none() {
                        return;
                    }
                }
                cmd = cmd_rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    let mut cmds = vec![cmd];
                    while let Ok(c) = cmd_rx.try_recv() {
                        cmds.push(c);
                    }
                    self.on_cmds(cmds);
                }
                _ = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    let now = now();
                    self.engine.handle_timeout(now);
                    self.carry_out();
                    let due = self.receipts.take_due(now.at, false);
                    self.send_receipts(due);
                }
                _ = renew.tick(), if self.group.is_some() => self.renew_claims(),
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            }
        }
    }

    /// Extends the claims on everything handed over and not yet recorded.
    fn renew_claims(&self) {
        let Some(group) = self.group.clone().filter(|_| !self.cfg.records_in_transaction) else { return };
        let ids: Vec<(String, u64)> = self.engine.handling().map(|(p, seq)| (p.to_owned(), seq)).collect();
        if ids.is_empty() {
            return;
        }
        tokio::spawn(async move {
            // A renewal that fails is tried at the next tick; the claim
            // itself lasts until then.
            if let Err(e) = group.renew(&ids).await {
                tracing::debug!(error = %e, "cannot renew the claims now");
            }
        });
    }

    /// Messages from the brokers, with the inbox's answer for those the
    /// engine must ask about (a group member's: asked in `claims`).
    async fn take(&mut self, batch: Vec<FromBroker>, claims: &mut FuturesOrdered<Claim>) {
        let mut items = Vec::with_capacity(batch.len());
        for FromBroker { broker, epoch, mut msg } in batch {
            let token = Token { broker, epoch, pid: msg.pid };
            let mut identity = msg.identity.as_deref().and_then(Identity::parse_property_value);
            if identity.is_none() && self.cfg.client.envelope {
                if let Some((id, asking, payload)) = Identity::unwrap_asking(&msg.payload) {
                    let payload = payload.to_vec();
                    msg.payload = payload;
                    // MQTT 3.1.1: the receipts topic follows from the
                    // producer id.
                    if asking && (self.cfg.send_receipts || self.cfg.relay) {
                        msg.receipt = Some(receipt_topic(&self.cfg.client.receipt_prefix, &id.producer));
                    }
                    identity = Some(id);
                }
            }
            if self.group.is_some() && identity.as_ref().is_some_and(|i| i.producer.contains('\0')) {
                // PostgreSQL's text cannot hold it: handed over as a
                // message without an identity (at least once), rather than
                // stalling the member on a statement that always fails.
                identity = None;
            }
            let warn = !self.cfg.inbox && !self.cfg.relay && msg.receipt.is_some();
            if warn && !std::mem::replace(&mut self.warned_receipts, true) {
                tracing::warn!(topic = %msg.topic, "a producer asks for receipts, but this consumer records nothing (no inbox, --no-dedup): it sends none, and the producer will publish its messages again");
            }
            if !self.cfg.send_receipts && !self.cfg.relay {
                msg.receipt = None;
            }
            items.push(Pending { token, msg, identity, inbox: self.cfg.inbox });
        }
        self.answer(items, claims).await
    }

    /// Hands `items` to the engine with the inbox's answers for those it
    /// must ask about; a group member's are asked in `claims` and handed
    /// over when they come.
    async fn answer(&mut self, items: Vec<Pending>, claims: &mut FuturesOrdered<Claim>) {
        let ask = self.engine.to_ask(&items);
        if let Some(group) = self.group.clone() {
            if self.cfg.records_in_transaction {
                // The application's record_in decides (ConsumerConfig::
                // records_in_transaction): everything is new here.
                self.engine.handle_answers(items, &[], now());
                self.carry_out();
                return;
            }
            claims.push_back(Box::pin(group_answers(group, ask, items)));
            return;
        }
        let seen = if ask.is_empty() {
            Vec::new()
        } else {
            match self.outbox.inbox_seen(ask).await {
                Ok(s) => s,
                Err(e) => {
                    // Without the inbox nothing is known handled: hand over
                    // (at least once) rather than stall.
                    tracing::error!(error = %e, "cannot read the inbox; delivering without de-duplication");
                    Vec::new()
                }
            }
        };
        self.engine.handle_delivered(items, &seen, now());
        self.carry_out();
    }

    fn on_cmds(&mut self, cmds: Vec<Cmd>) {
        let mut acks = Vec::new();
        for cmd in cmds {
            match cmd {
                Cmd::Ack { token, identity } => acks.push((token, identity)),
                Cmd::Retry(p) => self.engine.handle_refused(*p, now()),
                Cmd::Flush(tx) => self.flush = Some(tx),
                Cmd::Relay { topic, payload, count } => {
                    for d in &self.to_drivers {
                        let (topic, payload) = (topic.clone(), payload.clone());
                        let _ = d.send(DriverCmd::Publish { topic, payload, count });
                    }
                }
                Cmd::Recorded(done, ok) => self.engine.handle_recorded(done, ok, now()),
            }
        }
        self.engine.handle_acks(acks);
        self.carry_out();
        if self.engine.recording() == 0 {
            if let Some(tx) = self.flush.take() {
                // Receipts owed leave now, ahead of the flush.
                let owed = self.receipts.take_due(now().at, true);
                self.send_receipts(owed);
                // Every ack is queued to its driver: they answer once written.
                let drivers = self.to_drivers.clone();
                tokio::spawn(async move {
                    for d in drivers {
                        let (t, r) = oneshot::channel();
                        // A driver between sessions has nothing to write.
                        if d.send(DriverCmd::Flush(t)).is_ok() {
                            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
                        }
                    }
                    let _ = tx.send(());
                });
            }
        }
    }

    /// Carries out what the engine decided, in order.
    fn carry_out(&mut self) {
        while let Some(op) = self.engine.poll_op() {
            match op {
                DispatchOp::HandOver { delivery, redelivered } => {
                    let broker = self.urls[delivery.token.broker].clone();
                    let group = self.group.clone();
                    self.ready.push_back(delivery.into_received(broker, redelivered, self.cmds.clone(), group));
                }
                DispatchOp::AckBroker(token) => self.ack_broker(token),
                DispatchOp::Receipt { token, identity, topic } => {
                    // One batch per producer: a forwarded message's receipts
                    // topic may be shared by several producers' identities.
                    let to = (token.broker, topic, identity.producer.clone());
                    let full = self.receipts.add(to, &identity.producer, identity.seq, now().at);
                    if let Some(batch) = full {
                        self.send_receipts(vec![batch]);
                    }
                }
                DispatchOp::Record(batch) => self.record(batch),
                DispatchOp::Ask(items) => self.asks.extend(items),
                DispatchOp::Count(counter, n) => {
                    let name = match counter {
                        Counter::Handled => {
                            self.handled.fetch_add(n, Ordering::Relaxed);
                            HANDLED
                        }
                        Counter::Duplicates => {
                            if let Some(g) = &self.group {
                                g.note_duplicates(n);
                            }
                            DUPLICATES
                        }
                        Counter::OutOfOrder => OUT_OF_ORDER,
                        Counter::Gaps => GAPS,
                    };
                    self.outbox.count(name, n);
                }
                DispatchOp::SuspectedLoss { producer, first, last } => {
                    tracing::warn!(%producer, first, last, "suspected loss: a gap in this producer's sequence did not fill");
                    let _ = self.events.send(Event::SuspectedLoss { producer, first, last });
                }
            }
        }
    }

    /// Receipts whose batch is full or lingered long enough go to the
    /// broker each came through (QoS 1, not stored: a receipt lost on
    /// the way means a resend of the message, which the inbox removes
    /// and answers with a receipt again).
    fn send_receipts(&mut self, batches: Vec<ReceiptBatch<ReceiptTo>>) {
        for ReceiptBatch { to: (broker, topic, _), producer, ranges } in batches {
            let receipt = ConsumerReceipt { by: self.cfg.receipt_name().to_owned(), producer, ranges };
            let n = receipt.count();
            if self.to_drivers[broker].send(DriverCmd::Publish { topic, payload: receipt.encode(), count: n }).is_err()
            {
                tracing::debug!(
                    receipts = n,
                    "a receipt batch found its broker's session gone; the producer will resend"
                );
            }
        }
    }

    fn ack_broker(&self, token: Token) {
        if let Some(pid) = token.pid {
            let _ = self.to_drivers[token.broker].send(DriverCmd::Ack { epoch: token.epoch, pid });
        }
    }

    /// Records handled identities in the inbox (group commit; a broker's
    /// ack waits for it beyond the acks allowed ahead of their record, and
    /// a receipt always does: G4, G5, G8); the outcome goes back to the
    /// engine.
    fn record(&self, record: Record<Token>) {
        if self.group.is_some() && self.cfg.records_in_transaction {
            // Recorded in the application's transaction before its ack.
            let _ = self.cmds.send(Cmd::Recorded(record, true));
            return;
        }
        let outbox = self.outbox.clone();
        let group = self.group.clone();
        let back = self.cmds.clone();
        tokio::spawn(async move {
            let done = match &group {
                Some(g) => {
                    let ids: Vec<(String, u64)> = record.ids.iter().map(|(i, _)| (i.producer.clone(), i.seq)).collect();
                    g.record(&ids).await.map_err(|e| e.to_string())
                }
                None => {
                    // One copy of the producer id per run, not per identity.
                    let runs = steadfast_store::inbox_runs(&record.ids, |(i, _)| (i.producer.as_str(), i.seq));
                    outbox.inbox_record_runs(runs, record.sync).await.map_err(|e| e.to_string())
                }
            };
            let ok = match done {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record handled messages in the inbox; not acknowledged yet, trying again");
                    false
                }
            };
            let _ = back.send(Cmd::Recorded(record, ok));
        });
    }
}

/// A group member's claim under way: the deliveries, and the inbox's
/// answers for those the engine asked about.
type Claim = std::pin::Pin<Box<dyn std::future::Future<Output = (Vec<Pending>, Vec<Answer>)> + Send>>;

/// Claims under way at once, at most (the dispatcher reads no more from
/// the brokers meanwhile).
const CLAIMS_MAX: usize = 4;

/// The shared inbox's answers for `ask` (each identity claimed by this
/// member, handled, or claimed by another), asked again with growing
/// pauses while PostgreSQL cannot give them: a group member never hands
/// over what another may have handled. Meanwhile nothing is acknowledged
/// and the brokers keep the messages; the consumer stopping drops the
/// wait.
async fn group_answers(
    group: Arc<GroupInbox>,
    ask: Vec<(String, u64)>,
    items: Vec<Pending>,
) -> (Vec<Pending>, Vec<Answer>) {
    if ask.is_empty() {
        return (items, Vec::new());
    }
    let mut pause = Duration::from_millis(100);
    let mut said = None::<tokio::time::Instant>;
    loop {
        match group.claim(&ask).await {
            Ok(answers) => {
                if group.set_down(false) {
                    tracing::warn!("the shared inbox answers again; handing messages over");
                }
                return (items, answers);
            }
            Err(e) => {
                // Said once per outage (then once a minute while it lasts).
                let first = !group.set_down(true);
                if first || said.is_some_and(|t: tokio::time::Instant| t.elapsed() >= Duration::from_secs(60)) {
                    said = Some(tokio::time::Instant::now());
                    tracing::error!(error = %e, "cannot read the shared inbox; holding the messages (unacknowledged, they wait in the brokers) and trying again");
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
