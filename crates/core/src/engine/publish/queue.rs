//! The messages a session read from the outbox and has not sent yet, with
//! the bytes they hold, so that reading ahead is bounded by memory as well
//! as by count.

use std::collections::VecDeque;

use super::Queued;

/// Read, not yet on the wire: oldest (of the highest priority) first.
#[derive(Debug)]
pub(super) struct SendQueue<M> {
    items: VecDeque<M>,
    /// The sum of [`Queued::size`] of `items`.
    bytes: usize,
}

impl<M: Queued> SendQueue<M> {
    pub(super) fn new() -> Self {
        Self { items: VecDeque::new(), bytes: 0 }
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// What the queued messages hold in memory.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn front(&self) -> Option<&M> {
        self.items.front()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &M> {
        self.items.iter()
    }

    pub(super) fn pop_front(&mut self) -> Option<M> {
        let m = self.items.pop_front()?;
        debug_assert!(self.bytes >= m.size(), "a message's size changed while queued");
        // Nothing queued holds nothing, whatever a size did meanwhile.
        self.bytes = if self.items.is_empty() { 0 } else { self.bytes.saturating_sub(m.size()) };
        Some(m)
    }

    pub(super) fn push_front(&mut self, m: M) {
        self.bytes += m.size();
        self.items.push_front(m);
    }

    pub(super) fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }

    /// A page of priority `p` goes ahead of every queued message of a lower
    /// priority, behind the rest.
    pub(super) fn insert_page(&mut self, p: usize, page: Vec<M>) {
        self.bytes += page.iter().map(Queued::size).sum::<usize>();
        let at = if p == 0 {
            self.items.len()
        } else {
            self.items.iter().position(|q| q.priority() < p).unwrap_or(self.items.len())
        };
        let lower = self.items.split_off(at);
        self.items.extend(page);
        self.items.extend(lower);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Qos;

    #[derive(Debug, Clone)]
    struct M {
        id: u64,
        priority: usize,
        size: usize,
    }

    impl Queued for M {
        fn id(&self) -> u64 {
            self.id
        }
        fn qos(&self) -> Qos {
            Qos::AtLeastOnce
        }
        fn set_qos(&mut self, _: Qos) {}
        fn priority(&self) -> usize {
            self.priority
        }
        fn size(&self) -> usize {
            self.size
        }
        fn expires_ms(&self) -> Option<u64> {
            None
        }
        fn max_attempts(&self) -> Option<u32> {
            None
        }
        fn attempts(&self) -> u32 {
            0
        }
        fn count_attempt(&mut self) {}
    }

    fn m(id: u64, priority: usize, size: usize) -> M {
        M { id, priority, size }
    }

    fn ids(q: &SendQueue<M>) -> Vec<u64> {
        q.iter().map(|m| m.id).collect()
    }

    #[test]
    fn bytes_follow_every_change() {
        let mut q = SendQueue::new();
        q.insert_page(0, vec![m(1, 0, 10), m(2, 0, 20)]);
        assert_eq!((q.len(), q.bytes()), (2, 30));
        q.insert_page(3, vec![m(9, 3, 5)]);
        assert_eq!(ids(&q), [9, 1, 2], "a higher priority goes ahead of the lower ones");
        assert_eq!(q.bytes(), 35);
        let first = q.pop_front().unwrap();
        assert_eq!((first.id, q.bytes()), (9, 30));
        q.push_front(first);
        assert_eq!(q.bytes(), 35);
        q.insert_page(3, vec![m(10, 3, 1)]);
        assert_eq!(ids(&q), [9, 10, 1, 2], "behind what is queued of its own priority");
        q.clear();
        assert_eq!((q.len(), q.bytes()), (0, 0));
        assert!(q.pop_front().is_none());
    }
}
