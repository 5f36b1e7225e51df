//! MAC claims (`OBSERVATION_KIND_MAC_LEARNED`, what an FE reports for a RARP frame) as an outside
//! client sees them: nothing but the generated `victor.v1` client against a controller on its
//! embedded store. IPv4-only, IPv6-only and dual-stack VMs, declared and undeclared, are moved by
//! one MAC claim from another FE, all at one revision; a MAC claim made knowing too little is
//! STALE per IP; a MAC nobody has is a clear per-claim answer, not a failed Report.

mod common;

use std::net::IpAddr;

use common::*;
use victor_proto::Mac;
use victor_proto::clock::unix_nanos;
use victor_proto::types::ip_to_bytes;
use victor_proto::v1::*;

const S: i64 = 1_000_000_000;
const V6_PREFIX: &str = "fd00:10::/64";

async fn start() -> (tempfile::TempDir, victor_controller::server::Server, Clients) {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &["--mobile-prefix", V6_PREFIX]).await;
    let mut clients = connect(server.grpc_addr).await;
    register(&mut clients, "fe2", 2, "site-a").await;
    register(&mut clients, "fe3", 3, "site-a").await;
    (dir, server, clients)
}

/// A MAC claim as a client written from the proto sends it: no IP, the MAC, when, what it knew.
fn mac_claim(m: Mac, at: i64, known: Option<u64>) -> VmObservation {
    VmObservation {
        vm_ip: vec![],
        mac: m.octets().to_vec(),
        kind: ObservationKind::MacLearned as i32,
        observed_at_unix_nanos: at,
        port: "vm0".into(),
        known_revision: known,
    }
}

async fn report(c: &mut Clients, fe: &str, observations: Vec<VmObservation>) -> Vec<ClaimResult> {
    let req = ReportRequest { fe_id: fe.into(), observations };
    c.agent.report(req).await.expect("report").into_inner().results
}

/// The per-IP answers of an expanded MAC claim: (IP, outcome, reason, revision).
fn per_ip(r: &ClaimResult) -> Vec<(IpAddr, ClaimOutcome, RejectReason, u64)> {
    assert_eq!(outcome(r), ClaimOutcome::Expanded, "{r:?}");
    r.ip_results
        .iter()
        .map(|i| {
            let ip = victor_proto::types::ip_from_bytes(&i.vm_ip).unwrap();
            (ip, outcome(i), RejectReason::try_from(i.reject_reason).unwrap(), i.revision)
        })
        .collect()
}

async fn declare(c: &mut Clients, ip: &str, m: Mac) {
    let req = DeclareVmRequest { vm_ip: ip.into(), mac: m.to_string(), ..Default::default() };
    c.binding.declare_vm(req).await.expect("declare");
}

async fn bound_at(c: &mut Clients, ip: &str) -> String {
    binding(c, ip).await.expect("binding").fe_id
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn one_mac_claim_moves_ipv4_ipv6_and_dual_stack_vms_declared_or_not() {
    let (_dir, _server, mut c) = start().await;
    let t = unix_nanos();
    // (VM, its addresses, declared?): every VM bound at fe2 by its own LEARNED of each address.
    let vms: [(u8, &[&str], bool); 6] = [
        (1, &["10.10.0.1"], false),
        (2, &["fd00:10::2"], false),
        (3, &["10.10.0.3", "fd00:10::3"], false),
        (4, &["10.10.0.4"], true),
        (5, &["fd00:10::5"], true),
        (6, &["10.10.0.6", "fd00:10::6"], true),
    ];
    let mut known = 0;
    for (n, ips, declared) in vms {
        for a in ips {
            if declared {
                declare(&mut c, a, mac(n)).await;
            }
            let r = learn_at(&mut c, "fe2", a, mac(n), t).await;
            assert_eq!(outcome(&r), ClaimOutcome::Bound, "{a}: {r:?}");
            known = known.max(r.revision);
        }
    }
    // Each VM announces itself at fe3 with its MAC alone (e.g. QEMU's RARP after a migration).
    for (n, ips, _) in vms {
        let r = report(&mut c, "fe3", vec![mac_claim(mac(n), t + S, Some(known))]).await.remove(0);
        let answers = per_ip(&r);
        let expected: Vec<_> =
            ips.iter().map(|a| (ip(a), ClaimOutcome::Moved, RejectReason::Unspecified, r.revision)).collect();
        assert_eq!(answers, expected, "VM {n}: every address, one revision");
        assert!(r.vm_ip.is_empty() && r.revision > known);
        for a in ips {
            assert_eq!(bound_at(&mut c, a).await, "fe3", "{a}");
            assert_eq!(binding(&mut c, a).await.unwrap().move_seq, 1);
        }
        known = r.revision;
    }
    // A declared address never seen yet is bound by its MAC's claim too.
    declare(&mut c, "fd00:10::16", mac(6)).await;
    let r = report(&mut c, "fe2", vec![mac_claim(mac(6), t + 2 * S, Some(known + 1))]).await.remove(0);
    let outcomes: Vec<_> = per_ip(&r).into_iter().map(|(ip, o, _, _)| (ip, o)).collect();
    assert_eq!(
        outcomes,
        vec![
            (ip("10.10.0.6"), ClaimOutcome::Moved),
            (ip("fd00:10::6"), ClaimOutcome::Moved),
            (ip("fd00:10::16"), ClaimOutcome::Bound)
        ]
    );
}

#[tokio::test]
async fn a_stale_mac_claim_is_refused_per_ip_with_the_revision_to_wait_for() {
    let (_dir, _server, mut c) = start().await;
    let t = unix_nanos();
    let v4 = learn_at(&mut c, "fe2", "10.10.0.7", mac(7), t).await;
    let v6 = learn_at(&mut c, "fe2", "fd00:10::7", mac(7), t).await;
    // fe3 saw the RARP before it knew either binding.
    let r = report(&mut c, "fe3", vec![mac_claim(mac(7), t + S, Some(v4.revision - 1))]).await.remove(0);
    assert_eq!(
        per_ip(&r),
        vec![
            (ip("10.10.0.7"), ClaimOutcome::Rejected, RejectReason::Stale, v4.revision),
            (ip("fd00:10::7"), ClaimOutcome::Rejected, RejectReason::Stale, v6.revision)
        ]
    );
    assert_eq!(r.revision, 0, "nothing written");
    assert_eq!(r.ip_results[0].code, tonic::Code::FailedPrecondition as i32);
    assert_eq!(bound_at(&mut c, "10.10.0.7").await, "fe2");
    assert_eq!(bound_at(&mut c, "fd00:10::7").await, "fe2");
    // Once it knows them, the same VM's next announcement moves both.
    let r = report(&mut c, "fe3", vec![mac_claim(mac(7), t + 2 * S, Some(v6.revision))]).await.remove(0);
    assert!(per_ip(&r).iter().all(|(_, o, _, rev)| *o == ClaimOutcome::Moved && *rev == r.revision), "{r:?}");
}

#[tokio::test]
async fn unknown_and_malformed_mac_claims_are_answered_alone_in_their_report() {
    let (_dir, _server, mut c) = start().await;
    let t = unix_nanos();
    let with_ip = VmObservation { vm_ip: ip_to_bytes(ip("10.10.0.9")), ..mac_claim(mac(9), t, None) };
    let multicast = VmObservation { mac: vec![1, 0, 0x5e, 0, 0, 1], ..mac_claim(mac(9), t, None) };
    let results = report(
        &mut c,
        "fe2",
        vec![
            mac_claim(mac(8), t, None),
            observation("10.10.0.9", mac(9), ObservationKind::Learned, t),
            with_ip,
            multicast,
            mac_claim(mac(9), t + S, None),
        ],
    )
    .await;
    let summary: Vec<_> = results
        .iter()
        .map(|r| (outcome(r), RejectReason::try_from(r.reject_reason).unwrap(), r.ip_results.len()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (ClaimOutcome::Rejected, RejectReason::UnknownMac, 0),
            (ClaimOutcome::Bound, RejectReason::Unspecified, 0),
            (ClaimOutcome::Rejected, RejectReason::Malformed, 0),
            (ClaimOutcome::Rejected, RejectReason::Malformed, 0),
            // After the report's per-IP observations: it finds the address bound a moment ago.
            (ClaimOutcome::Expanded, RejectReason::Unspecified, 1),
        ]
    );
    assert_eq!(results[0].code, tonic::Code::NotFound as i32);
    assert!(results[0].message.contains("02:00:00:00:00:08"), "{}", results[0].message);
    assert_eq!(outcome(&results[4].ip_results[0]), ClaimOutcome::Unchanged);
}

#[tokio::test]
async fn a_mac_claim_sent_with_the_learned_of_its_frame_adds_no_write() {
    let (_dir, _server, mut c) = start().await;
    let t = unix_nanos();
    let v4 = learn_at(&mut c, "fe2", "10.10.0.21", mac(21), t).await;
    declare(&mut c, "fd00:10::21", mac(21)).await;
    // fe3's agent saw the RARP: a LEARNED for the address it knew, and the MAC claim, stamped
    // just before it (one frame, one instant), in one Report.
    let learned = VmObservation {
        known_revision: Some(v4.revision),
        ..observation("10.10.0.21", mac(21), ObservationKind::Learned, t + 2)
    };
    let results = report(&mut c, "fe3", vec![learned, mac_claim(mac(21), t + 1, Some(v4.revision))]).await;
    assert_eq!(outcome(&results[0]), ClaimOutcome::Moved);
    let answers = per_ip(&results[1]);
    assert_eq!(
        answers,
        vec![
            (ip("10.10.0.21"), ClaimOutcome::Unchanged, RejectReason::Unspecified, 0),
            (ip("fd00:10::21"), ClaimOutcome::Bound, RejectReason::Unspecified, results[1].revision)
        ],
        "the address the LEARNED moved is not written again; the one only the MAC claim knew is bound"
    );
    assert_eq!(binding(&mut c, "10.10.0.21").await.unwrap().revision, results[0].revision);
}
