//! The 6in4 decapsulation path (packets received on the protocol-41 raw socket): never panics,
//! only accepts packets from registered peers, and what it accepts is a well-formed inner IPv6
//! packet inside the buffer whose ECN was merged by RFC 6040. The input is cut into up to four
//! received packets (first byte: cut points); the accepted ones go through the TUN-write planner
//! (userspace GRO), which never panics, writes every accepted packet exactly once, and rejects
//! only coalesced non-TCP packets. Accepted packets re-encapsulate to the same inner bytes.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use victor_dataplane::fib::Fib;
use victor_dataplane::forwarder::pipeline;
use victor_dataplane::packet::gro::Coalescer;
use victor_dataplane::packet::{ipv4, ipv6, sixin4};

fuzz_target!(|input: &[u8]| {
    let Some((&cuts, data)) = input.split_first() else { return };
    let fib = Fib::new(Ipv4Addr::new(192, 0, 2, 1));
    fib.set_peers([Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)]);
    let mut bounds = vec![0];
    for k in 0..3 {
        let at = usize::from((cuts >> (2 * k)) & 3) * data.len() / 4;
        bounds.push(at.max(*bounds.last().expect("non-empty")));
    }
    bounds.push(data.len());
    let mut accepted: Vec<Vec<u8>> = Vec::new();
    for w in bounds.windows(2) {
        let original = &data[w[0]..w[1]];
        let mut packet = original.to_vec();
        if let Ok(inner) = pipeline::ingress6(&mut packet, &fib) {
            assert!(inner.end <= packet.len() && inner.start <= inner.end);
            let outer = ipv4::parse_header(original).expect("accepted packets have a valid outer header");
            assert_eq!(outer.protocol, ipv4::PROTO_IPV6);
            assert!(fib.is_peer(outer.src), "accepted 6in4 from an unregistered source {}", outer.src);
            let h = ipv6::parse(&packet[inner.clone()]).expect("the accepted inner packet is valid IPv6");
            assert_eq!(h.total_len(), inner.len());
            let tunnel = ipv4::Tunnel { src: outer.src, dst: outer.dst, ttl: outer.ttl };
            let again = sixin4::encapsulate(&packet[inner.clone()], &tunnel, 0).expect("re-encapsulates");
            assert_eq!(&again[20..], &packet[inner.clone()]);
            accepted.push(packet[inner].to_vec());
        }
    }
    let mut c = Coalescer::new();
    c.plan(accepted.len(), |i| &accepted[i], 1480);
    let mut written: Vec<usize> = c.writes().iter().flat_map(|w| c.members()[w.members.clone()].to_vec()).collect();
    written.extend(c.rejected().iter().map(|(i, _)| *i));
    written.sort_unstable();
    assert_eq!(written, (0..accepted.len()).collect::<Vec<_>>(), "every packet written or rejected once");
    for (i, _) in c.rejected() {
        assert!(ipv6::parse(&accepted[*i]).expect("valid").total_len() > 1480, "only coalesced packets are rejected");
    }
});
