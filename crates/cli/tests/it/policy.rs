//! Delivery classes, bounds and metrics from the command line, with the
//! broker out of reach behind the fault proxy (every connection reset).

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

use steadfast_testkit::{free_port, FaultProxy, Mosquitto, ProxyMode, Subscriber};

use crate::{scrape, status_json, stderr, steadfast};

/// `steadfast ARGS` with `input` on stdin, to completion.
pub(super) async fn run_with_input(args: Vec<String>, input: String) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = steadfast()
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// The value of a sample (`name{labels}`) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Scrapes the metrics at `port` until `series` reads `value`; the text
/// of that scrape.
async fn scrape_until(port: u16, series: &str, value: f64, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(t) = scrape(port).await {
            if sample(&t, series) == Some(value) {
                return t;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{series} did not reach {value} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lines(prefix: &str, n: usize) -> String {
    (1..=n).map(|i| format!("{prefix}{i}\n")).collect()
}

/// With the broker out of reach: deadline messages expire and are counted,
/// best-effort ones are dropped and counted, keep-latest leaves one value
/// of its topic, persistent ones wait; when the broker is back, the
/// priority 9 alarms go out first. Every figure is checked against the
/// metrics endpoint, scraped over HTTP, and against `status --json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_during_an_outage_match_the_metrics() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "policy/#", 1, None).await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    proxy.set(ProxyMode::Reset);
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob").display().to_string();
    let url = proxy.url();
    let publish = |extra: &[&str], input: String| {
        let mut args: Vec<String> = ["pub", "-b", &url, "--outbox", &outbox, "-l", "--no-wait", "--progress", "never"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        run_with_input(args, input)
    };
    let runs = [
        (vec!["-t", "policy/tele"], lines("m", 20)),
        (vec!["-t", "policy/temp", "--keep-latest"], lines("t", 10)),
        (vec!["-t", "policy/live", "--class", "best-effort"], lines("l", 4)),
        (vec!["-t", "policy/alarm", "--priority", "9"], lines("a", 3)),
        (vec!["-t", "policy/press", "--class", "deadline", "--ttl", "4s"], lines("p", 5)),
    ];
    for (extra, input) in runs {
        let o = publish(&extra, input).await;
        // With no broker, the best-effort run drops all it was given, and
        // says so with exit 1; the others only queue.
        let best_effort = extra.contains(&"best-effort");
        assert_eq!(o.status.code(), Some(if best_effort { 1 } else { 0 }), "{extra:?}: {}", stderr(&o));
        if best_effort {
            assert!(stderr(&o).contains("4 best-effort"), "{}", stderr(&o));
        }
    }

    // A drain with metrics, while the broker is still out of reach.
    let mport = free_port();
    let drain = steadfast()
        .args(["pub", "-b", &url, "--outbox", &outbox, "--drain", "--backoff", "50ms..300ms"])
        .args(["--metrics", &format!("127.0.0.1:{mport}"), "--wait-timeout", "60s", "--progress", "never"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let expired = "steadfast_dropped_total{reason=\"expired\"}";
    let text = scrape_until(mport, expired, 5.0, Duration::from_secs(20)).await;
    assert_eq!(sample(&text, "steadfast_queue_depth"), Some(24.0), "3 alarms + 1 temp + 20 telemetry\n{text}");
    assert_eq!(sample(&text, "steadfast_dropped_total{reason=\"best-effort\"}"), Some(4.0), "{text}");
    assert_eq!(sample(&text, "steadfast_dropped_total{reason=\"superseded\"}"), Some(9.0), "{text}");
    assert_eq!(sample(&text, "steadfast_dropped_total{reason=\"overflow\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, &format!("steadfast_broker_connected{{broker=\"{url}\"}}")), Some(0.0), "{text}");
    assert!(sample(&text, "steadfast_oldest_message_age_seconds").is_some_and(|a| a > 0.0), "{text}");
    assert!(text.contains("steadfast_disk_sync_seconds_bucket"), "{text}");
    assert_eq!(sub.count(), 0, "nothing got through the outage");

    // The broker is back.
    proxy.set(ProxyMode::Pass);
    let out = tokio::task::spawn_blocking(move || drain.wait_with_output().unwrap()).await.unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "drops in this run are reported: {err}");
    assert!(err.contains("5 expired"), "{err}");
    sub.wait_count(24, Duration::from_secs(20)).await;
    let got = sub.lines();
    assert_eq!(&got[..3], ["a1", "a2", "a3"], "priority 9 first: {got:?}");
    let mut rest: Vec<String> = (1..=20).map(|i| format!("m{i}")).collect();
    rest.push("t10".into());
    assert_eq!(&got[3..], rest.as_slice(), "then the rest in order, one temperature: {got:?}");

    // The counts are kept on disk.
    let s = status_json(&outbox);
    let dropped = &s["dropped"];
    assert_eq!((dropped["expired"].as_u64(), dropped["best-effort"].as_u64()), (Some(5), Some(4)), "{s}");
    assert_eq!(dropped["superseded"].as_u64(), Some(9), "{s}");
    assert_eq!(s["queued"].as_u64(), Some(0), "{s}");
}

/// A full outbox under each overflow policy: reject fails the run and
/// keeps the queue; drop-newest keeps the queue and counts the newcomers;
/// drop-oldest keeps the newest and counts the oldest; nothing leaves
/// without a count, and each run says what it dropped (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_behaves_as_its_overflow_policy_says() {
    let broker = Mosquitto::plain().await;
    let proxy = FaultProxy::start(broker.port()).await.unwrap();
    proxy.set(ProxyMode::Reset);
    let dir = tempfile::tempdir().unwrap();
    let url = proxy.url();
    // Every run exits 1: reject refused one, the drop policies say how many
    // they dropped.
    for (policy, overflow) in [("reject", 0), ("drop-newest", 2), ("drop-oldest", 2)] {
        let outbox = dir.path().join(policy).display().to_string();
        let args: Vec<String> = ["pub", "-b", &url, "--outbox", &outbox, "-t", "full", "-l", "--no-wait"]
            .iter()
            .chain(&["--max-queue", "3", "--overflow", policy, "--progress", "never"])
            .map(|s| s.to_string())
            .collect();
        let o = run_with_input(args, lines("", 5)).await;
        assert_eq!(o.status.code(), Some(1), "{policy}: {}", stderr(&o));
        if overflow > 0 {
            assert!(stderr(&o).contains("2 overflow"), "{policy}: {}", stderr(&o));
        }
        if policy == "reject" {
            assert!(stderr(&o).contains("outbox is full"), "{}", stderr(&o));
        }
        if policy == "drop-newest" {
            assert!(stderr(&o).contains("counted as `overflow`"), "{}", stderr(&o));
        }
        let s = status_json(&outbox);
        assert_eq!(s["queued"].as_u64(), Some(3), "{policy}: {s}");
        assert_eq!(s["dropped"]["overflow"].as_u64(), Some(overflow), "{policy}: {s}");
    }
    // Deliver the drop-oldest outbox and check what survived.
    proxy.set(ProxyMode::Pass);
    let sub = Subscriber::start(broker.port(), "full", 1, None).await;
    let outbox = dir.path().join("drop-oldest").display().to_string();
    let o = crate::run(&["pub", "-b", &url, "--outbox", &outbox, "--drain", "--wait-timeout", "30s"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    sub.wait_count(3, Duration::from_secs(10)).await;
    assert_eq!(sub.lines(), ["3", "4", "5"]);
    assert_eq!(status_json(&outbox)["queued"].as_u64(), Some(0));
}

/// The progress line appears when asked for (`always`), and a run whose
/// stderr is not a terminal (`auto`, the default) prints nothing extra.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_drawn_only_when_asked_or_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("mqtt://127.0.0.1:{}", free_port());
    for (mode, shown) in [("always", true), ("auto", false)] {
        let outbox = dir.path().join(mode).display().to_string();
        let args: Vec<String> = ["pub", "-b", &nowhere, "--outbox", &outbox, "-t", "p", "-l", "--progress", mode]
            .iter()
            .chain(&["--wait-timeout", "1s"])
            .map(|s| s.to_string())
            .collect();
        let o = run_with_input(args, lines("", 2000)).await;
        assert_eq!(o.status.code(), Some(3), "{mode}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.contains("accepted · 2000 queued"), shown, "{mode}: {err}");
        assert_eq!(err.contains("ETA"), shown, "{mode}: {err}");
    }
}

/// `--log-format json`: every log line is a JSON object with a level and a
/// message; the password given on the command line appears nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_and_carry_no_credentials() {
    let broker = Mosquitto::with_password("user", "right").await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob").display().to_string();
    let url = broker.url();
    let args: Vec<String> =
        ["-d", "--log-format", "json", "pub", "-b", &url, "--outbox", &outbox, "-t", "j", "-m", "x"]
            .iter()
            .chain(&["-u", "user", "-P", "s3cr3t-pw", "--wait-timeout", "2s"])
            .map(|s| s.to_string())
            .collect();
    let o = run_with_input(args, String::new()).await;
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "bad credentials fail: {err}");
    let logs: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!logs.is_empty(), "debug logs expected: {err}");
    for l in &logs {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    assert!(!err.contains("s3cr3t-pw"), "the password leaked: {err}");
}

/// The stages of a message's way are histograms in the metrics: from the
/// append to the synced commit (`steadfast_accept_seconds`) and from the
/// enqueue to the broker's acknowledgement (`steadfast_delivery_seconds`),
/// one sample per message, in buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_s_accept_and_delivery_times_are_in_the_metrics() {
    let broker = Mosquitto::plain().await;
    let sub = Subscriber::start(broker.port(), "timed/#", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("ob").display().to_string();
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let mport = free_port();
    let mut publisher = steadfast()
        .args(["pub", "-b", &url, "--outbox", &outbox, "-t", "timed/a", "-l", "--progress", "never"])
        .args(["--metrics", &format!("127.0.0.1:{mport}")])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    stdin.write_all(lines("m", 50).as_bytes()).unwrap();
    stdin.flush().unwrap();
    // Scraped while the publisher still runs (its stdin is open).
    let text = scrape_until(mport, "steadfast_delivery_seconds_count", 50.0, Duration::from_secs(30)).await;
    assert_eq!(sample(&text, "steadfast_accept_seconds_count"), Some(50.0), "{text}");
    assert!(sample(&text, "steadfast_accept_seconds_sum").is_some_and(|s| s > 0.0), "{text}");
    assert_eq!(sample(&text, "steadfast_accept_seconds_bucket{le=\"+Inf\"}"), Some(50.0), "{text}");
    assert_eq!(sample(&text, "steadfast_delivery_seconds_bucket{le=\"3600\"}"), Some(50.0), "{text}");
    assert!(text.contains("steadfast_delivery_seconds_bucket{le=\"0.001\"}"), "{text}");
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || publisher.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sub.wait_count(50, Duration::from_secs(20)).await;
}
