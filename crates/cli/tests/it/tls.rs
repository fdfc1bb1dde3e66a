//! TLS, mutual TLS and WebSocket against real Mosquitto (certificates made
//! by each test), and credentials that never show.

use std::time::Duration;

use steadfast_testkit::{Mosquitto, MosquittoOptions, Pki, WsFront};

use crate::{run, stderr, steadfast};

async fn tls_broker(pki: &Pki, server: &str, require_client: bool) -> Mosquitto {
    Mosquitto::start(MosquittoOptions { extra: pki.mosquitto_lines(server, require_client), ..Default::default() })
        .await
}

fn tls_url(m: &Mosquitto) -> String {
    format!("mqtts://localhost:{}", m.port())
}

/// Register a session, publish `n` messages through `pub`, receive them
/// with `sub`: both ends on `url` with `extra` flags.
async fn round_trip(url: &str, extra: &[&str], tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (ob, inbox) = (dir.path().join("ob"), dir.path().join("in"));
    let with = |args: &[&str]| -> Vec<String> { args.iter().chain(extra).map(|s| s.to_string()).collect() };
    let sub_args = |more: &[&str]| {
        let mut v = with(&["sub", "-b", url, "-t", &format!("{tag}/#"), "-i", &format!("{tag}-sub"), "-q", "1"]);
        v.extend(["--inbox".into(), inbox.display().to_string()]);
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let out = run(&sub_args(&["--register"]).iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "register: {}", stderr(&out));
    for i in 0..3 {
        let args = with(&["pub", "-b", url, "-t", &format!("{tag}/x"), "-m", &format!("m{i}"), "-q", "1", "-i", tag]);
        let mut args = args;
        args.extend(["--outbox".into(), ob.display().to_string()]);
        let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        assert_eq!(out.status.code(), Some(0), "pub: {}", stderr(&out));
    }
    let out = run(&sub_args(&["-C", "3", "-W", "20"]).iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "sub: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "m0\nm1\nm2\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_the_brokers_ca_publishes_and_subscribes() {
    let pki = Pki::new();
    let broker = tls_broker(&pki, "server", false).await;
    let ca = pki.path("ca.pem");
    round_trip(&tls_url(&broker), &["--cafile", ca.to_str().unwrap()], "tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::new();
    let broker = tls_broker(&pki, "server", true).await;
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));
    let ca = ca.to_str().unwrap();
    round_trip(
        &tls_url(&broker),
        &["--cafile", ca, "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()],
        "mtls",
    )
    .await;
    // Without it: a clear error, at once, nothing accepted.
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let t0 = std::time::Instant::now();
    let out =
        run(&["pub", "-b", &tls_url(&broker), "--cafile", ca, "-t", "a", "-m", "x", "--outbox", ob.to_str().unwrap()])
            .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("client certificate"), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing was published"), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(10));
    // sub stops too, rather than retrying for ever.
    let out = run(&["sub", "-b", &tls_url(&broker), "--cafile", ca, "-t", "a", "-i", "nocert", "-W", "20"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("client certificate"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_and_an_expired_certificate_are_named() {
    let pki = Pki::new();
    let good = tls_broker(&pki, "server", false).await;
    let expired = tls_broker(&pki, "expired", false).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let publish = |url: String, ca: &str| {
        let ca = pki.path(ca);
        let ob = ob.clone();
        async move {
            run(&[
                "pub",
                "-b",
                &url,
                "--cafile",
                ca.to_str().unwrap(),
                "-t",
                "a",
                "-m",
                "x",
                "--outbox",
                ob.to_str().unwrap(),
            ])
            .await
        }
    };
    let out = publish(tls_url(&good), "other-ca.pem").await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not signed by a CA we trust; give its CA with --cafile"), "{}", stderr(&out));
    let out = publish(tls_url(&expired), "ca.pem").await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate has expired"), "{}", stderr(&out));
    // The platform's roots do not know our test CA either.
    let out = run(&["pub", "-b", &tls_url(&good), "-t", "a", "-m", "x", "--outbox", ob.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not signed by a CA we trust"), "{}", stderr(&out));
    // --insecure gets through, and says what it costs.
    let out =
        run(&["pub", "-b", &tls_url(&expired), "--insecure", "-t", "a", "-m", "x", "--outbox", ob.to_str().unwrap()])
            .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate verification is OFF"), "{}", stderr(&out));
}

#[tokio::test]
async fn bad_tls_settings_are_usage_errors() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["pub", "-b", "mqtt://127.0.0.1:1", "--cafile", ca, "-t", "a", "-m", "x"], "no mqtts:// or wss:// broker"),
        (
            &["pub", "-b", "mqtts://127.0.0.1:1", "--cafile", "/nonexistent.pem", "-t", "a", "-m", "x"],
            "CA file /nonexistent.pem: No such file",
        ),
        (&["pub", "-b", "mqtts://127.0.0.1:1", "--cert", ca, "-t", "a", "-m", "x"], "--cert and --key go together"),
        (&["pub", "-b", "mqtts://127.0.0.1:1", "--cafile", ca, "--insecure", "-t", "a", "-m", "x"], "contradict"),
        (&["pub", "-b", "mqtts://127.0.0.1:1", "--cafile", "/etc/hostname", "-t", "a", "-m", "x"], "no certificate"),
        (&["pub", "-b", "mqtt://h:1/x", "-t", "a", "-m", "x"], "only ws:// and wss:// URLs have a path"),
    ];
    for (args, want) in cases {
        let out = run(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_carries_mqtt() {
    let broker = Mosquitto::plain().await;
    let front = WsFront::start(broker.port()).await;
    round_trip(&front.url(), &[], "ws").await;
    assert!(front.paths().iter().all(|p| p == "/mqtt"), "{:?}", front.paths());
    assert!(front.paths().len() >= 5, "every run went through the WebSocket front: {:?}", front.paths());
}

/// A password from a file or the environment works, and shows nowhere: not
/// in a debug log, not in `status`, not in the outbox's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_from_a_file_or_the_environment_never_show() {
    const SECRET: &str = "s3cret-Pa55word";
    let broker = Mosquitto::with_password("alice", SECRET).await;
    let dir = tempfile::tempdir().unwrap();
    let ob = dir.path().join("ob");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, format!("{SECRET}\n")).unwrap();
    let base =
        ["--debug", "pub", "-b", &broker.url(), "-u", "alice", "-t", "a", "-q", "1", "--outbox", ob.to_str().unwrap()];
    let mut with_file: Vec<&str> = base.to_vec();
    with_file.extend(["-m", "one", "--pw-file", pw.to_str().unwrap()]);
    let out = run(&with_file).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("can be read by other users"), "a 0644 password file is flagged: {}", stderr(&out));
    let mut logs = stderr(&out);

    let mut with_env: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    with_env.extend(["-m".into(), "two".into(), "--log-format".into(), "json".into()]);
    let out = tokio::task::spawn_blocking(move || {
        steadfast().args(&with_env).env("STEADFAST_PASSWORD", SECRET).output().expect("run steadfast")
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    logs.push_str(&stderr(&out));
    let status = run(&["status", "--outbox", ob.to_str().unwrap(), "--json"]).await;
    logs.push_str(&String::from_utf8_lossy(&status.stdout));
    assert!(!logs.contains(SECRET), "the password was printed:\n{logs}");
    for entry in std::fs::read_dir(&ob).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "the password is in the outbox's files");
    }
    // A password file that is empty, and a password with no user name.
    std::fs::write(&pw, "").unwrap();
    let out =
        run(&["pub", "-b", &broker.url(), "-u", "alice", "--pw-file", pw.to_str().unwrap(), "-t", "a", "-m", "x"])
            .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("the file is empty"), "{}", stderr(&out));
    let out = run(&["pub", "-b", &broker.url(), "-P", "x", "-t", "a", "-m", "x"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("a password needs a user name"), "{}", stderr(&out));
}
