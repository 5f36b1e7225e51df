//! Fills and follows the [`super::Cache`]: a paged list of the whole prefix, then one watch.
//!
//! The pages of a list are read at different revisions, so right after listing the state may mix
//! revisions. The loader therefore writes a *fence* (this replica's presence key) after listing,
//! watches from the first page's revision and replays into the fresh state (replays are ignored
//! key by key); when the fence's own event arrives, every change up to it has been applied and
//! the state is installed. The same procedure re-lists after a compaction, and the install then
//! publishes only the differences.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio::sync::watch;
use victor_daemon::Backoff;
use victor_store::{
    Event, EventKind, KeyRange, RangeRequest, Revision, Store, StoreError, StoreResult, Txn, TxnOp, prefix_end,
};

use super::{Cache, CacheState};
use crate::lease::KeptLease;
use crate::records::{ReplicaRecord, now_unix_nanos};

/// Keys read per page when listing.
const PAGE: usize = 100_000;

/// How this replica announces itself (its presence key doubles as the load fence).
pub struct Presence<S: Store> {
    /// This replica's id.
    pub replica_id: String,
    /// The replica's gRPC address (informational).
    pub grpc_addr: String,
    /// The lease the presence key hangs on.
    pub lease: Arc<KeptLease<S>>,
}

impl<S: Store> Presence<S> {
    async fn write(&self, store: &S, cache: &Cache, generation: u64) -> StoreResult<Revision> {
        let lease = self.lease.id().await?;
        let record = ReplicaRecord {
            grpc_addr: self.grpc_addr.clone(),
            started_at_unix_nanos: now_unix_nanos(),
            load_generation: generation,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let key = cache.keys().replica(&self.replica_id);
        let txn = Txn { success: vec![TxnOp::Put { key, value: record.encode_to_vec(), lease }], ..Default::default() };
        match store.txn(txn).await {
            Ok(res) => Ok(res.revision),
            Err(StoreError::LeaseNotFound(_)) => {
                // Lost between grant and put: let the keeper re-grant, fail this attempt.
                self.lease.revoke().await;
                Err(StoreError::Unavailable("presence lease vanished; retrying".into()))
            }
            Err(err) => Err(err),
        }
    }
}

/// Runs until `shutdown` flips to true: lists, installs, follows the watch, re-lists after a
/// compaction and re-watches after an outage (from the last applied revision, so nothing is
/// missed).
pub async fn run<S: Store>(store: S, cache: Arc<Cache>, presence: Presence<S>, mut shutdown: watch::Receiver<bool>) {
    let mut generation = 0u64;
    // 50 ms doubling to 800 ms between attempts.
    let mut backoff = Backoff::exact(Duration::from_millis(50), Duration::from_millis(800));
    let mut lost = presence.lease.lost();
    'reload: loop {
        if *shutdown.borrow() {
            return;
        }
        generation += 1;
        let (mut pending, mut next) = match list(&store, &cache).await {
            Ok(loaded) => loaded,
            Err(err) => {
                tracing::warn!(%err, "listing the store failed; retrying");
                pause(&mut backoff, &mut shutdown).await;
                continue 'reload;
            }
        };
        let fence = match presence.write(&store, &cache, generation).await {
            Ok(rev) => rev,
            Err(err) => {
                tracing::warn!(%err, "writing the load fence failed; retrying");
                pause(&mut backoff, &mut shutdown).await;
                continue 'reload;
            }
        };
        let root = cache.keys().root();
        loop {
            // A shutdown seen by `pause` (or the stream's select) is not seen again by
            // `changed()`: check the flag itself before every new watch.
            if *shutdown.borrow() {
                return;
            }
            let mut stream = match store.watch(KeyRange::prefix(root.clone()), next).await {
                Ok(stream) => stream,
                Err(StoreError::Compacted { .. }) => {
                    tracing::warn!(from = next, "watch start is compacted; re-listing");
                    continue 'reload;
                }
                Err(err) => {
                    tracing::warn!(%err, from = next, "watch failed; retrying");
                    pause(&mut backoff, &mut shutdown).await;
                    continue;
                }
            };
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = shutdown.changed() => return,
                    _ = lost.changed() => {
                        // Our presence key vanished with its lease; re-announce (not a reload).
                        if let Err(err) = presence.write(&store, &cache, generation).await {
                            tracing::warn!(%err, "re-announcing presence failed");
                        }
                        continue;
                    }
                };
                match item {
                    Some(Ok(batch)) => {
                        backoff.reset();
                        next = next.max(batch.revision + 1);
                        match pending.as_mut() {
                            Some(state) => {
                                let mut sink = Vec::new();
                                for event in &batch.events {
                                    state.apply(cache.keys(), event, &mut sink);
                                }
                                state.revision = state.revision.max(batch.revision);
                                if state.revision >= fence {
                                    let state = pending.take().expect("pending");
                                    tracing::info!(
                                        revision = state.revision,
                                        bindings = state.bindings.len(),
                                        fes = state.fes.len(),
                                        "cache loaded"
                                    );
                                    cache.install(state);
                                }
                            }
                            None => cache.apply_batch(&batch),
                        }
                    }
                    Some(Err(StoreError::Compacted { requested, compacted })) => {
                        tracing::warn!(
                            requested,
                            compacted,
                            "watch compacted; re-listing (only differences reach the agents)"
                        );
                        continue 'reload;
                    }
                    Some(Err(err)) => {
                        tracing::warn!(%err, from = next, "watch ended; re-watching from the last applied revision");
                        pause(&mut backoff, &mut shutdown).await;
                        break;
                    }
                    None => {
                        tracing::warn!(from = next, "watch ended; re-watching");
                        pause(&mut backoff, &mut shutdown).await;
                        break;
                    }
                }
            }
        }
    }
}

/// Lists everything under the prefix into a fresh state. Returns it (still to be completed by the
/// watch replay) and the revision to watch from.
async fn list<S: Store>(store: &S, cache: &Cache) -> StoreResult<(Option<CacheState>, Revision)> {
    let root = cache.keys().root();
    let end = prefix_end(&root);
    let mut start = root;
    let mut state = CacheState::default();
    let mut first_revision = None;
    let mut sink = Vec::new();
    loop {
        let page =
            store.range(RangeRequest { range: KeyRange::between(start.clone(), end.clone()), limit: PAGE }).await?;
        first_revision.get_or_insert(page.revision);
        let last_key = page.kvs.last().map(|kv| kv.key.clone());
        for kv in page.kvs {
            state.apply(cache.keys(), &Event { kind: EventKind::Put, kv }, &mut sink);
            sink.clear();
        }
        match (page.more, last_key) {
            (true, Some(mut key)) => {
                key.push(0);
                start = key;
            }
            _ => break,
        }
    }
    let first = first_revision.unwrap_or(0);
    state.revision = first;
    Ok((Some(state), first + 1))
}

/// Sleeps for `backoff`'s next delay, or until `shutdown` changes.
async fn pause(backoff: &mut Backoff, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = backoff.sleep() => {}
        _ = shutdown.changed() => {}
    }
}
