//! `pub --receipts` and `sub` as child processes against real Mosquitto:
//! `pub` waits until every message is handled, a `pub` killed while it
//! waits leaves the wait on disk, and the next run (with or without
//! `--receipts`) collects the receipts that came meanwhile.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use steadfast_testkit::{wait_until, Mosquitto};

use crate::{run, stderr, steadfast, try_status_json};

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("r-{i:04}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_waits_for_handling_and_a_killed_pub_leaves_its_wait_on_disk() {
    let broker = Mosquitto::plain().await;
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();
    let (outbox, inbox) = (dir.path().join("ob"), dir.path().join("in"));
    let (outbox, inbox) = (outbox.to_str().unwrap().to_owned(), inbox.to_str().unwrap().to_owned());
    let sub = ["sub", "-b", &url, "-t", "e2e/#", "-i", "line1", "--inbox", &inbox];
    let out = run(&[&sub[..], &["--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // No consumer runs: the messages are delivered and wait for receipts
    // until this `pub` is killed.
    let args = ["pub", "-b", &url, "-t", "e2e/t", "-l", "-i", "gw", "--outbox", &outbox, "--receipts"];
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
    let args = [
        "pub",
        "-b",
        &url,
        "-t",
        "e2e/t",
        "-l",
        "-i",
        "gw",
        "--outbox",
        &outbox,
        "--receipts",
        "--wait-timeout",
        "30s",
    ];
    let mut p = steadfast().args(args).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    p.stdin.take().unwrap().write_all(lines(50).as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || p.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(try_status_json(&outbox).unwrap()["receipts"]["handled"].as_u64(), Some(250));
    assert!(tokio::task::spawn_blocking(move || consumer.wait().unwrap()).await.unwrap().success());
    let args = [
        "pub",
        "-b",
        &url,
        "-t",
        "e2e/t",
        "-m",
        "x",
        "-i",
        "gw",
        "--outbox",
        &outbox,
        "--receipts",
        "--wait-timeout",
        "2s",
    ];
    let out = run(&args).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}
