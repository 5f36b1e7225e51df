//! Backfilling the history of resumable changes from the store's own history.
//!
//! A replica keeps the changes since it loaded (its *floor*) for agents that resume. After every
//! replica restarted, an agent resumes from a revision older than any replica's floor although the
//! store still has those revisions. Rather than sending it a full snapshot, the replica reads the
//! missing changes back: a watch of the whole prefix from the agent's revision + 1 replays the
//! store's history; a *fence* write made right after the watch starts tells when the replay has
//! passed the floor (the fence's own event arrives after every older one). The replayed changes
//! become frames placed before the history. One backfill at a time; concurrent resumes wait and
//! find the history already extended. A compacted revision (or a history that would outgrow its
//! limit) fails the backfill and the stream falls back to a snapshot.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use victor_store::{KeyRange, Revision, Store, StoreError, Txn, TxnOp};

use super::{Cache, CacheChange};

/// Longest a backfill may take before the stream gives up and sends a snapshot.
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a backfill did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// The store no longer has the revisions (compacted) or could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The replay did not reach the fence in time.
    #[error("the store's history did not replay within {0:?}")]
    Timeout(Duration),
    /// The history changed meanwhile, or would hold too many changes.
    #[error("the replayed history could not be added (floor moved or history limit reached)")]
    NotAdded,
}

/// Extends a cache's history backwards from the store.
pub struct Backfiller<S: Store> {
    store: S,
    cache: Arc<Cache>,
    replica_id: String,
    lock: tokio::sync::Mutex<()>,
}

impl<S: Store> Backfiller<S> {
    /// A backfiller for `cache`, fencing with this replica's fence key.
    pub fn new(store: S, cache: Arc<Cache>, replica_id: String) -> Self {
        Backfiller { store, cache, replica_id, lock: tokio::sync::Mutex::new(()) }
    }

    /// Makes deltas available from `from` on (no-op if they already are).
    pub async fn extend_to(&self, from: Revision) -> Result<(), BackfillError> {
        let _one_at_a_time = self.lock.lock().await;
        let floor = self.cache.floor();
        if from >= floor {
            return Ok(());
        }
        match tokio::time::timeout(BACKFILL_TIMEOUT, self.replay(from, floor)).await {
            Ok(Ok(frames)) => {
                let changes: usize = frames.iter().map(|(_, c)| c.len()).sum();
                if !self.cache.prepend(floor, from, frames) {
                    return Err(BackfillError::NotAdded);
                }
                tracing::info!(from, floor, changes, "history backfilled from the store for a resuming stream");
                Ok(())
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(BackfillError::Timeout(BACKFILL_TIMEOUT)),
        }
    }

    /// The changes in (`from`, `floor`] as frames (one per store revision), then the current FE
    /// table at `floor` (FE health changes are not replayed one by one).
    async fn replay(
        &self,
        from: Revision,
        floor: Revision,
    ) -> Result<Vec<(Revision, Vec<CacheChange>)>, BackfillError> {
        let keys = self.cache.keys();
        let mut watch = self.store.watch(KeyRange::prefix(keys.root()), from + 1).await?;
        let fence_txn =
            Txn { success: vec![TxnOp::put(keys.fence(&self.replica_id), floor.to_string())], ..Txn::default() };
        let fence = self.store.txn(fence_txn).await?.revision;
        let mut frames: Vec<(Revision, Vec<CacheChange>)> = Vec::new();
        'replay: while let Some(batch) = watch.next().await {
            let batch = batch?;
            for event in &batch.events {
                let revision = event.kv.mod_revision;
                if revision >= fence {
                    break 'replay;
                }
                if revision > floor {
                    continue;
                }
                let Some(change) = self.cache.with_state(|s| s.replayed_change(keys, event)) else { continue };
                match frames.last_mut() {
                    Some((r, changes)) if *r == revision => changes.push(change),
                    _ => frames.push((revision, vec![change])),
                }
            }
            if batch.revision >= fence {
                break;
            }
        }
        let fes: Vec<CacheChange> = self.cache.with_state(|s| {
            s.fes
                .values()
                .map(|f| CacheChange::Fe {
                    fe_id: f.fe_id.clone(),
                    revision: f.change_revision(),
                    view: Some(f.clone()),
                })
                .collect()
        });
        frames.push((floor, fes));
        Ok(frames)
    }
}

/// A backfiller behind a trait object, for the stream tasks (which are not generic over the store).
pub trait Backfill: Send + Sync {
    /// [`Backfiller::extend_to`].
    fn extend_to(&self, from: Revision) -> futures::future::BoxFuture<'_, Result<(), BackfillError>>;
}

impl<S: Store> Backfill for Backfiller<S> {
    fn extend_to(&self, from: Revision) -> futures::future::BoxFuture<'_, Result<(), BackfillError>> {
        Box::pin(Backfiller::extend_to(self, from))
    }
}
