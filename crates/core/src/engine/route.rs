//! Which broker takes which message: the routing modes over a client's
//! broker links, as a state machine.
//!
//! Every link reads the outbox on its own and keeps a message only when
//! [`Routes::claims`] says it is its own. The routes follow each link's
//! health and decide: in failover the active broker of each set, in
//! balance the broker each topic is pinned to; fanout needs no decision.
//! When an assignment changes in a way that moves messages between brokers
//! (a broker failed, traffic goes back to the primary, a pin moved), the
//! decision says so (`bump`), and every link reads the outbox again from
//! the oldest message, so nothing the old owner had not delivered is left
//! behind.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most topic pins kept; beyond, the map starts afresh (a topic re-pinned
/// to another healthy broker can overtake its own in-flight messages,
/// which is why the bound is generous).
const MAX_PINS: usize = 100_000;

/// How a set of brokers shares its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// To the first healthy broker in priority order.
    Failover,
    /// To every broker.
    Fanout,
    /// Each topic to one healthy broker.
    Balance,
}

/// A named set of brokers (`None`: the client's default set).
#[derive(Debug, Clone)]
pub struct SetSpec {
    /// The route's name.
    pub name: Option<String>,
    /// Broker indices, in priority order.
    pub members: Vec<usize>,
    /// How the set shares its messages.
    pub routing: Routing,
    /// Failover: how long a higher broker must be up before it gets the
    /// traffic back.
    pub failback_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Health {
    up: bool,
    /// When `up` last changed.
    since: Instant,
    /// The first connection attempt has ended (either way).
    tried: bool,
    inflight: usize,
    limit: usize,
}

/// Set `set` moved from broker `from` to `to`: back to a higher-priority
/// broker (a fail-back) or away from a failed one (a failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// The set.
    pub set: usize,
    /// The broker it left.
    pub from: usize,
    /// The broker it went to (`None`: none was up).
    pub to: Option<usize>,
    /// A fail-back (else a failover).
    pub back: bool,
}

/// What one pass of the failover rules found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decision {
    /// When the rules must be checked again at the latest
    /// ([`super::Timer::FailBack`]: a fail-back or a drain coming due, the
    /// start-up grace ending).
    pub next: Option<Instant>,
    /// Messages changed owner: every link reads the outbox again.
    pub bump: bool,
    /// Failovers and fail-backs to report.
    pub switches: Vec<Switch>,
    /// Sets that chose their first broker: (set, broker).
    pub chosen: Vec<(usize, usize)>,
}

impl Decision {
    /// The rules must be checked again at `due` at the latest.
    fn wake_at(&mut self, due: Instant) {
        self.next = Some(self.next.map_or(due, |n| n.min(due)));
    }
}

/// The routes of one client.
#[derive(Debug)]
pub struct Routes {
    sets: Vec<SetSpec>,
    links: Vec<Health>,
    /// Failover: the broker each set sends to now.
    active: Vec<Option<usize>>,
    /// Failover: the broker each set is moving to once the active one has
    /// no message in flight any more, and since when.
    moving_to: Vec<Option<(usize, Instant)>>,
    /// Balance: (set, topic) -> broker.
    pins: HashMap<(usize, String), usize>,
    next: Vec<usize>,
    started: Instant,
    /// How long the routes wait, at start, for higher-priority brokers'
    /// first attempt before they settle for a lower one.
    grace: Duration,
    /// The longest a fail-back waits for the old broker's in-flight window
    /// to empty (it may carry other routes' traffic too).
    drain_limit: Duration,
    /// Pins were dropped while answering `claims`: links read again.
    pending_bump: bool,
    /// When the last decision asked to be made again.
    decide_at: Option<Instant>,
}

impl Routes {
    /// Routes over `brokers` links for `sets`, starting at `now`.
    pub fn new(sets: Vec<SetSpec>, brokers: usize, now: Instant, grace: Duration, drain_limit: Duration) -> Self {
        let health = Health { up: false, since: now, tried: false, inflight: 0, limit: 1 };
        let n = sets.len();
        // A failover set of one broker always sends to it: its messages wait
        // for it, whatever its state.
        let active = sets.iter().map(|s| (s.members.len() == 1).then(|| s.members[0])).collect();
        Self {
            sets,
            links: vec![health; brokers],
            active,
            moving_to: vec![None; n],
            pins: HashMap::new(),
            next: vec![0; n],
            started: now,
            grace,
            drain_limit,
            pending_bump: false,
            decide_at: None,
        }
    }

    /// The set of a route (`None`: the default set).
    pub fn set_of(&self, route: Option<&str>) -> Option<usize> {
        self.sets.iter().position(|s| s.name.as_deref() == route)
    }

    /// Whether the message of `route` and `topic` is `broker`'s to send.
    /// Balance may pin the topic now.
    pub fn claims(&mut self, broker: usize, route: Option<&str>, topic: &str) -> bool {
        let Some(s) = self.set_of(route) else { return false };
        let set = &self.sets[s];
        if !set.members.contains(&broker) {
            return false;
        }
        match set.routing {
            Routing::Fanout => true,
            Routing::Failover => self.active[s] == Some(broker) && self.moving_to[s].is_none(),
            Routing::Balance => self.balance_owner(s, topic) == Some(broker),
        }
    }

    /// True once after `claims` dropped every pin (links must read again).
    pub fn take_bump(&mut self) -> bool {
        std::mem::take(&mut self.pending_bump)
    }

    /// The broker a topic is pinned to, pinning it to the least loaded
    /// healthy member (in turn) when it has none or its broker failed.
    fn balance_owner(&mut self, s: usize, topic: &str) -> Option<usize> {
        let key = (s, topic.to_owned());
        if let Some(&b) = self.pins.get(&key) {
            if self.links[b].up {
                return Some(b);
            }
        }
        let up: Vec<usize> = self.sets[s].members.iter().copied().filter(|m| self.links[*m].up).collect();
        if up.is_empty() {
            return None;
        }
        // Round-robin, skipping brokers whose unacknowledged backlog is
        // growing (over half their window) while another has room.
        let start = self.next[s];
        let busy = |m: usize| self.links[m].inflight * 2 > self.links[m].limit;
        let order = (0..up.len()).map(|i| up[(start + i) % up.len()]);
        let chosen = order.clone().find(|m| !busy(*m)).unwrap_or(up[start % up.len()]);
        self.next[s] = start.wrapping_add(1);
        if self.pins.len() >= MAX_PINS {
            // Links skipped messages by the old pins: they read again.
            self.pins.clear();
            self.pending_bump = true;
        }
        self.pins.insert(key, chosen);
        Some(chosen)
    }

    /// Whether `broker` takes new messages now, in any of its sets.
    pub fn is_active(&self, broker: usize) -> bool {
        self.sets.iter().enumerate().any(|(s, set)| {
            set.members.contains(&broker)
                && match set.routing {
                    Routing::Failover => self.active[s] == Some(broker) && self.moving_to[s].is_none(),
                    Routing::Fanout | Routing::Balance => self.links[broker].up,
                }
        })
    }

    /// A session with `broker` is up; `limit` is its send window.
    pub fn link_up(&mut self, broker: usize, limit: usize, now: Instant) -> Decision {
        let h = &mut self.links[broker];
        h.up = true;
        h.tried = true;
        h.since = now;
        h.limit = limit.max(1);
        h.inflight = 0;
        self.decide(now)
    }

    /// The session with `broker` ended, or an attempt failed.
    pub fn link_down(&mut self, broker: usize, now: Instant) -> Decision {
        let h = &mut self.links[broker];
        let was_up = h.up;
        h.up = false;
        h.tried = true;
        if was_up {
            h.since = now;
            self.pins.retain(|_, b| *b != broker);
        }
        let moves = was_up && self.moves_messages(broker);
        let mut d = self.decide(now);
        d.bump |= moves;
        d
    }

    /// Messages in flight on `broker` now; true when a fail-back waits for
    /// that (the rules should be checked again).
    pub fn progress(&mut self, broker: usize, inflight: usize) -> bool {
        self.links[broker].inflight = inflight;
        inflight == 0 && self.moving_to.iter().any(Option::is_some)
    }

    /// True when `broker` is in a set whose messages go to one broker.
    fn moves_messages(&self, broker: usize) -> bool {
        self.sets.iter().any(|s| s.routing != Routing::Fanout && s.members.contains(&broker))
    }

    /// The routes' timer: when the failover rules must be applied again.
    pub fn timers(&self) -> [(super::Timer, Option<Instant>); 1] {
        [(super::Timer::FailBack, self.decide_at)]
    }

    /// Applies the failover rules at `now`.
    pub fn decide(&mut self, now: Instant) -> Decision {
        let d = self.decide_sets(now);
        self.decide_at = d.next;
        d
    }

    fn decide_sets(&mut self, now: Instant) -> Decision {
        let mut d = Decision::default();
        let in_grace = now < self.started + self.grace;
        if in_grace {
            d.wake_at(self.started + self.grace);
        }
        for s in 0..self.sets.len() {
            let set = &self.sets[s];
            if set.routing != Routing::Failover || set.members.len() == 1 {
                continue;
            }
            let first_up = set.members.iter().copied().find(|m| self.links[*m].up);
            match self.active[s] {
                None => self.choose_first(s, first_up, in_grace, &mut d),
                Some(c) if !self.links[c].up => self.replace_failed(s, c, first_up, &mut d),
                Some(c) => self.fail_back(s, c, now, &mut d),
            }
        }
        d
    }

    /// A set with no active broker yet: the first member up becomes active,
    /// unless a member above it has not tried yet and the grace still runs
    /// (the primary should not lose its traffic for being a millisecond
    /// slower).
    fn choose_first(&mut self, s: usize, first_up: Option<usize>, in_grace: bool, d: &mut Decision) {
        let Some(f) = first_up else { return };
        let above_untried = self.sets[s].members.iter().take_while(|m| **m != f).any(|m| !self.links[*m].tried);
        if above_untried && in_grace {
            return;
        }
        self.active[s] = Some(f);
        d.bump = true;
        d.chosen.push((s, f));
    }

    /// The active broker `c` is down: the first member up takes over (a
    /// failover), or, with none up, the set stays with `c` (its messages
    /// wait in the outbox for whichever comes back first).
    fn replace_failed(&mut self, s: usize, c: usize, first_up: Option<usize>, d: &mut Decision) {
        self.moving_to[s] = None;
        if first_up.is_none() {
            return;
        }
        self.active[s] = first_up;
        d.bump = true;
        d.switches.push(Switch { set: s, from: c, to: first_up, back: false });
    }

    /// The active broker `c` is up: whether a member above it takes the
    /// traffic back now (once `c` has nothing in flight, so the switch
    /// reorders nothing), starts waiting for `c` to drain, or keeps waiting.
    fn fail_back(&mut self, s: usize, c: usize, now: Instant, d: &mut Decision) {
        let back = self.failback_target(s, c, now, d);
        let inflight = self.links[c].inflight;
        let drained = |since: Instant| inflight == 0 || now >= since + self.drain_limit;
        match (back, self.moving_to[s]) {
            (Some(p), Some((q, since))) if p == q && drained(since) => self.switch_back(s, c, p, d),
            (Some(p), Some((q, since))) if p == q => d.wake_at(since + self.drain_limit),
            (Some(p), _) if inflight == 0 => self.switch_back(s, c, p, d),
            (Some(p), _) => {
                // Stop feeding the old one; it finishes what it has (for at
                // most the drain limit).
                self.moving_to[s] = Some((p, now));
                d.bump = true;
                d.wake_at(now + self.drain_limit);
            }
            (None, _) => {
                if self.moving_to[s].take().is_some() {
                    d.bump = true;
                }
            }
        }
    }

    /// The first member above the active `c` that is up and has been for
    /// the set's fail-back delay; a member still short of it sets the next
    /// check.
    fn failback_target(&self, s: usize, c: usize, now: Instant, d: &mut Decision) -> Option<usize> {
        let set = &self.sets[s];
        set.members.iter().copied().take_while(|m| *m != c).find(|m| {
            let h = self.links[*m];
            if !h.up {
                return false;
            }
            let due = h.since + set.failback_after;
            if due > now {
                d.wake_at(due);
                return false;
            }
            true
        })
    }

    /// Set `s` sends to `p` again (a fail-back from `c`).
    fn switch_back(&mut self, s: usize, c: usize, p: usize, d: &mut Decision) {
        self.moving_to[s] = None;
        self.active[s] = Some(p);
        d.bump = true;
        d.switches.push(Switch { set: s, from: c, to: Some(p), back: true });
    }
}

/// Whether a message acknowledged by the brokers in `acks` (bit `1 <<
/// slot`) has its quorum: `need` of the brokers in `mask`. A fanout with
/// `ack = all` needs every member; failover and balance need one.
pub fn quorum_met(acks: u64, mask: u64, need: u32) -> bool {
    let need = if crate::mutate::planted(crate::mutate::Bug::FanoutOneAckForAll) { 1 } else { need.max(1) };
    (acks & mask).count_ones() >= need
}
