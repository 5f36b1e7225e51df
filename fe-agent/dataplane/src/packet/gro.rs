//! Coalescing decapsulated packets into TUN writes (userspace GRO): consecutive TCP segments (over
//! IPv4 or IPv6) of one flow in a received batch become one super-packet, written with a virtio-net header that
//! asks the kernel for segmentation offload, so the rest of the path (IP forward, veth, the VM's
//! TCP) handles one packet instead of dozens. Packets the underlay's NIC already coalesced
//! (longer than the tunnel MTU) are written as super-packets too.
//!
//! [`Coalescer::plan`] only decides: it returns [`TunWrite`]s made of rewritten headers (in its
//! own arena) followed by the members' bytes where they lie, to be written with one gather write
//! each — no payload byte is copied. Rules follow the kernel's TCP GRO: same 4-tuple, ACK, flags
//! (PSH ends a super-packet, CWR only on its first segment), TCP options, TOS, TTL and DF (IPv6:
//! traffic class, flow label and hop limit; a packet with extension headers is never merged);
//! contiguous sequence numbers; equal segment sizes except the last; every member's TCP checksum
//! verified first (the super-packet is handed over with a partial checksum, so a corrupted
//! segment must never be merged). A flow's packets keep their order: a packet that cannot join
//! its flow's open super-packet closes it, and writes go out in the order their first packet
//! arrived.

use std::ops::Range;

use super::checksum;
use super::gso::{PROTO_TCP, VNET_F_NEEDS_CSUM, VNET_GSO_ECN, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VnetHdr};
use super::ipv4::{self, MAX_PACKET_LEN};
use super::ipv6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
/// Most segments merged into one super-packet.
pub const MAX_SEGMENTS: usize = 64;

/// One write into TUN: `header` from the coalescer's arena, then `packet[skip..]` of each member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunWrite {
    /// In [`Coalescer::arena`]: the virtio-net header, then — for a super-packet — its rewritten
    /// IP and TCP headers.
    pub header: Range<usize>,
    /// In [`Coalescer::members`]: the batch indices of the packets whose bytes follow, in order.
    pub members: Range<usize>,
    /// Bytes at the start of each member already covered by `header` (its IP + TCP headers for a
    /// super-packet, 0 for a packet written as it is).
    pub skip: usize,
    /// True when the write is a super-packet (GSO).
    pub gso: bool,
}

/// Why a received packet cannot be written into TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroError {
    /// Longer than the tunnel MTU (coalesced by the underlay's GRO) but not TCP: its segment
    /// boundaries cannot be recovered.
    #[error("coalesced packet of protocol {0} cannot be segmented again")]
    CoalescedNotTcp(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    /// Source and destination (IPv4 addresses in the low 32 bits; the version keeps families
    /// apart).
    src: u128,
    dst: u128,
    version: u8,
    ports: u32,
}

/// A TCP segment that may be merged.
#[derive(Debug, Clone, Copy)]
struct Seg {
    key: FlowKey,
    seq: u32,
    ack: u32,
    flags: u8,
    /// IPv4: TOS, TTL, DF; IPv6: version/traffic class/flow label word, hop limit. Must match to
    /// merge.
    ip_attrs: u64,
    /// IP header length (IPv6: 40).
    ihl: usize,
    thl: usize,
    /// IP total length.
    total: usize,
    payload: usize,
}

#[derive(Debug)]
enum Kind {
    /// Written as it is (one member).
    Single,
    /// A super-packet from the underlay's GRO (one member).
    Super { ihl: usize, thl: usize },
    /// Segments merged (≥ 1 member; one member is written as it is).
    Merged { first: Seg, next_seq: u32, last_len: usize, total_payload: usize, psh: bool },
}

#[derive(Debug)]
struct Group {
    key: Option<FlowKey>,
    open: bool,
    head: usize,
    tail: usize,
    count: usize,
    kind: Kind,
}

/// Plans the TUN writes for a batch; reuse one per worker (no allocation once warmed up).
#[derive(Debug, Default)]
pub struct Coalescer {
    arena: Vec<u8>,
    members: Vec<usize>,
    writes: Vec<TunWrite>,
    rejected: Vec<(usize, GroError)>,
    groups: Vec<Group>,
    next: Vec<usize>,
}

/// The IP total length of a valid IPv4 or IPv6 packet (else its length).
fn ip_total_len(p: &[u8]) -> usize {
    match ipv4::version(p) {
        Some(4) => ipv4::parse(p).map(|h| h.total_len).unwrap_or(p.len()),
        Some(6) => ipv6::parse(p).map(|h| h.total_len()).unwrap_or(p.len()),
        _ => p.len(),
    }
}

/// The IP protocol (IPv6: first next header) of a packet, for error reports.
fn ip_protocol(p: &[u8]) -> u8 {
    let at = if ipv4::version(p) == Some(6) { 6 } else { 9 };
    p.get(at).copied().unwrap_or(0)
}

fn tcp_segment(p: &[u8]) -> Option<Seg> {
    let (key, ip_attrs, ihl, total) = match ipv4::version(p)? {
        4 => {
            let h = ipv4::parse(p).ok()?;
            if h.protocol != PROTO_TCP || h.is_fragment() {
                return None;
            }
            let key = FlowKey { src: u32::from(h.src).into(), dst: u32::from(h.dst).into(), version: 4, ports: 0 };
            let attrs = u64::from(h.tos) << 16 | u64::from(h.ttl) << 8 | u64::from(h.dont_fragment);
            (key, attrs, h.header_len, h.total_len)
        }
        6 => {
            let h = ipv6::parse(p).ok()?;
            if h.next_header != PROTO_TCP {
                return None;
            }
            let key = FlowKey { src: h.src.to_bits(), dst: h.dst.to_bits(), version: 6, ports: 0 };
            let word = u32::from_be_bytes(p[0..4].try_into().expect("IPv6 header"));
            (key, u64::from(word) << 8 | u64::from(h.hop_limit), ipv6::HEADER_LEN, h.total_len())
        }
        _ => return None,
    };
    let tcp = &p[ihl..total];
    let thl = usize::from(*tcp.get(12)? >> 4) * 4;
    if thl < 20 || thl > tcp.len() {
        return None;
    }
    let be32 = |at: usize| u32::from_be_bytes(tcp[at..at + 4].try_into().expect("in TCP header"));
    Some(Seg {
        key: FlowKey { ports: be32(0), ..key },
        seq: be32(4),
        ack: be32(8),
        flags: tcp[13],
        ip_attrs,
        ihl,
        thl,
        total,
        payload: tcp.len() - thl,
    })
}

/// The TCP pseudo-header sum of segment `s` of packet `p` carrying `tcp_len` bytes of TCP.
fn pseudo_header(p: &[u8], version: u8, tcp_len: usize) -> u16 {
    if version == 6 {
        let addr = |at: usize| -> &[u8; 16] { p[at..at + 16].try_into().expect("IPv6 header") };
        checksum::pseudo_header_v6(addr(8), addr(24), PROTO_TCP, tcp_len as u32)
    } else {
        let addr = |at: usize| -> [u8; 4] { p[at..at + 4].try_into().expect("IPv4 header") };
        checksum::pseudo_header(addr(12), addr(16), PROTO_TCP, tcp_len as u16)
    }
}

fn tcp_checksum_ok(p: &[u8], s: &Seg) -> bool {
    let tcp = &p[s.ihl..s.total];
    let pseudo = pseudo_header(p, s.key.version, tcp.len());
    checksum::finish(u32::from(checksum::add(pseudo, checksum::sum(tcp)))) == 0
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Plans the writes for a batch of `count` packets, `packet(i)` being the `i`th (exactly one
    /// IPv4 or IPv6 packet, decapsulated and valid), on a TUN device whose MTU is `tunnel_mtu`. Packets
    /// that cannot be written are listed by [`Coalescer::rejected`]. Returns how many writes
    /// [`Coalescer::writes`] now lists.
    pub fn plan<'a>(&mut self, count: usize, packet: impl Fn(usize) -> &'a [u8], tunnel_mtu: usize) -> usize {
        self.arena.clear();
        self.members.clear();
        self.writes.clear();
        self.rejected.clear();
        self.groups.clear();
        self.next.clear();
        self.next.resize(count, usize::MAX);
        for i in 0..count {
            let p = packet(i);
            let tcp = tcp_segment(p);
            let total = tcp.map_or_else(|| ip_total_len(p), |s| s.total);
            if total > tunnel_mtu {
                match tcp {
                    Some(s) => {
                        self.close(s.key);
                        self.push_group(Some(s.key), i, Kind::Super { ihl: s.ihl, thl: s.thl }, false);
                    }
                    None => self.rejected.push((i, GroError::CoalescedNotTcp(ip_protocol(p)))),
                }
                continue;
            }
            let Some(s) = tcp else {
                self.push_group(None, i, Kind::Single, false);
                continue;
            };
            let mergeable =
                s.payload > 0 && s.flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG) == 0 && tcp_checksum_ok(p, &s);
            if !mergeable {
                self.close(s.key);
                self.push_group(Some(s.key), i, Kind::Single, false);
                continue;
            }
            if let Some(g) = self.open_group(s.key) {
                if self.can_append(g, &s, p, packet(self.groups[g].head)) {
                    self.append(g, i, &s);
                    continue;
                }
                self.groups[g].open = false;
            }
            let kind = Kind::Merged {
                first: s,
                next_seq: s.seq.wrapping_add(s.payload as u32),
                last_len: s.payload,
                total_payload: s.payload,
                psh: s.flags & TCP_PSH != 0,
            };
            self.push_group(Some(s.key), i, kind, s.flags & TCP_PSH == 0);
        }
        self.emit(&packet, tunnel_mtu);
        self.writes.len()
    }

    /// The writes planned for the last batch, in the order to make them.
    pub fn writes(&self) -> &[TunWrite] {
        &self.writes
    }

    /// Headers referenced by [`TunWrite::header`].
    pub fn arena(&self) -> &[u8] {
        &self.arena
    }

    /// Batch indices referenced by [`TunWrite::members`].
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Packets of the last batch that cannot be written, and why.
    pub fn rejected(&self) -> &[(usize, GroError)] {
        &self.rejected
    }

    fn push_group(&mut self, key: Option<FlowKey>, i: usize, kind: Kind, open: bool) {
        self.groups.push(Group { key, open, head: i, tail: i, count: 1, kind });
    }

    fn open_group(&self, key: FlowKey) -> Option<usize> {
        self.groups.iter().rposition(|g| g.open && g.key == Some(key))
    }

    fn close(&mut self, key: FlowKey) {
        if let Some(g) = self.open_group(key) {
            self.groups[g].open = false;
        }
    }

    fn can_append(&self, g: usize, s: &Seg, p: &[u8], first_packet: &[u8]) -> bool {
        let group = &self.groups[g];
        let Kind::Merged { first, next_seq, last_len, total_payload, .. } = &group.kind else { return false };
        fn options<'a>(q: &'a [u8], seg: &Seg) -> &'a [u8] {
            &q[seg.ihl + 20..seg.ihl + seg.thl]
        }
        s.seq == *next_seq
            && s.ack == first.ack
            && s.flags & TCP_CWR == 0
            && s.flags & !TCP_PSH == first.flags & !(TCP_PSH | TCP_CWR)
            && (s.ip_attrs, s.ihl, s.thl) == (first.ip_attrs, first.ihl, first.thl)
            && *last_len == first.payload
            && s.payload <= first.payload
            && first.ihl + first.thl + total_payload + s.payload <= MAX_PACKET_LEN
            && group.count < MAX_SEGMENTS
            && options(p, s) == options(first_packet, first)
    }

    fn append(&mut self, g: usize, i: usize, s: &Seg) {
        let tail = self.groups[g].tail;
        self.next[tail] = i;
        let group = &mut self.groups[g];
        group.tail = i;
        group.count += 1;
        if let Kind::Merged { next_seq, last_len, total_payload, psh, .. } = &mut group.kind {
            *next_seq = next_seq.wrapping_add(s.payload as u32);
            *last_len = s.payload;
            *total_payload += s.payload;
            if s.flags & TCP_PSH != 0 {
                *psh = true;
                group.open = false;
            }
        }
    }

    fn emit<'a>(&mut self, packet: &impl Fn(usize) -> &'a [u8], tunnel_mtu: usize) {
        for gi in 0..self.groups.len() {
            let g = &self.groups[gi];
            let members_start = self.members.len();
            let mut i = g.head;
            loop {
                self.members.push(i);
                if i == g.tail {
                    break;
                }
                i = self.next[i];
            }
            let members = members_start..self.members.len();
            let h0 = self.arena.len();
            let first = packet(g.head);
            let (skip, gso) = match g.kind {
                Kind::Merged { first: s, total_payload, psh, .. } if g.count > 1 => {
                    let hdrs = s.ihl + s.thl;
                    let vnet = VnetHdr {
                        flags: VNET_F_NEEDS_CSUM,
                        gso_type: gso_type(first) | if s.flags & TCP_CWR != 0 { VNET_GSO_ECN } else { 0 },
                        hdr_len: hdrs as u16,
                        gso_size: s.payload as u16,
                        csum_start: s.ihl as u16,
                        csum_offset: 16,
                    };
                    self.super_headers(&vnet, first, s.ihl, s.thl, total_payload, psh);
                    (hdrs, true)
                }
                Kind::Super { ihl, thl } => {
                    let hdrs = ihl + thl;
                    let total_payload = ip_total_len(first) - hdrs;
                    // Each segment as large as the tunnel carries: what arrived was cut at most
                    // this fine (the sender's real segment size is not in the packet).
                    let gso_size = tunnel_mtu.saturating_sub(hdrs).max(1);
                    let cwr = first[ihl + 13] & TCP_CWR != 0;
                    let vnet = VnetHdr {
                        flags: VNET_F_NEEDS_CSUM,
                        gso_type: gso_type(first) | if cwr { VNET_GSO_ECN } else { 0 },
                        hdr_len: hdrs as u16,
                        gso_size: gso_size.min(usize::from(u16::MAX)) as u16,
                        csum_start: ihl as u16,
                        csum_offset: 16,
                    };
                    self.super_headers(&vnet, first, ihl, thl, total_payload, false);
                    (hdrs, true)
                }
                _ => {
                    self.arena.extend_from_slice(&VnetHdr::default().encode());
                    (0, false)
                }
            };
            self.writes.push(TunWrite { header: h0..self.arena.len(), members, skip, gso });
        }
    }

    /// Appends `vnet` and `first`'s IP + TCP headers rewritten for `total_payload` bytes of
    /// payload: total length (IPv6: payload length) and IPv4 header checksum, PSH if any member
    /// had it, and the TCP checksum field set to the pseudo-header sum (completed by the kernel:
    /// `VNET_F_NEEDS_CSUM`).
    fn super_headers(&mut self, vnet: &VnetHdr, first: &[u8], ihl: usize, thl: usize, total_payload: usize, psh: bool) {
        self.arena.extend_from_slice(&vnet.encode());
        let h = self.arena.len();
        self.arena.extend_from_slice(&first[..ihl + thl]);
        let hdr = &mut self.arena[h..];
        let version = hdr[0] >> 4;
        if version == 6 {
            hdr[4..6].copy_from_slice(&((thl + total_payload) as u16).to_be_bytes());
        } else {
            hdr[2..4].copy_from_slice(&((ihl + thl + total_payload) as u16).to_be_bytes());
            ipv4::fix_checksum(hdr);
        }
        if psh {
            hdr[ihl + 13] |= TCP_PSH;
        }
        let pseudo = pseudo_header(hdr, version, thl + total_payload);
        hdr[ihl + 16..ihl + 18].copy_from_slice(&pseudo.to_be_bytes());
    }
}

/// The virtio-net GSO type for TCP over `packet`'s IP version.
fn gso_type(packet: &[u8]) -> u8 {
    if ipv4::version(packet) == Some(6) { VNET_GSO_TCPV6 } else { VNET_GSO_TCPV4 }
}

#[cfg(test)]
mod tests {
    use super::super::gso::{self, GsoKind, VNET_HDR_LEN};
    use super::*;

    const MTU: usize = 1480;

    fn seg(seq: u32, flags: u8, len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
        gso::tests::tcp_packet(seq, flags, &payload)
    }

    /// What the kernel sees: one packet per write, super-packets segmented as the kernel would.
    fn delivered(c: &Coalescer, writes: &[TunWrite], packets: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for w in writes {
            let mut bytes = c.arena()[w.header.clone()].to_vec();
            for &m in &c.members()[w.members.clone()] {
                bytes.extend_from_slice(&packets[m][w.skip..]);
            }
            let vnet = VnetHdr::decode(&bytes).unwrap();
            let packet = &bytes[VNET_HDR_LEN..];
            if w.gso {
                assert_eq!(vnet.flags, VNET_F_NEEDS_CSUM);
                assert_eq!(vnet.gso(), Ok(Some(GsoKind::Tcp)));
                assert_eq!(vnet.gso_type & !VNET_GSO_ECN, gso_type(packet));
                assert_eq!(ip_total_len(packet), packet.len());
                // Complete the partial checksum, as the kernel would before segmenting.
                let mut full = packet.to_vec();
                gso::complete_checksum(&mut full, usize::from(vnet.csum_start), usize::from(vnet.csum_offset)).unwrap();
                assert!(gso::tests::l4_checksum_ok(&full));
                let (mut arena, mut segs) = (Vec::new(), Vec::new());
                gso::segment(&full, GsoKind::Tcp, usize::from(vnet.gso_size), None, &mut arena, &mut segs).unwrap();
                for s in segs {
                    let mut p = arena[s.header.clone()].to_vec();
                    p.extend_from_slice(&full[s.payload.clone()]);
                    out.push(p);
                }
            } else {
                assert_eq!(vnet, VnetHdr::default());
                out.push(packet.to_vec());
            }
        }
        out
    }

    fn payload_of(p: &[u8]) -> (u32, Vec<u8>) {
        let thl = usize::from(p[32] >> 4) * 4;
        (u32::from_be_bytes(p[24..28].try_into().unwrap()), p[20 + thl..].to_vec())
    }

    #[test]
    fn consecutive_segments_become_one_write() {
        let pkts = [seg(100, 0x10, 1000), seg(1100, 0x10, 1000), seg(2100, 0x18, 400)];
        let refs: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        let writes = c.writes().to_vec();
        assert_eq!(writes.len(), 1);
        assert!(writes[0].gso);
        assert_eq!(&c.members()[writes[0].members.clone()], &[0, 1, 2]);
        // Segmenting the super-packet gives back the original segments (the kernel numbers the
        // IPv4 identification afresh).
        let without_ident = |p: &[u8]| [&p[..4], &p[6..10], &p[12..]].concat();
        let got: Vec<Vec<u8>> = delivered(&c, &writes, &refs).iter().map(|p| without_ident(p)).collect();
        let want: Vec<Vec<u8>> = pkts.iter().map(|p| without_ident(p)).collect();
        assert!(got == want, "segments differ from the originals");
    }

    #[test]
    fn order_within_a_flow_is_kept_and_gaps_split() {
        // Flow A (port 40000): 0 and 1000 contiguous, a gap to 3000, then a pure ACK; flow B
        // (port 40001) interleaved.
        let b = |seq: u32| gso::tests::tcp_packet_from(40001, seq, 0x10, &[9; 500]);
        let pkts = [seg(0, 0x10, 1000), b(7), seg(1000, 0x10, 1000), seg(3000, 0x10, 1000), seg(4000, 0x10, 0), b(507)];
        let refs: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        let writes = c.writes().to_vec();
        let shapes: Vec<Vec<usize>> = writes.iter().map(|w| c.members()[w.members.clone()].to_vec()).collect();
        assert_eq!(shapes, vec![vec![0, 2], vec![1, 5], vec![3], vec![4]]);
        let got = delivered(&c, &writes, &refs);
        let flow = |port: u8, of: &[Vec<u8>]| -> Vec<(u32, Vec<u8>)> {
            of.iter().filter(|p| p[21] == port).map(|p| payload_of(p)).collect()
        };
        assert_eq!(flow(0x40, &got), flow(0x40, &pkts), "flow A in order, nothing lost");
        assert_eq!(flow(0x41, &got), flow(0x41, &pkts), "flow B in order, nothing lost");
    }

    #[test]
    fn corrupt_or_special_segments_are_never_merged() {
        let mut corrupt = seg(1000, 0x10, 1000);
        corrupt[100] ^= 0xff;
        let pkts =
            [seg(0, 0x10, 1000), corrupt, seg(2000, 0x11, 10), seg(2010, 0x10 | TCP_CWR, 1000), seg(3010, 0x10, 1000)];
        let refs: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        let writes = c.writes().to_vec();
        let shapes: Vec<Vec<usize>> = writes.iter().map(|w| c.members()[w.members.clone()].to_vec()).collect();
        // The corrupt segment is written alone (the kernel drops it on its bad checksum), FIN
        // alone, CWR starts a new super-packet that the next segment joins.
        assert_eq!(shapes, vec![vec![0], vec![1], vec![2], vec![3, 4]]);
        let ecn = VnetHdr::decode(&c.arena()[writes[3].header.clone()]).unwrap();
        assert_eq!(ecn.gso_type, VNET_GSO_TCPV4 | VNET_GSO_ECN);
        assert_eq!(delivered(&c, &writes, &refs)[1], pkts[1], "written unchanged");
    }

    #[test]
    fn underlay_super_packets_are_written_with_gso_and_others_refused() {
        let big = seg(0, 0x10, 4000);
        let udp = gso::tests::udp_packet(&[0; 3000]);
        let small = seg(4000, 0x10, 100);
        let refs: Vec<&[u8]> = vec![&big, &udp, &small];
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        let writes = c.writes().to_vec();
        assert_eq!(c.rejected(), &[(1, GroError::CoalescedNotTcp(17))]);
        assert_eq!(writes.len(), 2);
        let vnet = VnetHdr::decode(&c.arena()[writes[0].header.clone()]).unwrap();
        assert_eq!(usize::from(vnet.gso_size), MTU - 52);
        let got = delivered(&c, &writes, &refs);
        let bytes: Vec<u8> = got.iter().flat_map(|p| payload_of(p).1).collect();
        let want: Vec<u8> = [&big, &small].iter().flat_map(|p| payload_of(p).1).collect();
        assert_eq!(bytes, want);
        assert!(got.iter().all(|p| p.len() <= MTU));
    }

    #[test]
    fn ipv6_segments_coalesce_and_flows_stay_apart() {
        let seg6 = |seq: u32, flags: u8, len: usize| {
            let payload: Vec<u8> = (0..len).map(|i| (seq as usize * 3 + i) as u8).collect();
            gso::tests::tcp6_packet_from(40000, seq, flags, &payload)
        };
        let hop12 = |seq: u32, flags: u8, len: usize| {
            let mut p = seg6(seq, flags, len);
            p[7] = 12;
            p
        };
        // Two IPv6 segments with an IPv4 segment of the same ports in between (another flow),
        // then two in sequence with another hop limit (they cannot join the first two).
        let pkts = [
            seg6(0, 0x10, 1000),
            seg(0, 0x10, 1000),
            seg6(1000, 0x10, 1000),
            hop12(2000, 0x10, 1000),
            hop12(3000, 0x18, 200),
        ];
        let refs: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        let writes = c.writes().to_vec();
        let shapes: Vec<Vec<usize>> = writes.iter().map(|w| c.members()[w.members.clone()].to_vec()).collect();
        assert_eq!(shapes, vec![vec![0, 2], vec![1], vec![3, 4]]);
        let vnet = VnetHdr::decode(&c.arena()[writes[0].header.clone()]).unwrap();
        assert_eq!((vnet.gso_type, vnet.csum_start, vnet.hdr_len), (VNET_GSO_TCPV6, 40, 72));
        let got = delivered(&c, &writes, &refs);
        let v6: Vec<Vec<u8>> = got.iter().filter(|p| p[0] >> 4 == 6).cloned().collect();
        let want: Vec<Vec<u8>> = vec![pkts[0].clone(), pkts[2].clone(), pkts[3].clone(), pkts[4].clone()];
        assert!(v6 == want, "IPv6 segments delivered as sent");
    }

    #[test]
    fn ipv6_underlay_super_packets_are_written_with_gso() {
        let big = gso::tests::tcp6_packet_from(1, 0, 0x10, &[3; 5000]);
        let udp = gso::tests::udp6_packet(&[0; 3000]);
        let refs: Vec<&[u8]> = vec![&big, &udp];
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        assert_eq!(c.rejected(), &[(1, GroError::CoalescedNotTcp(17))]);
        let writes = c.writes().to_vec();
        let vnet = VnetHdr::decode(&c.arena()[writes[0].header.clone()]).unwrap();
        assert_eq!((vnet.gso_type, usize::from(vnet.gso_size)), (VNET_GSO_TCPV6, MTU - 72));
        let got = delivered(&c, &writes, &refs);
        assert!(got.iter().all(|p| p.len() <= MTU));
        assert_eq!(got.iter().map(|p| p.len() - 72).sum::<usize>(), 5000);
    }

    #[test]
    fn merging_stops_at_the_segment_limit() {
        let pkts: Vec<Vec<u8>> = (0..MAX_SEGMENTS as u32 + 3).map(|k| seg(k * 100, 0x10, 100)).collect();
        let refs: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        let n: Vec<usize> = c.writes().iter().map(|w| w.members.len()).collect();
        assert_eq!(n, vec![MAX_SEGMENTS, 3]);
    }
}
