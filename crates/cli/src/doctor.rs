//! `steadfast doctor -b URL`: runs the library's checks against a broker
//! and explains, from what it found, which settings make it safe for
//! reliable delivery and what each costs. Text or `--json`.

use std::time::Duration;

use anyhow::anyhow;
use serde_json::json;
use steadfast::doctor::{self, Report, Restart};
use steadfast::{BrokerUrl, ClientConfig, ProtocolVersion};

use crate::args::DoctorArgs;
use crate::hints::WithFlag;
use crate::Failure;

pub async fn run(mut a: DoctorArgs) -> Result<(), Failure> {
    let usage = |e: String| Failure::usage(anyhow!(e));
    a.conn.take_url().map_err(usage)?;
    let urls = crate::conn::or_default(a.conn.urls().map_err(usage)?);
    let [url] = urls.as_slice() else {
        return Err(usage("doctor checks one broker: give exactly one -b URL (or -h/-p)".into()));
    };
    let url: BrokerUrl = url.parse().map_err(|e| usage(WithFlag(e).to_string()))?;
    let within = a.restart_within;
    let dir = std::env::temp_dir(); // not used: the doctor keeps nothing on disk
    let cfg = a.conn.apply(ClientConfig::new("steadfast-doctor", url.clone(), dir)).map_err(usage)?;
    let cfg = cfg.connect_timeout(Duration::from_secs(5));
    let restart: Option<Restart> = if let Some(cmd) = a.restart_cmd.clone() {
        Some(Box::pin(async move {
            let run = tokio::process::Command::new("sh").args(["-c", &cmd]).kill_on_drop(true).status();
            let status = tokio::time::timeout(within, run)
                .await
                .map_err(|_| format!("`{cmd}` did not finish within {within:?}"))?
                .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("`{cmd}` exited with {status}").into())
            }
        }))
    } else if a.restart_wait {
        Some(Box::pin(async move {
            eprintln!("steadfast doctor: restart the broker now (e.g. `systemctl restart mosquitto`); waiting up to {within:?} for it to go down and come back");
            Ok(())
        }))
    } else {
        None
    };
    let report = doctor::diagnose(&cfg, &url, restart, within).await;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&report)).expect("JSON"));
    } else {
        print!("{}", text(&report));
    }
    let reachable = report.version.is_some();
    let restart = report.check("restart").and_then(|c| c.ok);
    match (reachable, report.check("session").and_then(|c| c.ok)) {
        // Asked to check a restart, a broker that loses sessions there
        // fails too: `doctor && deploy` must not pass it.
        (true, Some(true)) if restart == Some(false) => Err(Failure::other(anyhow!(
            "{} does not keep sessions across a restart: what it queued for absent consumers dies with it",
            report.broker
        ))),
        (true, Some(true)) => Ok(()),
        (false, _) => Err(Failure::other(anyhow!("cannot connect to {} with MQTT 5 or 3.1.1", report.broker))),
        (true, Some(false)) => Err(Failure::other(anyhow!(
            "{} does not keep a session across a reconnect: messages for an absent consumer are lost",
            report.broker
        ))),
        (true, None) => Err(Failure::other(anyhow!(
            "could not tell whether {} keeps a session across a reconnect (see the report)",
            report.broker
        ))),
    }
}

fn mark(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "?",
    }
}

fn title(key: &str) -> &'static str {
    match key {
        "mqtt5" => "MQTT 5.0",
        "mqtt311" => "MQTT 3.1.1",
        "qos2" => "QoS 2",
        "retained" => "retained messages",
        "session" => "session kept across a reconnect",
        "restart" => "session kept across a broker restart",
        "disconnect_race" => "message right after a DISCONNECT",
        "inflight" => "unfinished QoS 2 messages in flight",
        _ => "check",
    }
}

fn text(r: &Report) -> String {
    let mut out = format!("broker: {}\n", r.broker);
    let software = match (&r.software, r.version) {
        (Some(s), _) => s.as_str(),
        (None, None) => "unknown (the broker could not be reached)",
        (None, Some(_)) => "not announced ($SYS/broker/version)",
    };
    out += &format!("software: {software}\n");
    for c in &r.checks {
        out += &format!("  {:<38} {:<4} {}\n", title(c.key), mark(c.ok), c.detail);
    }
    if !r.checks.iter().any(|c| c.key == "restart") && r.version.is_some() {
        out += &format!(
            "  {:<38} {:<4} not checked: add --restart-cmd 'COMMAND' or --restart-wait\n",
            title("restart"),
            "-"
        );
    }
    if r.check("mqtt5").and_then(|c| c.ok) == Some(true) {
        let l = &r.limits;
        out += "limits (MQTT 5 CONNACK):\n";
        out += &format!(
            "  receive maximum      {}\n",
            l.receive_maximum.map_or("not stated (65535)".into(), |v| {
                format!("{v} (the most QoS 1 and 2 messages it takes unacknowledged from one client; steadfast's window follows it)")
            })
        );
        out += &format!(
            "  maximum packet size  {}\n",
            l.maximum_packet_size.map_or("not stated (no limit)".into(), |v| format!("{v} bytes"))
        );
        out +=
            &format!("  maximum QoS          {}\n", l.maximum_qos.map_or("not stated (2)".into(), |v| v.to_string()));
        out += &format!(
            "  retain available     {}\n",
            l.retain_available.map_or("not stated (yes)", |v| if v { "yes" } else { "no" })
        );
        if let Some(e) = l.session_expiry {
            out += &format!("  session expiry       {e} s (imposed by the broker)\n");
        }
    }
    out += "\nadvice:\n";
    for line in advice(r) {
        out += &format!("  - {line}\n");
    }
    out
}

/// What to change, from what was found; Mosquitto's settings by name.
fn advice(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let ok = |k: &str| r.check(k).and_then(|c| c.ok);
    if r.version.is_none() {
        out.push("nothing could be checked: fix the connection first (the errors above say why)".into());
        return out;
    }
    if ok("mqtt5") == Some(false) {
        out.push(
            "the broker does not accept MQTT 5: use -V 311 (with --envelope on both ends to keep message identities)"
                .into(),
        );
    }
    if ok("session") == Some(false) {
        out.push("CRITICAL: sessions are not kept across a reconnect, so a consumer that is away loses what was published meanwhile; use a broker (or settings) that keeps persistent sessions".into());
    }
    if ok("disconnect_race") == Some(false) {
        out.push("this broker loses a message published within moments of a persistent subscriber's DISCONNECT (it parks the session a little later); messages published later are kept. A consumer that disconnects cleanly and a producer publishing at that instant can lose one: fanout to two brokers covers it".into());
    }
    if ok("qos2") == Some(false) {
        out.push(
            "QoS 2 is not available: publish with -q 1; steadfast's inbox removes the duplicates QoS 1 allows".into(),
        );
    }
    match ok("restart") {
        Some(false) if r.is_mosquitto() => out.push(
            "sessions and queued messages die with a restart: set `persistence true` and `persistence_location` in mosquitto.conf".into(),
        ),
        Some(false) => out.push(
            "sessions and queued messages die with a restart: turn on the broker's persistence".into(),
        ),
        _ => {}
    }
    if r.is_mosquitto() {
        // Said once: after a failed restart check it is the first advice;
        // after a passed one it is in place already.
        if ok("restart").is_none() {
            out.push("`persistence true`: sessions, subscriptions and queued messages survive a restart. Cost: a write of the whole store at each save".into());
        }
        out.push("`autosave_interval N` (default 1800 s): Mosquitto saves its store every N seconds and at a clean shutdown, so a crash or power loss loses up to N seconds of what it accepted; lower it (e.g. 10) or use `autosave_on_changes true` with a count. Cost: more disk writes. steadfast's fanout to two brokers with ack = all covers that window".into());
        out.push("`max_queued_messages` (default 1000 per client): beyond it Mosquitto drops messages for an absent consumer without telling anyone; size it as message rate x the longest consumer absence (e.g. 100 msg/s x 1 h = 360000), or 0 for no limit. Cost: memory (and store size) while a consumer is away".into());
        out.push("`max_inflight_messages 1` where strict ordering across redeliveries matters. Cost: one message per round trip to each subscriber".into());
    } else {
        out.push("make sure the broker keeps its sessions and queued messages on disk, saves them often (what it accepted since the last save is lost in a crash), and queues enough per absent consumer (message rate x longest absence)".into());
    }
    if let Some(n) = r.inflight_closes_at {
        out.push(format!("this broker closes the connection past {n} unfinished QoS 2 messages from one client without announcing it (steadfast's window towards MQTT 3.1.1 is 20 unless --max-inflight is given; past a close it shrinks and is remembered); keep --max-inflight (bridge: `max_inflight`) at {} or less", n.max(1)));
        if r.is_mosquitto() {
            out.push("Mosquitto with `max_queued_messages 0` drops the QoS 2 message that passes `max_inflight_messages` while answering PUBREC to an MQTT 3.1.1 client (it cannot say quota exceeded in 3.1.1): give `max_queued_messages` a number (the default 1000 queues the excess), or publish over MQTT 5 (-V auto, the default), where it announces its receive maximum".into());
        }
    }
    if let Some(max) = r.limits.maximum_packet_size {
        out.push(format!("messages above {max} bytes on the wire are refused by this broker; steadfast drops them as `too-large` at enqueue"));
    }
    out
}

fn to_json(r: &Report) -> serde_json::Value {
    let checks: serde_json::Map<String, serde_json::Value> =
        r.checks.iter().map(|c| (c.key.to_owned(), json!({ "ok": c.ok, "detail": c.detail }))).collect();
    json!({
        "broker": r.broker,
        "software": r.software,
        "version": r.version.map(|v| match v { ProtocolVersion::V5 => "5", ProtocolVersion::V311 => "3.1.1" }),
        "checks": checks,
        "inflight_closes_at": r.inflight_closes_at,
        "limits": {
            "receive_maximum": r.limits.receive_maximum,
            "maximum_packet_size": r.limits.maximum_packet_size,
            "maximum_qos": r.limits.maximum_qos,
            "retain_available": r.limits.retain_available,
            "session_expiry": r.limits.session_expiry,
        },
        "advice": advice(r),
    })
}
