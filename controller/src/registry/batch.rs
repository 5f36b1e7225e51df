//! Group commit of compare-and-swap writes: the CAS of every concurrent claim (from any number of
//! Report calls) is folded into one store transaction of up to [`MAX_BATCH`] claims, so the store
//! pays one consensus round and one fsync for many claims.
//!
//! A batch's transaction compares every claim's keys and, if all hold, writes every claim at one
//! revision; if any compare fails, nothing is written and its failure branch returns the current
//! value of every key. The claims whose keys changed get that value back (the caller re-decides
//! on it, as with a single CAS); the others were innocent and are sent again at once without
//! them. Every round removes at least one claim, so a batch ends after at most as many rounds as
//! it has claims, and the per-claim semantics are those of a single CAS.
//!
//! No timer: a batch is whatever is queued when a transaction slot frees up. A lone claim is sent
//! alone at once (no added latency); under load, claims queue while [`MAX_INFLIGHT`] transactions
//! are in flight and the next transaction takes them all.
//!
//! A transaction unanswered after [`SLOW_TXN`] gives its slot up and keeps waiting for its answer,
//! so a transaction stuck on a store that cannot answer yet never holds back later claims: when
//! the etcd leader dies, followers forward the writes in flight to it and etcd answers them only
//! at our request deadline (`--etcd-timeout`), while later batches can commit as soon as the
//! followers know the new leader. At most [`MAX_OUTSTANDING`] transactions are in flight counting
//! the slow ones. CAS keeps this safe: a claim overtaken by a later transaction on the same key
//! fails its compare and is decided again. docs/faults.md ("the leader-kill stall") and
//! BENCHMARKS.md report the write gap this leaves after a leader kill.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};
use victor_store::{Compare, KeyRange, KeyValue, MAX_TXN_OPS, Revision, Store, StoreError, StoreResult, Txn, TxnOp};

use crate::metrics::Metrics;

/// Claims per transaction: two compares (binding and declaration; three with a guard) and, on
/// failure, as many reads per claim must fit etcd 3.4's 128 operations per list.
pub const MAX_BATCH: usize = MAX_TXN_OPS / 2;
/// Batch transactions in flight at once (not counting slow ones).
pub const MAX_INFLIGHT: usize = 4;
/// A transaction in flight this long stops holding one of the [`MAX_INFLIGHT`] slots: well above
/// a healthy commit (BENCHMARKS.md: the store floor and the 1,000-FE runs), well below a leader
/// failover.
pub const SLOW_TXN: Duration = Duration::from_millis(250);
/// Transactions in flight at most, slow ones included.
pub const MAX_OUTSTANDING: usize = 64;

/// One CAS: write `op` if the binding key and the declaration key still have these revisions.
#[derive(Debug, Clone)]
pub struct CasRequest {
    /// The binding key (also the batch's identity of the claim: one claim per key per batch).
    pub binding_key: Vec<u8>,
    /// The VM declaration key.
    pub vm_key: Vec<u8>,
    /// Expected mod revision of the binding key (0 = absent).
    pub binding_rev: Revision,
    /// Expected mod revision of the declaration key (0 = absent).
    pub vm_rev: Revision,
    /// The write (a put or a delete of the binding key).
    pub op: TxnOp,
    /// One more key whose mod revision must still be this one (the tombstone horizon, for a
    /// decision made on a binding key without any record).
    pub guard: Option<(Vec<u8>, Revision)>,
}

impl CasRequest {
    /// Compares (and reads on failure) this claim adds to a transaction.
    fn ops(&self) -> usize {
        2 + usize::from(self.guard.is_some())
    }
}

/// How a CAS ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written at this revision.
    Committed(Revision),
    /// A compare failed: the current binding and declaration.
    Conflict {
        /// The binding key now.
        binding: Option<KeyValue>,
        /// The declaration key now.
        vm: Option<KeyValue>,
    },
}

struct Pending {
    req: CasRequest,
    reply: oneshot::Sender<StoreResult<CasOutcome>>,
}

/// Handle to the batching task (cheap to share; the task ends with the last handle).
pub struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Starts the batching task on the current runtime.
    pub fn start<S: Store>(store: S, metrics: Arc<Metrics>) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, metrics, rx));
        Batcher { tx }
    }

    /// Commits `req` (batched with whatever else is pending).
    pub async fn submit(&self, req: CasRequest) -> StoreResult<CasOutcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { req, reply })
            .map_err(|_| StoreError::Unavailable("the claim batcher stopped (replica shutting down)".into()))?;
        rx.await.map_err(|_| StoreError::OutcomeUnknown("the claim batcher stopped (replica shutting down)".into()))?
    }
}

async fn run<S: Store>(store: S, metrics: Arc<Metrics>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let outstanding = Arc::new(Semaphore::new(MAX_OUTSTANDING));
    let mut queue: VecDeque<Pending> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(p) => queue.push_back(p),
                None => return,
            }
        }
        let slot = slots.clone().acquire_owned().await.expect("semaphore never closed");
        let counted = outstanding.clone().acquire_owned().await.expect("semaphore never closed");
        while let Ok(p) = rx.try_recv() {
            queue.push_back(p);
        }
        let batch = take_batch(&mut queue);
        let (store, metrics) = (store.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut committing = std::pin::pin!(commit(&store, &metrics, batch));
            if tokio::time::timeout(SLOW_TXN, &mut committing).await.is_err() {
                tracing::debug!(after = ?SLOW_TXN, "store transaction slow; the next batch goes out meanwhile");
                drop(slot);
                committing.await;
            }
            drop(counted);
        });
    }
}

/// Takes claims on distinct keys from the front of the queue, as many as fit one transaction
/// ([`MAX_TXN_OPS`] compares; a second claim on a key waits for the next batch, keeping its
/// order).
fn take_batch(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch = Vec::with_capacity(queue.len().min(MAX_BATCH));
    let mut keys = HashSet::new();
    let mut later = VecDeque::new();
    let mut ops = 0;
    while let Some(p) = queue.pop_front() {
        if ops + p.req.ops() > MAX_TXN_OPS {
            queue.push_front(p);
            break;
        }
        if keys.insert(p.req.binding_key.clone()) {
            ops += p.req.ops();
            batch.push(p);
        } else {
            later.push_back(p);
        }
    }
    later.append(queue);
    *queue = later;
    batch
}

fn transaction(batch: &[Pending]) -> Txn {
    let ops = batch.iter().map(|p| p.req.ops()).sum();
    let mut txn = Txn {
        compares: Vec::with_capacity(ops),
        success: Vec::with_capacity(batch.len()),
        failure: Vec::with_capacity(ops),
    };
    for Pending { req, .. } in batch {
        txn.compares.push(Compare::mod_revision(req.binding_key.clone(), req.binding_rev));
        txn.compares.push(Compare::mod_revision(req.vm_key.clone(), req.vm_rev));
        txn.success.push(req.op.clone());
        txn.failure.push(TxnOp::Get(KeyRange::key(req.binding_key.clone())));
        txn.failure.push(TxnOp::Get(KeyRange::key(req.vm_key.clone())));
        if let Some((key, revision)) = &req.guard {
            txn.compares.push(Compare::mod_revision(key.clone(), *revision));
            txn.failure.push(TxnOp::Get(KeyRange::key(key.clone())));
        }
    }
    txn
}

async fn commit<S: Store>(store: &S, metrics: &Metrics, mut batch: Vec<Pending>) {
    while !batch.is_empty() {
        let started = Instant::now();
        let result = store.txn(transaction(&batch)).await;
        metrics.store_op("txn", started);
        let result = match result {
            Ok(result) => result,
            Err(err) => {
                if err.is_unavailable() {
                    metrics.store_unavailable.inc();
                }
                for p in batch {
                    let _ = p.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        if result.succeeded {
            for p in batch {
                let _ = p.reply.send(Ok(CasOutcome::Committed(result.revision)));
            }
            return;
        }
        batch = split_conflicts(batch, result.reads);
    }
}

/// After a failed batch: answers the claims whose keys changed with their current values and
/// returns the innocent ones to send again.
fn split_conflicts(batch: Vec<Pending>, reads: Vec<victor_store::RangeResult>) -> Vec<Pending> {
    let mut reads = reads.into_iter().map(|r| r.kvs.into_iter().next());
    let mut innocent = Vec::new();
    for p in batch {
        let binding = reads.next().flatten();
        let vm = reads.next().flatten();
        let guard_moved = p
            .req
            .guard
            .as_ref()
            .is_some_and(|(_, expected)| reads.next().flatten().map_or(0, |kv| kv.mod_revision) != *expected);
        let now = (binding.as_ref().map_or(0, |kv| kv.mod_revision), vm.as_ref().map_or(0, |kv| kv.mod_revision));
        if now == (p.req.binding_rev, p.req.vm_rev) && !guard_moved {
            innocent.push(p);
        } else {
            let _ = p.reply.send(Ok(CasOutcome::Conflict { binding, vm }));
        }
    }
    innocent
}

#[cfg(test)]
mod tests {
    use super::*;
    use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};

    fn req(key: &str, binding_rev: Revision, value: &str) -> CasRequest {
        CasRequest {
            binding_key: format!("/t/b/{key}").into_bytes(),
            vm_key: format!("/t/v/{key}").into_bytes(),
            binding_rev,
            vm_rev: 0,
            op: TxnOp::put(format!("/t/b/{key}"), value),
            guard: None,
        }
    }

    async fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"), EmbeddedOptions::default()).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn concurrent_claims_share_transactions_and_conflicts_come_back_alone() {
        let (_dir, store) = store().await;
        let metrics = Arc::new(Metrics::new());
        let batcher = Arc::new(Batcher::start(store.clone(), metrics.clone()));
        // 200 claims on distinct keys, submitted concurrently: all commit, in fewer transactions.
        let before = store.current_revision().await.unwrap();
        let claims = (0..200).map(|i| {
            let b = batcher.clone();
            tokio::spawn(async move { b.submit(req(&i.to_string(), 0, "x")).await })
        });
        let mut revisions = HashSet::new();
        for c in claims.collect::<Vec<_>>() {
            match c.await.unwrap().unwrap() {
                CasOutcome::Committed(rev) => revisions.insert(rev),
                other => panic!("unexpected {other:?}"),
            };
        }
        let after = store.current_revision().await.unwrap();
        assert!(after - before < 200, "200 claims took {} transactions", after - before);
        assert_eq!(revisions.len() as u64, after - before, "one revision per transaction");

        // A stale claim (expects key 7 absent) batched with fresh ones: only it conflicts.
        let key7 = store.get(b"/t/b/7").await.unwrap().0.unwrap();
        let stale = batcher.submit(req("7", 0, "y"));
        let fresh = batcher.submit(req("new", 0, "z"));
        let (stale, fresh) = tokio::join!(stale, fresh);
        assert_eq!(stale.unwrap(), CasOutcome::Conflict { binding: Some(key7.clone()), vm: None });
        assert!(matches!(fresh.unwrap(), CasOutcome::Committed(_)));
        assert_eq!(store.get(b"/t/b/7").await.unwrap().0.unwrap().value, b"x", "the stale claim wrote nothing");
    }

    /// The embedded store, except that its first `stall` transactions never answer (like writes
    /// a follower forwarded to an etcd leader that just died).
    #[derive(Clone)]
    struct Stalling {
        inner: EmbeddedStore,
        stall: Arc<std::sync::atomic::AtomicUsize>,
        txns: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Store for Stalling {
        fn kind(&self) -> &'static str {
            "stalling"
        }
        async fn range(&self, req: victor_store::RangeRequest) -> StoreResult<victor_store::RangeResult> {
            self.inner.range(req).await
        }
        async fn txn(&self, txn: Txn) -> StoreResult<victor_store::TxnResult> {
            use std::sync::atomic::Ordering::SeqCst;
            self.txns.fetch_add(1, SeqCst);
            if self.stall.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                std::future::pending::<()>().await;
            }
            self.inner.txn(txn).await
        }
        async fn lease_grant(&self, ttl: Duration) -> StoreResult<victor_store::LeaseId> {
            self.inner.lease_grant(ttl).await
        }
        async fn lease_keep_alive(&self, lease: victor_store::LeaseId) -> StoreResult<Duration> {
            self.inner.lease_keep_alive(lease).await
        }
        async fn lease_revoke(&self, lease: victor_store::LeaseId) -> StoreResult<()> {
            self.inner.lease_revoke(lease).await
        }
        async fn watch(&self, range: KeyRange, from: Revision) -> StoreResult<victor_store::WatchStream> {
            self.inner.watch(range, from).await
        }
        async fn compact(&self, revision: Revision) -> StoreResult<()> {
            self.inner.compact(revision).await
        }
        async fn current_revision(&self) -> StoreResult<Revision> {
            self.inner.current_revision().await
        }
    }

    #[tokio::test]
    async fn transactions_that_never_answer_do_not_hold_back_later_claims() {
        use std::sync::atomic::Ordering::SeqCst;
        let (_dir, inner) = store().await;
        let stalling = Stalling { inner, stall: Arc::new(MAX_INFLIGHT.into()), txns: Arc::default() };
        let batcher = Arc::new(Batcher::start(stalling.clone(), Arc::new(Metrics::new())));
        // Every slot gets a transaction that never answers (one claim each, sent one by one).
        let mut stuck = Vec::new();
        for i in 0..MAX_INFLIGHT {
            let b = batcher.clone();
            stuck.push(tokio::spawn(async move { b.submit(req(&format!("stuck{i}"), 0, "x")).await }));
            while stalling.txns.load(SeqCst) <= i {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // A later claim still commits (the stuck ones gave their slots up).
        let later = tokio::time::timeout(Duration::from_secs(10), batcher.submit(req("later", 0, "y"))).await;
        assert!(matches!(later, Ok(Ok(CasOutcome::Committed(_)))), "{later:?}");
        assert_eq!(stalling.inner.get(b"/t/b/later").await.unwrap().0.unwrap().value, b"y");
        assert!(stuck.iter().all(|t| !t.is_finished()), "the stuck claims are still waiting for their answer");
    }

    #[test]
    fn a_batch_holds_each_key_once_and_at_most_max_batch_claims() {
        let mut queue: VecDeque<Pending> = ["a", "b", "a", "c"]
            .iter()
            .map(|k| Pending { req: req(k, 0, "v"), reply: oneshot::channel().0 })
            .chain((0..100).map(|i| Pending { req: req(&format!("k{i}"), 0, "v"), reply: oneshot::channel().0 }))
            .collect();
        let batch = take_batch(&mut queue);
        assert_eq!(batch.len(), MAX_BATCH);
        let keys: HashSet<_> = batch.iter().map(|p| p.req.binding_key.clone()).collect();
        assert_eq!(keys.len(), MAX_BATCH);
        assert_eq!(queue.front().unwrap().req.binding_key, b"/t/b/a", "the second claim on a waits, first in line");
        assert_eq!(queue.len(), 104 - MAX_BATCH);
        assert!(transaction(&batch).compares.len() <= MAX_TXN_OPS);
        // Guarded claims take three operations each: fewer of them fit.
        let guarded = |k: String| CasRequest { guard: Some((b"/t/m/h".to_vec(), 3)), ..req(&k, 0, "v") };
        let mut queue: VecDeque<Pending> =
            (0..100).map(|i| Pending { req: guarded(format!("g{i}")), reply: oneshot::channel().0 }).collect();
        let batch = take_batch(&mut queue);
        assert_eq!(batch.len(), MAX_TXN_OPS / 3);
        let txn = transaction(&batch);
        assert!(txn.compares.len() <= MAX_TXN_OPS && txn.failure.len() <= MAX_TXN_OPS);
    }

    #[tokio::test]
    async fn a_moved_guard_is_a_conflict() {
        let (_dir, store) = store().await;
        let batcher = Batcher::start(store.clone(), Arc::new(Metrics::new()));
        store.txn(Txn { compares: vec![], success: vec![TxnOp::put("/t/m/h", "1")], failure: vec![] }).await.unwrap();
        let stale_guard = CasRequest { guard: Some((b"/t/m/h".to_vec(), 0)), ..req("x", 0, "v") };
        assert!(matches!(batcher.submit(stale_guard).await.unwrap(), CasOutcome::Conflict { binding: None, .. }));
        assert_eq!(store.get(b"/t/b/x").await.unwrap().0, None, "nothing written");
        let (h, _) = store.get(b"/t/m/h").await.unwrap();
        let fresh_guard = CasRequest { guard: Some((b"/t/m/h".to_vec(), h.unwrap().mod_revision)), ..req("x", 0, "v") };
        assert!(matches!(batcher.submit(fresh_guard).await.unwrap(), CasOutcome::Committed(_)));
    }
}
