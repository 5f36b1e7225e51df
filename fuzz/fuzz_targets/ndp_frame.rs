//! NDP parser (Ethernet/IPv6/ICMPv6 neighbour and router messages): never panics; whatever
//! parses re-encodes to a frame that parses to the same message, whose learned claim is never a
//! link-local, multicast or unspecified address nor a group MAC, and whose proxy answer (for a
//! solicitation) parses as a valid advertisement for the same target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use victor_dataplane::packet::arp::MacAddr;
use victor_dataplane::packet::ndp::{self, Ndp, NdpKind};

fuzz_target!(|frame: &[u8]| {
    let Ok(msg) = ndp::parse_frame(frame) else { return };
    let rebuilt = ndp::build_frame(&msg);
    let again = ndp::parse_frame(&rebuilt).expect("a built frame must parse");
    assert_eq!(again, msg);
    if let Some((addr, mac)) = msg.claim() {
        assert!(!addr.is_unicast_link_local() && !addr.is_multicast() && !addr.is_unspecified());
        assert!(!mac.is_multicast(), "a claim never names a group MAC");
    }
    if let Ndp::NeighborSolicitation { target, .. } = msg.body {
        let answer = ndp::advertise_to(&msg, MacAddr([2, 0, 0, 0, 0xfe, 1]), false, true).expect("an NS");
        let parsed = ndp::parse_frame(&ndp::build_frame(&answer)).expect("a proxy answer parses");
        assert_eq!(parsed.target(), Some(target));
        assert_eq!(parsed.kind() == NdpKind::SolicitedAdvertisement, msg.kind() != NdpKind::Dad);
    }
});
