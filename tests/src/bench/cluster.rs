//! The system under test: a real etcd cluster (or none: the embedded store) and real
//! `victor-controller` processes, each with its own ports, data dir and log in a temp dir that
//! is removed (and every process killed, by PID) when the cluster is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use victor_testkit::etcd::EtcdCluster;
use victor_testkit::ports::free_addr;
use victor_testkit::process::ChildGuard;

/// The mobile prefix the benchmark binds VMs in (room for 16 M bindings).
pub const MOBILE_PREFIX: &str = "10.0.0.0/8";

/// One controller process.
pub struct Replica {
    /// Replica id.
    pub id: String,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP admin address.
    pub http: SocketAddr,
    child: ChildGuard,
}

impl Replica {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Stops the process (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.child.stop(Duration::from_secs(10));
    }

    /// The end of its log (for error messages).
    pub fn log_tail(&self) -> String {
        self.child.log_tail(2000)
    }
}

/// etcd (if any) and the controller replicas.
pub struct Cluster {
    /// The replicas, in start order.
    pub replicas: Vec<Replica>,
    /// The etcd cluster (`None`: embedded store).
    pub etcd: Option<EtcdCluster>,
    controller_bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts etcd with `members` (0 = embedded store) and `replicas` controllers, and waits
    /// until every replica is ready.
    pub async fn start(members: usize, replicas: usize, controller_bin: PathBuf) -> Result<Cluster> {
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
            n => Some(EtcdCluster::start(n).await.with_context(|| format!("start a {n}-member etcd"))?),
        };
        let dir = tempfile::Builder::new().prefix("victor-bench-").tempdir()?;
        let mut cluster = Cluster { replicas: Vec::new(), etcd, controller_bin, dir };
        for i in 0..replicas {
            let replica = cluster.spawn(&format!("bench-r{}", i + 1))?;
            wait_ready(&replica, Duration::from_secs(60)).await?;
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
    pub fn spawn(&self, id: &str) -> Result<Replica> {
        let grpc = free_addr();
        let http = free_addr();
        let mut cmd = Command::new(&self.controller_bin);
        cmd.args(["--mobile-prefix", MOBILE_PREFIX, "--replica-id", id, "--log", "warn"])
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            // Churn moves every VM many times: keep flap damping out of the measurement.
            .args(["--damping-max-moves", "1000000", "--damping-window", "1s"]);
        match &self.etcd {
            Some(etcd) => {
                cmd.arg("--etcd-endpoints").arg(etcd.endpoints().join(","));
            }
            None => {
                cmd.arg("--data-dir").arg(self.dir.path().join("embedded"));
            }
        }
        let log = self.dir.path().join(format!("{id}-{}.log", victor_testkit::unique_name("l")));
        let child = ChildGuard::spawn(format!("controller-{id}"), cmd, Some(&log))?;
        Ok(Replica { id: id.to_owned(), grpc, http, child })
    }

    /// PIDs of the running etcd members.
    pub fn etcd_pids(&mut self) -> Vec<u32> {
        let Some(etcd) = self.etcd.as_mut() else { return Vec::new() };
        let running: Vec<usize> = (0..etcd.members()).filter(|&i| etcd.is_running(i)).collect();
        running.into_iter().map(|i| etcd.member_pid(i)).collect()
    }
}

/// Waits until the replica's /readyz answers 200; returns how long that took.
pub async fn wait_ready(replica: &Replica, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = victor_testkit::http::get(replica.http, "/readyz").await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("controller {} not ready within {timeout:?}; log tail:\n{}", replica.id, replica.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
