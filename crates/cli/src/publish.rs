//! `steadfast pub`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use steadfast::{
    AppendError, BrokerSet, Class, Client, ClientConfig, ConnectError, Event, Message, OtherSets, OutboxConfig,
    Overflow, Policy, PolicyError, Properties, PublishError, Qos, ReceiptRule,
};
use steadfast_core::validate_topic_name;
use steadfast_store::AcceptFuture;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::broadcast;

use crate::args::PubArgs;
use crate::hints::{open_failure, FlagHint, WithFlag};
use crate::paths::{default_client_id, default_outbox, store_error};
use crate::progress::Progress;
use crate::routes;
use crate::values::{parse_bounds, parse_qos, parse_version};
use crate::Failure;

/// Where the messages come from.
#[derive(Debug)]
enum Input {
    Message(Vec<u8>),
    Lines,
    File(PathBuf),
    Stdin,
    Drain,
}

/// Validated `pub` options.
#[derive(Debug)]
struct Options {
    config: ClientConfig,
    route: Option<String>,
    topic: String,
    qos: Qos,
    retain: bool,
    /// `-D PUBLISH ...`: every message's MQTT 5 properties.
    props: Properties,
    input: Input,
    no_wait: bool,
    wait_timeout: Option<Duration>,
    summary: bool,
    metrics: Option<std::net::SocketAddr>,
    progress: bool,
    /// The command that sends what this run leaves queued, as printed in
    /// a hint: the same brokers, routes and connection flags.
    drain: String,
}

/// `-D PUBLISH NAME VALUE` (and `user-property KEY VALUE`), as
/// mosquitto_pub takes them. clap hands the values of every `-D` over as
/// one list: each occurrence starts at an MQTT packet's name.
fn properties(values: &[String]) -> Result<Properties, String> {
    const TAKEN: &str = "content-type, correlation-data, payload-format-indicator, response-topic, user-property";
    const COMMANDS: [&str; 7] = ["connect", "publish", "subscribe", "unsubscribe", "disconnect", "auth", "will"];
    let starts = |v: &String| COMMANDS.iter().any(|c| v.eq_ignore_ascii_case(c));
    let mut occurrences: Vec<&[String]> = Vec::new();
    let mut rest = values;
    while !rest.is_empty() {
        let end = rest.iter().skip(1).position(starts).map_or(rest.len(), |i| i + 1);
        occurrences.push(&rest[..end]);
        rest = &rest[end..];
    }
    let mut p = Properties::default();
    for d in occurrences {
        let [command, name, rest @ ..] = d else { return Err("-D takes PUBLISH NAME VALUE".into()) };
        if !command.eq_ignore_ascii_case("publish") {
            return Err(format!("-D {command}: only PUBLISH properties are taken (-D PUBLISH NAME VALUE; NAME one of {TAKEN}); steadfast sets its connection's own"));
        }
        let one = || match rest {
            [v] => Ok(v.as_str()),
            _ => Err(format!("-D PUBLISH {name} takes one value, got {}: quote a value with spaces", rest.len())),
        };
        match name.as_str() {
            "content-type" => p.content_type = Some(one()?.to_owned()),
            "response-topic" => {
                let topic = one()?;
                validate_topic_name(topic).map_err(|e| format!("-D PUBLISH response-topic: {e}"))?;
                p.response_topic = Some(topic.to_owned());
            }
            "correlation-data" => p.correlation_data = Some(one()?.as_bytes().to_vec()),
            "payload-format-indicator" => {
                p.payload_is_utf8 = match one()? {
                    "0" => false,
                    "1" => true,
                    v => return Err(format!("-D PUBLISH payload-format-indicator {v}: 0 (bytes) or 1 (UTF-8)")),
                }
            }
            "user-property" => match rest {
                [k, v] => p.user.push((k.clone(), v.clone())),
                _ => return Err("-D PUBLISH user-property takes a KEY and a VALUE".into()),
            },
            "message-expiry-interval" => {
                return Err("-D PUBLISH message-expiry-interval: give the message a deadline with --ttl instead (it is dropped, counted, once past it)".into())
            }
            other => return Err(format!("-D PUBLISH {other}: not a PUBLISH property steadfast sets; use one of {TAKEN}")),
        }
    }
    p.validate().map_err(|e| format!("-D: {e}"))?;
    Ok(p)
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::usage(anyhow!(msg.into()))
}

/// A policy error in the words of the flags that set the policy.
fn policy_usage(e: PolicyError) -> Failure {
    usage(match e {
        PolicyError::DeadlineWithoutTtl => "--class deadline needs --ttl DURATION (for example --ttl 15s)".to_owned(),
        PolicyError::TtlWithoutDeadline => {
            "--ttl applies to the deadline class; use --class deadline --ttl DURATION".to_owned()
        }
        PolicyError::UnknownClass(_) => format!("--class: {e}"),
        PolicyError::Priority(_) => format!("--priority: {e}"),
        PolicyError::ZeroBudget => format!("--max-attempts: {e}"),
        PolicyError::ZeroTtl => format!("--ttl: {e}"),
        _ => e.to_string(),
    })
}

impl Options {
    /// Checks the flags in a fixed order (the first mistake is the one
    /// reported) and builds the client's configuration.
    fn from_args(mut a: PubArgs) -> Result<Options, Failure> {
        if let Some(t) = a.conn.take_url().map_err(usage)? {
            if a.topic.is_some() {
                return Err(usage("-L gives the topic already; drop -t"));
            }
            a.topic = Some(t);
        }
        let urls = a.conn.urls().map_err(usage)?;
        let routes = named_routes(&a)?;
        let default_set = default_set(&a, urls, &routes)?;
        let input = input(&a)?;
        let topic = topic(&a, &input)?;
        let qos = parse_qos(a.qos).map_err(usage)?;
        let props = properties(&a.properties).map_err(usage)?;
        let version = parse_version(&a.conn.version).map_err(usage)?;
        let outbox = outbox_config(&a)?;
        let policy = policy(&a)?;
        let metrics = a.metrics.as_deref().map(crate::metrics::parse_addr).transpose().map_err(usage)?;
        let progress = progress(&a.progress)?;
        let config = client_config(&a, default_set, routes, policy, outbox)?;
        if !props.is_empty() && version.version == steadfast::ProtocolVersion::V311 && !version.auto {
            return Err(usage("-D sets MQTT 5 properties, which MQTT 3.1.1 (-V 311) cannot carry; use -V 5 or -V auto (a broker that speaks 3.1.1 only gets the messages without them)"));
        }
        if a.envelope && version.only_5() {
            return Err(usage("--envelope is for MQTT 3.1.1 (-V 311); MQTT 5 carries the identity as a user property"));
        }
        version.warn_without_envelope(config.all_brokers().len(), a.envelope);
        let drain = drain_command(&a, &config);
        Ok(Options {
            drain,
            route: a.route.clone(),
            config,
            topic,
            qos,
            retain: a.retain,
            props,
            input,
            no_wait: a.no_wait,
            wait_timeout: a.wait_timeout,
            summary: a.summary,
            metrics,
            progress,
        })
    }
}

/// `steadfast pub --drain` with what it takes to reach this run's brokers
/// the same way (set, mode and quorum, session, version, credentials, TLS;
/// a password given with -P is not repeated: `-P PASSWORD` stands for it),
/// each value quoted for a POSIX shell where it needs it.
fn drain_command(a: &PubArgs, config: &ClientConfig) -> String {
    let c = &a.conn;
    let mut words: Vec<String> = vec!["steadfast".into(), "pub".into(), "--drain".into()];
    let mut flag = |f: &str, v: Option<String>| {
        if let Some(v) = v {
            words.push(f.to_owned());
            words.push(shell_word(&v));
        }
    };
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    for b in config.broker_set().brokers() {
        flag("-b", Some(b.to_string()));
    }
    flag("--mode", (a.mode != "failover").then(|| a.mode.clone()));
    flag("--ack", a.ack.clone());
    flag("--catch-up-for", a.catch_up_for.map(ms));
    flag("--failback-after", (a.failback_after != Duration::from_secs(30)).then(|| ms(a.failback_after)));
    flag("--config", a.config.as_ref().map(|p| p.display().to_string()));
    flag("-i", a.id.clone());
    flag("-V", (c.version != "auto").then(|| c.version.clone()));
    flag("-k", (c.keepalive != 30).then(|| c.keepalive.to_string()));
    flag("--max-packet", c.max_packet.clone());
    flag("-u", c.username.clone());
    flag("-P", c.password.as_ref().map(|_| "PASSWORD".to_owned()));
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    flag("--pw-file", path(&c.password_file));
    flag("--cafile", path(&c.cafile));
    flag("--cert", path(&c.cert));
    flag("--key", path(&c.key));
    for alpn in &c.alpn {
        flag("--alpn", Some(alpn.clone()));
    }
    flag("--outbox", Some(config.outbox_dir().display().to_string()));
    if c.insecure {
        words.push("--insecure".into());
    }
    if a.envelope {
        words.push("--envelope".into());
    }
    words.join(" ")
}

/// `s` as one word of a POSIX shell: as it is when it is plain, else in
/// single quotes.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._:@%+=,-".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The named routes of `--config`; `--route` must be one of them.
fn named_routes(a: &PubArgs) -> Result<Vec<(String, BrokerSet)>, Failure> {
    let routes = match &a.config {
        Some(path) => routes::load(path).map_err(usage)?,
        None => Vec::new(),
    };
    if let Some(r) = &a.route {
        if !routes.iter().any(|(n, _)| n == r) {
            let known: Vec<&str> = routes.iter().map(|(n, _)| n.as_str()).collect();
            return Err(usage(match a.config {
                None => format!("--route {r} needs --config FILE with a [routes.{r}] table"),
                Some(_) => format!("no route `{r}` in --config; it has: {}", known.join(", ")),
            }));
        }
    }
    Ok(routes)
}

/// The default set: the -b brokers with the mode flags, or, with only
/// --route, that route's set.
fn default_set(a: &PubArgs, urls: Vec<String>, routes: &[(String, BrokerSet)]) -> Result<BrokerSet, Failure> {
    if urls.is_empty() {
        if let Some((_, set)) = routes.iter().find(|(n, _)| Some(n) == a.route.as_ref()) {
            return Ok(set.clone());
        }
    }
    // No broker and no route: localhost:1883, as mosquitto_pub.
    let urls = crate::conn::or_default(urls);
    if a.mode != "fanout" && (a.ack.is_some() || a.catch_up_for.is_some()) {
        return Err(usage("--ack and --catch-up-for only apply to fanout; add --mode fanout or drop them"));
    }
    let spec = routes::SetSpec {
        brokers: urls,
        mode: Some(a.mode.clone()),
        ack: a.ack.clone().map(routes::Ack::Word),
        failback_after: Some(a.failback_after),
        catch_up_for: a.catch_up_for,
    };
    spec.build("-b brokers").map_err(|e| usage(format!("{e}{}", e.config_error().map_or("", |c| c.flag_hint()))))
}

/// Where the messages come from: the first of -m, -l, -f, -s, -n, --drain.
fn input(a: &PubArgs) -> Result<Input, Failure> {
    Ok(match (&a.message, a.lines, &a.file, a.stdin, a.null, a.drain) {
        (Some(m), ..) => Input::Message(m.clone().into_bytes()),
        (_, true, ..) => Input::Lines,
        (_, _, Some(f), ..) => Input::File(f.clone()),
        (_, _, _, true, ..) => Input::Stdin,
        (_, _, _, _, true, _) => Input::Message(Vec::new()),
        (_, _, _, _, _, true) => Input::Drain,
        _ => return Err(usage("nothing to publish; give one of -m MSG, -l, -f FILE, -s, -n, or --drain")),
    })
}

/// The topic, checked; none is needed to drain the outbox.
fn topic(a: &PubArgs, input: &Input) -> Result<String, Failure> {
    match (&a.topic, input) {
        (Some(t), _) => {
            validate_topic_name(t).map_err(|e| usage(format!("invalid topic: {e}")))?;
            Ok(t.clone())
        }
        (None, Input::Drain) => Ok(String::new()),
        (None, _) => Err(usage("no topic given; use -t TOPIC")),
    }
}

/// The outbox's bounds and what happens when they are reached.
fn outbox_config(a: &PubArgs) -> Result<OutboxConfig, Failure> {
    let overflow = parse_overflow("--overflow", &a.overflow)?;
    let deadline_overflow =
        a.deadline_overflow.as_deref().map(|o| parse_overflow("--deadline-overflow", o)).transpose()?;
    let bounds: Vec<String> = a.max_queue.iter().chain(&a.max_queue_bytes).cloned().collect();
    let (max_messages, max_bytes) = parse_bounds("--max-queue", &bounds).map_err(usage)?;
    Ok(OutboxConfig {
        max_messages,
        max_bytes,
        max_age_ms: a.max_age.map(|d| d.as_millis() as u64),
        overflow,
        deadline_overflow,
    })
}

/// The messages' delivery policy, checked.
fn policy(a: &PubArgs) -> Result<Policy, Failure> {
    let policy = Policy {
        class: Class::parse(&a.class, a.ttl).map_err(policy_usage)?,
        max_attempts: a.max_attempts,
        keep_latest: a.keep_latest,
        priority: a.priority,
    };
    policy.validate().map_err(policy_usage)?;
    Ok(policy)
}

/// `--progress`: whether to draw the progress line.
fn progress(when: &str) -> Result<bool, Failure> {
    match when {
        "auto" => Ok(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        "always" => Ok(true),
        "never" => Ok(false),
        o => Err(usage(format!("--progress `{o}`: use auto, always or never"))),
    }
}

/// The client: its id and outbox, the broker sets, and the connection
/// flags.
fn client_config(
    a: &PubArgs,
    default_set: BrokerSet,
    routes: Vec<(String, BrokerSet)>,
    policy: Policy,
    outbox: OutboxConfig,
) -> Result<ClientConfig, Failure> {
    let id = a.id.clone().unwrap_or_else(default_client_id);
    let outbox_dir = a.outbox.clone().unwrap_or_else(|| default_outbox(&id));
    let first = default_set.brokers()[0].clone();
    let mut config = ClientConfig::new(id, first, outbox_dir)
        .brokers(default_set)
        .envelope(a.envelope)
        .clean_start(a.clean)
        .session_expiry(a.session_expiry)
        .backoff(a.backoff)
        .policy(policy)
        .outbox(outbox)
        .other_sets(if a.retarget { OtherSets::Retarget } else { OtherSets::Keep })
        .poison_after(a.poison_after)
        // Several `pub` at once on one outbox (cron jobs, `find -exec`):
        // the later ones add their messages and the first delivers them.
        .join_busy_outbox(true);
    if let Some(t) = a.ack_timeout {
        config = config.ack_timeout(t);
    }
    if let Some(rule) = receipt_rule(a)? {
        config = config.receipts(rule);
    }
    if let Some(p) = &a.receipt_prefix {
        config = config.receipt_prefix(p.clone());
    }
    if let Some(n) = a.max_inflight {
        config = config.max_inflight(n);
    }
    for (name, set) in routes {
        config = config.route(name, set);
    }
    a.conn.apply(config).map_err(usage)
}

/// The receipts every message asks for, from `--receipts`,
/// `--receipt-from`, `--receipt-need` and `--receipt-timeout`.
fn receipt_rule(a: &PubArgs) -> Result<Option<ReceiptRule>, Failure> {
    if !a.receipts && a.receipt_from.is_empty() && a.receipt_need.is_none() {
        return Ok(None);
    }
    ReceiptRule::from_parts(a.receipt_timeout, a.receipt_need.as_deref(), a.receipt_from.clone())
        .map(Some)
        .map_err(|e| usage(format!("--receipts: {e}")))
}

fn parse_overflow(flag: &str, s: &str) -> Result<Overflow, Failure> {
    Overflow::parse(s).map_err(|e| usage(format!("{flag}: {e}")))
}

/// Enqueues messages with a bounded number awaiting their disk sync.
struct Pipeline {
    client: Client,
    pending: VecDeque<AcceptFuture>,
    /// Accepted in this run (shared with the progress line).
    accepted: Arc<AtomicU64>,
    /// Not accepted: the outbox was full and its policy dropped them.
    dropped: u64,
}

const PIPELINE_DEPTH: usize = 8192;

impl Pipeline {
    async fn push(&mut self, msg: Message) -> Result<(), Failure> {
        let fut = self.client.enqueue(msg).map_err(|e| self.failure(e))?;
        self.pending.push_back(fut);
        if self.pending.len() >= PIPELINE_DEPTH {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), Failure> {
        if let Some(f) = self.pending.pop_front() {
            match f.await {
                // Sequence 0: a best-effort message, never stored, so never
                // "accepted" (its fate is counted with the drops or the
                // deliveries).
                Ok(0) => {}
                Ok(_) => {
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                }
                // The chosen overflow policy dropped it: counted in the
                // outbox, reported at the end; the run goes on.
                Err(e @ AppendError::Dropped { .. }) => {
                    if self.dropped == 0 {
                        eprintln!("steadfast: warning: {e}");
                    }
                    self.dropped += 1;
                }
                Err(e) => return Err(self.failure(PublishError::from(e))),
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), Failure> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    fn failure(&self, e: PublishError) -> Failure {
        let accepted = self.accepted.load(Ordering::Relaxed);
        let note = format!("{accepted} message(s) accepted before this one are safe in the outbox");
        match e {
            PublishError::Topic(_)
            | PublishError::TooLarge { .. }
            | PublishError::RetainUnavailable { .. }
            | PublishError::Properties(_) => Failure::usage(anyhow!("{e}; {note}")),
            PublishError::Outbox(AppendError::Store(e)) => {
                Failure::other(anyhow!("{}; {note}", store_error(e, "--outbox")))
            }
            e => Failure::other(anyhow!("{e}; {note}")),
        }
    }
}

pub async fn run(a: PubArgs) -> Result<(), Failure> {
    let o = Options::from_args(a)?;
    // Registered now, so Ctrl-C at any point ends the run cleanly: the
    // outbox is closed properly and what was accepted stays queued.
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| Failure::other(anyhow!("cannot watch for Ctrl-C: {e}")))?;
    // SIGTERM (cron, systemd, `timeout`) ends it the same way: the outbox
    // closed properly, and the user told where the messages are.
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| Failure::other(anyhow!("cannot watch for SIGTERM: {e}")))?;
    let dir = o.config.outbox_dir().to_owned();
    // Read before the client opens: its drivers may deliver at once, and a
    // count taken after would miss what they sent (--summary).
    let queued_before = queued_on_disk(&dir).await;
    let listening = match o.metrics {
        Some(addr) => Some(crate::metrics::listen(addr).await?),
        None => None,
    };
    let (client, report) = Client::open(o.config.clone()).await.map_err(|e| open_failure(e, "--outbox"))?;
    if !report.is_clean() {
        eprintln!(
            "steadfast: warning: the outbox {} was damaged: {}; {} message(s) recovered; damaged files kept in {:?}",
            dir.display(),
            report.problem.as_deref().unwrap_or("unknown damage"),
            report.salvaged,
            report.quarantined
        );
    }
    for (set, n) in client.held() {
        let b: String = set.split(' ').map(|u| format!(" -b {}", shell_word(u))).collect();
        // The same client id: its session on those brokers, not another's.
        let id = format!(" -i {}", shell_word(o.config.client_id()));
        eprintln!(
            "steadfast: warning: {n} message(s) in the outbox {} were accepted for {set}; they stay queued: `steadfast pub --drain{b}{id} --outbox {}` sends them there, --retarget sends them to the brokers given now",
            dir.display(),
            shell_word(&dir.display().to_string())
        );
    }
    let mut events = client.events();
    let before = Before { drops: drop_counts(&client).await, at_ms: steadfast_store::now_ms() };
    if client.is_joined() {
        tracing::info!(outbox = %dir.display(), "the outbox is in use by another pub: the messages are added to it and that process sends them");
    } else {
        first_attempt(&client, &mut events).await?;
    }
    if let Some(listening) = listening {
        let refresh = crate::metrics::refresh_with(client.clone(), |c| async move {
            let _ = c.export_metrics().await;
        });
        if let Err(f) = listening.serve(refresh) {
            client.close().await;
            return Err(f);
        }
    }
    let accepted = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(o.progress, &client, accepted.clone());
    let mut p = Pipeline { client: client.clone(), pending: VecDeque::new(), accepted, dropped: 0 };
    let fed = tokio::select! {
        sent = async { feed(&o, &mut p).await.and(p.finish().await) } => sent,
        _ = interrupt.recv() => Err(interrupted(&client, &dir, &o.drain).await),
        _ = terminate.recv() => Err(Failure::terminated(interrupted(&client, &dir, &o.drain).await.error)),
    };
    if let Err(f) = fed {
        progress.finish();
        client.close().await;
        return Err(f);
    }
    let mut client = client;
    let result = loop {
        if o.no_wait {
            break report_drops(&client, &dir, &before, None).await;
        }
        let waited = tokio::select! {
            r = wait_joined(&client, &mut events, (o.wait_timeout, &o.drain), &dir, &before) => r,
            _ = interrupt.recv() => Waited::Done(Err(interrupted(&client, &dir, &o.drain).await)),
            _ = terminate.recv() => Waited::Done(Err(Failure::terminated(interrupted(&client, &dir, &o.drain).await.error))),
        };
        match waited {
            Waited::Done(r) => break r,
            // The pub that held the outbox ended before sending what this
            // one added: this one takes the outbox over and sends it.
            Waited::HolderGone => {
                client.clone().close().await;
                tracing::info!(outbox = %dir.display(), "the pub that held the outbox ended; this one sends what is queued");
                client = match Client::open(o.config.clone()).await {
                    Ok((c, _)) => c,
                    Err(e) => break Err(open_failure(e, "--outbox")),
                };
                events = client.events();
            }
        }
    };
    progress.finish();
    if o.summary && client.is_joined() {
        // The outbox's counts are the holder's and the other pubs': what
        // this one can say is of its own messages.
        let accepted = p.accepted.load(Ordering::Relaxed);
        let how = if result.is_ok() { "which delivered them (the outbox is empty)" } else { "which sends them" };
        eprintln!("steadfast: {accepted} accepted into the outbox {}, held by another pub, {how}", dir.display());
    } else if o.summary {
        // What left the outbox in this run, the older messages a --drain
        // sent included: what was there plus what came, less what is left
        // and what was dropped. Poison is both: counted as dropped, kept
        // in the outbox (and said apart).
        let accepted = p.accepted.load(Ordering::Relaxed);
        let queued = client.status().await.map(|s| s.queued).unwrap_or(0);
        let after = drop_counts(&client).await;
        let total = |d: &[(steadfast::DropReason, u64)]| d.iter().map(|(_, n)| n).sum::<u64>();
        let poison = |d: &[(steadfast::DropReason, u64)]| {
            d.iter().filter(|(r, _)| *r == steadfast::DropReason::Poison).map(|(_, n)| n).sum::<u64>()
        };
        let dropped = total(&after).saturating_sub(total(&before.drops));
        let new_poison = poison(&after).saturating_sub(poison(&before.drops));
        let delivered = (queued_before + accepted + new_poison).saturating_sub(queued + dropped);
        let aside = client.outbox_state().borrow().poisoned;
        let aside = if aside > 0 { format!(" ({aside} of them moved aside as poison)") } else { String::new() };
        eprintln!(
            "steadfast: {accepted} accepted, {delivered} delivered, {dropped} dropped, {queued} queued{aside} in {}",
            dir.display()
        );
    }
    client.close().await;
    result
}

/// Messages queued in the outbox at `dir` now (0 when there is none yet),
/// read without its lock.
async fn queued_on_disk(dir: &std::path::Path) -> u64 {
    let d = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        steadfast_store::SqliteStore::open_read_only(&d).and_then(|mut s| {
            use steadfast_store::Store;
            s.totals()
        })
    })
    .await
    .ok()
    .and_then(Result::ok)
    .map_or(0, |t| t.count)
}

enum Waited {
    Done(Result<(), Failure>),
    /// This pub joined the outbox and the process that held it is gone.
    HolderGone,
}

/// [`wait_delivered`]; a pub that joined a busy outbox also watches for
/// its holder to end (then the messages would wait for nobody).
async fn wait_joined(
    client: &Client,
    events: &mut broadcast::Receiver<Event>,
    limit: (Option<Duration>, &str),
    dir: &std::path::Path,
    before: &Before,
) -> Waited {
    let joined = client.is_joined();
    let waiting = wait_delivered(client, events, limit, dir, before);
    tokio::pin!(waiting);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            r = &mut waiting => return Waited::Done(r),
            _ = tick.tick(), if joined => {
                let d = dir.to_owned();
                let in_use = tokio::task::spawn_blocking(move || steadfast_store::SqliteStore::is_in_use(&d)).await;
                if matches!(in_use, Ok(false)) {
                    return Waited::HolderGone;
                }
            }
        }
    }
}

/// Gives the first connection attempt a moment, so that a refusal
/// (credentials, version) is reported before anything is accepted and the
/// broker's size limit is known. Never waits long: publishing with the
/// broker down is normal.
async fn first_attempt(client: &Client, events: &mut broadcast::Receiver<Event>) -> Result<(), Failure> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(Event::Connected { .. }) => return Ok(()),
                Ok(Event::ConnectFailed { error, .. }) => return Err(error),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), wait).await {
        Ok(Err(e)) if !e.is_retryable() => {
            let f = Failure::other(anyhow!("{}; nothing was published", WithFlag(e)));
            client.clone().close().await;
            Err(f)
        }
        _ => Ok(()),
    }
}

async fn feed(o: &Options, p: &mut Pipeline) -> Result<(), Failure> {
    let msg = |payload: Vec<u8>| {
        let m = Message::new(o.topic.clone(), payload).qos(o.qos).retain(o.retain).props(o.props.clone());
        match &o.route {
            Some(r) => m.route(r.clone()),
            None => m,
        }
    };
    match &o.input {
        Input::Drain => Ok(()),
        Input::Message(m) => p.push(msg(m.clone())).await,
        Input::File(path) => {
            let data = tokio::fs::read(path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(Failure::usage)?;
            p.push(msg(data)).await
        }
        Input::Stdin => {
            let mut data = Vec::new();
            tokio::io::stdin().read_to_end(&mut data).await.context("cannot read stdin").map_err(Failure::other)?;
            p.push(msg(data)).await
        }
        Input::Lines => {
            let mut input = BufReader::new(tokio::io::stdin());
            // Read into one buffer, each line then copied out at its size:
            // not a new buffer grown from nothing for every line.
            let mut buf = Vec::new();
            loop {
                buf.clear();
                if input.read_until(b'\n', &mut buf).await.context("cannot read stdin").map_err(Failure::other)? == 0 {
                    return Ok(());
                }
                let mut line: &[u8] = &buf;
                if let Some(rest) = line.strip_suffix(b"\n") {
                    line = rest;
                }
                if let Some(rest) = line.strip_suffix(b"\r") {
                    line = rest;
                }
                p.push(msg(line.to_vec())).await?;
            }
        }
    }
}

async fn interrupted(client: &Client, dir: &std::path::Path, drain: &str) -> Failure {
    let queued = client.status().await.map(|s| s.queued).unwrap_or(0);
    Failure::interrupted(anyhow!(
        "interrupted; {queued} message(s) kept in the outbox {}; send them later with `{drain}`",
        dir.display()
    ))
}

/// Drops counted in the outbox so far, by reason (exact: events can lag).
async fn drop_counts(client: &Client) -> Vec<(steadfast::DropReason, u64)> {
    client.status().await.map(|s| s.drops).unwrap_or_default()
}

async fn wait_delivered(
    client: &Client,
    events: &mut broadcast::Receiver<Event>,
    (limit, drain): (Option<Duration>, &str),
    dir: &std::path::Path,
    before: &Before,
) -> Result<(), Failure> {
    let mut first_drop = None;
    let mut last_error: Option<ConnectError> = None;
    let idle = client.wait_idle();
    tokio::pin!(idle);
    let deadline = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut idle => break,
            _ = &mut deadline => {
                let queued = client.status().await.map(|s| s.queued).unwrap_or(0);
                let why = last_error.map(|e| format!(" (last error: {})", WithFlag(e))).unwrap_or_default();
                return Err(Failure::timed_out(anyhow!(
                    "timed out waiting for delivery{why}; {queued} message(s) kept in the outbox {}; send them later with `{drain}`",
                    dir.display()
                )));
            }
            e = events.recv() => match e {
                Ok(Event::Dropped(d)) if d.reason != steadfast::DropReason::Superseded => { first_drop.get_or_insert(d); }
                Ok(Event::Refused { broker, id, topic, reason }) => {
                    return Err(Failure::other(anyhow!(
                        "{broker} refused message #{id} to `{topic}` (reason code {reason}); it stays queued in the outbox {} and is sent again later",
                        dir.display()
                    )));
                }
                Ok(Event::ConnectFailed { error, .. }) | Ok(Event::Disconnected { error, .. }) => {
                    if !error.is_retryable() {
                        return Err(Failure::other(anyhow!("{}; the messages stay queued in the outbox", WithFlag(error))));
                    }
                    last_error = Some(error);
                }
                _ => {}
            },
        }
    }
    report_drops(client, dir, before, first_drop).await
}

/// What the outbox had dropped when this run began, and when that was.
struct Before {
    drops: Vec<(steadfast::DropReason, u64)>,
    at_ms: u64,
}

/// Fails with the count by reason when messages were dropped since
/// `before`, except `superseded` (keep-latest sent the newer value
/// instead), which is only mentioned.
async fn report_drops(
    client: &Client,
    dir: &std::path::Path,
    before: &Before,
    first_drop: Option<steadfast_store::Dropped>,
) -> Result<(), Failure> {
    let after = drop_counts(client).await;
    let new = |reason: &steadfast::DropReason, n: u64| {
        n - before.drops.iter().find(|(r, _)| r == reason).map(|(_, n)| *n).unwrap_or(0).min(n)
    };
    // Keep-latest did what it was asked: a newer value of the same topic
    // went instead. Said, but not a failure.
    let superseded = after.iter().find(|(r, _)| *r == steadfast::DropReason::Superseded).map_or(0, |(r, n)| new(r, *n));
    if superseded > 0 {
        eprintln!("steadfast: {superseded} message(s) replaced by a newer value of their topic (keep-latest)");
    }
    let dropped: Vec<String> = after
        .iter()
        .filter(|(r, _)| *r != steadfast::DropReason::Superseded)
        .filter_map(|(reason, n)| {
            let d = new(reason, *n);
            (d > 0).then(|| format!("{d} {reason}"))
        })
        .collect();
    if dropped.is_empty() {
        return Ok(());
    }
    let first = first_drop.map(|d| format!(" (first: #{} to `{}`)", d.id, d.topic)).unwrap_or_default();
    let poison = after.iter().any(|(r, n)| *r == steadfast::DropReason::Poison && new(r, *n) > 0);
    let kept = if poison {
        // The newest moved aside in this run, named with its cause (a
        // refusal's reason code), read from the outbox.
        let list = client.poisoned().await.unwrap_or_default();
        let newest = list.iter().filter(|p| p.at_ms >= before.at_ms).max_by_key(|p| (p.at_ms, p.id)).map(|p| {
            let broker = if p.broker.is_empty() { "a broker" } else { &p.broker };
            format!(" (#{} to `{}`, {broker}: {})", p.id, p.topic, p.cause)
        });
        format!(
            "; poison is kept in the outbox{}: `steadfast poison --outbox {}` lists it, with --requeue or --delete",
            newest.unwrap_or_default(),
            dir.display()
        )
    } else {
        String::new()
    };
    Err(Failure::other(anyhow!(
        "messages were not delivered: {}{first}; see `steadfast status --outbox {}`{kept}",
        dropped.join(", "),
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::args::{Cli, Command};

    /// Without -b, -h or -p: localhost:1883, as mosquitto_pub and
    /// mosquitto_sub (checked on the parsed configuration: no test may
    /// reach a broker that happens to run on this machine's default port).
    #[test]
    fn no_broker_given_means_localhost_1883() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["steadfast"][..], args].concat()).expect("parses");
        let Command::Pub(a) = parse(&["pub", "-t", "a", "-m", "x", "--outbox", "/nonexistent"]).command else {
            panic!("pub")
        };
        let o = super::Options::from_args(*a).unwrap_or_else(|e| panic!("{e:?}"));
        let brokers: Vec<String> = o.config.all_brokers().iter().map(|u| u.to_string()).collect();
        assert_eq!(brokers, ["mqtt://localhost:1883"]);
        let Command::Sub(a) = parse(&["sub", "-t", "a", "--inbox", "/nonexistent"]).command else { panic!("sub") };
        let (c, _) = crate::subscribe::config(&a).unwrap_or_else(|e| panic!("{e:?}"));
        let brokers: Vec<String> = c.client().all_brokers().iter().map(|u| u.to_string()).collect();
        assert_eq!(brokers, ["mqtt://localhost:1883"]);
        // -p alone keeps its meaning: that port on this machine.
        let Command::Pub(a) = parse(&["pub", "-p", "1999", "-t", "a", "-m", "x", "--outbox", "/nonexistent"]).command
        else {
            panic!("pub")
        };
        let o = super::Options::from_args(*a).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(o.config.all_brokers()[0].to_string(), "mqtt://127.0.0.1:1999");
    }

    /// The drain hint reaches the brokers the same way: a fanout stays a
    /// fanout with its quorum, the session its id; odd paths are quoted.
    #[test]
    fn the_drain_hint_keeps_the_set_its_mode_and_the_session() {
        let args = [
            "steadfast",
            "pub",
            "-b",
            "mqtt://a:1883",
            "-b",
            "mqtt://b:1883",
            "--mode",
            "fanout",
            "--ack",
            "all",
            "-i",
            "dev 1",
            "-k",
            "10",
            "-t",
            "t",
            "-m",
            "x",
            "--outbox",
            "/tmp/it's here",
        ];
        let Command::Pub(a) = Cli::try_parse_from(args).expect("parses").command else { panic!("pub") };
        let o = super::Options::from_args(*a).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            o.drain,
            "steadfast pub --drain -b mqtt://a:1883 -b mqtt://b:1883 --mode fanout --ack all -i 'dev 1' -k 10 --outbox '/tmp/it'\\''s here'"
        );
    }
}
