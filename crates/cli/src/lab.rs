//! `steadfast demo`, `steadfast chaos` and the hidden `steadfast broker`:
//! arguments to the lab's options, its outcome to an exit code. The work
//! is the lab's (`steadfast_lab`).

use anyhow::anyhow;
use steadfast_lab::chaos::{self, ChaosOptions};
use steadfast_lab::demo::{self, DemoOptions};
use steadfast_lab::{BrokerKind, LabError};

use crate::args::{BrokerArgs, ChaosArgs, DemoArgs};
use crate::Failure;

impl From<LabError> for Failure {
    fn from(e: LabError) -> Failure {
        let usage = e.is_usage();
        let shown = match e {
            LabError::NoEmbeddedBroker => anyhow!("{e} (--brokers mosquitto)"),
            LabError::NoMosquitto => anyhow!("{e} (--brokers embedded)"),
            LabError::UnknownBrokers(kind) => anyhow!("--brokers {kind}: use `auto`, `embedded` or `mosquitto`"),
            e => anyhow::Error::new(e),
        };
        if usage {
            Failure::usage(shown)
        } else {
            Failure::other(shown)
        }
    }
}

/// `steadfast demo`: exit 1 when anything accepted was lost.
pub async fn run_demo(a: DemoArgs) -> Result<(), Failure> {
    let opts = DemoOptions { seconds: a.seconds, rate: a.rate, brokers: BrokerKind::parse(&a.brokers)? };
    let outcome = demo::run(opts).await?;
    if outcome.lost.is_empty() {
        Ok(())
    } else {
        let first: Vec<&String> = outcome.lost.iter().take(5).collect();
        Err(Failure::other(anyhow!("{} message(s) lost, first {first:?}", outcome.lost.len())))
    }
}

/// `steadfast chaos`: exit 1 when the verdict found a broken promise.
pub async fn run_chaos(a: ChaosArgs) -> Result<(), Failure> {
    let seconds = a.minutes.map_or(a.seconds, |m| m * 60);
    let opts = ChaosOptions {
        seed: a.seed,
        length: std::time::Duration::from_secs(seconds),
        rate: a.rate,
        brokers: BrokerKind::parse(&a.brokers)?,
        keep: a.keep,
    };
    let outcome = chaos::run(opts).await?;
    let seed = outcome.seed;
    if outcome.verdict.passed() {
        println!("PASSED (seed {seed})");
        Ok(())
    } else {
        Err(Failure::other(anyhow!("FAILED (seed {seed}): {}", outcome.verdict)))
    }
}

/// `steadfast broker` (hidden): the embedded broker, until killed.
pub fn run_broker(a: BrokerArgs) -> Result<(), Failure> {
    let mqtt5 = match a.version.as_str() {
        "311" | "mqttv311" | "4" => false,
        "5" | "mqttv5" => true,
        v => return Err(Failure::usage(anyhow!("--protocol-version {v}: use 311 or 5"))),
    };
    Ok(steadfast_lab::embedded::run(a.port, mqtt5)?)
}
