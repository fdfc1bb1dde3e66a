//! The in-memory store, for tests: the same transactions as the SQLite
//! one, and nothing survives the process.

use std::collections::{BTreeMap, HashMap};

use steadfast_core::{DropReason, Stage};

use crate::PoisonCause;

use crate::{
    BrokerRecord, Entry, InboxStore, NewMessage, ReadLimit, SourceStore, Store, StoreError, StoredMessage, Totals,
    MAX_SLOTS,
};

/// An outbox kept in memory, with the same transaction semantics as
/// [`crate::SqliteStore`] (a rollback undoes everything since `begin`). For
/// tests; it survives nothing.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    state: State,
    saved: Option<State>,
}

#[derive(Debug, Default, Clone)]
struct State {
    messages: BTreeMap<u64, Row>,
    /// (id, slot) -> binding.
    wire: BTreeMap<(u64, u32), (u16, Stage)>,
    slots: BTreeMap<String, u32>,
    missed: BTreeMap<String, u64>,
    inbox: BTreeMap<(String, u64), u64>,
    sources: BTreeMap<(String, u16), (u64, u64)>,
    counters: BTreeMap<String, u64>,
    next_id: u64,
    drops: HashMap<DropReason, u64>,
    drop_log: std::collections::BTreeMap<u64, DropReason>,
    meta: HashMap<String, String>,
    brokers: BTreeMap<String, BrokerRecord>,
    /// Poison: id -> (its own route, slot, why, when).
    poison: BTreeMap<u64, (Option<String>, u32, PoisonCause, u64)>,
    /// Receipts by message: the consumers that sent one.
    receipts: BTreeMap<u64, std::collections::BTreeSet<String>>,
}

#[derive(Debug, Clone)]
struct Row {
    msg: NewMessage,
    acks: u64,
    done: bool,
    attempts: u32,
    awaiting_ms: Option<u64>,
    acked_ms: Option<u64>,
    resends: u32,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.saved = Some(self.state.clone());
        Ok(())
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        self.saved = None;
        Ok(())
    }
    fn rollback(&mut self) {
        if let Some(s) = self.saved.take() {
            self.state = s;
        }
    }
    fn insert(&mut self, msg: &NewMessage) -> Result<u64, StoreError> {
        self.state.next_id += 1;
        let id = self.state.next_id;
        self.state.messages.insert(
            id,
            Row { msg: msg.clone(), acks: 0, done: false, attempts: 0, awaiting_ms: None, acked_ms: None, resends: 0 },
        );
        Ok(id)
    }
    fn entry(&mut self, id: u64) -> Result<Option<Entry>, StoreError> {
        let bindings = self.state.wire.range((id, 0)..=(id, u32::MAX)).count() as u32;
        Ok(self.state.messages.get(&id).map(|r| Entry {
            route: r.msg.route.clone(),
            acks: r.acks,
            done: r.done,
            bindings,
            size: r.msg.size(),
            created_ms: r.msg.created_ms,
            expires_ms: r.msg.policy.expires_ms,
            receipts: r.msg.receipts.clone(),
            awaiting_ms: r.awaiting_ms,
            acked_ms: r.acked_ms,
            resends: r.resends,
        }))
    }
    fn topic(&mut self, id: u64) -> Result<Option<String>, StoreError> {
        Ok(self.state.messages.get(&id).map(|r| r.msg.topic.clone()))
    }
    fn remove(&mut self, id: u64) -> Result<bool, StoreError> {
        self.state.wire.retain(|(i, _), _| *i != id);
        self.state.receipts.remove(&id);
        Ok(self.state.messages.remove(&id).is_some())
    }
    fn ack(&mut self, id: u64, slot: u32) -> Result<Option<Entry>, StoreError> {
        if let Some(r) = self.state.messages.get_mut(&id) {
            r.acks |= 1 << slot;
        }
        self.state.wire.remove(&(id, slot));
        self.entry(id)
    }
    fn set_done(&mut self, id: u64) -> Result<(), StoreError> {
        if let Some(r) = self.state.messages.get_mut(&id) {
            r.done = true;
            r.awaiting_ms = None;
        }
        Ok(())
    }
    fn asking_between(&mut self, first: u64, last: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let rows = self.state.messages.range(first..=last.max(first));
        Ok(rows.filter(|(_, r)| r.msg.receipts.is_some() && !r.done).map(|(id, _)| *id).take(limit).collect())
    }
    fn receipts_of(&mut self, id: u64) -> Result<Vec<String>, StoreError> {
        Ok(self.state.receipts.get(&id).map(|s| s.iter().cloned().collect()).unwrap_or_default())
    }
    fn clear_receipts(&mut self, id: u64) -> Result<(), StoreError> {
        self.state.receipts.remove(&id);
        Ok(())
    }
    fn await_receipts(&mut self, id: u64, due_ms: u64, now_ms: u64) -> Result<(), StoreError> {
        if let Some(r) = self.state.messages.get_mut(&id).filter(|r| !r.done) {
            r.awaiting_ms = Some(due_ms);
            r.acked_ms.get_or_insert(now_ms);
        }
        Ok(())
    }
    fn add_receipt(&mut self, id: u64, by: &str) -> Result<Vec<String>, StoreError> {
        let seen = self.state.receipts.entry(id).or_default();
        seen.insert(by.to_owned());
        Ok(seen.iter().cloned().collect())
    }
    fn receipts_due(&mut self, now_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let mut due: Vec<(u64, u64)> = (self.state.messages.iter())
            .filter(|(_, r)| !r.done)
            .filter_map(|(id, r)| r.awaiting_ms.filter(|d| *d <= now_ms).map(|d| (d, *id)))
            .collect();
        due.sort_unstable();
        Ok(due.into_iter().take(limit).map(|(_, id)| id).collect())
    }
    fn requeue_for_receipts(&mut self, id: u64) -> Result<(), StoreError> {
        if let Some(r) = self.state.messages.get_mut(&id).filter(|r| !r.done) {
            r.awaiting_ms = None;
            r.acks = 0;
            r.resends += 1;
        }
        Ok(())
    }
    fn awaiting(&mut self) -> Result<crate::Awaiting, StoreError> {
        let mut a = crate::Awaiting::default();
        for r in self.state.messages.values() {
            a.asking |= r.msg.receipts.is_some() && !r.done;
            let Some(due) = r.awaiting_ms.filter(|_| !r.done) else { continue };
            a.count += 1;
            a.oldest_acked_ms = a.oldest_acked_ms.into_iter().chain(r.acked_ms).min();
            a.next_due_ms = Some(a.next_due_ms.map_or(due, |d| d.min(due)));
        }
        Ok(a)
    }
    fn set_wire(&mut self, slot: u32, id: u64, wire: Option<(u16, Stage)>) -> Result<(), StoreError> {
        match wire {
            Some(w) if self.state.messages.contains_key(&id) => {
                // One exchange per packet id and broker.
                self.state.wire.retain(|(i, s), (pid, _)| *s != slot || *pid != w.0 || *i == id);
                self.state.wire.insert((id, slot), w);
            }
            Some(_) => {}
            None => {
                self.state.wire.remove(&(id, slot));
            }
        }
        Ok(())
    }
    fn read_page(
        &mut self,
        after: u64,
        page: ReadLimit,
        slot: Option<u32>,
        priority: Option<u8>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mask = slot.map_or(0, |s| 1u64 << s);
        let of = |r: &Row| priority.is_none_or(|p| r.msg.policy.priority == p);
        let range = self
            .state
            .messages
            .range(after + 1..)
            .filter(|(_, r)| !r.done && r.awaiting_ms.is_none() && r.acks & mask == 0 && of(r));
        let mut within = page.cut();
        let read = range.take_while(|(_, r)| within(r.msg.size()));
        Ok(read.map(|(id, r)| stored(*id, r, None)).collect())
    }
    fn newest_by_priority(&mut self) -> Result<Vec<(u8, u64)>, StoreError> {
        let mut top: BTreeMap<u8, u64> = BTreeMap::new();
        for (id, r) in self.state.messages.iter().filter(|(_, r)| !r.done) {
            top.insert(r.msg.policy.priority, *id);
        }
        Ok(top.into_iter().collect())
    }
    fn add_attempt(&mut self, id: u64) -> Result<(), StoreError> {
        if let Some(r) = self.state.messages.get_mut(&id) {
            r.attempts += 1;
        }
        Ok(())
    }
    fn expired(&mut self, cutoff_ms: u64, limit: usize) -> Result<Vec<u64>, StoreError> {
        let s = &self.state;
        let free = |id: u64| s.wire.range((id, 0)..=(id, u32::MAX)).next().is_none();
        let due = |id: u64, r: &Row| !r.done && r.msg.policy.expires_ms.is_some_and(|e| e <= cutoff_ms) && free(id);
        Ok(s.messages.iter().filter(|(id, r)| due(**id, r)).take(limit).map(|(id, _)| *id).collect())
    }
    fn next_expiry(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.state.messages.values().filter(|r| !r.done).filter_map(|r| r.msg.policy.expires_ms).min())
    }
    fn deadline_totals(&mut self) -> Result<Totals, StoreError> {
        let d = self.state.messages.values().filter(|r| !r.done && r.msg.policy.expires_ms.is_some());
        Ok(d.fold(Totals::default(), |t, r| Totals { count: t.count + 1, bytes: t.bytes + r.msg.size() }))
    }
    fn superseded(&mut self, topic: &str, route: Option<&str>) -> Result<Vec<u64>, StoreError> {
        let s = &self.state;
        let old = |id: u64, r: &Row| {
            !r.done
                && r.msg.policy.keep_latest
                && r.msg.topic == topic
                && r.msg.route.as_deref() == route
                && s.wire.range((id, 0)..=(id, u32::MAX)).next().is_none()
        };
        Ok(s.messages.iter().filter(|(id, r)| old(**id, r)).map(|(id, _)| *id).collect())
    }
    fn bound(&mut self, slot: u32) -> Result<Vec<StoredMessage>, StoreError> {
        let s = &self.state;
        let bound = s.wire.iter().filter(|((_, sl), _)| *sl == slot);
        Ok(bound.filter_map(|((id, _), w)| s.messages.get(id).map(|r| stored(*id, r, Some(*w)))).collect())
    }
    fn oldest(&mut self, limit: usize, deadline: Option<bool>) -> Result<Vec<(u64, u64)>, StoreError> {
        let of = |r: &Row| deadline.is_none_or(|d| r.msg.policy.expires_ms.is_some() == d);
        let it = self.state.messages.iter().filter(|(_, r)| !r.done && of(r)).take(limit);
        Ok(it.map(|(id, r)| (*id, r.msg.size())).collect())
    }
    fn last_id(&mut self) -> Result<u64, StoreError> {
        Ok(self.state.next_id)
    }
    fn newest_id(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.state.messages.keys().next_back().copied())
    }
    fn totals(&mut self) -> Result<Totals, StoreError> {
        let queued = self.state.messages.values().filter(|r| !r.done);
        let (count, bytes) = queued.fold((0, 0), |(c, b), r| (c + 1, b + r.msg.size()));
        Ok(Totals { count, bytes })
    }
    fn oldest_created_ms(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.state.messages.values().find(|r| !r.done).map(|r| r.msg.created_ms))
    }
    fn lapsed(
        &mut self,
        route: Option<&str>,
        mask: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let lapsed = |r: &Row| {
            !r.done
                && r.awaiting_ms.is_none()
                && r.msg.route.as_deref() == route
                && r.acks & mask != 0
                && r.msg.created_ms < cutoff_ms
        };
        let it = self.state.messages.iter().filter(|(_, r)| lapsed(r));
        Ok(it.take(limit).map(|(id, r)| (*id, r.acks)).collect())
    }
    fn routes(&mut self) -> Result<Vec<(Option<String>, u64)>, StoreError> {
        let mut counts: BTreeMap<Option<String>, u64> = BTreeMap::new();
        for r in self.state.messages.values().filter(|r| !r.done) {
            *counts.entry(r.msg.route.clone()).or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }
    fn retag(&mut self, from: Option<&str>, to: Option<&str>) -> Result<u64, StoreError> {
        let mut n = 0;
        for r in self.state.messages.values_mut().filter(|r| !r.done && r.msg.route.as_deref() == from) {
            r.msg.route = to.map(str::to_owned);
            n += 1;
        }
        Ok(n)
    }
    fn poison(&mut self, id: u64, slot: u32, cause: PoisonCause, at_ms: u64) -> Result<bool, StoreError> {
        let poisoned = |r: &&mut Row| r.done || r.msg.route.as_deref() == Some(crate::POISON_ROUTE);
        let Some(r) = self.state.messages.get_mut(&id).filter(|r| !poisoned(r)) else { return Ok(false) };
        let own = r.msg.route.replace(crate::POISON_ROUTE.to_owned());
        self.state.poison.insert(id, (own, slot, cause, at_ms));
        self.state.wire.remove(&(id, slot));
        Ok(true)
    }
    fn poisoned(&mut self) -> Result<Vec<crate::Poisoned>, StoreError> {
        let mut out = Vec::new();
        for (id, (_, slot, cause, at_ms)) in &self.state.poison {
            let Some(r) = self.state.messages.get(id).filter(|r| !r.done) else { continue };
            let broker = self.state.slots.iter().find(|(_, s)| *s == slot).map(|(u, _)| u.clone()).unwrap_or_default();
            out.push(crate::Poisoned {
                id: *id,
                topic: r.msg.topic.clone(),
                size: r.msg.size(),
                qos: r.msg.qos as u8,
                broker,
                cause: *cause,
                at_ms: *at_ms,
            });
        }
        Ok(out)
    }
    fn unpoison(&mut self, id: u64) -> Result<bool, StoreError> {
        let Some((own, ..)) = self.state.poison.remove(&id) else { return Ok(false) };
        let Some(r) = self.state.messages.get_mut(&id) else { return Ok(false) };
        r.msg.route = own;
        Ok(true)
    }
    fn lag(&mut self, slot: u32) -> Result<u64, StoreError> {
        let set_aside = |r: &Row| r.msg.route.as_deref().is_some_and(crate::set_aside);
        Ok(self.state.messages.values().filter(|r| !r.done && r.acks & (1 << slot) == 0 && !set_aside(r)).count()
            as u64)
    }
    fn assign_slots(&mut self, urls: &[String]) -> Result<Vec<u32>, StoreError> {
        let mut out = Vec::new();
        for url in urls {
            if let Some(s) = self.state.slots.get(url) {
                out.push(*s);
                continue;
            }
            let free = (0..MAX_SLOTS as u32).find(|s| !self.state.slots.values().any(|t| t == s));
            let slot = match free {
                Some(s) => s,
                None => {
                    let gone = self.state.slots.keys().find(|u| !urls.contains(u)).cloned();
                    let Some(gone) = gone else {
                        return Err(StoreError::WriteFailed(format!(
                            "more than {MAX_SLOTS} brokers configured at once"
                        )));
                    };
                    let slot = self.state.slots.remove(&gone).expect("found");
                    for r in self.state.messages.values_mut() {
                        r.acks &= !(1 << slot);
                    }
                    self.state.wire.retain(|(_, s), _| *s != slot);
                    slot
                }
            };
            self.state.slots.insert(url.clone(), slot);
            out.push(slot);
        }
        Ok(out)
    }
    fn slots(&mut self) -> Result<Vec<(String, u32)>, StoreError> {
        Ok(self.state.slots.iter().map(|(u, s)| (u.clone(), *s)).collect())
    }
    fn add_missed(&mut self, url: &str, n: u64) -> Result<(), StoreError> {
        *self.state.missed.entry(url.to_owned()).or_default() += n;
        Ok(())
    }
    fn missed(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.state.missed.iter().map(|(u, n)| (u.clone(), *n)).collect())
    }
    fn add_drop(&mut self, reason: DropReason, id: Option<u64>) -> Result<(), StoreError> {
        *self.state.drops.entry(reason).or_default() += 1;
        if let Some(id) = id {
            self.state.drop_log.insert(id, reason);
            while self.state.drop_log.len() as u64 > crate::DROP_LOG_KEEP {
                self.state.drop_log.pop_first();
            }
        }
        Ok(())
    }
    fn drop_log(&mut self) -> Result<Vec<(u64, DropReason)>, StoreError> {
        Ok(self.state.drop_log.iter().map(|(id, r)| (*id, *r)).collect())
    }
    fn drops(&mut self) -> Result<Vec<(DropReason, u64)>, StoreError> {
        let count = |r| self.state.drops.get(&r).copied().unwrap_or(0);
        Ok(DropReason::ALL.into_iter().map(|r| (r, count(r))).collect())
    }
    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.state.meta.get(key).cloned())
    }
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.state.meta.insert(key.into(), value.into());
        Ok(())
    }
    fn set_broker(&mut self, rec: &BrokerRecord) -> Result<(), StoreError> {
        self.state.brokers.insert(rec.url.clone(), rec.clone());
        Ok(())
    }
    fn brokers(&mut self) -> Result<Vec<BrokerRecord>, StoreError> {
        Ok(self.state.brokers.values().cloned().collect())
    }
}

impl InboxStore for MemoryStore {
    fn inbox_seen(&mut self, ids: &[(String, u64)]) -> Result<Vec<bool>, StoreError> {
        Ok(ids.iter().map(|id| self.state.inbox.contains_key(id)).collect())
    }
    fn inbox_high(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut high: BTreeMap<String, u64> = BTreeMap::new();
        for (p, s) in self.state.inbox.keys() {
            let h = high.entry(p.clone()).or_default();
            *h = (*h).max(*s);
        }
        Ok(high.into_iter().collect())
    }
    fn inbox_record_runs(&mut self, runs: &[crate::InboxRun], now_ms: u64) -> Result<(), StoreError> {
        for (p, first, last) in runs {
            for s in *first..=*last {
                self.state.inbox.entry((p.clone(), s)).or_insert(now_ms);
            }
        }
        Ok(())
    }
    fn inbox_prune(&mut self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        let before = self.state.inbox.len();
        self.state.inbox.retain(|_, t| *t >= before_ms);
        if keep == 0 {
            self.state.inbox.clear();
        } else if self.state.inbox.len() as u64 > keep {
            let mut times: Vec<u64> = self.state.inbox.values().copied().collect();
            times.sort_unstable_by(|a, b| b.cmp(a));
            let cut = times[keep as usize - 1];
            self.state.inbox.retain(|_, t| *t >= cut);
        }
        Ok((before - self.state.inbox.len()) as u64)
    }
    fn inbox_len(&mut self) -> Result<u64, StoreError> {
        Ok(self.state.inbox.len() as u64)
    }
    fn inbox_bytes(&mut self) -> Result<u64, StoreError> {
        Ok(self.state.inbox.keys().map(|(p, _)| p.len() as u64 + crate::INBOX_ENTRY_BYTES).sum())
    }
    fn add_counter(&mut self, name: &str, n: u64) -> Result<(), StoreError> {
        *self.state.counters.entry(name.to_owned()).or_default() += n;
        Ok(())
    }
    fn counters(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self.state.counters.iter().map(|(k, v)| (k.clone(), *v)).collect())
    }
}

impl SourceStore for MemoryStore {
    fn source_record(&mut self, url: &str, pid: u16, digest: u64, id: u64) -> Result<(), StoreError> {
        self.state.sources.insert((url.to_owned(), pid), (digest, id));
        Ok(())
    }
    fn source_seen(&mut self, url: &str, pid: u16, digest: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.state.sources.get(&(url.to_owned(), pid)).filter(|(d, _)| *d == digest).map(|(_, id)| *id))
    }
}

fn stored(id: u64, r: &Row, wire: Option<(u16, Stage)>) -> StoredMessage {
    StoredMessage { id, msg: std::sync::Arc::new(r.msg.clone()), wire, acks: r.acks, attempts: r.attempts }
}
