//! IPv6 headers (RFC 8200): validation, the walk over extension headers to the upper layer,
//! hop-limit decrement, traffic class (ECN) rewriting, and building packets.
//!
//! IPv6 has no header checksum, so rewriting the hop limit or the traffic class is a plain store.

use std::net::Ipv6Addr;

use super::checksum;

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;
/// Next header: hop-by-hop options.
pub const NEXT_HOP_BY_HOP: u8 = 0;
/// Next header: TCP.
pub const NEXT_TCP: u8 = 6;
/// Next header: UDP.
pub const NEXT_UDP: u8 = 17;
/// Next header: routing header.
pub const NEXT_ROUTING: u8 = 43;
/// Next header: fragment header.
pub const NEXT_FRAGMENT: u8 = 44;
/// Next header: encapsulating security payload (opaque: the walk stops there).
pub const NEXT_ESP: u8 = 50;
/// Next header: authentication header.
pub const NEXT_AH: u8 = 51;
/// Next header: ICMPv6.
pub const NEXT_ICMPV6: u8 = 58;
/// Next header: no next header.
pub const NEXT_NONE: u8 = 59;
/// Next header: destination options.
pub const NEXT_DEST_OPTS: u8 = 60;
/// The largest payload without a jumbo option.
pub const MAX_PAYLOAD_LEN: usize = 65535;
/// The minimum link MTU of IPv6 (RFC 8200 §5): ICMPv6 errors never exceed it.
pub const MIN_MTU: usize = 1280;

/// The fields of a validated IPv6 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Header {
    /// Traffic class: DSCP (6 bits) and ECN (2 bits).
    pub traffic_class: u8,
    /// Flow label (20 bits).
    pub flow_label: u32,
    /// Payload length (extension headers included).
    pub payload_len: usize,
    /// The first next header.
    pub next_header: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
}

impl Ipv6Header {
    /// Header + payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }

    /// The ECN codepoint (low two bits of the traffic class).
    pub fn ecn(&self) -> u8 {
        self.traffic_class & 0b11
    }
}

/// Why bytes are not a valid IPv6 packet. [`Ipv6Error::reason`] is a stable counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ipv6Error {
    /// Fewer than 40 bytes.
    #[error("{0} bytes is too short for an IPv6 header (40)")]
    TooShort(usize),
    /// Version field is not 6.
    #[error("IP version {0} is not 6")]
    Version(u8),
    /// The payload length runs beyond the data.
    #[error("IPv6 payload length {payload_len} runs beyond the {available} bytes after the header")]
    PayloadLength {
        /// Payload length field.
        payload_len: usize,
        /// Bytes available after the fixed header.
        available: usize,
    },
    /// An extension header is truncated.
    #[error("IPv6 extension header {next_header} at offset {at} is truncated")]
    ExtensionHeader {
        /// Its type.
        next_header: u8,
        /// Where it starts.
        at: usize,
    },
}

impl Ipv6Error {
    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Ipv6Error::TooShort(_) => "too_short",
            Ipv6Error::Version(_) => "version",
            Ipv6Error::PayloadLength { .. } => "payload_length",
            Ipv6Error::ExtensionHeader { .. } => "extension_header",
        }
    }
}

fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    let octets: [u8; 16] = b[at..at + 16].try_into().expect("16 bytes");
    Ipv6Addr::from(octets)
}

/// Parses the fixed header without checking the payload length against the data (for headers
/// quoted in ICMPv6 errors, which may be truncated).
pub fn parse_header(packet: &[u8]) -> Result<Ipv6Header, Ipv6Error> {
    if packet.len() < HEADER_LEN {
        return Err(Ipv6Error::TooShort(packet.len()));
    }
    let version = packet[0] >> 4;
    if version != 6 {
        return Err(Ipv6Error::Version(version));
    }
    Ok(Ipv6Header {
        traffic_class: (packet[0] << 4) | (packet[1] >> 4),
        flow_label: u32::from_be_bytes([0, packet[1] & 0x0f, packet[2], packet[3]]),
        payload_len: usize::from(u16::from_be_bytes([packet[4], packet[5]])),
        next_header: packet[6],
        hop_limit: packet[7],
        src: addr_at(packet, 8),
        dst: addr_at(packet, 24),
    })
}

/// Parses and validates an IPv6 header: version and payload length (bytes after the packet, e.g.
/// Ethernet padding, are allowed and ignored).
pub fn parse(packet: &[u8]) -> Result<Ipv6Header, Ipv6Error> {
    let header = parse_header(packet)?;
    if header.total_len() > packet.len() {
        return Err(Ipv6Error::PayloadLength { payload_len: header.payload_len, available: packet.len() - HEADER_LEN });
    }
    Ok(header)
}

/// Where the upper-layer header of a packet is, after its extension headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperLayer {
    /// Upper-layer protocol (or [`NEXT_ESP`] / [`NEXT_NONE`] / an unknown header, where the walk
    /// stops).
    pub protocol: u8,
    /// Offset of the upper-layer header from the start of the packet.
    pub offset: usize,
    /// The packet is a fragment (it had a fragment header).
    pub fragment: bool,
    /// The packet is a fragment other than the first (no upper-layer header in it).
    pub non_first_fragment: bool,
}

/// Walks the extension headers (hop-by-hop, routing, fragment, destination options,
/// authentication) of the validated packet `packet` to its upper-layer header.
pub fn upper_layer(packet: &[u8], header: &Ipv6Header) -> Result<UpperLayer, Ipv6Error> {
    let end = header.total_len().min(packet.len());
    let mut next = header.next_header;
    let mut at = HEADER_LEN;
    let mut fragment = false;
    loop {
        let truncated = Ipv6Error::ExtensionHeader { next_header: next, at };
        let len = match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS => {
                (usize::from(*packet.get(at + 1).filter(|_| at + 2 <= end).ok_or(truncated)?) + 1) * 8
            }
            NEXT_AH => (usize::from(*packet.get(at + 1).filter(|_| at + 2 <= end).ok_or(truncated)?) + 2) * 4,
            NEXT_FRAGMENT => {
                if at + 8 > end {
                    return Err(truncated);
                }
                fragment = true;
                let offset = u16::from_be_bytes([packet[at + 2], packet[at + 3]]) >> 3;
                if offset != 0 {
                    return Ok(UpperLayer { protocol: packet[at], offset: at + 8, fragment, non_first_fragment: true });
                }
                8
            }
            protocol => return Ok(UpperLayer { protocol, offset: at, fragment, non_first_fragment: false }),
        };
        if at + len > end {
            return Err(truncated);
        }
        next = packet[at];
        at += len;
    }
}

/// Decrements the hop limit of a validated packet. Returns the new hop limit, or `None` (packet
/// unchanged) when it is ≤ 1: the packet must be dropped with an ICMPv6 time exceeded.
pub fn decrement_hop_limit(packet: &mut [u8]) -> Option<u8> {
    let hop = packet.get_mut(7)?;
    if *hop <= 1 {
        return None;
    }
    *hop -= 1;
    Some(*hop)
}

/// Rewrites the traffic class of a packet (no checksum covers it).
pub fn set_traffic_class(packet: &mut [u8], traffic_class: u8) {
    packet[0] = 0x60 | (traffic_class >> 4);
    packet[1] = (traffic_class << 4) | (packet[1] & 0x0f);
}

/// Writes a fixed header into `out`.
pub fn write_header(
    out: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    traffic_class: u8,
    payload_len: u16,
) {
    out[0] = 0x60 | (traffic_class >> 4);
    out[1] = traffic_class << 4;
    out[2..4].fill(0);
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
    out[6] = next_header;
    out[7] = hop_limit;
    out[8..24].copy_from_slice(&src.octets());
    out[24..40].copy_from_slice(&dst.octets());
}

/// Builds an IPv6 packet (flow label 0) around `payload`.
pub fn build_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    traffic_class: u8,
    payload: &[u8],
) -> Vec<u8> {
    assert!(payload.len() <= MAX_PAYLOAD_LEN, "IPv6 payload of {} bytes", payload.len());
    let mut p = vec![0u8; HEADER_LEN + payload.len()];
    write_header(&mut p, src, dst, next_header, hop_limit, traffic_class, payload.len() as u16);
    p[HEADER_LEN..].copy_from_slice(payload);
    p
}

/// The one's-complement sum of the upper-layer checksum's pseudo-header plus `upper` (an
/// upper-layer message of `header`'s packet): 0xffff (or 0) when a stored checksum verifies.
pub fn upper_layer_sum(header: &Ipv6Header, protocol: u8, upper: &[u8]) -> u16 {
    let pseudo = checksum::pseudo_header_v6(&header.src.octets(), &header.dst.octets(), protocol, upper.len() as u32);
    checksum::add(pseudo, checksum::sum(upper))
}

/// True for a unicast address a host can own off-link: not unspecified, loopback, multicast,
/// link-local or IPv4-mapped.
pub fn is_routable_unicast(addr: &Ipv6Addr) -> bool {
    !(addr.is_unspecified()
        || addr.is_loopback()
        || addr.is_multicast()
        || addr.is_unicast_link_local()
        || addr.to_ipv4_mapped().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
    const B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);

    #[test]
    fn parse_accepts_valid_and_padding() {
        let mut p = build_packet(A, B, NEXT_UDP, 64, 0xb8, &[1; 12]);
        let h = parse(&p).unwrap();
        assert_eq!((h.src, h.dst, h.hop_limit, h.next_header, h.traffic_class), (A, B, 64, NEXT_UDP, 0xb8));
        assert_eq!((h.payload_len, h.total_len(), h.ecn()), (12, 52, 0));
        p.extend_from_slice(&[0; 8]);
        assert_eq!(parse(&p).unwrap().total_len(), 52);
    }

    #[test]
    fn parse_rejects_each_defect() {
        let good = build_packet(A, B, NEXT_UDP, 64, 0, &[1; 12]);
        assert_eq!(parse(&good[..39]), Err(Ipv6Error::TooShort(39)));
        let mut v4 = good.clone();
        v4[0] = 0x45;
        assert_eq!(parse(&v4), Err(Ipv6Error::Version(4)));
        assert_eq!(parse(&good[..50]).unwrap_err().reason(), "payload_length");
        assert_eq!(parse_header(&good[..40]).unwrap().payload_len, 12, "truncated quote");
    }

    #[test]
    fn etherparse_agrees() {
        let p = build_packet(A, B, NEXT_TCP, 17, 0x2e, &[0; 20]);
        let (h, _) = etherparse::Ipv6Header::from_slice(&p).unwrap();
        assert_eq!((h.hop_limit, h.payload_length, h.traffic_class), (17, 20, 0x2e));
        assert_eq!(h.source, A.octets());
        assert_eq!(h.next_header, etherparse::IpNumber::TCP);
    }

    fn ext(next: u8, len_units: u8) -> Vec<u8> {
        let mut e = vec![0u8; (usize::from(len_units) + 1) * 8];
        e[0] = next;
        e[1] = len_units;
        e
    }

    #[test]
    fn extension_headers_are_skipped_to_the_upper_layer() {
        let mut payload = ext(NEXT_DEST_OPTS, 0);
        payload.extend(ext(NEXT_ICMPV6, 1));
        payload.extend_from_slice(&[135, 0, 0, 0]);
        let p = build_packet(A, B, NEXT_HOP_BY_HOP, 255, 0, &payload);
        let h = parse(&p).unwrap();
        let u = upper_layer(&p, &h).unwrap();
        assert_eq!(
            u,
            UpperLayer { protocol: NEXT_ICMPV6, offset: 40 + 8 + 16, fragment: false, non_first_fragment: false }
        );
        assert_eq!(p[u.offset], 135);

        // First fragment: the upper layer follows; a later fragment has none.
        let mut frag = vec![NEXT_TCP, 0, 0, 1, 0, 0, 0, 9];
        frag.extend_from_slice(&[0; 20]);
        let p = build_packet(A, B, NEXT_FRAGMENT, 64, 0, &frag);
        let u = upper_layer(&p, &parse(&p).unwrap()).unwrap();
        assert!(u.fragment && !u.non_first_fragment && u.protocol == NEXT_TCP && u.offset == 48);
        let mut later = frag.clone();
        later[2..4].copy_from_slice(&(100u16 << 3).to_be_bytes());
        let p = build_packet(A, B, NEXT_FRAGMENT, 64, 0, &later);
        assert!(upper_layer(&p, &parse(&p).unwrap()).unwrap().non_first_fragment);

        // Truncated chains.
        let p = build_packet(A, B, NEXT_ROUTING, 64, 0, &ext(NEXT_TCP, 4)[..16]);
        assert_eq!(
            upper_layer(&p, &parse(&p).unwrap()),
            Err(Ipv6Error::ExtensionHeader { next_header: NEXT_ROUTING, at: 40 })
        );
        let p = build_packet(A, B, NEXT_HOP_BY_HOP, 64, 0, &[]);
        assert!(upper_layer(&p, &parse(&p).unwrap()).is_err());
    }

    #[test]
    fn hop_limit_and_traffic_class() {
        let mut p = build_packet(A, B, NEXT_UDP, 2, 0, &[]);
        assert_eq!(decrement_hop_limit(&mut p), Some(1));
        assert_eq!(decrement_hop_limit(&mut p), None);
        assert_eq!(parse(&p).unwrap().hop_limit, 1);
        p[1] |= 0x0a; // flow label bits survive a traffic class rewrite
        set_traffic_class(&mut p, 0xff);
        let h = parse(&p).unwrap();
        assert_eq!((h.traffic_class, h.flow_label >> 16), (0xff, 0x0a));
    }

    #[test]
    fn routable_unicast() {
        assert!(is_routable_unicast(&B));
        for a in ["::", "::1", "ff02::1", "fe80::1", "::ffff:10.0.0.1"] {
            assert!(!is_routable_unicast(&a.parse().unwrap()), "{a}");
        }
    }

    proptest! {
        #[test]
        fn build_parse_roundtrip(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), next in any::<u8>(), hop in any::<u8>(),
            tc in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let p = build_packet(src.into(), dst.into(), next, hop, tc, &payload);
            let h = parse(&p).unwrap();
            prop_assert_eq!((h.src, h.dst, h.next_header, h.hop_limit, h.traffic_class), (src.into(), dst.into(), next, hop, tc));
            prop_assert_eq!(&p[HEADER_LEN..h.total_len()], &payload[..]);
        }

        #[test]
        fn parsers_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(h) = parse(&bytes)
                && let Ok(u) = upper_layer(&bytes, &h)
            {
                prop_assert!(u.offset <= h.total_len());
            }
            let _ = decrement_hop_limit(&mut bytes);
        }
    }
}
