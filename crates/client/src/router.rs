//! Which broker takes which message: the thin shared wrapper around the
//! routing engine ([`Routes`]) that every driver asks.
//!
//! Every driver reads the outbox on its own and keeps a message only when
//! [`Router::claims`] says it is its own. The engine follows each link's
//! health and decides: in failover the active broker of each set, in
//! balance the broker each topic is pinned to; fanout needs no decision.
//! This wrapper carries out what it decides: when messages change owner it
//! bumps the generation (every driver reads the outbox again from the
//! oldest message, so nothing the old owner had not delivered is left
//! behind), it logs and announces failovers and fail-backs, and its task
//! wakes the engine when a decision comes due.

use std::sync::Mutex;
use std::time::Duration;

use steadfast_core::engine::{Decision, Routes, Routing, SetSpec, Switch};
use steadfast_core::AckTimeout;
use tokio::sync::{broadcast, watch, Notify};
use tokio::time::{sleep_until, Instant};

use crate::clock::instant as now;
use crate::config::{ClientConfig, Mode};
use crate::Event;

/// With the adaptive ack timeout, the longest a fail-back waits for the
/// old broker to drain (its own ack timeout ends a dead link sooner).
const FAILBACK_DRAIN: Duration = Duration::from_secs(15);

pub(crate) struct Router {
    routes: Mutex<Routes>,
    /// Each set's route name (`None`: the default set), for the logs.
    names: Vec<Option<String>>,
    urls: Vec<String>,
    generation: watch::Sender<u64>,
    wake: Notify,
    events: broadcast::Sender<Event>,
}

impl Router {
    pub fn new(cfg: &ClientConfig, events: broadcast::Sender<Event>) -> Self {
        let all = cfg.all_brokers();
        let index = |u| all.iter().position(|b| b == u).expect("every member is in all_brokers");
        let sets: Vec<SetSpec> = cfg
            .sets()
            .map(|(name, s)| SetSpec {
                name: name.map(str::to_owned),
                members: s.brokers().iter().map(index).collect(),
                routing: match s.routing() {
                    Mode::Failover => Routing::Failover,
                    Mode::Fanout => Routing::Fanout,
                    Mode::Balance => Routing::Balance,
                },
                failback_after: s.failback_after,
            })
            .collect();
        // At start the router waits this long for higher-priority brokers'
        // first attempt; a fail-back waits at most the ack timeout for the
        // old broker to drain (it may carry other routes' traffic too).
        let grace = cfg.connect_timeout.min(Duration::from_secs(3));
        let names = sets.iter().map(|s| s.name.clone()).collect();
        let drain = match cfg.ack_timeout {
            AckTimeout::Fixed(d) => d,
            AckTimeout::Adaptive { .. } => FAILBACK_DRAIN,
        };
        let routes = Routes::new(sets, all.len(), now(), grace, drain);
        Self {
            routes: Mutex::new(routes),
            names,
            urls: all.iter().map(|u| u.to_string()).collect(),
            generation: watch::channel(0).0,
            wake: Notify::new(),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumped whenever messages may have changed owner: drivers read the
    /// outbox again from the start.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// True when a route of this name exists (`None`: the default set).
    pub fn knows(&self, route: Option<&str>) -> bool {
        self.lock().set_of(route).is_some()
    }

    /// Whether the message of `route` and `topic` is `broker`'s to send.
    pub fn claims(&self, broker: usize, route: Option<&str>, topic: &str) -> bool {
        let mut r = self.lock();
        let mine = r.claims(broker, route, topic);
        let bump = r.take_bump();
        drop(r);
        if bump {
            self.bump();
        }
        mine
    }

    /// Whether `broker` takes new messages now, in any of its sets.
    pub fn is_active(&self, broker: usize) -> bool {
        self.lock().is_active(broker)
    }

    /// A session with `broker` is up; `limit` is its send window.
    pub fn link_up(&self, broker: usize, limit: usize) {
        let d = self.lock().link_up(broker, limit, now());
        self.carry_out(d);
        self.wake.notify_one();
    }

    /// The session with `broker` ended, or an attempt failed.
    pub fn link_down(&self, broker: usize) {
        let d = self.lock().link_down(broker, now());
        self.carry_out(d);
        self.wake.notify_one();
    }

    /// Messages in flight on `broker` now.
    pub fn progress(&self, broker: usize, inflight: usize) {
        if self.lock().progress(broker, inflight) {
            self.wake.notify_one();
        }
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Re-decides every failover set now; the router task does it again at
    /// the next deadline.
    #[cfg(test)]
    fn decide(&self) {
        let d = self.lock().decide(now());
        self.carry_out(d);
    }

    /// Announces a decision's switches and bumps the generation if messages
    /// changed owner; returns when the rules must be checked again.
    fn carry_out(&self, d: Decision) -> Option<Instant> {
        let route_name = |s: usize| self.names[s].clone();
        for (s, b) in &d.chosen {
            let route = route_name(*s);
            tracing::info!(route = route.as_deref().unwrap_or("default"), broker = %self.urls[*b], "failover: sending to this broker");
        }
        for Switch { set, from, to, back } in d.switches {
            let route = route_name(set);
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
        if d.bump {
            self.bump();
        }
        d.next.map(Instant::from_std)
    }

    /// Runs the time-based decisions until `stop`.
    pub async fn run(self: std::sync::Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let d = self.lock().decide(now());
            let next = self.carry_out(d);
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
