//! Housekeeping: one replica, elected through the store with a leased key, runs the timers that
//! must not run on every replica — damping hold expiry, migration-announcement expiry, the
//! removal of bindings of FEs that have been down longer than `--fe-dead-after`, and the
//! collection of tombstones older than `--tombstone-retention` (which raises the tombstone
//! horizon, docs/design.md section 3).
//!
//! Election: `{p}/e/housekeeper` is created (compare: absent) with this replica's id, attached to
//! its election lease. The holder works while its lease lives; if it dies, the lease expires,
//! the key vanishes and another replica's next attempt wins. On clean shutdown the holder revokes
//! the lease so the hand-over is immediate. On the embedded store the only replica always wins.

mod election;
mod tasks;

pub use election::run;

use std::time::Duration;

/// Housekeeping settings.
#[derive(Debug, Clone, Copy)]
pub struct HousekeepingConfig {
    /// Unfreeze damped bindings after this long (zero = never automatically).
    pub damping_hold: Duration,
    /// Remove the bindings of FEs down this long (zero = never).
    pub fe_dead_after: Duration,
    /// Collect tombstones older than this.
    pub tombstone_retention: Duration,
    /// How often the timers run.
    pub tick: Duration,
}
