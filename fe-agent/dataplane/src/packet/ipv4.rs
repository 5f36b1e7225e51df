//! IPv4 headers: validation, TTL decrement with an incremental checksum (RFC 1624), and IP-in-IP
//! encapsulation / decapsulation (RFC 2003) with ECN handled per RFC 6040 (normal mode).
//!
//! Everything works on byte slices in place: the forwarder reads a packet into a buffer with
//! [`HEADER_LEN`] bytes of headroom and [`encapsulate_in_place`] writes the outer header in front
//! of it, so no packet byte is copied.

use std::net::Ipv4Addr;
use std::ops::Range;

use super::checksum;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of IP-in-IP (RFC 2003).
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 in IPv4 (6in4, RFC 4213).
pub const PROTO_IPV6: u8 = 41;
/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;
/// TTL of outer headers unless configured otherwise.
pub const DEFAULT_OUTER_TTL: u8 = 64;
/// The largest IPv4 packet.
pub const MAX_PACKET_LEN: usize = 65535;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// The fields of a validated IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Header length in bytes (20..=60).
    pub header_len: usize,
    /// Type of service byte: DSCP (6 bits) and ECN (2 bits).
    pub tos: u8,
    /// Total length of the packet (header + payload) in bytes.
    pub total_len: usize,
    /// Identification.
    pub ident: u16,
    /// Don't Fragment flag.
    pub dont_fragment: bool,
    /// More Fragments flag.
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// Time to live.
    pub ttl: u8,
    /// Payload protocol.
    pub protocol: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
}

impl Ipv4Header {
    /// True for any fragment (first or not).
    pub fn is_fragment(&self) -> bool {
        self.more_fragments || self.fragment_offset != 0
    }

    /// The ECN codepoint (low two bits of TOS).
    pub fn ecn(&self) -> u8 {
        self.tos & 0b11
    }

    /// Bytes of payload after the header.
    pub fn payload_len(&self) -> usize {
        self.total_len - self.header_len
    }
}

/// Why bytes are not a valid IPv4 packet. [`Ipv4Error::reason`] is a stable counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ipv4Error {
    /// Fewer than 20 bytes.
    #[error("{0} bytes is too short for an IPv4 header (20)")]
    TooShort(usize),
    /// Version field is not 4.
    #[error("IP version {0} is not 4")]
    Version(u8),
    /// IHL below 5, or beyond the data.
    #[error("IPv4 header length {header_len} is invalid for {available} bytes")]
    HeaderLength {
        /// IHL × 4.
        header_len: usize,
        /// Bytes available.
        available: usize,
    },
    /// Total length below the header length or beyond the data.
    #[error("IPv4 total length {total_len} is invalid (header {header_len}, {available} bytes)")]
    TotalLength {
        /// Total length field.
        total_len: usize,
        /// Header length.
        header_len: usize,
        /// Bytes available.
        available: usize,
    },
    /// Header checksum does not verify.
    #[error("IPv4 header checksum is wrong")]
    Checksum,
}

impl Ipv4Error {
    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Ipv4Error::TooShort(_) => "too_short",
            Ipv4Error::Version(_) => "version",
            Ipv4Error::HeaderLength { .. } => "header_length",
            Ipv4Error::TotalLength { .. } => "total_length",
            Ipv4Error::Checksum => "checksum",
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The IP version nibble of the first byte, if any.
pub fn version(packet: &[u8]) -> Option<u8> {
    packet.first().map(|b| b >> 4)
}

/// Parses and validates an IPv4 header: version, IHL, total length (bytes after it, e.g. Ethernet
/// padding, are allowed and ignored) and header checksum.
pub fn parse(packet: &[u8]) -> Result<Ipv4Header, Ipv4Error> {
    let header = parse_header(packet)?;
    if header.total_len > packet.len() {
        return Err(Ipv4Error::TotalLength {
            total_len: header.total_len,
            header_len: header.header_len,
            available: packet.len(),
        });
    }
    Ok(header)
}

/// Like [`parse`], but the packet may be truncated after its header (as in the quote of an ICMP
/// error): the total length is only checked to cover the header.
pub fn parse_header(packet: &[u8]) -> Result<Ipv4Header, Ipv4Error> {
    if packet.len() < HEADER_LEN {
        return Err(Ipv4Error::TooShort(packet.len()));
    }
    let version = packet[0] >> 4;
    if version != 4 {
        return Err(Ipv4Error::Version(version));
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < HEADER_LEN || header_len > packet.len() {
        return Err(Ipv4Error::HeaderLength { header_len, available: packet.len() });
    }
    let total_len = usize::from(be16(packet, 2));
    if total_len < header_len {
        return Err(Ipv4Error::TotalLength { total_len, header_len, available: packet.len() });
    }
    if checksum::checksum(&packet[..header_len]) != 0 {
        return Err(Ipv4Error::Checksum);
    }
    let flags = be16(packet, 6);
    Ok(Ipv4Header {
        header_len,
        tos: packet[1],
        total_len,
        ident: be16(packet, 4),
        dont_fragment: flags & FLAG_DF != 0,
        more_fragments: flags & FLAG_MF != 0,
        fragment_offset: flags & OFFSET_MASK,
        ttl: packet[8],
        protocol: packet[9],
        src: addr_at(packet, 12),
        dst: addr_at(packet, 16),
    })
}

/// Decrements the TTL of a validated packet and patches the header checksum incrementally
/// (RFC 1624). Returns the new TTL, or `None` (packet unchanged) when the TTL is ≤ 1: the packet
/// must be dropped with an ICMP time exceeded.
pub fn decrement_ttl(packet: &mut [u8]) -> Option<u8> {
    let header = packet.get_mut(..HEADER_LEN)?;
    let ttl = header[8];
    if ttl <= 1 {
        return None;
    }
    let old_word = be16(header, 8);
    header[8] = ttl - 1;
    let new_word = be16(header, 8);
    let sum = checksum::update_word(be16(header, 10), old_word, new_word);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    Some(ttl - 1)
}

/// Recomputes the header checksum of a packet whose header fields were edited by hand.
pub fn fix_checksum(packet: &mut [u8]) {
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    packet[10..12].fill(0);
    let sum = checksum::checksum(&packet[..header_len]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Rewrites the TOS byte of a validated packet, patching the checksum incrementally.
pub fn set_tos(packet: &mut [u8], tos: u8) {
    let old_word = be16(packet, 0);
    packet[1] = tos;
    let new_word = be16(packet, 0);
    let sum = checksum::update_word(be16(packet, 10), old_word, new_word);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Outer addresses and TTL of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    /// This FE's underlay address.
    pub src: Ipv4Addr,
    /// The peer FE's underlay address.
    pub dst: Ipv4Addr,
    /// Outer TTL ([`DEFAULT_OUTER_TTL`] unless configured).
    pub ttl: u8,
}

/// Why a packet cannot be encapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncapError {
    /// The inner packet is not valid IPv4.
    #[error("inner packet: {0}")]
    Inner(#[from] Ipv4Error),
    /// Inner packet + outer header would exceed 65535 bytes.
    #[error("inner packet of {0} bytes does not fit an outer IPv4 header")]
    TooBig(usize),
    /// The buffer has less than 20 bytes of headroom before the inner packet.
    #[error("no room for the outer header: {0} bytes of headroom, 20 needed")]
    NoHeadroom(usize),
}

/// Writes the outer header for `inner` into `out`: protocol 4, TTL from `tunnel`, TOS (DSCP and
/// ECN) copied from the inner header (RFC 6040 normal mode), DF copied from the inner header.
/// `ident` fills the identification field (0 lets the kernel choose with `IP_HDRINCL`).
pub fn write_outer_header(
    out: &mut [u8; HEADER_LEN],
    inner: &Ipv4Header,
    tunnel: &Tunnel,
    ident: u16,
) -> Result<(), EncapError> {
    if write_tunnel_header(out, PROTO_IPIP, inner.tos, inner.dont_fragment, inner.total_len, tunnel, ident) {
        Ok(())
    } else {
        Err(EncapError::TooBig(inner.total_len))
    }
}

/// Writes an outer header from `tunnel` carrying `inner_len` bytes of `protocol` (IP-in-IP, or
/// 6in4) with the given TOS and DF. Returns false (nothing written) when the outer packet would
/// exceed 65535 bytes.
pub fn write_tunnel_header(
    out: &mut [u8; HEADER_LEN],
    protocol: u8,
    tos: u8,
    dont_fragment: bool,
    inner_len: usize,
    tunnel: &Tunnel,
    ident: u16,
) -> bool {
    let total = inner_len + HEADER_LEN;
    if total > MAX_PACKET_LEN {
        return false;
    }
    out[0] = 0x45;
    out[1] = tos;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[4..6].copy_from_slice(&ident.to_be_bytes());
    let flags = if dont_fragment { FLAG_DF } else { 0 };
    out[6..8].copy_from_slice(&flags.to_be_bytes());
    out[8] = tunnel.ttl;
    out[9] = protocol;
    out[10..12].fill(0);
    out[12..16].copy_from_slice(&tunnel.src.octets());
    out[16..20].copy_from_slice(&tunnel.dst.octets());
    let sum = checksum::checksum(&out[..]);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    true
}

/// Encapsulates in place: `buf` is 20 bytes of headroom followed by exactly one inner packet
/// (extra bytes after its total length are ignored). Returns the length of the outer packet at
/// the start of `buf`.
pub fn encapsulate_in_place(buf: &mut [u8], tunnel: &Tunnel, ident: u16) -> Result<usize, EncapError> {
    if buf.len() < HEADER_LEN {
        return Err(EncapError::NoHeadroom(buf.len()));
    }
    let (head, inner) = buf.split_at_mut(HEADER_LEN);
    let head: &mut [u8; HEADER_LEN] = head.try_into().expect("split at HEADER_LEN");
    let inner_header = parse(inner)?;
    write_outer_header(head, &inner_header, tunnel, ident)?;
    Ok(HEADER_LEN + inner_header.total_len)
}

/// Encapsulates `inner` into a new buffer (convenience for the slow path and tests).
pub fn encapsulate(inner: &[u8], tunnel: &Tunnel, ident: u16) -> Result<Vec<u8>, EncapError> {
    let mut buf = vec![0u8; HEADER_LEN + inner.len()];
    buf[HEADER_LEN..].copy_from_slice(inner);
    let len = encapsulate_in_place(&mut buf, tunnel, ident)?;
    buf.truncate(len);
    Ok(buf)
}

/// A decapsulated IP-in-IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decapsulated {
    /// Outer source: the sending FE, to check against the registered peers.
    pub outer_src: Ipv4Addr,
    /// Outer destination.
    pub outer_dst: Ipv4Addr,
    /// Where the inner packet lies in the buffer.
    pub inner: Range<usize>,
    /// The inner header (after ECN propagation).
    pub inner_header: Ipv4Header,
}

/// Why a received packet is not a usable IP-in-IP packet. [`DecapError::reason`] is a stable
/// counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// Outer header invalid.
    #[error("outer header: {0}")]
    Outer(Ipv4Error),
    /// Outer protocol is not 4.
    #[error("outer protocol {0} is not IP-in-IP (4)")]
    NotIpInIp(u8),
    /// Outer header is a fragment (the kernel reassembles before raw sockets, so this is bogus).
    #[error("outer packet is a fragment")]
    OuterFragment,
    /// The inner packet is not IPv4 (e.g. IPv6 or garbage).
    #[error("inner packet is IP version {0}, not 4")]
    InnerNotIpv4(u8),
    /// Inner header invalid.
    #[error("inner header: {0}")]
    Inner(Ipv4Error),
    /// Outer CE over a not-ECN-capable inner packet: RFC 6040 says drop.
    #[error("outer ECN CE on a not-ECT inner packet")]
    EcnDrop,
}

impl DecapError {
    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            DecapError::Outer(_) => "outer_malformed",
            DecapError::NotIpInIp(_) => "not_ipip",
            DecapError::OuterFragment => "outer_fragment",
            DecapError::InnerNotIpv4(_) => "inner_not_ipv4",
            DecapError::Inner(_) => "inner_malformed",
            DecapError::EcnDrop => "ecn_drop",
        }
    }
}

/// RFC 6040 §4.2 (normal mode): the inner ECN codepoint after decapsulation, or `None` to drop.
pub fn ecn_decapsulate(inner: u8, outer: u8) -> Option<u8> {
    const NOT_ECT: u8 = 0b00;
    const ECT1: u8 = 0b01;
    const CE: u8 = 0b11;
    match (inner & 0b11, outer & 0b11) {
        (NOT_ECT, CE) => None,
        (NOT_ECT, _) => Some(NOT_ECT),
        (CE, _) => Some(CE),
        (_, CE) => Some(CE),
        (_, ECT1) => Some(ECT1),
        (inner, _) => Some(inner),
    }
}

/// Validates an IP-in-IP packet and locates its inner packet. Mutable only to propagate an outer
/// ECN mark into the inner header (RFC 6040); the outer source is returned for the peer check.
pub fn decapsulate(packet: &mut [u8]) -> Result<Decapsulated, DecapError> {
    let outer = parse(packet).map_err(DecapError::Outer)?;
    if outer.protocol != PROTO_IPIP {
        return Err(DecapError::NotIpInIp(outer.protocol));
    }
    if outer.is_fragment() {
        return Err(DecapError::OuterFragment);
    }
    let payload = &mut packet[outer.header_len..outer.total_len];
    match version(payload) {
        Some(4) => {}
        Some(v) => return Err(DecapError::InnerNotIpv4(v)),
        None => return Err(DecapError::Inner(Ipv4Error::TooShort(0))),
    }
    let mut inner = parse(payload).map_err(DecapError::Inner)?;
    let ecn = ecn_decapsulate(inner.ecn(), outer.ecn()).ok_or(DecapError::EcnDrop)?;
    if ecn != inner.ecn() {
        inner.tos = (inner.tos & !0b11) | ecn;
        set_tos(payload, inner.tos);
    }
    let start = outer.header_len;
    Ok(Decapsulated {
        outer_src: outer.src,
        outer_dst: outer.dst,
        inner: start..start + inner.total_len,
        inner_header: inner,
    })
}

/// Builds a minimal valid IPv4 header + payload (tests, probes and the ICMP builders use it).
pub fn build_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ttl: u8,
    tos: u8,
    dont_fragment: bool,
    payload: &[u8],
) -> Vec<u8> {
    let total = HEADER_LEN + payload.len();
    assert!(total <= MAX_PACKET_LEN, "IPv4 packet of {total} bytes");
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[1] = tos;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    let flags = if dont_fragment { FLAG_DF } else { 0 };
    p[6..8].copy_from_slice(&flags.to_be_bytes());
    p[8] = ttl;
    p[9] = protocol;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum::checksum(&p[..HEADER_LEN]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[HEADER_LEN..].copy_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
    const FE1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const FE2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    fn tunnel() -> Tunnel {
        Tunnel { src: FE1, dst: FE2, ttl: DEFAULT_OUTER_TTL }
    }

    fn packet(tos: u8, df: bool, payload_len: usize) -> Vec<u8> {
        build_packet(CLIENT, VM, 17, 63, tos, df, &vec![0xab; payload_len])
    }

    #[test]
    fn parse_accepts_valid_and_padding() {
        let mut p = packet(0, true, 8);
        let h = parse(&p).unwrap();
        assert_eq!((h.src, h.dst, h.ttl, h.protocol), (CLIENT, VM, 63, 17));
        assert!(h.dont_fragment && !h.is_fragment());
        p.extend_from_slice(&[0; 10]);
        assert_eq!(parse(&p).unwrap().total_len, 28);
    }

    #[test]
    fn parse_rejects_each_defect() {
        let good = packet(0, false, 8);
        assert_eq!(parse(&good[..19]), Err(Ipv4Error::TooShort(19)));
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(parse(&v6), Err(Ipv4Error::Version(6)));
        let mut ihl = good.clone();
        ihl[0] = 0x44;
        assert_eq!(parse(&ihl).unwrap_err().reason(), "header_length");
        let mut total = good.clone();
        total[3] = 200;
        fix_checksum(&mut total);
        assert_eq!(parse(&total).unwrap_err().reason(), "total_length");
        total[2..4].copy_from_slice(&10u16.to_be_bytes());
        fix_checksum(&mut total);
        assert_eq!(parse(&total).unwrap_err().reason(), "total_length");
        let mut sum = good.clone();
        sum[8] ^= 1;
        assert_eq!(parse(&sum), Err(Ipv4Error::Checksum));
        assert_eq!(parse_header(&good[..24]).unwrap().total_len, 28, "truncated quote");
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid_and_stops_at_one() {
        let mut p = packet(0, false, 4);
        assert_eq!(decrement_ttl(&mut p), Some(62));
        assert_eq!(parse(&p).unwrap().ttl, 62);
        p[8] = 1;
        fix_checksum(&mut p);
        let before = p.clone();
        assert_eq!(decrement_ttl(&mut p), None);
        assert_eq!(p, before);
    }

    #[test]
    fn encapsulation_copies_df_and_tos() {
        let inner = packet(0b1011_1001, true, 100);
        let outer = encapsulate(&inner, &tunnel(), 0).unwrap();
        let h = parse(&outer).unwrap();
        assert_eq!(h.protocol, PROTO_IPIP);
        assert_eq!((h.src, h.dst, h.ttl), (FE1, FE2, 64));
        assert_eq!(h.tos, 0b1011_1001);
        assert!(h.dont_fragment);
        assert_eq!(h.total_len, inner.len() + 20);
        assert_eq!(&outer[20..], &inner[..]);
        let no_df = encapsulate(&packet(0, false, 10), &tunnel(), 7).unwrap();
        let h = parse(&no_df).unwrap();
        assert!(!h.dont_fragment);
        assert_eq!(h.ident, 7);
    }

    #[test]
    fn encapsulation_errors() {
        let inner = packet(0, false, 10);
        let mut short = inner.clone();
        assert_eq!(encapsulate_in_place(&mut short[..10], &tunnel(), 0), Err(EncapError::NoHeadroom(10)));
        let mut bad = vec![0u8; 20];
        bad.extend_from_slice(&[0x60; 40]);
        assert_eq!(encapsulate_in_place(&mut bad, &tunnel(), 0), Err(EncapError::Inner(Ipv4Error::Version(6))));
        let big = build_packet(CLIENT, VM, 17, 64, 0, false, &vec![0; MAX_PACKET_LEN - 20]);
        assert_eq!(encapsulate(&big, &tunnel(), 0), Err(EncapError::TooBig(MAX_PACKET_LEN)));
    }

    #[test]
    fn decapsulation_checks_layers() {
        let inner = packet(0, false, 30);
        let mut outer = encapsulate(&inner, &tunnel(), 0).unwrap();
        let d = decapsulate(&mut outer).unwrap();
        assert_eq!(d.outer_src, FE1);
        assert_eq!(&outer[d.inner], &inner[..]);

        let mut udp = packet(0, false, 30);
        assert_eq!(decapsulate(&mut udp), Err(DecapError::NotIpInIp(17)));

        let mut v6 = build_packet(FE1, FE2, PROTO_IPIP, 64, 0, false, &[0x60; 40]);
        assert_eq!(decapsulate(&mut v6), Err(DecapError::InnerNotIpv4(6)));

        let mut garbage = build_packet(FE1, FE2, PROTO_IPIP, 64, 0, false, &[0x45; 10]);
        assert_eq!(decapsulate(&mut garbage).unwrap_err().reason(), "inner_malformed");

        let mut empty = build_packet(FE1, FE2, PROTO_IPIP, 64, 0, false, &[]);
        assert_eq!(decapsulate(&mut empty).unwrap_err().reason(), "inner_malformed");
    }

    #[test]
    fn ecn_follows_rfc6040() {
        // Outer CE marks an ECT inner packet CE; on a not-ECT inner packet it means drop.
        let ect0 = packet(0b10, false, 8);
        let mut outer = encapsulate(&ect0, &tunnel(), 0).unwrap();
        outer[1] |= 0b11;
        fix_checksum(&mut outer);
        let d = decapsulate(&mut outer).unwrap();
        assert_eq!(d.inner_header.ecn(), 0b11);
        assert_eq!(parse(&outer[d.inner]).unwrap().ecn(), 0b11, "inner checksum stays valid");

        assert_eq!(ecn_decapsulate(0b00, 0b11), None);
        assert_eq!(ecn_decapsulate(0b00, 0b10), Some(0b00));
        assert_eq!(ecn_decapsulate(0b10, 0b01), Some(0b01));
        assert_eq!(ecn_decapsulate(0b01, 0b10), Some(0b01));
        assert_eq!(ecn_decapsulate(0b11, 0b00), Some(0b11));
    }

    #[test]
    fn etherparse_reads_our_outer_header() {
        let outer = encapsulate(&packet(0x28, true, 16), &tunnel(), 0).unwrap();
        let (h, rest) = etherparse::Ipv4Header::from_slice(&outer).unwrap();
        assert_eq!(h.protocol, etherparse::IpNumber::IPV4);
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert!(h.dont_fragment);
        assert_eq!(rest.len(), 36);
    }

    fn arb_packet() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u8>(),
            1u8..=255,
            any::<u8>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..1500),
        )
            .prop_map(|(s, d, proto, ttl, tos, df, payload)| {
                build_packet(s.into(), d.into(), proto, ttl, tos, df, &payload)
            })
    }

    proptest! {
        #[test]
        fn encap_decap_roundtrip(inner in arb_packet(), src in any::<[u8; 4]>(), dst in any::<[u8; 4]>()) {
            let t = Tunnel { src: src.into(), dst: dst.into(), ttl: 64 };
            let mut outer = encapsulate(&inner, &t, 0).unwrap();
            prop_assert_eq!(parse(&outer).unwrap().protocol, PROTO_IPIP);
            let d = decapsulate(&mut outer).unwrap();
            prop_assert_eq!(d.outer_src, t.src);
            prop_assert_eq!(d.outer_dst, t.dst);
            prop_assert_eq!(&outer[d.inner], &inner[..]);
        }

        #[test]
        fn ttl_decrement_checksum_always_valid(mut p in arb_packet()) {
            let ttl = p[8];
            match decrement_ttl(&mut p) {
                Some(new) => {
                    prop_assert_eq!(new, ttl - 1);
                    prop_assert_eq!(parse(&p).unwrap().ttl, ttl - 1);
                }
                None => prop_assert!(ttl <= 1),
            }
        }

        #[test]
        fn parsers_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            let _ = decrement_ttl(&mut bytes);
            let _ = decapsulate(&mut bytes);
            let _ = encapsulate_in_place(&mut bytes, &tunnel(), 0);
        }

        #[test]
        fn decap_never_panics_on_mangled_tunnels(inner in arb_packet(), flips in proptest::collection::vec((0usize..60, any::<u8>()), 0..4)) {
            let mut outer = encapsulate(&inner, &tunnel(), 0).unwrap();
            for (at, b) in flips {
                if at < outer.len() { outer[at] ^= b; }
            }
            if let Ok(d) = decapsulate(&mut outer) {
                prop_assert!(d.inner.end <= outer.len());
                prop_assert!(parse(&outer[d.inner]).is_ok());
            }
        }
    }
}
