//! The gRPC services: [`binding::BindingApi`] (orchestrators, operators) and
//! [`agent::AgentApi`] (fe-agents), their request validation, errors and conversions.

pub mod agent;
pub mod auth;
pub mod binding;
pub mod convert;
pub mod error;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use victor_store::Store;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::trace::MoveTraces;
use error::{ApiError, ApiResult};
use validate::MobilePrefixes;

/// How long a write waits for this replica's cache to show it before the RPC returns
/// (read-your-writes on the same replica).
pub const READ_YOUR_WRITES: Duration = Duration::from_secs(2);

/// State shared by both services.
pub struct ApiContext<S: Store> {
    /// Registry (writes).
    pub registry: Registry<S>,
    /// Cache (reads).
    pub cache: Arc<Cache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Move traces.
    pub traces: Arc<MoveTraces>,
    /// Mobile prefixes.
    pub mobile: MobilePrefixes,
    /// This replica's id.
    pub replica_id: String,
    /// Session TTL handed to agents.
    pub session_ttl: Duration,
    /// Most observations per Report.
    pub max_report_observations: usize,
    /// Whether the store answered the last probe.
    pub store_reachable: Arc<std::sync::atomic::AtomicBool>,
    /// The housekeeping state of this replica.
    pub is_housekeeper: Arc<std::sync::atomic::AtomicBool>,
    /// How callers are authenticated.
    pub auth: auth::Auth,
    /// Flips to true on shutdown (streams end so clients fail over).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Extends the cache's history from the store for streams resuming from older revisions.
    pub backfill: Arc<crate::cache::backfill::Backfiller<S>>,
}

impl<S: Store> ApiContext<S> {
    /// Fails with UNAVAILABLE until the cache has loaded.
    pub fn ready(&self) -> ApiResult<()> {
        if self.cache.is_loaded() {
            Ok(())
        } else {
            Err(ApiError::Unavailable(
                "this controller replica is still loading its state from the store; retry in a moment".into(),
            ))
        }
    }

    /// Waits (bounded) until this replica's cache shows `revision`.
    pub async fn settle(&self, revision: victor_store::Revision) {
        if revision > 0 && !self.cache.wait_for(revision, READ_YOUR_WRITES).await {
            tracing::warn!(
                revision,
                "cache did not show our own write in time; the response may be older than the write"
            );
        }
    }
}
