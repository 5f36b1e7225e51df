//! What the parts of one replica share: its identity, the registry (writes), the cache (reads),
//! metrics, move timelines and its status flags. The gRPC services and housekeeping both work on
//! a [`Replica`]; neither reaches the other.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use victor_store::{Revision, Store};

use crate::cache::Cache;
use crate::cache::backfill::Backfiller;
use crate::metrics::Metrics;
use crate::move_timeline::MoveTimelines;
use crate::registry::Registry;

/// How long a write waits for this replica's cache to show it before the request returns
/// (read-your-writes on the same replica).
pub const READ_YOUR_WRITES: Duration = Duration::from_secs(2);

/// One replica's shared state.
pub struct Replica<S: Store> {
    /// This replica's id.
    pub id: String,
    /// Writes (bindings, declarations, FE registrations).
    pub registry: Registry<S>,
    /// Reads: the watch-fed cache.
    pub cache: Arc<Cache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-move stage timestamps.
    pub timelines: Arc<MoveTimelines>,
    /// Whether the store answered the last health probe.
    pub store_reachable: Arc<AtomicBool>,
    /// Whether this replica holds the housekeeping role.
    pub is_housekeeper: Arc<AtomicBool>,
    /// Flips to true on shutdown (streams end so clients fail over).
    pub shutdown: watch::Receiver<bool>,
    /// Extends the cache's history from the store for streams resuming from older revisions.
    pub backfill: Arc<Backfiller<S>>,
}

impl<S: Store> Replica<S> {
    /// Waits (bounded by [`READ_YOUR_WRITES`]) until this replica's cache shows `revision`.
    pub async fn settle(&self, revision: Revision) {
        if revision > 0 && !self.cache.wait_for(revision, READ_YOUR_WRITES).await {
            tracing::warn!(
                revision,
                "cache did not show our own write in time; the response may be older than the write"
            );
        }
    }
}
