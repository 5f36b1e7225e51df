//! Three controller replicas on a real 1-member etcd; the agents list [A (behind a proxy), B, C].
//! A dies silently (its connection freezes: only the agents' stream liveness check can notice),
//! then B is stopped while the agents use it. Each time the agents fail over to the next
//! replica, resume their stream without a snapshot, and neither the kernel state nor the
//! traffic is touched.

mod common;

use std::time::{Duration, Instant};

use common::*;
use victor_testkit::etcd::EtcdCluster;

const SESSIONS: &str = "victor_agent_controller_sessions_total";
const SNAPSHOTS: &str = "victor_agent_snapshots_received_total";
const CONNECTED: &str = "victor_agent_controller_connected";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_between_replicas_resumes_without_snapshot() -> anyhow::Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let mut lab = Lab::build(2)?;
    let endpoints = etcd.endpoints();
    let a = Controller::start(&lab.dir.path().join("a"), Some(&endpoints)).await?;
    let mut b = Controller::start(&lab.dir.path().join("b"), Some(&endpoints)).await?;
    let mut c = Controller::start(&lab.dir.path().join("c"), Some(&endpoints)).await?;
    let proxy = LinkProxy::start(a.grpc).await?;
    for n in 1..=2 {
        lab.start_agent(n, &[proxy.url(), b.url(), c.url()], &[])?;
    }
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(20))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    a.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 10, Duration::from_secs(5))?;
    let monitor_log = lab.dir.path().join("monitor.log");
    let mut monitor = lab.monitor(2, &["neigh"], &monitor_log)?;
    let from = prober.probes().sent;

    // 1. A dies silently: the agents notice through the missing stream heartbeats.
    let t0 = Instant::now();
    proxy.partition();
    for n in 1..=2 {
        wait("fail over to B", Duration::from_secs(15), || {
            lab.agent_metric(n, SESSIONS).is_ok_and(|s| s >= 2.0)
                && lab.agent_metric(n, CONNECTED).is_ok_and(|c| c == 1.0)
        })?;
    }
    let silent = t0.elapsed();
    // How fast is benchmark output (the stream timeout is 1.5 s); the bound above only says the
    // agents did not wait for TCP to give up.
    println!("silent replica death: both agents resumed on B after {silent:?} (stream timeout 1.5 s)");
    assert_eq!(metric(&b.metrics().await?, "victor_snapshots_sent_total"), Some(0.0), "B sent a snapshot");

    // 2. B is stopped while serving them: the stream closes, the agents move on to C at once.
    let t0 = Instant::now();
    b.stop().await?;
    for n in 1..=2 {
        wait("fail over to C", Duration::from_secs(10), || {
            lab.agent_metric(n, SESSIONS).is_ok_and(|s| s >= 3.0)
                && lab.agent_metric(n, CONNECTED).is_ok_and(|c| c == 1.0)
        })?;
    }
    let stopped = t0.elapsed();
    println!("replica stopped: both agents resumed on C after {stopped:?}");
    assert_eq!(metric(&c.metrics().await?, "victor_snapshots_sent_total"), Some(0.0), "C sent a snapshot");
    for n in 1..=2 {
        assert_eq!(lab.agent_metric(n, SNAPSHOTS)?, 1.0, "fe{n} got a full snapshot on failover");
    }

    // The control plane moved twice; the data plane did not notice.
    std::thread::sleep(Duration::from_millis(200));
    monitor.kill();
    let events = std::fs::read_to_string(&monitor_log)?;
    let churn: Vec<&str> = events.lines().filter(|l| l.contains(&VM.to_string())).collect();
    assert!(churn.is_empty(), "kernel churn during failover: {churn:?}");
    let probes = prober.stop()?;
    let lost = probes.lost_seqs(from, probes.sent.saturating_sub(5)).len();
    assert_eq!(lost, 0, "traffic lost during the control-plane failovers");

    // And the control plane works on C: a new claim lands.
    let vm2 = victor_testkit::netns::NetNs::new("faw")?;
    let vm2_ip = std::net::Ipv4Addr::new(10, 10, 0, 12);
    lab.add_vm(&vm2, "eth0", "vm2p", 1, vm2_ip, "02:00:00:00:00:12")?;
    send_garp(&vm2, "eth0", "02:00:00:00:00:12", vm2_ip)?;
    if let Err(e) = c.wait_bound(vm2_ip, "fe1", Duration::from_secs(5)).await {
        anyhow::bail!("{e:#}\nagent fe1 log:\n{}", lab.agent_log(1));
    }
    c.stop().await?;
    // A stays up: its frozen proxy connection would hold a graceful shutdown forever.
    drop(a);
    Ok(())
}
