//! IPv6 through the userspace forwarder in real namespaces (root needed): client → fe1 → 6in4
//! over the IPv4 underlay → fe2 → VM and back the same way; drops by reason; ICMPv6 errors from
//! the forwarder; 6in4 from unregistered sources refused; parallel flows on several workers;
//! coalesced 6in4 TCP from the underlay.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use common::*;
use victor_dataplane::counters::DropReason;
use victor_dataplane::forwarder::ForwarderConfig;
use victor_dataplane::packet::{icmp6, ipv4, ipv6, sixin4};

const T: Duration = Duration::from_secs(5);

/// Sends `len` bytes over one TCP connection client → VM (IPv6) and returns what the VM counted.
fn tcp6_roundtrip(lab: &Lab, len: usize) -> u64 {
    let listener = lab.vm.run_in(|| std::net::TcpListener::bind((VM6, 0)).unwrap()).unwrap();
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
            let mut s = std::net::TcpStream::connect_timeout(&(VM6, port).into(), T).unwrap();
            s.write_all(&vec![7u8; len]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut n = [0u8; 8];
            s.read_exact(&mut n).unwrap();
            u64::from_be_bytes(n)
        })
        .unwrap();
    server.join().unwrap();
    received
}

fn ping6_and_tcp_through_the_tunnel(offload: bool) {
    let lab = Lab::build(offload).unwrap();
    let reply = client_probe6(&lab, VM6, 1, 64, 104, T).unwrap();
    assert_eq!(
        reply,
        Some(Probe6Reply::EchoReply { from: VM6 }),
        "ping6 client → VM; fe1 {:?} fe2 {:?}; fe2 routes {}",
        lab.fe(1).fwd().counters(),
        lab.fe(2).fwd().counters(),
        lab.ns(2).ip(&["-6", "route"]).unwrap(),
    );
    let (f1, f2) = (lab.fe(1).fwd(), lab.fe(2).fwd());
    wait_until("both directions to be counted as 6in4", T, || {
        let (c1, c2) = (f1.counters(), f2.counters());
        c1.ipv6_tunnel_tx_packets >= 1
            && c2.ipv6_tun_tx_packets >= 1
            && c2.ipv6_tunnel_tx_packets >= 1
            && c1.ipv6_tun_tx_packets >= 1
    })
    .unwrap_or_else(|e| panic!("{e}: fe1 {:?} fe2 {:?}", f1.counters(), f2.counters()));
    let (c1, c2) = (f1.counters(), f2.counters());
    // Every packet of the exchange was IPv6: the per-family counters are the totals.
    assert_eq!(
        (c1.tunnel_tx_packets, c1.tun_rx_packets),
        (c1.ipv6_tunnel_tx_packets, c1.ipv6_tun_rx_packets),
        "{c1:?}"
    );
    assert_eq!(c2.tunnel_rx_packets, c2.ipv6_tunnel_rx_packets, "{c2:?}");
    assert_eq!(unexpected_drops(&c1) + unexpected_drops(&c2), 0, "{c1:?} {c2:?}");

    assert_eq!(tcp6_roundtrip(&lab, 3_000_000), 3_000_000);
    let (c1, c2) = (f1.counters(), f2.counters());
    assert_eq!(unexpected_drops(&c1) + unexpected_drops(&c2), 0, "{c1:?} {c2:?}");
    if offload {
        assert!(c1.tun_rx_packets > c1.tun_reads, "fe1 read TCPv6 GSO super-packets: {c1:?}");
        assert!(c2.tun_writes_gso > 0, "fe2 coalesced 6in4 TCP into GSO writes: {c2:?}");
    }
}

#[test]
fn ping6_and_tcp_through_the_6in4_tunnel_with_offload() {
    ping6_and_tcp_through_the_tunnel(true);
}

#[test]
fn ping6_and_tcp_through_the_6in4_tunnel_without_offload() {
    ping6_and_tcp_through_the_tunnel(false);
}

#[test]
fn ipv6_without_binding_is_dropped_and_counted() {
    let lab = Lab::build(true).unwrap();
    let unbound: Ipv6Addr = "2001:db8:10::99".parse().unwrap();
    assert_eq!(client_probe6(&lab, unbound, 2, 64, 104, Duration::from_millis(600)).unwrap(), None);
    let c = lab.fe(1).fwd().counters();
    assert!(c.dropped_v6(DropReason::NoBinding) >= 1, "{c:?}");
    assert_eq!(c.dropped_v6(DropReason::NoBinding), c.dropped(DropReason::NoBinding), "all of them IPv6: {c:?}");
    assert_eq!(c.tunnel_tx_packets, 0, "{c:?}");
}

#[test]
fn ipv6_larger_than_the_tunnel_mtu_gets_packet_too_big() {
    let lab = Lab::build(true).unwrap();
    let tunnel_mtu = usize::from(UNDERLAY_MTU - 20);
    // A full-size packet that fits exactly goes through.
    assert_eq!(client_probe6(&lab, VM6, 3, 64, tunnel_mtu, T).unwrap(), Some(Probe6Reply::EchoReply { from: VM6 }));

    // One byte more: the TUN MTU makes fe1's kernel answer (before the forwarder).
    let too_big = client_probe6(&lab, VM6, 4, 64, tunnel_mtu + 1, T).unwrap();
    assert!(
        matches!(too_big, Some(Probe6Reply::Error { icmp_type: icmp6::TYPE_PACKET_TOO_BIG, mtu, .. }) if mtu as usize == tunnel_mtu),
        "{too_big:?}"
    );

    // With the TUN MTU raised by hand, the forwarder's own check answers, from its ICMPv6 source
    // (by default the 6to4 address of fe1's underlay address), with the tunnel MTU.
    lab.ns(1).set_mtu(&lab.fe(1).tun, 1500).unwrap();
    let too_big = client_probe6(&lab, VM6, 5, 64, 1500, T).unwrap();
    let source = ForwarderConfig::icmp6_source_for(fe_addr(1));
    assert_eq!(source, "2002:c633:6401::".parse::<Ipv6Addr>().unwrap());
    assert_eq!(
        too_big,
        Some(Probe6Reply::Error {
            from: source,
            icmp_type: icmp6::TYPE_PACKET_TOO_BIG,
            code: 0,
            mtu: tunnel_mtu as u32
        }),
        "{:?}",
        lab.fe(1).fwd().counters()
    );
    let c = lab.fe(1).fwd().counters();
    assert!(c.icmp6_packet_too_big >= 1 && c.dropped_v6(DropReason::TooBigDf) >= 1, "{c:?}");
    assert_eq!(c.icmp_frag_needed, 0, "no ICMPv4 for IPv6 packets: {c:?}");
}

#[test]
fn expiring_hop_limit_gets_time_exceeded_from_the_forwarder() {
    let lab = Lab::build(true).unwrap();
    // Hop limit 2: fe1's kernel forwards it into TUN with 1; the forwarder is the next hop.
    let reply = client_probe6(&lab, VM6, 6, 2, 104, T).unwrap();
    let source = ForwarderConfig::icmp6_source_for(fe_addr(1));
    assert_eq!(reply, Some(Probe6Reply::Error { from: source, icmp_type: icmp6::TYPE_TIME_EXCEEDED, code: 0, mtu: 0 }));
    let c = lab.fe(1).fwd().counters();
    assert!(c.icmp6_time_exceeded >= 1 && c.dropped_v6(DropReason::TtlExceeded) >= 1, "{c:?}");
}

/// Sends `payload` as protocol 41 from `src` to fe2, three times, from namespace `ns`.
fn send_6in4(ns: &victor_testkit::netns::NetNs, src: Ipv4Addr, payload: Vec<u8>) {
    ns.run_in(move || {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(41))).unwrap();
        sock.set_header_included_v4(true).unwrap();
        let tunnel = ipv4::Tunnel { src, dst: fe_addr(2), ttl: 64 };
        let outer = sixin4::encapsulate(&payload, &tunnel, 0)
            .unwrap_or_else(|_| ipv4::build_packet(src, fe_addr(2), ipv4::PROTO_IPV6, 64, 0, false, &payload));
        for _ in 0..3 {
            sock.send_to(&outer, &std::net::SocketAddr::from((fe_addr(2), 0)).into()).unwrap();
        }
    })
    .unwrap()
}

#[test]
fn six_in_four_from_unregistered_sources_is_dropped_and_counted() {
    let lab = Lab::build(true).unwrap();
    let rogue = victor_testkit::netns::NetNs::new("dpr6").unwrap();
    let _link = victor_testkit::netns::Veth::create(&rogue, "ul0", &lab.ul, "prog6").unwrap();
    lab.ul.ip(&["link", "set", "prog6", "master", "br0"]).unwrap();
    let rogue_addr = Ipv4Addr::new(198, 51, 100, 66);
    rogue.add_addr("ul0", &format!("{rogue_addr}/24")).unwrap();

    let echo = icmp6::echo(&CLIENT6, &VM6, icmp6::TYPE_ECHO_REQUEST, 9, 9, &[0; 32]);
    let inner = ipv6::build_packet(CLIENT6, VM6, ipv6::NEXT_ICMPV6, 64, 0, &echo);
    // A spoofed tunnel source (a host on the underlay that is no registered FE).
    send_6in4(&rogue, rogue_addr, inner);
    // From a registered peer, but the inner packet is IPv4 / not valid IPv6.
    send_6in4(lab.ns(3), fe_addr(3), ipv4::build_packet(CLIENT, VM, 17, 64, 0, false, &[0; 20]));
    send_6in4(lab.ns(3), fe_addr(3), vec![0x60; 30]);

    let fwd = lab.fe(2).fwd();
    wait_until("fe2 to count the drops", T, || {
        let c = fwd.counters();
        c.dropped_v6(DropReason::UnknownPeer) >= 3
            && c.dropped_v6(DropReason::InnerNotIpv6) >= 3
            && c.dropped_v6(DropReason::InnerMalformed) >= 3
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", fwd.counters()));
    let c = fwd.counters();
    assert_eq!(c.tun_tx_packets, 0, "nothing reached the VM: {c:?}");
    assert_eq!((c.tunnel_rx_packets, c.ipv6_tunnel_rx_packets), (9, 9), "{c:?}");
}

#[test]
fn moved_ipv6_vm_is_relayed_by_the_old_fe() {
    let lab = Lab::build(true).unwrap();
    assert_eq!(client_probe6(&lab, VM6, 7, 64, 104, T).unwrap(), Some(Probe6Reply::EchoReply { from: VM6 }));
    // The VM moves to fe3; fe1 still tunnels to fe2, which relays to fe3.
    lab.bind_local(3).unwrap();
    lab.bind_remote(2, 3).unwrap();
    let before = lab.fe(2).fwd().counters();
    assert_eq!(client_probe6(&lab, VM6, 8, 64, 104, T).unwrap(), Some(Probe6Reply::EchoReply { from: VM6 }));
    let (f2, f3) = (lab.fe(2).fwd(), lab.fe(3).fwd());
    wait_until("fe2 to relay and fe3 to deliver", T, || {
        f2.counters().ipv6_tunnel_tx_packets > before.ipv6_tunnel_tx_packets && f3.counters().ipv6_tun_tx_packets >= 1
    })
    .unwrap_or_else(|e| panic!("{e}: fe2 {:?} fe3 {:?}", f2.counters(), f3.counters()));
}

#[test]
fn several_queues_carry_parallel_ipv6_flows_intact() {
    let lab = Lab::build_with(LabConfig { queues: 3, ..LabConfig::default() }).unwrap();
    parallel_flows_arrive_intact(&lab, VM6.into(), 6, 1_000_000, T);
}

/// TCP payload bytes the VM's namespace receives over IPv6 for destination port `port` within
/// `window` (a raw TCP socket sees every TCP segment, without the IPv6 header), and their lengths.
fn vm_tcp6_capture(lab: &Lab, port: u16, window: Duration) -> std::thread::JoinHandle<(Vec<u8>, Vec<usize>)> {
    lab.vm
        .spawn_thread("vm-capture6", move || {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::RAW, Some(socket2::Protocol::TCP)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let deadline = std::time::Instant::now() + window;
            let (mut payload, mut lens) = (Vec::new(), Vec::new());
            let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 70000];
            while std::time::Instant::now() < deadline {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                // SAFETY: recv initialised the first n bytes.
                let tcp: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                if tcp.len() >= 20 && u16::from_be_bytes([tcp[2], tcp[3]]) == port {
                    lens.push(tcp.len() + 40);
                    payload.extend_from_slice(&tcp[usize::from(tcp[12] >> 4) * 4..]);
                }
            }
            (payload, lens)
        })
        .unwrap()
}

fn coalesced_tcp6_reaches_the_vm(offload: bool) {
    let lab = Lab::build(offload).unwrap();
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 241) as u8).collect();
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ipv6(CLIENT6.octets(), VM6.octets(), 60)
        .tcp(40000, 5556, 1, 1000)
        .ack(1)
        .write(&mut inner, &payload)
        .unwrap();
    let capture = vm_tcp6_capture(&lab, 5556, Duration::from_millis(1500));
    std::thread::sleep(Duration::from_millis(200));
    // What fe2's raw socket sees when the underlay NIC coalesced a run of 6in4 segments (GRO).
    for dev in ["br0", "p2", "p3"] {
        lab.ul.set_mtu(dev, 9000).unwrap();
    }
    for n in [2, 3] {
        lab.ns(n).set_mtu("ul0", 9000).unwrap();
    }
    let outer = sixin4::encapsulate(&inner, &ipv4::Tunnel { src: fe_addr(3), dst: fe_addr(2), ttl: 64 }, 0).unwrap();
    lab.ns(3)
        .run_in(move || {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(41)))
                    .unwrap();
            sock.set_header_included_v4(true).unwrap();
            sock.send_to(&outer, &std::net::SocketAddr::from((fe_addr(2), 0)).into()).unwrap();
        })
        .unwrap();
    let (got, lens) = capture.join().unwrap();
    assert_eq!(got, payload, "the VM received the whole payload in order (packets {lens:?})");
    let c = lab.fe(2).fwd().counters();
    assert_eq!((c.underlay_rx_coalesced, c.ipv6_tun_tx_packets), (1, 1), "{c:?}");
    if offload {
        assert_eq!((c.tun_writes, c.tun_writes_gso), (1, 1), "{c:?}");
    } else {
        assert_eq!(c.tun_writes, 4, "{c:?}");
        assert!(lens.iter().all(|&l| l <= usize::from(UNDERLAY_MTU) - 20), "{lens:?}");
    }
}

#[test]
fn coalesced_tcp6_from_the_underlay_reaches_the_vm_with_offload() {
    coalesced_tcp6_reaches_the_vm(true);
}

#[test]
fn coalesced_tcp6_from_the_underlay_reaches_the_vm_without_offload() {
    coalesced_tcp6_reaches_the_vm(false);
}

/// The IPv6 side of an announced migration: fe2 copies the VM's 6in4 packets to fe3, which holds
/// them until the VM is local there (see `forwarder.rs` for the IPv4 side and the window).
#[test]
fn an_announced_ipv6_migration_delivers_at_the_new_fe_what_reached_the_old_one_after_the_vm_left() {
    let lab = Lab::build(true).unwrap();
    lab.announce_migration(VM6, Some(3));
    let (m2, m3) = (lab.fe(2).fib.migrations(), lab.fe(3).fib.migrations());
    m3.set_hold_window(Duration::from_secs(5));
    lab.vm.ip(&["link", "set", "eth0", "down"]).unwrap();
    let client = lab.client.run_in(Icmp6Socket::open).unwrap().unwrap();
    client.send_echo(VM6, 31, 64, 104).unwrap();
    wait_until("fe2 to copy the request to fe3 and fe3 to hold it", T, || {
        m2.stats().copied >= 1 && m3.stats().held >= 1
    })
    .unwrap_or_else(|e| panic!("{e}: fe2 {:?} fe3 {:?}", m2.stats(), m3.stats()));
    assert_eq!(lab.fe(3).fwd().counters().tunnel_tx_packets, 0, "fe3 sent nothing back");
    lab.bind_local(3).unwrap();
    let replies = client.replies(Duration::from_millis(800));
    assert_eq!(replies, vec![Probe6Reply::EchoReply { from: VM6 }], "fe3 {:?}", m3.stats());
    assert_eq!(m3.stats().released, 1);
}
