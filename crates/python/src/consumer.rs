//! `steadfast.Consumer` (persistent sessions, an inbox on disk, ack after
//! handling) and `steadfast.Delivery`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use steadfast::ConsumerConfig;
use tokio::sync::watch;

use crate::events::Events;
use crate::settings::{self, Connection, SetArgs, Tls};
use crate::{connect_error, open_error, run, seconds, wait, warn_repaired, ConfigError};

/// The consumer's settings: the constructor's and `register`'s arguments
/// (both take exactly these; named `Consumer` in Python's messages about
/// a wrong argument).
#[pyclass(module = "steadfast", name = "Consumer")]
struct Settings {
    cfg: ConsumerConfig,
    on_event: Option<Py<PyAny>>,
}

#[pymethods]
impl Settings {
    #[new]
    #[pyo3(signature = (client_id, brokers, inbox, topics, *, qos = 1, version = 5, username = None, password = None, keep_alive = None, tls = None, backoff = None, dedup = true, gap_timeout = None, retry_after = None, receipt_as = None, send_receipts = true, receipt_prefix = None, inbox_max_age = None, inbox_max_count = None, group = None, shared_inbox = None, claim_for = None, on_event = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        client_id: &str,
        brokers: Vec<String>,
        inbox: PathBuf,
        topics: Vec<String>,
        qos: u8,
        version: u16,
        username: Option<&str>,
        password: Option<&str>,
        keep_alive: Option<f64>,
        tls: Option<PyRef<'_, Tls>>,
        backoff: Option<&str>,
        dedup: bool,
        gap_timeout: Option<f64>,
        retry_after: Option<f64>,
        receipt_as: Option<String>,
        send_receipts: bool,
        receipt_prefix: Option<String>,
        inbox_max_age: Option<f64>,
        inbox_max_count: Option<u64>,
        group: Option<String>,
        shared_inbox: Option<String>,
        claim_for: Option<f64>,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        // A consumer takes what every broker of its set sends it.
        let set = SetArgs { brokers: &brokers, mode: "failover", ack: None, failback_after: None, catch_up_for: None };
        let c = Connection {
            client_id,
            set,
            dir: inbox,
            version,
            username,
            password,
            keep_alive,
            tls: tls.as_deref(),
            backoff,
        };
        let mut client = c.config()?;
        if let Some(p) = receipt_prefix {
            client = client.receipt_prefix(p);
        }
        let q = settings::qos(qos)?;
        let mut cfg = ConsumerConfig::new(client).inbox(dedup).send_receipts(send_receipts);
        for t in topics {
            cfg = cfg.topic(t, q);
        }
        if let Some(s) = gap_timeout {
            cfg = cfg.gap_timeout(seconds("gap_timeout", s, 0.0)?);
        }
        if let Some(s) = retry_after {
            cfg = cfg.retry_after(seconds("retry_after", s, 0.0)?);
        }
        if let Some(n) = receipt_as {
            cfg = cfg.receipt_as(n);
        }
        if inbox_max_age.is_some() || inbox_max_count.is_some() {
            let age = match inbox_max_age {
                Some(a) => seconds("inbox_max_age", a, 0.0)?,
                None => Duration::from_secs(7 * 24 * 3600),
            };
            cfg = cfg.inbox_window(age, inbox_max_count.unwrap_or(1_000_000));
        }
        if let Some(g) = group {
            cfg = cfg.group(g);
        }
        if let Some(url) = shared_inbox {
            cfg = cfg.shared_inbox(url);
        }
        if let Some(s) = claim_for {
            cfg = cfg.claim_for(seconds("claim_for", s, 0.0)?);
        }
        cfg.check().map_err(|e| ConfigError::new_err(e.to_string()))?;
        Ok(Settings { cfg, on_event })
    }
}

/// The settings from a call's arguments (`Settings`' constructor checks
/// them).
fn settings(py: Python<'_>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Settings> {
    let s = py.get_type::<Settings>().call(args, kwargs).map_err(|e| settings::as_call(py, e))?;
    let s = s.cast::<Settings>()?.borrow();
    Ok(Settings { cfg: s.cfg.clone(), on_event: s.on_event.as_ref().map(|c| c.clone_ref(py)) })
}

/// A reliable MQTT consumer: its inbox on disk removes copies, and a
/// message is acknowledged to the broker only after `ack()`.
#[pyclass(module = "steadfast")]
pub(crate) struct Consumer {
    inner: Mutex<Option<Arc<steadfast::Consumer>>>,
    /// True once closed (ends the event iterators).
    closed: watch::Sender<bool>,
}

impl Consumer {
    fn consumer(&self) -> Option<Arc<steadfast::Consumer>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[pymethods]
impl Consumer {
    /// Opens the inbox and connects in the background. The arguments are
    /// documented in the type hints and docs/python.md.
    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(py: Python<'_>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let s = settings(py, args, kwargs)?;
        let (consumer, report) = run(py, steadfast::Consumer::open(s.cfg))?.map_err(open_error)?;
        warn_repaired(py, "inbox", &report)?;
        let (closed, _) = watch::channel(false);
        if let Some(cb) = s.on_event {
            Events::pump(py, Events::new(consumer.events(), closed.subscribe()), cb)?;
        }
        Ok(Consumer { inner: Mutex::new(Some(Arc::new(consumer))), closed })
    }

    /// Creates the session and its subscriptions on every broker, then
    /// disconnects: what is published from now on waits in the brokers
    /// for the consumer's first run. Same arguments as the constructor.
    #[staticmethod]
    #[pyo3(signature = (*args, **kwargs))]
    fn register(py: Python<'_>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
        let cfg = settings(py, args, kwargs)?.cfg;
        run(py, async move { steadfast::Consumer::register(&cfg).await })?.map_err(connect_error)
    }

    /// The next delivery; None when `timeout` seconds pass first or the
    /// consumer is closed.
    #[pyo3(signature = (timeout = None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Delivery>> {
        let Some(c) = self.consumer() else { return Ok(None) };
        Ok(wait(py, async move { c.next().await }, timeout)?.flatten().map(Delivery::from))
    }

    /// Connection events and suspected losses from now on (the first
    /// call: since the consumer opened): iterate, or `next(timeout)`.
    fn events(&self) -> PyResult<Events> {
        let c = self.consumer().ok_or_else(|| crate::ClosedError::new_err("the consumer is closed"))?;
        Ok(Events::new(c.events(), self.closed.subscribe()))
    }

    /// Deliveries acknowledged by this process so far.
    #[getter]
    fn handled(&self) -> u64 {
        self.consumer().map_or(0, |c| c.handled())
    }

    /// True once closed.
    #[getter]
    fn closed(&self) -> bool {
        self.consumer().is_none()
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Delivery>> {
        self.next(py, None)
    }

    /// Finishes the acknowledgements under way and closes the inbox.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.closed.send_replace(true);
        let Some(mut c) = c else { return Ok(()) };
        // A `next()` that timed out or was interrupted lets go of its
        // reference a moment later, on the runtime (deliveries hold none).
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match Arc::try_unwrap(c) {
                Ok(c) => return run(py, c.close()),
                Err(again) if Instant::now() < deadline => {
                    c = again;
                    py.detach(|| std::thread::sleep(Duration::from_millis(10)));
                }
                // Still in use: dropped without the final flush (what was
                // acknowledged and not yet written comes again).
                Err(_) => return Ok(()),
            }
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

/// A message handed to the application: `ack()` once handled; dropped
/// without it (or `nack()`), it comes again.
#[pyclass(module = "steadfast")]
pub(crate) struct Delivery {
    #[pyo3(get)]
    topic: String,
    payload: Vec<u8>,
    #[pyo3(get)]
    qos: u8,
    #[pyo3(get)]
    retain: bool,
    #[pyo3(get)]
    redelivered: bool,
    #[pyo3(get)]
    broker: String,
    identity: Option<(String, u64)>,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
    received: Mutex<Option<steadfast::Received>>,
}

impl From<steadfast::Received> for Delivery {
    fn from(d: steadfast::Received) -> Self {
        let p = d.properties();
        Delivery {
            topic: d.topic().to_owned(),
            payload: d.payload().to_vec(),
            qos: d.qos() as u8,
            retain: d.retain(),
            redelivered: d.redelivered(),
            broker: d.broker().to_owned(),
            identity: d.identity().map(|i| (i.producer.clone(), i.seq)),
            user_properties: p.user.clone(),
            content_type: p.content_type.clone(),
            received: Mutex::new(Some(d)),
        }
    }
}

#[pymethods]
impl Delivery {
    /// The payload (bytes).
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.payload)
    }

    /// (producer id, sequence number) when steadfast published it.
    #[getter]
    fn identity(&self) -> Option<(String, u64)> {
        self.identity.clone()
    }

    /// MQTT 5 properties: `content_type` and `user` (a list of pairs).
    #[getter]
    fn properties<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("content_type", &self.content_type)?;
        d.set_item("user", self.user_properties.clone())?;
        Ok(d)
    }

    /// Handled: the broker gets its acknowledgement, its identity is
    /// recorded in the inbox (the producer's receipt, if it asked for one,
    /// follows the record). Returns at once.
    fn ack(&self) {
        if let Some(d) = self.received.lock().unwrap_or_else(|e| e.into_inner()).take() {
            d.ack();
        }
    }

    /// Not handled: it comes again after a pause.
    fn nack(&self) {
        if let Some(d) = self.received.lock().unwrap_or_else(|e| e.into_inner()).take() {
            d.retry();
        }
    }

    fn __repr__(&self) -> String {
        format!("Delivery(topic={:?}, {} bytes, identity={:?})", self.topic, self.payload.len(), self.identity)
    }
}

/// The consumer groups whose shared inbox is the PostgreSQL database at
/// `url` (or only `group`): for each, its members (last seen, handled,
/// duplicates removed), the identities it remembers and the claims open.
/// Read only.
#[pyfunction]
#[pyo3(signature = (url, group = None))]
pub(crate) fn group_status<'py>(py: Python<'py>, url: &str, group: Option<&str>) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let url = url.to_owned();
    let group = group.map(str::to_owned);
    let groups =
        run(py, async move { steadfast::group_status(&url, group.as_deref()).await })?.map_err(|e| match e {
            steadfast::GroupStatusError::Config(e) => ConfigError::new_err(e.to_string()),
            e @ steadfast::GroupStatusError::Postgres { .. } => crate::ConnectError::new_err(e.to_string()),
            e => crate::SteadfastError::new_err(e.to_string()),
        })?;
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let d = PyDict::new(py);
        d.set_item("group", &g.group)?;
        d.set_item("handled", g.handled())?;
        d.set_item("duplicates", g.duplicates())?;
        d.set_item("remembered", g.remembered)?;
        d.set_item("claims", g.claims)?;
        let members = g
            .members
            .iter()
            .map(|m| {
                let md = PyDict::new(py);
                md.set_item("member", &m.member)?;
                md.set_item("last_seen", m.last_seen.as_secs_f64())?;
                md.set_item("handled", m.handled)?;
                md.set_item("duplicates", m.duplicates)?;
                Ok(md)
            })
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("members", members)?;
        out.push(d);
    }
    Ok(out)
}
