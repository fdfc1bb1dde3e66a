//! `pub --receipts` and `sub` as child processes against real Mosquitto:
//! `pub` waits until every message is handled, a `pub` killed while it
//! waits leaves the wait on disk, and the next run (with or without
//! `--receipts`) collects the receipts that came meanwhile.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use steadfast_testkit::{wait_until, Mosquitto};

use crate::{run, stderr, steadfast, try_status_json};

/// `pub` to `url` as `gw` on `outbox`, with receipts, then `extra`.
fn pub_args<'a>(url: &'a str, outbox: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["pub", "-b", url, "-i", "gw", "--outbox", outbox, "--receipts"];
    a.extend_from_slice(extra);
    a
}

/// An outbox and an inbox path in `dir`.
fn stores(dir: &tempfile::TempDir) -> (String, String) {
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    (path("ob"), path("in"))
}

/// `SUB --register`: the consumer's session exists before anything is
/// published.
async fn register(sub: &[&str]) {
    let out = run(&[sub, &["--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("r-{i:04}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_waits_for_handling_and_a_killed_pub_leaves_its_wait_on_disk() {
    let broker = Mosquitto::plain().await;
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let (outbox, inbox) = stores(&dir);
    let sub = ["sub", "-b", &url, "-t", "e2e/#", "-i", "line1", "--inbox", &inbox];
    register(&sub).await;

    // No consumer runs: the messages are delivered and wait for receipts
    // until this `pub` is killed.
    let args = pub_args(&url, &outbox, &["-t", "e2e/t", "-l"]);
    let mut child = steadfast().args(args).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(lines(200).as_bytes()).unwrap();
    let awaiting = |o: &str| try_status_json(o).ok().and_then(|j| j["receipts"]["awaiting"].as_u64());
    let ob = outbox.clone();
    wait_until("200 awaiting receipts", Duration::from_secs(20), || awaiting(&ob) == Some(200)).await;
    assert_eq!(child.try_wait().unwrap(), None, "pub waits for the receipts");
    let _ = std::process::Command::new("kill").args(["-s", "KILL", &child.id().to_string()]).status();
    let _ = child.wait();
    let j = try_status_json(&outbox).unwrap();
    assert_eq!((j["queued"].as_u64(), j["receipts"]["awaiting"].as_u64()), (Some(200), Some(200)), "{j}");

    // The consumer handles them and sends receipts; they wait in the
    // broker for the producer's receipts session.
    let out = run(&[&sub[..], &["-C", "200", "-W", "30"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), lines(200));

    // A later run that asks for no receipts still collects them.
    let out = run(&["pub", "-b", &url, "-i", "gw", "--outbox", &outbox, "--drain", "--wait-timeout", "30s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let j = try_status_json(&outbox).unwrap();
    assert_eq!(j["queued"].as_u64(), Some(0), "{j}");
    assert_eq!((j["receipts"]["handled"].as_u64(), j["receipts"]["awaiting"].as_u64()), (Some(200), Some(0)), "{j}");

    // With a consumer running, `pub --receipts` returns once each message
    // is handled; without one, --wait-timeout ends the wait with exit 3.
    let mut consumer =
        steadfast().args([&sub[..], &["-C", "50", "-W", "30"]].concat()).stdout(Stdio::null()).spawn().unwrap();
    let args = pub_args(&url, &outbox, &["-t", "e2e/t", "-l", "--wait-timeout", "30s"]);
    let mut p = steadfast().args(args).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    p.stdin.take().unwrap().write_all(lines(50).as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || p.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(try_status_json(&outbox).unwrap()["receipts"]["handled"].as_u64(), Some(250));
    assert!(tokio::task::spawn_blocking(move || consumer.wait().unwrap()).await.unwrap().success());
    let args = pub_args(&url, &outbox, &["-t", "e2e/t", "-m", "x", "--wait-timeout", "2s"]);
    let out = run(&args).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

/// `pub` and `sub` are `kill -9`ed at random points (seeded) while 20,000
/// messages with receipts go through: at the end every message was
/// handled and its receipt counted, and the producer holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_producer_and_consumer_at_random_points_loses_nothing() {
    const N: usize = 20_000;
    let seed = std::env::var("STEADFAST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed {seed} (STEADFAST_SEED={seed} repeats this run)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = Mosquitto::plain().await;
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let (outbox, inbox) = stores(&dir);
    let sub: Vec<String> = ["sub", "-b", &url, "-t", "e2e/#", "-i", "line1", "--inbox", &inbox, "--max-inflight", "64"]
        .map(String::from)
        .to_vec();
    register(&sub.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let holder: Vec<String> =
        ["pub", "-b", &url, "-i", "gw", "--outbox", &outbox, "--receipts", "--receipt-timeout", "2s"]
            .map(String::from)
            .to_vec();
    // Everything accepted first (on disk), then delivered by holders that
    // get killed.
    let mut accept = steadfast()
        .args(&holder)
        .args(["-t", "e2e/t", "-l", "--no-wait"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    accept.stdin.take().unwrap().write_all(lines(N).as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || accept.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = |round: usize| dir.path().join(format!("sub-{round}.out"));
    let spawn_sub = |round: usize| {
        let file = std::fs::File::create(printed(round)).unwrap();
        let err = std::fs::File::create(dir.path().join(format!("sub-{round}.err"))).unwrap();
        steadfast().args(&sub).stdout(file).stderr(err).spawn().unwrap()
    };
    let kill9 = |c: &mut std::process::Child| {
        let _ = std::process::Command::new("kill").args(["-s", "KILL", &c.id().to_string()]).status();
        let _ = c.wait();
    };
    let (rounds, mut sub_kills) = (4, 0);
    for round in 0..rounds {
        let mut p = steadfast().args(&holder).arg("--drain").stderr(Stdio::null()).spawn().unwrap();
        let mut s = spawn_sub(round);
        // Fault injection at a random moment, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(rng.u64(200..1_500))).await;
        match rng.u8(0..3) {
            0 => kill9(&mut p),
            1 => {
                kill9(&mut s);
                sub_kills += 1;
            }
            _ => {
                kill9(&mut p);
                kill9(&mut s);
                sub_kills += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(50..500))).await;
        kill9(&mut p);
        if s.try_wait().unwrap().is_none() {
            kill9(&mut s);
            sub_kills += 1;
        }
    }
    // Then both run to the end: the holder returns once every message is
    // handled.
    let mut s = spawn_sub(rounds);
    let out =
        run(&[&holder.iter().map(String::as_str).collect::<Vec<_>>()[..], &["--drain", "--wait-timeout", "120s"]]
            .concat())
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let _ = std::process::Command::new("kill").args(["-s", "TERM", &s.id().to_string()]).status();
    assert!(tokio::task::spawn_blocking(move || s.wait().unwrap()).await.unwrap().success());
    let j = try_status_json(&outbox).unwrap();
    assert_eq!((j["queued"].as_u64(), j["receipts"]["awaiting"].as_u64()), (Some(0), Some(0)), "{j}");
    assert_eq!(j["receipts"]["handled"].as_u64(), Some(N as u64), "{j}");
    let mut count: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut first: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    // Per round: lines printed, and of them how many each earlier round
    // printed first.
    let mut per_round = Vec::new();
    for round in 0..=rounds {
        let text = std::fs::read_to_string(printed(round)).unwrap();
        let mut again = vec![0; round];
        for l in text.lines() {
            if let Some(r) = first.get(l).filter(|r| **r < round) {
                again[*r] += 1;
            }
            first.entry(l.to_owned()).or_insert(round);
            *count.entry(l.to_owned()).or_default() += 1;
        }
        per_round.push((text.lines().count(), again));
    }
    eprintln!("per round (printed, of them printed first by each earlier round): {per_round:?}");
    for round in 0..=rounds {
        let err = std::fs::read_to_string(dir.path().join(format!("sub-{round}.err"))).unwrap_or_default();
        let notable: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("warning") || l.contains("error"))
            .take(5)
            .collect();
        if !notable.is_empty() {
            eprintln!("sub {round}: {notable:#?}");
        }
    }
    let missing: Vec<String> =
        lines(N).lines().filter(|l| !count.contains_key(*l)).take(5).map(str::to_owned).collect();
    assert!(missing.is_empty(), "never handled: {missing:?}");
    // A line printed again is one a killed `sub` had printed and not yet
    // recorded: at most its window (--max-inflight 64) per kill, whatever
    // the broker sends (Mosquitto 2.0.11 sends more than the Receive
    // Maximum; the consumer hands over no more than it).
    let repeats: usize = count.values().map(|n| n - 1).sum();
    eprintln!("{repeats} lines printed again after {sub_kills} kills of sub");
    assert!(
        repeats <= 64 * sub_kills,
        "{repeats} lines printed again after {sub_kills} kills of sub: more than its window"
    );
}

/// A broker whose ACL lets the consumer read the messages but not publish
/// receipts answers each receipt with PUBACK 0x87 (MQTT 5): the consumer
/// says so, with the fix, instead of leaving the producer to time out
/// without a word on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_the_broker_refuses_is_said_by_the_consumer() {
    let broker = Mosquitto::with_acl("topic readwrite e2e/#\ntopic read steadfast/receipts/#\n", vec![]).await;
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let (outbox, inbox) = stores(&dir);
    let sub = ["sub", "-b", &url, "-t", "e2e/#", "-i", "line1", "--inbox", &inbox];
    register(&sub).await;
    let out = run(&pub_args(&url, &outbox, &["-t", "e2e/t", "-m", "x", "--wait-timeout", "1s"])).await;
    assert_eq!(out.status.code(), Some(3), "no receipt within the wait: {}", stderr(&out));
    // Handled, its receipt refused (Mosquitto then closes the link); -W
    // ends the run once nothing more comes.
    let out = run(&[&sub[..], &["-W", "2"]].concat()).await;
    let err = stderr(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x\n", "{err}");
    assert!(err.contains("the broker refused a receipt") && err.contains("0x87, not authorized"), "{err}");
    assert!(err.contains("steadfast/receipts/#"), "{err}");
}
