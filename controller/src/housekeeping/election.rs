//! The housekeeping election loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use victor_store::{Compare, KeyRange, Store, Txn, TxnOp};

use super::HousekeepingConfig;
use super::tasks::Timers;
use crate::lease::KeptLease;
use crate::replica::Replica;

/// Campaigns for the housekeeping role and runs the timers while holding it, until `shutdown`.
pub async fn run<S: Store>(
    replica: Arc<Replica<S>>,
    lease: Arc<KeptLease<S>>,
    config: HousekeepingConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let key = replica.cache.keys().election();
    let mut lost = lease.lost();
    let mut revisions = replica.cache.subscribe();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let holder = replica.cache.read(|s| s.housekeeper.as_ref().map(|h| h.0.clone()));
        let can_campaign = replica.cache.is_loaded() && holder.as_deref().is_none_or(|h| h == replica.id);
        if can_campaign && campaign(&replica, &lease, &key).await {
            tracing::info!(replica = %replica.id, "elected for housekeeping");
            replica.is_housekeeper.store(true, Ordering::Relaxed);
            lead(&replica, config, &mut lost, &mut shutdown).await;
            replica.is_housekeeper.store(false, Ordering::Relaxed);
            if *shutdown.borrow() {
                // Hand over at once: our key vanishes with the lease.
                lease.revoke().await;
                return;
            }
            tracing::warn!(replica = %replica.id, "lost the housekeeping role");
            continue;
        }
        tokio::select! {
            _ = revisions.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// One attempt to take (or confirm) the role.
async fn campaign<S: Store>(replica: &Replica<S>, lease: &KeptLease<S>, key: &[u8]) -> bool {
    let Ok(lease_id) = lease.id().await else { return false };
    let txn = Txn {
        compares: vec![Compare::absent(key.to_vec())],
        success: vec![TxnOp::Put { key: key.to_vec(), value: replica.id.clone().into_bytes(), lease: lease_id }],
        failure: vec![TxnOp::Get(KeyRange::key(key.to_vec()))],
    };
    match replica.registry.store().txn(txn).await {
        Ok(result) if result.succeeded => true,
        Ok(result) => result
            .reads
            .first()
            .and_then(|r| r.kvs.first())
            .is_some_and(|kv| kv.value == replica.id.as_bytes() && kv.lease == lease_id),
        Err(err) => {
            tracing::debug!(%err, "housekeeping campaign failed");
            false
        }
    }
}

/// Runs the timers until the lease is lost, another replica shows up as holder, or shutdown.
async fn lead<S: Store>(
    replica: &Replica<S>,
    config: HousekeepingConfig,
    lost: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut timers = Timers::default();
    let mut tick = tokio::time::interval(config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let holder = replica.cache.read(|s| s.housekeeper.as_ref().map(|h| h.0.clone()));
                if holder.as_deref().is_some_and(|h| h != replica.id) {
                    return;
                }
                timers.run(replica, config).await;
            }
            _ = lost.changed() => return,
            _ = shutdown.changed() => return,
        }
    }
}
