//! The dispatcher: one task that merges what every broker delivers, drops
//! what the inbox says was handled, holds a copy that arrives while the
//! first is being handled, records each handled identity in the inbox
//! before the broker's ack leaves, and watches each producer's sequence for
//! gaps.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use steadfast_core::Identity;
use steadfast_store::Outbox;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{sleep, Instant};

use super::received::{Pending, Received, Token};
use super::{send_queued, Cmd, ConsumerConfig, DriverCmd, FromBroker, DUPLICATES, GAPS, HANDLED, OUT_OF_ORDER};
use crate::Event;

/// Deliveries the dispatcher queues for the application before it stops
/// reading from the brokers (back-pressure).
const READY_MAX: usize = 256;

/// Per producer: the highest sequence number seen and the gaps below it.
#[derive(Default)]
pub(super) struct Sequence {
    highest: u64,
    /// Missing ranges (first, last) and when they were noticed.
    gaps: BTreeMap<u64, (u64, Instant)>,
}

/// The one task between the brokers' receivers and the application.
pub(super) struct Dispatcher {
    pub(super) cfg: Arc<ConsumerConfig>,
    pub(super) urls: Vec<String>,
    pub(super) outbox: Outbox,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) app: mpsc::Sender<Received>,
    pub(super) cmds: mpsc::UnboundedSender<Cmd>,
    pub(super) to_drivers: Vec<mpsc::UnboundedSender<DriverCmd>>,
    /// Identities handed to the application and not yet recorded, with the
    /// copies that arrived meanwhile (acknowledged once it is recorded).
    pub(super) handling: HashMap<Identity, Vec<Token>>,
    pub(super) producers: HashMap<String, Sequence>,
    pub(super) handled: Arc<AtomicU64>,
    /// Inbox records under way.
    pub(super) recording: usize,
    /// Close is waiting for them.
    pub(super) flush: Option<oneshot::Sender<()>>,
    /// Deliveries waiting for the application to take them.
    pub(super) ready: VecDeque<Received>,
    /// Per producer, a sequence number at or above every one the inbox
    /// holds or that was handed over: anything above it is new without
    /// asking the store (the common case).
    pub(super) high: HashMap<String, u64>,
}

impl Dispatcher {
    pub(super) async fn run(
        mut self,
        mut inbound: mpsc::Receiver<FromBroker>,
        mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let app = self.app.clone();
        loop {
            // Commands (acks, close) are served whatever the application
            // does; brokers are read only while few deliveries wait for it.
            tokio::select! {
                first = inbound.recv(), if self.ready.len() < READY_MAX => {
                    let Some(first) = first else { return };
                    let mut batch = vec![first];
                    while batch.len() < 512 {
                        match inbound.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    self.take(batch).await;
                }
                permit = app.reserve(), if !self.ready.is_empty() => {
                    let Ok(permit) = permit else { return };
                    if !send_queued(&app, permit, &mut self.ready) {
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
                _ = tick.tick() => self.check_gaps(),
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            }
        }
    }

    fn ack_broker(&self, token: Token) {
        if let Some(pid) = token.pid {
            let _ = self.to_drivers[token.broker].send(DriverCmd::Ack { epoch: token.epoch, pid });
        }
    }

    /// Messages from the brokers: drop what was handled, hold second copies
    /// of what is being handled, queue the rest for the application.
    async fn take(&mut self, batch: Vec<FromBroker>) {
        let mut items = Vec::with_capacity(batch.len());
        for FromBroker { broker, epoch, mut msg } in batch {
            let token = Token { broker, epoch, pid: msg.pid };
            let mut identity = msg.identity.as_deref().and_then(Identity::parse_property_value);
            if identity.is_none() && self.cfg.client.envelope {
                if let Some((id, payload)) = Identity::unwrap(&msg.payload) {
                    let payload = payload.to_vec();
                    msg.payload = payload;
                    identity = Some(id);
                }
            }
            let identity = identity.filter(|_| self.cfg.inbox);
            items.push(Pending { token, msg, identity });
        }
        // Decided for the whole batch before anything in it is handed over.
        let fresh: Vec<bool> = items
            .iter()
            .map(|p| p.identity.as_ref().is_some_and(|i| self.high.get(&i.producer).is_none_or(|h| i.seq > *h)))
            .collect();
        let ids: Vec<(String, u64)> = items
            .iter()
            .zip(&fresh)
            .filter(|(_, fresh)| !**fresh)
            .filter_map(|(p, _)| p.identity.as_ref())
            .map(|i| (i.producer.clone(), i.seq))
            .collect();
        let seen = if ids.is_empty() {
            Vec::new()
        } else {
            match self.outbox.inbox_seen(ids).await {
                Ok(s) => s,
                Err(e) => {
                    // Without the inbox nothing is known handled: hand over
                    // (at least once) rather than stall.
                    tracing::error!(error = %e, "cannot read the inbox; delivering without de-duplication");
                    Vec::new()
                }
            }
        };
        let mut seen = seen.into_iter();
        let mut duplicates = 0;
        for (p, fresh) in items.into_iter().zip(fresh) {
            let Some(id) = p.identity.clone() else {
                self.hand_over(p, false);
                continue;
            };
            let known = !fresh && seen.next().unwrap_or(false);
            if known {
                duplicates += 1;
                self.ack_broker(p.token);
                continue;
            }
            if let Some(copies) = self.handling.get_mut(&id) {
                copies.push(p.token);
                duplicates += 1;
                continue;
            }
            self.handling.insert(id.clone(), Vec::new());
            let h = self.high.entry(id.producer.clone()).or_default();
            *h = (*h).max(id.seq);
            self.note_sequence(&id);
            self.hand_over(p, false);
        }
        self.outbox.count(DUPLICATES, duplicates);
    }

    /// Queues a delivery for the application. Every delivery has a token:
    /// a QoS 0 one has no packet id to acknowledge, but its identity is
    /// still recorded when it is handled.
    fn hand_over(&mut self, p: Pending, redelivered: bool) {
        let broker = self.urls[p.token.broker].clone();
        self.ready.push_back(p.into_received(broker, redelivered, self.cmds.clone()));
    }

    fn on_cmds(&mut self, cmds: Vec<Cmd>) {
        let mut record = Vec::new();
        let mut plain = 0;
        for cmd in cmds {
            match cmd {
                Cmd::Ack { token, identity: Some(id) } => record.push((id, token)),
                Cmd::Ack { token, identity: None } => {
                    plain += 1;
                    self.ack_broker(token);
                }
                Cmd::Retry(p) => {
                    let app = self.app.clone();
                    let urls = self.urls.clone();
                    let cmds = self.cmds.clone();
                    let after = self.cfg.retry_after;
                    tokio::spawn(async move {
                        sleep(after).await;
                        let broker = urls[p.token.broker].clone();
                        let _ = app.send(p.into_received(broker, true, cmds)).await;
                    });
                }
                Cmd::Flush(tx) => self.flush = Some(tx),
                Cmd::Recorded(done, true) => {
                    self.recording -= 1;
                    for (id, token) in done {
                        let copies = self.handling.remove(&id).unwrap_or_default();
                        self.ack_broker(token);
                        for c in copies {
                            self.ack_broker(c);
                        }
                    }
                }
                Cmd::Recorded(done, false) => {
                    // Not acknowledged until recorded: tried again (the
                    // deliveries stay in flight, and the record stays
                    // counted as under way, meanwhile).
                    let back = self.cmds.clone();
                    tokio::spawn(async move {
                        sleep(Duration::from_secs(1)).await;
                        let _ = back.send(Cmd::RecordAgain(done));
                    });
                }
                Cmd::RecordAgain(done) => {
                    self.recording -= 1;
                    self.record(done);
                }
            }
        }
        self.handled.fetch_add(plain, Ordering::Relaxed);
        self.outbox.count(HANDLED, plain);
        if !record.is_empty() {
            self.record(record);
        }
        if self.recording == 0 {
            if let Some(tx) = self.flush.take() {
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

    fn record(&mut self, record: Vec<(Identity, Token)>) {
        self.recording += 1;
        // The inbox record is on disk before any broker ack leaves (G4, G5).
        let n = record.len() as u64;
        self.handled.fetch_add(n, Ordering::Relaxed);
        self.outbox.count(HANDLED, n);
        let outbox = self.outbox.clone();
        let back = self.cmds.clone();
        tokio::spawn(async move {
            let ids = record.iter().map(|(i, _)| (i.producer.clone(), i.seq)).collect();
            let ok = match outbox.inbox_record(ids).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record handled messages in the inbox; not acknowledged yet, trying again");
                    false
                }
            };
            let _ = back.send(Cmd::Recorded(record, ok));
        });
    }

    /// G6: a jump ahead opens a gap; an arrival below the highest fills one
    /// (or is out of order).
    fn note_sequence(&mut self, id: &Identity) {
        let s = self.producers.entry(id.producer.clone()).or_default();
        let now = Instant::now();
        if s.highest == 0 {
            s.highest = id.seq;
            return;
        }
        if id.seq > s.highest + 1 {
            s.gaps.insert(s.highest + 1, (id.seq - 1, now));
        }
        if id.seq > s.highest {
            s.highest = id.seq;
            return;
        }
        self.outbox.count(OUT_OF_ORDER, 1);
        // Fill: split the range holding seq.
        let Some((&first, &(last, since))) = s.gaps.range(..=id.seq).next_back() else { return };
        if id.seq > last {
            return;
        }
        s.gaps.remove(&first);
        if first < id.seq {
            s.gaps.insert(first, (id.seq - 1, since));
        }
        if id.seq < last {
            s.gaps.insert(id.seq + 1, (last, since));
        }
    }

    fn check_gaps(&mut self) {
        let timeout = self.cfg.gap_timeout;
        let mut reported = 0;
        for (producer, s) in &mut self.producers {
            let old: Vec<u64> = s.gaps.iter().filter(|(_, (_, t))| t.elapsed() >= timeout).map(|(f, _)| *f).collect();
            for first in old {
                let (last, _) = s.gaps.remove(&first).expect("listed");
                reported += 1;
                tracing::warn!(%producer, first, last, "suspected loss: a gap in this producer's sequence did not fill");
                let _ = self.events.send(Event::SuspectedLoss { producer: producer.clone(), first, last });
            }
        }
        self.outbox.count(GAPS, reported);
    }
}
