//! `steadfast bridge` as a child process between real Mosquitto brokers.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use steadfast::{BrokerSet, BrokerUrl, ClientConfig, Consumer, ConsumerConfig, Mode, Qos};
use steadfast_testkit::{wait_until, Mosquitto, MosquittoOptions, Subscriber};

use crate::{run, stderr, steadfast};

fn config(dir: &Path, local: &str, upstream: &[String]) -> std::path::PathBuf {
    let ups: Vec<String> = upstream.iter().map(|u| format!("\"{u}\"")).collect();
    let text = format!(
        r#"[store]
dir = "{}"

[[route]]
name = "telemetry-up"
[route.source]
brokers = ["{local}"]
topics = ["sensors/#"]
qos = 1
client_id = "edge-bridge"
backoff = "50ms..300ms"
[route.destination]
brokers = [{}]
mode = "failover"
failback_after = "1s"
topic_prefix = "site-7/"
backoff = "50ms..300ms"
"#,
        dir.join("state").display(),
        ups.join(", ")
    );
    let path = dir.join("bridge.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A bridge process, killed when the test ends however it ends.
pub(crate) struct BridgeProc(Child);

impl std::ops::Deref for BridgeProc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for BridgeProc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for BridgeProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bridge, its log appended to `bridge.log` beside its configuration.
pub(crate) fn start_bridge(config: &Path) -> BridgeProc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_file_name("bridge.log"))
        .expect("bridge log");
    steadfast()
        .args(["bridge", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(BridgeProc)
        .expect("spawn bridge")
}

/// The bridge's source session and subscriptions exist before anything is
/// published (as `steadfast bridge --register` does in a deployment).
pub(crate) async fn register(config: &Path) {
    let out = run(&["bridge", "--register", "--config", config.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A consumer with an inbox upstream, and a registered bridge from the
/// local broker to `upstream`, running.
async fn bridged(
    dir: &Path,
    local: &str,
    upstream: &[String],
) -> (tokio::task::JoinHandle<()>, Seen, PathBuf, BridgeProc) {
    let (app, seen) = upstream_consumer(upstream, dir).await;
    let cfg = config(dir, local, upstream);
    register(&cfg).await;
    let bridge = start_bridge(&cfg);
    (app, seen, cfg, bridge)
}

/// How many distinct messages the upstream consumer handled so far.
fn counter(seen: &Seen) -> impl Fn() -> usize + Clone {
    let s = seen.clone();
    move || s.lock().unwrap().len()
}

/// SIGTERM, as systemd stops it.
fn sigterm(b: &BridgeProc) {
    let _ = Command::new("kill").args(["-TERM", &b.id().to_string()]).status();
}

pub(crate) fn bridge_log(config: &Path) -> String {
    std::fs::read_to_string(config.with_file_name("bridge.log")).unwrap_or_default()
}

/// What a consumer with an inbox on both upstream brokers handled: payload
/// to times handed over (more than once would be a duplicate).
type Seen = Arc<Mutex<HashMap<String, u32>>>;

async fn upstream_consumer(upstream: &[String], dir: &Path) -> (tokio::task::JoinHandle<()>, Seen) {
    let urls: Vec<BrokerUrl> = upstream.iter().map(|u| u.parse().unwrap()).collect();
    let client = ClientConfig::new("upstream-app", urls[0].clone(), dir.join("app-inbox"))
        .brokers(BrokerSet::new(urls).mode(Mode::Fanout));
    let cfg = ConsumerConfig::new(client).topic("site-7/sensors/#", Qos::AtLeastOnce);
    Consumer::register(&cfg).await.expect("register upstream consumer");
    let (consumer, _) = Consumer::open(cfg).await.expect("open upstream consumer");
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(d) = consumer.next().await {
            let p = String::from_utf8_lossy(d.payload()).into_owned();
            *s.lock().unwrap().entry(p).or_default() += 1;
            d.ack();
        }
    });
    (task, seen)
}

/// `steadfast pub` feeding `n` lines to the local broker at a steady pace,
/// so that the faults below land while messages flow.
fn paced_publisher(local: &str, n: usize, outbox: &Path) -> std::thread::JoinHandle<std::process::Output> {
    let mut child = steadfast()
        .args(["pub", "-b", local, "-t", "sensors/t", "-l", "--outbox", outbox.to_str().unwrap()])
        .args(["--wait-timeout", "120s", "--progress", "never"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        for chunk in 0..n / 500 {
            let lines: String = (chunk * 500..(chunk + 1) * 500).map(|i| format!("m-{i:06}\n")).collect();
            stdin.write_all(lines.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    })
}

async fn wait_all(seen: &Seen, n: usize, limit: Duration, cfg: &Path) {
    let deadline = tokio::time::Instant::now() + limit;
    while seen.lock().unwrap().len() < n {
        if tokio::time::Instant::now() > deadline {
            let seen = seen.lock().unwrap();
            let missing: Vec<usize> = (0..n).filter(|i| !seen.contains_key(&format!("m-{i:06}"))).collect();
            let ranges = ranges(&missing);
            panic!(
                "{} of {n} upstream after {limit:?}, missing {ranges}; bridge log:\n{}",
                seen.len(),
                bridge_log(cfg)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `3-7, 12` style.
fn ranges(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    out.join(", ")
}

fn check_exactly_once(seen: &Seen, n: usize) {
    let seen = seen.lock().unwrap();
    let missing: Vec<String> = (0..n).map(|i| format!("m-{i:06}")).filter(|m| !seen.contains_key(m)).take(5).collect();
    assert!(missing.is_empty(), "{} of {n} missing upstream, first {missing:?}", n - seen.len().min(n));
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "handed over twice at the consumer: {twice:?}");
}

/// Local broker -> bridge -> an upstream failover pair. During 20,000
/// messages the upstream primary is stopped and restarted twice and the
/// bridge is `kill -9`ed and restarted twice: every message arrives
/// upstream, and the consumer with an inbox hands none over twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_crosses_the_bridge_through_upstream_restarts_and_bridge_kill_9() {
    const N: usize = 20_000;
    let local = Mosquitto::plain().await;
    let opts = || MosquittoOptions { persistence: true, extra: vec![] };
    let mut primary = Mosquitto::start(opts()).await;
    let backup = Mosquitto::start(opts()).await;
    let upstream = vec![primary.url(), backup.url()];
    let dir = tempfile::tempdir().unwrap();
    let (app, seen, cfg, mut bridge) = bridged(dir.path(), &local.url(), &upstream).await;
    let count = counter(&seen);
    let publisher = paced_publisher(&local.url(), N, &dir.path().join("pub-outbox"));
    let limit = Duration::from_secs(90);
    for (at, fault) in
        [(2_000, "kill bridge"), (5_000, "stop primary"), (9_000, "kill bridge"), (13_000, "restart primary")]
    {
        let c = count.clone();
        wait_until(&format!("{at} messages upstream before `{fault}`"), limit, move || c() >= at).await;
        match fault {
            "kill bridge" => {
                bridge.kill().unwrap();
                bridge.wait().unwrap();
                bridge = start_bridge(&cfg);
            }
            "stop primary" => primary.terminate(),
            _ => primary.restart().await,
        }
    }
    let published = tokio::task::spawn_blocking(move || publisher.join().unwrap()).await.unwrap();
    assert_eq!(published.status.code(), Some(0), "pub: {}", stderr(&published));
    wait_all(&seen, N, limit, &cfg).await;
    check_exactly_once(&seen, N);
    sigterm(&bridge);
    let status = bridge.wait().unwrap();
    assert_eq!(status.code(), Some(0), "clean stop: {}", bridge_log(&cfg));
    app.abort();
}

use std::process::Command;

/// SIGTERM while messages flow: the bridge finishes what it has in hand,
/// keeps its outbox, exits 0; started again, it resumes, and nothing is
/// lost or handed over twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stops_cleanly_and_a_restart_resumes() {
    const N: usize = 6_000;
    let local = Mosquitto::plain().await;
    let upstream_broker = Mosquitto::plain().await;
    let upstream = vec![upstream_broker.url()];
    let dir = tempfile::tempdir().unwrap();
    let (app, seen, cfg, mut bridge) = bridged(dir.path(), &local.url(), &upstream).await;
    let count = counter(&seen);
    let publisher = paced_publisher(&local.url(), N, &dir.path().join("pub-outbox"));
    let c = count.clone();
    wait_until("1,000 messages upstream", Duration::from_secs(60), move || c() >= 1_000).await;
    sigterm(&bridge);
    let status = tokio::task::spawn_blocking(move || bridge.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0), "clean stop: {}", bridge_log(&cfg));
    let mut bridge = start_bridge(&cfg);
    let published = tokio::task::spawn_blocking(move || publisher.join().unwrap()).await.unwrap();
    assert_eq!(published.status.code(), Some(0), "pub: {}", stderr(&published));
    wait_all(&seen, N, Duration::from_secs(60), &cfg).await;
    check_exactly_once(&seen, N);
    let s = crate::run(&["status", "--bridge", cfg.to_str().unwrap(), "--json"]).await;
    assert!(s.status.success(), "{}", stderr(&s));
    let v: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    assert_eq!(v[0]["route"], "telemetry-up", "{v}");
    assert!(v[0]["outbox"]["queued"].is_u64(), "{v}");
    bridge.kill().unwrap();
    let _ = bridge.wait();
    app.abort();
}

/// A broken configuration: `--check` names every error with its line and
/// exits 2; so does starting the bridge with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_names_every_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = r#"[store]
dir = "/tmp/x"

[[route]]
name = "up"
[route.source]
brokers = ["http://127.0.0.1:1883"]
topics = ["a/#/b"]
client_id = "edge"
[route.destination]
brokers = ["mqtt://127.0.0.1:1"]
mode = "mirror"
max_inflight = 0
[[route.destination.map]]
from = "x/+"
to = "y/#"
"#;
    std::fs::write(&path, text).unwrap();
    for args in [vec!["bridge", "--check", "--config"], vec!["bridge", "--config"]] {
        let mut args: Vec<&str> = args;
        args.push(path.to_str().unwrap());
        let out = run(&args).await;
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        let wants = [
            (7, "unknown scheme `http`"),
            (8, "a/#/b"),
            (12, "unknown mode `mirror`"),
            (13, "max_inflight = 0"),
            (14, "y/#"),
        ];
        for (line, what) in wants {
            let at = format!("bad.toml:{line}:");
            assert!(err.lines().any(|l| l.contains(&at) && l.contains(what)), "want `{at}` with `{what}` in:\n{err}");
        }
    }
    let syntax = dir.path().join("syntax.toml");
    std::fs::write(&syntax, "[store]\ndir = \"/tmp/x\"\n[[route]]\nname = 5\n").unwrap();
    let out = run(&["bridge", "--check", "--config", syntax.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("syntax.toml:4:"), "{}", stderr(&out));
    // Two routes under one client id would take each other's session over.
    let twice = dir.path().join("twice.toml");
    let route = |name: &str| {
        format!("[[route]]\nname = \"{name}\"\n[route.source]\nbrokers = [\"mqtt://127.0.0.1:1\"]\ntopics = [\"a/#\"]\nclient_id = \"same\"\n[route.destination]\nbrokers = [\"mqtt://127.0.0.1:2\"]\n")
    };
    std::fs::write(&twice, format!("[store]\ndir = \"/tmp/x\"\n{}{}", route("one"), route("two"))).unwrap();
    let out = run(&["bridge", "--check", "--config", twice.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("twice.toml:12:") && stderr(&out).contains("`same` is used twice"),
        "{}",
        stderr(&out)
    );
    // Every unknown key, not only the first, and the value errors after them.
    let keys = dir.path().join("keys.toml");
    let text = "frob = 1\n[store]\ndir = \"/tmp/x\"\n[[route]]\nname = \"a\"\nzap = 2\n[route.source]\nbrokers = [\"mqtt://127.0.0.1:1\"]\ntopics = [\"x/#\"]\nclient_id = \"c\"\nbogus = 3\n[route.destination]\nbrokers = [\"mqtt://127.0.0.1:2\"]\nwat = 4\nqos = 7\n";
    std::fs::write(&keys, text).unwrap();
    let out = run(&["bridge", "--check", "--config", keys.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    for (line, key) in [(1, "`frob`"), (6, "`zap`"), (11, "`bogus`"), (14, "`wat`"), (15, "QoS 7")] {
        let at = format!("keys.toml:{line}:");
        assert!(stderr(&out).lines().any(|l| l.contains(&at) && l.contains(key)), "{key} at {line}: {}", stderr(&out));
    }
    // A receipt prefix with a wildcard makes no topic to answer at.
    let prefix = dir.path().join("prefix.toml");
    let text = "[store]\ndir = \"/tmp/x\"\n[[route]]\nname = \"a\"\n[route.source]\nbrokers = [\"mqtt://127.0.0.1:1\"]\ntopics = [\"x/#\"]\nclient_id = \"c\"\n[route.destination]\nbrokers = [\"mqtt://127.0.0.1:2\"]\nreceipt_prefix = \"r/+\"\n";
    std::fs::write(&prefix, text).unwrap();
    let out = run(&["bridge", "--check", "--config", prefix.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("prefix.toml:9:") && stderr(&out).contains("receipt prefix `r/+`"),
        "{}",
        stderr(&out)
    );
    let good = config(dir.path(), "mqtt://127.0.0.1:1", &["mqtt://127.0.0.1:2".into()]);
    let out = run(&["bridge", "--check", "--config", good.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 route(s), ok"));
    // The shipped example stays valid.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bridge.toml");
    let out = run(&["bridge", "--check", "--config", example.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

pub(crate) fn python(script: &str) -> Command {
    let mut c = Command::new("python3");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(script));
    c
}

/// Third-party clients on both ends: a Python paho-mqtt publisher (MQTT
/// 3.1.1, so no steadfast identity) on the local broker, a paho-mqtt
/// subscriber upstream. The bridge is `kill -9`ed and restarted while
/// messages flow: every message reaches the paho subscriber, and a
/// consumer with an inbox upstream hands none over twice (a redelivery to
/// the restarted bridge is recognised, not queued again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_on_both_ends_through_a_bridge_kill_9() {
    const N: usize = 4_000;
    let local = Mosquitto::plain().await;
    let up = Mosquitto::plain().await;
    let upstream = vec![up.url()];
    let dir = tempfile::tempdir().unwrap();
    let (app, seen) = upstream_consumer(&upstream, dir.path()).await;
    let mut sub = python("paho_sub.py")
        .args(["127.0.0.1", &up.port().to_string(), "site-7/sensors/#", &N.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with paho-mqtt (scripts/test installs it)");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let l = lines.clone();
    let out = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    let l = lines.clone();
    wait_until("paho subscriber subscribed", Duration::from_secs(20), move || {
        l.lock().unwrap().iter().any(|x| x == "SUBSCRIBED")
    })
    .await;
    let cfg = config(dir.path(), &local.url(), &upstream);
    register(&cfg).await;
    let mut bridge = start_bridge(&cfg);
    let mut publisher = python("paho_pub.py")
        .args(["127.0.0.1", &local.port().to_string(), "sensors/p", &N.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let s = seen.clone();
    wait_until("1,000 messages upstream", Duration::from_secs(60), move || s.lock().unwrap().len() >= 1_000).await;
    bridge.kill().unwrap();
    bridge.wait().unwrap();
    let mut bridge = start_bridge(&cfg);
    let published = tokio::task::spawn_blocking(move || publisher.wait().unwrap()).await.unwrap();
    assert!(published.success(), "paho publisher failed");
    let want: std::collections::HashSet<String> = (0..N).map(|i| format!("p-{i:06}")).collect();
    let l = lines.clone();
    let w = want.clone();
    wait_until("every message at the paho subscriber", Duration::from_secs(60), move || {
        let got = l.lock().unwrap();
        w.iter().all(|m| got.contains(m))
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < N {
        assert!(tokio::time::Instant::now() < deadline, "{} of {N} at the consumer", seen.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap();
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "handed over twice at the consumer: {twice:?}");
    assert!(want.iter().all(|m| seen.contains_key(m)));
    bridge.kill().unwrap();
    let _ = bridge.wait();
    let _ = sub.kill();
    let _ = sub.wait();
    app.abort();
}

/// SIGHUP reloads the configuration: a changed topic prefix applies to
/// what comes next; a broken file is refused and the running routes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_configuration_and_keeps_running_on_a_broken_one() {
    let local = Mosquitto::plain().await;
    let up = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &local.url(), &[up.url()]);
    register(&cfg).await;
    let sub = steadfast_testkit::Subscriber::start(up.port(), "#", 1, None).await;
    let site8 = steadfast_testkit::Subscriber::start(up.port(), "site-8/#", 1, None).await;
    let mut bridge = start_bridge(&cfg);
    let send = |payload: &str| {
        let (url, payload, outbox) = (local.url(), payload.to_owned(), dir.path().join("pub"));
        async move {
            let out =
                run(&["pub", "-b", &url, "-t", "sensors/x", "-m", &payload, "--outbox", outbox.to_str().unwrap()])
                    .await;
            assert!(out.status.success(), "{}", stderr(&out));
        }
    };
    let hup = |b: &BridgeProc| {
        let _ = Command::new("kill").args(["-HUP", &b.id().to_string()]).status();
    };
    send("one").await;
    sub.wait_count(1, Duration::from_secs(20)).await;
    // A valid change: the new prefix.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("site-7/", "site-8/");
    std::fs::write(&cfg, &text).unwrap();
    hup(&bridge);
    let c = cfg.clone();
    wait_until("the reload", Duration::from_secs(20), move || bridge_log(&c).matches("route started").count() >= 2)
        .await;
    send("two").await;
    sub.wait_count(2, Duration::from_secs(20)).await;
    // A broken file: refused, and the bridge keeps forwarding.
    std::fs::write(&cfg, text.replace("mode = \"failover\"", "mode = \"mirror\"")).unwrap();
    hup(&bridge);
    let c = cfg.clone();
    wait_until("the refusal", Duration::from_secs(20), move || bridge_log(&c).contains("keeping the running one"))
        .await;
    send("three").await;
    sub.wait_count(3, Duration::from_secs(20)).await;
    assert_eq!(sub.lines(), ["one", "two", "three"]);
    site8.wait_count(2, Duration::from_secs(20)).await;
    assert_eq!(site8.lines(), ["two", "three"], "the new prefix applies after the reload");
    let topics = bridge_log(&cfg);
    assert!(bridge.try_wait().unwrap().is_none(), "still running: {topics}");
    sigterm(&bridge);
    assert_eq!(bridge.wait().unwrap().code(), Some(0));
}

/// Under systemd (`Type=notify`): READY=1 once the routes run, WATCHDOG=1
/// while it lives, STOPPING=1 at SIGTERM, on the socket `$NOTIFY_SOCKET`
/// names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_watchdog_and_stop_are_told_to_the_service_manager() {
    let local = Mosquitto::plain().await;
    let up = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &local.url(), &[up.url()]);
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut bridge = steadfast()
        .args(["bridge", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(BridgeProc)
        .unwrap();
    let recv = move |want: &'static str| {
        let mut buf = [0u8; 256];
        loop {
            let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no `{want}` from the bridge: {e}"));
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == want) {
                return;
            }
        }
    };
    let recv = Arc::new(Mutex::new(recv));
    let r = recv.clone();
    tokio::task::spawn_blocking(move || {
        let r = r.lock().unwrap();
        r("READY=1");
        r("WATCHDOG=1");
    })
    .await
    .unwrap();
    sigterm(&bridge);
    tokio::task::spawn_blocking(move || recv.lock().unwrap()("STOPPING=1")).await.unwrap();
    assert_eq!(bridge.wait().unwrap().code(), Some(0));
}

/// A local and an upstream Mosquitto, and a registered bridge between
/// them (the route of [`config`]), running.
async fn one_route(dir: &Path) -> (Mosquitto, Mosquitto, PathBuf, BridgeProc) {
    let local = Mosquitto::plain().await;
    let up = Mosquitto::plain().await;
    let cfg = config(dir, &local.url(), &[up.url()]);
    register(&cfg).await;
    let bridge = start_bridge(&cfg);
    (local, up, cfg, bridge)
}

/// MQTT 5 properties cross the bridge, and an expiry interval stays a
/// deadline: what the upstream consumer sees is what the producer sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_and_expiry_cross_the_bridge() {
    let dir = tempfile::tempdir().unwrap();
    let (local, up, _cfg, _bridge) = one_route(dir.path()).await;
    let url: BrokerUrl = up.url().parse().unwrap();
    let app = ConsumerConfig::new(ClientConfig::new("props-app", url, dir.path().join("app")))
        .topic("site-7/sensors/#", Qos::AtLeastOnce);
    Consumer::register(&app).await.unwrap();
    let (consumer, _) = Consumer::open(app).await.unwrap();
    let local_url: BrokerUrl = local.url().parse().unwrap();
    let (producer, _) =
        steadfast::Client::open(ClientConfig::new("props-producer", local_url, dir.path().join("producer")))
            .await
            .unwrap();
    let props = steadfast::Properties {
        content_type: Some("application/json".into()),
        correlation_data: Some(vec![1, 2, 3]),
        user: vec![("unit".into(), "celsius".into())],
        ..Default::default()
    };
    let m = steadfast::Message::new("sensors/t", "{\"t\":21.5}").props(props.clone()).ttl(Duration::from_secs(3600));
    let r = producer.publish(m).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next()).await.expect("forwarded").unwrap();
    assert_eq!(d.topic(), "site-7/sensors/t");
    assert_eq!(d.properties(), &props, "properties as the producer sent them");
    let left = d.expiry().expect("an expiry interval");
    assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600), "{left:?}");
    // The producer's own identity, not the bridge's (the route has one
    // source broker, so no inbox of its own).
    let identity = d.identity().expect("an identity");
    assert!(identity.producer.starts_with("props-producer-"), "the producer's, not the bridge's: {identity:?}");
    assert_eq!(identity.seq, r.id());
    d.ack();
    consumer.close().await;
    producer.close().await;
}

/// A retained message published while the bridge runs is retained
/// upstream too: the bridge subscribes with Retain As Published (without
/// it the broker clears the flag of every message but those sent at the
/// subscription's start, and the far broker kept a stale value, or none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_published_while_the_bridge_runs_is_retained_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (local, up, cfg, _bridge) = one_route(dir.path()).await;
    let live = Subscriber::start(up.port(), "site-7/sensors/#", 1, None).await;
    let outbox = dir.path().join("producer");
    let outbox = outbox.to_str().unwrap();
    let local_url = local.url();
    let publish = |topic: &'static str, value: &'static str, retain: bool| {
        let mut args = vec!["pub", "-b", &local_url, "-t", topic, "-m", value, "--outbox", outbox];
        if retain {
            args.push("-r");
        }
        async move {
            let out = run(&args).await;
            assert!(out.status.success(), "{}", stderr(&out));
        }
    };
    // The bridge is connected and subscribed (a message crossed) before
    // the values are published: they reach it live, not at its
    // subscription's start, where a broker flags the retained one
    // whatever the option.
    publish("sensors/probe", "probe", false).await;
    live.wait_all(&["probe".to_owned()], Duration::from_secs(20)).await;
    for value in ["v1", "v2"] {
        publish("sensors/state", value, true).await;
    }
    live.wait_all(&["v1".to_owned(), "v2".to_owned()], Duration::from_secs(20)).await;
    // A subscriber that comes later gets the latest value, retained.
    let later = Subscriber::start(up.port(), "site-7/sensors/state", 1, None).await;
    later.wait_all(&["v2".to_owned()], Duration::from_secs(20)).await;
    assert_eq!(later.lines(), ["v2"], "{}", bridge_log(&cfg));
}

/// A bridge from a local broker that wants a password (given through
/// `password_env`) to an upstream that wants mutual TLS: every message
/// crosses, and a missing certificate file is named by `--check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_speaks_mutual_tls_upstream_with_credentials_from_the_environment() {
    const PW: &str = "l0cal-Secret";
    let pki = steadfast_testkit::Pki::new();
    let local = Mosquitto::with_password("sensor", PW).await;
    let plain_port = steadfast_testkit::free_port();
    let mut extra = pki.mosquitto_lines("server", true);
    extra.push(format!("listener {plain_port} 127.0.0.1"));
    let up = Mosquitto::start(MosquittoOptions { extra, ..Default::default() }).await;
    let sub = steadfast_testkit::Subscriber::start(plain_port, "site-7/#", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let text = |cert: &Path| {
        format!(
            r#"[store]
dir = "{state}"
[[route]]
name = "up"
[route.source]
brokers = ["{local}"]
topics = ["sensors/#"]
client_id = "tls-bridge"
username = "sensor"
password_env = "LOCAL_PW"
[route.destination]
brokers = ["mqtts://localhost:{port}"]
cafile = "{ca}"
cert = "{cert}"
key = "{key}"
topic_prefix = "site-7/"
"#,
            state = dir.path().join("state").display(),
            local = local.url(),
            port = up.port(),
            ca = pki.path("ca.pem").display(),
            cert = cert.display(),
            key = pki.path("client.key").display(),
        )
    };
    let cfg = dir.path().join("bridge.toml");
    std::fs::write(&cfg, text(Path::new("/nonexistent/client.pem"))).unwrap();
    let out = run(&["bridge", "--check", "--config", cfg.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // Both mistakes, each with its line: the variable is not set for
    // `--check` here, and the certificate file does not exist.
    let err = stderr(&out);
    assert!(err.contains(":5: source: password_env = \"LOCAL_PW\": the variable is not set"), "{err}");
    assert!(err.contains(":11: destination: TLS: client certificate /nonexistent/client.pem"), "{err}");
    std::fs::write(&cfg, text(&pki.path("client.pem"))).unwrap();
    let register = steadfast()
        .args(["bridge", "--register", "--config", cfg.to_str().unwrap()])
        .env("LOCAL_PW", PW)
        .output()
        .unwrap();
    assert!(register.status.success(), "{}", stderr(&register));
    let mut bridge = steadfast()
        .args(["bridge", "--config", cfg.to_str().unwrap()])
        .env("LOCAL_PW", PW)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("bridge.log")).unwrap())
        .spawn()
        .map(BridgeProc)
        .unwrap();
    let ob = dir.path().join("pub");
    let n = 200;
    let lines: String = (0..n).map(|i| format!("m{i}\n")).collect();
    let mut p = steadfast()
        .args(["pub", "-b", &local.url(), "-u", "sensor", "-t", "sensors/t", "-l", "-q", "1", "--outbox"])
        .arg(&ob)
        .env("STEADFAST_PASSWORD", PW)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    sub.wait_all(&want, Duration::from_secs(30)).await;
    sigterm(&bridge);
    let _ = bridge.wait();
    let log = std::fs::read_to_string(dir.path().join("bridge.log")).unwrap();
    assert!(!log.contains(PW), "the password is in the bridge's debug log");
}
