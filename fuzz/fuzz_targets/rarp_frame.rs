//! RARP parser: never panics; whatever parses re-encodes to a frame that parses to the same
//! message; the hypervisor announce is recognised exactly when the frame is QEMU's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use victor_dataplane::packet::rarp;

fuzz_target!(|frame: &[u8]| {
    let Ok(msg) = rarp::parse_frame(frame) else { return };
    let rebuilt = rarp::build_frame(&msg);
    assert_eq!(rarp::parse_frame(&rebuilt), Ok(msg));
    assert!(!msg.claimed_mac().is_multicast());
    if msg.is_hypervisor_announce() && msg.vlan.is_none() {
        assert_eq!(rebuilt, rarp::build_frame(&rarp::announce(msg.sender_mac)));
    }
});
