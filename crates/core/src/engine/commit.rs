//! When a message counts as accepted: only once the commit that holds it
//! is synced to disk (G1). The outbox writer asks before it answers a
//! publisher; so does the simulator's outbox model, where the planted bug
//! *accept before the sync* shows what breaking the rule costs.

/// True when an acceptance must wait for the sync of its commit (always,
/// unless the planted bug `accept-before-the-sync` is on).
pub fn accept_after_sync() -> bool {
    !crate::mutate::planted(crate::mutate::Bug::AcceptBeforeSync)
}
