//! The tail: the newest messages of the outbox, kept in memory as this
//! connection inserted them, so that a link that keeps up reads its next
//! page, and a broker's acknowledgement finds what it acknowledges,
//! without going back to SQLite (a page read and an acknowledgement's read
//! were a quarter of the instructions of a published message,
//! docs/performance.md).
//!
//! What it promises, while it is known (`floor` is `Some`): every row
//! with an id above the floor that a read of queued messages can return
//! (not done, not awaiting receipts) is among its rows, as the database
//! holds it, and every one of its rows is such a row. Each operation of
//! the store keeps that true or forgets the tail: a rollback, another
//! connection's commit (seen by `PRAGMA data_version` before the tail is
//! trusted), an id handed out by someone else in between, a change it does
//! not follow (a route, a requeue, slots). A forgotten tail starts again
//! at the next insert; until then, everything is read from SQLite.
//!
//! Below the floor, it also keeps the rows that pages read from SQLite
//! returned (`paged`): a backlog larger than the tail is sent from such
//! pages, and the brokers' acknowledgements of them find what they
//! acknowledge here instead of reading each run back (about 2,300 of a
//! bridged message's 46,700 instructions in that regime,
//! docs/performance.md). The promise for
//! those is narrower: each is as the database holds it, while the tail is
//! known; they are forgotten with the tail, and follow the same
//! operations (a row that leaves, changes, or is acknowledged).
//!
//! Where a page that no broker's mask thinned out read them, they are also
//! *complete* (`covered`): every row of that stretch of ids a read can
//! return is kept, so that another broker's link reads the same stretch
//! here, whatever its mask, instead of from SQLite again (in fanout each
//! message was read from SQLite once per broker, docs/performance.md,
//! session 34). A change to a row the tail does not follow, or a row not
//! kept, ends the stretch below it; rows that leave (deleted, done,
//! awaiting receipts) do not, being rows no read returns.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::rows::RowState;
use crate::{Entry, NewMessage, ReadLimit, StoredMessage};

/// The most rows the tail keeps; the oldest go first.
const MAX_ROWS: usize = 16_384;
/// The most bytes (topics and payloads) the tail keeps.
const MAX_BYTES: u64 = 8 << 20;
/// The most bytes of rows read from SQLite kept for their
/// acknowledgements (as many rows as the tail keeps); the lowest ids go
/// first.
const MAX_PAGED_BYTES: u64 = 8 << 20;

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Tail {
    /// Rows above this id are all here (see the module); `None`: unknown.
    floor: Option<u64>,
    /// The highest id inserted through this tail (or its floor).
    last: u64,
    /// Ascending by id.
    rows: VecDeque<StoredMessage>,
    bytes: u64,
    /// Rows at or below the floor as a page read them (see the module).
    paged: BTreeMap<u64, Paged>,
    paged_bytes: u64,
    /// A stretch of ids whose readable rows of one priority level are
    /// all in `paged` (see the module).
    covered: Option<Covered>,
    /// Turned off (a guest or read-only handle, or a test comparing).
    off: bool,
    /// The most rows kept, and the most kept from pages.
    max_rows: usize,
}

impl Default for Tail {
    fn default() -> Tail {
        Tail::of(MAX_ROWS)
    }
}

/// A row below the floor that a page read from SQLite: the message, its
/// acknowledgements, its attempts, and what else its row said.
#[derive(Debug)]
struct Paged {
    msg: Arc<NewMessage>,
    acks: u64,
    attempts: u32,
    row: RowState,
}

/// Ids above `after` up to `last` whose rows that a read with priority
/// `priority` returns (unacknowledged by the reader's broker or not) are
/// all in `paged`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Covered {
    after: u64,
    last: u64,
    priority: Option<u8>,
}

impl Tail {
    /// A tail of at most `max_rows` rows (tests reach the bounds with
    /// it), and as many kept from pages.
    pub(super) fn of(max_rows: usize) -> Tail {
        Tail {
            floor: None,
            last: 0,
            rows: VecDeque::new(),
            bytes: 0,
            paged: BTreeMap::new(),
            paged_bytes: 0,
            covered: None,
            off: false,
            max_rows,
        }
    }

    /// A tail that never holds anything.
    pub(super) fn off() -> Tail {
        Tail { off: true, ..Tail::default() }
    }

    /// Forgets everything: reads go to SQLite until the next insert.
    pub(super) fn forget(&mut self) {
        self.floor = None;
        self.rows.clear();
        self.bytes = 0;
        self.paged.clear();
        self.paged_bytes = 0;
        self.covered = None;
    }

    /// Whether the tail vouches for anything now.
    pub(super) fn is_known(&self) -> bool {
        self.floor.is_some()
    }

    /// Whether `id` is above the floor (a row the tail answers for).
    fn covers(&self, id: u64) -> bool {
        self.floor.is_some_and(|f| id > f)
    }

    /// `m` was inserted as `id` by this connection. An id that does not
    /// follow the last one means that another connection inserted in
    /// between: the tail starts again above what it cannot vouch for
    /// (nothing above `id - 1` but `id` can exist, the id being new).
    pub(super) fn inserted(&mut self, id: u64, m: Arc<NewMessage>) {
        if self.off {
            return;
        }
        // A row that a read from SQLite drops as unreadable (only the
        // store's own users can write one) stays where that happens.
        let p = &m.policy;
        if super::rows::policy_problem(p.priority.into(), p.max_attempts.map(i64::from), 0).is_some() {
            self.forget();
            return;
        }
        if self.floor.is_none() || id != self.last + 1 {
            self.forget();
            self.floor = Some(id - 1);
        }
        self.last = id;
        self.bytes += m.size();
        self.rows.push_back(StoredMessage { id, msg: m, wire: None, acks: 0, attempts: 0 });
        while self.rows.len() > self.max_rows || self.bytes > MAX_BYTES {
            let Some(old) = self.rows.pop_front() else { break };
            self.bytes -= old.msg.size();
            self.floor = Some(old.id);
        }
    }

    fn position(&self, id: u64) -> Result<usize, usize> {
        // Ids are consecutive until something leaves from the middle: the
        // offset from the first is usually the place.
        let first = self.rows.front().map_or(0, |r| r.id);
        let guess = id.checked_sub(first).and_then(|d| usize::try_from(d).ok());
        if let Some(i) = guess.filter(|i| self.rows.get(*i).is_some_and(|r| r.id == id)) {
            return Ok(i);
        }
        self.rows.binary_search_by_key(&id, |r| r.id)
    }

    /// The row `id` left what reads return (deleted, done, awaiting
    /// receipts).
    pub(super) fn left(&mut self, id: u64) {
        if !self.covers(id) {
            // No read returns it now: a stretch it was in stays whole.
            self.drop_paged(id);
        } else if let Ok(i) = self.position(id) {
            if let Some(old) = self.rows.remove(i) {
                self.bytes -= old.msg.size();
            }
        }
    }

    /// The row `id` changed in a way the tail does not follow.
    pub(super) fn changed(&mut self, id: u64) {
        if self.covers(id) {
            self.forget();
        } else {
            self.unpage(id);
        }
    }

    /// The row `id` holds these acknowledgements now.
    pub(super) fn acked(&mut self, id: u64, acks: u64) {
        if !self.covers(id) {
            if let Some(p) = self.paged.get_mut(&id) {
                p.acks = acks;
            }
        } else if let Ok(i) = self.position(id) {
            self.rows[i].acks = acks;
        }
    }

    /// `m`, whose row says `row` besides, was read from SQLite just now,
    /// by a read of queued messages (not done, not awaiting receipts):
    /// kept if the tail is known and it lies at or below the floor.
    /// Returns whether the tail holds it now (a row above the floor is
    /// among its own rows).
    pub(super) fn paged(&mut self, m: &StoredMessage, row: RowState) -> bool {
        self.drop_paged(m.id);
        if self.covers(m.id) {
            return true;
        }
        // One message past the bound alone is not kept: it would push out
        // every other first.
        if self.floor.is_none() || m.msg.size() > MAX_PAGED_BYTES {
            self.cut(m.id);
            return false;
        }
        self.paged_bytes += m.msg.size();
        self.paged.insert(m.id, Paged { msg: m.msg.clone(), acks: m.acks, attempts: m.attempts, row });
        while self.paged.len() > self.max_rows || self.paged_bytes > MAX_PAGED_BYTES {
            let Some((old_id, old)) = self.paged.pop_first() else { break };
            self.paged_bytes -= old.msg.size();
            self.cut(old_id);
        }
        true
    }

    /// Any copy of `id` kept from a page goes (it changed, or a page read
    /// it but not what keeping it needs): a read may return it, from
    /// SQLite only, so a stretch it was in ends above it.
    pub(super) fn unpage(&mut self, id: u64) {
        self.drop_paged(id);
        self.cut(id);
    }

    fn drop_paged(&mut self, id: u64) {
        if let Some(old) = self.paged.remove(&id) {
            self.paged_bytes -= old.msg.size();
        }
    }

    /// Row `id` is not vouched for in `paged`: the stretch that held it
    /// starts above it.
    fn cut(&mut self, id: u64) {
        if let Some(c) = self.covered.as_mut() {
            if id > c.after && id <= c.last {
                c.after = id;
            }
            if c.after >= c.last {
                self.covered = None;
            }
        }
    }

    /// A page read from SQLite with no mask, every one of its rows held
    /// ([`Tail::paged`]), `first` to `last`: the rows above `after` up to
    /// `last` that a read with `priority` returns are all kept now (up to
    /// the floor; the tail's own rows are above it), unless keeping the
    /// later ones pushed out the first (the lowest ids go first). Joined
    /// to the stretch known so far when the two meet.
    pub(super) fn cover(&mut self, after: u64, first: u64, last: u64, priority: Option<u8>) {
        let Some(floor) = self.floor else { return };
        let last = last.min(floor);
        if last <= after || (first <= floor && !self.paged.contains_key(&first)) {
            return;
        }
        self.covered = match self.covered {
            Some(c) if c.priority == priority && after <= c.last && last >= c.after => {
                Some(Covered { after: c.after.min(after), last: c.last.max(last), priority })
            }
            _ => Some(Covered { after, last, priority }),
        };
    }

    /// A read of queued messages after `after` (as [`Tail::read_after`])
    /// answered from the rows kept from pages, when a stretch holds every
    /// row such a read returns from `after` on, and the page fills up
    /// within it or the stretch reaches the floor (the tail's own rows
    /// follow): `None` otherwise.
    pub(super) fn read_covered(
        &self,
        after: u64,
        limit: ReadLimit,
        mask: u64,
        priority: Option<u8>,
    ) -> Option<Vec<StoredMessage>> {
        let c = self.covered.filter(|c| c.priority == priority && c.after <= after && after < c.last)?;
        let wanted = |acks: u64, m: &NewMessage| returned(acks, m, mask, priority);
        let mut within = limit.cut();
        let mut page = Vec::new();
        for (&id, p) in self.paged.range(after + 1..=c.last) {
            if !wanted(p.acks, &p.msg) {
                continue;
            }
            if !within(p.msg.size()) {
                return Some(page);
            }
            page.push(StoredMessage { id, msg: p.msg.clone(), wire: None, acks: p.acks, attempts: p.attempts });
        }
        // The stretch ran out before the page filled up: the tail's rows
        // follow it only when it reaches the floor.
        if page.len() >= limit.count {
            return Some(page);
        }
        if self.floor != Some(c.last) {
            return None;
        }
        self.rows_into(0, mask, priority, &mut within, &mut page);
        Some(page)
    }

    /// The row `id` was sent once more.
    pub(super) fn attempted(&mut self, id: u64) {
        if !self.covers(id) {
            if let Some(p) = self.paged.get_mut(&id) {
                p.attempts += 1;
            }
        } else if let Ok(i) = self.position(id) {
            self.rows[i].attempts += 1;
        }
    }

    /// A read of queued messages after `after` (as `Store::read_after`),
    /// when the tail can answer it: only for a cursor at or above the
    /// floor. `mask`: the slot's bit (0 for none); `priority`: the level
    /// asked for, if any.
    pub(super) fn read_after(
        &self,
        after: u64,
        limit: ReadLimit,
        mask: u64,
        priority: Option<u8>,
    ) -> Option<Vec<StoredMessage>> {
        if self.floor? > after {
            return None;
        }
        let start = self.rows.partition_point(|r| r.id <= after);
        // Sized once: a filtered iterator gives collect no size to go by.
        let mut page = Vec::with_capacity(limit.count.min(self.rows.len() - start));
        self.rows_into(start, mask, priority, &mut limit.cut(), &mut page);
        Some(page)
    }

    /// The tail's own rows from position `start` that a read with `mask`
    /// and `priority` returns, onto `page` while `within` takes their
    /// sizes: the end of both readers' pages.
    fn rows_into(
        &self,
        start: usize,
        mask: u64,
        priority: Option<u8>,
        within: &mut impl FnMut(u64) -> bool,
        page: &mut Vec<StoredMessage>,
    ) {
        page.extend(
            self.rows
                .range(start..)
                .filter(|r| returned(r.acks, &r.msg, mask, priority))
                .take_while(|r| within(r.msg.size()))
                .cloned(),
        );
    }

    /// Where `id` stands, with its QoS, if the tail holds it: `None` also
    /// for a row above the floor that it does not hold (done or awaiting
    /// receipts, or gone: the caller asks SQLite), and for one at or below
    /// it that no page read lately.
    pub(super) fn entry(&self, id: u64) -> Option<(Entry, u8)> {
        // Fresh since its insert or its page read: a row that awaited
        // receipts, was done or requeued left the tail or made it forget
        // (and a row inserted by this connection was never requeued).
        let (m, acks, row) = if self.covers(id) {
            let r = &self.rows[self.position(id).ok()?];
            (&r.msg, r.acks, RowState { size: r.msg.size(), resends: 0, acked_ms: None })
        } else {
            let p = self.paged.get(&id)?;
            (&p.msg, p.acks, p.row)
        };
        let e = Entry {
            route: m.route.clone(),
            acks,
            done: false,
            bindings: 0,
            size: row.size,
            created_ms: m.created_ms,
            expires_ms: m.policy.expires_ms,
            receipts: m.receipts.clone(),
            awaiting_ms: None,
            acked_ms: row.acked_ms,
            resends: row.resends,
        };
        Some((e, m.qos as u8))
    }
}

/// Whether a read of queued messages for `mask`'s broker (0: any) at
/// `priority` (`None`: every level) returns a row with these
/// acknowledgements and this message.
fn returned(acks: u64, m: &NewMessage, mask: u64, priority: Option<u8>) -> bool {
    acks & mask == 0 && priority.is_none_or(|p| m.policy.priority == p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use steadfast_core::{Properties, Qos};

    fn msg(len: usize) -> NewMessage {
        NewMessage {
            topic: "t".into(),
            payload: vec![b'x'; len],
            qos: Qos::AtLeastOnce,
            retain: false,
            props: Properties::default(),
            created_ms: 1,
            route: None,
            policy: crate::Policy::default(),
            receipts: None,
        }
    }

    fn ids(page: Option<Vec<StoredMessage>>) -> Option<Vec<u64>> {
        page.map(|p| p.into_iter().map(|m| m.id).collect())
    }

    #[test]
    fn a_page_ends_at_the_message_that_reaches_its_bytes() {
        let mut t = Tail::default();
        // Each holds its topic's byte and its payload: 10, 20, 30, 40.
        for id in 1..=4 {
            t.inserted(id, Arc::new(msg(id as usize * 10 - 1)));
        }
        let read = |bytes| ids(t.read_after(0, ReadLimit { count: 3, bytes }, 0, None)).unwrap();
        assert_eq!(read(0), [1], "one message at least");
        assert_eq!(read(1), [1]);
        assert_eq!(read(10), [1]);
        assert_eq!(read(11), [1, 2]);
        assert_eq!(read(30), [1, 2]);
        assert_eq!(read(31), [1, 2, 3]);
        assert_eq!(read(u64::MAX), [1, 2, 3], "the count still bounds it");
        assert_eq!(ids(t.read_after(3, ReadLimit { count: 3, bytes: 1 }, 0, None)).unwrap(), [4]);
    }

    #[test]
    fn an_id_handed_out_elsewhere_in_between_moves_the_floor_above_it() {
        let mut t = Tail::default();
        assert_eq!(ids(t.read_after(0, ReadLimit::messages(10), 0, None)), None, "unknown until an insert");
        t.inserted(5, Arc::new(msg(1)));
        t.inserted(6, Arc::new(msg(1)));
        assert_eq!(ids(t.read_after(4, ReadLimit::messages(10), 0, None)), Some(vec![5, 6]));
        assert_eq!(ids(t.read_after(3, ReadLimit::messages(10), 0, None)), None, "below the floor: SQLite");
        // 7 and 8 went to another connection.
        t.inserted(9, Arc::new(msg(1)));
        assert_eq!(ids(t.read_after(6, ReadLimit::messages(10), 0, None)), None);
        assert_eq!(ids(t.read_after(8, ReadLimit::messages(10), 0, None)), Some(vec![9]));
        assert!(t.entry(6).is_none());
    }

    #[test]
    fn the_oldest_rows_go_first_past_the_bounds_and_take_the_floor_up() {
        let mut t = Tail::default();
        let big = (MAX_BYTES / 4) as usize;
        for id in 1..=5 {
            t.inserted(id, Arc::new(msg(big)));
        }
        assert!(t.bytes <= MAX_BYTES);
        assert_eq!(ids(t.read_after(0, ReadLimit::messages(10), 0, None)), None);
        let kept = ids(t.read_after(t.floor.unwrap(), ReadLimit::messages(10), 0, None)).unwrap();
        assert_eq!(kept, vec![3, 4, 5]);
        for id in 6..=(MAX_ROWS as u64 + 10) {
            t.inserted(id, Arc::new(msg(0)));
        }
        assert_eq!(t.rows.len(), MAX_ROWS);
        assert_eq!(t.floor, Some(10));
    }

    #[test]
    fn a_row_that_leaves_or_changes_is_followed() {
        let mut t = Tail::default();
        for id in 1..=4 {
            t.inserted(id, Arc::new(msg(2)));
        }
        t.acked(2, 0b10);
        t.attempted(3);
        t.left(4);
        assert_eq!(ids(t.read_after(0, ReadLimit::messages(10), 0b10, None)), Some(vec![1, 3]));
        assert_eq!(t.read_after(2, ReadLimit::messages(1), 0, None).unwrap()[0].attempts, 1);
        assert_eq!(t.entry(2).map(|(e, _)| e.acks), Some(0b10));
        assert_eq!(t.bytes, 3 * (1 + 2));
        t.changed(0);
        assert!(t.is_known(), "below the floor: not the tail's");
        t.changed(3);
        assert!(!t.is_known());
        assert!(t.entry(1).is_none());
    }

    #[test]
    fn a_row_that_sqlite_reads_as_unreadable_makes_it_forget() {
        let mut t = Tail::default();
        t.inserted(1, Arc::new(msg(1)));
        let mut bad = msg(1);
        bad.policy.priority = crate::MAX_PRIORITY + 1;
        t.inserted(2, Arc::new(bad));
        assert!(!t.is_known());
        t.inserted(3, Arc::new(msg(1)));
        assert_eq!(ids(t.read_after(1, ReadLimit::messages(10), 0, None)), None, "2 is below the floor: SQLite");
        assert_eq!(ids(t.read_after(2, ReadLimit::messages(10), 0, None)), Some(vec![3]));
    }

    fn stored(id: u64, m: NewMessage) -> StoredMessage {
        StoredMessage { id, msg: Arc::new(m), wire: None, acks: 0, attempts: 0 }
    }

    #[test]
    fn rows_a_page_read_below_the_floor_are_kept_for_their_acknowledgements() {
        let row = |size| RowState { size, resends: 0, acked_ms: None };
        let mut t = Tail::of(2);
        t.paged(&stored(1, msg(1)), row(2));
        assert!(t.entry(1).is_none(), "unknown tail: nothing kept");
        for id in 10..=13 {
            t.inserted(id, Arc::new(msg(1)));
        }
        assert_eq!(t.floor, Some(11));
        // Read back from SQLite: kept below the floor, as its row says.
        t.paged(&stored(10, msg(1)), row(7));
        t.paged(&stored(12, msg(1)), row(7));
        assert_eq!(t.entry(10).map(|(e, _)| e.size), Some(7));
        assert_eq!(t.entry(12).map(|(e, _)| e.size), Some(2), "the tail's own row");
        let mut asks = msg(1);
        asks.receipts = Some("1000 all a".into());
        t.paged(&stored(9, asks), RowState { size: 2, resends: 3, acked_ms: Some(5) });
        let (e, _) = t.entry(9).unwrap();
        assert_eq!((e.receipts.as_deref(), e.resends, e.acked_ms), (Some("1000 all a"), 3, Some(5)));
        // Followed: acknowledgements, rows that leave or change.
        t.acked(10, 0b1);
        assert_eq!(t.entry(10).map(|(e, _)| e.acks), Some(0b1));
        t.left(10);
        assert!(t.entry(10).is_none());
        t.paged(&stored(8, msg(1)), row(2));
        t.changed(8);
        assert!(t.entry(8).is_none());
        assert!(t.is_known(), "a change below the floor forgets that row only");
        // Bounded: the lowest ids go first.
        for id in 1..=5 {
            t.paged(&stored(id, msg(1)), row(2));
        }
        assert_eq!(t.paged.keys().copied().collect::<Vec<_>>(), vec![5, 9]);
        assert_eq!(t.paged_bytes, 2 * 2);
        t.forget();
        assert!(t.entry(5).is_none());
        assert_eq!(t.paged_bytes, 0);
    }

    /// A tail of `max_rows` with rows `inserted` inserted, then rows 1 to
    /// `paged` read back from a page below its floor.
    fn tail_with_pages(max_rows: usize, inserted: std::ops::RangeInclusive<u64>, paged: u64) -> Tail {
        let mut t = Tail::of(max_rows);
        for id in inserted {
            t.inserted(id, Arc::new(msg(1)));
        }
        for id in 1..=paged {
            assert!(t.paged(&stored(id, msg(1)), kept_row()));
        }
        t
    }

    fn kept_row() -> RowState {
        RowState { size: 2, resends: 0, acked_ms: None }
    }

    #[test]
    fn a_stretch_read_without_a_mask_answers_any_broker_until_something_breaks_it() {
        let all = ReadLimit::messages(10);
        let mut t = tail_with_pages(4, 1..=6, 2);
        assert_eq!(t.floor, Some(2));
        t.cover(0, 1, 2, None);
        // Followed by the tail's own rows above the floor.
        assert_eq!(ids(t.read_covered(0, all, 0b10, None)), Some(vec![1, 2, 3, 4, 5, 6]));
        assert_eq!(ids(t.read_covered(0, ReadLimit::messages(1), 0b10, None)), Some(vec![1]));
        assert_eq!(t.read_covered(0, all, 0b10, Some(0)), None, "another priority's stretch");
        // A broker's acknowledgement hides the row from its reads only.
        t.acked(1, 0b1);
        assert_eq!(ids(t.read_covered(0, all, 0b1, None)), Some(vec![2, 3, 4, 5, 6]));
        assert_eq!(ids(t.read_covered(0, all, 0b10, None)), Some(vec![1, 2, 3, 4, 5, 6]));
        // Attempts are followed below the floor too.
        t.attempted(2);
        assert_eq!(t.read_covered(1, all, 0, None).unwrap()[0].attempts, 1);
        // A row that no read returns now leaves the stretch whole.
        t.left(1);
        assert_eq!(ids(t.read_covered(0, all, 0, None)), Some(vec![2, 3, 4, 5, 6]));
        // A change it does not follow ends the stretch below that row.
        t.changed(2);
        assert_eq!(t.read_covered(0, all, 0, None), None);
        assert_eq!(t.covered, None, "nothing vouched for below the floor");
    }

    #[test]
    fn a_stretch_ends_where_rows_are_pushed_out_or_not_kept() {
        let all = ReadLimit::messages(10);
        let mut t = tail_with_pages(2, 10..=11, 2);
        assert_eq!(t.floor, Some(9));
        t.cover(0, 1, 2, None);
        // Short of the page and of the floor: not answered here.
        assert_eq!(t.read_covered(0, all, 0, None), None);
        assert_eq!(ids(t.read_covered(0, ReadLimit::messages(2), 0, None)), Some(vec![1, 2]));
        // The lowest id goes first past the bounds: the stretch starts
        // above it.
        t.paged(&stored(3, msg(1)), kept_row());
        t.cover(2, 3, 3, None);
        assert_eq!(t.covered, Some(Covered { after: 1, last: 3, priority: None }));
        assert_eq!(t.read_covered(0, ReadLimit::messages(2), 0, None), None);
        assert_eq!(ids(t.read_covered(1, ReadLimit::messages(2), 0, None)), Some(vec![2, 3]));
        // A page whose first row the later ones pushed out vouches for
        // nothing.
        for id in 5..=7 {
            t.paged(&stored(id, msg(1)), kept_row());
        }
        t.cover(4, 5, 7, None);
        assert_eq!(t.covered, None);
        // A row too large to keep, read again, breaks a stretch too.
        t.paged(&stored(6, msg(1)), kept_row());
        t.paged(&stored(7, msg(1)), kept_row());
        t.cover(5, 6, 7, None);
        assert!(t.covered.is_some());
        assert!(!t.paged(&stored(7, msg(MAX_PAGED_BYTES as usize + 1)), kept_row()));
        assert_eq!(t.covered, None);
        t.cover(5, 6, 6, None);
        t.forget();
        assert_eq!(t.covered, None);
    }

    #[test]
    fn a_tail_turned_off_holds_nothing() {
        let mut t = Tail::off();
        t.inserted(1, Arc::new(msg(1)));
        assert!(!t.is_known());
        assert_eq!(ids(t.read_after(0, ReadLimit::messages(10), 0, None)), None);
    }
}
