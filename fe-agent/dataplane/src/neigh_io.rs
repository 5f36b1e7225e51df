//! Neighbour discovery IO on a VM-facing interface: one capture socket for ARP, RARP and IPv6
//! NDP (AF_PACKET + classic BPF, kernel receive timestamps, non-blocking under tokio), and
//! sending ARP / NDP frames on it.
//!
//! What a VM (or its hypervisor) says about where it is arrives in one of three forms: ARP
//! (gratuitous ARP, requests and replies), RARP (QEMU's `announce-self` after a live migration:
//! the MAC only), and NDP (unsolicited Neighbor Advertisements, DAD Neighbor Solicitations and
//! ordinary NS/NA; Router Solicitations so the agent can answer with a Router Advertisement). The
//! filter ([`filter`]) passes exactly those, incoming only (our own frames never), directly or
//! behind one 802.1Q tag, for the [`Protocols`] asked for: EtherType ARP or RARP, or IPv6 whose
//! next header is ICMPv6 of type 133, 135 or 136 (NDP messages carry no extension headers in
//! practice; one that does is not captured). Frames that pass but do not parse are counted by
//! protocol and reason ([`NeighStats::malformed`]) and skipped; the kernel's drops (socket buffer
//! full) are counted too.
//!
//! The rate limiting of what a VM may send is the agent's (per source, as for ARP):
//! [`Frame::source`] is the key. VLAN: as in [`crate::arp_io`], an in-band tag is parsed, a tag
//! stripped into packet metadata is not reconstructed.
//!
//! An FE never sends RARP; [`FrameSender`] can (tests and the lab play the hypervisor with it).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use tokio::io::unix::AsyncFd;

use crate::bpf::{ABS, B, H, Insn, JEQ, JMP, K, LD, RET, SKF_AD_OFF, SKF_AD_PKTTYPE, W};
use crate::packet::arp::{self, ArpError, ArpMessage};
use crate::packet::eth::{self, ETHERTYPE_IPV6, ETHERTYPE_VLAN, EthError, MacAddr};
use crate::packet::icmp6::{TYPE_NEIGHBOR_ADVERTISEMENT, TYPE_NEIGHBOR_SOLICITATION, TYPE_ROUTER_SOLICITATION};
use crate::packet::ipv6::NEXT_ICMPV6;
use crate::packet::ndp::{self, NdpError, NdpMessage};
use crate::packet::rarp::{self, ETHERTYPE_RARP, RarpError, RarpMessage};
pub use crate::psock::CaptureError;
use crate::psock::{self, PacketSocket};

/// Which protocols a capture receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Protocols {
    /// ARP (EtherType 0x0806).
    pub arp: bool,
    /// RARP (EtherType 0x8035).
    pub rarp: bool,
    /// NDP: Router Solicitation, Neighbor Solicitation and Neighbor Advertisement.
    pub ndp: bool,
}

impl Protocols {
    /// ARP alone (what [`crate::arp_io::ArpCapture`] captures).
    pub const ARP: Protocols = Protocols { arp: true, rarp: false, ndp: false };
    /// ARP, RARP and NDP.
    pub const ALL: Protocols = Protocols { arp: true, rarp: true, ndp: true };
}

/// A protocol of [`Protocols`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// ARP.
    Arp,
    /// RARP.
    Rarp,
    /// IPv6 Neighbor Discovery.
    Ndp,
}

impl Protocol {
    /// A stable label for metrics (`protocol="ndp"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Arp => "arp",
            Protocol::Rarp => "rarp",
            Protocol::Ndp => "ndp",
        }
    }
}

/// A captured frame, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frame {
    /// ARP.
    Arp(ArpMessage),
    /// RARP.
    Rarp(RarpMessage),
    /// NDP.
    Ndp(NdpMessage),
}

impl Frame {
    /// Its protocol.
    pub fn protocol(&self) -> Protocol {
        match self {
            Frame::Arp(_) => Protocol::Arp,
            Frame::Rarp(_) => Protocol::Rarp,
            Frame::Ndp(_) => Protocol::Ndp,
        }
    }

    /// The Ethernet source.
    pub fn eth_src(&self) -> MacAddr {
        match self {
            Frame::Arp(m) => m.eth_src,
            Frame::Rarp(m) => m.eth_src,
            Frame::Ndp(m) => m.eth_src,
        }
    }

    /// Who sent it, as the rate limiter's key: (sender MAC, sender IP) for ARP, (sender MAC,
    /// 0.0.0.0) for RARP, (Ethernet source, IPv6 source) for NDP.
    pub fn source(&self) -> (MacAddr, IpAddr) {
        match self {
            Frame::Arp(m) => (m.sender_mac, IpAddr::V4(m.sender_ip)),
            Frame::Rarp(m) => (m.sender_mac, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Frame::Ndp(m) => (m.eth_src, IpAddr::V6(m.ip_src)),
        }
    }
}

/// A captured frame with its capture time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The parsed frame.
    pub frame: Frame,
    /// Kernel receive time on `CLOCK_MONOTONIC`, in nanoseconds.
    pub mono_ns: u64,
    /// Kernel receive time, wall clock.
    pub wall: SystemTime,
}

/// Reasons a frame is refused before its protocol is known (label `protocol="ethernet"`).
const ETHERNET_REASONS: [&str; 3] = ["too_short", "stacked_vlan", "other_ethertype"];

/// Counters of one capture socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NeighStats {
    /// Frames that passed the filter.
    pub frames: u64,
    /// Frames parsed, per protocol.
    pub parsed: Vec<(Protocol, u64)>,
    /// Malformed frames per (protocol label — `arp`, `rarp`, `ndp` or `ethernet` —, reason label
    /// of [`ArpError`], [`RarpError`], [`NdpError`]).
    pub malformed: Vec<(&'static str, &'static str, u64)>,
    /// Frames the kernel dropped because the socket's buffer was full (`PACKET_STATISTICS`).
    pub kernel_dropped: u64,
}

impl NeighStats {
    /// Malformed frames of `protocol` with this reason label.
    pub fn malformed(&self, protocol: &str, reason: &str) -> u64 {
        self.malformed.iter().find(|(p, r, _)| *p == protocol && *r == reason).map_or(0, |(_, _, n)| *n)
    }

    /// Frames of `protocol` parsed.
    pub fn parsed(&self, protocol: Protocol) -> u64 {
        self.parsed.iter().find(|(p, _)| *p == protocol).map_or(0, |(_, n)| *n)
    }
}

/// Per-reason counters for one label set.
#[derive(Debug)]
struct Reasons {
    protocol: &'static str,
    labels: &'static [&'static str],
    counts: Vec<AtomicU64>,
}

impl Reasons {
    fn new(protocol: &'static str, labels: &'static [&'static str]) -> Self {
        Reasons { protocol, labels, counts: labels.iter().map(|_| AtomicU64::new(0)).collect() }
    }

    fn count(&self, reason: &str) {
        if let Some(i) = self.labels.iter().position(|l| *l == reason) {
            self.counts[i].fetch_add(1, Relaxed);
        }
    }

    fn snapshot(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        self.labels.iter().zip(&self.counts).map(|(r, n)| (self.protocol, *r, n.load(Relaxed)))
    }
}

#[derive(Debug)]
struct Stats {
    frames: AtomicU64,
    parsed: [AtomicU64; 3],
    ethernet: Reasons,
    arp: Reasons,
    rarp: Reasons,
    ndp: Reasons,
    /// Kernel drops summed over `PACKET_STATISTICS` reads (each read resets the kernel's count).
    kernel_dropped: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            frames: AtomicU64::new(0),
            parsed: Default::default(),
            ethernet: Reasons::new("ethernet", &ETHERNET_REASONS),
            arp: Reasons::new("arp", &ArpError::REASONS),
            rarp: Reasons::new("rarp", &RarpError::REASONS),
            ndp: Reasons::new("ndp", &NdpError::REASONS),
            kernel_dropped: AtomicU64::new(0),
        }
    }
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Arp, Protocol::Rarp, Protocol::Ndp];

/// Jump labels of the capture filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Next,
    Vlan,
    Ndp(u32),
    Accept,
    Drop,
}

/// Bytes of an accepted frame kept (all of it).
const ACCEPT: u32 = 0x40000;

/// The classic BPF program passing incoming frames of `protocols` (see the module doc).
pub(crate) fn filter(protocols: Protocols) -> Vec<libc::sock_filter> {
    use Insn::*;
    use Label::*;
    // Jump to `target` when A == value, else fall through; the last test of a chain falls to
    // `otherwise`.
    let chain = |tests: &[(u32, Label)], otherwise: Label| -> Vec<Insn<Label>> {
        let mut out = Vec::new();
        for (i, &(value, target)) in tests.iter().enumerate() {
            let miss = if i + 1 == tests.len() { otherwise } else { Next };
            out.push(Jump(JMP | JEQ | K, value, target, miss));
        }
        if tests.is_empty() {
            out.push(Jump(JMP | JEQ | K, 0, otherwise, otherwise));
        }
        out
    };
    let ethertypes = |offset: u32| -> Vec<(u32, Label)> {
        let mut t = Vec::new();
        if protocols.arp {
            t.push((u32::from(arp::ETHERTYPE_ARP), Accept));
        }
        if protocols.rarp {
            t.push((u32::from(ETHERTYPE_RARP), Accept));
        }
        if protocols.ndp {
            t.push((u32::from(ETHERTYPE_IPV6), Ndp(offset)));
        }
        t
    };
    let mut program = vec![
        Op(LD | W | ABS, SKF_AD_OFF + SKF_AD_PKTTYPE),
        Jump(JMP | JEQ | K, libc::PACKET_OUTGOING as u32, Drop, Next),
        Op(LD | H | ABS, 12),
    ];
    let mut untagged = ethertypes(14);
    untagged.push((u32::from(ETHERTYPE_VLAN), Vlan));
    program.extend(chain(&untagged, Drop));
    program.push(Mark(Vlan));
    program.push(Op(LD | H | ABS, 16));
    program.extend(chain(&ethertypes(18), Drop));
    if protocols.ndp {
        for ip in [14u32, 18] {
            program.push(Mark(Ndp(ip)));
            program.push(Op(LD | B | ABS, ip + 6));
            program.push(Jump(JMP | JEQ | K, u32::from(NEXT_ICMPV6), Next, Drop));
            program.push(Op(LD | B | ABS, ip + 40));
            let types = [TYPE_ROUTER_SOLICITATION, TYPE_NEIGHBOR_SOLICITATION, TYPE_NEIGHBOR_ADVERTISEMENT];
            program.extend(chain(&types.map(|t| (u32::from(t), Accept)), Drop));
        }
    }
    program.extend([Mark(Drop), Op(RET | K, 0), Mark(Accept), Op(RET | K, ACCEPT)]);
    crate::bpf::assemble(&program, Next)
}

/// Sends frames on one interface; needs no runtime (tools, tests, the lab's hypervisor).
pub struct FrameSender {
    sock: PacketSocket,
}

impl FrameSender {
    /// Opens a send-only socket on `ifname` in the calling thread's network namespace.
    pub fn open(ifname: &str) -> Result<Self, CaptureError> {
        Ok(FrameSender { sock: PacketSocket::open(ifname, None)? })
    }

    /// MAC address of the interface.
    pub fn mac(&self) -> MacAddr {
        self.sock.mac
    }

    /// Sends an ARP message.
    pub fn send_arp(&self, msg: &ArpMessage) -> io::Result<()> {
        self.sock.send(&arp::build_frame(msg))
    }

    /// Sends a RARP message (e.g. [`rarp::announce`], as QEMU's `announce-self` does).
    pub fn send_rarp(&self, msg: &RarpMessage) -> io::Result<()> {
        self.sock.send(&rarp::build_frame(msg))
    }

    /// Sends an NDP message.
    pub fn send_ndp(&self, msg: &NdpMessage) -> io::Result<()> {
        self.sock.send(&ndp::build_frame(msg))
    }

    /// Sends raw bytes as a frame.
    pub fn send_raw(&self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame)
    }
}

/// Captures ARP, RARP and/or NDP on one interface (and sends on it).
pub struct NeighCapture {
    fd: AsyncFd<OwnedFd>,
    sender: FrameSender,
    ifname: String,
    protocols: Protocols,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for NeighCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeighCapture")
            .field("ifname", &self.ifname)
            .field("protocols", &self.protocols)
            .finish_non_exhaustive()
    }
}

impl NeighCapture {
    /// Opens a capture of `protocols` on `ifname` in the calling thread's network namespace. Must
    /// be called inside a tokio runtime (the socket is registered with its reactor).
    pub fn open(ifname: &str, protocols: Protocols) -> Result<Self, CaptureError> {
        let program = filter(protocols);
        let sock = PacketSocket::open(ifname, Some(&program))?;
        let sender = FrameSender::open(ifname)?;
        let fd = crate::aio::register(sock.fd).map_err(|source| CaptureError::Sys {
            what: "register with tokio",
            ifname: ifname.to_owned(),
            source,
        })?;
        Ok(NeighCapture { fd, sender, ifname: ifname.to_owned(), protocols, stats: Arc::default() })
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// What it captures.
    pub fn protocols(&self) -> Protocols {
        self.protocols
    }

    /// MAC address of the interface (the source of proxy ARP / proxy NDP answers).
    pub fn mac(&self) -> MacAddr {
        self.sender.mac()
    }

    /// Sends an ARP message on the interface (e.g. `arp::reply_to(&request, capture.mac())`).
    pub fn send_arp(&self, msg: &ArpMessage) -> io::Result<()> {
        self.sender.send_arp(msg)
    }

    /// Sends an NDP message on the interface: a NUD probe ([`ndp::probe`]), a proxy answer
    /// ([`ndp::advertise_to`]), an unsolicited advertisement ([`ndp::unsolicited_advertisement`])
    /// or a router advertisement ([`ndp::router_advertisement`]).
    pub fn send_ndp(&self, msg: &NdpMessage) -> io::Result<()> {
        self.sender.send_ndp(msg)
    }

    /// Sends raw bytes as a frame.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        self.sender.send_raw(frame)
    }

    /// Parses one frame that passed the filter, counting what does not parse.
    fn parse(&self, frame: &[u8]) -> Option<Frame> {
        let stats = &self.stats;
        let header = match eth::parse(frame) {
            Ok(h) => h,
            Err(e) => {
                stats.ethernet.count(match e {
                    EthError::TooShort { .. } => "too_short",
                    EthError::StackedVlan => "stacked_vlan",
                });
                return None;
            }
        };
        let parsed = match header.ethertype {
            arp::ETHERTYPE_ARP if self.protocols.arp => {
                arp::parse_frame(frame).map(Frame::Arp).map_err(|e| stats.arp.count(e.reason()))
            }
            ETHERTYPE_RARP if self.protocols.rarp => {
                rarp::parse_frame(frame).map(Frame::Rarp).map_err(|e| stats.rarp.count(e.reason()))
            }
            ETHERTYPE_IPV6 if self.protocols.ndp => {
                ndp::parse_frame(frame).map(Frame::Ndp).map_err(|e| stats.ndp.count(e.reason()))
            }
            _ => {
                stats.ethernet.count("other_ethertype");
                Err(())
            }
        };
        let frame = parsed.ok()?;
        let index = PROTOCOLS.iter().position(|p| *p == frame.protocol()).expect("every protocol is listed");
        stats.parsed[index].fetch_add(1, Relaxed);
        Some(frame)
    }

    /// The next valid frame; malformed frames are counted and skipped. Cancel-safe.
    pub async fn recv(&self) -> io::Result<Captured> {
        let mut buf = [0u8; 2048];
        loop {
            let mut guard = self.fd.readable().await?;
            let (len, wall) = match guard.try_io(|fd| psock::recv_timestamped(fd.as_raw_fd(), &mut buf)) {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            self.stats.frames.fetch_add(1, Relaxed);
            match self.parse(&buf[..len]) {
                Some(frame) => return Ok(Captured { frame, mono_ns: psock::wall_to_monotonic(wall), wall }),
                None => tracing::debug!(ifname = %self.ifname, "malformed frame on a VM port"),
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> NeighStats {
        match psock::packet_statistics(self.fd.get_ref().as_raw_fd()) {
            Ok(kernel) => {
                self.stats.kernel_dropped.fetch_add(u64::from(kernel.tp_drops), Relaxed);
            }
            Err(e) => tracing::debug!(ifname = %self.ifname, error = %e, "PACKET_STATISTICS"),
        }
        let s = &self.stats;
        NeighStats {
            frames: s.frames.load(Relaxed),
            parsed: PROTOCOLS.iter().zip(&s.parsed).map(|(p, n)| (*p, n.load(Relaxed))).collect(),
            malformed: [&s.ethernet, &s.arp, &s.rarp, &s.ndp].into_iter().flat_map(Reasons::snapshot).collect(),
            kernel_dropped: s.kernel_dropped.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::bpf::run;
    use crate::packet::{icmp6, ipv6};

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x11]);
    const VM6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);
    const GW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1);

    fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
        let mut f = frame[..12].to_vec();
        f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
        f.extend_from_slice(&frame[12..]);
        f
    }

    /// An ICMPv6 frame of `icmp_type` (not NDP-valid: the filter looks at the type only).
    fn icmp6_frame(icmp_type: u8) -> Vec<u8> {
        let icmp = icmp6::echo(&VM6, &GW6, icmp_type, 1, 1, &[0; 16]);
        let mut f = Vec::new();
        eth::write_header(&mut f, MacAddr::BROADCAST, MAC, None, ETHERTYPE_IPV6);
        f.extend_from_slice(&ipv6::build_packet(VM6, GW6, NEXT_ICMPV6, 255, 0, &icmp));
        f
    }

    fn frames() -> Vec<(&'static str, Vec<u8>)> {
        let garp = arp::build_frame(&arp::gratuitous(MAC, [10, 10, 0, 11].into(), arp::ArpOp::Request, None));
        let rarp = rarp::build_frame(&rarp::announce(MAC));
        let ns = ndp::build_frame(&ndp::solicitation(MAC, VM6, GW6, None));
        let dad = ndp::build_frame(&ndp::dad(MAC, VM6, None));
        let na = ndp::build_frame(&ndp::unsolicited_advertisement(MAC, VM6, false, None));
        let mut ipv4 = garp.clone();
        ipv4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut udp6 = icmp6_frame(128);
        udp6[14 + 6] = 17;
        vec![
            ("arp", garp),
            ("rarp", rarp),
            ("ndp", ns),
            ("ndp", dad),
            ("ndp", na),
            ("ndp", icmp6_frame(133)),
            ("none", icmp6_frame(134)),
            ("none", icmp6_frame(128)),
            ("none", icmp6_frame(143)),
            ("none", udp6),
            ("none", ipv4),
        ]
    }

    #[test]
    fn filter_passes_exactly_the_protocols_asked_for() {
        let sets = [
            Protocols::ARP,
            Protocols::ALL,
            Protocols { arp: false, rarp: true, ndp: false },
            Protocols { arp: false, rarp: false, ndp: true },
            Protocols { arp: true, rarp: false, ndp: true },
        ];
        for protocols in sets {
            let prog = filter(protocols);
            for (kind, frame) in frames() {
                let wanted = match kind {
                    "arp" => protocols.arp,
                    "rarp" => protocols.rarp,
                    "ndp" => protocols.ndp,
                    _ => false,
                };
                for f in [frame.clone(), tagged(&frame, 42)] {
                    let got = run(&prog, &f, libc::PACKET_HOST as u32) > 0;
                    assert_eq!(got, wanted, "{protocols:?} {kind} {f:02x?}");
                    let multicast = run(&prog, &f, libc::PACKET_MULTICAST as u32) > 0;
                    assert_eq!(multicast, wanted, "multicast {protocols:?} {kind}");
                    assert_eq!(run(&prog, &f, libc::PACKET_OUTGOING as u32), 0, "never our own frames");
                }
                // Short frames never pass (a load beyond the end drops).
                assert_eq!(run(&prog, &frame[..13], 0), 0);
            }
            // Stacked tags are not followed.
            let double = tagged(&tagged(&frames()[0].1, 1), 2);
            assert_eq!(run(&prog, &double, 0), 0);
        }
    }

    #[test]
    fn rate_limit_keys() {
        let a = arp::gratuitous(MAC, [10, 10, 0, 11].into(), arp::ArpOp::Request, None);
        assert_eq!(Frame::Arp(a).source(), (MAC, IpAddr::from([10, 10, 0, 11])));
        assert_eq!(Frame::Rarp(rarp::announce(MAC)).source(), (MAC, IpAddr::from([0, 0, 0, 0])));
        let n = ndp::dad(MAC, VM6, None);
        assert_eq!(Frame::Ndp(n).source(), (MAC, IpAddr::V6(Ipv6Addr::UNSPECIFIED)));
        assert_eq!(Frame::Ndp(n).protocol().as_str(), "ndp");
    }
}
