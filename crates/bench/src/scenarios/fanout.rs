//! `fanout`: one broker against a fanout set of two (`ack = all`), and
//! the same for bare rumqttc: what a client with no durable work reaches
//! in fanout on this machine, measured in the same run.

use steadfast::{AckQuorum, BrokerSet, Mode, ProtocolVersion};

use crate::clients::{bare_rumqttc_v5, steadfast_set, Carried};
use crate::measure::{broker, median_run, process_us, rate, url, us_text, versus, Cpu, RssPeak, Span, Took};
use crate::{Args, BenchError, Scenario};

pub(crate) async fn fanout(a: Args) -> Result<Scenario, BenchError> {
    let (b1, b2) = (broker(0).await?, broker(0).await?);
    let title = format!(
        "{} QoS 1 messages of {} bytes, one broker vs a fanout set of two (ack = all), in-flight window {} to each broker, {} runs, median",
        a.messages, a.payload, a.inflight, a.runs
    );
    let (mut one, mut two, mut rss_one, mut rss_two) = (vec![], vec![], 0, 0);
    let (mut cpu_one, mut cpu_two) = (vec![], vec![]);
    let (mut bare_one, mut bare_two, mut bare_cpu_one, mut bare_cpu_two) = (vec![], vec![], vec![], vec![]);
    for run in 0..a.runs {
        eprintln!("fanout: run {}/{}", run + 1, a.runs);
        let single = BrokerSet::new([url(b1.port())]);
        let peak = RssPeak::start();
        let took = steadfast_set(single, &a, &format!("one-{run}"), ProtocolVersion::V5, a.inflight).await?;
        one.push(rate(a.messages, took.elapsed));
        cpu_one.push(took.cpu);
        rss_one = rss_one.max(peak.stop());
        let pair = BrokerSet::new([url(b1.port()), url(b2.port())]).mode(Mode::Fanout).ack(AckQuorum::All);
        let peak = RssPeak::start();
        let took = steadfast_set(pair, &a, &format!("two-{run}"), ProtocolVersion::V5, a.inflight).await?;
        two.push(rate(a.messages, took.elapsed));
        cpu_two.push(took.cpu);
        rss_two = rss_two.max(peak.stop());
        let took = bare_fanout(&[b1.port()], &a, run).await?;
        bare_one.push(rate(a.messages, took.elapsed));
        bare_cpu_one.push(took.cpu);
        let took = bare_fanout(&[b1.port(), b2.port()], &a, run).await?;
        bare_two.push(rate(a.messages, took.elapsed));
        bare_cpu_two.push(took.cpu);
    }
    let ((one, cpu_one), (two, cpu_two)) = (median_run(&one, &cpu_one), median_run(&two, &cpu_two));
    let ((bare_one, bare_cpu_one), (bare_two, bare_cpu_two)) =
        (median_run(&bare_one, &bare_cpu_one), median_run(&bare_two, &bare_cpu_two));
    Ok(Scenario {
        name: "fanout",
        title,
        ratio_to: "steadfast to one broker, same run".into(),
        rows: versus(
            a.inflight,
            ("steadfast, durable, MQTT 5, one broker", one, Some(rss_one), cpu_one),
            ("steadfast, durable, fanout to two brokers, ack = all", two, Some(rss_two), cpu_two),
        ),
        latencies: vec![],
        notes: [
            vec![format!(
                "CPU us a message by broker, median runs: one broker {}; fanout, the first {} and the second {}",
                process_us(cpu_one, b1.pid()),
                process_us(cpu_two, b1.pid()),
                process_us(cpu_two, b2.pid()),
            )],
            bare_notes((bare_one, bare_cpu_one), (bare_two, bare_cpu_two), two),
        ]
        .concat(),
    })
}

/// `a.messages` through bare rumqttc (MQTT 5, no outbox), the same
/// messages to each broker of `ports` at once, one client each on a task
/// of its own: from before the first connect (as the publish scenario
/// times bare rumqttc; steadfast's runs start with their client open) to
/// the last broker's last PUBACK. A fanout without durable work: what
/// two brokers and two links cost this machine, none of it steadfast's.
async fn bare_fanout(ports: &[u16], a: &Args, run: usize) -> Result<Took, BenchError> {
    let span = Span::start(a.messages);
    let mut clients = tokio::task::JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let (a, id) = (a.clone(), format!("fanout-{run}-{}-{i}", ports.len()));
        clients.spawn(async move {
            bare_rumqttc_v5(port, &a, &id, a.inflight, |_| "bench/fanout".into(), Carried::Nothing).await
        });
    }
    // The first to fail ends the run: the others stop as the set is
    // dropped.
    while let Some(done) = clients.join_next().await {
        done??;
    }
    Ok(span.stop())
}

/// The lines under the table: bare rumqttc's own fanout ratio, the
/// ceiling a client without durable work reaches here, and steadfast's
/// fanout against it.
fn bare_notes(one: (f64, Option<Cpu>), two: (f64, Option<Cpu>), steadfast_two: f64) -> Vec<String> {
    let cpu = |c: Option<Cpu>| {
        c.map_or_else(String::new, |c| {
            format!(
                ", CPU {:.1} / own {} / child {} us a message, busy {:.0} %",
                c.machine_us,
                us_text(c.own_us),
                us_text(c.child_us),
                c.busy * 100.0
            )
        })
    };
    let cpu_max = two.1.map_or_else(String::new, |c| format!(" (CPU max {:.2})", c.max_ratio(one.0)));
    vec![
        format!("bare rumqttc 5, no outbox, one broker: {:.0} msg/s{}", one.0, cpu(one.1)),
        format!(
            "bare rumqttc 5, no outbox, the same messages to both brokers at once (a client each): {:.0} msg/s{}",
            two.0,
            cpu(two.1)
        ),
        format!(
            "fanout ratio of bare rumqttc, two brokers over one: {:.2}{cpu_max}: what a client with no durable work reaches in fanout on this machine",
            two.0 / one.0
        ),
        format!("steadfast's fanout over bare rumqttc's fanout: {:.2}", steadfast_two / two.0),
    ]
}
