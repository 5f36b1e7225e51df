//! Real `victor-fe-agent`s in the namespace lab (`crate::lab`), attached to a fault scenario's
//! controllers so they live through the same faults as the simulated agents, with real traffic:
//! the client pings the VM behind fe2 through fe1's userspace IP-in-IP every 10 ms the whole
//! time.
//!
//! A second VM behind fe3 stays silent until a test announces it.
//!
//! fe1's agent reaches each replica through a [`LinkProxy`] so that its controller link alone can
//! be cut (it is the ingress FE: cutting it tests headless forwarding, docs/design.md invariant
//! I6). fe1 and fe2 prefer replica 0, fe3 prefers replica 1. Everything a fault test reads from an
//! agent comes from its own admin port (`/metrics`, `/readyz`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cluster::Controllers;
use super::proxy::LinkProxy;
pub use crate::lab::agents::AgentCounters;
use crate::lab::agents::{Agent, AgentCommand, agent_counters, wait_agent_ready};
use crate::lab::migrate::controller_netns;
use crate::lab::probe::{Prober, send_garp};
use crate::lab::topology::{Topology, VmSpec, netns_for};

/// Interval of the client's pings.
pub const PING_INTERVAL: Duration = Duration::from_millis(10);

/// The lab (field order = drop order: processes and threads before the namespaces).
pub struct RealLab {
    /// Client → VM pings.
    pub prober: Prober,
    /// The agents, fe1..fe3 at index 0..2.
    pub agents: Vec<Agent>,
    /// fe1's links to each replica.
    pub links: Vec<LinkProxy>,
    /// The VM (behind fe2).
    pub vm: VmSpec,
    /// A VM behind fe3 that stays silent until [`RealLab::announce_late_vm`].
    pub late_vm: VmSpec,
    /// The namespaces.
    pub topo: Topology,
    dir: tempfile::TempDir,
}

impl RealLab {
    /// Builds client, fe1..fe3 and the VM behind fe2, starts the three agents against
    /// `cluster`'s replicas, binds the VM (gratuitous ARP) and starts the pings.
    pub async fn start(cluster: &Controllers) -> Result<RealLab> {
        victor_testkit::require_root("the fault suite's namespace lab");
        let dir = tempfile::Builder::new().prefix("victor-faults-lab-").tempdir()?;
        let namer = |role: &str| netns_for("fl", role);
        let mut topo = Topology::build(3, &namer)?;
        let vm = VmSpec::numbered(1);
        topo.add_vm(vm.clone(), 2, &namer)?;
        let late_vm = VmSpec::numbered(2);
        topo.add_vm(late_vm.clone(), 3, &namer)?;
        let mut links = Vec::new();
        for r in 0..cluster.len() {
            links.push(LinkProxy::start(cluster.grpc(r)).await?);
        }
        let bin = victor_testkit::workspace_binary("victor-fe-agent");
        let netns = controller_netns()?;
        let direct = |order: &[usize]| order.iter().map(|&r| format!("http://{}", cluster.grpc(r))).collect::<Vec<_>>();
        let endpoints = [links.iter().map(LinkProxy::url).collect(), direct(&[0, 1]), direct(&[1, 0])];
        let mut agents = Vec::new();
        for n in 1..=3 {
            // Quiet logs: the churn moves hundreds of VMs per second.
            let argv = AgentCommand {
                bin: &bin,
                controllers: &endpoints[n - 1],
                controller_netns: &netns,
                extra: &["--log", "info"],
            }
            .argv(n);
            agents.push(Agent::spawn(topo.fe(n), n, argv, dir.path())?);
        }
        for n in 1..=3 {
            tokio::task::block_in_place(|| wait_agent_ready(topo.fe(n), &mut agents[n - 1], Duration::from_secs(60)))?;
        }
        send_garp(topo.vm(1), "eth0", &vm.mac, vm.ip)?;
        let prober = Prober::start(&topo.client, vm.ip, PING_INTERVAL)?;
        let lab = RealLab { prober, agents, links, vm, late_vm, topo, dir };
        tokio::task::block_in_place(|| lab.prober.wait_replies_from(0, 20, Duration::from_secs(20)))
            .context("the client cannot reach the VM through fe1 and fe2")?;
        Ok(lab)
    }

    /// Logs and the move-hint key live here.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// FE `n`'s agent counters.
    pub fn counters(&self, n: usize) -> Result<AgentCounters> {
        tokio::task::block_in_place(|| agent_counters(self.topo.fe(n)))
    }

    /// Polls FE `n`'s counters until `done` holds; returns them and how long it took.
    pub async fn wait_counters(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        done: impl Fn(&AgentCounters) -> bool,
    ) -> Result<(AgentCounters, Duration)> {
        let started = Instant::now();
        loop {
            let last = self.counters(n);
            if let Ok(c) = &last
                && done(c)
            {
                return Ok((c.clone(), started.elapsed()));
            }
            if started.elapsed() > timeout {
                bail!("fe{n}: {what} not reached after {timeout:?} (last: {last:?})");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs FE `n`'s agent.
    pub fn kill_agent(&mut self, n: usize) {
        if let Some(mut guard) = self.agents[n - 1].guard.take() {
            guard.kill();
        }
    }

    /// Restarts FE `n`'s agent with its command line and waits until it is ready.
    pub fn restart_agent(&mut self, n: usize) -> Result<Duration> {
        let started = Instant::now();
        let dir = self.dir.path().to_path_buf();
        let agent = &mut self.agents[n - 1];
        agent.respawn(self.topo.fe(n), n, &dir)?;
        tokio::task::block_in_place(|| wait_agent_ready(self.topo.fe(n), agent, Duration::from_secs(60)))?;
        Ok(started.elapsed())
    }

    /// The late VM sends its gratuitous ARP.
    pub fn announce_late_vm(&self) -> Result<()> {
        send_garp(self.topo.vm(2), "eth0", &self.late_vm.mac, self.late_vm.ip)
    }

    /// Cuts fe1's controller links.
    pub fn partition_fe1(&self) {
        self.links.iter().for_each(LinkProxy::partition);
    }

    /// Restores them.
    pub fn heal_fe1(&self) {
        self.links.iter().for_each(LinkProxy::heal);
    }

    /// The next ping's sequence number.
    pub fn ping_seq(&self) -> u32 {
        self.prober.sent()
    }

    /// Pings sent from `seq` until now that got no answer; replies still in flight get a few
    /// seconds to arrive (a loaded machine can hold them that long).
    pub fn lost_since(&self, seq: u32) -> Vec<u32> {
        let to = self.prober.sent();
        if self.prober.wait_answered(seq, to, 0, Duration::from_secs(3)).is_ok() {
            return Vec::new();
        }
        self.prober.probes().lost_seqs(seq, to)
    }
}
