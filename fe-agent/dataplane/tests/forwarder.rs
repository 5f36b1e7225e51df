//! The userspace IP-in-IP forwarder in real namespaces (root needed): client → fe1 → tunnel →
//! fe2 → VM, replies straight back from fe2; drops by reason; ICMP errors; relay after a move.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use victor_dataplane::counters::DropReason;
use victor_dataplane::packet::{icmp, ipv4};

const T: Duration = Duration::from_secs(5);

fn ping_vm_through_tunnel(offload: bool) {
    let lab = Lab::build(offload).unwrap();
    let reply = client_probe(&lab, Probe::echo(VM, 1), T).unwrap();
    assert_eq!(
        reply,
        Some(ProbeReply::EchoReply { from: VM }),
        "ping client → VM; fe1 {:?} fe2 {:?}; fe2 routes {}; vm {}",
        lab.fe(1).fwd().counters(),
        lab.fe(2).fwd().counters(),
        lab.ns(2).ip(&["route"]).unwrap(),
        lab.vm.ip(&["-s", "link"]).unwrap(),
    );

    // Counters are bumped after the batch's send returns, possibly after the reply arrived.
    let (f1, f2) = (lab.fe(1).fwd(), lab.fe(2).fwd());
    wait_until("fe1 to count the encapsulation, fe2 the decapsulation", T, || {
        f1.counters().tunnel_tx_packets >= 1 && f2.counters().tun_tx_packets >= 1
    })
    .unwrap();
    let fe1 = lab.fe(1).fwd().counters();
    let fe2 = lab.fe(2).fwd().counters();
    assert!(fe2.tunnel_rx_packets >= 1, "fe2 decapsulated: {fe2:?}");
    // No triangle routing: the reply left fe2 directly (plain routing), not through a tunnel.
    assert_eq!(fe2.tunnel_tx_packets, 0, "fe2 tunnelled nothing: {fe2:?}");
    assert_eq!(fe1.tun_tx_packets, 0, "fe1 decapsulated nothing: {fe1:?}");
    assert_eq!(fe1.dropped_total() + fe2.dropped_total(), 0, "{fe1:?} {fe2:?}");

    // A TCP connection (several segments each way) also works end to end.
    let listener = lab.vm.run_in(|| std::net::TcpListener::bind((VM, 0)).unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut data = Vec::new();
        s.read_to_end(&mut data).unwrap();
        s.write_all(&(data.len() as u64).to_be_bytes()).unwrap();
    });
    let received = lab
        .client
        .run_in(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&(VM, port).into(), T).unwrap();
            s.write_all(&vec![7u8; 3_000_000]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut n = [0u8; 8];
            s.read_exact(&mut n).unwrap();
            u64::from_be_bytes(n)
        })
        .unwrap();
    server.join().unwrap();
    assert_eq!(received, 3_000_000);
}

#[test]
fn ping_and_tcp_through_the_tunnel_with_offload() {
    ping_vm_through_tunnel(true);
}

#[test]
fn ping_and_tcp_through_the_tunnel_without_offload() {
    ping_vm_through_tunnel(false);
}

#[test]
fn no_binding_is_dropped_and_counted() {
    let lab = Lab::build(true).unwrap();
    let unbound = Ipv4Addr::new(10, 10, 0, 99);
    let reply = client_probe(&lab, Probe::echo(unbound, 2), Duration::from_millis(600)).unwrap();
    assert_eq!(reply, None);
    let c = lab.fe(1).fwd().counters();
    assert!(c.dropped(DropReason::NoBinding) >= 1, "{c:?}");
    assert_eq!(c.tunnel_tx_packets, 0, "{c:?}");
}

#[test]
fn tunnel_packets_from_unregistered_sources_are_dropped_and_counted() {
    let lab = Lab::build(true).unwrap();
    // A rogue host on the underlay and a registered peer (fe3) send IP-in-IP to fe2.
    let rogue = victor_testkit::netns::NetNs::new("dpr").unwrap();
    let _link = victor_testkit::netns::Veth::create(&rogue, "ul0", &lab.ul, "prog").unwrap();
    lab.ul.ip(&["link", "set", "prog", "master", "br0"]).unwrap();
    let rogue_addr = Ipv4Addr::new(198, 51, 100, 66);
    rogue.add_addr("ul0", &format!("{rogue_addr}/24")).unwrap();

    let echo = icmp::echo(icmp::TYPE_ECHO_REQUEST, 9, 9, &[0; 32]);
    let inner = ipv4::build_packet(CLIENT, VM, ipv4::PROTO_ICMP, 64, 0, false, &echo);
    let send = |ns: &victor_testkit::netns::NetNs, src: Ipv4Addr, payload: Vec<u8>| {
        ns.run_in(move || {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(4)))
                    .unwrap();
            sock.set_header_included_v4(true).unwrap();
            let tunnel = ipv4::Tunnel { src, dst: fe_addr(2), ttl: 64 };
            let outer = ipv4::encapsulate(&payload, &tunnel, 0)
                .unwrap_or_else(|_| ipv4::build_packet(src, fe_addr(2), ipv4::PROTO_IPIP, 64, 0, false, &payload));
            for _ in 0..3 {
                sock.send_to(&outer, &std::net::SocketAddr::from((fe_addr(2), 0)).into()).unwrap();
            }
        })
        .unwrap()
    };
    send(&rogue, rogue_addr, inner.clone());
    // From a registered peer, but the inner packet is not IPv4 / not valid.
    send(lab.ns(3), fe_addr(3), vec![0x60; 40]);
    send(lab.ns(3), fe_addr(3), vec![0x45; 40]);

    let fwd = lab.fe(2).fwd();
    wait_until("fe2 to count the drops", T, || {
        let c = fwd.counters();
        c.dropped(DropReason::UnknownPeer) >= 3
            && c.dropped(DropReason::InnerNotIpv4) >= 3
            && c.dropped(DropReason::InnerMalformed) >= 3
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", fwd.counters()));
    let c = fwd.counters();
    assert_eq!(c.tun_tx_packets, 0, "nothing reached the VM: {c:?}");
    assert_eq!(c.tunnel_rx_packets, 9, "{c:?}");
}

#[test]
fn df_packet_larger_than_the_tunnel_mtu_gets_frag_needed() {
    let lab = Lab::build(true).unwrap();
    let tunnel_mtu = UNDERLAY_MTU - 20;
    assert_eq!(lab.fe(1).fwd().tunnel_mtu(), tunnel_mtu);
    // A full-size packet that fits exactly goes through.
    let fits = client_probe(&lab, Probe::echo(VM, 3).df_size(tunnel_mtu.into()), T).unwrap();
    assert_eq!(fits, Some(ProbeReply::EchoReply { from: VM }));

    // One byte more with DF: the TUN MTU makes fe1's kernel answer (before the forwarder).
    let too_big = client_probe(&lab, Probe::echo(VM, 4).df_size(usize::from(tunnel_mtu) + 1), T).unwrap();
    assert!(
        matches!(too_big, Some(ProbeReply::Error { icmp_type: 3, code: 4, mtu, .. }) if mtu == tunnel_mtu),
        "{too_big:?}"
    );

    // With the TUN MTU raised by hand, the forwarder's own check answers, from fe1's underlay
    // address, with the tunnel MTU.
    lab.ns(1).set_mtu(&lab.fe(1).tun, 1500).unwrap();
    let too_big = client_probe(&lab, Probe::echo(VM, 5).df_size(1500), T).unwrap();
    assert_eq!(
        too_big,
        Some(ProbeReply::Error { from: fe_addr(1), icmp_type: 3, code: 4, mtu: tunnel_mtu }),
        "{:?}",
        lab.fe(1).fwd().counters()
    );
    let c = lab.fe(1).fwd().counters();
    assert!(c.icmp_frag_needed >= 1 && c.dropped(DropReason::TooBigDf) >= 1, "{c:?}");
}

#[test]
fn expiring_ttl_gets_time_exceeded_from_the_forwarder() {
    let lab = Lab::build(true).unwrap();
    // TTL 2: fe1's kernel forwards it into TUN with TTL 1; the forwarder is the next hop.
    let reply = client_probe(&lab, Probe::echo(VM, 6).ttl(2), T).unwrap();
    assert_eq!(reply, Some(ProbeReply::Error { from: fe_addr(1), icmp_type: 11, code: 0, mtu: 0 }));
    let c = lab.fe(1).fwd().counters();
    assert!(c.icmp_time_exceeded >= 1 && c.dropped(DropReason::TtlExceeded) >= 1, "{c:?}");
}

#[test]
fn moved_vm_is_relayed_by_the_old_fe() {
    let lab = Lab::build(true).unwrap();
    assert_eq!(client_probe(&lab, Probe::echo(VM, 7), T).unwrap(), Some(ProbeReply::EchoReply { from: VM }));
    // The VM moves to fe3: fe3 delivers locally, fe2 now tunnels to fe3; fe1 still sends to fe2
    // (its update has not arrived yet). Packets go client → fe1 → fe2 → fe3 → VM.
    lab.bind_local(3).unwrap();
    lab.bind_remote(2, 3).unwrap();
    let before = lab.fe(2).fwd().counters();
    let vm3_rx_before = rx_packets(&lab.vm3);
    let reply = client_probe(&lab, Probe::echo(VM, 8), T).unwrap();
    assert_eq!(reply, Some(ProbeReply::EchoReply { from: VM }));
    let (f2, f3) = (lab.fe(2).fwd(), lab.fe(3).fwd());
    wait_until("fe2 to relay and fe3 to deliver", T, || {
        f2.counters().tunnel_tx_packets > before.tunnel_tx_packets && f3.counters().tun_tx_packets >= 1
    })
    .unwrap_or_else(|e| panic!("{e}: fe2 {:?} fe3 {:?}", f2.counters(), f3.counters()));
    // The VM instance behind fe3 is the one that received the echo.
    assert!(rx_packets(&lab.vm3) > vm3_rx_before);
}

fn rx_packets(ns: &victor_testkit::netns::NetNs) -> u64 {
    let out = ns.exec(&["cat", "/sys/class/net/eth0/statistics/rx_packets"]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn stop_removes_the_tun_device() {
    let mut lab = Lab::build(true).unwrap();
    let tun = lab.fe(1).tun.clone();
    assert!(lab.ns(1).links().unwrap().contains(&tun));
    let fwd = lab.fes[0].forwarder.take().unwrap();
    assert!(fwd.is_running());
    fwd.stop().unwrap();
    // A child forked concurrently by another test may hold the (close-on-exec) TUN descriptor
    // for a moment, which delays the device's removal.
    wait_until("the TUN device to disappear", T, || !lab.ns(1).links().unwrap().contains(&tun)).unwrap();
}

#[test]
fn kernel_ipip_probe_matches_the_kernel() {
    // Ask the kernel itself: can an ipip link be created (in a scratch namespace)?
    let ns = victor_testkit::netns::NetNs::new("dpk").unwrap();
    let created = ns.ip(&["link", "add", "t0", "type", "ipip", "local", "192.0.2.1", "remote", "192.0.2.2"]).is_ok();
    assert_eq!(victor_dataplane::kernel::ipip_available(), created);
}
