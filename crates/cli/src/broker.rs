//! `steadfast broker` (hidden): an embedded rumqttd broker on a loopback
//! port, in its own process so that `steadfast demo` can `kill -9` it.
//! It keeps sessions in memory only: a restart forgets them.

use anyhow::anyhow;

use crate::args::BrokerArgs;
use crate::Failure;

/// Runs the broker until the process is killed.
#[cfg(feature = "embedded-broker")]
pub fn run(a: BrokerArgs) -> Result<(), Failure> {
    use std::collections::HashMap;

    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], a.port));
    let server = ServerSettings {
        name: format!("steadfast-demo-{}", a.port),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let servers = HashMap::from([("1".to_owned(), server)]);
    let (v4, v5) = match a.version.as_str() {
        "311" | "mqttv311" | "4" => (Some(servers), None),
        "5" | "mqttv5" => (None, Some(servers)),
        v => return Err(Failure::usage(anyhow!("--protocol-version {v}: use 311 or 5"))),
    };
    let config = Config {
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4,
        v5,
        ..Default::default()
    };
    rumqttd::Broker::new(config).start().map_err(|e| Failure::other(anyhow!("embedded broker on {listen}: {e}")))
}

/// This build has no embedded broker.
#[cfg(not(feature = "embedded-broker"))]
pub fn run(_: BrokerArgs) -> Result<(), Failure> {
    Err(Failure::usage(anyhow!(
        "this steadfast was built without the `embedded-broker` feature: use `--brokers mosquitto`"
    )))
}
