//! `steadfast sub --sql 'INSERT ...'`: each message written into a table
//! of the user's, once in the whole consumer group. Per batch, one
//! transaction records the identities in the group's shared inbox and runs
//! the statement for those no member recorded before; it commits, then the
//! messages are acknowledged (docs/guarantees.md, "Consumer groups").
//!
//! Parameters: `$1` the payload (bound as bytea or text, as the statement
//! asks), `$2` the topic, `$3` the producer id, `$4` the sequence number
//! (NULL for a message without a steadfast identity).

use anyhow::anyhow;
use steadfast::tokio_postgres::types::{ToSql, Type};
use steadfast::tokio_postgres::{Client, Error, Statement};
use steadfast::Received;

use crate::Failure;

/// How `$1` takes the payload.
#[derive(Debug, Clone, Copy)]
enum PayloadAs {
    Bytes,
    Text,
}

/// The statement and its connection (opened on first use and again after
/// it broke).
pub(crate) struct SqlSink {
    url: String,
    statement: String,
    conn: Option<(Client, Statement, PayloadAs)>,
}

/// Why a batch was not written: it is tried again.
pub(crate) struct WriteError {
    pub(crate) message: String,
    /// The database (or the parameters' binding) refused a message's
    /// row, rather than the connection failing: written one at a time,
    /// the others may go.
    pub(crate) refused: bool,
}

impl WriteError {
    fn down(message: impl ToString) -> WriteError {
        WriteError { message: message.to_string(), refused: false }
    }
}

fn usage(msg: String) -> Failure {
    Failure::usage(anyhow!(msg))
}

/// What each parameter of `stmt` may be: the error names the fix.
fn check_params(stmt: &Statement) -> Result<PayloadAs, String> {
    let params = stmt.params();
    if params.len() > 4 {
        return Err(format!(
            "--sql: the statement has {} parameters; it may use $1 (the payload), $2 (the topic), $3 (the producer id) and $4 (the sequence number)",
            params.len()
        ));
    }
    let text = |n: usize, what: &str| -> Result<(), String> {
        match params.get(n) {
            Some(t) if !<String as ToSql>::accepts(t) => {
                Err(format!("--sql: ${} ({what}) is {t} here; it is text: cast it (${}::text)", n + 1, n + 1))
            }
            _ => Ok(()),
        }
    };
    text(1, "the topic")?;
    text(2, "the producer id")?;
    if let Some(t) = params.get(3) {
        if *t != Type::INT8 {
            return Err(format!("--sql: $4 (the sequence number) is {t} here; it is a bigint: cast it ($4::bigint)"));
        }
    }
    match params.first() {
        None => Ok(PayloadAs::Text),
        Some(t) if *t == Type::BYTEA => Ok(PayloadAs::Bytes),
        Some(t) if <String as ToSql>::accepts(t) => Ok(PayloadAs::Text),
        Some(t) => Err(format!(
            "--sql: $1 (the payload) is {t} here; it binds as text or bytea: cast it, for example $1::text::{t}"
        )),
    }
}

impl SqlSink {
    /// The statement for the database at `url` (the group's shared inbox).
    pub(crate) fn new(url: &str, statement: &str) -> Result<SqlSink, Failure> {
        if statement.trim().is_empty() {
            return Err(usage(
                "--sql: the statement is empty; give one such as 'INSERT INTO readings (body) VALUES ($1)'".into(),
            ));
        }
        Ok(SqlSink { url: url.to_owned(), statement: statement.to_owned(), conn: None })
    }

    /// Prepares the statement now, so that a mistake in it ends the run
    /// before anything is received. A database that cannot be reached yet
    /// is not an error: the sink connects when it can.
    pub(crate) async fn check(&mut self) -> Result<(), Failure> {
        match self.ready().await {
            Ok(_) => Ok(()),
            Err(Prepare::Statement(e)) => Err(usage(e)),
            Err(Prepare::Connection(e)) => {
                tracing::warn!(error = %e, "--sql: the database cannot be reached yet; messages wait in the brokers until it can");
                Ok(())
            }
        }
    }

    async fn ready(&mut self) -> Result<(&mut Client, Statement, PayloadAs), Prepare> {
        if self.conn.as_ref().is_some_and(|(c, ..)| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            // The shared inbox's own way in (TLS included); its URL was
            // checked with the consumer's configuration.
            let client =
                steadfast::connect_postgres(&self.url).await.map_err(|e| Prepare::Connection(e.to_string()))?;
            // A batch waits at most this long on a row another member's
            // open transaction holds: then it is tried again, and said.
            client.batch_execute("SET lock_timeout = '10s'").await.map_err(|e| Prepare::Connection(e.to_string()))?;
            let stmt = client.prepare(&self.statement).await.map_err(|e| match e.as_db_error() {
                Some(db) => Prepare::Statement(format!("--sql: {}", db.message())),
                None => Prepare::Connection(e.to_string()),
            })?;
            let payload = check_params(&stmt).map_err(Prepare::Statement)?;
            self.conn = Some((client, stmt, payload));
        }
        let (client, stmt, payload) = self.conn.as_mut().expect("connected");
        Ok((client, stmt.clone(), *payload))
    }

    /// Records the batch in the shared inbox and runs the statement for
    /// each message no member recorded before, in one transaction.
    pub(crate) async fn write(&mut self, batch: &[Received]) -> Result<(), WriteError> {
        let (client, stmt, payload) = self.ready().await.map_err(WriteError::down)?;
        let failed = |e: Error| match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                // Data exceptions, integrity constraints, a statement that
                // does not fit the row, a trigger's exception: that row.
                // Others (deadlock, serialization, lock or statement
                // timeouts, the server shutting down) pass.
                let refused = ["22", "23", "42", "P0"].iter().any(|class| code.starts_with(class));
                WriteError { refused, message: format!("{} ({code})", db.message()) }
            }
            None => WriteError::down(e),
        };
        let tx = client.transaction().await.map_err(failed)?;
        let refs: Vec<&Received> = batch.iter().collect();
        let new = Received::record_all_in(&tx, &refs).await.map_err(WriteError::down)?;
        let mut rows = Vec::new();
        for (d, _) in batch.iter().zip(&new).filter(|(_, new)| **new) {
            rows.push(
                params(d, payload, stmt.params().len()).map_err(|message| WriteError { message, refused: true })?,
            );
        }
        // Sent together: one round trip for the batch, not one per message.
        let runs = rows.iter().map(|p| {
            let p: Vec<&(dyn ToSql + Sync)> = p.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect();
            let (tx, stmt) = (&tx, &stmt);
            async move { tx.execute(stmt, &p).await }
        });
        futures_util::future::try_join_all(runs).await.map_err(failed)?;
        tx.commit().await.map_err(failed)
    }
}

/// The parameters of one message, as many as the statement has.
fn params(d: &Received, payload: PayloadAs, n: usize) -> Result<Vec<Box<dyn ToSql + Sync + Send>>, String> {
    let body: Box<dyn ToSql + Sync + Send> = match payload {
        PayloadAs::Bytes => Box::new(d.payload().to_vec()),
        PayloadAs::Text => Box::new(String::from_utf8(d.payload().to_vec()).map_err(|_| {
            format!(
                "--sql: a payload on `{}` is not UTF-8 text, and $1 is text; make $1 bytea ($1::bytea) to store any bytes",
                d.topic()
            )
        })?),
    };
    let all: [Box<dyn ToSql + Sync + Send>; 4] = [
        body,
        Box::new(d.topic().to_owned()),
        Box::new(d.identity().map(|i| i.producer.clone())),
        Box::new(d.identity().map(|i| i.seq as i64)),
    ];
    Ok(all.into_iter().take(n).collect())
}

/// Why the statement is not ready.
enum Prepare {
    /// A mistake in it (the run ends).
    Statement(String),
    /// The database cannot be reached (tried again).
    Connection(String),
}

impl std::fmt::Display for Prepare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prepare::Statement(s) | Prepare::Connection(s) => f.write_str(s),
        }
    }
}
