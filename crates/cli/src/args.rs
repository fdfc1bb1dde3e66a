//! Command-line arguments. Flags follow `mosquitto_pub` where they overlap.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use steadfast_core::{parse_duration, BackoffConfig, BackoffError, DurationError};

/// Every duration flag: one syntax (500ms, 30s, 1.5m, 2h, 1d), parsed here.
fn duration(s: &str) -> Result<Duration, DurationError> {
    parse_duration(s)
}

/// `--backoff`: default, battery or MIN..MAX[,N/h].
fn backoff(s: &str) -> Result<BackoffConfig, BackoffError> {
    BackoffConfig::parse(s)
}

/// Reliable MQTT delivery: a durable outbox that never loses an accepted message.
#[derive(Debug, Parser)]
#[command(name = "steadfast", version, disable_help_flag = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Debug logging on stderr (RUST_LOG overrides).
    #[arg(short = 'd', long, global = true, display_order = 900)]
    pub debug: bool,
    /// Log format on stderr: human or json (one object per line).
    #[arg(long, global = true, value_name = "FORMAT", default_value = "human", display_order = 901)]
    pub log_format: String,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help, global = true)]
    help: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish messages through the durable outbox (flags as mosquitto_pub).
    #[command(disable_help_flag = true)]
    Pub(Box<PubArgs>),
    /// Receive messages: persistent session, ack after handling, de-duplication (flags as mosquitto_sub).
    #[command(disable_help_flag = true)]
    Sub(Box<SubArgs>),
    /// Show an outbox: queue depth, oldest message, drops, broker states.
    #[command(disable_help_flag = true)]
    Status(StatusArgs),
    /// Messages moved aside as poison (a broker ended the link each time one was sent): list, requeue or delete them.
    #[command(disable_help_flag = true)]
    Poison(PoisonArgs),
    /// Store-and-forward between brokers, from a TOML configuration.
    #[command(disable_help_flag = true)]
    Bridge(BridgeArgs),
    /// Two brokers, a producer and a consumer, faults on a schedule, and a verdict on what was lost.
    #[command(disable_help_flag = true)]
    Demo(DemoArgs),
    /// What a broker really does (versions, limits, QoS 2, retained, sessions) and how to make it safe.
    #[command(disable_help_flag = true)]
    Doctor(Box<DoctorArgs>),
    /// Benchmarks with same-run baselines: publish, fanout, failover, restart, drain, consume, bridge, receipts, group, or all.
    #[command(disable_help_flag = true)]
    Bench(BenchArgs),
    /// A seeded schedule of faults over a producer, two brokers and a consumer, and a verdict on what was lost.
    #[command(disable_help_flag = true)]
    Chaos(ChaosArgs),
    /// An embedded broker (rumqttd, in memory) on a loopback port: what `demo` runs and kills.
    #[command(disable_help_flag = true, hide = true)]
    Broker(BrokerArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scenarios: publish, fanout, failover, restart, drain, consume, bridge, receipts, group (several, or all); default publish.
    pub scenarios: Vec<String>,
    /// Messages per run.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Runs per scenario (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// In-flight window of every client.
    #[arg(long, default_value_t = 256)]
    pub inflight: u16,
    /// Windows at which publish also measures each client, to report each at its best (comma-separated).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_values_t = [64u16, 256, 1024, 4096])]
    pub windows: Vec<u16>,
    /// Messages per second of the paced latency runs (publish).
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    /// Where the outboxes go, each in a fresh directory (default: the temp dir).
    #[arg(long, value_name = "DIR")]
    pub outbox_dir: Option<PathBuf>,
    /// Run even if the outbox directory is on tmpfs or ramfs (where a disk sync costs nothing).
    #[arg(long)]
    pub allow_tmpfs: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write a latency histogram (SVG) of the publish scenario here.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// The schedule's seed (default: a random one, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long the schedule runs, in seconds (then it drains).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// How long the schedule runs, in minutes (a soak); overrides --seconds.
    #[arg(long)]
    pub minutes: Option<u64>,
    /// Messages per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Which brokers: embedded (rumqttd, in memory; in builds with the embedded-broker feature, as scripts/demo makes) or mosquitto (restarts with persistence on or off, as the schedule says); auto: embedded when built in, else mosquitto.
    #[arg(long, default_value = "auto")]
    pub brokers: String,
    /// Copy the run's files (logs, outbox, inbox, consumer output) here at the end.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also check that a session survives a broker restart, running this shell command to restart it.
    #[arg(long, value_name = "COMMAND", conflicts_with = "restart_wait")]
    pub restart_cmd: Option<String>,
    /// Also check that a session survives a broker restart, which you do by hand when told to.
    #[arg(long)]
    pub restart_wait: bool,
    /// How long to wait for the broker to go down and come back.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = duration)]
    pub restart_within: Duration,
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Listen on 127.0.0.1:PORT.
    #[arg(long)]
    pub port: u16,
    /// MQTT version served on that port: 311 or 5.
    #[arg(short = 'V', long = "protocol-version", default_value = "311")]
    pub version: String,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the demo runs at most, in seconds, 20 or more (publishing for two thirds of it, then draining).
    #[arg(long, default_value_t = 45)]
    pub seconds: u64,
    /// Messages per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Which brokers: embedded (rumqttd, in memory; in builds with the embedded-broker feature, as scripts/demo makes) or mosquitto (Debian's package, with persistence); auto: embedded when built in, else mosquitto.
    #[arg(long, default_value = "auto")]
    pub brokers: String,
}

#[derive(Debug, Args)]
pub struct BridgeArgs {
    /// The bridge configuration (TOML): [store] dir, [[route]] with source and destination.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Check the configuration, print every error with its line, and exit (2 when invalid).
    #[arg(long)]
    pub check: bool,
    /// Create each route's source session and subscriptions, then exit: what is published from then on waits for the bridge.
    #[arg(long)]
    pub register: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// How to reach the brokers: shared by `pub` and `sub`.
#[derive(Debug, Args)]
pub struct ConnArgs {
    /// Broker URL: mqtt://, mqtts:// (TLS), ws:// or wss:// (WebSocket, path /mqtt by default), then host:port (repeatable: pub uses them in priority order, sub subscribes on each; doctor checks one). Default: mqtt://localhost:1883.
    #[arg(short = 'b', long = "broker", value_name = "URL")]
    pub brokers: Vec<String>,
    /// Broker host (mosquitto style; use with -p).
    #[arg(short = 'h', long = "host")]
    pub host: Option<String>,
    /// mosquitto's -L: mqtt(s)://[USER[:PASSWORD]@]HOST[:PORT]/TOPIC, the broker, credentials and topic at once.
    #[arg(short = 'L', long = "url", value_name = "URL")]
    pub url: Option<String>,
    /// Broker port (mosquitto style).
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// MQTT version: auto (5, and 3.1.1 for a broker that refuses 5, remembered per broker), 311 or 5 (also mqttv311, mqttv5).
    #[arg(short = 'V', long = "protocol-version", default_value = "auto")]
    pub version: String,
    /// User name.
    #[arg(short = 'u', long = "username")]
    pub username: Option<String>,
    /// Password (visible to other users in `ps`: prefer --pw-file or $STEADFAST_PASSWORD).
    #[arg(short = 'P', long = "pw")]
    pub password: Option<String>,
    /// Read the password from this file (its first line).
    #[arg(long = "pw-file", value_name = "FILE", alias = "password-file")]
    pub password_file: Option<PathBuf>,
    /// TLS: trust only the CA certificates in this PEM file (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub cafile: Option<PathBuf>,
    /// TLS: client certificate (PEM) for mutual TLS; with --key.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// TLS: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// TLS: do not verify the broker's certificate (unsafe; warns at every connection).
    #[arg(long)]
    pub insecure: bool,
    /// TLS: ALPN protocol to offer (repeatable), e.g. x-amzn-mqtt-ca.
    #[arg(long, value_name = "PROTOCOL")]
    pub alpn: Vec<String>,
    /// Keep-alive in seconds.
    #[arg(short = 'k', long = "keepalive", default_value_t = 30)]
    pub keepalive: u64,
    /// The largest packet to take from the broker (e.g. 1MB; announced on MQTT 5); default: no limit.
    #[arg(long, value_name = "SIZE")]
    pub max_packet: Option<String>,
}

#[derive(Debug, Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// How several brokers are used: failover, fanout or balance.
    #[arg(long, value_name = "MODE", default_value = "failover")]
    pub mode: String,
    /// Fanout: acknowledgements needed before a message leaves the outbox: all (the default), any or a count.
    #[arg(long, value_name = "QUORUM")]
    pub ack: Option<String>,
    /// Failover: how long a higher-priority broker must stay up before traffic returns to it.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub failback_after: Duration,
    /// Fanout: after this long, a message some broker acknowledged leaves; the others count it as missed.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub catch_up_for: Option<Duration>,
    /// With messages in flight, a link with no acknowledgement for this long is dead (default: adaptive, from the round-trip time measured, at least 750ms).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub ack_timeout: Option<Duration>,
    /// Named broker sets (routes) from a TOML file: [routes.NAME] brokers = [...], mode, ack, ...
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Publish through this named route of --config instead of the -b brokers.
    #[arg(long, value_name = "NAME")]
    pub route: Option<String>,
    /// MQTT 3.1.1: carry the message identity in a payload envelope (receivers must unwrap it).
    #[arg(long)]
    pub envelope: bool,
    /// End-to-end receipts: each message stays in the outbox until a consumer that handled it sends a receipt (steadfast sub does); without one in time it is published again. The command then waits until every message is handled.
    #[arg(long)]
    pub receipts: bool,
    /// Receipts: count only these consumers (their --receipt-as names, or client ids), by default all of them.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    pub receipt_from: Vec<String>,
    /// Receipts needed: any (the default without --receipt-from), all (the default with it) or a count.
    #[arg(long, value_name = "any|all|N")]
    pub receipt_need: Option<String>,
    /// Receipts: publish again when none came this long after the broker's acknowledgement (doubled after each resend, up to an hour).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub receipt_timeout: Duration,
    /// Receipts topics are PREFIX/PRODUCER_ID (MQTT 3.1.1 consumers must use the same prefix).
    #[arg(long, value_name = "PREFIX")]
    pub receipt_prefix: Option<String>,
    /// Topic to publish to.
    #[arg(short = 't', long = "topic")]
    pub topic: Option<String>,
    /// QoS: 0, 1 or 2.
    #[arg(short = 'q', long = "qos", default_value_t = 1)]
    pub qos: u8,
    /// The message payload.
    #[arg(short = 'm', long = "message", group = "input")]
    pub message: Option<String>,
    /// One message per line of stdin.
    #[arg(short = 'l', long = "stdin-line", group = "input")]
    pub lines: bool,
    /// The whole file as one message.
    #[arg(short = 'f', long = "file", group = "input")]
    pub file: Option<PathBuf>,
    /// The whole of stdin as one message.
    #[arg(short = 's', long = "stdin-file", group = "input")]
    pub stdin: bool,
    /// An empty (zero-length) message.
    #[arg(short = 'n', long = "null-message", group = "input")]
    pub null: bool,
    /// Send what the outbox holds; take no new input.
    #[arg(long, group = "input")]
    pub drain: bool,
    /// Most messages in flight (unacknowledged) per broker, default 1024; a broker's MQTT 5 receive maximum lowers it; towards MQTT 3.1.1, which cannot announce a limit, 20 unless given; a broker that closes the link past a limit makes it shrink.
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u16>,
    /// A message alone in flight each time a broker ends the link, this many times in a row, is moved aside as poison (kept; `steadfast poison` lists it) so that the messages behind it go on; 0: never.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub poison_after: u32,
    /// Send the messages this outbox holds for other brokers (accepted by
    /// an earlier run with other -b) to the brokers given now; without
    /// it they stay queued for their own brokers.
    #[arg(long)]
    pub retarget: bool,
    /// Retain flag.
    #[arg(short = 'r', long)]
    pub retain: bool,
    /// An MQTT 5 property of every message, as mosquitto_pub's `-D`: `-D PUBLISH content-type TEXT`, `correlation-data DATA`, `payload-format-indicator 0|1`, `response-topic TOPIC`, `user-property KEY VALUE` (repeatable).
    #[arg(short = 'D', long = "property", value_names = ["COMMAND", "NAME", "VALUE"], num_args = 3..=4, action = clap::ArgAction::Append)]
    pub properties: Vec<String>,
    /// Client id: the MQTT session and the default outbox name. Keep it stable.
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Outbox directory (default: `$XDG_STATE_HOME/steadfast/outbox/CLIENT_ID`).
    #[arg(long)]
    pub outbox: Option<PathBuf>,
    /// Exit as soon as every message is accepted (on disk).
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for delivery (e.g. 30s, 5m); then exit 3, rest kept on disk.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub wait_timeout: Option<Duration>,
    /// Outbox bound: a message count (10000) or a size (100MB); repeat for both.
    #[arg(long, value_name = "COUNT|SIZE")]
    pub max_queue: Vec<String>,
    /// Outbox bound in bytes (e.g. 100MB); same as --max-queue SIZE.
    #[arg(long, value_name = "SIZE")]
    pub max_queue_bytes: Option<String>,
    /// Outbox bound in age: older messages leave, counted as expired (e.g. 7d).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub max_age: Option<Duration>,
    /// When the outbox is full: block, reject, drop-oldest or drop-newest.
    #[arg(long, value_name = "POLICY", default_value = "block")]
    pub overflow: String,
    /// The overflow policy of deadline-class messages, if not --overflow's.
    #[arg(long, value_name = "POLICY")]
    pub deadline_overflow: Option<String>,
    /// Delivery class: persistent (retried until delivered), deadline (with --ttl) or best-effort (never stored).
    #[arg(long, value_name = "CLASS", default_value = "persistent")]
    pub class: String,
    /// Deadline class: time to live (e.g. 15s); then the message is dropped as expired.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub ttl: Option<Duration>,
    /// Retry budget: at most N sends per message, then it is dropped as budget.
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Keep only the newest undelivered message per topic (older ones are dropped as superseded).
    #[arg(long)]
    pub keep_latest: bool,
    /// Priority 0 (default) to 9: higher priorities are sent first after an outage.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub priority: u8,
    /// Reconnect backoff: default (100ms..30s), battery (30s..15m, at most 12 attempts an hour) or MIN..MAX[,N/h] (e.g. 1s..5m,20/h).
    #[arg(long, value_name = "PROFILE", default_value = "default", value_parser = backoff)]
    pub backoff: BackoffConfig,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Progress bar on stderr: auto (when stderr is a terminal), always or never.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub progress: String,
    /// Start a fresh session instead of resuming one.
    #[arg(long)]
    pub clean: bool,
    /// mosquitto's `-c` (keep the session): already the default, accepted
    /// so that their command lines work unchanged.
    #[arg(short = 'c', long = "disable-clean-session", hide = true, conflicts_with = "clean")]
    pub keep_session: bool,
    /// MQTT 5 session expiry interval.
    #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = duration)]
    pub session_expiry: Duration,
    /// Print a summary line on stderr when done.
    #[arg(long)]
    pub summary: bool,
}

#[derive(Debug, Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Topic filter to subscribe to (repeatable).
    #[arg(short = 't', long = "topic")]
    pub topics: Vec<String>,
    /// QoS of the subscriptions: 0, 1 or 2.
    #[arg(short = 'q', long = "qos", default_value_t = 1)]
    pub qos: u8,
    /// Client id: the MQTT session. Default: one chosen once and kept in the inbox directory.
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Start a fresh session instead of resuming one.
    #[arg(long)]
    pub clean: bool,
    /// mosquitto's `-c` (keep the session): already the default, accepted
    /// so that their command lines work unchanged.
    #[arg(short = 'c', long = "disable-clean-session", hide = true, conflicts_with = "clean")]
    pub keep_session: bool,
    /// MQTT 5 session expiry interval (MQTT 3.1.1: the broker's setting applies).
    #[arg(short = 'x', long, value_name = "DURATION", default_value = "1d", value_parser = duration)]
    pub session_expiry: Duration,
    /// Inbox directory (default: `$XDG_STATE_HOME/steadfast/inbox/CLIENT_ID`), or a consumer group's shared inbox on PostgreSQL: postgres://USER@HOST:PORT/DB (with --group).
    #[arg(long, value_name = "DIR|URL")]
    pub inbox: Option<PathBuf>,
    /// Join the consumer group NAME: subscribe to $share/NAME/FILTER, so that each broker gives each message to one member (each member has its own -i).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// A group member with a shared inbox: how long its claim on a message it handles lasts (a copy at another member waits that long for a member that crashed).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    pub claim_for: Duration,
    /// Write each message into a table with this statement, in one transaction with the group's shared inbox, so it is written once in the group: $1 payload (text or bytea), $2 topic, $3 producer id, $4 sequence number. Needs --inbox postgres://...
    #[arg(long, value_name = "STATEMENT")]
    pub sql: Option<String>,
    /// Do not de-duplicate (no inbox records; still ack after handling).
    #[arg(long)]
    pub no_dedup: bool,
    /// Exit after this many messages handled.
    #[arg(short = 'C', long = "count", value_name = "N")]
    pub count: Option<u64>,
    /// Exit after this many seconds.
    #[arg(short = 'W', long = "timeout", value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Print the topic before the payload.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Output format: %t topic, %p payload, %q QoS, %r retain, %l length, %x hex payload, %I identity, %b broker, %% percent; \n \t escapes.
    #[arg(short = 'F', value_name = "FORMAT")]
    pub format: Option<String>,
    /// Do not end each message with a newline.
    #[arg(short = 'N')]
    pub no_eol: bool,
    /// One JSON object per line: topic, payload, qos, retain, producer, seq, broker.
    #[arg(long)]
    pub json: bool,
    /// Run CMD (with sh -c) per message, payload on stdin, topic in STEADFAST_TOPIC; ack only when it exits 0.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Create the session and its subscriptions, then exit: nothing published afterwards is lost.
    #[arg(long)]
    pub register: bool,
    /// A gap in a producer's sequence not filled within this long is reported as a suspected loss.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub gap_timeout: Duration,
    /// MQTT 3.1.1: unwrap the steadfast identity envelope (see `pub --envelope`).
    #[arg(long)]
    pub envelope: bool,
    /// The name in the receipts this consumer sends to producers that ask for them (default: the client id).
    #[arg(long, value_name = "NAME")]
    pub receipt_as: Option<String>,
    /// MQTT 3.1.1: receipts go to PREFIX/PRODUCER_ID (see `pub --receipt-prefix`).
    #[arg(long, value_name = "PREFIX")]
    pub receipt_prefix: Option<String>,
    /// Most unacknowledged messages in flight per broker (MQTT 5 receive maximum).
    #[arg(long, default_value_t = 256)]
    pub max_inflight: u16,
    /// Inbox bound: identities (default 1000000) or bytes (e.g. 64MB) remembered at most; repeat for both.
    #[arg(long, value_name = "COUNT|SIZE")]
    pub inbox_max: Vec<String>,
    /// Inbox bound in age: identities handled longer ago are forgotten.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = duration)]
    pub inbox_max_age: Duration,
    /// Reconnect backoff: default (100ms..30s), battery (30s..15m, at most 12 attempts an hour) or MIN..MAX[,N/h] (e.g. 1s..5m,20/h).
    #[arg(long, value_name = "PROFILE", default_value = "default", value_parser = backoff)]
    pub backoff: BackoffConfig,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9465).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

#[derive(Debug, Args)]
pub struct PoisonArgs {
    /// The outbox directory.
    #[arg(long, value_name = "DIR")]
    pub outbox: Option<PathBuf>,
    /// Client id whose default outbox to use.
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Put these messages back in the queue (ids as listed, or `all`).
    #[arg(long, value_name = "ID|all", num_args = 1..)]
    pub requeue: Option<Vec<String>>,
    /// Remove these messages from the outbox (ids as listed, or `all`).
    #[arg(long, value_name = "ID|all", num_args = 1..)]
    pub delete: Option<Vec<String>>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Outbox or inbox directory (`--inbox` is the same flag), or a consumer group's shared inbox: postgres://USER@HOST:PORT/DB.
    #[arg(long, visible_alias = "inbox", value_name = "DIR|URL")]
    pub outbox: Option<PathBuf>,
    /// With a shared inbox: only this consumer group.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// A bridge configuration: every route's outbox and inbox.
    #[arg(long, value_name = "FILE")]
    pub bridge: Option<PathBuf>,
    /// Client id whose default outbox to show.
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}
