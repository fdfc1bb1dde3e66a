//! Events (connections, failovers, drops, suspected losses) for Python:
//! an iterator over a client's or consumer's events, and a callback run
//! on a daemon thread of Python's own (`on_event=`).

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use steadfast::Event as Ev;
use tokio::sync::{broadcast, watch, Mutex};

use crate::wait;

/// A value in an event's details.
#[derive(Clone)]
enum Value {
    Text(String),
    Count(u64),
    Seconds(f64),
    Flag(bool),
    Nothing,
}

impl<'py> IntoPyObject<'py> for &Value {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Value::Text(s) => s.into_pyobject(py)?.into_any(),
            Value::Count(n) => n.into_pyobject(py)?.into_any(),
            Value::Seconds(s) => s.into_pyobject(py)?.into_any(),
            Value::Flag(b) => b.into_pyobject(py)?.to_owned().into_any(),
            Value::Nothing => py.None().into_bound(py),
        })
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn maybe(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Nothing, text)
}

/// Something that happened: `kind`, the `broker` it concerns (if one),
/// and the rest in `detail`.
#[pyclass(module = "steadfast", frozen)]
pub(crate) struct Event {
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    broker: Option<String>,
    fields: Vec<(&'static str, Value)>,
}

impl Event {
    fn of(e: &Ev) -> Event {
        use Value::*;
        let (kind, broker, fields): (_, Option<&String>, _) = match e {
            Ev::Connected { broker, session_present, resent } => (
                "connected",
                Some(broker),
                vec![("session_present", Flag(*session_present)), ("resent", Count(*resent as u64))],
            ),
            Ev::ConnectFailed { broker, error, retry_in } => (
                "connect_failed",
                Some(broker),
                vec![("error", Text(error.to_string())), ("retry_in", Seconds(retry_in.as_secs_f64()))],
            ),
            Ev::Disconnected { broker, error, retry_in } => (
                "disconnected",
                Some(broker),
                vec![("error", Text(error.to_string())), ("retry_in", Seconds(retry_in.as_secs_f64()))],
            ),
            Ev::SessionLost { broker, republish } => {
                ("session_lost", Some(broker), vec![("republish", Count(*republish))])
            }
            Ev::Refused { broker, id, topic, reason } => {
                ("refused", Some(broker), vec![("id", Count(*id)), ("topic", text(topic)), ("reason", text(reason))])
            }
            Ev::Dropped(d) => (
                "dropped",
                None,
                vec![("id", Count(d.id)), ("topic", text(&d.topic)), ("reason", text(d.reason.as_str()))],
            ),
            Ev::Failover { route, from, to } => {
                ("failover", Some(from), vec![("route", maybe(route)), ("from", text(from)), ("to", maybe(to))])
            }
            Ev::Failback { route, from, to } => {
                ("failback", Some(to), vec![("route", maybe(route)), ("from", text(from)), ("to", text(to))])
            }
            Ev::SuspectedLoss { producer, first, last } => (
                "suspected_loss",
                None,
                vec![("producer", text(producer)), ("first", Count(*first)), ("last", Count(*last))],
            ),
            Ev::Republished { messages } => ("republished", None, vec![("messages", Count(*messages))]),
            other => ("other", None, vec![("text", Text(format!("{other:?}")))]),
        };
        Event { kind, broker: broker.cloned(), fields }
    }

    /// Events were missed: the reader fell this far behind.
    fn lagged(missed: u64) -> Event {
        Event { kind: "lagged", broker: None, fields: vec![("missed", Value::Count(missed))] }
    }
}

#[pymethods]
impl Event {
    /// The rest of the event: `error` and `retry_in` (seconds) of a
    /// failed or lost connection, `id`, `topic` and `reason` of a drop,
    /// `from` and `to` of a failover, `producer`, `first` and `last` of a
    /// suspected loss, and so on (docs/python.md lists them).
    #[getter]
    fn detail<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.fields {
            d.set_item(*k, v)?;
        }
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let broker = self.broker.as_ref().map_or("None".to_owned(), |b| format!("{b:?}"));
        Ok(format!("Event(kind={:?}, broker={broker}, detail={})", self.kind, self.detail(py)?.repr()?))
    }
}

/// The events from now on, in order: `next(timeout)` or iterate (the
/// iteration ends when the client or consumer is closed).
#[pyclass(module = "steadfast")]
pub(crate) struct Events {
    rx: Arc<Mutex<broadcast::Receiver<Ev>>>,
    /// True once the client or consumer is closed.
    closed: watch::Receiver<bool>,
}

impl Events {
    pub(crate) fn new(rx: broadcast::Receiver<Ev>, closed: watch::Receiver<bool>) -> Events {
        Events { rx: Arc::new(Mutex::new(rx)), closed }
    }

    /// Starts a daemon thread of Python's that calls `callback(event)` for
    /// each event until the client or consumer is closed.
    pub(crate) fn pump(py: Python<'_>, events: Events, callback: Py<PyAny>) -> PyResult<()> {
        let events = Py::new(py, events)?;
        let pump = py.import("steadfast")?.getattr("_pump_events")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("target", pump)?;
        kwargs.set_item("args", (events, callback))?;
        kwargs.set_item("daemon", true)?;
        kwargs.set_item("name", "steadfast-events")?;
        let thread = py.import("threading")?.getattr("Thread")?.call((), Some(&kwargs))?;
        thread.call_method0("start")?;
        Ok(())
    }
}

#[pymethods]
impl Events {
    /// The next event; None when `timeout` seconds pass first or once
    /// the client or consumer is closed.
    #[pyo3(signature = (timeout = None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Event>> {
        let (rx, mut closed) = (self.rx.clone(), self.closed.clone());
        let got = wait(
            py,
            async move {
                let mut rx = rx.lock().await;
                tokio::select! {
                    biased;
                    got = rx.recv() => match got {
                        Ok(e) => Some(Event::of(&e)),
                        Err(broadcast::error::RecvError::Lagged(n)) => Some(Event::lagged(n)),
                        Err(broadcast::error::RecvError::Closed) => None,
                    },
                    _ = closed.wait_for(|c| *c) => None,
                }
            },
            timeout,
        )?;
        Ok(got.flatten())
    }

    /// True once the client or consumer is closed.
    #[getter]
    fn closed(&self) -> bool {
        *self.closed.borrow() || self.closed.has_changed().is_err()
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Event>> {
        self.next(py, None)
    }
}
