//! `steadfast.Client` (a publisher with its outbox on disk) and
//! `steadfast.Receipt` (a message on disk, then delivered, then handled).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use steadfast::{Delivery as Delivered, Handling, Message, Properties, Qos};
use tokio::sync::watch;

use crate::events::Events;
use crate::settings::{self, Ack, Connection, PolicyArgs, ReceiptsArg, RouteArg, SetArgs, Tls};
use crate::{open_error, publish_error, run, runtime, wait, warn_repaired, ClosedError, StoreError};

/// A reliable MQTT publisher with an outbox on disk.
#[pyclass(module = "steadfast")]
pub(crate) struct Client {
    inner: Mutex<Option<steadfast::Client>>,
    qos: Qos,
    /// True once closed (ends the event iterators).
    closed: watch::Sender<bool>,
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
    #[pyo3(signature = (client_id, brokers, outbox, *, mode = "failover", version = 5, qos = 1, username = None, password = None, keep_alive = None, tls = None, backoff = None, ack = None, failback_after = None, catch_up_for = None, routes = None, delivery_class = None, ttl = None, priority = None, max_attempts = None, keep_latest = None, receipts = None, receipt_prefix = None, max_messages = None, max_bytes = None, max_age = None, overflow = None, on_event = None))]
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
        tls: Option<PyRef<'_, Tls>>,
        backoff: Option<&str>,
        ack: Option<Ack>,
        failback_after: Option<f64>,
        catch_up_for: Option<f64>,
        routes: Option<HashMap<String, RouteArg<'_>>>,
        delivery_class: Option<&str>,
        ttl: Option<f64>,
        priority: Option<u8>,
        max_attempts: Option<u32>,
        keep_latest: Option<bool>,
        receipts: Option<ReceiptsArg<'_>>,
        receipt_prefix: Option<String>,
        max_messages: Option<u64>,
        max_bytes: Option<u64>,
        max_age: Option<f64>,
        overflow: Option<&str>,
        on_event: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let set = SetArgs { brokers: &brokers, mode, ack, failback_after, catch_up_for };
        let c = Connection {
            client_id,
            set,
            dir: outbox,
            version,
            username,
            password,
            keep_alive,
            tls: tls.as_deref(),
            backoff,
        };
        let mut cfg = c.config()?;
        let mut routes: Vec<_> = routes.unwrap_or_default().into_iter().collect();
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, r) in routes {
            cfg = cfg.route(name, r.set()?);
        }
        if let Some(p) = PolicyArgs::new(delivery_class, ttl, priority, max_attempts, keep_latest)?.policy() {
            cfg = cfg.policy(p);
        }
        if let Some(rule) = receipts.as_ref().and_then(ReceiptsArg::rule) {
            cfg = cfg.receipts(rule);
        }
        if let Some(p) = receipt_prefix {
            cfg = cfg.receipt_prefix(p);
        }
        if let Some(o) = settings::outbox(max_messages, max_bytes, max_age, overflow)? {
            cfg = cfg.outbox(o);
        }
        cfg.check().map_err(crate::config_error)?;
        let qos = settings::qos(qos)?;
        let (client, report) = run(py, steadfast::Client::open(cfg))?.map_err(open_error)?;
        warn_repaired(py, "outbox", &report)?;
        let (closed, _) = watch::channel(false);
        if let Some(cb) = on_event {
            Events::pump(py, Events::new(client.events(), closed.subscribe()), cb)?;
        }
        Ok(Client { inner: Mutex::new(Some(client)), qos, closed })
    }

    /// Queues a message: returns once it is on disk (accepted), with a
    /// receipt that tells when it is delivered (and handled, when it asks
    /// for receipts). The keyword arguments are those of `Options`.
    #[pyo3(signature = (topic, payload, **options))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: String,
        payload: &Bound<'_, PyAny>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Receipt> {
        let m = self.options(py, options)?.message(self.qos, topic, crate::payload(payload)?);
        let client = self.client()?;
        let receipt = run(py, async move { client.publish(m).await })?.map_err(publish_error)?;
        Ok(Receipt::watch(receipt))
    }

    /// Queues many messages at once, `(topic, payload)` pairs with the same
    /// settings (those of `publish`): returns once all are on disk (they
    /// share the disk syncs), with a receipt each, in order. A message
    /// that is refused raises, and those before it in the list are
    /// accepted.
    #[pyo3(signature = (messages, **options))]
    fn publish_many(
        &self,
        py: Python<'_>,
        messages: Vec<(String, Bound<'_, PyAny>)>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<Receipt>> {
        let o = self.options(py, options)?;
        let msgs = messages
            .into_iter()
            .map(|(topic, p)| Ok(o.message(self.qos, topic, crate::payload(&p)?)))
            .collect::<PyResult<Vec<_>>>()?;
        let client = self.client()?;
        let receipts = run(py, async move { client.publish_many(msgs).await })?.map_err(publish_error)?;
        Ok(receipts.into_iter().map(Receipt::watch).collect())
    }

    /// Waits until the outbox is empty (everything delivered, handled when
    /// it asks for receipts, or dropped by its policy); False when
    /// `timeout` seconds passed first.
    #[pyo3(signature = (timeout = None))]
    fn wait_idle(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let client = self.client()?;
        Ok(wait(py, async move { client.wait_idle().await }, timeout)?.is_some())
    }

    /// The outbox and the brokers: a dict with `queued`, `bytes`,
    /// `oldest_age` (seconds or None), `drops` (reason -> count),
    /// `receipts` (awaiting, handled, republished) and `brokers` (a dict
    /// per broker: url, state, active, acked, connects, inflight,
    /// last_error).
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
        let r = PyDict::new(py);
        r.set_item("awaiting", s.receipts.awaiting)?;
        r.set_item("handled", s.receipts.handled)?;
        r.set_item("republished", s.receipts.republished)?;
        d.set_item("receipts", r)?;
        let brokers = PyList::empty(py);
        for b in &s.brokers {
            let x = PyDict::new(py);
            x.set_item("url", &b.url)?;
            x.set_item("state", b.state.as_str())?;
            x.set_item("active", b.active)?;
            x.set_item("acked", b.acked)?;
            x.set_item("connects", b.connects)?;
            x.set_item("inflight", b.inflight)?;
            x.set_item("last_error", &b.last_error)?;
            brokers.append(x)?;
        }
        d.set_item("brokers", brokers)?;
        Ok(d)
    }

    /// The messages moved aside as poison, oldest first: a list of dicts
    /// with `id`, `topic`, `bytes`, `qos`, `broker`, `at_ms`, and why:
    /// `refused` (the reason code of a refusal no retry changes, say
    /// `0x87, not authorized`, or None) and `failures` (the link closings
    /// in a row with it alone in flight). `steadfast poison` requeues or
    /// deletes them.
    fn poisoned<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let client = self.client()?;
        let list = run(py, async move { client.poisoned().await })?.map_err(|e| StoreError::new_err(e.to_string()))?;
        let out = PyList::empty(py);
        for p in &list {
            let x = PyDict::new(py);
            x.set_item("id", p.id)?;
            x.set_item("topic", &p.topic)?;
            x.set_item("bytes", p.size)?;
            x.set_item("qos", p.qos)?;
            x.set_item("broker", &p.broker)?;
            x.set_item("at_ms", p.at_ms)?;
            x.set_item("refused", p.cause.code().map(steadfast::reason::describe))?;
            x.set_item("failures", p.cause.failures())?;
            out.append(x)?;
        }
        Ok(out)
    }

    /// The events from now on (the first call: since the client opened):
    /// iterate, or `next(timeout)`.
    fn events(&self) -> PyResult<Events> {
        Ok(Events::new(self.client()?.events(), self.closed.subscribe()))
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
        self.closed.send_replace(true);
        Ok(())
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

impl Client {
    /// The settings of `publish` and `publish_many` from their keyword
    /// arguments (`Options`' constructor checks the names and types).
    fn options(&self, py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Options> {
        match kwargs {
            None => Ok(Options::default()),
            Some(kw) => {
                let o = py.get_type::<Options>().call((), Some(kw)).map_err(|e| settings::as_call(py, e))?;
                Ok(o.cast::<Options>()?.borrow().clone())
            }
        }
    }
}

/// The per-message settings of `publish` and `publish_many` (named so in
/// Python's messages about a wrong keyword argument).
#[pyclass(module = "steadfast", name = "publish")]
#[derive(Clone, Default)]
struct Options {
    qos: Option<Qos>,
    retain: bool,
    route: Option<String>,
    policy: PolicyArgs,
    receipts: Option<Option<steadfast::ReceiptRule>>,
    props: Properties,
}

#[pymethods]
impl Options {
    #[new]
    #[pyo3(signature = (*, qos = None, retain = false, route = None, delivery_class = None, ttl = None, priority = None, max_attempts = None, keep_latest = None, receipts = None, content_type = None, user_properties = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        qos: Option<u8>,
        retain: bool,
        route: Option<String>,
        delivery_class: Option<&str>,
        ttl: Option<f64>,
        priority: Option<u8>,
        max_attempts: Option<u32>,
        keep_latest: Option<bool>,
        receipts: Option<ReceiptsArg<'_>>,
        content_type: Option<String>,
        user_properties: Option<Vec<(String, String)>>,
    ) -> PyResult<Self> {
        Ok(Options {
            qos: qos.map(settings::qos).transpose()?,
            retain,
            route,
            policy: PolicyArgs::new(delivery_class, ttl, priority, max_attempts, keep_latest)?,
            receipts: receipts.map(|r| r.rule()),
            props: Properties { content_type, user: user_properties.unwrap_or_default(), ..Properties::default() },
        })
    }
}

impl Options {
    /// A message with these settings (QoS `qos` unless they give one).
    fn message(&self, qos: Qos, topic: String, payload: Vec<u8>) -> Message {
        let m = Message::new(topic, payload).qos(self.qos.unwrap_or(qos)).retain(self.retain);
        let mut m = self.policy.apply(m);
        if let Some(r) = &self.route {
            m = m.route(r.clone());
        }
        m = match &self.receipts {
            None => m,
            Some(Some(rule)) => m.receipts(rule.clone()),
            Some(None) => m.without_receipts(),
        };
        if !self.props.is_empty() {
            m = m.props(self.props.clone());
        }
        m
    }
}

/// Where a message's way ended, once it did.
#[derive(Clone, Debug, PartialEq)]
enum End {
    /// A broker (its quorum) acknowledged it.
    Delivered,
    /// Its consumers' receipts met its rule: these sent them.
    Handled(Vec<String>),
    /// Its policy dropped it, for this reason.
    Dropped(&'static str),
    /// The client closed first.
    Closed(String),
}

impl End {
    fn outcome(&self) -> String {
        match self {
            End::Delivered => "delivered".to_owned(),
            End::Handled(_) => "handled".to_owned(),
            End::Dropped(r) => format!("dropped: {r}"),
            End::Closed(e) => format!("unknown: {e}"),
        }
    }
}

/// Proof that a message is on disk; tells when it is delivered, and when
/// it is handled if it asks for receipts.
#[pyclass(module = "steadfast")]
pub(crate) struct Receipt {
    #[pyo3(get)]
    id: u64,
    #[pyo3(get)]
    producer: String,
    delivered: watch::Receiver<Option<End>>,
    handled: Option<watch::Receiver<Option<End>>>,
}

/// Follows `f` in the background into a watch, so that a wait can time
/// out and be called again.
fn follow<F: std::future::Future<Output = End> + Send + 'static>(f: F) -> watch::Receiver<Option<End>> {
    let (tx, rx) = watch::channel(None);
    runtime().spawn(async move {
        let _ = tx.send(Some(f.await));
    });
    rx
}

impl Receipt {
    fn watch(r: steadfast::Receipt) -> Receipt {
        let (id, producer) = (r.id(), r.identity.producer.clone());
        let (delivered, handled) = r.into_outcomes();
        let delivered = follow(async move {
            match delivered.await {
                Ok(Delivered::Delivered) => End::Delivered,
                Ok(Delivered::Dropped(reason)) => End::Dropped(reason.as_str()),
                Err(e) => End::Closed(e.to_string()),
            }
        });
        let handled = handled.map(|h| {
            follow(async move {
                match h.await {
                    Ok(Handling::Handled(names)) => End::Handled(names),
                    Ok(Handling::Dropped(reason)) => End::Dropped(reason.as_str()),
                    Err(e) => End::Closed(e.to_string()),
                }
            })
        });
        Receipt { id, producer, delivered, handled }
    }

    /// Waits for `rx` to end; `ok` says which ends count as done.
    fn wait_end(
        py: Python<'_>,
        rx: &watch::Receiver<Option<End>>,
        timeout: Option<f64>,
        ok: fn(&End) -> bool,
    ) -> PyResult<bool> {
        let mut rx = rx.clone();
        let out = wait(py, async move { rx.wait_for(|o| o.is_some()).await.map(|o| o.clone()) }, timeout)?;
        match out {
            None => Ok(false),
            Some(Ok(Some(End::Closed(e)))) => Err(ClosedError::new_err(e)),
            Some(Ok(Some(end))) => Ok(ok(&end)),
            Some(_) => Err(ClosedError::new_err("the client closed before the message left the outbox")),
        }
    }
}

#[pymethods]
impl Receipt {
    /// Waits until a broker (its quorum) acknowledged the message: True
    /// then; False when `timeout` seconds passed first or its policy
    /// dropped it (see `outcome`).
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        Self::wait_end(py, &self.delivered, timeout, |e| *e == End::Delivered)
    }

    /// Waits until the message was handled: its consumers' receipts met
    /// its rule (`handled_by` names them). True then; False when `timeout`
    /// seconds passed first or its policy dropped it. A message that asks
    /// for no receipt counts as handled once delivered.
    #[pyo3(signature = (timeout = None))]
    fn wait_handled(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        match &self.handled {
            Some(h) => Self::wait_end(py, h, timeout, |e| matches!(e, End::Handled(_))),
            None => self.wait(py, timeout),
        }
    }

    /// True when the message asks its consumers for receipts.
    #[getter]
    fn asks_receipts(&self) -> bool {
        self.handled.is_some()
    }

    /// `"delivered"`, `"dropped: REASON"`, or None while queued.
    #[getter]
    fn outcome(&self) -> Option<String> {
        self.delivered.borrow().as_ref().map(End::outcome)
    }

    /// Receipts: `"handled"`, `"dropped: REASON"`, or None while it waits
    /// (always None when it asks for no receipt).
    #[getter]
    fn handling(&self) -> Option<String> {
        self.handled.as_ref().and_then(|h| h.borrow().as_ref().map(End::outcome))
    }

    /// The consumers whose receipts completed it, once handled.
    #[getter]
    fn handled_by(&self) -> Option<Vec<String>> {
        match self.handled.as_ref()?.borrow().as_ref()? {
            End::Handled(names) => Some(names.clone()),
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        format!("Receipt(producer={:?}, id={})", self.producer, self.id)
    }
}
