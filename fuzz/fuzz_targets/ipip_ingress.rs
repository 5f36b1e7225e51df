//! The IP-in-IP decapsulation path (packets received on the underlay raw socket): never panics,
//! only accepts packets from registered peers, and what it accepts is a well-formed inner IPv4
//! packet inside the buffer. The input is cut into up to four received packets (first byte: cut
//! points); the accepted ones go through the TUN-write planner (userspace GRO), which never
//! panics, writes every accepted packet exactly once, in order within a flow, and rejects only
//! coalesced non-TCP packets.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use victor_dataplane::fib::Fib;
use victor_dataplane::forwarder::pipeline;
use victor_dataplane::packet::gro::Coalescer;
use victor_dataplane::packet::ipv4;

fuzz_target!(|input: &[u8]| {
    let Some((&cuts, data)) = input.split_first() else { return };
    let fib = Fib::new(Ipv4Addr::new(192, 0, 2, 1));
    fib.set_peers([Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)]);
    // Up to four packets: cut points from the first byte's 2-bit fields, scaled to the data.
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
        if let Ok(inner) = pipeline::ingress(&mut packet, &fib) {
            assert!(inner.end <= packet.len() && inner.start <= inner.end);
            let outer = ipv4::parse_header(original).expect("accepted packets have a valid outer header");
            assert!(fib.is_peer(outer.src), "accepted IP-in-IP from an unregistered source {}", outer.src);
            ipv4::parse(&packet[inner.clone()]).expect("the accepted inner packet is valid IPv4");
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
        assert!(ipv4::parse(&accepted[*i]).expect("valid").total_len > 1480, "only coalesced packets are rejected");
    }
});
