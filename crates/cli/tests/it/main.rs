//! The `steadfast` binary, run as a child process against real Mosquitto.

#![allow(missing_docs)]

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use steadfast_lab::chaos::FaultTally;
use steadfast_testkit::{wait_until, FaultProxy, Mosquitto, MosquittoOptions, ProxyMode, Subscriber};

mod bridge;
mod deb;
mod docs;
mod doctor;
mod group;
mod interop;
mod limits;
mod policy;
mod receipts;
mod sets;
mod sub;
mod tls;

fn steadfast() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_steadfast"));
    c.env_remove("RUST_LOG");
    c
}

/// Runs the binary to completion without blocking the test's runtime (the
/// test kit's proxy runs on it).
async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || run_blocking(&args)).await.expect("join")
}

fn run_blocking(args: &[String]) -> Output {
    steadfast().args(args).stdin(Stdio::null()).output().expect("run steadfast")
}

/// One GET of /metrics; `None` while nothing listens yet.
pub(crate) async fn scrape(port: u16) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut text).await.ok()?;
    text.starts_with("HTTP/1.1 200").then_some(text)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn status_json(outbox: &str) -> serde_json::Value {
    try_status_json(outbox).unwrap_or_else(|e| panic!("status failed: {e}"))
}

/// `steadfast status --json`, or its error (the outbox may not exist yet).
fn try_status_json(outbox: &str) -> Result<serde_json::Value, String> {
    let args = ["status", "--outbox", outbox, "--json"].map(String::from);
    let o = run_blocking(&args);
    if !o.status.success() {
        return Err(stderr(&o));
    }
    Ok(serde_json::from_slice(&o.stdout).expect("status --json is JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_lines_arrive_in_order_and_exit_zero() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "cli/lines", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob");
    let mut child = steadfast()
        .args([
            "pub",
            "-b",
            &broker.url(),
            "-t",
            "cli/lines",
            "-l",
            "-i",
            "cli-lines",
            "--outbox",
            outbox.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let want: Vec<String> = (0..2000).map(|i| format!("line {i}")).collect();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all((want.join("\n") + "\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sub.wait_count(2000, Duration::from_secs(20)).await;
    assert_eq!(sub.lines(), want);
    let st = status_json(outbox.to_str().unwrap());
    assert_eq!(st["queued"], 0);
    assert_eq!(st["brokers"][0]["acked"], 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_accepted_before_kill_9_are_delivered_by_the_next_process() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob");
    let ob = outbox.to_str().unwrap().to_owned();
    // The broker is "down": a proxy that refuses every connection, on a
    // port this test holds for its whole run (no other test can take it).
    let broker = Mosquitto::plain().await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    proxy.set(ProxyMode::Reset);
    let url = proxy.url();
    let mut child = steadfast()
        .args(["pub", "-b", &url, "-t", "cli/k9", "-l", "-i", "cli-k9", "--outbox", &ob])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let want: Vec<String> = (0..1000).map(|i| format!("k9-{i:04}")).collect();
    child.stdin.as_mut().unwrap().write_all((want.join("\n") + "\n").as_bytes()).unwrap();
    let o2 = ob.clone();
    wait_until("1000 messages accepted", Duration::from_secs(20), move || {
        try_status_json(&o2).is_ok_and(|s| s["queued"] == 1000)
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let sub = Subscriber::start(broker.port(), "cli/k9", 1, None).await;
    proxy.set(ProxyMode::Pass);
    let out = run(&["pub", "-b", &url, "--drain", "-i", "cli-k9", "--outbox", &ob, "--wait-timeout", "30s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sub.wait_count(1000, Duration::from_secs(20)).await;
    assert_eq!(sub.lines(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_times_out_with_exit_3_and_keeps_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    // Port 1: nothing listens there, and no other test can take it.
    let url = "mqtt://127.0.0.1:1".to_owned();
    let out = run(&["pub", "-b", &url, "-t", "t", "-m", "keep me", "--outbox", ob, "--wait-timeout", "1s"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "stderr: {err}\nstdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("Connection refused") && err.contains("kept in the outbox"), "{err}");
    let st = status_json(ob);
    assert_eq!(st["queued"], 1);
    assert!(st["brokers"][0]["last_error"].as_str().unwrap().contains("refused"), "{st}");
    // --no-wait: accepted is enough.
    let out = run(&["pub", "-b", &url, "-t", "t", "-m", "me too", "--outbox", ob, "--no-wait"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(status_json(ob)["queued"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_message_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a/+/b", "-m", "x", "--outbox", ob], "wildcard"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "", "-m", "x", "--outbox", ob], "topic is empty"),
        // Mosquitto closes the connection on it: refused before acceptance,
        // never a message that blocks the outbox.
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a\u{1}b", "-m", "x", "--outbox", ob], "control character U+0001"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--frobnicate"], "--frobnicate"),
        (&["pub", "-b", "http://127.0.0.1:1", "-t", "a", "-m", "x"], "unknown scheme `http`"),
        (&["pub", "-b", "mqtt://127.0.0.1:99999", "-t", "a", "-m", "x"], "not a port number"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "-q", "3"], "QoS 3"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "-V", "4"], "-V 311 or -V 5"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a"], "nothing to publish"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--wait-timeout", "soon"], "not a duration"),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--wait-timeout", "99999999999999999999999s"],
            "out of range",
        ),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--ack-timeout", "2w"], "unknown unit `w`"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--backoff", "1s..2w"], "unknown unit `w`"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--max-queue", "0"], "bound of 0"),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--max-inflight", "0", "--outbox", ob],
            "(--max-inflight)",
        ),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "--inbox-max", "0B"], "--inbox-max"),
        (&["pub", "-h", "localhost:1883", "-t", "a", "-m", "x"], "give the port with -p"),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--backoff", "5s..1s", "--outbox", ob],
            "MAX at least MIN",
        ),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--backoff", "fast"], "default`, `battery`"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--class", "deadline"], "needs --ttl"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--class", "urgent"], "not a delivery class"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--ttl", "5s"], "--class deadline --ttl"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--priority", "12"], "use 0 to 9"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--max-attempts", "0"], "1 or more"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--overflow", "drop-all"], "drop-newest"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--max-queue", "10XB"], "--max-queue"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--max-age", "old"], "--max-age"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--metrics", "9464"], "HOST:PORT"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--log-format", "xml"], "use human or json"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--progress", "maybe"], "auto, always or never"),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "--inbox-max-age", "x"], "--inbox-max-age"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "-i", "", "--outbox", ob], "client id"),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--outbox", ob],
            "listed twice",
        ),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--ack", "all", "--outbox", ob],
            "only apply to fanout",
        ),
        (
            &[
                "pub",
                "-b",
                "mqtt://127.0.0.1:1",
                "-b",
                "mqtt://127.0.0.1:2",
                "--mode",
                "fanout",
                "--ack",
                "3",
                "-t",
                "a",
                "-m",
                "x",
                "--outbox",
                ob,
            ],
            "ack = 3 but the set has 2 brokers",
        ),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "--mode", "mirror", "-t", "a", "-m", "x"], "unknown mode `mirror`"),
        (&["pub", "-b", "mqtt://127.0.0.1:1", "--route", "home", "-t", "a", "-m", "x"], "needs --config"),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "--config", "/nonexistent/routes.toml", "-t", "a", "-m", "x"],
            "cannot read",
        ),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "-V", "5", "--envelope", "-t", "a", "-m", "x"],
            "--envelope is for MQTT 3.1.1",
        ),
        (
            &["pub", "-b", "mqtt://127.0.0.1:1", "--ack-timeout", "1ms", "-t", "a", "-m", "x", "--outbox", ob],
            "too short",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: expected `{needle}` in: {}", stderr(&out));
    }
    assert!(!std::path::Path::new(ob).join("outbox.db").exists() || status_json(ob)["queued"] == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_the_broker_maximum_is_refused_before_acceptance() {
    let broker =
        Mosquitto::start(MosquittoOptions { persistence: false, extra: vec!["max_packet_size 1000".into()] }).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    let big = "x".repeat(5000);
    let out = run(&["pub", "-b", &broker.url(), "-t", "big", "-m", &big, "--outbox", ob]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("maximum packet size of 1000"), "{}", stderr(&out));
    assert_eq!(status_json(ob)["queued"], 0);
    let out = run(&["pub", "-b", &broker.url(), "-t", "small", "-m", "fits", "--outbox", ob]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_fail_fast_with_exit_1_and_say_which() {
    let broker = Mosquitto::with_password("alice", "secret").await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let as_alice = |pw: &str| format!("pub -b {} -t a -m x -u alice -P {pw} --outbox {}", broker.url(), ob.display());
    let t0 = std::time::Instant::now();
    let out = run(&as_alice("nope").split(' ').collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // Mosquitto 2.0 answers a wrong password with "not authorized" on MQTT 5.
    let err = stderr(&out);
    assert!(err.contains("bad user name or password") || err.contains("not authorised"), "{err}");
    assert!(err.contains("nothing was published"), "{err}");
    assert!(!err.contains("nope"), "the password must never be printed");
    assert!(t0.elapsed() < Duration::from_secs(10), "no silent hang");
    let out = run(&as_alice("secret").split(' ').collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_stdin_null_retain_qos0_and_mqtt311_inputs_work() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "cli/in", 2, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    let file = dir.path().join("payload.txt");
    std::fs::write(&file, "from a file").unwrap();
    let url = broker.url();
    let base = ["pub", "-b", &url, "-t", "cli/in", "--outbox", ob];
    let with = |extra: &[&str]| base.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>();
    for extra in [
        &["-f", file.to_str().unwrap()][..],
        &["-m", "qos zero", "-q", "0"],
        &["-m", "qos two", "-q", "2"],
        &["-m", "old protocol", "-V", "311"],
        &["-n"],
    ] {
        let out = tokio::task::spawn_blocking({
            let args = with(extra);
            move || run_blocking(&args)
        })
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {}", stderr(&out));
    }
    let mut child = steadfast().args(with(&["-s"])).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"all of\nstdin").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // mosquitto_sub prints nothing for the empty (-n) message; its exit
    // code 0 above says the broker acknowledged it.
    sub.wait_count(6, Duration::from_secs(10)).await;
    // Separate publishers: MQTT orders messages per publisher only.
    let mut got = sub.lines();
    got.sort();
    assert_eq!(got, ["all of", "from a file", "old protocol", "qos two", "qos zero", "stdin"]);

    // Retained: a subscriber that comes later still gets it.
    let out = run(&["pub", "-b", &url, "-t", "cli/retained", "-m", "kept", "-r", "--outbox", ob]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let late = Subscriber::start(broker.port(), "cli/retained", 1, None).await;
    late.wait_count(1, Duration::from_secs(10)).await;
    assert_eq!(late.lines(), ["kept"]);
    // An empty retained message clears it, with the 3.1.1 identity
    // envelope too (which it goes without: enveloped, it would be kept),
    // and asks for no receipt (none could name it): with --receipts the
    // pub ends at its delivery, no consumer running.
    let clear = ["pub", "-b", &url, "-t", "cli/retained", "-n", "-r", "-V", "311", "--envelope", "--receipts"];
    let out = run(&[&clear[..], &["--wait-timeout", "20", "--outbox", ob]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A retained message would reach a new subscriber before anything
    // published after it subscribed.
    let later = Subscriber::start(broker.port(), "cli/retained", 1, None).await;
    let out = run(&["pub", "-b", &url, "-t", "cli/retained", "-m", "after the clear", "--outbox", ob]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    later.wait_count(1, Duration::from_secs(10)).await;
    assert_eq!(later.lines(), ["after the clear"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_while_waiting_keeps_the_messages_and_says_where() {
    // SIGINT (Ctrl-C) and SIGTERM (cron, systemd, `timeout`) alike.
    for (signal, code, queued) in [("-INT", 130, 1), ("-TERM", 143, 2)] {
        let dir = tempfile::tempdir().unwrap();
        let ob = dir.path().join("ob");
        let ob = ob.to_str().unwrap().to_owned();
        if queued == 2 {
            let first =
                run(&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "t", "-m", "1", "--outbox", &ob, "--no-wait"]).await;
            assert_eq!(first.status.code(), Some(0));
        }
        let child = steadfast()
            .args(["pub", "-b", "mqtt://127.0.0.1:1", "-t", "t", "-m", "wait for me", "--outbox", &ob])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o2 = ob.clone();
        wait_until("message accepted", Duration::from_secs(20), move || {
            try_status_json(&o2).is_ok_and(|s| s["queued"] == queued)
        })
        .await;
        let pid = child.id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{signal}: {}", stderr(&out));
        let said = format!("{queued} message(s) kept in the outbox");
        assert!(stderr(&out).contains(&said) && stderr(&out).contains("pub --drain"), "{}", stderr(&out));
        assert_eq!(status_json(&ob)["queued"], queued);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_to_several_brokers_in_fanout_and_failover() {
    let a = Mosquitto::plain().await;
    let b = Mosquitto::plain().await;
    let sub_a = Subscriber::start(a.port(), "multi", 1, None).await;
    let sub_b = Subscriber::start(b.port(), "multi", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("fan");
    let ob = ob.to_str().unwrap();
    let fanout =
        ["pub", "-b", &a.url(), "-b", &b.url(), "--mode", "fanout", "-t", "multi", "-m", "both", "--outbox", ob];
    let out = run(&fanout).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sub_a.wait_all(&["both".to_owned()], Duration::from_secs(10)).await;
    sub_b.wait_all(&["both".to_owned()], Duration::from_secs(10)).await;
    let st = status_json(ob);
    assert_eq!(st["queued"], 0);
    let lags: Vec<u64> = st["brokers"].as_array().unwrap().iter().map(|b| b["lag"].as_u64().unwrap()).collect();
    assert_eq!(lags, vec![0, 0]);
    // Each link's ack timeout, adaptive by default, and the round trip it
    // follows (at least the CONNECT to CONNACK sample).
    for b in st["brokers"].as_array().unwrap() {
        assert_eq!(b["ack_timeout_adaptive"], true, "{b}");
        assert!(b["ack_timeout_ms"].as_u64().is_some_and(|t| t >= 750), "{b}");
        assert!(b["round_trip_us"].as_u64().is_some(), "{b}");
    }
    let text = run(&["status", "--outbox", ob]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("ack timeout") && text.contains("(adaptive: round trip"), "{text}");

    // Failover: the primary is a port where nothing listens.
    let dead = format!("mqtt://127.0.0.1:{}", steadfast_testkit::free_port());
    let ob2 = dir.path().join("fo");
    let failover = [
        "pub",
        "-b",
        &dead,
        "-b",
        &b.url(),
        "-t",
        "multi",
        "-m",
        "via-backup",
        "--outbox",
        ob2.to_str().unwrap(),
        "--wait-timeout",
        "20s",
        "--ack-timeout",
        "3s",
    ];
    let out = run(&failover).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sub_b.wait_all(&["via-backup".to_owned()], Duration::from_secs(10)).await;
    assert!(!sub_a.lines().contains(&"via-backup".to_owned()));
    let backup = status_json(ob2.to_str().unwrap())["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["url"] == b.url())
        .cloned()
        .unwrap();
    assert_eq!(
        (backup["ack_timeout_ms"].as_u64(), &backup["ack_timeout_adaptive"]),
        (Some(3000), &serde_json::json!(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_through_a_named_route_from_a_config_file() {
    let home = Mosquitto::plain().await;
    let sub = Subscriber::start(home.port(), "routed", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, format!("[routes.home]\nbrokers = [\"{}\"]\n", home.url())).unwrap();
    let ob = dir.path().join("ob");
    let args = [
        "pub",
        "--config",
        cfg.to_str().unwrap(),
        "--route",
        "home",
        "-t",
        "routed",
        "-m",
        "hi",
        "--outbox",
        ob.to_str().unwrap(),
    ];
    let out = run(&args).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sub.wait_all(&["hi".to_owned()], Duration::from_secs(10)).await;
    let args = ["pub", "--config", cfg.to_str().unwrap(), "--route", "office", "-t", "routed", "-m", "hi"];
    let out = run(&args).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no route `office` in --config; it has: home"), "{}", stderr(&out));
}

/// `steadfast demo` as the README runs it (embedded brokers, nothing
/// installed): faults on a schedule and a verdict of nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_loses_nothing_and_says_so() {
    let stdout = demo(&["demo", "--seconds", "21", "--rate", "150"]).await;
    assert!(stdout.contains("two embedded (rumqttd) brokers"), "{stdout}");
    // The failover time the consumer saw after each broker fault.
    let faults = stdout.lines().find(|l| l.starts_with("faults: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        faults.contains("kill -9 broker A (deliveries ") && faults.contains("kill -9 broker B (deliveries "),
        "{faults}"
    );
    // A fault's row and its entry in the faults line give the same second.
    let row = stdout.lines().find(|l| l.trim_end().ends_with("kill -9 broker A")).expect("the fault's row");
    let second = row.split_whitespace().next().unwrap().trim_end_matches('s');
    assert!(
        faults.contains(&format!(" {second}.")) || faults.contains(&format!("faults: {second}.")),
        "{row} / {faults}"
    );
    // The table is exact: sent, accepted, delivered and handled never go
    // back, nothing is delivered or handled before it is accepted.
    let rows: Vec<Vec<u64>> = stdout
        .lines()
        .filter(|l| {
            l.split_whitespace().next().is_some_and(|t| t.ends_with('s') && t[..t.len() - 1].parse::<u64>().is_ok())
        })
        .map(|l| l.split_whitespace().skip(1).take(6).map(|n| n.parse().expect("a count")).collect())
        .collect();
    assert!(rows.len() > 5, "{stdout}");
    for pair in rows.windows(2) {
        for col in 0..4 {
            assert!(pair[1][col] >= pair[0][col], "column {col} went back: {pair:?}\n{stdout}");
        }
    }
    for r in &rows {
        let (accepted, delivered, handled) = (r[1], r[2], r[3]);
        assert!(delivered <= accepted && handled <= accepted, "{r:?}\n{stdout}");
    }
}

/// The same demo on Mosquitto with persistence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_on_mosquitto_loses_nothing() {
    let stdout = demo(&["demo", "--seconds", "21", "--rate", "150", "--brokers", "mosquitto"]).await;
    assert!(stdout.contains("two Mosquitto brokers"), "{stdout}");
}

#[tokio::test]
async fn the_demo_names_an_unknown_broker_kind() {
    let out = run(&["demo", "--brokers", "emqx"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--brokers emqx: use `auto`, `embedded` or `mosquitto`"), "{}", stderr(&out));
}

/// Runs the demo, checks its verdict (nothing lost, something sent) and
/// returns what it printed.
async fn demo(args: &[&str]) -> String {
    let out = run(args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", stderr(&out));
    assert!(stdout.contains("kill -9 broker A") && stdout.contains("kill -9 the consumer"), "{stdout}");
    let verdict = stdout.lines().find(|l| l.starts_with("verdict: ")).unwrap_or_else(|| panic!("no verdict: {stdout}"));
    assert!(verdict.starts_with("verdict: 0 of "), "{verdict}");
    assert!(!verdict.starts_with("verdict: 0 of 0 "), "something was published: {verdict}");
    stdout
}

/// Two `pub` on one outbox: the second joins it (its message accepted into
/// the outbox the first holds, on disk) and the first delivers it; the
/// second exits 0 once its message is delivered. A `sub` or a bridge on
/// it is still refused (they take the outbox whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pub_on_the_same_outbox_joins_it_and_the_first_delivers() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "cli/two", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    let mut first = steadfast()
        .args(["pub", "-b", &broker.url(), "-t", "cli/two", "-l", "-q", "1", "-i", "two", "--outbox", ob])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = first.stdin.take().unwrap();
    stdin.write_all(b"one\n").unwrap();
    stdin.flush().unwrap();
    sub.wait_count(1, Duration::from_secs(10)).await;
    let second = run(&["pub", "-b", &broker.url(), "-t", "cli/two", "-m", "joined", "--outbox", ob]).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    sub.wait_count(2, Duration::from_secs(10)).await;
    // For other brokers, it is refused: its message would go to the first's.
    let other = run(&["pub", "-b", "mqtt://127.0.0.1:9", "-t", "cli/two", "-m", "x", "--outbox", ob]).await;
    assert_eq!(other.status.code(), Some(1), "{}", stderr(&other));
    assert!(stderr(&other).contains("in use by another process that sends to"), "{}", stderr(&other));
    let args = ["pub", "-b", &broker.url(), "-t", "cli/two", "--class", "best-effort", "-m", "x", "--outbox", ob];
    let best_effort = run(&args).await;
    assert_ne!(best_effort.status.code(), Some(0), "{}", stderr(&best_effort));
    assert!(stderr(&best_effort).contains("best-effort messages are never stored"), "{}", stderr(&best_effort));
    stdin.write_all(b"two\nthree\n").unwrap();
    drop(stdin);
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sub.wait_count(4, Duration::from_secs(10)).await;
    let lines = sub.lines();
    assert_eq!(
        lines.iter().filter(|l| ["one", "joined", "two", "three"].contains(&l.as_str())).count(),
        4,
        "{lines:?}"
    );
    let st = status_json(ob);
    assert_eq!((st["queued"].as_u64(), st["brokers"][0]["acked"].as_u64()), (Some(0), Some(4)));
}

/// `for i in ...; do steadfast pub ... & done`: every process exits 0 and
/// every message arrives, whichever of them holds the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pub_at_once_on_one_outbox_all_deliver() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "cli/many", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let url = broker.url();
    let children: Vec<_> = (0..12)
        .map(|i| {
            steadfast()
                .args(["pub", "-b", &url, "-t", "cli/many", "-m", &format!("m{i}"), "-i", "many", "--outbox", &ob])
                .args(["--wait-timeout", "60s"])
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs = tokio::task::spawn_blocking(move || {
        children.into_iter().map(|c| c.wait_with_output().unwrap()).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for o in &outs {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
    }
    let want: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    sub.wait_all(&want, Duration::from_secs(20)).await;
    assert_eq!(status_json(&ob)["queued"], 0);
}

/// A `pub` that joined an outbox whose holder then ends without sending
/// its message (its broker down, its wait over) takes the outbox over and
/// sends it once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_pub_takes_the_outbox_over_when_its_holder_ends() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "cli/over", 1, None).await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    proxy.set(ProxyMode::Reset);
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let url = proxy.url();
    let args = |m: &str, wait: &str| -> Vec<String> {
        ["pub", "-b", &url, "-t", "cli/over", "-m", m, "-i", "over", "--outbox", &ob, "--wait-timeout", wait]
            .map(String::from)
            .to_vec()
    };
    let holder = steadfast().args(args("first", "3s")).stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let o = ob.clone();
    wait_until("the first pub to hold the outbox", Duration::from_secs(10), || {
        try_status_json(&o).is_ok_and(|s| s["owner_running"] == true)
    })
    .await;
    let joined = steadfast().args(args("second", "60s")).stdin(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let first = tokio::task::spawn_blocking(move || holder.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(first.status.code(), Some(3), "the broker is down: {}", stderr(&first));
    proxy.set(ProxyMode::Pass);
    let second = tokio::task::spawn_blocking(move || joined.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    sub.wait_all(&["first".to_string(), "second".to_string()], Duration::from_secs(20)).await;
    assert_eq!(status_json(&ob)["queued"], 0);
}

/// Every duration flag and key takes the one syntax: days and decimals in
/// a backoff too (`--backoff 1d..2d` was refused while `--ack-timeout 1d`
/// was taken).
#[tokio::test]
async fn every_duration_takes_the_same_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    let flags: &[&[&str]] = &[
        &["--backoff", "1d..2d"],
        &["--backoff", "0.5s..1.5m,6/h"],
        &["--ack-timeout", "1.5m", "--failback-after", "1d", "--session-expiry", "0.5d"],
        &["--class", "deadline", "--ttl", "1.5h", "--max-age", "2d"],
    ];
    for extra in flags {
        let mut args = vec!["pub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--no-wait", "--outbox", ob];
        args.extend_from_slice(extra);
        let out = run(&args).await;
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {}", stderr(&out));
    }
}

/// The chaos harness's short schedule with a fixed seed: broker kills,
/// resets, black holes, latency, bandwidth caps, producer and consumer
/// kills; every accepted identity handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_chaos_schedule_passes_with_a_fixed_seed() {
    chaos(&["chaos", "--seed", "7", "--seconds", "45"]).await;
}

/// The same on Mosquitto, restarted with persistence on or off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chaos_schedule_passes_on_mosquitto() {
    chaos(&["chaos", "--seed", "2", "--seconds", "30", "--brokers", "mosquitto"]).await;
}

async fn chaos(args: &[&str]) {
    let out = run(args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", stderr(&out));
    let seed = args[2];
    assert!(stdout.contains(&format!("schedule (seed {seed}):")), "{stdout}");
    let verdict = stdout.lines().find(|l| l.starts_with("verdict: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(verdict.starts_with("verdict: 0 of ") && verdict.contains(" 0 handled twice"), "{verdict}");
    // What was applied, counted by the runner as it applied it (the
    // schedule printed first names every kind whether it ran or not).
    let tally = FaultTally::parse(&stdout).unwrap_or_else(|| panic!("no fault tally:\n{stdout}"));
    assert!(tally.never_applied().is_empty(), "never applied: {:?}\n{stdout}", tally.never_applied());
}

/// `steadfast bench` (small): a table of rows against same-run baselines
/// as JSON, and the latency histogram as SVG; the bridge scenario runs
/// this very binary as its bridge, and ends on its acknowledged count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_json_against_same_run_baselines_and_plots_latency() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("latency.svg");
    let out = run(&[
        "bench",
        "publish",
        "consume",
        "bridge",
        "--messages",
        "2000",
        "--runs",
        "1",
        "--rate",
        "2000",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scenarios = report["scenarios"].as_array().unwrap();
    let names: Vec<_> = scenarios.iter().map(|s| s["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["publish", "consume", "bridge"]);
    for s in scenarios {
        let rows = s["rows"].as_array().unwrap();
        assert!(rows.iter().any(|r| r["baseline"] == true), "{s}");
        assert!(rows.iter().any(|r| r["ratio"].as_f64().is_some_and(|x| x > 0.0)), "{s}");
    }
    // The bridge is a process of its own: its CPU is the row's own, the
    // brokers' the children's, and with both the ratio the machine allows
    // at the direct publisher's own cost.
    let bridged = scenarios[2]["rows"].as_array().unwrap().iter().find(|r| r["baseline"] == false).unwrap();
    // Known, not necessarily above zero: the bridge is timed from its
    // first upstream acknowledgement, and the span of 2,000 messages can
    // be shorter than a few of the kernel's 10 ms ticks.
    assert!(bridged["own_cpu_us_per_msg"].as_f64().is_some_and(|us| us >= 0.0), "{bridged}");
    assert!(bridged["child_cpu_us_per_msg"].as_f64().is_some(), "{bridged}");
    assert!(bridged["cpu_max_ratio_at_par"].as_f64().is_some_and(|r| r > 0.0), "{bridged}");
    let publish = &scenarios[0]["rows"];
    let latency = publish
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"].as_str().unwrap().starts_with("latency: steadfast"))
        .unwrap();
    assert!(latency["p50_ms"].as_f64().unwrap() > 0.0 && latency["p99_ms"].as_f64() >= latency["p50_ms"].as_f64());
    // MQTT 5 is also measured against a bare client carrying the same
    // identity property, and steadfast against it in a note.
    let carrying =
        publish.as_array().unwrap().iter().find(|r| r["name"].as_str().unwrap().contains("identity property"));
    assert!(carrying.is_some_and(|r| r["ratio"].as_f64().is_some_and(|x| x > 0.0)), "{publish}");
    let notes = scenarios[0]["notes"].as_array().unwrap();
    assert!(
        notes.iter().any(|n| n.as_str().unwrap().starts_with("MQTT 5 against a client that carries the same identity")),
        "{notes:?}"
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("steadfast, durable") && svg.contains("bare rumqttc"), "{svg}");
    let out = run(&["bench", "nonsense"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown scenario `nonsense`"), "{}", stderr(&out));
}

/// Several brokers in MQTT 3.1.1 without the envelope cannot de-duplicate:
/// `pub` and `sub` say so once (nothing to reach: the warning comes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_brokers_in_mqtt_311_without_the_envelope_are_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let (ob, ib) = (dir.path().join("ob"), dir.path().join("ib"));
    let two = ["-V", "311", "-b", "mqtt://127.0.0.1:1", "-b", "mqtt://127.0.0.1:2"];
    let out =
        run(&[&["pub"][..], &two, &["-t", "a", "-m", "x", "--no-wait", "--outbox", ob.to_str().unwrap()]].concat())
            .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("without --envelope").count(), 1, "{}", stderr(&out));
    let out = run(&[&["sub"][..], &two, &["-t", "a", "-W", "1", "--inbox", ib.to_str().unwrap()]].concat()).await;
    assert_eq!(stderr(&out).matches("without --envelope").count(), 1, "{}", stderr(&out));
    // With it, or with one broker, nothing is said.
    let one = ["pub", "-V", "311", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-m", "x", "--no-wait", "--outbox"];
    let out = run(&[&one[..], &[ob.to_str().unwrap()]].concat()).await;
    assert!(!stderr(&out).contains("without --envelope"), "{}", stderr(&out));
    let enveloped = [&["pub", "--envelope"][..], &two, &["-t", "a", "-m", "x", "--no-wait", "--outbox"]].concat();
    let out = run(&[&enveloped[..], &[ob.to_str().unwrap()]].concat()).await;
    assert!(!stderr(&out).contains("without --envelope"), "{}", stderr(&out));
}

/// A server that is not an MQTT broker (its banner comes first): said as
/// such, at once, with exit 1, by `pub` and `sub` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_an_mqtt_broker_is_named_so() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtt://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let out = run(&["pub", "-b", &url, "-t", "a", "-m", "x", "--outbox", ob.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = "is not an MQTT broker: it answered CONNECT with `SSH-2.0-OpenSSH_9.2\\r\\n`";
    assert!(stderr(&out).contains(said), "{}", stderr(&out));
    let ib = dir.path().join("ib");
    let out = run(&["sub", "-b", &url, "-t", "a", "--inbox", ib.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(said), "{}", stderr(&out));
    server.abort();
}

/// mosquitto's `-L URL`: broker, credentials and topic in one flag, for
/// `pub` and `sub`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_flag_gives_broker_credentials_and_topic() {
    let broker = Mosquitto::with_password("lu", "lp").await;
    let dir = tempfile::tempdir().unwrap();
    let (ob, ib) = (dir.path().join("ob"), dir.path().join("ib"));
    let base = format!("mqtt://lu:lp@127.0.0.1:{}", broker.port());
    let sub = ["sub", "-L", &format!("{base}/l/#"), "-i", "l-sub", "--inbox", ib.to_str().unwrap()];
    let out = run(&[&sub[..], &["--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let l = format!("{base}/l/one");
    let out = run(&["pub", "-L", &l, "-m", "via -L", "--outbox", ob.to_str().unwrap(), "--wait-timeout", "20"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[&sub[..], &["-C", "1", "-W", "20", "-v"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "l/one via -L\n");
    // It gives the broker and topic: -b or -t as well is a mistake.
    let out = run(&["pub", "-L", &l, "-t", "x", "-m", "m", "--outbox", ob.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("-L gives the topic already"), "{}", stderr(&out));
    let out = run(&["pub", "-L", &l, "-b", "mqtt://127.0.0.1:1", "-m", "m", "--outbox", ob.to_str().unwrap()]).await;
    assert!(stderr(&out).contains("-L gives the broker already"), "{}", stderr(&out));
    let out = run(&[&sub[..], &["-t", "other/#", "-W", "1"]].concat()).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("-L gives the filter already"), "{}", stderr(&out));
}

/// The hint a timed-out `pub` prints runs as printed once the broker is
/// back: it names the brokers (and what reaching them takes), not only
/// the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_hint_of_a_timed_out_pub_runs_as_printed() {
    let mut broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    broker.kill9();
    let args = ["pub", "-b", &broker.url(), "-V", "311", "-t", "hint/t", "-m", "later", "--wait-timeout", "1s"];
    let out = run(&[&args[..], &["--outbox", ob.to_str().unwrap()]].concat()).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    let hint = err.split("send them later with `").nth(1).and_then(|r| r.split('`').next()).expect("a hint");
    assert!(hint.contains(&format!("-b {}", broker.url())) && hint.contains("-V 311"), "{hint}");
    broker.restart().await;
    let sub = Subscriber::start(broker.port(), "hint/t", 1, None).await;
    let words: Vec<&str> = hint.split_whitespace().collect();
    assert_eq!(words[0], "steadfast");
    let out = run(&[&words[1..], &["--wait-timeout", "20s", "--summary"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{hint}: {}", stderr(&out));
    // The summary counts what the drain delivered, not only what it accepted.
    assert!(stderr(&out).contains("0 accepted, 1 delivered, 0 dropped, 0 queued"), "{}", stderr(&out));
    sub.wait_count(1, Duration::from_secs(10)).await;
    assert_eq!(sub.lines(), ["later"]);
}

/// `status` with no store named lists every outbox and inbox that `pub`
/// and `sub` made in the default place, a line each (here a private
/// `XDG_STATE_HOME`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_alone_lists_the_default_stores() {
    let state = tempfile::tempdir().unwrap();
    let in_state = |args: &[&str]| {
        let mut c = steadfast();
        c.env("XDG_STATE_HOME", state.path()).args(args).stdin(Stdio::null());
        c
    };
    let out = in_state(&["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("no outbox or inbox in"), "{out:?}");
    let out = in_state(&["pub", "-b", "mqtt://127.0.0.1:1", "-i", "lister", "-t", "a", "-m", "x", "--no-wait"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // No broker there: `-W` ends it as a timeout (exit 3), its inbox made.
    let out = in_state(&["sub", "-b", "mqtt://127.0.0.1:1", "-i", "reader", "-t", "a", "-W", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = in_state(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("inbox") && lines[0].contains("inbox/reader") && lines[0].contains("not in use"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("outbox") && lines[1].contains("outbox/lister") && lines[1].contains("1 queued"),
        "{text}"
    );
    let out = in_state(&["status", "--json"]).output().unwrap();
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((all[0]["kind"].as_str(), all[1]["queued"].as_u64()), (Some("inbox"), Some(1)), "{all}");
}
