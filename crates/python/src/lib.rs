//! steadfast for Python: the Rust library (its outbox, engine and
//! guarantees) behind a synchronous Python API. Every blocking call runs
//! on a runtime of the extension's own without the GIL, and wakes every
//! 100 ms to let Ctrl-C (a signal) interrupt it. docs/python.md has the
//! whole API.

mod client;
mod consumer;
mod events;
mod settings;

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

create_exception!(steadfast, SteadfastError, PyException, "Every error steadfast raises.");
create_exception!(steadfast, ConfigError, SteadfastError, "A setting is invalid: the message names it and the fix.");
create_exception!(steadfast, ConnectError, SteadfastError, "A broker could not be reached or spoke no MQTT.");
create_exception!(steadfast, RefusedError, ConnectError, "A broker refused the connection (credentials, client id).");
create_exception!(steadfast, StoreError, SteadfastError, "The outbox or inbox on disk cannot be used.");
create_exception!(steadfast, PublishError, SteadfastError, "A message was not accepted (nothing was stored).");
create_exception!(steadfast, ClosedError, SteadfastError, "The client or consumer is closed.");

/// The extension's runtime: two worker threads, whatever Python does.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("steadfast")
            .enable_all()
            .build()
            .expect("the steadfast runtime starts")
    })
}

/// How long a blocking call sleeps before it looks for a signal.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Runs `f` on the runtime without the GIL until it finishes, `timeout`
/// seconds pass (`None`), or a signal handler raises (Ctrl-C): then the
/// work is dropped and the exception goes to the caller.
fn wait<F>(py: Python<'_>, f: F, timeout: Option<f64>) -> PyResult<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let deadline = match timeout {
        Some(t) if !t.is_finite() || t < 0.0 => {
            return Err(PyValueError::new_err(format!("timeout {t} is not a number of seconds >= 0")))
        }
        Some(t) => Some(Instant::now() + Duration::from_secs_f64(t)),
        None => None,
    };
    let mut task = runtime().spawn(f);
    loop {
        let slice = deadline.map_or(SIGNAL_CHECK, |d| d.saturating_duration_since(Instant::now()).min(SIGNAL_CHECK));
        let done = py.detach(|| runtime().block_on(async { tokio::time::timeout(slice, &mut task).await }));
        match done {
            Ok(Ok(out)) => return Ok(Some(out)),
            Ok(Err(e)) => return Err(SteadfastError::new_err(format!("steadfast's task failed: {e}"))),
            Err(_) => {}
        }
        if let Err(e) = py.check_signals() {
            task.abort();
            return Err(e);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            task.abort();
            return Ok(None);
        }
    }
}

/// Like [`wait`] without a timeout.
fn run<F>(py: Python<'_>, f: F) -> PyResult<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Ok(wait(py, f, None)?.expect("no timeout"))
}

fn config_error(e: impl std::fmt::Display) -> PyErr {
    ConfigError::new_err(e.to_string())
}

fn open_error(e: steadfast::OpenError) -> PyErr {
    match e {
        steadfast::OpenError::Config(e) => config_error(e),
        steadfast::OpenError::Store(e) => StoreError::new_err(e.to_string()),
        e => SteadfastError::new_err(e.to_string()),
    }
}

fn connect_error(e: steadfast::ConnectError) -> PyErr {
    match e {
        e @ steadfast::ConnectError::Refused { .. } => RefusedError::new_err(e.to_string()),
        e => ConnectError::new_err(e.to_string()),
    }
}

fn publish_error(e: steadfast::PublishError) -> PyErr {
    match e {
        steadfast::PublishError::Closed => ClosedError::new_err("the client is closed"),
        e => PublishError::new_err(e.to_string()),
    }
}

/// Seconds given for the setting `name`, at least `min`.
fn seconds(name: &str, s: f64, min: f64) -> PyResult<Duration> {
    if !s.is_finite() || s < min || s <= 0.0 || s > 1e9 {
        let floor = if min > 0.0 { format!("at least {min}") } else { "above 0".to_owned() };
        return Err(ConfigError::new_err(format!("{name} {s} must be a number of seconds, {floor}")));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Bytes or text (sent as UTF-8).
fn payload(p: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = p.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(s) = p.cast::<PyString>() {
        return Ok(s.to_cow()?.as_bytes().to_vec());
    }
    Err(PyTypeError::new_err("payload must be bytes or str"))
}

/// A store that was damaged and repaired at open is a Python warning.
fn warn_repaired(py: Python<'_>, what: &str, report: &steadfast::OpenReport) -> PyResult<()> {
    if !report.is_clean() {
        let warnings = py.import("warnings")?;
        warnings.call_method1("warn", (format!("the {what} was damaged and repaired: {report:?}"),))?;
    }
    Ok(())
}

/// The extension module: `steadfast._steadfast`, re-exported by `steadfast`.
#[pymodule]
fn _steadfast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<client::Client>()?;
    m.add_class::<client::Receipt>()?;
    m.add_class::<consumer::Consumer>()?;
    m.add_class::<consumer::Delivery>()?;
    m.add_class::<events::Event>()?;
    m.add_class::<events::Events>()?;
    m.add_class::<settings::Tls>()?;
    m.add_class::<settings::Receipts>()?;
    m.add_class::<settings::Route>()?;
    m.add_function(wrap_pyfunction!(consumer::group_status, m)?)?;
    m.add("SteadfastError", py.get_type::<SteadfastError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ConnectError", py.get_type::<ConnectError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("PublishError", py.get_type::<PublishError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    Ok(())
}
