//! `steadfast doctor` against Mosquitto with and without persistence (the
//! test restarts it when the doctor says so) and against a broker that
//! refuses MQTT 5 (rumqttd's 3.1.1 listener, the embedded broker).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use steadfast_testkit::{free_port, Mosquitto, MosquittoOptions};

use crate::{run, stderr, steadfast};

/// Runs `doctor --restart-wait --json` and restarts `broker` (SIGTERM,
/// then start) when the doctor asks for it.
async fn doctor_with_restart(broker: &mut Mosquitto) -> (serde_json::Value, Option<i32>) {
    let mut child = steadfast()
        .args(["doctor", "-b", &broker.url(), "--json", "--restart-wait", "--restart-within", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let asked = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains("restart the broker now") {
                return Ok(err);
            }
            line.clear();
        }
        Err(line)
    })
    .await
    .unwrap();
    let err = asked.unwrap_or_else(|l| panic!("the doctor never asked for a restart: {l}"));
    broker.terminate();
    broker.restart().await;
    let out = tokio::task::spawn_blocking(move || {
        let o = child.wait_with_output().unwrap();
        drop(err);
        o
    })
    .await
    .unwrap();
    let json =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (json, out.status.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_tells_mosquitto_with_persistence_from_without() {
    let mut with = Mosquitto::start(MosquittoOptions { persistence: true, ..Default::default() }).await;
    let (report, code) = doctor_with_restart(&mut with).await;
    assert_eq!(code, Some(0), "{report}");
    assert!(report["software"].as_str().unwrap_or("").starts_with("mosquitto version"), "{report}");
    for check in ["mqtt5", "mqtt311", "qos2", "retained", "session", "restart"] {
        assert_eq!(report["checks"][check]["ok"], true, "{check}: {report}");
    }
    // Mosquitto keeps the session of a subscriber as it disconnects: the
    // message sent right after the DISCONNECT is there too.
    assert_eq!(report["checks"]["disconnect_race"]["ok"], true, "{report}");
    assert_eq!(report["limits"]["receive_maximum"], 20, "Mosquitto's default: {report}");
    // An announced receive maximum is kept to, not probed past.
    assert_eq!(report["checks"]["inflight"]["ok"], true, "{report}");
    let inflight = report["checks"]["inflight"]["detail"].as_str().unwrap();
    assert!(inflight.contains("announces a receive maximum of 20"), "{report}");
    assert!(report["inflight_closes_at"].is_null(), "{report}");
    let advice = report["advice"].to_string();
    assert!(advice.contains("autosave_interval") && advice.contains("max_queued_messages"), "{advice}");
    assert!(!advice.contains("die with a restart"), "{advice}");
    assert!(!advice.contains("`persistence true`"), "confirmed, not advised again: {advice}");

    let mut without = Mosquitto::start(MosquittoOptions { persistence: false, ..Default::default() }).await;
    let (report, code) = doctor_with_restart(&mut without).await;
    // `doctor && deploy` must not pass a broker that loses sessions on a restart.
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["checks"]["session"]["ok"], true, "{report}");
    assert_eq!(report["checks"]["restart"]["ok"], false, "{report}");
    assert!(report["checks"]["restart"]["detail"].as_str().unwrap().contains("session was gone"), "{report}");
    let advice = report["advice"].to_string();
    assert!(advice.contains("set `persistence true`"), "{report}");
    assert_eq!(advice.matches("`persistence true`").count(), 1, "said once: {advice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_a_broker_that_refuses_mqtt_5() {
    let port = free_port();
    let mut broker = steadfast()
        .args(["broker", "--port", &port.to_string(), "--protocol-version", "311"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    steadfast_testkit::wait_until("the 3.1.1 broker listens", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let url = format!("mqtt://127.0.0.1:{port}");
    let out = run(&["doctor", "-b", &url]).await;
    let _ = broker.kill();
    let _ = broker.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    let line = |what: &str| text.lines().find(|l| l.trim_start().starts_with(what)).unwrap_or_else(|| panic!("{text}"));
    assert!(line("MQTT 5.0").contains(" NO "), "{text}");
    assert!(line("MQTT 3.1.1").contains(" yes "), "{text}");
    assert!(line("session kept across a reconnect").contains(" yes "), "{text}");
    assert!(text.contains("does not accept MQTT 5: use -V 311"), "{text}");
    assert!(line("session kept across a broker restart").contains("not checked"), "{text}");
}

#[tokio::test]
async fn doctor_without_a_broker_says_so() {
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let out = run(&["doctor", "-b", &url]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot connect to"), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(report.contains("cannot reach"), "the report says why: {report}");
    assert!(report.contains("software: unknown (the broker could not be reached)"), "{report}");
    // -d: the probes say what they do.
    let out = run(&["doctor", "-d", "-b", &url]).await;
    assert!(stderr(&out).contains("doctor: connecting"), "{}", stderr(&out));
    let out = run(&["doctor", "-b", &url, "-b", &url]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("exactly one -b URL"), "{}", stderr(&out));
}

/// Mosquitto with an ACL that denies the probes' topics answers them with
/// PUBACK/PUBREC 0x87 over MQTT 5: QoS 2, retained messages and sessions
/// are "not checked" with the refusal named and the fix, not reported as
/// missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_the_refusal_of_probes_an_acl_denies() {
    let broker = Mosquitto::with_acl("topic readwrite other/#\n", vec![]).await;
    let out = run(&["doctor", "-b", &broker.url()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{text}");
    let line = |what: &str| text.lines().find(|l| l.trim_start().starts_with(what)).unwrap_or_else(|| panic!("{text}"));
    for what in ["QoS 2", "retained messages", "session kept across a reconnect"] {
        let l = line(what);
        assert!(l.contains("(reason code 0x87, not authorized): not checked"), "{what}: {text}");
        assert!(l.contains("allow steadfast/doctor/# for this client"), "{what}: {text}");
    }
}
