//! The README's Rust snippets, compiled (not run: they need brokers).
//! The lines after `#` are what the README leaves to the reader: the
//! imports and values of the snippets before. The test
//! `readme::the_readme_snippets_are_these` keeps the two the same.
//!
//! ```no_run
//! # #![allow(unused)]
//! # async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let lines: Vec<String> = Vec::new();
//! use steadfast::{BrokerUrl, Client, ClientConfig, Delivery, Message, Qos};
//!
//! let cfg = ClientConfig::new("gateway-7", "mqtt://127.0.0.1:1883".parse::<BrokerUrl>()?, "/var/lib/gw7/outbox");
//! let (client, report) = Client::open(cfg).await?;   // never waits for the broker
//! if !report.is_clean() { eprintln!("outbox was repaired: {report:?}"); }
//!
//! let receipt = client.publish(Message::new("sensors/t", "21.5").qos(Qos::ExactlyOnce)).await?; // on disk now
//! assert_eq!(receipt.delivered().await?, Delivery::Delivered);                                  // acked
//!
//! for line in lines { client.enqueue(Message::new("log", line))?; } // many at once share one disk sync
//! client.wait_idle().await;                                         // everything delivered
//! let mut events = client.events(); // Connected, ConnectFailed, Disconnected, SessionLost, Refused, Dropped, Failover, Failback, Republished
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # #![allow(unused)]
//! # async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # fn handle(_: &str, _: &[u8], _: Option<&steadfast::Identity>) -> std::io::Result<()> { Ok(()) }
//! use steadfast::{ClientConfig, Consumer, ConsumerConfig, Qos};
//!
//! let client = ClientConfig::new("line1-consumer", "mqtt://127.0.0.1:1883".parse()?, "/var/lib/line1/inbox");
//! let cfg = ConsumerConfig::new(client).topic("sensors/#", Qos::AtLeastOnce);
//! Consumer::register(&cfg).await?;                 // optional: session and subscriptions before any producer
//! let (consumer, _report) = Consumer::open(cfg).await?;
//! while let Some(d) = consumer.next().await {
//!     handle(d.topic(), d.payload(), d.identity())?;
//!     d.ack();                                     // PUBACK and inbox record; dropping `d` instead means it comes again
//! }
//! consumer.close().await;
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # #![allow(unused)]
//! # async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # use std::time::Duration;
//! # use steadfast::{BrokerUrl, Client, ClientConfig, Message};
//! # let url: BrokerUrl = "mqtt://127.0.0.1:1883".parse()?;
//! use steadfast::{Handling, ReceiptRule};
//!
//! let cfg = ClientConfig::new("line1-gw", url, "/var/lib/line1/outbox")
//!     .receipts(ReceiptRule::any(Duration::from_secs(30)));  // every message waits for a consumer's receipt
//! let (client, _report) = Client::open(cfg).await?;
//! let receipt = client.publish(Message::new("orders/new", "...")).await?; // on disk
//! if let Handling::Handled(by) = receipt.handled().await? { println!("handled by {by:?}"); }
//! client.publish(Message::new("sensors/t", "21.5").without_receipts()).await?; // acked is enough for this one
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # #![allow(unused)]
//! # async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # use std::time::Duration;
//! # use steadfast::{BrokerUrl, Client, ClientConfig, ConsumerConfig, Message, Qos};
//! # let url: BrokerUrl = "mqtt://127.0.0.1:1883".parse()?;
//! # let (client, _) = Client::open(ClientConfig::new("c", url.clone(), "/tmp/x")).await?;
//! use steadfast::{BackoffConfig, Class, OutboxConfig, Overflow, Policy};
//!
//! let cfg = ClientConfig::new("meter-7", url, "/var/lib/meter7/outbox")
//!     .backoff(BackoffConfig::battery())
//!     .policy(Policy { class: Class::Deadline(Duration::from_secs(60)), keep_latest: true, ..Policy::default() })
//!     .outbox(OutboxConfig { max_messages: Some(100_000), overflow: Overflow::DropOldest, ..OutboxConfig::default() });
//! client.publish(Message::new("meter/kwh", "12.7")).await?;                                    // the default policy
//! client.publish(Message::new("alarm/tamper", "1").class(Class::Persistent).priority(9)).await?; // its own
//! client.publish(Message::new("meter/live", "0.4").class(Class::BestEffort)).await?;             // never stored
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # #![allow(unused)]
//! # async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # use std::time::Duration;
//! # use steadfast::{BrokerUrl, Client, ClientConfig, ConsumerConfig, Message, Qos};
//! # let url: BrokerUrl = "mqtt://127.0.0.1:1883".parse()?;
//! # let (client, _) = Client::open(ClientConfig::new("c", url.clone(), "/tmp/x")).await?;
//! use steadfast::{AckQuorum, BrokerSet, Mode};
//!
//! let office = BrokerSet::new(["mqtt://10.1.0.2:1883".parse()?, "mqtt://10.1.0.3:1883".parse()?])
//!     .failback_after(Duration::from_secs(30));                      // failover by default
//! let home = BrokerSet::new(["mqtt://10.0.0.2:1883".parse()?, "mqtt://10.0.0.3:1883".parse()?])
//!     .mode(Mode::Fanout)
//!     .ack(AckQuorum::All)
//!     .catch_up_for(Duration::from_secs(3600));
//! let cfg = ClientConfig::new("gateway-7", office.brokers()[0].clone(), "/var/lib/gw7/outbox")
//!     .brokers(office)                                                // the default set
//!     .route("home", home);
//! client.publish(Message::new("alarm/door", "open").route("home")).await?;
//! for b in client.status().await?.brokers { println!("{} {:?} active={}", b.url, b.state, b.active); }
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # #![allow(unused)]
//! # async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # use std::time::Duration;
//! # use steadfast::{BrokerUrl, Client, ClientConfig, ConsumerConfig, Message, Qos};
//! # let url: BrokerUrl = "mqtt://127.0.0.1:1883".parse()?;
//! # let (client, _) = Client::open(ClientConfig::new("c", url.clone(), "/tmp/x")).await?;
//! use steadfast::bridge::{route_dirs, Bridge, Rewrite, Route};
//!
//! let dir = std::path::PathBuf::from("/var/lib/gw7/bridge");
//! let (outbox, inbox) = route_dirs(&dir, "up");
//! let source = ConsumerConfig::new(ClientConfig::new("gw7-bridge", "mqtt://127.0.0.1:1883".parse()?, inbox))
//!     .topic("sensors/#", Qos::AtLeastOnce);
//! let destination = ClientConfig::new("gw7-bridge-up", "mqtts://cloud.example:8883".parse()?, outbox);
//! let route = Route::new("up", source, destination).rewrite(Rewrite::new().prefix("site-7/")?);
//! let running = Bridge { dir, routes: vec![route] }.start().await?;
//! // ...
//! running.stop().await; // in-flight acknowledgements finished; what waits for upstream stays on disk
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # #![allow(unused)]
//! # async fn snippet() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # use std::time::Duration;
//! # use steadfast::{BrokerUrl, Client, ClientConfig, ConsumerConfig, Message, Qos};
//! # let url: BrokerUrl = "mqtt://127.0.0.1:1883".parse()?;
//! # let (client, _) = Client::open(ClientConfig::new("c", url.clone(), "/tmp/x")).await?;
//! use steadfast::{doctor, TlsConfig};
//!
//! let cfg = ClientConfig::new("gateway-7", "mqtts://broker.lan:8883".parse()?, "/var/lib/gw7/outbox")
//!     .tls(TlsConfig::new().ca_file("/etc/gw7/ca.pem").client_cert("/etc/gw7/gw7.pem", "/etc/gw7/gw7.key"))
//!     .credentials("gw7", Some(std::fs::read("/etc/gw7/password")?));
//! let report = doctor::diagnose(&cfg, &cfg.all_brokers()[0], None, Duration::from_secs(120)).await;
//! assert_eq!(report.check("session").and_then(|c| c.ok), Some(true)); // sessions are kept
//! # Ok(()) }
//! ```

#[cfg(test)]
mod tests {
    /// The Rust blocks of a markdown text, without rustdoc's hidden lines.
    fn rust_blocks(text: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut current: Option<Vec<&str>> = None;
        for line in text.lines() {
            let line = line.strip_prefix("//! ").or_else(|| line.strip_prefix("//!")).unwrap_or(line);
            match (&mut current, line.trim_start()) {
                (None, l) if l.starts_with("```rust") || l.starts_with("```no_run") => current = Some(Vec::new()),
                (Some(_), "```") => blocks.push(current.take().expect("open").join("\n")),
                (Some(b), _) if line.starts_with("# ") || line == "#" => {
                    let _ = b;
                }
                (Some(b), _) => b.push(line),
                _ => {}
            }
        }
        blocks
    }

    #[test]
    fn the_readme_snippets_are_these() {
        let readme = include_str!("../../../README.md");
        let here = include_str!("readme.rs");
        let (theirs, ours) = (rust_blocks(readme), rust_blocks(here.split("#[cfg(test)]").next().expect("docs")));
        assert_eq!(theirs.len(), ours.len(), "as many Rust blocks in the README as here");
        for (i, (t, o)) in theirs.iter().zip(&ours).enumerate() {
            assert_eq!(t, o, "README Rust block {} differs from crates/client/src/readme.rs", i + 1);
        }
    }
}
