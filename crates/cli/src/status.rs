//! `steadfast status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use serde::Serialize;
use steadfast_store::{now_ms, Report, SqliteStore, StoreError, StoreKind};

use crate::args::StatusArgs;
use crate::paths::default_outbox;
use crate::values::human_bytes;
use crate::Failure;

#[derive(Serialize)]
struct Json {
    /// `outbox` or `inbox`: what the directory holds.
    kind: &'static str,
    outbox: String,
    owner_running: bool,
    queued: u64,
    bytes: u64,
    oldest_age_ms: Option<u64>,
    dropped: serde_json::Map<String, serde_json::Value>,
    brokers: Vec<BrokerJson>,
    /// Consumer (`sub`): identities in the inbox.
    inbox: u64,
    /// Consumer counters: handled, duplicates, gaps suspected, out of order.
    counters: serde_json::Map<String, serde_json::Value>,
    /// The producer id of the outbox's messages.
    producer: Option<String>,
    /// The sequence number of the newest message ever accepted: the
    /// producer's messages so far are `producer/1` to `producer/last_id`.
    last_id: u64,
    /// Queued messages held for other broker sets (an earlier run's -b).
    held: Vec<serde_json::Value>,
    /// Messages moved aside as poison (kept; `steadfast poison`).
    poisoned: Vec<serde_json::Value>,
    /// End-to-end receipts: messages delivered and awaiting them (counted
    /// in `queued`), the longest wait so far, and what receipts did.
    receipts: ReceiptsJson,
}

#[derive(Serialize)]
struct ReceiptsJson {
    awaiting: u64,
    oldest_wait_ms: Option<u64>,
    counted: u64,
    handled: u64,
    republished: u64,
    /// A bridge route: asks for receipts passed on, receipts handed back.
    relayed: u64,
    returned: u64,
}

#[derive(Serialize)]
struct BrokerJson {
    url: String,
    state: String,
    since_ms: u64,
    last_error: Option<String>,
    /// In backoff: when the next attempt starts (ms since the epoch).
    retry_at_ms: Option<u64>,
    /// New messages go to it (failover: the active broker).
    active: bool,
    acked: u64,
    connects: u64,
    /// Queued messages it has not acknowledged.
    lag: u64,
    /// Messages it missed (fanout catch-up window passed first).
    missed: u64,
    /// The in-flight window learned from it, if it ended links with many
    /// messages in flight.
    window: Option<u16>,
    /// In the last run's configuration (false: a broker of an earlier run,
    /// kept for its history).
    configured: bool,
    /// The link's ack timeout (ms), whether it adapts to the round trips
    /// measured, and the smoothed round-trip time and its mean deviation
    /// (microseconds), as last recorded.
    ack_timeout_ms: Option<u64>,
    ack_timeout_adaptive: Option<bool>,
    round_trip_us: Option<u64>,
    round_trip_deviation_us: Option<u64>,
}

pub async fn run(a: StatusArgs) -> Result<(), Failure> {
    if let Some(path) = &a.bridge {
        return bridge(path, a.json).await;
    }
    let url = a.outbox.as_ref().and_then(|p| p.to_str());
    if let Some(url) = url.filter(|s| s.starts_with("postgres://") || s.starts_with("postgresql://")) {
        return groups(url, a.group.as_deref(), a.json).await;
    }
    if a.group.is_some() {
        return Err(Failure::usage(anyhow!("--group reads a shared inbox: give --inbox postgres://USER@HOST:PORT/DB")));
    }
    let dir = match (a.outbox, a.id) {
        (Some(d), _) => d,
        (None, Some(id)) => default_outbox(&id),
        (None, None) => return every_default_store(a.json).await,
    };
    if let Some(j) = show(&dir, a.json).await? {
        println!("{}", serde_json::to_string_pretty(&j).map_err(|e| Failure::other(anyhow!(e)))?);
    }
    Ok(())
}

/// `status --inbox postgres://...`: each consumer group of the shared
/// inbox (or `--group`), its members and what they handled.
async fn groups(url: &str, only: Option<&str>, json: bool) -> Result<(), Failure> {
    let groups = steadfast::group_status(url, only).await.map_err(|e| match e {
        steadfast::GroupStatusError::Config(e) => Failure::usage(anyhow!(e)),
        e => Failure::other(anyhow!(e)),
    })?;
    if let (Some(name), true) = (only, groups.is_empty()) {
        return Err(Failure::other(anyhow!(
            "no consumer group `{name}` in this shared inbox (its members record there once they handled something)"
        )));
    }
    if json {
        let all: Vec<serde_json::Value> = groups
            .iter()
            .map(|g| {
                let members: Vec<serde_json::Value> = g
                    .members
                    .iter()
                    .map(|m| {
                        serde_json::json!({
                            "member": m.member,
                            "last_seen_ms": m.last_seen.as_millis() as u64,
                            "handled": m.handled,
                            "duplicates": m.duplicates,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "group": g.group,
                    "handled": g.handled(),
                    "duplicates": g.duplicates(),
                    "remembered": g.remembered,
                    "claims": g.claims,
                    "members": members,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&all).map_err(|e| Failure::other(anyhow!(e)))?);
        return Ok(());
    }
    for g in &groups {
        println!(
            "group {}: {} handled, {} duplicates removed, {} identities remembered, {} being handled now",
            g.group,
            g.handled(),
            g.duplicates(),
            g.remembered,
            g.claims
        );
        for m in &g.members {
            println!(
                "  {}: {} handled, {} duplicates removed, last seen {} ago",
                m.member,
                m.handled,
                m.duplicates,
                human_age(m.last_seen)
            );
        }
    }
    if groups.is_empty() {
        println!("no consumer group has recorded anything in this shared inbox yet");
    }
    Ok(())
}

/// No store named: every outbox and inbox in the default place (where
/// `pub` and `sub` put them without `--outbox` or `--inbox`), a line each.
async fn every_default_store(json: bool) -> Result<(), Failure> {
    let root = crate::paths::state_root();
    let mut dirs: Vec<std::path::PathBuf> = ["outbox", "inbox"]
        .iter()
        .filter_map(|k| std::fs::read_dir(root.join(k)).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut all = Vec::new();
    for d in &dirs {
        match read(d).await {
            Ok(s) if json => all.push(serde_json::to_value(s.json()).map_err(|e| Failure::other(anyhow!(e)))?),
            Ok(s) => s.print_line(),
            Err(e) if json => all.push(serde_json::json!({ "outbox": d.display().to_string(), "error": e.message() })),
            Err(e) => println!("?        {}  {}", d.display(), e.message()),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all).map_err(|e| Failure::other(anyhow!(e)))?);
    } else if dirs.is_empty() {
        println!(
            "no outbox or inbox in {} (give --outbox DIR, --inbox DIR, -i CLIENT_ID or --bridge FILE for others)",
            root.display()
        );
    }
    Ok(())
}

/// Every route of a bridge: its outbox (depth, age, destination brokers)
/// and its inbox (source brokers, counters).
async fn bridge(path: &std::path::Path, json: bool) -> Result<(), Failure> {
    let b = crate::bridge::load(path).map_err(|errs| Failure::usage(anyhow!("{}", errs.join("; "))))?;
    let mut all = Vec::new();
    for r in &b.routes {
        let (outbox, inbox) = steadfast::bridge::route_dirs(&b.dir, &r.name);
        if !json {
            println!("route    {}", r.name);
        }
        let o = show(&outbox, json).await?;
        let i = show(&inbox, json).await?;
        if !json {
            println!();
        }
        all.push(serde_json::json!({ "route": r.name, "outbox": o, "inbox": i }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all).map_err(|e| Failure::other(anyhow!(e)))?);
    }
    Ok(())
}

/// Prints one store's status as text, or returns it as JSON.
async fn show(dir: &std::path::Path, json: bool) -> Result<Option<serde_json::Value>, Failure> {
    let store = read(dir).await?;
    if json {
        return serde_json::to_value(store.json()).map(Some).map_err(|e| Failure::other(anyhow!(e)));
    }
    store.print();
    Ok(None)
}

/// What a store holds, read without disturbing its owner.
struct Store {
    dir: std::path::PathBuf,
    /// A process has it open.
    running: bool,
    kind: StoreKind,
    report: Report,
}

/// Reads the store in `dir` (read-only, on a blocking thread).
async fn read(dir: &std::path::Path) -> Result<Store, Failure> {
    let d = dir.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let running = SqliteStore::is_in_use(&d);
        let mut store = SqliteStore::open_read_only(&d)?;
        Ok::<_, StoreError>((running, store.kind(), Report::read(&mut store)?))
    })
    .await
    .map_err(|e| Failure::other(anyhow!("status task failed: {e}")))?;
    let (running, kind, report) = read.map_err(|e| match e {
        // Only its owner's open converts it; `pub --drain` is one that ends.
        StoreError::FormatTooOld { .. } => {
            let run = format!("steadfast pub --drain -b BROKER --outbox {}", dir.display());
            Failure::other(anyhow!("{e} (run `{run}` once, with the brokers its messages are for)"))
        }
        e => Failure::other(anyhow!(e)),
    })?;
    Ok(Store { dir: dir.to_owned(), running, kind, report })
}

impl Store {
    /// Age of the oldest queued message, milliseconds.
    fn oldest_age_ms(&self) -> Option<u64> {
        let now = now_ms();
        self.report.oldest_created_ms.map(|c| now.saturating_sub(c))
    }

    /// (lag, missed) of the broker `url`.
    fn lag_of(&self, url: &str) -> (u64, u64) {
        self.report.lag.iter().find(|l| l.url == url).map_or((0, 0), |l| (l.lag, l.missed))
    }

    fn json(&self) -> Json {
        let (r, running) = (&self.report, self.running);
        let brokers = r
            .brokers
            .iter()
            .map(|b| (b, self.lag_of(&b.url), self.timing_of(&b.url)))
            .map(|(b, (lag, missed), timing)| BrokerJson {
                url: b.url.clone(),
                state: if running { b.state.clone() } else { "not running".into() },
                since_ms: b.since_ms,
                last_error: b.last_error.clone(),
                retry_at_ms: b.retry_ms.filter(|_| running),
                active: running && b.active,
                acked: b.acked,
                connects: b.connects,
                lag,
                missed,
                window: self.window_of(&b.url),
                configured: self.configured(&b.url),
                ack_timeout_ms: timing.map(|t| t.timeout_ms),
                ack_timeout_adaptive: timing.map(|t| t.adaptive),
                round_trip_us: timing.and_then(|t| t.round_trip_us).map(|(rt, _)| rt),
                round_trip_deviation_us: timing.and_then(|t| t.round_trip_us).map(|(_, d)| d),
            })
            .collect();
        Json {
            kind: self.kind.name(),
            outbox: self.dir.display().to_string(),
            owner_running: running,
            queued: r.totals.count,
            bytes: r.totals.bytes,
            oldest_age_ms: self.oldest_age_ms(),
            dropped: r.drops.iter().map(|(k, v)| (k.as_str().to_owned(), serde_json::Value::from(*v))).collect(),
            brokers,
            inbox: r.inbox,
            counters: r.counters.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(*v))).collect(),
            producer: r.producer.clone(),
            last_id: r.last_id,
            held: self.held().map(|(set, n)| serde_json::json!({ "brokers": set, "queued": n })).collect(),
            poisoned: r
                .poisoned
                .iter()
                .map(|p| {
                    serde_json::json!({ "id": p.id, "topic": p.topic, "bytes": p.size, "qos": p.qos,
                        "broker": p.broker, "failures": p.cause.failures(),
                        "refused": p.cause.code().map(steadfast_core::reason::describe), "at_ms": p.at_ms })
                })
                .collect(),
            receipts: {
                let s = self.receipts();
                ReceiptsJson {
                    awaiting: s.awaiting,
                    oldest_wait_ms: s.oldest_wait.map(|d| d.as_millis() as u64),
                    counted: s.counted,
                    handled: s.handled,
                    republished: s.republished,
                    relayed: s.relayed,
                    returned: s.returned,
                }
            },
        }
    }

    /// What awaits receipts and what receipts did (the library's reading).
    fn receipts(&self) -> steadfast::ReceiptStatus {
        steadfast::ReceiptStatus::of(&self.report, now_ms())
    }

    /// True unless the last run's configuration is known and lacks `url`.
    fn configured(&self, url: &str) -> bool {
        self.report.configured.as_ref().is_none_or(|c| c.iter().any(|u| u == url))
    }

    /// The client id the outbox's producer id was made from (`ID-xxxxxxxx`),
    /// if it was.
    fn client_id(&self) -> Option<&str> {
        let (id, suffix) = self.report.producer.as_deref()?.rsplit_once('-')?;
        (suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }

    fn timing_of(&self, url: &str) -> Option<steadfast_store::AckTiming> {
        self.report.ack_timeouts.iter().find(|(u, _)| u == url).map(|(_, t)| *t)
    }

    fn window_of(&self, url: &str) -> Option<u16> {
        self.report.windows.iter().find(|(u, _)| u == url).map(|(_, n)| *n)
    }

    /// Queued messages held for another default broker set: (its URLs, count).
    fn held(&self) -> impl Iterator<Item = (&str, u64)> {
        self.report.routes.iter().filter_map(|(r, n)| Some((steadfast_store::held_for(r.as_deref())?, *n)))
    }

    /// One line: what it is, where, how much it holds, whether a process
    /// uses it.
    fn print_line(&self) {
        let r = &self.report;
        let using = if self.running { "in use" } else { "not in use" };
        let dir = self.dir.display();
        if self.kind == StoreKind::Inbox {
            println!("inbox    {dir}  {} identities remembered  ({using})", r.inbox);
        } else {
            let oldest = self.oldest_age_ms().map_or("-".into(), |ms| human_age(Duration::from_millis(ms)));
            println!("outbox   {dir}  {} queued, oldest {oldest}  ({using})", r.totals.count);
        }
    }

    /// The text form: the queue (an outbox) or the identities (an inbox),
    /// then each broker.
    fn print(&self) {
        let r = &self.report;
        let dir = self.dir.display();
        if self.kind == StoreKind::Inbox {
            // An inbox holds identities, not messages.
            let using = if self.running { "  (a consumer is using it)" } else { "  (no process is using it)" };
            println!("inbox    {dir}{using}");
        } else {
            println!("outbox   {dir}{}", if self.running { "" } else { "  (no process is using it)" });
            println!("queued   {} message(s), {}", r.totals.count, human_bytes(r.totals.bytes));
            match self.oldest_age_ms() {
                Some(ms) => println!("oldest   {} ago", human_age(Duration::from_millis(ms))),
                None => println!("oldest   -"),
            }
            let drops: Vec<String> = r.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("dropped  {}", drops.join(", "));
            if !r.poisoned.is_empty() {
                println!(
                    "poison   {} message(s) moved aside: a broker ended the link each time it was sent, alone (kept; `steadfast poison --outbox {dir}` lists them, with --requeue or --delete)",
                    r.poisoned.len()
                );
                for p in r.poisoned.iter().take(5) {
                    println!("         id {} topic {} ({}) via {}", p.id, p.topic, human_bytes(p.size), p.broker);
                }
            }
            for (set, n) in self.held() {
                let b: String = set.split(' ').map(|u| format!(" -b {u}")).collect();
                let id = self.client_id().map(|id| format!(" -i {id}")).unwrap_or_default();
                println!("held     {n} message(s) accepted for {set}: never sent to other brokers (`steadfast pub --drain{b}{id} --outbox {dir}` sends them, `--retarget` elsewhere)");
            }
        }
        let s = self.receipts();
        if s.awaiting > 0 || s.counted + s.handled + s.republished > 0 {
            let oldest = s.oldest_wait.map_or(String::new(), |d| format!(" (the oldest for {})", human_age(d)));
            println!(
                "receipts {} message(s) delivered and awaiting receipts{oldest}; {} handled, {} published again for lack of one, {} receipts counted",
                s.awaiting, s.handled, s.republished, s.counted
            );
        }
        if s.relayed + s.returned > 0 {
            println!(
                "relay    {} message(s) passed on asking for receipts; {} receipts handed back to their producers",
                s.relayed, s.returned
            );
        }
        let consumer: Vec<String> =
            (r.counters.iter()).filter_map(|(k, v)| Some(format!("{} {v}", k.strip_prefix("consumer.")?))).collect();
        if self.kind == StoreKind::Inbox || r.inbox > 0 || !consumer.is_empty() {
            let counted = if consumer.is_empty() { String::new() } else { format!("; {}", consumer.join(", ")) };
            println!("inbox    {} identities remembered{counted}", r.inbox);
        }
        // This run's brokers first; those of earlier runs after, as such.
        let (now, before): (Vec<_>, Vec<_>) = r.brokers.iter().partition(|b| self.configured(&b.url));
        for b in now {
            self.print_broker(b);
        }
        for b in before {
            let since = UNIX_EPOCH + Duration::from_millis(b.since_ms);
            let ago = SystemTime::now().duration_since(since).unwrap_or_default();
            println!(
                "broker   {}  not in the last run's configuration (last seen {} ago), acked {}",
                b.url,
                human_age(ago),
                b.acked
            );
        }
    }

    /// A broker's lines: its state and counts, then the next attempt, the
    /// messages it missed and its last error where there are any.
    fn print_broker(&self, b: &steadfast_store::BrokerRecord) {
        let since = UNIX_EPOCH + Duration::from_millis(b.since_ms);
        let for_how_long = SystemTime::now().duration_since(since).unwrap_or_default();
        let state = if self.running {
            format!("{} for {}", b.state, human_age(for_how_long))
        } else {
            format!("not running (last run ended {} ago)", human_age(for_how_long))
        };
        let (lag, missed) = self.lag_of(&b.url);
        let role = if self.running && b.active { "  [active]" } else { "" };
        println!("broker   {}{role}  {state}, acked {}, connects {}, lag {lag}", b.url, b.acked, b.connects);
        if let Some(at) = b.retry_ms.filter(|_| self.running && b.state == "backoff") {
            let left = at.saturating_sub(now_ms());
            println!("         next attempt in {}", human_age(Duration::from_millis(left)));
        }
        if missed > 0 {
            println!("         missed {missed} message(s): down past the catch-up window");
        }
        if let Some(t) = self.timing_of(&b.url) {
            let ms = |us: u64| us as f64 / 1000.0;
            let how = match (t.adaptive, t.round_trip_us) {
                (true, Some((rt, dev))) => {
                    format!("adaptive: round trip {:.2} ms ± {:.2} ms", ms(rt), ms(dev))
                }
                (true, None) => "adaptive: no round trip measured yet".to_owned(),
                (false, Some((rt, _))) => format!("fixed (--ack-timeout); round trip {:.2} ms", ms(rt)),
                (false, None) => "fixed (--ack-timeout)".to_owned(),
            };
            let when = if self.running { "" } else { ", last run" };
            println!("         ack timeout {} ms ({how}{when})", t.timeout_ms);
        }
        if let Some(n) = self.window_of(&b.url) {
            println!("         window {n} in flight at most: learned (it ended links with more in flight)");
        }
        if let Some((_, n)) = self.report.poison_sizes.iter().find(|(u, _)| *u == b.url) {
            println!("         messages of {n} bytes or more are moved aside as poison at once: learned (it closed links on one, stating no maximum packet size)");
        }
        if let Some(e) = &b.last_error {
            println!("         last error: {e}");
        }
    }
}

fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}
