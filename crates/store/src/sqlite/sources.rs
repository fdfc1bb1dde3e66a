//! A bridge's source records ([`SourceStore`]): which delivery of which
//! source broker each queued message came as. Keyed by an integer (the
//! broker's number in `source_brokers` above the packet id), found through
//! a map of the numbers in memory: a text key per message cost twice the
//! instructions of an integer one (docs/performance.md, session 12).

use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStore;
use crate::{SourceStore, StoreError};

/// The key of `pid` from the source broker numbered `n`.
fn key(n: u64, pid: u16) -> i64 {
    ((n << 16) | u64::from(pid)) as i64
}

/// The number of the source broker `url`, if it has one.
pub(super) fn source_number(conn: &Connection, url: &str) -> rusqlite::Result<Option<u64>> {
    conn.prepare_cached("SELECT n FROM source_brokers WHERE url = ?1")?.query_row([url], |r| r.get(0)).optional()
}

/// The number of the source broker `url`, given one if it has none. A new
/// number is above every one in use, and above every number a record
/// still carries (a salvage may have kept records whose broker's row was
/// lost): a record is never taken for another broker's.
pub(super) fn numbered_source(conn: &Connection, url: &str) -> rusqlite::Result<u64> {
    if let Some(n) = source_number(conn, url)? {
        return Ok(n);
    }
    let sql = "INSERT INTO source_brokers (n, url) VALUES (1 + max(coalesce((SELECT max(n) FROM source_brokers), 0), coalesce((SELECT max(k) >> 16 FROM source_records), 0)), ?1) RETURNING n";
    conn.prepare_cached(sql)?.query_row([url], |r| r.get(0))
}

/// Records that `pid` from the source broker numbered `n`, with content
/// `digest`, became message `id`.
pub(super) fn record(conn: &Connection, n: u64, pid: u16, digest: u64, id: u64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("INSERT OR REPLACE INTO source_records (k, digest, id) VALUES (?1, ?2, ?3)")?;
    stmt.execute(params![key(n, pid), digest as i64, id]).map(|_| ())
}

impl SqliteStore {
    /// The number of the source broker `url` (through the map in memory),
    /// given one if it has none and `create`.
    fn source(&mut self, url: &str, create: bool) -> Result<Option<u64>, StoreError> {
        if let Some(n) = self.source_numbers.get(url) {
            return Ok(Some(*n));
        }
        let n = if create { numbered_source(&self.conn, url).map(Some) } else { source_number(&self.conn, url) };
        let n = n.map_err(|e| self.map(e))?;
        if let Some(n) = n {
            self.source_numbers.insert(url.to_owned(), n);
        }
        Ok(n)
    }
}

impl SourceStore for SqliteStore {
    fn source_record(&mut self, url: &str, pid: u16, digest: u64, id: u64) -> Result<(), StoreError> {
        if let Some(n) = self.source(url, true)? {
            record(&self.conn, n, pid, digest, id).map_err(|e| self.map(e))?;
        }
        Ok(())
    }
    fn source_seen(&mut self, url: &str, pid: u16, digest: u64) -> Result<Option<u64>, StoreError> {
        let Some(n) = self.source(url, false)? else { return Ok(None) };
        let sql = "SELECT id FROM source_records WHERE k = ?1 AND digest = ?2";
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.query_row(params![key(n, pid), digest as i64], |r| r.get(0)).optional()?)
    }
}
