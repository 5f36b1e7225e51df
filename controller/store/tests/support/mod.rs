//! Shared test support: store fixtures for every backend and watch helpers.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures::StreamExt;
use tempfile::TempDir;
use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};
use victor_store::etcd::{EtcdConfig, EtcdStore};
use victor_store::{Event, EventKind, StoreResult, WatchBatch, WatchStream};
use victor_testkit::etcd::EtcdCluster;

/// A store and what keeps its backend alive.
pub struct Fixture<S> {
    pub store: S,
    pub cluster: Option<EtcdCluster>,
    pub dir: Option<TempDir>,
}

/// A temp dir on tmpfs when there is one (fast fsync), else the default temp dir.
pub fn temp_dir() -> TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm).unwrap() } else { tempfile::tempdir().unwrap() }
}

/// Options used by the conformance suite (progress notifications every 500 ms, like the test
/// etcd clusters).
pub fn embedded_options() -> EmbeddedOptions {
    EmbeddedOptions { progress_interval: Some(Duration::from_millis(500)), ..EmbeddedOptions::default() }
}

pub async fn embedded() -> Fixture<EmbeddedStore> {
    let dir = temp_dir();
    let store = EmbeddedStore::open(&dir.path().join("store.redb"), embedded_options()).await.unwrap();
    Fixture { store, cluster: None, dir: Some(dir) }
}

pub fn etcd_config(endpoints: Vec<String>) -> EtcdConfig {
    EtcdConfig {
        endpoints,
        request_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_millis(500),
        ..EtcdConfig::default()
    }
}

pub async fn etcd(members: usize) -> Fixture<EtcdStore> {
    let cluster = EtcdCluster::start(members).await.unwrap();
    let store = EtcdStore::connect(etcd_config(cluster.endpoints())).await.unwrap();
    Fixture { store, cluster: Some(cluster), dir: None }
}

pub async fn etcd1() -> Fixture<EtcdStore> {
    etcd(1).await
}

pub async fn etcd3() -> Fixture<EtcdStore> {
    etcd(3).await
}

/// The next item of a watch, failing the test after `timeout`.
pub async fn next_item(w: &mut WatchStream, timeout: Duration) -> StoreResult<WatchBatch> {
    tokio::time::timeout(timeout, w.next())
        .await
        .unwrap_or_else(|_| panic!("no watch item within {timeout:?}"))
        .expect("watch stream ended without an error")
}

/// Collects events (skipping progress batches) until `n` arrived; checks batch invariants.
pub async fn events(w: &mut WatchStream, n: usize, timeout: Duration) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out: Vec<Event> = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let batch = match tokio::time::timeout(left, w.next()).await {
            Ok(Some(Ok(b))) => b,
            Ok(Some(Err(e))) => panic!("watch failed after {} events: {e}", out.len()),
            Ok(None) => panic!("watch ended after {} events", out.len()),
            Err(_) => panic!(
                "only {} of {n} events within {timeout:?}: {:?}",
                out.len(),
                out.iter().map(describe).collect::<Vec<_>>()
            ),
        };
        check_batch(&batch, out.last());
        out.extend(batch.events);
    }
    out
}

/// A batch's events are in revision order, after the previous ones, and covered by its revision.
pub fn check_batch(batch: &WatchBatch, previous: Option<&Event>) {
    let mut last = previous.map_or(0, |e| e.kv.mod_revision);
    for e in &batch.events {
        assert!(e.kv.mod_revision >= last, "events out of revision order: {} after {last}", e.kv.mod_revision);
        last = e.kv.mod_revision;
    }
    assert!(batch.revision >= last, "batch revision {} below its last event {last}", batch.revision);
}

/// Asserts that nothing but progress notifications arrives for `wait`.
pub async fn assert_quiet(w: &mut WatchStream, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, w.next()).await {
            Err(_) => return,
            Ok(Some(Ok(b))) if b.events.is_empty() => {}
            Ok(other) => panic!("expected no events, got {other:?}"),
        }
    }
}

/// `"P key=value@rev"` / `"D key@rev"`.
pub fn describe(e: &Event) -> String {
    let key = String::from_utf8_lossy(&e.kv.key);
    match e.kind {
        EventKind::Put => format!("P {key}={}@{}", String::from_utf8_lossy(&e.kv.value), e.kv.mod_revision),
        EventKind::Delete => format!("D {key}@{}", e.kv.mod_revision),
    }
}
