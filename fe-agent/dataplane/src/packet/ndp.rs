//! Ethernet + IPv6 Neighbor Discovery (RFC 4861) frames: a strict parser into a typed message
//! ([`NdpMessage`]) and builders for what an FE sends on a VM port — Neighbor Solicitations
//! (NUD probes to a VM), Neighbor Advertisements (proxy NDP for the gateway and for mobile IPs
//! bound elsewhere; unsolicited announcements) and Router Advertisements (so a SLAAC guest gets
//! its default route from whichever FE it sits behind).
//!
//! The parser applies RFC 4861's validity checks (§6.1.1, §6.1.2, §7.1.1, §7.1.2): hop limit
//! 255, valid ICMPv6 checksum, code 0, message length, target not multicast, no zero-length
//! option, a DAD solicitation (source `::`) only to a solicited-node group and without a source
//! link-layer option, a solicited advertisement never to a group, a router advertisement only from
//! a link-local source. Extension headers before the ICMPv6 header are skipped; a fragmented
//! message is refused. Every refusal has a counter label ([`NdpError::REASONS`]). Options other
//! than the link-layer addresses, MTU and prefix information (e.g. the DAD nonce, RFC 7527) are
//! skipped; a router advertisement keeps its first prefix option.
//!
//! What a message means to an FE is [`NdpMessage::kind`] and, for learning,
//! [`NdpMessage::claim`]: the routable address the sender says is its own, with its MAC —
//! never a link-local address.

use std::net::Ipv6Addr;

use super::eth::{self, ETHERTYPE_IPV6, EthError, MacAddr, mac_at};
use super::icmp6::{
    self, TYPE_NEIGHBOR_ADVERTISEMENT, TYPE_NEIGHBOR_SOLICITATION, TYPE_ROUTER_ADVERTISEMENT, TYPE_ROUTER_SOLICITATION,
};
use super::ipv6::{self, Ipv6Error, NEXT_ICMPV6};

/// The hop limit of every NDP message (a message with another one came from off-link).
pub const HOP_LIMIT: u8 = 255;
/// All-nodes link-local multicast group.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// All-routers link-local multicast group.
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

const OPT_SOURCE_LL: u8 = 1;
const OPT_TARGET_LL: u8 = 2;
const OPT_PREFIX: u8 = 3;
const OPT_MTU: u8 = 5;
const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
const RA_MANAGED: u8 = 0x80;
const RA_OTHER: u8 = 0x40;
const PREFIX_ON_LINK: u8 = 0x80;
const PREFIX_AUTONOMOUS: u8 = 0x40;

/// The solicited-node multicast group of `addr` (ff02::1:ffXX:XXXX).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]))
}

/// The Ethernet address of the IPv6 multicast group `group` (33:33 + its last 32 bits).
pub fn multicast_mac(group: Ipv6Addr) -> MacAddr {
    let o = group.octets();
    MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// Flags of a Neighbor Advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NaFlags {
    /// R: the sender is a router.
    pub router: bool,
    /// S: sent in response to a solicitation.
    pub solicited: bool,
    /// O: override an existing cache entry (set in unsolicited announcements).
    pub override_: bool,
}

/// A Prefix Information option (RFC 4861 §4.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixInfo {
    /// The prefix (bits beyond `len` are sent as they are).
    pub prefix: Ipv6Addr,
    /// Prefix length.
    pub len: u8,
    /// L: on-link.
    pub on_link: bool,
    /// A: usable for stateless address autoconfiguration.
    pub autonomous: bool,
    /// Valid lifetime, seconds.
    pub valid_s: u32,
    /// Preferred lifetime, seconds.
    pub preferred_s: u32,
}

/// The body of a Router Advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RouterAdvert {
    /// Hop limit hosts should use (0: unspecified).
    pub cur_hop_limit: u8,
    /// M: addresses by DHCPv6.
    pub managed: bool,
    /// O: other configuration by DHCPv6.
    pub other: bool,
    /// Router lifetime, seconds (0: not a default router).
    pub lifetime_s: u16,
    /// Reachable time, ms (0: unspecified).
    pub reachable_ms: u32,
    /// Retransmission timer, ms (0: unspecified).
    pub retrans_ms: u32,
    /// Source link-layer address option.
    pub source_ll: Option<MacAddr>,
    /// MTU option.
    pub mtu: Option<u32>,
    /// The (first) Prefix Information option.
    pub prefix: Option<PrefixInfo>,
}

/// An NDP message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ndp {
    /// Type 133.
    RouterSolicitation {
        /// Source link-layer address option.
        source_ll: Option<MacAddr>,
    },
    /// Type 134.
    RouterAdvertisement(RouterAdvert),
    /// Type 135.
    NeighborSolicitation {
        /// The address being resolved, verified or (DAD) claimed.
        target: Ipv6Addr,
        /// Source link-layer address option.
        source_ll: Option<MacAddr>,
    },
    /// Type 136.
    NeighborAdvertisement {
        /// The address advertised.
        target: Ipv6Addr,
        /// R, S, O.
        flags: NaFlags,
        /// Target link-layer address option.
        target_ll: Option<MacAddr>,
    },
}

/// A parsed Ethernet/IPv6/ICMPv6 NDP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NdpMessage {
    /// Ethernet destination.
    pub eth_dst: MacAddr,
    /// Ethernet source.
    pub eth_src: MacAddr,
    /// 802.1Q VLAN id, if the frame carried one tag.
    pub vlan: Option<u16>,
    /// IPv6 source.
    pub ip_src: Ipv6Addr,
    /// IPv6 destination.
    pub ip_dst: Ipv6Addr,
    /// The message.
    pub body: Ndp,
}

/// What an NDP message means to an FE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NdpKind {
    /// Duplicate address detection: a solicitation from `::` for the address the sender is about
    /// to use — the sender claims the target.
    Dad,
    /// "Who has target?" from a host with an address (resolution or NUD).
    Solicitation,
    /// An advertisement answering a solicitation (S set): e.g. a VM answering a NUD probe.
    SolicitedAdvertisement,
    /// An unsolicited advertisement (S clear), what a host or hypervisor sends after a move.
    UnsolicitedAdvertisement,
    /// A router solicitation.
    RouterSolicitation,
    /// A router advertisement (a VM must not send one; never learned from).
    RouterAdvertisement,
}

impl NdpMessage {
    /// Classifies the message.
    pub fn kind(&self) -> NdpKind {
        match self.body {
            Ndp::NeighborSolicitation { .. } if self.ip_src.is_unspecified() => NdpKind::Dad,
            Ndp::NeighborSolicitation { .. } => NdpKind::Solicitation,
            Ndp::NeighborAdvertisement { flags, .. } if flags.solicited => NdpKind::SolicitedAdvertisement,
            Ndp::NeighborAdvertisement { .. } => NdpKind::UnsolicitedAdvertisement,
            Ndp::RouterSolicitation { .. } => NdpKind::RouterSolicitation,
            Ndp::RouterAdvertisement(_) => NdpKind::RouterAdvertisement,
        }
    }

    /// The target of a solicitation or advertisement.
    pub fn target(&self) -> Option<Ipv6Addr> {
        match self.body {
            Ndp::NeighborSolicitation { target, .. } | Ndp::NeighborAdvertisement { target, .. } => Some(target),
            _ => None,
        }
    }

    /// The routable address the sender says it owns, and its MAC: a DAD target, an advertised
    /// target, or the source of an ordinary solicitation; the MAC from the link-layer option, else
    /// the Ethernet source. `None` for router messages, for link-local, multicast, unspecified,
    /// loopback or IPv4-mapped addresses (never bound) and for a group MAC in the option.
    pub fn claim(&self) -> Option<(Ipv6Addr, MacAddr)> {
        let (addr, ll) = match self.body {
            Ndp::NeighborSolicitation { target, .. } if self.ip_src.is_unspecified() => (target, None),
            Ndp::NeighborSolicitation { source_ll, .. } => (self.ip_src, source_ll),
            Ndp::NeighborAdvertisement { target, target_ll, .. } => (target, target_ll),
            Ndp::RouterSolicitation { .. } | Ndp::RouterAdvertisement(_) => return None,
        };
        let mac = ll.unwrap_or(self.eth_src);
        (ipv6::is_routable_unicast(&addr) && !mac.is_multicast()).then_some((addr, mac))
    }
}

/// Why a frame is not a valid NDP message. [`NdpError::reason`] gives a stable label for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NdpError {
    /// Shorter than its Ethernet header.
    #[error("frame of {len} bytes is too short for its Ethernet header ({needed})")]
    TooShort {
        /// Frame length.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// Two or more VLAN tags.
    #[error("stacked VLAN tags (QinQ) are not supported")]
    StackedVlan,
    /// The EtherType is not IPv6.
    #[error("EtherType {0:#06x} is not IPv6 (0x86dd)")]
    NotIpv6(u16),
    /// The IPv6 header (or its extension headers) is invalid.
    #[error("IPv6: {0}")]
    Ipv6(Ipv6Error),
    /// The upper layer is not ICMPv6.
    #[error("next header {0} is not ICMPv6 (58)")]
    NotIcmpv6(u8),
    /// The message is fragmented.
    #[error("NDP message is fragmented")]
    Fragmented,
    /// The hop limit is not 255 (the message crossed a router).
    #[error("NDP hop limit {0} is not 255")]
    HopLimit(u8),
    /// The ICMPv6 checksum does not verify.
    #[error("ICMPv6 checksum is wrong")]
    Checksum,
    /// The ICMPv6 code is not 0.
    #[error("ICMPv6 code {0} is not 0")]
    Code(u8),
    /// The ICMPv6 type is not an NDP message this parser knows (133–136).
    #[error("ICMPv6 type {0} is not a router/neighbor solicitation/advertisement")]
    NotNdp(u8),
    /// The message is shorter than its type's fixed part.
    #[error("ICMPv6 type {icmp_type} message of {len} bytes is too short")]
    MessageLength {
        /// ICMPv6 type.
        icmp_type: u8,
        /// ICMPv6 length.
        len: usize,
    },
    /// The target address is a multicast group.
    #[error("target {0} is a multicast address")]
    TargetMulticast(Ipv6Addr),
    /// An option has length 0 or runs beyond the message.
    #[error("option at offset {0} has an invalid length")]
    OptionLength(usize),
    /// A message from `::` that may not come from it, or goes where it may not: a solicitation
    /// not to a solicited-node group, or either solicitation with a source link-layer option.
    #[error("message from the unspecified address breaks RFC 4861's rules for it")]
    UnspecifiedSource,
    /// A solicited advertisement sent to a multicast group.
    #[error("solicited advertisement to multicast {0}")]
    SolicitedToMulticast(Ipv6Addr),
    /// A router advertisement from a source that is not link-local.
    #[error("router advertisement from non-link-local {0}")]
    RouterNotLinkLocal(Ipv6Addr),
    /// The Ethernet source is a group address.
    #[error("Ethernet source {0} is a multicast/broadcast address")]
    MulticastSender(MacAddr),
    /// The IPv6 source is a multicast group (RFC 4291 §2.7: never a source).
    #[error("IPv6 source {0} is a multicast address")]
    MulticastSource(Ipv6Addr),
}

impl NdpError {
    /// Every [`NdpError::reason`] label, in a fixed order (for counter arrays).
    pub const REASONS: [&'static str; 18] = [
        "too_short",
        "stacked_vlan",
        "not_ipv6",
        "ipv6_header",
        "not_icmpv6",
        "fragmented",
        "hop_limit",
        "checksum",
        "code",
        "not_ndp",
        "message_length",
        "target_multicast",
        "option_length",
        "unspecified_source",
        "solicited_to_multicast",
        "router_not_link_local",
        "multicast_sender",
        "multicast_source",
    ];

    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            NdpError::TooShort { .. } => "too_short",
            NdpError::StackedVlan => "stacked_vlan",
            NdpError::NotIpv6(_) => "not_ipv6",
            NdpError::Ipv6(_) => "ipv6_header",
            NdpError::NotIcmpv6(_) => "not_icmpv6",
            NdpError::Fragmented => "fragmented",
            NdpError::HopLimit(_) => "hop_limit",
            NdpError::Checksum => "checksum",
            NdpError::Code(_) => "code",
            NdpError::NotNdp(_) => "not_ndp",
            NdpError::MessageLength { .. } => "message_length",
            NdpError::TargetMulticast(_) => "target_multicast",
            NdpError::OptionLength(_) => "option_length",
            NdpError::UnspecifiedSource => "unspecified_source",
            NdpError::SolicitedToMulticast(_) => "solicited_to_multicast",
            NdpError::RouterNotLinkLocal(_) => "router_not_link_local",
            NdpError::MulticastSender(_) => "multicast_sender",
            NdpError::MulticastSource(_) => "multicast_source",
        }
    }

    /// Position of this error's label in [`NdpError::REASONS`].
    pub fn reason_index(&self) -> usize {
        Self::REASONS.iter().position(|r| *r == self.reason()).expect("every reason is listed")
    }
}

fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).expect("16 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The options of one message, as far as the FE cares.
#[derive(Default)]
struct Options {
    source_ll: Option<MacAddr>,
    target_ll: Option<MacAddr>,
    mtu: Option<u32>,
    prefix: Option<PrefixInfo>,
}

/// Walks the options in `opts` (which start at offset `base` of the ICMPv6 message).
fn parse_options(opts: &[u8], base: usize) -> Result<Options, NdpError> {
    let mut out = Options::default();
    let mut at = 0;
    while at < opts.len() {
        let len = usize::from(*opts.get(at + 1).ok_or(NdpError::OptionLength(base + at))?) * 8;
        if len == 0 || at + len > opts.len() {
            return Err(NdpError::OptionLength(base + at));
        }
        let opt = &opts[at..at + len];
        match (opt[0], len) {
            (OPT_SOURCE_LL, 8) => out.source_ll = out.source_ll.or(Some(mac_at(opt, 2))),
            (OPT_TARGET_LL, 8) => out.target_ll = out.target_ll.or(Some(mac_at(opt, 2))),
            (OPT_MTU, 8) => out.mtu = out.mtu.or(Some(be32(opt, 4))),
            (OPT_PREFIX, 32) if out.prefix.is_none() => {
                out.prefix = Some(PrefixInfo {
                    len: opt[2],
                    on_link: opt[3] & PREFIX_ON_LINK != 0,
                    autonomous: opt[3] & PREFIX_AUTONOMOUS != 0,
                    valid_s: be32(opt, 4),
                    preferred_s: be32(opt, 8),
                    prefix: addr_at(opt, 16),
                });
            }
            _ => {}
        }
        at += len;
    }
    Ok(out)
}

/// Parses an Ethernet frame (without FCS; trailing padding is ignored) as an NDP message.
pub fn parse_frame(frame: &[u8]) -> Result<NdpMessage, NdpError> {
    let eth = eth::parse(frame).map_err(|e| match e {
        EthError::TooShort { len, needed } => NdpError::TooShort { len, needed },
        EthError::StackedVlan => NdpError::StackedVlan,
    })?;
    if eth.ethertype != ETHERTYPE_IPV6 {
        return Err(NdpError::NotIpv6(eth.ethertype));
    }
    if eth.src.is_multicast() {
        return Err(NdpError::MulticastSender(eth.src));
    }
    let packet = &frame[eth.payload_at..];
    let ip = ipv6::parse(packet).map_err(NdpError::Ipv6)?;
    if ip.src.is_multicast() {
        return Err(NdpError::MulticastSource(ip.src));
    }
    let upper = ipv6::upper_layer(packet, &ip).map_err(NdpError::Ipv6)?;
    if upper.fragment {
        return Err(NdpError::Fragmented);
    }
    if upper.protocol != NEXT_ICMPV6 {
        return Err(NdpError::NotIcmpv6(upper.protocol));
    }
    if ip.hop_limit != HOP_LIMIT {
        return Err(NdpError::HopLimit(ip.hop_limit));
    }
    let icmp = &packet[upper.offset..ip.total_len()];
    if icmp.len() < icmp6::HEADER_LEN {
        return Err(NdpError::MessageLength { icmp_type: icmp.first().copied().unwrap_or(0), len: icmp.len() });
    }
    if !icmp6::checksum_ok(&ip.src, &ip.dst, icmp) {
        return Err(NdpError::Checksum);
    }
    let (icmp_type, code) = (icmp[0], icmp[1]);
    if code != 0 {
        return Err(NdpError::Code(code));
    }
    let fixed = match icmp_type {
        TYPE_ROUTER_SOLICITATION => 8,
        TYPE_ROUTER_ADVERTISEMENT => 16,
        TYPE_NEIGHBOR_SOLICITATION | TYPE_NEIGHBOR_ADVERTISEMENT => 24,
        other => return Err(NdpError::NotNdp(other)),
    };
    if icmp.len() < fixed {
        return Err(NdpError::MessageLength { icmp_type, len: icmp.len() });
    }
    let opts = parse_options(&icmp[fixed..], fixed)?;
    let unspecified = ip.src.is_unspecified();
    let body = match icmp_type {
        TYPE_ROUTER_SOLICITATION => {
            if unspecified && opts.source_ll.is_some() {
                return Err(NdpError::UnspecifiedSource);
            }
            Ndp::RouterSolicitation { source_ll: opts.source_ll }
        }
        TYPE_ROUTER_ADVERTISEMENT => {
            if !ip.src.is_unicast_link_local() {
                return Err(NdpError::RouterNotLinkLocal(ip.src));
            }
            Ndp::RouterAdvertisement(RouterAdvert {
                cur_hop_limit: icmp[4],
                managed: icmp[5] & RA_MANAGED != 0,
                other: icmp[5] & RA_OTHER != 0,
                lifetime_s: u16::from_be_bytes([icmp[6], icmp[7]]),
                reachable_ms: be32(icmp, 8),
                retrans_ms: be32(icmp, 12),
                source_ll: opts.source_ll,
                mtu: opts.mtu,
                prefix: opts.prefix,
            })
        }
        _ => {
            let target = addr_at(icmp, 8);
            if target.is_multicast() {
                return Err(NdpError::TargetMulticast(target));
            }
            if icmp_type == TYPE_NEIGHBOR_SOLICITATION {
                if unspecified && (ip.dst != solicited_node(target) || opts.source_ll.is_some()) {
                    return Err(NdpError::UnspecifiedSource);
                }
                Ndp::NeighborSolicitation { target, source_ll: opts.source_ll }
            } else {
                let flags = NaFlags {
                    router: icmp[4] & NA_ROUTER != 0,
                    solicited: icmp[4] & NA_SOLICITED != 0,
                    override_: icmp[4] & NA_OVERRIDE != 0,
                };
                if flags.solicited && ip.dst.is_multicast() {
                    return Err(NdpError::SolicitedToMulticast(ip.dst));
                }
                Ndp::NeighborAdvertisement { target, flags, target_ll: opts.target_ll }
            }
        }
    };
    Ok(NdpMessage { eth_dst: eth.dst, eth_src: eth.src, vlan: eth.vlan, ip_src: ip.src, ip_dst: ip.dst, body })
}

fn push_ll_option(out: &mut Vec<u8>, kind: u8, mac: Option<MacAddr>) {
    if let Some(mac) = mac {
        out.extend_from_slice(&[kind, 1]);
        out.extend_from_slice(&mac.0);
    }
}

/// The ICMPv6 message of `body` (checksum field zero).
fn icmp_message(body: &Ndp) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    match *body {
        Ndp::RouterSolicitation { source_ll } => {
            m.extend_from_slice(&[TYPE_ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0]);
            push_ll_option(&mut m, OPT_SOURCE_LL, source_ll);
        }
        Ndp::RouterAdvertisement(ra) => {
            let flags = if ra.managed { RA_MANAGED } else { 0 } | if ra.other { RA_OTHER } else { 0 };
            m.extend_from_slice(&[TYPE_ROUTER_ADVERTISEMENT, 0, 0, 0, ra.cur_hop_limit, flags]);
            m.extend_from_slice(&ra.lifetime_s.to_be_bytes());
            m.extend_from_slice(&ra.reachable_ms.to_be_bytes());
            m.extend_from_slice(&ra.retrans_ms.to_be_bytes());
            push_ll_option(&mut m, OPT_SOURCE_LL, ra.source_ll);
            if let Some(mtu) = ra.mtu {
                m.extend_from_slice(&[OPT_MTU, 1, 0, 0]);
                m.extend_from_slice(&mtu.to_be_bytes());
            }
            if let Some(p) = ra.prefix {
                let flags =
                    if p.on_link { PREFIX_ON_LINK } else { 0 } | if p.autonomous { PREFIX_AUTONOMOUS } else { 0 };
                m.extend_from_slice(&[OPT_PREFIX, 4, p.len, flags]);
                m.extend_from_slice(&p.valid_s.to_be_bytes());
                m.extend_from_slice(&p.preferred_s.to_be_bytes());
                m.extend_from_slice(&[0; 4]);
                m.extend_from_slice(&p.prefix.octets());
            }
        }
        Ndp::NeighborSolicitation { target, source_ll } => {
            m.extend_from_slice(&[TYPE_NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0]);
            m.extend_from_slice(&target.octets());
            push_ll_option(&mut m, OPT_SOURCE_LL, source_ll);
        }
        Ndp::NeighborAdvertisement { target, flags, target_ll } => {
            let f = if flags.router { NA_ROUTER } else { 0 }
                | if flags.solicited { NA_SOLICITED } else { 0 }
                | if flags.override_ { NA_OVERRIDE } else { 0 };
            m.extend_from_slice(&[TYPE_NEIGHBOR_ADVERTISEMENT, 0, 0, 0, f, 0, 0, 0]);
            m.extend_from_slice(&target.octets());
            push_ll_option(&mut m, OPT_TARGET_LL, target_ll);
        }
    }
    m
}

/// Appends `msg` as an Ethernet frame (tagged if `msg.vlan` is set; IPv6 hop limit 255, ICMPv6
/// checksum computed) to `out`.
pub fn write_frame(msg: &NdpMessage, out: &mut Vec<u8>) {
    let mut icmp = icmp_message(&msg.body);
    icmp6::set_checksum(&msg.ip_src, &msg.ip_dst, &mut icmp);
    eth::write_header(out, msg.eth_dst, msg.eth_src, msg.vlan, ETHERTYPE_IPV6);
    let at = out.len();
    out.resize(at + ipv6::HEADER_LEN, 0);
    ipv6::write_header(&mut out[at..], msg.ip_src, msg.ip_dst, NEXT_ICMPV6, HOP_LIMIT, 0, icmp.len() as u16);
    out.extend_from_slice(&icmp);
}

/// `msg` as an Ethernet frame (see [`write_frame`]).
pub fn build_frame(msg: &NdpMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    write_frame(msg, &mut out);
    out
}

/// A multicast solicitation resolving `target` (to its solicited-node group), from `src_ip` at
/// `src_mac`.
pub fn solicitation(src_mac: MacAddr, src_ip: Ipv6Addr, target: Ipv6Addr, vlan: Option<u16>) -> NdpMessage {
    let group = solicited_node(target);
    NdpMessage {
        eth_dst: multicast_mac(group),
        eth_src: src_mac,
        vlan,
        ip_src: src_ip,
        ip_dst: group,
        body: Ndp::NeighborSolicitation { target, source_ll: Some(src_mac) },
    }
}

/// A unicast NUD probe (RFC 4861 §7.3.3): "are you still at `neighbor_mac`, `target`?", from
/// `src_ip` at `src_mac`. The neighbour answers with a solicited advertisement.
pub fn probe(
    src_mac: MacAddr,
    src_ip: Ipv6Addr,
    neighbor_mac: MacAddr,
    target: Ipv6Addr,
    vlan: Option<u16>,
) -> NdpMessage {
    NdpMessage {
        eth_dst: neighbor_mac,
        eth_src: src_mac,
        vlan,
        ip_src: src_ip,
        ip_dst: target,
        body: Ndp::NeighborSolicitation { target, source_ll: Some(src_mac) },
    }
}

/// A duplicate address detection probe for `target` from `mac` (what a host sends before using
/// an address; to an FE, a claim).
pub fn dad(mac: MacAddr, target: Ipv6Addr, vlan: Option<u16>) -> NdpMessage {
    let group = solicited_node(target);
    NdpMessage {
        eth_dst: multicast_mac(group),
        eth_src: mac,
        vlan,
        ip_src: Ipv6Addr::UNSPECIFIED,
        ip_dst: group,
        body: Ndp::NeighborSolicitation { target, source_ll: None },
    }
}

/// The advertisement answering the solicitation `ns` on behalf of `answer_mac` (proxy NDP):
/// "ns.target is at answer_mac", from the target address, unicast back to the solicitor on the
/// solicitation's VLAN with S set. `None` when `ns` is not a neighbor solicitation.
///
/// A DAD probe (source `::`) is answered to all-nodes with S clear — which tells the prober its
/// address is taken: an FE must never do that for an address a VM is claiming.
pub fn advertise_to(ns: &NdpMessage, answer_mac: MacAddr, router: bool, override_: bool) -> Option<NdpMessage> {
    let Ndp::NeighborSolicitation { target, source_ll } = ns.body else { return None };
    let dad = ns.ip_src.is_unspecified();
    let (eth_dst, ip_dst) =
        if dad { (multicast_mac(ALL_NODES), ALL_NODES) } else { (source_ll.unwrap_or(ns.eth_src), ns.ip_src) };
    Some(NdpMessage {
        eth_dst,
        eth_src: answer_mac,
        vlan: ns.vlan,
        ip_src: target,
        ip_dst,
        body: Ndp::NeighborAdvertisement {
            target,
            flags: NaFlags { router, solicited: !dad, override_ },
            target_ll: Some(answer_mac),
        },
    })
}

/// An unsolicited advertisement to all-nodes announcing `addr` at `mac` with the override flag
/// (what a host sends after a move, and what an FE sends to announce the gateway).
pub fn unsolicited_advertisement(mac: MacAddr, addr: Ipv6Addr, router: bool, vlan: Option<u16>) -> NdpMessage {
    NdpMessage {
        eth_dst: multicast_mac(ALL_NODES),
        eth_src: mac,
        vlan,
        ip_src: addr,
        ip_dst: ALL_NODES,
        body: Ndp::NeighborAdvertisement {
            target: addr,
            flags: NaFlags { router, solicited: false, override_: true },
            target_ll: Some(mac),
        },
    }
}

/// A router advertisement from the link-local `src_ll` at `src_mac`, to `dst` (a solicitor's
/// MAC and address) or to all-nodes. `ra.source_ll` is set to `src_mac` when empty.
pub fn router_advertisement(
    src_mac: MacAddr,
    src_ll: Ipv6Addr,
    dst: Option<(MacAddr, Ipv6Addr)>,
    mut ra: RouterAdvert,
    vlan: Option<u16>,
) -> NdpMessage {
    ra.source_ll = ra.source_ll.or(Some(src_mac));
    let (eth_dst, ip_dst) = dst.unwrap_or((multicast_mac(ALL_NODES), ALL_NODES));
    NdpMessage { eth_dst, eth_src: src_mac, vlan, ip_src: src_ll, ip_dst, body: Ndp::RouterAdvertisement(ra) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VM_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x11]);
    const FE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xfe, 0x02]);
    const VM: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);
    const GW: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1);
    const FE_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

    fn roundtrip(msg: &NdpMessage) -> NdpMessage {
        let frame = build_frame(msg);
        let parsed = parse_frame(&frame).unwrap_or_else(|e| panic!("{e}: {frame:02x?}"));
        assert_eq!(&parsed, msg);
        parsed
    }

    #[test]
    fn solicitations_roundtrip_and_classify() {
        let ns = roundtrip(&solicitation(VM_MAC, VM, GW, None));
        assert_eq!(ns.kind(), NdpKind::Solicitation);
        assert_eq!(ns.ip_dst, "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ns.eth_dst, MacAddr([0x33, 0x33, 0xff, 0, 0, 1]));
        assert_eq!(ns.claim(), Some((VM, VM_MAC)), "the solicitor's own address");

        let d = roundtrip(&dad(VM_MAC, VM, Some(7)));
        assert_eq!(d.kind(), NdpKind::Dad);
        assert_eq!(d.claim(), Some((VM, VM_MAC)), "DAD claims the target");

        let p = roundtrip(&probe(FE_MAC, GW, VM_MAC, VM, None));
        assert_eq!((p.eth_dst, p.ip_dst, p.kind()), (VM_MAC, VM, NdpKind::Solicitation));
    }

    #[test]
    fn advertisements_roundtrip_and_classify() {
        let ns = solicitation(VM_MAC, VM, GW, Some(3));
        let na = roundtrip(&advertise_to(&ns, FE_MAC, true, true).unwrap());
        assert_eq!(na.kind(), NdpKind::SolicitedAdvertisement);
        assert_eq!((na.eth_dst, na.ip_dst, na.ip_src, na.vlan), (VM_MAC, VM, GW, Some(3)));
        assert_eq!(na.target(), Some(GW));
        assert_eq!(na.claim(), Some((GW, FE_MAC)));

        let un = roundtrip(&unsolicited_advertisement(VM_MAC, VM, false, None));
        assert_eq!(un.kind(), NdpKind::UnsolicitedAdvertisement);
        assert!(matches!(
            un.body,
            Ndp::NeighborAdvertisement { flags: NaFlags { override_: true, solicited: false, .. }, .. }
        ));
        assert_eq!((un.ip_dst, un.eth_dst), (ALL_NODES, MacAddr([0x33, 0x33, 0, 0, 0, 1])));
        assert_eq!(un.claim(), Some((VM, VM_MAC)));

        // Answering a DAD probe goes to all-nodes without S (the defence an FE must not make).
        let defend = roundtrip(&advertise_to(&dad(VM_MAC, VM, None), FE_MAC, false, false).unwrap());
        assert_eq!((defend.ip_dst, defend.kind()), (ALL_NODES, NdpKind::UnsolicitedAdvertisement));
        assert_eq!(advertise_to(&defend, FE_MAC, false, false), None);
    }

    #[test]
    fn link_local_addresses_are_never_claimed() {
        let ns = solicitation(VM_MAC, "fe80::11".parse().unwrap(), GW, None);
        assert_eq!(ns.claim(), None);
        let na = unsolicited_advertisement(VM_MAC, "fe80::11".parse().unwrap(), false, None);
        assert_eq!(na.claim(), None);
        let rs = NdpMessage {
            eth_dst: multicast_mac(ALL_ROUTERS),
            eth_src: VM_MAC,
            vlan: None,
            ip_src: VM,
            ip_dst: ALL_ROUTERS,
            body: Ndp::RouterSolicitation { source_ll: Some(VM_MAC) },
        };
        let rs = roundtrip(&rs);
        assert_eq!((rs.kind(), rs.claim()), (NdpKind::RouterSolicitation, None));
    }

    #[test]
    fn router_advertisement_roundtrips() {
        let ra = RouterAdvert {
            cur_hop_limit: 64,
            managed: false,
            other: true,
            lifetime_s: 1800,
            reachable_ms: 30_000,
            retrans_ms: 1000,
            source_ll: None,
            mtu: Some(1480),
            prefix: Some(PrefixInfo {
                prefix: "2001:db8:10::".parse().unwrap(),
                len: 64,
                on_link: false,
                autonomous: true,
                valid_s: 86_400,
                preferred_s: 14_400,
            }),
        };
        let msg = roundtrip(&router_advertisement(FE_MAC, FE_LL, None, ra, None));
        let Ndp::RouterAdvertisement(got) = msg.body else { panic!("not an RA") };
        assert_eq!(got.source_ll, Some(FE_MAC));
        assert_eq!(got.prefix.unwrap().len, 64);
        // etherparse agrees on the ICMPv6 type and checksum.
        let frame = build_frame(&msg);
        let sliced = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = sliced.transport else { panic!("no ICMPv6") };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv6Type::RouterAdvertisement(etherparse::icmpv6::RouterAdvertisementHeader {
                cur_hop_limit: 64,
                managed_address_config: false,
                other_config: true,
                router_lifetime: 1800,
            })
        );
        assert!(icmp.is_checksum_valid(FE_LL.octets(), ALL_NODES.octets()));
        // From a global address it is refused.
        let bad = router_advertisement(FE_MAC, GW, None, ra, None);
        assert_eq!(parse_frame(&build_frame(&bad)), Err(NdpError::RouterNotLinkLocal(GW)));
    }

    /// The frame with its ICMPv6 checksum recomputed after an edit (at `icmp_at`).
    fn fix(mut frame: Vec<u8>, icmp_at: usize) -> Vec<u8> {
        let (src, dst) = (addr_at(&frame, 22), addr_at(&frame, 38));
        icmp6::set_checksum(&src, &dst, &mut frame[icmp_at..]);
        frame
    }

    #[test]
    fn malformed_frames_say_why() {
        let good = build_frame(&solicitation(VM_MAC, VM, GW, None));
        let icmp = 14 + 40;
        let patch = |at: usize, bytes: &[u8]| {
            let mut f = good.clone();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            f
        };
        let dad_frame = build_frame(&dad(VM_MAC, VM, None));
        let mut dad_to_gw = dad_frame.clone();
        dad_to_gw[14 + 24..14 + 40].copy_from_slice(&GW.octets());
        let mut dad_with_sll = build_frame(&solicitation(VM_MAC, VM, VM, None));
        dad_with_sll[14 + 8..14 + 24].fill(0);
        let sol_na = build_frame(&advertise_to(&solicitation(VM_MAC, VM, GW, None), FE_MAC, false, true).unwrap());
        let mut sol_na_mcast = sol_na.clone();
        sol_na_mcast[14 + 24..14 + 40].copy_from_slice(&ALL_NODES.octets());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "too_short"),
            (patch(12, &[0x88, 0xa8]), "stacked_vlan"),
            (patch(12, &[0x08, 0x00]), "not_ipv6"),
            (patch(6, &[0x01]), "multicast_sender"),
            (fix(patch(14 + 8, &[0xff]), icmp), "multicast_source"),
            (good[..14 + 50].to_vec(), "ipv6_header"),
            (patch(14 + 6, &[17]), "not_icmpv6"),
            (patch(14 + 7, &[64]), "hop_limit"),
            (patch(icmp + 10, &[0xee]), "checksum"),
            (fix(patch(icmp + 1, &[1]), icmp), "code"),
            (fix(patch(icmp, &[137]), icmp), "not_ndp"),
            (fix(patch(icmp + 8, &[0xff]), icmp), "target_multicast"),
            (fix(patch(icmp + 25, &[0]), icmp), "option_length"),
            (fix(patch(icmp + 25, &[2]), icmp), "option_length"),
            (fix(dad_to_gw, icmp), "unspecified_source"),
            (fix(dad_with_sll, icmp), "unspecified_source"),
            (fix(sol_na_mcast, icmp), "solicited_to_multicast"),
        ];
        for (frame, reason) in cases {
            let err = parse_frame(&frame).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
            assert_eq!(NdpError::REASONS[err.reason_index()], reason);
        }
        // A message shorter than its type's fixed part.
        let mut short = good[..icmp + 16].to_vec();
        short[14 + 4..14 + 6].copy_from_slice(&16u16.to_be_bytes());
        assert_eq!(parse_frame(&fix(short, icmp)).unwrap_err().reason(), "message_length");
        // A fragment header in front of the ICMPv6 message.
        let mut frag = good[..14 + 40].to_vec();
        frag[14 + 6] = ipv6::NEXT_FRAGMENT;
        frag[14 + 4..14 + 6].copy_from_slice(&((good.len() - icmp + 8) as u16).to_be_bytes());
        frag.extend_from_slice(&[NEXT_ICMPV6, 0, 0, 1, 0, 0, 0, 1]);
        frag.extend_from_slice(&good[icmp..]);
        assert_eq!(parse_frame(&frag), Err(NdpError::Fragmented));
    }

    #[test]
    fn linux_dad_with_nonce_and_hop_by_hop_is_understood() {
        // A DAD probe as Linux sends it (RFC 7527 nonce option), behind a hop-by-hop header.
        let target = VM;
        let group = solicited_node(target);
        let mut icmp = vec![TYPE_NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        icmp.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6]);
        icmp6::set_checksum(&Ipv6Addr::UNSPECIFIED, &group, &mut icmp);
        let mut payload = vec![NEXT_ICMPV6, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&icmp);
        let packet = ipv6::build_packet(Ipv6Addr::UNSPECIFIED, group, ipv6::NEXT_HOP_BY_HOP, 255, 0, &payload);
        let mut frame = Vec::new();
        eth::write_header(&mut frame, multicast_mac(group), VM_MAC, None, ETHERTYPE_IPV6);
        frame.extend_from_slice(&packet);
        let msg = parse_frame(&frame).unwrap();
        assert_eq!((msg.kind(), msg.claim()), (NdpKind::Dad, Some((VM, VM_MAC))));
    }

    #[test]
    fn etherparse_reads_our_advertisement() {
        let frame = build_frame(&unsolicited_advertisement(VM_MAC, VM, false, None));
        let sliced = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = sliced.transport else { panic!("no ICMPv6") };
        assert!(
            matches!(icmp.icmp_type(), etherparse::Icmpv6Type::NeighborAdvertisement(h) if h.r#override && !h.solicited)
        );
        assert!(icmp.is_checksum_valid(VM.octets(), ALL_NODES.octets()));
    }

    fn arb_mac() -> impl Strategy<Value = MacAddr> {
        any::<[u8; 6]>().prop_map(|m| MacAddr([m[0] & 0xfe, m[1], m[2], m[3], m[4], m[5]]))
    }

    fn arb_unicast() -> impl Strategy<Value = Ipv6Addr> {
        any::<[u8; 16]>().prop_map(|mut o| {
            if o[0] == 0xff {
                o[0] = 0x20;
            }
            Ipv6Addr::from(o)
        })
    }

    fn arb_message() -> impl Strategy<Value = NdpMessage> {
        let mac = arb_mac();
        (mac, arb_mac(), arb_unicast(), arb_unicast(), proptest::option::of(0u16..4096), 0u8..6, any::<[bool; 3]>())
            .prop_map(|(mac, other, a, b, vlan, which, f)| match which {
                0 => solicitation(mac, a, b, vlan),
                1 => dad(mac, b, vlan),
                2 => probe(mac, a, other, b, vlan),
                3 => advertise_to(&solicitation(other, a, b, vlan), mac, f[0], f[1]).expect("an NS"),
                4 => unsolicited_advertisement(mac, b, f[0], vlan),
                _ => router_advertisement(
                    mac,
                    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
                    f[2].then_some((other, a)),
                    RouterAdvert { lifetime_s: 600, mtu: f[0].then_some(1480), ..RouterAdvert::default() },
                    vlan,
                ),
            })
    }

    proptest! {
        #[test]
        fn built_messages_parse_back(msg in arb_message()) {
            // Only a multicast solicitor address would make a solicited NA invalid; arb_unicast
            // never yields one.
            prop_assert_eq!(parse_frame(&build_frame(&msg)), Ok(msg));
        }

        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = parse_frame(&bytes);
        }

        #[test]
        fn mangled_frames_never_panic_and_what_parses_rebuilds(msg in arb_message(), flips in proptest::collection::vec((0usize..120, any::<u8>()), 1..4)) {
            let mut frame = build_frame(&msg);
            for (at, b) in flips {
                if at < frame.len() { frame[at] ^= b; }
            }
            if let Ok(m) = parse_frame(&frame) {
                prop_assert_eq!(parse_frame(&build_frame(&m)), Ok(m));
            }
        }
    }
}
