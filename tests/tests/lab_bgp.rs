//! The migration testbed with the BGP anycast ingress (`--bgp`): the client sits behind an
//! `upstream` router running real BIRD 2 that learns the mobile prefix from every FE's agent.
//! A short `migrate --bgp` (the VM answers after every move and every FE points where it should,
//! checked inside `migrate::run`; the report names the anycast path), and `up --bgp` / `down`
//! (the lab answers through the upstream, and `down` stops BIRD with everything else).

use std::process::Command;
use std::time::Duration;

use victor_tests::lab::bgp;
use victor_tests::lab::migrate::{self, MigrateArgs};
use victor_tests::lab::state::LabState;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_through_the_bgp_upstream() {
    victor_testkit::require_root("the migration lab");
    let args = MigrateArgs {
        moves: 2,
        ping_interval_ms: 10,
        etcd_members: 0,
        settle_ms: 100,
        bgp: true,
        ..Default::default()
    };
    let report = migrate::run(&args).await.expect("migrate --bgp");
    println!("{}", serde_json::to_string(&report).unwrap());
    assert_eq!(report.moves, 2);
    let path = report.bgp.as_ref().expect("the report names the anycast path");
    assert_eq!(path.paths, ["fe1", "fe2", "fe3"], "the upstream learned the prefix from every FE");
    assert_eq!(path.ingress_fe, "fe1");
    assert!(path.router.starts_with("BIRD 2"), "{}", path.router);
    for (i, m) in report.per_move.iter().enumerate() {
        assert_eq!(m.move_seq, i as u64 + 1);
        assert_eq!(m.applied_ms.len(), 3, "every FE applied move {}", m.index);
        assert!(m.convergence_ms > 0.0 && m.convergence_ms < 5_000.0, "{}", m.convergence_ms);
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["bgp"]["ingress_fe"], "fe1");
    assert!(json["bgp"]["client_source"].as_str().is_some_and(|s| s.starts_with("192.0.2.")));
}

#[test]
fn up_bgp_then_down_stops_bird_too() {
    victor_testkit::require_root("victor-lab up --bgp");
    let lab = env!("CARGO_BIN_EXE_victor-lab");
    let name = victor_testkit::unique_name("vlb");
    let out = Command::new(lab).args(["up", "--name", &name, "--etcd-members", "0", "--bgp"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "up --bgp failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ECMP over fe1, fe2, fe3") && stdout.contains("birdc -s"), "{stdout}");
    let state = LabState::load(&name).unwrap().expect("up records its state");
    let bird = state.processes.iter().find(|p| p.role == "bird-upstream").expect("BIRD is recorded").clone();
    assert_eq!(bird.exe, std::path::Path::new(bgp::BIRD));
    assert!(state.namespaces.contains(&format!("{name}-upstream")), "{:?}", state.namespaces);

    // The lab answers through the upstream.
    let mut client = victor_testkit::netns::NetNs::adopt(&format!("{name}-client"));
    client.make_persistent();
    let prober =
        victor_tests::lab::probe::Prober::start(&client, "10.10.0.11".parse().unwrap(), Duration::from_millis(10))
            .unwrap();
    prober.wait_replies_from(0, 5, Duration::from_secs(10)).expect("the VM answers through the BGP upstream");
    drop(prober);

    let out = Command::new(lab).args(["down", "--name", &name]).output().unwrap();
    assert!(out.status.success(), "down failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        std::fs::read_link(format!("/proc/{}/exe", bird.pid)).ok().as_deref() != Some(std::path::Path::new(bgp::BIRD)),
        "BIRD (pid {}) still runs after down",
        bird.pid
    );
    let namespaces = victor_testkit::netns::list_namespaces().unwrap();
    for ns in &state.namespaces {
        assert!(!namespaces.contains(ns), "namespace {ns} left behind");
    }
}
