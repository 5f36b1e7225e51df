//! 6in4 (RFC 4213 §3): IPv6 packets carried in IPv4 with protocol 41, the IPv6 counterpart of
//! [`super::ipv4`]'s IP-in-IP, working the same way in place (the outer header is written into
//! 20 bytes of headroom in front of the inner packet).
//!
//! Header rules, as the IPv4-in-IPv4 path applies them:
//! * **TTL / hop limit**: the outer TTL is the tunnel's ([`Tunnel::ttl`]); the inner hop limit is
//!   the forwarder's business (the tunnel is one hop: decremented before encapsulation, never at
//!   decapsulation).
//! * **ECN / DSCP**: the inner traffic class is copied to the outer TOS (RFC 6040 normal mode);
//!   at decapsulation the outer ECN mark is merged into the inner traffic class by
//!   [`ipv4::ecn_decapsulate`] (outer CE over a not-ECT inner packet: drop).
//! * **DF and PMTU**: the tunnel MTU is static (the underlay MTU − 20, as for IPv4) and the
//!   forwarder answers anything larger with an ICMPv6 Packet Too Big. IPv6 packets are never
//!   fragmented on the way, so the outer header always carries DF — as an IPv4 packet with DF does
//!   in the IP-in-IP path, and as Linux's `sit` device does with its default `pmtudisc`. (RFC 4213
//!   §3.2.1 asks for DF clear with a static MTU so an underlay narrower than configured fragments
//!   instead of dropping; here the underlay MTU is configuration both FE backends trust.)

use std::net::Ipv4Addr;
use std::ops::Range;

use super::ipv4::{self, HEADER_LEN, Ipv4Error, PROTO_IPV6, Tunnel};
use super::ipv6::{self, Ipv6Error, Ipv6Header};

/// Why an IPv6 packet cannot be encapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncapError {
    /// The inner packet is not valid IPv6.
    #[error("inner packet: {0}")]
    Inner(#[from] Ipv6Error),
    /// Inner packet + outer header would exceed 65535 bytes.
    #[error("inner packet of {0} bytes does not fit an outer IPv4 header")]
    TooBig(usize),
    /// The buffer has less than 20 bytes of headroom before the inner packet.
    #[error("no room for the outer header: {0} bytes of headroom, 20 needed")]
    NoHeadroom(usize),
}

/// Writes the outer header for `inner` into `out`: protocol 41, TTL from `tunnel`, TOS = the
/// inner traffic class, DF set. `ident` fills the identification field (0: the kernel's choice).
pub fn write_outer_header(
    out: &mut [u8; HEADER_LEN],
    inner: &Ipv6Header,
    tunnel: &Tunnel,
    ident: u16,
) -> Result<(), EncapError> {
    if ipv4::write_tunnel_header(out, PROTO_IPV6, inner.traffic_class, true, inner.total_len(), tunnel, ident) {
        Ok(())
    } else {
        Err(EncapError::TooBig(inner.total_len()))
    }
}

/// Encapsulates in place: `buf` is 20 bytes of headroom followed by exactly one IPv6 packet
/// (bytes after its length are ignored). Returns the length of the outer packet at the start of
/// `buf`.
pub fn encapsulate_in_place(buf: &mut [u8], tunnel: &Tunnel, ident: u16) -> Result<usize, EncapError> {
    if buf.len() < HEADER_LEN {
        return Err(EncapError::NoHeadroom(buf.len()));
    }
    let (head, inner) = buf.split_at_mut(HEADER_LEN);
    let head: &mut [u8; HEADER_LEN] = head.try_into().expect("split at HEADER_LEN");
    let inner_header = ipv6::parse(inner)?;
    write_outer_header(head, &inner_header, tunnel, ident)?;
    Ok(HEADER_LEN + inner_header.total_len())
}

/// Encapsulates `inner` into a new buffer (slow path and tests).
pub fn encapsulate(inner: &[u8], tunnel: &Tunnel, ident: u16) -> Result<Vec<u8>, EncapError> {
    let mut buf = vec![0u8; HEADER_LEN + inner.len()];
    buf[HEADER_LEN..].copy_from_slice(inner);
    let len = encapsulate_in_place(&mut buf, tunnel, ident)?;
    buf.truncate(len);
    Ok(buf)
}

/// A decapsulated 6in4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decapsulated {
    /// Outer source: the sending FE, to check against the registered peers.
    pub outer_src: Ipv4Addr,
    /// Outer destination.
    pub outer_dst: Ipv4Addr,
    /// Where the inner packet lies in the buffer.
    pub inner: Range<usize>,
    /// The inner header (after ECN propagation).
    pub inner_header: Ipv6Header,
}

/// Why a received packet is not a usable 6in4 packet. [`DecapError::reason`] is a stable counter
/// label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// Outer header invalid.
    #[error("outer header: {0}")]
    Outer(Ipv4Error),
    /// Outer protocol is not 41.
    #[error("outer protocol {0} is not 6in4 (41)")]
    NotSixInFour(u8),
    /// Outer header is a fragment (the kernel reassembles before raw sockets, so this is bogus).
    #[error("outer packet is a fragment")]
    OuterFragment,
    /// The inner packet is not IPv6.
    #[error("inner packet is IP version {0}, not 6")]
    InnerNotIpv6(u8),
    /// Inner header invalid.
    #[error("inner header: {0}")]
    Inner(Ipv6Error),
    /// Outer CE over a not-ECN-capable inner packet: RFC 6040 says drop.
    #[error("outer ECN CE on a not-ECT inner packet")]
    EcnDrop,
}

impl DecapError {
    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            DecapError::Outer(_) => "outer_malformed",
            DecapError::NotSixInFour(_) => "not_6in4",
            DecapError::OuterFragment => "outer_fragment",
            DecapError::InnerNotIpv6(_) => "inner_not_ipv6",
            DecapError::Inner(_) => "inner_malformed",
            DecapError::EcnDrop => "ecn_drop",
        }
    }
}

/// Validates a 6in4 packet and locates its inner packet. Mutable only to merge an outer ECN mark
/// into the inner traffic class (RFC 6040); the outer source is returned for the peer check.
pub fn decapsulate(packet: &mut [u8]) -> Result<Decapsulated, DecapError> {
    let outer = ipv4::parse(packet).map_err(DecapError::Outer)?;
    if outer.protocol != PROTO_IPV6 {
        return Err(DecapError::NotSixInFour(outer.protocol));
    }
    if outer.is_fragment() {
        return Err(DecapError::OuterFragment);
    }
    let payload = &mut packet[outer.header_len..outer.total_len];
    match ipv4::version(payload) {
        Some(6) => {}
        Some(v) => return Err(DecapError::InnerNotIpv6(v)),
        None => return Err(DecapError::Inner(Ipv6Error::TooShort(0))),
    }
    let mut inner = ipv6::parse(payload).map_err(DecapError::Inner)?;
    let ecn = ipv4::ecn_decapsulate(inner.ecn(), outer.ecn()).ok_or(DecapError::EcnDrop)?;
    if ecn != inner.ecn() {
        inner.traffic_class = (inner.traffic_class & !0b11) | ecn;
        ipv6::set_traffic_class(payload, inner.traffic_class);
    }
    let start = outer.header_len;
    Ok(Decapsulated {
        outer_src: outer.src,
        outer_dst: outer.dst,
        inner: start..start + inner.total_len(),
        inner_header: inner,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use proptest::prelude::*;

    const FE1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const FE2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
    const VM: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);

    fn tunnel() -> Tunnel {
        Tunnel { src: FE1, dst: FE2, ttl: ipv4::DEFAULT_OUTER_TTL }
    }

    fn packet(tc: u8, len: usize) -> Vec<u8> {
        ipv6::build_packet(CLIENT, VM, ipv6::NEXT_UDP, 63, tc, &vec![0xab; len])
    }

    #[test]
    fn encapsulation_sets_protocol_tos_df() {
        let inner = packet(0b1011_1001, 100);
        let outer = encapsulate(&inner, &tunnel(), 0).unwrap();
        let h = ipv4::parse(&outer).unwrap();
        assert_eq!((h.protocol, h.src, h.dst, h.ttl), (PROTO_IPV6, FE1, FE2, 64));
        assert_eq!(h.tos, 0b1011_1001);
        assert!(h.dont_fragment);
        assert_eq!(h.total_len, inner.len() + 20);
        assert_eq!(&outer[20..], &inner[..]);
        // etherparse reads the same: IPv4 carrying IPv6.
        let (eh, _) = etherparse::Ipv4Header::from_slice(&outer).unwrap();
        assert_eq!(eh.protocol, etherparse::IpNumber::IPV6);
        assert_eq!(eh.header_checksum, eh.calc_header_checksum());
    }

    #[test]
    fn encapsulation_errors() {
        let mut short = packet(0, 10);
        assert_eq!(encapsulate_in_place(&mut short[..10], &tunnel(), 0), Err(EncapError::NoHeadroom(10)));
        let v4 = ipv4::build_packet(FE1, FE2, 17, 64, 0, false, &[0; 20]);
        assert_eq!(encapsulate(&v4, &tunnel(), 0), Err(EncapError::Inner(Ipv6Error::Version(4))));
        let big = ipv6::build_packet(CLIENT, VM, 17, 64, 0, &vec![0; 65535 - 40 - 19]);
        assert!(matches!(encapsulate(&big, &tunnel(), 0), Err(EncapError::TooBig(_))));
    }

    #[test]
    fn decapsulation_checks_layers() {
        let inner = packet(0, 30);
        let mut outer = encapsulate(&inner, &tunnel(), 0).unwrap();
        let d = decapsulate(&mut outer).unwrap();
        assert_eq!((d.outer_src, d.outer_dst), (FE1, FE2));
        assert_eq!(&outer[d.inner], &inner[..]);

        let mut ipip =
            ipv4::encapsulate(&ipv4::build_packet(FE1, FE2, 17, 64, 0, false, &[0; 8]), &tunnel(), 0).unwrap();
        assert_eq!(decapsulate(&mut ipip), Err(DecapError::NotSixInFour(4)));
        let mut v4_inside = ipv4::build_packet(FE1, FE2, PROTO_IPV6, 64, 0, false, &[0x45; 40]);
        assert_eq!(decapsulate(&mut v4_inside), Err(DecapError::InnerNotIpv6(4)));
        let mut short = ipv4::build_packet(FE1, FE2, PROTO_IPV6, 64, 0, false, &[0x60; 30]);
        assert_eq!(decapsulate(&mut short).unwrap_err().reason(), "inner_malformed");
        let mut empty = ipv4::build_packet(FE1, FE2, PROTO_IPV6, 64, 0, false, &[]);
        assert_eq!(decapsulate(&mut empty).unwrap_err().reason(), "inner_malformed");
        let mut frag = encapsulate(&inner, &tunnel(), 0).unwrap();
        frag[6] |= 0x20;
        ipv4::fix_checksum(&mut frag);
        assert_eq!(decapsulate(&mut frag), Err(DecapError::OuterFragment));
    }

    #[test]
    fn ecn_follows_rfc6040() {
        let ect0 = packet(0b1010_0010, 8);
        let mut outer = encapsulate(&ect0, &tunnel(), 0).unwrap();
        outer[1] |= 0b11;
        ipv4::fix_checksum(&mut outer);
        let d = decapsulate(&mut outer).unwrap();
        assert_eq!(d.inner_header.traffic_class, 0b1010_0011, "CE merged, DSCP kept");
        assert_eq!(ipv6::parse(&outer[d.inner]).unwrap().traffic_class, 0b1010_0011);

        let not_ect = packet(0, 8);
        let mut outer = encapsulate(&not_ect, &tunnel(), 0).unwrap();
        outer[1] |= 0b11;
        ipv4::fix_checksum(&mut outer);
        assert_eq!(decapsulate(&mut outer), Err(DecapError::EcnDrop));
    }

    fn arb_packet() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..1500),
        )
            .prop_map(|(s, d, next, hop, tc, payload)| ipv6::build_packet(s.into(), d.into(), next, hop, tc, &payload))
    }

    proptest! {
        #[test]
        fn encap_decap_roundtrip(inner in arb_packet(), src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), ttl in 1u8..) {
            let t = Tunnel { src: src.into(), dst: dst.into(), ttl };
            let mut outer = encapsulate(&inner, &t, 0).unwrap();
            let oh = ipv4::parse(&outer).unwrap();
            prop_assert_eq!((oh.protocol, oh.ttl, oh.dont_fragment), (PROTO_IPV6, ttl, true));
            prop_assert_eq!(oh.tos, ipv6::parse(&inner).unwrap().traffic_class);
            let d = decapsulate(&mut outer).unwrap();
            prop_assert_eq!((d.outer_src, d.outer_dst), (t.src, t.dst));
            prop_assert_eq!(&outer[d.inner], &inner[..]);
        }

        #[test]
        fn decap_never_panics_on_mangled_tunnels(inner in arb_packet(), flips in proptest::collection::vec((0usize..80, any::<u8>()), 0..4)) {
            let mut outer = encapsulate(&inner, &tunnel(), 0).unwrap();
            for (at, b) in flips {
                if at < outer.len() { outer[at] ^= b; }
            }
            if let Ok(d) = decapsulate(&mut outer) {
                prop_assert!(d.inner.end <= outer.len());
                prop_assert!(ipv6::parse(&outer[d.inner]).is_ok());
            }
        }

        #[test]
        fn never_panics_on_garbage(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decapsulate(&mut bytes);
            let _ = encapsulate_in_place(&mut bytes, &tunnel(), 0);
        }
    }
}
