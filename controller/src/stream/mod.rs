//! Server streams fed by the replica cache: the agents' desired-state stream ([`agent`]) and the
//! orchestrators' binding watch ([`bindings`]). Each stream is a task that owns its cursor,
//! wakes when the cache revision advances, and coalesces every frame after its cursor into its
//! next message; a bounded channel to the client provides backpressure, so a slow client gets
//! fewer, larger messages instead of an unbounded queue.

pub mod agent;
pub mod bindings;
pub mod encoded;

use std::time::Duration;

/// How often an idle stream sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Most entries per stream message (snapshot chunks and large deltas are split).
pub const MAX_ENTRIES_PER_MESSAGE: usize = 20_000;

/// Resolves once `shutdown` is (or becomes) true; never if its sender is gone.
pub async fn shutting_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let done = *shutdown.borrow_and_update();
        if done {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
