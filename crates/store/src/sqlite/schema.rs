//! The on-disk format: the tables (docs/design.md, "The outbox on disk"),
//! the migrations from older formats, and the settings every connection
//! gets (WAL, `synchronous=FULL`).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use crate::StoreError;

/// The on-disk format version (docs/design.md, "Outbox format").
pub const FORMAT_VERSION: u32 = 9;

/// The outbox table of the current format, named `$name` (a macro: the
/// schema and the conversion to format 7 are literals built from it).
/// Ids are handed out by the store (format 7), above `ids.last`: no
/// AUTOINCREMENT, whose bookkeeping cost each insert a read and a write of
/// `sqlite_sequence`. `acks` has no default, so that an INSERT that
/// leaves the id to SQLite (an older release's guest still connected
/// while its holder's successor converts the file) fails instead of
/// taking an id that may have been handed out before (a trigger that
/// refused it cost 4,000 instructions per insert). A later format that
/// changes this table must give [`MIGRATE_6_TO_7`] its own copy of format
/// 7's first.
macro_rules! outbox_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE ",
            $name,
            " (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    props BLOB,
    created_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    route TEXT,
    acks INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    expires_ms INTEGER,
    priority INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    latest INTEGER NOT NULL DEFAULT 0,
    receipts TEXT,
    awaiting_ms INTEGER,
    acked_ms INTEGER,
    resends INTEGER NOT NULL DEFAULT 0
);
"
        )
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
",
    outbox_table!("IF NOT EXISTS outbox"),
    "-- Receipts that count towards a message's rule, by consumer (only for
-- rules that need more than one).
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER NOT NULL,
    by TEXT NOT NULL,
    PRIMARY KEY (id, by)
) WITHOUT ROWID;
-- One row per open QoS 2 exchange: (message, broker slot) -> packet id.
CREATE TABLE IF NOT EXISTS wire (
    id INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    PRIMARY KEY (id, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (url TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS missed (url TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS drops (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- The newest messages dropped undelivered, and why (the drop log).
CREATE TABLE IF NOT EXISTS dropped (id INTEGER PRIMARY KEY, reason TEXT NOT NULL, at_ms INTEGER NOT NULL);
-- The consumer's inbox (G5): identities already handled, as runs of a
-- producer's consecutive sequence numbers recorded together (format 6),
-- which never overlap.
CREATE TABLE IF NOT EXISTS inbox_ranges (
    producer TEXT NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    handled_ms INTEGER NOT NULL,
    PRIMARY KEY (producer, first)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- The highest id ever handed out (format 7): ids are the producer's
-- sequence numbers and are never handed out twice, even once every row
-- is gone. Written in the commit that hands an id out.
CREATE TABLE IF NOT EXISTS ids (k INTEGER PRIMARY KEY CHECK (k = 0), last INTEGER NOT NULL);
-- A bridge's source brokers, numbered (format 7), and its source
-- deliveries as a log (format 8): one row per transaction that recorded
-- any, each record 24 bytes (key = number << 16 | packet id, the content
-- digest, the message it became; little-endian), a later record of a key
-- replacing an earlier one; a row goes when none of its records stands.
-- A row per record cost a tenth of a bridged message's instructions
-- (docs/performance.md, sessions 12 and 15).
CREATE TABLE IF NOT EXISTS source_brokers (n INTEGER PRIMARY KEY, url TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS source_log (n INTEGER PRIMARY KEY, entries BLOB NOT NULL);
-- Brokers' acknowledgements that did not finish their message (in
-- fanout, the first broker's), logged before they are written into their
-- rows (format 9): one row per commit that logged any, each record 32
-- bytes (a run of consecutive ids, the set its rows held, the set now;
-- little-endian). Written into the rows at open, and by the process
-- that logged them within a second unless the rows go first.
CREATE TABLE IF NOT EXISTS ack_log (n INTEGER PRIMARY KEY, entries BLOB NOT NULL);
-- Messages moved aside as poison (their outbox route is '@poison'): their
-- own route, the broker slot whose links they ended (how often) or that
-- refused them for good (with this MQTT 5 reason code), when. The code
-- came later: an older `poison` table gets it at open ([`POISON_CODE`]).
CREATE TABLE IF NOT EXISTS poison (
    id INTEGER PRIMARY KEY,
    route TEXT,
    slot INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    code INTEGER
);
-- What is queued (not done): count and bytes, kept in the same commits
-- as the rows, so that opening a large backlog reads one row, not all.
CREATE TABLE IF NOT EXISTS summary (
    k INTEGER PRIMARY KEY CHECK (k = 0),
    queued INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS brokers (
    url TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_error TEXT,
    since_ms INTEGER NOT NULL,
    acked INTEGER NOT NULL,
    connects INTEGER NOT NULL,
    retry_ms INTEGER,
    active INTEGER NOT NULL DEFAULT 0
);
"
);

/// Format 1 kept one QoS 2 binding per message in the outbox row (one
/// broker per client). It moves to the `wire` table under slot 0, which
/// goes to the broker format 1 last recorded (the only one it could use).
const MIGRATE_1_TO_2: &str = "
ALTER TABLE outbox ADD COLUMN route TEXT;
ALTER TABLE outbox ADD COLUMN acks INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN done INTEGER NOT NULL DEFAULT 0;
INSERT INTO wire (id, slot, pid, stage) SELECT id, 0, pid, stage FROM outbox WHERE pid IS NOT NULL AND stage IS NOT NULL;
DROP INDEX IF EXISTS outbox_bound;
ALTER TABLE outbox DROP COLUMN pid;
ALTER TABLE outbox DROP COLUMN stage;
ALTER TABLE brokers ADD COLUMN retry_ms INTEGER;
ALTER TABLE brokers ADD COLUMN active INTEGER NOT NULL DEFAULT 0;
INSERT OR IGNORE INTO slots (url, slot) SELECT url, 0 FROM brokers ORDER BY since_ms DESC LIMIT 1;
UPDATE meta SET value = '2' WHERE key = 'format';
";

/// Format 3 adds the delivery policy of each message: deadline, priority,
/// retry budget and the attempts so far, keep-latest. Old messages get the
/// defaults (persistent, priority 0, no budget).
const MIGRATE_2_TO_3: &str = "
ALTER TABLE outbox ADD COLUMN expires_ms INTEGER;
ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN max_attempts INTEGER;
ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN latest INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET value = '3' WHERE key = 'format';
";

/// Counts what is queued into `summary`: once when an outbox of format 3
/// is converted, and after a salvage copied rows in.
const RECOUNT: &str = "
INSERT OR REPLACE INTO summary (k, queued, bytes) SELECT 0, count(*), coalesce(sum(size), 0) FROM outbox WHERE done = 0;
";

/// Format 4 keeps the queued count and bytes in `summary` (counted by
/// [`RECOUNT`] first).
const MIGRATE_3_TO_4: &str = "
UPDATE meta SET value = '4' WHERE key = 'format';
";

/// Format 5 adds end-to-end receipts: the rule a message asks its
/// consumers for, when its wait for them ends (set while it awaits them),
/// when a broker first acknowledged it, and its resends for lack of one.
const MIGRATE_4_TO_5: &str = "
ALTER TABLE outbox ADD COLUMN receipts TEXT;
ALTER TABLE outbox ADD COLUMN awaiting_ms INTEGER;
ALTER TABLE outbox ADD COLUMN acked_ms INTEGER;
ALTER TABLE outbox ADD COLUMN resends INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET value = '5' WHERE key = 'format';
";

/// Format 6 keeps the inbox as ranges: one row per run of a producer's
/// consecutive sequence numbers recorded together, instead of one per
/// identity. The identities of format 5 are joined into the runs they form
/// (each run as old as its newest identity). An outbox of format 2 or
/// older may have no inbox table: it is made empty first.
const MIGRATE_5_TO_6: &str = "
CREATE TABLE IF NOT EXISTS inbox (producer TEXT NOT NULL, seq INTEGER NOT NULL, handled_ms INTEGER NOT NULL, PRIMARY KEY (producer, seq)) WITHOUT ROWID;
INSERT OR IGNORE INTO inbox_ranges (producer, first, last, handled_ms)
    SELECT producer, min(seq), max(seq), max(handled_ms)
    FROM (SELECT producer, seq, handled_ms, seq - row_number() OVER (PARTITION BY producer ORDER BY seq) AS run FROM inbox)
    GROUP BY producer, run;
DROP TABLE inbox;
UPDATE meta SET value = '6' WHERE key = 'format';
";

/// Format 7 hands ids out itself: the outbox is copied into a table
/// without AUTOINCREMENT, the highest id handed out moves from
/// `sqlite_sequence` to `ids`, and the bridge's source records get integer
/// keys (their broker URLs numbered in `source_brokers`). An outbox of
/// format 5 or older may have no `sources` table: it is made empty first.
const MIGRATE_6_TO_7: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS source_records (k INTEGER PRIMARY KEY, digest INTEGER NOT NULL, id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sources (url TEXT NOT NULL, pid INTEGER NOT NULL, digest INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (url, pid)) WITHOUT ROWID;
INSERT OR REPLACE INTO ids (k, last) SELECT 0, max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0), coalesce((SELECT max(id) FROM outbox), 0));
",
    outbox_table!("outbox_7"),
    "INSERT INTO outbox_7 SELECT id, topic, payload, qos, retain, props, created_ms, size, route, acks, done, expires_ms, priority, max_attempts, attempts, latest, receipts, awaiting_ms, acked_ms, resends FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_7 RENAME TO outbox;
INSERT INTO source_brokers (url) SELECT DISTINCT url FROM sources ORDER BY url;
INSERT INTO source_records (k, digest, id) SELECT (b.n << 16) | s.pid, s.digest, s.id FROM sources s JOIN source_brokers b ON b.url = s.url;
DROP TABLE sources;
UPDATE meta SET value = '7' WHERE key = 'format';
"
);

/// Format 8 keeps a bridge's source records as a log, one row per
/// transaction: format 7's `source_records` (one row per record) become
/// one row of it ([`super::sources::convert_records`], run after this).
const MIGRATE_7_TO_8: &str = "
UPDATE meta SET value = '8' WHERE key = 'format';
";

/// Format 9 logs brokers' acknowledgements before writing them into
/// their rows (`ack_log`, made by the schema): an older release would
/// not read the log, and would send those messages again to the brokers
/// that had acknowledged them.
const MIGRATE_8_TO_9: &str = "
UPDATE meta SET value = '9' WHERE key = 'format';
";

/// The reason code of a refusal for good, beside a poisoned message. A
/// nullable column, added in place within format 9: a release from before
/// it reads and writes the table as it did (its poison shows no code).
const POISON_CODE: &str = "ALTER TABLE poison ADD COLUMN code INTEGER;";

/// See [`RECOUNT`].
pub(super) fn recount(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(RECOUNT)
}

/// Indexes on the format 3 columns, made once the table has them. Partial:
/// messages without a deadline, keep-latest or priority cost nothing.
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS outbox_expiry ON outbox (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_latest ON outbox (topic) WHERE latest = 1;
CREATE INDEX IF NOT EXISTS outbox_priority ON outbox (priority, id) WHERE priority != 0;
CREATE INDEX IF NOT EXISTS outbox_route ON outbox (route) WHERE route IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_awaiting ON outbox (awaiting_ms) WHERE awaiting_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_receipts ON outbox (id) WHERE receipts IS NOT NULL;
";

pub(super) fn open_connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: a commit appends to one file and syncs it once; readers (status)
    // never block the writer. FULL: the sync happens at every commit, which
    // is what makes "accepted" mean "on disk" (G1).
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    debug_assert_eq!(mode.to_lowercase(), "wal");
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")?;
    // Plans that do not look at bound values. Without this, SQLite marks a
    // statement whose plan read a bound value (a `LIMIT ?`, a `col = ?`
    // filter) to be prepared again whenever its bindings are cleared, and
    // rusqlite clears them each time a cached statement goes back to its
    // cache: such statements were parsed again at every use
    // (docs/performance.md, session 9).
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Room for every statement the writer runs (rusqlite keeps 16): one
    // pushed out is parsed again at its next use.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

pub(super) fn init_schema(conn: &Connection, dir: &Path) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    let found: Option<String> =
        conn.query_row("SELECT value FROM meta WHERE key='format'", [], |r| r.get(0)).optional()?;
    match found.and_then(|v| v.parse::<u32>().ok()) {
        None => {
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?1)", [FORMAT_VERSION.to_string()])?;
            conn.execute("INSERT OR IGNORE INTO summary (k, queued, bytes) VALUES (0, 0, 0)", [])?;
        }
        Some(v) if v > FORMAT_VERSION => {
            let path = dir.to_owned();
            return Err(StoreError::FormatTooNew { path, found: v, supported: FORMAT_VERSION });
        }
        Some(v) if v < FORMAT_VERSION => {
            let steps = [
                MIGRATE_1_TO_2,
                MIGRATE_2_TO_3,
                RECOUNT,
                MIGRATE_3_TO_4,
                MIGRATE_4_TO_5,
                MIGRATE_5_TO_6,
                MIGRATE_6_TO_7,
                MIGRATE_7_TO_8,
                MIGRATE_8_TO_9,
            ];
            // Each step from format v on; the recount belongs to 3 -> 4.
            let from = match v.max(1) {
                1 => 0,
                2 => 1,
                3 => 2,
                4 => 4,
                5 => 5,
                6 => 6,
                7 => 7,
                _ => 8,
            };
            let sql: String = steps[from..].concat();
            let convert = || {
                conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql}"))?;
                super::sources::convert_records(conn)?;
                conn.execute_batch("COMMIT")
            };
            convert().inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })?;
            tracing::info!(dir = %dir.display(), from = v, to = FORMAT_VERSION, "outbox converted to the current format");
        }
        Some(_) => {}
    }
    conn.execute("INSERT OR IGNORE INTO ids (k, last) VALUES (0, 0)", [])?;
    let has_code: bool =
        conn.query_row("SELECT count(*) FROM pragma_table_info('poison') WHERE name = 'code'", [], |r| r.get(0))?;
    if !has_code {
        conn.execute_batch(POISON_CODE)?;
    }
    conn.execute_batch(INDEXES)?;
    Ok(())
}
