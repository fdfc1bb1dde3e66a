//! steadfast for Python: the Rust library (its outbox, engine and
//! guarantees) behind a synchronous Python API. Every blocking call runs
//! on a runtime of the extension's own without the GIL, and wakes every
//! 100 ms to let Ctrl-C (a signal) interrupt it. docs/python.md has the
//! whole API.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use steadfast::{
    BrokerSet, BrokerUrl, Class, ClientConfig, ConsumerConfig, Delivery as Delivered, Message, Mode, ProtocolVersion,
    Qos,
};
use tokio::sync::watch;

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

fn open_error(e: steadfast::OpenError) -> PyErr {
    match e {
        steadfast::OpenError::Config(e) => ConfigError::new_err(e.to_string()),
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

fn qos(q: u8) -> PyResult<Qos> {
    match q {
        0 => Ok(Qos::AtMostOnce),
        1 => Ok(Qos::AtLeastOnce),
        2 => Ok(Qos::ExactlyOnce),
        _ => Err(ConfigError::new_err(format!("qos {q} does not exist; use 0, 1 or 2"))),
    }
}

fn version(v: u16) -> PyResult<ProtocolVersion> {
    match v {
        5 => Ok(ProtocolVersion::V5),
        3 | 4 | 31 | 311 => Ok(ProtocolVersion::V311),
        _ => Err(ConfigError::new_err(format!("version {v} is not an MQTT version; use 5 or 311"))),
    }
}

/// The connection settings shared by `Client` and `Consumer`.
struct Connection<'a> {
    client_id: &'a str,
    brokers: &'a [String],
    dir: PathBuf,
    mode: &'a str,
    version: u16,
    username: Option<&'a str>,
    password: Option<&'a str>,
    keep_alive: Option<f64>,
}

impl Connection<'_> {
    fn config(&self) -> PyResult<ClientConfig> {
        if self.brokers.is_empty() {
            return Err(ConfigError::new_err("brokers is empty; give at least one, say [\"mqtt://127.0.0.1:1883\"]"));
        }
        let urls = self
            .brokers
            .iter()
            .map(|b| b.parse::<BrokerUrl>().map_err(|e| ConfigError::new_err(format!("broker `{b}`: {e}"))))
            .collect::<PyResult<Vec<_>>>()?;
        let mode: Mode = self.mode.parse().map_err(|_| {
            ConfigError::new_err(format!("mode `{}` is unknown; use failover, fanout or balance", self.mode))
        })?;
        let mut cfg = ClientConfig::new(self.client_id, urls[0].clone(), self.dir.clone())
            .brokers(BrokerSet::new(urls).mode(mode))
            .version(version(self.version)?);
        if let Some(u) = self.username {
            cfg = cfg.credentials(u, self.password.map(|p| p.as_bytes().to_vec()));
        }
        if let Some(k) = self.keep_alive {
            if !k.is_finite() || k < 1.0 {
                return Err(ConfigError::new_err(format!("keep_alive {k} must be at least 1 second")));
            }
            cfg = cfg.keep_alive(Duration::from_secs_f64(k));
        }
        Ok(cfg)
    }
}

/// A store that was damaged and repaired at open is a Python warning.
fn warn_repaired(py: Python<'_>, what: &str, report: &steadfast::OpenReport) -> PyResult<()> {
    if !report.is_clean() {
        let warnings = py.import("warnings")?;
        warnings.call_method1("warn", (format!("the {what} was damaged and repaired: {report:?}"),))?;
    }
    Ok(())
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

/// A reliable MQTT publisher with an outbox on disk.
#[pyclass(module = "steadfast")]
struct Client {
    inner: Mutex<Option<steadfast::Client>>,
    qos: Qos,
}

impl Client {
    fn client(&self) -> PyResult<steadfast::Client> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ClosedError::new_err("the client is closed"))
    }
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (client_id, brokers, outbox, *, mode = "failover", version = 5, qos = 1, username = None, password = None, keep_alive = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        client_id: &str,
        brokers: Vec<String>,
        outbox: PathBuf,
        mode: &str,
        version: u16,
        qos: u8,
        username: Option<&str>,
        password: Option<&str>,
        keep_alive: Option<f64>,
    ) -> PyResult<Self> {
        let c = Connection { client_id, brokers: &brokers, dir: outbox, mode, version, username, password, keep_alive };
        let cfg = c.config()?;
        let qos = self::qos(qos)?;
        let (client, report) = run(py, steadfast::Client::open(cfg))?.map_err(open_error)?;
        warn_repaired(py, "outbox", &report)?;
        Ok(Client { inner: Mutex::new(Some(client)), qos })
    }

    /// Queues a message: returns once it is on disk (accepted), with a
    /// receipt that tells when it is delivered.
    #[pyo3(signature = (topic, payload, *, qos = None, retain = false, ttl = None, priority = None, max_attempts = None, keep_latest = false))]
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        py: Python<'_>,
        topic: String,
        payload: &Bound<'_, PyAny>,
        qos: Option<u8>,
        retain: bool,
        ttl: Option<f64>,
        priority: Option<u8>,
        max_attempts: Option<u32>,
        keep_latest: bool,
    ) -> PyResult<Receipt> {
        let mut m = Message::new(topic, self::payload(payload)?)
            .qos(qos.map(self::qos).transpose()?.unwrap_or(self.qos))
            .retain(retain)
            .keep_latest(keep_latest);
        if let Some(t) = ttl {
            if !t.is_finite() || t <= 0.0 {
                return Err(ConfigError::new_err(format!("ttl {t} must be a positive number of seconds")));
            }
            m = m.class(Class::Deadline(Duration::from_secs_f64(t)));
        }
        if let Some(p) = priority {
            m = m.priority(p);
        }
        if let Some(n) = max_attempts {
            m = m.max_attempts(n);
        }
        let client = self.client()?;
        let receipt = run(py, async move { client.publish(m).await })?.map_err(publish_error)?;
        Ok(Receipt::watch(receipt))
    }

    /// Queues many messages at once, `(topic, payload)` pairs with the same
    /// settings: returns once all are on disk (they share the disk syncs),
    /// with a receipt each, in order. A message that is refused raises,
    /// and those before it in the list are accepted.
    #[pyo3(signature = (messages, *, qos = None, retain = false))]
    fn publish_many(
        &self,
        py: Python<'_>,
        messages: Vec<(String, Bound<'_, PyAny>)>,
        qos: Option<u8>,
        retain: bool,
    ) -> PyResult<Vec<Receipt>> {
        let q = qos.map(self::qos).transpose()?.unwrap_or(self.qos);
        let msgs = messages
            .into_iter()
            .map(|(topic, p)| Ok(Message::new(topic, payload(&p)?).qos(q).retain(retain)))
            .collect::<PyResult<Vec<_>>>()?;
        let client = self.client()?;
        let receipts = run(py, async move { client.publish_many(msgs).await })?.map_err(publish_error)?;
        Ok(receipts.into_iter().map(Receipt::watch).collect())
    }

    /// Waits until the outbox is empty (everything delivered or dropped by
    /// its policy); False when `timeout` seconds passed first.
    #[pyo3(signature = (timeout = None))]
    fn wait_idle(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let client = self.client()?;
        Ok(wait(py, async move { client.wait_idle().await }, timeout)?.is_some())
    }

    /// The outbox and the brokers: a dict with `queued`, `bytes`,
    /// `oldest_age` (seconds or None), `drops` (reason -> count) and
    /// `brokers` (a dict per broker: url, state, acked, connects, last_error).
    fn status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let client = self.client()?;
        let s = run(py, async move { client.status().await })?.map_err(|e| StoreError::new_err(e.to_string()))?;
        let d = PyDict::new(py);
        d.set_item("queued", s.queued)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("oldest_age", s.oldest_age.map(|a| a.as_secs_f64()))?;
        let drops = PyDict::new(py);
        for (reason, n) in &s.drops {
            drops.set_item(reason.as_str(), n)?;
        }
        d.set_item("drops", drops)?;
        let brokers = PyList::empty(py);
        for b in &s.brokers {
            let x = PyDict::new(py);
            x.set_item("url", &b.url)?;
            x.set_item("state", b.state.as_str())?;
            x.set_item("acked", b.acked)?;
            x.set_item("connects", b.connects)?;
            x.set_item("last_error", &b.last_error)?;
            brokers.append(x)?;
        }
        d.set_item("brokers", brokers)?;
        Ok(d)
    }

    /// The producer id in every message's identity.
    #[getter]
    fn producer_id(&self) -> PyResult<String> {
        Ok(self.client()?.producer_id().to_owned())
    }

    /// Stops sending and closes the outbox; what is queued stays on disk
    /// for the next run.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let client = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = client {
            run(py, c.close())?;
        }
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

/// Proof that a message is on disk; tells when it is delivered.
#[pyclass(module = "steadfast")]
struct Receipt {
    #[pyo3(get)]
    id: u64,
    #[pyo3(get)]
    producer: String,
    outcome: watch::Receiver<Option<Result<String, String>>>,
}

impl Receipt {
    /// Follows the delivery in the background, so that `wait` can be
    /// called again after a timeout.
    fn watch(r: steadfast::Receipt) -> Receipt {
        let (tx, outcome) = watch::channel(None);
        let (id, producer) = (r.id(), r.identity.producer.clone());
        runtime().spawn(async move {
            let out = match r.delivered().await {
                Ok(Delivered::Delivered) => Ok("delivered".to_owned()),
                Ok(Delivered::Dropped(reason)) => Ok(format!("dropped: {}", reason.as_str())),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(Some(out));
        });
        Receipt { id, producer, outcome }
    }
}

#[pymethods]
impl Receipt {
    /// Waits until the message left the outbox: True once a broker (its
    /// quorum) acknowledged it; False when `timeout` seconds passed first
    /// or its policy dropped it (see `outcome`).
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let mut rx = self.outcome.clone();
        let out = self::wait(py, async move { rx.wait_for(|o| o.is_some()).await.map(|o| o.clone()) }, timeout)?;
        match out {
            None => Ok(false),
            Some(Ok(Some(Ok(o)))) => Ok(o == "delivered"),
            Some(Ok(Some(Err(e)))) => Err(ClosedError::new_err(e)),
            Some(_) => Err(ClosedError::new_err("the client closed before the message left the outbox")),
        }
    }

    /// `"delivered"`, `"dropped: REASON"`, or None while queued.
    #[getter]
    fn outcome(&self) -> Option<String> {
        self.outcome.borrow().clone().map(|o| o.unwrap_or_else(|e| format!("unknown: {e}")))
    }

    fn __repr__(&self) -> String {
        format!("Receipt(producer={:?}, id={})", self.producer, self.id)
    }
}

/// A reliable MQTT consumer: its inbox on disk removes copies, and a
/// message is acknowledged to the broker only after `ack()`.
#[pyclass(module = "steadfast")]
struct Consumer {
    inner: Mutex<Option<Arc<steadfast::Consumer>>>,
}

/// The consumer's settings from the constructor's arguments.
#[allow(clippy::too_many_arguments)]
fn consumer_config(
    client_id: &str,
    brokers: &[String],
    inbox: PathBuf,
    topics: Vec<String>,
    qos: u8,
    version: u16,
    username: Option<&str>,
    password: Option<&str>,
    keep_alive: Option<f64>,
    dedup: bool,
) -> PyResult<ConsumerConfig> {
    let c = Connection { client_id, brokers, dir: inbox, mode: "failover", version, username, password, keep_alive };
    let q = self::qos(qos)?;
    let mut cfg = ConsumerConfig::new(c.config()?).inbox(dedup);
    for t in topics {
        cfg = cfg.topic(t, q);
    }
    cfg.check().map_err(|e| ConfigError::new_err(e.to_string()))?;
    Ok(cfg)
}

impl Consumer {
    fn consumer(&self) -> Option<Arc<steadfast::Consumer>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[pymethods]
impl Consumer {
    #[new]
    #[pyo3(signature = (client_id, brokers, inbox, topics, *, qos = 1, version = 5, username = None, password = None, keep_alive = None, dedup = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        client_id: &str,
        brokers: Vec<String>,
        inbox: PathBuf,
        topics: Vec<String>,
        qos: u8,
        version: u16,
        username: Option<&str>,
        password: Option<&str>,
        keep_alive: Option<f64>,
        dedup: bool,
    ) -> PyResult<Self> {
        let cfg =
            consumer_config(client_id, &brokers, inbox, topics, qos, version, username, password, keep_alive, dedup)?;
        let (consumer, report) = run(py, steadfast::Consumer::open(cfg))?.map_err(open_error)?;
        warn_repaired(py, "inbox", &report)?;
        Ok(Consumer { inner: Mutex::new(Some(Arc::new(consumer))) })
    }

    /// Creates the session and its subscriptions on every broker, then
    /// disconnects: what is published from now on waits in the brokers
    /// for the consumer's first run. Same arguments as the constructor.
    #[staticmethod]
    #[pyo3(signature = (client_id, brokers, inbox, topics, *, qos = 1, version = 5, username = None, password = None, keep_alive = None, dedup = true))]
    #[allow(clippy::too_many_arguments)]
    fn register(
        py: Python<'_>,
        client_id: &str,
        brokers: Vec<String>,
        inbox: PathBuf,
        topics: Vec<String>,
        qos: u8,
        version: u16,
        username: Option<&str>,
        password: Option<&str>,
        keep_alive: Option<f64>,
        dedup: bool,
    ) -> PyResult<()> {
        let cfg =
            consumer_config(client_id, &brokers, inbox, topics, qos, version, username, password, keep_alive, dedup)?;
        run(py, async move { steadfast::Consumer::register(&cfg).await })?.map_err(connect_error)
    }

    /// The next delivery; None when `timeout` seconds pass first or the
    /// consumer is closed.
    #[pyo3(signature = (timeout = None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Delivery>> {
        let Some(c) = self.consumer() else { return Ok(None) };
        Ok(wait(py, async move { c.next().await }, timeout)?.flatten().map(Delivery::from))
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
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}

/// A message handed to the application: `ack()` once handled; dropped
/// without it (or `nack()`), it comes again.
#[pyclass(module = "steadfast")]
struct Delivery {
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

    /// Handled: its identity is recorded in the inbox, then the broker
    /// gets its acknowledgement. Returns at once.
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

/// The extension module: `steadfast._steadfast`, re-exported by `steadfast`.
#[pymodule]
fn _steadfast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Client>()?;
    m.add_class::<Receipt>()?;
    m.add_class::<Consumer>()?;
    m.add_class::<Delivery>()?;
    m.add("SteadfastError", py.get_type::<SteadfastError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ConnectError", py.get_type::<ConnectError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("PublishError", py.get_type::<PublishError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    Ok(())
}
