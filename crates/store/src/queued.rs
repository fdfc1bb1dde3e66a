//! An outbox message as the delivery engine sees it.

use steadfast_core::engine::Queued;
use steadfast_core::Qos;

use crate::StoredMessage;

impl Queued for StoredMessage {
    fn id(&self) -> u64 {
        self.id
    }

    fn qos(&self) -> Qos {
        self.msg.qos
    }

    fn set_qos(&mut self, qos: Qos) {
        std::sync::Arc::make_mut(&mut self.msg).qos = qos;
    }

    fn priority(&self) -> usize {
        self.msg.policy.priority as usize
    }

    fn size(&self) -> usize {
        self.msg.size() as usize
    }

    fn expires_ms(&self) -> Option<u64> {
        self.msg.policy.expires_ms
    }

    fn max_attempts(&self) -> Option<u32> {
        self.msg.policy.max_attempts
    }

    fn attempts(&self) -> u32 {
        self.attempts
    }

    fn count_attempt(&mut self) {
        self.attempts += 1;
    }
}
