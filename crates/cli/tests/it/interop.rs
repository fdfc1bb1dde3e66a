//! The interop matrix (docs/interop.md): `steadfast pub` and `sub` against
//! brokers and clients no one here wrote — RabbitMQ's MQTT plugin, NATS's
//! MQTT listener, amqtt, aedes, Python's paho-mqtt 2 — each started by the
//! test. Where a
//! broker lacks a feature, the clear error or the downgrade is checked.

use std::process::Stdio;
use std::time::Duration;

use steadfast_testkit::{node, Aedes, Amqtt, Mosquitto, Nats, RabbitMq};

use crate::{run, stderr};

/// `sub --register`, `n` messages through `pub`, then `sub -C n`: every
/// payload once, in order. `extra` goes to both ends.
async fn round_trip(pub_url: &str, sub_url: &str, extra: &[&str], tag: &str, n: usize) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    let ob = dir.path().join("ob");
    // QoS 1 unless `extra` says otherwise.
    let qos: &[&str] = if extra.contains(&"-q") { &[] } else { &["-q", "1"] };
    let strs = |v: &[&str]| -> Vec<String> { v.iter().chain(qos).chain(extra).map(|s| s.to_string()).collect() };
    let mut sub = strs(&["sub", "-b", sub_url, "-t", &format!("{tag}/#"), "-i", &format!("{tag}-sub")]);
    sub.extend(["--inbox".to_string(), inbox.display().to_string()]);
    let mut register = sub.clone();
    register.push("--register".into());
    let out = run(&register.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "register: {}", stderr(&out));
    let lines: String = (0..n).map(|i| format!("{tag}-{i:05}\n")).collect();
    // Bounded: a broker that never acknowledges fails the test with pub's
    // own account (exit 3) instead of hanging it.
    let mut publish = strs(&["pub", "-b", pub_url, "-t", &format!("{tag}/x"), "-l", "-i", tag, "--wait-timeout", "90"]);
    publish.extend(["--outbox".to_string(), ob.display().to_string()]);
    let out = pub_lines(publish, lines).await;
    let pub_err = stderr(&out);
    sub.extend(["-C".into(), n.to_string(), "-W".into(), "30".into()]);
    let out = run(&sub.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "sub: {}", stderr(&out));
    let want: String = (0..n).map(|i| format!("{tag}-{i:05}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    (pub_err, stderr(&out))
}

/// `steadfast` with `args` (a `pub -l`), `lines` on its stdin; checks
/// that it exited 0.
async fn pub_lines(args: Vec<String>, lines: String) -> std::process::Output {
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = crate::steadfast().args(&args).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "pub: {}", stderr(&out));
    out
}

/// A third-party subscriber (a script that prints SUBSCRIBED, then a line
/// a message, and exits once it has them all), running.
struct Reader {
    child: std::process::Child,
    lines: std::io::BufReader<std::process::ChildStdout>,
    who: &'static str,
}

impl Reader {
    /// Starts `command` and waits, 30 s at most, until it has subscribed.
    async fn start(command: &mut std::process::Command, who: &'static str) -> Reader {
        let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
        let subscribed = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                if line.trim() == "SUBSCRIBED" {
                    return Some(lines);
                }
                line.clear();
            }
            None
        });
        let lines = tokio::time::timeout(Duration::from_secs(30), subscribed).await.expect("in time").unwrap();
        let lines = lines.unwrap_or_else(|| panic!("{who} did not subscribe"));
        Reader { child, lines, who }
    }

    /// What it printed after SUBSCRIBED, once it exited (30 s at most).
    async fn rest(self) -> String {
        let Reader { mut child, mut lines, who } = self;
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut rest = String::new();
            lines.read_to_string(&mut rest).unwrap();
            let _ = child.wait();
            rest
        });
        let got = tokio::time::timeout(Duration::from_secs(30), read).await;
        got.unwrap_or_else(|_| panic!("{who} did not get everything within 30 s")).unwrap()
    }
}

fn doctor_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_mqtt_311_qos_downgrades_websocket_and_no_mqtt_5() {
    let rabbit = RabbitMq::start().await;
    // MQTT 3.1.1 with the identity envelope, over TCP and over Web MQTT.
    round_trip(&rabbit.url(), &rabbit.url(), &["-V", "311", "--envelope"], "rmq", 300).await;
    round_trip(&rabbit.ws_url(), &rabbit.url(), &["-V", "311", "--envelope"], "rmqws", 100).await;
    // QoS 2 both ways: the publish is taken at QoS 1 (delivered, warned),
    // the subscription granted QoS 1 (warned).
    let (pub_err, sub_err) =
        round_trip(&rabbit.url(), &rabbit.url(), &["-V", "311", "--envelope", "-q", "2"], "rmq2", 50).await;
    assert!(pub_err.contains("took the message at QoS 1"), "{pub_err}");
    assert!(sub_err.contains("granted QoS 1 instead of 2"), "{sub_err}");
    // MQTT 5: RabbitMQ 3.10 closes the connection. -V auto (the default)
    // speaks 3.1.1 to it then, and says that identities do not travel.
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let ob = ob.to_str().unwrap();
    let out = run(&["pub", "-b", &rabbit.url(), "-t", "v5", "-m", "x", "--outbox", ob, "--wait-timeout", "20"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("closed the connection on an MQTT 5 CONNECT and takes MQTT 3.1.1"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("identities do not travel"), "{}", stderr(&out));
    // A close before CONNACK may pass (a connection limit): the next run
    // tries 5 again, and falls back again.
    let out = run(&["pub", "-b", &rabbit.url(), "-t", "v5", "-m", "y", "--outbox", ob, "--wait-timeout", "20"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("closed the connection on an MQTT 5 CONNECT"), "{}", stderr(&out));
    // -V 5 forces it: the error says what to try.
    let ob5 = dir.path().join("ob5");
    let args = ["pub", "-b", &rabbit.url(), "-V", "5", "-t", "v5", "-m", "x", "--wait-timeout", "3", "--outbox"];
    let out = run(&[&args[..], &[ob5.to_str().unwrap()]].concat()).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("try -V auto (the default) or -V 311"), "{}", stderr(&out));
    let report = doctor_json(&run(&["doctor", "-b", &rabbit.url(), "--json"]).await);
    assert_eq!(report["checks"]["mqtt5"]["ok"], false, "{report}");
    assert_eq!(report["checks"]["mqtt311"]["ok"], true, "{report}");
    assert_eq!(report["checks"]["qos2"]["ok"], false, "{report}");
    assert!(report["checks"]["qos2"]["detail"].as_str().unwrap().contains("taken at QoS 1"), "{report}");
    assert_eq!(report["checks"]["session"]["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_mqtt_311_sessions_and_no_qos_2_or_mqtt_5() {
    let nats = Nats::start().await;
    round_trip(&nats.url(), &nats.url(), &["-V", "311", "--envelope"], "nats", 300).await;
    let dir = tempfile::tempdir().unwrap();
    // MQTT 5: refused with a 3.1.1 CONNACK. -V auto (the default) speaks
    // 3.1.1 then; -V 5 forces it: a clear error at once.
    let ob = dir.path().join("ob5");
    let ob = ob.to_str().unwrap();
    let out = run(&["pub", "-b", &nats.url(), "-t", "v5", "-m", "x", "--outbox", ob, "--wait-timeout", "20"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("refuses MQTT 5; speaking MQTT 3.1.1"), "{}", stderr(&out));
    // A refusal of the version is remembered: the next run speaks 3.1.1 at once.
    let out = run(&["pub", "-b", &nats.url(), "-t", "v5", "-m", "x2", "--outbox", ob, "--wait-timeout", "20"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("refuses MQTT 5") && !stderr(&out).contains("takes MQTT 3.1.1"), "{}", stderr(&out));
    // The consumer's side of -V auto: registered, then it receives.
    let inbox = dir.path().join("in5");
    let sub = ["sub", "-b", &nats.url(), "-t", "v5", "-i", "auto-sub", "--inbox", inbox.to_str().unwrap()];
    let out = run(&[&sub[..], &["--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&["pub", "-b", &nats.url(), "-t", "v5", "-m", "auto", "--outbox", ob, "--wait-timeout", "20"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[&sub[..], &["-C", "1", "-W", "20"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "auto\n");
    let out = run(&["pub", "-b", &nats.url(), "-V", "5", "-t", "v5", "-m", "x", "--outbox", ob]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not accept this MQTT protocol version; -V auto (the default)"),
        "{}",
        stderr(&out)
    );
    // QoS 2: NATS closes the connection on it, saying nothing. The first
    // close is named as a broker that may not do QoS 2; once the lone QoS 2
    // PUBLISH has ended three links without a PUBREC ever, QoS 2 goes to
    // NATS at QoS 1 and the message is delivered (before issue 17 it was
    // resent into the same close for ever).
    let ob = dir.path().join("ob2");
    let args = ["pub", "-b", &nats.url(), "-V", "311", "-q", "2", "-t", "q2", "-m", "x", "--wait-timeout", "30"];
    let out = run(&args.iter().copied().chain(["--outbox", ob.to_str().unwrap()]).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not support QoS 2"), "{}", stderr(&out));
    assert!(stderr(&out).contains("QoS 2 messages go to it at QoS 1"), "{}", stderr(&out));
    let report = doctor_json(&run(&["doctor", "-b", &nats.url(), "--json"]).await);
    assert_eq!(report["checks"]["mqtt5"]["ok"], false, "{report}");
    assert_eq!(report["checks"]["qos2"]["ok"], false, "{report}");
    assert_eq!(report["checks"]["retained"]["ok"], true, "{report}");
    assert_eq!(report["checks"]["session"]["ok"], true, "{report}");
    // The message right after the DISCONNECT is its own finding, whichever
    // way it goes (it depends on timing), never the session's verdict.
    assert!(report["checks"]["disconnect_race"]["ok"].is_boolean(), "{report}");
}

/// aedes (Node.js) speaks MQTT 3.1.1 only and, denying a topic as an ACL
/// would, closes the connection on a PUBLISH to it and answers a
/// SUBSCRIBE with 0x80. What steadfast does with each, found by trying it
/// as a user would: QoS 1 and 2 go through once each; the denied message
/// is moved aside after three closes, teaches no maximum packet size (it is
/// small), and the messages after it, large ones included, go on; the
/// refused subscription ends `sub` with the filter named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aedes_mqtt_311_delivers_once_and_its_refusals_are_said() {
    let aedes = Aedes::start().await;
    let (pub_err, _) = round_trip(&aedes.url(), &aedes.url(), &[], "aedes1", 300).await;
    assert!(pub_err.contains("the broker refuses MQTT 5; speaking MQTT 3.1.1"), "{pub_err}");
    round_trip(&aedes.url(), &aedes.url(), &["-q", "2"], "aedes2", 300).await;

    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let base = ["pub", "-b", &aedes.url(), "-V", "311", "-i", "aedes-denied", "--outbox", ob.to_str().unwrap()];
    let out = run(&[&base[..], &["-t", "denied/a", "-m", "x", "--wait-timeout", "60s"]].concat()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1 poison") && err.contains("ended the link 3 times in a row"), "{err}");
    assert!(!err.contains("bytes (topic and payload) or more"), "no size learned: {err}");
    let big = "y".repeat(4_000);
    let out = run(&[&base[..], &["-t", "aedes3/big", "-m", &big, "--wait-timeout", "60s"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "a large message after it goes: {}", stderr(&out));

    let inbox = dir.path().join("in");
    let sub = ["sub", "-b", &aedes.url(), "-t", "denied/#", "--inbox", inbox.to_str().unwrap(), "-W", "30"];
    let out = run(&sub).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("refused the subscription to `denied/#`"), "{}", stderr(&out));
}

/// amqtt 0.12 (PyPI) speaks only MQTT 3.1.1 and leaves an MQTT 5 CONNECT
/// unanswered instead of refusing it: `-V auto` (the default) speaks 3.1.1
/// to it once the connect timeout (10 s) passed, `pub` and `sub` alike,
/// and every message arrives once, its identity in the envelope. (amqtt
/// keeps no messages for a session while its client is away, which
/// `doctor` reports: the consumer runs while the producer publishes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqtt_leaves_mqtt_5_unanswered_and_auto_speaks_3_1_1_to_it() {
    use std::io::BufRead;
    const N: usize = 200;
    let amqtt = Amqtt::start().await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    let mut sub = crate::steadfast()
        .args(["sub", "-b", &amqtt.url(), "-t", "amqtt/#", "-i", "amqtt-sub", "-q", "1", "--envelope", "--json"])
        .args(["--inbox", inbox.to_str().unwrap(), "-C", &N.to_string(), "-W", "90"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Connected (in 3.1.1, after the unanswered MQTT 5 CONNECT) and
    // subscribing: the producer's own wait of 10 s comes after this.
    let err = std::io::BufReader::new(sub.stderr.take().unwrap());
    let said = tokio::task::spawn_blocking(move || {
        let mut lines = err.lines();
        let mut said = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap_or_default();
            said.push_str(&line);
            said.push('\n');
            if line.contains("consumer connected") {
                break;
            }
        }
        // The rest is drained so that the consumer never blocks on it.
        let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
        (said, rest)
    });
    let (sub_said, rest) = tokio::time::timeout(Duration::from_secs(60), said).await.expect("sub connected").unwrap();
    assert!(sub_said.contains("left an MQTT 5 CONNECT unanswered for 10s and takes MQTT 3.1.1"), "{sub_said}");
    let lines: String = (0..N).map(|i| format!("a-{i:04}\n")).collect();
    let ob = dir.path().join("ob");
    let args = ["pub", "-b", &amqtt.url(), "-t", "amqtt/x", "-q", "1", "-l", "-i", "amqtt-pub", "--envelope"];
    let mut publish: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    publish.extend(["--outbox".into(), ob.display().to_string(), "--wait-timeout".into(), "60".into()]);
    let out = pub_lines(publish, lines).await;
    assert!(
        stderr(&out).contains("left an MQTT 5 CONNECT unanswered for 10s and takes MQTT 3.1.1"),
        "{}",
        stderr(&out)
    );
    let got = tokio::task::spawn_blocking(move || sub.wait_with_output()).await.unwrap().unwrap();
    let rest = rest.join().unwrap();
    assert_eq!(got.status.code(), Some(0), "sub: {rest}");
    let received: Vec<serde_json::Value> = got
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let payloads: Vec<&str> = received.iter().map(|m| m["payload"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..N).map(|i| format!("a-{i:04}")).collect();
    assert_eq!(payloads, want);
    // Each with its producer's identity, from the envelope.
    assert!(received.iter().enumerate().all(|(i, m)| m["seq"].as_u64() == Some(i as u64 + 1)
        && m["producer"].as_str().is_some_and(|p| p.starts_with("amqtt-pub"))));
}

/// A bridge whose source speaks only MQTT 3.1.1 (NATS refuses 5): the
/// default version (`auto`) takes it, and with `envelope = true` what
/// `pub --envelope` sent arrives upstream (MQTT 5) as its payload, under
/// its producer's identity. A forced `version = "5"` is refused at
/// `--register` with the key that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_from_an_mqtt_3_1_1_broker_keeps_the_producers_identity_with_the_envelope() {
    let nats = Nats::start().await;
    let up = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, version: &str| {
        let text = format!(
            "[store]\ndir = \"{}\"\n[[route]]\nname = \"from-nats\"\n[route.source]\nbrokers = [\"{}\"]\ntopics = [\"env/#\"]\nqos = 1\nclient_id = \"nats-bridge\"\nenvelope = true\n{version}\n[route.destination]\nbrokers = [\"{}\"]\n",
            dir.path().join("state").display(),
            nats.url(),
            up.url()
        );
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let forced = write("forced.toml", "version = \"5\"");
    let out = run(&["bridge", "--register", "--config", forced.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("in the route's source: version = \"auto\""), "{}", stderr(&out));
    let cfg = write("bridge.toml", "");
    crate::bridge::register(&cfg).await;
    let _bridge = crate::bridge::start_bridge(&cfg);
    let inbox = dir.path().join("up-in");
    let sub = ["sub", "-b", &up.url(), "-t", "env/#", "-i", "up-reader", "--inbox", inbox.to_str().unwrap()];
    let out = run(&[&sub[..], &["--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ob = dir.path().join("ob");
    let args =
        ["pub", "-b", &nats.url(), "-V", "311", "--envelope", "-i", "env-producer", "-t", "env/a", "-m", "hello"];
    let out = run(&[&args[..], &["--outbox", ob.to_str().unwrap(), "--wait-timeout", "20"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[&sub[..], &["--json", "-C", "1", "-W", "30"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stderr(&out), crate::bridge::bridge_log(&cfg));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((got["payload"].as_str(), got["seq"].as_u64()), (Some("hello"), Some(1)), "{got}");
    assert!(got["producer"].as_str().is_some_and(|p| p.starts_with("env-producer")), "{got}");
}

/// Mosquitto with MQTT 3.1.1 (identity in the envelope) and MQTT 5
/// (identity as a user property).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_mqtt_311_and_5() {
    let m = Mosquitto::plain().await;
    round_trip(&m.url(), &m.url(), &["-V", "311", "--envelope"], "m311", 300).await;
    round_trip(&m.url(), &m.url(), &["-V", "5"], "m5", 300).await;
}

/// paho-mqtt 2 as the other end: a paho publisher to `steadfast sub`, and
/// `steadfast pub` to a paho subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_publishes_to_steadfast_sub_and_subscribes_to_steadfast_pub() {
    const N: usize = 500;
    let m = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    let sub =
        ["sub", "-b", &m.url(), "-t", "paho/in", "-i", "paho-reader", "-q", "1", "--inbox", inbox.to_str().unwrap()];
    let out = run(&sub.iter().copied().chain(["--register"]).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let published = crate::bridge::python("paho_pub.py")
        .args(["127.0.0.1", &m.port().to_string(), "paho/in", &N.to_string()])
        .output()
        .expect("python3 with paho-mqtt (scripts/test installs it)");
    assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
    let out = run(&sub.iter().copied().chain(["-C", &N.to_string(), "-W", "30"]).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let want: String = (0..N).map(|i| format!("p-{i:06}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);

    let reader = Reader::start(
        crate::bridge::python("paho_sub.py").args(["127.0.0.1", &m.port().to_string(), "paho/out", &N.to_string()]),
        "the paho subscriber",
    )
    .await;
    let payloads: String = (0..N).map(|i| format!("s-{i:05}\n")).collect();
    let ob = dir.path().join("ob");
    let args = ["pub", "-b", &m.url(), "-t", "paho/out", "-l", "-q", "1", "--outbox", ob.to_str().unwrap()];
    pub_lines(args.iter().map(|s| s.to_string()).collect(), payloads).await;
    let got = reader.rest().await;
    let mut got: Vec<&str> = got.lines().collect();
    got.sort_unstable();
    got.dedup();
    assert_eq!(got.len(), N, "distinct payloads at the paho subscriber");
}

/// `node` running one of this crate's MQTT.js scripts (tests/js).
fn mqttjs(script: &str) -> std::process::Command {
    node(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js").join(script))
}

/// MQTT.js 5 (npm), the Node.js client, over MQTT 5 on both ends: its
/// messages reach `steadfast sub` once each with their content type and
/// user property, and `steadfast pub -D`'s properties reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttjs_publishes_to_steadfast_sub_and_subscribes_to_steadfast_pub() {
    const N: usize = 300;
    let m = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    let sub = ["sub", "-b", &m.url(), "-t", "js/in", "-i", "js-reader", "-q", "1", "--inbox", inbox.to_str().unwrap()];
    let out = run(&sub.iter().copied().chain(["--register"]).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let port = m.port().to_string();
    let published = mqttjs("mqttjs_pub.js").args(["127.0.0.1", &port, "js/in", &N.to_string()]).output().unwrap();
    assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
    let out = run(&sub.iter().copied().chain(["-C", &N.to_string(), "-W", "30", "--json"]).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let payloads: Vec<String> = got.iter().map(|j| j["payload"].as_str().unwrap().to_owned()).collect();
    assert_eq!(payloads, (0..N).map(|i| format!("j-{i:06}")).collect::<Vec<_>>(), "each once, in order");
    let props = &got[0]["properties"];
    assert_eq!(props["content_type"], "text/plain", "{props}");
    assert_eq!(props["user_properties"], serde_json::json!([["origin", "mqtt.js"]]), "{props}");

    let reader = Reader::start(
        mqttjs("mqttjs_sub.js").args(["127.0.0.1", &port, "js/out", &N.to_string()]),
        "the MQTT.js subscriber",
    )
    .await;
    let payloads: String = (0..N).map(|i| format!("s-{i:05}\n")).collect();
    let ob = dir.path().join("ob");
    let args = ["pub", "-b", &m.url(), "-t", "js/out", "-l", "-q", "1", "--outbox", ob.to_str().unwrap()];
    let d = ["-D", "PUBLISH", "content-type", "text/plain", "-D", "PUBLISH", "user-property", "k", "v"];
    pub_lines(args.iter().chain(&d).map(|s| s.to_string()).collect(), payloads).await;
    let got = reader.rest().await;
    let got: Vec<serde_json::Value> = got.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut distinct: Vec<&str> = got.iter().map(|j| j["payload"].as_str().unwrap()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), N, "distinct payloads at the MQTT.js subscriber");
    assert_eq!(
        (got[0]["contentType"].as_str(), got[0]["user"]["k"].as_str()),
        (Some("text/plain"), Some("v")),
        "{}",
        got[0]
    );
    assert!(got[0]["user"]["steadfast-id"].is_string(), "the identity travels as a user property: {}", got[0]);
}
