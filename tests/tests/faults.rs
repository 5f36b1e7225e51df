//! The fault suite (docs/design.md invariant I6 and the fault targets of §6; `docs/faults.md`). Each test assembles a real 3-member
//! etcd, two real controller replicas and simulated agents (real gRPC clients with the fe-agent's
//! failover logic), loads thousands of bindings and keeps migrating VMs between FEs the whole
//! time; then it breaks one thing and checks, against etcd itself:
//! * 0 acknowledged bindings lost, nothing half-written (a claim answered "nothing was written" is
//!   not in the store);
//! * every live agent's state equals the store within a bounded time (reported);
//! * no route flaps: no binding removal, no full resync where a resume was possible, no re-send of
//!   an unchanged binding after a re-list;
//! * readiness tells the truth while degraded.
//!
//! Timings are printed as `FAULTS <test> <json>` lines (run with `--no-capture` to see them) and
//! asserted only against generous bounds. `VICTOR_SOAK=1` runs the long form (200 FEs, 50,000
//! bindings, 500 moves/s, every fault repeated).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::{
    AnnounceMigrationRequest, DeclareVmRequest, FeHealth, GetBindingRequest, ListBindingsRequest, ListFesRequest,
};
use victor_tests::bench::driver::vm_ip;
use victor_tests::faults::agent::LinkPolicy;
use victor_tests::faults::churn::VmTruth;
use victor_tests::faults::rig::{Resumed, Rig, RigConfig, emit, ms, now_ns, soak};
use victor_tests::faults::store;

/// Generous bound on anything that should take about a second.
const SOON: Duration = Duration::from_secs(20);

fn rounds() -> usize {
    if soak() { 3 } else { 1 }
}

fn resume_summary(resumed: &[Resumed]) -> serde_json::Value {
    let mut times: Vec<f64> = resumed.iter().map(|r| r.resumed_ms).collect();
    times.sort_by(f64::total_cmp);
    let mut detected: Vec<f64> = resumed.iter().map(|r| r.detected_ms).collect();
    detected.sort_by(f64::total_cmp);
    json!({
        "agents": resumed.len(),
        "detected_ms_max": detected.last(),
        "resumed_ms_p50": times.get(times.len() / 2),
        "resumed_ms_max": times.last(),
        "snapshots": resumed.iter().filter(|r| r.snapshot).count(),
    })
}

async fn binding_client(rig: &Rig, replica: usize) -> Result<BindingServiceClient<tonic::transport::Channel>> {
    Ok(BindingServiceClient::connect(format!("http://{}", rig.cluster.grpc(replica))).await?)
}

/// Sum of a metric over the replicas that are running.
async fn metric_sum(rig: &Rig, name: &str) -> Result<f64> {
    let mut sum = 0.0;
    for r in 0..rig.cluster.len() {
        if rig.cluster.pid(r) != 0 {
            sum += rig.cluster.metric(r, name).await?;
        }
    }
    Ok(sum)
}

/// kill -9 of the replica an agent streams from: the agent fails over to the other replica and
/// resumes from its revision — no snapshot, no removal — and the killed replica, restarted,
/// serves the next failover the same way (its history starts at its cold-start load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_controller_replica_agents_resume_on_the_other_without_snapshot() -> Result<()> {
    let mut rig = Rig::start(RigConfig::from_env()).await?;
    rig.settle().await;
    for round in 0..2 * rounds() {
        let (victim, survivor) = (round % 2, 1 - round % 2);
        let on_victim = rig.agents_on(victim);
        ensure!(!on_victim.is_empty(), "round {round}: no agent streams from replica {victim}");
        let snapshots_before = rig.cluster.metric(survivor, "victor_snapshots_sent_total").await?;
        rig.mark();
        let killed_at = now_ns();
        rig.cluster.kill(victim);
        let resumed = rig.wait_resumed(&on_victim, killed_at, SOON).await?;
        let catch_up = rig.catch_up(SOON).await?;
        rig.settle().await;
        let settled_at = now_ns();
        let snapshots_sent = rig.cluster.metric(survivor, "victor_snapshots_sent_total").await? - snapshots_before;
        let all: Vec<usize> = (0..rig.scale().fes).collect();
        let window = rig.window(&all);
        let verified = rig.verify(&format!("replica {victim} killed")).await?;
        rig.cluster.restart(victim)?;
        let cold_start = rig.cluster.wait_ready(victim, Duration::from_secs(60)).await?;
        let gap = rig.churn.log().longest_gap_ns(killed_at, settled_at);
        emit(
            "replica_killed",
            &json!({
                "round": round,
                "victim": victim,
                "resume": resume_summary(&resumed),
                "agents_caught_up_with_store_ms": catch_up.as_secs_f64() * 1e3,
                "agents_equal_store_ms": verified.agents_converged_ms,
                "write_gap_ms": ms(gap),
                "snapshots_sent_by_survivor": snapshots_sent,
                "flaps": window,
                "restarted_replica_ready_ms": cold_start.as_secs_f64() * 1e3,
                "churn": rig.churn.log(),
                "moves_committed": verified.moves_committed,
            }),
        );
        verified.assert_clean();
        for r in &resumed {
            assert_eq!(rig.replica_of(rig.fes.iter().position(|f| *f == r.fe).unwrap(), r.endpoint), survivor);
            assert!(!r.snapshot && r.from_revision > 0, "{} needed a snapshot to resume: {r:?}", r.fe);
            assert!(r.resumed_ms < 5_000.0, "{} took {} ms to resume (target 1 s)", r.fe, r.resumed_ms);
        }
        assert_eq!(snapshots_sent, 0.0, "the survivor sent snapshots to agents that could resume");
        assert_eq!((window.snapshots, window.removals, window.malformed), (0, 0, 0), "route churn: {window:?}");
        rig.settle().await;
    }
    Ok(())
}

/// kill -9 of an etcd member — the leader, then a follower — during the churn, and its restart.
/// Writes keep committing (a short stall while a new leader is elected), both replicas stay ready
/// (the store answers), nothing is lost, and the replicas' watches move to another member without
/// a re-list: the agents see no snapshot and no removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_etcd_member_leader_or_follower_loses_nothing() -> Result<()> {
    let mut rig = Rig::start(RigConfig::from_env()).await?;
    rig.settle().await;
    let relists_before = metric_sum(&rig, "victor_cache_relists").await?;
    let snapshots_before = metric_sum(&rig, "victor_snapshots_sent_total").await?;
    for round in 0..2 * rounds() {
        let leader = rig.cluster.etcd.leader_index().await?;
        let (role, victim) = if round % 2 == 0 { ("leader", leader) } else { ("follower", (leader + 1) % 3) };
        rig.mark();
        let killed_at = now_ns();
        rig.cluster.etcd.kill_member(victim);
        rig.settle().await;
        let settled_at = now_ns();
        for r in 0..rig.cluster.len() {
            let (code, body) = rig.cluster.get(r, "/readyz").await?;
            assert_eq!(code, 200, "replica {r} is not ready with 2 of 3 etcd members up: {body}");
        }
        let during = rig.verify(&format!("etcd {role} killed")).await?;
        let gap = rig.churn.log().longest_gap_ns(killed_at, settled_at);
        let restarted_at = std::time::Instant::now();
        rig.cluster.etcd.restart_member(victim).await?;
        let restart = restarted_at.elapsed();
        rig.settle().await;
        let after = rig.verify(&format!("etcd {role} restarted")).await?;
        let window = rig.window(&(0..rig.scale().fes).collect::<Vec<_>>());
        emit(
            "etcd_member_killed",
            &json!({
                "round": round,
                "role": role,
                "write_gap_ms": ms(gap),
                "agents_equal_store_ms": [during.agents_converged_ms, after.agents_converged_ms],
                "member_restart_to_healthy_ms": restart.as_secs_f64() * 1e3,
                "flaps": window,
                "claims_unavailable": rig.churn.log().unavailable,
                "moves_committed": after.moves_committed,
            }),
        );
        during.assert_clean();
        after.assert_clean();
        assert_eq!((window.snapshots, window.removals, window.malformed), (0, 0, 0), "route churn: {window:?}");
    }
    assert_eq!(metric_sum(&rig, "victor_cache_relists").await?, relists_before, "a member kill made a replica re-list");
    assert_eq!(metric_sum(&rig, "victor_snapshots_sent_total").await?, snapshots_before, "snapshots were sent");
    Ok(())
}

/// kill -9 of agents during the churn, and their restart. The controller marks their FEs down
/// when the sessions expire, and up again on re-registration, but no binding moves or vanishes
/// because of it (the other agents see no removal); a restarted agent starts empty and syncs
/// a full snapshot that equals the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_restarts_with_one_snapshot_and_nobody_flaps() -> Result<()> {
    let mut rig = Rig::start(RigConfig::from_env()).await?;
    rig.settle().await;
    let victims: Vec<usize> = vec![1, 2, 5];
    let survivors: Vec<usize> = (0..rig.scale().fes).filter(|i| !victims.contains(i)).collect();
    let mut binding = binding_client(&rig, 0).await?;
    for round in 0..rounds() {
        rig.mark();
        let bindings_before: Vec<usize> = victims.iter().map(|&i| rig.agent(i).state().map.len()).collect();
        let killed_at = now_ns();
        for &i in &victims {
            rig.kill_agent(i);
        }
        // Their sessions expire (--session-ttl 3s): the controller reports the FEs down.
        wait_fe_health(&mut binding, &rig.fes, &victims, FeHealth::Down, SOON).await?;
        let down_ms = ms(now_ns() - killed_at);
        rig.settle().await;
        let restarted_at = now_ns();
        for &i in &victims {
            rig.restart_agent(i);
        }
        let synced = rig.wait_resumed(&victims, restarted_at, SOON).await?;
        rig.agents.wait_synced(SOON).await?;
        let full_sync_ms = ms(now_ns() - restarted_at);
        let up = wait_fe_health(&mut binding, &rig.fes, &victims, FeHealth::Up, SOON).await?;
        rig.settle().await;
        let window = rig.window(&survivors);
        let verified = rig.verify(&format!("agents killed and restarted, round {round}")).await?;
        let victim_snapshots: Vec<u64> = victims.iter().map(|&i| rig.agent(i).state().total.snapshots).collect();
        emit(
            "agent_killed",
            &json!({
                "round": round,
                "agents": victims.len(),
                "bindings_held_when_killed": bindings_before,
                "fe_down_after_kill_ms": down_ms,
                "restart_to_first_message": resume_summary(&synced),
                "restart_to_full_sync_ms": full_sync_ms,
                "fe_up_after_restart_ms": up.as_secs_f64() * 1e3,
                "agents_equal_store_ms": verified.agents_converged_ms,
                "survivors_flaps": window,
                "moves_committed": verified.moves_committed,
            }),
        );
        verified.assert_clean();
        assert_eq!(victim_snapshots, vec![1; victims.len()], "a restarted agent syncs exactly one snapshot");
        assert!(synced.iter().all(|s| s.from_revision == 0), "a restarted agent starts from revision 0");
        assert_eq!(
            (window.snapshots, window.removals, window.redundant, window.malformed),
            (0, 0, 0, 0),
            "the other agents saw binding churn because agents died: {window:?}"
        );
    }
    Ok(())
}

/// Waits until every FE of `which` has `health` in ListFes; returns how long that took.
async fn wait_fe_health(
    client: &mut BindingServiceClient<tonic::transport::Channel>,
    fes: &[String],
    which: &[usize],
    health: FeHealth,
    timeout: Duration,
) -> Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let listed = client.list_fes(ListFesRequest::default()).await?.into_inner().fes;
        let pending: Vec<&str> = which
            .iter()
            .map(|&i| fes[i].as_str())
            .filter(|id| !listed.iter().any(|f| f.fe_id == *id && f.health == health as i32))
            .collect();
        if pending.is_empty() {
            return Ok(started.elapsed());
        }
        ensure!(started.elapsed() < timeout, "FEs {pending:?} not {health:?} after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The controller links of some agents go down (every replica) for longer than their session
/// TTL, then heal. Headless meanwhile, they keep their whole state; after the heal they register
/// again and resume from their revision — no snapshot — and catch up with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_agent_stays_headless_and_resumes_without_snapshot() -> Result<()> {
    let partitioned: Vec<usize> = (0..4).collect();
    let rig = Rig::start(RigConfig { partitionable: partitioned.len(), ..RigConfig::from_env() }).await?;
    rig.settle().await;
    let outage = if soak() { Duration::from_secs(10) } else { Duration::from_secs(4) };
    for round in 0..rounds() {
        let held = held_state(&rig, &partitioned);
        rig.mark();
        let partitioned_at = now_ns();
        rig.partition_agents();
        tokio::time::sleep(outage).await;
        let headless_after = rig.session_ended_ms(&partitioned, partitioned_at);
        let headless = held_state(&rig, &partitioned);
        let connected = partitioned.iter().filter(|&&i| rig.agent(i).state().connected.is_some()).count();
        let healed_at = now_ns();
        rig.heal_agents();
        let resumed = rig.wait_resumed(&partitioned, healed_at, SOON).await?;
        rig.catch_up(SOON).await?;
        let caught_up_ms = ms(now_ns() - healed_at);
        rig.settle().await;
        let window = rig.window(&partitioned);
        let registrations: Vec<u64> = partitioned.iter().map(|&i| rig.agent(i).state().registrations).collect();
        let verified = rig.verify(&format!("agents partitioned {outage:?}, round {round}")).await?;
        emit(
            "agent_partitioned",
            &json!({
                "round": round,
                "agents": partitioned.len(),
                "outage_ms": outage.as_secs_f64() * 1e3,
                "partition_to_headless_ms": headless_after,
                "heal_to_resume": resume_summary(&resumed),
                "heal_to_caught_up_ms": caught_up_ms,
                "agents_equal_store_ms": verified.agents_converged_ms,
                "registrations": registrations,
                "flaps": window,
                "moves_committed": verified.moves_committed,
            }),
        );
        verified.assert_clean();
        assert_eq!(connected, 0, "an agent kept a stream through a cut link");
        assert!(headless_after.iter().all(Option::is_some), "an agent did not notice the partition");
        for ((bindings, _), (headless_bindings, _)) in held.iter().zip(&headless) {
            assert!(headless_bindings >= bindings, "a headless agent lost state: {held:?} -> {headless:?}");
        }
        for r in &resumed {
            assert!(!r.snapshot && r.from_revision > 0, "{} needed a snapshot after the partition: {r:?}", r.fe);
        }
        assert_eq!((window.snapshots, window.removals, window.malformed), (0, 0, 0), "route churn: {window:?}");
        rig.settle().await;
    }
    Ok(())
}

/// (bindings held, resume revision) of each of `agents`.
fn held_state(rig: &Rig, agents: &[usize]) -> Vec<(usize, u64)> {
    agents
        .iter()
        .map(|&i| {
            let st = rig.agent(i).state();
            (st.map.len(), st.resume_revision())
        })
        .collect()
}

/// Every etcd member stopped (SIGSTOP: connections stay open, nothing answers). While degraded:
/// /readyz says 503 "store unreachable" on every replica; writes through the API — claims,
/// DeclareVm, AnnounceMigration — fail with UNAVAILABLE saying nothing was written; reads of the
/// cache still answer. When etcd comes back everything resumes: readiness, commits, the agents
/// catch up without a snapshot; every refused write is either absent or whole (no binding at a
/// third FE, nothing acknowledged lost), and a write answered "nothing was written" is absent
/// (writes whose answer was lost say so instead: `unknown_outcome_*`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unavailable_refuses_writes_reports_unready_and_recovers() -> Result<()> {
    let rig = Rig::start(RigConfig::from_env()).await?;
    rig.settle().await;
    let outage = if soak() { Duration::from_secs(15) } else { Duration::from_secs(5) };
    let snapshots_before = metric_sum(&rig, "victor_snapshots_sent_total").await?;
    let mut api = binding_client(&rig, 1).await?;
    for round in 0..rounds() {
        let vms = rig.scale().bindings;
        let declared_ip = vm_ip(vms + 100 + round);
        rig.mark();
        rig.cluster.pause_etcd()?;
        let stopped = std::time::Instant::now();
        let mut unready_ms = Vec::new();
        for r in 0..rig.cluster.len() {
            rig.cluster.wait_readyz(r, SOON, |code, body| code == 503 && body.contains("store unreachable")).await?;
            unready_ms.push(stopped.elapsed().as_secs_f64() * 1e3);
            assert_eq!(rig.cluster.metric(r, "victor_store_reachable").await?, 0.0);
        }
        // Writes fail with UNAVAILABLE and say nothing was written.
        let declare = api
            .declare_vm(DeclareVmRequest {
                vm_ip: declared_ip.to_string(),
                mac: "02:0f:00:00:00:01".into(),
                ..Default::default()
            })
            .await;
        let fes = rig.fes.len() as u32;
        let (known_vm, known_fe, target) =
            rig.churn.reserve(|fe| (fe + 1) % fes).context("no idle VM with a known binding")?;
        let announce = api
            .announce_migration(AnnounceMigrationRequest {
                vm_ip: vm_ip(known_vm).to_string(),
                target_fe_id: rig.fes[target as usize].clone(),
                commit: true,
                ttl_seconds: 0,
            })
            .await;
        let said = match &announce {
            Ok(_) => String::from("moved"),
            Err(status) => status.message().to_owned(),
        };
        let settled = if announce.is_ok() {
            VmTruth::Known(target)
        } else {
            VmTruth::Uncertain { from: known_fe, to: target, said }
        };
        rig.churn.settle_reserved(known_vm, settled);
        // Reads of the cache still answer.
        let read = api.get_binding(GetBindingRequest { vm_ip: vm_ip(known_vm).to_string() }).await;
        let listed = api.list_bindings(ListBindingsRequest { page_size: 100, ..Default::default() }).await;
        let remaining = outage.saturating_sub(stopped.elapsed());
        tokio::time::sleep(remaining).await;
        let claims_refused = rig.churn.log().unavailable;

        let resumed_at = now_ns();
        rig.cluster.resume_etcd()?;
        let mut ready_ms = Vec::new();
        for r in 0..rig.cluster.len() {
            rig.cluster.wait_ready(r, SOON).await?;
            ready_ms.push(ms(now_ns() - resumed_at));
        }
        rig.catch_up(SOON).await?;
        let caught_up_ms = ms(now_ns() - resumed_at);
        let moved_before = rig.churn.moved();
        rig.settle().await;
        let committing_again = rig.churn.moved() > moved_before;
        let window = rig.window(&(0..rig.scale().fes).collect::<Vec<_>>());
        let verified = rig.verify(&format!("etcd stopped {outage:?}, round {round}")).await?;
        let declaration = store_get_vm(&rig, declared_ip).await?;
        emit(
            "etcd_unavailable",
            &json!({
                "round": round,
                "outage_ms": outage.as_secs_f64() * 1e3,
                "stop_to_unready_ms": unready_ms,
                "resume_to_ready_ms": ready_ms,
                "resume_to_agents_caught_up_ms": caught_up_ms,
                "agents_equal_store_ms": verified.agents_converged_ms,
                "claims_refused_unavailable": claims_refused,
                "uncertain_claims_applied": verified.truth.uncertain_applied,
                "nothing_was_written_but_stored": verified.truth.written_after_nothing_was_written.len(),
                "declare_vm_answered_unavailable_but_stored": declare.is_err() && declaration.is_some(),
                "flaps": window,
            }),
        );
        let declare = declare.expect_err("DeclareVm succeeded while etcd was stopped");
        assert_eq!(declare.code(), tonic::Code::Unavailable, "{declare:?}");
        assert!(declare.message().contains("nothing was written"), "{declare:?}");
        assert!(declaration.is_none(), "DeclareVm answered \"nothing was written\" but the declaration is stored");
        let announce = announce.expect_err("AnnounceMigration succeeded while etcd was stopped");
        assert_eq!(announce.code(), tonic::Code::Unavailable, "{announce:?}");
        assert!(announce.message().contains("nothing was written"), "{announce:?}");
        let read = read.context("GetBinding from the cache during the outage")?.into_inner();
        assert_eq!(read.fe_id, rig.fes[known_fe as usize], "the cache answered a wrong binding");
        assert_eq!(listed.context("ListBindings during the outage")?.into_inner().bindings.len(), 100);
        assert!(claims_refused > 0, "no claim was refused during the outage");
        assert!(committing_again, "no claim committed after etcd came back");
        verified.assert_clean();
        assert_eq!((window.snapshots, window.removals, window.malformed), (0, 0, 0), "route churn: {window:?}");
    }
    assert_eq!(metric_sum(&rig, "victor_snapshots_sent_total").await?, snapshots_before, "snapshots were sent");
    Ok(())
}

/// The declaration of `ip`, read from etcd directly.
async fn store_get_vm(rig: &Rig, ip: std::net::Ipv4Addr) -> Result<Option<Vec<u8>>> {
    use victor_store::Store;
    let store = victor_store::etcd::EtcdStore::connect(victor_store::etcd::EtcdConfig {
        endpoints: rig.cluster.etcd.endpoints(),
        ..Default::default()
    })
    .await?;
    let key = victor_controller::keys::Keys::new(store::PREFIX).vm(ip.into());
    Ok(store.get(&key).await?.0.map(|kv| kv.value))
}

/// etcd compacted (`--physical`, at the current revision) while a replica's watch is behind: its
/// store link is cut while claims keep committing through the other replica. Readiness says so
/// (503 on the cut replica, 200 on the other). When the link heals the replica's watch is
/// compacted, it re-lists, and the agents streaming from it receive exactly the bindings that
/// changed — no snapshot, no removal, no re-send of an unchanged binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_a_lagging_watch_relists_without_flaps() -> Result<()> {
    let mut config = RigConfig::from_env();
    config.cluster.store_link_proxied = vec![0];
    // Stay on the replica whose store link is cut even though its heartbeats fail meanwhile: the
    // point is what its agents receive from its re-list.
    config.policy = LinkPolicy { heartbeat_failure_ends_session: false, ..LinkPolicy::default() };
    let rig = Rig::start(config).await?;
    rig.settle().await;
    for round in 0..rounds() {
        let on_cut = rig.agents_on(0);
        ensure!(!on_cut.is_empty(), "no agent streams from replica 0");
        let relists_before = rig.cluster.metric(0, "victor_cache_relists").await?;
        let snapshots_before = rig.cluster.metric(0, "victor_snapshots_sent_total").await?;
        rig.churn.set_via(&[1]);
        rig.cluster.cut_store_link(0)?;
        let unready =
            rig.cluster.wait_readyz(0, SOON, |code, body| code == 503 && body.contains("store unreachable")).await?;
        let (other_code, other_body) = rig.cluster.get(1, "/readyz").await?;
        rig.settle().await;
        rig.churn.pause().await;
        let behind: Vec<u64> = on_cut.iter().map(|&i| rig.agent(i).revision()).collect();
        let sessions: Vec<usize> = on_cut.iter().map(|&i| rig.agent(i).state().sessions.len()).collect();
        let view = store::read(rig.cluster.etcd.endpoints()).await?;
        let endpoint = rig.cluster.etcd.endpoints()[0].clone();
        rig.cluster.etcd.etcdctl(&endpoint, &["compact", &view.revision.to_string(), "--physical"]).await?;
        rig.mark();
        rig.cluster.heal_store_link(0);
        let healed = std::time::Instant::now();
        let relisted = loop {
            let relists = rig.cluster.metric(0, "victor_cache_relists").await?;
            if relists > relists_before {
                break relists - relists_before;
            }
            ensure!(healed.elapsed() < SOON, "replica 0 did not re-list after the compaction");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let relist_ms = healed.elapsed().as_secs_f64() * 1e3;
        rig.wait_revision(view.revision, SOON).await?;
        let caught_up_ms = healed.elapsed().as_secs_f64() * 1e3;
        // Exactly the real differences: per agent, the bindings that changed after its revision.
        let mut per_agent = Vec::new();
        for ((&i, &revision), &opened) in on_cut.iter().zip(&behind).zip(&sessions) {
            let changed = view.bindings.values().filter(|b| b.revision > revision).count() as u64;
            let state = rig.agent(i).state();
            // An agent that left the cut replica anyway (a stream timeout on a loaded host)
            // resumed on the other one from its history: every change, not the re-list's diff.
            let stayed = state.sessions.len() == opened;
            per_agent.push((rig.fes[i].clone(), revision, changed, state.window, stayed));
        }
        let window = rig.window(&on_cut);
        // Claims in flight when the churn paused may still commit after `view` was read; agents
        // may already hold those too (each is a real change, newer than anything they had).
        let later = store::read(rig.cluster.etcd.endpoints()).await?;
        let late = later.bindings.values().filter(|b| b.revision > view.revision).count() as u64;
        let snapshots_sent = rig.cluster.metric(0, "victor_snapshots_sent_total").await? - snapshots_before;
        rig.churn.set_via(&[0, 1]);
        rig.churn.resume();
        rig.settle().await;
        let verified = rig.verify(&format!("compaction under a lagging watch, round {round}")).await?;
        emit(
            "compaction_relist",
            &json!({
                "round": round,
                "agents_on_relisted_replica": on_cut.len(),
                "cut_to_unready_ms": unready.as_secs_f64() * 1e3,
                "compacted_at": view.revision,
                "relists": relisted,
                "heal_to_relisted_ms": relist_ms,
                "heal_to_agents_caught_up_ms": caught_up_ms,
                "bindings": view.bindings.len(),
                "changed_bindings_sent": per_agent.iter().map(|p| json!({"fe": p.0, "behind_at": p.1, "changed": p.2, "received": p.3.upserts, "stayed": p.4})).collect::<Vec<_>>(),
                "flaps": window,
                "committed_after_the_view": late,
                "snapshots_sent": snapshots_sent,
                "agents_equal_store_ms": verified.agents_converged_ms,
            }),
        );
        assert_eq!(other_code, 200, "the replica whose store link is intact is not ready: {other_body}");
        verified.assert_clean();
        ensure!(per_agent.iter().any(|p| p.4), "every agent left the re-listed replica; the test proves nothing");
        for (fe, revision, changed, w, stayed) in &per_agent {
            assert!(*changed > 0, "{fe}: nothing changed while the watch was behind; the test proves nothing");
            assert_eq!((w.removals, w.redundant, w.snapshots), (0, 0, 0), "{fe} (at revision {revision}): {w:?}");
            assert!(*changed <= w.upserts, "{fe} missed changes: {changed} changed, {w:?}");
            assert!(
                !stayed || w.upserts <= changed + late,
                "{fe} (at revision {revision}) received {} upserts: not the {changed} real differences of the re-list \
                 (+ at most {late} committed after them): {w:?}",
                w.upserts
            );
        }
        assert_eq!(snapshots_sent, 0.0, "the re-list sent snapshots");
        assert_eq!(window.malformed, 0);
    }
    Ok(())
}

/// A write whose outcome the replica cannot know — etcd applied it, but the answer was lost on
/// the way back (a member that dies right after committing, a half-broken link) — must not be
/// answered "nothing was written". Here the replica's etcd link loses every answer for a moment:
/// a move claimed through `Report` is applied by etcd while the replica times out (answered
/// UNAVAILABLE "did not confirm the write, it may or may not have been applied"); the `DeclareVm`
/// that follows finds the replica's store probe failing and is refused before anything is sent.
/// Whatever the replica answers must be true: MOVED / the declaration if it was applied, and
/// "nothing was written" only if it was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcome_writes_are_not_reported_as_nothing_written() -> Result<()> {
    use victor_proto::v1::agent_service_client::AgentServiceClient;
    use victor_proto::v1::{ClaimOutcome, ObservationKind, RegisterRequest, ReportRequest, VmObservation};
    use victor_tests::bench::driver::vm_mac;
    use victor_tests::faults::cluster::{ClusterConfig, Controllers};

    let cluster = Controllers::start(&ClusterConfig {
        etcd_members: 1,
        replicas: 1,
        store_link_proxied: vec![0],
        ..ClusterConfig::default()
    })
    .await?;
    let url = format!("http://{}", cluster.grpc(0));
    let mut agents = AgentServiceClient::connect(url.clone()).await?;
    let mut api = BindingServiceClient::connect(url).await?;
    for (i, fe) in ["fe-a", "fe-b"].into_iter().enumerate() {
        agents
            .register(RegisterRequest {
                fe_id: fe.into(),
                underlay_addr: victor_tests::bench::agent::underlay(i).to_string(),
                site: "site".into(),
                ..Default::default()
            })
            .await?;
    }
    let claim = |fe: &str| ReportRequest {
        fe_id: fe.into(),
        observations: vec![VmObservation {
            vm_ip: vm_ip(0).octets().to_vec(),
            mac: vm_mac(0).to_vec(),
            kind: ObservationKind::Learned as i32,
            observed_at_unix_nanos: victor_proto::clock::unix_nanos(),
            port: "faults".into(),
            known_revision: None,
        }],
    };
    let bound = agents.report(claim("fe-a")).await?.into_inner().results.remove(0);
    assert_eq!(bound.outcome, ClaimOutcome::Bound as i32, "{bound:?}");

    cluster.lose_store_replies(0)?;
    let moved = agents.report(claim("fe-b")).await?.into_inner().results.remove(0);
    let declared = api
        .declare_vm(DeclareVmRequest {
            vm_ip: vm_ip(1).to_string(),
            mac: "02:0f:00:00:00:01".into(),
            ..Default::default()
        })
        .await;
    cluster.heal_store_link(0);

    let view = store::read(cluster.etcd.endpoints()).await?;
    let stored_at = view.bindings.get(&u32::from(vm_ip(0))).map(|b| b.fe.clone());
    let store = victor_store::etcd::EtcdStore::connect(victor_store::etcd::EtcdConfig {
        endpoints: cluster.etcd.endpoints(),
        ..Default::default()
    })
    .await?;
    let declaration = {
        use victor_store::Store;
        store.get(&victor_controller::keys::Keys::new(store::PREFIX).vm(vm_ip(1).into())).await?.0
    };
    eprintln!("claim answered {moved:?}; the store binds the VM to {stored_at:?}");
    eprintln!("DeclareVm answered {declared:?}; the store holds a declaration: {}", declaration.is_some());

    let moved_applied = stored_at.as_deref() == Some("fe-b");
    if moved.outcome == ClaimOutcome::Moved as i32 {
        assert!(moved_applied, "MOVED but the store binds the VM to {stored_at:?}");
    } else {
        assert_eq!(moved.code, tonic::Code::Unavailable as i32, "{moved:?}");
        assert!(
            !(moved_applied && moved.message.contains("nothing was written")),
            "the claim was answered \"{}\" but etcd applied it (the VM is bound to fe-b)",
            moved.message
        );
    }
    match declared {
        Ok(_) => assert!(declaration.is_some(), "DeclareVm succeeded but nothing is stored"),
        Err(status) => assert!(
            !(declaration.is_some() && status.message().contains("nothing was written")),
            "DeclareVm was answered \"{}\" but etcd applied it",
            status.message()
        ),
    }
    Ok(())
}
