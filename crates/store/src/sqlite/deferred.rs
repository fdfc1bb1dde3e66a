//! Inserts and acknowledgements written together. Inside a transaction,
//! a plain message's row (content and properties only, see [`is_plain`])
//! waits in memory and goes to SQLite with the ones after it in one
//! multi-row `INSERT`, before the first statement that could see it and
//! at the latest before the commit. A row's new set of acknowledgements
//! (a broker's acknowledgement that does not finish the message: in
//! fanout, the first broker's) waits too, in one `UPDATE` per run of
//! consecutive ids: before the first statement that could read it, else
//! at the first commit once it has waited [`ACKS_HELD_AT_MOST`] (past
//! earlier commits; the writer commits by then even when idle), and never
//! if the row goes first: the last broker's acknowledgement usually comes
//! within that time, and the row is deleted without being updated.
//!
//! Why: an update of a row by key cost 8,200 instructions, a fifth of a
//! message published in fanout to two brokers (docs/performance.md,
//! session 23); and SQLite's fixed cost of a statement (a step that opens seven
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

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::NewMessage;

/// The longest a broker's acknowledgement that did not finish its
/// message waits unwritten past commits: what a crash of the process may
/// take back of them, as of the acknowledgements the writer leaves open
/// (its `HOLD_OPEN`). Such a message goes again to that broker after the
/// restart, under the same identity.
pub const ACKS_HELD_AT_MOST: Duration = Duration::from_millis(1);

/// A row waiting for its statement: the id it was given and the message
/// (the tail shares it). Its properties are encoded as it is written.
pub(super) struct Waiting {
    pub(super) id: u64,
    pub(super) msg: Arc<NewMessage>,
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
    // Every row's properties encoded into this one buffer in turn: SQLite
    // copies a blob as it is bound (rusqlite binds with SQLITE_TRANSIENT).
    let mut props = Vec::new();
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
                if m.props.is_empty() {
                    stmt.raw_bind_parameter(at + 6, rusqlite::types::Null)?;
                } else {
                    props.clear();
                    m.props.encode_into(&mut props);
                    stmt.raw_bind_parameter(at + 6, props.as_slice())?;
                }
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

/// Sets of acknowledgements, id -> (the row's set as the database holds
/// it, the set now).
type Sets = BTreeMap<u64, (u64, u64)>;

/// The acknowledgements waiting to be written (see the module).
#[derive(Debug)]
pub(super) struct HeldAcks {
    sets: Sets,
    /// When the oldest of `sets` was recorded.
    since: Option<Instant>,
    /// How long they may wait past commits: [`ACKS_HELD_AT_MOST`], or
    /// what a test set.
    hold: Duration,
    /// `sets` and `since` as the transaction under way found them, taken
    /// at its first change of them: what a rollback puts back (what
    /// committed transactions held is not undone).
    before: Option<(Sets, Option<Instant>)>,
}

impl HeldAcks {
    pub(super) fn new() -> HeldAcks {
        HeldAcks { sets: BTreeMap::new(), since: None, hold: ACKS_HELD_AT_MOST, before: None }
    }

    pub(super) fn set_hold(&mut self, hold: Duration) {
        self.hold = hold;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Whether one of them is at or above `id`.
    pub(super) fn any_at_or_above(&self, id: u64) -> bool {
        self.sets.last_key_value().is_some_and(|(&a, _)| a >= id)
    }

    /// Whether one of them is at or below `id`.
    pub(super) fn any_at_or_below(&self, id: u64) -> bool {
        self.sets.first_key_value().is_some_and(|(&a, _)| a <= id)
    }

    /// When they are due: the first commit from then on writes them.
    pub(super) fn due_at(&self) -> Option<Instant> {
        if self.sets.is_empty() {
            return None;
        }
        Some(self.since.map_or_else(Instant::now, |t| t + self.hold))
    }

    /// Whether the commit writes them now.
    pub(super) fn due(&self) -> bool {
        self.due_at().is_some_and(|at| at <= Instant::now())
    }

    /// Inside a transaction: `id`'s set went from `before` (as the tail
    /// held it, which is what waits when anything does) to `now`.
    pub(super) fn record(&mut self, id: u64, before: u64, now: u64) {
        self.change();
        if self.sets.is_empty() {
            self.since = Some(Instant::now());
        }
        // The row's own set is the one first held.
        let on_disk = self.sets.get(&id).map_or(before, |(on_disk, _)| *on_disk);
        self.sets.insert(id, (on_disk, now));
    }

    /// The rows from `first` to `last` go: what waits for them goes
    /// unwritten. `in_transaction`: a rollback may put it back.
    pub(super) fn forget(&mut self, first: u64, last: u64, in_transaction: bool) {
        let gone: Vec<u64> = self.sets.range(first..=last).map(|(id, _)| *id).collect();
        if gone.is_empty() {
            return;
        }
        if in_transaction {
            self.change();
        }
        for id in gone {
            self.sets.remove(&id);
        }
    }

    /// Writes them (inside a transaction), one `UPDATE` per run of
    /// consecutive ids with the same sets. Only a row that still holds
    /// the set it had when the acknowledgement came is written: another
    /// process may have committed a change since (a joined `pub`'s
    /// receipt sweep publishing a message again, which clears them), and
    /// that change stands. A row that is gone is not written either
    /// (nothing to update). When this fails they stay waiting, so that
    /// the commit fails too.
    pub(super) fn write(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let mut stmt = conn.prepare_cached("UPDATE outbox SET acks = ?4 WHERE id >= ?1 AND id <= ?2 AND acks = ?3")?;
        let mut run: Option<(u64, u64, (u64, u64))> = None;
        let mut write = |(first, last, (old, new)): (u64, u64, (u64, u64))| {
            stmt.execute(rusqlite::params![first, last, old as i64, new as i64]).map(|_| ())
        };
        for (&id, &sets) in &self.sets {
            run = match run {
                Some((first, last, same)) if same == sets && last.checked_add(1) == Some(id) => Some((first, id, same)),
                Some(done) => {
                    write(done)?;
                    Some((id, id, sets))
                }
                None => Some((id, id, sets)),
            };
        }
        run.map_or(Ok(()), write)?;
        self.change();
        self.sets.clear();
        self.since = None;
        Ok(())
    }

    /// Whether a transaction changed them and ended with neither its
    /// commit nor its rollback.
    pub(super) fn left_open(&self) -> bool {
        self.before.is_some()
    }

    /// The transaction's commit succeeded: its changes stand.
    pub(super) fn committed(&mut self) {
        self.before = None;
    }

    /// The transaction rolled back: what it held goes, what earlier ones
    /// held stays (their acknowledgements came, and are written later).
    pub(super) fn rolled_back(&mut self) {
        if let Some((sets, since)) = self.before.take() {
            self.sets = sets;
            self.since = since;
        }
    }

    /// Before the transaction under way first changes them.
    fn change(&mut self) {
        if self.before.is_none() {
            self.before = Some((self.sets.clone(), self.since));
        }
    }
}
