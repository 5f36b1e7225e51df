//! Authenticated access with real certificates (rcgen) and real TLS sockets: FE identity from the
//! agent's client certificate (a foreign FE certificate can neither register, report, heartbeat
//! nor sync for another FE), bearer-token roles on the BindingService (a read-only token cannot
//! declare a VM, no token is UNAUTHENTICATED), refused calls write nothing, and the controller
//! talks to a real etcd over mutual TLS.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use victor_proto::tls::{ClientTlsFiles, endpoint};
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::*;
use victor_testkit::controller::{ControllerCommand, ControllerStore};
use victor_testkit::etcd::{EtcdCluster, EtcdOptions};
use victor_testkit::pki::{CertKey, Pki};

/// A TLS channel to `grpc` trusting `pki`'s CA, presenting `identity` if given.
async fn tls_channel(
    grpc: std::net::SocketAddr,
    pki: &Pki,
    identity: Option<&CertKey>,
) -> Result<Channel, tonic::transport::Error> {
    let files = ClientTlsFiles {
        ca_file: Some(pki.ca.path.clone()),
        cert_file: identity.map(|i| i.cert.path.clone()),
        key_file: identity.map(|i| i.key.path.clone()),
        server_name: None,
    };
    let tls = files.load().unwrap();
    endpoint(&grpc.to_string(), tls.as_ref(), Duration::from_secs(5)).unwrap().connect().await
}

async fn tls_clients(grpc: std::net::SocketAddr, pki: &Pki, identity: Option<&CertKey>) -> Clients {
    let channel = tls_channel(grpc, pki, identity).await.expect("TLS connect");
    Clients {
        binding: BindingServiceClient::new(channel.clone()),
        agent: AgentServiceClient::new(channel.clone()),
        channel,
    }
}

/// Flags of a TLS controller with client-certificate verification.
fn tls_flags(pki: &Pki, server: &CertKey) -> Vec<String> {
    vec![
        "--tls-cert-file".into(),
        server.cert.path.display().to_string(),
        "--tls-key-file".into(),
        server.key.path.display().to_string(),
        "--tls-client-ca-file".into(),
        pki.ca.path.display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn register_req(fe_id: &str, n: u8) -> RegisterRequest {
    RegisterRequest {
        fe_id: fe_id.into(),
        underlay_addr: format!("192.0.2.{n}"),
        site: "site-a".into(),
        mobile_prefixes: vec![],
        agent_version: "test".into(),
    }
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let err = r.expect_err("the call must be refused");
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(needle), "message {:?} should mention {needle:?}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fe_identity_comes_from_the_client_certificate() {
    let pki = Pki::new("victor-test");
    let server_cert = pki.server("controller");
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &strs(&tls_flags(&pki, &server_cert))).await;

    let fe1 = pki.fe("fe1");
    let fe2 = pki.fe("fe2");
    let mut c1 = tls_clients(server.grpc_addr, &pki, Some(&fe1)).await;
    let mut c2 = tls_clients(server.grpc_addr, &pki, Some(&fe2)).await;
    c1.agent.register(register_req("fe1", 1)).await.expect("fe1 registers with its own certificate");
    c2.agent.register(register_req("fe2", 2)).await.expect("fe2 registers with its own certificate");
    let r = learn(&mut c1, "fe1", "10.10.0.11", mac(11)).await;
    assert_eq!(outcome(&r), ClaimOutcome::Bound, "{r:?}");
    let before = fingerprint(&mut c1).await;

    // fe2's certificate cannot act for fe1: not register, report (claim fe1's VM away), heartbeat
    // nor read fe1's stream.
    assert_code(c2.agent.register(register_req("fe1", 9)).await, Code::PermissionDenied, "identifies FE fe2");
    let steal = ReportRequest {
        fe_id: "fe1".into(),
        observations: vec![observation("10.10.0.11", mac(11), ObservationKind::Gone, i64::MAX)],
    };
    assert_code(c2.agent.report(steal).await, Code::PermissionDenied, "cannot act for FE fe1");
    assert_code(
        c2.agent.heartbeat(HeartbeatRequest { fe_id: "fe1".into() }).await,
        Code::PermissionDenied,
        "cannot act for FE fe1",
    );
    assert_code(
        c2.agent.sync(SyncRequest { fe_id: "fe1".into(), ..Default::default() }).await,
        Code::PermissionDenied,
        "cannot act for FE fe1",
    );
    // fe2 may claim for itself (a move is a legitimate claim by the new FE).
    c2.agent.heartbeat(HeartbeatRequest { fe_id: "fe2".into() }).await.expect("own heartbeat");

    // A certificate that names no FE, and no certificate at all.
    let operator = pki.client("operator", &["ops.example"]);
    let mut cop = tls_clients(server.grpc_addr, &pki, Some(&operator)).await;
    assert_code(cop.agent.register(register_req("fe1", 9)).await, Code::PermissionDenied, "names no FE");
    let mut anon = tls_clients(server.grpc_addr, &pki, None).await;
    assert_code(anon.agent.register(register_req("fe1", 9)).await, Code::Unauthenticated, "no client certificate");
    assert_code(
        anon.agent.report(ReportRequest { fe_id: "fe1".into(), observations: vec![] }).await,
        Code::Unauthenticated,
        "fe1.fe.victor",
    );

    // A certificate from another CA fails the handshake.
    let rogue_ca = Pki::new("rogue");
    let rogue_fe1 = rogue_ca.fe("fe1");
    // (With TLS 1.3 the client may only learn it at its first call, so accept either.)
    if let Ok(channel) = tls_channel(server.grpc_addr, &pki, Some(&rogue_fe1)).await {
        let r = AgentServiceClient::new(channel).register(register_req("fe1", 9)).await;
        assert!(r.is_err(), "a certificate from a foreign CA was accepted");
    }
    // Plaintext clients cannot talk to a TLS port.
    let plain = Channel::from_shared(format!("http://{}", server.grpc_addr)).unwrap().connect().await;
    if let Ok(channel) = plain {
        let r = AgentServiceClient::new(channel).register(register_req("fe1", 9)).await;
        assert!(r.is_err(), "plaintext call answered on a TLS port");
    }

    // Nothing was written by the refused calls.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fingerprint(&mut c1).await, before, "a refused call wrote something");
    let b = binding(&mut c1, "10.10.0.11").await.unwrap();
    assert_eq!((b.fe_id.as_str(), b.move_seq), ("fe1", 0));
    let fes = c1.binding.list_fes(ListFesRequest {}).await.unwrap().into_inner().fes;
    let fe1_view = fes.iter().find(|f| f.fe_id == "fe1").unwrap();
    assert_eq!(fe1_view.underlay_addr, "192.0.2.1", "fe1's registration was overwritten");

    // The legitimate owner still works, and its stream is readable with its own certificate.
    let mut stream = c1
        .agent
        .sync(SyncRequest { fe_id: "fe1".into(), ..Default::default() })
        .await
        .expect("own stream")
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.revision > 0, "{first:?}");

    let metrics = victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap().1;
    let line = |needle: &str| metrics.lines().find(|l| l.contains(needle)).map(str::to_owned);
    let denied = line("victor_auth_failures_total{service=\"agent\",reason=\"permission_denied\"}")
        .unwrap_or_else(|| panic!("no auth failure metric:\n{metrics}"));
    assert!(denied.ends_with(" 5"), "{denied}");
    assert!(line("victor_auth_failures_total{service=\"agent\",reason=\"unauthenticated\"} 2").is_some(), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_with_read_only_and_read_write_roles() {
    let pki = Pki::new("victor-test");
    let server_cert = pki.server("controller");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# operators\nro-7f3a read-only\nrw-91c2 read-write\n").unwrap();
    let mut flags = tls_flags(&pki, &server_cert);
    flags.extend(["--auth-tokens-file".into(), tokens.display().to_string()]);
    let server = embedded(&dir.path().join("data"), &strs(&flags)).await;

    // Operators connect with server-authenticated TLS only (no client certificate) and a token.
    let channel = tls_channel(server.grpc_addr, &pki, None).await.unwrap();
    let with_token = |token: Option<&'static str>| {
        BindingServiceClient::with_interceptor(channel.clone(), move |mut req: tonic::Request<()>| {
            if let Some(t) = token {
                req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {t}")).unwrap());
            }
            Ok(req)
        })
    };
    let declare =
        || DeclareVmRequest { vm_ip: "10.10.0.21".into(), mac: "02:00:00:00:00:15".into(), ..Default::default() };

    assert_code(with_token(None).declare_vm(declare()).await, Code::Unauthenticated, "authorization");
    assert_code(with_token(None).get_status(GetStatusRequest {}).await, Code::Unauthenticated, "authorization");
    assert_code(with_token(Some("guess")).list_fes(ListFesRequest {}).await, Code::Unauthenticated, "unknown bearer");
    assert_code(with_token(Some("ro-7f3a")).declare_vm(declare()).await, Code::PermissionDenied, "read-only");
    assert_code(
        with_token(Some("ro-7f3a"))
            .announce_migration(AnnounceMigrationRequest {
                vm_ip: "10.10.0.21".into(),
                target_fe_id: "fe1".into(),
                commit: true,
                ttl_seconds: 0,
            })
            .await,
        Code::PermissionDenied,
        "read-only",
    );
    assert_code(
        with_token(Some("ro-7f3a")).clear_damping(ClearDampingRequest { vm_ip: "10.10.0.21".into() }).await,
        Code::PermissionDenied,
        "read-only",
    );
    let ro_status = with_token(Some("ro-7f3a")).get_status(GetStatusRequest {}).await.unwrap().into_inner();
    let vms = with_token(Some("ro-7f3a")).list_vms(ListVmsRequest::default()).await.unwrap().into_inner().vms;
    assert!(vms.is_empty(), "a refused declaration was written: {vms:?}");

    let vm = with_token(Some("rw-91c2")).declare_vm(declare()).await.expect("read-write declares").into_inner();
    assert_eq!(vm.vm.unwrap().vm_ip, "10.10.0.21");
    let after = with_token(Some("ro-7f3a")).get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert!(after.cache_revision > ro_status.cache_revision);
    let vms = with_token(Some("ro-7f3a")).list_vms(ListVmsRequest::default()).await.unwrap().into_inner().vms;
    assert_eq!(vms.len(), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_configuration_fails_at_start_with_the_flag_named() {
    let pki = Pki::new("victor-test");
    let server_cert = pki.server("controller");
    let dir = tempfile::tempdir().unwrap();
    let start = |extra: Vec<String>| {
        let mut args: Vec<String> =
            ["victor-controller", "--mobile-prefix", PREFIX, "--grpc-listen", "127.0.0.1:0", "--http-listen"]
                .into_iter()
                .map(String::from)
                .collect();
        args.extend(["127.0.0.1:0".into(), "--data-dir".into(), dir.path().display().to_string()]);
        args.extend(extra);
        async move {
            let config = victor_controller::config::Config::load_from(args).expect("valid flags");
            match victor_controller::server::Server::start(config).await {
                Ok(server) => {
                    server.shutdown().await.unwrap();
                    panic!("the controller started with a bad TLS configuration")
                }
                Err(err) => format!("{err:#}"),
            }
        }
    };
    // The key given as the certificate.
    let swapped = vec![
        "--tls-cert-file".into(),
        server_cert.key.path.display().to_string(),
        "--tls-key-file".into(),
        server_cert.key.path.display().to_string(),
    ];
    let err = start(swapped).await;
    assert!(err.contains("--tls-cert-file") && err.contains("CERTIFICATE"), "{err}");
    // https etcd endpoints without a CA; a CA with http endpoints.
    let err = start(vec!["--etcd-endpoints".into(), "https://127.0.0.1:1".into()]).await;
    assert!(err.contains("--etcd-ca-file"), "{err}");
    let err = start(vec![
        "--etcd-endpoints".into(),
        "http://127.0.0.1:1".into(),
        "--etcd-ca-file".into(),
        pki.ca.path.display().to_string(),
    ])
    .await;
    assert!(err.contains("https://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_talks_to_etcd_over_mutual_tls() {
    let pki = Pki::new("victor-etcd");
    let etcd_server = pki.server("etcd");
    let etcd_client = pki.client("victor-controller", &["victor-controller"]);
    let cluster = EtcdCluster::start_with(EtcdOptions {
        members: 1,
        tls: Some(victor_testkit::etcd::EtcdTls {
            ca_cert_pem: pki.ca.pem.clone(),
            server_cert_pem: etcd_server.cert.pem.clone(),
            server_key_pem: etcd_server.key.pem.clone(),
            client: Some((etcd_client.cert.pem.clone(), etcd_client.key.pem.clone())),
        }),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let endpoint = cluster.member_endpoint(0);
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let client_cert = (etcd_client.cert.path.as_path(), etcd_client.key.path.as_path());
    let replica = Replica::spawn_with("tls-a", std::slice::from_ref(&endpoint), |cmd| {
        cmd.etcd_tls(&pki.ca.path, Some(client_cert))
    })
    .await;
    let mut c = replica.clients().await;
    register(&mut c, "fe1", 1, "site-a").await;
    let r = learn(&mut c, "fe1", "10.10.0.31", mac(31)).await;
    assert_eq!(outcome(&r), ClaimOutcome::Bound, "{r:?}");
    let st = status(&mut c).await;
    assert_eq!((st.store_kind.as_str(), st.store_reachable), ("etcd", true));
    // The binding really is in the TLS etcd (key: /victor/b/4/<IPv4 in hex>).
    let keys = cluster.etcdctl(&endpoint, &["get", "--prefix", "--keys-only", "/victor/"]).await.unwrap();
    assert!(keys.lines().any(|k| k == "/victor/b/4/0a0a001f"), "binding key missing in etcd: {keys}");

    // Without the client certificate etcd refuses the controller: it never becomes ready.
    let dir = tempfile::tempdir().unwrap();
    let tls_b = Replica::command("tls-b", std::slice::from_ref(&endpoint), &dir.path().join("log"))
        .args(["--etcd-timeout", "1s"])
        .etcd_tls(&pki.ca.path, None)
        .spawn()
        .unwrap();
    let http = tls_b.http();
    let mut saw_not_ready = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match victor_testkit::http::get(http, "/readyz").await {
            Ok((200, _)) => panic!("a controller without the etcd client certificate became ready"),
            Ok((503, body)) => {
                saw_not_ready = true;
                assert!(body.contains("store unreachable") || body.contains("cache not loaded"), "{body}");
            }
            _ => {}
        }
    }
    assert!(saw_not_ready, "the controller's admin port never answered");
}

/// `--log-format json`: one JSON object per line, with the FE id as a field of the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_fe_id_of_refused_calls() {
    let pki = Pki::new("victor-test");
    let server_cert = pki.server("controller");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("controller.log");
    let bin = env!("CARGO_BIN_EXE_victor-controller");
    let child = ControllerCommand::new(bin, "json", PREFIX, ControllerStore::Embedded(dir.path().join("data")))
        .args(["--log-format", "json"])
        .grpc_tls(&server_cert.cert.path, &server_cert.key.path, Some(&pki.ca.path))
        .log_file(&log)
        .start(Duration::from_secs(20))
        .await
        .unwrap();
    let grpc = child.grpc();
    let fe2 = pki.fe("fe2");
    let mut c2 = tls_clients(grpc, &pki, Some(&fe2)).await;
    assert_code(c2.agent.register(register_req("fe1", 1)).await, Code::PermissionDenied, "fe2");

    let refusal = victor_testkit::process::wait_for("the refusal in the log", Duration::from_secs(5), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(log).ok()?;
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "agent call refused")
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", child.log_tail(4000)));
    assert_eq!(refusal["fe_id"], "fe1", "{refusal}");
    assert_eq!(refusal["level"], "WARN", "{refusal}");
    assert!(refusal["remote"].as_str().unwrap().starts_with("127.0.0.1:"), "{refusal}");
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not a JSON log line: {line}");
    }
    assert!(text.contains("gRPC uses mutual TLS for agents"), "{text}");
}
