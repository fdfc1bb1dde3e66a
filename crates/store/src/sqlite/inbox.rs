//! A consumer's inbox ([`InboxStore`]): the identities it handled, pruned by
//! age and count, and its named counters.
//!
//! Identities are kept as ranges (format 6, docs/design.md, "Inbox"): a
//! record of many identities writes one row per run of a producer's
//! consecutive sequence numbers, so that a batch of 200 costs one insert,
//! not 200. Ranges never overlap: a record writes only the parts of its
//! runs that no range holds yet, so the range that may hold a sequence
//! number is the one starting at or below it, found by one seek.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::{InboxStore, StoreError};

/// The last sequence number of the range of `?1` that starts at or below
/// `?2`: the only range that may hold `?2` (ranges never overlap).
const RANGE_AT_OR_BELOW: &str =
    "SELECT last FROM inbox_ranges WHERE producer = ?1 AND first <= ?2 ORDER BY first DESC LIMIT 1";

const ADD_COUNTER: &str = "INSERT INTO counters VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET count = count + ?2";

/// The ranges of `?1` that start from `?2` to `?3`.
const RANGES_INSIDE: &str =
    "SELECT first, last FROM inbox_ranges WHERE producer = ?1 AND first >= ?2 AND first <= ?3 ORDER BY first";

impl SqliteStore {
    /// Records the run `first..=last` of `producer`: the parts of it no
    /// range holds yet, each as a range of its own.
    fn record_run(&mut self, producer: &str, first: u64, last: u64, now_ms: u64) -> rusqlite::Result<()> {
        let held: Option<u64> = self
            .conn_apart()
            .prepare_cached(RANGE_AT_OR_BELOW)?
            .query_row(params![producer, first], |r| r.get(0))
            .optional()?;
        // The first sequence number of the run not known to be held (none:
        // all of it is).
        let mut next = match held {
            Some(l) if l >= first => l.checked_add(1).filter(|n| *n <= last),
            _ => Some(first),
        };
        let mut parts = Vec::new();
        if let Some(from) = next {
            let mut stmt = self.conn_apart().prepare_cached(RANGES_INSIDE)?;
            let mut rows = stmt.query(params![producer, from, last])?;
            while let (Some(n), Some(r)) = (next, rows.next()?) {
                let (f, l): (u64, u64) = (r.get(0)?, r.get(1)?);
                if f > n {
                    parts.push((n, f - 1));
                }
                next = l.checked_add(1).filter(|m| *m <= last);
            }
        }
        if let Some(n) = next {
            parts.push((n, last));
        }
        let mut insert = self.conn_apart().prepare_cached("INSERT INTO inbox_ranges VALUES (?1, ?2, ?3, ?4)")?;
        for (f, l) in parts {
            insert.execute(params![producer, f, l, now_ms])?;
        }
        Ok(())
    }

    /// An inbox of format 5 or older, read by `status` before its owner
    /// converted it: one row per identity, in `inbox`.
    fn legacy_inbox(&self) -> bool {
        let sql = "SELECT count(*) FROM sqlite_master WHERE name = 'inbox_ranges'";
        self.conn_apart().query_row(sql, [], |r| r.get::<_, u32>(0)).is_ok_and(|n| n == 0)
    }
}

impl InboxStore for SqliteStore {
    fn inbox_seen(&mut self, ids: &[(String, u64)]) -> Result<Vec<bool>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached(RANGE_AT_OR_BELOW)?;
        let mut out = Vec::with_capacity(ids.len());
        for (p, s) in ids {
            let last: Option<u64> = stmt.query_row(params![p, s], |r| r.get(0)).optional()?;
            out.push(last.is_some_and(|l| l >= *s));
        }
        Ok(out)
    }
    fn inbox_high(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt =
            self.conn_apart().prepare_cached("SELECT producer, max(last) FROM inbox_ranges GROUP BY producer")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
    fn inbox_record_runs(&mut self, runs: &[crate::InboxRun], now_ms: u64) -> Result<(), StoreError> {
        for (p, first, last) in runs {
            if let Err(e) = self.record_run(p, *first, *last, now_ms) {
                return Err(self.map(e));
            }
        }
        Ok(())
    }
    fn inbox_prune(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        let before = self.inbox_len()?;
        self.conn_apart()
            .execute("DELETE FROM inbox_ranges WHERE handled_ms < ?1", [before_ms])
            .map_err(|e| self.map(e))?;
        // Over the count: the oldest ranges go (and the lowest numbers of
        // the one that crosses the bound), so that the newest `keep` stay.
        let mut over = self.inbox_len()?.saturating_sub(keep);
        if over > 0 {
            let oldest: Vec<(String, u64, u64)> = {
                let sql = "SELECT producer, first, last FROM inbox_ranges ORDER BY handled_ms, first, producer";
                let mut stmt = self.conn_apart().prepare(sql)?;
                let mut rows = stmt.query([])?;
                let mut out = Vec::new();
                let mut taken = 0u64;
                while taken < over {
                    let Some(r) = rows.next()? else { break };
                    let (p, f, l): (String, u64, u64) = (r.get(0)?, r.get(1)?, r.get(2)?);
                    taken += l - f + 1;
                    out.push((p, f, l));
                }
                out
            };
            for (p, f, l) in oldest {
                let size = l - f + 1;
                let r = if size <= over {
                    over -= size;
                    self.conn_apart()
                        .execute("DELETE FROM inbox_ranges WHERE producer = ?1 AND first = ?2", params![p, f])
                } else {
                    let cut = std::mem::take(&mut over);
                    let sql = "UPDATE inbox_ranges SET first = ?3 WHERE producer = ?1 AND first = ?2";
                    self.conn_apart().execute(sql, params![p, f, f + cut])
                };
                r.map_err(|e| self.map(e))?;
            }
        }
        Ok(before - self.inbox_len()?)
    }
    fn inbox_len(&mut self) -> Result<u64, StoreError> {
        let sql = if self.legacy_inbox() {
            "SELECT count(*) FROM inbox"
        } else {
            "SELECT coalesce(sum(last - first + 1), 0) FROM inbox_ranges"
        };
        Ok(self.conn_apart().query_row(sql, [], |r| r.get(0))?)
    }
    fn inbox_bytes(&mut self) -> Result<u64, StoreError> {
        let sql = if self.legacy_inbox() {
            "SELECT coalesce(sum(length(CAST(producer AS BLOB)) + ?1), 0) FROM inbox"
        } else {
            "SELECT coalesce(sum((last - first + 1) * (length(CAST(producer AS BLOB)) + ?1)), 0) FROM inbox_ranges"
        };
        Ok(self.conn_apart().query_row(sql, [crate::INBOX_ENTRY_BYTES], |r| r.get(0))?)
    }
    fn add_counter(&mut self, name: &str, n: u64) -> Result<(), StoreError> {
        // Cached: a consumer counts what it handled at every batch (its
        // parse was the "re-prepared statement" of docs/performance.md).
        self.conn_apart().prepare_cached(ADD_COUNTER)?.execute(params![name, n]).map_err(|e| self.map(e))?;
        Ok(())
    }
    fn counters(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached("SELECT name, count FROM counters ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::{ADD_COUNTER, RANGES_INSIDE, RANGE_AT_OR_BELOW};
    use crate::{InboxStore, SqliteStore, Store};

    /// A statement from the cache is not prepared again at its next use:
    /// no plan looks at the values bound (a `LIMIT ?` or a `col = ?`
    /// filter would otherwise make SQLite prepare it again each time
    /// rusqlite clears its bindings), and the cache holds them all.
    #[test]
    fn cached_statements_are_not_prepared_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = SqliteStore::open_inbox(dir.path()).unwrap();
        for i in 0..20u64 {
            s.begin().unwrap();
            s.inbox_record(&[("p".into(), i * 3), ("p".into(), i * 3 + 1)], 1).unwrap();
            s.add_counter("handled", 2).unwrap();
            s.commit().unwrap();
        }
        // An outbox statement with a `LIMIT ?`.
        let outbox = tempfile::tempdir().unwrap();
        let (mut o, _) = SqliteStore::open(outbox.path()).unwrap();
        let oldest = "SELECT id, size FROM outbox WHERE done = 0 ORDER BY id LIMIT ?1";
        for n in 1..20 {
            o.oldest(n, None).unwrap();
        }
        for (store, sql) in [(&s, RANGE_AT_OR_BELOW), (&s, RANGES_INSIDE), (&s, ADD_COUNTER), (&o, oldest)] {
            let stmt = store.db.prepare_cached(sql).unwrap();
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        }
    }
}
