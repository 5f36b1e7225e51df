//! Coalescing decapsulated packets into TUN writes (userspace GRO): consecutive TCP segments of
//! one flow in a received batch become one super-packet, written with a virtio-net header that
//! asks the kernel for segmentation offload, so the rest of the path (IP forward, veth, the VM's
//! TCP) handles one packet instead of dozens. Packets the underlay's NIC already coalesced
//! (longer than the tunnel MTU) are written as super-packets too.
//!
//! [`Coalescer::plan`] only decides: it returns [`TunWrite`]s made of rewritten headers (in its
//! own arena) followed by the members' bytes where they lie, to be written with one gather write
//! each — no payload byte is copied. Rules follow the kernel's TCP GRO: same 4-tuple, ACK, flags
//! (PSH ends a super-packet, CWR only on its first segment), TCP options, TOS, TTL and DF;
//! contiguous sequence numbers; equal segment sizes except the last; every member's TCP checksum
//! verified first (the super-packet is handed over with a partial checksum, so a corrupted
//! segment must never be merged). A flow's packets keep their order: a packet that cannot join
//! its flow's open super-packet closes it, and writes go out in the order their first packet
//! arrived.

use std::ops::Range;

use super::checksum;
use super::gso::{PROTO_TCP, VNET_F_NEEDS_CSUM, VNET_GSO_ECN, VNET_GSO_TCPV4, VnetHdr};
use super::ipv4::{self, MAX_PACKET_LEN};

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
    /// IPv4 and TCP headers.
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
    /// Longer than the tunnel MTU (coalesced by the underlay's GRO) but not TCP over IPv4: its
    /// segment boundaries cannot be recovered.
    #[error("coalesced packet of protocol {0} cannot be segmented again")]
    CoalescedNotTcp(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    addrs: u64,
    ports: u32,
}

/// A TCP segment that may be merged.
#[derive(Debug, Clone, Copy)]
struct Seg {
    key: FlowKey,
    seq: u32,
    ack: u32,
    flags: u8,
    tos: u8,
    ttl: u8,
    df: bool,
    ihl: usize,
    thl: usize,
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

fn tcp_segment(p: &[u8]) -> Option<(ipv4::Ipv4Header, Seg)> {
    let h = ipv4::parse(p).ok()?;
    if h.protocol != PROTO_TCP || h.is_fragment() {
        return None;
    }
    let tcp = &p[h.header_len..h.total_len];
    let thl = usize::from(*tcp.get(12)? >> 4) * 4;
    if thl < 20 || thl > tcp.len() {
        return None;
    }
    let be32 = |at: usize| u32::from_be_bytes(tcp[at..at + 4].try_into().expect("in TCP header"));
    let key = FlowKey { addrs: u64::from(u32::from(h.src)) << 32 | u64::from(u32::from(h.dst)), ports: be32(0) };
    let seg = Seg {
        key,
        seq: be32(4),
        ack: be32(8),
        flags: tcp[13],
        tos: h.tos,
        ttl: h.ttl,
        df: h.dont_fragment,
        ihl: h.header_len,
        thl,
        payload: tcp.len() - thl,
    };
    Some((h, seg))
}

fn tcp_checksum_ok(p: &[u8], h: &ipv4::Ipv4Header) -> bool {
    let tcp = &p[h.header_len..h.total_len];
    let pseudo = checksum::pseudo_header(h.src.octets(), h.dst.octets(), PROTO_TCP, tcp.len() as u16);
    checksum::finish(u32::from(checksum::add(pseudo, checksum::sum(tcp)))) == 0
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Plans the writes for a batch of `count` packets, `packet(i)` being the `i`th (exactly one
    /// IPv4 packet, decapsulated and valid), on a TUN device whose MTU is `tunnel_mtu`. Packets
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
            let total = ipv4::parse(p).map(|h| h.total_len).unwrap_or(p.len());
            if total > tunnel_mtu {
                match tcp {
                    Some((_, s)) => {
                        self.close(s.key);
                        self.push_group(Some(s.key), i, Kind::Super { ihl: s.ihl, thl: s.thl }, false);
                    }
                    None => {
                        let protocol = p.get(9).copied().unwrap_or(0);
                        self.rejected.push((i, GroError::CoalescedNotTcp(protocol)));
                    }
                }
                continue;
            }
            let Some((h, s)) = tcp else {
                self.push_group(None, i, Kind::Single, false);
                continue;
            };
            let mergeable =
                s.payload > 0 && s.flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG) == 0 && tcp_checksum_ok(p, &h);
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
            && (s.tos, s.ttl, s.df, s.ihl, s.thl) == (first.tos, first.ttl, first.df, first.ihl, first.thl)
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
                        gso_type: VNET_GSO_TCPV4 | if s.flags & TCP_CWR != 0 { VNET_GSO_ECN } else { 0 },
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
                    let total_payload = ipv4::parse(first).map(|h| h.total_len).unwrap_or(first.len()) - hdrs;
                    // Each segment as large as the tunnel carries: what arrived was cut at most
                    // this fine (the sender's real segment size is not in the packet).
                    let gso_size = tunnel_mtu.saturating_sub(hdrs).max(1);
                    let cwr = first[ihl + 13] & TCP_CWR != 0;
                    let vnet = VnetHdr {
                        flags: VNET_F_NEEDS_CSUM,
                        gso_type: VNET_GSO_TCPV4 | if cwr { VNET_GSO_ECN } else { 0 },
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
    /// payload: total length and header checksum, PSH if any member had it, and the TCP checksum
    /// field set to the pseudo-header sum (completed by the kernel: `VNET_F_NEEDS_CSUM`).
    fn super_headers(&mut self, vnet: &VnetHdr, first: &[u8], ihl: usize, thl: usize, total_payload: usize, psh: bool) {
        self.arena.extend_from_slice(&vnet.encode());
        let h = self.arena.len();
        self.arena.extend_from_slice(&first[..ihl + thl]);
        let hdr = &mut self.arena[h..];
        let total = (ihl + thl + total_payload) as u16;
        hdr[2..4].copy_from_slice(&total.to_be_bytes());
        ipv4::fix_checksum(hdr);
        if psh {
            hdr[ihl + 13] |= TCP_PSH;
        }
        let src: [u8; 4] = hdr[12..16].try_into().expect("IPv4 header");
        let dst: [u8; 4] = hdr[16..20].try_into().expect("IPv4 header");
        let pseudo = checksum::pseudo_header(src, dst, PROTO_TCP, (thl + total_payload) as u16);
        hdr[ihl + 16..ihl + 18].copy_from_slice(&pseudo.to_be_bytes());
    }
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
                let h = ipv4::parse(packet).unwrap();
                assert_eq!(h.total_len, packet.len());
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
    fn merging_stops_at_the_segment_limit() {
        let pkts: Vec<Vec<u8>> = (0..MAX_SEGMENTS as u32 + 3).map(|k| seg(k * 100, 0x10, 100)).collect();
        let refs: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
        let mut c = Coalescer::new();
        c.plan(refs.len(), |i| refs[i], MTU);
        let n: Vec<usize> = c.writes().iter().map(|w| w.members.len()).collect();
        assert_eq!(n, vec![MAX_SEGMENTS, 3]);
    }
}
