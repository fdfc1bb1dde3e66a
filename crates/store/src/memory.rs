use std::collections::{BTreeMap, HashMap};

use steadfast_core::{DropReason, Stage};

use crate::{BrokerRecord, NewMessage, Store, StoreError, StoredMessage, Totals};

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
    messages: BTreeMap<u64, StoredMessage>,
    next_id: u64,
    drops: HashMap<DropReason, u64>,
    meta: HashMap<String, String>,
    brokers: BTreeMap<String, BrokerRecord>,
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
        let m = StoredMessage { id, msg: msg.clone(), wire: None };
        self.state.messages.insert(id, m);
        Ok(id)
    }
    fn remove(&mut self, id: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.state.messages.remove(&id).map(|m| m.msg.size()))
    }
    fn set_wire(&mut self, id: u64, wire: Option<(u16, Stage)>) -> Result<(), StoreError> {
        if let Some(m) = self.state.messages.get_mut(&id) {
            m.wire = wire;
        }
        Ok(())
    }
    fn read_after(&mut self, after: u64, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let range = self.state.messages.range(after + 1..);
        Ok(range.take(limit).map(|(_, m)| m.clone()).collect())
    }
    fn bound(&mut self) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(self.state.messages.values().filter(|m| m.wire.is_some()).cloned().collect())
    }
    fn oldest(&mut self, limit: usize) -> Result<Vec<(u64, u64)>, StoreError> {
        let it = self.state.messages.values().take(limit);
        Ok(it.map(|m| (m.id, m.msg.size())).collect())
    }
    fn newest_id(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.state.messages.keys().next_back().copied())
    }
    fn totals(&mut self) -> Result<Totals, StoreError> {
        let bytes = self.state.messages.values().map(|m| m.msg.size()).sum();
        let count = self.state.messages.len() as u64;
        Ok(Totals { count, bytes })
    }
    fn oldest_created_ms(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(self.state.messages.values().map(|m| m.msg.created_ms).min())
    }
    fn add_drops(&mut self, reason: DropReason, n: u64) -> Result<(), StoreError> {
        *self.state.drops.entry(reason).or_default() += n;
        Ok(())
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
