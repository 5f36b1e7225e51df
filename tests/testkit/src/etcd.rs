//! Real etcd clusters for tests: 1 or 3 members of Debian's `/usr/bin/etcd` (3.4) on loopback.
//!
//! [`EtcdCluster::start`] launches the members with unique names, free ports, data dirs in a temp
//! dir on tmpfs and fast elections, then waits until every member answers and agrees on a leader.
//! Members can be SIGKILLed ([`EtcdCluster::kill_member`]) and restarted on the same data dir
//! ([`EtcdCluster::restart_member`]). Dropping the cluster kills every member and deletes the
//! temp dir. Cluster state (health, leader) is read with `etcdctl endpoint status -w json`
//! (Debian's etcd-client package), so it works the same with and without TLS.
//!
//! etcd 3.4 pitfalls met while writing this:
//! * there is no `--unsafe-no-fsync` (3.5+); tmpfs data dirs make fsync cheap instead;
//! * the default `capnslog` logger is noisy and deprecated: use `--logger zap --log-outputs stderr`;
//! * the minimum lease TTL is 1.5 election timeouts (rounded up to whole seconds), so with the
//!   default 1 s election timeout a 1 s lease silently becomes 2 s; with our 100 ms it stays 1 s;
//! * lease expiry is checked by the leader about every 500 ms: keys vanish up to ~0.5 s after
//!   the TTL; and without `--experimental-enable-lease-checkpoint` a leader change resets every
//!   lease's remaining TTL to its full TTL;
//! * watch progress notifications come every 10 minutes unless
//!   `--experimental-watch-progress-notify-interval` is lowered (we default to 500 ms here);
//! * a restarted member must keep its `--initial-cluster` flags, but they are ignored once the
//!   data dir holds a WAL, so restarting with the original command line is correct.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::ports::free_port;
use crate::process::ChildGuard;

/// The etcd binary (Debian's etcd-server package).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// The etcdctl binary (Debian's etcd-client package).
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// How long [`EtcdCluster::start`] and [`EtcdCluster::restart_member`] wait for health.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);

/// PEM material for a TLS cluster (client port only; peers talk plain HTTP on loopback).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA certificate that signed the server (and client) certificates.
    pub ca_cert_pem: String,
    /// Server certificate, valid for `127.0.0.1`.
    pub server_cert_pem: String,
    /// Server private key.
    pub server_key_pem: String,
    /// Client certificate and key; when set, the server requires client certificates
    /// (`--client-cert-auth`) and etcdctl presents this one.
    pub client: Option<(String, String)>,
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// 1 or 3.
    pub members: usize,
    /// Serve clients over TLS.
    pub tls: Option<EtcdTls>,
    /// `--experimental-watch-progress-notify-interval`.
    pub progress_notify_interval: Duration,
    /// Extra environment of every member (e.g. `GOMAXPROCS` for members pinned to fewer CPUs
    /// than the host has: Go sizes its scheduler from the CPUs it sees at start).
    pub env: Vec<(String, String)>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions { members: 1, tls: None, progress_notify_interval: Duration::from_millis(500), env: Vec::new() }
    }
}

/// Paths of the TLS files written into the cluster's temp dir.
#[derive(Debug)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    /// Restarts so far (each run logs to its own file).
    runs: u32,
    process: Option<ChildGuard>,
}

/// A running etcd cluster owned by a test.
#[derive(Debug)]
pub struct EtcdCluster {
    // Members first: they are killed before the temp dir is removed.
    members: Vec<Member>,
    options: EtcdOptions,
    tls: Option<TlsFiles>,
    initial_cluster: String,
    scheme: &'static str,
    dir: tempfile::TempDir,
}

/// What one member says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's id.
    pub member_id: u64,
    /// The leader's id as this member sees it (0 = none).
    pub leader_id: u64,
    /// The store revision.
    pub revision: u64,
    /// The raft term.
    pub raft_term: u64,
}

impl EtcdCluster {
    /// Starts a plain-HTTP cluster of `members` (1 or 3) and waits until it is healthy.
    pub async fn start(members: usize) -> Result<EtcdCluster> {
        Self::start_with(EtcdOptions { members, ..EtcdOptions::default() }).await
    }

    /// Starts a cluster as described by `options` and waits until it is healthy. Retries with
    /// new ports if a port was taken between picking and binding it.
    pub async fn start_with(options: EtcdOptions) -> Result<EtcdCluster> {
        if !(options.members == 1 || options.members == 3) {
            bail!("an etcd test cluster has 1 or 3 members, not {}", options.members);
        }
        if !Path::new(ETCD_BIN).exists() {
            bail!("{ETCD_BIN} not found: install Debian's etcd-server package");
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cluster = Self::launch(options.clone())?;
            match cluster.wait_healthy(HEALTH_TIMEOUT).await {
                Ok(()) => return Ok(cluster),
                Err(e) if attempt < 3 && cluster.logs_mention("address already in use") => {
                    tracing::warn!("etcd port collision, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn launch(options: EtcdOptions) -> Result<EtcdCluster> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new().prefix("victor-etcd-").tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("victor-etcd-").tempdir()
        }
        .context("create etcd temp dir")?;
        let tag = crate::unique_name("e");
        let members: Vec<Member> = (0..options.members)
            .map(|i| Member {
                name: format!("{tag}-m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                runs: 0,
                process: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let tls = options.tls.as_ref().map(|tls| write_tls_files(dir.path(), tls)).transpose()?;
        let mut cluster = EtcdCluster {
            members,
            scheme: if tls.is_some() { "https" } else { "http" },
            options,
            tls,
            initial_cluster,
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn_member(i)?;
        }
        Ok(cluster)
    }

    fn spawn_member(&mut self, i: usize) -> Result<()> {
        let client_url = format!("{}://127.0.0.1:{}", self.scheme, self.members[i].client_port);
        let m = &mut self.members[i];
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(ETCD_BIN);
        cmd.envs(self.options.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            // 5× faster than etcd's defaults (100/1000 ms) so a leader kill heals quickly, yet
            // long enough that a loaded 2-core CI machine does not start spurious elections
            // (with 10/100 ms one stalled heartbeat re-elected, failing in-flight writes).
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"])
            .arg(format!(
                "--experimental-watch-progress-notify-interval={}ms",
                self.options.progress_notify_interval.as_millis()
            ))
            // Keep the test's etcd small and quiet: no metrics listener, no v2 store.
            .args(["--enable-v2=false", "--snapshot-count", "10000"]);
        // The cluster token must be the same on every member.
        let token = self.members[0].name.clone();
        let m = &mut self.members[i];
        cmd.args(["--initial-cluster-token", &token]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key).arg("--trusted-ca-file").arg(&tls.ca);
            if tls.client.is_some() {
                cmd.arg("--client-cert-auth");
            }
        }
        // etcd 3.4 insists on a 0700 data dir.
        std::fs::create_dir_all(&m.data_dir)?;
        std::fs::set_permissions(&m.data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let log = if m.runs == 0 { m.log.clone() } else { m.log.with_extension(format!("restart{}.log", m.runs)) };
        m.runs += 1;
        m.process = Some(ChildGuard::spawn(m.name.clone(), cmd, Some(&log))?);
        Ok(())
    }

    /// Number of members (running or not).
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Client URL of member `i`.
    pub fn member_endpoint(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.members[i].client_port)
    }

    /// Client URLs of every member (also the ones currently killed).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.member_endpoint(i)).collect()
    }

    /// Whether member `i` is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i].process.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// PID of member `i` (0 when killed).
    pub fn member_pid(&self, i: usize) -> u32 {
        self.members[i].process.as_ref().map_or(0, ChildGuard::pid)
    }

    /// SIGKILLs member `i` (its data dir stays for [`Self::restart_member`]).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    /// Restarts a killed member on its data dir and waits until the cluster is healthy again
    /// (the member rejoined and a leader exists).
    pub async fn restart_member(&mut self, i: usize) -> Result<()> {
        if self.is_running(i) {
            bail!("etcd member {i} is still running; kill it first");
        }
        self.spawn_member(i)?;
        self.wait_healthy(HEALTH_TIMEOUT).await
    }

    /// Status of member `i` via `etcdctl endpoint status`.
    pub async fn member_status(&self, i: usize) -> Result<MemberStatus> {
        let out = self.etcdctl(&self.member_endpoint(i), &["endpoint", "status", "-w", "json"]).await?;
        parse_status(&out).with_context(|| format!("parse etcdctl status of member {i}: {out}"))
    }

    /// Index of the current leader, as seen by the running members (they must agree).
    pub async fn leader_index(&self) -> Result<usize> {
        let statuses = self.running_statuses().await?;
        leader_of(&statuses).with_context(|| format!("no agreed leader: {statuses:?}"))
    }

    /// Waits until every running member answers and they agree on a leader that is one of them.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err;
        loop {
            let dead: Vec<usize> =
                (0..self.members.len()).filter(|&i| self.members[i].process.is_some() && !self.is_running(i)).collect();
            if !dead.is_empty() {
                bail!("etcd member(s) {dead:?} exited during start-up\n{}", self.log_tails(2000));
            }
            match self.running_statuses().await {
                Ok(statuses) => match leader_of(&statuses) {
                    Some(_) => return Ok(()),
                    None => last_err = format!("no agreed leader yet: {statuses:?}"),
                },
                Err(e) => last_err = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!("etcd cluster not healthy after {timeout:?}: {last_err}\n{}", self.log_tails(2000));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `(index, status)` of every running member; fails if one does not answer.
    async fn running_statuses(&self) -> Result<Vec<(usize, MemberStatus)>> {
        let running: Vec<usize> = (0..self.members.len()).filter(|&i| self.members[i].process.is_some()).collect();
        let mut statuses = Vec::with_capacity(running.len());
        for i in running {
            statuses.push((i, self.member_status(i).await?));
        }
        Ok(statuses)
    }

    /// Runs etcdctl (v3 API) against `endpoint` with the cluster's TLS files, returns stdout.
    pub async fn etcdctl(&self, endpoint: &str, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new(ETCDCTL_BIN);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args)
            .kill_on_drop(true);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if let Some((cert, key)) = &tls.client {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        let out = cmd.output().await.context("run etcdctl")?;
        if !out.status.success() {
            bail!("etcdctl {args:?} against {endpoint} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The last `max_bytes` of every member's current log, for failure messages.
    pub fn log_tails(&self, max_bytes: usize) -> String {
        let mut s = String::new();
        for m in &self.members {
            let tail = m.process.as_ref().map(|p| p.log_tail(max_bytes)).unwrap_or_else(|| "(not running)".into());
            let _ = writeln!(s, "--- {} log tail ---\n{tail}", m.name);
        }
        s
    }

    fn logs_mention(&self, needle: &str) -> bool {
        self.members.iter().filter_map(|m| m.process.as_ref()).any(|p| p.log_tail(64 * 1024).contains(needle))
    }

    /// The temp dir holding data dirs, logs and TLS files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl EtcdCluster {
    /// Lets the cluster outlive this value (`victor-lab up`): returns the members' PIDs and the
    /// data directory, which the caller must record to stop and remove them later.
    pub fn detach(mut self) -> (Vec<u32>, PathBuf) {
        let pids = self.members.iter_mut().filter_map(|m| m.process.take()).map(ChildGuard::detach).collect();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir")).keep();
        (pids, dir)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.process.take() {
                p.kill();
            }
        }
    }
}

fn write_tls_files(dir: &Path, tls: &EtcdTls) -> Result<TlsFiles> {
    let write = |name: &str, pem: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    Ok(TlsFiles {
        ca: write("ca.pem", &tls.ca_cert_pem)?,
        cert: write("server.pem", &tls.server_cert_pem)?,
        key: write("server-key.pem", &tls.server_key_pem)?,
        client: tls
            .client
            .as_ref()
            .map(|(cert, key)| -> Result<_> { Ok((write("client.pem", cert)?, write("client-key.pem", key)?)) })
            .transpose()?,
    })
}

/// Parses `etcdctl endpoint status -w json` for one endpoint.
fn parse_status(json: &str) -> Result<MemberStatus> {
    let v: Value = serde_json::from_str(json)?;
    let st = v.get(0).and_then(|e| e.get("Status")).context("no Status in etcdctl output")?;
    let u = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let header = st.get("header");
    Ok(MemberStatus {
        member_id: u(header.and_then(|h| h.get("member_id"))),
        leader_id: u(st.get("leader")),
        revision: u(header.and_then(|h| h.get("revision"))),
        raft_term: u(st.get("raftTerm")),
    })
}

/// The index of the leader every member agrees on, if it is one of them.
fn leader_of(statuses: &[(usize, MemberStatus)]) -> Option<usize> {
    let leader = statuses.first()?.1.leader_id;
    if leader == 0 || statuses.iter().any(|(_, s)| s.leader_id != leader) {
        return None;
    }
    statuses.iter().find(|(_, s)| s.member_id == leader).map(|(i, _)| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcdctl_status() {
        let json = r#"[{"Endpoint":"http://127.0.0.1:23791","Status":{"header":{"cluster_id":15118495548433857066,"member_id":13668033151171901709,"revision":7,"raft_term":2},"version":"3.4.23","dbSize":32768,"leader":13668033151171901709,"raftIndex":4,"raftTerm":2}}]"#;
        let s = parse_status(json).unwrap();
        assert_eq!(s.member_id, 13668033151171901709);
        assert_eq!(s.leader_id, s.member_id);
        assert_eq!(s.revision, 7);
        assert_eq!(s.raft_term, 2);
    }

    #[test]
    fn leader_needs_agreement() {
        let st = |m, l| MemberStatus { member_id: m, leader_id: l, revision: 1, raft_term: 1 };
        assert_eq!(leader_of(&[(0, st(1, 2)), (1, st(2, 2))]), Some(1));
        assert_eq!(leader_of(&[(0, st(1, 2)), (1, st(2, 1))]), None);
        assert_eq!(leader_of(&[(0, st(1, 0))]), None);
        // The agreed leader was killed (not among the answering members).
        assert_eq!(leader_of(&[(0, st(1, 3)), (1, st(2, 3))]), None);
    }

    #[tokio::test]
    async fn three_members_survive_leader_kill_and_restart() {
        let mut c = EtcdCluster::start(3).await.unwrap();
        assert_eq!(c.endpoints().len(), 3);
        let leader = c.leader_index().await.unwrap();
        c.kill_member(leader);
        assert!(!c.is_running(leader));
        c.wait_healthy(HEALTH_TIMEOUT).await.unwrap();
        let new_leader = c.leader_index().await.unwrap();
        assert_ne!(new_leader, leader, "a killed member cannot stay leader");
        c.restart_member(leader).await.unwrap();
        let st = c.member_status(leader).await.unwrap();
        assert_ne!(st.leader_id, 0, "restarted member rejoined: {st:?}");
        let dir = c.dir().to_path_buf();
        let pids: Vec<u32> = (0..3).map(|i| c.member_pid(i)).collect();
        drop(c);
        assert!(!dir.exists(), "temp dir removed on drop");
        for pid in pids {
            let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
            assert!(!alive, "etcd pid {pid} still alive after drop");
        }
    }
}
