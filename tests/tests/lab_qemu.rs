//! The migration testbed with a real VM (`victor-lab migrate --vm qemu`), end to end: a QEMU
//! guest (stock kernel, busybox initramfs) is live-migrated fe2 → fe3 → fe2 over the underlay with
//! QMP's `migrate`. Inside each move `qemu::run` checks that the controller bound the VM to the
//! new FE, that every FE applied it and points where it should, and that the VM answers the
//! client again; here the report is checked: both moves are there, QEMU's figures and the pause
//! the lab saw are present, the new FE saw the guest's own GARP and QEMU's RARP, it bound the VM
//! from a frame it saw after the VM resumed, and the losses add up. Losses are printed, not
//! asserted (benchmarks measure).
//!
//! The moves are announced to the controller first (the default, as an orchestrator does): each
//! move says so, and where the agents export the data plane's migration relay counters the old FE
//! copied the VM's packets to the announced FE while the guest still ran there (the lab starts the
//! migration once both agents applied the announcement; the prober sends every 10 ms and a TCG
//! migration's precopy takes 70–280 ms here: 5–35 copies per move measured). Where they do not (the
//! kernel backend has no relay) that check says it is skipped. `SKIPPED: <reason>` where QEMU or the guest's kernel cannot be
//! had (as tests/vm does).

use victor_tests::lab::agents::RELAY_METRIC;
use victor_tests::lab::guest::{Availability, GuestAssets, Nic};
use victor_tests::lab::migrate::{MigrateArgs, VmKind};
use victor_tests::lab::qemu::{self, QemuReport};

/// Whether the guest can run here (after printing `SKIPPED: <reason>` when it cannot).
fn guest_available(test: &str) -> bool {
    match GuestAssets::prepare().expect("tests/vm/lab-guest") {
        Availability::Ready(_) => true,
        Availability::Skipped(reason) => {
            println!("SKIPPED: {test}: {reason}");
            false
        }
    }
}

fn check(report: &QemuReport, args: &MigrateArgs) {
    assert_eq!((report.moves, report.per_move.len()), (args.moves, args.moves));
    assert_eq!((report.vm, report.nic), ("qemu", args.nic));
    assert!(report.guest_boot_ms > 0.0);
    assert!(report.migration_parameters.contains_key("announce-rounds"), "{:?}", report.migration_parameters);
    assert!(report.probes_sent > 50, "{} probes", report.probes_sent);
    for (i, m) in report.per_move.iter().enumerate() {
        let (from, to) = if i % 2 == 0 { ("fe2", "fe3") } else { ("fe3", "fe2") };
        assert_eq!((m.from.as_str(), m.to.as_str()), (from, to), "move {}", m.index);
        assert_eq!(m.move_seq, i as u64 + 1, "each migration is one move");
        // QEMU's figures and the pause the lab saw.
        assert!(m.qemu_downtime_ms > 0.0 && m.qemu_total_time_ms >= m.qemu_downtime_ms, "move {}: {m:?}", m.index);
        assert!(m.transferred_mib > 0.0 && m.paused_ms > 0.0, "move {}: {m:?}", m.index);
        // The new FE saw QEMU's announce-self RARPs, and a virtio guest's own GARP.
        assert!(m.announced.get("RARP").is_some_and(|n| *n >= 1), "move {}: no RARP: {:?}", m.index, m.announcements);
        if args.nic == Nic::Virtio {
            assert!(
                m.announced.get("GARP").is_some_and(|n| *n >= 1),
                "move {}: the virtio guest sent no GARP: {:?}",
                m.index,
                m.announcements
            );
        }
        // It bound the VM from one of them, seen after the VM resumed (1 ms of slack: QEMU stamps
        // its events in microseconds of the wall clock, the capture on CLOCK_MONOTONIC).
        let kind =
            m.bound_from.as_deref().unwrap_or_else(|| panic!("move {}: bound from no frame seen: {m:?}", m.index));
        assert!(m.announced.contains_key(kind), "move {}: bound from {kind}, not among {:?}", m.index, m.announced);
        let at = m.bound_from_capture_ms.expect("capture time");
        assert!(at >= -1.0, "move {}: bound from a frame seen {at} ms before the VM resumed", m.index);
        assert!(m.convergence_ms.is_some_and(|c| c >= 0.0), "move {}: {:?}", m.index, m.convergence_ms);
        // The losses add up, and the VM answered after the move.
        assert_eq!(m.lost_in_pause + m.lost_beyond_pause, m.lost, "move {}", m.index);
        assert!(m.lost_in_pause <= m.sent_in_pause, "move {}: {m:?}", m.index);
        assert!(m.first_reply_sent_ms.is_some(), "move {}: no reply after the migration", m.index);
        check_relay(m, args);
    }
    assert_eq!(report.lost_total, report.per_move.iter().map(|m| m.lost).sum::<u32>());
    assert_eq!(report.lost_total, report.lost_in_pause_total + report.lost_beyond_pause_total);
    let json: serde_json::Value = serde_json::to_value(report).unwrap();
    for key in ["qemu_downtime_ms", "paused_ms", "qemu_total_time_ms", "lost_beyond_pause_total", "per_move"] {
        assert!(json.get(key).is_some(), "JSON lacks {key}");
    }
    assert_eq!(report.migration_announced, !args.no_announce);
    assert_eq!(report.duplicate_replies_total, report.per_move.iter().map(|m| m.duplicate_replies).sum::<u32>());
    for key in [
        "announcements",
        "bound_from",
        "lost_in_pause",
        "lost_beyond_pause",
        "qemu_downtime_ms",
        "migration_announced",
        "announce_applied_ms",
        "relay",
        "duplicate_replies",
    ] {
        assert!(json["per_move"][0].get(key).is_some(), "JSON per_move lacks {key}");
    }
}

/// An announced move: the old FE's relay copied the VM's packets to the new FE (only where the
/// agents export the relay counters); the counters of every move are printed.
fn check_relay(m: &qemu::QemuMove, args: &MigrateArgs) {
    assert_eq!(m.migration_announced, !args.no_announce, "move {}", m.index);
    println!(
        "move {} ({}→{}): announcement applied {:?} ms, relay {:?}, duplicate replies {}",
        m.index, m.from, m.to, m.announce_applied_ms, m.relay, m.duplicate_replies
    );
    if !m.migration_announced {
        return;
    }
    let Some(old) = m.relay.get(&m.from) else {
        println!(
            "SKIPPED: move {}: the relay check: {}'s agent exports no {RELAY_METRIC}_total (relay not in this build)",
            m.index, m.from
        );
        return;
    };
    assert!(
        old.copied > 0,
        "move {}: announced to {}, but the old FE {} copied no packet of the VM to it during a {} ms migration \
         (announcement applied {:?} ms after its answer): {:?}",
        m.index,
        m.to,
        m.from,
        m.qemu_total_time_ms,
        m.announce_applied_ms,
        m.relay
    );
}

async fn migrate(test: &str, nic: Nic) {
    victor_testkit::require_root("the migration lab");
    if !guest_available(test) {
        return;
    }
    let args = MigrateArgs { moves: 2, settle_ms: 100, vm: VmKind::Qemu, nic, ..MigrateArgs::default() };
    let report = qemu::run(&args).await.expect("migrate --vm qemu");
    println!("{}", serde_json::to_string(&report).unwrap());
    qemu::print(&MigrateArgs { json: false, ..args.clone() }, &report).unwrap();
    check(&report, &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_migrate_a_virtio_guest() {
    migrate("live_migrate_a_virtio_guest", Nic::Virtio).await;
}

/// An e1000 guest announces nothing itself: only QEMU's RARPs tell the new FE, and the agent
/// learns the move from them (the MAC's bindings, and a MAC claim to the controller).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_migrate_an_e1000_guest() {
    migrate("live_migrate_an_e1000_guest", Nic::E1000).await;
}
