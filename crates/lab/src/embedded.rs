//! The embedded broker (rumqttd) that `steadfast broker` runs, in its own
//! process so that the demo and the chaos harness can `kill -9` it. It
//! keeps sessions in memory only: a restart forgets them.

use crate::LabError;

/// Serves MQTT 5 (`mqtt5`) or 3.1.1 on 127.0.0.1:`port` until the process
/// is killed. It runs its own threads and runtimes: call it outside any.
#[cfg(feature = "embedded-broker")]
pub fn run(port: u16, mqtt5: bool) -> Result<(), LabError> {
    use std::collections::HashMap;

    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let server = ServerSettings {
        name: format!("steadfast-demo-{port}"),
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
    let (v4, v5) = if mqtt5 { (None, Some(servers)) } else { (Some(servers), None) };
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
    rumqttd::Broker::new(config).start().map_err(|e| LabError::Embedded { port, reason: e.to_string() })
}

/// This build has no embedded broker.
#[cfg(not(feature = "embedded-broker"))]
pub fn run(_port: u16, _mqtt5: bool) -> Result<(), LabError> {
    Err(LabError::NoEmbeddedBroker)
}
