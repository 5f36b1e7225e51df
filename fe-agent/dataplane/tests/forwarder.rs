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
    assert_eq!(unexpected_drops(&fe1) + unexpected_drops(&fe2), 0, "{fe1:?} {fe2:?}");

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

#[test]
fn several_queues_carry_parallel_flows_intact() {
    let lab = Lab::build_with(LabConfig { queues: 3, ..LabConfig::default() }).unwrap();
    let tun = lab.fe(1).tun.clone();
    assert_eq!(lab.fe(1).fwd().queues(), 3);
    let queues = lab.ns(1).exec(&["ls", &format!("/sys/class/net/{tun}/queues")]).unwrap();
    let tx = String::from_utf8_lossy(&queues.stdout).split_whitespace().filter(|q| q.starts_with("tx-")).count();
    assert_eq!(tx, 3, "one TUN queue per worker");

    // Eight TCP connections at once, each a different pattern, intact and in order.
    parallel_flows_arrive_intact(&lab, VM.into(), 8, 1_500_000, T);
    let f1 = lab.fe(1).fwd().counters();
    assert!(f1.tun_rx_packets > f1.tun_reads, "fe1 read GSO super-packets: {f1:?}");
}

/// Sends `inner` from fe3 to fe2 through the tunnel as one IP-in-IP packet, over an underlay
/// whose MTU was raised so that it arrives whole: what fe2's raw socket sees when the underlay
/// NIC coalesced a run of segments (GRO).
fn send_coalesced(lab: &Lab, inner: &[u8]) {
    send_coalesced_between(lab, 3, 2, inner);
}

/// [`send_coalesced`] from FE `from` to FE `to`.
fn send_coalesced_between(lab: &Lab, from: u8, to: u8, inner: &[u8]) {
    for dev in ["br0", "p1", "p2", "p3"] {
        lab.ul.set_mtu(dev, 9000).unwrap();
    }
    for n in 1..=3 {
        lab.ns(n).set_mtu("ul0", 9000).unwrap();
    }
    let outer = ipv4::encapsulate(inner, &ipv4::Tunnel { src: fe_addr(from), dst: fe_addr(to), ttl: 64 }, 0).unwrap();
    lab.ns(usize::from(from))
        .run_in(move || {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(4)))
                    .unwrap();
            sock.set_header_included_v4(true).unwrap();
            sock.send_to(&outer, &std::net::SocketAddr::from((fe_addr(to), 0)).into()).unwrap();
        })
        .unwrap();
}

/// TCP payload bytes the VM's namespace receives for destination port `port` within `window`
/// (a raw TCP socket sees every TCP packet), and the packets' lengths.
fn vm_tcp_capture(lab: &Lab, port: u16, window: Duration) -> std::thread::JoinHandle<(Vec<u8>, Vec<usize>)> {
    tcp_capture(&lab.vm, port, window)
}

/// [`vm_tcp_capture`] in any namespace.
fn tcp_capture(
    ns: &victor_testkit::netns::NetNs,
    port: u16,
    window: Duration,
) -> std::thread::JoinHandle<(Vec<u8>, Vec<usize>)> {
    ns.spawn_thread("vm-capture", move || {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::TCP)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let deadline = std::time::Instant::now() + window;
        let (mut payload, mut lens) = (Vec::new(), Vec::new());
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 70000];
        while std::time::Instant::now() < deadline {
            let Ok(n) = sock.recv(&mut buf) else { continue };
            // SAFETY: recv initialised the first n bytes.
            let p: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let h = ipv4::parse(&p).unwrap();
            let tcp = &p[h.header_len..h.total_len];
            if u16::from_be_bytes([tcp[2], tcp[3]]) == port {
                lens.push(h.total_len);
                payload.extend_from_slice(&tcp[usize::from(tcp[12] >> 4) * 4..]);
            }
        }
        (payload, lens)
    })
    .unwrap()
}

fn coalesced_tcp_reaches_the_vm(offload: bool) {
    let lab = Lab::build(offload).unwrap();
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ipv4(CLIENT.octets(), VM.octets(), 60)
        .tcp(40000, 5555, 1, 1000)
        .ack(1)
        .write(&mut inner, &payload)
        .unwrap();
    let capture = vm_tcp_capture(&lab, 5555, Duration::from_millis(1500));
    std::thread::sleep(Duration::from_millis(200));
    send_coalesced(&lab, &inner);
    let (got, lens) = capture.join().unwrap();
    assert_eq!(got, payload, "the VM received the whole payload in order (packets {lens:?})");
    let c = lab.fe(2).fwd().counters();
    assert_eq!((c.underlay_rx_coalesced, c.tun_tx_packets), (1, 1), "{c:?}");
    if offload {
        // One write with a GSO header; the kernel segments it (or hands it on whole, over veth).
        assert_eq!((c.tun_writes, c.tun_writes_gso), (1, 1), "{c:?}");
    } else {
        // Split in userspace: segments of at most the tunnel MTU.
        assert_eq!(c.tun_writes, 4, "{c:?}");
        assert!(lens.iter().all(|&l| l <= usize::from(UNDERLAY_MTU) - 20), "{lens:?}");
    }
}

#[test]
fn coalesced_tcp_from_the_underlay_reaches_the_vm_with_offload() {
    coalesced_tcp_reaches_the_vm(true);
}

#[test]
fn coalesced_tcp_from_the_underlay_reaches_the_vm_without_offload() {
    coalesced_tcp_reaches_the_vm(false);
}

#[test]
fn coalesced_udp_from_the_underlay_is_dropped_and_counted() {
    let lab = Lab::build(true).unwrap();
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ipv4(CLIENT.octets(), VM.octets(), 60)
        .udp(4433, 443)
        .write(&mut inner, &[7; 4000])
        .unwrap();
    send_coalesced(&lab, &inner);
    let fwd = lab.fe(2).fwd();
    wait_until("fe2 to drop the coalesced UDP packet", T, || fwd.counters().dropped(DropReason::CoalescedNotTcp) == 1)
        .unwrap_or_else(|e| panic!("{e}: {:?}", fwd.counters()));
    assert_eq!(fwd.counters().tun_tx_packets, 0);
}

#[test]
fn icmp_errors_are_rate_limited() {
    let lab = Lab::build_with(LabConfig { icmp_rate_per_s: 1, icmp_burst: 3, ..LabConfig::default() }).unwrap();
    const SENT: usize = 40;
    let started = std::time::Instant::now();
    let replies = lab
        .client
        .run_in(|| {
            let sock = IcmpSocket::open().unwrap();
            // TTL 2: each one expires at fe1's forwarder, which owes a time exceeded for it.
            for seq in 0..SENT as u16 {
                sock.send(&IcmpSocket::echo_packet(CLIENT, &Probe::echo(VM, 100 + seq).ttl(2))).unwrap();
            }
            sock.replies(Duration::from_millis(700))
        })
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let c = lab.fe(1).fwd().counters();
    assert_eq!(c.dropped(DropReason::TtlExceeded), SENT as u64, "{c:?}");
    assert_eq!(c.icmp_time_exceeded + c.icmp_rate_limited, SENT as u64, "every one is answered or limited: {c:?}");
    // The burst, plus one per second that passed.
    let allowed = 3 + elapsed.ceil() as u64;
    assert!(c.icmp_time_exceeded <= allowed, "{} sent, at most {allowed} allowed: {c:?}", c.icmp_time_exceeded);
    assert!(c.icmp_time_exceeded >= 3, "the burst goes out: {c:?}");
    let errors = replies.iter().filter(|r| matches!(r, ProbeReply::Error { icmp_type: 11, .. })).count() as u64;
    assert_eq!(errors, c.icmp_time_exceeded, "what was counted as sent arrived: {replies:?}");
}

#[test]
fn persistent_tun_outlives_its_forwarder_and_is_adopted_with_its_routes() {
    let mut lab = Lab::build(true).unwrap();
    let (tun, fib) = (lab.fe(1).tun.clone(), lab.fe(1).fib.clone());
    let start = |lab: &Lab| {
        let mut config = victor_dataplane::forwarder::ForwarderConfig::new(&tun);
        config.persist = true;
        let fib = fib.clone();
        lab.ns(1).run_in(move || victor_dataplane::forwarder::Forwarder::start(config, fib)).unwrap().unwrap()
    };
    // Replace fe1's forwarder by a persistent one (a new device: the old one died with its
    // forwarder, and with it the mobile-prefix route, which the agent would re-install).
    lab.fes[0].forwarder.take().unwrap().stop().unwrap();
    wait_until("the old TUN device to go", T, || !lab.ns(1).links().unwrap().contains(&tun)).unwrap();
    let first = start(&lab);
    assert!(!first.adopted());
    lab.ns(1).route(&[MOBILE_PREFIX, "dev", &tun]).unwrap();
    let index = first.tun_index();
    lab.fes[0].forwarder = Some(first);
    assert_eq!(client_probe(&lab, Probe::echo(VM, 20), T).unwrap(), Some(ProbeReply::EchoReply { from: VM }));

    // The forwarder goes away (a process restart): the device and the route stay.
    drop(lab.fes[0].forwarder.take());
    assert!(lab.ns(1).links().unwrap().contains(&tun));
    // Without a queue attached the device has no carrier ("linkdown"), the route stays.
    let routes_of = |lab: &Lab| lab.ns(1).ip(&["route", "show", "dev", &tun]).unwrap().replace(" linkdown", "");
    let routes = routes_of(&lab);
    assert!(routes.contains(MOBILE_PREFIX), "route into the device kept: {routes}");
    assert_eq!(client_probe(&lab, Probe::echo(VM, 21), Duration::from_millis(600)).unwrap(), None, "nobody forwards");

    // The next forwarder adopts it: same interface, route untouched, forwarding again.
    let second = start(&lab);
    assert!(second.adopted());
    assert_eq!(second.tun_index(), index);
    lab.fes[0].forwarder = Some(second);
    assert_eq!(routes_of(&lab), routes, "no route was touched");
    assert_eq!(client_probe(&lab, Probe::echo(VM, 22), T).unwrap(), Some(ProbeReply::EchoReply { from: VM }));

    // remove() deletes it for good.
    lab.fes[0].forwarder.take().unwrap().remove().unwrap();
    wait_until("the persistent device to go", T, || !lab.ns(1).links().unwrap().contains(&tun)).unwrap();
}

#[test]
fn a_leftover_persistent_tun_can_be_removed() {
    let mut lab = Lab::build(true).unwrap();
    let (tun, fib) = (lab.fe(1).tun.clone(), lab.fe(1).fib.clone());
    lab.fes[0].forwarder.take().unwrap().stop().unwrap();
    wait_until("the old TUN device to go", T, || !lab.ns(1).links().unwrap().contains(&tun)).unwrap();
    let mut config = victor_dataplane::forwarder::ForwarderConfig::new(&tun);
    config.persist = true;
    config.queues = 2;
    let fwd = lab.ns(1).run_in(move || victor_dataplane::forwarder::Forwarder::start(config, fib)).unwrap().unwrap();
    drop(fwd);
    assert!(lab.ns(1).links().unwrap().contains(&tun), "persistent");
    let name = tun.clone();
    let removed = lab.ns(1).run_in(move || victor_dataplane::forwarder::remove_persistent_tun(&name)).unwrap();
    assert!(removed.unwrap());
    wait_until("the device to go", T, || !lab.ns(1).links().unwrap().contains(&tun)).unwrap();
    let name = tun.clone();
    assert!(!lab.ns(1).run_in(move || victor_dataplane::forwarder::remove_persistent_tun(&name)).unwrap().unwrap());
}

/// A forwarder prepared on a persistent device another one reads (a standby's) holds its queues
/// detached: every packet still goes to the running forwarder. Once that one is gone, starting
/// the prepared one attaches its queues to the same device and it forwards.
#[test]
fn a_prepared_forwarder_takes_nothing_until_it_starts_then_forwards() {
    let mut lab = Lab::build(true).unwrap();
    let (tun, fib) = (lab.fe(1).tun.clone(), lab.fe(1).fib.clone());
    let config = {
        let mut config = victor_dataplane::forwarder::ForwarderConfig::new(&tun);
        config.persist = true;
        config.queues = 2;
        config
    };
    lab.fes[0].forwarder.take().unwrap().stop().unwrap();
    wait_until("the old TUN device to go", T, || !lab.ns(1).links().unwrap().contains(&tun)).unwrap();
    let (c, f) = (config.clone(), fib.clone());
    let first = lab.ns(1).run_in(move || victor_dataplane::forwarder::Forwarder::start(c, f)).unwrap().unwrap();
    lab.ns(1).route(&[MOBILE_PREFIX, "dev", &tun]).unwrap();
    let index = first.tun_index();
    lab.fes[0].forwarder = Some(first);

    let (c, local) = (config.clone(), fib.local_underlay());
    let prepared = lab.ns(1).run_in(move || victor_dataplane::forwarder::Prepared::new(c, local)).unwrap().unwrap();
    for seq in 0..20 {
        let reply = client_probe(&lab, Probe::echo(VM, 40 + seq), T).unwrap();
        assert_eq!(reply, Some(ProbeReply::EchoReply { from: VM }), "probe {seq}: the detached queues took it");
    }

    drop(lab.fes[0].forwarder.take());
    let second = lab.ns(1).run_in(move || prepared.start(fib)).unwrap().unwrap();
    assert!(second.adopted());
    assert_eq!(second.tun_index(), index);
    assert_eq!(second.queues(), 2);
    lab.fes[0].forwarder = Some(second);
    assert_eq!(client_probe(&lab, Probe::echo(VM, 70), T).unwrap(), Some(ProbeReply::EchoReply { from: VM }));
    lab.fes[0].forwarder.take().unwrap().remove().unwrap();
    wait_until("the persistent device to go", T, || !lab.ns(1).links().unwrap().contains(&tun)).unwrap();
}

/// A forwarder that starts on what the one before it handed on ([`Forwarder::start_on`]: its TUN
/// queues and underlay sockets — how the fe-agent's standby and the next agent take over)
/// forwards what was queued in them while nobody read — a duplicate of each descriptor kept them
/// open, so nothing was dropped — and everything after, as the only reader (its own queues,
/// opened to carry the inherited ones, take nothing). At fe1 the echo requests wait in the TUN
/// queues (client → TUN → tunnel); at fe2 they wait in the raw IP-in-IP sockets (tunnel → TUN →
/// VM). Both ways: a forwarder prepared ahead (the standby's) and one started afresh (the next
/// agent's).
#[test]
fn a_forwarder_started_on_what_the_previous_one_handed_on_forwards_what_waited_in_it() {
    use victor_dataplane::forwarder::{Forwarder, ForwarderConfig, Prepared};
    let mut lab = Lab::build(true).unwrap();
    let client = lab.client.run_in(IcmpSocket::open).unwrap().unwrap();
    let mut seq = 100;
    for n in [1, 2] {
        let (tun, fib) = (lab.fe(n).tun.clone(), lab.fe(n).fib.clone());
        let config = {
            let mut config = ForwarderConfig::new(&tun);
            config.persist = true;
            config.queues = 2;
            config
        };
        // A persistent forwarder in place of the lab's (a new device: its routes go with the
        // old one and are put back).
        lab.fes[n - 1].forwarder.take().unwrap().stop().unwrap();
        wait_until("the old TUN device to go", T, || !lab.ns(n).links().unwrap().contains(&tun)).unwrap();
        let (c, f) = (config.clone(), fib.clone());
        let first = lab.ns(n).run_in(move || Forwarder::start(c, f)).unwrap().unwrap();
        lab.ns(n).route(&[MOBILE_PREFIX, "dev", &tun]).unwrap();
        let index = first.tun_index();
        lab.fes[n - 1].forwarder = Some(first);
        let probe = client_probe(&lab, Probe::echo(VM, seq), T).unwrap();
        assert_eq!(probe, Some(ProbeReply::EchoReply { from: VM }), "fe{n}");
        seq += 1;
        // Our socket saw that reply too (every raw ICMP socket does): not one of the counted.
        client.replies(Duration::from_millis(300));
        for prepared in [true, false] {
            let ahead = prepared.then(|| {
                let (c, local) = (config.clone(), fib.local_underlay());
                lab.ns(n).run_in(move || Prepared::new(c, local)).unwrap().unwrap()
            });
            let previous = lab.fes[n - 1].forwarder.take().unwrap();
            let handed = previous.handed_on().unwrap();
            assert_eq!((handed.queues.len(), handed.ipip.len(), handed.sixin4.len()), (2, 2, 2));
            previous.stop().unwrap();
            // Nobody reads: these wait in fe1's queues or in fe2's sockets.
            for s in seq..seq + 10 {
                client.send(&IcmpSocket::echo_packet(CLIENT, &Probe::echo(VM, s))).unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
            let (c, f) = (config.clone(), fib.clone());
            let next = lab
                .ns(n)
                .run_in(move || match ahead {
                    Some(prepared) => prepared.start_on(f, handed),
                    None => Forwarder::start_on(c, f, handed),
                })
                .unwrap()
                .unwrap();
            assert!(next.adopted());
            assert_eq!((next.tun_index(), next.queues()), (index, 2));
            lab.fes[n - 1].forwarder = Some(next);
            // And after: they reach the one reader.
            for s in seq + 10..seq + 20 {
                client.send(&IcmpSocket::echo_packet(CLIENT, &Probe::echo(VM, s))).unwrap();
            }
            let replies = client.replies(Duration::from_secs(2));
            let echoed = replies.iter().filter(|r| **r == ProbeReply::EchoReply { from: VM }).count();
            assert_eq!(
                echoed, 20,
                "fe{n}, prepared {prepared}: every echo that waited while nobody read, and every one after, is answered \
                 once: {replies:?}"
            );
            seq += 20;
        }
    }
    for n in [1, 2] {
        let tun = lab.fe(n).tun.clone();
        lab.fes[n - 1].forwarder.take().unwrap().remove().unwrap();
        wait_until("the persistent device to go", T, || !lab.ns(n).links().unwrap().contains(&tun)).unwrap();
    }
}

/// An announced migration (issue 18): while the VM is announced to move from fe2 to fe3, fe2
/// copies what it delivers to fe3, which holds it until the VM is local there. A request that
/// reaches fe2 after the VM stopped there (its port dead) but before fe2 knows the move is
/// answered by the VM at fe3 once fe3 installs it; a copy held longer than the window (the VM
/// had it at fe2 already) is dropped, not delivered twice; nothing loops back meanwhile.
fn announced_migration(offload: bool) {
    let lab = Lab::build(offload).unwrap();
    let window = Duration::from_millis(1500);
    lab.announce_migration(VM, Some(3));
    for n in 1..=3 {
        lab.fe(n).fib.migrations().set_hold_window(window);
    }
    let (m2, m3) = (lab.fe(2).fib.migrations(), lab.fe(3).fib.migrations());
    // While the VM runs at fe2: answered there, copied to fe3, held there (not delivered: fe3
    // would route it back into the tunnel).
    assert_eq!(client_probe(&lab, Probe::echo(VM, 21), T).unwrap(), Some(ProbeReply::EchoReply { from: VM }));
    wait_until("fe2 to copy the request to fe3 and fe3 to hold it", T, || {
        m2.stats().copied >= 1 && m3.stats().held >= 1
    })
    .unwrap_or_else(|e| panic!("{e}: fe2 {:?} fe3 {:?}", m2.stats(), m3.stats()));
    let fe3 = lab.fe(3).fwd().counters();
    assert_eq!((fe3.tun_tx_packets, fe3.tunnel_tx_packets), (0, 0), "fe3 neither delivered nor sent back: {fe3:?}");
    // Let that copy age beyond the window: the VM answered it at fe2 already.
    std::thread::sleep(window + Duration::from_millis(100));

    // The VM stops at fe2 (its port goes dead) and resumes at fe3; nobody knows yet.
    lab.vm.ip(&["link", "set", "eth0", "down"]).unwrap();
    let client = lab.client.run_in(IcmpSocket::open).unwrap().unwrap();
    let held_before = m3.stats().held;
    client.send(&IcmpSocket::echo_packet(CLIENT, &Probe::echo(VM, 22))).unwrap();
    wait_until("fe3 to hold the copy of the request the dead port got", T, || m3.stats().held > held_before)
        .unwrap_or_else(|e| panic!("{e}: fe2 {:?} fe3 {:?}", m2.stats(), m3.stats()));
    // fe3 installs the VM (what the agent does on the VM's announcement): the held request goes in.
    lab.bind_local(3).unwrap();
    let replies = client.replies(Duration::from_millis(800));
    let echoed = replies.iter().filter(|r| **r == ProbeReply::EchoReply { from: VM }).count();
    assert_eq!(echoed, 1, "the request is answered once, by the VM at fe3: {replies:?}; fe3 {:?}", m3.stats());
    let s = m3.stats();
    assert_eq!(s.released, 1, "only the fresh copy is delivered: {s:?}");
    assert!(s.expired >= 1, "the aged copy is dropped: {s:?}");
    assert_eq!(m3.held_now(), 0, "{s:?}");
    assert!(lab.fe(3).fwd().counters().tun_tx_packets >= 1);
    assert_eq!(unexpected_drops(&lab.fe(3).fwd().counters()), 0);
    // The announcement withdrawn: fe2 copies nothing more.
    lab.announce_migration(VM, None);
    lab.bind_remote(2, 3).unwrap();
    let copied = m2.stats().copied;
    assert_eq!(client_probe(&lab, Probe::echo(VM, 23), T).unwrap(), Some(ProbeReply::EchoReply { from: VM }));
    assert_eq!(m2.stats().copied, copied);
}

#[test]
fn an_announced_migration_delivers_at_the_new_fe_what_reached_the_old_one_after_the_vm_left_with_offload() {
    announced_migration(true);
}

#[test]
fn an_announced_migration_delivers_at_the_new_fe_what_reached_the_old_one_after_the_vm_left_without_offload() {
    announced_migration(false);
}

/// Coalesced TCP during an announced migration: the old FE (fe2) copies it to fe3 split into
/// tunnel-MTU segments, and fe3 splits what reaches it coalesced itself before holding it; both
/// reach the VM whole once it is local at fe3.
#[test]
fn an_announced_migration_relays_coalesced_tcp_in_segments() {
    let lab = Lab::build(true).unwrap();
    lab.announce_migration(VM, Some(3));
    let m3 = lab.fe(3).fib.migrations();
    m3.set_hold_window(Duration::from_secs(10));
    lab.vm.ip(&["link", "set", "eth0", "down"]).unwrap();
    let segment = |port: u16, fill: u32| {
        let payload: Vec<u8> = (0..5000u32).map(|i| ((i + fill) % 251) as u8).collect();
        let mut inner = Vec::new();
        etherparse::PacketBuilder::ipv4(CLIENT.octets(), VM.octets(), 60)
            .tcp(40000, port, 1, 1000)
            .ack(1)
            .write(&mut inner, &payload)
            .unwrap();
        (inner, payload)
    };
    let (via_old, via_old_payload) = segment(5556, 0);
    let (direct, direct_payload) = segment(5557, 7);
    // fe1 → fe2 (the old FE: delivers to the dead port, copies to fe3 in segments) and fe2 → fe3
    // directly (coalesced on arrival at fe3).
    send_coalesced_between(&lab, 1, 2, &via_old);
    send_coalesced_between(&lab, 2, 3, &direct);
    let per_packet = usize::from(UNDERLAY_MTU) - 20 - 40;
    let segments = 2 * 5000usize.div_ceil(per_packet) as u64;
    wait_until("fe3 to hold both, in segments", T, || m3.stats().held == segments)
        .unwrap_or_else(|e| panic!("{e}: fe2 {:?} fe3 {:?}", lab.fe(2).fib.migrations().stats(), m3.stats()));
    let captures = [
        tcp_capture(&lab.vm3, 5556, Duration::from_millis(1500)),
        tcp_capture(&lab.vm3, 5557, Duration::from_millis(1500)),
    ];
    std::thread::sleep(Duration::from_millis(200));
    lab.bind_local(3).unwrap();
    let [a, b] = captures.map(|c| c.join().unwrap());
    assert_eq!(a.0, via_old_payload, "copied by fe2: {:?}", a.1);
    assert_eq!(b.0, direct_payload, "held by fe3: {:?}", b.1);
    assert_eq!(m3.stats().released, segments);
}
