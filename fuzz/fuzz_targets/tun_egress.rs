//! The encapsulation decision for a packet read from TUN: never panics; an encapsulated packet
//! had its TTL decremented with a valid header checksum.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use victor_dataplane::fib::{Action, Fib};
use victor_dataplane::forwarder::pipeline::{self, Egress};
use victor_dataplane::packet::ipv4;

fuzz_target!(|data: &[u8]| {
    let fib = Fib::new(Ipv4Addr::new(192, 0, 2, 1));
    fib.set_peers([Ipv4Addr::new(192, 0, 2, 2)]);
    let _ = fib.set(Ipv4Addr::new(10, 10, 0, 11), Action::Remote(Ipv4Addr::new(192, 0, 2, 2)));
    let _ = fib.set(Ipv4Addr::new(10, 10, 0, 12), Action::Local);
    let mut packet = data.to_vec();
    let mtu = 1480;
    if let Egress::Encap(peer) = pipeline::egress(&mut packet, &fib, mtu) {
        assert_eq!(peer, Ipv4Addr::new(192, 0, 2, 2));
        let before = ipv4::parse(data).expect("encapsulated packets were valid");
        let after = ipv4::parse(&packet).expect("TTL decrement keeps the header valid");
        assert_eq!(after.ttl + 1, before.ttl);
    }
});
