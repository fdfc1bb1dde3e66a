//! What a seed decides: the broker's behaviour, the network, the traffic
//! and the faults.

use std::time::Duration;

/// A fault injected at a simulated time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The broker is killed (-9) and comes back after `down`; it keeps
    /// what it saved last if it persists, nothing otherwise.
    KillBroker {
        /// Which broker.
        broker: usize,
        /// How long it stays down.
        down: Duration,
    },
    /// The connection is reset; the bytes on their way to the broker are
    /// cut after `cut_per_mille` of their length (a packet cut at any byte).
    Reset {
        /// The connection to which broker.
        broker: usize,
        /// Where the cut falls, in thousandths of the bytes under way.
        cut_per_mille: u32,
        /// The consumer's connection (else the producer's).
        consumer: bool,
    },
    /// Nothing passes in either direction for `lasts`, the connection
    /// stays open (a pulled cable, a dead NAT entry).
    BlackHole {
        /// The connection to which broker.
        broker: usize,
        /// How long nothing passes.
        lasts: Duration,
        /// The consumer's connection (else the producer's).
        consumer: bool,
    },
    /// The producer process is killed (-9) and restarts on its outbox after
    /// `down`; what it had not committed is gone.
    CrashProducer {
        /// How long it stays down.
        down: Duration,
    },
    /// The consumer process is killed (-9) and restarts on its inbox
    /// after `down`; what its application was handling is lost.
    CrashConsumer {
        /// How long it stays down.
        down: Duration,
    },
    /// A broker is cut off: its connections pass nothing and new ones
    /// fail until `lasts` is over.
    Partition {
        /// Which broker.
        broker: usize,
        /// How long.
        lasts: Duration,
    },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link = |consumer: bool| if consumer { "the consumer" } else { "the producer" };
        match *self {
            Fault::KillBroker { broker, down } => write!(f, "kill -9 of broker {broker}, back after {down:?}"),
            Fault::Reset { broker, cut_per_mille, consumer } => write!(
                f,
                "reset of {}'s connection to broker {broker}, bytes under way cut at {}.{}%",
                link(consumer),
                cut_per_mille / 10,
                cut_per_mille % 10
            ),
            Fault::BlackHole { broker, lasts, consumer } => {
                write!(f, "black hole on {}'s connection to broker {broker} for {lasts:?}", link(consumer))
            }
            Fault::CrashProducer { down } => write!(f, "kill -9 of the producer, back after {down:?}"),
            Fault::CrashConsumer { down } => write!(f, "kill -9 of the consumer, back after {down:?}"),
            Fault::Partition { broker, lasts } => write!(f, "broker {broker} cut off for {lasts:?}"),
        }
    }
}

/// A message of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Publish {
    /// When it is published (ms).
    pub at: u64,
    /// QoS 1 or 2.
    pub qos: u8,
    /// Deadline class: dropped as expired this long after it was published
    /// unless delivered before.
    pub ttl_ms: Option<u64>,
    /// Retry budget: dropped after this many sends.
    pub max_attempts: Option<u32>,
    /// 0 (the default) to 9: higher goes first after an outage.
    pub priority: u8,
    /// Larger than the brokers take: an MQTT 3.1.1 broker closes the
    /// connection on it (it cannot say why), so it is poison.
    pub oversize: bool,
    /// On a topic the brokers' ACL denies (MQTT 5 worlds): every broker
    /// refuses it for good (0x87, not authorised), so it is poison.
    pub denied: bool,
}

/// How the producer spreads its messages over the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// To the first healthy broker; back to a higher one after `failback_ms`.
    Failover {
        /// How long a higher broker must be up to get the traffic back.
        failback_ms: u64,
    },
    /// To every broker; a message leaves the outbox once `need` acknowledged it.
    Fanout {
        /// Acknowledgements needed.
        need: u32,
    },
}

/// Everything one seed decides.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The seed.
    pub seed: u64,
    /// How many brokers (1 to 3); the consumer subscribes on each.
    pub brokers: usize,
    /// How the producer spreads its messages over them.
    pub spread: Spread,
    /// One-way latency and its jitter, in ms.
    pub latency_ms: (u64, u64),
    /// The broker saves its sessions (an autosave every `autosave_ms`).
    pub persistence: bool,
    /// Milliseconds between the broker's autosaves.
    pub autosave_ms: u64,
    /// The broker answers QoS 2 with PUBACK (no QoS 2).
    pub qos2_as_puback: bool,
    /// The broker's CONNACK says QoS 1 at most.
    pub max_qos_1: bool,
    /// The broker's receive maximum (MQTT 5), if any.
    pub receive_maximum: Option<u16>,
    /// The broker speaks MQTT 5; without it (3.1.1 only) its CONNACK
    /// carries no receive maximum and no maximum QoS.
    pub mqtt5: bool,
    /// The broker closes the connection on a QoS 2 PUBLISH (NATS does): a
    /// 3.1.1 broker that does not take QoS 2 and cannot say so.
    pub qos2_closes: bool,
    /// The broker forgets a session whose client stayed away this long.
    pub session_expiry_ms: Option<u64>,
    /// The broker queues at most this many messages for the consumer and
    /// drops the rest (Mosquitto's `max_queued_messages`).
    pub max_queued: Option<usize>,
    /// The producer's links carry this many bytes per ms at most.
    pub bandwidth: Option<u64>,
    /// How long the producer's outbox takes to sync a commit (ms).
    pub sync_ms: u64,
    /// Per mille of new PUBLISHes the brokers refuse (an error reason code).
    pub refuse_per_mille: u32,
    /// Per mille of the producer's QoS 2 binds that fail to be written (a
    /// full disk): the link ends, nothing held goes out.
    pub bind_fail_per_mille: u32,
    /// Per mille of deliveries the consumer's application gives back.
    pub give_back_per_mille: u32,
    /// Per mille of the consumer's inbox records that fail to be written.
    pub record_fail_per_mille: u32,
    /// The producer's window.
    pub max_inflight: u16,
    /// The consumer's acknowledgements that may leave before their inbox
    /// record is on disk (`DispatchConfig::acks_ahead`).
    pub acks_ahead: usize,
    /// Messages read from the outbox per page.
    pub page: usize,
    /// The bytes after which a page ends (messages hold 1 to 13 bytes).
    pub page_bytes: usize,
    /// The messages, by time.
    pub messages: Vec<Publish>,
    /// How long the consumer's application takes per delivery (ms, most).
    pub handling_ms: u64,
    /// The faults, by time (ms).
    pub faults: Vec<(u64, Fault)>,
    /// Every message asks for one receipt from the consumer, within this
    /// many ms (end-to-end receipts), in one world in three.
    pub receipts_ms: Option<u64>,
}

/// A world's size, when chosen instead of seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Messages published.
    pub messages: usize,
    /// Faults injected.
    pub faults: usize,
}

/// Simulated time during which messages are published and faults happen.
pub const ACTIVE_MS: u64 = 8_000;

impl Schedule {
    /// The world in one line, for the top of a story.
    pub fn describe(&self) -> String {
        let spread = match self.spread {
            Spread::Failover { failback_ms } => format!("failover (fail-back after {failback_ms} ms up)"),
            Spread::Fanout { need } => format!("fanout (a message leaves at {need} acknowledgement(s))"),
        };
        let persistence = if self.persistence {
            format!("sessions saved every {} ms", self.autosave_ms)
        } else {
            "no persistence".to_owned()
        };
        let mut quirks = Vec::new();
        if self.qos2_as_puback {
            quirks.push("QoS 2 answered with PUBACK".to_owned());
        }
        if self.max_qos_1 {
            quirks.push("Maximum QoS 1".to_owned());
        }
        if !self.mqtt5 {
            quirks.push("MQTT 3.1.1 only".to_owned());
        }
        if self.qos2_closes {
            quirks.push("QoS 2 closes the connection".to_owned());
        }
        let denied = self.messages.iter().filter(|m| m.denied).count();
        if denied > 0 {
            quirks.push(format!("{denied} message(s) on a topic the brokers deny (refused for good, 0x87)"));
        }
        let oversize = self.messages.iter().filter(|m| m.oversize).count();
        if oversize > 0 {
            quirks.push(format!("{oversize} message(s) too large for the brokers (they close the connection)"));
        }
        if let Some(e) = self.session_expiry_ms {
            quirks.push(format!("sessions expire after {e} ms away"));
        }
        if let Some(q) = self.max_queued {
            quirks.push(format!("at most {q} queued for the consumer"));
        }
        if let Some(r) = self.receipts_ms {
            quirks.push(format!("every message waits for the consumer's receipt ({r} ms, doubling)"));
        }
        let quirks = if quirks.is_empty() { String::new() } else { format!("; {}", quirks.join(", ")) };
        format!(
            "world of seed {}: {} broker(s), {spread}, {persistence}{quirks}; latency {} ms + up to {} ms; {} messages; window {}; consumer acks ahead of records {}",
            self.seed,
            self.brokers,
            self.latency_ms.0,
            self.latency_ms.1,
            self.messages.len(),
            self.max_inflight,
            self.acks_ahead
        )
    }

    /// The schedule of `seed`.
    pub fn of(seed: u64) -> Schedule {
        Self::sized(seed, None)
    }

    /// The schedule of `seed`, with `size` = (messages, faults) instead of
    /// the seeded counts (for measuring the simulator on heavy worlds).
    pub fn sized(seed: u64, size: Option<Size>) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(seed);
        let count = rng.usize(20..300);
        let count = size.map_or(count, |s| s.messages);
        let qos2_share = rng.u32(0..=100);
        // Most seeds publish persistent messages only; some mix in the
        // deadline and budget classes.
        let classes = rng.u8(0..4) == 0;
        let priorities = rng.u8(0..4) == 0;
        let mut messages: Vec<Publish> = (0..count)
            .map(|_| Publish {
                at: rng.u64(0..ACTIVE_MS),
                qos: if rng.u32(0..100) < qos2_share { 2 } else { 1 },
                ttl_ms: (classes && rng.u8(0..3) == 0).then(|| rng.u64(50..5_000)),
                max_attempts: (classes && rng.u8(0..3) == 0).then(|| rng.u32(1..4)),
                priority: if priorities && rng.u8(0..10) < 3 { rng.u8(1..10) } else { 0 },
                oversize: false,
                denied: false,
            })
            .collect();
        messages.sort();
        let brokers = [1, 1, 2, 2, 3][rng.usize(0..5)];
        let spread = match rng.bool() {
            true => Spread::Failover { failback_ms: rng.u64(100..3_000) },
            false => Spread::Fanout { need: rng.u32(1..=brokers as u32) },
        };
        let faults = rng.usize(1..8);
        let faults = size.map_or(faults, |s| s.faults);
        let mut faults: Vec<(u64, Fault)> = (0..faults)
            .map(|_| {
                let mut at = rng.u64(200..ACTIVE_MS);
                // A failover's faults lean on the broker in use (the first).
                let failover = matches!(spread, Spread::Failover { .. });
                let broker = if failover && rng.bool() { 0 } else { rng.usize(0..brokers) };
                let fault = match rng.u8(0..7) {
                    0 | 6 => {
                        at = near_a_publish(&mut rng, &messages, at, 100);
                        Fault::KillBroker { broker, down: Duration::from_millis(rng.u64(50..3_000)) }
                    }
                    3 => {
                        at = near_a_publish(&mut rng, &messages, at, 10);
                        Fault::CrashProducer { down: Duration::from_millis(rng.u64(10..2_000)) }
                    }
                    1 => Fault::Reset { broker, cut_per_mille: rng.u32(0..=1000), consumer: rng.bool() },
                    2 => Fault::BlackHole {
                        broker,
                        lasts: Duration::from_millis(rng.u64(100..6_000)),
                        consumer: rng.bool(),
                    },
                    4 => Fault::Partition { broker, lasts: Duration::from_millis(rng.u64(100..6_000)) },
                    _ => Fault::CrashConsumer { down: Duration::from_millis(rng.u64(10..2_000)) },
                };
                (at, fault)
            })
            .collect();
        faults.sort_by_key(|(t, _)| *t);
        Schedule {
            seed,
            brokers,
            spread,
            latency_ms: (rng.u64(1..40), rng.u64(0..20)),
            persistence: rng.bool(),
            autosave_ms: rng.u64(10..2_000),
            qos2_as_puback: rng.u8(0..6) == 0,
            max_qos_1: rng.u8(0..6) == 0,
            receive_maximum: rng.bool().then(|| rng.u16(1..50)),
            session_expiry_ms: (rng.u8(0..4) == 0).then(|| rng.u64(500..10_000)),
            max_queued: (rng.u8(0..4) == 0).then(|| rng.usize(10..200)),
            bandwidth: (rng.u8(0..4) == 0).then(|| rng.u64(1..40)),
            sync_ms: rng.u64(1..10),
            refuse_per_mille: if rng.u8(0..4) == 0 { rng.u32(10..150) } else { 0 },
            bind_fail_per_mille: if rng.u8(0..4) == 0 { rng.u32(10..300) } else { 0 },
            give_back_per_mille: if rng.u8(0..4) == 0 { rng.u32(10..150) } else { 0 },
            record_fail_per_mille: if rng.u8(0..4) == 0 { rng.u32(10..300) } else { 0 },
            max_inflight: rng.u16(1..64),
            page: rng.usize(2..64),
            handling_ms: rng.u64(0..30),
            messages,
            faults,
            // Drawn last, so that the draws before them stay what they were.
            mqtt5: true,
            qos2_closes: false,
            receipts_ms: None,
            acks_ahead: 0,
            page_bytes: usize::MAX,
        }
        .broker_kind(&mut rng)
        .receipts()
        .acks_ahead()
        .page_bytes()
        .denied()
    }

    /// One MQTT 5 world in eight publishes one to three messages on a
    /// topic its brokers deny (from a generator of its own, as
    /// [`Self::receipts`]).
    fn denied(mut self) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0xde41_ed00);
        if self.mqtt5 && rng.u8(0..8) == 0 {
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..self.messages.len());
                self.messages[i].denied = true;
            }
        }
        self
    }

    /// Pages bounded by bytes before their count in one world of two (from
    /// a generator of its own, as [`Self::receipts`]).
    fn page_bytes(mut self) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0xb17e_5a9e);
        if rng.bool() {
            self.page_bytes = rng.usize(1..200);
        }
        self
    }

    /// The consumer's room for acknowledgements ahead of their inbox
    /// record: none in one world of three (each ack waits for its record),
    /// otherwise from 1 to 64 (from a generator of its own, as
    /// [`Self::receipts`]).
    fn acks_ahead(mut self) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0xac5a_ead0);
        if rng.u8(0..3) != 0 {
            self.acks_ahead = rng.usize(1..65);
        }
        self
    }

    /// One world in three asks for receipts (from a generator of its own,
    /// so that the rest of the world is what the seed made it before).
    fn receipts(mut self) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(self.seed ^ 0x4ece_1b75);
        if rng.u8(0..3) == 0 {
            self.receipts_ms = Some(rng.u64(200..1_000));
        }
        self
    }

    /// One broker in four speaks MQTT 3.1.1 only (its CONNACK says nothing
    /// of limits), and one of those in three closes the connection on QoS 2.
    fn broker_kind(mut self, rng: &mut fastrand::Rng) -> Schedule {
        if rng.u8(0..4) == 0 {
            self.mqtt5 = false;
            self.receive_maximum = None;
            self.max_qos_1 = false;
            self.qos2_closes = rng.u8(0..3) == 0;
            self.qos2_as_puback &= !self.qos2_closes;
        }
        // One world in eight publishes one to three messages larger than
        // its brokers take.
        if rng.u8(0..8) == 0 {
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..self.messages.len());
                self.messages[i].oversize = true;
            }
        }
        self
    }
}

/// Half the kills of a process fall where they hurt most: a producer's
/// within a commit's sync after a publish, a broker's while that message
/// is on its way; the other half at `at`.
fn near_a_publish(rng: &mut fastrand::Rng, messages: &[Publish], at: u64, within: u64) -> u64 {
    if rng.bool() {
        messages[rng.usize(0..messages.len())].at + rng.u64(0..within)
    } else {
        at
    }
}
