//! What the parts of one replica share: its identity, the registry (writes), the cache (reads),
//! metrics, move timelines and its status flags. The gRPC services and housekeeping both work on
//! a [`Replica`]; neither reaches the other.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use victor_store::{Revision, Store, StoreResult};

use crate::cache::backfill::Backfiller;
use crate::cache::{Cache, FeView};
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
    ///
    /// Every API call that writes settles on its write's revision before it answers: reads
    /// (GetBinding, listings) and the decisions of later conditional writes (AnnounceMigration,
    /// ClearDamping, a GONE report) are made on the cache, and a rule that refuses on the cached
    /// state writes nothing, so no compare-and-swap would reveal a cache that lags the write the
    /// same client just had acknowledged.
    pub async fn settle(&self, revision: Revision) {
        if revision > 0 && !self.cache.wait_for(revision, READ_YOUR_WRITES).await {
            tracing::warn!(
                revision,
                "cache did not show our own write in time; the response may be older than the write"
            );
        }
    }

    /// Whether `fe`'s liveness session exists. The cache answers when it shows the session; when
    /// it does not (expired, or this replica has not seen a registration made elsewhere yet), the
    /// store decides.
    pub async fn session_alive(&self, fe: &FeView) -> StoreResult<bool> {
        if fe.up() {
            return Ok(true);
        }
        let (session, _) = self.registry.store().get(&self.cache.keys().session(&fe.fe_id)).await?;
        Ok(session.is_some())
    }
}
