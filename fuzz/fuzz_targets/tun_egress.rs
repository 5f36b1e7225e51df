//! What the forwarder does with a packet read from TUN (IPv4 or IPv6): the encapsulation decision
//! never panics and an encapsulated packet had its TTL (hop limit) decremented, with a valid
//! header checksum for IPv4; read as a GSO super-packet (the first input byte picks TCP or UDP
//! and the segment size), the split into IP-in-IP / 6in4 segments never panics, and every segment
//! is a valid tunnel packet of at most the segment size whose inner checksums verify, the
//! payloads together being the original payload.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use victor_dataplane::fib::{Action, Fib};
use victor_dataplane::forwarder::pipeline::{self, Egress};
use victor_dataplane::packet::gso::{self, GsoKind};
use victor_dataplane::packet::{checksum, ipv4, ipv6, sixin4};

fuzz_target!(|input: &[u8]| {
    let Some((&control, data)) = input.split_first() else { return };
    let fib = Fib::new(Ipv4Addr::new(192, 0, 2, 1));
    fib.set_peers([Ipv4Addr::new(192, 0, 2, 2)]);
    let _ = fib.set(Ipv4Addr::new(10, 10, 0, 11), Action::Remote(Ipv4Addr::new(192, 0, 2, 2)));
    let _ = fib.set(Ipv4Addr::new(10, 10, 0, 12), Action::Local);
    let _ = fib.set(
        "2001:db8:10::11".parse::<std::net::Ipv6Addr>().expect("address"),
        Action::Remote(Ipv4Addr::new(192, 0, 2, 2)),
    );
    let mut packet = data.to_vec();
    let mtu = 1480;
    if let Egress::Encap(peer) = pipeline::egress(&mut packet, &fib, mtu) {
        assert_eq!(peer, Ipv4Addr::new(192, 0, 2, 2));
        if ipv4::version(data) == Some(6) {
            let before = ipv6::parse(data).expect("encapsulated packets were valid");
            let after = ipv6::parse(&packet).expect("hop limit decrement keeps the header valid");
            assert_eq!(after.hop_limit + 1, before.hop_limit);
            assert!(before.total_len() <= mtu && !before.dst.is_multicast());
        } else {
            let before = ipv4::parse(data).expect("encapsulated packets were valid");
            let after = ipv4::parse(&packet).expect("TTL decrement keeps the header valid");
            assert_eq!(after.ttl + 1, before.ttl);
        }
    }

    let kind = if control & 1 == 0 { GsoKind::Tcp } else { GsoKind::Udp };
    let gso_size = usize::from(control >> 1) * 12 + 1;
    let tunnel = ipv4::Tunnel { src: Ipv4Addr::new(192, 0, 2, 1), dst: Ipv4Addr::new(192, 0, 2, 2), ttl: 64 };
    let (mut arena, mut segs) = (Vec::new(), Vec::new());
    let Ok(()) = gso::segment(data, kind, gso_size, Some(&tunnel), &mut arena, &mut segs) else {
        assert!(arena.is_empty() && segs.is_empty(), "nothing written on error");
        return;
    };
    let layout = gso::layout(data, kind).expect("segmented packets have a layout");
    let mut payload = Vec::new();
    for s in &segs {
        assert!(s.payload.len() <= gso_size);
        let mut outer = arena[s.header.clone()].to_vec();
        outer.extend_from_slice(&data[s.payload.clone()]);
        let l4 = if layout.version == 6 {
            let d = sixin4::decapsulate(&mut outer).expect("each segment is a valid 6in4 packet");
            let inner = &outer[d.inner.clone()];
            let h = ipv6::parse(inner).expect("valid inner header");
            let l4 = inner[ipv6::HEADER_LEN..h.total_len()].to_vec();
            assert_eq!(
                checksum::finish(u32::from(ipv6::upper_layer_sum(&h, h.next_header, &l4))),
                0,
                "transport checksum"
            );
            l4
        } else {
            let d = ipv4::decapsulate(&mut outer).expect("each segment is a valid tunnel packet");
            let inner = &outer[d.inner.clone()];
            let h = ipv4::parse(inner).expect("valid inner header");
            let l4 = inner[h.header_len..h.total_len].to_vec();
            let pseudo = checksum::pseudo_header(h.src.octets(), h.dst.octets(), h.protocol, l4.len() as u16);
            assert_eq!(checksum::finish(u32::from(checksum::add(pseudo, checksum::sum(&l4)))), 0, "transport checksum");
            l4
        };
        payload.extend_from_slice(&l4[layout.l4_len..]);
    }
    assert_eq!(&payload[..], &data[layout.headers_len()..layout.total_len]);
});
