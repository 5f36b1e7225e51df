//! Shared helpers of the controller's integration tests: start replicas (in-process or as real
//! processes), connect clients, register FEs and report VMs.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tonic::transport::Channel;
use victor_controller::config::Config;
use victor_controller::server::Server;
use victor_proto::Mac;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::*;
use victor_testkit::controller::{ControllerCommand, ControllerProcess, ControllerStore};

pub const PREFIX: &str = "10.10.0.0/16";

/// Clients of one replica.
#[derive(Clone)]
pub struct Clients {
    pub binding: BindingServiceClient<Channel>,
    pub agent: AgentServiceClient<Channel>,
    pub channel: Channel,
}

pub async fn connect(grpc: SocketAddr) -> Clients {
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    Clients {
        binding: BindingServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
        agent: AgentServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
        channel,
    }
}

/// An in-process replica on the embedded store in `dir` (extra flags appended).
pub async fn embedded(dir: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> = vec![
        "victor-controller".into(),
        "--mobile-prefix".into(),
        PREFIX.into(),
        "--grpc-listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = Server::start(Config::load_from(args).expect("config")).await.expect("start");
    wait_ready(server.http_addr).await;
    server
}

/// Waits until /readyz answers 200.
pub async fn wait_ready(http: SocketAddr) {
    victor_testkit::process::wait_for("controller /readyz", Duration::from_secs(20), || async move {
        matches!(victor_testkit::http::get(http, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
    .expect("controller ready");
}

/// A controller replica running as a real process.
pub struct Replica {
    pub process: ControllerProcess,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub id: String,
    _dir: tempfile::TempDir,
}

impl Replica {
    /// The command line of replica `id` on etcd at `etcd` (its log goes to `log`).
    pub fn command(id: &str, etcd: &[String], log: &Path) -> ControllerCommand {
        let bin = env!("CARGO_BIN_EXE_victor-controller");
        ControllerCommand::new(bin, id, PREFIX, ControllerStore::Etcd(etcd.to_vec())).log_file(log)
    }

    /// Starts replica `id` on the embedded store in a fresh data dir (extra flags appended) and
    /// waits until it is ready.
    pub async fn spawn_embedded(id: &str, extra: &[&str]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let bin = env!("CARGO_BIN_EXE_victor-controller");
        let store = ControllerStore::Embedded(dir.path().join("data"));
        let process = ControllerCommand::new(bin, id, PREFIX, store)
            .log_file(dir.path().join("controller.log"))
            .log_filter("info,victor_controller=debug")
            .args(extra)
            .start(Duration::from_secs(20))
            .await
            .expect("controller ready");
        Replica { grpc: process.grpc(), http: process.http(), id: id.to_owned(), process, _dir: dir }
    }

    /// Starts replica `id` on etcd (extra flags appended) and waits until it is ready.
    pub async fn spawn(id: &str, etcd: &[String], extra: &[&str]) -> Replica {
        Self::spawn_with(id, etcd, |cmd| cmd.args(extra)).await
    }

    /// [`Replica::spawn`], with the command line completed by `complete`.
    pub async fn spawn_with(
        id: &str,
        etcd: &[String],
        complete: impl FnOnce(ControllerCommand) -> ControllerCommand,
    ) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let cmd = Self::command(id, etcd, &dir.path().join("controller.log"))
            .log_filter("info,victor_controller=debug")
            .args(["--etcd-timeout", "2s"]);
        let process = complete(cmd).start(Duration::from_secs(20)).await.expect("controller ready");
        Replica { grpc: process.grpc(), http: process.http(), id: id.to_owned(), process, _dir: dir }
    }

    pub async fn clients(&self) -> Clients {
        connect(self.grpc).await
    }

    pub async fn metrics(&self) -> String {
        victor_testkit::http::get(self.http, "/metrics").await.expect("metrics").1
    }
}

pub fn mac(last: u8) -> Mac {
    Mac([2, 0, 0, 0, 0, last])
}

/// Registers an FE with underlay 192.0.2.<n>.
pub async fn register(c: &mut Clients, fe_id: &str, n: u8, site: &str) -> RegisterResponse {
    c.agent
        .register(RegisterRequest {
            fe_id: fe_id.into(),
            underlay_addr: format!("192.0.2.{n}"),
            site: site.into(),
            mobile_prefixes: vec![],
            agent_version: "test".into(),
        })
        .await
        .expect("register")
        .into_inner()
}

pub fn observation(ip: &str, mac: Mac, kind: ObservationKind, observed_at: i64) -> VmObservation {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    VmObservation {
        vm_ip: victor_proto::types::ip_to_bytes(ip),
        mac: mac.octets().to_vec(),
        kind: kind as i32,
        observed_at_unix_nanos: observed_at,
        port: "vm0".into(),
        known_revision: None,
    }
}

/// Reports one LEARNED observation (observed now) and returns its result.
pub async fn learn(c: &mut Clients, fe_id: &str, ip: &str, mac: Mac) -> ClaimResult {
    learn_at(c, fe_id, ip, mac, unix_nanos()).await
}

/// Reports one LEARNED observed at `at` by `fe_id`'s clock, made knowing store revision `known`.
pub async fn learn_knowing(c: &mut Clients, fe_id: &str, ip: &str, mac: Mac, at: i64, known: u64) -> ClaimResult {
    let obs = VmObservation { known_revision: Some(known), ..observation(ip, mac, ObservationKind::Learned, at) };
    let req = ReportRequest { fe_id: fe_id.into(), observations: vec![obs] };
    c.agent.report(req).await.expect("report").into_inner().results.remove(0)
}

pub async fn learn_at(c: &mut Clients, fe_id: &str, ip: &str, mac: Mac, at: i64) -> ClaimResult {
    let req =
        ReportRequest { fe_id: fe_id.into(), observations: vec![observation(ip, mac, ObservationKind::Learned, at)] };
    c.agent.report(req).await.expect("report").into_inner().results.remove(0)
}

pub fn outcome(r: &ClaimResult) -> ClaimOutcome {
    ClaimOutcome::try_from(r.outcome).unwrap()
}

pub async fn binding(c: &mut Clients, ip: &str) -> Result<Binding, tonic::Status> {
    c.binding.get_binding(GetBindingRequest { vm_ip: ip.into() }).await.map(|r| r.into_inner())
}

pub async fn status(c: &mut Clients) -> GetStatusResponse {
    c.binding.get_status(GetStatusRequest {}).await.unwrap().into_inner()
}

/// Reads stream messages until `pred` accepts one (or panics after `timeout`).
pub async fn next_matching(
    stream: &mut tonic::Streaming<SyncUpdate>,
    timeout: Duration,
    mut pred: impl FnMut(&SyncUpdate) -> bool,
) -> SyncUpdate {
    tokio::time::timeout(timeout, async {
        loop {
            let msg = stream.message().await.expect("stream error").expect("stream ended");
            if pred(&msg) {
                return msg;
            }
        }
    })
    .await
    .expect("expected stream message did not arrive in time")
}

pub fn ip_bytes(ip: &str) -> Vec<u8> {
    victor_proto::types::ip_to_bytes(ip.parse().unwrap())
}

/// Everything a rejected request could have written (bindings, declarations, FE registrations),
/// with revisions. Background writes of the replica itself (presence and election keys, lease
/// renewals, FE sessions) are deliberately not part of it, so comparing two fingerprints proves
/// "nothing was written" without racing the replica's own housekeeping.
pub async fn fingerprint(c: &mut Clients) -> Vec<String> {
    let mut out = Vec::new();
    let bindings = c
        .binding
        .list_bindings(ListBindingsRequest { page_size: 10_000, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    out.extend(bindings.bindings.iter().map(|b| format!("binding {} {} {} {}", b.vm_ip, b.fe_id, b.mac, b.revision)));
    let vms =
        c.binding.list_vms(ListVmsRequest { page_size: 10_000, ..Default::default() }).await.unwrap().into_inner();
    out.extend(vms.vms.iter().map(|v| format!("vm {} {} {}", v.vm_ip, v.mac, v.revision)));
    let fes = c.binding.list_fes(ListFesRequest {}).await.unwrap().into_inner();
    out.extend(
        fes.fes.iter().map(|f| format!("fe {} {} {} {}", f.fe_id, f.underlay_addr, f.site, f.registered_at_unix_nanos)),
    );
    out
}
