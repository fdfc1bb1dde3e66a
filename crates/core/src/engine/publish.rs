//! The publishing session of one broker link: what goes on the wire under
//! which packet id, what an acknowledgement means, what a CONNACK means for
//! what was in flight, and when the link must be given up.
//!
//! States: *disconnected* (between links: nothing is sent, no timer ends
//! anything, the window and its contents are kept for the next CONNACK),
//! *connected* (messages stream from the queue into the window), and,
//! inside either, *binding* (a durable write of QoS 2 packet ids is under
//! way: no new message enters the window and no page is read until the
//! driver reports its outcome with [`PublishSession::handle_bound`];
//! acknowledgements and timers are still handled).
//!
//! The queue is fed from the outbox in pages, one priority at a time
//! ([`PublishSession::next_read`], [`PublishSession::handle_page`]). Whether
//! a message is this broker's to send (routing) is a question the session
//! asks its caller through a `claims` function.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

// Keyed by outbox ids, hashed several times per message: foldhash, not
// SipHash (docs/design.md, "Dependencies").
use foldhash::{HashMap, HashMapExt, HashSet};

use self::queue::SendQueue;
use super::{Now, Timer};
use crate::keepalive::{KeepAlive, KeepAliveAction};
use crate::message::{DropReason, Qos, PRIORITIES};
use crate::reason;
use crate::rtt::{AckTimeout, RoundTrip};
use crate::window::{Inflight, Resume, SendWindow, Stage};

/// What the session needs to know of a queued message.
pub trait Queued: Clone {
    /// Its outbox id (the producer's sequence number).
    fn id(&self) -> u64;
    /// The QoS it is sent at.
    fn qos(&self) -> Qos;
    /// Lowers the QoS it is sent at (a broker that takes QoS 1 at most).
    fn set_qos(&mut self, qos: Qos);
    /// Its priority, `0..PRIORITIES`.
    fn priority(&self) -> usize;
    /// What it holds in memory, in bytes (its topic and payload, say):
    /// what bounds reading ahead besides the count. The same for its whole
    /// life.
    fn size(&self) -> usize;
    /// Its deadline (ms since the epoch), if it has one.
    fn expires_ms(&self) -> Option<u64>;
    /// Its retry budget, if it has one.
    fn max_attempts(&self) -> Option<u32>;
    /// Sends so far.
    fn attempts(&self) -> u32;
    /// Counts one more send.
    fn count_attempt(&mut self);
}

/// The packet codec of a link, as the session needs it.
pub trait Wire<M> {
    /// Appends the PUBLISH of `m` to `out`; or leaves `out` as it was
    /// and says why it can never be sent (it cannot be encoded, or it is
    /// larger than the broker takes). Written in place: the packet is
    /// not built apart and copied.
    fn publish(&mut self, m: &M, pid: Option<u16>, dup: bool, out: &mut Vec<u8>) -> Result<(), DropReason>;
    /// A PUBREL.
    fn pubrel(&mut self, pid: u16) -> Vec<u8>;
    /// A PINGREQ.
    fn ping(&mut self) -> Vec<u8>;
}

/// Settings of a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Most messages in flight (lowered by the broker's receive maximum).
    pub max_inflight: u16,
    /// The keep-alive interval.
    pub keep_alive: Duration,
    /// How long messages may stay in flight without any acknowledgement:
    /// fixed, or adapted to the round-trip time measured on the link.
    pub ack_timeout: AckTimeout,
    /// How long a refused message waits before it is sent again.
    pub refused_pause: Duration,
    /// What one read of the outbox returns at most (a count of one
    /// message or more). The lowest priority is read while less than half
    /// a page waits to be sent (in messages and in bytes), higher ones
    /// while less than two pages do.
    pub page: ReadLimit,
    /// A message alone in flight each time a link fails this many times in
    /// a row is poison: it is moved aside ([`StoreOp::Poison`]) so that it
    /// no longer blocks the messages behind it. 0: never.
    pub poison_after: u32,
}

/// How a link ended, as far as what was in flight is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEnd {
    /// The broker closed it or it broke while it was up: end of stream, a
    /// reset, a DISCONNECT, a packet that could not be read.
    Closed,
    /// The engine ended it (see [`End`]).
    Ended(End),
    /// This side ended it (a stop, a store failure), or it never came up:
    /// it says nothing about the messages in flight.
    Ours,
}

/// What the session learned of a broker's limit on messages in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowChange {
    /// The window before.
    pub from: u16,
    /// The window from now on.
    pub to: u16,
    /// Messages in flight when the broker ended the link.
    pub in_flight: usize,
    /// What the window never grows past from now on, if that is known.
    pub ceiling: Option<u16>,
}

/// A packet id's durable binding: `Some((pid, stage))`, or `None` to clear.
pub type WireUpdate = (u64, Option<(u16, Stage)>);

/// A store operation the session asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// These were acknowledged by the broker.
    Ack(Vec<u64>),
    /// These leave the outbox undelivered, for this reason.
    Drop(Vec<u64>, DropReason),
    /// One more send of each of these counts against its retry budget.
    Attempted(Vec<u64>),
    /// Write these QoS 2 bindings durably and report the outcome with
    /// [`PublishSession::handle_bound`] before anything else.
    Bind(Vec<WireUpdate>),
    /// Clear these QoS 2 bindings on this broker (no answer needed: a
    /// binding a crash keeps only means a resend at QoS 2 that is learned
    /// again).
    Unbind(Vec<u64>),
    /// Move this message aside as poison (kept, never sent until the user
    /// requeues it), for this cause. Its QoS 2 binding on this broker, if
    /// any, is void.
    Poison(u64, PoisonCause),
}

/// Why a message was moved aside as poison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonCause {
    /// The broker ended the link this many times in a row with it alone in
    /// flight.
    Closed(u32),
    /// It is at least as large as a message this broker, which states no
    /// maximum packet size, closed the link on before (a size the codec
    /// knows): moved aside unsent.
    Size,
    /// The broker refused it with this MQTT 5 reason code, one no retry
    /// changes ([`crate::reason::is_for_good`]).
    Refused(u8),
}

impl std::fmt::Display for PoisonCause {
    /// Why, as logs, errors and `steadfast poison` say it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            PoisonCause::Closed(n) => write!(f, "the broker ended the link {n} times in a row with it alone in flight"),
            PoisonCause::Size => {
                f.write_str("no smaller than a message this broker (which states no maximum packet size) closed the link on before (not sent)")
            }
            PoisonCause::Refused(code) => write!(f, "refused with reason code {}", reason::describe(code)),
        }
    }
}

impl PoisonCause {
    /// Failed links in a row with it alone in flight (0 unless `Closed`).
    pub fn failures(self) -> u32 {
        match self {
            PoisonCause::Closed(n) => n,
            PoisonCause::Size | PoisonCause::Refused(_) => 0,
        }
    }

    /// The reason code it was refused with, if that is why.
    pub fn code(self) -> Option<u8> {
        match self {
            PoisonCause::Refused(code) => Some(code),
            PoisonCause::Closed(_) | PoisonCause::Size => None,
        }
    }
}

/// The outcome of a [`StoreOp::Bind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// Written; these ids left the outbox meanwhile (delivered through
    /// other brokers) and are not sent here.
    Written {
        /// Ids that left the outbox meanwhile.
        gone: Vec<u64>,
    },
    /// Not written: the link must end (the driver knows the error).
    Failed,
}

/// What the CONNACK said, as far as delivery goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnAckInfo {
    /// The broker kept our session.
    pub session_present: bool,
    /// MQTT 5 receive maximum.
    pub receive_maximum: Option<u16>,
    /// MQTT 5 maximum QoS.
    pub maximum_qos: Option<u8>,
    /// This process asked for a clean start on this connection.
    pub asked_clean: bool,
    /// An earlier connection of this process reached the broker.
    pub reconnect: bool,
}

/// The result of a CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    /// Messages (or PUBRELs) sent again under their packet ids.
    pub resent: usize,
}

/// An acknowledgement from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// PUBACK.
    PubAck {
        /// Its packet id.
        pid: u16,
        /// Its reason code (0 for MQTT 3.1.1): from 0x80 on a refusal
        /// ([`crate::reason`]).
        code: u8,
    },
    /// PUBREC.
    PubRec {
        /// Its packet id.
        pid: u16,
        /// Its reason code, as a PUBACK's.
        code: u8,
    },
    /// PUBCOMP.
    PubComp {
        /// Its packet id.
        pid: u16,
    },
}

/// How QoS 2 became QoS 1 on this broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downgrade {
    /// Its CONNACK says it takes QoS 1 at most.
    MaximumQos,
    /// It answered a QoS 2 PUBLISH with PUBACK.
    PubAck,
    /// It ended the link each time a QoS 2 PUBLISH was alone in flight,
    /// and never answered one with PUBREC.
    ClosesLink,
}

/// What happened that the driver reports (logs, events, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent<M> {
    /// Acknowledged messages, this many.
    Acked(u64),
    /// QoS 2 goes to this broker at QoS 1 (said once per session object).
    Downgraded(Downgrade),
    /// The broker refused this message with this reason code, one a
    /// retry may change: it is sent again after a pause.
    Refused(M, u8),
    /// The broker lost the session it should have kept: every message not
    /// acknowledged is published again.
    SessionLost {
        /// Messages that were in flight.
        in_flight: u64,
    },
    /// Messages published again after a lost session (expected or not).
    Republished(u64),
    /// A message in the window had no contents (cannot happen): it is read
    /// from the outbox again.
    Missing(u64),
    /// The broker ended a link with many messages in flight (or with the
    /// same ones as before): the window shrank.
    Window(WindowChange),
    /// The failures that shrank the window were one message's (poison) or
    /// QoS 2's: the window is back to this.
    WindowRestored(u16),
    /// The ceiling learned from the closes held: every message in flight
    /// at the last of them went through since. It is a limit of the
    /// broker's, to remember for the next run. Not said while a chase
    /// goes on: a poison message narrows the window down to one and
    /// teaches a ceiling of one on its way, which a run that ended before
    /// the message was isolated remembered for good.
    CeilingHeld(u16),
    /// This message was moved aside as poison.
    Poisoned {
        /// The message.
        message: M,
        /// Why.
        cause: PoisonCause,
    },
    /// A QoS 2 message in flight can no longer be encoded for a kept
    /// session (the broker's maximum packet size shrank): its packet id
    /// stays reserved until the broker loses the session.
    Stranded {
        /// The message.
        id: u64,
        /// Why it cannot be sent.
        reason: DropReason,
    },
}

/// Why the link must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    /// An acknowledgement for a packet id with nothing of that kind in
    /// flight: a broker bug.
    Stray {
        /// The packet: "PUBACK", "PUBREC", "refusal".
        packet: &'static str,
        /// Its packet id.
        pid: u16,
        /// What was expected under it.
        kind: &'static str,
    },
    /// Nothing acknowledged for the ack timeout while messages were in flight.
    AckTimeout,
    /// Nothing received for the keep-alive interval.
    DeadLink,
}

/// What waits for a [`StoreOp::Bind`] to be written.
#[derive(Debug)]
enum Pending<M> {
    /// PUBLISHes held back until their QoS 2 bindings are on disk, and the
    /// QoS 0 messages handed out before them in the same pass.
    Send { qos0_before: Vec<M>, held: Vec<(M, Option<u16>, Vec<u8>)> },
    /// PUBRELs to send once their stage is on disk.
    Release(Vec<u16>),
    /// Bindings freed by refusals: nothing follows.
    Unbind,
    /// A lost session's new (empty) window, applied once the stale
    /// bindings are cleared.
    Restart { window: SendWindow, delivered: Vec<u64>, expected: bool },
}

/// How much one read of the outbox (a page) returns at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimit {
    /// Messages.
    pub count: usize,
    /// Bytes of what they hold ([`Queued::size`]: topic and payload): the
    /// page ends at the message that reaches them.
    pub bytes: u64,
}

impl ReadLimit {
    /// At most `count` messages, whatever their bytes.
    pub const fn messages(count: usize) -> Self {
        Self { count, bytes: u64::MAX }
    }

    /// Takes the messages of a page one by one, in id order, given each
    /// one's size: true while it belongs in the page (a `take_while`).
    /// The first one always does, whatever its size, unless the count is
    /// 0 (as SQL's `LIMIT 0`): a page with something to read is never
    /// empty for its bytes.
    pub fn cut(self) -> impl FnMut(u64) -> bool {
        let (mut n, mut held) = (0usize, 0u64);
        move |size| {
            let within = n < self.count && (n == 0 || held < self.bytes);
            n += 1;
            held = held.saturating_add(size);
            within
        }
    }
}

/// What a publish session wants read from the outbox next (see
/// [`PublishSession::read_want`]). A store that holds it can answer it
/// the moment a commit gives it something to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadWant {
    /// Per priority, the highest id read so far.
    pub after: [u64; PRIORITIES],
    /// Per priority, whether the queue has room for a page of it.
    pub room: [bool; PRIORITIES],
}

impl ReadWant {
    /// The priority to read now and the id to read after, given the
    /// newest id committed per priority: the highest with room and
    /// something unread.
    pub fn pick(&self, newest: &[u64; PRIORITIES]) -> Option<(usize, u64)> {
        (0..PRIORITIES).rev().find(|&p| self.room[p] && self.after[p] < newest[p]).map(|p| (p, self.after[p]))
    }
}

/// The publishing session of one broker link.
#[derive(Debug)]
pub struct PublishSession<M> {
    cfg: SessionConfig,
    window: SendWindow,
    /// Contents of what is in flight, for resends.
    inflight: HashMap<u64, M>,
    /// Read from the outbox, not yet on the wire.
    queue: SendQueue<M>,
    /// Highest outbox id read so far, per priority.
    cursors: [u64; PRIORITIES],
    /// Per priority, ids above its cursor that already left: a page read
    /// before they left must not queue them again.
    done_ahead: [BTreeSet<u64>; PRIORITIES],
    /// Refused messages and when they go back to the front of the queue.
    retry: VecDeque<(Instant, M)>,
    /// Some while connected.
    keepalive: Option<KeepAlive>,
    /// When the window last made progress: the ack timeout counts from it.
    progress_at: Instant,
    max_qos: Option<u8>,
    /// A PUBREC arrived on this connection (the broker does QoS 2).
    pubrec_seen: bool,
    /// A PUBREC ever arrived from this broker.
    pubrec_ever: bool,
    /// The broker ends the link on a QoS 2 PUBLISH (and never answered one
    /// with PUBREC): QoS 2 goes to it at QoS 1.
    closes_on_qos2: bool,
    /// The message that led to `closes_on_qos2`: if it fails at QoS 1 too,
    /// it was the message (poison), not QoS 2, and the conclusion is undone.
    qos2_witness: Option<u64>,
    warned_downgrade: bool,
    out: Vec<u8>,
    store: VecDeque<StoreOp>,
    /// What waits for each [`StoreOp::Bind`] handed out, in order.
    pending: VecDeque<Pending<M>>,
    events: VecDeque<SessionEvent<M>>,
    /// The adaptive window: at most this many in flight, whatever the
    /// broker announced (halved when the broker ends a link with the window
    /// well used, one more per window's worth of acknowledgements).
    cwnd: u16,
    /// What the broker's CONNACK allows (its receive maximum, or ours).
    conn_limit: u16,
    /// Acknowledgements towards the next growth of `cwnd`.
    grow_acks: u32,
    /// Messages in flight at the last failed links: (failed links in a row
    /// while in flight, of those alone in flight).
    suspects: HashMap<u64, (u32, u32)>,
    /// The largest message (topic and payload) this broker acknowledged.
    largest_acked: u64,
    /// The broker refused a message for good on this link and took
    /// nothing since: a close now is that refusal's (Mosquitto closes the
    /// link after its PUBACK 0x95), not a limit of the window.
    refused_last: bool,
    /// The window before failures began to narrow it down: when a message
    /// turns out to be poison (or QoS 2 the cause), the failures are
    /// explained and it comes back.
    chase_from: Option<(u16, Option<u16>)>,
    /// The window never grows past this: one less than what was in flight
    /// when the broker ended a link for it. Some brokers refuse the
    /// message past their limit while answering success (Mosquitto to an
    /// MQTT 3.1.1 client, docs/interop.md), so the limit is not probed
    /// again.
    ceiling: Option<u16>,
    /// The ceiling last said to have held ([`SessionEvent::CeilingHeld`]),
    /// or learned by an earlier run.
    ceiling_held: Option<u16>,
    /// Acknowledgements since the window started (a CONNACK) or last grew:
    /// a close within one window's worth of them is a limit's signature (the
    /// extra messages pushed it over); later, a restart's.
    acks_since_change: u32,
    /// QoS 2 PUBLISHes of a kept session that keep their packet ids but
    /// wait for room in the window to be sent again: (packet id, id).
    deferred: VecDeque<(u16, u64)>,
    /// The round-trip estimate of the link, which sets the ack timeout.
    rtt: RoundTrip,
    /// The one PUBLISH being timed for a round-trip sample: its packet id
    /// and when it went out (one at a time, as TCP did before timestamps:
    /// nothing per message; only a first send, never a resend).
    timed: Option<(u16, Instant)>,
    /// When the binds now pending began: the ack timer stands still while
    /// the disk is written (the wait is ours, not the broker's).
    bind_at: Option<Instant>,
}

impl<M: Queued> PublishSession<M> {
    /// A disconnected session with an empty window.
    pub fn new(cfg: SessionConfig, now: Instant) -> Self {
        Self {
            cfg,
            window: SendWindow::new(cfg.max_inflight),
            inflight: HashMap::new(),
            queue: SendQueue::new(),
            cursors: [0; PRIORITIES],
            done_ahead: Default::default(),
            retry: VecDeque::new(),
            keepalive: None,
            progress_at: now,
            max_qos: None,
            pubrec_seen: false,
            pubrec_ever: false,
            closes_on_qos2: false,
            qos2_witness: None,
            warned_downgrade: false,
            out: Vec::new(),
            store: VecDeque::new(),
            pending: VecDeque::new(),
            events: VecDeque::new(),
            cwnd: cfg.max_inflight.max(1),
            conn_limit: cfg.max_inflight.max(1),
            grow_acks: 0,
            suspects: HashMap::new(),
            largest_acked: 0,
            refused_last: false,
            deferred: VecDeque::new(),
            chase_from: None,
            ceiling: None,
            ceiling_held: None,
            acks_since_change: 0,
            rtt: RoundTrip::new(cfg.ack_timeout),
            timed: None,
            bind_at: None,
        }
    }

    /// Starts the adaptive window at `n` (what an earlier run learned of
    /// this broker, or a moderate start for an MQTT 3.1.1 broker, which
    /// cannot announce a limit); never above the configured maximum.
    pub fn start_window(&mut self, n: u16) {
        self.cwnd = n.clamp(1, self.cfg.max_inflight.max(1));
        self.grow_acks = 0;
        self.window.set_limit(self.cwnd.min(self.conn_limit));
    }

    /// A window learned from this broker by an earlier run: the start,
    /// and the ceiling the window never grows past.
    pub fn learned_window(&mut self, n: u16) {
        self.start_window(n);
        self.ceiling = Some(self.cwnd);
        self.ceiling_held = self.ceiling;
    }

    /// The adaptive window now.
    pub fn window_size(&self) -> u16 {
        self.cwnd
    }

    /// The ack timeout now (adaptive: from the round trips measured).
    pub fn ack_timeout(&self) -> Duration {
        self.rtt.timeout()
    }

    /// The round-trip estimate of the link: smoothed mean and mean
    /// deviation, once measured.
    pub fn round_trip(&self) -> Option<(Duration, Duration)> {
        self.rtt.estimate()
    }

    /// A round trip the driver measured itself (CONNECT to CONNACK): a
    /// sample before any message is acknowledged. It does not end the
    /// backoff of earlier ack timeouts: only an acknowledged message does.
    pub fn handle_round_trip(&mut self, rtt: Duration) {
        self.rtt.sample(rtt);
    }

    /// What the window never grows past, once learned.
    pub fn window_ceiling(&self) -> Option<u16> {
        self.ceiling
    }

    /// Puts back the QoS 2 exchanges a previous process had open (their
    /// bindings are kept in the outbox): they resume under the same ids.
    pub fn restore(&mut self, bound: impl IntoIterator<Item = (M, u16, Stage)>) {
        self.window = SendWindow::new(self.cfg.max_inflight);
        self.inflight.clear();
        for (m, pid, stage) in bound {
            self.window.restore(pid, Inflight { id: m.id(), qos: Qos::ExactlyOnce, stage });
            self.inflight.insert(m.id(), m);
        }
    }

    /// The largest message (topic and payload, [`Queued::size`]) the
    /// broker acknowledged to this session: a broker that took one this
    /// large has no smaller limit on size.
    pub fn largest_acked(&self) -> u64 {
        self.largest_acked
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.window.len()
    }

    /// True when the one PUBLISH on the wire is QoS 2 and the broker never
    /// answered any on this connection with PUBREC (a broker that closes
    /// the link on QoS 2 does this; with several in flight, a close says
    /// nothing of which one, or of QoS 2).
    pub fn awaits_first_pubrec(&self) -> bool {
        let deferred: HashSet<u64> = self.deferred.iter().map(|(_, id)| *id).collect();
        let mut on_wire =
            self.window.entries().filter(|(_, e)| e.stage == Stage::Published && !deferred.contains(&e.id));
        let only = match (on_wire.next(), on_wire.next()) {
            (Some((_, e)), None) => Some(e),
            _ => None,
        };
        !self.pubrec_seen && only.is_some_and(|e| e.qos == Qos::ExactlyOnce)
    }

    /// Bytes to write to the socket, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// [`Self::poll_transmit`] into the caller's buffer (appended): the
    /// two buffers keep their room, so a busy link allocates none per
    /// packet.
    pub fn transmit_into(&mut self, to: &mut Vec<u8>) {
        if to.is_empty() {
            std::mem::swap(to, &mut self.out);
        } else {
            to.append(&mut self.out);
        }
    }

    /// The next store operation to carry out, in order.
    pub fn poll_store(&mut self) -> Option<StoreOp> {
        self.store.pop_front()
    }

    /// The next event to report.
    pub fn poll_event(&mut self) -> Option<SessionEvent<M>> {
        self.events.pop_front()
    }

    /// Every timer of the session and when it fires (`None`: not set).
    pub fn timers(&self) -> [(Timer, Option<Instant>); 3] {
        // While a QoS 2 binding is being written the wait is ours (the
        // disk's), not the broker's: the ack timer does not run.
        let ack = (!self.window.is_empty() && self.keepalive.is_some() && self.pending.is_empty())
            .then(|| self.progress_at + self.rtt.timeout());
        [
            (Timer::KeepAlive, self.keepalive.as_ref().map(KeepAlive::poll_timeout)),
            (Timer::AckTimeout, ack),
            (Timer::Retry, self.retry.front().filter(|_| self.keepalive.is_some()).map(|(t, _)| *t)),
        ]
    }

    /// When the session next needs [`Self::handle_timeout`] (or, for the
    /// retry timer, [`Self::fill`]).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers().into_iter().filter_map(|(_, t)| t).min()
    }

    /// Acts on the timers that are due: a PINGREQ, or the end of the link.
    pub fn handle_timeout(&mut self, now: Now, wire: &mut impl Wire<M>) -> Result<(), End> {
        if self.keepalive.is_none() {
            // Disconnected: no link to end, nothing to ping.
            return Ok(());
        }
        let waiting = !self.window.is_empty() && self.pending.is_empty();
        if waiting && now.at.saturating_duration_since(self.progress_at) >= self.rtt.timeout() {
            self.rtt.expired();
            if crate::mutate::planted(crate::mutate::Bug::DropWindowOnAckTimeout) {
                self.store.push_back(StoreOp::Ack(self.window.ids().collect()));
            }
            return Err(End::AckTimeout);
        }
        match self.keepalive.as_mut().and_then(|k| k.poll(now.at)) {
            Some(KeepAliveAction::SendPing) => self.out.extend(wire.ping()),
            Some(KeepAliveAction::Dead) => return Err(End::DeadLink),
            None => {}
        }
        Ok(())
    }

    /// Bytes arrived from the broker (the keep-alive counts silence).
    pub fn handle_received(&mut self, now: Now) {
        if let Some(k) = self.keepalive.as_mut() {
            k.on_receive(now.at);
        }
    }

    /// The connection ended: nothing more is sent until the next CONNACK.
    /// The window and its contents are kept (a kept session resumes them).
    /// Binds not yet carried out are void: what waited for them is undone
    /// as if the write had failed (a later link decides afresh). The caller
    /// must have reported the outcome of every bind it took from
    /// [`Self::poll_store`]: the binds still queued are then exactly the
    /// ones waiting, in order.
    ///
    /// A link the broker ended with messages in flight teaches something
    /// ([`LinkEnd`]): with the window well used, or with a message that was
    /// in flight at the previous failure too, the window halves (a broker
    /// that caps messages in flight without saying so closes the link when
    /// the cap is passed; halving also finds a message the broker cannot
    /// take, until it is alone); a message alone in flight at
    /// [`SessionConfig::poison_after`] failures in a row is poison.
    pub fn handle_link_lost(&mut self, end: LinkEnd) {
        let up = self.keepalive.take();
        self.timed = None;
        self.bind_at = None;
        self.out.clear();
        let queued_binds = self.store.iter().filter(|op| matches!(op, StoreOp::Bind(_))).count();
        debug_assert_eq!(queued_binds, self.pending.len(), "a bind was taken without its outcome reported");
        for op in std::mem::take(&mut self.store) {
            match op {
                StoreOp::Bind(_) => {
                    if let Some(p) = self.pending.pop_front() {
                        self.undo(p);
                    }
                }
                op => self.store.push_back(op),
            }
        }
        // What waited for a bind never went out: only what did counts.
        if let Some(keepalive) = up {
            self.learn_from_end(end, &keepalive);
        }
    }

    fn learn_from_end(&mut self, end: LinkEnd, keepalive: &KeepAlive) {
        let blamed = match end {
            LinkEnd::Closed => !std::mem::take(&mut self.refused_last),
            // A broker that answers (pings) but not one message: that
            // message is the question. Silence is the network's.
            LinkEnd::Ended(End::AckTimeout) => keepalive.heard_at() > self.progress_at,
            LinkEnd::Ended(End::Stray { .. } | End::DeadLink) | LinkEnd::Ours => false,
        };
        // Deferred resends were not on the wire: they are not suspects.
        let deferred: HashSet<u64> = self.deferred.iter().map(|(_, id)| *id).collect();
        let published: Vec<u64> = self.window.published_ids().filter(|id| !deferred.contains(id)).collect();
        if !blamed || published.is_empty() {
            return;
        }
        let n = self.window.len().saturating_sub(self.deferred.len());
        // Alone among PUBLISHes: a PUBREL beside it cannot be the cause.
        let alone = published.len() == 1;
        let mut repeated = false;
        let mut suspects = HashMap::with_capacity(published.len());
        for &id in &published {
            let (ends, alone_ends) = self.suspects.get(&id).copied().unwrap_or((0, 0));
            repeated |= ends > 0;
            suspects.insert(id, (ends + 1, alone_ends + alone as u32));
        }
        self.suspects = suspects;
        let full = 2 * n > self.window.limit() as usize;
        if n > 1 && (repeated || full) {
            let from = self.cwnd;
            self.chase_from.get_or_insert((from, self.ceiling));
            self.cwnd = (n.min(from as usize) / 2).max(1) as u16;
            // A ceiling only from a full window that just started or grew:
            // the broker closed on the extra messages (a limit). A close
            // later, or of the same messages again (a restart, a reset, a
            // poison message being narrowed down), only halves.
            if full && self.acks_since_change < from as u32 {
                // What the broker counts are PUBLISHes it has not seen a
                // PUBREL for: at most the ones on the wire, not the PUBRELs.
                let below = (published.len().min(u16::MAX as usize) as u16).saturating_sub(1).max(1);
                self.ceiling = Some(self.ceiling.map_or(below, |c| c.min(below)));
            }
            let ceiling = self.ceiling;
            self.grow_acks = 0;
            if self.cwnd < from {
                let change = WindowChange { from, to: self.cwnd, in_flight: n, ceiling };
                self.events.push_back(SessionEvent::Window(change));
            }
        }
        if alone && self.cfg.poison_after > 0 {
            self.isolate_poison(published[0]);
        }
    }

    /// The message alone in flight, if it failed its links often enough in
    /// a row, leaves the window and is moved aside.
    fn isolate_poison(&mut self, id: u64) {
        let Some((pid, e)) = self.window.entries().find(|(_, e)| e.id == id) else { return };
        let Some(&(_, alone_ends)) = self.suspects.get(&e.id) else { return };
        if alone_ends < self.cfg.poison_after {
            return;
        }
        if e.qos == Qos::ExactlyOnce && !self.pubrec_ever && !self.closes_on_qos2 {
            self.qos2_witness = Some(e.id);
            self.qos2_closes_the_link();
            return;
        }
        if self.qos2_witness == Some(e.id) {
            // It failed at QoS 1 as well: it is poison, and QoS 2 was never
            // the question.
            self.closes_on_qos2 = false;
            self.qos2_witness = None;
        }
        self.window.release(pid);
        self.suspects.remove(&e.id);
        self.explained();
        let Some(m) = self.inflight.remove(&e.id) else { return };
        self.gone_ahead(&m);
        // Its own policy comes first: a message whose retry budget is spent
        // leaves as `budget` (a deadline is the outbox's sweep's, poison or
        // not).
        if m.max_attempts().is_some_and(|max| m.attempts() >= max) {
            self.store.push_back(StoreOp::Drop(vec![e.id], DropReason::Budget));
            return;
        }
        let cause = PoisonCause::Closed(alone_ends);
        self.store.push_back(StoreOp::Poison(e.id, cause));
        self.events.push_back(SessionEvent::Poisoned { message: m, cause });
    }

    /// `m` left this session for good (acknowledged, moved aside): a page
    /// read before it left does not queue it again.
    fn gone_ahead(&mut self, m: &M) {
        let p = m.priority();
        if m.id() > self.cursors[p] {
            self.done_ahead[p].insert(m.id());
        }
    }

    /// The broker cannot take QoS 2 and cannot say so: it ends the link on
    /// a QoS 2 PUBLISH. Every QoS 2 PUBLISH in flight leaves the window
    /// (their bindings cleared: the broker holds none of them) to be read
    /// again and sent at QoS 1, as to a broker whose CONNACK says QoS 1 at
    /// most; a consumer's inbox removes the copies QoS 1 allows.
    fn qos2_closes_the_link(&mut self) {
        self.closes_on_qos2 = true;
        self.downgraded(Downgrade::ClosesLink);
        self.explained();
        let published: Vec<(u16, u64)> = self
            .window
            .entries()
            .filter(|(_, e)| e.qos == Qos::ExactlyOnce && e.stage == Stage::Published)
            .map(|(pid, e)| (pid, e.id))
            .collect();
        let mut unbind = Vec::with_capacity(published.len());
        for (pid, id) in published {
            self.window.release(pid);
            self.inflight.remove(&id);
            self.suspects.remove(&id);
            unbind.push(id);
        }
        self.deferred.clear();
        self.store.push_back(StoreOp::Unbind(unbind));
    }

    /// `id` leaves this session without an acknowledgement (spent, too
    /// large, taken over by another broker). Were it a suspect of the
    /// closes that narrowed the window, the chase can no longer tell a
    /// limit from a poison message (one with a retry budget or a deadline
    /// leaves that way before it is isolated): the window and its ceiling
    /// go back, and nothing the chase taught is remembered.
    pub(super) fn left_unacked(&mut self, id: u64) {
        if self.suspects.remove(&id).is_some() {
            self.explained();
        }
    }

    /// The failures that narrowed the window down are explained (a poison
    /// message, or QoS 2): the window goes back to where it was.
    fn explained(&mut self) {
        if let Some((w, ceiling)) = self.chase_from.take().filter(|(w, _)| *w > self.cwnd) {
            self.cwnd = w;
            self.ceiling = ceiling;
            // The driver writes the restored ceiling down as it is.
            self.ceiling_held = ceiling;
            self.grow_acks = 0;
            self.window.set_limit(self.cwnd.min(self.conn_limit));
            self.events.push_back(SessionEvent::WindowRestored(w));
        }
    }

    /// Forgets what was read but not sent, to read it again from the oldest
    /// message (in-flight messages stay in flight; refused ones keep their
    /// pause). Owners may have changed: the caller's `claims` answers anew.
    pub fn rewind(&mut self) {
        self.queue.clear();
        self.done_ahead.iter_mut().for_each(BTreeSet::clear);
        self.cursors = [0; PRIORITIES];
    }

    /// What this session wants read next, whatever is committed: per
    /// priority, the id to read after and whether the queue has room for
    /// it (the lowest waits for the queue to run below half a page, in
    /// messages and in bytes; higher ones only for a hard cap of two
    /// pages). `None` while nothing may be read.
    pub fn read_want(&self) -> Option<ReadWant> {
        if !self.pending.is_empty() {
            return None;
        }
        let (n, bytes) = (self.queue.len(), self.queue.bytes() as u64);
        let ReadLimit { count, bytes: page_bytes } = self.cfg.page;
        // An empty queue has room, however small a page.
        let room = std::array::from_fn(|p| {
            n == 0
                || match p {
                    0 => n < count / 2 && bytes < page_bytes / 2,
                    _ => n < count.saturating_mul(2) && bytes < page_bytes.saturating_mul(2),
                }
        });
        let want = ReadWant { after: self.cursors, room };
        want.room.iter().any(|r| *r).then_some(want)
    }

    /// The priority to read next and the id to read after: the highest
    /// priority with unread messages (`newest` per priority) that
    /// [`Self::read_want`] has room for.
    pub fn next_read(&self, newest: &[u64; PRIORITIES]) -> Option<(usize, u64)> {
        self.read_want()?.pick(newest)
    }

    /// A page of priority `p` read from the outbox: the messages that are
    /// this broker's go into the queue, ahead of any of a lower priority.
    /// `upto` is the last id of that priority committed before the read:
    /// an empty page means nothing is left up to there.
    pub fn handle_page(&mut self, page: Vec<M>, p: usize, upto: u64, claims: &dyn Fn(&M) -> bool) {
        let last = page.last().map(Queued::id);
        // A refused message may be back in the queue already (its pause
        // ended after a rewind): it must not be queued twice.
        let queued: HashSet<u64> = self.queue.iter().map(Queued::id).collect();
        let fresh: Vec<M> = page
            .into_iter()
            .filter(|m| {
                let id = m.id();
                let waiting = self.retry.iter().any(|(_, r)| r.id() == id);
                let gone = self.done_ahead[p].contains(&id) || queued.contains(&id);
                !self.inflight.contains_key(&id) && !gone && !waiting && claims(m)
            })
            .collect();
        self.queue.insert_page(p, fresh);
        self.cursors[p] = self.cursors[p].max(last.unwrap_or(upto));
        if crate::mutate::planted(crate::mutate::Bug::PageSkipsAhead) && last.is_some() {
            self.cursors[p] = self.cursors[p].max(upto);
        }
        self.done_ahead[p] = self.done_ahead[p].split_off(&(self.cursors[p] + 1));
    }

    /// Why `m` must leave instead of being sent (again): its deadline
    /// passed, or its retry budget is spent.
    fn spent(m: &M, wall_ms: u64) -> Option<DropReason> {
        if m.expires_ms().is_some_and(|e| super::deadline_passed(e, wall_ms)) {
            return Some(DropReason::Expired);
        }
        if m.max_attempts().is_some_and(|max| m.attempts() >= max) {
            return Some(DropReason::Budget);
        }
        None
    }

    fn downgraded(&mut self, how: Downgrade) {
        if !self.warned_downgrade {
            self.warned_downgrade = true;
            self.events.push_back(SessionEvent::Downgraded(how));
        }
    }
}

mod connack;
mod flow;
mod input;
mod queue;
#[cfg(test)]
mod tests;
