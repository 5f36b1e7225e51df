//! A VM is learned from its gratuitous ARP, reached through the tunnel, and moved to another FE
//! while a client pings it (real agents, real controller on the embedded store), on both data
//! planes: the tunnel's MTU answers too-big packets with "fragmentation needed", the old FE
//! answers ARP for the moved VM (proxy ARP).

mod common;

use std::time::Duration;

use common::*;

plane_tests!(arp_learning_tunnel_and_hitless_move);

async fn arp_learning_tunnel_and_hitless_move(plane: Plane) -> anyhow::Result<()> {
    let (lab, ctl) = Lab::with_agents(plane).await?;

    // ARP from the VM → a binding in the store with the right FE and MAC.
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    let b = ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    assert_eq!(b.mac, VM_MAC);
    assert_eq!(b.site, "dc2");
    // fe2 delivers it on the VM port (host route + permanent neighbour, our protocol).
    let routes = lab.routes(2, &["proto", "158"])?;
    assert!(routes.contains(&format!("{VM} dev {VM_PORT}")), "{routes}");
    let neigh = lab.fe(2).ip(&["neigh", "show", "proto", "158"])?;
    assert!(neigh.contains(VM_MAC) && neigh.contains("PERMANENT"), "{neigh}");

    // A client behind fe1 pings the VM through the tunnel.
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 20, Duration::from_secs(5))?;
    let tx = lab.agent_metric(1, "victor_agent_dataplane_packets_total{direction=\"tunnel_tx\"}")?;
    assert!(tx >= 20.0, "fe1 encapsulated {tx} packets");
    let fe1_route = lab.routes(1, &[&format!("{VM}/32")])?;
    match plane {
        // The kernel forwards: a /32 through fe1's tunnel device to fe2, counted per peer.
        Plane::Kernel => {
            assert_eq!(fe1_route.trim(), tunnel_route(VM, 2));
            let series =
                format!("victor_agent_dataplane_peer_packets_total{{peer=\"{}\",direction=\"tx\"}}", fe_addr(2));
            assert!(lab.agent_metric(1, &series)? >= 20.0, "{series}");
            let series =
                format!("victor_agent_dataplane_peer_packets_total{{peer=\"{}\",direction=\"rx\"}}", fe_addr(1));
            assert!(lab.agent_metric(2, &series)? >= 20.0, "fe2 decapsulated from fe1: {series}");
        }
        // The forwarder's table holds remote VMs; the kernel only routes the prefix into it.
        Plane::Tun => assert!(fe1_route.trim().is_empty(), "{fe1_route}"),
    }
    // Too big for the tunnel with DF set: "fragmentation needed" with the tunnel's MTU
    // (underlay 1500 − 20), from fe1.
    let mtu = frag_needed_mtu(&lab.client, CLIENT, VM, 1500)?;
    assert_eq!(mtu, Some(1480), "path MTU through the tunnel");
    println!("path MTU through the {} tunnel: {mtu:?}", plane.label());

    // The VM moves to fe3: link switched, gratuitous ARP; the ping keeps working.
    let before = prober.probes().sent;
    lab.move_vm_link(2, 3)?;
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    let moved = ctl.wait_bound(VM, "fe3", Duration::from_secs(5)).await?;
    assert_eq!(moved.move_seq, b.move_seq + 1);
    prober.wait_replies_from(before + 5, 20, Duration::from_secs(5))?;
    let probes = prober.stop()?;
    let lost = probes.lost(5);
    println!("move: {} echo requests at 10 ms, {lost} lost", probes.sent);

    // fe2 no longer delivers locally; fe3 does; fe1 and fe2 tunnel to fe3.
    let fe2 = lab.routes(2, &[&format!("{VM}/32")])?;
    match plane {
        Plane::Kernel => {
            assert_eq!(fe2.trim(), tunnel_route(VM, 3), "fe2 relays to fe3");
            assert_eq!(lab.routes(1, &[&format!("{VM}/32")])?.trim(), tunnel_route(VM, 3), "fe1 repointed to fe3");
        }
        Plane::Tun => assert!(fe2.trim().is_empty(), "fe2 still has a route for the VM: {fe2}"),
    }
    assert!(lab.routes(3, &["proto", "158"])?.contains(&format!("{VM} dev {VM_PORT}")));

    // Stage timestamps: fe3 captured the GARP and installed before the controller answered;
    // every FE applied the new binding after the capture.
    let (_, body) = lab.agent_get(3, &format!("/debug/events?vm={VM}"))?;
    let events: serde_json::Value = serde_json::from_str(&body)?;
    let ev = events.as_array().and_then(|a| a.iter().find(|e| e["move_seq"] == moved.move_seq)).cloned();
    let ev = ev.ok_or_else(|| anyhow::anyhow!("no event for move_seq {} on fe3: {body}", moved.move_seq))?;
    let captured = ev["captured_mono_ns"].as_u64().unwrap();
    let provisional = ev["provisional_applied_mono_ns"].as_u64().unwrap();
    let answered = ev["claim_answered_mono_ns"].as_u64().unwrap();
    assert!(captured > 0 && provisional >= captured, "{ev}");
    assert!(provisional <= answered, "make-before-break: installed before the answer: {ev}");
    let ms = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / 1e6;
    println!(
        "fe3 stages after capture: local install {:.3} ms, claim sent {:.3} ms, answered {:.3} ms, delta received {:.3} ms",
        ms(captured, provisional),
        ms(captured, ev["claim_sent_mono_ns"].as_u64().unwrap()),
        ms(captured, answered),
        ms(captured, ev["delta_received_mono_ns"].as_u64().unwrap()),
    );
    let mut latest = 0;
    for n in 1..=3 {
        let (_, body) = lab.agent_get(n, &format!("/debug/events?vm={VM}"))?;
        let events: serde_json::Value = serde_json::from_str(&body)?;
        let e = events.as_array().and_then(|a| a.iter().find(|e| e["move_seq"] == moved.move_seq)).cloned();
        let applied = e.and_then(|e| e["applied_mono_ns"].as_u64()).unwrap_or(0);
        assert!(applied >= captured, "fe{n} applied move {} at {applied}, captured at {captured}", moved.move_seq);
        println!("fe{n} applied the move {:.3} ms after the capture", (applied - captured) as f64 / 1e6);
        latest = latest.max(applied);
    }
    println!("move convergence (latest apply − capture): {:.3} ms", (latest - captured) as f64 / 1e6);

    // Proxy ARP (I8): a host left on the VM's old segment at fe2 still reaches it: fe2 answers
    // ARP for the VM (now behind fe3) and relays; fe3 answers the VM's ARP for that host.
    let nb = victor_testkit::netns::NetNs::new("fan")?;
    let nb_ip = std::net::Ipv4Addr::new(10, 10, 0, 9);
    lab.add_vm(&nb, "eth0", "vm9p", 2, nb_ip, "02:00:00:00:00:09")?;
    let prober = Prober::start(&nb, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 10, Duration::from_secs(5))?;
    drop(prober);
    assert!(lab.agent_metric(2, "victor_agent_arp_sent_total{kind=\"proxy\"}")? >= 1.0, "fe2 answered for the VM");
    assert!(lab.agent_metric(3, "victor_agent_arp_sent_total{kind=\"proxy\"}")? >= 1.0, "fe3 answered for the host");
    let nb_neigh = nb.ip(&["neigh", "show", &VM.to_string()])?;
    assert!(nb_neigh.contains(GATEWAY_MAC), "the old segment resolves the VM to the FE: {nb_neigh}");
    Ok(())
}
