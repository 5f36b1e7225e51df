//! Real fe-agents in the namespace lab live through the fault suite's faults, with traffic
//! (`docs/faults.md`). The controllers, etcd, simulated agents and churn are the fault suite's
//! ([`Rig`]); three real `victor-fe-agent`s in fe1..fe3 join the same controllers, and the client
//! pings the VM behind fe2 through fe1 every 10 ms the whole time:
//! 1. kill -9 of the replica fe1 and fe2 stream from: they resume on the other replica without a
//!    snapshot and without touching a route, and not one ping is lost;
//! 2. fe1's controller links cut for longer than its session TTL: fe1 forwards headless (no ping
//!    lost), then resumes from its revision (no snapshot);
//! 3. kill -9 of fe3's agent and its restart: nobody else notices (no ping lost), fe3 resyncs;
//! 4. all of etcd stopped while a new VM announces itself behind fe3: fe3 installs it at once and
//!    keeps its claim (refused UNAVAILABLE, or queued while fe3 is headless: its heartbeats fail
//!    too) until etcd is back, when the binding commits without the VM announcing itself again.
//!
//! After each step every real agent holds exactly the store's bindings.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use serde_json::json;
use victor_tests::faults::lab::{AgentCounters, RealLab};
use victor_tests::faults::rig::{Rig, RigConfig, emit, ms, now_ns};
use victor_tests::faults::store;

const SOON: Duration = Duration::from_secs(20);

async fn counters(lab: &RealLab) -> Result<Vec<AgentCounters>> {
    (1..=3).map(|n| lab.counters(n)).collect()
}

/// Waits until each FE in `fes` opened a new controller session (after `before`) and its stream
/// is up; returns, per FE, the time from `since_ns` (polled every 10 ms).
async fn wait_new_session(lab: &RealLab, fes: &[usize], before: &[AgentCounters], since_ns: u64) -> Result<Vec<f64>> {
    let mut done: Vec<Option<f64>> = vec![None; fes.len()];
    let started = std::time::Instant::now();
    while done.iter().any(Option::is_none) {
        for (k, &n) in fes.iter().enumerate() {
            if done[k].is_none()
                && let Ok(c) = lab.counters(n)
                && c.sessions > before[n - 1].sessions
                && c.connected == 1.0
            {
                done[k] = Some(ms(now_ns() - since_ns));
            }
        }
        if started.elapsed() > SOON {
            bail!("fe{:?} did not open a new controller session within {SOON:?}", fes);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(done.into_iter().flatten().collect())
}

/// Pauses the churn and waits until every real agent holds exactly the store's bindings (count
/// and revision); returns how long that took.
async fn real_agents_equal_store(rig: &Rig, lab: &RealLab) -> Result<f64> {
    rig.churn.pause().await;
    let view = store::read(rig.cluster.etcd.endpoints()).await?;
    let target = view.latest_binding_revision() as f64;
    let wanted = view.bindings.len() as f64;
    let started = std::time::Instant::now();
    for n in 1..=3 {
        lab.wait_counters(n, SOON, "the store's bindings", |c| c.revision >= target && c.bindings == wanted).await?;
    }
    rig.churn.resume();
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_agents_forward_through_replica_kill_partition_and_agent_restart() -> Result<()> {
    let mut rig = Rig::start(RigConfig::from_env()).await?;
    let mut lab = RealLab::start(&rig.cluster).await?;
    rig.settle().await;
    let equal_ms = real_agents_equal_store(&rig, &lab).await?;
    eprintln!("[faults-lab] real agents equal the store after {equal_ms:.1} ms");

    // 1. kill -9 of replica 0, which fe1 and fe2 stream from.
    let before = counters(&lab).await?;
    let seq = lab.ping_seq();
    let killed_at = now_ns();
    rig.cluster.kill(0);
    let resumed = wait_new_session(&lab, &[1, 2], &before, killed_at).await?;
    rig.settle().await;
    let after = counters(&lab).await?;
    let lost = lab.lost_since(seq);
    let moves = rig.churn.log().commits_between(killed_at.saturating_sub(1_000_000_000), now_ns());
    let equal_ms = real_agents_equal_store(&rig, &lab).await?;
    emit(
        "real_agents_replica_killed",
        &json!({
            "resumed_ms": {"fe1": resumed[0], "fe2": resumed[1]},
            "pings_lost": lost.len(),
            "snapshots": (0..3).map(|i| after[i].snapshots - before[i].snapshots).collect::<Vec<_>>(),
            "route_churn_ops": (0..3).map(|i| after[i].route_churn_since(&before[i])).collect::<Vec<_>>(),
            "tunnel_updates": (0..3).map(|i| after[i].ops_since(&before[i], "tunnel_remote")).collect::<Vec<_>>(),
            "moves_committed_meanwhile": moves,
            "agents_equal_store_ms": equal_ms,
        }),
    );
    assert!(lost.is_empty(), "pings lost while the agents failed over: {lost:?}");
    for i in 0..3 {
        assert_eq!(after[i].snapshots, before[i].snapshots, "fe{} needed a snapshot", i + 1);
        assert_eq!(after[i].route_churn_since(&before[i]), 0.0, "fe{} touched routes: {:?}", i + 1, after[i].ops);
        assert!(
            after[i].ops_since(&before[i], "tunnel_remote") <= moves as f64,
            "fe{}: more tunnel updates than moves ({moves}): {:?} -> {:?}",
            i + 1,
            before[i].ops,
            after[i].ops
        );
    }
    for (fe, ms) in [("fe1", resumed[0]), ("fe2", resumed[1])] {
        assert!(ms < 5_000.0, "{fe} took {ms} ms to resume (target 1 s)");
    }
    rig.cluster.restart(0)?;
    rig.cluster.wait_ready(0, Duration::from_secs(60)).await?;

    // 2. fe1's controller links cut for longer than its session TTL (3 s): headless forwarding.
    let outage = Duration::from_secs(4);
    let before = counters(&lab).await?;
    let seq = lab.ping_seq();
    lab.partition_fe1();
    tokio::time::sleep(outage).await;
    let headless = lab.counters(1)?;
    let healed_at = now_ns();
    lab.heal_fe1();
    let resumed = wait_new_session(&lab, &[1], &before, healed_at).await?;
    rig.settle().await;
    let after = counters(&lab).await?;
    let lost = lab.lost_since(seq);
    let equal_ms = real_agents_equal_store(&rig, &lab).await?;
    emit(
        "real_agent_partitioned",
        &json!({
            "outage_ms": outage.as_secs_f64() * 1e3,
            "heal_to_resumed_ms": resumed[0],
            "pings_lost": lost.len(),
            "registrations": after[0].registrations - before[0].registrations,
            "snapshots": after[0].snapshots - before[0].snapshots,
            "route_churn_ops": after[0].route_churn_since(&before[0]),
            "agents_equal_store_ms": equal_ms,
        }),
    );
    assert_eq!(headless.connected, 0.0, "fe1 kept a stream through a cut link");
    assert!(lost.is_empty(), "pings lost while fe1 was headless: {lost:?}");
    assert_eq!(after[0].snapshots, before[0].snapshots, "fe1 needed a snapshot after the partition");
    assert_eq!(after[0].route_churn_since(&before[0]), 0.0, "fe1 touched routes: {:?}", after[0].ops);

    // 3. kill -9 of fe3's agent (not on the client's path), and its restart.
    let before = counters(&lab).await?;
    let seq = lab.ping_seq();
    lab.kill_agent(3);
    rig.settle().await;
    let restart = lab.restart_agent(3)?;
    rig.settle().await;
    let after = counters(&lab).await?;
    let lost = lab.lost_since(seq);
    let equal_ms = real_agents_equal_store(&rig, &lab).await?;
    emit(
        "real_agent_killed",
        &json!({
            "restart_to_ready_ms": restart.as_secs_f64() * 1e3,
            "pings_lost": lost.len(),
            "fe3_snapshots_after_restart": after[2].snapshots,
            "others_snapshots": [after[0].snapshots - before[0].snapshots, after[1].snapshots - before[1].snapshots],
            "others_route_churn_ops": [after[0].route_churn_since(&before[0]), after[1].route_churn_since(&before[1])],
            "agents_equal_store_ms": equal_ms,
        }),
    );
    assert!(lost.is_empty(), "pings lost because fe3's agent died: {lost:?}");
    assert_eq!(after[2].snapshots, 1.0, "the restarted agent syncs one snapshot");
    for i in 0..2 {
        assert_eq!(after[i].snapshots, before[i].snapshots);
        assert_eq!(after[i].route_churn_since(&before[i]), 0.0, "fe{} touched routes: {:?}", i + 1, after[i].ops);
    }

    // 4. etcd stopped; a VM appears behind fe3.
    let late = u32::from(lab.late_vm.ip);
    ensure!(
        !store::read(rig.cluster.etcd.endpoints()).await?.bindings.contains_key(&late),
        "the late VM is bound before it announced itself"
    );
    let before = lab.counters(3)?;
    rig.cluster.pause_etcd()?;
    for r in 0..rig.cluster.len() {
        rig.cluster.wait_readyz(r, SOON, |code, body| code == 503 && body.contains("store unreachable")).await?;
    }
    let announced_at = now_ns();
    lab.announce_late_vm()?;
    let (during, _) =
        lab.wait_counters(3, SOON, "the VM installed", |c| c.ops_since(&before, "set_route") >= 1.0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed_at = now_ns();
    rig.cluster.resume_etcd()?;
    let started = std::time::Instant::now();
    let bound = loop {
        let view = store::read(rig.cluster.etcd.endpoints()).await?;
        if let Some(b) = view.bindings.get(&late) {
            break b.fe.clone();
        }
        ensure!(started.elapsed() < SOON, "the late VM's claim never committed after etcd resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = lab.counters(3)?;
    emit(
        "real_agent_claim_during_etcd_outage",
        &json!({
            "announce_to_resume_ms": ms(resumed_at - announced_at),
            "resume_to_bound_ms": started.elapsed().as_secs_f64() * 1e3,
            "report_retries": after.report_retries - before.report_retries,
            "fe3_sessions_opened": after.sessions - before.sessions,
            "fe3_routes_set": after.ops_since(&before, "set_route"),
            "fe3_routes_deleted": after.ops_since(&before, "del_route"),
        }),
    );
    assert_eq!(bound, "fe3", "the late VM is bound elsewhere");
    assert_eq!(during.ops_since(&before, "del_route"), 0.0, "fe3 undid its VM during the outage");
    assert_eq!(after.ops_since(&before, "del_route"), 0.0, "fe3 undid its VM: {:?} -> {:?}", before.ops, after.ops);
    rig.settle().await;

    let verified = rig.verify("real agents in the lab").await?;
    verified.assert_clean();
    assert_eq!(verified.truth.other_bindings, 2, "the lab's two VMs are bound");
    Ok(())
}
