//! `failover`: the gap from a primary's failure (killed, black-holed)
//! to the backup's first acknowledgement.

use std::time::{Duration, Instant};

use steadfast::{BackoffConfig, BrokerSet, Client, ClientConfig, Message};

use crate::measure::{broker, state_dir, url};
use crate::{Args, BenchError, Row, Scenario};

/// Publishes at 1,000 msg/s to a failover pair whose primary (behind a
/// fault proxy) fails after a second; returns the time from the fault to
/// the first message the backup acknowledged. The ack timeout is the
/// default (adaptive) unless one is given.
pub(crate) async fn failover_gap(
    a: &Args,
    kill: bool,
    ack_timeout: Option<Duration>,
    run: usize,
) -> Result<Duration, BenchError> {
    use steadfast_lab::{FaultProxy, ProxyMode};
    let mut primary = broker(0).await?;
    let backup = broker(0).await?;
    let proxy = FaultProxy::start(primary.port()).await.map_err(BenchError::Proxy)?;
    let dir = state_dir(a)?;
    // A kill goes straight to the broker (the kernel closes its sockets);
    // a black hole needs the proxy.
    let first = if kill { url(primary.port()) } else { url(proxy.port()) };
    let set = BrokerSet::new([first.clone(), url(backup.port())]);
    let mut cfg = ClientConfig::new(format!("bench-failover-{run}"), first, dir.path())
        .brokers(set)
        .max_inflight(a.inflight)
        .keep_alive(Duration::from_secs(30))
        .backoff(BackoffConfig { min: Duration::from_millis(10), ..BackoffConfig::default() });
    if let Some(t) = ack_timeout {
        cfg = cfg.ack_timeout(t);
    }
    let (client, _) = Client::open(cfg).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut fault_at = None;
    let t0 = Instant::now();
    let within = Duration::from_secs(30);
    let deadline = t0 + within;
    loop {
        tick.tick().await;
        client.enqueue(Message::new("bench/failover", b"x".to_vec()))?;
        if fault_at.is_none() && t0.elapsed() >= Duration::from_secs(1) {
            if kill {
                primary.kill9();
            } else {
                proxy.set(ProxyMode::BlackHole);
            }
            fault_at = Some(Instant::now());
        }
        if let Some(at) = fault_at {
            if client.broker_status()[1].acked > 0 {
                let gap = at.elapsed();
                client.close().await;
                return Ok(gap);
            }
        }
        if Instant::now() > deadline {
            return Err(BenchError::NoFailover(within));
        }
    }
}

pub(crate) async fn failover(a: Args) -> Result<Scenario, BenchError> {
    let title = format!(
        "1,000 msg/s to a failover pair; the primary fails; the gap until the backup acknowledges a message; {} runs (value: median gap; p99 column: the longest)",
        a.runs
    );
    let mut rows = Vec::new();
    let fixed = Duration::from_secs(1);
    for (kill, ack_timeout, name, target) in [
        (true, None, "primary killed (kill -9)", Duration::from_millis(200)),
        (false, None, "primary black-holed, default settings (adaptive ack timeout)", Duration::from_secs(1)),
        (false, Some(fixed), "primary black-holed (fixed ack timeout 1 s)", fixed + Duration::from_millis(200)),
    ] {
        let mut gaps = Vec::new();
        for run in 0..a.runs {
            gaps.push(failover_gap(&a, kill, ack_timeout, run).await?);
        }
        gaps.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let median_gap = ms(gaps[gaps.len() / 2]);
        rows.push(Row {
            name: format!("{name} (target <= {} ms)", target.as_millis()),
            value: Some((median_gap, "ms")),
            p50_ms: Some(median_gap),
            p99_ms: Some(ms(gaps[gaps.len() - 1])),
            ratio: Some(median_gap / ms(target)),
            window: Some(a.inflight),
            ..Row::default()
        });
    }
    Ok(Scenario {
        name: "failover",
        title,
        ratio_to: "median gap over its target".into(),
        rows,
        latencies: vec![],
        notes: vec![],
    })
}
