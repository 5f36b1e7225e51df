//! Ethernet + RARP (RFC 903) frames: what a hypervisor sends to announce a VM after a live
//! migration when the guest does not announce itself.
//!
//! QEMU's `announce-self` (`net/announce.c`, `announce_self_create` called from
//! `qemu_announce_self_iter` for every NIC) sends one 60-byte frame per NIC and round: broadcast
//! destination, source = the VM's MAC, EtherType 0x8035, an ARP-layout body with operation 3
//! ("request reverse"), sender and target hardware address = the VM's MAC, both protocol addresses
//! 0.0.0.0, zero padding. [`announce`] builds exactly that frame. It carries no IP address: to an
//! FE it says "the VM with this MAC is now behind this port", which the agent turns into a claim
//! for every IP bound to or declared with that MAC. Its default schedule is five rounds (QEMU's
//! `announce-initial` 50 ms, `announce-step` 100 ms, `announce-rounds` 5): frames at
//! [`QEMU_ANNOUNCE_OFFSETS_MS`].
//!
//! The body has the ARP layout ([`super::arp`] parses it; the reasons a frame is refused are
//! the same, with [`RarpError::NotRarp`] for another EtherType).

use std::net::Ipv4Addr;

use super::arp::{self, ArpError};
use super::eth::MacAddr;

/// EtherType of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;

/// When QEMU's `announce-self` sends its frames with its default parameters, in ms after the
/// first: the step before round `r` (counting down from 5) is `initial + (rounds − r − 1) × step`
/// = 50, 150, 250, 350 ms.
pub const QEMU_ANNOUNCE_OFFSETS_MS: [u64; 5] = [0, 50, 200, 450, 800];

/// RARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RarpOp {
    /// Operation 3, "request reverse" (what QEMU sends).
    Request,
    /// Operation 4, "reply reverse".
    Reply,
}

impl RarpOp {
    fn code(self) -> u16 {
        match self {
            RarpOp::Request => 3,
            RarpOp::Reply => 4,
        }
    }
}

/// A parsed Ethernet/IPv4 RARP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RarpMessage {
    /// Ethernet destination.
    pub eth_dst: MacAddr,
    /// Ethernet source.
    pub eth_src: MacAddr,
    /// 802.1Q VLAN id, if the frame carried one tag.
    pub vlan: Option<u16>,
    /// Operation.
    pub op: RarpOp,
    /// Sender hardware address: the MAC this frame speaks for.
    pub sender_mac: MacAddr,
    /// Sender protocol address (0.0.0.0 in a request).
    pub sender_ip: Ipv4Addr,
    /// Target hardware address (the MAC whose IP is asked for; the sender's own in an announce).
    pub target_mac: MacAddr,
    /// Target protocol address (0.0.0.0 in a request).
    pub target_ip: Ipv4Addr,
}

impl RarpMessage {
    /// The MAC the sender announces as present on this segment: the sender hardware address.
    pub fn claimed_mac(&self) -> MacAddr {
        self.sender_mac
    }

    /// True for exactly the frame QEMU's `announce-self` sends (see [`announce`]), VLAN aside.
    pub fn is_hypervisor_announce(&self) -> bool {
        self.op == RarpOp::Request
            && self.eth_dst == MacAddr::BROADCAST
            && self.eth_src == self.sender_mac
            && self.target_mac == self.sender_mac
            && self.sender_ip.is_unspecified()
            && self.target_ip.is_unspecified()
    }
}

/// Why a frame is not a valid Ethernet/IPv4 RARP message. [`RarpError::reason`] is a stable
/// counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RarpError {
    /// Shorter than the Ethernet header (+ tag) + 28 bytes.
    #[error("frame of {len} bytes is too short for Ethernet + RARP (needs {needed})")]
    TooShort {
        /// Frame length.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The EtherType (after at most one VLAN tag) is not RARP.
    #[error("EtherType {0:#06x} is not RARP (0x8035)")]
    NotRarp(u16),
    /// Two or more VLAN tags.
    #[error("stacked VLAN tags (QinQ) are not supported")]
    StackedVlan,
    /// Hardware type is not Ethernet (1).
    #[error("RARP hardware type {0} is not Ethernet (1)")]
    HardwareType(u16),
    /// Protocol type is not IPv4.
    #[error("RARP protocol type {0:#06x} is not IPv4 (0x0800)")]
    ProtocolType(u16),
    /// Address lengths are not 6/4.
    #[error("RARP address lengths {hlen}/{plen} are not 6/4")]
    AddressLengths {
        /// Hardware address length.
        hlen: u8,
        /// Protocol address length.
        plen: u8,
    },
    /// Operation is neither request reverse (3) nor reply reverse (4).
    #[error("RARP operation {0} is neither request reverse (3) nor reply reverse (4)")]
    Operation(u16),
    /// The sender MAC is a group address.
    #[error("RARP sender MAC {0} is a multicast/broadcast address")]
    MulticastSender(MacAddr),
}

impl RarpError {
    /// Every [`RarpError::reason`] label, in a fixed order (for counter arrays).
    pub const REASONS: [&'static str; 8] = [
        "too_short",
        "not_rarp",
        "stacked_vlan",
        "hardware_type",
        "protocol_type",
        "address_lengths",
        "operation",
        "multicast_sender",
    ];

    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            RarpError::TooShort { .. } => "too_short",
            RarpError::NotRarp(_) => "not_rarp",
            RarpError::StackedVlan => "stacked_vlan",
            RarpError::HardwareType(_) => "hardware_type",
            RarpError::ProtocolType(_) => "protocol_type",
            RarpError::AddressLengths { .. } => "address_lengths",
            RarpError::Operation(_) => "operation",
            RarpError::MulticastSender(_) => "multicast_sender",
        }
    }

    /// Position of this error's label in [`RarpError::REASONS`].
    pub fn reason_index(&self) -> usize {
        Self::REASONS.iter().position(|r| *r == self.reason()).expect("every reason is listed")
    }
}

impl From<ArpError> for RarpError {
    fn from(e: ArpError) -> Self {
        match e {
            ArpError::TooShort { len, needed } => RarpError::TooShort { len, needed },
            ArpError::NotArp(t) => RarpError::NotRarp(t),
            ArpError::StackedVlan => RarpError::StackedVlan,
            ArpError::HardwareType(t) => RarpError::HardwareType(t),
            ArpError::ProtocolType(t) => RarpError::ProtocolType(t),
            ArpError::AddressLengths { hlen, plen } => RarpError::AddressLengths { hlen, plen },
            ArpError::Operation(op) => RarpError::Operation(op),
            ArpError::MulticastSender(m) => RarpError::MulticastSender(m),
        }
    }
}

/// Parses an Ethernet frame (without FCS; trailing padding is ignored) as a RARP message.
pub fn parse_frame(frame: &[u8]) -> Result<RarpMessage, RarpError> {
    let l = arp::parse_layout(frame, ETHERTYPE_RARP)?;
    let op = match l.op {
        3 => RarpOp::Request,
        4 => RarpOp::Reply,
        other => return Err(RarpError::Operation(other)),
    };
    if l.sender_mac.is_multicast() {
        return Err(RarpError::MulticastSender(l.sender_mac));
    }
    Ok(RarpMessage {
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
pub fn build_frame(msg: &RarpMessage) -> Vec<u8> {
    arp::build_layout(
        ETHERTYPE_RARP,
        msg.eth_dst,
        msg.eth_src,
        msg.vlan,
        msg.op.code(),
        (msg.sender_mac, msg.sender_ip),
        (msg.target_mac, msg.target_ip),
    )
}

/// The frame QEMU's `announce-self` sends for a NIC with MAC `mac`.
pub fn announce(mac: MacAddr) -> RarpMessage {
    RarpMessage {
        eth_dst: MacAddr::BROADCAST,
        eth_src: mac,
        vlan: None,
        op: RarpOp::Request,
        sender_mac: mac,
        sender_ip: Ipv4Addr::UNSPECIFIED,
        target_mac: mac,
        target_ip: Ipv4Addr::UNSPECIFIED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VM_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    /// `announce_self_create` from QEMU's net/announce.c, byte by byte.
    fn qemu_frame(mac: [u8; 6]) -> [u8; 60] {
        let mut buf = [0u8; 60];
        buf[..6].fill(0xff);
        buf[6..12].copy_from_slice(&mac);
        buf[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
        buf[14..16].copy_from_slice(&1u16.to_be_bytes());
        buf[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
        buf[18] = 6;
        buf[19] = 4;
        buf[20..22].copy_from_slice(&3u16.to_be_bytes());
        buf[22..28].copy_from_slice(&mac);
        buf[32..38].copy_from_slice(&mac);
        buf
    }

    #[test]
    fn qemu_announce_is_parsed_and_rebuilt_byte_for_byte() {
        let frame = qemu_frame(VM_MAC.0);
        let msg = parse_frame(&frame).unwrap();
        assert_eq!(msg, announce(VM_MAC));
        assert!(msg.is_hypervisor_announce());
        assert_eq!(msg.claimed_mac(), VM_MAC);
        assert_eq!(build_frame(&msg), frame.to_vec());
    }

    #[test]
    fn reply_and_tagged_frames() {
        let mut reply = announce(VM_MAC);
        reply.op = RarpOp::Reply;
        reply.target_ip = Ipv4Addr::new(10, 10, 0, 11);
        reply.vlan = Some(100);
        let parsed = parse_frame(&build_frame(&reply)).unwrap();
        assert_eq!(parsed, reply);
        assert!(!parsed.is_hypervisor_announce());
    }

    #[test]
    fn malformed_frames_say_why() {
        let good = qemu_frame(VM_MAC.0);
        let patch = |at: usize, bytes: &[u8]| {
            let mut f = good.to_vec();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            f
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..41].to_vec(), "too_short"),
            (patch(12, &[0x08, 0x06]), "not_rarp"),
            (patch(12, &[0x88, 0xa8]), "stacked_vlan"),
            (patch(14, &[0, 6]), "hardware_type"),
            (patch(16, &[0x86, 0xdd]), "protocol_type"),
            (patch(18, &[6, 16]), "address_lengths"),
            (patch(20, &[0, 1]), "operation"),
            (patch(22, &[0x01, 0, 0, 0, 0, 0]), "multicast_sender"),
        ];
        for (frame, reason) in cases {
            let err = parse_frame(&frame).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
            assert_eq!(RarpError::REASONS[err.reason_index()], reason);
        }
        // An ARP frame is not RARP, and a RARP frame is not ARP.
        assert!(matches!(arp::parse_frame(&good), Err(ArpError::NotArp(ETHERTYPE_RARP))));
    }

    #[test]
    fn qemu_schedule_follows_its_timer_formula() {
        // qemu_announce_timer_step: initial + (rounds - round - 1) * step, round counting down.
        let (initial, step, rounds) = (50u64, 100u64, 5u64);
        let mut at = 0;
        let mut offsets = vec![0];
        for round in (1..rounds).rev() {
            at += initial + (rounds - round - 1) * step;
            offsets.push(at);
        }
        assert_eq!(offsets, QEMU_ANNOUNCE_OFFSETS_MS.to_vec());
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_frame(&bytes);
        }

        #[test]
        fn built_frames_parse_back(
            mac in any::<[u8; 6]>(), other in any::<[u8; 6]>(), sip in any::<[u8; 4]>(), tip in any::<[u8; 4]>(),
            reply in any::<bool>(), vlan in proptest::option::of(0u16..4096),
        ) {
            let mac = MacAddr([mac[0] & 0xfe, mac[1], mac[2], mac[3], mac[4], mac[5]]);
            let msg = RarpMessage {
                eth_dst: MacAddr::BROADCAST, eth_src: mac, vlan,
                op: if reply { RarpOp::Reply } else { RarpOp::Request },
                sender_mac: mac, sender_ip: sip.into(), target_mac: MacAddr(other), target_ip: tip.into(),
            };
            prop_assert_eq!(parse_frame(&build_frame(&msg)), Ok(msg));
        }
    }
}
