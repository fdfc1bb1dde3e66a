//! `steadfast bridge`: reads the configuration, runs the library's bridge
//! (`steadfast::bridge`), and does what a daemon does: SIGTERM/SIGINT stop
//! it cleanly, SIGHUP reloads the configuration, sd_notify tells systemd,
//! Prometheus metrics on request.

mod config;
mod notify;

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use steadfast::bridge::{Bridge, BridgeError, RunningBridge};
use steadfast::{Client, Consumer};
use tokio::signal::unix::{signal, SignalKind};

pub use config::load;

use crate::args::BridgeArgs;
use crate::Failure;

/// The destination clients of the running routes, for the metrics (the
/// list is replaced at each reload).
type Clients = Arc<std::sync::Mutex<Vec<Client>>>;

pub async fn run(a: BridgeArgs) -> Result<(), Failure> {
    let path = a.config.clone();
    let bridge = load(&path).map_err(|errs| config_failure(&errs))?;
    if a.check {
        println!("{}: {} route(s), ok", path.display(), bridge.routes.len());
        return Ok(());
    }
    if a.register {
        for r in &bridge.routes {
            Consumer::register(&r.source).await.map_err(|e| {
                let hint = crate::hints::route_key_hint(&e, "source");
                Failure::other(anyhow!("route `{}`: {e}{hint}", r.name))
            })?;
            eprintln!("steadfast: registered route `{}` on its source broker(s)", r.name);
        }
        return Ok(());
    }
    let watch =
        |kind: SignalKind, name: &str| signal(kind).map_err(|e| Failure::other(anyhow!("cannot watch {name}: {e}")));
    let (mut term, mut int, mut hup) = (
        watch(SignalKind::terminate(), "SIGTERM")?,
        watch(SignalKind::interrupt(), "SIGINT")?,
        watch(SignalKind::hangup(), "SIGHUP")?,
    );
    let notify = notify::Notifier::from_env();
    let metrics =
        a.metrics.as_deref().map(crate::metrics::parse_addr).transpose().map_err(|e| Failure::usage(anyhow!(e)))?;
    let listening = match metrics {
        Some(addr) => Some(crate::metrics::listen(addr).await?),
        None => None,
    };
    let clients: Clients = Arc::default();
    let mut running = start(bridge.clone(), &clients).await?;
    // Said at any log level: a daemon that prints nothing looks stuck.
    let names: Vec<&str> = bridge.routes.iter().map(|r| r.name.as_str()).collect();
    eprintln!(
        "steadfast: bridge running {} route(s) from {} ({}); SIGHUP reloads the configuration, SIGTERM stops; `steadfast status --bridge {}` shows each route",
        names.len(),
        path.display(),
        names.join(", "),
        path.display()
    );
    let mut current = bridge;
    if let Some(listening) = listening {
        let refresh = crate::metrics::refresh_with(clients.clone(), |clients| async move {
            let clients = clients.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for c in clients {
                let _ = c.export_metrics().await;
            }
        });
        listening.serve(refresh)?;
    }
    notify.ready();
    let watchdog = notify.watchdog_interval();
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let Some(next) = reload(&path) else { continue };
                notify.reloading();
                running.stop().await;
                running = match start(next.clone(), &clients).await {
                    Ok(r) => {
                        current = next;
                        r
                    }
                    Err(f) => {
                        tracing::error!(error = %f.message(), "SIGHUP: the new configuration cannot start; going back to the previous one");
                        start(current.clone(), &clients).await?
                    }
                };
                notify.ready();
            }
            _ = tick.tick(), if watchdog.is_some() => notify.watchdog(),
            e = running.failed() => {
                notify.stopping();
                running.stop().await;
                return Err(Failure::other(e));
            }
        }
    }
    notify.stopping();
    tracing::info!("stopping: finishing in-flight work; the outboxes stay on disk");
    running.stop().await;
    Ok(())
}

/// The configuration as it is now, if it is valid; an invalid one is
/// logged and the running one kept.
fn reload(path: &std::path::Path) -> Option<Bridge> {
    match load(path) {
        Ok(next) => {
            tracing::warn!(config = %path.display(), "SIGHUP: reloading the configuration");
            Some(next)
        }
        Err(errs) => {
            for e in &errs {
                tracing::error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the running one");
            }
            None
        }
    }
}

/// Starts the routes and lists their destination clients for the metrics.
async fn start(b: Bridge, clients: &Clients) -> Result<RunningBridge, Failure> {
    let running =
        b.start().await.map_err(|e: BridgeError| if e.is_config() { Failure::usage(e) } else { Failure::other(e) })?;
    *clients.lock().unwrap_or_else(|e| e.into_inner()) = running.clients().to_vec();
    for c in running.clients() {
        for (set, n) in c.held() {
            tracing::warn!(brokers = %set, queued = n, "messages accepted for an earlier destination stay queued for it; they are never sent to this one (steadfast status --bridge lists them)");
        }
    }
    Ok(running)
}

fn config_failure(errs: &[String]) -> Failure {
    for e in &errs[..errs.len().saturating_sub(1)] {
        eprintln!("steadfast: error: {e}");
    }
    Failure::usage(anyhow!("{}", errs.last().cloned().unwrap_or_default()))
}
