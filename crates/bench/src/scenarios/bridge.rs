//! `bridge`: local Mosquitto -> `steadfast bridge` -> upstream Mosquitto,
//! against steadfast publishing straight to the upstream broker.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use steadfast::ProtocolVersion;
use steadfast_lab::mosquitto_program;

use crate::clients::steadfast_durable;
use crate::measure::{broker, median, rate, state_dir, versus};
use crate::{Args, Scenario};

/// `mosquitto_sub` on `port` that exits after `n` messages; returns once
/// its subscription is granted.
pub(crate) async fn counting_subscriber(port: u16, filter: &str, n: usize) -> anyhow::Result<std::process::Child> {
    let mut sub = Command::new("stdbuf")
        .arg("-oL")
        .arg(mosquitto_program("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", filter, "-q", "1", "-C", &n.to_string(), "-d"])
        .stdout(Stdio::piped())
        .spawn()?;
    let out = sub.stdout.take().context("stdout")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("received SUBACK") {
                tx.take().map(|t| t.send(()));
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx).await?.context("mosquitto_sub ended")?;
    Ok(sub)
}

/// The in-flight window of a `steadfast bridge` route (the client's
/// default; the bridge's configuration has no setting for it).
pub(crate) const BRIDGE_DEFAULT_WINDOW: u16 = 1024;

pub(crate) async fn bridge(a: Args) -> anyhow::Result<Scenario> {
    let exe = match &a.steadfast {
        Some(exe) => exe.clone(),
        None => std::env::current_exe()?.with_file_name("steadfast"),
    };
    if !exe.exists() {
        bail!("{} is missing: build it first with `cargo build --release -p steadfast-cli`", exe.display());
    }
    // The bridge has no window setting of its own (its default is 1,024):
    // the brokers set it, by announcing `window` as their receive maximum
    // (upstream) and by sending no more than `window` at once (local); the
    // direct publisher gets the same.
    let window = a.inflight.min(BRIDGE_DEFAULT_WINDOW);
    let local = broker(window).await?;
    let upstream = broker(window).await?;
    let title = format!(
        "{} QoS 1 messages of {} bytes, local Mosquitto -> steadfast bridge (durable) -> upstream Mosquitto, in-flight window {window} on both hops and for the direct publisher, {} runs, median",
        a.messages, a.payload, a.runs
    );
    let (mut bridged, mut direct) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("bridge: run {}/{}", run + 1, a.runs);
        let dir = state_dir(&a)?;
        let cfg = dir.path().join("bridge.toml");
        std::fs::write(
            &cfg,
            format!(
                "[store]\ndir = \"{}\"\n[[route]]\nname = \"up\"\n[route.source]\nbrokers = [\"{}\"]\ntopics = [\"bench/bridge/#\"]\nclient_id = \"bench-bridge-{run}\"\n[route.destination]\nbrokers = [\"{}\"]\ntopic_prefix = \"up/\"\n",
                dir.path().join("state").display(),
                local.url(),
                upstream.url()
            ),
        )?;
        let register = Command::new(&exe).args(["bridge", "--register", "--config"]).arg(&cfg).output()?;
        if !register.status.success() {
            bail!("bridge --register: {}", String::from_utf8_lossy(&register.stderr));
        }
        // Queued at the local broker for the bridge's session, by a
        // publisher that makes sure the broker has every one.
        let line = "b".repeat(a.payload) + "\n";
        let mut feed = Command::new(&exe)
            .args(["pub", "-b", &local.url(), "-t", "bench/bridge/t", "-l", "--progress", "never", "--outbox"])
            .arg(dir.path().join("feed"))
            .stdin(Stdio::piped())
            .spawn()?;
        feed.stdin.take().context("stdin")?.write_all(line.repeat(a.messages).as_bytes())?;
        if !feed.wait()?.success() {
            bail!("feeding the local broker failed");
        }
        let mut sub = counting_subscriber(upstream.port(), "up/bench/bridge/#", a.messages).await?;
        let t0 = Instant::now();
        let mut bridge = Command::new(&exe).args(["bridge", "--config"]).arg(&cfg).stdout(Stdio::null()).spawn()?;
        let sub_pid = sub.id();
        let done =
            tokio::time::timeout(Duration::from_secs(300), tokio::task::spawn_blocking(move || sub.wait())).await;
        let elapsed = t0.elapsed();
        let _ = Command::new("kill").args(["-TERM", &bridge.id().to_string()]).status();
        let _ = bridge.wait();
        let Ok(done) = done else {
            let _ = Command::new("kill").args(["-KILL", &sub_pid.to_string()]).status();
            bail!("the upstream subscriber did not get {} messages within 300 s", a.messages);
        };
        let done = done??;
        if !done.success() {
            bail!("the upstream subscriber failed");
        }
        bridged.push(rate(a.messages, elapsed));
        let d = steadfast_durable(upstream.port(), &a, &format!("direct-{run}"), ProtocolVersion::V5, window).await?;
        direct.push(rate(a.messages, d));
    }
    let (bridged, direct) = (median(bridged), median(direct));
    Ok(Scenario {
        name: "bridge",
        title,
        ratio_to: "steadfast publishing straight to the upstream broker, same run".into(),
        rows: versus(
            window,
            ("steadfast straight to upstream (durable, MQTT 5)", direct, None),
            ("local -> steadfast bridge (durable) -> upstream", bridged, None),
        ),
        latencies: vec![],
        notes: if window < a.inflight {
            vec![format!("window {window}, not {}: the bridge's own default caps it", a.inflight)]
        } else {
            vec![]
        },
    })
}
