//! `steadfast sub` as a child process against real Mosquitto.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use steadfast_testkit::{wait_until, Mosquitto, MosquittoOptions};

use crate::{run, stderr, steadfast};

fn lines(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Publishes `msgs` (one per line) with `steadfast pub` to `brokers`.
async fn publish(brokers: &[String], extra: &[&str], topic: &str, msgs: &[String], outbox: &Path) {
    let mut args: Vec<String> = vec!["pub".into()];
    for b in brokers {
        args.extend(["-b".into(), b.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-t", topic, "-l", "--outbox", outbox.to_str().unwrap(), "--wait-timeout", "60s"].map(String::from));
    let input = msgs.join("\n") + "\n";
    let out = tokio::task::spawn_blocking(move || {
        let mut child = steadfast().args(&args).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "pub: {}", stderr(&out));
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_before_the_producer_sub_prints_every_message_once_in_order() {
    let broker = Mosquitto::start(MosquittoOptions { persistence: true, extra: vec![] }).await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let inbox = inbox.to_str().unwrap();
    let base = ["sub", "-b", &broker.url(), "-t", "s/#", "-i", "sub-reg", "--inbox", inbox];
    let out = run(&[&base[..], &["--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let want = lines(300, "r");
    publish(&[broker.url()], &[], "s/a", &want, &dir.path().join("ob")).await;
    let out = run(&[&base[..], &["-C", "200", "-W", "30"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let first: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(first, want[..200]);
    // The next run continues where the last one stopped: nothing twice.
    let out = run(&[&base[..], &["-C", "100", "-W", "30", "-v"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rest: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    let expect: Vec<String> = want[200..].iter().map(|m| format!("s/a {m}")).collect();
    assert_eq!(rest, expect);
    // -W with nothing left: exit 3 when -C was not reached.
    let out = run(&[&base[..], &["-C", "1", "-W", "1"]].concat()).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_while_handling_gets_the_message_again_and_a_failed_command_is_retried() {
    let broker = Mosquitto::start(MosquittoOptions { persistence: true, extra: vec![] }).await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let out_file = dir.path().join("handled");
    let started = dir.path().join("started");
    let base: Vec<String> = ["sub", "-b", &broker.url(), "-t", "k", "-i", "sub-k9", "--inbox", inbox.to_str().unwrap()]
        .map(String::from)
        .to_vec();
    let out = run(&[base.iter().map(String::as_str).collect::<Vec<_>>(), vec!["--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let want = lines(20, "k");
    publish(&[broker.url()], &[], "k", &want, &dir.path().join("ob")).await;
    // A handler that hangs on the first message; the whole consumer (its
    // process group, handler included) is killed while it hangs.
    let slow = format!("touch {}; sleep 60; cat >> {}", started.display(), out_file.display());
    let mut child = steadfast()
        .args(&base)
        .args(["--exec", &slow])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let s = started.clone();
    wait_until("the handler started", Duration::from_secs(20), move || s.exists()).await;
    let pgid = child.id();
    let killed = std::process::Command::new("kill").args(["-s", "KILL", "--", &format!("-{pgid}")]).status().unwrap();
    assert!(killed.success());
    child.wait().unwrap();
    // The next run: a handler that fails once, then succeeds.
    let flag = dir.path().join("failed-once");
    let flaky = format!(
        "if [ -e {f} ]; then cat >> {o}; echo >> {o}; else touch {f}; exit 1; fi",
        f = flag.display(),
        o = out_file.display()
    );
    let args: Vec<&str> = base.iter().map(String::as_str).chain(["--exec", &flaky, "-C", "20", "-W", "60"]).collect();
    let out = run(&args).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(flag.exists(), "the failing attempt ran");
    assert_eq!(read_lines(&out_file), want, "every message handled once, in order, the interrupted one included");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_with_one_broker_killed_and_restarted_empty_is_handled_exactly_once() {
    let a = Mosquitto::plain().await;
    let mut b = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let brokers = [a.url(), b.url()];
    let n = 20_000;
    let want = lines(n, "x");
    let out_path = dir.path().join("out");
    let sub_args = [
        "sub",
        "-b",
        &a.url(),
        "-b",
        &b.url(),
        "-t",
        "x",
        "-i",
        "sub-fan",
        "--inbox",
        inbox.to_str().unwrap(),
        "-C",
        &n.to_string(),
        "-W",
        "120",
    ]
    .map(String::from);
    // Sessions and subscriptions exist on both brokers before anything is
    // published.
    let register: Vec<&str> = sub_args[..11].iter().map(String::as_str).chain(["--register"]).collect();
    let out = run(&register).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out_file = std::fs::File::create(&out_path).unwrap();
    let sub = steadfast().args(&sub_args).stdout(out_file).stderr(Stdio::piped()).spawn().unwrap();
    let publisher = {
        let brokers = brokers.to_vec();
        let want = want.clone();
        let ob = dir.path().join("ob");
        tokio::spawn(async move {
            publish(&brokers, &["--mode", "fanout", "--ack", "all"], "x", &want, &ob).await;
        })
    };
    let p = out_path.clone();
    wait_until("a quarter handled", Duration::from_secs(60), move || read_lines(&p).len() >= n / 4).await;
    b.kill9();
    b.restart().await;
    publisher.await.unwrap();
    let status = tokio::task::spawn_blocking(move || sub.wait_with_output()).await.unwrap().unwrap();
    let said = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(0), "{said}");
    // The restarted broker had lost the session: said, with what it means.
    assert!(
        said.contains("did not keep this consumer's session: messages queued for it while it was away are lost"),
        "{said}"
    );
    let got = read_lines(&out_path);
    let unique: std::collections::HashSet<&String> = got.iter().collect();
    assert_eq!(got.len(), n, "{} lines for {} unique messages", got.len(), unique.len());
    assert_eq!(unique.len(), n);
}

/// MQTT 5 properties set by another client (mosquitto_pub's `-D`) come
/// out in `--json` (only those the message carries) and through `-F`'s
/// conversions of mosquitto_sub (%C %D %E %F %P %R).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_properties_come_out_in_json_and_formats() {
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let base = ["sub", "-b", &broker.url(), "-t", "p/#", "-i", "sub-props", "--inbox", inbox.to_str().unwrap()];
    run(&[&base[..], &["--register"]].concat()).await;
    let port = broker.port().to_string();
    let mosquitto_pub = |topic: &str, props: bool| {
        let mut c = std::process::Command::new(steadfast_testkit::mosquitto_program("mosquitto_pub"));
        c.args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1", "-t", topic, "-m", "hi"]);
        if props {
            for (k, v) in [
                ("content-type", "text/plain"),
                ("response-topic", "p/reply"),
                ("correlation-data", "req-7"),
                ("payload-format-indicator", "1"),
                ("message-expiry-interval", "3600"),
            ] {
                c.args(["-D", "PUBLISH", k, v]);
            }
            // Two values: key and value; a key may repeat.
            c.args(["-D", "PUBLISH", "user-property", "site", "7", "-D", "PUBLISH", "user-property", "site", "8"]);
        }
        assert!(c.status().unwrap().success());
    };
    mosquitto_pub("p/a", true);
    mosquitto_pub("p/b", true);
    mosquitto_pub("p/c", false);
    let out = run(&[&base[..], &["-C", "1", "-W", "20", "--json"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &j["properties"];
    assert_eq!(
        (p["content_type"].as_str(), p["response_topic"].as_str()),
        (Some("text/plain"), Some("p/reply")),
        "{j}"
    );
    assert_eq!((p["correlation_data"].as_str(), p["payload_format"].as_str()), (Some("req-7"), Some("utf-8")), "{j}");
    assert!(p["message_expiry"].as_u64().is_some_and(|e| e > 3500 && e <= 3600), "{j}");
    assert_eq!(p["user_properties"], serde_json::json!([["site", "7"], ["site", "8"]]), "in order: {j}");
    let format = ["-C", "1", "-W", "20", "-F", "%t|%C|%D|%F|%P|%R|%E"];
    let out = run(&[&base[..], &format].concat()).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("p/b|text/plain|req-7|1|site:7 site:8|p/reply|3"), "{text:?} {}", stderr(&out));
    let out = run(&[&base[..], &format].concat()).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "p/c||||||\n", "none: empty, {}", stderr(&out));

    // steadfast pub takes mosquitto_pub's -D for the properties it sets.
    let (ob, url) = (dir.path().join("ob"), broker.url());
    let d = |name: &'static str, value: &'static str| ["-D", "PUBLISH", name, value];
    let args = [
        &["pub", "-b", &url, "-t", "p/d", "-m", "x", "--outbox", ob.to_str().unwrap()][..],
        &d("content-type", "application/json"),
        &d("correlation-data", "c1"),
        &d("response-topic", "p/r"),
        &d("payload-format-indicator", "1"),
        &["-D", "PUBLISH", "user-property", "k", "v"],
    ]
    .concat();
    let out = run(&args).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&[&base[..], &["-C", "1", "-W", "20", "--json"]].concat()).await;
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = serde_json::json!({ "content_type": "application/json", "correlation_data": "c1",
        "response_topic": "p/r", "payload_format": "utf-8", "user_properties": [["k", "v"]] });
    assert_eq!(j["properties"], want, "{j}");
    // --exec gets them in its environment, under the names of --json.
    mosquitto_pub("p/e", true);
    let env = dir.path().join("env");
    let cmd = format!(
        "echo \"$STEADFAST_CONTENT_TYPE|$STEADFAST_CORRELATION_DATA|$STEADFAST_RESPONSE_TOPIC|$STEADFAST_PAYLOAD_FORMAT|$STEADFAST_USER_PROPERTIES\" > {}",
        env.display()
    );
    let out = run(&[&base[..], &["-C", "1", "-W", "20", "--exec", &cmd]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = std::fs::read_to_string(&env).unwrap();
    assert_eq!(got, "text/plain|req-7|p/reply|utf-8|[[\"site\",\"7\"],[\"site\",\"8\"]]\n");
    for (bad, said) in [
        (&["-D", "CONNECT", "session-expiry-interval", "60"][..], "only PUBLISH properties"),
        (&["-D", "PUBLISH", "topic-alias", "3"][..], "not a PUBLISH property steadfast sets"),
        (&["-D", "PUBLISH", "payload-format-indicator", "2"][..], "0 (bytes) or 1 (UTF-8)"),
        (&["-D", "PUBLISH", "response-topic", "a/#"][..], "wildcard"),
        (&["-D", "PUBLISH", "content-type", "t", "-V", "311"][..], "MQTT 3.1.1 (-V 311) cannot carry"),
        (&["-D", "PUBLISH", "content-type", "text", "plain"][..], "takes one value, got 2"),
        (&["-D", "PUBLISH", "user-property", "k", "-D", "PUBLISH", "content-type", "x"][..], "a KEY and a VALUE"),
    ] {
        let out =
            run(&[&["pub", "-b", "mqtt://127.0.0.1:1", "-t", "p", "-m", "x", "--outbox", "/nonexistent"][..], bad]
                .concat())
            .await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(said), "{bad:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_formats_and_bad_flags() {
    let broker = Mosquitto::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let inbox = inbox.to_str().unwrap();
    // `-c` as mosquitto_sub users type it: the kept session is the default.
    let base = ["sub", "-b", &broker.url(), "-t", "f/#", "-i", "sub-fmt", "-c", "--inbox", inbox];
    run(&[&base[..], &["--register"]].concat()).await;
    publish(&[broker.url()], &[], "f/x", &["hi".to_owned()], &dir.path().join("ob")).await;
    let out = run(&[&base[..], &["-C", "1", "-W", "20", "--json"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((j["topic"].as_str(), j["payload"].as_str(), j["qos"].as_u64()), (Some("f/x"), Some("hi"), Some(1)));
    assert_eq!(j["seq"], 1);
    assert!(j["producer"].as_str().is_some_and(|p| p.starts_with("steadfast-pub-")), "{j}");
    publish(&[broker.url()], &[], "f/y", &["yo".to_owned()], &dir.path().join("ob")).await;
    let out = run(&[&base[..], &["-C", "1", "-W", "20", "-F", "%t|%p|%q|%l|%x|%I"]].concat()).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("f/y|yo|1|2|796f|steadfast-pub-") && text.ends_with("/2\n"), "{text:?}");
    for (args, needle) in [
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a/#/b"][..], "wildcard must fill a whole level"),
        (&["sub", "-b", "mqtt://127.0.0.1:1"][..], "no topic given"),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a/\u{7f}"][..], "control character U+007F"),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-c", "--clean"][..], "cannot be used with"),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-F", "%z"][..], "unknown conversion `%z`"),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "--json", "-v"][..], "choose one output"),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "--exec", "true", "-v"][..], "--exec handles"),
        (&["sub", "-b", "mqtt://127.0.0.1:1", "-t", "a", "-q", "7"][..], "QoS 7"),
    ] {
        let mut args = args.to_vec();
        args.extend(["--inbox", inbox]);
        let out = run(&args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: expected `{needle}` in {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_runs_over_a_backlog_hand_each_message_over_once_and_a_new_filter_is_subscribed() {
    let broker = Mosquitto::start(MosquittoOptions { persistence: true, extra: vec![] }).await;
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let inbox = inbox.to_str().unwrap();
    let base = ["sub", "-b", &broker.url(), "-i", "sub-short", "--inbox", inbox];
    let out = run(&[&base[..], &["-t", "bk/a", "--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let want = lines(600, "bk");
    publish(&[broker.url()], &[], "bk/a", &want, &dir.path().join("ob")).await;
    // Each run takes 5 while hundreds wait behind them (more than the
    // consumer's queues hold): what it printed is acknowledged on exit.
    let mut got = Vec::new();
    for _ in 0..6 {
        let started = std::time::Instant::now();
        let out = run(&[&base[..], &["-t", "bk/a", "-C", "5", "-W", "20"]].concat()).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(started.elapsed() < Duration::from_secs(8), "a run took {:?}", started.elapsed());
        got.extend(String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned));
    }
    assert_eq!(got, want[..30], "no message twice, none skipped");
    let st = crate::status_json(inbox);
    assert_eq!((st["inbox"].as_u64(), st["counters"]["consumer.handled"].as_u64()), (Some(30), Some(30)), "{st}");
    assert_eq!(st["kind"], "inbox", "{st}");
    // The inbox lives in inbox.db, and status speaks of an inbox.
    assert!(std::path::Path::new(inbox).join("inbox.db").exists());
    let text = run(&["status", "--inbox", inbox]).await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.starts_with("inbox ") && !text.contains("queued"), "{text}");
    // A kept session, another filter: it is subscribed although the broker
    // kept the session.
    let inbox2 = dir.path().join("inbox2");
    let base = ["sub", "-b", &broker.url(), "-i", "sub-short2", "--inbox", inbox2.to_str().unwrap()];
    let out = run(&[&base[..], &["-t", "bk/c", "--register"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let inbox = inbox2.to_str().unwrap();
    let late = ["late".to_owned()];
    let sub = {
        let args: Vec<String> =
            [&base[..], &["-t", "bk/b", "-C", "1", "-W", "20"]].concat().iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || steadfast().args(&args).stdin(Stdio::null()).output().unwrap())
    };
    // The new subscription exists once the run recorded it in its inbox.
    let db = std::path::PathBuf::from(inbox).join("inbox.db");
    wait_until("the run started", Duration::from_secs(10), move || db.exists()).await;
    let ob = dir.path().join("ob2");
    let url = broker.url();
    // Published until the subscriber has it (its SUBACK may still be on the way).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sub.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the new filter never delivered");
        publish(std::slice::from_ref(&url), &[], "bk/b", &late, &ob).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = sub.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "late\n");
}

/// A server that takes the connection and never answers CONNECT (an HTTP
/// server, a stalled broker): SIGTERM ends `sub` at once, not after the
/// connect timeout or the waits of a close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_connection_attempt_ends_sub_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtt://{}", listener.local_addr().unwrap());
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("in");
    let child = steadfast()
        .args(["sub", "-b", &url, "-t", "a", "--inbox", inbox.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its CONNECT is under way: the server holds the connection.
    tokio::time::timeout(Duration::from_secs(30), accepted.recv()).await.expect("sub connects").unwrap();
    let asked = std::time::Instant::now();
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let took = asked.elapsed();
    server.abort();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Before: 5 s (a flush and a task waited out their timeouts); the
    // connect timeout is 10 s.
    assert!(took < Duration::from_secs(4), "sub took {took:?} to stop");
}

/// A subscription the broker refuses ends `sub` with the filter named and
/// exit 1, at once, as `--register` does: before, it subscribed again after
/// every reconnect, for ever (or until `-W`, then exit 0). Over MQTT 3.1.1
/// (SUBACK 0x80, as aedes answers a filter it denies) and 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_ends_sub_with_the_filter_named() {
    for (mqtt5, version) in [(false, "311"), (true, "5")] {
        let broker = steadfast_testkit::ScriptedBroker::refusing_subscriptions(mqtt5);
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox");
        let started = std::time::Instant::now();
        let args = ["sub", "-b", &broker.url(), "-V", version, "-t", "denied/x", "-W", "30", "--inbox"];
        let out = run(&[&args[..], &[inbox.to_str().unwrap()]].concat()).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "MQTT {version}: {err}");
        assert!(err.contains("refused the subscription to `denied/x`"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20), "at once, not at -W: {:?}", started.elapsed());
    }
}

/// `-W` with no broker reachable the whole time is a timeout (exit 3, as
/// `-C` short of its count), not a quiet run that found nothing (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w_with_no_broker_reached_is_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!("mqtt://127.0.0.1:{}", steadfast_testkit::free_port());
    let inbox = dir.path().join("inbox");
    let out = run(&["sub", "-b", &nobody, "-t", "a/#", "-W", "2", "--inbox", inbox.to_str().unwrap()]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no broker could be reached in time"), "{err}");
}
