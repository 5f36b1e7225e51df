//! Embedded single-file store (redb): the [`Store`] contract without an etcd cluster.
//!
//! One redb file holds the keys (with create/mod revision, version and lease), the global
//! revision, the leases and an event log per revision (for watches from a past revision).
//! Every acknowledged write is durable: callers are answered only after the redb commit (fsync)
//! returned, so a `kill -9` loses nothing that was acknowledged.
//!
//! * Writes go through one writer thread (`writer.rs`) with group commit: the transactions queued
//!   while a commit runs are applied in order in the next redb transaction, one revision each.
//! * Reads run on tokio's blocking pool against redb's MVCC snapshots, so they never wait for
//!   the writer nor block the async runtime.
//! * Watches (`watch.rs`) replay the log, then follow an in-process broadcast.
//! * Leases: ids come from a persisted counter, so they are unique across restarts. Expiry
//!   clocks live in memory: on reopen, every lease gets its full TTL again (as after an etcd
//!   leader change). An expired lease's keys are deleted in one revision of `Delete` events.
//! * History: the log keeps at least `history_revisions` revisions; older ones are compacted
//!   automatically (and [`Store::compact`] compacts explicitly).
//!
//! The file is closed when the last handle is dropped (dropping waits for the writer thread to
//! finish its current batch); watch streams end with `Unavailable` then.

mod read;
mod schema;
mod watch;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::{broadcast, oneshot};

use self::read::read_range;
use self::schema::{KV, LEASE_KEYS, LEASES, LOG, META};
use self::writer::{Committed, LeaseClock, LeaseClocks, Op, Reply, Request, Writer, WriterConfig, load_state};
use crate::validate::{check_range, check_txn};
use crate::{
    KeyRange, LeaseId, RangeRequest, RangeResult, Revision, Store, StoreError, StoreResult, Txn, TxnResult, WatchStream,
};

/// Options of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Keep at least this many revisions of history for watchers (older ones are compacted).
    /// 0 = never compact automatically.
    pub history_revisions: u64,
    /// Most transactions committed together by one redb commit (1 = no group commit).
    pub max_batch: usize,
    /// Committed batches buffered for live watchers; a watcher further behind catches up from
    /// the log.
    pub watch_buffer: usize,
    /// An idle watch yields an empty batch (progress notification) this often; `None` = never.
    pub progress_interval: Option<Duration>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_revisions: 100_000,
            max_batch: 1024,
            watch_buffer: 1024,
            progress_interval: Some(Duration::from_secs(10)),
        }
    }
}

/// Single-file store. Clones share the file and its writer thread.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    events: Option<broadcast::Sender<Arc<Committed>>>,
    leases: LeaseClocks,
    committed: Arc<AtomicU64>,
    options: EmbeddedOptions,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the writer; waiting for it releases the file for a reopen.
        self.requests.take();
        self.events.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn internal(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("embedded store: {context}: {e}"))
}

/// Runs blocking redb work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(internal("blocking task", e)))
}

impl EmbeddedStore {
    /// Opens (or creates) the store file.
    pub async fn open(path: &Path, options: EmbeddedOptions) -> StoreResult<Self> {
        let path = path.to_path_buf();
        let opened = blocking(move || open_file(&path)).await?;
        let (db, state, leases) = opened;
        let db = Arc::new(db);
        let now = Instant::now();
        let clocks: HashMap<LeaseId, LeaseClock> = leases
            .into_iter()
            .map(|(id, ttl_secs)| {
                let ttl = Duration::from_secs(ttl_secs);
                (id, LeaseClock { ttl, deadline: now + ttl })
            })
            .collect();
        let leases: LeaseClocks = Arc::new(Mutex::new(clocks));
        let committed = Arc::new(AtomicU64::new(state.revision));
        let (events, _) = broadcast::channel(options.watch_buffer.max(1));
        let (requests, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            rx,
            events: events.clone(),
            leases: leases.clone(),
            committed: committed.clone(),
            state,
            config: WriterConfig { max_batch: options.max_batch.max(1), history_revisions: options.history_revisions },
        };
        let writer = std::thread::Builder::new()
            .name("victor-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| internal("spawn writer thread", e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                requests: Some(requests),
                writer: Some(writer),
                events: Some(events),
                leases,
                committed,
                options,
            }),
        })
    }

    /// Sends `op` to the writer and waits for its answer.
    async fn write(&self, op: Op) -> StoreResult<Reply> {
        let (reply, rx) = oneshot::channel();
        let stopped = || StoreError::Unavailable("embedded store writer thread stopped".into());
        self.inner.requests.as_ref().ok_or_else(stopped)?.send(Request { op, reply }).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

type Opened = (Database, writer::State, Vec<(LeaseId, u64)>);

/// Opens the file, creates missing tables, and loads the counters and leases.
fn open_file(path: &Path) -> StoreResult<Opened> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    let db = Database::create(path).map_err(|e| internal(&ctx("open"), e))?;
    let wtx = db.begin_write().map_err(|e| internal(&ctx("init"), e))?;
    {
        wtx.open_table(KV).map_err(|e| internal(&ctx("init"), e))?;
        wtx.open_table(LOG).map_err(|e| internal(&ctx("init"), e))?;
        wtx.open_table(META).map_err(|e| internal(&ctx("init"), e))?;
        wtx.open_table(LEASES).map_err(|e| internal(&ctx("init"), e))?;
        wtx.open_table(LEASE_KEYS).map_err(|e| internal(&ctx("init"), e))?;
    }
    wtx.commit().map_err(|e| internal(&ctx("init"), e))?;
    let rtx = db.begin_read().map_err(|e| internal(&ctx("read"), e))?;
    let meta = rtx.open_table(META).map_err(|e| internal(&ctx("read"), e))?;
    let state = load_state(&meta).map_err(|e| internal(&ctx("read"), e))?;
    let leases_table = rtx.open_table(LEASES).map_err(|e| internal(&ctx("read"), e))?;
    let mut leases = Vec::new();
    for item in leases_table.iter().map_err(|e| internal(&ctx("read"), e))? {
        let (id, ttl) = item.map_err(|e| internal(&ctx("read"), e))?;
        leases.push((id.value(), ttl.value()));
    }
    drop((meta, leases_table, rtx));
    Ok((db, state, leases))
}

/// Whole seconds, rounded up, at least 1 (etcd's lease granularity).
fn ttl_secs(ttl: Duration) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1)
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn range(&self, req: RangeRequest) -> StoreResult<RangeResult> {
        check_range(&req.range)?;
        let db = self.inner.db.clone();
        blocking(move || {
            let rtx = db.begin_read().map_err(|e| internal("range", e))?;
            let meta = rtx.open_table(META).map_err(|e| internal("range", e))?;
            let revision = load_state(&meta).map_err(|e| internal("range", e))?.revision;
            let kv = rtx.open_table(KV).map_err(|e| internal("range", e))?;
            let (kvs, more) = read_range(&kv, &req.range, req.limit).map_err(|e| internal("range", e))?;
            Ok(RangeResult { kvs, revision, more })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResult> {
        check_txn(&txn)?;
        match self.write(Op::Txn(txn)).await? {
            Reply::Txn(r) => Ok(r),
            other => Err(internal("txn", format!("unexpected reply {other:?}"))),
        }
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let ttl_secs = ttl_secs(ttl);
        match self.write(Op::LeaseGrant { ttl_secs }).await? {
            Reply::Lease(id) => Ok(id),
            other => Err(internal("lease grant", format!("unexpected reply {other:?}"))),
        }
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let mut clocks = self.inner.leases.lock().expect("lease clocks poisoned");
        let now = Instant::now();
        match clocks.get_mut(&lease) {
            Some(clock) if clock.deadline > now => {
                clock.deadline = now + clock.ttl;
                Ok(clock.ttl)
            }
            // Expired (the writer is about to revoke it) or unknown.
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.write(Op::LeaseRevoke(lease)).await.map(|_| ())
    }

    async fn watch(&self, range: KeyRange, from_revision: Revision) -> StoreResult<WatchStream> {
        check_range(&range)?;
        let live = self
            .inner
            .events
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("embedded store closed".into()))?
            .subscribe();
        // Subscribed first: every revision committed from now on reaches `live`.
        let db = self.inner.db.clone();
        let state = blocking(move || {
            let rtx = db.begin_read().map_err(|e| internal("watch", e))?;
            let meta = rtx.open_table(META).map_err(|e| internal("watch", e))?;
            load_state(&meta).map_err(|e| internal("watch", e))
        })
        .await?;
        let next = if from_revision == 0 { state.revision + 1 } else { from_revision };
        if next < state.compacted {
            return Err(StoreError::Compacted { requested: next, compacted: state.compacted });
        }
        Ok(watch::spawn(self.inner.db.clone(), live, range, next, self.inner.options.progress_interval))
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.write(Op::Compact(revision)).await.map(|_| ())
    }

    async fn current_revision(&self) -> StoreResult<Revision> {
        if self.inner.writer.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(StoreError::Unavailable("embedded store writer thread stopped".into()));
        }
        Ok(self.inner.committed.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }
}
