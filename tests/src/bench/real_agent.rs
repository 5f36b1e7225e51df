//! `--real-agent`: a real `victor-fe-agent` in a one-FE namespace lab (`crate::lab`) does the full
//! sync of every loaded binding from replica 1 — process start → `/readyz` 200 (stream up,
//! snapshot applied to its desired state, the userspace data plane's forwarding table and the
//! kernel) — and reports its memory and the kernel state it left in its namespace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use victor_testkit::netns::NetNs;

use super::cluster::Cluster;
use super::sys;
use crate::lab::agents::{Agent, AgentCommand, agent_counters, agent_get, wait_agent_ready};
use crate::lab::migrate::controller_netns;
use crate::lab::topology::{Topology, netns_for};

/// What the real agent's full sync cost.
#[derive(Debug, Clone, Serialize)]
pub struct RealAgentReport {
    /// Process start → `/readyz` 200 with every binding applied.
    pub full_sync_s: f64,
    /// Bindings in its desired state afterwards (must equal the bindings loaded).
    pub bindings: f64,
    /// Resident memory of the whole agent process afterwards.
    pub rss_mib: f64,
    /// That, divided by the bindings (an upper bound: it includes the process's fixed cost). Taken
    /// at `/readyz`, while the restart records are still queued for writing.
    pub rss_bytes_per_binding: f64,
    /// Resident memory once every record is written (the recorder's queue gone; what the
    /// allocator kept of it still counts), per binding.
    pub rss_settled_bytes_per_binding: f64,
    /// The agent's own estimate of its desired state's heap (`victor_agent_desired_bytes`), per
    /// binding.
    pub desired_state_bytes_per_binding: f64,
    /// Its estimate of the userspace forwarding table's heap (`victor_agent_fib_bytes`), per
    /// binding.
    pub forwarding_table_bytes_per_binding: f64,
    /// IPv4 routes in the FE's namespace that forward, all tables but the userspace data plane's
    /// record table (foreign bindings live in the userspace forwarding table, not in the kernel).
    pub kernel_routes: usize,
    /// Routes in the record table ([`victor_fe_agent::forwarding::tun::RECORD_TABLE`]): one per
    /// remote binding and per registered FE, so that a restarted agent or its standby forwards
    /// before any snapshot.
    pub record_routes: usize,
    /// Process start → every foreign binding recorded (the records are written off the sync path,
    /// after `/readyz` may already say ready; an upper bound: counted by dumping the routes).
    pub records_complete_s: f64,
    /// The agent's reconcile operations by kind during the sync.
    pub reconcile_ops: BTreeMap<String, f64>,
}

/// Runs the full sync of a real agent against `cluster`'s first replica holding `bindings`.
pub fn full_sync(cluster: &Cluster, bindings: usize) -> Result<RealAgentReport> {
    victor_testkit::require_root("--real-agent (a namespace lab)");
    let dir = tempfile::Builder::new().prefix("victor-bench-agent-").tempdir()?;
    let topo = Topology::build(1, &|role: &str| netns_for("vb", role))?;
    let bin = victor_testkit::workspace_binary("victor-fe-agent");
    let controllers = [cluster.replicas[0].url()];
    let netns = controller_netns()?;
    let argv =
        AgentCommand { bin: &bin, controllers: &controllers, controller_netns: &netns, extra: &["--log", "warn"] }
            .argv(1);
    let started = Instant::now();
    let mut agent = Agent::spawn(topo.fe(1), 1, argv, dir.path())?;
    wait_agent_ready(topo.fe(1), &mut agent, Duration::from_secs(300))?;
    let full_sync_s = started.elapsed().as_secs_f64();
    // The agent refreshes its gauges every second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let counters = loop {
        let counters = agent_counters(topo.fe(1))?;
        if counters.bindings as usize == bindings {
            break counters;
        }
        if Instant::now() > deadline {
            bail!("the real agent holds {} bindings after its snapshot, expected {bindings}", counters.bindings);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, metrics) = agent_get(topo.fe(1), "/metrics")?;
    let heap = |name: &str| victor_testkit::http::metric(&metrics, name, "") / bindings.max(1) as f64;
    let pid = agent.guard.as_ref().map_or(0, |g| g.pid());
    let rss = sys::rss_bytes(pid)?;
    // The restart records follow the forwarding table off the sync path: wait for them (one per
    // foreign binding, all of them here) and say when they were complete.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (kernel_routes, record_routes) = loop {
        let (kernel_routes, record_routes) = route_count(topo.fe(1))?;
        if record_routes >= bindings || Instant::now() > deadline {
            break (kernel_routes, record_routes);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let records_complete_s = started.elapsed().as_secs_f64();
    let rss_settled = sys::rss_bytes(pid)?;
    agent.stop();
    Ok(RealAgentReport {
        full_sync_s: (full_sync_s * 1e3).round() / 1e3,
        bindings: counters.bindings,
        rss_mib: (rss as f64 / (1 << 20) as f64 * 1e3).round() / 1e3,
        rss_bytes_per_binding: (rss as f64 / bindings.max(1) as f64 * 10.0).round() / 10.0,
        rss_settled_bytes_per_binding: (rss_settled as f64 / bindings.max(1) as f64 * 10.0).round() / 10.0,
        desired_state_bytes_per_binding: (heap("victor_agent_desired_bytes") * 10.0).round() / 10.0,
        forwarding_table_bytes_per_binding: (heap("victor_agent_fib_bytes") * 10.0).round() / 10.0,
        kernel_routes,
        record_routes,
        records_complete_s: (records_complete_s * 1e3).round() / 1e3,
        reconcile_ops: counters.ops,
    })
}

/// IPv4 routes of every table in `ns`: (those outside the record table, those in it).
fn route_count(ns: &NetNs) -> Result<(usize, usize)> {
    let out =
        std::process::Command::new("ip").args(["-netns", ns.name(), "-4", "route", "show", "table", "all"]).output()?;
    if !out.status.success() {
        bail!("ip route in {}: {}", ns.name(), String::from_utf8_lossy(&out.stderr));
    }
    let record = victor_fe_agent::forwarding::tun::RECORD_TABLE.to_string();
    let text = String::from_utf8_lossy(&out.stdout);
    let routes: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let in_records = |l: &&&str| l.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["table", &record]);
    let records = routes.iter().filter(in_records).count();
    Ok((routes.len() - records, records))
}
