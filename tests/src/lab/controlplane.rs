//! The lab's control plane: etcd (none = embedded store, 1 or 3 members) and controller replicas,
//! as real processes on the host's loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::{Binding, GetBindingRequest};
use victor_testkit::etcd::EtcdCluster;
use victor_testkit::ports::free_addr;
use victor_testkit::process::ChildGuard;

use super::topology::MOBILE;

/// One controller replica process.
pub struct Replica {
    /// The process (None after a kill).
    pub guard: Option<ChildGuard>,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP admin address.
    pub http: SocketAddr,
    /// Log file.
    pub log: PathBuf,
}

impl Replica {
    /// `http://<grpc>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// etcd and the controller replicas. Field order is drop order: replicas before etcd.
pub struct ControlPlane {
    /// The replicas.
    pub replicas: Vec<Replica>,
    /// The etcd cluster (None = embedded store).
    pub etcd: Option<EtcdCluster>,
    client: std::sync::OnceLock<BindingServiceClient<tonic::transport::Channel>>,
}

impl ControlPlane {
    /// Starts `etcd_members` (0 = embedded store) and `replicas` controllers (1 with the embedded
    /// store), logs and data in `dir`. `extra` flags go to every controller.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        etcd_members: usize,
        replicas: usize,
        extra: &[&str],
    ) -> Result<ControlPlane> {
        let etcd = match etcd_members {
            0 => None,
            1 | 3 => Some(EtcdCluster::start(etcd_members).await.context("start etcd")?),
            n => bail!("--etcd-members must be 0 (embedded store), 1 or 3, not {n}"),
        };
        if etcd.is_none() && replicas != 1 {
            bail!("the embedded store serves exactly one controller replica; use --etcd-members 1 or 3 for {replicas}");
        }
        let mut plane = ControlPlane { replicas: Vec::new(), etcd, client: std::sync::OnceLock::new() };
        for r in 1..=replicas {
            let grpc = free_addr();
            let http = free_addr();
            let log = dir.join(format!("controller{r}.log"));
            let mut cmd = Command::new(bin);
            cmd.args(["--mobile-prefix", MOBILE, "--replica-id", &format!("ctl{r}")])
                .arg("--grpc-listen")
                .arg(grpc.to_string())
                .arg("--http-listen")
                .arg(http.to_string())
                .args(extra);
            match &plane.etcd {
                Some(etcd) => cmd.arg("--etcd-endpoints").arg(etcd.endpoints().join(",")),
                None => cmd.arg("--data-dir").arg(dir.join("store")),
            };
            let guard = ChildGuard::spawn(format!("controller{r}"), cmd, Some(&log))?;
            plane.replicas.push(Replica { guard: Some(guard), grpc, http, log });
        }
        for replica in &plane.replicas {
            let http = replica.http;
            victor_testkit::process::wait_for("controller /readyz", Duration::from_secs(30), || async move {
                matches!(victor_testkit::http::get(http, "/readyz").await, Ok((200, _))).then_some(())
            })
            .await
            .with_context(|| format!("controller not ready; log {}", replica.log.display()))?;
        }
        Ok(plane)
    }

    /// Every replica's gRPC URL.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(Replica::url).collect()
    }

    /// A client of replica 1 (one connection, reused).
    pub async fn client(&self) -> Result<BindingServiceClient<tonic::transport::Channel>> {
        if let Some(client) = self.client.get() {
            return Ok(client.clone());
        }
        let client = BindingServiceClient::connect(self.replicas[0].url()).await?;
        Ok(self.client.get_or_init(|| client).clone())
    }

    /// The binding of `ip` through replica 1 (None = NOT_FOUND).
    pub async fn binding(&self, ip: std::net::Ipv4Addr) -> Result<Option<Binding>> {
        let mut client = self.client().await?;
        match client.get_binding(GetBindingRequest { vm_ip: ip.to_string() }).await {
            Ok(b) => Ok(Some(b.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => bail!("GetBinding({ip}): {s}"),
        }
    }

    /// Waits until `ip` is bound to `fe_id`.
    pub async fn wait_bound(&self, ip: std::net::Ipv4Addr, fe_id: &str, timeout: Duration) -> Result<Binding> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(b) = self.binding(ip).await?
                && b.fe_id == fe_id
            {
                return Ok(b);
            }
            if std::time::Instant::now() > deadline {
                bail!("{ip} not bound to {fe_id} after {timeout:?} (now {:?})", self.binding(ip).await?);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
