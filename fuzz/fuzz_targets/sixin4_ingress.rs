//! The 6in4 decapsulation path (packets received on the protocol-41 raw socket), checked by
//! [`victor_fuzz::check_decapsulation`]: what it accepts is a well-formed inner IPv6 packet inside
//! the buffer, from a registered peer, whose ECN was merged by RFC 6040; accepted packets
//! re-encapsulate to the same inner bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use victor_dataplane::forwarder::pipeline;
use victor_dataplane::packet::{ipv4, ipv6, sixin4};
use victor_fuzz::{Decapsulation, check_decapsulation};

const SIXIN4: Decapsulation = Decapsulation {
    name: "6in4",
    ingress: pipeline::ingress6,
    check_inner: |original, packet, inner| {
        let outer = ipv4::parse_header(original).expect("accepted packets have a valid outer header");
        assert_eq!(outer.protocol, ipv4::PROTO_IPV6);
        let h = ipv6::parse(&packet[inner.clone()]).expect("the accepted inner packet is valid IPv6");
        assert_eq!(h.total_len(), inner.len());
        let tunnel = ipv4::Tunnel { src: outer.src, dst: outer.dst, ttl: outer.ttl };
        let again = sixin4::encapsulate(&packet[inner.clone()], &tunnel, 0).expect("re-encapsulates");
        assert_eq!(&again[20..], &packet[inner.clone()]);
        h.total_len()
    },
};

fuzz_target!(|input: &[u8]| check_decapsulation(input, &SIXIN4));
