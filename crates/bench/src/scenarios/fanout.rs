//! `fanout`: one broker against a fanout set of two (`ack = all`).

use steadfast::{AckQuorum, BrokerSet, Mode, ProtocolVersion};

use crate::clients::steadfast_set;
use crate::measure::{broker, median_run, rate, url, versus, RssPeak};
use crate::{Args, BenchError, Scenario};

pub(crate) async fn fanout(a: Args) -> Result<Scenario, BenchError> {
    let (b1, b2) = (broker(0).await?, broker(0).await?);
    let title = format!(
        "{} QoS 1 messages of {} bytes, one broker vs a fanout set of two (ack = all), in-flight window {} to each broker, {} runs, median",
        a.messages, a.payload, a.inflight, a.runs
    );
    let (mut one, mut two, mut rss_one, mut rss_two) = (vec![], vec![], 0, 0);
    let (mut cpu_one, mut cpu_two) = (vec![], vec![]);
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
    }
    let ((one, cpu_one), (two, cpu_two)) = (median_run(&one, &cpu_one), median_run(&two, &cpu_two));
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
        notes: vec![],
    })
}
