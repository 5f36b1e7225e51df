//! Restarts: an agent restart keeps its kernel state (no flush, no flap); a controller outage
//! leaves forwarding and learning running (headless), and the agents resume the stream from
//! their revision when it is back.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use common::*;

const SNAPSHOTS: &str = "victor_agent_snapshots_received_total";
const SESSIONS: &str = "victor_agent_controller_sessions_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_restart_keeps_routes_and_headless_forwarding_resumes() -> anyhow::Result<()> {
    let mut lab = Lab::build(3)?;
    let mut ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    for n in 1..=3 {
        lab.start_agent(n, &[ctl.url()], &[])?;
    }
    for n in 1..=3 {
        lab.wait_ready(n, Duration::from_secs(20))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 10, Duration::from_secs(5))?;

    // ── Agent restart: the VM's route and neighbour are adopted, never removed or rewritten.
    let routes_before = lab.routes(2, &["proto", "158"])?;
    let neigh_before = lab.fe(2).ip(&["neigh", "show", "proto", "158"])?;
    let monitor_log = lab.dir.path().join("monitor.log");
    let mut monitor = lab.monitor(2, &["neigh"], &monitor_log)?;
    lab.stop_agent(2);
    lab.respawn(2)?;
    lab.wait_ready(2, Duration::from_secs(20))?;
    let restarted = prober.probes().sent;
    prober.wait_replies_from(restarted, 10, Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(200));
    monitor.kill();
    assert_eq!(lab.routes(2, &["proto", "158"])?, routes_before, "routes changed across the restart");
    assert_eq!(lab.fe(2).ip(&["neigh", "show", "proto", "158"])?, neigh_before);
    let events = std::fs::read_to_string(&monitor_log)?;
    let vm_events: Vec<&str> = events.lines().filter(|l| l.contains(&VM.to_string())).collect();
    assert!(vm_events.is_empty(), "the VM's route/neighbour flapped during the restart: {vm_events:?}");
    let log = lab.agent_log(2);
    assert!(log.contains("host_routes=1") && log.contains("neighbours=1"), "read-back not logged:\n{log}");

    // ── Controller outage: forwarding continues on the last state, learning too.
    let snapshots: Vec<f64> = (1..=3).map(|n| lab.agent_metric(n, SNAPSHOTS)).collect::<Result<_, _>>()?;
    let revision = lab.agent_metric(1, "victor_agent_stream_revision")?;
    let monitor_log = lab.dir.path().join("monitor2.log");
    let mut monitor = lab.monitor(2, &["neigh"], &monitor_log)?;
    ctl.stop().await?;
    let headless_from = prober.probes().sent;
    std::thread::sleep(Duration::from_millis(1500));
    let headless_to = prober.sent();
    prober
        .wait_answered(headless_from, headless_to, 2, Duration::from_secs(5))
        .context("forwarding stopped without a controller")?;
    // A VM appears behind fe3 while no controller answers: routed locally at once, claim queued.
    let vm2 = victor_testkit::netns::NetNs::new("faw")?;
    let vm2_ip = Ipv4Addr::new(10, 10, 0, 12);
    lab.add_vm(&vm2, "eth0", "vm2p", 3, vm2_ip, "02:00:00:00:00:12")?;
    send_garp(&vm2, "eth0", "02:00:00:00:00:12", vm2_ip)?;
    wait("fe3 routes the new VM while headless", Duration::from_secs(3), || {
        lab.routes(3, &[&format!("{vm2_ip}/32")]).is_ok_and(|r| r.contains("vm2p"))
    })?;
    wait("the claim waits in fe3's report queue", Duration::from_secs(3), || {
        lab.agent_metric(3, "victor_agent_reports_queued").is_ok_and(|q| q >= 1.0)
    })?;
    assert_eq!(lab.agent_get(1, "/readyz")?.0, 200, "headless but inside the grace period: still ready");

    // ── Controller back: agents resume their stream from their revision, the queued claim lands.
    ctl.restart().await?;
    for n in 1..=3 {
        wait("agent reconnected", Duration::from_secs(10), || {
            lab.agent_metric(n, SESSIONS).is_ok_and(|s| s >= 2.0)
                && lab.agent_metric(n, "victor_agent_controller_connected").is_ok_and(|c| c == 1.0)
        })?;
    }
    ctl.wait_bound(vm2_ip, "fe3", Duration::from_secs(5)).await?;
    let log = lab.agent_log(1);
    // The first stream after the outage asks to resume from the revision held before it (a
    // controller shutting down may cost a short-lived extra session, so the generation varies).
    let resumed = format!("from_revision={revision}");
    let reopened = log.lines().filter(|l| l.contains("controller stream open") && !l.contains("generation=1 "));
    assert!(
        revision > 0.0 && reopened.clone().next().is_some_and(|l| l.contains(&resumed)),
        "fe1 did not resume from revision {revision}:\n{log}"
    );
    // The restarted controller serves the resume from the store's history (backfill): no agent
    // gets a snapshot, and the kernel state does not churn (checked below).
    let sent_snapshots = metric(&ctl.metrics().await?, "victor_snapshots_sent_total").unwrap_or(0.0);
    for n in 1..=3 {
        let after = lab.agent_metric(n, SNAPSHOTS)?;
        assert_eq!(after, snapshots[n - 1], "fe{n} received a snapshot after the controller restart");
    }
    assert_eq!(sent_snapshots, 0.0, "the restarted controller sent snapshots");
    std::thread::sleep(Duration::from_millis(300));
    monitor.kill();
    let events = std::fs::read_to_string(&monitor_log)?;
    let vm_events: Vec<&str> = events.lines().filter(|l| l.contains(&VM.to_string())).collect();
    assert!(vm_events.is_empty(), "the VM's route/neighbour churned across the outage: {vm_events:?}");
    let back = prober.probes().sent;
    prober.wait_replies_from(back, 10, Duration::from_secs(5))?;
    let probes = prober.stop()?;
    println!("restart test: {} echo requests, {} lost (agent restart included)", probes.sent, probes.lost(5));
    Ok(())
}
