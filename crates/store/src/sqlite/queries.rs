//! The [`Store`] trait over SQL: one statement (cached) per operation,
//! inside the transaction the writer thread opened.

use rusqlite::{params, Connection, OptionalExtension};
use steadfast_core::{DropReason, ReceiptRule, Stage};

use super::deferred;
use super::rows::{read_messages, stage_to_sql, RowState, SELECT_BOUND, SELECT_MESSAGE};
use super::SqliteStore;
use crate::{
    now_ms, reserve, AckAnswer, BrokerRecord, Entry, NewMessage, PoisonCause, ReadLimit, Store, StoreError,
    StoredMessage, Totals, MAX_SLOTS,
};

/// Where a database records the highest id it handed out (table, query):
/// `ids` from format 7 on, `sqlite_sequence` before.
pub(super) const ID_RECORDS: [(&str, &str); 2] = [
    ("ids", "SELECT last FROM ids WHERE k = 0"),
    ("sqlite_sequence", "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"),
];

/// The highest id the database says it ever handed out (0 for none): its
/// record of it (`ids` from format 7 on, `sqlite_sequence` before; a
/// read-only look at an older outbox finds only the latter) or its newest
/// row, whichever is higher. An error when it holds no outbox table, or
/// when a read fails: never a lower id for want of the record.
pub(super) fn recorded_last_id(conn: &Connection) -> rusqlite::Result<u64> {
    let newest: Option<u64> = conn.prepare_cached("SELECT max(id) FROM outbox")?.query_row([], |r| r.get(0))?;
    let has = |table: &str| -> rusqlite::Result<bool> {
        let sql = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1";
        conn.prepare_cached(sql)?.query_row([table], |r| r.get::<_, i64>(0)).map(|n| n > 0)
    };
    // Both, when both are there: a conversion that failed leaves an empty
    // `ids` beside format 6's record.
    let mut last = newest.unwrap_or(0);
    for (table, sql) in ID_RECORDS {
        if has(table)? {
            let kept: Option<u64> = conn.prepare_cached(sql)?.query_row([], |r| r.get(0)).optional()?;
            last = last.max(kept.unwrap_or(0));
        }
    }
    Ok(last)
}

/// Raises the database's record of the highest id handed out to `id`.
pub(super) fn record_last_id(conn: &Connection, id: u64) -> rusqlite::Result<()> {
    let sql = "INSERT INTO ids (k, last) VALUES (0, ?1) ON CONFLICT (k) DO UPDATE SET last = max(last, excluded.last)";
    conn.prepare_cached(sql)?.execute([id]).map(|_| ())
}

/// Keeps the newest [`crate::DROP_LOG_KEEP`] entries of the drop log.
pub(super) fn trim_drop_log(conn: &Connection) -> rusqlite::Result<()> {
    let sql = "DELETE FROM dropped WHERE id <= (SELECT id FROM dropped ORDER BY id DESC LIMIT 1 OFFSET ?1)";
    conn.execute(sql, [crate::DROP_LOG_KEEP]).map(|_| ())
}

/// The columns [`read_entry`] reads, in its order (a macro: the queries
/// are literals, built at compile time, not on the acknowledgement path).
macro_rules! entry_columns {
    () => {
        "route, acks, done, size, created_ms, expires_ms, receipts, awaiting_ms, acked_ms, resends"
    };
}

/// The packet ids a row of `outbox` is bound to (`Entry::bindings`),
/// as a column: only a QoS 2 message is ever bound, so the others skip
/// the look-up in `wire`.
macro_rules! bindings_column {
    () => {
        "CASE WHEN outbox.qos = 2 THEN (SELECT count(*) FROM wire WHERE wire.id = outbox.id) ELSE 0 END"
    };
}

/// An [`Entry`] from a row that starts with `entry_columns!()`.
fn read_entry(r: &rusqlite::Row<'_>, bindings: u32) -> rusqlite::Result<Entry> {
    Ok(Entry {
        route: r.get(0)?,
        acks: r.get::<_, i64>(1)? as u64,
        done: r.get(2)?,
        size: r.get(3)?,
        created_ms: r.get(4)?,
        bindings,
        expires_ms: r.get(5)?,
        receipts: r.get(6)?,
        awaiting_ms: r.get(7)?,
        acked_ms: r.get(8)?,
        resends: r.get(9)?,
    })
}

impl Store for SqliteStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        // Rows still waiting belong to a transaction that ended without
        // its commit or a rollback (none of the writer's paths): it
        // answered nobody, and all it left in memory goes.
        if !self.waiting.is_empty() || self.held_acks.left_open() {
            self.rollback();
        }
        self.run_cached("BEGIN IMMEDIATE")?;
        self.changes_at_begin = self.db.total_changes();
        // Nobody else commits until this transaction ends: one look for
        // what others committed before it covers every use of the tail
        // and of the highest id in it.
        if self.tail.is_known() || self.ids.last.is_some() {
            self.follow_other_commits();
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let r = self.write_and_commit();
        if r.is_ok() {
            self.held_acks.committed();
        } else {
            // What memory holds may no longer be what the file does.
            self.forget_ids();
            self.source_log.forget();
        }
        r
    }

    fn changed(&self) -> bool {
        // Every statement that changes a row dirties its page; the summary
        // and the id record are written at the commit.
        self.db.total_changes() != self.changes_at_begin
            || self.queued_delta != (0, 0)
            || self.ids.unrecorded.is_some()
            || self.source_log.has_writes()
            || !self.waiting.is_empty()
            || self.held_acks.due()
    }

    fn set_synced(&mut self, synced: bool) {
        if synced != self.synced {
            let pragma = if synced { "PRAGMA synchronous=FULL" } else { "PRAGMA synchronous=NORMAL" };
            if self.run_cached(pragma).is_ok() {
                self.synced = synced;
            }
        }
    }

    fn acks_due_at(&self) -> Option<std::time::Instant> {
        self.held_acks.due_at()
    }

    fn rollback(&mut self) {
        self.waiting.clear();
        self.held_acks.rolled_back();
        self.queued_delta = (0, 0);
        self.forget_ids();
        self.ids.unrecorded = None;
        self.source_numbers.clear();
        self.source_log.forget();
        if !self.db.is_autocommit() {
            let _ = self.run_cached("ROLLBACK");
        }
    }

    fn insert(&mut self, m: &NewMessage) -> Result<u64, StoreError> {
        self.insert_shared(std::sync::Arc::new(m.clone()))
    }

    fn insert_shared(&mut self, m: std::sync::Arc<NewMessage>) -> Result<u64, StoreError> {
        // Outside a transaction, one of its own: the row, the record of its
        // id and the reservation above it commit together.
        if self.db.is_autocommit() {
            return self.in_own_transaction(|s| s.insert_shared(m));
        }
        let id = self.next_id()?;
        if deferred::is_plain(&m) {
            // Written with the ones after it, before anything can see it.
            self.waiting.push(deferred::Waiting { id, msg: m.clone() });
        } else {
            let props = (!m.props.is_empty()).then(|| m.props.encode());
            let p = &m.policy;
            let r = self.conn_for_inserts()?.prepare_cached(
                "INSERT INTO outbox (id, topic, payload, qos, retain, props, created_ms, size, route, acks, expires_ms, priority, max_attempts, latest, receipts) VALUES (?14, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9, ?10, ?11, ?12, ?13)",
            ).and_then(|mut s| s.execute(params![
                m.topic,
                m.payload,
                m.qos as u8,
                m.retain,
                props,
                m.created_ms,
                m.size(),
                m.route,
                p.expires_ms,
                p.priority,
                p.max_attempts,
                p.keep_latest,
                m.receipts,
                id
            ]));
            r.map_err(|e| self.map(e))?;
        }
        self.handed_out(id);
        let size = m.size() as i64;
        self.tail.inserted(id, m);
        self.count_queued(1, size)?;
        // Reserved before the commit that hands it out: a recovery that
        // lost the database's own record still starts above it.
        if id > self.reserved {
            let upto = id + reserve::BLOCK;
            reserve::write(&self.dir, upto)?;
            self.reserved = upto;
        }
        Ok(id)
    }

    fn entry(&mut self, id: u64) -> Result<Option<Entry>, StoreError> {
        let sql = concat!("SELECT ", entry_columns!(), ", ", bindings_column!(), " FROM outbox WHERE id = ?1");
        let mut stmt = self.conn_below(id)?.prepare_cached(sql)?;
        let r = stmt.query_row([id], |r| read_entry(r, r.get(10)?));
        Ok(r.optional()?)
    }

    fn topic(&mut self, id: u64) -> Result<Option<String>, StoreError> {
        // A row's topic never changes: held acknowledgements need not be
        // written first, a waiting insert must.
        let mut stmt = self.conn_below_for_inserts(id)?.prepare_cached("SELECT topic FROM outbox WHERE id = ?1")?;
        let r = stmt.query_row([id], |r| r.get(0)).optional();
        drop(stmt);
        r.map_err(|e| self.map(e))
    }

    fn remove(&mut self, id: u64) -> Result<bool, StoreError> {
        // A read by key, then the delete: SQLite buffers a RETURNING
        // clause's rows in a temporary table (a zeroed page per statement),
        // which costs more than the read.
        let mut stmt =
            self.conn_below(id)?.prepare_cached("SELECT done, size, qos, receipts FROM outbox WHERE id = ?1")?;
        let r = stmt
            .query_row([id], |r| {
                let rule: Option<String> = r.get(3)?;
                Ok((
                    r.get::<_, bool>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, u8>(2)?,
                    keeps_receipt_names(rule.as_deref()),
                ))
            })
            .optional();
        drop(stmt);
        match r.map_err(|e| self.map(e))? {
            Some((done, size, qos, several)) => {
                self.delete_row(id, done, size, qos, several)?;
                Ok(true)
            }
            None => {
                // A gone one's bindings are cleared too, in case.
                let mut wire = self.conn_apart().prepare_cached("DELETE FROM wire WHERE id = ?1")?;
                let r = wire.execute([id]);
                drop(wire);
                r.map_err(|e| self.map(e))?;
                Ok(false)
            }
        }
    }

    fn ack(&mut self, id: u64, slot: u32) -> Result<Option<Entry>, StoreError> {
        // Two statements for a QoS 1 message: the message read by key
        // (cheaper than RETURNING, see `remove`) and the acknowledgement,
        // when it is new. A QoS 2 one also closes its exchange on this
        // broker and counts the others still open.
        let Some((mut e, qos)) = self.read_for_ack(id)? else { return Ok(None) };
        let before = e.acks;
        self.apply_ack(id, slot, qos, &mut e)?;
        if e.acks != before {
            self.store_acks(id, before, e.acks)?;
        }
        Ok(Some(e))
    }

    fn ack_or_remove(
        &mut self,
        id: u64,
        slot: u32,
        finishes: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<AckAnswer, StoreError> {
        // Two statements for a QoS 0 or 1 message that this acknowledgement
        // finishes (the common case: one broker, no receipts): the read by
        // key and the delete, instead of the update, the read, a second
        // read and the delete of `ack` then `remove`.
        let Some((mut e, qos)) = self.read_for_ack(id)? else { return Ok(None) };
        let before = e.acks;
        self.apply_ack(id, slot, qos, &mut e)?;
        if e.bindings == 0 && !e.done && finishes(&e) {
            let several = keeps_receipt_names(e.receipts.as_deref());
            self.delete_row(id, false, e.size as i64, qos, several)?;
            return Ok(Some((e, true)));
        }
        if e.acks != before {
            self.store_acks(id, before, e.acks)?;
        }
        Ok(Some((e, false)))
    }

    fn ack_or_remove_many(
        &mut self,
        ids: &[u64],
        slot: u32,
        finishes: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<Vec<(u64, AckAnswer)>, StoreError> {
        let sorted = crate::sorted_distinct(ids);
        let mut out = Vec::with_capacity(sorted.len());
        for run in runs(&sorted) {
            if let [id] = run {
                out.push((*id, self.ack_or_remove(*id, slot, finishes)?));
                continue;
            }
            self.ack_run(run, slot, finishes, &mut out)?;
        }
        Ok(out)
    }

    fn set_done(&mut self, id: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn_below(id)?.prepare_cached("SELECT size FROM outbox WHERE id = ?1 AND done = 0")?;
        let r = stmt.query_row([id], |r| r.get::<_, i64>(0)).optional();
        drop(stmt);
        let Some(size) = r.map_err(|e| self.map(e))? else { return Ok(()) };
        let mut stmt =
            self.conn_below(id)?.prepare_cached("UPDATE outbox SET done = 1, awaiting_ms = NULL WHERE id = ?1")?;
        let r = stmt.execute([id]);
        drop(stmt);
        r.map_err(|e| self.map(e))?;
        self.tail.left(id);
        self.count_queued(-1, -size)
    }

    fn await_receipts(&mut self, id: u64, due_ms: u64, now_ms: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn_below(id)?.prepare_cached(
            "UPDATE outbox SET awaiting_ms = ?2, acked_ms = coalesce(acked_ms, ?3) WHERE id = ?1 AND done = 0",
        )?;
        let r = stmt.execute(params![id, due_ms, now_ms]);
        drop(stmt);
        r.map_err(|e| self.map(e))?;
        self.tail.left(id);
        Ok(())
    }

    fn await_receipts_many(&mut self, ids: &[u64], due_ms: u64, now_ms: u64) -> Result<(), StoreError> {
        debug_assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids not ascending");
        for run in runs(ids) {
            let (first, last) = (run[0], run[run.len() - 1]);
            // The acknowledgements that delivered them mostly wait held,
            // all alike: written by this statement (with `write_runs`'
            // condition: another process's change stands) instead of one
            // of their own just before it. In a transaction only: a
            // failure then takes them back whole.
            let held = if self.db.is_autocommit() { None } else { self.held_acks.take_run(first, last) };
            let conn = self.conn_below(last)?;
            let r = match held {
                Some((old, new)) => conn
                    .prepare_cached(
                        "UPDATE outbox SET acks = iif(acks & ?6 = ?6 AND acks | ?5 = ?5, ?5, acks), awaiting_ms = iif(done = 0, ?3, awaiting_ms), acked_ms = iif(done = 0, coalesce(acked_ms, ?4), acked_ms) WHERE id >= ?1 AND id <= ?2",
                    )
                    .and_then(|mut s| s.execute(params![first, last, due_ms, now_ms, new as i64, old as i64])),
                None => conn
                    .prepare_cached(
                        "UPDATE outbox SET awaiting_ms = ?3, acked_ms = coalesce(acked_ms, ?4) WHERE id >= ?1 AND id <= ?2 AND done = 0",
                    )
                    .and_then(|mut s| s.execute(params![first, last, due_ms, now_ms])),
            };
            r.map_err(|e| self.map(e))?;
            for &id in run {
                self.tail.left(id);
            }
        }
        Ok(())
    }

    fn add_receipt(&mut self, id: u64, by: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached("INSERT OR IGNORE INTO receipts (id, by) VALUES (?1, ?2)")?;
        let r = stmt.execute(params![id, by]);
        drop(stmt);
        r.map_err(|e| self.map(e))?;
        let mut stmt = self.conn_apart().prepare_cached("SELECT by FROM receipts WHERE id = ?1 ORDER BY by")?;
        let rows = stmt.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn receipts_due(&mut self, now_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn_for_inserts()?.prepare_cached(
            "SELECT id FROM outbox WHERE awaiting_ms IS NOT NULL AND awaiting_ms <= ?1 AND done = 0 ORDER BY awaiting_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now_ms, limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn asking_between(&mut self, first: u64, last: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn_for_inserts()?.prepare_cached(
            "SELECT id FROM outbox WHERE receipts IS NOT NULL AND id BETWEEN ?1 AND ?2 AND done = 0 ORDER BY id LIMIT ?3",
        )?;
        let rows =
            stmt.query_map(params![first.min(i64::MAX as u64), last.min(i64::MAX as u64), limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn entries_asking_between(&mut self, first: u64, last: u64, limit: usize) -> Result<Vec<(u64, Entry)>, StoreError> {
        let (first, last) = (first.min(i64::MAX as u64), last.min(i64::MAX as u64));
        let sql = concat!(
            "SELECT ",
            entry_columns!(),
            ", ",
            bindings_column!(),
            ", id FROM outbox",
            " WHERE receipts IS NOT NULL AND id BETWEEN ?1 AND ?2 AND done = 0 ORDER BY id LIMIT ?3"
        );
        // Read as `entry` reads each: the held acknowledgements of the
        // range written first.
        let mut stmt = self.conn_below(last)?.prepare_cached(sql)?;
        let rows =
            stmt.query_map(params![first, last, limit as i64], |r| Ok((r.get(11)?, read_entry(r, r.get(10)?)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn remove_many_as_read(&mut self, rows: &[(u64, &Entry)]) -> Result<(), StoreError> {
        debug_assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "rows not ascending");
        // A row done, or keeping receipt names, goes on its own with what
        // hangs on it; the rest by runs.
        let mut plain = Vec::with_capacity(rows.len());
        for &(id, e) in rows {
            if e.done || keeps_receipt_names(e.receipts.as_deref()) {
                self.remove_as_read(id, e)?;
            } else {
                debug_assert_eq!(e.bindings, 0, "message {id} is bound to a packet id");
                plain.push((id, e.size as i64));
            }
        }
        self.delete_plain_runs(&plain)
    }

    fn remove_as_read(&mut self, id: u64, e: &Entry) -> Result<(), StoreError> {
        debug_assert_eq!(e.bindings, 0, "message {id} is bound to a packet id");
        // Bound to no packet id: no `wire` row to delete, whatever its QoS.
        self.delete_row(id, e.done, e.size as i64, 0, keeps_receipt_names(e.receipts.as_deref()))
    }

    fn receipts_of(&mut self, id: u64) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached("SELECT by FROM receipts WHERE id = ?1 ORDER BY by")?;
        let rows = stmt.query_map([id], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn clear_receipts(&mut self, id: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn_apart().prepare_cached("DELETE FROM receipts WHERE id = ?1")?;
        let r = stmt.execute([id]);
        drop(stmt);
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    fn requeue_for_receipts(&mut self, id: u64) -> Result<(), StoreError> {
        let mut stmt = self.conn_below(id)?.prepare_cached(
            "UPDATE outbox SET awaiting_ms = NULL, acks = 0, resends = resends + 1 WHERE id = ?1 AND done = 0",
        )?;
        let r = stmt.execute([id]);
        drop(stmt);
        // Back among what reads return, with what the tail does not keep.
        self.tail.changed(id);
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    fn awaiting(&mut self) -> Result<crate::Awaiting, StoreError> {
        // Both read partial indexes: nothing is scanned for messages that
        // ask for no receipts.
        let sql = "SELECT count(*), min(acked_ms), min(awaiting_ms), EXISTS (SELECT 1 FROM outbox WHERE receipts IS NOT NULL AND done = 0) FROM outbox WHERE awaiting_ms IS NOT NULL AND done = 0";
        Ok(self.conn_for_inserts()?.query_row(sql, [], |r| {
            Ok(crate::Awaiting {
                count: r.get::<_, i64>(0)? as u64,
                oldest_acked_ms: r.get(1)?,
                next_due_ms: r.get(2)?,
                asking: r.get(3)?,
            })
        })?)
    }

    fn set_wire(&mut self, slot: u32, id: u64, wire: Option<(u16, Stage)>) -> Result<(), StoreError> {
        let r = match wire {
            Some((pid, stage)) => {
                // One exchange per packet id and broker: a binding left
                // behind under this id (its clearing failed) is void now.
                let mut stale =
                    self.conn_apart().prepare_cached("DELETE FROM wire WHERE slot = ?1 AND pid = ?2 AND id != ?3")?;
                stale.execute(params![slot, pid, id]).map_err(|e| self.map(e))?;
                let mut stmt =
                    self.conn_apart().prepare_cached("INSERT OR REPLACE INTO wire VALUES (?1, ?2, ?3, ?4)")?;
                stmt.execute(params![id, slot, pid, stage_to_sql(stage)])
            }
            None => {
                let mut stmt = self.conn_apart().prepare_cached("DELETE FROM wire WHERE id = ?1 AND slot = ?2")?;
                stmt.execute(params![id, slot])
            }
        };
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    fn read_page(
        &mut self,
        after: u64,
        page: ReadLimit,
        slot: Option<u32>,
        priority: Option<u8>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mask = slot.map_or(0, |s| (1u64 << s) as i64);
        let trusted = self.tail_trusted();
        if trusted {
            if let Some(read) = self.tail.read_after(after, page, mask as u64, priority) {
                return Ok(read);
            }
            if let Some(read) = self.tail.read_covered(after, page, mask as u64, priority) {
                return Ok(read);
            }
        }
        // Below the tail, a read for a broker is first made without its
        // mask: when none of the rows it returns has the broker's bit, they
        // are the rows the masked read returns, and a stretch that another
        // broker's link reads from memory (`Tail::read_covered`). Else the
        // masked read is made, and this broker's reads stay masked until
        // they pass the newest id of now (its acknowledged rows lie ahead:
        // after a lost session, say).
        let slot_index = slot.map(|s| s as usize).filter(|&s| s < crate::MAX_SLOTS);
        let unmasked = trusted && slot_index.is_none_or(|s| after >= self.masked_until[s]);
        let unreadable_before = self.unreadable.len();
        let mut page_rows = self.read_rows(after, page, if unmasked { 0 } else { mask }, priority)?;
        if unmasked && page_rows.iter().any(|(m, _)| m.acks & mask as u64 != 0) {
            if let Some(s) = slot_index {
                self.masked_until[s] = self.ids.last.unwrap_or(0).max(after + 1);
            }
            // The masked read finds the undecodable rows again.
            self.unreadable.truncate(unreadable_before);
            page_rows = self.read_rows(after, page, mask, priority)?;
        } else if unmasked {
            return Ok(self.keep_page(page_rows, Some((after, priority))));
        }
        Ok(self.keep_page(page_rows, None))
    }

    fn newest_by_priority(&mut self) -> Result<Vec<(u8, u64)>, StoreError> {
        let mut stmt = self.conn_for_inserts()?.prepare_cached(
            // Upper bounds, which is all a reader needs: level 0 gets the
            // newest id of all (the primary key's end), the others come
            // from their partial index. No scan of the table.
            "SELECT 0, max(id) FROM outbox UNION ALL SELECT priority, max(id) FROM outbox WHERE priority != 0 GROUP BY priority",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, u8>(0)?, r.get::<_, Option<u64>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            if let (p, Some(id)) = row? {
                out.push((p.min(crate::MAX_PRIORITY), id));
            }
        }
        Ok(out)
    }

    fn add_attempt(&mut self, id: u64) -> Result<(), StoreError> {
        let mut stmt =
            self.conn_below(id)?.prepare_cached("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?1")?;
        let r = stmt.execute([id]);
        drop(stmt);
        r.map_err(|e| self.map(e))?;
        self.tail.attempted(id);
        Ok(())
    }

    fn expired(&mut self, cutoff_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn_for_inserts()?.prepare_cached(
            "SELECT id FROM outbox WHERE expires_ms IS NOT NULL AND expires_ms <= ?1 AND done = 0 AND NOT EXISTS (SELECT 1 FROM wire WHERE wire.id = outbox.id) ORDER BY expires_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![cutoff_ms, limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn next_expiry(&mut self) -> Result<Option<u64>, StoreError> {
        // Bound messages count too: the sweep keeps coming back for them
        // until their QoS 2 exchange closes (then they go, or are gone).
        let sql = "SELECT min(expires_ms) FROM outbox WHERE expires_ms IS NOT NULL AND done = 0";
        Ok(self.conn_for_inserts()?.query_row(sql, [], |r| r.get(0))?)
    }

    fn deadline_totals(&mut self) -> Result<Totals, StoreError> {
        let sql = "SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE expires_ms IS NOT NULL AND done = 0";
        let (count, bytes) = self.conn_for_inserts()?.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Totals { count, bytes })
    }

    fn superseded(&mut self, topic: &str, route: Option<&str>) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn_for_inserts()?.prepare_cached(
            "SELECT id FROM outbox WHERE topic = ?1 AND latest = 1 AND route IS ?2 AND done = 0 AND NOT EXISTS (SELECT 1 FROM wire WHERE wire.id = outbox.id) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![topic, route], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn bound(&mut self, slot: u32) -> Result<Vec<StoredMessage>, StoreError> {
        let sql = format!("{SELECT_BOUND} WHERE wire.slot = ?1 ORDER BY outbox.id");
        self.conn()?;
        let rows = read_messages(&self.db, &mut self.unreadable, &sql, ReadLimit::messages(usize::MAX), [slot])?;
        Ok(rows.into_iter().map(|(m, _)| m).collect())
    }

    fn oldest(&mut self, limit: usize, deadline: Option<bool>) -> Result<Vec<(u64, u64)>, StoreError> {
        let sql = match deadline {
            None => "SELECT id, size FROM outbox WHERE done = 0 ORDER BY id LIMIT ?1",
            Some(false) => "SELECT id, size FROM outbox WHERE done = 0 AND expires_ms IS NULL ORDER BY id LIMIT ?1",
            // Through the partial index on deadlines: they may be few.
            Some(true) => "SELECT id, size FROM outbox WHERE expires_ms IS NOT NULL AND done = 0 ORDER BY id LIMIT ?1",
        };
        let mut stmt = self.conn_for_inserts()?.prepare_cached(sql)?;
        let rows = stmt.query_map(params![limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn last_id(&mut self) -> Result<u64, StoreError> {
        Ok(recorded_last_id(self.conn_for_inserts()?)?)
    }

    fn newest_id(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.conn_for_inserts()?.query_row("SELECT max(id) FROM outbox", [], |r| r.get(0))?)
    }

    fn totals(&mut self) -> Result<Totals, StoreError> {
        let sql = "SELECT queued, bytes FROM summary WHERE k = 0";
        let kept: Option<(i64, i64)> =
            self.conn_for_inserts()?.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        match kept {
            Some((count, bytes)) => Ok(Totals { count: count.max(0) as u64, bytes: bytes.max(0) as u64 }),
            None => self.counted_totals(),
        }
    }

    fn counted_totals(&mut self) -> Result<Totals, StoreError> {
        let sql = "SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE done = 0";
        let (count, bytes) = self.conn_for_inserts()?.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Totals { count, bytes })
    }

    fn oldest_created_ms(&mut self) -> Result<Option<u64>, StoreError> {
        let sql = "SELECT created_ms FROM outbox WHERE done = 0 ORDER BY id LIMIT 1";
        Ok(self.conn_for_inserts()?.query_row(sql, [], |r| r.get(0)).optional()?)
    }

    fn lapsed(
        &mut self,
        route: Option<&str>,
        mask: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        // The held acknowledgements are not written first (the catch-up
        // sweep runs every second: it would write all of them each time):
        // each row found gets its set as it would read it. A row whose
        // only acknowledgement in `mask` is still held lapses at a later
        // sweep, once that is written into its row (within about a
        // second) or its row is gone.
        self.conn_for_inserts()?;
        let mut stmt = self.db.prepare_cached(
            "SELECT id, acks FROM outbox WHERE done = 0 AND awaiting_ms IS NULL AND route IS ?1 AND acks & ?2 != 0 AND created_ms < ?3 ORDER BY id LIMIT ?4",
        )?;
        let p = params![route, mask as i64, cutoff_ms, limit as i64];
        let rows = stmt.query_map(p, |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        let mut rows: Vec<(u64, u64)> = rows.collect::<Result<_, _>>()?;
        for (id, acks) in &mut rows {
            self.held_acks.patch(*id, acks);
        }
        Ok(rows)
    }

    fn routes(&mut self) -> Result<Vec<(Option<String>, u64)>, StoreError> {
        // Only messages with a route are counted row by row (through their
        // partial index); the rest is the summary's count minus those: an
        // outbox without routes answers without a scan.
        let total = self.totals()?.count;
        let mut stmt = self.conn_for_inserts()?.prepare_cached(
            "SELECT route, count(*) FROM outbox WHERE route IS NOT NULL AND done = 0 GROUP BY route ORDER BY route",
        )?;
        let rows = stmt.query_map([], |r| Ok((Some(r.get::<_, String>(0)?), r.get::<_, u64>(1)?)))?;
        let named: Vec<(Option<String>, u64)> = rows.collect::<Result<_, _>>()?;
        let unrouted = total.saturating_sub(named.iter().map(|(_, n)| n).sum());
        Ok((unrouted > 0).then_some((None, unrouted)).into_iter().chain(named).collect())
    }

    fn retag(&mut self, from: Option<&str>, to: Option<&str>) -> Result<u64, StoreError> {
        self.tail.forget();
        let n =
            self.conn()?.execute("UPDATE outbox SET route = ?2 WHERE done = 0 AND route IS ?1", params![from, to])?;
        Ok(n as u64)
    }

    fn poison(&mut self, id: u64, slot: u32, cause: PoisonCause, at_ms: u64) -> Result<bool, StoreError> {
        // Not twice: in fanout each broker may move the same message aside,
        // and the second would keep `@poison` as its own route.
        let own: Option<Option<String>> = self
            .conn_below(id)?
            .query_row(
                "SELECT route FROM outbox WHERE id = ?1 AND done = 0 AND route IS NOT ?2",
                params![id as i64, crate::POISON_ROUTE],
                |r| r.get(0),
            )
            .optional()?;
        let Some(own) = own else { return Ok(false) };
        self.tail.changed(id);
        self.conn()?.execute(
            "INSERT OR REPLACE INTO poison (id, route, slot, failures, at_ms, code) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id as i64, own, slot, cause.failures(), at_ms as i64, cause.code()],
        )?;
        self.conn()?.execute("UPDATE outbox SET route = ?2 WHERE id = ?1", params![id as i64, crate::POISON_ROUTE])?;
        self.conn_apart().execute("DELETE FROM wire WHERE id = ?1 AND slot = ?2", params![id as i64, slot])?;
        Ok(true)
    }

    fn poisoned(&mut self) -> Result<Vec<crate::Poisoned>, StoreError> {
        let sql = |code| {
            format!(
                "SELECT p.id, o.topic, o.size, o.qos, coalesce(s.url, ''), p.failures, p.at_ms, {code}
                 FROM poison p JOIN outbox o ON o.id = p.id AND o.done = 0
                 LEFT JOIN slots s ON s.slot = p.slot ORDER BY p.id"
            )
        };
        let conn = self.conn_for_inserts()?;
        let mut stmt = match conn.prepare(&sql("p.code")) {
            Ok(s) => s,
            // A store from before poison isolation (opened read-only).
            Err(e) if e.to_string().contains("no such table") => return Ok(Vec::new()),
            // Or from before refusals were poison (read-only: its `poison`
            // table is given the column at the first writable open).
            Err(e) if e.to_string().contains("no such column") => conn.prepare(&sql("NULL"))?,
            Err(e) => return Err(e.into()),
        };
        let rows = stmt.query_map([], |r| {
            Ok(crate::Poisoned {
                id: r.get::<_, i64>(0)? as u64,
                topic: r.get(1)?,
                size: r.get::<_, i64>(2)? as u64,
                qos: r.get(3)?,
                broker: r.get(4)?,
                cause: match (r.get::<_, u32>(5)?, r.get::<_, Option<u8>>(7)?) {
                    (_, Some(code)) => PoisonCause::Refused(code),
                    (0, None) => PoisonCause::Size,
                    (n, None) => PoisonCause::Closed(n),
                },
                at_ms: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn unpoison(&mut self, id: u64) -> Result<bool, StoreError> {
        let own: Option<Option<String>> = self
            .conn_apart()
            .query_row("SELECT route FROM poison WHERE id = ?1", [id as i64], |r| r.get(0))
            .optional()?;
        let Some(own) = own else { return Ok(false) };
        self.tail.changed(id);
        self.conn_apart().execute("DELETE FROM poison WHERE id = ?1", [id as i64])?;
        let n = self.conn()?.execute(
            "UPDATE outbox SET route = ?2 WHERE id = ?1 AND route = ?3",
            params![id as i64, own, crate::POISON_ROUTE],
        )?;
        Ok(n > 0)
    }

    fn data_version(&mut self) -> Result<u64, StoreError> {
        let version = self.read_data_version()?;
        self.saw_version(Some(version));
        Ok(version)
    }

    fn dropped_as(&mut self, id: u64) -> Result<Option<DropReason>, StoreError> {
        let reason: Option<String> = self
            .conn_apart()
            .query_row("SELECT reason FROM dropped WHERE id = ?1", [id as i64], |r| r.get(0))
            .optional()?;
        Ok(reason.and_then(|r| DropReason::parse(&r)))
    }

    fn lag(&mut self, slot: u32) -> Result<u64, StoreError> {
        // The rows queued that broker `?1` has not acknowledged; held for
        // another broker set, or poison: nobody's lag in this run.
        macro_rules! lagging {
            () => {
                "done = 0 AND acks & ?1 = 0 AND (route IS NULL OR substr(route, 1, 1) <> '@')"
            };
        }
        let bit = 1u64 << slot;
        self.conn_for_inserts()?;
        let all: u64 =
            self.db.query_row(concat!("SELECT count(*) FROM outbox WHERE ", lagging!()), [bit as i64], |r| r.get(0))?;
        // The held acknowledgements are not written first (up to a
        // second of them, a stall of the writer at each `status`): the
        // rows among them that one gives this broker's bit are read and
        // patched (as their `UPDATE` would leave them), and those that
        // have it then are taken off the count.
        let Some((first, last)) = self.held_acks.span_adding(bit) else { return Ok(all) };
        let mut stmt = self.db.prepare_cached(concat!(
            "SELECT id, acks FROM outbox WHERE ",
            lagging!(),
            " AND id >= ?2 AND id <= ?3"
        ))?;
        let rows = stmt.query_map(params![bit as i64, first, last], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        let mut acked = 0u64;
        for row in rows {
            let (id, mut acks) = row?;
            self.held_acks.patch(id, &mut acks);
            acked += u64::from(acks & bit != 0);
        }
        // Two reads: outside a transaction another process may commit
        // between them.
        Ok(all.saturating_sub(acked))
    }

    fn assign_slots(&mut self, urls: &[String]) -> Result<Vec<u32>, StoreError> {
        // A reused slot's acknowledgements are cleared below.
        self.tail.forget();
        let mut taken: Vec<(String, u32)> = {
            let mut stmt = self.conn_apart().prepare_cached("SELECT url, slot FROM slots")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for url in urls {
            if let Some((_, slot)) = taken.iter().find(|(u, _)| u == url) {
                out.push(*slot);
                continue;
            }
            let slot = match (0..MAX_SLOTS as u32).find(|s| !taken.iter().any(|(_, t)| t == s)) {
                Some(s) => s,
                None => {
                    // Reuse the slot of a broker no longer configured: what
                    // it acknowledged or held must not count for the new one.
                    let Some(pos) = taken.iter().position(|(u, _)| !urls.contains(u)) else {
                        return Err(StoreError::WriteFailed(format!(
                            "more than {MAX_SLOTS} brokers configured at once; an outbox tells at most {MAX_SLOTS} apart"
                        )));
                    };
                    let (gone, slot) = taken.remove(pos);
                    let bit = (1u64 << slot) as i64;
                    self.conn()?.execute("UPDATE outbox SET acks = acks & ~?1 WHERE acks & ?1 != 0", [bit])?;
                    self.conn_apart().execute("DELETE FROM wire WHERE slot = ?1", [slot])?;
                    self.conn_apart().execute("DELETE FROM slots WHERE url = ?1", [&gone])?;
                    slot
                }
            };
            self.conn_apart()
                .execute("INSERT INTO slots (url, slot) VALUES (?1, ?2)", params![url, slot])
                .map_err(|e| self.map(e))?;
            taken.push((url.clone(), slot));
            out.push(slot);
        }
        Ok(out)
    }

    fn slots(&mut self) -> Result<Vec<(String, u32)>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached("SELECT url, slot FROM slots ORDER BY slot")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_missed(&mut self, url: &str, n: u64) -> Result<(), StoreError> {
        let sql = "INSERT INTO missed VALUES (?1, ?2) ON CONFLICT(url) DO UPDATE SET count = count + ?2";
        self.conn_apart().execute(sql, params![url, n]).map_err(|e| self.map(e))?;
        Ok(())
    }

    fn missed(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached("SELECT url, count FROM missed ORDER BY url")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_drop(&mut self, reason: DropReason, id: Option<u64>) -> Result<(), StoreError> {
        let sql = "INSERT INTO drops VALUES (?1, 1) ON CONFLICT(reason) DO UPDATE SET count = count + 1";
        self.conn_apart().prepare_cached(sql)?.execute(params![reason.as_str()]).map_err(|e| self.map(e))?;
        let Some(id) = id else { return Ok(()) };
        let sql = "INSERT OR REPLACE INTO dropped (id, reason, at_ms) VALUES (?1, ?2, ?3)";
        self.conn_apart()
            .prepare_cached(sql)?
            .execute(params![id, reason.as_str(), now_ms()])
            .map_err(|e| self.map(e))?;
        // Trimmed now and then, not at every drop (finding the cut-off
        // walks the kept records).
        self.drops_logged += 1;
        if self.drops_logged.is_multiple_of(1024) {
            trim_drop_log(self.conn_apart()).map_err(|e| self.map(e))?;
        }
        Ok(())
    }

    fn drop_log(&mut self) -> Result<Vec<(u64, DropReason)>, StoreError> {
        // A store read (not opened) by this release may predate the log.
        let exists: bool =
            self.conn_apart()
                .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'dropped'", [], |r| r.get(0))?;
        if !exists {
            return Ok(Vec::new());
        }
        let mut stmt = self.conn_apart().prepare("SELECT id, reason FROM dropped ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, reason) = row?;
            out.push((id, DropReason::parse(&reason).unwrap_or(DropReason::Corrupt)));
        }
        Ok(out)
    }

    fn drops(&mut self) -> Result<Vec<(DropReason, u64)>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached("SELECT count FROM drops WHERE reason = ?1")?;
        let mut out = Vec::new();
        for r in DropReason::ALL {
            let n: Option<u64> = stmt.query_row([r.as_str()], |row| row.get(0)).optional()?;
            out.push((r, n.unwrap_or(0)));
        }
        Ok(out)
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        let sql = "SELECT value FROM meta WHERE key = ?1";
        Ok(self.conn_apart().query_row(sql, [key], |r| r.get(0)).optional()?)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        // Cached: the writer marks a synced commit after unsynced ones.
        let sql = "INSERT OR REPLACE INTO meta VALUES (?1, ?2)";
        self.conn_apart().prepare_cached(sql)?.execute([key, value]).map_err(|e| self.map(e))?;
        Ok(())
    }

    fn set_broker(&mut self, b: &BrokerRecord) -> Result<(), StoreError> {
        let sql = "INSERT OR REPLACE INTO brokers VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
        let p = params![b.url, b.state, b.last_error, b.since_ms, b.acked, b.connects, b.retry_ms, b.active];
        self.conn_apart().execute(sql, p).map_err(|e| self.map(e))?;
        Ok(())
    }

    fn take_unreadable(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.unreadable)
    }

    fn brokers(&mut self) -> Result<Vec<BrokerRecord>, StoreError> {
        let mut stmt = self.conn_apart().prepare_cached(
            "SELECT url, state, last_error, since_ms, acked, connects, retry_ms, active FROM brokers ORDER BY url",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(BrokerRecord {
                url: r.get(0)?,
                state: r.get(1)?,
                last_error: r.get(2)?,
                since_ms: r.get(3)?,
                acked: r.get(4)?,
                connects: r.get(5)?,
                retry_ms: r.get(6)?,
                active: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Only a rule that needs several receipts keeps their names (in
/// `receipts`, removed with the message).
fn keeps_receipt_names(rule: Option<&str>) -> bool {
    rule.and_then(ReceiptRule::parse).is_some_and(|r| r.needed() > 1)
}

/// `sorted` (ascending, distinct) cut into runs of consecutive ids.
fn runs(sorted: &[u64]) -> impl Iterator<Item = &[u64]> {
    sorted.chunk_by(|a, b| b.checked_sub(*a) == Some(1))
}

impl SqliteStore {
    /// Queued messages of `priority` (all levels: `None`) after `after`
    /// whose acknowledgements lack `mask` (0: all of them), from SQLite,
    /// each with its acknowledgements as they stand (held ones included)
    /// and what else its row says when the tail may keep it.
    fn read_rows(
        &mut self,
        after: u64,
        page: ReadLimit,
        mask: i64,
        priority: Option<u8>,
    ) -> Result<Vec<(StoredMessage, Option<RowState>)>, StoreError> {
        let limit = page.count;
        let sql = match priority {
            None => format!("{SELECT_MESSAGE} WHERE id > ?1 AND done = 0 AND awaiting_ms IS NULL AND acks & ?3 = 0 ORDER BY id LIMIT ?2"),
            // The literal `priority != 0` lets SQLite use the partial index.
            Some(0) => format!(
                "{SELECT_MESSAGE} WHERE priority = 0 AND id > ?1 AND done = 0 AND awaiting_ms IS NULL AND acks & ?3 = 0 ORDER BY id LIMIT ?2"
            ),
            Some(_) => format!(
                "{SELECT_MESSAGE} WHERE priority != 0 AND priority = ?4 AND id > ?1 AND done = 0 AND awaiting_ms IS NULL AND acks & ?3 = 0 ORDER BY id LIMIT ?2"
            ),
        };
        // Acknowledgements waiting for their rows that cannot change which
        // rows this reads (none added a bit of `mask`: in fanout, the
        // other brokers' first ones, while this one's link is behind) are
        // not written first: each row read gets its set as it would have
        // read it (a link far behind reads below the tail at every page).
        let patch = !self.held_acks.touch(mask as u64);
        if patch {
            self.conn_for_inserts()?;
        } else {
            self.conn()?;
        }
        let mut rows = match priority {
            None | Some(0) => {
                read_messages(&self.db, &mut self.unreadable, &sql, page, params![after, limit as i64, mask])?
            }
            Some(p) => {
                read_messages(&self.db, &mut self.unreadable, &sql, page, params![after, limit as i64, mask, p])?
            }
        };
        if patch && !self.held_acks.is_empty() {
            for (m, _) in &mut rows {
                self.held_acks.patch(m.id, &mut m.acks);
            }
        }
        Ok(rows)
    }

    /// A page read from SQLite, its rows kept by the tail (if it is
    /// known, which `tail_trusted` just checked) so that their
    /// acknowledgements do not read them back. `unmasked`: read with no
    /// mask, after this id, at this priority: when every row is kept, the
    /// tail vouches for the stretch it read ([`tail::Tail::cover`]).
    fn keep_page(
        &mut self,
        rows: Vec<(StoredMessage, Option<RowState>)>,
        unmasked: Option<(u64, Option<u8>)>,
    ) -> Vec<StoredMessage> {
        let mut all_kept = true;
        let mut page = Vec::with_capacity(rows.len());
        for (m, state) in rows {
            match state {
                Some(state) => all_kept &= self.tail.paged(&m, state),
                None => {
                    self.tail.unpage(m.id);
                    all_kept = false;
                }
            }
            page.push(m);
        }
        if let (Some((after, priority)), true, Some(first), Some(last)) =
            (unmasked, all_kept, page.first(), page.last())
        {
            self.tail.cover(after, first.id, last.id, priority);
        }
        page
    }

    /// Runs a statement that takes no parameters and returns no rows, from
    /// the statement cache: `execute_batch` parses it at every call, and a
    /// transaction's `BEGIN` and `COMMIT` come every few messages.
    fn run_cached(&mut self, sql: &str) -> Result<(), StoreError> {
        let r = self.conn_apart().prepare_cached(sql).and_then(|mut s| s.raw_execute());
        r.map(|_| ()).map_err(|e| self.map(e))
    }

    /// `f` in a transaction of its own, committed when it succeeds and
    /// rolled back when it or the commit fails: for a call that writes at
    /// commit time and came outside a transaction.
    pub(super) fn in_own_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.begin()?;
        match f(self) {
            Ok(v) => self.commit().map(|()| v).inspect_err(|_| self.rollback()),
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// The writes a transaction's commit adds, then the commit: a
    /// bridge's source records of the transaction (one row of their log),
    /// what it queued and removed (the summary row), the highest id it
    /// handed out; first the inserts still waiting, and the waiting
    /// acknowledgements once held long enough ([`super::deferred`]).
    fn write_and_commit(&mut self) -> Result<(), StoreError> {
        if !self.waiting.is_empty() {
            self.write_waiting()?;
        }
        if self.held_acks.due() {
            self.write_acks_due()?;
        }
        // Its own table (see `conn_apart`).
        self.source_log.write(&self.db).map_err(|e| self.map(e))?;
        let (count, bytes) = std::mem::take(&mut self.queued_delta);
        if (count, bytes) != (0, 0) {
            self.add_to_summary(count, bytes)?;
        }
        if let Some(id) = self.ids.unrecorded.take() {
            record_last_id(self.conn_apart(), id).map_err(|e| self.map(e))?;
        }
        self.run_cached("COMMIT")
    }

    /// [`Store::ack_or_remove`] for a run of consecutive ids (`run`, at
    /// least two): one read for the run, and one delete for each run of
    /// what it finishes that has nothing hanging on it (QoS 0 or 1, no
    /// receipt names); the rest goes one by one as in `ack_or_remove`.
    /// The answers go to `out` in id order.
    fn ack_run(
        &mut self,
        run: &[u64],
        slot: u32,
        finishes: &mut dyn FnMut(&Entry) -> bool,
        out: &mut Vec<(u64, AckAnswer)>,
    ) -> Result<(), StoreError> {
        let rows = match self.tail_entries(run) {
            Some(rows) => rows,
            None => self.read_run(run[0], run[run.len() - 1])?,
        };
        // Finished rows deleted together: (id, size), ascending.
        let mut plain: Vec<(u64, i64)> = Vec::with_capacity(run.len());
        let mut found = rows.into_iter().peekable();
        for &id in run {
            let Some((_, mut e, qos)) = found.next_if(|(at, _, _)| *at == id) else {
                out.push((id, None));
                continue;
            };
            let before = e.acks;
            self.apply_ack(id, slot, qos, &mut e)?;
            if e.bindings == 0 && !e.done && finishes(&e) {
                let several = keeps_receipt_names(e.receipts.as_deref());
                if qos == 2 || several {
                    self.delete_row(id, false, e.size as i64, qos, several)?;
                } else {
                    plain.push((id, e.size as i64));
                }
                out.push((id, Some((e, true))));
                continue;
            }
            if e.acks != before {
                self.store_acks(id, before, e.acks)?;
            }
            out.push((id, Some((e, false))));
        }
        self.delete_plain_runs(&plain)
    }

    /// Deletes rows known to be there, not done, bound to no packet id
    /// and keeping no receipt names (`(id, size)`, ascending): one
    /// statement for each run of consecutive ids.
    fn delete_plain_runs(&mut self, plain: &[(u64, i64)]) -> Result<(), StoreError> {
        let ids: Vec<u64> = plain.iter().map(|(id, _)| *id).collect();
        for gone in runs(&ids) {
            let in_transaction = !self.db.is_autocommit();
            self.held_acks.forget(gone[0], gone[gone.len() - 1], in_transaction);
            let mut stmt = self
                .conn_below(gone[gone.len() - 1])?
                .prepare_cached("DELETE FROM outbox WHERE id >= ?1 AND id <= ?2")?;
            let r = stmt.execute([gone[0], gone[gone.len() - 1]]);
            drop(stmt);
            let n = r.map_err(|e| self.map(e))?;
            // Every id in the range was read just now, or is in the tail:
            // anything else is a tail out of step, and nothing of this
            // transaction may stand (the summary would count wrong).
            if n != gone.len() {
                let (first, last) = (gone[0], gone[gone.len() - 1]);
                return Err(self.out_of_step(format!("outbox rows {first} to {last}: {n} deleted of {}", gone.len())));
            }
            for id in gone {
                self.tail.left(*id);
            }
        }
        let bytes: i64 = plain.iter().map(|(_, size)| size).sum();
        if !plain.is_empty() {
            self.count_queued(-(plain.len() as i64), -bytes)?;
        }
        Ok(())
    }

    /// A delete found fewer rows than were read just now or held by the
    /// tail: the tail was out of step. It is forgotten, and the batch
    /// fails (nothing of it may stand: the summary would count wrong).
    fn out_of_step(&mut self, what: String) -> StoreError {
        self.tail.forget();
        StoreError::WriteFailed(format!("{what}; the outbox's tail was out of step"))
    }

    /// The entries of `run` (ascending) from the tail, with their QoS and
    /// id, when it holds every one of them.
    fn tail_entries(&mut self, run: &[u64]) -> Option<Vec<(u64, Entry, u8)>> {
        if !self.tail_trusted() {
            return None;
        }
        // Sized at once: collecting an `Option` cannot know its length.
        let mut rows = Vec::with_capacity(run.len());
        for &id in run {
            let (e, qos) = self.tail.entry(id)?;
            rows.push((id, e, qos));
        }
        Some(rows)
    }

    /// The entries of the ids from `first` to `last` that exist, ascending,
    /// with their QoS and id: one range read.
    fn read_run(&mut self, first: u64, last: u64) -> Result<Vec<(u64, Entry, u8)>, StoreError> {
        // By id alone: the acknowledgements waiting for these rows are
        // not written first, each row read gets its set as it would have
        // read it (a link far behind acknowledges below the tail, rows
        // that the other brokers' acknowledgements wait for).
        let sql = concat!("SELECT ", entry_columns!(), ", qos, id FROM outbox WHERE id >= ?1 AND id <= ?2 ORDER BY id");
        let mut stmt = self.conn_below_for_inserts(last)?.prepare_cached(sql)?;
        let rows = stmt
            .query_map([first, last], |r| Ok((r.get::<_, u64>(11)?, read_entry(r, 0)?, r.get::<_, u8>(10)?)))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>());
        drop(stmt);
        let mut rows = rows.map_err(|e| self.map(e))?;
        for (id, e, _) in &mut rows {
            self.held_acks.patch(*id, &mut e.acks);
        }
        Ok(rows)
    }

    /// A message as an acknowledgement finds it, with its QoS; its
    /// bindings are counted by [`SqliteStore::apply_ack`] (QoS 2 only).
    fn read_for_ack(&mut self, id: u64) -> Result<Option<(Entry, u8)>, StoreError> {
        if self.tail_trusted() {
            if let Some(found) = self.tail.entry(id) {
                return Ok(Some(found));
            }
        }
        // By key: as in `read_run`.
        let sql = concat!("SELECT ", entry_columns!(), ", qos FROM outbox WHERE id = ?1");
        let mut stmt = self.conn_below_for_inserts(id)?.prepare_cached(sql)?;
        let r = stmt.query_row([id], |r| Ok((read_entry(r, 0)?, r.get::<_, u8>(10)?))).optional();
        drop(stmt);
        let mut r = r.map_err(|e| self.map(e))?;
        if let Some((e, _)) = r.as_mut() {
            self.held_acks.patch(id, &mut e.acks);
        }
        Ok(r)
    }

    /// The acknowledgement of `slot` on `e`, in memory; a QoS 2 message's
    /// exchange on that broker is closed, and the ones still open counted.
    fn apply_ack(&mut self, id: u64, slot: u32, qos: u8, e: &mut Entry) -> Result<(), StoreError> {
        e.acks |= 1u64 << slot;
        if qos == 2 {
            let mut wire = self.conn_apart().prepare_cached("DELETE FROM wire WHERE id = ?1 AND slot = ?2")?;
            let r = wire.execute(params![id, slot]);
            drop(wire);
            r.map_err(|e| self.map(e))?;
            let mut open = self.conn_apart().prepare_cached("SELECT count(*) FROM wire WHERE id = ?1")?;
            let r = open.query_row([id], |r| r.get(0));
            drop(open);
            e.bindings = r.map_err(|e| self.map(e))?;
        }
        Ok(())
    }

    /// Records the row's acknowledgements: before any statement that may
    /// read them, else at the first commit once held for
    /// [`super::deferred::ACKS_HELD_AT_MOST`], and not at all if the row
    /// goes first ([`super::deferred`]); at once outside a transaction.
    fn store_acks(&mut self, id: u64, before: u64, acks: u64) -> Result<(), StoreError> {
        if self.db.is_autocommit() {
            let mut stmt = self.conn_below(id)?.prepare_cached("UPDATE outbox SET acks = ?2 WHERE id = ?1")?;
            let r = stmt.execute(params![id, acks as i64]);
            drop(stmt);
            r.map_err(|e| self.map(e))?;
        } else {
            self.held_acks.record(id, before, acks);
        }
        self.tail.acked(id, acks);
        Ok(())
    }

    /// Deletes a message known to be there (`done`, `size`, `qos` and
    /// whether it keeps receipt names as its row says) with what hangs on
    /// it, and counts it out of the queue unless it was done.
    fn delete_row(&mut self, id: u64, done: bool, size: i64, qos: u8, several: bool) -> Result<(), StoreError> {
        if several {
            let mut stmt = self.conn_apart().prepare_cached("DELETE FROM receipts WHERE id = ?1")?;
            let r = stmt.execute([id]);
            drop(stmt);
            r.map_err(|e| self.map(e))?;
        }
        // Its waiting acknowledgements go with it, unwritten.
        let in_transaction = !self.db.is_autocommit();
        self.held_acks.forget(id, id, in_transaction);
        let mut stmt = self.conn_below(id)?.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
        let r = stmt.execute([id]);
        drop(stmt);
        // Read just now, or in the tail: see `ack_run`.
        if r.map_err(|e| self.map(e))? != 1 {
            return Err(self.out_of_step(format!("outbox row {id} was gone")));
        }
        self.tail.left(id);
        // Only a QoS 2 message is ever bound to a packet id.
        if qos == 2 {
            let mut wire = self.conn_apart().prepare_cached("DELETE FROM wire WHERE id = ?1")?;
            let r = wire.execute([id]);
            drop(wire);
            r.map_err(|e| self.map(e))?;
        }
        if !done {
            self.count_queued(-1, -size)?;
        }
        Ok(())
    }
}
