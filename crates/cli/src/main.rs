//! The `steadfast` command: raw args -> validated options -> run().

#![forbid(unsafe_code)]

mod args;
mod bench;
mod bridge;
mod conn;
mod doctor;
mod hints;
mod lab;
mod logging;
mod metrics;
mod paths;
mod poison;
mod progress;
mod publish;
mod routes;
mod sql;
mod status;
mod subscribe;
mod values;

use std::process::ExitCode;

use clap::Parser;

/// Exit codes, as documented in the README.
pub mod exit {
    /// Everything done (all delivered, or all accepted with `--no-wait`).
    pub const OK: u8 = 0;
    /// Anything else that went wrong.
    pub const FAILURE: u8 = 1;
    /// Usage or configuration error.
    pub const USAGE: u8 = 2;
    /// `--wait-timeout` ran out with messages still queued on disk.
    pub const TIMED_OUT: u8 = 3;
    /// Interrupted (Ctrl-C) while waiting; messages still queued on disk.
    pub const INTERRUPTED: u8 = 130;
    /// Terminated (SIGTERM: cron, systemd, `timeout`) while waiting;
    /// messages still queued on disk.
    pub const TERMINATED: u8 = 143;
}

/// An error with the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// The error, in words.
    fn message(&self) -> String {
        self.error.to_string()
    }
    fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self { code: exit::USAGE, error: error.into() }
    }
    fn other(error: impl Into<anyhow::Error>) -> Self {
        Self { code: exit::FAILURE, error: error.into() }
    }
    fn interrupted(error: impl Into<anyhow::Error>) -> Self {
        Self { code: exit::INTERRUPTED, error: error.into() }
    }
    fn terminated(error: impl Into<anyhow::Error>) -> Self {
        Self { code: exit::TERMINATED, error: error.into() }
    }
    fn timed_out(error: impl Into<anyhow::Error>) -> Self {
        Self { code: exit::TIMED_OUT, error: error.into() }
    }
}

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    // The demo's table is its output: only errors interrupt it.
    let quiet = matches!(
        cli.command,
        args::Command::Demo(_) | args::Command::Chaos(_) | args::Command::Bench(_) | args::Command::Broker(_)
    );
    if let Err(e) = logging::init_logging(cli.debug, quiet, &cli.log_format) {
        eprintln!("steadfast: error: {e}");
        return ExitCode::from(exit::USAGE);
    }
    // The embedded broker runs its own threads and runtimes.
    if let args::Command::Broker(a) = cli.command {
        return finish(lab::run_broker(a));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("steadfast: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            args::Command::Pub(a) => publish::run(*a).await,
            args::Command::Sub(a) => subscribe::run(*a).await,
            args::Command::Status(a) => status::run(a).await,
            args::Command::Poison(a) => poison::run(a).await,
            args::Command::Bridge(a) => bridge::run(a).await,
            args::Command::Demo(a) => lab::run_demo(a).await,
            args::Command::Chaos(a) => lab::run_chaos(a).await,
            args::Command::Bench(a) => bench::run(a).await,
            args::Command::Doctor(a) => doctor::run(*a).await,
            args::Command::Broker(_) => unreachable!("run before the runtime starts"),
        }
    });
    finish(result)
}

/// The exit code for a result, printing the error and its causes.
fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            let shown = f.error.to_string();
            eprintln!("steadfast: error: {shown}");
            // A cause the message already quotes is not said twice.
            for cause in f.error.chain().skip(1).map(|c| c.to_string()).filter(|c| !shown.contains(c.as_str())) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(f.code)
        }
    }
}
