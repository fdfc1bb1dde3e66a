//! Brokers with limits they do not announce (issue 17): a message a broker
//! closes the link on is moved aside as poison and the rest go on; a broker
//! that closes the link past an in-flight limit gets a smaller window.

use std::process::Output;
use std::time::Duration;

use steadfast_testkit::{wait_until, Mosquitto, MosquittoOptions, ScriptedBroker, Subscriber};

use super::policy::run_with_input;
use super::{run, status_json, stderr};

/// `steadfast pub ARGS` with `input` on stdin.
async fn pub_with_input(args: Vec<String>, input: String) -> Output {
    run_with_input([vec!["pub".to_string()], args].concat(), input).await
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_mosquitto_closes_the_link_on_is_moved_aside_and_the_rest_delivered() {
    // Mosquitto takes packets up to 1,000 bytes; an MQTT 3.1.1 client is not
    // told, and a bigger PUBLISH gets the connection closed.
    let opts = MosquittoOptions { persistence: false, extra: vec!["max_packet_size 1000".into()] };
    let broker = Mosquitto::start(opts).await;
    let sub = Subscriber::start(broker.port(), "lim/poison", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let big = "x".repeat(2_000);
    let lines = format!("first\n{big}\nafter 1\nafter 2\n");
    let args = ["-b", &broker.url(), "-V", "311", "-t", "lim/poison", "-l", "-i", "lim-poison", "--outbox", &ob];
    let args = [&args[..], &["--wait-timeout", "60s"]].concat();
    let out = pub_with_input(strings(&args), lines).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "a message not delivered is a failure: {err}");
    assert!(err.contains("moved aside as poison"), "{err}");
    assert!(err.contains("1 poison") && err.contains("steadfast poison --outbox"), "{err}");
    sub.wait_all(&strings(&["first", "after 1", "after 2"]), Duration::from_secs(20)).await;
    assert!(!sub.lines().contains(&big), "the big one never arrived");

    // Kept, listed, counted; nothing else queued behind it.
    let st = status_json(&ob);
    assert_eq!(st["queued"], 1, "{st}");
    assert_eq!(st["dropped"]["poison"], 1, "{st}");
    assert_eq!(st["poisoned"][0]["id"], 2, "{st}");
    assert_eq!(st["poisoned"][0]["failures"], 3, "{st}");
    assert_eq!(st["poisoned"][0]["broker"], broker.url(), "{st}");
    // The closes that narrowed the window down were the poison's: no
    // limit is learned from them.
    assert!(st["brokers"][0]["window"].is_null(), "{st}");
    let text = run(&["status", "--outbox", &ob]).await;
    assert!(String::from_utf8_lossy(&text.stdout).contains("poison   1 message(s) moved aside"));
    let list = run(&["poison", "--outbox", &ob]).await;
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.status.success() && listed.contains("id 2  topic lim/poison"), "{listed}");

    // The size is remembered for this MQTT 3.1.1 broker: a message as large
    // or larger is moved aside at once, without a close.
    let bigger = "y".repeat(2_500);
    let out = pub_with_input(strings(&args), format!("{bigger}\nafter 3\n")).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("moved aside as poison at once") && !err.contains("link lost"), "{err}");
    sub.wait_all(&strings(&["after 3"]), Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&run(&["status", "--outbox", &ob]).await.stdout).into_owned();
    assert!(text.contains("messages of 2010 bytes or more are moved aside as poison at once"), "{text}");
    assert_eq!(status_json(&ob)["poisoned"].as_array().unwrap().len(), 2);

    // Requeued, it goes out again and is moved aside again; deleted, it
    // leaves the outbox.
    let requeue = run(&["poison", "--outbox", &ob, "--requeue", "2"]).await;
    let said = String::from_utf8_lossy(&requeue.stdout).into_owned();
    assert!(
        said.contains("1 message(s) back in the queue") && said.contains("sizes learned from poison are forgotten"),
        "{said}"
    );
    assert!(!String::from_utf8_lossy(&run(&["status", "--outbox", &ob]).await.stdout).contains("bytes or more"));
    assert_eq!(status_json(&ob)["poisoned"].as_array().unwrap().len(), 1);
    let drain = ["-b", &broker.url(), "-V", "311", "-i", "lim-poison", "--outbox", &ob, "--drain"];
    let again = pub_with_input(strings(&drain), String::new()).await;
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert_eq!(status_json(&ob)["poisoned"][0]["id"], 2);
    let wrong = run(&["poison", "--outbox", &ob, "--delete", "7"]).await;
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("not poison in this outbox: 7"), "{}", stderr(&wrong));
    let delete = run(&["poison", "--outbox", &ob, "--delete", "all"]).await;
    assert!(delete.status.success(), "{}", stderr(&delete));
    let st = status_json(&ob);
    assert_eq!(st["queued"], 0, "{st}");
    assert_eq!(st["poisoned"].as_array().unwrap().len(), 0, "{st}");
}

/// An MQTT 5 broker that states no maximum packet size in its CONNACK and
/// closes the link on a PUBLISH over its limit (rumqttd, `max_payload_size`:
/// 1 MiB in `steadfast broker`) teaches the size as a 3.1.1 broker does:
/// the first such message is moved aside after its closes, the next one as
/// large at once, without a close (found by trying rumqttd 0.20 as users
/// run it: each took three closes, with the reconnect's backoff growing
/// between them, 30 s for the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_broker_that_states_no_size_teaches_it_by_closing() {
    let port = steadfast_testkit::free_port();
    let mut broker = super::steadfast()
        .args(["broker", "--port", &port.to_string(), "--protocol-version", "5"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the embedded broker listens", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let url = format!("mqtt://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let (big, bigger) = ("x".repeat(1_100_000), "y".repeat(1_200_000));
    let lines = format!("first\n{big}\nafter 1\n{bigger}\nafter 2\n");
    let args = ["-b", &url, "-V", "5", "-t", "lim/unstated", "-l", "-i", "lim-unstated", "--outbox", &ob];
    let out = pub_with_input(strings(&[&args[..], &["--wait-timeout", "60s"]].concat()), lines).await;
    let _ = broker.kill();
    let _ = broker.wait();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("states no maximum packet size"), "the size is learned: {err}");
    assert!(err.contains("moved aside as poison at once"), "the second goes aside without closes: {err}");
    let st = status_json(&ob);
    // Only the two big ones are left: the others were acknowledged.
    assert_eq!(st["queued"], 2, "{st}");
    assert_eq!(st["dropped"]["poison"], 2, "{st}");
    let poisoned = st["poisoned"].as_array().unwrap();
    assert_eq!((poisoned[0]["id"].as_u64(), poisoned[0]["failures"].as_u64()), (Some(2), Some(3)), "{st}");
    assert_eq!((poisoned[1]["id"].as_u64(), poisoned[1]["failures"].as_u64()), (Some(4), Some(0)), "{st}");
    let text = String::from_utf8_lossy(&run(&["status", "--outbox", &ob]).await.stdout).into_owned();
    assert!(text.contains("messages of 1100012 bytes or more are moved aside as poison at once"), "{text}");
    // The closes were the poison's: the window is back, and no limit on
    // messages in flight is remembered.
    assert!(st["brokers"][0]["window"].is_null(), "{st}");
}

/// A close over MQTT 3.1.1 on a small message is a refusal, not a size:
/// Mosquitto with `retain_available false` closes the link on a retained
/// PUBLISH. It is moved aside after its failures; the ordinary messages
/// that follow, larger than it, are delivered (a size learned from it put
/// every one of them aside, found by trying steadfast against brokers set
/// up as users set them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_message_a_3_1_1_broker_closes_on_teaches_no_size() {
    let opts = MosquittoOptions { persistence: false, extra: vec!["retain_available false".into()] };
    let broker = Mosquitto::start(opts).await;
    let sub = Subscriber::start(broker.port(), "lim/#", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let base = ["-b", &broker.url(), "-V", "311", "-i", "lim-retain", "--outbox", &ob, "--wait-timeout", "60s"];
    let retained = run(&[&["pub"][..], &base, &["-t", "lim/state", "-m", "on", "-r"]].concat()).await;
    let err = stderr(&retained);
    assert_eq!(retained.status.code(), Some(1), "{err}");
    assert!(err.contains("moved aside as poison") && !err.contains("bytes (topic and payload) or more"), "{err}");
    let reading = run(&[&["pub"][..], &base, &["-t", "lim/reading", "-m", "temperature=21.5"]].concat()).await;
    assert!(reading.status.success(), "{}", stderr(&reading));
    sub.wait_all(&strings(&["temperature=21.5"]), Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&run(&["status", "--outbox", &ob]).await.stdout).into_owned();
    assert!(!text.contains("bytes or more"), "{text}");
}

/// Over MQTT 5 the same broker says so in its CONNACK (Retain Available =
/// 0): a retained message is refused before it is accepted, with exit 2,
/// instead of ending the link on every try, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_to_an_mqtt_5_broker_without_retain_is_refused_before_acceptance() {
    let opts = MosquittoOptions { persistence: false, extra: vec!["retain_available false".into()] };
    let broker = Mosquitto::start(opts).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let out = run(&["pub", "-b", &broker.url(), "-t", "lim/state", "-m", "on", "-r", "--outbox", &ob]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the broker takes no retained messages") && err.contains("Retain Available = 0"), "{err}");
    assert_eq!(status_json(&ob)["queued"], 0, "nothing accepted");
}

/// Refusals no retry changes, from Mosquitto set up as deployments set it:
/// an ACL that denies a topic (PUBACK 0x87) and a `message_size_limit`
/// (PUBACK 0x95, a code MQTT 5 keeps for DISCONNECT, once taken for a
/// malformed packet that ended the link and sent the message again for
/// ever). Each refused message is moved aside as poison with its code, the
/// messages behind it are delivered, a later run on the same outbox does
/// not wait for it, and `steadfast poison` lists it with its code and
/// deletes it (before, it stayed queued and went again every 30 s, and
/// only a new outbox got rid of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_no_retry_changes_are_poison_with_their_code_and_the_rest_go_on() {
    let broker = Mosquitto::with_acl("topic readwrite lim/ok/#\n", vec!["message_size_limit 1000".into()]).await;
    let sub = Subscriber::start(broker.port(), "lim/ok/#", 1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let base = ["-b", &broker.url(), "-V", "5", "-i", "lim-refused", "--outbox", &ob, "--wait-timeout", "60s"];

    let denied = run(&[&["pub"][..], &base, &["-t", "lim/denied", "-m", "x"]].concat()).await;
    let err = stderr(&denied);
    assert_eq!(denied.status.code(), Some(1), "{err}");
    let why = format!("(#1 to `lim/denied`, {}: refused with reason code 0x87, not authorized)", broker.url());
    assert!(err.contains("1 poison") && err.contains(&why) && err.contains("steadfast poison --outbox"), "{err}");

    let big = "x".repeat(2_000);
    let lines = format!("first\n{big}\nafter 1\nafter 2\n");
    let out = pub_with_input(strings(&[&base[..], &["-t", "lim/ok/t", "-l", "--summary"]].concat()), lines).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("1 poison") && err.contains("(#3 to `lim/ok/t`") && err.contains("0x95, packet too large"),
        "{err}"
    );
    // With a subscriber on the topic, Mosquitto closes the link after its
    // answer, which it sometimes does not send before the close: the
    // message goes once more, then never again.
    assert!(!err.contains("malformed") && err.matches("link lost").count() <= 2, "{err}");
    assert!(!err.contains("at most 1 in flight"), "that close is not a limit of the window: {err}");
    // Poison is dropped and kept: counted once.
    assert!(err.contains("4 accepted, 3 delivered, 1 dropped, 2 queued (2 of them moved aside as poison)"), "{err}");
    sub.wait_all(&strings(&["first", "after 1", "after 2"]), Duration::from_secs(20)).await;
    assert!(!sub.lines().contains(&big), "the big one never arrived");

    let st = status_json(&ob);
    assert_eq!(st["queued"], 2, "the two kept: {st}");
    assert_eq!(st["dropped"]["poison"], 2, "{st}");
    assert_eq!(st["poisoned"][0]["refused"], "0x87, not authorized", "{st}");
    assert_eq!(st["poisoned"][1]["refused"], "0x95, packet too large", "{st}");
    assert_eq!(st["poisoned"][1]["failures"], 0, "{st}");
    let list = run(&["poison", "--outbox", &ob]).await;
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        listed.contains("id 1  topic lim/denied") && listed.contains("refused with reason code 0x87, not authorized"),
        "{listed}"
    );
    assert!(listed.contains("id 3  topic lim/ok/t") && listed.contains("0x95, packet too large"), "{listed}");
    let delete = run(&["poison", "--outbox", &ob, "--delete", "all"]).await;
    assert!(delete.status.success(), "{}", stderr(&delete));
    assert_eq!(status_json(&ob)["queued"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_closes_past_an_unannounced_qos2_limit_gets_a_smaller_window_remembered() {
    // 3.1.1, at most 10 QoS 2 messages unfinished (below the window of 20
    // used towards 3.1.1), and no session ever reported: before the
    // adaptive window, every reconnect republished the whole window into
    // the same close, for ever.
    let broker = ScriptedBroker::limiting_qos2(10);
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let want: Vec<String> = (0..600).map(|i| format!("m{i:04}")).collect();
    let args = ["-b", &broker.url(), "-V", "311", "-q", "2", "-t", "lim/window", "-l", "--outbox", &ob];
    let args = [&args[..], &["-i", "lim-window", "--wait-timeout", "60s"]].concat();
    let out = pub_with_input(strings(&args), want.join("\n") + "\n").await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("the broker ended the link with many messages in flight"), "{err}");
    let got: std::collections::BTreeSet<String> =
        broker.publishes().iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect();
    assert!(want.iter().all(|w| got.contains(w)), "every message reached the broker");
    // Each close costs at most one window of resends, and the window
    // shrank below the limit: a handful of closes, not a livelock.
    assert!(broker.connections() <= 6, "{} connections", broker.connections());
    let st = status_json(&ob);
    assert_eq!(st["queued"], 0, "{st}");
    let window = st["brokers"][0]["window"].as_u64().expect("a learned window");
    assert!(window <= 10, "learned {window}");
    // The next run starts there: no close at all.
    let before = broker.connections();
    let args =
        ["-b", &broker.url(), "-V", "311", "-q", "2", "-t", "lim/window", "-l", "--outbox", &ob, "-i", "lim-window"];
    let out = pub_with_input(strings(&args), want[..200].join("\n") + "\n").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("ended the link"), "{}", stderr(&out));
    assert_eq!(broker.connections(), before + 1, "one connection, never closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_over_mqtt_311_gets_a_window_below_its_qos2_limit() {
    // Mosquitto 2.0 with `max_queued_messages 0` (as the test kit runs it)
    // refuses an MQTT 3.1.1 client's QoS 2 message past its
    // `max_inflight_messages` (20) and closes the connection; 3.1.1 has no
    // reason codes, so the client gets a plain PUBREC for the refused
    // message, which the broker dropped (its log: "Sending PUBREC (m63,
    // rc151)"). So towards 3.1.1 the window is 20 unless configured: no
    // close, nothing lost.
    let mut broker = Mosquitto::start(MosquittoOptions::default()).await;
    let sub = Subscriber::start(broker.port(), "lim/mosq", 2, None).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob").to_str().unwrap().to_owned();
    let url = broker.url();
    let base = ["-b", &url, "-V", "311", "-q", "2", "-t", "lim/mosq", "--outbox", &ob, "-i", "lim-mosq"];
    let args = [&base[..], &["-l", "--wait-timeout", "60s"]].concat();
    let first: Vec<String> = (0..300).map(|i| format!("a{i:03}")).collect();
    let out = pub_with_input(strings(&args), first.join("\n") + "\n").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("link lost"), "{}", stderr(&out));
    sub.wait_all(&first, Duration::from_secs(20)).await;
    assert_eq!(sub.lines(), first, "every one, once, in order");
    // A window configured past the limit: the broker closes, the window
    // shrinks and keeps below what the broker closed on from then on (the
    // broker may have dropped one message per close: above). The window
    // is learned from a close with more than half of it in flight (a close
    // with few in flight may be the network's): a backlog fills it at
    // once, where lines read from stdin may trickle on a busy machine.
    let second: Vec<String> = (0..300).map(|i| format!("b{i:03}")).collect();
    drop(sub);
    broker.kill9();
    let queue = [&base[..], &["-l", "--wait-timeout", "1s"]].concat();
    let out = pub_with_input(strings(&queue), second.join("\n") + "\n").await;
    assert_eq!(out.status.code(), Some(3), "queued, not delivered with the broker down: {}", stderr(&out));
    broker.spawn().await.unwrap();
    let sub = Subscriber::start(broker.port(), "lim/mosq", 2, None).await;
    let wide = [&base[..], &["--max-inflight", "64", "--drain", "--wait-timeout", "60s"]].concat();
    let out = pub_with_input(strings(&wide), String::new()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("the broker ended the link with many messages in flight"), "{err}");
    let closes = err.matches("link lost; reconnecting").count();
    let got = |p: char| sub.lines().into_iter().filter(|l| l.starts_with(p)).count();
    wait_until("the second run's messages", Duration::from_secs(20), || got('b') >= 300 - closes).await;
    let st = status_json(&ob);
    let window = st["brokers"][0]["window"].as_u64().unwrap_or_else(|| panic!("a learned window: {st}\n{err}"));
    assert!(window < 64, "learned {window}");
}

/// In fanout a refusal for good is its member's: with `--ack any` the
/// message waits for the other broker, down meanwhile, and reaches it once
/// it is back (a later run refused again by the first, and the other
/// delivers it); with `--ack all` no quorum can be met and it is moved
/// aside at once, the other broker's acknowledgement notwithstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fanout_a_member_that_refuses_for_good_leaves_the_message_to_the_others() {
    let strict = Mosquitto::with_acl("topic readwrite other/#\n", vec![]).await;
    let mut open = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let (strict_url, open_url) = (strict.url(), open.url());
    let fanout = |ack: &'static str, ob: &str, last: &[&str]| {
        let ob = dir.path().join(ob).to_str().unwrap().to_owned();
        let args = ["pub", "-b", &strict_url, "-b", &open_url, "--mode", "fanout", "--ack", ack, "-V", "5"];
        (strings(&[&args[..], &["--outbox", &ob], last].concat()), ob)
    };
    let run_args = |a: Vec<String>| async move { run(&a.iter().map(String::as_str).collect::<Vec<_>>()).await };

    open.kill9();
    let (args, ob) = fanout("any", "any", &["-t", "lim/f", "-m", "one", "--wait-timeout", "3s"]);
    let out = run_args(args).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "waits for the other broker: {err}");
    assert!(err.contains("0x87, not authorized"), "the refusal is said: {err}");
    let st = status_json(&ob);
    assert_eq!((st["queued"].as_u64(), st["poisoned"].as_array().map(Vec::len)), (Some(1), Some(0)), "{st}");
    open.restart().await;
    let sub = Subscriber::start(open.port(), "lim/#", 1, None).await;
    let (args, _) = fanout("any", "any", &["--drain", "--wait-timeout", "60s"]);
    let out = run_args(args).await;
    assert_eq!(out.status.code(), Some(0), "delivered through the other broker: {}", stderr(&out));
    sub.wait_all(&strings(&["one"]), Duration::from_secs(20)).await;
    let st = status_json(&ob);
    assert_eq!((st["queued"].as_u64(), st["poisoned"].as_array().map(Vec::len)), (Some(0), Some(0)), "{st}");

    let (args, ob) = fanout("all", "all", &["-t", "lim/f", "-m", "two", "--wait-timeout", "60s"]);
    let out = run_args(args).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1 poison") && err.contains("refused with reason code 0x87"), "{err}");
    // Whether the open broker got it first depends on which link was up
    // first (once moved aside, no link sends it); when it did, its
    // acknowledgement does not finish the message: it stays poison.
    assert_eq!(status_json(&ob)["poisoned"].as_array().map(Vec::len), Some(1));
    let seen = sub.lines().iter().filter(|l| *l == "two").count();
    assert!(seen <= 1, "{:?}", sub.lines());
}
