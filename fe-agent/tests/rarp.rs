//! A VM moved by a hypervisor that announces it only with RARP (unmodified QEMU's
//! `announce-self`: five RARP frames naming the VM's MAC and no IP, 50 ms then +100 ms apart) is
//! found at its new FE as fast as one that sends a gratuitous ARP, while a client pings it (real
//! agents, real controller on the embedded store, both data planes). And a declared VM that never
//! sent an ARP is bound by its RARP alone: the agent's MAC claim, expanded by the controller.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use victor_tests::lab::probe::{FrameSender, announce_self};

plane_tests!(a_vm_announced_only_by_rarp_moves_like_one_announced_by_garp);

async fn a_vm_announced_only_by_rarp_moves_like_one_announced_by_garp(plane: Plane) -> anyhow::Result<()> {
    let (lab, ctl) = Lab::with_agents(plane).await?;

    // The VM sits behind fe2, learned from its gratuitous ARP; the client behind fe1 pings it.
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    let before_move = ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 20, Duration::from_secs(5))?;

    // Live migration to fe3's side: the link moves and the "hypervisor" sends QEMU's RARP frames,
    // nothing else (the VM itself stays silent).
    let hypervisor = FrameSender::open(&lab.vm, "eth0")?;
    let sent = prober.probes().sent;
    lab.move_vm_link(2, 3)?;
    let frames = announce_self(&hypervisor, VM_MAC)?;
    let gaps: Vec<u64> = frames.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    println!("announce-self frames sent {gaps:?} ms apart");
    let moved = ctl.wait_bound(VM, "fe3", Duration::from_secs(5)).await?;
    assert_eq!(moved.move_seq, before_move.move_seq + 1);
    assert_eq!(moved.mac, VM_MAC);
    prober.wait_replies_from(sent + 5, 20, Duration::from_secs(5))?;
    let probes = prober.stop()?;
    let lost = probes.lost(5);
    println!("move announced by RARP only: {} echo requests at 10 ms, {lost} lost", probes.sent);
    // Found on the first frame (asserted from fe3's event below): fewer lost than the requests
    // sent during the announcement (~80 at QEMU's timing). Not in a TCG guest (the kernel suite):
    // there the same move takes ~10x the host's time, more on a busy host (99 lost against 80
    // sent during an announcement whose first frame fe3 had bound from), so only the capture
    // from the first frame is asserted.
    let announcement_ns = frames[frames.len() - 1] - frames[0];
    let during = announcement_ns / 10_000_000;
    if !victor_testkit::in_emulated_guest() {
        assert!(
            (lost as u64) < during,
            "{lost} lost, {during} sent during the announcement: the move waited for later frames"
        );
    }

    // fe3 delivers it locally, installed from the RARP before the controller's answer; it counted
    // QEMU's five frames and made one MAC claim, which the controller expanded.
    assert!(lab.routes(3, &["proto", "158"])?.contains(&format!("{VM} dev {VM_PORT}")));
    assert_eq!(lab.agent_metric(3, "victor_agent_rarp_frames_total{kind=\"announce\"}")?, 5.0);
    let expanded = lab.agent_metric(3, "victor_agent_claim_results_total{outcome=\"expanded\"}")?;
    assert_eq!(expanded, 1.0, "one MAC claim per announcement");
    let (_, body) = lab.agent_get(3, &format!("/debug/events?vm={VM}"))?;
    let events: serde_json::Value = serde_json::from_str(&body)?;
    let ev = events.as_array().and_then(|a| a.iter().find(|e| e["move_seq"] == moved.move_seq)).cloned();
    let ev = ev.ok_or_else(|| anyhow::anyhow!("no event for move_seq {} on fe3: {body}", moved.move_seq))?;
    let captured = ev["captured_mono_ns"].as_u64().unwrap_or(0);
    let provisional = ev["provisional_applied_mono_ns"].as_u64().unwrap_or(0);
    assert!(captured >= frames[0] && captured < frames[1], "captured from the first RARP frame: {ev}");
    assert!(provisional >= captured, "{ev}");
    println!(
        "fe3 installed the VM {:.3} ms after capturing the first RARP frame",
        (provisional - captured) as f64 / 1e6
    );

    // A declared VM that never sent an ARP, behind fe3: its RARP alone binds it (the MAC claim
    // covers IPs the agent does not know), and the client reaches it.
    let (vm2, vm2_mac) = (Ipv4Addr::new(10, 10, 0, 12), "02:00:00:00:00:12");
    ctl.declare(vm2, vm2_mac).await?;
    let ns = victor_testkit::netns::NetNs::new("rv2")?;
    lab.add_vm(&ns, "eth0", "vm2p", 3, vm2, vm2_mac)?;
    let sender = FrameSender::open(&ns, "eth0")?;
    announce_self(&sender, vm2_mac)?;
    let bound = ctl.wait_bound(vm2, "fe3", Duration::from_secs(5)).await?;
    assert_eq!((bound.mac.as_str(), bound.move_seq), (vm2_mac, 0));
    let prober = Prober::start(&lab.client, vm2, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 10, Duration::from_secs(5))?;
    Ok(())
}
