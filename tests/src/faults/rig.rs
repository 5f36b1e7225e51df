//! One fault scenario's system, assembled: the control plane ([`Controllers`]), N simulated
//! agents spread over the replicas ([`SimAgent`]; the first few optionally behind partitionable
//! links), M bindings loaded through `Report`, and the continuous churn ([`Churn`]) running from
//! then on. After a fault, [`Rig::verify`] pauses the churn and checks the invariants against
//! etcd itself: nothing acknowledged lost, nothing half-written, and every live agent's state
//! equal to the store within a bounded time (which it reports).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::agent_service_client::AgentServiceClient;

use super::agent::{AgentState, Counters, LinkPolicy, SimAgent};
use super::churn::{Churn, ChurnConfig};
use super::cluster::{ClusterConfig, Controllers};
use super::proxy::LinkProxy;
use super::store::{self, StoreView, TruthCheck};
use crate::bench::driver::{self, Reporters};

/// `VICTOR_SOAK=1` selects the long form of the suite.
pub fn soak() -> bool {
    std::env::var("VICTOR_SOAK").is_ok_and(|v| v == "1")
}

/// The size of a scenario.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scale {
    /// Simulated FEs (agents).
    pub fes: usize,
    /// Bindings loaded before the faults.
    pub bindings: usize,
    /// Offered moves per second, all the time.
    pub moves_per_s: f64,
    /// How long the churn runs between two steps of a scenario.
    pub settle: Duration,
}

impl Scale {
    /// CI's short form, or the soak with `VICTOR_SOAK=1`.
    pub fn from_env() -> Scale {
        if soak() {
            Scale { fes: 200, bindings: 50_000, moves_per_s: 500.0, settle: Duration::from_secs(10) }
        } else {
            Scale { fes: 16, bindings: 4_000, moves_per_s: 150.0, settle: Duration::from_millis(1500) }
        }
    }
}

/// How to assemble a scenario.
#[derive(Debug, Clone)]
pub struct RigConfig {
    /// Its size.
    pub scale: Scale,
    /// The control plane.
    pub cluster: ClusterConfig,
    /// How the agents' links behave.
    pub policy: LinkPolicy,
    /// The first K agents reach the replicas through one [`LinkProxy`] per replica, so that
    /// their controller links can be cut ([`Rig::partition_agents`]).
    pub partitionable: usize,
}

impl RigConfig {
    /// The default scenario at the environment's scale.
    pub fn from_env() -> RigConfig {
        RigConfig {
            scale: Scale::from_env(),
            cluster: ClusterConfig::default(),
            policy: LinkPolicy::default(),
            partitionable: 0,
        }
    }
}

/// The assembled system.
pub struct Rig {
    /// Agents by FE number. Dropped first.
    pub agents: Agents,
    /// The churn.
    pub churn: Churn,
    /// The partitionable agents' links, one per replica.
    pub agent_links: Vec<LinkProxy>,
    /// The control plane.
    pub cluster: Controllers,
    /// FE ids by number.
    pub fes: Vec<String>,
    config: RigConfig,
    started: Instant,
}

/// One agent's return to service after a fault.
#[derive(Debug, Clone, Serialize)]
pub struct Resumed {
    /// FE id.
    pub fe: String,
    /// The endpoint it resumed on.
    pub endpoint: usize,
    /// The revision it resumed from (0 = asked for a snapshot).
    pub from_revision: u64,
    /// Fault → its old session ended (ms).
    pub detected_ms: f64,
    /// Fault → first message applied on the new session (ms).
    pub resumed_ms: f64,
    /// The new session carried a snapshot.
    pub snapshot: bool,
}

/// What [`Rig::verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Which step of the scenario.
    pub label: String,
    /// Store revision checked against.
    pub store_revision: u64,
    /// Bindings in the store.
    pub bindings: usize,
    /// The churn's truth against the store.
    pub truth: TruthCheck,
    /// From the store read until every live agent had applied its latest binding change (ms).
    pub agents_converged_ms: f64,
    /// Live agents whose state differs from the store (must be empty).
    pub inconsistent: Vec<String>,
    /// Moves committed so far.
    pub moves_committed: u64,
}

impl Verification {
    /// Panics unless no claim answered "nothing was written" is in the store. Kept apart from
    /// [`Verification::assert_clean`] while the controller breaks that promise (see the ignored
    /// `unknown_outcome_*` test in `tests/faults.rs`).
    pub fn assert_promises_kept(&self) {
        assert!(
            self.truth.written_after_nothing_was_written.is_empty(),
            "{}: the controller said \"nothing was written\" about writes that are in the store: {:#?}",
            self.label,
            self.truth.written_after_nothing_was_written
        );
    }

    /// Panics with the whole finding unless nothing acknowledged was lost, nothing is corrupt and
    /// every live agent equals the store.
    pub fn assert_clean(&self) {
        assert!(
            self.truth.is_clean() && self.inconsistent.is_empty(),
            "{}: invariants broken:\n{}",
            self.label,
            serde_json::to_string_pretty(self).unwrap_or_default()
        );
    }
}

impl Rig {
    /// Starts everything, loads the bindings, waits until every agent holds them, starts the churn.
    pub async fn start(config: RigConfig) -> Result<Rig> {
        let started = Instant::now();
        let scale = config.scale;
        if scale.fes < 3 {
            bail!("a fault scenario needs at least 3 FEs");
        }
        let cluster = Controllers::start(&config.cluster).await?;
        let mut agent_links = Vec::new();
        if config.partitionable > 0 {
            for r in 0..cluster.len() {
                agent_links.push(LinkProxy::start(cluster.grpc(r)).await?);
            }
        }
        let fes: Vec<String> = (0..scale.fes).map(|i| format!("fe-{i:05}")).collect();
        let agents =
            Agents((0..scale.fes).map(|i| Some(spawn_agent(&cluster, &agent_links, &fes, &config, i))).collect());
        agents.wait_synced(Duration::from_secs(60)).await?;

        let clients = replica_clients(&cluster)?;
        let reporters: Reporters = Arc::new(fes.iter().map(|id| (id.clone(), clients[0].clone())).collect());
        let loaded = driver::preload(&reporters, scale.bindings, 1024, 8, &Default::default())
            .await
            .context("load the bindings")?;
        agents.wait_revision(loaded.revision, Duration::from_secs(60)).await.context("deliver the loaded bindings")?;
        let initial = (0..scale.bindings).map(|vm| (vm % scale.fes) as u32).collect();
        let churn = Churn::start(clients, fes.clone(), initial, churn_config(&scale));
        eprintln!(
            "[faults] {} FEs, {} bindings, {} replicas on {}-member etcd ready after {:.1} s; churning {} moves/s",
            scale.fes,
            scale.bindings,
            cluster.len(),
            cluster.etcd.members(),
            started.elapsed().as_secs_f64(),
            scale.moves_per_s
        );
        Ok(Rig { agents, churn, agent_links, cluster, fes, config, started })
    }

    /// The scale.
    pub fn scale(&self) -> Scale {
        self.config.scale
    }

    /// Seconds since the rig started.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The live agents.
    pub fn live_agents(&self) -> impl Iterator<Item = &SimAgent> {
        self.agents.live()
    }

    /// Agent `i` (panics if it is killed).
    pub fn agent(&self, i: usize) -> &SimAgent {
        self.agents.0[i].as_ref().expect("agent is alive")
    }

    /// FE numbers of the live agents whose stream is up on endpoint `endpoint` of their list
    /// mapped to replica `replica`.
    pub fn agents_on(&self, replica: usize) -> Vec<usize> {
        let replicas = self.cluster.len();
        self.agents
            .0
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let endpoint = a.as_ref()?.state().connected?;
                ((i + endpoint) % replicas == replica).then_some(i)
            })
            .collect()
    }

    /// The replica behind endpoint `endpoint` of agent `i`'s list.
    pub fn replica_of(&self, i: usize, endpoint: usize) -> usize {
        (i + endpoint) % self.cluster.len()
    }

    /// Kills agent `i` (its connection drops mid-stream) and stops moving VMs to its FE.
    pub fn kill_agent(&mut self, i: usize) -> AgentState {
        self.churn.exclude_fe(i as u32, true);
        self.agents.0[i].take().map(SimAgent::kill).unwrap_or_default()
    }

    /// Starts agent `i` again, empty (a restarted process), and lets VMs move to it again.
    pub fn restart_agent(&mut self, i: usize) {
        let agent = spawn_agent(&self.cluster, &self.agent_links, &self.fes, &self.config, i);
        self.agents.0[i] = Some(agent);
        self.churn.exclude_fe(i as u32, false);
    }

    /// Cuts the partitionable agents' controller links (every replica).
    pub fn partition_agents(&self) {
        self.agent_links.iter().for_each(LinkProxy::partition);
    }

    /// Restores them.
    pub fn heal_agents(&self) {
        self.agent_links.iter().for_each(LinkProxy::heal);
    }

    /// Resets every live agent's window counters.
    pub fn mark(&self) {
        self.live_agents().for_each(|a| a.state().mark());
    }

    /// The window counters of `agents` (FE numbers), summed.
    pub fn window(&self, agents: &[usize]) -> Counters {
        let mut sum = Counters::default();
        for &i in agents {
            if let Some(a) = &self.agents.0[i] {
                sum += a.state().window;
            }
        }
        sum
    }

    /// Lets the churn run for the scale's settle time.
    pub async fn settle(&self) {
        tokio::time::sleep(self.config.scale.settle).await;
    }

    /// Waits until every live agent has applied `revision`; returns how long that took.
    pub async fn wait_revision(&self, revision: u64, timeout: Duration) -> Result<Duration> {
        self.agents.wait_revision(revision, timeout).await
    }

    /// Reads the store now and waits until every live agent has applied its latest binding
    /// change: how long the agents take to catch up with the store from this moment.
    pub async fn catch_up(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let view = store::read(self.cluster.etcd.endpoints()).await?;
        self.wait_revision(view.latest_binding_revision(), timeout).await?;
        Ok(started.elapsed())
    }

    /// Waits until each of `agents` (FE numbers) has applied a message on a session opened after
    /// `since_ns` (CLOCK_MONOTONIC), and describes how each came back.
    pub async fn wait_resumed(&self, agents: &[usize], since_ns: u64, timeout: Duration) -> Result<Vec<Resumed>> {
        let started = Instant::now();
        loop {
            let mut out = Vec::with_capacity(agents.len());
            let mut waiting = None;
            for &i in agents {
                let agent = self.agent(i);
                let st = agent.state();
                let detected = st.sessions.iter().filter(|s| s.ended_ns >= since_ns).map(|s| s.ended_ns).min();
                match st.sessions_since(since_ns).find(|s| s.first_message_ns != 0) {
                    Some(s) => out.push(Resumed {
                        fe: agent.id.clone(),
                        endpoint: s.endpoint,
                        from_revision: s.from_revision,
                        detected_ms: ms(detected.unwrap_or(s.opened_ns).saturating_sub(since_ns)),
                        resumed_ms: ms(s.first_message_ns - since_ns),
                        snapshot: s.snapshot,
                    }),
                    None => {
                        waiting.get_or_insert_with(|| format!("{} (sessions: {:?})", agent.id, st.sessions.last()));
                    }
                }
            }
            let Some(waiting) = waiting else { return Ok(out) };
            if started.elapsed() > timeout {
                bail!("not every agent resumed within {timeout:?}; still waiting for {waiting}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// For each of `agents`, how long after `since_ns` its session then up ended (ms; `None` if
    /// it has not ended).
    pub fn session_ended_ms(&self, agents: &[usize], since_ns: u64) -> Vec<Option<f64>> {
        agents
            .iter()
            .map(|&i| {
                let st = self.agent(i).state();
                st.sessions.iter().find(|s| s.ended_ns >= since_ns).map(|s| ms(s.ended_ns - since_ns))
            })
            .collect()
    }

    /// Pauses the churn, checks the invariants against etcd, resumes the churn.
    pub async fn verify(&self, label: &str) -> Result<Verification> {
        self.churn.pause().await;
        let result = self.check(label).await;
        self.churn.resume();
        result
    }

    async fn check(&self, label: &str) -> Result<Verification> {
        let view = store::read(self.cluster.etcd.endpoints()).await?;
        let truth = store::check_truth(&view, &self.churn.truth(), &self.fes);
        let converged = self.wait_revision(view.latest_binding_revision(), Duration::from_secs(30)).await;
        let agents_converged_ms = match &converged {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(_) => f64::NAN,
        };
        let mut inconsistent = Vec::new();
        if let Err(e) = converged {
            inconsistent.push(format!("{e:#}"));
        }
        inconsistent.extend(self.diffs(&view));
        Ok(Verification {
            label: label.to_owned(),
            store_revision: view.revision,
            bindings: view.bindings.len(),
            truth,
            agents_converged_ms: (agents_converged_ms * 1e3).round() / 1e3,
            inconsistent,
            moves_committed: self.churn.moved(),
        })
    }

    fn diffs(&self, view: &StoreView) -> Vec<String> {
        self.live_agents()
            .filter_map(|a| store::diff_agent(&a.state().map, view).map(|d| format!("{}: {d}", a.id)))
            .collect()
    }
}

/// The simulated agents, by FE number (`None` while killed).
pub struct Agents(pub Vec<Option<SimAgent>>);

impl Agents {
    /// The live ones.
    pub fn live(&self) -> impl Iterator<Item = &SimAgent> {
        self.0.iter().flatten()
    }

    /// Waits until every live agent completed a snapshot.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let pending: Vec<&str> = self.live().filter(|a| !a.state().synced).map(|a| a.id.as_str()).collect();
            if pending.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("{} agent(s) without a snapshot after {timeout:?}, e.g. {}", pending.len(), pending[0]);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every live agent has applied `revision`; returns how long that took.
    pub async fn wait_revision(&self, revision: u64, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let behind = self.live().find(|a| a.revision() < revision);
            let Some(agent) = behind else { return Ok(started.elapsed()) };
            if started.elapsed() > timeout {
                let st = agent.state();
                bail!(
                    "{} is at revision {} after {timeout:?}, expected {revision} (connected: {:?}, last session: {:?})",
                    agent.id,
                    st.resume_revision(),
                    st.connected,
                    st.sessions.last()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn spawn_agent(cluster: &Controllers, links: &[LinkProxy], fes: &[String], config: &RigConfig, i: usize) -> SimAgent {
    let replicas = cluster.len();
    // Agent i prefers replica i mod R, then the next ones: the agents are spread evenly.
    let endpoints = (0..replicas)
        .map(|k| {
            let r = (i + k) % replicas;
            match links.get(r) {
                Some(link) if i < config.partitionable => link.addr,
                _ => cluster.grpc(r),
            }
        })
        .collect();
    SimAgent::start(fes[i].clone(), i, endpoints, config.policy)
}

fn replica_clients(cluster: &Controllers) -> Result<Vec<AgentServiceClient<Channel>>> {
    (0..cluster.len())
        .map(|r| {
            let channel = Endpoint::from_shared(format!("http://{}", cluster.grpc(r)))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect_lazy();
            Ok(AgentServiceClient::new(channel))
        })
        .collect()
}

fn churn_config(scale: &Scale) -> ChurnConfig {
    // Room for every call of a 3 s store stall (the etcd request deadline) at the offered rate:
    // with a cap of 32 the generator itself stopped sending during a stall and the write gap
    // measured its cap, not how soon the controller commits again.
    let inflight = (scale.moves_per_s * 4.0) as usize;
    ChurnConfig { rate: scale.moves_per_s, tick: Duration::from_millis(10), inflight, seed: 7 }
}

/// Nanoseconds as milliseconds with three decimals.
pub fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e3
}

/// Prints one result line (`FAULTS <name> <json>`) for the suite's report.
pub fn emit(name: &str, value: &impl Serialize) {
    println!("FAULTS {name} {}", serde_json::to_string(value).unwrap_or_default());
}

/// Now, for fault timestamps (CLOCK_MONOTONIC ns, shared with the agents' records).
pub fn now_ns() -> u64 {
    monotonic_ns()
}
