//! Shared helpers of the controller's integration tests: start replicas (in-process or as real
//! processes), connect clients, register FEs and report VMs.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic::transport::Channel;
use victor_controller::config::Config;
use victor_controller::server::Server;
use victor_proto::Mac;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::*;
use victor_testkit::ports::free_addr;
use victor_testkit::process::ChildGuard;

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
    pub child: ChildGuard,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub id: String,
    _dir: tempfile::TempDir,
}

impl Replica {
    pub async fn spawn(id: &str, etcd: &[String], extra: &[&str]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let grpc = free_addr();
        let http = free_addr();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_victor-controller"));
        cmd.args(["--mobile-prefix", PREFIX, "--replica-id", id, "--log", "info,victor_controller=debug"])
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            .arg("--etcd-endpoints")
            .arg(etcd.join(","))
            .arg("--etcd-timeout")
            .arg("2s")
            .args(extra);
        let child =
            ChildGuard::spawn(format!("controller-{id}"), cmd, Some(&dir.path().join("controller.log"))).unwrap();
        let replica = Replica { child, grpc, http, id: id.to_owned(), _dir: dir };
        wait_ready(http).await;
        replica
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
    }
}

/// Reports one LEARNED observation (observed now) and returns its result.
pub async fn learn(c: &mut Clients, fe_id: &str, ip: &str, mac: Mac) -> ClaimResult {
    learn_at(c, fe_id, ip, mac, unix_nanos()).await
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
