//! `group`: a queued backlog drained by a consumer group of three members
//! with the shared inbox on PostgreSQL, against one consumer with its
//! SQLite inbox, same broker, same run. On 2 cores the group cannot scale
//! out: the ratio is the cost of the shared inbox.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use steadfast::{ClientConfig, Consumer, ConsumerConfig, Qos, SharedInboxStats, StatementStats};
use steadfast_lab::Postgres;

use super::consume::{consume_once, queue};
use crate::measure::{broker, median, median_run, rate, state_dir, url, versus, Span, Took};
use crate::{Args, BenchError, Scenario};

/// Members of the group.
const MEMBERS: usize = 3;

/// Queues `a.messages` for the group `id` (its members registered
/// first), then times how long the members take to handle them all;
/// with the statements they sent to PostgreSQL.
async fn group_once(port: u16, pg: &str, a: &Args, id: &str) -> Result<(Took, SharedInboxStats), BenchError> {
    let dir = state_dir(a)?;
    let topic = format!("bench/group/{id}");
    let cfgs: Vec<ConsumerConfig> = (0..MEMBERS)
        .map(|i| {
            let client = ClientConfig::new(format!("{id}-m{i}"), url(port), dir.path().join(format!("m{i}")))
                .max_inflight(a.inflight);
            ConsumerConfig::new(client).topic(topic.clone(), Qos::AtLeastOnce).group(id).shared_inbox(pg)
        })
        .collect();
    for c in &cfgs {
        Consumer::register(c).await?;
    }
    queue(port, a, dir.path(), id, &topic).await?;

    let span = Span::start(a.messages);
    let mut members = Vec::new();
    for c in cfgs {
        members.push(Arc::new(Consumer::open(c).await?.0));
    }
    let handled = Arc::new(AtomicUsize::new(0));
    let n = a.messages;
    let runs: Vec<_> = members
        .iter()
        .map(|m| {
            let (m, handled) = (m.clone(), handled.clone());
            tokio::spawn(async move {
                while handled.load(Ordering::Relaxed) < n {
                    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(50), m.next()).await {
                        d.ack();
                        handled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let limit = crate::measure::limit_for(n);
    let all = async {
        for r in runs {
            let _ = r.await;
        }
    };
    tokio::time::timeout(limit, all)
        .await
        .map_err(|_| BenchError::TimedOut { what: "group: the members handling the backlog".into(), limit })?;
    let took = span.stop();
    let mut stats = SharedInboxStats::default();
    for m in &members {
        stats.add(&m.shared_inbox_stats().unwrap_or_default());
    }
    for m in members {
        if let Ok(m) = Arc::try_unwrap(m) {
            m.close().await;
        }
    }
    Ok((took, stats))
}

pub(crate) async fn group(a: Args) -> Result<Scenario, BenchError> {
    let broker = broker(0).await?;
    let pg = Postgres::start().await?;
    let title = format!(
        "{} QoS 1 messages of {} bytes queued, drained by a group of {MEMBERS} members with the shared inbox on PostgreSQL (its own server, loopback) and by one consumer with the SQLite inbox, receive maximum {}, {} runs, median",
        a.messages, a.payload, a.inflight, a.runs
    );
    let (mut alone, mut grouped, mut trips, mut stages) = (vec![], vec![], vec![], SharedInboxStats::default());
    let (mut cpu_alone, mut cpu_grouped) = (vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("group: run {}/{}", run + 1, a.runs);
        let took = consume_once(broker.port(), &a, &format!("alone-{run}"), true).await?;
        alone.push(rate(a.messages, took.elapsed));
        cpu_alone.push(took.cpu);
        let (took, s) = group_once(broker.port(), &pg.url(), &a, &format!("group{run}")).await?;
        grouped.push(rate(a.messages, took.elapsed));
        cpu_grouped.push(took.cpu);
        trips.push(s.round_trips as f64 * 1000.0 / a.messages as f64);
        stages.add(&s);
    }
    let trips = median(trips);
    let ((alone, cpu_alone), (grouped, cpu_grouped)) =
        (median_run(&alone, &cpu_alone), median_run(&grouped, &cpu_grouped));
    Ok(Scenario {
        name: "group",
        title,
        ratio_to: "one consumer with the SQLite inbox, same run".into(),
        rows: versus(
            a.inflight,
            ("one steadfast consumer, SQLite inbox", alone, None, cpu_alone),
            (&format!("a group of {MEMBERS} members, shared inbox on PostgreSQL"), grouped, None, cpu_grouped),
        ),
        latencies: vec![],
        notes: vec![
            format!(
                "PostgreSQL round trips per 1,000 messages: {trips:.1} (claims, records, upkeep; all members together)"
            ),
            stage("claims (before hand-over)", &stages.claims),
            stage(
                "records (after the application's ack; the broker's waits for them only beyond the acks allowed ahead)",
                &stages.records,
            ),
        ],
    })
}

/// One stage's line: statements, identities per statement, mean time,
/// over all runs and members.
fn stage(what: &str, s: &StatementStats) -> String {
    format!(
        "{what}: {} statements, {:.0} identities each, {:.2} ms each on average",
        s.statements,
        s.mean_identities(),
        s.mean_time().as_secs_f64() * 1000.0
    )
}
