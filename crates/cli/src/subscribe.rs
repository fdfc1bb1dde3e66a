//! `steadfast sub`: print (or `--exec`) each message, then acknowledge it.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use steadfast::{BrokerSet, BrokerUrl, ClientConfig, Consumer, ConsumerConfig, Received};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::broadcast;

use crate::args::SubArgs;
use crate::hints::{open_failure, WithFlag};
use crate::paths::{default_client_id_for, default_inbox};
use crate::sql::SqlSink;
use crate::values::{parse_bounds, parse_qos, parse_version};
use crate::Failure;

fn usage(msg: impl Into<String>) -> Failure {
    Failure::usage(anyhow!(msg.into()))
}

/// How each message is handled.
pub(crate) enum Output {
    /// Printed: default, `-v`, `-F`, `--json`.
    Print(Format),
    /// `--exec CMD`.
    Exec(String),
    /// `--sql STATEMENT` (a group member with a shared inbox).
    Sql(Box<SqlSink>),
}

pub(crate) enum Format {
    Payload,
    Verbose,
    Template(String),
    Json,
}

/// `--inbox postgres://...`: a group's shared inbox, not a directory.
fn shared_inbox(a: &SubArgs) -> Option<String> {
    let s = a.inbox.as_ref()?.to_str()?;
    (s.starts_with("postgres://") || s.starts_with("postgresql://")).then(|| s.to_owned())
}

/// The client id: `-i`, or one chosen once and kept in the inbox
/// directory (the default one for a member of a group with a shared
/// inbox: it keeps the member's counters).
fn client_id(a: &SubArgs) -> Result<(String, PathBuf), Failure> {
    let dir_flag = a.inbox.clone().filter(|_| shared_inbox(a).is_none());
    if let Some(id) = &a.id {
        let dir = dir_flag.unwrap_or_else(|| default_inbox(id));
        return Ok((id.clone(), dir));
    }
    let dir = dir_flag.unwrap_or_else(|| default_inbox("default"));
    let file = dir.join("client-id");
    if let Ok(id) = std::fs::read_to_string(&file) {
        let id = id.trim().to_owned();
        if !id.is_empty() {
            return Ok((id, dir));
        }
    }
    let id = format!("{}-{:08x}", default_client_id_for("sub"), fastrand::u32(..));
    create_private_dir(&dir)?;
    std::fs::write(&file, &id)
        .map_err(|e| Failure::other(anyhow!("cannot keep the client id in {}: {e}", file.display())))?;
    Ok((id, dir))
}

fn create_private_dir(dir: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Failure::other(anyhow!("cannot create the inbox directory {}: {e}", dir.display())))
}

pub(crate) fn config(a: &SubArgs) -> Result<(ConsumerConfig, Output), Failure> {
    // No broker given: localhost:1883, as mosquitto_sub.
    let urls = crate::conn::or_default(a.conn.urls().map_err(usage)?);
    let urls: Vec<BrokerUrl> =
        urls.iter().map(|u| u.parse()).collect::<Result<_, _>>().map_err(|e| Failure::usage(WithFlag(e)))?;
    if a.topics.is_empty() {
        return Err(usage("no topic given; use -t FILTER (repeatable)"));
    }
    let qos = parse_qos(a.qos).map_err(usage)?;
    let version = parse_version(&a.conn.version).map_err(usage)?;
    if a.envelope && version.only_5() {
        return Err(usage("--envelope is for MQTT 3.1.1 (-V 311); MQTT 5 carries the identity as a user property"));
    }
    version.warn_without_envelope(urls.len(), a.envelope);
    let shared = shared_inbox(a);
    if shared.is_some() && a.no_dedup {
        return Err(usage("--no-dedup drops the inbox, and --inbox postgres://... is one: choose one"));
    }
    let output = match (&a.exec, &a.format, a.json, a.verbose) {
        _ if a.sql.is_some() && (a.exec.is_some() || a.format.is_some() || a.json || a.verbose) => {
            return Err(usage("--sql handles the message itself; drop --exec, -F, --json and -v"))
        }
        _ if a.sql.is_some() => match &shared {
            Some(url) => Output::Sql(Box::new(SqlSink::new(url, a.sql.as_deref().unwrap_or_default())?)),
            None => {
                return Err(usage(
                    "--sql writes in the database of the group's shared inbox: add --group NAME and --inbox postgres://USER@HOST:PORT/DB",
                ))
            }
        },
        (Some(cmd), None, false, false) => Output::Exec(cmd.clone()),
        (Some(_), ..) => return Err(usage("--exec handles the message itself; drop -F, --json and -v")),
        (None, Some(_), true, _) | (None, Some(_), _, true) | (None, None, true, true) => {
            return Err(usage("choose one output: -v, -F FORMAT or --json"))
        }
        (None, Some(f), ..) => {
            check_format(f).map_err(usage)?;
            Output::Print(Format::Template(f.clone()))
        }
        (None, None, true, false) => Output::Print(Format::Json),
        (None, None, false, true) => Output::Print(Format::Verbose),
        (None, None, false, false) => Output::Print(Format::Payload),
    };
    let (id, dir) = client_id(a)?;
    let (session_expiry, gap_timeout) = (a.session_expiry, a.gap_timeout);
    if a.max_inflight == 0 {
        return Err(usage("--max-inflight 0 would receive nothing; use 1 or more"));
    }
    let (inbox_age, backoff) = (a.inbox_max_age, a.backoff);
    let mut client = ClientConfig::new(id, urls[0].clone(), dir)
        .brokers(BrokerSet::new(urls))
        .envelope(a.envelope)
        .clean_start(a.clean)
        .session_expiry(session_expiry)
        .max_inflight(a.max_inflight)
        .backoff(backoff);
    if let Some(p) = &a.receipt_prefix {
        client = client.receipt_prefix(p.clone());
    }
    client = a.conn.apply(client).map_err(usage)?;
    let (inbox_count, inbox_bytes) = parse_bounds("--inbox-max", &a.inbox_max).map_err(usage)?;
    let mut cfg = ConsumerConfig::new(client)
        .inbox(!a.no_dedup)
        .gap_timeout(gap_timeout)
        .inbox_window(inbox_age, inbox_count.unwrap_or(1_000_000));
    if let Some(b) = inbox_bytes {
        cfg = cfg.inbox_max_bytes(b);
    }
    if let Some(name) = &a.receipt_as {
        cfg = cfg.receipt_as(name.clone());
    }
    for t in &a.topics {
        cfg = cfg.topic(t.clone(), qos);
    }
    if let Some(g) = &a.group {
        cfg = cfg.group(g.clone());
    }
    if let Some(url) = shared {
        // --sql records every message in its own transaction.
        cfg = cfg.shared_inbox(url).claim_for(a.claim_for).records_in_transaction(a.sql.is_some());
    }
    Ok((cfg, output))
}

/// Rejects `-F` conversions this tool does not know, before anything runs.
fn check_format(f: &str) -> Result<(), String> {
    let mut chars = f.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('t' | 'p' | 'q' | 'r' | 'l' | 'x' | 'I' | 'b' | 'C' | 'D' | 'E' | 'F' | 'P' | 'R' | '%') => {}
                Some(o) => {
                    return Err(format!(
                        "-F: unknown conversion `%{o}`; use %t %p %q %r %l %x %I %b, MQTT 5's %C %D %E %F %P %R, or %%"
                    ))
                }
                None => return Err("-F: the format ends in a lone `%`".into()),
            }
        }
    }
    Ok(())
}

fn render(f: &Format, d: &Received, eol: bool, out: &mut Vec<u8>) {
    match f {
        Format::Payload => out.extend_from_slice(d.payload()),
        Format::Verbose => {
            out.extend_from_slice(d.topic().as_bytes());
            out.push(b' ');
            out.extend_from_slice(d.payload());
        }
        Format::Json => {
            let mut j = serde_json::json!({
                "topic": d.topic(),
                "qos": d.qos() as u8,
                "retain": d.retain(),
                "producer": d.identity().map(|i| i.producer.clone()),
                "seq": d.identity().map(|i| i.seq),
                "broker": d.broker(),
            });
            match std::str::from_utf8(d.payload()) {
                Ok(s) => j["payload"] = s.into(),
                Err(_) => j["payload_hex"] = hex(d.payload()).into(),
            }
            if let Some(p) = properties_json(d) {
                j["properties"] = p;
            }
            out.extend_from_slice(j.to_string().as_bytes());
        }
        Format::Template(t) => {
            let props = d.properties();
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                match (c, c == '%' || c == '\\') {
                    ('%', true) => match chars.next() {
                        Some('t') => out.extend_from_slice(d.topic().as_bytes()),
                        Some('p') => out.extend_from_slice(d.payload()),
                        Some('q') => out.extend_from_slice((d.qos() as u8).to_string().as_bytes()),
                        Some('r') => out.push(if d.retain() { b'1' } else { b'0' }),
                        Some('l') => out.extend_from_slice(d.payload().len().to_string().as_bytes()),
                        Some('x') => out.extend_from_slice(hex(d.payload()).as_bytes()),
                        Some('I') => {
                            out.extend_from_slice(d.identity().map(|i| i.to_string()).unwrap_or_default().as_bytes())
                        }
                        Some('b') => out.extend_from_slice(d.broker().as_bytes()),
                        // MQTT 5's, as mosquitto_sub prints them (empty
                        // when the message has none).
                        Some('C') => out.extend_from_slice(props.content_type.as_deref().unwrap_or("").as_bytes()),
                        Some('D') => out.extend_from_slice(props.correlation_data.as_deref().unwrap_or(&[])),
                        Some('E') => out.extend_from_slice(
                            d.expiry().map(|e| e.as_secs().to_string()).unwrap_or_default().as_bytes(),
                        ),
                        Some('F') if props.payload_is_utf8 => out.push(b'1'),
                        Some('F') => {}
                        Some('P') => {
                            let pairs: Vec<String> = props.user.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                            out.extend_from_slice(pairs.join(" ").as_bytes());
                        }
                        Some('R') => out.extend_from_slice(props.response_topic.as_deref().unwrap_or("").as_bytes()),
                        _ => out.push(b'%'),
                    },
                    ('\\', true) => match chars.next() {
                        Some('n') => out.push(b'\n'),
                        Some('t') => out.push(b'\t'),
                        Some('\\') => out.push(b'\\'),
                        Some(o) => {
                            out.push(b'\\');
                            out.extend_from_slice(o.to_string().as_bytes());
                        }
                        None => out.push(b'\\'),
                    },
                    _ => out.extend_from_slice(c.to_string().as_bytes()),
                }
            }
        }
    }
    if eol {
        out.push(b'\n');
    }
}

/// A message's MQTT 5 properties for `--json` (`None`: it has none): only
/// those it carries; binary correlation data as hex.
fn properties_json(d: &Received) -> Option<serde_json::Value> {
    let p = d.properties();
    if p.is_empty() && d.expiry().is_none() {
        return None;
    }
    let mut j = serde_json::Map::new();
    if let Some(v) = &p.content_type {
        j.insert("content_type".into(), v.as_str().into());
    }
    if let Some(v) = &p.response_topic {
        j.insert("response_topic".into(), v.as_str().into());
    }
    if let Some(v) = &p.correlation_data {
        // Text without NUL as it is (an environment variable cannot hold
        // NUL), anything else as hex.
        match std::str::from_utf8(v).ok().filter(|s| !s.contains('\0')) {
            Some(s) => j.insert("correlation_data".into(), s.into()),
            None => j.insert("correlation_data_hex".into(), hex(v).into()),
        };
    }
    if p.payload_is_utf8 {
        j.insert("payload_format".into(), "utf-8".into());
    }
    if let Some(e) = d.expiry() {
        j.insert("message_expiry".into(), e.as_secs().into());
    }
    if !p.user.is_empty() {
        let pairs: Vec<serde_json::Value> = p.user.iter().map(|(k, v)| serde_json::json!([k, v])).collect();
        j.insert("user_properties".into(), pairs.into());
    }
    Some(j.into())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `cmd` with the payload on stdin; true when it exited 0.
async fn exec(cmd: &str, d: &Received) -> bool {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c").arg(cmd).stdin(std::process::Stdio::piped());
    c.env("STEADFAST_TOPIC", d.topic())
        .env("STEADFAST_QOS", (d.qos() as u8).to_string())
        .env("STEADFAST_RETAIN", if d.retain() { "1" } else { "0" })
        .env("STEADFAST_BROKER", d.broker());
    if let Some(i) = &d.identity() {
        c.env("STEADFAST_PRODUCER", &i.producer).env("STEADFAST_SEQ", i.seq.to_string());
    }
    // MQTT 5 properties, those the message has: the names of `--json`.
    if let Some(serde_json::Value::Object(props)) = properties_json(d) {
        for (k, v) in props {
            let value = match v {
                serde_json::Value::String(s) => s,
                v => v.to_string(),
            };
            // A NUL (which MQTT strings may not carry, but a broker may
            // pass on) would fail the spawn, and the message would come
            // again for ever: left out.
            if !value.contains('\0') {
                c.env(format!("STEADFAST_{}", k.to_uppercase()), value);
            }
        }
    }
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot run --exec command; the message will come again");
            return false;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is fine.
        let _ = stdin.write_all(d.payload()).await;
    }
    match child.wait().await {
        Ok(s) if s.success() => true,
        Ok(s) => {
            tracing::warn!(topic = %d.topic(), status = %s, "--exec command failed; the message will come again");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "--exec command lost; the message will come again");
            false
        }
    }
}

pub async fn run(mut a: SubArgs) -> Result<(), Failure> {
    if let Some(t) = a.conn.take_url().map_err(usage)? {
        if !a.topics.is_empty() {
            return Err(usage("-L gives the filter already; drop -t"));
        }
        a.topics.push(t);
    }
    let (cfg, mut output) = config(&a)?;
    if let Output::Sql(sink) = &mut output {
        if !a.register {
            sink.check().await?;
        }
    }
    let metrics = a.metrics.as_deref().map(crate::metrics::parse_addr).transpose().map_err(usage)?;
    if a.register {
        return register(&cfg).await;
    }
    let stop = Stop::watch()?;
    let listening = match metrics {
        Some(addr) => Some(crate::metrics::listen(addr).await?),
        None => None,
    };
    let (consumer, report) = Consumer::open(cfg).await.map_err(|e| open_failure(e, "--inbox"))?;
    if let Some(listening) = listening {
        let refresh = crate::metrics::refresh_with(consumer.metrics(), |m| async move {
            let _ = m.export().await;
        });
        if let Err(f) = listening.serve(refresh) {
            consumer.close().await;
            return Err(f);
        }
    }
    if !report.is_clean() {
        eprintln!(
            "steadfast: warning: the inbox was damaged and repaired: {}",
            report.problem.as_deref().unwrap_or("unknown damage")
        );
    }
    let result = Receiving::new(&consumer, &a, stop).run(&mut output).await;
    consumer.close().await;
    result
}

/// `--register`: the sessions and subscriptions, nothing received.
async fn register(cfg: &ConsumerConfig) -> Result<(), Failure> {
    Consumer::register(cfg).await.map_err(|e| Failure::other(anyhow!("{}", WithFlag(e))))?;
    eprintln!("steadfast: registered `{}` on {} broker(s)", cfg.client().client_id(), cfg.client().all_brokers().len());
    Ok(())
}

/// Ctrl-C and SIGTERM, watched from the start: either ends the run
/// cleanly.
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    fn watch() -> Result<Stop, Failure> {
        let interrupt =
            signal(SignalKind::interrupt()).map_err(|e| Failure::other(anyhow!("cannot watch for Ctrl-C: {e}")))?;
        let terminate =
            signal(SignalKind::terminate()).map_err(|e| Failure::other(anyhow!("cannot watch for SIGTERM: {e}")))?;
        Ok(Stop { interrupt, terminate })
    }

    /// Until either signal arrives.
    async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// How a run ends: `Break` with its result.
type Step<T = ()> = ControlFlow<Result<(), Failure>, T>;

/// A run of the consumer: messages handled (printed or `--exec`), then
/// acknowledged, until `-C`, `-W`, a signal, or an error.
struct Receiving<'a> {
    consumer: &'a Consumer,
    stop: Stop,
    events: broadcast::Receiver<steadfast::Event>,
    /// Until some broker took us, an error no retry can mend (a refused
    /// certificate or password) ends the run instead of retrying for ever.
    connected: bool,
    /// The events are read (until their channel closes).
    listening: bool,
    /// `-W`.
    deadline: Option<tokio::time::Instant>,
    /// `-C`.
    count: Option<u64>,
    no_eol: bool,
    handled: u64,
    stdout: tokio::io::Stdout,
}

impl<'a> Receiving<'a> {
    fn new(consumer: &'a Consumer, a: &SubArgs, stop: Stop) -> Self {
        Receiving {
            consumer,
            stop,
            events: consumer.events(),
            connected: false,
            listening: true,
            deadline: a.timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s)),
            count: a.count,
            no_eol: a.no_eol,
            handled: 0,
            stdout: tokio::io::stdout(),
        }
    }

    async fn run(mut self, output: &mut Output) -> Result<(), Failure> {
        loop {
            if self.count.is_some_and(|c| self.handled >= c) {
                return Ok(());
            }
            let first = match self.next().await {
                ControlFlow::Continue(Some(d)) => d,
                ControlFlow::Continue(None) => continue,
                ControlFlow::Break(end) => return end,
            };
            let step = match output {
                Output::Exec(cmd) => self.exec(cmd, first).await,
                Output::Sql(sink) => self.sql(sink, first).await,
                Output::Print(f) => self.print(f, first).await,
            };
            if let ControlFlow::Break(end) = step {
                return end;
            }
        }
    }

    /// The next message; `None` when only a connection event came.
    async fn next(&mut self) -> Step<Option<Received>> {
        let (consumer, deadline) = (self.consumer, self.deadline);
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, consumer.next()).await.ok(),
                None => Some(consumer.next().await),
            }
        };
        let first = tokio::select! {
            n = next => n,
            _ = self.stop.requested() => return ControlFlow::Break(Ok(())),
            e = self.events.recv(), if self.listening => {
                match e {
                    Ok(steadfast::Event::Connected { .. }) => self.connected = true,
                    // Before the first connection: a refusal that retrying
                    // cannot change (credentials, version) ends the run.
                    Ok(steadfast::Event::ConnectFailed { error, .. }) if !self.connected && !error.is_retryable() => {
                        return ControlFlow::Break(Err(Failure::other(anyhow!("{}", WithFlag(error)))));
                    }
                    // At any time: a subscription the broker refuses, as
                    // `--register` does (it would be asked again for ever).
                    Ok(steadfast::Event::Disconnected { error: error @ steadfast::ConnectError::SubscriptionRefused { .. }, .. }) => {
                        return ControlFlow::Break(Err(Failure::other(anyhow!("{error}"))));
                    }
                    Ok(_) => {}
                    // Events were missed: a connection among them, maybe.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.connected = true,
                    Err(broadcast::error::RecvError::Closed) => self.listening = false,
                }
                return ControlFlow::Continue(None);
            }
        };
        match first {
            // -W ran out.
            None => ControlFlow::Break(match self.count {
                Some(c) => Err(self.short_of(c)),
                // No broker took the connection the whole time: nothing
                // could have come, which is not "nothing came".
                None if !self.connected && self.handled == 0 => {
                    Err(Failure::timed_out(anyhow!("-W: no broker could be reached in time (see the warnings above)")))
                }
                None => Ok(()),
            }),
            Some(None) => ControlFlow::Break(Ok(())),
            Some(Some(d)) => ControlFlow::Continue(Some(d)),
        }
    }

    /// `--exec CMD` on `d`, then its acknowledgement. A failed command runs
    /// again on the same message, with a growing pause, before any later
    /// message: order is kept.
    async fn exec(&mut self, cmd: &str, d: Received) -> Step {
        let mut pause = Duration::from_millis(500);
        while !exec(cmd, &d).await {
            if self.stopped_during(pause).await {
                d.retry();
                let ran_out = self.deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                return ControlFlow::Break(match self.count {
                    Some(c) if ran_out => Err(self.short_of(c)),
                    _ => Ok(()),
                });
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
        d.ack();
        self.handled += 1;
        ControlFlow::Continue(())
    }

    /// `--sql`: what is ready now (`first` and up to 255 more) is written
    /// in one transaction with its shared inbox records, then
    /// acknowledged. A batch whose row the database refuses is written
    /// again one message at a time, in order, so that the message it
    /// refuses is named and the ones before it go. A failed write (the
    /// database down, a row refused) is tried again with a growing pause,
    /// before any later message; meanwhile nothing is acknowledged and the
    /// brokers keep the rest.
    async fn sql(&mut self, sink: &mut SqlSink, first: Received) -> Step {
        let batch = self.ready_batch(first, 256);
        let parts: Vec<Vec<Received>> = match sink.write(&batch).await {
            Ok(()) => return self.written(batch),
            Err(e) if e.refused && batch.len() > 1 => {
                tracing::warn!(error = %e.message, messages = batch.len(), "--sql: the database refused a row of this batch; writing its messages one at a time");
                batch.into_iter().map(|d| vec![d]).collect()
            }
            Err(e) => {
                tracing::error!(error = %e.message, messages = batch.len(), "--sql: cannot write; not acknowledged, trying again");
                self.sql_until_written(sink, &batch, true).await?;
                return self.written(batch);
            }
        };
        for part in parts {
            self.sql_until_written(sink, &part, false).await?;
            self.written(part)?;
        }
        ControlFlow::Continue(())
    }

    /// Acknowledges what `--sql` wrote.
    fn written(&mut self, batch: Vec<Received>) -> Step {
        self.handled += batch.len() as u64;
        for d in batch {
            d.ack();
        }
        ControlFlow::Continue(())
    }

    /// Writes `batch` until it is written, with a growing pause (first,
    /// when a write of it `failed` already); breaks when the run stops
    /// meanwhile (nothing acknowledged: it comes again).
    async fn sql_until_written(&mut self, sink: &mut SqlSink, batch: &[Received], failed: bool) -> Step {
        let mut pause = Duration::from_millis(200);
        let mut failing = failed;
        // A write that failed already (said by the caller): the pause first.
        let mut pause_first = failed;
        loop {
            if !std::mem::take(&mut pause_first) {
                match sink.write(batch).await {
                    Ok(()) => break,
                    Err(e) if !std::mem::replace(&mut failing, true) => match batch {
                        [d] if e.refused => {
                            let id = d.identity().map_or_else(|| "-".to_owned(), |i| i.to_property_value());
                            tracing::error!(error = %e.message, topic = d.topic(), identity = %id, "--sql: the database refuses this message; not acknowledged, trying it again before any later one (change the statement or the table to take it)");
                        }
                        _ => {
                            tracing::error!(error = %e.message, messages = batch.len(), "--sql: cannot write; not acknowledged, trying again");
                        }
                    },
                    Err(e) => tracing::debug!(error = %e.message, "--sql: still cannot write"),
                }
            }
            if self.stopped_during(pause).await {
                // Not acknowledged: they come again.
                let ran_out = self.deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                return ControlFlow::Break(match self.count {
                    Some(c) if ran_out => Err(self.short_of(c)),
                    _ => Ok(()),
                });
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        if failing {
            tracing::warn!("--sql: writing again");
        }
        ControlFlow::Continue(())
    }

    /// `first` and what is ready now, at most `max` (and what `-C` leaves).
    fn ready_batch(&self, first: Received, max: usize) -> Vec<Received> {
        let mut batch = vec![first];
        let room = self.count.map_or(u64::MAX, |c| c - self.handled) as usize;
        while batch.len() < room.min(max) {
            match self.consumer.try_next() {
                Some(d) => batch.push(d),
                None => break,
            }
        }
        batch
    }

    /// Waits `pause`; true when a signal or `-W` stopped the wait.
    async fn stopped_during(&mut self, pause: Duration) -> bool {
        let deadline = self.deadline;
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => false,
            _ = self.stop.requested() => true,
            _ = until_deadline => true,
        }
    }

    /// What is ready now (`first` and up to 1,023 more) is printed and
    /// flushed together, then acknowledged: a line is on stdout before its
    /// ack leaves.
    async fn print(&mut self, f: &Format, first: Received) -> Step {
        let batch = self.ready_batch(first, 1024);
        let mut out = Vec::new();
        for d in &batch {
            render(f, d, !self.no_eol, &mut out);
        }
        let written = async {
            self.stdout.write_all(&out).await?;
            self.stdout.flush().await
        };
        if let Err(e) = written.await {
            // Not acknowledged: the messages come again next time.
            return ControlFlow::Break(Err(Failure::other(anyhow!("cannot write to stdout: {e}"))));
        }
        self.handled += batch.len() as u64;
        for d in batch {
            d.ack();
        }
        ControlFlow::Continue(())
    }

    /// `-W` ran out before `-C` messages were handled.
    fn short_of(&self, count: u64) -> Failure {
        Failure::timed_out(anyhow!("-W: {} of {count} messages handled in time", self.handled))
    }
}
