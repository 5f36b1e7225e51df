//! BGP-4 message codec of the agent's BGP speaker on arbitrary bytes from a router: framing and
//! decoding never panic, every refusal names a NOTIFICATION, and what decodes re-encodes to a
//! message that decodes to the same value (OPEN, NOTIFICATION, and the routes and attributes of
//! an UPDATE, IPv4 and IPv6). The first byte chooses the session's AS number width.
#![no_main]

use libfuzzer_sys::fuzz_target;
use victor_fe_agent::codec::bgp::{self, Attributes, Message, Update};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    let four_octet = flags & 1 == 1;
    let len = match bgp::frame_len(bytes) {
        Ok(Some(len)) if len <= bytes.len() => len,
        Ok(_) => return,
        Err(e) => {
            assert!((1..=6).contains(&e.notification.code));
            return;
        }
    };
    let message = match bgp::decode(&bytes[..len], four_octet) {
        Ok(m) => m,
        Err(e) => {
            assert!((1..=6).contains(&e.notification.code));
            return;
        }
    };
    match message {
        Message::Open(open) => {
            // Our encoder writes every capability into one optional parameter (at most 255
            // bytes); an OPEN that spread more over several cannot be written back as one.
            let caps: usize = open
                .capabilities
                .iter()
                .map(|c| match c {
                    bgp::Capability::Multiprotocol { .. } => 6,
                    bgp::Capability::FourOctetAs(_) => 6,
                    bgp::Capability::Other { value, .. } => 2 + value.len(),
                })
                .sum();
            if caps <= 253 {
                assert_eq!(bgp::decode(&open.encode(), four_octet).unwrap(), Message::Open(open));
            }
        }
        Message::Notification(n) => {
            assert_eq!(bgp::decode(&n.encode(), four_octet).unwrap(), Message::Notification(n));
        }
        Message::Update(update) => round_trip_update(&update, four_octet, len),
        Message::Keepalive | Message::RouteRefresh { .. } => {}
    }
});

/// The routes of an UPDATE, announced or withdrawn again with its attributes, decode the same.
fn round_trip_update(update: &Update, four_octet: bool, len: usize) {
    // ORIGIN is always written; unknown attributes are not kept.
    let attributes = Attributes { origin: Some(update.attributes.origin.unwrap_or(0)), ..update.attributes.clone() };
    // Written back, the attributes take at most the 4 bytes of ORIGIN more than they took.
    if !update.nlri.is_empty() && len + 4 <= bgp::MAX_LEN {
        let mut nlri = Vec::new();
        for m in Update::announce(&update.nlri, &attributes, four_octet) {
            let Message::Update(u) = bgp::decode(&m, four_octet).unwrap() else { panic!("not an UPDATE") };
            assert_eq!(u.attributes, attributes);
            nlri.extend(u.nlri);
        }
        assert_eq!(nlri, update.nlri);
    }
    if !update.withdrawn.is_empty() {
        let mut withdrawn = Vec::new();
        for m in Update::withdraw(&update.withdrawn) {
            let Message::Update(u) = bgp::decode(&m, four_octet).unwrap() else { panic!("not an UPDATE") };
            withdrawn.extend(u.withdrawn);
        }
        assert_eq!(withdrawn, update.withdrawn);
    }
    // IPv6 (MP_REACH_NLRI): the next hop travels in the attribute, the IPv4 NEXT_HOP is left out;
    // written back with an extended length, it may take one byte more.
    if let Some(reach) = update.reach6.as_ref().filter(|r| !r.nlri.is_empty())
        && len + 5 <= bgp::MAX_LEN
    {
        let mut nlri = Vec::new();
        for m in Update::announce6(&reach.nlri, &attributes, reach.next_hop, four_octet) {
            let Message::Update(u) = bgp::decode(&m, four_octet).unwrap() else { panic!("not an UPDATE") };
            assert_eq!(u.attributes, Attributes { next_hop: None, ..attributes.clone() });
            let back = u.reach6.expect("MP_REACH_NLRI");
            assert_eq!(back.next_hop, reach.next_hop);
            nlri.extend(back.nlri);
        }
        assert_eq!(nlri, reach.nlri);
    }
    if !update.unreach6.is_empty() {
        let mut withdrawn = Vec::new();
        for m in Update::withdraw6(&update.unreach6) {
            let Message::Update(u) = bgp::decode(&m, four_octet).unwrap() else { panic!("not an UPDATE") };
            withdrawn.extend(u.unreach6);
        }
        assert_eq!(withdrawn, update.unreach6);
    }
}
