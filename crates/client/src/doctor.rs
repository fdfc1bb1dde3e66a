//! What a broker really does, found by talking to it: protocol versions,
//! its limits, QoS 2, retained messages, whether it keeps a session across
//! a reconnect and, when the caller restarts it, across a restart. Each
//! check uses its own client ids and topics under `steadfast/doctor/TAG/`
//! and cleans up after itself (retained message cleared, sessions ended).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use steadfast_core::engine::{Ack, ReceiveSession};
use steadfast_core::reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::clock;
use crate::config::{BrokerUrl, ClientConfig, ProtocolVersion};
use crate::error::{CloseReason, ConnectError};
use crate::link::{loose_message, open_session, ConnAck, Incoming, Link, LinkAcks};
use crate::transport::{send, ReadHalf, WriteHalf};
use steadfast_core::Qos;

/// How long one step waits for the broker's answer.
const STEP: Duration = Duration::from_secs(3);
/// How long after a subscriber's DISCONNECT the checked message of the
/// session check is published (the early one goes at once).
const RACE_PAUSE: Duration = Duration::from_millis(500);
/// The early message's payload.
const EARLY: &[u8] = b"right after the disconnect";

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Short machine name (`mqtt5`, `qos2`, `retained`, `session`, `restart`).
    pub key: &'static str,
    /// `Some(true)`: it does; `Some(false)`: it does not; `None`: could not tell.
    pub ok: Option<bool>,
    /// What was seen, in words.
    pub detail: String,
}

/// What the broker said about itself in its MQTT 5 CONNACK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// In-flight QoS 1/2 messages it accepts from one client (absent: 65535).
    pub receive_maximum: Option<u16>,
    /// Largest packet it accepts, in bytes (absent: no limit stated).
    pub maximum_packet_size: Option<u32>,
    /// Highest QoS it accepts (absent: 2).
    pub maximum_qos: Option<u8>,
    /// Whether it keeps retained messages (absent: yes).
    pub retain_available: Option<bool>,
    /// A session expiry it imposes instead of the one asked for (seconds).
    pub session_expiry: Option<u32>,
}

/// Everything the doctor found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The broker, as a URL.
    pub broker: String,
    /// Its own name and version (`$SYS/broker/version`), when it says.
    pub software: Option<String>,
    /// The protocol version the later checks used.
    pub version: Option<ProtocolVersion>,
    /// Limits from the MQTT 5 CONNACK.
    pub limits: Limits,
    /// Unfinished QoS 2 messages from one client at which the broker
    /// closed the connection (a limit it does not announce), if it did.
    pub inflight_closes_at: Option<u16>,
    /// The checks, in the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// The check named `key`.
    pub fn check(&self, key: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.key == key)
    }

    /// True when the software is Mosquitto.
    pub fn is_mosquitto(&self) -> bool {
        self.software.as_deref().is_some_and(|s| s.to_ascii_lowercase().contains("mosquitto"))
    }
}

/// Restarts the broker (a command, or a person told to): the doctor then
/// waits for it to go down and come back.
pub type Restart = Pin<Box<dyn Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send>>;

/// Runs every check against `url` with the credentials and TLS settings of
/// `cfg` (its client id and broker set are not used). With `restart`, the
/// doctor also checks whether a session and a message queued for it
/// survive a broker restart, waiting up to `restart_within` for the broker
/// to go down and come back.
pub async fn diagnose(
    cfg: &ClientConfig,
    url: &BrokerUrl,
    restart: Option<Restart>,
    restart_within: Duration,
) -> Report {
    let tag = format!("{:08x}", fastrand::u32(..));
    let mut report = Report {
        broker: url.to_string(),
        software: None,
        version: None,
        limits: Limits::default(),
        inflight_closes_at: None,
        checks: Vec::new(),
    };
    let d = Doc { cfg: cfg.clone().session_expiry(Duration::from_secs(300)), url: url.clone(), tag };

    let v5 = d.version_check(ProtocolVersion::V5).await;
    if let Ok(ack) = &v5 {
        report.limits = Limits {
            receive_maximum: ack.receive_maximum,
            maximum_packet_size: ack.maximum_packet_size,
            maximum_qos: ack.maximum_qos,
            retain_available: ack.retain_available,
            session_expiry: ack.session_expiry,
        };
    }
    let v311 = d.version_check(ProtocolVersion::V311).await;
    let verdict = |key, r: &Result<ConnAck, ConnectError>| Check {
        key,
        ok: Some(r.is_ok()),
        detail: match r {
            Ok(_) => "accepted".into(),
            Err(e) => format!("not accepted: {e}"),
        },
    };
    push_check(&mut report, verdict("mqtt5", &v5));
    push_check(&mut report, verdict("mqtt311", &v311));
    let version = match (&v5, &v311) {
        (Ok(_), _) => ProtocolVersion::V5,
        (_, Ok(_)) => ProtocolVersion::V311,
        _ => return report,
    };
    report.version = Some(version);
    let d = Doc { cfg: d.cfg.clone().version(version), ..d };

    report.software = d.software().await;
    push_check(&mut report, d.qos2().await);
    push_check(&mut report, d.retained().await);
    if report.check("qos2").and_then(|c| c.ok) == Some(true) {
        let (check, closes_at) = probe_inflight(&d.cfg, url, &d.tag).await;
        report.inflight_closes_at = closes_at;
        push_check(&mut report, check);
    }
    for c in d.session(None, restart_within).await {
        push_check(&mut report, c);
    }
    if let Some(restart) = restart {
        for c in d.session(Some(restart), restart_within).await {
            push_check(&mut report, c);
        }
    }
    report
}

/// How many unfinished QoS 2 messages the in-flight probe sends: the
/// client's default window.
pub const PROBE_INFLIGHT: u16 = 1024;

/// The broker's limit on unfinished inbound QoS 2 messages (PUBREC sent,
/// PUBREL not yet) from one client, when it announces none (MQTT 3.1.1
/// cannot): [`PROBE_INFLIGHT`] of them in one burst, on a connection of
/// their own (client id tagged with `tag`).
/// Returns the check (`inflight`) and, when the broker closed the
/// connection, how many it had taken by then; what it took is released
/// (PUBREL) afterwards.
pub async fn probe_inflight(cfg: &ClientConfig, url: &BrokerUrl, tag: &str) -> (Check, Option<u16>) {
    let check = |ok, detail: String| Check { key: "inflight", ok, detail };
    let mut c = cfg.clone();
    c.client_id = format!("steadfast-doctor-{tag}-inflight");
    let mut p = match Probe::open(&c, url, true).await {
        Ok(p) => p,
        Err(e) => return (check(None, format!("not probed: {e}")), None),
    };
    if let Some(max) = p.ack.receive_maximum {
        p.close().await;
        let detail = format!(
            "it announces a receive maximum of {max}; steadfast keeps to it (not probed past it: a client must not)"
        );
        return (check(Some(true), detail), None);
    }
    let topic = format!("steadfast/doctor/{tag}/inflight");
    // In steps, each answered before the next: a broker that resets the
    // connection discards the answers still on their way, so the count of
    // what it took is exact to a step.
    const STEP_SIZE: u16 = 4;
    let (mut taken, mut refused, mut closed) = (Vec::new(), 0u16, false);
    let mut ended = String::new();
    let mut next = 1u16;
    'probe: while next <= PROBE_INFLIGHT {
        let last = (next + STEP_SIZE - 1).min(PROBE_INFLIGHT);
        let mut sent = Ok(());
        for pid in next..=last {
            sent = sent.and_then(|()| p.publish(&topic, b"inflight", Qos::ExactlyOnce, false, Some(pid)));
        }
        if let Err(e) = sent.and(p.flush().await) {
            ended = e.to_string();
            closed = true;
            break;
        }
        for _ in next..=last {
            let answer = p
                .wait(STEP, |i| match i {
                    Incoming::Ack(Ack::PubRec { pid, code } | Ack::PubAck { pid, code }) => {
                        Some((*pid, !reason::is_refusal(*code)))
                    }
                    _ => None,
                })
                .await;
            match answer {
                Ok(Some((pid, true))) => taken.push(pid),
                Ok(Some((_, false))) => refused += 1,
                Ok(None) => break 'probe,
                Err(e) => {
                    tracing::debug!(error = %e, taken = taken.len(), "doctor: the in-flight probe's connection ended");
                    ended = e.to_string();
                    closed = true;
                    break 'probe;
                }
            }
        }
        next = last + 1;
    }
    let n = taken.len() as u16;
    if closed {
        let detail = format!("it closed the connection after taking {n} unfinished QoS 2 messages (PUBREC sent, PUBREL not yet; {ended}): a limit it does not announce. steadfast halves its window at such a close and remembers the window per broker; --max-inflight {} (what it took) spares the first close", n.max(1));
        return (check(Some(false), detail), Some(n));
    }
    for pid in &taken {
        let _ = p.link.pubrel(*pid);
    }
    let _ = p.flush().await;
    let _ = p
        .wait(STEP, |i| {
            matches!(i, Incoming::Ack(Ack::PubComp { pid }) if *pid == taken.last().copied().unwrap_or(0)).then_some(())
        })
        .await;
    p.close().await;
    let detail = if refused > 0 {
        format!("it took {n} unfinished QoS 2 messages and refused {refused} more with an error reason code (quota exceeded): steadfast keeps to the receive maximum a broker announces and sends a refused message again after a pause")
    } else if n < PROBE_INFLIGHT {
        return (check(None, format!("it answered {n} of {PROBE_INFLIGHT} QoS 2 messages within {STEP:?}")), None);
    } else {
        format!("it took {n} unfinished QoS 2 messages (steadfast's default window) without closing the connection")
    };
    (check(Some(true), detail), None)
}

/// Adds a finished check to the report (and to the debug log).
fn push_check(report: &mut Report, c: Check) {
    tracing::debug!(check = c.key, ok = ?c.ok, detail = %c.detail, "doctor: check done");
    report.checks.push(c);
}

/// A probe's PUBLISH the broker refused: what it was to check stays
/// unknown, and the refusal is named (an ACL is the usual cause).
fn refused_probe(key: &'static str, what: &str, topic: &str, code: u8) -> Check {
    let reason = reason::describe(code);
    let detail = format!("the broker refused the probe's {what} to {topic} (reason code {reason}): not checked; if it is an ACL, allow steadfast/doctor/# for this client");
    Check { key, ok: None, detail }
}

struct Doc {
    cfg: ClientConfig,
    url: BrokerUrl,
    tag: String,
}

impl Doc {
    fn topic(&self, what: &str) -> String {
        format!("steadfast/doctor/{}/{what}", self.tag)
    }

    async fn open(&self, role: &str, clean: bool) -> Result<Probe, ConnectError> {
        let mut cfg = self.cfg.clone();
        cfg.client_id = format!("steadfast-doctor-{}-{role}", self.tag);
        Probe::open(&cfg, &self.url, clean).await
    }

    async fn version_check(&self, v: ProtocolVersion) -> Result<ConnAck, ConnectError> {
        let d = Doc { cfg: self.cfg.clone().version(v), url: self.url.clone(), tag: self.tag.clone() };
        let p = d.open("version", true).await?;
        let ack = p.ack;
        p.close().await;
        Ok(ack)
    }

    /// `$SYS/broker/version`, which Mosquitto keeps as a retained message.
    async fn software(&self) -> Option<String> {
        let mut p = self.open("sys", true).await.ok()?;
        p.link.subscribe(1, &[("$SYS/broker/version".to_owned(), Qos::AtMostOnce)], false).ok()?;
        let found = p
            .wait(Duration::from_millis(1500), |i| match i {
                Incoming::Publish(m) if m.topic == "$SYS/broker/version" => {
                    Some(String::from_utf8_lossy(&m.payload).into_owned())
                }
                _ => None,
            })
            .await
            .ok()
            .flatten();
        p.close().await;
        found
    }

    async fn qos2(&self) -> Check {
        let run = async {
            let topic = self.topic("qos2");
            let mut sub = self.open("qos2-sub", true).await?;
            sub.link.subscribe(1, &[(topic.clone(), Qos::ExactlyOnce)], false)?;
            let granted = sub.suback().await?;
            let mut publ = self.open("qos2-pub", true).await?;
            publ.publish(&topic, b"qos2", Qos::ExactlyOnce, false, Some(1))?;
            let rec = publ
                .wait(STEP, |i| match i {
                    Incoming::Ack(Ack::PubRec { pid: 1, code } | Ack::PubAck { pid: 1, code })
                        if reason::is_refusal(*code) =>
                    {
                        Some(Err(*code))
                    }
                    Incoming::Ack(Ack::PubRec { pid: 1, .. }) => Some(Ok(true)),
                    Incoming::Ack(Ack::PubAck { pid: 1, .. }) => Some(Ok(false)),
                    _ => None,
                })
                .await?;
            match rec {
                Some(Err(code)) => return Ok(refused_probe("qos2", "QoS 2 PUBLISH", &topic, code)),
                Some(Ok(true)) => {}
                Some(Ok(false)) => {
                    return Ok(Check {
                        key: "qos2",
                        ok: Some(false),
                        detail: "a QoS 2 PUBLISH was answered with PUBACK: taken at QoS 1".into(),
                    })
                }
                None => {
                    return Ok(Check { key: "qos2", ok: Some(false), detail: "no PUBREC for a QoS 2 PUBLISH".into() })
                }
            }
            publ.link.pubrel(1)?;
            let comp = publ.wait(STEP, |i| matches!(i, Incoming::Ack(Ack::PubComp { pid: 1 })).then_some(())).await?;
            let got = sub.wait(STEP, |i| match i {
                Incoming::Publish(m) if m.topic == topic => Some(m.qos),
                _ => None,
            });
            let got = got.await?;
            // Let the receiving exchange finish (PUBREL -> PUBCOMP).
            let _ = sub.wait(STEP, |i| matches!(i, Incoming::PubRel { .. }).then_some(())).await;
            sub.close().await;
            publ.close().await;
            Ok::<_, ConnectError>(match (granted, comp, got) {
                (Some(2), Some(()), Some(Qos::ExactlyOnce)) => Check {
                    key: "qos2",
                    ok: Some(true),
                    detail: "granted, and delivered exactly once end to end".into(),
                },
                (g, c, q) => Check {
                    key: "qos2",
                    ok: Some(false),
                    detail: format!(
                        "subscription granted QoS {}, PUBCOMP {}, delivered as {}",
                        g.map_or("none (refused)".into(), |g| g.to_string()),
                        if c.is_some() { "received" } else { "missing" },
                        q.map_or("nothing".into(), |q| format!("QoS {}", q as u8))
                    ),
                },
            })
        };
        run.await.unwrap_or_else(|e| Check { key: "qos2", ok: Some(false), detail: format!("failed: {e}") })
    }

    async fn retained(&self) -> Check {
        let run = async {
            let topic = self.topic("retained");
            let mut publ = self.open("ret-pub", true).await?;
            publ.publish(&topic, b"retained", Qos::AtLeastOnce, true, Some(1))?;
            let code = publ.acked(1).await?;
            if let Some(code) = code.filter(|c| reason::is_refusal(*c)) {
                return Ok(refused_probe("retained", "retained PUBLISH", &topic, code));
            }
            let mut sub = self.open("ret-sub", true).await?;
            sub.link.subscribe(1, &[(topic.clone(), Qos::AtLeastOnce)], false)?;
            let got = sub
                .wait(STEP, |i| match i {
                    Incoming::Publish(m) if m.topic == topic => Some(m.retain),
                    _ => None,
                })
                .await?;
            // Clear it: an empty retained message removes it.
            publ.publish(&topic, b"", Qos::AtLeastOnce, true, Some(2))?;
            publ.acked(2).await?;
            sub.close().await;
            publ.close().await;
            Ok::<_, ConnectError>(match got {
                Some(true) => Check {
                    key: "retained",
                    ok: Some(true),
                    detail: "kept and handed to a later subscriber (then cleared)".into(),
                },
                Some(false) => {
                    Check { key: "retained", ok: Some(false), detail: "delivered, but without the retain flag".into() }
                }
                None => {
                    Check { key: "retained", ok: Some(false), detail: "a later subscriber did not receive it".into() }
                }
            })
        };
        run.await.unwrap_or_else(|e| Check { key: "retained", ok: Some(false), detail: format!("failed: {e}") })
    }

    /// A subscriber with a persistent session goes away; a message is
    /// published for it; it comes back (after a broker restart, with
    /// `restart`): is its session there, and the message? Without a
    /// restart, a first message goes out right after the subscriber's
    /// DISCONNECT and the checked one [`RACE_PAUSE`] later: a broker that
    /// loses only the first parks a session a moment after the
    /// disconnect (a finding of its own, `disconnect_race`).
    async fn session(&self, restart: Option<Restart>, within: Duration) -> Vec<Check> {
        let key = if restart.is_some() { "restart" } else { "session" };
        let role = if restart.is_some() { "restart-sub" } else { "session-sub" };
        let mut race = None;
        let run = async {
            let topic = self.topic(key);
            let sub = self.open(role, true).await?;
            sub.close().await;
            let mut sub = self.open(role, false).await?;
            sub.link.subscribe(1, &[(topic.clone(), Qos::AtLeastOnce)], false)?;
            sub.suback().await?;
            // Connected before the subscriber leaves, to publish right after.
            let mut publ = self.open(&format!("{key}-pub"), true).await?;
            let left = Instant::now();
            sub.close().await;
            if restart.is_none() {
                publ.publish(&topic, EARLY, Qos::AtLeastOnce, false, Some(2))?;
                // On the wire now, not with the checked message later.
                publ.flush().await?;
                race = Some(left.elapsed());
            }
            // The checked message: well after the disconnect.
            tokio::time::sleep(RACE_PAUSE).await;
            publ.publish(&topic, b"queued while away", Qos::AtLeastOnce, false, Some(1))?;
            let acked = publ.acked(1).await;
            // The first message's refusal too: Mosquitto may close the
            // link after it, before the checked one is answered.
            if let Some(code) = publ.refused {
                return Ok((refused_probe(key, "PUBLISH", &topic, code), false));
            }
            if acked?.is_none() {
                let detail = "the broker did not acknowledge the test message".into();
                return Ok((Check { key, ok: None, detail }, false));
            }
            if let Some(restart) = restart {
                // An idle connection tells when the broker went down.
                let mut watch = self.open(&format!("{key}-watch"), true).await?;
                restart.await.map_err(|e| ConnectError::Protocol(format!("the restart failed: {e}")))?;
                let deadline = Instant::now() + within;
                if !watch.closed_by(deadline).await {
                    let detail = format!("the broker did not go down within {within:?}: not restarted?");
                    return Ok((Check { key, ok: None, detail }, false));
                }
                publ = loop {
                    match self.open(&format!("{key}-pub"), true).await {
                        Ok(p) => break p,
                        Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                        Err(e) => return Err(e),
                    }
                };
            }
            publ.close().await;
            let mut sub = self.open(role, false).await?;
            let present = sub.ack.session_present;
            let mut early = false;
            let got = sub
                .wait(STEP, |i| match i {
                    Incoming::Publish(m) if m.topic == topic && m.payload == EARLY => {
                        early = true;
                        None
                    }
                    Incoming::Publish(m) if m.topic == topic => Some(()),
                    _ => None,
                })
                .await?;
            sub.close().await;
            // End the session: a clean start with expiry 0.
            let end = Doc { cfg: self.cfg.clone().session_expiry(Duration::ZERO), ..self.clone_doc() };
            if let Ok(p) = end.open(role, true).await {
                p.close().await;
            }
            let when = if key == "restart" { "a broker restart" } else { "a disconnect" };
            let check = match (present, got) {
                (true, Some(())) => Check {
                    key,
                    ok: Some(true),
                    detail: format!("session and the message queued for it survived {when}"),
                },
                (true, None) => Check {
                    key,
                    ok: Some(false),
                    detail: format!("the session survived {when}, the message queued for it did not"),
                },
                (false, _) => Check {
                    key,
                    ok: Some(false),
                    detail: format!("the session was gone after {when} (session present = 0): what was queued is lost"),
                },
            };
            Ok::<_, ConnectError>((check, early))
        };
        let (check, early) =
            run.await.unwrap_or_else(|e| (Check { key, ok: None, detail: format!("could not check: {e}") }, false));
        let mut out = vec![check];
        // The race is told only where the session held the later message.
        if let Some(after) = race.filter(|_| out[0].ok == Some(true)) {
            // Well under a millisecond on a local broker: said in µs then.
            let after = match after.as_micros() {
                us if us < 1000 => format!("{us} µs"),
                _ => format!("{:.1} ms", after.as_secs_f64() * 1000.0),
            };
            let later = format!("{} ms", RACE_PAUSE.as_millis());
            out.push(match early {
                true => Check {
                    key: "disconnect_race",
                    ok: Some(true),
                    detail: format!("a message published {after} after the subscriber's DISCONNECT was kept too"),
                },
                false => Check {
                    key: "disconnect_race",
                    ok: Some(false),
                    detail: format!("a message published {after} after the subscriber's DISCONNECT was lost; one published {later} later was kept: the broker parks a session a moment after the disconnect"),
                },
            });
        }
        out
    }

    fn clone_doc(&self) -> Doc {
        Doc { cfg: self.cfg.clone(), url: self.url.clone(), tag: self.tag.clone() }
    }
}

/// One raw MQTT connection, driven step by step; what the protocol asks
/// of a receiver (acks in arrival order, PUBCOMP, pings) is the receiving
/// engine's.
struct Probe {
    rd: ReadHalf,
    wr: WriteHalf,
    link: Link,
    ack: ConnAck,
    buf: Vec<u8>,
    queue: VecDeque<Incoming>,
    session: ReceiveSession,
    /// The reason code of the last PUBACK or PUBREC that refused one of
    /// this probe's messages.
    refused: Option<u8>,
}

impl Probe {
    async fn open(cfg: &ClientConfig, url: &BrokerUrl, clean: bool) -> Result<Probe, ConnectError> {
        tracing::debug!(broker = %url, version = ?cfg.version, clean, "doctor: connecting");
        let o = open_session(cfg, url, clean, cfg.version).await;
        tracing::debug!(broker = %url, result = ?o.as_ref().map(|o| &o.ack).map_err(|e| e.to_string()), "doctor: connected");
        let o = o?;
        let session = ReceiveSession::new(cfg.keep_alive, clock::instant());
        let queue = o.after.into();
        Ok(Probe { rd: o.rd, wr: o.wr, link: o.link, ack: o.ack, buf: o.buf, queue, session, refused: None })
    }

    fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: Qos,
        retain: bool,
        pid: Option<u16>,
    ) -> Result<(), ConnectError> {
        let m = loose_message(0, topic, payload, qos, retain);
        self.link.publish(&m, "", pid, false)
    }

    async fn flush(&mut self) -> Result<(), ConnectError> {
        if let Some(bytes) = self.session.poll_transmit(clock::instant(), &mut LinkAcks(&mut self.link)) {
            self.link.out.extend_from_slice(&bytes);
        }
        if !self.link.out.is_empty() {
            send(&mut self.wr, &self.link.out).await?;
            self.link.out.clear();
        }
        Ok(())
    }

    /// The first packet `pick` takes within `limit` (`None`: none came),
    /// answering what the protocol asks for on the way.
    async fn wait<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(&Incoming) -> Option<T>,
    ) -> Result<Option<T>, ConnectError> {
        let deadline = Instant::now() + limit;
        loop {
            self.flush().await?;
            let Some(i) = self.queue.pop_front() else {
                let n = match tokio::time::timeout_at(deadline, self.rd.read(&mut self.buf)).await {
                    Err(_) => return Ok(None),
                    Ok(Err(e)) => return Err(e.into()),
                    Ok(Ok(0)) => return Err(ConnectError::Closed(CloseReason::Eof)),
                    Ok(Ok(n)) => n,
                };
                let got = self.link.receive(&self.buf[..n]);
                self.queue.extend(got);
                continue;
            };
            match &i {
                Incoming::Broken(e) => return Err(e.clone()),
                // A probe handles what it receives at once.
                Incoming::Publish(m) => {
                    self.session.handle_publish(m.pid, m.qos);
                    if let Some(pid) = m.pid {
                        self.session.handle_handled(pid);
                    }
                }
                Incoming::PubRel { pid } => self.session.handle_pubrel(*pid, &mut LinkAcks(&mut self.link)),
                Incoming::Ack(Ack::PubAck { code, .. } | Ack::PubRec { code, .. }) if reason::is_refusal(*code) => {
                    self.refused = Some(*code);
                }
                _ => {}
            }
            if let Some(t) = pick(&i) {
                self.flush().await?;
                return Ok(Some(t));
            }
        }
    }

    /// The reason code of the PUBACK of `pid` (0 over MQTT 3.1.1; `None`:
    /// none came).
    async fn acked(&mut self, pid: u16) -> Result<Option<u8>, ConnectError> {
        self.wait(STEP, |i| match i {
            Incoming::Ack(Ack::PubAck { pid: p, code }) if *p == pid => Some(*code),
            _ => None,
        })
        .await
    }

    /// The QoS the SUBACK granted to the first filter.
    async fn suback(&mut self) -> Result<Option<u8>, ConnectError> {
        let granted = self
            .wait(STEP, |i| match i {
                Incoming::SubAck { granted } => Some(granted.first().copied().flatten()),
                _ => None,
            })
            .await?;
        granted.ok_or_else(|| ConnectError::Protocol("no SUBACK".into()))
    }

    /// True once the broker closed this connection, before `deadline`.
    /// Pings when it wrote nothing for half the keep-alive (the receiving
    /// engine's rule), so that the broker's keep-alive does not close it.
    async fn closed_by(&mut self, deadline: Instant) -> bool {
        loop {
            let wake = self.session.poll_timeout().map_or(deadline, Instant::from_std);
            let until = deadline.min(wake);
            match tokio::time::timeout_at(until, self.rd.read(&mut self.buf)).await {
                Err(_) if until >= deadline => return false,
                Err(_) => {
                    // Silence is what this waits for: it counts for nothing.
                    let now = clock::instant();
                    let _ = self.session.handle_timeout(now, false, &mut LinkAcks(&mut self.link));
                    if self.flush().await.is_err() {
                        return true;
                    }
                }
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => self.session.handle_received(clock::instant()),
            }
        }
    }

    async fn close(mut self) {
        self.link.disconnect();
        let _ = self.flush().await;
        let _ = self.wr.shutdown().await;
    }
}
