//! What can stop a benchmark run, as a type: the CLI tells the options at
//! fault (exit 2) from a run that failed with [`BenchError::is_usage`], and
//! prints the causes.

use std::path::PathBuf;
use std::time::Duration;

use crate::disk::OutboxDirError;

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A scenario name that does not exist.
    #[error("unknown scenario `{name}`; use {} or all", crate::SCENARIOS.join(", "))]
    UnknownScenario {
        /// The name given.
        name: String,
    },
    /// The outbox directory is missing, unreadable, or memory-backed.
    #[error(transparent)]
    OutboxDir(#[from] OutboxDirError),
    /// A fresh state directory could not be made under the outbox directory.
    #[error("cannot create a directory in {}", dir.display())]
    StateDir {
        /// The outbox directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of the run could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A broker or a port of the lab.
    #[error(transparent)]
    Lab(#[from] steadfast_lab::LabError),
    /// The fault proxy in front of a broker did not start.
    #[error("cannot start the fault proxy")]
    Proxy(#[source] std::io::Error),
    /// A steadfast client or consumer could not open its store.
    #[error(transparent)]
    Open(#[from] steadfast::OpenError),
    /// A steadfast client refused a message.
    #[error(transparent)]
    Publish(#[from] steadfast::PublishError),
    /// The outbox did not take a message.
    #[error(transparent)]
    Append(#[from] steadfast::AppendError),
    /// A consumer could not register its sessions.
    #[error(transparent)]
    Connect(#[from] steadfast::ConnectError),
    /// A bare rumqttc baseline failed.
    #[error("{client} failed")]
    Rumqttc {
        /// Which baseline (`bare rumqttc 3.1.1`...).
        client: &'static str,
        /// rumqttc's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A program the run needs could not be run or fed.
    #[error("cannot run {program}")]
    Run {
        /// The program (`mosquitto_pub`, `steadfast bridge`...).
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{what} failed: {detail}")]
    Failed {
        /// What it was asked to do.
        what: String,
        /// Its exit status or what it printed.
        detail: String,
    },
    /// The `steadfast` binary the bridge scenario runs is not built.
    #[error("{} is missing: build it first with `cargo build --release -p steadfast-cli`", path.display())]
    NoSteadfastBinary {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A load loop or a wait that did not finish in time (a lost
    /// acknowledgement, a broker gone) instead of letting the bench hang.
    #[error("{what} not done within {limit:?}")]
    TimedOut {
        /// What was running, and with how many messages.
        what: String,
        /// The limit.
        limit: Duration,
    },
    /// In the failover scenario, the backup acknowledged nothing.
    #[error("the backup acknowledged nothing within {0:?}")]
    NoFailover(Duration),
    /// Something the run waited on ended before it was done (a consumer
    /// closed, a connection dropped, a subscriber exited).
    #[error("{0} ended before the run was done")]
    Ended(&'static str),
    /// A task of the run panicked or was cancelled.
    #[error("a task of the run did not finish")]
    Task(#[from] tokio::task::JoinError),
}

impl BenchError {
    /// True when the options given are at fault (a scenario that does not
    /// exist, an outbox directory that is missing or on tmpfs): the command
    /// line must change.
    pub fn is_usage(&self) -> bool {
        matches!(self, BenchError::UnknownScenario { .. } | BenchError::OutboxDir(_))
    }

    /// A bare rumqttc baseline's error.
    pub(crate) fn rumqttc<E>(client: &'static str) -> impl FnOnce(E) -> BenchError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        move |e| BenchError::Rumqttc { client, source: Box::new(e) }
    }

    /// A program that could not be run or fed.
    pub(crate) fn run(program: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let program = program.into();
        move |source| BenchError::Run { program, source }
    }
}
