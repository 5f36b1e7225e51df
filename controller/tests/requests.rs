//! How the controller answers requests it cannot serve as asked (embedded store, real sockets):
//! huge field values get a short INVALID_ARGUMENT, an over-size request RESOURCE_EXHAUSTED, `Sync`
//! for an FE that never registered FAILED_PRECONDITION, a `Report` from an FE whose session
//! expired FAILED_PRECONDITION without binding anything (and binds again after the FE registers
//! again), underlay addresses other FEs cannot use are refused at `Register`, and server
//! reflection answers in both v1 and v1alpha.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::*;

async fn start(extra: &[&str]) -> (tempfile::TempDir, victor_controller::server::Server, Clients) {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), extra).await;
    let clients = connect(server.grpc_addr).await;
    (dir, server, clients)
}

/// Longest status message an error about a huge value may have.
const SHORT: usize = 400;

fn assert_short_invalid(what: &str, result: Result<impl std::fmt::Debug, tonic::Status>) {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Code::InvalidArgument, "{what}: {}", &err.message()[..err.message().len().min(200)]);
    assert!(err.message().len() < SHORT, "{what}: a {}-byte message", err.message().len());
    assert!(err.message().contains("bytes)"), "{what}: the message says how long the value was: {}", err.message());
}

#[tokio::test]
async fn a_huge_field_gets_a_short_invalid_argument() {
    let (_dir, _server, mut c) = start(&[]).await;
    let huge = "x".repeat(1 << 20);
    assert_short_invalid("GetBinding", c.binding.get_binding(GetBindingRequest { vm_ip: huge.clone() }).await);
    let declare = DeclareVmRequest { vm_ip: "10.10.0.5".into(), mac: huge.clone(), ..Default::default() };
    assert_short_invalid("DeclareVm mac", c.binding.declare_vm(declare).await);
    let list = ListBindingsRequest { prefix: huge.clone(), ..Default::default() };
    assert_short_invalid("ListBindings prefix", c.binding.list_bindings(list).await);
    let list = ListBindingsRequest { page_token: huge.clone(), ..Default::default() };
    assert_short_invalid("ListBindings page_token", c.binding.list_bindings(list).await);
    let announce =
        AnnounceMigrationRequest { vm_ip: "10.10.0.5".into(), target_fe_id: huge.clone(), ..Default::default() };
    assert_short_invalid("AnnounceMigration target", c.binding.announce_migration(announce).await);
    let reg = |f: &dyn Fn(&mut RegisterRequest)| {
        let mut req = RegisterRequest {
            fe_id: "fe1".into(),
            underlay_addr: "192.0.2.1".into(),
            site: "a".into(),
            ..Default::default()
        };
        f(&mut req);
        req
    };
    assert_short_invalid("Register fe_id", c.agent.register(reg(&|r| r.fe_id = huge.clone())).await);
    assert_short_invalid("Register underlay", c.agent.register(reg(&|r| r.underlay_addr = huge.clone())).await);
    assert_short_invalid("Register site", c.agent.register(reg(&|r| r.site = huge.clone())).await);
    assert_short_invalid("Register prefix", c.agent.register(reg(&|r| r.mobile_prefixes = vec![huge.clone()])).await);
    let report = ReportRequest { fe_id: huge.clone(), observations: vec![] };
    assert_short_invalid("Report fe_id", c.agent.report(report).await);
    let sync = c.agent.sync(SyncRequest { fe_id: huge.clone(), from_revision: 0 }).await;
    assert_short_invalid("Sync fe_id", sync.map(|_| ()));
}

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted_on_both_services() {
    let (_dir, _server, mut c) = start(&[]).await;
    let declare =
        DeclareVmRequest { vm_ip: "10.10.0.5".into(), description: "d".repeat(5 << 20), ..Default::default() };
    let err = c.binding.declare_vm(declare).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.message().contains("at most 4194304 bytes"), "{}", err.message());
    let register = RegisterRequest { fe_id: "fe1".into(), agent_version: "v".repeat(5 << 20), ..Default::default() };
    let err = c.agent.register(register).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    // Just under the limit is decoded and judged on its content.
    let declare = DeclareVmRequest {
        vm_ip: "10.10.0.5".into(),
        mac: "02:00:00:00:00:05".into(),
        description: "d".repeat(2 << 20),
        ..Default::default()
    };
    let err = c.binding.declare_vm(declare).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("at most 256"), "{}", err.message());
    // The connection still serves.
    assert_eq!(status(&mut c).await.binding_count, 0);
}

#[tokio::test]
async fn sync_for_an_unregistered_fe_is_a_failed_precondition() {
    let (_dir, _server, mut c) = start(&[]).await;
    let err = c.agent.sync(SyncRequest { fe_id: "fe-never".into(), from_revision: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("Register"), "{}", err.message());
    // Registered, the same request streams the snapshot.
    register(&mut c, "fe-never", 1, "a").await;
    let mut stream =
        c.agent.sync(SyncRequest { fe_id: "fe-never".into(), from_revision: 0 }).await.unwrap().into_inner();
    let end = next_matching(&mut stream, Duration::from_secs(5), |m| m.phase == SyncPhase::SnapshotEnd as i32).await;
    assert_eq!(end.fe_upserts.len(), 1);
}

#[tokio::test]
async fn a_report_after_the_session_expired_binds_nothing_until_the_fe_registers_again() {
    let (_dir, _server, mut c) = start(&["--session-ttl", "2s"]).await;
    register(&mut c, "fe1", 1, "a").await;
    // No heartbeats: the session lapses with its lease.
    let down = victor_testkit::process::wait_for("fe1 down", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let fes = c.binding.list_fes(ListFesRequest {}).await.ok()?.into_inner().fes;
            (fes.first()?.health == FeHealth::Down as i32).then_some(())
        }
    })
    .await;
    assert!(down.is_ok(), "the session of fe1 never expired");
    let report = || ReportRequest {
        fe_id: "fe1".into(),
        observations: vec![observation("10.10.0.11", mac(11), ObservationKind::Learned, unix_nanos())],
    };
    let err = c.agent.report(report()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("expired") && err.message().contains("Register"), "{}", err.message());
    assert_eq!(binding(&mut c, "10.10.0.11").await.unwrap_err().code(), Code::NotFound, "an expired FE bound a VM");

    register(&mut c, "fe1", 1, "a").await;
    let result = c.agent.report(report()).await.unwrap().into_inner().results.remove(0);
    assert_eq!(outcome(&result), ClaimOutcome::Bound, "{result:?}");
}

#[tokio::test]
async fn register_refuses_underlay_addresses_other_fes_cannot_use() {
    let (_dir, _server, mut c) = start(&[]).await;
    for (underlay, hint) in [
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("239.1.2.3", "multicast"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("10.10.7.7", "inside the mobile prefix 10.10.0.0/16"),
    ] {
        let req = RegisterRequest {
            fe_id: "fe1".into(),
            underlay_addr: underlay.into(),
            site: "a".into(),
            ..Default::default()
        };
        let err = c.agent.register(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{underlay}: {}", err.message());
        assert!(err.message().contains(hint) && err.message().contains("underlay"), "{underlay}: {}", err.message());
    }
    assert!(c.binding.list_fes(ListFesRequest {}).await.unwrap().into_inner().fes.is_empty(), "something registered");
}

#[tokio::test]
async fn reflection_answers_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let (_dir, _server, c) = start(&[]).await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(c.channel.clone());
    let mut answers = client.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let v1_names: Vec<String> = match answers.message().await.unwrap().unwrap().message_response.unwrap() {
        v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1: {other:?}"),
    };

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(c.channel.clone());
    let mut answers = client.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let v1alpha_names: Vec<String> = match answers.message().await.unwrap().unwrap().message_response.unwrap() {
        v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1alpha: {other:?}"),
    };
    for name in ["victor.v1.AgentService", "victor.v1.BindingService", "grpc.health.v1.Health"] {
        assert!(v1_names.iter().any(|n| n == name), "v1 lacks {name}: {v1_names:?}");
        assert!(v1alpha_names.iter().any(|n| n == name), "v1alpha lacks {name}: {v1alpha_names:?}");
    }
}
