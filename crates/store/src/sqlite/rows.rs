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

pub(super) const SELECT_MESSAGE: &str = "SELECT outbox.id, topic, payload, qos, retain, props, created_ms, route, acks, NULL, NULL, expires_ms, priority, max_attempts, attempts, latest, receipts, size, resends, acked_ms FROM outbox";

pub(super) const SELECT_BOUND: &str = "SELECT outbox.id, topic, payload, qos, retain, props, created_ms, route, acks, wire.pid, wire.stage, expires_ms, priority, max_attempts, attempts, latest, receipts, outbox.size, resends, acked_ms FROM wire CROSS JOIN outbox ON outbox.id = wire.id";

/// What a row says of a message beyond [`StoredMessage`]: what the
/// outbox's tail keeps of a row a page read, for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowState {
    /// The size it counts against the bound.
    pub(super) size: u64,
    /// Times it was published again for lack of a receipt.
    pub(super) resends: u32,
    /// When a broker's acknowledgement first made it wait for receipts.
    pub(super) acked_ms: Option<u64>,
}

/// Runs a query of `SELECT_MESSAGE` or `SELECT_BOUND`: each message with
/// its [`RowState`] (`None` if those columns do not read as one: nothing
/// relies on it then). Records that do not decode are skipped and noted
/// in `unreadable`, so one damaged row never blocks the rest.
pub(super) fn read_messages(
    conn: &Connection,
    unreadable: &mut Vec<(u64, String)>,
    sql: &str,
    limit: crate::ReadLimit,
    params: impl rusqlite::Params,
) -> Result<Vec<(StoredMessage, Option<RowState>)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| {
        // Read as an acknowledgement's own read of the row would read them
        // (`queries::read_entry`); a row that read refuses is not kept (the
        // message's deadline, read leniently below, included).
        let state = match (r.get(17), r.get(18), r.get(19), r.get::<_, Option<u64>>(11)) {
            (Ok(size), Ok(resends), Ok(acked_ms), Ok(_)) => Some(RowState { size, resends, acked_ms }),
            _ => None,
        };
        Ok(row_to_message(r)?.map(|m| (m, state)))
    })?;
    let mut out = Vec::new();
    let mut within = limit.cut();
    for row in rows {
        match row? {
            Ok(m) if within(m.0.msg.size()) => out.push(m),
            Ok(_) => break,
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

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredMessage, StoreError>> {
    let id: u64 = r.get(0)?;
    let qos: u8 = r.get(3)?;
    let pid: Option<u16> = r.get(9)?;
    let stage: Option<i64> = r.get(10)?;
    let bad = |what: String| Err(StoreError::Malformed { id, what });
    let Some(qos) = Qos::from_u8(qos) else {
        return Ok(bad(format!("QoS {qos}")));
    };
    // Decoded from SQLite's own buffer: no copy of the encoded form.
    let props = match r.get_ref(5)?.as_blob_or_null()?.map(Properties::decode).transpose() {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => return Ok(bad(e.to_string())),
    };
    let priority: i64 = r.get(12)?;
    let max_attempts: Option<i64> = r.get(13)?;
    let attempts: i64 = r.get(14)?;
    if let Some(what) = policy_problem(priority, max_attempts, attempts) {
        return Ok(bad(what));
    }
    let wire = match (pid, stage.and_then(stage_from_sql)) {
        (Some(p), Some(s)) => Some((p, s)),
        _ => None,
    };
    let msg = NewMessage {
        topic: r.get(1)?,
        payload: r.get(2)?,
        qos,
        retain: r.get(4)?,
        props,
        created_ms: r.get(6)?,
        route: r.get(7)?,
        policy: Policy {
            expires_ms: r.get::<_, Option<i64>>(11)?.map(|e| e.max(0) as u64),
            priority: priority as u8,
            max_attempts: max_attempts.map(|m| m as u32),
            keep_latest: r.get::<_, i64>(15)? != 0,
        },
        receipts: r.get(16)?,
    };
    let acks = r.get::<_, i64>(8)? as u64;
    Ok(Ok(StoredMessage { id, msg: std::sync::Arc::new(msg), wire, acks, attempts: attempts as u32 }))
}
