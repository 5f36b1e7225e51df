//! The lab's control plane: etcd (none = embedded store, 1 or 3 members) and controller replicas,
//! as real processes on the host's loopback.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::{AnnounceMigrationRequest, Binding, GetBindingRequest};
use victor_testkit::controller::{ControllerCommand, ControllerProcess, ControllerStore};
use victor_testkit::etcd::EtcdCluster;

use super::addressing::MOBILE;

/// etcd and the controller replicas. Field order is drop order: replicas before etcd.
pub struct ControlPlane {
    /// The replicas (ids `ctl1`, `ctl2`, ...).
    pub replicas: Vec<ControllerProcess>,
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
        let store = match &etcd {
            Some(etcd) => ControllerStore::Etcd(etcd.endpoints()),
            None => ControllerStore::Embedded(dir.join("store")),
        };
        let mut plane = ControlPlane { replicas: Vec::new(), etcd, client: std::sync::OnceLock::new() };
        for r in 1..=replicas {
            let cmd = ControllerCommand::new(bin, &format!("ctl{r}"), MOBILE, store.clone())
                .args(extra)
                .log_file(dir.join(format!("controller{r}.log")));
            plane.replicas.push(cmd.spawn()?);
        }
        for replica in &plane.replicas {
            replica.wait_ready(Duration::from_secs(30)).await?;
        }
        Ok(plane)
    }

    /// Every replica's gRPC URL.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(ControllerProcess::url).collect()
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
    pub async fn binding(&self, ip: impl Into<std::net::IpAddr>) -> Result<Option<Binding>> {
        let ip: std::net::IpAddr = ip.into();
        let mut client = self.client().await?;
        match client.get_binding(GetBindingRequest { vm_ip: ip.to_string() }).await {
            Ok(b) => Ok(Some(b.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => bail!("GetBinding({ip}): {s}"),
        }
    }

    /// Announces, as an orchestrator does before it starts a migration, that the VM with
    /// addresses `ips` is about to move to FE `target_fe`: AnnounceMigration without commit for
    /// each address, through replica 1 (the binding stays where it is, with `pending_fe_id` set,
    /// until the VM shows up at `target_fe`). Fails with the controller's answer (its code and
    /// message) at the first address refused, or if the binding does not name `target_fe` after.
    /// Returns the store revision of the last announcement (an agent that applied it knows).
    pub async fn announce_migration(&self, ips: &[std::net::IpAddr], target_fe: &str) -> Result<u64> {
        let mut client = self.client().await?;
        let mut revision = 0;
        for ip in ips {
            let request = AnnounceMigrationRequest {
                vm_ip: ip.to_string(),
                target_fe_id: target_fe.to_owned(),
                commit: false,
                ttl_seconds: 0,
            };
            let answer = client.announce_migration(request).await.map_err(|s| {
                anyhow::anyhow!(
                    "AnnounceMigration({ip} to {target_fe}, no commit) refused: {:?}: {}",
                    s.code(),
                    s.message()
                )
            })?;
            let binding = answer.into_inner().binding.unwrap_or_default();
            revision = revision.max(binding.revision);
            let pending = binding.pending_fe_id;
            if pending != target_fe {
                bail!(
                    "AnnounceMigration({ip} to {target_fe}) answered a binding pending to {pending:?}, not {target_fe:?}"
                );
            }
        }
        Ok(revision)
    }

    /// Waits until `ip` is bound to `fe_id`.
    pub async fn wait_bound(&self, ip: impl Into<std::net::IpAddr>, fe_id: &str, timeout: Duration) -> Result<Binding> {
        let ip: std::net::IpAddr = ip.into();
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
