//! Restarts, on both data planes: an agent restart keeps its kernel state (no flush, no flap, no
//! operation); a controller outage leaves forwarding and learning running (headless), and the
//! agents resume the stream from their revision when it is back; `kill -9` of both agents on the
//! client's path and their restart while the client pings every 10 ms, and a planned restart
//! (SIGTERM) of each in turn — no route of the mobile prefix or the VM is deleted, the restarted
//! agents adopt what they find and reprogram nothing. With the kernel data plane nothing is lost
//! (the kernel forwards while the agents are gone); with the userspace one a `kill -9` costs no
//! more than a move does ([`KILL_9_LOSS_BOUND`]) and a SIGTERM (a drained hand-over to the
//! standby and back) at most [`SIGTERM_LOSS_BOUND`]. The userspace data plane's restart records
//! hold both families: an IPv6 VM behind another FE is forwarded by a `kill -9`ed agent started
//! again while no controller runs (from its `VM/128` record, no snapshot). Decommissioning
//! (`--remove-dataplane-on-exit`) leaves nothing behind.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use common::*;
use nix::sys::signal::Signal;
use victor_fe_agent::forwarding::tun::RECORD_TABLE;

const SNAPSHOTS: &str = "victor_agent_snapshots_received_total";
const SESSIONS: &str = "victor_agent_controller_sessions_total";

/// Most echo requests (10 ms apart) a `kill -9` + immediate restart of an agent on the path may
/// cost with the userspace data plane: what one move costs at 10 ms (BENCHMARKS.md, "Migration":
/// 1–2 packets per move; `move.rs`).
const KILL_9_LOSS_BOUND: usize = 2;

plane_tests!(
    agent_restart_keeps_routes_and_headless_forwarding_resumes,
    agent_kill_9_on_the_path_and_restart,
    agent_sigterm_on_the_path_and_restart,
    remove_dataplane_on_exit_leaves_nothing
);

async fn agent_restart_keeps_routes_and_headless_forwarding_resumes(plane: Plane) -> anyhow::Result<()> {
    let (mut lab, mut ctl) = Lab::with_agents(plane).await?;
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
    // Everything was adopted (the userspace forwarder's table from its records and the VM's
    // /32): not one kernel or data-plane operation.
    let ops = reconcile_ops(&lab.agent_get(2, "/metrics")?.1);
    assert_eq!(ops, 0.0, "the restarted agent reprogrammed something:\n{log}");

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

/// How the agents on the path are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// `kill -9` of both, then both started again at once.
    Kill9,
    /// SIGTERM to one, started again once it exited, then the other (a planned restart).
    Term,
}

/// `kill -9` of fe1's agent (the client's FE: it encapsulates) and fe2's (the VM's: it
/// decapsulates and delivers), then their restart; the client pings every 10 ms throughout.
/// Kernel data plane (both killed, a second without them): 0 lost. Userspace (one after the
/// other, each started again at once): at most [`KILL_9_LOSS_BOUND`] lost per agent. Both: 0
/// operations by the restarted agents, no route of the mobile prefix or the VM deleted.
async fn agent_kill_9_on_the_path_and_restart(plane: Plane) -> anyhow::Result<()> {
    restart_on_the_path(plane, Restart::Kill9).await
}

/// SIGTERM to fe1's agent and its restart, then the same at fe2, while the client pings every
/// 10 ms: nothing lost on either data plane, nothing reprogrammed, no route deleted.
async fn agent_sigterm_on_the_path_and_restart(plane: Plane) -> anyhow::Result<()> {
    restart_on_the_path(plane, Restart::Term).await
}

async fn restart_on_the_path(plane: Plane, how: Restart) -> anyhow::Result<()> {
    let mut lab = Lab::build_on(2, plane)?;
    let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    for n in 1..=2 {
        lab.start_agent(n, &[ctl.url()], &[])?;
    }
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(30))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(10)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 20, Duration::from_secs(10))?;
    let mut monitors = Vec::new();
    for n in 1..=2 {
        let log = lab.dir.path().join(format!("monitor{n}.log"));
        monitors.push((lab.monitor(n, &["neigh", "link"], &log)?, log));
    }

    // The gateway's ARP answers come from the agent, not from the kernel: a VM that re-validates
    // its gateway entry while fe2's agent is away waits for it. That is not what this test
    // measures (the data plane): the VM resolves its gateway afresh now, and its entry stays
    // valid (≥ 15 s) across the outage.
    lab.vm.ip(&["neigh", "flush", "dev", "eth0"])?;
    let fresh = prober.sent();
    prober.wait_replies_from(fresh, 20, Duration::from_secs(10))?;
    // Echo requests sent when each stop began.
    let mut stops = Vec::new();
    match (how, plane) {
        (Restart::Kill9, Plane::Kernel) => {
            // Both at once, then a second without them: the kernel forwards by itself.
            stops.push(prober.sent());
            for n in 1..=2 {
                lab.agents[n - 1].guard.as_ref().context("agent not running")?.signal(Signal::SIGKILL)?;
            }
            for n in 1..=2 {
                let agent = &mut lab.agents[n - 1];
                agent.guard.as_mut().context("agent not running")?.kill();
                agent.guard = None;
            }
            std::thread::sleep(Duration::from_secs(1));
            for n in 1..=2 {
                lab.respawn(n)?;
            }
        }
        (Restart::Kill9, Plane::Tun) => {
            // One agent at a time, started again at once (its standby forwards meanwhile).
            for n in 1..=2 {
                stops.push(prober.sent());
                let agent = &mut lab.agents[n - 1];
                agent.guard.as_mut().context("agent not running")?.kill();
                agent.guard = None;
                lab.respawn(n)?;
                lab.wait_ready(n, Duration::from_secs(30))?;
            }
        }
        (Restart::Term, _) => {
            for n in 1..=2 {
                stops.push(prober.sent());
                lab.stop_agent(n);
                lab.respawn(n)?;
                lab.wait_ready(n, Duration::from_secs(30))?;
            }
        }
    }
    let stopped_at = stops[0];
    let respawned_at = prober.sent();
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(30))?;
    }
    // Give the restarted agents time to reconcile their snapshot, then let the ping run on.
    std::thread::sleep(Duration::from_millis(500));
    let back = prober.sent();
    prober.wait_replies_from(back, 20, Duration::from_secs(10)).context("forwarding after the restart")?;
    let probes = prober.stop()?;
    let ops: Vec<f64> =
        (1..=2).map(|n| Ok(reconcile_ops(&lab.agent_get(n, "/metrics")?.1))).collect::<anyhow::Result<_>>()?;
    let mut events = Vec::new();
    for (n, (mut monitor, log)) in monitors.into_iter().enumerate() {
        monitor.kill();
        let text = std::fs::read_to_string(&log)?;
        let ours =
            |l: &&str| l.contains(&VM.to_string()) || l.contains(MOBILE) || l.contains("victor-") || l.contains("vtun");
        events.extend(text.lines().filter(ours).map(|l| format!("fe{}: {l}", n + 1)));
    }
    let lost = probes.lost(0) as usize;
    // Lost from each stop to the next (or the end).
    let per_stop: Vec<usize> = (0..stops.len())
        .map(|i| probes.lost_seqs(stops[i], stops.get(i + 1).copied().unwrap_or(probes.sent)).len())
        .collect();
    let what = match how {
        Restart::Kill9 if plane == Plane::Kernel => "kill -9 of fe1's and fe2's agents, restart after 1 s",
        Restart::Kill9 => "kill -9 + immediate restart of fe1's, then fe2's agent",
        Restart::Term => "SIGTERM + restart of fe1's, then fe2's agent",
    };
    println!(
        "{what} ({} data plane): {} echo requests at 10 ms, {lost} lost ({per_stop:?} per stop); operations after \
         the restart: fe1 {}, fe2 {}",
        plane.label(),
        probes.sent,
        ops[0],
        ops[1]
    );
    let at_ms =
        |seq: u32| probes.sent_at[seq as usize].saturating_sub(probes.sent_at[stopped_at as usize]) as f64 / 1e6;
    let lost_at: Vec<String> = probes.lost_seqs(0, probes.sent).iter().map(|s| format!("{:.0}", at_ms(*s))).collect();
    println!(
        "lost probes, ms after the first stop: {lost_at:?}; all restarted at {:.0} ms, back at {:.0} ms",
        at_ms(respawned_at),
        at_ms(back)
    );
    // No route of the mobile prefix or the VM is deleted (the userspace forwarder's TUN device
    // and its routes outlive the process), and nothing is reprogrammed.
    // (The kernel's own cache entry of the TUN device, `0.0.0.0 dev vtunN lladdr … NOARP`, is
    // not ours and comes and goes with the device's queues.)
    let deleted: Vec<&String> =
        events.iter().filter(|e| e.contains("Deleted") && !e.contains("Deleted 0.0.0.0 dev")).collect();
    assert!(deleted.is_empty(), "routes, neighbours or devices of ours were deleted: {deleted:?}");
    assert_eq!(ops, vec![0.0, 0.0], "the restarted agents adopt everything, reprogram nothing");
    if plane == Plane::Tun {
        for n in 1..=2 {
            let log = lab.agent_log(n);
            assert!(
                log.contains("we forward on its queues"),
                "fe{n}: the restarted agent did not start on its standby's TUN queues:\n{log}"
            );
        }
    }
    match (plane, how) {
        (Plane::Kernel, _) => {
            assert_eq!(lost, 0, "the kernel forwards while the agents are gone and after they are back");
            assert!(events.is_empty(), "our routes, neighbours or devices changed: {events:?}");
        }
        (Plane::Tun, Restart::Kill9) => assert!(
            per_stop.iter().all(|n| *n <= KILL_9_LOSS_BOUND),
            "a kill -9 + restart lost more echo requests than a move ({KILL_9_LOSS_BOUND}): {per_stop:?} per agent, \
             at {lost_at:?} ms"
        ),
        (Plane::Tun, Restart::Term) => {
            // None: the standby forwards on the agent's own TUN queues and the next agent on the
            // standby's (handed on, never closed: `forwarding::standby`), and the underlay
            // sockets of both read every tunnel packet while one hands over to the other.
            // (Before the queues were handed on, each forwarder attached its own and closed them
            // after a drain: 1 packet in about one run in eight was lost under load, the one
            // queued in a closing queue.)
            assert_eq!(lost, 0, "a planned restart lost {lost} packets at {lost_at:?} ms")
        }
    }
    Ok(())
}

/// Decommissioning: agents started with `--remove-dataplane-on-exit` leave nothing of theirs in
/// the kernel after a SIGTERM — no data-plane device, no route or record, no neighbour entry with
/// our protocol — and no standby forwarder.
async fn remove_dataplane_on_exit_leaves_nothing(plane: Plane) -> anyhow::Result<()> {
    let mut lab = Lab::build_on(2, plane)?;
    let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    for n in 1..=2 {
        lab.start_agent(n, &[ctl.url()], &["--remove-dataplane-on-exit"])?;
    }
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(30))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(10)).await?;
    wait("fe1 tunnels the VM, fe2 delivers it", Duration::from_secs(10), || {
        let ours = |n| lab.fe(n).ip(&["route", "show", "table", "all", "proto", "158"]).unwrap_or_default();
        ours(1).contains(&VM.to_string()) && ours(2).contains(&VM.to_string())
    })?;
    let standbys: Vec<String> = (1..=2)
        .filter_map(|n| {
            let log = lab.agent_log(n);
            let line = log.lines().find(|l| l.contains("standby forwarder started"))?;
            Some(line.split("pid=").nth(1)?.split_whitespace().next()?.to_owned())
        })
        .collect();
    for n in 1..=2 {
        lab.stop_agent(n);
    }
    for n in 1..=2 {
        let fe = lab.fe(n);
        let links = fe.ip(&["link", "show"])?;
        assert!(
            !links.contains(&format!("vtun{n}")) && !links.contains("victor-"),
            "fe{n}: data-plane devices left: {links}"
        );
        let routes = fe.ip(&["route", "show", "table", "all", "proto", "158"])?;
        assert!(routes.trim().is_empty(), "fe{n}: routes left: {routes}");
        let neighbours = fe.ip(&["neigh", "show", "proto", "158"])?;
        assert!(neighbours.trim().is_empty(), "fe{n}: neighbour entries left: {neighbours}");
        assert!(lab.agent_log(n).contains("--remove-dataplane-on-exit: removed"), "{}", lab.agent_log(n));
    }
    match plane {
        Plane::Tun => assert_eq!(standbys.len(), 2, "every userspace agent starts a standby"),
        Plane::Kernel => assert!(standbys.is_empty(), "the kernel backend needs no standby: {standbys:?}"),
    }
    for pid in &standbys {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the standby {pid} still runs");
    }
    Ok(())
}

/// The restart records hold IPv6 (6in4) entries: fe1's agent (the client's FE: it encapsulates)
/// records the dual-stack VM behind fe2 as `VM6/128 via ::ffff:FE2 dev TUN onlink`; it is killed
/// (`kill -9`) while no controller runs and started again, and with no snapshot to come it
/// forwards the client's IPv6 pings to the VM from that record (its standby, retired by it, did
/// meanwhile). When the controller is back, its snapshot changes nothing; when the VM moves behind
/// fe1, the record goes. Userspace data plane only: the records are its own (the kernel backend's
/// routes forward without any agent: [`agent_kill_9_on_the_path_and_restart`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ipv6_vm_behind_another_fe_is_forwarded_from_its_record_after_kill_9() -> anyhow::Result<()> {
    let mut lab = Lab::build_on(2, Plane::Tun)?;
    lab.add_ipv6()?;
    let mut ctl = Controller::start_with(&lab.dir.path().join("ctl"), None, &["--mobile-prefix", MOBILE6]).await?;
    for n in 1..=2 {
        lab.start_agent(n, &[ctl.url()], &V6_FLAGS)?;
    }
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(30))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    send_frames(&lab.vm, "eth0", vec![na_frame(VM6)])?;
    ctl.wait_bound(VM6, "fe2", Duration::from_secs(10)).await?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(10)).await?;
    let prober = Prober::start_ip(&lab.client, VM6.into(), Duration::from_millis(10))?;
    prober.wait_replies_from(0, 20, Duration::from_secs(10))?;

    // fe1 records the VM's 6in4 entry (and its IPv4 one) in the record table.
    let table = RECORD_TABLE.to_string();
    let records6 = |lab: &Lab| lab.fe(1).ip(&["-6", "route", "show", "table", &table]).unwrap_or_default();
    let record6 = format!("{VM6} via ::ffff:{} dev ", fe_addr(2));
    wait("fe1 records the IPv6 VM", Duration::from_secs(5), || {
        records6(&lab).lines().any(|l| l.starts_with(&record6) && l.contains("proto 158") && l.contains("onlink"))
    })?;
    let records4 = lab.fe(1).ip(&["route", "show", "table", &table])?;
    assert!(records4.contains(&format!("{VM} via {} dev ", fe_addr(2))), "fe1's IPv4 records: {records4}");

    // No controller from here on: what fe1 forwards after its restart, it has from the kernel.
    ctl.stop().await?;
    let agent = &mut lab.agents[0];
    agent.guard.as_mut().context("agent not running")?.kill();
    agent.guard = None;
    // Mobile prefixes of both families that are no longer configured, routed into the device
    // by an earlier run: the restarted agent removes them and keeps the configured ones.
    let (stale4, stale6) = ("10.99.0.0/16", "fd00:99::/64");
    lab.fe(1).ip(&["route", "add", stale4, "dev", "vtun1", "proto", "158"])?;
    lab.fe(1).ip(&["-6", "route", "add", stale6, "dev", "vtun1", "proto", "158"])?;
    lab.respawn(1)?;
    wait("the restarted agent forwards and retires its standby", Duration::from_secs(20), || {
        lab.agent_log(1).contains("retired the standby forwarder of the previous run")
    })?;
    let log = lab.agent_log(1);
    assert!(log.contains("tunnel_routes: 2,"), "both families' records restored:\n{log}");
    assert!(log.contains("stale_routes_removed: 2 }"), "the stale prefix routes are counted:\n{log}");
    let prefixes = format!(
        "{}{}",
        lab.fe(1).ip(&["route", "show", "dev", "vtun1", "proto", "158"])?,
        lab.fe(1).ip(&["-6", "route", "show", "dev", "vtun1", "proto", "158"])?
    );
    assert!(!prefixes.contains("10.99.") && !prefixes.contains("fd00:99:"), "stale prefixes left: {prefixes}");
    assert!(prefixes.contains(MOBILE) && prefixes.contains(MOBILE6), "configured prefixes gone: {prefixes}");
    let restarted = prober.sent();
    prober
        .wait_replies_from(restarted, 20, Duration::from_secs(10))
        .with_context(|| format!("fe1 forwards the IPv6 VM from its record:\n{}", lab.agent_log(1)))?;
    assert_eq!(lab.agent_metric(1, SNAPSHOTS)?, 0.0, "no snapshot reached the restarted agent");
    assert_ne!(lab.agent_get(1, "/readyz")?.0, 200, "no controller: the restarted agent is not ready");

    // The controller is back: its snapshot finds the restored table right, nothing is reprogrammed.
    ctl.restart().await?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    assert!(lab.agent_metric(1, SNAPSHOTS)? >= 1.0, "the restarted agent synced");
    let ops = reconcile_ops(&lab.agent_get(1, "/metrics")?.1);
    assert_eq!(ops, 0.0, "the snapshot found a restored entry wrong:\n{}", lab.agent_log(1));

    // The VM moves behind fe1: local there, its IPv6 record goes.
    lab.move_vm_link(2, 1)?;
    send_frames(&lab.vm, "eth0", vec![na_frame(VM6)])?;
    ctl.wait_bound(VM6, "fe1", Duration::from_secs(10)).await?;
    wait("fe1 deletes the IPv6 record of a VM now local", Duration::from_secs(5), || {
        !records6(&lab).contains(&VM6.to_string())
    })?;
    let moved = prober.sent();
    prober.wait_replies_from(moved, 20, Duration::from_secs(10)).context("the VM, local at fe1")?;
    let probes = prober.stop()?;
    println!(
        "IPv6 VM across a kill -9 of fe1's agent without controller: {} echo requests at 10 ms, {} lost",
        probes.sent,
        probes.lost(5)
    );
    Ok(())
}

/// The standby of a stopped agent listens on an abstract socket, which any process in the FE's
/// namespace can reach: it hands its TUN queues (and stops) only for a process of its own user.
/// Another user gets nothing; a client of ours that takes the queues but never retires it does
/// not stop it; the next agent still starts on its queues and retires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_hands_its_queues_only_to_its_own_user() -> anyhow::Result<()> {
    // The client is a Python script (a program of nobody's making, run as another user too):
    // the system's, which any user can run (tests/run.sh installs python3).
    const PYTHON: &str = "/usr/bin/python3";
    if !std::path::Path::new(PYTHON).exists() {
        println!("SKIPPED: the_standby_hands_its_queues_only_to_its_own_user: no {PYTHON}");
        return Ok(());
    }
    println!("data plane under test: tun");
    let (mut lab, ctl) = Lab::with_agents(Plane::Tun).await?;
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 10, Duration::from_secs(5))?;
    lab.stop_agent(1);
    // What a client sees when it asks fe1's standby for its queues: "<bytes> <descriptors>".
    let ask = |user: Option<&str>| -> anyhow::Result<String> {
        let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(100):
    try:
        s.connect("\0victor-fe-agent/standby/" + sys.argv[1])
        break
    except OSError:
        import time; time.sleep(0.05)
s.settimeout(5)
try:
    s.sendall(b"Q")
    msg, fds, _, _ = socket.recv_fds(s, 1, 64)
except (ConnectionResetError, BrokenPipeError):
    msg, fds = b"", []
print(len(msg), len(fds))
"#;
        let mut argv: Vec<String> = Vec::new();
        if let Some(user) = user {
            argv.extend(
                ["setpriv", &format!("--reuid={user}"), &format!("--regid={user}"), "--clear-groups"].map(String::from),
            );
        }
        // fe1's TUN device (the lab's agents: `--tun-name vtun<n>`).
        argv.extend([PYTHON, "-c", script, "vtun1"].map(String::from));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = lab.fe(1).exec(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(ask(Some("65534"))?, "0 0", "another user got an answer (or descriptors) from the standby");
    let ours = ask(None)?;
    assert!(ours.starts_with("1 ") && ours != "1 0", "our own user gets the queues: {ours}");
    // Neither stopped it: fe1 still forwards (through its standby).
    let now = prober.sent();
    prober.wait_replies_from(now, 10, Duration::from_secs(5)).context("the standby stopped forwarding")?;
    lab.respawn(1)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    let log = lab.agent_log(1);
    assert!(log.contains("we forward on its queues"), "the next agent did not start on the standby's queues:\n{log}");
    let now = prober.sent();
    prober.wait_replies_from(now, 10, Duration::from_secs(5)).context("forwarding after the restart")?;
    let probes = prober.stop()?;
    println!(
        "{} echo requests at 10 ms across the stop, two questions and the restart: {} lost",
        probes.sent,
        probes.lost(0)
    );
    Ok(())
}
