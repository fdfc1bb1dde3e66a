//! Reading messages back: the two selects (queued messages, and those
//! bound to a QoS 2 exchange), the decoding of a row (one that does not
//! decode is skipped and noted, never fatal), and the codes of QoS 2
//! stages.

use rusqlite::Connection;
use steadfast_core::{Properties, Qos, Stage};

use crate::{NewMessage, Policy, StoreError, StoredMessage};

pub(super) fn stage_to_sql(s: Stage) -> i64 {
    match s {
        Stage::Published => 1,
        Stage::Released => 2,
    }
}

fn stage_from_sql(s: i64) -> Option<Stage> {
    match s {
        1 => Some(Stage::Published),
        2 => Some(Stage::Released),
        _ => None,
    }
}

/// The columns [`row_to_message`] reads, up to `size`, and a last one of
/// two flags: [`PLAIN`] and [`KEEPABLE`].
macro_rules! message_columns {
    ($pid:literal, $stage:literal) => {
        concat!(
            "SELECT outbox.id, topic, payload, qos, retain, props, created_ms, route, acks, ",
            $pid,
            ", ",
            $stage,
            ", expires_ms, priority, max_attempts, attempts, latest, receipts, outbox.size, ",
            "(route IS NULL AND expires_ms IS NULL AND priority = 0 AND max_attempts IS NULL AND attempts = 0 AND latest = 0 AND receipts IS NULL)",
            " | ((receipts IS NULL AND resends = 0 AND acked_ms IS NULL) << 1)"
        )
    };
}

/// The row's policy, route and receipt columns all hold their defaults
/// (most rows): they are not read one by one (a seventh of a page's cost).
const PLAIN: i64 = 1;
/// The row's receipt columns (not read) hold their defaults: what the
/// outbox's tail keeps of it from a page is all there is to know.
const KEEPABLE: i64 = 2;

pub(super) const SELECT_MESSAGE: &str = concat!(message_columns!("NULL", "NULL"), " FROM outbox");

pub(super) const SELECT_BOUND: &str =
    concat!(message_columns!("wire.pid", "wire.stage"), " FROM wire CROSS JOIN outbox ON outbox.id = wire.id");

/// Runs a query of `SELECT_MESSAGE` or `SELECT_BOUND`: each message with
/// the size its row counts against the bound, if the tail may keep it
/// (`None` for a row that waited for receipts, or whose size does not
/// read as one). Records that do not decode
/// are skipped and noted in `unreadable`, so one damaged row never blocks
/// the rest.
pub(super) fn read_messages(
    conn: &Connection,
    unreadable: &mut Vec<(u64, String)>,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(StoredMessage, Option<u64>)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| {
        let flags = r.get::<_, Option<i64>>(18)?.unwrap_or(0);
        let size = r.get::<_, i64>(17).ok().and_then(|s| u64::try_from(s).ok()).filter(|_| flags & KEEPABLE != 0);
        Ok(row_to_message(r, flags & PLAIN != 0)?.map(|m| (m, size)))
    })?;
    let mut out = Vec::new();
    for row in rows {
        match row? {
            Ok(m) => out.push(m),
            Err(StoreError::Malformed { id, what }) => unreadable.push((id, what)),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What makes a row's delivery policy unreadable, if anything: a priority
/// or retry budget out of range (such a row is dropped as corrupt; the
/// tail keeps none, so that it is read, and dropped, here).
pub(super) fn policy_problem(priority: i64, max_attempts: Option<i64>, attempts: i64) -> Option<String> {
    if !(0..=crate::MAX_PRIORITY as i64).contains(&priority) {
        return Some(format!("priority {priority}"));
    }
    if max_attempts.is_some_and(|m| !(1..=u32::MAX as i64).contains(&m)) || !(0..=u32::MAX as i64).contains(&attempts) {
        return Some(format!("retry budget {max_attempts:?}, attempts {attempts}"));
    }
    None
}

/// A row's policy and receipt columns: (policy, attempts, receipts, route).
type Extras = (Policy, i64, Option<String>, Option<String>);

/// The message of a row of `SELECT_MESSAGE` or `SELECT_BOUND`; `plain`:
/// its flag [`PLAIN`].
fn row_to_message(r: &rusqlite::Row<'_>, plain: bool) -> rusqlite::Result<Result<StoredMessage, StoreError>> {
    let id: u64 = r.get(0)?;
    let qos: u8 = r.get(3)?;
    let bad = |what: String| Err(StoreError::Malformed { id, what });
    let Some(qos) = Qos::from_u8(qos) else {
        return Ok(bad(format!("QoS {qos}")));
    };
    // Decoded from SQLite's own buffer: no copy of the encoded form.
    let props = match r.get_ref(5)?.as_blob_or_null()?.map(Properties::decode).transpose() {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => return Ok(bad(e.to_string())),
    };
    let (policy, attempts, receipts, route): Extras = if plain {
        (Policy::default(), 0, None, None)
    } else {
        let priority: i64 = r.get(12)?;
        let max_attempts: Option<i64> = r.get(13)?;
        let attempts: i64 = r.get(14)?;
        if let Some(what) = policy_problem(priority, max_attempts, attempts) {
            return Ok(bad(what));
        }
        let policy = Policy {
            expires_ms: r.get::<_, Option<i64>>(11)?.map(|e| e.max(0) as u64),
            priority: priority as u8,
            max_attempts: max_attempts.map(|m| m as u32),
            keep_latest: r.get::<_, i64>(15)? != 0,
        };
        (policy, attempts, r.get(16)?, r.get(7)?)
    };
    let pid: Option<u16> = r.get(9)?;
    let wire = match pid {
        Some(p) => r.get::<_, Option<i64>>(10)?.and_then(stage_from_sql).map(|s| (p, s)),
        None => None,
    };
    let msg = NewMessage {
        topic: r.get(1)?,
        payload: r.get(2)?,
        qos,
        retain: r.get(4)?,
        props,
        created_ms: r.get(6)?,
        route,
        policy,
        receipts,
    };
    let acks = r.get::<_, i64>(8)? as u64;
    Ok(Ok(StoredMessage { id, msg: std::sync::Arc::new(msg), wire, acks, attempts: attempts as u32 }))
}
