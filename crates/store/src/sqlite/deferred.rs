//! Inserts and acknowledgements written together. Inside a transaction,
//! a plain message's row (content, properties and receipt rule only, see [`is_plain`])
//! waits in memory and goes to SQLite with the ones after it in one
//! multi-row `INSERT`, before the first statement that could see it and
//! at the latest before the commit. A row's new set of acknowledgements
//! (a broker's acknowledgement that does not finish the message: in
//! fanout, the first broker's) waits too ([`HeldAcks`]): at the first
//! commit once it has waited [`ACKS_HELD_AT_MOST`] (past earlier
//! commits; the writer commits by then even when idle) it is logged, one
//! row of `ack_log` for all that waited, and it is written into its row
//! (one `UPDATE` per run of consecutive ids) before the first statement
//! that could read it, else once logged for [`ACKS_LOGGED_AT_MOST`], and
//! never if the row goes first: the last broker's acknowledgement mostly
//! comes within that time, and the row is deleted without being updated.
//! An open writes what the log holds into the rows
//! ([`write_log_at_open`]).
//!
//! Why: an update of a row by key cost 8,200 instructions, a fifth of a
//! message published in fanout to two brokers (docs/performance.md,
//! session 23); and SQLite's fixed cost of a statement (a step that opens seven
//! cursors, the outbox and its six partial indexes, and the halt that
//! closes them) is about half of a one-row insert. One statement for 32
//! rows pays it once: 5,480 instructions a row instead of 10,280
//! (docs/performance.md, session 18). Acknowledgements written into their
//! rows once held for a millisecond still cost 4,200 instructions a
//! message in fanout, two in three of them written (session 29); a log
//! row for all a commit holds costs a statement.
//!
//! The gate is the connection itself: [`SqliteStore`] reaches it through
//! [`SqliteStore::conn`], which writes what waits first, and through
//! [`SqliteStore::conn_below`] and [`SqliteStore::conn_apart`] for the
//! statements that cannot see a waiting row (on older rows by key, or on
//! other tables: nothing in the format ties them to `outbox`, no trigger
//! and no foreign key).

use std::collections::VecDeque;
use std::ops::Range;
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
const COLUMNS: usize = 9;

/// The multi-row `INSERT` for each of [`SIZES`]. The columns a plain
/// message leaves to their defaults are not named; `acks` has no default
/// (see `outbox_table!`) and is 0. `receipts` is NULL for a message that
/// asks for none.
static INSERTS: LazyLock<[String; SIZES.len()]> = LazyLock::new(|| {
    SIZES.map(|n| {
        let mut sql = String::from(
            "INSERT INTO outbox (id, topic, payload, qos, retain, props, created_ms, size, receipts, acks) VALUES ",
        );
        for i in 0..n {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?,?,?,?,?,?,?,?,?,0)");
        }
        sql
    })
});

/// A message whose row needs only its content, its properties and its
/// receipt rule: the other columns' defaults are what the full statement
/// would write (NULL, priority 0, not keep-latest). Most messages are (a
/// bridge's carry an identity property, which is a property; a producer
/// that asks for receipts asks it of every message, docs/performance.md,
/// session 32).
pub(super) fn is_plain(m: &NewMessage) -> bool {
    let p = &m.policy;
    m.route.is_none() && p.expires_ms.is_none() && p.priority == 0 && p.max_attempts.is_none() && !p.keep_latest
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
                stmt.raw_bind_parameter(at + 9, m.receipts.as_deref())?;
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

/// The longest an acknowledgement kept in the log ([`HeldAcks`]) waits
/// before it is written into its row: the log's rows older than this go
/// at a commit, with what they hold still standing written by `UPDATE`.
/// Long enough for the last broker's acknowledgement to come first and
/// take the row away, as it mostly does (docs/performance.md, session
/// 29: in `bench fanout` the second broker's acknowledgement came more
/// than a millisecond after the first for two messages in three, more
/// than 50 ms after it for three in ten, as one link ran ahead of the
/// other); short enough that an open after a crash writes little (at
/// most this long's first acknowledgements).
pub const ACKS_LOGGED_AT_MOST: Duration = Duration::from_secs(1);

/// A row's new set of acknowledgements, not yet in the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    /// The row's set as the database holds it.
    on_disk: u64,
    /// The set now.
    now: u64,
    /// The oldest of this connection's log rows that holds a record of
    /// it: when that row goes, this is written into the outbox row.
    logged_in: Option<u64>,
    /// `now` is in no log row yet.
    unlogged: bool,
}

/// The held entries in id order. They mostly come in it (a broker
/// acknowledges in order) and go in it (the last broker acknowledges in
/// order, behind the first): at the ends of the deque, without a search.
/// An ordered map of up to a second of them cost about 1,560 instructions
/// a fanned-out message to insert, find and take, the deque 730
/// (docs/performance.md, session 30).
#[derive(Debug, Default)]
struct Sets(VecDeque<(u64, Held)>);

impl Sets {
    /// Where `id` is, or would go.
    fn find(&self, id: u64) -> Result<usize, usize> {
        match self.0.back() {
            None => Err(0),
            Some(&(last, _)) if last < id => Err(self.0.len()),
            Some(&(last, _)) if last == id => Ok(self.0.len() - 1),
            Some(_) => self.0.binary_search_by_key(&id, |(k, _)| *k),
        }
    }

    fn get(&self, id: u64) -> Option<&Held> {
        self.find(id).ok().map(|i| &self.0[i].1)
    }

    /// Sets `id`'s entry; what it was.
    fn insert(&mut self, id: u64, h: Held) -> Option<Held> {
        match self.find(id) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, h)),
            Err(i) => {
                self.0.insert(i, (id, h));
                None
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Held> {
        let i = self.find(id).ok()?;
        self.0.remove(i).map(|(_, h)| h)
    }

    /// The positions of the entries from `first` to `last`.
    fn span(&self, first: u64, last: u64) -> Range<usize> {
        let start = match self.0.front() {
            Some(&(low, _)) if low < first => self.0.partition_point(|(k, _)| *k < first),
            _ => 0,
        };
        start..start + self.0.range(start..).take_while(|(k, _)| *k <= last).count()
    }
}

/// What a transaction changed of a [`HeldAcks`], to put back at its
/// rollback: the entries as they were (newest change last), the log rows
/// it added and took, and, once, the rest as the transaction found it.
/// Nothing is copied whole: a transaction at every batch would copy up
/// to a second of log rows each time.
#[derive(Debug)]
struct Undo {
    entries: Vec<(u64, Option<Held>)>,
    since: Option<Instant>,
    /// Log rows it added that are still there (at the back).
    rows_added: usize,
    /// Rows it found and took (from the front), in order.
    rows_taken: Vec<(u64, Instant)>,
    /// `fresh` as the transaction found it, once it was emptied; until
    /// then its length.
    fresh: Result<Vec<u64>, usize>,
    added: u64,
}

/// The acknowledgements waiting to be written into their rows (see the
/// module): in memory, and from [`ACKS_HELD_AT_MOST`] on also in the
/// acknowledgement log (`ack_log`), one row per commit that wrote any,
/// until [`ACKS_LOGGED_AT_MOST`].
#[derive(Debug)]
pub(super) struct HeldAcks {
    sets: Sets,
    /// When the oldest entry not yet logged was recorded.
    since: Option<Instant>,
    /// The ids recorded since the last log row, in the order they came
    /// (some may have gone since): what the next log row holds, found
    /// without a walk of every entry.
    fresh: Vec<u64>,
    /// This connection's rows of the log, oldest first, with when each
    /// was written.
    rows: VecDeque<(u64, Instant)>,
    /// How long they may wait unlogged past commits:
    /// [`ACKS_HELD_AT_MOST`], or what a test set.
    hold: Duration,
    /// How long they may wait logged: [`ACKS_LOGGED_AT_MOST`], or what a
    /// test set.
    keep: Duration,
    /// Every broker bit an entry added since they were last none (a
    /// bound: a bit may stay after its entries went).
    added: u64,
    /// What the transaction under way changed, from its first change.
    undo: Option<Undo>,
    /// The last transaction's `Undo::entries`, emptied: the next one
    /// fills it instead of growing a vector from nothing.
    spare: Vec<(u64, Option<Held>)>,
}

/// One record of the log: a run of consecutive ids whose rows held
/// `old` and now hold `new` (four little-endian u64: first, last, old,
/// new).
const RECORD: usize = 32;

impl HeldAcks {
    pub(super) fn new() -> HeldAcks {
        HeldAcks {
            sets: Sets::default(),
            since: None,
            fresh: Vec::new(),
            rows: VecDeque::new(),
            hold: ACKS_HELD_AT_MOST,
            keep: ACKS_LOGGED_AT_MOST,
            added: 0,
            undo: None,
            spare: Vec::new(),
        }
    }

    pub(super) fn set_hold(&mut self, hold: Duration, keep: Duration) {
        self.hold = hold;
        self.keep = keep;
    }

    /// Whether no row's acknowledgements wait (the log may still hold
    /// rows that no longer matter: see [`HeldAcks::has_log`]).
    pub(super) fn is_empty(&self) -> bool {
        self.sets.0.is_empty()
    }

    /// Whether this connection wrote log rows that are still there.
    pub(super) fn has_log(&self) -> bool {
        !self.rows.is_empty()
    }

    /// Whether one of them is at or above `id`.
    pub(super) fn any_at_or_above(&self, id: u64) -> bool {
        self.sets.0.back().is_some_and(|&(a, _)| a >= id)
    }

    /// Whether one of them is at or below `id`.
    pub(super) fn any_at_or_below(&self, id: u64) -> bool {
        self.sets.0.front().is_some_and(|&(a, _)| a <= id)
    }

    /// When a commit has something to do for them: to log what waits
    /// unlogged, or to write what the oldest log row holds.
    pub(super) fn due_at(&self) -> Option<Instant> {
        let log = self.since.map(|t| t + self.hold);
        let fold = self.rows.front().map(|(_, t)| *t + self.keep);
        match (log, fold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the commit has something to do for them now.
    pub(super) fn due(&self) -> bool {
        self.due_at().is_some_and(|at| at <= Instant::now())
    }

    /// Inside a transaction: `id`'s set went from `before` (as the tail
    /// held it, which is what waits when anything does) to `now`.
    pub(super) fn record(&mut self, id: u64, before: u64, now: u64) {
        // The row's own set is the one first held; the log row that
        // holds the oldest record of it stays the one to go by.
        let old = match self.sets.find(id) {
            Ok(i) => {
                let held = &mut self.sets.0[i].1;
                let old = *held;
                *held = Held { now, unlogged: true, ..old };
                Some(old)
            }
            Err(i) => {
                self.sets.0.insert(i, (id, Held { on_disk: before, now, logged_in: None, unlogged: true }));
                None
            }
        };
        self.change(id, old);
        self.added |= now & !before;
        if self.since.is_none() {
            self.since = Some(Instant::now());
        }
        if !old.is_some_and(|h| h.unlogged) {
            self.fresh.push(id);
        }
    }

    /// The rows from `first` to `last` go: what waits for them goes
    /// unwritten (their records in the log no longer match a row).
    /// `in_transaction`: a rollback may put it back.
    pub(super) fn forget(&mut self, first: u64, last: u64, in_transaction: bool) {
        // Mostly the lowest: found without a search.
        let span = self.sets.span(first, last);
        if span.is_empty() {
            return;
        }
        if in_transaction {
            self.note_rest();
            let undo = self.undo.as_mut().expect("just noted");
            undo.entries.extend(self.sets.0.drain(span).map(|(id, h)| (id, Some(h))));
        } else {
            self.sets.0.drain(span);
        }
        if self.sets.0.is_empty() {
            self.emptied();
        }
    }

    /// The rows from `first` to `last`, about to be written by a
    /// statement of the caller's transaction that can set their
    /// acknowledgements too, as [`write_runs`] would (the set each row
    /// held on disk, then the set now): when each of them waits, all with
    /// the same two sets, and none is in the log yet, they are taken (a
    /// rollback puts them back, as for [`HeldAcks::forget`]) and the two
    /// sets returned; else nothing changes. One in the log stays: the
    /// write that goes before the caller's statement empties the log,
    /// whose record would otherwise outlive the row's set (a requeue for
    /// receipts clears it; an open after a kill would give it back).
    pub(super) fn take_run(&mut self, first: u64, last: u64) -> Option<(u64, u64)> {
        let span = self.sets.span(first, last);
        if span.len() as u64 != last - first + 1 {
            return None;
        }
        let h = self.sets.0[span.start].1;
        let alike = |(_, o): &(u64, Held)| o.now == h.now && o.on_disk == h.on_disk && o.logged_in.is_none();
        if !self.sets.0.range(span).all(alike) {
            return None;
        }
        self.forget(first, last, true);
        Some((h.on_disk, h.now))
    }

    /// The lowest and the highest id whose held set gives its row `bit`,
    /// which its set on disk lacks: where a count of the rows lacking
    /// `bit` reads the rows to [`HeldAcks::patch`] instead of writing
    /// them first.
    pub(super) fn span_adding(&self, bit: u64) -> Option<(u64, u64)> {
        let adds = |(_, h): &&(u64, Held)| h.now & bit != 0 && h.on_disk & bit == 0;
        let first = self.sets.0.iter().find(adds)?.0;
        let last = self.sets.0.iter().rev().find(adds)?.0;
        Some((first, last))
    }

    /// Whether a read of the rows some broker in `mask` has not
    /// acknowledged could find other rows were they written: whether one
    /// of them added one of its bits. When not, such a read need not
    /// write them first: [`HeldAcks::patch`] gives each row it finds the
    /// set it would have read.
    pub(super) fn touch(&self, mask: u64) -> bool {
        self.added & mask != 0
    }

    /// `acks`, row `id`'s set as SQLite read it, as it would read it had
    /// its waiting set been written (the `UPDATE`'s own condition).
    pub(super) fn patch(&self, id: u64, acks: &mut u64) {
        if let Some(h) = self.sets.get(id) {
            if *acks & h.on_disk == h.on_disk && *acks | h.now == h.now {
                *acks = h.now;
            }
        }
    }

    /// At a commit (inside its transaction): logs what waited unlogged
    /// for [`ACKS_HELD_AT_MOST`] or more (the newer ones with it: one row
    /// for all), and writes into their rows the entries of log rows kept
    /// [`ACKS_LOGGED_AT_MOST`] (with those kept half as long: fewer,
    /// larger statements), removing those log rows.
    pub(super) fn write_due(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let now = Instant::now();
        if self.since.is_some_and(|t| t + self.hold <= now) {
            self.log(conn, now)?;
        }
        if let Some(&(oldest, at)) = self.rows.front() {
            if at + self.keep <= now {
                // At or after the oldest row's time (kept `keep` already).
                let cut = now - self.keep / 2;
                let last = self.rows.iter().take_while(|(_, t)| *t <= cut).last().map_or(oldest, |(n, _)| *n);
                self.fold(conn, Some(last))?;
            }
        }
        Ok(())
    }

    /// Writes every one of them into its row and empties the log of this
    /// connection's rows: before a statement that may read them, and
    /// when the store closes.
    pub(super) fn write(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        self.fold(conn, None)
    }

    /// One log row for every entry not yet logged.
    fn log(&mut self, conn: &Connection, now: Instant) -> rusqlite::Result<()> {
        self.note_rest();
        let mut ids = self.take_fresh();
        self.since = None;
        // Mostly in order already (a broker acknowledges in order).
        ids.sort_unstable();
        ids.dedup();
        // Their positions, found in one walk (both in id order); those
        // still there and unlogged.
        let mut at = Vec::with_capacity(ids.len());
        let mut i = ids.first().map_or(0, |&low| self.sets.find(low).unwrap_or_else(|i| i));
        for &id in &ids {
            while self.sets.0.get(i).is_some_and(|&(k, _)| k < id) {
                i += 1;
            }
            match self.sets.0.get(i) {
                Some(&(k, h)) if k == id && h.unlogged => at.push(i),
                Some(_) => {}
                None => break,
            }
        }
        // The vector serves the next ones (nothing was recorded since).
        ids.clear();
        if self.fresh.is_empty() {
            self.fresh = ids;
        }
        if at.is_empty() {
            return Ok(());
        }
        let mut entries = Vec::with_capacity(RECORD * 4);
        for (first, last, (old, new)) in runs(at.iter().map(|&i| {
            let (id, h) = self.sets.0[i];
            (id, (h.on_disk, h.now))
        })) {
            for v in [first, last, old, new] {
                entries.extend_from_slice(&v.to_le_bytes());
            }
        }
        conn.prepare_cached("INSERT INTO ack_log (entries) VALUES (?1)")?.execute([&entries])?;
        let n = conn.last_insert_rowid() as u64;
        for i in at {
            let (id, h) = self.sets.0[i];
            self.change(id, Some(h));
            self.sets.0[i].1 = Held { unlogged: false, logged_in: Some(h.logged_in.unwrap_or(n)), ..h };
        }
        if let Some(undo) = self.undo.as_mut() {
            undo.rows_added += 1;
        }
        self.rows.push_back((n, now));
        Ok(())
    }

    /// Writes into their rows the entries whose oldest record is in a
    /// log row up to `through` (every entry: `None`), one `UPDATE` per
    /// run of consecutive ids with the same sets, and removes those log
    /// rows. Only a row whose set still lies between the one it had
    /// when the acknowledgement came and the one now is written (see
    /// [`write_runs`]): another process may have committed a change since
    /// (a joined `pub`'s receipt sweep publishing a message again, which
    /// clears them), and that change stands. A row that is gone is not
    /// written either. When this fails they stay waiting, so that the
    /// commit fails too.
    fn fold(&mut self, conn: &Connection, through: Option<u64>) -> rusqlite::Result<()> {
        let goes = |h: &Held| through.is_none_or(|n| h.logged_in.is_some_and(|at| at <= n));
        let going: Vec<(u64, Held)> = self.sets.0.iter().filter(|(_, h)| goes(h)).copied().collect();
        write_runs(conn, runs(going.iter().map(|(id, h)| (*id, (h.on_disk, h.now)))))?;
        match through {
            Some(n) => conn.prepare_cached("DELETE FROM ack_log WHERE n <= ?1")?.execute([n])?,
            None if !self.rows.is_empty() => conn.prepare_cached("DELETE FROM ack_log")?.execute([])?,
            None => 0,
        };
        self.note_rest();
        if let Some(undo) = self.undo.as_mut() {
            undo.entries.extend(going.iter().map(|&(id, h)| (id, Some(h))));
        }
        self.sets.0.retain(|(_, h)| !goes(h));
        // The log rows go from the front (they are in the order written).
        let taken = match through {
            Some(n) => self.rows.iter().take_while(|(at, _)| *at <= n).count(),
            None => self.rows.len(),
        };
        if let Some(undo) = self.undo.as_mut() {
            let found = (self.rows.len() - undo.rows_added).min(taken);
            undo.rows_taken.extend(self.rows.range(..found));
            undo.rows_added -= taken - found;
        }
        self.rows.drain(..taken);
        if through.is_none() {
            self.emptied();
        }
        Ok(())
    }

    /// Whether a transaction changed them and ended with neither its
    /// commit nor its rollback.
    pub(super) fn left_open(&self) -> bool {
        self.undo.is_some()
    }

    /// The transaction's commit succeeded: its changes stand.
    pub(super) fn committed(&mut self) {
        if let Some(undo) = self.undo.take() {
            self.keep_spare(undo.entries);
        }
    }

    /// The transaction rolled back: what it changed is put back (what
    /// earlier, committed ones left stays: their acknowledgements came,
    /// and are written later).
    pub(super) fn rolled_back(&mut self) {
        let Some(mut undo) = self.undo.take() else { return };
        for (id, old) in undo.entries.drain(..).rev() {
            match old {
                Some(h) => self.sets.insert(id, h),
                None => self.sets.remove(id),
            };
        }
        self.keep_spare(undo.entries);
        self.since = undo.since;
        self.rows.truncate(self.rows.len() - undo.rows_added);
        for row in undo.rows_taken.into_iter().rev() {
            self.rows.push_front(row);
        }
        self.added = undo.added;
        match undo.fresh {
            Ok(fresh) => self.fresh = fresh,
            Err(len) => self.fresh.truncate(len),
        }
    }

    /// `id` is about to change in the transaction under way; it was `old`.
    fn change(&mut self, id: u64, old: Option<Held>) {
        self.note_rest();
        if let Some(undo) = self.undo.as_mut() {
            undo.entries.push((id, old));
        }
    }

    /// Takes `fresh`, leaving it empty (a rollback puts it back).
    fn take_fresh(&mut self) -> Vec<u64> {
        if let Some(undo) = self.undo.as_mut() {
            if undo.fresh.is_err() {
                undo.fresh = Ok(self.fresh.clone());
            }
        }
        std::mem::take(&mut self.fresh)
    }

    /// `entries`, emptied, for the next transaction (a vector grown
    /// unusually large is let go).
    fn keep_spare(&mut self, mut entries: Vec<(u64, Option<Held>)>) {
        entries.clear();
        if entries.capacity() <= 4096 {
            self.spare = entries;
        }
    }

    /// No entry is left: nothing waits to be logged, no bit was added.
    fn emptied(&mut self) {
        self.since = None;
        self.added = 0;
        self.take_fresh();
    }

    /// Before the transaction under way first changes them: what it
    /// found of the rest.
    fn note_rest(&mut self) {
        if self.undo.is_none() {
            let fresh = Err(self.fresh.len());
            let (since, added, entries) = (self.since, self.added, std::mem::take(&mut self.spare));
            self.undo = Some(Undo { entries, since, rows_added: 0, rows_taken: Vec::new(), fresh, added });
        }
    }
}

/// `entries` (ids ascending) as runs of consecutive ids with the same
/// value: (first, last, value).
fn runs<V: PartialEq + Copy>(entries: impl Iterator<Item = (u64, V)>) -> Vec<(u64, u64, V)> {
    let mut out: Vec<(u64, u64, V)> = Vec::new();
    for (id, v) in entries {
        match out.last_mut() {
            Some((_, last, same)) if *same == v && last.checked_add(1) == Some(id) => *last = id,
            _ => out.push((id, id, v)),
        }
    }
    out
}

/// One `UPDATE` per run: the rows from `first` to `last` that hold `old`
/// (or more of `new`: an earlier record of the log written) get `new`.
fn write_runs(conn: &Connection, runs: Vec<(u64, u64, (u64, u64))>) -> rusqlite::Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(
        "UPDATE outbox SET acks = ?4 WHERE id >= ?1 AND id <= ?2 AND acks & ?3 = ?3 AND acks | ?4 = ?4",
    )?;
    for (first, last, (old, new)) in runs {
        stmt.execute(rusqlite::params![first, last, old as i64, new as i64])?;
    }
    Ok(())
}

/// At open, before anything reads the outbox: the records of the
/// acknowledgement log are written into the rows they name, in the order
/// they were logged, and the log emptied. The log holds what a process
/// that ended without closing its store (a crash, a `kill -9`) had logged
/// and not yet written into its rows. A record of a row that is gone, or
/// that holds another set by now, changes nothing; a record that is not
/// 32 bytes (a damaged row) is skipped: its messages go again to the
/// brokers that had acknowledged them.
pub(super) fn write_log_at_open(conn: &Connection) -> rusqlite::Result<()> {
    let logged: Vec<Vec<u8>> = {
        let mut stmt = conn.prepare("SELECT entries FROM ack_log ORDER BY n")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    if logged.is_empty() {
        return Ok(());
    }
    let records = logged.iter().flat_map(|entries| entries.chunks_exact(RECORD)).map(|record| {
        let v = |i: usize| u64::from_le_bytes(record[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        (v(0), v(1), (v(2), v(3)))
    });
    let records: Vec<(u64, u64, (u64, u64))> = records.collect();
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let done = write_runs(conn, records).and_then(|()| conn.execute_batch("DELETE FROM ack_log; COMMIT"));
    if done.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(now: u64) -> Held {
        Held { on_disk: 0, now, logged_in: None, unlogged: true }
    }

    /// Entries that come out of order (a broker acknowledging out of
    /// order, a rollback putting some back) still sit in id order: every
    /// lookup and span after them finds what an ordered map would.
    #[test]
    fn held_entries_stay_in_id_order_whatever_order_they_come_in() {
        let mut sets = Sets::default();
        for id in [5, 7, 6, 1, 9, 3] {
            assert_eq!(sets.insert(id, held(id)), None);
        }
        assert_eq!(sets.insert(6, held(60)), Some(held(6)));
        let ids: Vec<u64> = sets.0.iter().map(|(k, _)| *k).collect();
        assert_eq!(ids, [1, 3, 5, 6, 7, 9]);
        assert_eq!(sets.get(6), Some(&held(60)));
        assert_eq!(sets.get(9), Some(&held(9)));
        assert_eq!((sets.get(4), sets.get(0), sets.get(10)), (None, None, None));
        assert_eq!(sets.span(2, 6), 1..4);
        assert_eq!(sets.span(1, 1), 0..1);
        assert_eq!(sets.span(0, 0), 0..0);
        assert_eq!(sets.span(4, 4), 2..2);
        assert_eq!(sets.span(8, 100), 5..6);
        assert_eq!(sets.span(10, 20), 6..6);
        assert_eq!(sets.remove(5), Some(held(5)));
        assert_eq!(sets.remove(5), None);
        assert_eq!(sets.span(2, 6), 1..3);
    }
}
