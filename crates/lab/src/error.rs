//! What can go wrong in the lab, as types: the CLI maps them to exit codes
//! (a usage error is 2) and prints them with their causes.

use std::path::PathBuf;

/// An error of the lab: a broker that will not start, a file that cannot be
/// written, options that make no sense.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A file or directory of the run.
    #[error("{}: {source}", path.display())]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A child process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process (a broker, the producer, the consumer).
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A broker that started but does not accept connections.
    #[error("the {kind} broker did not listen on 127.0.0.1:{port} within 10 s{}", log_tail(log))]
    NotListening {
        /// Embedded or Mosquitto.
        kind: &'static str,
        /// Its port.
        port: u16,
        /// The end of its log, if it wrote one.
        log: String,
    },
    /// A broker that exited before it listened.
    #[error("the {kind} broker exited ({status}) before listening on 127.0.0.1:{port}{}", log_tail(log))]
    Exited {
        /// Embedded or Mosquitto.
        kind: &'static str,
        /// Its port.
        port: u16,
        /// How it ended.
        status: std::process::ExitStatus,
        /// The end of its log, if it wrote one.
        log: String,
    },
    /// PostgreSQL is not installed.
    #[error("PostgreSQL is not installed (Debian's `postgresql` package; the README's test command installs it)")]
    NoPostgres,
    /// Running as root without a `postgres` user to run PostgreSQL as.
    #[error(
        "running as root, and there is no `postgres` user to run PostgreSQL as (Debian's postgresql package makes it)"
    )]
    NoPostgresUser,
    /// PostgreSQL did not start.
    #[error("{what} failed: {detail}")]
    Postgres {
        /// `initdb` or `postgres`.
        what: &'static str,
        /// Its words.
        detail: String,
    },
    /// No free loopback port.
    #[error("no free port on 127.0.0.1: {0}")]
    NoPort(#[source] std::io::Error),
    /// `--brokers embedded` in a build without them.
    #[error("this steadfast was built without the `embedded-broker` feature: use Mosquitto brokers (or scripts/demo, which builds it in)")]
    NoEmbeddedBroker,
    /// `--brokers mosquitto` where it is not installed.
    #[error("Mosquitto is not installed (Debian's `mosquitto` package): install it, or use the embedded brokers")]
    NoMosquitto,
    /// `--brokers auto` with neither built in nor installed.
    #[error("no brokers for the demo: this steadfast has none built in and Mosquitto is not installed; run scripts/demo (it builds them in), or install Debian's `mosquitto`")]
    NoBrokers,
    /// A broker kind that does not exist.
    #[error("no broker kind `{0}`: use `auto`, `embedded` or `mosquitto`")]
    UnknownBrokers(String),
    /// A run too short to mean anything, or no messages.
    #[error("{what} must last {min_seconds} s or more, and the rate be above 0")]
    TooShort {
        /// `the demo` or `the run`.
        what: &'static str,
        /// The shortest run.
        min_seconds: u64,
    },
    /// A child process that said no (its standard error in words).
    #[error("{what} failed: {stderr}")]
    Child {
        /// What it was asked to do.
        what: &'static str,
        /// What it printed.
        stderr: String,
    },
    /// The embedded broker itself.
    #[error("embedded broker on 127.0.0.1:{port}: {reason}")]
    Embedded {
        /// Its port.
        port: u16,
        /// rumqttd's error, in its words.
        reason: String,
    },
    /// An outbox or inbox of the run.
    #[error(transparent)]
    Store(#[from] steadfast_store::StoreError),
    /// The demo's producer could not open its outbox.
    #[error(transparent)]
    Open(#[from] steadfast::OpenError),
    /// The demo's producer refused a message.
    #[error(transparent)]
    Publish(#[from] steadfast::PublishError),
}

impl LabError {
    /// True when the options given are at fault (the CLI exits 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            LabError::NoEmbeddedBroker
                | LabError::NoMosquitto
                | LabError::UnknownBrokers(_)
                | LabError::TooShort { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LabError {
        let path = path.into();
        move |source| LabError::Io { path, source }
    }
}

fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; its log ends:\n{}", lines[lines.len().saturating_sub(10)..].join("\n"))
    }
}
