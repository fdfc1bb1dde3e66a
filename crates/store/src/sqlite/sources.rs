//! A bridge's source records ([`SourceStore`]): which delivery of which
//! source broker each queued message came as, keyed by an integer (the
//! broker's number in `source_brokers` above the packet id), the broker
//! numbers found through a map in memory.
//!
//! Format 8 keeps the records as a log ([`SourceLog`]): the records of one
//! transaction are one row of `source_log`, written at its commit, and the
//! newest record of each key is held in memory, read from the log once. A
//! row is deleted in the transaction that replaces its last record still
//! standing. One `INSERT OR REPLACE` per message cost the bridge about
//! 4,800 instructions, a tenth of all it spent on a message
//! (docs/performance.md, sessions 12 and 15).

// Keyed by source-record keys, written for every bridged message: foldhash,
// not SipHash (docs/design.md, "Dependencies").
use foldhash::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStore;
use crate::{SourceStore, StoreError};

/// Bytes of one record in a `source_log` row: the key, the digest and the
/// message id, each 8 bytes little-endian.
const ENTRY: usize = 24;

/// Records in the log beyond twice those standing, and beyond this many,
/// have it rewritten as one row at the next commit (rows whose records are
/// all replaced go by themselves; this bounds the rest, say of a source
/// broker that was removed from the route).
const COMPACT_SLACK: u64 = 65_536;

/// The key of `pid` from the source broker numbered `n`.
pub(super) fn key(n: u64, pid: u16) -> i64 {
    ((n << 16) | u64::from(pid)) as i64
}

/// Appends one record to a `source_log` row's bytes.
pub(super) fn push_entry(row: &mut Vec<u8>, k: i64, digest: u64, id: u64) {
    row.extend_from_slice(&k.to_le_bytes());
    row.extend_from_slice(&digest.to_le_bytes());
    row.extend_from_slice(&id.to_le_bytes());
}

/// The records of a `source_log` row: (key, digest, id), in the order
/// written (a later one of the same key replaces an earlier one).
fn entries(row: &[u8]) -> impl Iterator<Item = (i64, u64, u64)> + '_ {
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    row.chunks_exact(ENTRY).map(move |e| (word(&e[..8]) as i64, word(&e[8..16]), word(&e[16..])))
}

/// Writes `row` (records made by [`push_entry`]) as a new `source_log`
/// row after every other: for a salvage and a conversion, before any
/// handle holds the log in memory.
pub(super) fn append_row(conn: &Connection, row: &[u8]) -> rusqlite::Result<()> {
    if row.is_empty() {
        return Ok(());
    }
    let sql = "INSERT INTO source_log (n, entries) VALUES ((SELECT coalesce(max(n), 0) + 1 FROM source_log), ?1)";
    conn.execute(sql, [row]).map(|_| ())
}

/// Format 7 kept one row per record in `source_records`: they become one
/// row of the log, and the table goes (a format 6 store's records went
/// there first, in the same conversion).
pub(super) fn convert_records(conn: &Connection) -> rusqlite::Result<()> {
    let exists: bool =
        conn.query_row("SELECT count(*) > 0 FROM sqlite_master WHERE name = 'source_records'", [], |r| r.get(0))?;
    if !exists {
        return Ok(());
    }
    append_row(conn, &read_records(conn)?)?;
    conn.execute_batch("DROP TABLE source_records")
}

/// The records of a format 7 `source_records` table, as a log row. Rows
/// that cannot be read are left out (a salvage reads damaged files).
pub(super) fn read_records(conn: &Connection) -> rusqlite::Result<Vec<u8>> {
    let mut stmt = conn.prepare("SELECT k, digest, id FROM source_records ORDER BY k")?;
    let mut rows = stmt.query([])?;
    let mut row = Vec::new();
    while let Ok(Some(r)) = rows.next() {
        if let Ok((k, digest, id)) =
            (|| Ok::<_, rusqlite::Error>((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get(2)?)))()
        {
            push_entry(&mut row, k, digest as u64, id);
        }
    }
    Ok(row)
}

/// The number of the source broker `url`, if it has one.
pub(super) fn source_number(conn: &Connection, url: &str) -> rusqlite::Result<Option<u64>> {
    conn.prepare_cached("SELECT n FROM source_brokers WHERE url = ?1")?.query_row([url], |r| r.get(0)).optional()
}

/// The number of the source broker `url`, given one if it has none. A new
/// number is above every one in use, and above every number a record in
/// the log still carries (a salvage may have kept records whose broker's
/// row was lost): a record is never taken for another broker's. Rare (once
/// per broker), so the log is read from the database for it.
pub(super) fn numbered_source(conn: &Connection, url: &str) -> rusqlite::Result<u64> {
    if let Some(n) = source_number(conn, url)? {
        return Ok(n);
    }
    let mut logged = 0u64;
    let mut stmt = conn.prepare_cached("SELECT entries FROM source_log")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row: Vec<u8> = r.get(0)?;
        logged = entries(&row).fold(logged, |m, (k, _, _)| m.max(k as u64 >> 16));
    }
    drop(rows);
    drop(stmt);
    let sql = "INSERT INTO source_brokers (n, url) VALUES (1 + max(coalesce((SELECT max(n) FROM source_brokers), 0), ?2), ?1) RETURNING n";
    conn.prepare_cached(sql)?.query_row(params![url, logged as i64], |r| r.get(0))
}

/// A key's standing record, and the log row it is in.
#[derive(Debug, Clone, Copy)]
struct Standing {
    digest: u64,
    id: u64,
    row: i64,
}

/// The source records of a store, as its log holds them (format 8).
#[derive(Debug, Default)]
pub(super) struct SourceLog {
    /// Read from `source_log` at first use; `None` again after a rollback
    /// or a failed commit.
    held: Option<Held>,
}

/// The standing records, by key: a table of every packet id for each of
/// the first [`TABLES`] source broker numbers met, a map for any other.
/// Brokers hand out packet ids in turn, so the records of a batch sit side
/// by side: a hash map of up to 65,535 keys a broker cost the writer two
/// cache misses a record, 4 % of a bridged message's CPU
/// (docs/performance.md, session 36). The map bounds what a damaged log
/// (keys of any value, kept by a salvage) costs: 2 MiB a table.
#[derive(Debug, Default)]
struct Standings {
    /// (broker number, its records by packet id).
    tables: Vec<(u64, Box<[Option<Standing>]>)>,
    /// The records of broker numbers beyond the tables.
    others: HashMap<i64, Standing>,
    /// How many records stand.
    len: u64,
}

/// Broker numbers given a table of their own; a route has a few source
/// brokers.
const TABLES: usize = 8;

impl Standings {
    fn split(k: i64) -> (u64, usize) {
        ((k as u64) >> 16, (k as u64 & 0xffff) as usize)
    }

    fn get(&self, k: i64) -> Option<&Standing> {
        let (n, pid) = Self::split(k);
        match self.tables.iter().find(|(b, _)| *b == n) {
            Some((_, table)) => table[pid].as_ref(),
            None => self.others.get(&k),
        }
    }

    /// Puts `s` for key `k`: the record it replaces, if any.
    fn insert(&mut self, k: i64, s: Standing) -> Option<Standing> {
        let (n, pid) = Self::split(k);
        let at = match self.tables.iter().position(|(b, _)| *b == n) {
            Some(at) => Some(at),
            None if self.tables.len() < TABLES => {
                self.tables.push((n, vec![None; 1 << 16].into_boxed_slice()));
                Some(self.tables.len() - 1)
            }
            None => None,
        };
        let old = match at {
            Some(at) => self.tables[at].1[pid].replace(s),
            None => self.others.insert(k, s),
        };
        self.len += u64::from(old.is_none());
        old
    }

    fn len(&self) -> u64 {
        self.len
    }

    /// Every standing record with its key.
    fn iter_mut(&mut self) -> impl Iterator<Item = (i64, &mut Standing)> {
        let tables = self.tables.iter_mut().flat_map(|(n, table)| {
            let n = *n;
            table.iter_mut().enumerate().filter_map(move |(pid, s)| s.as_mut().map(|s| (key(n, pid as u16), s)))
        });
        tables.chain(self.others.iter_mut().map(|(k, s)| (*k, s)))
    }
}

#[derive(Debug, Default)]
struct Held {
    /// Each key's standing record.
    standing: Standings,
    /// The log's rows (the one being written included) that hold a
    /// standing record.
    rows: HashMap<i64, Row>,
    /// Records in those rows, standing or not.
    stored: u64,
    /// The row the transaction under way writes at its commit.
    next_row: i64,
    /// The records of the transaction under way ([`push_entry`]).
    pending: Vec<u8>,
    /// Rows none of whose records stand any more: deleted at the commit.
    emptied: Vec<i64>,
}

/// A row of the log: its records, and how many of them stand.
#[derive(Debug, Default, Clone, Copy)]
struct Row {
    records: u32,
    standing: u32,
}

impl Held {
    fn read(conn: &Connection) -> rusqlite::Result<Held> {
        let mut held = Held::default();
        let mut stmt = conn.prepare_cached("SELECT n, entries FROM source_log ORDER BY n")?;
        let mut rows = stmt.query([])?;
        let mut last = 0;
        while let Some(r) = rows.next()? {
            let (n, row): (i64, Vec<u8>) = (r.get(0)?, r.get(1)?);
            held.rows.entry(n).or_default();
            for (k, digest, id) in entries(&row) {
                held.add(k, Standing { digest, id, row: n });
            }
            last = n;
        }
        // A row left with nothing standing (not expected: it is deleted in
        // the transaction that empties it) goes at the next commit.
        let empty: Vec<i64> = held.rows.iter().filter(|(_, r)| r.standing == 0).map(|(n, _)| *n).collect();
        for n in empty {
            held.rows.remove(&n);
            held.emptied.push(n);
        }
        held.next_row = last + 1;
        Ok(held)
    }

    /// A record of key `k` in row `s.row`: it stands now, in place of the
    /// record before it.
    fn add(&mut self, k: i64, s: Standing) {
        self.stored += 1;
        let old = self.standing.insert(k, s);
        let replaced_in_row = old.is_some_and(|o| o.row == s.row);
        let row = self.rows.entry(s.row).or_default();
        row.records += 1;
        row.standing += u32::from(!replaced_in_row);
        if let Some(old) = old.filter(|_| !replaced_in_row) {
            self.release(old.row);
        }
    }

    /// One record of row `n` no longer stands; with its last, the row
    /// goes.
    fn release(&mut self, n: i64) {
        let Some(row) = self.rows.get_mut(&n) else { return };
        row.standing -= 1;
        if row.standing == 0 {
            self.stored -= u64::from(row.records);
            self.rows.remove(&n);
            self.emptied.push(n);
        }
    }

    /// Writes what the transaction under way changed: the emptied rows
    /// deleted, its records as one row, or the whole log as one row when
    /// it holds too many records that no longer stand.
    fn write(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let standing = self.standing.len();
        if self.stored > 2 * standing + COMPACT_SLACK {
            // Every row goes; what stands becomes the row written below.
            conn.prepare_cached("DELETE FROM source_log")?.execute([])?;
            let n = self.next_row;
            self.pending.clear();
            for (k, s) in self.standing.iter_mut() {
                push_entry(&mut self.pending, k, s.digest, s.id);
                s.row = n;
            }
            self.rows = HashMap::from_iter([(n, Row { records: standing as u32, standing: standing as u32 })]);
            self.stored = standing;
            self.emptied.clear();
        }
        for n in std::mem::take(&mut self.emptied) {
            conn.prepare_cached("DELETE FROM source_log WHERE n = ?1")?.execute([n])?;
        }
        if !self.pending.is_empty() {
            let sql = "INSERT INTO source_log (n, entries) VALUES (?1, ?2)";
            conn.prepare_cached(sql)?.execute(params![self.next_row, self.pending])?;
            self.pending.clear();
            self.next_row += 1;
        }
        Ok(())
    }
}

impl SourceLog {
    fn held(&mut self, conn: &Connection) -> rusqlite::Result<&mut Held> {
        if self.held.is_none() {
            self.held = Some(Held::read(conn)?);
        }
        Ok(self.held.as_mut().expect("just read"))
    }

    /// Records, in the transaction under way, that key `k` with content
    /// `digest` became message `id`.
    fn record(&mut self, conn: &Connection, k: i64, digest: u64, id: u64) -> rusqlite::Result<()> {
        let held = self.held(conn)?;
        let row = held.next_row;
        held.add(k, Standing { digest, id, row });
        push_entry(&mut held.pending, k, digest, id);
        Ok(())
    }

    /// The message key `k` with content `digest` became, if it stands.
    fn seen(&mut self, conn: &Connection, k: i64, digest: u64) -> rusqlite::Result<Option<u64>> {
        let held = self.held(conn)?;
        Ok(held.standing.get(k).filter(|s| s.digest == digest).map(|s| s.id))
    }

    /// At a commit: writes what the transaction changed (nothing when it
    /// recorded nothing).
    pub(super) fn write(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if !self.has_writes() {
            return Ok(());
        }
        self.held.as_mut().map_or(Ok(()), |held| held.write(conn))
    }

    /// The transaction under way has something to write at its commit.
    pub(super) fn has_writes(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.pending.is_empty() || !h.emptied.is_empty())
    }

    /// Forgets what is in memory (a rollback, a failed commit): read again
    /// at the next use.
    pub(super) fn forget(&mut self) {
        self.held = None;
    }
}

impl SqliteStore {
    /// The number of the source broker `url` (through the list in memory),
    /// given one if it has none and `create`.
    fn source(&mut self, url: &str, create: bool) -> Result<Option<u64>, StoreError> {
        // A few brokers at most: a look along a list costs less than
        // hashing the URL for every message.
        if let Some((_, n)) = self.source_numbers.iter().find(|(u, _)| u == url) {
            return Ok(Some(*n));
        }
        let n = if create {
            numbered_source(self.conn_apart(), url).map(Some)
        } else {
            source_number(self.conn_apart(), url)
        };
        let n = n.map_err(|e| self.map(e))?;
        if let Some(n) = n {
            self.source_numbers.push((url.to_owned(), n));
        }
        Ok(n)
    }
}

impl SourceStore for SqliteStore {
    fn source_record(&mut self, url: &str, pid: u16, digest: u64, id: u64) -> Result<(), StoreError> {
        // Outside a transaction, one of its own (the record is written at
        // a commit).
        if self.db.is_autocommit() {
            return self.in_own_transaction(|s| s.source_record(url, pid, digest, id));
        }
        if let Some(n) = self.source(url, true)? {
            let r = self.source_log.record(&self.db, key(n, pid), digest, id);
            r.map_err(|e| self.map(e))?;
        }
        Ok(())
    }

    fn source_seen(&mut self, url: &str, pid: u16, digest: u64) -> Result<Option<u64>, StoreError> {
        let Some(n) = self.source(url, false)? else { return Ok(None) };
        let r = self.source_log.seen(&self.db, key(n, pid), digest);
        r.map_err(|e| self.map(e))
    }
}
