//! The timers the elected housekeeper runs every tick.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use victor_store::{Revision, Store};

use super::HousekeepingConfig;
use crate::records::now_unix_nanos;
use crate::registry::RegistryResult;
use crate::replica::Replica;

/// Housekeeper-local memory (restarts with the role: conservative after a fail-over).
#[derive(Default)]
pub(super) struct Timers {
    /// When each FE was first seen down by this housekeeper.
    down_since: HashMap<Arc<str>, Instant>,
}

impl Timers {
    pub(super) async fn run<S: Store>(&mut self, replica: &Replica<S>, config: HousekeepingConfig) {
        let now = now_unix_nanos();
        let hold_ns = config.damping_hold.as_nanos() as i64;
        let (expired_pending, unfreeze, down): (Vec<IpAddr>, Vec<IpAddr>, Vec<Arc<str>>) = replica.cache.read(|s| {
            let mut expired = Vec::new();
            let mut thaw = Vec::new();
            for (ip, b) in &s.bindings {
                if let Some(extra) = b.extra.as_deref() {
                    if !extra.pending_fe_id.is_empty() && extra.pending_until <= now {
                        expired.push(*ip);
                    }
                    if b.frozen && hold_ns > 0 && extra.frozen_at + hold_ns <= now {
                        thaw.push(*ip);
                    }
                }
            }
            let down = s.fes.values().filter(|f| !f.up()).map(|f| f.fe_id.clone()).collect();
            (expired, thaw, down)
        });
        let registry = &replica.registry;
        collect_tombstones(replica, now, config.tombstone_retention).await;
        for ip in expired_pending {
            report(ip, registry.expire_announcement(ip).await);
        }
        for ip in unfreeze {
            tracing::info!(vm_ip = %ip, "damping hold expired; unfreezing");
            report(ip, registry.thaw(ip).await);
        }
        self.down_since.retain(|fe, _| down.contains(fe));
        for fe in &down {
            self.down_since.entry(fe.clone()).or_insert_with(Instant::now);
        }
        if config.fe_dead_after.is_zero() {
            return;
        }
        let dead: Vec<Arc<str>> = self
            .down_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= config.fe_dead_after)
            .map(|(fe, _)| fe.clone())
            .collect();
        for fe in dead {
            let ips: Vec<IpAddr> =
                replica.cache.read(|s| s.bindings.iter().filter(|(_, b)| b.fe_id == fe).map(|(ip, _)| *ip).collect());
            if !ips.is_empty() {
                tracing::warn!(fe_id = %fe, bindings = ips.len(), "FE down longer than --fe-dead-after; removing its bindings");
            }
            for ip in ips {
                report(ip, registry.remove_if_bound_to(ip, &fe).await);
            }
        }
    }
}

/// Collects the tombstones written more than `retention` before `now`, a transaction's worth at a
/// time (at most a few per tick: the rest waits for the next tick).
async fn collect_tombstones<S: Store>(replica: &Replica<S>, now: i64, retention: std::time::Duration) {
    const ROUNDS_PER_TICK: usize = 8;
    let older_than = now.saturating_sub(i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX));
    for _ in 0..ROUNDS_PER_TICK {
        let due: Vec<IpAddr> = replica.cache.read(|s| {
            s.tombstones
                .iter()
                .filter(|(_, t)| t.committed_at < older_than)
                .map(|(ip, _)| *ip)
                .take(victor_store::MAX_TXN_OPS - 1)
                .collect()
        });
        if due.is_empty() {
            return;
        }
        match replica.registry.collect_tombstones(&due, older_than).await {
            // The next round must see what this one deleted.
            Ok((n, revision)) if n > 0 => {
                if !replica.cache.wait_for(revision, std::time::Duration::from_secs(2)).await {
                    return;
                }
            }
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(%err, "collecting tombstones failed; will retry next tick");
                return;
            }
        }
    }
}

/// Logs a failed update (the next tick tries again).
fn report(ip: IpAddr, result: RegistryResult<Revision>) {
    if let Err(err) = result {
        tracing::warn!(vm_ip = %ip, %err, "housekeeping update failed; will retry next tick");
    }
}
