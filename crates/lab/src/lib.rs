//! steadfast's lab: what the product does not need but its users and its
//! tests do. Brokers to start and `kill -9` (Mosquitto or the embedded
//! rumqttd), a fault proxy that breaks links on command and can tell what a
//! broker acknowledged, the demo, and the chaos harness. `steadfast demo`,
//! `steadfast chaos` and `steadfast broker` run it; the test kit builds on
//! its launcher and proxy. Everything binds to 127.0.0.1 only.
//!
//! Every fallible function returns a [`LabError`]; nothing here panics on
//! a broker that will not start or a file that cannot be written.

#![forbid(unsafe_code)]

pub mod chaos;
mod children;
pub mod demo;
pub mod embedded;
mod error;
mod launch;
mod postgres;
mod proxy;
mod wiretap;

pub use error::LabError;
pub use launch::{free_port, have_mosquitto, kill9, mosquitto_program, Broker, BrokerKind, BrokerOptions};
pub use postgres::{have_postgres, Postgres};
pub use proxy::{FaultProxy, ProxyMode};
