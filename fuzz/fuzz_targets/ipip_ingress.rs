//! The IP-in-IP decapsulation path (packets received on the underlay raw socket), checked by
//! [`victor_fuzz::check_decapsulation`]: what it accepts is a well-formed inner IPv4 packet
//! inside the buffer, from a registered peer; the TUN-write planner writes every accepted packet
//! once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use victor_dataplane::forwarder::pipeline;
use victor_dataplane::packet::ipv4;
use victor_fuzz::{Decapsulation, check_decapsulation};

const IPIP: Decapsulation = Decapsulation {
    name: "IP-in-IP",
    ingress: pipeline::ingress,
    check_inner: |_original, packet, inner| {
        ipv4::parse(&packet[inner]).expect("the accepted inner packet is valid IPv4").total_len
    },
};

fuzz_target!(|input: &[u8]| check_decapsulation(input, &IPIP));
