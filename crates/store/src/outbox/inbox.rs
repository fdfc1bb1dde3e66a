//! A consumer's inbox through the writer: identities recorded as handled,
//! and pruned to the inbox's bounds (age, count, bytes), oldest first.

use super::writer::Writer;
use super::InboxBounds;
use crate::StoreError;

/// How often the inbox is pruned by age.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Writer {
    /// Records runs of identities as handled, and counts them.
    pub(super) fn inbox_record(&mut self, runs: &[crate::InboxRun]) -> Result<(), StoreError> {
        self.store.inbox_record_runs(runs, crate::now_ms())?;
        for (p, first, last) in runs {
            let n = last.saturating_sub(*first).saturating_add(1);
            self.inbox_len = self.inbox_len.saturating_add(n);
            self.inbox_bytes =
                self.inbox_bytes.saturating_add(n.saturating_mul(p.len() as u64 + crate::INBOX_ENTRY_BYTES));
        }
        Ok(())
    }

    /// Pruning scans the inbox: by age once a minute, by count or bytes
    /// when the (over-)estimate says so.
    pub(super) fn prune_inbox_if_due(&mut self) -> Result<(), StoreError> {
        let Some(bounds) = self.inbox_bounds else { return Ok(()) };
        let by_age = self.pruned_at.elapsed() >= PRUNE_EVERY;
        let over_bytes = bounds.max_bytes.is_some_and(|m| self.inbox_bytes > m);
        if !(by_age || self.inbox_len > bounds.max_count || over_bytes) {
            return Ok(());
        }
        self.pruned_at = std::time::Instant::now();
        let cutoff = if by_age { crate::now_ms().saturating_sub(bounds.max_age_ms) } else { 0 };
        // A byte bound becomes a count at the current mean size of an
        // identity.
        let mut keep = bounds.max_count;
        if let Some(max) = bounds.max_bytes.filter(|_| self.inbox_len > 0) {
            let mean = (self.inbox_bytes / self.inbox_len).max(1);
            keep = keep.min(max / mean);
        }
        // Down to 90 %: the next prune by count is a while away (each one
        // sorts the inbox).
        self.store.inbox_prune(cutoff, keep - keep / 10)?;
        self.inbox_len = self.store.inbox_len()?;
        self.inbox_bytes = self.store.inbox_bytes()?;
        Ok(())
    }

    /// Takes the inbox's bounds and counts what it holds; returns the
    /// highest sequence number recorded per producer.
    pub(super) fn set_inbox_bounds(&mut self, bounds: InboxBounds) -> Result<Vec<(String, u64)>, StoreError> {
        self.inbox_bounds = Some(bounds);
        self.inbox_len = self.store.inbox_len()?;
        self.inbox_bytes = self.store.inbox_bytes()?;
        self.store.inbox_high()
    }
}
