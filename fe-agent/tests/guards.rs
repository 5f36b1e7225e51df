//! What the agent refuses, on both data planes: a spoofed claim for a declared VM (installed at
//! once, undone when the controller rejects it), IP-in-IP from a source that is not a registered
//! FE (the userspace forwarder drops it; the kernel data plane never decapsulates it — it has no
//! tunnel device for that source — and counts it on its catch-all device), and traffic for
//! addresses without a binding.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use socket2::{Domain, Protocol, Socket, Type};
use victor_dataplane::packet::{icmp, ipv4};

plane_tests!(spoofed_claims_unknown_tunnel_sources_and_unbound_traffic_are_dropped);

async fn spoofed_claims_unknown_tunnel_sources_and_unbound_traffic_are_dropped(plane: Plane) -> anyhow::Result<()> {
    let mut lab = Lab::build_on(2, plane)?;
    let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    lab.start_agent(1, &[ctl.url()], &[])?;
    // fe2 ages silent VMs fast.
    lab.start_agent(
        2,
        &[ctl.url()],
        &["--arp-probe-after", "1s", "--arp-probe-interval", "200ms", "--arp-probe-count", "2"],
    )?;
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(20))?;
    }

    // ── A declared VM claimed with another MAC: local route at once, undone on rejection.
    let declared = Ipv4Addr::new(10, 10, 0, 20);
    ctl.declare(declared, "02:00:00:00:00:20").await?;
    let spoofer = victor_testkit::netns::NetNs::new("fas")?;
    lab.add_vm(&spoofer, "eth0", "vm5p", 2, declared, "02:00:00:00:00:66")?;
    let monitor_log = lab.dir.path().join("monitor.log");
    let mut monitor = lab.monitor(2, &[], &monitor_log)?;
    send_garp(&spoofer, "eth0", "02:00:00:00:00:66", declared)?;
    wait("the spoofed claim is rejected", Duration::from_secs(5), || {
        lab.agent_metric(2, "victor_agent_claims_rejected_total{reason=\"mac_mismatch\"}").is_ok_and(|n| n >= 1.0)
    })?;
    wait("the provisional route is gone", Duration::from_secs(2), || {
        lab.routes(2, &[&format!("{declared}/32")]).is_ok_and(|r| r.trim().is_empty())
    })?;
    std::thread::sleep(Duration::from_millis(100));
    monitor.kill();
    let events = std::fs::read_to_string(&monitor_log)?;
    let lines: Vec<&str> = events.lines().filter(|l| l.contains(&declared.to_string())).collect();
    assert!(
        lines.iter().any(|l| !l.starts_with("Deleted")) && lines.iter().any(|l| l.starts_with("Deleted")),
        "expected the route installed before the answer and removed after it: {lines:?}"
    );
    assert_eq!(lab.agent_metric(2, "victor_agent_provisional_installs_total")?, 1.0);
    assert_eq!(lab.agent_metric(2, "victor_agent_claims_undone_total")?, 1.0);
    assert!(ctl.binding(declared).await?.is_none(), "a spoofed claim must not bind");
    // Repeated spoofed announcements are held back, not re-claimed.
    send_garp(&spoofer, "eth0", "02:00:00:00:00:66", declared)?;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lab.agent_metric(2, "victor_agent_claims_sent_total")?, 1.0);

    // ── An ARP storm from one VM is rate-limited before it reaches the controller; malformed
    //    ARP is counted; a VM that stops answering ARP probes is reported gone.
    let quiet = victor_testkit::netns::NetNs::new("faq")?;
    let quiet_ip = Ipv4Addr::new(10, 10, 0, 13);
    let quiet_mac = "02:00:00:00:00:13";
    lab.add_vm(&quiet, "eth0", "vm3p", 2, quiet_ip, quiet_mac)?;
    let claims = lab.agent_metric(2, "victor_agent_claims_sent_total")?;
    let t0 = std::time::Instant::now();
    send_frames(&quiet, "eth0", vec![garp_frame(quiet_mac, quiet_ip); 300])?;
    println!("storm of 300 frames sent in {:?}", t0.elapsed());
    ctl.wait_bound(quiet_ip, "fe2", Duration::from_secs(5)).await?;
    let limited = || lab.agent_metric(2, "victor_agent_neigh_rate_limited_total{protocol=\"arp\"}").unwrap_or(0.0);
    let frames = || lab.agent_metric(2, "victor_agent_arp_frames_total{kind=\"gratuitous\"}").unwrap_or(0.0);
    let storm = wait("the storm is rate-limited", Duration::from_secs(3), || limited() >= 200.0);
    assert!(storm.is_ok(), "rate-limited {} of 300; {} gratuitous frames passed", limited(), frames());
    // The capture socket's buffer holds the whole storm even if the agent is descheduled: the
    // rate limiter, not the kernel, drops it (the kernel would drop other VMs' frames too).
    assert_eq!(lab.agent_metric(2, "victor_agent_neigh_kernel_dropped_total")?, 0.0);
    assert_eq!(lab.agent_metric(2, "victor_agent_claims_sent_total")?, claims + 1.0, "one claim for the storm");
    let mut bad = garp_frame(quiet_mac, quiet_ip);
    bad[14..16].copy_from_slice(&6u16.to_be_bytes()); // hardware type 6 (IEEE 802) instead of Ethernet
    send_frames(&quiet, "eth0", vec![bad])?;
    wait("the malformed frame is counted", Duration::from_secs(3), || {
        lab.agent_metric(2, "victor_agent_neigh_malformed_total{protocol=\"arp\",reason=\"hardware_type\"}")
            .is_ok_and(|n| n >= 1.0)
    })?;
    quiet.ip(&["addr", "flush", "dev", "eth0"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while ctl.binding(quiet_ip).await?.is_some() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the silent VM was never reported gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait("fe2 removed the silent VM's route", Duration::from_secs(3), || {
        lab.routes(2, &[&format!("{quiet_ip}/32")]).is_ok_and(|r| r.trim().is_empty())
    })?;
    assert!(lab.agent_metric(2, "victor_agent_arp_sent_total{kind=\"probe\"}")? >= 2.0);
    assert!(lab.agent_metric(2, "victor_agent_claim_results_total{outcome=\"removed\"}")? >= 1.0);

    // ── IP-in-IP to fe1 from an address that is no registered FE: dropped and counted.
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let stranger = Ipv4Addr::new(198, 51, 100, 99);
    lab.ul.add_addr("br0", &format!("{stranger}/24"))?;
    let before = lab.agent_metric(1, "victor_agent_dataplane_drops_total{reason=\"unknown_peer\"}")?;
    const TUNNEL_TX: &str = "victor_agent_dataplane_packets_total{direction=\"tunnel_tx\"}";
    const TUNNEL_RX: &str = "victor_agent_dataplane_packets_total{direction=\"tunnel_rx\"}";
    let (tx_before, rx_before) = (lab.agent_metric(1, TUNNEL_TX)?, lab.agent_metric(1, TUNNEL_RX)?);
    lab.ul.run_in(move || -> anyhow::Result<()> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4)))?;
        let echo = icmp::echo(icmp::TYPE_ECHO_REQUEST, 7, 1, &[0; 32]);
        let inner = ipv4::build_packet(CLIENT, VM, ipv4::PROTO_ICMP, 64, 0, false, &echo);
        for _ in 0..5 {
            sock.send_to(&inner, &std::net::SocketAddr::from((fe_addr(1), 0)).into())?;
        }
        Ok(())
    })??;
    wait("fe1 counts the unknown tunnel source", Duration::from_secs(3), || {
        lab.agent_metric(1, "victor_agent_dataplane_drops_total{reason=\"unknown_peer\"}")
            .is_ok_and(|n| n >= before + 5.0)
    })?;
    // Nothing of it was forwarded on to fe2, where the VM is.
    assert_eq!(lab.agent_metric(1, TUNNEL_TX)?, tx_before, "the stranger's packets were forwarded to the VM");
    match plane {
        // The forwarder counts what it reads from its raw socket (tunnel_rx), then drops it.
        Plane::Tun => {
            let delivered = lab.agent_metric(1, "victor_agent_dataplane_packets_total{direction=\"tun_tx\"}")?;
            assert_eq!(delivered, 0.0, "nothing from the stranger was decapsulated");
        }
        Plane::Kernel => {
            // Only what a peer device decapsulated is tunnel traffic.
            assert_eq!(lab.agent_metric(1, TUNNEL_RX)?, rx_before, "the stranger's packets counted as tunnel traffic");
            // The registered FE has its tunnel device; the stranger has none: the kernel handed
            // its packets to the catch-all, whose reverse-path filter dropped them.
            let devices = lab.fe(1).ip(&["-d", "link", "show", "type", "ipip"])?;
            assert!(devices.contains(&tunnel_device(2)), "fe1 has a tunnel to fe2: {devices}");
            assert!(!devices.contains(&stranger.to_string()), "fe1 has a tunnel to the stranger: {devices}");
            let stats = lab.fe(1).ip(&["-s", "link", "show", "vtun1"])?;
            println!("fe1's catch-all device after the stranger's packets:\n{stats}");
            let series = format!("victor_agent_dataplane_peer_packets_total{{peer=\"{stranger}\",direction=\"rx\"}}");
            assert!(metric(&lab.agent_get(1, "/metrics")?.1, &series).is_none(), "no peer series for the stranger");
        }
    }

    // ── No binding: the client's packets for an unbound mobile IP are dropped and counted.
    let unbound = Ipv4Addr::new(10, 10, 0, 99);
    let prober = Prober::start(&lab.client, unbound, Duration::from_millis(20))?;
    wait("fe1 drops unbound traffic", Duration::from_secs(3), || {
        lab.agent_metric(1, "victor_agent_dataplane_drops_total{reason=\"no_binding\"}").is_ok_and(|n| n >= 3.0)
    })?;
    let probes = prober.stop()?;
    assert!(probes.replied.is_empty(), "an unbound address answered");
    Ok(())
}
