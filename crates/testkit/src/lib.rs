//! Test kit for steadfast: real Mosquitto brokers on free loopback ports
//! and the fault proxy (both the lab's, `steadfast_lab`, with a test's
//! manners), a `mosquitto_sub` wrapper that records what a real subscriber
//! received, RabbitMQ and NATS for interop, a PKI, and a scripted broker
//! for protocol corner cases a real broker will not produce on demand.
//!
//! Everything binds to 127.0.0.1 only.

#![forbid(unsafe_code)]

mod interop_brokers;
mod mosquitto;
mod pki;
mod postgres;
mod scripted;
mod sub;
mod ws;

pub use interop_brokers::{amqtt_venv, node, node_modules, Aedes, Amqtt, Nats, RabbitMq};
pub use mosquitto::{Mosquitto, MosquittoOptions};
pub use pki::Pki;
pub use postgres::{have_postgres, Postgres};
pub use scripted::{Received, Reply, ScriptedBroker};
pub use steadfast_lab::{FaultProxy, ProxyMode};
pub use sub::Subscriber;
pub use ws::WsFront;

use std::time::Duration;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    steadfast_lab::free_port().unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; panics with
/// `what` on time-out. Tests wait for conditions, never for fixed times.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of a program from Debian's `mosquitto` package. A missing broker is
/// a failure, never a skip: the README's test command installs it.
pub fn mosquitto_program(name: &str) -> std::path::PathBuf {
    let p = steadfast_lab::mosquitto_program(name);
    assert!(p.is_absolute(), "`{name}` not found: install Debian's `mosquitto` and `mosquitto-clients` packages (the README's test command does this)");
    p
}
