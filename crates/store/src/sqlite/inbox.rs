//! A consumer's inbox ([`InboxStore`]): the identities it handled, pruned by
//! age and count, and its named counters.

use rusqlite::params;

use super::SqliteStore;
use crate::{InboxStore, StoreError};

impl InboxStore for SqliteStore {
    fn inbox_seen(&mut self, ids: &[(String, u64)]) -> Result<Vec<bool>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT 1 FROM inbox WHERE producer = ?1 AND seq = ?2")?;
        let mut out = Vec::with_capacity(ids.len());
        for (p, s) in ids {
            out.push(stmt.exists(params![p, s])?);
        }
        Ok(out)
    }
    fn inbox_high(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT producer, max(seq) FROM inbox GROUP BY producer")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    fn inbox_record(&mut self, ids: &[(String, u64)], now_ms: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare_cached("INSERT OR IGNORE INTO inbox VALUES (?1, ?2, ?3)")?;
        for (p, s) in ids {
            let r = stmt.execute(params![p, s, now_ms]);
            if let Err(e) = r {
                drop(stmt);
                return Err(self.map(e));
            }
        }
        Ok(())
    }
    fn inbox_prune(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        let aged =
            self.conn.execute("DELETE FROM inbox WHERE handled_ms < ?1", [before_ms]).map_err(|e| self.map(e))?;
        let over = self
            .conn
            .execute(
                "DELETE FROM inbox WHERE (producer, seq) IN (SELECT producer, seq FROM inbox ORDER BY handled_ms DESC, seq DESC LIMIT -1 OFFSET ?1)",
                [keep as i64],
            )
            .map_err(|e| self.map(e))?;
        Ok((aged + over) as u64)
    }
    fn inbox_len(&mut self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM inbox", [], |r| r.get(0))?)
    }
    fn inbox_bytes(&mut self) -> Result<u64, StoreError> {
        let sql = "SELECT coalesce(sum(length(CAST(producer AS BLOB)) + ?1), 0) FROM inbox";
        Ok(self.conn.query_row(sql, [crate::INBOX_ENTRY_BYTES], |r| r.get(0))?)
    }
    fn add_counter(&mut self, name: &str, n: u64) -> Result<(), StoreError> {
        let sql = "INSERT INTO counters VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET count = count + ?2";
        self.conn.execute(sql, params![name, n]).map_err(|e| self.map(e))?;
        Ok(())
    }
    fn counters(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT name, count FROM counters ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
