//! The controller's gRPC and HTTP API on the embedded store, end to end through real sockets:
//! binding rules (docs/design.md, invariants I1–I4), error codes and messages, nothing written on
//! rejection, agent stream snapshot/delta/resume, watch, paging, health, reflection, metrics and
//! persistence.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::*;

async fn start() -> (tempfile::TempDir, victor_controller::server::Server, Clients) {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &[]).await;
    let clients = connect(server.grpc_addr).await;
    (dir, server, clients)
}

#[tokio::test]
async fn claims_bind_move_and_never_roll_back() {
    let (_dir, server, mut c) = start().await;
    register(&mut c, "fe2", 2, "site-a").await;
    register(&mut c, "fe3", 3, "site-b").await;
    let t0 = unix_nanos();

    let r = learn_at(&mut c, "fe2", "10.10.0.11", mac(11), t0).await;
    assert_eq!(outcome(&r), ClaimOutcome::Bound, "{r:?}");
    let b = binding(&mut c, "10.10.0.11").await.unwrap();
    assert_eq!(
        (b.fe_id.as_str(), b.mac.as_str(), b.move_seq, b.site.as_str()),
        ("fe2", "02:00:00:00:00:0b", 0, "site-a")
    );
    assert_eq!(b.source, BindingSource::Arp as i32);

    let bound_at = r.revision;
    let r = learn_knowing(&mut c, "fe3", "10.10.0.11", mac(11), t0 - 60_000_000_000, bound_at).await;
    assert_eq!((outcome(&r), r.move_seq), (ClaimOutcome::Moved, 1), "{r:?}");
    assert_eq!(binding(&mut c, "10.10.0.11").await.unwrap().fe_id, "fe3");
    let moved_at = r.revision;

    // A late report from the old FE (made before the move, whatever its clock says) is refused,
    // writes nothing and names the revision to wait for.
    let before = fingerprint(&mut c).await;
    let r = learn_knowing(&mut c, "fe2", "10.10.0.11", mac(11), t0 + 60_000_000_000, bound_at).await;
    assert_eq!(outcome(&r), ClaimOutcome::Rejected);
    assert_eq!(r.reject_reason, RejectReason::Stale as i32);
    assert_eq!(r.code, Code::FailedPrecondition as i32);
    assert_eq!(r.revision, moved_at);
    assert!(r.message.contains("stale"), "{}", r.message);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fingerprint(&mut c).await, before, "a rejected claim wrote something");
    let b = binding(&mut c, "10.10.0.11").await.unwrap();
    assert_eq!((b.fe_id.as_str(), b.move_seq), ("fe3", 1));

    // GONE from the binding FE removes it; from another FE it does not.
    let gone = |fe: &str, at| ReportRequest {
        fe_id: fe.into(),
        observations: vec![observation("10.10.0.11", mac(11), ObservationKind::Gone, at)],
    };
    let r = c.agent.report(gone("fe2", unix_nanos())).await.unwrap().into_inner().results.remove(0);
    assert_eq!(r.reject_reason, RejectReason::NotBoundHere as i32);
    let r = c.agent.report(gone("fe3", unix_nanos())).await.unwrap().into_inner().results.remove(0);
    assert_eq!(outcome(&r), ClaimOutcome::Removed);
    assert_eq!(binding(&mut c, "10.10.0.11").await.unwrap_err().code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_precise_errors_and_writes_nothing() {
    let (_dir, server, mut c) = start().await;
    register(&mut c, "fe2", 2, "site-a").await;
    let before = fingerprint(&mut c).await;

    let err = c
        .binding
        .declare_vm(DeclareVmRequest {
            vm_ip: "10.11.0.1".into(),
            mac: "02:00:00:00:00:01".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("outside the mobile prefixes 10.10.0.0/16"), "{}", err.message());
    let err = c
        .binding
        .declare_vm(DeclareVmRequest { vm_ip: "10.10.0.1".into(), mac: "02:00".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("six hex octets"), "{}", err.message());
    let err = c
        .binding
        .declare_vm(DeclareVmRequest {
            vm_ip: "10.10.0.1".into(),
            mac: "01:00:5e:00:00:01".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("unicast"), "{}", err.message());
    let err = c.binding.get_binding(GetBindingRequest { vm_ip: "10.10.9.9".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.binding.get_binding(GetBindingRequest { vm_ip: "banana".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .binding
        .announce_migration(AnnounceMigrationRequest {
            vm_ip: "10.10.0.5".into(),
            target_fe_id: "fe-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("not registered"), "{}", err.message());
    let err =
        c.binding.list_bindings(ListBindingsRequest { page_size: 100_000, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .binding
        .undeclare_vm(UndeclareVmRequest { vm_ip: "10.10.0.5".into(), remove_binding: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Agent side: unregistered FE, bad FE id, oversized batch, malformed observations.
    let err = c.agent.report(ReportRequest { fe_id: "fe-unknown".into(), observations: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("Register"), "{}", err.message());
    let err = c.agent.report(ReportRequest { fe_id: "fe 2".into(), observations: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let many = (0..1025)
        .map(|i| observation(&format!("10.10.1.{}", i % 250 + 1), mac(1), ObservationKind::Learned, unix_nanos()))
        .collect();
    let err = c.agent.report(ReportRequest { fe_id: "fe2".into(), observations: many }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 1024"), "{}", err.message());
    // A request over the 4 MiB message limit is refused before it is decoded, with the code gRPC
    // defines for it (OUT_OF_RANGE means "resume revision compacted" in this contract).
    let huge = ReportRequest {
        fe_id: "fe2".into(),
        observations: vec![VmObservation {
            port: "x".repeat(5 << 20),
            ..observation("10.10.0.9", mac(9), ObservationKind::Learned, unix_nanos())
        }],
    };
    let err = c.agent.report(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("at most 4194304 bytes"), "{}", err.message());
    let bad = ReportRequest {
        fe_id: "fe2".into(),
        observations: vec![
            VmObservation {
                vm_ip: vec![10, 10, 0],
                mac: mac(1).octets().to_vec(),
                kind: 1,
                observed_at_unix_nanos: unix_nanos(),
                port: String::new(),
                known_revision: None,
            },
            VmObservation {
                vm_ip: vec![10, 10, 0, 7],
                mac: vec![1, 2],
                kind: 1,
                observed_at_unix_nanos: unix_nanos(),
                port: String::new(),
                known_revision: None,
            },
            observation("192.168.1.1", mac(1), ObservationKind::Learned, unix_nanos()),
            observation("10.10.0.7", mac(1), ObservationKind::Learned, 0),
            observation("10.10.0.8", victor_proto::Mac::BROADCAST, ObservationKind::Learned, unix_nanos()),
        ],
    };
    let results = c.agent.report(bad).await.unwrap().into_inner().results;
    let reasons: Vec<i32> = results.iter().map(|r| r.reject_reason).collect();
    assert_eq!(
        reasons,
        vec![
            RejectReason::Malformed as i32,
            RejectReason::Malformed as i32,
            RejectReason::OutsideMobilePrefix as i32,
            RejectReason::BadTimestamp as i32,
            RejectReason::Malformed as i32
        ]
    );
    assert!(results.iter().all(|r| r.outcome == ClaimOutcome::Rejected as i32 && !r.message.is_empty()));
    let err = c
        .agent
        .register(RegisterRequest {
            fe_id: "fe9".into(),
            underlay_addr: "192.0.2.2".into(),
            site: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "duplicate underlay address accepted");
    let err = c
        .agent
        .register(RegisterRequest {
            fe_id: "fe9".into(),
            underlay_addr: "192.0.2.9".into(),
            site: "x".into(),
            mobile_prefixes: vec!["10.20.0.0/16".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fingerprint(&mut c).await, before, "rejected requests wrote something");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn declared_mac_and_site_policy_are_enforced() {
    let (_dir, server, mut c) = start().await;
    register(&mut c, "fe2", 2, "site-a").await;
    register(&mut c, "fe3", 3, "site-b").await;
    let vm = c
        .binding
        .declare_vm(DeclareVmRequest {
            vm_ip: "10.10.0.20".into(),
            mac: "02:00:00:00:00:20".into(),
            site_policy: Some(SitePolicy { allowed_sites: vec!["site-a".into()] }),
            description: "tenant 7".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(vm.mac, "02:00:00:00:00:20");
    // Read-your-writes on the same replica.
    let listed = c.binding.list_vms(ListVmsRequest::default()).await.unwrap().into_inner().vms;
    assert_eq!(listed.len(), 1);

    // Spoofed claim: right IP, wrong MAC.
    let r = learn(&mut c, "fe2", "10.10.0.20", mac(0x66)).await;
    assert_eq!((r.reject_reason, r.code), (RejectReason::MacMismatch as i32, Code::PermissionDenied as i32));
    assert_eq!(binding(&mut c, "10.10.0.20").await.unwrap_err().code(), Code::NotFound);
    // Right MAC at an allowed site binds; a move to a forbidden site is refused with the reason.
    assert_eq!(outcome(&learn(&mut c, "fe2", "10.10.0.20", mac(0x20)).await), ClaimOutcome::Bound);
    let r = learn(&mut c, "fe3", "10.10.0.20", mac(0x20)).await;
    assert_eq!((r.reject_reason, r.code), (RejectReason::SitePolicy as i32, Code::PermissionDenied as i32));
    assert!(r.message.contains("site-b"), "{}", r.message);
    let err = c
        .binding
        .announce_migration(AnnounceMigrationRequest {
            vm_ip: "10.10.0.20".into(),
            target_fe_id: "fe3".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Re-declaring with another MAC would orphan the bound VM.
    let err = c
        .binding
        .declare_vm(DeclareVmRequest {
            vm_ip: "10.10.0.20".into(),
            mac: "02:00:00:00:00:21".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Announce + commit moves without an ARP; undeclare with remove_binding removes everything.
    c.binding
        .declare_vm(DeclareVmRequest {
            vm_ip: "10.10.0.20".into(),
            mac: "02:00:00:00:00:20".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let moved = c
        .binding
        .announce_migration(AnnounceMigrationRequest {
            vm_ip: "10.10.0.20".into(),
            target_fe_id: "fe3".into(),
            commit: true,
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .binding
        .unwrap();
    assert_eq!((moved.fe_id.as_str(), moved.move_seq, moved.source), ("fe3", 1, BindingSource::Orchestrator as i32));
    c.binding.undeclare_vm(UndeclareVmRequest { vm_ip: "10.10.0.20".into(), remove_binding: true }).await.unwrap();
    assert_eq!(binding(&mut c, "10.10.0.20").await.unwrap_err().code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn flap_damping_freezes_and_operator_clears() {
    let (_dir, server, mut c) = start().await;
    register(&mut c, "fe2", 2, "a").await;
    register(&mut c, "fe3", 3, "a").await;
    let t = unix_nanos();
    assert_eq!(outcome(&learn_at(&mut c, "fe2", "10.10.0.30", mac(30), t).await), ClaimOutcome::Bound);
    for i in 1..=6 {
        let fe = if i % 2 == 1 { "fe3" } else { "fe2" };
        let r = learn_at(&mut c, fe, "10.10.0.30", mac(30), t + i).await;
        assert_eq!(outcome(&r), ClaimOutcome::Moved, "move {i}: {r:?}");
    }
    let b = binding(&mut c, "10.10.0.30").await.unwrap();
    assert!(b.frozen, "6 moves in the window must freeze the binding");
    let r = learn_at(&mut c, "fe3", "10.10.0.30", mac(30), t + 10).await;
    assert_eq!(r.reject_reason, RejectReason::Damped as i32);
    let metrics = victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap().1;
    assert_eq!(victor_testkit::http::metric(&metrics, "victor_damping_frozen_total", "family=\"ipv4\""), 1.0);
    assert_eq!(victor_testkit::http::metric(&metrics, "victor_bindings_frozen", "family=\"ipv4\""), 1.0);
    let cleared = c
        .binding
        .clear_damping(ClearDampingRequest { vm_ip: "10.10.0.30".into() })
        .await
        .unwrap()
        .into_inner()
        .binding
        .unwrap();
    assert!(!cleared.frozen);
    let err = c.binding.clear_damping(ClearDampingRequest { vm_ip: "10.10.0.30".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(outcome(&learn_at(&mut c, "fe3", "10.10.0.30", mac(30), t + 20).await), ClaimOutcome::Moved);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn agent_stream_snapshot_then_deltas_and_resume_without_snapshot() {
    let (_dir, server, mut c) = start().await;
    register(&mut c, "fe1", 1, "a").await;
    register(&mut c, "fe2", 2, "a").await;
    learn(&mut c, "fe2", "10.10.0.11", mac(11)).await;

    let mut stream = c.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: 0 }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.reset);
    assert_eq!(first.mobile_prefixes, vec![PREFIX.to_string()]);
    assert_eq!(first.phase, SyncPhase::SnapshotEnd as i32, "one small snapshot message");
    assert_eq!(first.binding_upserts.len(), 1);
    assert_eq!(first.binding_upserts[0].fe_id, "fe2");
    let mut fes: Vec<_> = first.fe_upserts.iter().map(|f| (f.fe_id.clone(), f.underlay_addr.clone(), f.up)).collect();
    fes.sort();
    assert_eq!(fes, vec![("fe1".into(), vec![192, 0, 2, 1], true), ("fe2".into(), vec![192, 0, 2, 2], true)]);

    let r = learn(&mut c, "fe1", "10.10.0.11", mac(11)).await;
    let delta = next_matching(&mut stream, Duration::from_secs(5), |m| !m.binding_upserts.is_empty()).await;
    assert_eq!(delta.phase, SyncPhase::Delta as i32);
    assert_eq!((delta.binding_upserts[0].fe_id.as_str(), delta.binding_upserts[0].move_seq), ("fe1", 1));
    assert!(delta.revision >= r.revision);
    let resume_at = delta.revision;
    drop(stream);

    // Changes while the agent is away arrive as deltas when it resumes from its revision.
    learn(&mut c, "fe2", "10.10.0.12", mac(12)).await;
    c.binding.undeclare_vm(UndeclareVmRequest { vm_ip: "10.10.0.99".into(), remove_binding: false }).await.unwrap_err();
    let snapshots = |m: &str| victor_testkit::http::metric(m, "victor_snapshots_sent_total", "");
    let before = snapshots(&victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap().1);
    let mut stream =
        c.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: resume_at }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.phase, SyncPhase::Delta as i32, "resume must not start with a snapshot: {first:?}");
    assert!(!first.reset);
    assert_eq!(first.binding_upserts.iter().map(|b| b.vm_ip.clone()).collect::<Vec<_>>(), vec![ip_bytes("10.10.0.12")]);
    let after = snapshots(&victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap().1);
    assert_eq!(before, after, "no snapshot was sent for a resume");

    // Heartbeats keep an idle stream alive with the current revision.
    let hb = next_matching(&mut stream, Duration::from_secs(3), |m| m.phase == SyncPhase::Heartbeat as i32).await;
    assert!(hb.revision >= first.revision);

    // A removal is a delta with the removal's revision.
    c.agent
        .report(ReportRequest {
            fe_id: "fe2".into(),
            observations: vec![observation("10.10.0.12", mac(12), ObservationKind::Gone, unix_nanos())],
        })
        .await
        .unwrap();
    let removal = next_matching(&mut stream, Duration::from_secs(5), |m| !m.binding_removals.is_empty()).await;
    assert_eq!(removal.binding_removals[0].vm_ip, ip_bytes("10.10.0.12"));
    assert!(removal.binding_removals[0].revision > first.revision);

    // A revision older than this replica's own history is served from the store's history
    // (backfill): deltas replaying every change, not a snapshot.
    let mut stream = c.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: 1 }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.reset && first.phase == SyncPhase::Delta as i32, "{first:?}");
    assert!(first.binding_upserts.iter().any(|b| b.vm_ip == ip_bytes("10.10.0.11")), "{first:?}");
    assert!(first.binding_removals.iter().any(|b| b.vm_ip == ip_bytes("10.10.0.12")), "{first:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn watch_and_paged_listing() {
    let (_dir, server, mut c) = start().await;
    register(&mut c, "fe2", 2, "a").await;
    register(&mut c, "fe3", 3, "a").await;
    for i in 1..=25u8 {
        let fe = if i % 2 == 0 { "fe2" } else { "fe3" };
        assert_eq!(outcome(&learn(&mut c, fe, &format!("10.10.0.{i}"), mac(i)).await), ClaimOutcome::Bound);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .binding
            .list_bindings(ListBindingsRequest { page_size: 10, page_token: token, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.bindings.into_iter().map(|b| b.vm_ip));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (1..=25).map(|i| format!("10.10.0.{i}")).collect();
    assert_eq!(seen, expected, "every binding once, in IP order");
    let fe2_only = c
        .binding
        .list_bindings(ListBindingsRequest { fe_id: "fe2".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fe2_only.bindings.len(), 12);
    let prefixed = c
        .binding
        .list_bindings(ListBindingsRequest { prefix: "10.10.0.0/29".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(prefixed.bindings.len(), 7);
    let fes = c.binding.list_fes(ListFesRequest {}).await.unwrap().into_inner().fes;
    assert_eq!(
        fes.iter().map(|f| (f.fe_id.as_str(), f.binding_count)).collect::<Vec<_>>(),
        vec![("fe2", 12), ("fe3", 13)]
    );

    let mut watch = c
        .binding
        .watch_bindings(WatchBindingsRequest {
            include_snapshot: true,
            prefix: "10.10.0.0/30".into(),
            from_revision: 0,
            fe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap = watch.message().await.unwrap().unwrap();
    assert!(snap.snapshot_done);
    assert_eq!(snap.events.len(), 3);
    learn(&mut c, "fe2", "10.10.0.1", mac(1)).await; // a move inside the watched prefix
    learn(&mut c, "fe2", "10.10.0.9", mac(9)).await; // outside: not delivered
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = watch.message().await.unwrap().unwrap();
            if let Some(e) = m.events.into_iter().next() {
                return e;
            }
        }
    })
    .await
    .unwrap();
    let b = event.binding.unwrap();
    assert_eq!(
        (event.kind, b.vm_ip.as_str(), b.fe_id.as_str(), b.move_seq),
        (BindingEventKind::Upsert as i32, "10.10.0.1", "fe2", 1)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_reflection_metrics_and_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &[]).await;
    let mut c = connect(server.grpc_addr).await;

    let health = tonic_health::pb::health_client::HealthClient::new(c.channel.clone());
    for service in ["", "victor.v1.AgentService", "victor.v1.BindingService"] {
        // Health follows readiness (checked every 100 ms), so it turns SERVING shortly after /readyz.
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        let status = victor_testkit::process::wait_for("gRPC health SERVING", Duration::from_secs(5), || {
            let mut health = health.clone();
            async move {
                let resp = health
                    .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
                    .await
                    .ok()?
                    .into_inner();
                (resp.status == serving).then_some(resp.status)
            }
        })
        .await;
        assert!(status.is_ok(), "{service} never became SERVING");
    }
    let services = list_services(c.channel.clone()).await;
    for s in ["victor.v1.AgentService", "victor.v1.BindingService", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|x| x == s), "reflection lacks {s}: {services:?}");
    }
    let (code, body) = victor_testkit::http::get(server.http_addr, "/healthz").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    register(&mut c, "fe2", 2, "a").await;
    learn(&mut c, "fe2", "10.10.0.11", mac(11)).await;
    // The housekeeper is elected in the background: wait for it rather than race it.
    let elected = victor_testkit::process::wait_for("housekeeper elected", Duration::from_secs(10), || async {
        let (_, metrics) = victor_testkit::http::get(server.http_addr, "/metrics").await.ok()?;
        (victor_testkit::http::metric(&metrics, "victor_housekeeper", "") == 1.0).then_some(())
    })
    .await;
    assert!(elected.is_ok(), "no housekeeper elected");
    let (code, metrics) = victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(victor_testkit::http::metric(&metrics, "victor_bindings", "family=\"ipv4\""), 1.0);
    assert_eq!(victor_testkit::http::metric(&metrics, "victor_claims_total", "outcome=\"bound\",family=\"ipv4\""), 1.0);
    assert_eq!(victor_testkit::http::metric(&metrics, "victor_fes", "state=\"up\""), 1.0);
    assert_eq!(victor_testkit::http::metric(&metrics, "victor_housekeeper", ""), 1.0);
    let status = status(&mut c).await;
    assert_eq!((status.store_kind.as_str(), status.binding_count, status.store_reachable), ("embedded", 1, true));
    assert_eq!(status.housekeeper_id, server.replica_id);
    server.shutdown().await.unwrap();

    // The embedded store keeps everything across a restart on the same data dir.
    let server = embedded(dir.path(), &[]).await;
    let mut c = connect(server.grpc_addr).await;
    let b = binding(&mut c, "10.10.0.11").await.unwrap();
    assert_eq!((b.fe_id.as_str(), b.mac.as_str()), ("fe2", "02:00:00:00:00:0b"));
    server.shutdown().await.unwrap();
}

async fn list_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    match resp.message().await.unwrap().unwrap().message_response.unwrap() {
        MessageResponse::ListServicesResponse(list) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_resumes_across_a_controller_restart_from_the_stores_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &[]).await;
    let mut c = connect(server.grpc_addr).await;
    register(&mut c, "fe1", 1, "a").await;
    register(&mut c, "fe2", 2, "a").await;
    learn(&mut c, "fe2", "10.10.0.11", mac(11)).await;
    let mut stream = c.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: 0 }).await.unwrap().into_inner();
    let snapshot =
        next_matching(&mut stream, Duration::from_secs(5), |m| m.phase == SyncPhase::SnapshotEnd as i32).await;
    let held = snapshot.revision;
    drop(stream);
    server.shutdown().await.unwrap();

    // Every replica is gone; a new one starts (its own history begins at its load). Changes happen
    // before the agent comes back.
    let server = embedded(dir.path(), &[]).await;
    let mut c = connect(server.grpc_addr).await;
    register(&mut c, "fe2", 2, "a").await;
    learn(&mut c, "fe2", "10.10.0.12", mac(12)).await;
    learn(&mut c, "fe1", "10.10.0.11", mac(11)).await;
    let mut stream = c.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: held }).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.phase, SyncPhase::Delta as i32, "resume after a restart must not be a snapshot: {first:?}");
    assert!(!first.reset);
    let mut latest: std::collections::BTreeMap<Vec<u8>, (u64, String)> = Default::default();
    for b in &first.binding_upserts {
        let e = latest.entry(b.vm_ip.clone()).or_insert((0, String::new()));
        if b.revision > e.0 {
            *e = (b.revision, b.fe_id.clone());
        }
    }
    assert_eq!(latest.get(&ip_bytes("10.10.0.12")).map(|e| e.1.as_str()), Some("fe2"), "{first:?}");
    assert_eq!(latest.get(&ip_bytes("10.10.0.11")).map(|e| e.1.as_str()), Some("fe1"), "{first:?}");
    assert!(first.fe_upserts.iter().any(|f| f.fe_id == "fe2"), "the FE table comes along: {first:?}");
    let metrics = victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap().1;
    assert_eq!(victor_testkit::http::metric(&metrics, "victor_snapshots_sent_total", ""), 0.0);
    server.shutdown().await.unwrap();
}

/// `family="ipv4|ipv6"` on the binding-level series of a real /metrics scrape: bindings,
/// declarations, claims by outcome (bind, move, removal, rejection), moves and binding watch events.
#[tokio::test]
async fn metrics_split_bindings_claims_moves_and_watch_events_by_address_family() {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &["--mobile-prefix", "fd00:10::/64"]).await;
    let mut c = connect(server.grpc_addr).await;
    register(&mut c, "fe2", 2, "a").await;
    register(&mut c, "fe3", 3, "b").await;
    let t = unix_nanos();
    for (ip, last) in [("10.10.0.41", 41), ("fd00:10::41", 42), ("fd00:10::42", 43)] {
        assert_eq!(outcome(&learn_at(&mut c, "fe2", ip, mac(last), t).await), ClaimOutcome::Bound, "{ip}");
    }
    assert_eq!(outcome(&learn_at(&mut c, "fe3", "fd00:10::41", mac(42), t + 1).await), ClaimOutcome::Moved);
    let outside = learn_at(&mut c, "fe2", "2001:db8::1", mac(44), t).await;
    assert_eq!(outside.reject_reason, RejectReason::OutsideMobilePrefix as i32, "{outside:?}");
    let gone = ReportRequest {
        fe_id: "fe2".into(),
        observations: vec![observation("fd00:10::42", mac(43), ObservationKind::Gone, t + 2)],
    };
    let gone = c.agent.report(gone).await.unwrap().into_inner().results.remove(0);
    assert_eq!(outcome(&gone), ClaimOutcome::Removed, "{gone:?}");
    c.binding
        .declare_vm(DeclareVmRequest {
            vm_ip: "fd00:10::50".into(),
            mac: "02:00:00:00:00:50".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A watch's snapshot: the two live bindings, one per family.
    let request = WatchBindingsRequest { include_snapshot: true, ..Default::default() };
    let mut watch = c.binding.watch_bindings(request).await.unwrap().into_inner();
    let mut watched = Vec::new();
    loop {
        let m = watch.message().await.unwrap().unwrap();
        watched.extend(m.events.into_iter().map(|e| e.binding.unwrap().vm_ip));
        if m.snapshot_done {
            break;
        }
    }
    watched.sort();
    assert_eq!(watched, ["10.10.0.41", "fd00:10::41"]);

    let metrics = victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap().1;
    let m = |name: &str, labels: &str| victor_testkit::http::metric(&metrics, name, labels);
    let expected = [
        ("victor_bindings", r#"family="ipv4""#, 1.0),
        ("victor_bindings", r#"family="ipv6""#, 1.0),
        ("victor_vms_declared", r#"family="ipv4""#, 0.0),
        ("victor_vms_declared", r#"family="ipv6""#, 1.0),
        ("victor_claims_total", r#"outcome="bound",family="ipv4""#, 1.0),
        ("victor_claims_total", r#"outcome="bound",family="ipv6""#, 2.0),
        ("victor_claims_total", r#"outcome="moved",family="ipv4""#, 0.0),
        ("victor_claims_total", r#"outcome="moved",family="ipv6""#, 1.0),
        ("victor_claims_total", r#"outcome="removed",family="ipv6""#, 1.0),
        ("victor_claims_total", r#"outcome="rejected",family="ipv6""#, 1.0),
        ("victor_claims_total", r#"outcome="rejected",family="ipv4""#, 0.0),
        ("victor_claims_rejected_total", r#"reason="outside_mobile_prefix",family="ipv6""#, 1.0),
        ("victor_moves_total", r#"family="ipv4""#, 0.0),
        ("victor_moves_total", r#"family="ipv6""#, 1.0),
        ("victor_watch_events_total", r#"family="ipv4""#, 1.0),
        ("victor_watch_events_total", r#"family="ipv6""#, 1.0),
    ];
    let got: Vec<_> = expected.iter().map(|(name, labels, _)| (*name, *labels, m(name, labels))).collect();
    assert_eq!(got, expected, "\n{metrics}");
    // Both families are always exposed by the gauges, with the label.
    assert!(metrics.lines().any(|l| l == r#"victor_bindings{family="ipv4"} 1"#), "{metrics}");
    assert!(!metrics.lines().any(|l| l.starts_with("victor_bindings ")), "unlabelled series left: {metrics}");
    server.shutdown().await.unwrap();
}
