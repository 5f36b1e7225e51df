//! `victor-controller` replicas as real processes, for every rig that needs one: the controller's
//! own integration tests, the namespace lab, the scale benchmark and the fault suite.
//!
//! [`ControllerCommand`] is the command line (store, addresses, flags, TLS, environment, log
//! file); it can be kept and spawned again, so a replica restarted after a kill comes back on the
//! same addresses. [`ControllerCommand::spawn`] starts a [`ControllerProcess`] in its own process
//! group; dropping it SIGKILLs that group (by PID, see [`ChildGuard`]).
//! [`ControllerProcess::wait_ready`] waits for `/readyz` and says how long that took.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nix::sys::signal::Signal;

use crate::ports::free_addr;
use crate::process::ChildGuard;

/// How often readiness is polled (fine enough for the benchmark's cold-start time).
const READY_POLL: Duration = Duration::from_millis(5);
/// Bytes of the log quoted when a replica does not become ready.
const LOG_TAIL_BYTES: usize = 3000;

/// Where a replica keeps its state.
#[derive(Debug, Clone)]
pub enum ControllerStore {
    /// The embedded single-file store in this data dir (one replica only).
    Embedded(PathBuf),
    /// etcd at these client URLs.
    Etcd(Vec<String>),
}

/// The command line of one controller replica.
#[derive(Debug, Clone)]
pub struct ControllerCommand {
    bin: PathBuf,
    id: String,
    mobile_prefix: String,
    store: ControllerStore,
    grpc: SocketAddr,
    http: SocketAddr,
    log_filter: Option<String>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log_file: Option<PathBuf>,
}

impl ControllerCommand {
    /// Replica `id` of the binary `bin`, serving `mobile_prefix` from `store`, on free loopback
    /// ports for gRPC and HTTP.
    pub fn new(bin: impl Into<PathBuf>, id: &str, mobile_prefix: &str, store: ControllerStore) -> Self {
        ControllerCommand {
            bin: bin.into(),
            id: id.to_owned(),
            mobile_prefix: mobile_prefix.to_owned(),
            store,
            grpc: free_addr(),
            http: free_addr(),
            log_filter: None,
            args: Vec::new(),
            env: Vec::new(),
            log_file: None,
        }
    }

    /// gRPC on `addr` (default: a free loopback port).
    pub fn grpc_addr(mut self, addr: SocketAddr) -> Self {
        self.grpc = addr;
        self
    }

    /// HTTP admin on `addr` (default: a free loopback port).
    pub fn http_addr(mut self, addr: SocketAddr) -> Self {
        self.http = addr;
        self
    }

    /// `--log <filter>` (default: the controller's own default).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.to_owned());
        self
    }

    /// Further flags, after the ones this builder writes.
    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// TLS towards etcd: the CA of the etcd servers, and optionally a client certificate and key.
    pub fn etcd_tls(self, ca: &Path, client: Option<(&Path, &Path)>) -> Self {
        let mut args: Vec<OsString> = vec!["--etcd-ca-file".into(), ca.into()];
        if let Some((cert, key)) = client {
            args.extend(["--etcd-cert-file".into(), cert.into(), "--etcd-key-file".into(), key.into()]);
        }
        self.args(args)
    }

    /// TLS on the gRPC port with this certificate and key; with `client_ca`, agents must present
    /// a client certificate signed by it.
    pub fn grpc_tls(self, cert: &Path, key: &Path, client_ca: Option<&Path>) -> Self {
        let mut args: Vec<OsString> = vec!["--tls-cert-file".into(), cert.into(), "--tls-key-file".into(), key.into()];
        if let Some(ca) = client_ca {
            args.extend(["--tls-client-ca-file".into(), ca.into()]);
        }
        self.args(args)
    }

    /// Sets an environment variable of the process (e.g. `VICTOR_*` settings).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Writes the process's stdout and stderr to `path` (default: discarded).
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// The replica id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The gRPC address.
    pub fn grpc(&self) -> SocketAddr {
        self.grpc
    }

    /// The HTTP admin address.
    pub fn http(&self) -> SocketAddr {
        self.http
    }

    /// The full argument list (without the binary).
    pub fn argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![
            "--mobile-prefix".into(),
            self.mobile_prefix.clone().into(),
            "--replica-id".into(),
            self.id.clone().into(),
            "--grpc-listen".into(),
            self.grpc.to_string().into(),
            "--http-listen".into(),
            self.http.to_string().into(),
        ];
        match &self.store {
            ControllerStore::Embedded(dir) => argv.extend(["--data-dir".into(), dir.into()]),
            ControllerStore::Etcd(endpoints) => argv.extend(["--etcd-endpoints".into(), endpoints.join(",").into()]),
        }
        if let Some(filter) = &self.log_filter {
            argv.extend(["--log".into(), filter.into()]);
        }
        argv.extend(self.args.iter().cloned());
        argv
    }

    /// Starts the process (not waiting for readiness).
    pub fn spawn(&self) -> Result<ControllerProcess> {
        if !self.bin.exists() {
            bail!(
                "controller binary {} not found; build it first (cargo build --workspace --bins)",
                self.bin.display()
            );
        }
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.argv()).envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = ChildGuard::spawn(format!("controller-{}", self.id), cmd, self.log_file.as_deref())?;
        Ok(ControllerProcess {
            id: self.id.clone(),
            grpc: self.grpc,
            http: self.http,
            log: self.log_file.clone(),
            child,
        })
    }

    /// Starts the process and waits until it is ready (at most `timeout`).
    pub async fn start(&self, timeout: Duration) -> Result<ControllerProcess> {
        let process = self.spawn()?;
        process.wait_ready(timeout).await?;
        Ok(process)
    }
}

/// A running replica; dropping it kills the process group.
#[derive(Debug)]
pub struct ControllerProcess {
    id: String,
    grpc: SocketAddr,
    http: SocketAddr,
    log: Option<PathBuf>,
    child: ChildGuard,
}

impl ControllerProcess {
    /// The replica id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The gRPC address.
    pub fn grpc(&self) -> SocketAddr {
        self.grpc
    }

    /// `http://<grpc>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The HTTP admin address.
    pub fn http(&self) -> SocketAddr {
        self.http
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The log file, if one was given.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The last `max_bytes` of the log.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        self.child.log_tail(max_bytes)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Sends `signal` to the process (SIGSTOP / SIGCONT to pause it).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.child.signal(signal)
    }

    /// SIGKILLs the process group, like `kill -9`.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// SIGTERM, then SIGKILL after `timeout`. Returns the exit status if the process exited on
    /// its own within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.child.stop(timeout)
    }

    /// Lets the process outlive this value; returns its PID, which the caller must record to
    /// stop it later.
    pub fn detach(self) -> u32 {
        self.child.detach()
    }

    /// GETs `path` from the admin port.
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        crate::http::get(self.http, path).await
    }

    /// Waits until `/readyz` answers 200; returns how long that took.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Duration> {
        self.wait_readyz(timeout, |code, _| code == 200).await
    }

    /// Waits until `/readyz` satisfies `accept(code, body)`; returns how long that took. The error
    /// names the last answer and quotes the end of the log.
    pub async fn wait_readyz(&self, timeout: Duration, accept: impl Fn(u16, &str) -> bool) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let last = match self.get("/readyz").await {
                Ok((code, body)) if accept(code, &body) => return Ok(started.elapsed()),
                Ok((code, body)) => format!("{code} {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > timeout {
                let log = self.log.as_ref().map_or("(no log file)".into(), |p| p.display().to_string());
                bail!(
                    "controller {} /readyz still answers {last:?} after {timeout:?}; log {log}, tail:\n{}",
                    self.id,
                    self.log_tail(LOG_TAIL_BYTES)
                );
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn the_command_line_names_store_addresses_tls_and_extra_flags() {
        let grpc: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let etcd = ControllerStore::Etcd(vec!["https://127.0.0.1:1".into(), "https://127.0.0.1:2".into()]);
        let cmd = ControllerCommand::new("/bin/victor-controller", "r1", "10.10.0.0/16", etcd)
            .grpc_addr(grpc)
            .log_filter("warn")
            .etcd_tls(Path::new("/pki/ca.pem"), Some((Path::new("/pki/c.pem"), Path::new("/pki/c.key"))))
            .args(["--session-ttl", "3s"]);
        let argv = text(cmd.argv());
        let http = cmd.http().to_string();
        let expected = [
            "--mobile-prefix",
            "10.10.0.0/16",
            "--replica-id",
            "r1",
            "--grpc-listen",
            "127.0.0.1:7001",
            "--http-listen",
            &http,
            "--etcd-endpoints",
            "https://127.0.0.1:1,https://127.0.0.1:2",
            "--log",
            "warn",
            "--etcd-ca-file",
            "/pki/ca.pem",
            "--etcd-cert-file",
            "/pki/c.pem",
            "--etcd-key-file",
            "/pki/c.key",
            "--session-ttl",
            "3s",
        ];
        assert_eq!(argv, expected);

        let embedded = ControllerStore::Embedded("/data".into());
        let argv = text(
            ControllerCommand::new("/bin/victor-controller", "r2", "10.0.0.0/8", embedded)
                .grpc_tls(Path::new("/pki/s.pem"), Path::new("/pki/s.key"), None)
                .argv(),
        );
        assert_eq!(&argv[8..10], ["--data-dir", "/data"]);
        assert_eq!(&argv[10..], ["--tls-cert-file", "/pki/s.pem", "--tls-key-file", "/pki/s.key"]);
        assert!(!argv.contains(&"--log".to_owned()), "no --log unless asked");
    }

    #[test]
    fn a_missing_binary_is_named() {
        let cmd = ControllerCommand::new(
            "/nonexistent/victor-controller",
            "r1",
            "10.10.0.0/16",
            ControllerStore::Etcd(vec![]),
        );
        let err = cmd.spawn().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/victor-controller") && err.contains("cargo build"), "{err}");
    }
}
