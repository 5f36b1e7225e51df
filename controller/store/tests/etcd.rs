//! etcd-only behaviour against real clusters: failover when members (even the leader) are
//! killed, watches broken by a killed member, unreachable clusters, TLS.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::{describe, etcd_config, events, next_item};
use victor_store::etcd::{EtcdStore, EtcdTls};
use victor_store::{KeyRange, RangeRequest, Store, StoreError, Txn, TxnOp};
use victor_testkit::etcd::{EtcdCluster, EtcdOptions};

fn put_txn(key: &str, value: &str) -> Txn {
    Txn { success: vec![TxnOp::put(key, value)], ..Txn::default() }
}

/// Killing the leader of a 3-member cluster under a steady write load: every acknowledged write
/// survives, and the store keeps serving.
///
/// A write sent to a follower just after the kill, while it still believes in the dead leader,
/// is forwarded there and lost: etcd answers only when its own timeout fires, so such a write
/// fails with `Unavailable` (outcome unknown) at our deadline. That is why this store uses a 1 s
/// request timeout and the test gives the cluster 3 s after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acknowledged_write() {
    let mut cluster = EtcdCluster::start(3).await.unwrap();
    let mut config = etcd_config(cluster.endpoints());
    config.request_timeout = Duration::from_secs(1);
    let store = EtcdStore::connect(config).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failures = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("/fo/{i:06}");
                match store.txn(put_txn(&key, "v")).await {
                    Ok(r) => acked.push((key, r.revision, Instant::now())),
                    Err(e) => failures.push((e, Instant::now())),
                }
                i += 1;
            }
            (acked, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let leader = cluster.leader_index().await.unwrap();
    let killed_at = Instant::now();
    cluster.kill_member(leader);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, Ordering::SeqCst);
    let (acked, failures) = writer.await.unwrap();

    let before = acked.iter().filter(|(_, _, t)| *t < killed_at).count();
    let after_kill: Vec<_> = acked.iter().filter(|(_, _, t)| *t > killed_at).collect();
    assert!(before > 10, "writes before the kill: {before}");
    assert!(
        after_kill.len() > 10,
        "the store kept serving after the leader was killed: {} writes after, failures {failures:?}",
        after_kill.len()
    );
    let first_after = after_kill[0].2.duration_since(killed_at);
    eprintln!(
        "leader kill: {before} writes before, {} after, {} failed; first write after the kill \
         acknowledged {first_after:?} after it",
        after_kill.len(),
        failures.len()
    );
    for (e, _) in &failures {
        assert!(e.is_unavailable(), "only Unavailable/OutcomeUnknown during failover: {e}");
    }
    // Revisions of acknowledged writes are strictly increasing (one writer, linearizable).
    assert!(acked.windows(2).all(|w| w[0].1 < w[1].1));
    let got = store.range(RangeRequest { range: KeyRange::prefix("/fo/"), limit: 0 }).await.unwrap();
    let present: std::collections::HashMap<_, _> =
        got.kvs.iter().map(|kv| (String::from_utf8(kv.key.clone()).unwrap(), kv.mod_revision)).collect();
    for (key, rev, _) in &acked {
        assert_eq!(present.get(key), Some(rev), "acknowledged write {key}@{rev} lost");
    }
    // The killed member rejoins and catches up.
    cluster.restart_member(leader).await.unwrap();
    let single = EtcdStore::connect(etcd_config(vec![cluster.member_endpoint(leader)])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = single.range(RangeRequest { range: KeyRange::prefix("/fo/"), limit: 0 }).await.map(|r| r.kvs.len());
        if n.as_ref().is_ok_and(|&n| n == got.kvs.len()) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted member did not catch up: {n:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A watch served by a member that gets killed ends with `Unavailable` (it does not hang);
/// watching again from the last revision + 1 through the surviving members misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_broken_by_killed_member_resumes_without_gaps() {
    let mut cluster = EtcdCluster::start(3).await.unwrap();
    let all = EtcdStore::connect(etcd_config(cluster.endpoints())).await.unwrap();
    // The watch goes to member 0 only, so we know whom to kill.
    let on_m0 = EtcdStore::connect(etcd_config(vec![cluster.member_endpoint(0)])).await.unwrap();
    let mut w = on_m0.watch(KeyRange::prefix("/wb/"), 0).await.unwrap();
    let mut written = Vec::new();
    for i in 0..5 {
        let r = all.txn(put_txn(&format!("/wb/{i}"), "v")).await.unwrap();
        written.push(format!("P /wb/{i}=v@{}", r.revision));
    }
    let mut seen: Vec<String> = events(&mut w, 5, Duration::from_secs(5)).await.iter().map(describe).collect();
    let last = seen.len();
    cluster.kill_member(0);
    let killed = Instant::now();
    // Keep writing through the survivors while the broken watch is noticed.
    for i in 5..15 {
        let rev = create_once(&all, &format!("/wb/{i}")).await;
        written.push(format!("P /wb/{i}=v@{rev}"));
    }
    let mut last_rev = 0;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Err(_) => panic!("watch on a killed member hung instead of failing"),
            Ok(None) => panic!("watch ended without an error"),
            Ok(Some(Err(e))) => break e,
            Ok(Some(Ok(b))) => {
                last_rev = b.revision;
                seen.extend(b.events.iter().map(describe));
            }
        }
    };
    assert!(matches!(err, StoreError::Unavailable(ref m) if m.contains(&cluster.member_endpoint(0))), "{err}");
    eprintln!("broken watch noticed {:?} after the kill", killed.elapsed());
    let resume_from = seen_revision(&seen).max(last_rev) + 1;
    assert!(seen.len() >= last);
    let mut w2 = all.watch(KeyRange::prefix("/wb/"), resume_from).await.unwrap();
    let missing = written.len() - seen.len();
    seen.extend(events(&mut w2, missing, Duration::from_secs(5)).await.iter().map(describe));
    assert_eq!(seen, written, "every change exactly once across the re-watch");
}

/// Creates `key` = "v" exactly once, also across a failover: a write whose outcome is unknown
/// (`OutcomeUnknown`) is retried as create-if-absent, and a failed compare means the earlier attempt
/// did apply — its revision is read back. Returns the creating revision.
async fn create_once(store: &EtcdStore, key: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = Txn {
            compares: vec![victor_store::Compare::absent(key)],
            success: vec![TxnOp::put(key, "v")],
            failure: vec![TxnOp::Get(KeyRange::key(key))],
        };
        match store.txn(t).await {
            Ok(r) if r.succeeded => return r.revision,
            Ok(r) => return r.reads[0].kvs[0].create_revision,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                eprintln!("retrying {key}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("create {key}: {e}"),
        }
    }
}

fn seen_revision(seen: &[String]) -> u64 {
    seen.last().and_then(|s| s.rsplit('@').next()).map_or(0, |r| r.parse().unwrap())
}

/// With every endpoint down, calls fail with `Unavailable` naming the endpoints, within the
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_is_unavailable_within_deadline() {
    let endpoints = vec![
        format!("http://127.0.0.1:{}", victor_testkit::ports::free_port()),
        format!("http://127.0.0.1:{}", victor_testkit::ports::free_port()),
    ];
    let mut config = etcd_config(endpoints.clone());
    config.request_timeout = Duration::from_millis(500);
    let store = EtcdStore::connect(config).await.unwrap();
    let start = Instant::now();
    let err = store.current_revision().await.unwrap_err();
    let took = start.elapsed();
    // The request deadline is 500 ms; the margin is for a loaded CI machine.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains(&endpoints[0]) && m.contains(&endpoints[1])),
        "{err}"
    );
    let err = store.txn(put_txn("/x", "v")).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let err = match store.watch(KeyRange::prefix("/x"), 0).await {
        Err(e) => e,
        Ok(mut w) => next_item(&mut w, Duration::from_secs(2)).await.unwrap_err(),
    };
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(matches!(EtcdStore::connect(etcd_config(vec![])).await, Err(StoreError::InvalidArgument(_))));
}

/// PEM material for a test CA, a server certificate for 127.0.0.1 and a client certificate.
/// PEM texts of the CA, the etcd server and the controller's client certificate.
struct TestPki {
    ca: String,
    server: (String, String),
    client: (String, String),
    _pki: victor_testkit::pki::Pki,
}

fn test_pki() -> TestPki {
    let pki = victor_testkit::pki::Pki::new("victor-test");
    let server = pki.server("etcd");
    let client = pki.client("victor-controller", &["victor-controller"]);
    TestPki {
        ca: pki.ca.pem.clone(),
        server: (server.cert.pem, server.key.pem),
        client: (client.cert.pem, client.key.pem),
        _pki: pki,
    }
}

/// TLS with client certificates against a real etcd: works with the right CA and identity,
/// fails (Unavailable) without the client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let pki = test_pki();
    let cluster = EtcdCluster::start_with(EtcdOptions {
        members: 1,
        tls: Some(victor_testkit::etcd::EtcdTls {
            ca_cert_pem: pki.ca.clone(),
            server_cert_pem: pki.server.0.clone(),
            server_key_pem: pki.server.1.clone(),
            client: Some(pki.client.clone()),
        }),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let endpoint = cluster.member_endpoint(0);
    assert!(endpoint.starts_with("https://"));
    let tls = EtcdTls {
        ca_cert_pem: pki.ca.clone().into_bytes(),
        client_cert_pem: Some((pki.client.0.clone().into_bytes(), pki.client.1.clone().into_bytes())),
        domain_name: None,
    };
    let mut config = etcd_config(vec![endpoint.clone()]);
    config.tls = Some(tls.clone());
    let store = EtcdStore::connect(config).await.unwrap();
    let r = store.txn(put_txn("/tls/k", "v")).await.unwrap();
    let (kv, _) = store.get(b"/tls/k").await.unwrap();
    assert_eq!(kv.unwrap().mod_revision, r.revision);
    let mut w = store.watch(KeyRange::prefix("/tls/"), r.revision).await.unwrap();
    assert_eq!(events(&mut w, 1, Duration::from_secs(5)).await[0].kv.key, b"/tls/k");

    // Without a client certificate the server refuses the handshake.
    let mut config = etcd_config(vec![endpoint]);
    config.request_timeout = Duration::from_millis(800);
    config.tls = Some(EtcdTls { client_cert_pem: None, ..tls });
    let anonymous = EtcdStore::connect(config).await.unwrap();
    let err = anonymous.current_revision().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
}
