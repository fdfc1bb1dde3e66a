//! Test kit for steadfast: real Mosquitto brokers on free loopback ports, a
//! fault proxy that breaks links on command, a `mosquitto_sub` wrapper that
//! records what a real subscriber received, and a scripted broker for
//! protocol corner cases a real broker will not produce on demand.
//!
//! Everything binds to 127.0.0.1 only.

#![forbid(unsafe_code)]

pub mod chaos;
mod mosquitto;
mod others;
mod pki;
mod proxy;
mod scripted;
mod sub;
mod wiretap;
mod ws;

pub use mosquitto::{Mosquitto, MosquittoOptions};
pub use others::{Nats, RabbitMq};
pub use pki::Pki;
pub use proxy::{FaultProxy, ProxyMode};
pub use scripted::{Received, Reply, ScriptedBroker};
pub use sub::Subscriber;
pub use ws::WsFront;

use std::time::Duration;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
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
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = std::path::Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("`{name}` not found: install Debian's `mosquitto` and `mosquitto-clients` packages (the README's test command does this)");
}
