//! A lease this replica keeps alive (for its presence key and its election campaign).
//!
//! etcd 3.4 does not keep leases alive for you: [`KeptLease`] refreshes its lease every third of
//! the TTL, and when the lease is lost (expired during a store outage, or revoked) it reports the
//! loss through [`KeptLease::lost`] and grants a new one on the next [`KeptLease::id`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use victor_store::{LeaseId, Store, StoreError, StoreResult};

/// A lease refreshed in the background.
pub struct KeptLease<S: Store> {
    store: S,
    ttl: Duration,
    current: Mutex<Option<LeaseId>>,
    lost_tx: watch::Sender<u64>,
}

impl<S: Store> KeptLease<S> {
    /// A keeper for leases of `ttl`; nothing is granted until [`KeptLease::id`] is called.
    pub fn new(store: S, ttl: Duration) -> Arc<Self> {
        let (lost_tx, _) = watch::channel(0);
        let keeper = Arc::new(KeptLease { store, ttl, current: Mutex::new(None), lost_tx });
        let weak = Arc::downgrade(&keeper);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(keeper) = weak.upgrade() else { return };
                keeper.refresh().await;
            }
        });
        keeper
    }

    /// The live lease, granting one if there is none.
    pub async fn id(&self) -> StoreResult<LeaseId> {
        let mut current = self.current.lock().await;
        if let Some(id) = *current {
            return Ok(id);
        }
        let id = self.store.lease_grant(self.ttl).await?;
        *current = Some(id);
        Ok(id)
    }

    /// Increments every time a lease was lost; watchers re-create what hung on it.
    pub fn lost(&self) -> watch::Receiver<u64> {
        self.lost_tx.subscribe()
    }

    /// Revokes the lease now (clean shutdown: our keys vanish immediately).
    pub async fn revoke(&self) {
        if let Some(id) = self.current.lock().await.take() {
            let _ = self.store.lease_revoke(id).await;
        }
    }

    async fn refresh(&self) {
        let id = *self.current.lock().await;
        let Some(id) = id else { return };
        match self.store.lease_keep_alive(id).await {
            Ok(_) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                tracing::warn!(lease = id, "lease expired; keys attached to it are gone and will be re-created");
                let mut current = self.current.lock().await;
                if *current == Some(id) {
                    *current = None;
                }
                drop(current);
                self.lost_tx.send_modify(|n| *n += 1);
            }
            Err(err) => tracing::debug!(lease = id, %err, "lease keep-alive failed; retrying"),
        }
    }
}
