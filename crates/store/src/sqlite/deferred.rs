//! Inserts written together: inside a transaction, a plain message's row
//! (content and properties only, see [`is_plain`]) waits in memory and goes
//! to SQLite with the ones after it in one multi-row `INSERT`, before
//! the first statement that could see it and at the latest before the
//! commit.
//!
//! Why: SQLite's fixed cost of a statement (a step that opens seven
//! cursors, the outbox and its six partial indexes, and the halt that
//! closes them) is about half of a one-row insert. One statement for 32
//! rows pays it once: 5,480 instructions a row instead of 10,280
//! (docs/performance.md, session 18).
//!
//! The gate is the connection itself: [`SqliteStore`] reaches it through
//! [`SqliteStore::conn`], which writes what waits first, and through
//! [`SqliteStore::conn_below`] and [`SqliteStore::conn_apart`] for the
//! statements that cannot see a waiting row (on older rows by key, or on
//! other tables: nothing in the format ties them to `outbox`, no trigger
//! and no foreign key).

use std::sync::{Arc, LazyLock};

use rusqlite::Connection;

use crate::NewMessage;

/// A row waiting for its statement: the id it was given, the message (the
/// tail shares it) and its encoded properties.
pub(super) struct Waiting {
    pub(super) id: u64,
    pub(super) msg: Arc<NewMessage>,
    pub(super) props: Option<Vec<u8>>,
}

/// The rows one statement writes, largest first: as many 32-row
/// statements as fit, then at most one of each smaller size (31 rows in
/// five statements). Six statements in the cache, not one per count.
const SIZES: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// The values of one row, in the order of [`INSERTS`]' columns.
const COLUMNS: usize = 8;

/// The multi-row `INSERT` for each of [`SIZES`]. The columns a plain
/// message leaves to their defaults are not named; `acks` has no default
/// (see `outbox_table!`) and is 0.
static INSERTS: LazyLock<[String; SIZES.len()]> = LazyLock::new(|| {
    SIZES.map(|n| {
        let mut sql =
            String::from("INSERT INTO outbox (id, topic, payload, qos, retain, props, created_ms, size, acks) VALUES ");
        for i in 0..n {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?,?,?,?,?,?,?,?,0)");
        }
        sql
    })
});

/// A message whose row needs only its content and properties: the other
/// columns' defaults are what the full statement would write (NULL,
/// priority 0, not keep-latest). Most messages are (a bridge's carry an
/// identity property, which is a property).
pub(super) fn is_plain(m: &NewMessage) -> bool {
    let p = &m.policy;
    m.route.is_none()
        && m.receipts.is_none()
        && p.expires_ms.is_none()
        && p.priority == 0
        && p.max_attempts.is_none()
        && !p.keep_latest
}

/// Writes `rows` (ids ascending), as few statements as [`SIZES`] allows.
pub(super) fn write(conn: &Connection, rows: &[Waiting]) -> rusqlite::Result<()> {
    let mut rest = rows;
    for (size, sql) in SIZES.iter().zip(INSERTS.iter()) {
        while rest.len() >= *size {
            let (now, later) = rest.split_at(*size);
            let mut stmt = conn.prepare_cached(sql)?;
            for (i, w) in now.iter().enumerate() {
                let at = i * COLUMNS;
                let m = &w.msg;
                stmt.raw_bind_parameter(at + 1, w.id)?;
                stmt.raw_bind_parameter(at + 2, &m.topic)?;
                stmt.raw_bind_parameter(at + 3, &m.payload)?;
                stmt.raw_bind_parameter(at + 4, m.qos as u8)?;
                stmt.raw_bind_parameter(at + 5, m.retain)?;
                stmt.raw_bind_parameter(at + 6, &w.props)?;
                stmt.raw_bind_parameter(at + 7, m.created_ms)?;
                stmt.raw_bind_parameter(at + 8, m.size())?;
            }
            let written = stmt.raw_execute()?;
            if written != *size {
                return Err(rusqlite::Error::StatementChangedRows(written));
            }
            rest = later;
        }
    }
    Ok(())
}
