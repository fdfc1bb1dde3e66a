//! Deliberately planted bugs, for proving that the simulator catches
//! them (`steadfast-sim --mutate BUG`).
//!
//! Without the cargo feature `mutate` (which only the simulator turns on)
//! [`planted`] is a constant `false` and every planted bug compiles away.

/// A bug that can be planted in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// After the broker lost the session, what was in flight is taken as
    /// delivered instead of being published again.
    ForgetInflightOnSessionLoss,
    /// When the ack timeout ends a link, what was in flight is taken as
    /// delivered (the failed broker's queue is dropped).
    DropWindowOnAckTimeout,
    /// A full page of the outbox moves the read cursor to the newest id,
    /// skipping what lies between.
    PageSkipsAhead,
    /// A kept session does not send again what was in flight: it waits for
    /// acknowledgements of PUBLISHes the broker may never have received.
    ResumeWithoutResend,
    /// The consumer acknowledges a delivery to the broker when it arrives,
    /// before the application handled it.
    AckBeforeHandling,
    /// The inbox's answer is ignored: an identity handled before is handed
    /// over again.
    InboxForgets,
    /// After a failover, the failed broker takes what it had in flight, and
    /// another broker took over, for delivered.
    FailoverForgetsTheQueue,
    /// A fanout message leaves the outbox at the first acknowledgement,
    /// whatever its quorum.
    FanoutOneAckForAll,
    /// A deadline-class message is dropped as expired two seconds before
    /// its deadline.
    ExpiresEarly,
    /// A publisher hears "accepted" when its message is appended, before
    /// the commit that holds it is synced.
    AcceptBeforeSync,
    /// A message that asks for receipts leaves the outbox at its broker's
    /// acknowledgement, as if it asked for none.
    ReceiptsEndAtTheAck,
    /// A receipt never completes a message: it waits and is published
    /// again for ever.
    ReceiptsNeverComplete,
}

impl Bug {
    /// Every bug that can be planted.
    pub const ALL: [Bug; 12] = [
        Bug::ForgetInflightOnSessionLoss,
        Bug::DropWindowOnAckTimeout,
        Bug::PageSkipsAhead,
        Bug::ResumeWithoutResend,
        Bug::AckBeforeHandling,
        Bug::InboxForgets,
        Bug::FailoverForgetsTheQueue,
        Bug::FanoutOneAckForAll,
        Bug::ExpiresEarly,
        Bug::AcceptBeforeSync,
        Bug::ReceiptsEndAtTheAck,
        Bug::ReceiptsNeverComplete,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Bug::ForgetInflightOnSessionLoss => "forget-inflight-on-session-loss",
            Bug::DropWindowOnAckTimeout => "drop-window-on-ack-timeout",
            Bug::PageSkipsAhead => "page-skips-ahead",
            Bug::ResumeWithoutResend => "resume-without-resend",
            Bug::AckBeforeHandling => "consumer-acks-before-handling",
            Bug::InboxForgets => "inbox-forgets-an-identity",
            Bug::FailoverForgetsTheQueue => "failover-forgets-the-queue",
            Bug::FanoutOneAckForAll => "fanout-counts-one-ack-as-all",
            Bug::ExpiresEarly => "expires-early",
            Bug::AcceptBeforeSync => "accept-before-the-sync",
            Bug::ReceiptsEndAtTheAck => "receipts-end-at-the-ack",
            Bug::ReceiptsNeverComplete => "receipts-never-complete",
        }
    }

    /// What it does.
    pub fn describe(self) -> &'static str {
        match self {
            Bug::ForgetInflightOnSessionLoss => {
                "in-flight messages are taken as delivered when the broker lost the session"
            }
            Bug::DropWindowOnAckTimeout => "the failed link's in-flight messages are dropped at an ack timeout",
            Bug::PageSkipsAhead => "a full outbox page skips the reader ahead to the newest message",
            Bug::ResumeWithoutResend => {
                "a kept session keeps its in-flight messages waiting without sending them again"
            }
            Bug::AckBeforeHandling => {
                "the consumer acknowledges a delivery to the broker before the application handled it"
            }
            Bug::InboxForgets => "the inbox's answer is ignored: a handled identity is handed over again",
            Bug::FailoverForgetsTheQueue => {
                "after a failover, the failed broker's in-flight messages count as delivered"
            }
            Bug::FanoutOneAckForAll => "a fanout message leaves the outbox at its first acknowledgement",
            Bug::ExpiresEarly => "a deadline-class message is dropped as expired before its deadline",
            Bug::AcceptBeforeSync => "a message is reported accepted before the commit that holds it is synced",
            Bug::ReceiptsEndAtTheAck => "a message that asks for receipts leaves at its broker's acknowledgement",
            Bug::ReceiptsNeverComplete => "a receipt never completes a message (it is published again for ever)",
        }
    }

    /// The bug of that name.
    pub fn parse(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }
}

#[cfg(feature = "mutate")]
static PLANTED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Plants `bug` (or none) for the whole process.
#[cfg(feature = "mutate")]
pub fn plant(bug: Option<Bug>) {
    let n = bug.map_or(0, |b| Bug::ALL.iter().position(|x| *x == b).expect("listed") as u8 + 1);
    PLANTED.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// True when `bug` is planted.
#[inline]
pub fn planted(bug: Bug) -> bool {
    #[cfg(feature = "mutate")]
    {
        let n = PLANTED.load(std::sync::atomic::Ordering::Relaxed);
        n != 0 && Bug::ALL[n as usize - 1] == bug
    }
    #[cfg(not(feature = "mutate"))]
    {
        let _ = bug;
        false
    }
}
