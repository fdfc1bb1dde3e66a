//! Which broker takes which message: the routing modes over the drivers.
//!
//! Every driver reads the outbox on its own and keeps a message only when
//! [`Router::claims`] says it is its own. The router follows each link's
//! health and decides: in failover the active broker of each set, in
//! balance the broker each topic is pinned to; fanout needs no decision.
//! When an assignment changes in a way that moves messages between brokers
//! (a broker failed, traffic goes back to the primary, a pin moved), the
//! router bumps its generation and every driver reads the outbox again from
//! the oldest message, so nothing the old owner had not delivered is left
//! behind.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};
use tokio::time::{sleep_until, Instant};

use crate::config::{ClientConfig, Mode};
use crate::Event;

/// Most topic pins kept per client; beyond, the map starts afresh (a topic
/// re-pinned to another healthy broker can overtake its own in-flight
/// messages, which is why the bound is generous).
const MAX_PINS: usize = 100_000;

struct Set {
    name: Option<String>,
    /// Driver indices, in priority order.
    members: Vec<usize>,
    mode: Mode,
    failback_after: Duration,
}

#[derive(Clone, Copy)]
struct Health {
    up: bool,
    /// When `up` last changed.
    since: Instant,
    /// The first connection attempt has ended (either way).
    tried: bool,
    inflight: usize,
    limit: usize,
}

struct State {
    links: Vec<Health>,
    /// Failover: the broker each set sends to now.
    active: Vec<Option<usize>>,
    /// Failover: the broker each set is moving to once the active one has
    /// no message in flight any more, and since when.
    moving_to: Vec<Option<(usize, Instant)>>,
    /// Balance: (set, topic) -> broker.
    pins: HashMap<(usize, String), usize>,
    next: Vec<usize>,
}

/// What one pass of the failover rules found: when to check again,
/// whether messages changed owner (drivers read the outbox again), and the
/// switches to report.
#[derive(Default)]
struct Pass {
    next: Option<Instant>,
    bump: bool,
    switches: Vec<Switch>,
}

impl Pass {
    /// The rules must be checked again at `due` at the latest.
    fn wake_at(&mut self, due: Instant) {
        self.next = Some(self.next.map_or(due, |n| n.min(due)));
    }
}

/// Set `set` moved from broker `from` to `to`: back to a higher-priority
/// broker (a fail-back) or away from a failed one (a failover).
struct Switch {
    set: usize,
    from: usize,
    to: Option<usize>,
    back: bool,
}

pub(crate) struct Router {
    sets: Vec<Set>,
    urls: Vec<String>,
    state: Mutex<State>,
    generation: watch::Sender<u64>,
    wake: Notify,
    events: broadcast::Sender<Event>,
    started: Instant,
    /// How long the router waits, at start, for higher-priority brokers'
    /// first attempt before it settles for a lower one.
    grace: Duration,
    /// The longest a fail-back waits for the old broker's in-flight window
    /// to empty (it may carry other routes' traffic too): the ack timeout.
    drain_limit: Duration,
}

impl Router {
    pub fn new(cfg: &ClientConfig, events: broadcast::Sender<Event>) -> Self {
        let all = cfg.all_brokers();
        let index = |u| all.iter().position(|b| b == u).expect("every member is in all_brokers");
        let sets: Vec<Set> = cfg
            .sets()
            .map(|(name, s)| Set {
                name: name.map(str::to_owned),
                members: s.brokers().iter().map(index).collect(),
                mode: s.routing(),
                failback_after: s.failback_after,
            })
            .collect();
        let now = Instant::now();
        let health = Health { up: false, since: now, tried: false, inflight: 0, limit: 1 };
        let n = sets.len();
        // A failover set of one broker always sends to it: its messages wait
        // for it, whatever its state.
        let active = sets.iter().map(|s| (s.members.len() == 1).then(|| s.members[0])).collect();
        let state = State {
            links: vec![health; all.len()],
            active,
            moving_to: vec![None; n],
            pins: HashMap::new(),
            next: vec![0; n],
        };
        Self {
            sets,
            urls: all.iter().map(|u| u.to_string()).collect(),
            state: Mutex::new(state),
            generation: watch::channel(0).0,
            wake: Notify::new(),
            events,
            started: now,
            grace: cfg.connect_timeout.min(Duration::from_secs(3)),
            drain_limit: cfg.ack_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumped whenever messages may have changed owner: drivers read the
    /// outbox again from the start.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn set_of(&self, route: Option<&str>) -> Option<usize> {
        self.sets.iter().position(|s| s.name.as_deref() == route)
    }

    /// True when a route of this name exists (`None`: the default set).
    pub fn knows(&self, route: Option<&str>) -> bool {
        self.set_of(route).is_some()
    }

    /// Whether the message of `route` and `topic` is `broker`'s to send.
    pub fn claims(&self, broker: usize, route: Option<&str>, topic: &str) -> bool {
        let Some(s) = self.set_of(route) else { return false };
        let set = &self.sets[s];
        if !set.members.contains(&broker) {
            return false;
        }
        match set.mode {
            Mode::Fanout => true,
            Mode::Failover => {
                let st = self.lock();
                st.active[s] == Some(broker) && st.moving_to[s].is_none()
            }
            Mode::Balance => self.balance_owner(s, topic) == Some(broker),
        }
    }

    /// The broker a topic is pinned to, pinning it to the least loaded
    /// healthy member (in turn) when it has none or its broker failed.
    fn balance_owner(&self, s: usize, topic: &str) -> Option<usize> {
        let mut st = self.lock();
        let key = (s, topic.to_owned());
        if let Some(&b) = st.pins.get(&key) {
            if st.links[b].up {
                return Some(b);
            }
        }
        let members = &self.sets[s].members;
        let up: Vec<usize> = members.iter().copied().filter(|m| st.links[*m].up).collect();
        if up.is_empty() {
            return None;
        }
        // Round-robin, skipping brokers whose unacknowledged backlog is
        // growing (over half their window) while another has room.
        let start = st.next[s];
        let busy = |m: usize| st.links[m].inflight * 2 > st.links[m].limit;
        let order = (0..up.len()).map(|i| up[(start + i) % up.len()]);
        let chosen = order.clone().find(|m| !busy(*m)).unwrap_or(up[start % up.len()]);
        st.next[s] = start.wrapping_add(1);
        if st.pins.len() >= MAX_PINS {
            // Drivers skipped messages by the old pins: they read again.
            st.pins.clear();
            self.bump();
        }
        st.pins.insert(key, chosen);
        Some(chosen)
    }

    /// Whether `broker` takes new messages now, in any of its sets.
    pub fn is_active(&self, broker: usize) -> bool {
        let st = self.lock();
        self.sets.iter().enumerate().any(|(s, set)| {
            set.members.contains(&broker)
                && match set.mode {
                    Mode::Failover => st.active[s] == Some(broker) && st.moving_to[s].is_none(),
                    Mode::Fanout | Mode::Balance => st.links[broker].up,
                }
        })
    }

    /// A session with `broker` is up; `limit` is its send window.
    pub fn link_up(&self, broker: usize, limit: usize) {
        let mut st = self.lock();
        let h = &mut st.links[broker];
        h.up = true;
        h.tried = true;
        h.since = Instant::now();
        h.limit = limit.max(1);
        h.inflight = 0;
        drop(st);
        self.decide();
    }

    /// The session with `broker` ended, or an attempt failed.
    pub fn link_down(&self, broker: usize) {
        let mut st = self.lock();
        let h = &mut st.links[broker];
        let was_up = h.up;
        h.up = false;
        h.tried = true;
        if was_up {
            h.since = Instant::now();
            st.pins.retain(|_, b| *b != broker);
        }
        drop(st);
        if was_up && self.moves_messages(broker) {
            self.bump();
        }
        self.decide();
    }

    /// Messages in flight on `broker` now.
    pub fn progress(&self, broker: usize, inflight: usize) {
        let mut st = self.lock();
        st.links[broker].inflight = inflight;
        let waiting = inflight == 0 && st.moving_to.iter().any(Option::is_some);
        drop(st);
        if waiting {
            self.wake.notify_one();
        }
    }

    /// True when `broker` is in a set whose messages go to one broker.
    fn moves_messages(&self, broker: usize) -> bool {
        self.sets.iter().any(|s| s.mode != Mode::Fanout && s.members.contains(&broker))
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Re-decides every failover set now; the router task does it again at
    /// the next deadline.
    fn decide(&self) {
        let _ = self.decide_at();
        self.wake.notify_one();
    }

    /// Applies the failover rules; returns when they must be checked again
    /// (a fail-back coming due, the start-up grace ending).
    fn decide_at(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut st = self.lock();
        let mut pass = Pass::default();
        let in_grace = now < self.started + self.grace;
        if in_grace {
            pass.wake_at(self.started + self.grace);
        }
        for (s, set) in self.sets.iter().enumerate() {
            if set.mode != Mode::Failover || set.members.len() == 1 {
                continue;
            }
            let first_up = set.members.iter().copied().find(|m| st.links[*m].up);
            match st.active[s] {
                None => self.choose_first(&mut st, s, first_up, in_grace, &mut pass),
                Some(c) if !st.links[c].up => Self::replace_failed(&mut st, s, c, first_up, &mut pass),
                Some(c) => self.fail_back(&mut st, s, c, now, &mut pass),
            }
        }
        drop(st);
        self.announce(pass.switches);
        if pass.bump {
            self.bump();
        }
        pass.next
    }

    /// A set with no active broker yet: the first member up becomes active,
    /// unless a member above it has not tried yet and the grace still runs.
    fn choose_first(&self, st: &mut State, s: usize, first_up: Option<usize>, in_grace: bool, pass: &mut Pass) {
        let set = &self.sets[s];
        // At start, wait (briefly) for the brokers above the
        // first one that answered: the primary should not lose
        // its traffic for being a millisecond slower.
        let Some(f) = first_up else { return };
        let above_untried = set.members.iter().take_while(|m| **m != f).any(|m| !st.links[*m].tried);
        if above_untried && in_grace {
            return;
        }
        st.active[s] = Some(f);
        pass.bump = true;
        tracing::info!(route = set.name.as_deref().unwrap_or("default"), broker = %self.urls[f], "failover: sending to this broker");
    }

    /// The active broker `c` is down: the first member up takes over (a
    /// failover), or, with none up, the set stays with `c`.
    fn replace_failed(st: &mut State, s: usize, c: usize, first_up: Option<usize>, pass: &mut Pass) {
        st.moving_to[s] = None;
        // With no broker up, messages wait in the outbox for
        // whichever comes back first.
        if first_up.is_none() {
            return;
        }
        st.active[s] = first_up;
        pass.bump = true;
        pass.switches.push(Switch { set: s, from: c, to: first_up, back: false });
    }

    /// The active broker `c` is up: whether a member above it takes the
    /// traffic back now, starts waiting for `c` to drain, or keeps waiting.
    fn fail_back(&self, st: &mut State, s: usize, c: usize, now: Instant, pass: &mut Pass) {
        // A broker above the active one that stayed up long
        // enough gets the traffic back, once the active one has
        // nothing in flight (so the switch reorders nothing).
        let back = self.failback_target(st, s, c, now, pass);
        let drained = |since: Instant| st.links[c].inflight == 0 || now >= since + self.drain_limit;
        match (back, st.moving_to[s]) {
            (Some(p), Some((q, since))) if p == q && drained(since) => Self::switch_back(st, s, c, p, pass),
            (Some(p), Some((q, since))) if p == q => pass.wake_at(since + self.drain_limit),
            (Some(p), _) if st.links[c].inflight == 0 => Self::switch_back(st, s, c, p, pass),
            (Some(p), _) => {
                // Stop feeding the old one; it finishes what it
                // has (for at most the drain limit).
                st.moving_to[s] = Some((p, now));
                pass.bump = true;
                pass.wake_at(now + self.drain_limit);
            }
            (None, _) => {
                if st.moving_to[s].take().is_some() {
                    pass.bump = true;
                }
            }
        }
    }

    /// The first member above the active `c` that is up and has been for
    /// the set's fail-back delay; a member still short of it sets the next
    /// check.
    fn failback_target(&self, st: &State, s: usize, c: usize, now: Instant, pass: &mut Pass) -> Option<usize> {
        let set = &self.sets[s];
        set.members.iter().copied().take_while(|m| *m != c).find(|m| {
            let h = st.links[*m];
            if !h.up {
                return false;
            }
            let due = h.since + set.failback_after;
            if due > now {
                pass.wake_at(due);
                return false;
            }
            true
        })
    }

    /// Set `s` sends to `p` again (a fail-back from `c`).
    fn switch_back(st: &mut State, s: usize, c: usize, p: usize, pass: &mut Pass) {
        st.moving_to[s] = None;
        st.active[s] = Some(p);
        pass.bump = true;
        pass.switches.push(Switch { set: s, from: c, to: Some(p), back: true });
    }

    /// Logs and reports the switches of one pass: each failover (counted)
    /// and fail-back.
    fn announce(&self, switches: Vec<Switch>) {
        for Switch { set: s, from, to, back } in switches {
            let route = self.sets[s].name.clone();
            let from = self.urls[from].clone();
            let to = to.map(|t| self.urls[t].clone());
            let name = route.as_deref().unwrap_or("default");
            if back {
                tracing::info!(route = name, %from, to = to.as_deref().unwrap_or(""), "fail-back: traffic returns to the higher-priority broker");
                let _ = self.events.send(Event::Failback { route, from, to: to.unwrap_or_default() });
            } else {
                tracing::warn!(route = name, %from, to = to.as_deref().unwrap_or("none"), "failover: the active broker failed; its unacknowledged messages go to the next one");
                metrics::counter!("steadfast_failovers_total").increment(1);
                let _ = self.events.send(Event::Failover { route, from, to });
            }
        }
    }

    /// Runs the time-based decisions until `stop`.
    pub async fn run(self: std::sync::Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let next = self.decide_at();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = sleep_until(next.unwrap_or(far)) => {}
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BrokerSet, BrokerUrl};

    fn router(failback: Duration) -> (Router, broadcast::Receiver<Event>) {
        let urls: Vec<BrokerUrl> = ["mqtt://127.0.0.1:1", "mqtt://127.0.0.1:2"].map(|u| u.parse().unwrap()).to_vec();
        let cfg = ClientConfig::new("r", urls[0].clone(), "/nonexistent")
            .brokers(BrokerSet::new(urls).failback_after(failback))
            .ack_timeout(Duration::from_secs(5));
        let (tx, rx) = broadcast::channel(16);
        (Router::new(&cfg, tx), rx)
    }

    fn owner(r: &Router) -> Option<usize> {
        (0..2).find(|b| r.claims(*b, None, "t"))
    }

    #[tokio::test(start_paused = true)]
    async fn at_start_the_primary_gets_a_moment_before_the_backup_takes_the_traffic() {
        let (r, _) = router(Duration::from_secs(30));
        r.link_up(1, 10);
        assert_eq!(owner(&r), None, "the primary has not tried yet");
        r.link_up(0, 10);
        assert_eq!(owner(&r), Some(0));

        let (r, _) = router(Duration::from_secs(30));
        r.link_up(1, 10);
        tokio::time::advance(Duration::from_secs(4)).await;
        r.decide();
        assert_eq!(owner(&r), Some(1), "after the grace the backup serves");
    }

    #[tokio::test(start_paused = true)]
    async fn failover_then_fail_back_once_healthy_and_drained() {
        let (r, mut events) = router(Duration::from_secs(30));
        let mut generation = r.generation();
        r.link_up(0, 10);
        r.link_up(1, 10);
        assert_eq!(owner(&r), Some(0));
        r.link_down(0);
        assert_eq!(owner(&r), Some(1));
        assert!(matches!(events.try_recv(), Ok(Event::Failover { to: Some(_), .. })));
        assert!(generation.has_changed().unwrap(), "drivers re-read after a failover");
        generation.mark_unchanged();
        r.link_up(0, 10);
        r.progress(1, 3);
        tokio::time::advance(Duration::from_secs(29)).await;
        r.decide();
        assert_eq!(owner(&r), Some(1), "not healthy for long enough yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        r.decide();
        assert_eq!(owner(&r), None, "the backup drains its 3 in flight; nobody takes new ones");
        r.progress(1, 0);
        r.decide();
        assert_eq!(owner(&r), Some(0));
        assert!(matches!(events.try_recv(), Ok(Event::Failback { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fail_back_waits_for_the_drain_at_most_the_ack_timeout() {
        let (r, _) = router(Duration::from_secs(1));
        r.link_up(0, 10);
        r.link_up(1, 10);
        r.link_down(0);
        r.link_up(0, 10);
        r.progress(1, 5);
        tokio::time::advance(Duration::from_secs(2)).await;
        r.decide();
        assert_eq!(owner(&r), None, "draining");
        tokio::time::advance(Duration::from_secs(5)).await;
        r.decide();
        assert_eq!(owner(&r), Some(0), "the backup's window never emptied (other routes' traffic): switched anyway");
    }
}
