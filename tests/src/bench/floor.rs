//! The store's own latency, measured in the same run as the controller so the controller's
//! figures read as ratios to it: one compare-and-swap transaction (what a claim costs at least)
//! and one put followed by its watch event (what a change costs at least to reach a replica's
//! cache). Keys live under their own prefix, outside the controller's.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Serialize;
use victor_store::{Compare, KeyRange, Store, Txn, TxnOp};

use super::stats::Percentiles;

const PREFIX: &str = "/victor-bench-floor/";

/// The store floor.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// "etcd" or "embedded".
    pub store: &'static str,
    /// Sequential samples per figure.
    pub samples: usize,
    /// One CAS transaction (compare mod revision, put), round trip.
    pub cas_txn_ms: Percentiles,
    /// A put until a watcher of the key receives its event.
    pub watch_ms: Percentiles,
}

/// Measures `samples` sequential CAS transactions and `samples` put → watch-event delays.
pub async fn measure<S: Store>(store: &S, samples: usize) -> Result<Floor> {
    let cas_key = format!("{PREFIX}cas").into_bytes();
    let mut held = store.get(&cas_key).await?.0.map(|kv| kv.mod_revision).unwrap_or(0);
    let mut cas = Vec::with_capacity(samples);
    for i in 0..samples {
        let txn = Txn {
            compares: vec![Compare::mod_revision(cas_key.clone(), held)],
            success: vec![TxnOp::put(cas_key.clone(), i.to_string())],
            failure: vec![],
        };
        let started = Instant::now();
        let result = store.txn(txn).await.context("floor CAS transaction")?;
        cas.push(started.elapsed().as_secs_f64() * 1e3);
        if !result.succeeded {
            bail!("floor CAS on {PREFIX}cas failed: another writer uses this prefix");
        }
        held = result.revision;
    }

    let watch_key = format!("{PREFIX}watch").into_bytes();
    let mut stream = store.watch(KeyRange::key(watch_key.clone()), 0).await.context("floor watch")?;
    let mut watch = Vec::with_capacity(samples);
    for i in 0..samples {
        let value = format!("w{i}").into_bytes();
        let started = Instant::now();
        store.txn(Txn { success: vec![TxnOp::put(watch_key.clone(), value.clone())], ..Default::default() }).await?;
        loop {
            let batch = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .context("floor watch: no event within 10 s")?
                .context("floor watch ended")??;
            if batch.events.iter().any(|e| e.kv.value == value) {
                break;
            }
        }
        watch.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Floor {
        store: store.kind(),
        samples,
        cas_txn_ms: Percentiles::of(&cas).rounded(),
        watch_ms: Percentiles::of(&watch).rounded(),
    })
}
