//! ARP/Ethernet parser: never panics; whatever parses re-encodes to a frame that parses to the
//! same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use victor_dataplane::packet::arp;

fuzz_target!(|frame: &[u8]| {
    if let Ok(msg) = arp::parse_frame(frame) {
        let rebuilt = arp::build_frame(&msg);
        let again = arp::parse_frame(&rebuilt).expect("a built frame must parse");
        assert_eq!(again, msg);
        let _ = msg.kind();
    }
});
