//! Embedded-only behaviour: durability across reopen and across `kill -9`, watchers that fall
//! behind the live buffer, automatic history retention, closing, and a clear error when the file
//! is already open.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::{describe, events, next_item, temp_dir};
use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};
use victor_store::{KeyRange, RangeRequest, Store, StoreError, Txn, TxnOp};

fn put_txn(key: &str, value: &str) -> Txn {
    Txn { success: vec![TxnOp::put(key, value)], ..Txn::default() }
}

async fn all_under(s: &EmbeddedStore, prefix: &str) -> Vec<(String, String, u64)> {
    let r = s.range(RangeRequest { range: KeyRange::prefix(prefix), limit: 0 }).await.unwrap();
    r.kvs
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap(), kv.mod_revision))
        .collect()
}

/// Everything survives a close and reopen: keys with their metadata, the revision, the
/// compaction point, leases (with fresh clocks) and the lease id sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_everything() {
    let dir = temp_dir();
    let path = dir.path().join("s.redb");
    let opts = EmbeddedOptions { history_revisions: 0, ..EmbeddedOptions::default() };
    let s = EmbeddedStore::open(&path, opts.clone()).await.unwrap();
    for i in 0..20 {
        s.txn(put_txn(&format!("/d/{i:02}"), &format!("v{i}"))).await.unwrap();
    }
    let lease = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    let t =
        Txn { success: vec![TxnOp::Put { key: b"/d/leased".to_vec(), value: b"l".to_vec(), lease }], ..Txn::default() };
    let rev = s.txn(t).await.unwrap().revision;
    s.compact(5).await.unwrap();
    let before = all_under(&s, "/d/").await;
    drop(s);

    let s = EmbeddedStore::open(&path, opts).await.unwrap();
    assert_eq!(s.current_revision().await.unwrap(), rev);
    assert_eq!(all_under(&s, "/d/").await, before);
    let (kv, _) = s.get(b"/d/03").await.unwrap();
    let kv = kv.unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version, kv.lease), (5, 5, 1, 0));
    assert!(matches!(s.watch(KeyRange::prefix("/d/"), 4).await, Err(StoreError::Compacted { compacted: 5, .. })));
    let mut w = s.watch(KeyRange::prefix("/d/"), 5).await.unwrap();
    assert_eq!(describe(&events(&mut w, 1, Duration::from_secs(2)).await[0]), "P /d/03=v3@5");
    // The lease survived with a fresh clock; ids keep growing.
    assert_eq!(s.lease_keep_alive(lease).await.unwrap(), Duration::from_secs(2));
    let newer = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    assert!(newer > lease, "lease ids are unique across restarts: {newer} after {lease}");
    let mut w = s.watch(KeyRange::key("/d/leased"), rev + 1).await.unwrap();
    let ev = events(&mut w, 1, Duration::from_secs(5)).await;
    assert_eq!(describe(&ev[0]), format!("D /d/leased@{}", rev + 1), "the reopened lease still expires");
}

/// Environment variable that turns the kill -9 test's child into the writer.
const CRASH_CHILD: &str = "VICTOR_STORE_CRASH_CHILD";

/// Writer side of the crash test: writes forever, printing each acknowledged revision.
async fn crash_child(path: &str) {
    let s = EmbeddedStore::open(std::path::Path::new(path), EmbeddedOptions::default()).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("/crash/{t}/{i:08}");
                let r = s.txn(put_txn(&key, &i.to_string())).await.unwrap();
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK {key} {}", r.revision).unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A writer process is SIGKILLed in the middle of a stream of commits; after reopening, every
/// write it had acknowledged is there with its revision, and the store works on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write() {
    if let Ok(path) = std::env::var(CRASH_CHILD) {
        return crash_child(&path).await;
    }
    // The file lives on disk (not tmpfs) so the fsync path is the real one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["kill_9_loses_no_acknowledged_write", "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (twenty_tx, twenty) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ACK ") {
                let (key, rev) = rest.split_once(' ').unwrap();
                acked.push((key.to_string(), rev.parse::<u64>().unwrap()));
                if acked.len() == 21 {
                    let _ = twenty_tx.send(());
                }
            }
        }
        acked
    });
    // Let it write for a while (at least 21 acknowledged writes, however slow the disk), then
    // kill -9 mid-stream.
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = twenty.recv_timeout(Duration::from_secs(30));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let acked = reader.join().unwrap();
    assert!(acked.len() > 20, "the child acknowledged only {} writes in {:?}", acked.len(), start.elapsed());

    let s = EmbeddedStore::open(&path, EmbeddedOptions::default()).await.unwrap();
    let present: std::collections::HashMap<_, _> =
        all_under(&s, "/crash/").await.into_iter().map(|(k, _, rev)| (k, rev)).collect();
    for (key, rev) in &acked {
        assert_eq!(present.get(key), Some(rev), "acknowledged {key}@{rev} lost by kill -9");
    }
    let max_acked = acked.iter().map(|(_, r)| *r).max().unwrap();
    let current = s.current_revision().await.unwrap();
    assert!(current >= max_acked);
    assert_eq!(present.len() as u64, current - 1, "one key per revision, nothing half-written");
    eprintln!("kill -9 after {} acknowledged writes; {} found after reopen", acked.len(), present.len());
    let r = s.txn(put_txn("/crash/after", "v")).await.unwrap();
    assert_eq!(r.revision, current + 1);
}

/// A watcher that is not read while hundreds of commits go by falls behind the live buffer and
/// catches up from the log: every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_recovers_from_log() {
    let dir = temp_dir();
    let opts = EmbeddedOptions { watch_buffer: 2, ..EmbeddedOptions::default() };
    let s = EmbeddedStore::open(&dir.path().join("s.redb"), opts).await.unwrap();
    let mut w = s.watch(KeyRange::prefix("/lag/"), 0).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..100 {
                revs.push(s.txn(put_txn(&format!("/lag/{t}/{i}"), "v")).await.unwrap().revision);
            }
            revs
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked.sort_unstable();
    let seen: Vec<_> = events(&mut w, 400, Duration::from_secs(10)).await.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(seen, acked);
}

/// With `history_revisions`, old history is compacted automatically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_retained_then_compacted() {
    let dir = temp_dir();
    let opts = EmbeddedOptions { history_revisions: 10, ..EmbeddedOptions::default() };
    let s = EmbeddedStore::open(&dir.path().join("s.redb"), opts).await.unwrap();
    for i in 0..60 {
        s.txn(put_txn("/h/k", &i.to_string())).await.unwrap();
    }
    let current = s.current_revision().await.unwrap();
    assert!(matches!(s.watch(KeyRange::prefix("/h/"), 2).await, Err(StoreError::Compacted { .. })));
    let mut w = s.watch(KeyRange::prefix("/h/"), current - 9).await.unwrap();
    assert_eq!(events(&mut w, 10, Duration::from_secs(2)).await.len(), 10, "the last 10 revisions are kept");
}

/// Dropping every handle closes the file: watches end with `Unavailable`, the file reopens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_ends_watches_and_releases_the_file() {
    let dir = temp_dir();
    let path = dir.path().join("s.redb");
    let s = EmbeddedStore::open(&path, EmbeddedOptions::default()).await.unwrap();
    let err = EmbeddedStore::open(&path, EmbeddedOptions::default()).await.err().unwrap();
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    let mut w = s.watch(KeyRange::prefix("/c/"), 0).await.unwrap();
    drop(s);
    let item = next_item(&mut w, Duration::from_secs(5)).await;
    assert!(matches!(item, Err(StoreError::Unavailable(_))), "{item:?}");
    assert!(tokio::time::timeout(Duration::from_secs(5), w.next()).await.unwrap().is_none());
    drop(w);
    // Give the watch task a moment to drop its database handle.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match EmbeddedStore::open(&path, EmbeddedOptions::default()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("file not released: {e}"),
        }
    }
}
