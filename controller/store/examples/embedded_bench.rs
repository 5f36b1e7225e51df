//! Embedded store figures: small CAS transactions per second with and without group commit,
//! and the time to read 1,000,000 keys after a reopen (controller cold start).
//!
//! `cargo run -p victor-store --release --example embedded_bench -- [DIR] [KEYS]`
//! DIR defaults to a temp dir on disk (fsync costs what it costs there); pass /dev/shm to
//! measure without the disk.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};
use victor_store::{Compare, KeyRange, RangeRequest, Store, Txn, TxnOp};

const WRITERS: usize = 64;
const RUN: Duration = Duration::from_secs(3);

/// `WRITERS` tasks each CAS their own key in a loop for `RUN`; returns commits per second.
async fn cas_rate(dir: &Path, max_batch: usize) -> f64 {
    let path = dir.join(format!("cas-{max_batch}.redb"));
    let store =
        EmbeddedStore::open(&path, EmbeddedOptions { max_batch, ..EmbeddedOptions::default() }).await.expect("open");
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + RUN;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (store, done) = (store.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("/bench/cas/{w}");
            let mut seen = 0;
            while Instant::now() < deadline {
                let t = Txn {
                    compares: vec![Compare::mod_revision(key.clone(), seen)],
                    success: vec![TxnOp::put(key.clone(), "fe-0001 02:00:00:00:00:01 7")],
                    failure: vec![],
                };
                let r = store.txn(t).await.expect("txn");
                assert!(r.succeeded, "only this task writes its key");
                seen = r.revision;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let _ = std::fs::remove_file(&path);
    done.load(Ordering::Relaxed) as f64 / RUN.as_secs_f64()
}

/// Writes `keys` keys in 128-key transactions, reopens, and times reading them all.
async fn cold_read(dir: &Path, keys: usize) -> (Duration, Duration, u64) {
    let path = dir.join("cold.redb");
    let opts = EmbeddedOptions { history_revisions: 1000, ..EmbeddedOptions::default() };
    let store = EmbeddedStore::open(&path, opts.clone()).await.expect("open");
    let start = Instant::now();
    let mut batch = Vec::with_capacity(128);
    for i in 0..keys {
        let value = format!(
            "{{\"fe\":\"fe-{:04}\",\"mac\":\"02:00:00:00:{:02x}:{:02x}\",\"seq\":1}}",
            i % 1000,
            i / 256 % 256,
            i % 256
        );
        batch.push(TxnOp::put(format!("/victor/bindings/10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255), value));
        if batch.len() == 128 || i + 1 == keys {
            store.txn(Txn { success: std::mem::take(&mut batch), ..Txn::default() }).await.expect("load txn");
        }
    }
    let load = start.elapsed();
    drop(store);
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let start = Instant::now();
    let store = EmbeddedStore::open(&path, opts).await.expect("reopen");
    let all =
        store.range(RangeRequest { range: KeyRange::prefix("/victor/bindings/"), limit: 0 }).await.expect("range");
    let read = start.elapsed();
    assert_eq!(all.kvs.len(), keys);
    drop(store);
    let _ = std::fs::remove_file(&path);
    (load, read, size)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let tmp;
    let dir = match args.next() {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().expect("temp dir");
            tmp.path().to_path_buf()
        }
    };
    let keys: usize = args.next().map_or(1_000_000, |k| k.parse().expect("KEYS is a number"));
    println!("dir: {}", dir.display());
    let single = cas_rate(&dir, 1).await;
    println!("CAS txns/s, {WRITERS} writers, no group commit (max_batch 1): {single:.0}");
    let grouped = cas_rate(&dir, 1024).await;
    println!("CAS txns/s, {WRITERS} writers, group commit (max_batch 1024): {grouped:.0}");
    let (load, read, size) = cold_read(&dir, keys).await;
    println!(
        "{keys} keys: loaded in {:.1} s ({:.0} keys/s), file {:.0} MiB, reopen + read all in {:.2} s",
        load.as_secs_f64(),
        keys as f64 / load.as_secs_f64(),
        size as f64 / (1024.0 * 1024.0),
        read.as_secs_f64()
    );
}
