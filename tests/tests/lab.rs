//! The migration testbed end to end (short runs; numbers are benchmark output, not assertions):
//! the VM answers after every move and every FE points at the right place (checked inside each
//! move by `migrate::run`), and the report has every field with sane values — with a 1-member
//! etcd and move hints, and with the embedded store and without hints, in both switch modes, on
//! the userspace data plane; and once on the kernel data plane (`SKIPPED` where the kernel's ipip
//! module cannot be loaded); and with FE clocks seconds apart, as fast and with no more loss than
//! with clocks in agreement; and a dual-stack VM announced only by QEMU's RARP frames. The report
//! names the data plane that ran. Moves are announced to the controller first (AnnounceMigration
//! without commit: the old and the new FE's agents applied it before the move), but in the run
//! without move hints (`--no-announce` too: the controller's claim path alone); a refused
//! announcement says why.
//! `victor-lab up`/`down` leave nothing behind, also when a process of the lab died.

use std::process::Command;
use std::time::Duration;

use victor_fe_agent::forwarding::DataplaneMode;
use victor_tests::lab::announce::{Announce, Family};
use victor_tests::lab::controlplane::ControlPlane;
use victor_tests::lab::migrate::{self, MigrateArgs, MigrateReport, SwitchMode};
use victor_tests::lab::state::LabState;
use victor_tests::lab::topology::VmSpec;

fn check(report: &MigrateReport, args: &MigrateArgs) {
    assert_eq!(report.moves, args.moves);
    assert_eq!(
        (report.ping_interval_ms, report.etcd_members, report.switch),
        (args.ping_interval_ms, args.etcd_members, args.switch)
    );
    let plane = args.dataplane.label();
    assert!(report.dataplane.starts_with(&format!("{plane} (")), "asked for {plane}, ran {}", report.dataplane);
    assert!(report.probes_sent as u64 > 50, "{} probes", report.probes_sent);
    assert!(report.lost_max_per_move <= report.lost_total && report.lost_during_link_switch <= report.lost_total);
    for (i, m) in report.per_move.iter().enumerate() {
        let (from, to) = if i % 2 == 0 { ("fe2", "fe3") } else { ("fe3", "fe2") };
        assert_eq!((m.from.as_str(), m.to.as_str()), (from, to), "move {}", m.index);
        assert_eq!(m.move_seq, i as u64 + 1, "each move increments move_seq by one");
        assert!(
            m.convergence_ms > 0.0 && m.convergence_ms < 5_000.0,
            "move {}: convergence {} ms",
            m.index,
            m.convergence_ms
        );
        assert!(m.link_switch_ms > 0.0, "move {}: link switch not measured", m.index);
        assert_eq!(m.applied_ms.len(), 3, "move {}: every FE applied it: {:?}", m.index, m.applied_ms);
        for stage in ["capture_to_local_install", "capture_to_claim_sent", "claim_rpc", "store_commit", "convergence"] {
            let v = m
                .stages_ms
                .get(stage)
                .unwrap_or_else(|| panic!("move {}: stage {stage} missing: {:?}", m.index, m.stages_ms));
            assert!(*v >= 0.0 && *v < 5_000.0, "move {}: {stage} = {v} ms", m.index);
        }
        // Make-before-break on the new FE: the local route went in before the claim was answered.
        assert!(m.stages_ms["capture_to_local_install"] <= m.convergence_ms);
        // The data plane converges no later than the controller's path, and no earlier than the
        // new FE's own local install.
        assert!(
            m.dataplane_convergence_ms > 0.0
                && m.dataplane_convergence_ms <= m.convergence_ms
                && m.dataplane_convergence_ms >= m.stages_ms["capture_to_local_install"],
            "move {}: data plane {} ms, convergence {} ms, local install {} ms",
            m.index,
            m.dataplane_convergence_ms,
            m.convergence_ms,
            m.stages_ms["capture_to_local_install"]
        );
        assert_eq!(m.dataplane_applied_ms.len(), 3, "move {}: {:?}", m.index, m.dataplane_applied_ms);
        assert!(m.hints_applied <= 2, "only the two other FEs take a hint");
        if args.move_hints {
            assert!(m.stages_ms.contains_key("capture_to_hint_sent"), "move {}: the new FE sent no hint", m.index);
        } else {
            assert_eq!(m.hints_applied, 0);
        }
        assert_eq!(m.migration_announced, !args.no_announce, "move {}", m.index);
        if m.migration_announced {
            // Both FEs concerned applied the announcement (the lab waits up to 2 s for them).
            let fes: Vec<&str> = m.announce_applied_ms.keys().map(String::as_str).collect();
            let mut expected = [from, to];
            expected.sort();
            assert_eq!(fes, expected, "move {}: announcement applied {:?}", m.index, m.announce_applied_ms);
        } else {
            assert!(m.announce_applied_ms.is_empty());
        }
    }
    assert_eq!(report.migration_announced, !args.no_announce);
    let c = report.convergence_ms;
    assert!(c.p50 > 0.0 && c.p50 <= c.p99 && c.p99 <= c.max);
    let d = report.dataplane_convergence_ms;
    assert!(d.p50 > 0.0 && d.p50 <= d.p99 && d.p99 <= d.max && d.max <= c.max, "{d:?} vs {c:?}");
    assert_eq!(report.move_hints, args.move_hints);
    if args.move_hints {
        // A hint crosses the underlay in well under the store commit and stream: over a few
        // moves at least one FE forwards on a hint before the delta.
        assert!(report.hints_applied >= 1, "no FE ever acted on a hint before the delta");
    }
    let json: serde_json::Value = serde_json::to_value(report).unwrap();
    for key in [
        "moves",
        "ping_interval_ms",
        "etcd_members",
        "dataplane",
        "lost_total",
        "lost_max_per_move",
        "link_switch_ms",
        "convergence_ms",
        "dataplane_convergence_ms",
        "stages_ms",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}");
    }
    for key in ["p50", "p99", "max"] {
        for summary in ["convergence_ms", "dataplane_convergence_ms", "link_switch_ms"] {
            assert!(json[summary].get(key).is_some(), "JSON lacks {summary}.{key}");
        }
    }
}

async fn run(dataplane: DataplaneMode, etcd_members: usize, switch: SwitchMode, move_hints: bool, announce: bool) {
    victor_testkit::require_root("the migration lab");
    let args = MigrateArgs {
        moves: 3,
        ping_interval_ms: 10,
        etcd_members,
        switch,
        settle_ms: 100,
        move_hints,
        dataplane,
        no_announce: !announce,
        ..MigrateArgs::default()
    };
    let report = migrate::run(&args).await.expect("migrate");
    println!("{}", serde_json::to_string(&report).unwrap());
    check(&report, &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_with_one_member_etcd() {
    run(DataplaneMode::Tun, 1, SwitchMode::Move, true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_with_the_embedded_store_make_before_break_without_move_hints() {
    run(DataplaneMode::Tun, 0, SwitchMode::Clone, false, false).await;
}

/// An announcement the controller refuses fails with its code and message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_migration_announcement_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let bin = victor_testkit::workspace_binary("victor-controller");
    let plane = ControlPlane::start(&bin, dir.path(), 0, 1, &[]).await.expect("controller");
    let vm: std::net::IpAddr = VmSpec::numbered(1).ip.into();
    let err = plane.announce_migration(&[vm], "fe9").await.expect_err("fe9 is not registered");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("AnnounceMigration({vm} to fe9, no commit) refused"))
            && text.contains("\"fe9\" is not registered"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_on_the_kernel_data_plane() {
    if let victor_dataplane::kernel::ModuleLoad::Unavailable(why) = victor_dataplane::kernel::load_module("ipip") {
        println!("SKIPPED: migrate_on_the_kernel_data_plane: the kernel's ipip module cannot be loaded here: {why}");
        return;
    }
    run(DataplaneMode::Kernel, 0, SwitchMode::Move, true, true).await;
}

/// A dual-stack VM announced only the way unmodified QEMU does after a live migration (RARP
/// frames naming its MAC, no IP): both addresses move with every announcement — the agent claims
/// every IP its desired state binds to the MAC, and the controller expands the MAC claim — and
/// the client pings both through the tunnels (IPv4 in IP-in-IP, IPv6 in 6in4) with per-family
/// losses in the report (printed; benchmarks measure).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_a_dual_stack_vm_announced_by_rarp() {
    victor_testkit::require_root("the migration lab");
    let args = MigrateArgs {
        moves: 2,
        ping_interval_ms: 10,
        etcd_members: 1,
        settle_ms: 100,
        dataplane: DataplaneMode::Tun,
        announce: Announce::Rarp,
        family: Family::Dual,
        ..MigrateArgs::default()
    };
    let report = migrate::run(&args).await.expect("migrate a dual-stack VM announced by RARP");
    println!("{}", serde_json::to_string(&report).unwrap());
    check(&report, &args);
    assert_eq!((report.announce, report.family), (Announce::Rarp, Family::Dual));
    let families: Vec<&str> = report.lost_total_by_family.keys().map(String::as_str).collect();
    assert_eq!(families, ["ipv4", "ipv6"], "losses are reported for both addresses");
    for m in &report.per_move {
        assert_eq!(m.lost_by_family.len(), 2, "move {}: {:?}", m.index, m.lost_by_family);
    }
    println!("lost per family over {} moves: {:?}", args.moves, report.lost_total_by_family);
}

/// FE clocks that disagree — fe2 5 s behind, fe3 5 s ahead (each agent shifts every time it
/// stamps, the kernel's ARP capture times included): VM moves between them converge as without
/// skew (the figures are printed side by side), move hints keep working, and no ping is lost
/// beyond the normal per-move loss. Ordered by FE clocks, every claim of fe2 was STALE until its
/// clock passed fe3's last observation: each move back to fe2 black-holed the VM for seconds
/// (`migrate` gives up on a move after 10 s), and hints between them fell outside the replay
/// window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moves_between_fes_with_skewed_clocks_converge_as_without_skew() {
    victor_testkit::require_root("the migration lab");
    let plain_args = MigrateArgs {
        moves: 6,
        ping_interval_ms: 10,
        etcd_members: 0,
        switch: SwitchMode::Move,
        settle_ms: 200,
        move_hints: true,
        // The ordering does not depend on the data plane: the one that runs everywhere.
        dataplane: DataplaneMode::Tun,
        ..MigrateArgs::default()
    };
    let skewed_args =
        MigrateArgs { fe_clock_offsets: vec![(2, "-5s".into()), (3, "+5s".into())], ..plain_args.clone() };
    let plain = migrate::run(&plain_args).await.expect("migrate, FE clocks in agreement");
    let skewed = migrate::run(&skewed_args).await.expect("migrate, fe2 5 s behind and fe3 5 s ahead");
    println!("{:<32} {:>22} {:>22}", "", "clocks agree", "fe2 -5 s, fe3 +5 s");
    let row = |name: &str, f: &dyn Fn(&MigrateReport) -> String| {
        println!("{name:<32} {:>22} {:>22}", f(&plain), f(&skewed));
    };
    let summary = |s: migrate::Summary| format!("{:.2} / {:.2} / {:.2}", s.p50, s.p99, s.max);
    row("convergence p50/p99/max ms", &|r| summary(r.convergence_ms));
    row("data plane p50/p99/max ms", &|r| summary(r.dataplane_convergence_ms));
    row("lost total / max per move", &|r| format!("{} / {}", r.lost_total, r.lost_max_per_move));
    row("lost while switching the link", &|r| r.lost_during_link_switch.to_string());
    row("FEs that acted on a hint", &|r| r.hints_applied.to_string());
    row("GARPs until bound (max)", &|r| r.per_move.iter().map(|m| m.garps_sent).max().unwrap_or(0).to_string());
    check(&plain, &plain_args);
    check(&skewed, &skewed_args);
    assert_eq!(skewed.fe_clock_offsets.get("fe2").map(String::as_str), Some("-5s"));
    // The normal per-move loss: the paper's 1–2 at a 10 ms ping (docs/design.md, section 6;
    // BENCHMARKS.md, "Migration"), or whatever the run without skew lost on this machine if that
    // was more. What this guards against is the black hole of seconds (hundreds of pings) that
    // ordering by FE clocks made; the bound is twice the normal loss because two runs of six
    // moves on a host saturated by other tests differ by that much without any skew (a CI run
    // with two helpers compiling beside it: clocks in agreement 1 at most, skewed 4 in two moves,
    // with 4 and 11 GARPs until bound; the figures above are printed for that).
    let normal = plain.lost_max_per_move.max(2);
    assert!(
        skewed.lost_max_per_move <= 2 * normal,
        "skewed clocks lost {} pings in one move, without skew at most {} (bound {}): {:?}",
        skewed.lost_max_per_move,
        plain.lost_max_per_move,
        2 * normal,
        skewed.per_move.iter().map(|m| m.lost).collect::<Vec<_>>()
    );
}

#[test]
fn up_then_down_leaves_nothing_even_after_a_process_died() {
    victor_testkit::require_root("victor-lab up");
    let lab = env!("CARGO_BIN_EXE_victor-lab");
    let name = victor_testkit::unique_name("vlt");
    let out = Command::new(lab).args(["up", "--name", &name, "--etcd-members", "0"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "up failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("{name}-client")) && stdout.contains("victorctl --controller"), "{stdout}");
    let state = LabState::load(&name).unwrap().expect("up records its state");
    let namespaces = victor_testkit::netns::list_namespaces().unwrap();
    for ns in &state.namespaces {
        assert!(namespaces.contains(ns), "namespace {ns} missing while up");
    }
    assert!(state.processes.len() >= 4, "controller and three agents: {:?}", state.processes);
    // The lab works while up: the VM answers the client through fe1's tunnel.
    let mut client = victor_testkit::netns::NetNs::adopt(&format!("{name}-client"));
    client.make_persistent();
    let prober =
        victor_tests::lab::probe::Prober::start(&client, "10.10.0.11".parse().unwrap(), Duration::from_millis(10))
            .unwrap();
    prober.wait_replies_from(0, 5, Duration::from_secs(10)).expect("the VM answers while the lab is up");
    drop(prober);
    // One agent dies on its own; down still removes everything else.
    let agent = state.processes.iter().find(|p| p.role == "agent1").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    let out = Command::new(lab).args(["down", "--name", &name]).output().unwrap();
    assert!(out.status.success(), "down failed: {}", String::from_utf8_lossy(&out.stderr));
    let namespaces = victor_testkit::netns::list_namespaces().unwrap();
    for ns in &state.namespaces {
        assert!(!namespaces.contains(ns), "namespace {ns} left behind");
    }
    for p in &state.processes {
        assert!(
            !std::path::Path::new(&format!("/proc/{}", p.pid)).exists()
                || std::fs::read_link(format!("/proc/{}/exe", p.pid)).ok() != Some(p.exe.clone()),
            "{} (pid {}) still runs",
            p.role,
            p.pid
        );
    }
    assert!(LabState::load(&name).unwrap().is_none(), "the record is removed");
    let again = Command::new(lab).args(["down", "--name", &name]).output().unwrap();
    assert!(again.status.success() && String::from_utf8_lossy(&again.stdout).contains("no lab"));
}
