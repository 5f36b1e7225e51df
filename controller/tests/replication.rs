//! Replication on a real 3-member etcd with controller replicas as real processes: a binding
//! written through one replica reaches an agent stream on another; a stream resumes from its
//! revision on another replica after its replica is killed (no snapshot); killing the etcd leader
//! loses no committed binding; housekeeping fails over; concurrent claims converge.

mod common;

use std::time::Duration;

use common::*;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::*;
use victor_testkit::etcd::EtcdCluster;
use victor_testkit::http::{get, metric};

#[tokio::test]
async fn binding_through_one_replica_reaches_a_stream_on_another_and_resumes_after_a_kill() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let r1 = Replica::spawn("r1", &etcd.endpoints(), &[]).await;
    let mut r2 = Replica::spawn("r2", &etcd.endpoints(), &[]).await;
    let mut c1 = r1.clients().await;
    let mut c2 = r2.clients().await;
    register(&mut c1, "fe1", 1, "a").await;
    register(&mut c1, "fe2", 2, "a").await;

    // The agent of fe1 follows replica 2.
    let mut stream = c2.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: 0 }).await.unwrap().into_inner();
    let snapshot =
        next_matching(&mut stream, Duration::from_secs(5), |m| m.phase == SyncPhase::SnapshotEnd as i32).await;
    let r = learn(&mut c1, "fe2", "10.10.0.11", mac(11)).await;
    assert_eq!(outcome(&r), ClaimOutcome::Bound);
    let delta = next_matching(&mut stream, Duration::from_secs(5), |m| !m.binding_upserts.is_empty()).await;
    assert_eq!(delta.binding_upserts[0].vm_ip, ip_bytes("10.10.0.11"));
    assert_eq!(delta.binding_upserts[0].fe_id, "fe2");
    assert!(delta.revision >= r.revision && delta.revision > snapshot.revision);
    let resume_at = delta.revision;

    // Replica 2 dies (kill -9); a change is written through replica 1 meanwhile.
    r2.process.kill();
    let r = learn(&mut c1, "fe1", "10.10.0.11", mac(11)).await;
    assert_eq!(outcome(&r), ClaimOutcome::Moved);
    assert!(stream.message().await.is_err() || stream.message().await.is_err(), "stream to a killed replica must fail");

    // The agent resumes on replica 1 from its revision: deltas only.
    let snapshots_before = metric(&r1.metrics().await, "victor_snapshots_sent_total", "");
    let mut stream =
        c1.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: resume_at }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.phase, SyncPhase::Delta as i32, "resume after fail-over must not be a snapshot: {first:?}");
    assert_eq!(first.binding_upserts.len(), 1);
    assert_eq!((first.binding_upserts[0].fe_id.as_str(), first.binding_upserts[0].move_seq), ("fe1", 1));
    assert_eq!(metric(&r1.metrics().await, "victor_snapshots_sent_total", ""), snapshots_before);
    drop(c2);
}

#[tokio::test]
async fn killing_the_etcd_leader_loses_no_committed_binding() {
    let mut etcd = EtcdCluster::start(3).await.unwrap();
    let r1 = Replica::spawn("r1", &etcd.endpoints(), &[]).await;
    let mut c = r1.clients().await;
    register(&mut c, "fe1", 1, "a").await;
    for i in 1..=40u8 {
        assert_eq!(outcome(&learn(&mut c, "fe1", &format!("10.10.1.{i}"), mac(i)).await), ClaimOutcome::Bound);
    }
    let leader = etcd.leader_index().await.unwrap();
    etcd.kill_member(leader);
    // Writes keep working once a new leader is elected (retry while the cluster re-elects).
    let mut committed_after = 0;
    for i in 41..=60u8 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = learn(&mut c, "fe1", &format!("10.10.1.{i}"), mac(i)).await;
            if outcome(&r) == ClaimOutcome::Bound {
                committed_after += 1;
                break;
            }
            assert_eq!(r.code, tonic::Code::Unavailable as i32, "only UNAVAILABLE may fail during re-election: {r:?}");
            assert!(std::time::Instant::now() < deadline, "no new etcd leader within 10 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(committed_after, 20);
    // Every acknowledged binding is there, read back through a fresh replica (fresh cache load).
    let r2 = Replica::spawn("r2", &etcd.endpoints(), &[]).await;
    let mut c2 = r2.clients().await;
    let listed = c2
        .binding
        .list_bindings(ListBindingsRequest { page_size: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.bindings.len(), 60, "a committed binding was lost");
    etcd.restart_member(leader).await.unwrap();
}

#[tokio::test]
async fn housekeeping_fails_over_to_another_replica() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let r1 = Replica::spawn("r1", &etcd.endpoints(), &[]).await;
    let r2 = Replica::spawn("r2", &etcd.endpoints(), &[]).await;
    let c2 = r2.clients().await;
    let holder = victor_testkit::process::wait_for("a housekeeper", Duration::from_secs(10), || {
        let mut c2 = c2.clone();
        async move {
            let s = status(&mut c2).await;
            (!s.housekeeper_id.is_empty()).then_some(s.housekeeper_id)
        }
    })
    .await
    .unwrap();
    let (mut dead, survivor_http, survivor_id) =
        if holder == "r1" { (r1.process, r2.http, "r2") } else { (r2.process, r1.http, "r1") };
    dead.kill(); // kill -9: no clean hand-over, the lease must expire
    let killed_at = std::time::Instant::now();
    victor_testkit::process::wait_for("housekeeping fail-over", Duration::from_secs(15), || async move {
        let m = get(survivor_http, "/metrics").await.ok()?.1;
        (metric(&m, "victor_housekeeper", "") == 1.0).then_some(())
    })
    .await
    .unwrap();
    eprintln!("housekeeping failed over to {survivor_id} {:?} after kill -9", killed_at.elapsed());
}

#[tokio::test]
async fn concurrent_claims_through_two_replicas_leave_one_winner_per_vm() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let r1 = Replica::spawn("r1", &etcd.endpoints(), &[]).await;
    let r2 = Replica::spawn("r2", &etcd.endpoints(), &[]).await;
    let mut c1 = r1.clients().await;
    let c2 = r2.clients().await;
    let mut known = 0;
    for (i, fe) in ["fe1", "fe2", "fe3", "fe4"].iter().enumerate() {
        known = register(&mut c1, fe, i as u8 + 1, "a").await.revision;
    }
    // 8 VMs; each gets 12 claims from 4 FEs whose clocks disagree by seconds, none knowing of the
    // others' claims (all made knowing the same revision), fired all at once through both
    // replicas in a scrambled order. Whichever commits first wins; every claim of another FE is
    // STALE and names the revision of the winner's observation then in force — its bind, or a
    // later claim of the winner that is newer by the winner's own clock and refreshed it (its
    // agent would probe the VM once it knows that revision).
    let base = unix_nanos();
    let mut tasks = Vec::new();
    for vm in 1..=8u8 {
        for k in 0..12i64 {
            let n = (k as usize * 7 + vm as usize) % 4;
            let fe = ["fe1", "fe2", "fe3", "fe4"][n];
            let at = base + (n as i64 - 2) * 5_000_000_000 + k;
            let mut c = if k % 2 == 0 { c1.clone() } else { c2.clone() };
            tasks.push(tokio::spawn(async move {
                let r = learn_knowing(&mut c, fe, &format!("10.10.2.{vm}"), mac(vm), at, known).await;
                (vm, fe, r)
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for vm in 1..=8u8 {
        let mine: Vec<_> = results.iter().filter(|(v, ..)| *v == vm).collect();
        let winners: Vec<_> = mine.iter().filter(|(.., r)| outcome(r) == ClaimOutcome::Bound).collect();
        assert_eq!(winners.len(), 1, "VM {vm}: {mine:?}");
        let (_, winner_fe, _) = winners[0];
        // The revisions at which the winner's observations were committed (bind and refreshes).
        let observed: Vec<u64> =
            mine.iter().filter(|(_, fe, r)| fe == winner_fe && r.revision > 0).map(|(.., r)| r.revision).collect();
        // Claims committed through replica 2 reach replica 1's cache a moment later.
        let last = mine.iter().map(|(.., r)| r.revision).max().unwrap();
        let ip = format!("10.10.2.{vm}");
        let b = victor_testkit::process::wait_for("replica 1 caught up", Duration::from_secs(5), || {
            let mut c1 = c1.clone();
            let ip = ip.clone();
            async move { binding(&mut c1, &ip).await.ok().filter(|b| b.revision >= last) }
        })
        .await
        .unwrap();
        assert_eq!((b.fe_id.as_str(), b.move_seq), (*winner_fe, 0), "VM {vm} did not stay with the first claim");
        for (_, fe, r) in &mine {
            if fe == winner_fe {
                assert!(matches!(outcome(r), ClaimOutcome::Bound | ClaimOutcome::Unchanged), "VM {vm}: {r:?}");
            } else {
                assert!(
                    r.reject_reason == RejectReason::Stale as i32 && observed.contains(&r.revision),
                    "VM {vm} from {fe}: {r:?} (the winner's observations: {observed:?})"
                );
            }
        }
    }
    // Both replicas' caches agree.
    let mut c2 = c2;
    for vm in 1..=8u8 {
        let ip = format!("10.10.2.{vm}");
        let a = binding(&mut c1, &ip).await.unwrap();
        let b = victor_testkit::process::wait_for("replica 2 caught up", Duration::from_secs(5), || {
            let mut c2 = c2.clone();
            let ip = ip.clone();
            let want = a.revision;
            async move { binding(&mut c2, &ip).await.ok().filter(|b| b.revision == want) }
        })
        .await
        .unwrap();
        assert_eq!(a, b);
    }
    let _ = &mut c2;
}

#[tokio::test]
async fn a_resume_from_a_compacted_revision_gets_a_snapshot() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let r1 = Replica::spawn("r1", &etcd.endpoints(), &[]).await;
    let mut c = r1.clients().await;
    register(&mut c, "fe1", 1, "a").await;
    let old = learn(&mut c, "fe1", "10.10.0.11", mac(11)).await.revision;
    learn(&mut c, "fe1", "10.10.0.12", mac(12)).await;
    learn(&mut c, "fe1", "10.10.0.13", mac(13)).await;
    drop(r1);
    // etcd forgets every revision before its current one (the change right after `old` among
    // them); a new replica cannot backfill from `old`.
    let current = etcd.member_status(0).await.unwrap().revision;
    etcd.etcdctl(&etcd.member_endpoint(0), &["compact", &current.to_string(), "--physical"]).await.unwrap();
    let r2 = Replica::spawn("r2", &etcd.endpoints(), &[]).await;
    let mut c = r2.clients().await;
    let mut stream = c.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: old }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.reset && first.phase == SyncPhase::SnapshotEnd as i32, "{first:?}");
    assert_eq!(first.binding_upserts.len(), 3);
    assert_eq!(metric(&r2.metrics().await, "victor_snapshots_sent_total", ""), 1.0);
}
