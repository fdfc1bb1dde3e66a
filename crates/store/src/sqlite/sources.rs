//! A bridge's source records ([`SourceStore`]): which delivery of which
//! source broker each queued message came as.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::{SourceStore, StoreError};

impl SourceStore for SqliteStore {
    fn source_record(&mut self, url: &str, pid: u16, digest: u64, id: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached("INSERT OR REPLACE INTO sources VALUES (?1, ?2, ?3, ?4)")?;
        let r = stmt.execute(params![url, pid, digest as i64, id]);
        drop(stmt);
        r.map(|_| ()).map_err(|e| self.map(e))
    }
    fn source_seen(&mut self, url: &str, pid: u16, digest: u64) -> Result<Option<u64>, StoreError> {
        let sql = "SELECT id FROM sources WHERE url = ?1 AND pid = ?2 AND digest = ?3";
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.query_row(params![url, pid, digest as i64], |r| r.get(0)).optional()?)
    }
}
