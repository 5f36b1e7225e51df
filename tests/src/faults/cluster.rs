//! The control plane a fault test breaks: a real etcd cluster and `victor-controller` replicas on
//! fixed loopback ports, so a replica restarted after a kill comes back on the same addresses and
//! the agents' endpoint lists stay valid.
//!
//! * replicas: [`Controllers::kill`] (SIGKILL of the process group, like `kill -9`),
//!   [`Controllers::restart`], [`Controllers::pause`] / [`Controllers::resume`] (SIGSTOP/SIGCONT);
//! * etcd: the [`EtcdCluster`] itself (kill / restart a member, leader lookup, etcdctl), plus
//!   [`Controllers::pause_etcd`] / [`Controllers::resume_etcd`] to stop every member at once;
//! * a replica can be told to reach etcd through one [`LinkProxy`] per member, so that its store
//!   link alone can be cut ([`Controllers::cut_store_link`]).
//!
//! Every process is ours and signalled by PID; dropping the value kills them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use victor_testkit::controller::{ControllerCommand, ControllerProcess, ControllerStore};
use victor_testkit::etcd::EtcdCluster;

use super::proxy::LinkProxy;
use crate::bench::cluster::MOBILE_PREFIX;

/// How to start the control plane.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd members (1 or 3).
    pub etcd_members: usize,
    /// Controller replicas.
    pub replicas: usize,
    /// Replicas (by index) that reach etcd through proxies (their store link can be cut).
    pub store_link_proxied: Vec<usize>,
    /// FE session TTL (`--session-ttl`): how fast a dead agent's FE is reported down.
    pub session_ttl: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            etcd_members: 3,
            replicas: 2,
            store_link_proxied: Vec::new(),
            session_ttl: Duration::from_secs(3),
        }
    }
}

struct Replica {
    /// The command line, on fixed addresses (a restart comes back on them).
    cmd: ControllerCommand,
    store_links: Vec<LinkProxy>,
    child: Option<ControllerProcess>,
    log: PathBuf,
    runs: u32,
}

/// etcd and the controller replicas (field order = drop order: replicas, then etcd).
pub struct Controllers {
    replicas: Vec<Replica>,
    /// The etcd cluster.
    pub etcd: EtcdCluster,
    dir: tempfile::TempDir,
}

impl Controllers {
    /// Starts etcd and the replicas and waits until every replica is ready.
    pub async fn start(config: &ClusterConfig) -> Result<Controllers> {
        let bin = victor_testkit::workspace_binary("victor-controller");
        let etcd = EtcdCluster::start(config.etcd_members).await.context("start etcd")?;
        let dir = tempfile::Builder::new().prefix("victor-faults-").tempdir()?;
        let mut replicas = Vec::with_capacity(config.replicas);
        for i in 0..config.replicas {
            let mut store_links = Vec::new();
            if config.store_link_proxied.contains(&i) {
                for endpoint in etcd.endpoints() {
                    let target: SocketAddr =
                        endpoint.trim_start_matches("http://").parse().context("etcd endpoint address")?;
                    store_links.push(LinkProxy::start(target).await?);
                }
            }
            let endpoints = match store_links.as_slice() {
                [] => etcd.endpoints(),
                links => links.iter().map(LinkProxy::url).collect(),
            };
            let cmd =
                ControllerCommand::new(&bin, &format!("ctl{}", i + 1), MOBILE_PREFIX, ControllerStore::Etcd(endpoints))
                    .log_filter("info")
                    .args(["--session-ttl".to_owned(), format!("{}ms", config.session_ttl.as_millis())])
                    // The churn moves VMs many times: keep flap damping out of the way.
                    .args(["--damping-max-moves", "1000000", "--damping-window", "1s"]);
            replicas.push(Replica { cmd, store_links, child: None, log: PathBuf::new(), runs: 0 });
        }
        let mut cluster = Controllers { replicas, etcd, dir };
        for i in 0..config.replicas {
            cluster.restart(i)?;
        }
        for i in 0..config.replicas {
            cluster.wait_ready(i, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    /// Number of replicas.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether there is no replica.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Logs and data live here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// gRPC address of replica `i`.
    pub fn grpc(&self, i: usize) -> SocketAddr {
        self.replicas[i].cmd.grpc()
    }

    /// HTTP admin address of replica `i`.
    pub fn http(&self, i: usize) -> SocketAddr {
        self.replicas[i].cmd.http()
    }

    /// PID of replica `i` (0 when not running).
    pub fn pid(&self, i: usize) -> u32 {
        self.replicas[i].child.as_ref().map_or(0, ControllerProcess::pid)
    }

    /// (Re)starts replica `i` on its addresses (not waiting for readiness).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let r = &mut self.replicas[i];
        if r.child.as_mut().is_some_and(ControllerProcess::is_running) {
            bail!("replica {} is still running; kill it first", r.cmd.id());
        }
        r.runs += 1;
        r.log = self.dir.path().join(format!("{}.{}.log", r.cmd.id(), r.runs));
        r.child = Some(r.cmd.clone().log_file(&r.log).spawn()?);
        Ok(())
    }

    /// SIGKILLs replica `i` (and its process group), like `kill -9`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.replicas[i].child.take() {
            child.kill();
        }
    }

    /// SIGSTOPs replica `i`.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.signal_replica(i, Signal::SIGSTOP)
    }

    /// SIGCONTs replica `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        self.signal_replica(i, Signal::SIGCONT)
    }

    fn signal_replica(&self, i: usize, signal: Signal) -> Result<()> {
        let child = self.replicas[i].child.as_ref().context("replica is not running")?;
        child.signal(signal)
    }

    /// SIGSTOPs every etcd member: the store is unavailable, every connection stays open.
    pub fn pause_etcd(&self) -> Result<()> {
        self.signal_etcd(Signal::SIGSTOP)
    }

    /// SIGCONTs every etcd member.
    pub fn resume_etcd(&self) -> Result<()> {
        self.signal_etcd(Signal::SIGCONT)
    }

    fn signal_etcd(&self, signal: Signal) -> Result<()> {
        for i in 0..self.etcd.members() {
            let pid = self.etcd.member_pid(i);
            if pid != 0 {
                kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("{signal} etcd member {i}"))?;
            }
        }
        Ok(())
    }

    /// Cuts replica `i`'s links to every etcd member (see [`LinkProxy::partition`]).
    pub fn cut_store_link(&self, i: usize) -> Result<()> {
        let links = &self.replicas[i].store_links;
        if links.is_empty() {
            bail!("replica {i} reaches etcd directly; list it in ClusterConfig::store_link_proxied");
        }
        links.iter().for_each(LinkProxy::partition);
        Ok(())
    }

    /// From now on replica `i`'s requests reach etcd but etcd's answers are lost (see
    /// [`LinkProxy::lose_replies`]): every write's outcome is unknown to the replica.
    pub fn lose_store_replies(&self, i: usize) -> Result<()> {
        let links = &self.replicas[i].store_links;
        if links.is_empty() {
            bail!("replica {i} reaches etcd directly; list it in ClusterConfig::store_link_proxied");
        }
        links.iter().for_each(LinkProxy::lose_replies);
        Ok(())
    }

    /// Restores replica `i`'s links to etcd.
    pub fn heal_store_link(&self, i: usize) {
        self.replicas[i].store_links.iter().for_each(LinkProxy::heal);
    }

    /// GET `path` on replica `i`'s admin port.
    pub async fn get(&self, i: usize, path: &str) -> Result<(u16, String)> {
        victor_testkit::http::get(self.http(i), path).await
    }

    /// One sample of replica `i`'s metrics (0 when absent).
    pub async fn metric(&self, i: usize, name: &str) -> Result<f64> {
        let (code, text) = self.get(i, "/metrics").await?;
        if code != 200 {
            bail!("replica {i} /metrics answered {code}");
        }
        Ok(victor_testkit::http::metric(&text, name, ""))
    }

    /// Waits until replica `i` answers /readyz with 200; returns how long that took.
    pub async fn wait_ready(&self, i: usize, timeout: Duration) -> Result<Duration> {
        self.wait_readyz(i, timeout, |code, _| code == 200).await.map_err(|e| e.context("wait for ready"))
    }

    /// Waits until replica `i`'s /readyz satisfies `accept(code, body)`; returns how long it took.
    pub async fn wait_readyz(
        &self,
        i: usize,
        timeout: Duration,
        accept: impl Fn(u16, &str) -> bool,
    ) -> Result<Duration> {
        let child = self.replicas[i].child.as_ref().with_context(|| format!("replica {i} is not running"))?;
        child.wait_readyz(timeout, accept).await
    }

    /// The end of replica `i`'s current log.
    pub fn log_tail(&self, i: usize) -> String {
        let data = std::fs::read(&self.replicas[i].log).unwrap_or_default();
        let start = data.len().saturating_sub(3000);
        String::from_utf8_lossy(&data[start..]).into_owned()
    }

    /// Lines of replica `i`'s current log that contain `needle`.
    pub fn log_lines(&self, i: usize, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.replicas[i].log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}
