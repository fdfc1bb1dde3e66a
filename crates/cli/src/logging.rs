//! Logging on stderr: human or JSON lines.

/// Logs to stderr: warnings by default, debug with `-d`, RUST_LOG wins.
/// `format`: `human` (default) or `json`, one object per line with the
/// time, level, message and fields. Payloads and credentials are never in
/// a log field (README, "Logs").
pub fn init_logging(debug: bool, quiet: bool, format: &str) -> Result<(), String> {
    let default = match (debug, quiet) {
        (true, _) => "debug",
        (false, true) => "error",
        (false, false) => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let base = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        "human" => drop(base.with_ansi(ansi).try_init()),
        "json" => drop(base.json().flatten_event(true).try_init()),
        o => return Err(format!("--log-format `{o}`: use human or json")),
    }
    Ok(())
}
