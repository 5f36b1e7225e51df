//! Super-packets: the virtio-net header a TUN device with offloads exchanges with userspace,
//! completing a partial checksum, and splitting a TCP/UDP super-packet over IPv4 or IPv6 into
//! MTU-sized segments (optionally each with an outer header: IP-in-IP for IPv4, 6in4 for IPv6)
//! in one pass.
//!
//! [`segment`] writes only headers (into a caller-owned arena, `outer + IP + TCP/UDP` bytes per
//! segment); each segment's payload stays where it is in the super-packet, so the caller sends
//! `[header, payload slice]` with a gather write and no payload byte is copied in userspace. The
//! one pass over the payload is the checksum of each segment. Segment headers follow what the
//! kernel's own GSO produces: IPv4 identification + 1 per segment (IPv6 has none), TCP sequence
//! advanced by the segment size, CWR on the first segment only, FIN/PSH on the last only, UDP
//! length per segment. An IPv6 super-packet carries no extension headers (the kernel's TCP and
//! UDP segmentation never adds any); one that does is refused.

use std::ops::Range;

use super::checksum;
use super::ipv4::{self, HEADER_LEN, Ipv4Error, Tunnel};
use super::ipv6::{self, Ipv6Error};
use super::sixin4;

/// Length of the virtio-net header in front of every packet on a TUN device with offloads.
pub const VNET_HDR_LEN: usize = 10;
/// `flags`: the transport checksum is partial (pseudo-header sum at `csum_start + csum_offset`).
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a super-packet.
pub const VNET_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const VNET_GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP over IPv6.
pub const VNET_GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO), either IP version.
pub const VNET_GSO_UDP_L4: u8 = 5;
/// `gso_type` flag: the first segment carries TCP CWR.
pub const VNET_GSO_ECN: u8 = 0x80;

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;
const UDP_HEADER_LEN: usize = 8;

/// The virtio-net header (legacy layout, host byte order as TUN uses by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// [`VNET_F_NEEDS_CSUM`] or 0.
    pub flags: u8,
    /// `VNET_GSO_*`, possibly with [`VNET_GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers (IP + transport).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the first [`VNET_HDR_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// The segmentation this header asks for (`None` for a single packet), or the raw
    /// `gso_type` when it is one we do not split (legacy UFO, unknown). TCP over IPv4 and over
    /// IPv6 are both [`GsoKind::Tcp`]: the packet's own version tells them apart.
    pub fn gso(&self) -> Result<Option<GsoKind>, u8> {
        match self.gso_type & !VNET_GSO_ECN {
            VNET_GSO_NONE => Ok(None),
            VNET_GSO_TCPV4 | VNET_GSO_TCPV6 => Ok(Some(GsoKind::Tcp)),
            VNET_GSO_UDP_L4 => Ok(Some(GsoKind::Udp)),
            other => Err(other),
        }
    }
}

/// The transport protocol of a super-packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    /// TCP segmentation.
    Tcp,
    /// UDP segmentation (each segment a datagram).
    Udp,
}

/// Why a super-packet cannot be split (or a partial checksum completed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// The IPv4 header is invalid.
    #[error("super-packet: {0}")]
    Ip(#[from] Ipv4Error),
    /// The IPv6 header is invalid.
    #[error("super-packet: {0}")]
    Ipv6(#[from] Ipv6Error),
    /// Neither IPv4 nor IPv6.
    #[error("super-packet of IP version {0}")]
    Version(u8),
    /// The packet is a fragment, its protocol does not match the segmentation asked for, or (IPv6)
    /// extension headers precede the transport header.
    #[error("super-packet protocol {0} does not match the requested segmentation")]
    Protocol(u8),
    /// The transport header is truncated or its length invalid.
    #[error("super-packet transport header is invalid")]
    TransportHeader,
    /// The segment size is zero, or there is no payload to segment.
    #[error("super-packet segment size {0} is invalid for its payload")]
    SegmentSize(usize),
    /// The partial-checksum location lies outside the packet.
    #[error("checksum location {start}+{offset} is outside the {len}-byte packet")]
    ChecksumLocation {
        /// `csum_start`.
        start: usize,
        /// `csum_offset`.
        offset: usize,
        /// Packet length.
        len: usize,
    },
}

/// One segment produced by [`segment`]: its headers in the arena and its payload in the
/// super-packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// `outer header (if any) + IP header + transport header`, in the arena.
    pub header: Range<usize>,
    /// The payload, in the super-packet.
    pub payload: Range<usize>,
}

impl Segment {
    /// Length on the wire (outer header included when there is one).
    pub fn len(&self) -> usize {
        self.header.len() + self.payload.len()
    }

    /// Never true: a segment has at least its headers.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Where the parts of a TCP or UDP packet over IPv4 or IPv6 are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// IP version, 4 or 6.
    pub version: u8,
    /// IP header length (IPv4: IHL × 4; IPv6: 40).
    pub ip_len: usize,
    /// Total length of the packet (IP header included).
    pub total_len: usize,
    /// IPv4 identification of the packet (0 for IPv6).
    pub ident: u16,
    /// Transport header length (TCP data offset × 4, or 8 for UDP).
    pub l4_len: usize,
}

impl Layout {
    /// IP + transport header bytes.
    pub fn headers_len(&self) -> usize {
        self.ip_len + self.l4_len
    }

    /// Payload bytes.
    pub fn payload_len(&self) -> usize {
        self.total_len - self.headers_len()
    }
}

/// Parses the IP (v4 or v6) and transport headers of a `kind` packet (not a fragment; for IPv6,
/// without extension headers).
pub fn layout(packet: &[u8], kind: GsoKind) -> Result<Layout, GsoError> {
    let expected = match kind {
        GsoKind::Tcp => PROTO_TCP,
        GsoKind::Udp => PROTO_UDP,
    };
    let (version, ip_len, total_len, ident) = match ipv4::version(packet) {
        Some(4) => {
            let ip = ipv4::parse(packet)?;
            if ip.protocol != expected || ip.is_fragment() {
                return Err(GsoError::Protocol(ip.protocol));
            }
            (4, ip.header_len, ip.total_len, ip.ident)
        }
        Some(6) => {
            let ip = ipv6::parse(packet)?;
            if ip.next_header != expected {
                return Err(GsoError::Protocol(ip.next_header));
            }
            (6, ipv6::HEADER_LEN, ip.total_len(), 0)
        }
        Some(v) => return Err(GsoError::Version(v)),
        None => return Err(GsoError::Ip(Ipv4Error::TooShort(0))),
    };
    let l4 = &packet[ip_len..total_len];
    let l4_len = match kind {
        GsoKind::Tcp => {
            let offset = usize::from(l4.get(12).ok_or(GsoError::TransportHeader)? >> 4) * 4;
            if offset < 20 || offset > l4.len() {
                return Err(GsoError::TransportHeader);
            }
            offset
        }
        GsoKind::Udp if l4.len() >= UDP_HEADER_LEN => UDP_HEADER_LEN,
        GsoKind::Udp => return Err(GsoError::TransportHeader),
    };
    Ok(Layout { version, ip_len, total_len, ident, l4_len })
}

/// Completes a partial transport checksum (`VNET_F_NEEDS_CSUM` on a single packet): sums
/// `packet[start..]`, whose checksum field holds the pseudo-header sum, and stores the result.
pub fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), GsoError> {
    let at = start.checked_add(offset).filter(|at| at + 2 <= packet.len());
    let Some(at) = at else {
        return Err(GsoError::ChecksumLocation { start, offset, len: packet.len() });
    };
    let sum = checksum::finish(u32::from(checksum::sum(&packet[start..])));
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Splits the super-packet `packet` (exactly one IPv4 or IPv6 packet, its TTL / hop limit already
/// decided) into segments of at most `gso_size` payload bytes. For each segment, appends its
/// headers to `arena` — preceded by an outer header for `outer`, if given (IP-in-IP for IPv4,
/// 6in4 for IPv6) — and a [`Segment`] to `out`. Checksums (outer and inner IPv4, TCP/UDP) are
/// complete. Nothing is appended on error.
pub fn segment(
    packet: &[u8],
    kind: GsoKind,
    gso_size: usize,
    outer: Option<&Tunnel>,
    arena: &mut Vec<u8>,
    out: &mut Vec<Segment>,
) -> Result<(), GsoError> {
    let l = layout(packet, kind)?;
    let payload_len = l.payload_len();
    if gso_size == 0 || payload_len == 0 {
        return Err(GsoError::SegmentSize(gso_size));
    }
    let v6 = l.version == 6;
    let ihl = l.ip_len;
    let hdrs = l.headers_len();
    let outer_len = if outer.is_some() { HEADER_LEN } else { 0 };
    let (src, dst): (&[u8], &[u8]) =
        if v6 { (&packet[8..24], &packet[24..40]) } else { (&packet[12..16], &packet[16..20]) };
    let first_seq = u32::from_be_bytes(packet[ihl + 4..ihl + 8].try_into().expect("TCP header"));
    let protocol = if kind == GsoKind::Tcp { PROTO_TCP } else { PROTO_UDP };
    let count = payload_len.div_ceil(gso_size);
    arena.reserve(count * (outer_len + hdrs));
    out.reserve(count);
    for k in 0..count {
        let start = hdrs + k * gso_size;
        let end = (start + gso_size).min(l.total_len);
        let seg_payload = end - start;
        let h0 = arena.len();
        arena.resize(h0 + outer_len, 0);
        arena.extend_from_slice(&packet[..hdrs]);
        let inner = &mut arena[h0 + outer_len..];
        let l4_total = (l.l4_len + seg_payload) as u16;
        if v6 {
            // IPv6: payload length; no identification, no header checksum.
            inner[4..6].copy_from_slice(&l4_total.to_be_bytes());
        } else {
            // IPv4: total length, identification + k, header checksum.
            let total = (hdrs + seg_payload) as u16;
            inner[2..4].copy_from_slice(&total.to_be_bytes());
            inner[4..6].copy_from_slice(&l.ident.wrapping_add(k as u16).to_be_bytes());
            inner[10..12].fill(0);
            let ip_sum = checksum::checksum(&inner[..ihl]);
            inner[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        }
        // Transport header.
        let l4 = &mut inner[ihl..];
        let check_at = match kind {
            GsoKind::Tcp => {
                let seq = first_seq.wrapping_add((k * gso_size) as u32);
                l4[4..8].copy_from_slice(&seq.to_be_bytes());
                if k > 0 {
                    l4[13] &= !TCP_CWR;
                }
                if k + 1 < count {
                    l4[13] &= !(TCP_FIN | TCP_PSH);
                }
                TCP_CHECK_OFFSET
            }
            GsoKind::Udp => {
                l4[4..6].copy_from_slice(&l4_total.to_be_bytes());
                UDP_CHECK_OFFSET
            }
        };
        l4[check_at..check_at + 2].fill(0);
        let mut sum = if v6 {
            let (s, d) = (src.try_into().expect("16 bytes"), dst.try_into().expect("16 bytes"));
            checksum::pseudo_header_v6(s, d, protocol, u32::from(l4_total))
        } else {
            checksum::pseudo_header(
                src.try_into().expect("4 bytes"),
                dst.try_into().expect("4 bytes"),
                protocol,
                l4_total,
            )
        };
        sum = checksum::add(sum, checksum::sum(l4));
        sum = checksum::add(sum, checksum::sum(&packet[start..end]));
        let mut check = checksum::finish(u32::from(sum));
        if kind == GsoKind::Udp && check == 0 {
            check = 0xffff;
        }
        l4[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
        if let Some(tunnel) = outer {
            let (head, inner) = arena[h0..].split_at_mut(HEADER_LEN);
            let head: &mut [u8; HEADER_LEN] = head.try_into().expect("split at HEADER_LEN");
            // Cannot fail: a segment is shorter than the super-packet.
            if v6 {
                let inner_header = ipv6::parse_header(inner).expect("segment header just built");
                sixin4::write_outer_header(head, &inner_header, tunnel, 0).expect("segment fits an outer header");
            } else {
                let inner_header = ipv4::parse_header(inner).expect("segment header just built");
                ipv4::write_outer_header(head, &inner_header, tunnel, 0).expect("segment fits an outer header");
            }
        }
        out.push(Segment { header: h0..arena.len(), payload: start..end });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);

    /// A TCP packet from port 40000 with a timestamp option, `flags`, `payload`.
    pub(crate) fn tcp_packet(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        tcp_packet_from(40000, seq, flags, payload)
    }

    /// The TCP header + options + payload of the test packets.
    fn tcp_bytes(sport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut tcp = vec![0u8; 32];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
        tcp[12] = 8 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        tcp[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        tcp.extend_from_slice(payload);
        tcp
    }

    /// The same from source port `sport` (another flow).
    pub(crate) fn tcp_packet_from(sport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let tcp = tcp_bytes(sport, seq, flags, payload);
        let mut p = ipv4::build_packet(SRC, DST, PROTO_TCP, 64, 0x02, true, &tcp);
        p[4..6].copy_from_slice(&1000u16.to_be_bytes());
        ipv4::fix_checksum(&mut p);
        set_l4_checksum(&mut p);
        p
    }

    pub(crate) const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
    pub(crate) const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);

    /// The IPv6 counterpart of [`tcp_packet_from`] (traffic class 0x02, hop limit 64).
    pub(crate) fn tcp6_packet_from(sport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let tcp = tcp_bytes(sport, seq, flags, payload);
        let mut p = ipv6::build_packet(SRC6, DST6, PROTO_TCP, 64, 0x02, &tcp);
        set_l4_checksum(&mut p);
        p
    }

    pub(crate) fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let mut p = ipv4::build_packet(SRC, DST, PROTO_UDP, 64, 0, false, &udp_bytes(payload));
        set_l4_checksum(&mut p);
        p
    }

    pub(crate) fn udp6_packet(payload: &[u8]) -> Vec<u8> {
        let mut p = ipv6::build_packet(SRC6, DST6, PROTO_UDP, 64, 0, &udp_bytes(payload));
        set_l4_checksum(&mut p);
        p
    }

    fn udp_bytes(payload: &[u8]) -> Vec<u8> {
        let mut udp = vec![0u8; 8];
        udp[0..2].copy_from_slice(&4433u16.to_be_bytes());
        udp[2..4].copy_from_slice(&443u16.to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(payload);
        udp
    }

    /// The pseudo-header sum + transport bytes of a complete IPv4 or IPv6 packet.
    fn l4_sum(p: &[u8]) -> (usize, u8, u16) {
        if p[0] >> 4 == 6 {
            let h = ipv6::parse(p).unwrap();
            (40, h.next_header, ipv6::upper_layer_sum(&h, h.next_header, &p[40..h.total_len()]))
        } else {
            let h = ipv4::parse(p).unwrap();
            let l4 = &p[h.header_len..h.total_len];
            let pseudo = checksum::pseudo_header(h.src.octets(), h.dst.octets(), h.protocol, l4.len() as u16);
            (h.header_len, h.protocol, checksum::add(pseudo, checksum::sum(l4)))
        }
    }

    fn set_l4_checksum(p: &mut [u8]) {
        let (ihl, protocol) = if p[0] >> 4 == 6 { (40, p[6]) } else { (usize::from(p[0] & 0xf) * 4, p[9]) };
        let at = ihl + if protocol == PROTO_TCP { TCP_CHECK_OFFSET } else { UDP_CHECK_OFFSET };
        p[at..at + 2].fill(0);
        let (_, _, sum) = l4_sum(p);
        p[at..at + 2].copy_from_slice(&checksum::finish(u32::from(sum)).to_be_bytes());
    }

    /// The transport checksum of a complete IPv4 or IPv6 packet verifies.
    pub(crate) fn l4_checksum_ok(p: &[u8]) -> bool {
        checksum::finish(u32::from(l4_sum(p).2)) == 0
    }

    fn assemble(arena: &[u8], packet: &[u8], s: &Segment) -> Vec<u8> {
        let mut v = arena[s.header.clone()].to_vec();
        v.extend_from_slice(&packet[s.payload.clone()]);
        v
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4 | VNET_GSO_ECN,
            hdr_len: 52,
            gso_size: 1428,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::decode(&h.encode()), Some(h));
        assert_eq!(h.gso(), Ok(Some(GsoKind::Tcp)));
        assert_eq!(VnetHdr { gso_type: VNET_GSO_TCPV6, ..h }.gso(), Ok(Some(GsoKind::Tcp)));
        assert_eq!(VnetHdr { gso_type: 3, ..h }.gso(), Err(3), "legacy UFO is not split");
        assert_eq!(VnetHdr::decode(&[0; 9]), None);
    }

    #[test]
    fn tcp_super_packet_splits_like_the_kernel() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let sp = tcp_packet(5000, TCP_PSH | TCP_CWR | 0x10, &payload);
        let tunnel = Tunnel { src: Ipv4Addr::new(198, 51, 100, 1), dst: Ipv4Addr::new(198, 51, 100, 2), ttl: 64 };
        let (mut arena, mut segs) = (Vec::new(), Vec::new());
        segment(&sp, GsoKind::Tcp, 1400, Some(&tunnel), &mut arena, &mut segs).unwrap();
        assert_eq!(segs.iter().map(|s| s.payload.len()).collect::<Vec<_>>(), [1400, 1400, 200]);
        let mut rebuilt = Vec::new();
        for (k, s) in segs.iter().enumerate() {
            let outer = assemble(&arena, &sp, s);
            let d = ipv4::decapsulate(&mut outer.clone()).unwrap();
            assert_eq!((d.outer_src, d.outer_dst), (tunnel.src, tunnel.dst));
            let inner = &outer[d.inner.clone()];
            let h = ipv4::parse(inner).unwrap();
            assert_eq!(h.total_len, 52 + s.payload.len());
            assert_eq!(h.ident, 1000 + k as u16);
            assert!(h.dont_fragment);
            assert!(l4_checksum_ok(inner), "segment {k}");
            let tcp = &inner[20..];
            assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 5000 + 1400 * k as u32);
            assert_eq!(tcp[13] & TCP_CWR != 0, k == 0, "CWR on the first segment only");
            assert_eq!(tcp[13] & TCP_PSH != 0, k == 2, "PSH on the last segment only");
            assert_eq!(&tcp[20..32], &sp[40..52], "options copied");
            rebuilt.extend_from_slice(&tcp[32..]);
        }
        assert_eq!(rebuilt, payload);
    }

    #[test]
    fn udp_super_packet_splits_into_datagrams() {
        let payload = vec![0xab; 2500];
        let sp = udp_packet(&payload);
        let (mut arena, mut segs) = (Vec::new(), Vec::new());
        segment(&sp, GsoKind::Udp, 1200, None, &mut arena, &mut segs).unwrap();
        assert_eq!(segs.len(), 3);
        for s in &segs {
            let p = assemble(&arena, &sp, s);
            assert_eq!(u16::from_be_bytes([p[24], p[25]]) as usize, 8 + s.payload.len());
            assert!(l4_checksum_ok(&p));
        }
    }

    #[test]
    fn bad_super_packets_are_refused_without_output() {
        let (mut arena, mut segs) = (Vec::new(), Vec::new());
        let tcp = tcp_packet(1, 0x10, &[1; 100]);
        assert_eq!(segment(&tcp, GsoKind::Udp, 50, None, &mut arena, &mut segs), Err(GsoError::Protocol(6)));
        assert_eq!(segment(&tcp, GsoKind::Tcp, 0, None, &mut arena, &mut segs), Err(GsoError::SegmentSize(0)));
        let no_payload = tcp_packet(1, 0x10, &[]);
        assert!(segment(&no_payload, GsoKind::Tcp, 10, None, &mut arena, &mut segs).is_err());
        let mut bad_offset = tcp.clone();
        bad_offset[32] = 4 << 4; // TCP data offset 16 < 20
        assert_eq!(segment(&bad_offset, GsoKind::Tcp, 10, None, &mut arena, &mut segs), Err(GsoError::TransportHeader));
        assert!(arena.is_empty() && segs.is_empty());
    }

    #[test]
    fn tcp6_super_packet_splits_into_6in4_segments() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
        let sp = tcp6_packet_from(40000, 7, TCP_PSH | 0x10, &payload);
        let tunnel = Tunnel { src: Ipv4Addr::new(198, 51, 100, 1), dst: Ipv4Addr::new(198, 51, 100, 2), ttl: 64 };
        let (mut arena, mut segs) = (Vec::new(), Vec::new());
        segment(&sp, GsoKind::Tcp, 1376, Some(&tunnel), &mut arena, &mut segs).unwrap();
        assert_eq!(segs.iter().map(|s| s.payload.len()).collect::<Vec<_>>(), [1376, 1376, 248]);
        let mut rebuilt = Vec::new();
        for (k, s) in segs.iter().enumerate() {
            let mut outer = assemble(&arena, &sp, s);
            assert!(outer.len() <= 1500);
            let d = sixin4::decapsulate(&mut outer).unwrap();
            assert_eq!((d.outer_src, d.outer_dst), (tunnel.src, tunnel.dst));
            let inner = &outer[d.inner.clone()];
            let h = ipv6::parse(inner).unwrap();
            assert_eq!((h.payload_len, h.traffic_class, h.hop_limit), (32 + s.payload.len(), 0x02, 64));
            assert!(l4_checksum_ok(inner), "segment {k}");
            let tcp = &inner[40..];
            assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 7 + 1376 * k as u32);
            assert_eq!(tcp[13] & TCP_PSH != 0, k == 2, "PSH on the last segment only");
            rebuilt.extend_from_slice(&tcp[32..]);
        }
        assert_eq!(rebuilt, payload);
    }

    #[test]
    fn udp6_super_packet_splits_into_datagrams() {
        let sp = udp6_packet(&[0x5a; 2500]);
        let (mut arena, mut segs) = (Vec::new(), Vec::new());
        segment(&sp, GsoKind::Udp, 1200, None, &mut arena, &mut segs).unwrap();
        assert_eq!(segs.len(), 3);
        for s in &segs {
            let p = assemble(&arena, &sp, s);
            assert_eq!(usize::from(u16::from_be_bytes([p[44], p[45]])), 8 + s.payload.len());
            assert!(l4_checksum_ok(&p));
        }
        // Extension headers in front of the transport header are refused.
        let mut hbh = ipv6::build_packet(SRC6, DST6, ipv6::NEXT_HOP_BY_HOP, 64, 0, &[PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
        hbh.extend_from_slice(&[0; 8]);
        hbh[4..6].copy_from_slice(&16u16.to_be_bytes());
        assert_eq!(segment(&hbh, GsoKind::Udp, 100, None, &mut arena, &mut segs), Err(GsoError::Protocol(0)));
    }

    #[test]
    fn completes_a_partial_checksum() {
        let mut p = tcp_packet(9, 0x18, &[5; 333]);
        let want = p.clone();
        // What the kernel hands over: the pseudo-header sum in the checksum field.
        let pseudo = checksum::pseudo_header(SRC.octets(), DST.octets(), PROTO_TCP, (p.len() - 20) as u16);
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut p, 20, 16).unwrap();
        assert_eq!(p, want);
        assert!(complete_checksum(&mut p, 20, 400).is_err());
    }

    proptest! {
        #[test]
        fn v6_segments_reassemble_and_verify(len in 1usize..9000, gso in 1usize..1500, udp in any::<bool>()) {
            let payload: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let (sp, kind, hdrs) = if udp {
                (udp6_packet(&payload), GsoKind::Udp, 48)
            } else {
                (tcp6_packet_from(1, u32::MAX - 100, 0x10, &payload), GsoKind::Tcp, 72)
            };
            let t = Tunnel { src: Ipv4Addr::new(192, 0, 2, 1), dst: Ipv4Addr::new(192, 0, 2, 2), ttl: 9 };
            let (mut arena, mut segs) = (Vec::new(), Vec::new());
            segment(&sp, kind, gso, Some(&t), &mut arena, &mut segs).unwrap();
            prop_assert_eq!(segs.len(), len.div_ceil(gso));
            let mut rebuilt = Vec::new();
            for s in &segs {
                let mut p = assemble(&arena, &sp, s);
                let d = sixin4::decapsulate(&mut p).unwrap();
                let inner = &p[d.inner];
                prop_assert!(l4_checksum_ok(inner));
                rebuilt.extend_from_slice(&inner[hdrs..]);
            }
            prop_assert_eq!(rebuilt, payload);
        }

        #[test]
        fn segments_reassemble_and_verify(len in 1usize..9000, gso in 1usize..1500, fin in any::<bool>()) {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sp = tcp_packet(u32::MAX - 700, 0x10 | if fin { TCP_FIN } else { 0 }, &payload);
            let (mut arena, mut segs) = (Vec::new(), Vec::new());
            segment(&sp, GsoKind::Tcp, gso, None, &mut arena, &mut segs).unwrap();
            prop_assert_eq!(segs.len(), len.div_ceil(gso));
            let mut rebuilt = Vec::new();
            for (k, s) in segs.iter().enumerate() {
                let p = assemble(&arena, &sp, s);
                prop_assert!(l4_checksum_ok(&p));
                prop_assert_eq!(p[33] & TCP_FIN != 0, fin && k + 1 == segs.len());
                rebuilt.extend_from_slice(&p[52..]);
            }
            prop_assert_eq!(rebuilt, payload);
        }
    }
}
