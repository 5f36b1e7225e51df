//! The store conformance suite: one set of cases, generic over `S: Store`, run against every
//! backend — embedded (temp file), a real single-member etcd and a real 3-member etcd. The
//! `conformance!` macro stamps out one `#[tokio::test]` per (backend, case), so the test runner
//! runs them in parallel and a failure names its backend (`etcd3::cas_on_mod_revision`).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{assert_quiet, describe, events, next_item};
use victor_store::{
    CmpOp, Compare, CompareTarget, EventKind, KeyRange, MAX_TXN_OPS, RangeRequest, Store, StoreError, Txn, TxnOp,
};

const WAIT: Duration = Duration::from_secs(5);

fn range(r: KeyRange, limit: usize) -> RangeRequest {
    RangeRequest { range: r, limit }
}

fn put_txn(key: &str, value: &str) -> Txn {
    Txn { success: vec![TxnOp::put(key, value)], ..Txn::default() }
}

async fn put<S: Store>(s: &S, key: &str, value: &str) -> u64 {
    let r = s.txn(put_txn(key, value)).await.unwrap();
    assert!(r.succeeded);
    r.revision
}

async fn value_of<S: Store>(s: &S, key: &str) -> Option<String> {
    let (kv, _) = s.get(key.as_bytes()).await.unwrap();
    kv.map(|kv| String::from_utf8(kv.value).unwrap())
}

async fn keys_under<S: Store>(s: &S, prefix: &str) -> Vec<String> {
    let r = s.range(range(KeyRange::prefix(prefix), 0)).await.unwrap();
    r.kvs.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()).collect()
}

/// The cases. Each gets a fresh store.
mod cases {
    use super::*;

    /// Revision starts at 1 and grows by exactly one per write transaction; failed, read-only and
    /// no-op transactions leave it alone.
    pub(crate) async fn revision_counts_write_txns<S: Store>(s: &S) {
        assert_eq!(s.current_revision().await.unwrap(), 1, "a fresh store is at revision 1");
        assert_eq!(put(s, "/r/a", "1").await, 2);
        let multi = Txn { success: vec![TxnOp::put("/r/b", "1"), TxnOp::put("/r/c", "1")], ..Txn::default() };
        assert_eq!(s.txn(multi).await.unwrap().revision, 3, "one txn = one revision");
        let failed = Txn {
            compares: vec![Compare::mod_revision("/r/a", 999)],
            success: vec![TxnOp::put("/r/a", "2")],
            failure: vec![TxnOp::Get(KeyRange::key("/r/a"))],
        };
        let r = s.txn(failed).await.unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, 3);
        let read_only = Txn { success: vec![TxnOp::Get(KeyRange::prefix("/r/"))], ..Txn::default() };
        let r = s.txn(read_only).await.unwrap();
        assert_eq!((r.revision, r.reads[0].kvs.len()), (3, 3));
        let noop_delete = Txn { success: vec![TxnOp::delete("/r/missing")], ..Txn::default() };
        assert_eq!(s.txn(noop_delete).await.unwrap().revision, 3);
        assert_eq!(s.current_revision().await.unwrap(), 3);
        let res = s.range(range(KeyRange::prefix("/r/"), 0)).await.unwrap();
        assert_eq!(res.revision, 3);
        let (kv, rev) = s.get(b"/r/b").await.unwrap();
        let kv = kv.unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version, rev), (3, 3, 1, 3));
    }

    /// CAS on the mod revision: the fresh one wins, a stale one fails and its failure branch
    /// reads the current value.
    pub(crate) async fn cas_on_mod_revision<S: Store>(s: &S) {
        let r1 = put(s, "/cas/k", "v1").await;
        let cas = |expect: u64, value: &str| Txn {
            compares: vec![Compare::mod_revision("/cas/k", expect)],
            success: vec![TxnOp::put("/cas/k", value)],
            failure: vec![TxnOp::Get(KeyRange::key("/cas/k"))],
        };
        let ok = s.txn(cas(r1, "v2")).await.unwrap();
        assert!(ok.succeeded);
        assert!(ok.reads.is_empty());
        let r2 = ok.revision;
        assert_eq!(r2, r1 + 1);
        let stale = s.txn(cas(r1, "v3")).await.unwrap();
        assert!(!stale.succeeded, "a CAS on a stale revision must fail");
        assert_eq!(stale.revision, r2);
        let current = &stale.reads[0].kvs[0];
        assert_eq!(current.value, b"v2");
        assert_eq!(current.mod_revision, r2);
        assert_eq!(current.create_revision, r1);
        assert_eq!(current.version, 2);
        assert_eq!(value_of(s, "/cas/k").await.as_deref(), Some("v2"));
        // Other operators.
        let ops = [
            (CmpOp::NotEqual, r1, true),
            (CmpOp::Greater, r1, true),
            (CmpOp::Less, r2, false),
            (CmpOp::Less, r2 + 1, true),
        ];
        for (op, rev, holds) in ops {
            let t = Txn {
                compares: vec![Compare { key: b"/cas/k".to_vec(), op, target: CompareTarget::ModRevision(rev) }],
                ..Txn::default()
            };
            assert_eq!(s.txn(t).await.unwrap().succeeded, holds, "{op:?} {rev}");
        }
    }

    /// All operations of a transaction apply together, or none does.
    pub(crate) async fn multi_key_atomicity<S: Store>(s: &S) {
        put(s, "/atom/guard", "g").await;
        let writes = vec![TxnOp::put("/atom/a", "1"), TxnOp::put("/atom/b", "2"), TxnOp::delete("/atom/guard")];
        let failing = Txn {
            compares: vec![
                Compare::absent("/atom/a"),
                Compare {
                    key: b"/atom/guard".to_vec(),
                    op: CmpOp::Equal,
                    target: CompareTarget::Value(b"other".to_vec()),
                },
            ],
            success: writes.clone(),
            failure: vec![],
        };
        assert!(!s.txn(failing).await.unwrap().succeeded);
        assert_eq!(keys_under(s, "/atom/").await, vec!["/atom/guard"]);
        let passing = Txn {
            compares: vec![Compare {
                key: b"/atom/guard".to_vec(),
                op: CmpOp::Equal,
                target: CompareTarget::Value(b"g".to_vec()),
            }],
            success: writes,
            failure: vec![],
        };
        let r = s.txn(passing).await.unwrap();
        assert!(r.succeeded);
        let res = s.range(range(KeyRange::prefix("/atom/"), 0)).await.unwrap();
        let got: Vec<_> = res.kvs.iter().map(|kv| (kv.key.clone(), kv.mod_revision)).collect();
        assert_eq!(got, vec![(b"/atom/a".to_vec(), r.revision), (b"/atom/b".to_vec(), r.revision)]);
    }

    /// Compares on a missing key: revision/version 0 hold, a value compare never does.
    pub(crate) async fn absent_key_compare<S: Store>(s: &S) {
        let create = || Txn {
            compares: vec![Compare::absent("/abs/k")],
            success: vec![TxnOp::put("/abs/k", "first")],
            failure: vec![TxnOp::Get(KeyRange::key("/abs/k"))],
        };
        assert!(s.txn(create()).await.unwrap().succeeded);
        let second = s.txn(create()).await.unwrap();
        assert!(!second.succeeded, "create-if-absent succeeds once");
        assert_eq!(second.reads[0].kvs[0].value, b"first");
        let zero_rev = Txn { compares: vec![Compare::mod_revision("/abs/other", 0)], ..Txn::default() };
        assert!(s.txn(zero_rev).await.unwrap().succeeded);
        let create_rev = Txn {
            compares: vec![Compare {
                key: b"/abs/other".to_vec(),
                op: CmpOp::Equal,
                target: CompareTarget::CreateRevision(0),
            }],
            ..Txn::default()
        };
        assert!(s.txn(create_rev).await.unwrap().succeeded);
        for op in [CmpOp::Equal, CmpOp::NotEqual, CmpOp::Less, CmpOp::Greater] {
            let t = Txn {
                compares: vec![Compare {
                    key: b"/abs/other".to_vec(),
                    op,
                    target: CompareTarget::Value(b"x".to_vec()),
                }],
                ..Txn::default()
            };
            assert!(!s.txn(t).await.unwrap().succeeded, "value {op:?} on a missing key");
        }
    }

    /// 129 operations are refused before anything is written; 128 are fine.
    pub(crate) async fn too_many_ops<S: Store>(s: &S) {
        let puts = |n: usize| -> Vec<TxnOp> { (0..n).map(|i| TxnOp::put(format!("/many/{i:03}"), "v")).collect() };
        let big = Txn { success: puts(MAX_TXN_OPS + 1), ..Txn::default() };
        assert_eq!(s.txn(big).await, Err(StoreError::TooManyOps { ops: MAX_TXN_OPS + 1, max: MAX_TXN_OPS }));
        assert!(keys_under(s, "/many/").await.is_empty());
        assert_eq!(s.current_revision().await.unwrap(), 1);
        let ok = Txn { success: puts(MAX_TXN_OPS), ..Txn::default() };
        assert_eq!(s.txn(ok).await.unwrap().revision, 2);
        assert_eq!(keys_under(s, "/many/").await.len(), MAX_TXN_OPS);
    }

    /// Malformed requests are refused with `InvalidArgument` on every backend.
    pub(crate) async fn invalid_requests<S: Store>(s: &S) {
        for bad in [
            put_txn("", "v"),
            Txn { success: vec![TxnOp::put("/inv/a", "1"), TxnOp::put("/inv/a", "2")], ..Txn::default() },
            Txn {
                success: vec![TxnOp::Delete(KeyRange::prefix("/inv/")), TxnOp::put("/inv/a", "1")],
                ..Txn::default()
            },
        ] {
            let r = s.txn(bad.clone()).await;
            assert!(matches!(r, Err(StoreError::InvalidArgument(_))), "{bad:?}: {r:?}");
        }
        let r = s.range(range(KeyRange::key(""), 0)).await;
        assert!(matches!(r, Err(StoreError::InvalidArgument(_))), "{r:?}");
        assert_eq!(s.current_revision().await.unwrap(), 1);
    }

    /// Ranges: prefix, explicit bounds, limit and `more`, ascending order, every key.
    pub(crate) async fn range_prefix_limit_more<S: Store>(s: &S) {
        let t = Txn {
            success: ["/rg/b/2", "/rg/a/3", "/rg/a/1", "/rg/a/2", "/rg/a0", "/rg/a/\u{ff}"]
                .iter()
                .map(|k| TxnOp::put(*k, *k))
                .collect(),
            ..Txn::default()
        };
        s.txn(t).await.unwrap();
        let all_a = s.range(range(KeyRange::prefix("/rg/a/"), 0)).await.unwrap();
        let keys: Vec<_> = all_a.kvs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(
            keys,
            vec![b"/rg/a/1".to_vec(), b"/rg/a/2".to_vec(), b"/rg/a/3".to_vec(), "/rg/a/\u{ff}".as_bytes().to_vec()]
        );
        assert!(!all_a.more);
        let limited = s.range(range(KeyRange::prefix("/rg/a/"), 2)).await.unwrap();
        assert_eq!(limited.kvs.len(), 2);
        assert_eq!(limited.kvs[1].key, b"/rg/a/2");
        assert!(limited.more);
        let exact = s.range(range(KeyRange::prefix("/rg/a/"), 4)).await.unwrap();
        assert!(!exact.more);
        let between = s.range(range(KeyRange::between("/rg/a/2", "/rg/b/2"), 0)).await.unwrap();
        assert_eq!(between.kvs.len(), 4, "[a/2, b/2): a/2 a/3 a/\\xff a0");
        let single = s.range(range(KeyRange::key("/rg/a"), 0)).await.unwrap();
        assert!(single.kvs.is_empty(), "a single key is not a prefix");
        let everything = s.range(range(KeyRange::prefix(""), 0)).await.unwrap();
        assert_eq!(everything.kvs.len(), 6);
        let from = s.range(range(KeyRange::between("/rg/b", vec![0]), 0)).await.unwrap();
        assert_eq!(from.kvs.len(), 1, "end [0] = every key from start on");
        let (missing, rev) = s.get(b"/rg/none").await.unwrap();
        assert!(missing.is_none());
        assert_eq!(rev, 2);
    }

    /// Deleting a range removes exactly its keys, in one revision.
    pub(crate) async fn delete_range<S: Store>(s: &S) {
        let t = Txn {
            success: ["/del/x/1", "/del/x/2", "/del/x/3", "/del/y/1"].iter().map(|k| TxnOp::put(*k, "v")).collect(),
            ..Txn::default()
        };
        let r0 = s.txn(t).await.unwrap().revision;
        let mut w = s.watch(KeyRange::prefix("/del/"), r0 + 1).await.unwrap();
        let del = Txn { success: vec![TxnOp::Delete(KeyRange::prefix("/del/x/"))], ..Txn::default() };
        let r1 = s.txn(del).await.unwrap().revision;
        assert_eq!(r1, r0 + 1);
        assert_eq!(keys_under(s, "/del/").await, vec!["/del/y/1"]);
        let evs = events(&mut w, 3, WAIT).await;
        for (e, k) in evs.iter().zip(["/del/x/1", "/del/x/2", "/del/x/3"]) {
            assert_eq!(e.kind, EventKind::Delete);
            assert_eq!(e.kv.key, k.as_bytes());
            assert_eq!(e.kv.mod_revision, r1);
            assert_eq!((e.kv.version, e.kv.create_revision), (0, 0));
            assert!(e.kv.value.is_empty());
        }
    }

    /// Keys of an expired lease vanish as Delete events; keep-alive then says LeaseNotFound.
    pub(crate) async fn lease_expiry_deletes_keys<S: Store>(s: &S) {
        // Timed from before the grant: however slow the set-up below, an expiry seen less than
        // 700 ms later is early.
        let start = Instant::now();
        let lease = s.lease_grant(Duration::from_secs(1)).await.unwrap();
        let t = Txn {
            success: vec![
                TxnOp::Put { key: b"/lease/a".to_vec(), value: b"1".to_vec(), lease },
                TxnOp::Put { key: b"/lease/b".to_vec(), value: b"2".to_vec(), lease },
                TxnOp::put("/lease/keep", "no lease"),
            ],
            ..Txn::default()
        };
        let rev = s.txn(t).await.unwrap().revision;
        let (kv, _) = s.get(b"/lease/a").await.unwrap();
        assert_eq!(kv.unwrap().lease, lease);
        let mut w = s.watch(KeyRange::prefix("/lease/"), rev + 1).await.unwrap();
        let evs = events(&mut w, 2, Duration::from_secs(6)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(700), "expired too early: {took:?}");
        let mut keys: Vec<_> = evs
            .iter()
            .map(|e| {
                assert_eq!(e.kind, EventKind::Delete, "{}", describe(e));
                e.kv.key.clone()
            })
            .collect();
        keys.sort();
        assert_eq!(keys, vec![b"/lease/a".to_vec(), b"/lease/b".to_vec()]);
        assert_eq!(evs[0].kv.mod_revision, evs[1].kv.mod_revision, "one revision");
        assert_eq!(keys_under(s, "/lease/").await, vec!["/lease/keep"]);
        assert_eq!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(lease)));
    }

    /// Keep-alives extend a lease past its TTL; without them it expires.
    pub(crate) async fn lease_keep_alive_extends<S: Store>(s: &S) {
        let lease = s.lease_grant(Duration::from_secs(1)).await.unwrap();
        let t =
            Txn { success: vec![TxnOp::Put { key: b"/ka/k".to_vec(), value: b"v".to_vec(), lease }], ..Txn::default() };
        s.txn(t).await.unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2500) {
            let ttl = s.lease_keep_alive(lease).await.unwrap();
            assert_eq!(ttl, Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(value_of(s, "/ka/k").await.is_some(), "kept alive for 2.5 × TTL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while value_of(s, "/ka/k").await.is_some() {
            assert!(Instant::now() < deadline, "lease never expired");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Revoking deletes the lease's keys at once (one revision); twice is LeaseNotFound; putting
    /// with an unknown lease fails and writes nothing.
    pub(crate) async fn lease_revoke_and_unknown_lease<S: Store>(s: &S) {
        let lease = s.lease_grant(Duration::from_secs(30)).await.unwrap();
        let t = Txn {
            success: (0..3)
                .map(|i| TxnOp::Put { key: format!("/rv/{i}").into_bytes(), value: b"v".to_vec(), lease })
                .collect(),
            ..Txn::default()
        };
        let rev = s.txn(t).await.unwrap().revision;
        let mut w = s.watch(KeyRange::prefix("/rv/"), rev + 1).await.unwrap();
        s.lease_revoke(lease).await.unwrap();
        assert!(keys_under(s, "/rv/").await.is_empty());
        let evs = events(&mut w, 3, WAIT).await;
        assert!(evs.iter().all(|e| e.kind == EventKind::Delete));
        assert!(evs.iter().all(|e| e.kv.mod_revision == rev + 1));
        assert_eq!(s.current_revision().await.unwrap(), rev + 1);
        assert_eq!(s.lease_revoke(lease).await, Err(StoreError::LeaseNotFound(lease)));
        assert_eq!(s.lease_keep_alive(lease).await, Err(StoreError::LeaseNotFound(lease)));
        let unknown = 0x7eed_beef;
        let t = Txn {
            success: vec![
                TxnOp::put("/rv/plain", "v"),
                TxnOp::Put { key: b"/rv/leased".to_vec(), value: b"v".to_vec(), lease: unknown },
            ],
            ..Txn::default()
        };
        assert_eq!(s.txn(t).await, Err(StoreError::LeaseNotFound(unknown)));
        assert!(keys_under(s, "/rv/").await.is_empty());
        assert_eq!(s.current_revision().await.unwrap(), rev + 1);
    }

    /// A put without lease detaches a key from its lease (it then survives the lease).
    pub(crate) async fn put_detaches_lease<S: Store>(s: &S) {
        let lease = s.lease_grant(Duration::from_secs(30)).await.unwrap();
        let t = Txn {
            success: vec![TxnOp::Put { key: b"/det/k".to_vec(), value: b"v1".to_vec(), lease }],
            ..Txn::default()
        };
        s.txn(t).await.unwrap();
        put(s, "/det/k", "v2").await;
        let (kv, _) = s.get(b"/det/k").await.unwrap();
        assert_eq!(kv.unwrap().lease, 0);
        s.lease_revoke(lease).await.unwrap();
        assert_eq!(value_of(s, "/det/k").await.as_deref(), Some("v2"));
    }

    /// A watch from an old revision replays history in order, then continues live.
    pub(crate) async fn watch_replays_then_live<S: Store>(s: &S) {
        let r1 = put(s, "/w/a", "1").await;
        put(s, "/w/b", "1").await;
        put(s, "/w/a", "2").await;
        let mut w = s.watch(KeyRange::prefix("/w/"), r1).await.unwrap();
        let old = events(&mut w, 3, WAIT).await;
        let got: Vec<_> = old.iter().map(describe).collect();
        assert_eq!(got, vec![format!("P /w/a=1@{r1}"), format!("P /w/b=1@{}", r1 + 1), format!("P /w/a=2@{}", r1 + 2)]);
        assert_eq!(old[2].kv.version, 2);
        assert_eq!(old[2].kv.create_revision, r1);
        let mut expected = Vec::new();
        for i in 0..20 {
            let rev = put(s, &format!("/w/live{}", i % 3), &i.to_string()).await;
            expected.push(format!("P /w/live{}={i}@{rev}", i % 3));
        }
        let live: Vec<_> = events(&mut w, 20, WAIT).await.iter().map(describe).collect();
        assert_eq!(live, expected);
    }

    /// A watch from revision 0 sees only changes made after it started.
    pub(crate) async fn watch_from_zero_only_new<S: Store>(s: &S) {
        put(s, "/z/old", "1").await;
        let mut w = s.watch(KeyRange::prefix("/z/"), 0).await.unwrap();
        let rev = put(s, "/z/new", "1").await;
        let evs = events(&mut w, 1, WAIT).await;
        assert_eq!(describe(&evs[0]), format!("P /z/new=1@{rev}"));
    }

    /// A watch from a future revision waits for it and reports nothing older.
    pub(crate) async fn watch_from_future_revision<S: Store>(s: &S) {
        let now = s.current_revision().await.unwrap();
        let mut w = s.watch(KeyRange::prefix("/fut/"), now + 2).await.unwrap();
        put(s, "/fut/a", "early").await;
        let rev = put(s, "/fut/b", "on time").await;
        assert_eq!(rev, now + 2);
        let evs: Vec<_> = events(&mut w, 1, WAIT).await.iter().map(describe).collect();
        assert_eq!(evs, vec![format!("P /fut/b=on time@{rev}")]);
    }

    /// Only keys in the watched range are reported; a single-key watch sees only that key.
    pub(crate) async fn watch_prefix_filtering<S: Store>(s: &S) {
        let mut w = s.watch(KeyRange::prefix("/pf/in/"), 0).await.unwrap();
        let mut one = s.watch(KeyRange::key("/pf/in/x"), 0).await.unwrap();
        put(s, "/pf/out/x", "1").await;
        put(s, "/pf/in", "1").await;
        let r = put(s, "/pf/in/x", "1").await;
        put(s, "/pf/in/y", "1").await;
        put(s, "/pf/in0", "1").await;
        let evs: Vec<_> = events(&mut w, 2, WAIT).await.iter().map(describe).collect();
        assert_eq!(evs, vec![format!("P /pf/in/x=1@{r}"), format!("P /pf/in/y=1@{}", r + 1)]);
        assert_quiet(&mut w, Duration::from_millis(300)).await;
        let evs: Vec<_> = events(&mut one, 1, WAIT).await.iter().map(describe).collect();
        assert_eq!(evs, vec![format!("P /pf/in/x=1@{r}")]);
        assert_quiet(&mut one, Duration::from_millis(300)).await;
    }

    /// All events of one transaction arrive in one batch, in operation order.
    pub(crate) async fn watch_txn_events_in_one_batch<S: Store>(s: &S) {
        put(s, "/tb/old", "x").await;
        let mut w = s.watch(KeyRange::prefix("/tb/"), 0).await.unwrap();
        let t = Txn {
            success: vec![
                TxnOp::put("/tb/c", "1"),
                TxnOp::delete("/tb/old"),
                TxnOp::put("/tb/a", "1"),
                TxnOp::put("/tb/b", "1"),
            ],
            ..Txn::default()
        };
        let rev = s.txn(t).await.unwrap().revision;
        let batch = loop {
            let b = next_item(&mut w, WAIT).await.unwrap();
            if !b.events.is_empty() {
                break b;
            }
        };
        assert_eq!(batch.revision, rev);
        let got: Vec<_> = batch.events.iter().map(describe).collect();
        assert_eq!(
            got,
            vec![
                format!("P /tb/c=1@{rev}"),
                format!("D /tb/old@{rev}"),
                format!("P /tb/a=1@{rev}"),
                format!("P /tb/b=1@{rev}"),
            ]
        );
    }

    /// Concurrent writers: a watcher sees every change exactly once, in revision order.
    pub(crate) async fn watch_revision_order_under_concurrency<S: Store>(s: &S) {
        let mut w = s.watch(KeyRange::prefix("/ord/"), 0).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..25 {
                    revs.push(put(&s, &format!("/ord/{t}"), &i.to_string()).await);
                }
                revs
            }));
        }
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        acked.sort_unstable();
        let evs = events(&mut w, acked.len(), Duration::from_secs(10)).await;
        let seen: Vec<_> = evs.iter().map(|e| e.kv.mod_revision).collect();
        assert_eq!(seen, acked, "every acknowledged write once, in revision order");
        // Per key, values arrive in the order they were written.
        let mut per_key: BTreeMap<Vec<u8>, Vec<u32>> = BTreeMap::new();
        for e in &evs {
            per_key.entry(e.kv.key.clone()).or_default().push(String::from_utf8_lossy(&e.kv.value).parse().unwrap());
        }
        for values in per_key.values() {
            assert_eq!(values, &(0..25).collect::<Vec<_>>());
        }
    }

    /// An idle watch reports the current revision with an empty batch (progress notification).
    pub(crate) async fn watch_progress_when_idle<S: Store>(s: &S) {
        let mut w = s.watch(KeyRange::prefix("/prog/"), 0).await.unwrap();
        let rev = put(s, "/elsewhere", "1").await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let b = next_item(&mut w, Duration::from_secs(5)).await.unwrap();
            assert!(b.events.is_empty(), "unexpected events {:?}", b.events);
            if b.revision >= rev {
                break;
            }
            assert!(Instant::now() < deadline, "no progress up to {rev}");
        }
    }

    /// Compaction: a watch from before it fails with `Compacted`, from it works; compacting the
    /// future is refused, compacting the past again is a no-op.
    pub(crate) async fn compaction<S: Store>(s: &S) {
        let mut revs = Vec::new();
        for i in 0..5 {
            revs.push(put(s, "/cmp/k", &i.to_string()).await);
        }
        let at = revs[3];
        s.compact(at).await.unwrap();
        let err = match s.watch(KeyRange::prefix("/cmp/"), revs[1]).await {
            Err(e) => e,
            Ok(mut w) => next_item(&mut w, WAIT).await.expect_err("a watch from a compacted revision must fail"),
        };
        assert_eq!(err, StoreError::Compacted { requested: revs[1], compacted: at });
        let mut w = s.watch(KeyRange::prefix("/cmp/"), at).await.unwrap();
        let evs: Vec<_> = events(&mut w, 2, WAIT).await.iter().map(describe).collect();
        assert_eq!(evs, vec![format!("P /cmp/k=3@{at}"), format!("P /cmp/k=4@{}", at + 1)]);
        let current = s.current_revision().await.unwrap();
        assert!(matches!(
            s.compact(current + 10).await,
            Err(StoreError::FutureRevision { requested, current: c }) if requested == current + 10 && c == current
        ));
        s.compact(revs[1]).await.unwrap();
        s.compact(at).await.unwrap();
        // Data is untouched by compaction.
        assert_eq!(value_of(s, "/cmp/k").await.as_deref(), Some("4"));
    }

    /// N tasks race to move one key with CAS: exactly one wins each round.
    pub(crate) async fn concurrent_cas_one_winner<S: Store>(s: &S) {
        const TASKS: usize = 6;
        const ROUNDS: usize = 15;
        put(s, "/race/k", "start").await;
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let wins: Arc<Vec<AtomicUsize>> = Arc::new((0..ROUNDS).map(|_| AtomicUsize::new(0)).collect());
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (s, barrier, wins) = (s.clone(), barrier.clone(), wins.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    barrier.wait().await;
                    let (kv, _) = s.get(b"/race/k").await.unwrap();
                    let seen = kv.unwrap().mod_revision;
                    barrier.wait().await;
                    let t = Txn {
                        compares: vec![Compare::mod_revision("/race/k", seen)],
                        success: vec![TxnOp::put("/race/k", format!("{round}:{t}"))],
                        failure: vec![],
                    };
                    if s.txn(t).await.unwrap().succeeded {
                        wins[round].fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let per_round: Vec<_> = wins.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        assert_eq!(per_round, vec![1; ROUNDS], "winners per round");
        let (kv, _) = s.get(b"/race/k").await.unwrap();
        assert_eq!(kv.unwrap().version, ROUNDS as u64 + 1);
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = crate::support::embedded().await;
                    crate::cases::$case(&f.store).await;
                }
            )*
        }
        mod etcd1 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = crate::support::etcd1().await;
                    crate::cases::$case(&f.store).await;
                }
            )*
        }
        mod etcd3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = crate::support::etcd3().await;
                    crate::cases::$case(&f.store).await;
                }
            )*
        }
    };
}

conformance!(
    revision_counts_write_txns,
    cas_on_mod_revision,
    multi_key_atomicity,
    absent_key_compare,
    too_many_ops,
    invalid_requests,
    range_prefix_limit_more,
    delete_range,
    lease_expiry_deletes_keys,
    lease_keep_alive_extends,
    lease_revoke_and_unknown_lease,
    put_detaches_lease,
    watch_replays_then_live,
    watch_from_zero_only_new,
    watch_from_future_revision,
    watch_prefix_filtering,
    watch_txn_events_in_one_batch,
    watch_revision_order_under_concurrency,
    watch_progress_when_idle,
    compaction,
    concurrent_cas_one_winner,
);
