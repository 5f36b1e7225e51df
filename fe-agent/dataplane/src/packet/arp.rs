//! Ethernet + ARP (RFC 826) frames: a strict parser into a typed message and builders for the two
//! frames an FE sends (a proxy-ARP reply and a gratuitous ARP).
//!
//! Hand-written rather than via `etherparse`: an ARP-over-Ethernet frame is 28 fixed bytes after
//! the MAC header, the parser must report *why* a frame is rejected (one counter per reason), and
//! the builders write straight into a fixed 60-byte frame. `etherparse` serves as an independent
//! oracle in the tests.
//!
//! One 802.1Q tag is understood (its VLAN id is kept and echoed in replies); stacked tags
//! (QinQ, 0x88a8 or a second 0x8100) are rejected with [`ArpError::StackedVlan`]. The Ethernet
//! framing ([`MacAddr`] and the header) is [`super::eth`]'s, re-exported here; the ARP layout is
//! shared with [`super::rarp`].

use std::net::Ipv4Addr;

use super::eth::{self, EthError, EthHeader, be16, mac_at};
pub use super::eth::{
    ETH_HEADER_LEN, ETHERTYPE_QINQ, ETHERTYPE_VLAN, MIN_FRAME_LEN, MacAddr, MacParseError, VLAN_TAG_LEN,
};

/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Length of an ARP message for Ethernet/IPv4.
pub const ARP_LEN: usize = 28;

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpOp {
    /// Operation 1.
    Request,
    /// Operation 2.
    Reply,
}

impl ArpOp {
    fn code(self) -> u16 {
        match self {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
        }
    }
}

/// What an ARP message means to an FE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpKind {
    /// "Who has target_ip? tell sender_ip".
    Request,
    /// "target: sender_ip is at sender_mac".
    Reply,
    /// Sender announces its own binding (sender IP == target IP), as a request or a reply — what a
    /// hypervisor sends after a live migration.
    Gratuitous(ArpOp),
    /// RFC 5227 probe: a request with sender IP 0.0.0.0 (address conflict detection); it says
    /// nothing about where `target_ip` lives.
    Probe,
}

/// A parsed Ethernet/IPv4 ARP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpMessage {
    /// Ethernet destination.
    pub eth_dst: MacAddr,
    /// Ethernet source.
    pub eth_src: MacAddr,
    /// 802.1Q VLAN id, if the frame carried one tag.
    pub vlan: Option<u16>,
    /// Operation.
    pub op: ArpOp,
    /// Sender hardware address.
    pub sender_mac: MacAddr,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: MacAddr,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

impl ArpMessage {
    /// True when the sender announces its own address (sender IP == target IP, not 0.0.0.0).
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip && !self.sender_ip.is_unspecified()
    }

    /// Classifies the message.
    pub fn kind(&self) -> ArpKind {
        if self.is_gratuitous() {
            ArpKind::Gratuitous(self.op)
        } else if self.op == ArpOp::Request && self.sender_ip.is_unspecified() {
            ArpKind::Probe
        } else if self.op == ArpOp::Request {
            ArpKind::Request
        } else {
            ArpKind::Reply
        }
    }
}

/// Why a frame is not a valid Ethernet/IPv4 ARP message. [`ArpError::reason`] gives a stable
/// label for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArpError {
    /// Shorter than the Ethernet header (+ tag) + 28 bytes of ARP.
    #[error("frame of {len} bytes is too short for Ethernet + ARP (needs {needed})")]
    TooShort {
        /// Frame length.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The EtherType (after at most one VLAN tag) is not ARP.
    #[error("EtherType {0:#06x} is not ARP (0x0806)")]
    NotArp(u16),
    /// Two or more VLAN tags (QinQ) are not supported.
    #[error("stacked VLAN tags (QinQ) are not supported")]
    StackedVlan,
    /// Hardware type is not Ethernet (1).
    #[error("ARP hardware type {0} is not Ethernet (1)")]
    HardwareType(u16),
    /// Protocol type is not IPv4 (0x0800).
    #[error("ARP protocol type {0:#06x} is not IPv4 (0x0800)")]
    ProtocolType(u16),
    /// Hardware/protocol address lengths are not 6/4.
    #[error("ARP address lengths {hlen}/{plen} are not 6/4")]
    AddressLengths {
        /// Hardware address length.
        hlen: u8,
        /// Protocol address length.
        plen: u8,
    },
    /// Operation is neither request (1) nor reply (2).
    #[error("ARP operation {0} is neither request (1) nor reply (2)")]
    Operation(u16),
    /// The sender MAC is a group address (no host has it).
    #[error("ARP sender MAC {0} is a multicast/broadcast address")]
    MulticastSender(MacAddr),
}

impl ArpError {
    /// Every [`ArpError::reason`] label, in a fixed order (for counter arrays).
    pub const REASONS: [&'static str; 8] = [
        "too_short",
        "not_arp",
        "stacked_vlan",
        "hardware_type",
        "protocol_type",
        "address_lengths",
        "operation",
        "multicast_sender",
    ];

    /// Position of this error's label in [`ArpError::REASONS`].
    pub fn reason_index(&self) -> usize {
        Self::REASONS.iter().position(|r| *r == self.reason()).expect("every reason is listed")
    }

    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            ArpError::TooShort { .. } => "too_short",
            ArpError::NotArp(_) => "not_arp",
            ArpError::StackedVlan => "stacked_vlan",
            ArpError::HardwareType(_) => "hardware_type",
            ArpError::ProtocolType(_) => "protocol_type",
            ArpError::AddressLengths { .. } => "address_lengths",
            ArpError::Operation(_) => "operation",
            ArpError::MulticastSender(_) => "multicast_sender",
        }
    }
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The fields of an Ethernet/IPv4 ARP-layout message (ARP or RARP), operation not yet checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) eth: EthHeader,
    pub(crate) op: u16,
    pub(crate) sender_mac: MacAddr,
    pub(crate) sender_ip: Ipv4Addr,
    pub(crate) target_mac: MacAddr,
    pub(crate) target_ip: Ipv4Addr,
}

/// Parses a frame of EtherType `ethertype` laid out like ARP for Ethernet/IPv4 (ARP, RARP). The
/// EtherType mismatch is reported as [`ArpError::NotArp`] carrying the frame's EtherType.
pub(crate) fn parse_layout(frame: &[u8], ethertype: u16) -> Result<Layout, ArpError> {
    let eth = eth::parse(frame).map_err(|e| match e {
        EthError::TooShort { len, needed } => ArpError::TooShort { len, needed: needed + ARP_LEN },
        EthError::StackedVlan => ArpError::StackedVlan,
    })?;
    if eth.ethertype != ethertype {
        return Err(ArpError::NotArp(eth.ethertype));
    }
    let at = eth.payload_at;
    if frame.len() < at + ARP_LEN {
        return Err(ArpError::TooShort { len: frame.len(), needed: at + ARP_LEN });
    }
    let arp = &frame[at..at + ARP_LEN];
    let htype = be16(arp, 0);
    if htype != 1 {
        return Err(ArpError::HardwareType(htype));
    }
    let ptype = be16(arp, 2);
    if ptype != eth::ETHERTYPE_IPV4 {
        return Err(ArpError::ProtocolType(ptype));
    }
    if arp[4] != 6 || arp[5] != 4 {
        return Err(ArpError::AddressLengths { hlen: arp[4], plen: arp[5] });
    }
    Ok(Layout {
        eth,
        op: be16(arp, 6),
        sender_mac: mac_at(arp, 8),
        sender_ip: ip_at(arp, 14),
        target_mac: mac_at(arp, 18),
        target_ip: ip_at(arp, 24),
    })
}

/// Serialises an ARP-layout message of EtherType `ethertype` and operation `op` as a
/// minimum-size (zero-padded) Ethernet frame.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_layout(
    ethertype: u16,
    eth_dst: MacAddr,
    eth_src: MacAddr,
    vlan: Option<u16>,
    op: u16,
    sender: (MacAddr, Ipv4Addr),
    target: (MacAddr, Ipv4Addr),
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(MIN_FRAME_LEN + VLAN_TAG_LEN);
    eth::write_header(&mut frame, eth_dst, eth_src, vlan, ethertype);
    frame.extend_from_slice(&1u16.to_be_bytes());
    frame.extend_from_slice(&eth::ETHERTYPE_IPV4.to_be_bytes());
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&op.to_be_bytes());
    frame.extend_from_slice(&sender.0.0);
    frame.extend_from_slice(&sender.1.octets());
    frame.extend_from_slice(&target.0.0);
    frame.extend_from_slice(&target.1.octets());
    eth::pad(&mut frame);
    frame
}

/// Parses an Ethernet frame (without FCS; trailing padding is ignored) as an ARP message.
pub fn parse_frame(frame: &[u8]) -> Result<ArpMessage, ArpError> {
    let l = parse_layout(frame, ETHERTYPE_ARP)?;
    let op = match l.op {
        1 => ArpOp::Request,
        2 => ArpOp::Reply,
        other => return Err(ArpError::Operation(other)),
    };
    if l.sender_mac.is_multicast() {
        return Err(ArpError::MulticastSender(l.sender_mac));
    }
    Ok(ArpMessage {
        eth_dst: l.eth.dst,
        eth_src: l.eth.src,
        vlan: l.eth.vlan,
        op,
        sender_mac: l.sender_mac,
        sender_ip: l.sender_ip,
        target_mac: l.target_mac,
        target_ip: l.target_ip,
    })
}

/// Serialises `msg` as a minimum-size (60-byte, zero-padded) Ethernet frame, tagged if
/// `msg.vlan` is set.
pub fn build_frame(msg: &ArpMessage) -> Vec<u8> {
    build_layout(
        ETHERTYPE_ARP,
        msg.eth_dst,
        msg.eth_src,
        msg.vlan,
        msg.op.code(),
        (msg.sender_mac, msg.sender_ip),
        (msg.target_mac, msg.target_ip),
    )
}

/// The reply answering `request` on behalf of `answer_mac` (proxy ARP): "request.target_ip is at
/// answer_mac", unicast back to the requester, on the request's VLAN.
pub fn reply_to(request: &ArpMessage, answer_mac: MacAddr) -> ArpMessage {
    ArpMessage {
        eth_dst: request.sender_mac,
        eth_src: answer_mac,
        vlan: request.vlan,
        op: ArpOp::Reply,
        sender_mac: answer_mac,
        sender_ip: request.target_ip,
        target_mac: request.sender_mac,
        target_ip: request.sender_ip,
    }
}

/// A broadcast gratuitous ARP announcing `ip` at `mac` (sender IP == target IP), as a request
/// (target MAC zero, the common form) or a reply (target MAC = `mac`).
pub fn gratuitous(mac: MacAddr, ip: Ipv4Addr, op: ArpOp, vlan: Option<u16>) -> ArpMessage {
    ArpMessage {
        eth_dst: MacAddr::BROADCAST,
        eth_src: mac,
        vlan,
        op,
        sender_mac: mac,
        sender_ip: ip,
        target_mac: match op {
            ArpOp::Request => MacAddr::ZERO,
            ArpOp::Reply => mac,
        },
        target_ip: ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VM_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x11]);
    const FE_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0xfe, 0x01]);

    fn request() -> ArpMessage {
        ArpMessage {
            eth_dst: MacAddr::BROADCAST,
            eth_src: VM_MAC,
            vlan: None,
            op: ArpOp::Request,
            sender_mac: VM_MAC,
            sender_ip: Ipv4Addr::new(10, 10, 0, 11),
            target_mac: MacAddr::ZERO,
            target_ip: Ipv4Addr::new(10, 10, 0, 1),
        }
    }

    #[test]
    fn request_roundtrips_and_is_classified() {
        let frame = build_frame(&request());
        assert_eq!(frame.len(), MIN_FRAME_LEN);
        let parsed = parse_frame(&frame).unwrap();
        assert_eq!(parsed, request());
        assert_eq!(parsed.kind(), ArpKind::Request);
    }

    #[test]
    fn gratuitous_request_and_reply() {
        let ip = Ipv4Addr::new(10, 10, 0, 11);
        for op in [ArpOp::Request, ArpOp::Reply] {
            let garp = parse_frame(&build_frame(&gratuitous(VM_MAC, ip, op, None))).unwrap();
            assert_eq!(garp.kind(), ArpKind::Gratuitous(op));
            assert_eq!((garp.sender_ip, garp.sender_mac), (ip, VM_MAC));
            assert_eq!(garp.eth_dst, MacAddr::BROADCAST);
        }
    }

    #[test]
    fn probe_is_not_gratuitous() {
        let mut probe = request();
        probe.sender_ip = Ipv4Addr::UNSPECIFIED;
        assert_eq!(probe.kind(), ArpKind::Probe);
        probe.target_ip = Ipv4Addr::UNSPECIFIED;
        assert_eq!(probe.kind(), ArpKind::Probe);
    }

    #[test]
    fn proxy_reply_answers_the_requester() {
        let reply = reply_to(&request(), FE_MAC);
        let parsed = parse_frame(&build_frame(&reply)).unwrap();
        assert_eq!(parsed.kind(), ArpKind::Reply);
        assert_eq!(parsed.eth_dst, VM_MAC);
        assert_eq!(parsed.sender_mac, FE_MAC);
        assert_eq!(parsed.sender_ip, Ipv4Addr::new(10, 10, 0, 1));
        assert_eq!(parsed.target_ip, Ipv4Addr::new(10, 10, 0, 11));
    }

    #[test]
    fn vlan_tag_is_kept_and_qinq_rejected() {
        let mut tagged = request();
        tagged.vlan = Some(42);
        let frame = build_frame(&tagged);
        assert_eq!(parse_frame(&frame).unwrap().vlan, Some(42));
        assert_eq!(reply_to(&tagged, FE_MAC).vlan, Some(42));
        let mut qinq = frame.clone();
        qinq[12..14].copy_from_slice(&ETHERTYPE_QINQ.to_be_bytes());
        assert_eq!(parse_frame(&qinq), Err(ArpError::StackedVlan));
        let mut double = frame;
        double[16..18].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        assert_eq!(parse_frame(&double), Err(ArpError::StackedVlan));
    }

    #[test]
    fn malformed_frames_say_why() {
        let good = build_frame(&request());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..20].to_vec(), "too_short"),
            (good[..10].to_vec(), "too_short"),
            (patch(&good, 12, &[0x08, 0x00]), "not_arp"),
            (patch(&good, 14, &[0, 6]), "hardware_type"),
            (patch(&good, 16, &[0x86, 0xdd]), "protocol_type"),
            (patch(&good, 18, &[6, 16]), "address_lengths"),
            (patch(&good, 20, &[0, 3]), "operation"),
            (patch(&good, 22, &[0xff; 6]), "multicast_sender"),
        ];
        for (frame, reason) in cases {
            let err = parse_frame(&frame).unwrap_err();
            assert_eq!(err.reason(), reason);
            assert_eq!(ArpError::REASONS[err.reason_index()], reason);
        }
    }

    fn patch(frame: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    }

    #[test]
    fn etherparse_agrees_with_our_builder() {
        let garp = gratuitous(VM_MAC, Ipv4Addr::new(10, 10, 0, 11), ArpOp::Request, None);
        let frame = build_frame(&garp);
        let sliced = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::NetSlice::Arp(arp)) = sliced.net else {
            panic!("etherparse did not see ARP: {:?}", sliced.net);
        };
        assert_eq!(arp.operation(), etherparse::ArpOperation::REQUEST);
        assert_eq!(arp.sender_hw_addr(), &VM_MAC.0);
        assert_eq!(arp.sender_protocol_addr(), &[10, 10, 0, 11]);
        assert_eq!(arp.target_protocol_addr(), &[10, 10, 0, 11]);
    }

    #[test]
    fn mac_text_roundtrip() {
        let mac: MacAddr = "02:00:00:00:fe:01".parse().unwrap();
        assert_eq!(mac, FE_MAC);
        assert_eq!(mac.to_string(), "02:00:00:00:fe:01");
        assert!("02:00:00:00:fe".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:fe:01:02".parse::<MacAddr>().is_err());
        assert!("zz:00:00:00:fe:01".parse::<MacAddr>().is_err());
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_frame(&bytes);
        }

        #[test]
        fn built_frames_parse_back(
            sender in any::<[u8; 4]>(), target in any::<[u8; 4]>(), mac in any::<[u8; 6]>(),
            reply in any::<bool>(), vlan in proptest::option::of(0u16..4096),
        ) {
            let mac = MacAddr([mac[0] & 0xfe, mac[1], mac[2], mac[3], mac[4], mac[5]]);
            let msg = ArpMessage {
                eth_dst: MacAddr::BROADCAST, eth_src: mac, vlan,
                op: if reply { ArpOp::Reply } else { ArpOp::Request },
                sender_mac: mac, sender_ip: sender.into(),
                target_mac: MacAddr::ZERO, target_ip: target.into(),
            };
            prop_assert_eq!(parse_frame(&build_frame(&msg)), Ok(msg));
        }
    }
}
