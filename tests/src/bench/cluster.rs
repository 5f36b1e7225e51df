//! The system under test: a real etcd cluster (or none: the embedded store) and real
//! `victor-controller` processes, each with its own ports, data dir and log in a temp dir that
//! is removed (and every process killed, by PID) when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use victor_testkit::controller::{ControllerCommand, ControllerProcess, ControllerStore};
use victor_testkit::etcd::{EtcdCluster, EtcdOptions};

/// The mobile prefix the benchmark binds VMs in (room for 16 M bindings).
pub const MOBILE_PREFIX: &str = "10.0.0.0/8";

/// etcd (if any) and the controller replicas.
pub struct Cluster {
    /// The replicas, in start order.
    pub replicas: Vec<ControllerProcess>,
    /// The etcd cluster (`None`: embedded store).
    pub etcd: Option<EtcdCluster>,
    controller_bin: PathBuf,
    /// Environment of every replica started ([`Cluster::spawn`]).
    replica_env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts etcd with `members` (0 = embedded store) and `etcd_env` in their environment, and
    /// `replicas` controllers with `replica_env` in theirs, and waits until every replica is
    /// ready.
    pub async fn start(
        members: usize,
        replicas: usize,
        controller_bin: PathBuf,
        replica_env: Vec<(String, String)>,
        etcd_env: Vec<(String, String)>,
    ) -> Result<Cluster> {
        if !matches!(members, 0 | 1 | 3) {
            bail!("--etcd-members must be 0 (embedded store), 1 or 3, not {members}");
        }
        if members == 0 && replicas != 1 {
            bail!("the embedded store serves a single controller replica; use --replicas 1 with --etcd-members 0");
        }
        if !controller_bin.exists() {
            bail!(
                "controller binary {} not found; build it first (cargo build --release -p victor-controller) or pass --controller-bin",
                controller_bin.display()
            );
        }
        let etcd = match members {
            0 => None,
            n => Some(
                EtcdCluster::start_with(EtcdOptions { members: n, env: etcd_env, ..EtcdOptions::default() })
                    .await
                    .with_context(|| format!("start a {n}-member etcd"))?,
            ),
        };
        let dir = tempfile::Builder::new().prefix("victor-bench-").tempdir()?;
        let mut cluster = Cluster { replicas: Vec::new(), etcd, controller_bin, replica_env, dir };
        for i in 0..replicas {
            let replica = cluster.spawn(&format!("bench-r{}", i + 1))?;
            replica.wait_ready(Duration::from_secs(60)).await?;
            cluster.replicas.push(replica);
        }
        Ok(cluster)
    }

    /// The logs and data dirs live here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a replica process (not waiting for readiness). With the embedded store the data
    /// dir is shared by id, so a restarted replica reopens the same file.
    pub fn spawn(&self, id: &str) -> Result<ControllerProcess> {
        let store = match &self.etcd {
            Some(etcd) => ControllerStore::Etcd(etcd.endpoints()),
            None => ControllerStore::Embedded(self.dir.path().join("embedded")),
        };
        let log = self.dir.path().join(format!("{id}-{}.log", victor_testkit::unique_name("l")));
        let command = ControllerCommand::new(&self.controller_bin, id, MOBILE_PREFIX, store);
        let command = self.replica_env.iter().fold(command, |c, (k, v)| c.env(k, v));
        command
            .log_filter("warn")
            // Churn moves every VM many times: keep flap damping out of the measurement.
            .args(["--damping-max-moves", "1000000", "--damping-window", "1s"])
            .log_file(log)
            .spawn()
    }

    /// PIDs of the running etcd members.
    pub fn etcd_pids(&mut self) -> Vec<u32> {
        let Some(etcd) = self.etcd.as_mut() else { return Vec::new() };
        let running: Vec<usize> = (0..etcd.members()).filter(|&i| etcd.is_running(i)).collect();
        running.into_iter().map(|i| etcd.member_pid(i)).collect()
    }
}
