//! The IP-in-IP decapsulation path (a packet received on the underlay raw socket): never panics,
//! only accepts packets from registered peers, and what it accepts is a well-formed inner IPv4
//! packet inside the buffer.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use victor_dataplane::fib::Fib;
use victor_dataplane::forwarder::pipeline;
use victor_dataplane::packet::ipv4;

fuzz_target!(|data: &[u8]| {
    let fib = Fib::new(Ipv4Addr::new(192, 0, 2, 1));
    fib.set_peers([Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)]);
    let mut packet = data.to_vec();
    if let Ok(inner) = pipeline::ingress(&mut packet, &fib) {
        assert!(inner.end <= packet.len() && inner.start <= inner.end);
        let outer = ipv4::parse_header(data).expect("accepted packets have a valid outer header");
        assert!(fib.is_peer(outer.src), "accepted IP-in-IP from an unregistered source {}", outer.src);
        ipv4::parse(&packet[inner]).expect("the accepted inner packet is valid IPv4");
    }
});
