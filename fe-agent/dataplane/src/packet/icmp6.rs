//! ICMPv6 (RFC 4443): the message checksum over the IPv6 pseudo-header, echo messages, and the
//! errors an FE originates — Packet Too Big (the tunnel MTU) and Time Exceeded (hop limit) —
//! quoting as much of the offending packet as fits the IPv6 minimum MTU.
//!
//! [`error_for`] refuses (with a reason) what RFC 4443 §2.4 (e) forbids answering: ICMPv6 errors
//! (and packets whose upper layer cannot be found), packets from addresses that do not identify
//! one host (unspecified, multicast, loopback, link-local, IPv4-mapped), and — except for Packet
//! Too Big — packets sent to a multicast group.

use std::net::Ipv6Addr;

use super::checksum;
use super::ipv6::{self, Ipv6Error, Ipv6Header, NEXT_ICMPV6};

/// Type: destination unreachable.
pub const TYPE_DEST_UNREACHABLE: u8 = 1;
/// Type: packet too big.
pub const TYPE_PACKET_TOO_BIG: u8 = 2;
/// Type: time exceeded.
pub const TYPE_TIME_EXCEEDED: u8 = 3;
/// Type: parameter problem.
pub const TYPE_PARAMETER_PROBLEM: u8 = 4;
/// Type: echo request.
pub const TYPE_ECHO_REQUEST: u8 = 128;
/// Type: echo reply.
pub const TYPE_ECHO_REPLY: u8 = 129;
/// Type: router solicitation (NDP).
pub const TYPE_ROUTER_SOLICITATION: u8 = 133;
/// Type: router advertisement (NDP).
pub const TYPE_ROUTER_ADVERTISEMENT: u8 = 134;
/// Type: neighbor solicitation (NDP).
pub const TYPE_NEIGHBOR_SOLICITATION: u8 = 135;
/// Type: neighbor advertisement (NDP).
pub const TYPE_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// Code of time exceeded: hop limit exceeded in transit.
pub const CODE_HOP_LIMIT_EXCEEDED: u8 = 0;
/// Hop limit of the errors we originate.
pub const ERROR_HOP_LIMIT: u8 = 64;
/// Traffic class of the errors we originate (class selector 6, network control, as routers do).
pub const ERROR_TRAFFIC_CLASS: u8 = 0xc0;
/// Length of the ICMPv6 header (type, code, checksum, 4 bytes of message body).
pub const HEADER_LEN: usize = 8;

/// The checksum to store in `icmp` (its checksum field zeroed) sent from `src` to `dst`.
pub fn checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let pseudo = checksum::pseudo_header_v6(&src.octets(), &dst.octets(), NEXT_ICMPV6, icmp.len() as u32);
    checksum::finish(u32::from(checksum::add(pseudo, checksum::sum(icmp))))
}

/// True when the checksum stored in `icmp` (sent from `src` to `dst`) verifies.
pub fn checksum_ok(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> bool {
    checksum(src, dst, icmp) == 0
}

/// Stores the checksum of `icmp` (from `src` to `dst`) in its checksum field.
pub fn set_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &mut [u8]) {
    icmp[2..4].fill(0);
    let sum = checksum(src, dst, icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
}

/// True for types that are errors (which must never trigger another error): 0–127.
pub fn is_error_type(icmp_type: u8) -> bool {
    icmp_type < 128
}

/// The ICMPv6 error to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmp6Error {
    /// Type 3 code 0: hop limit exceeded in transit.
    TimeExceeded,
    /// Type 2 with the MTU of the next hop (the tunnel MTU).
    PacketTooBig {
        /// MTU of the next hop.
        mtu: u32,
    },
}

/// Why no ICMPv6 error may be sent for a packet. [`Suppressed::reason`] is a counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Suppressed {
    /// The offending packet is not valid IPv6 (or its extension headers are broken).
    #[error("offending packet is not valid IPv6: {0}")]
    Malformed(#[from] Ipv6Error),
    /// The offending packet is itself an ICMPv6 error (or too short to tell).
    #[error("offending packet is an ICMPv6 error")]
    IcmpError,
    /// The source does not identify a single host beyond this link.
    #[error("source {0} is not a routable unicast address")]
    NotUnicastSource(Ipv6Addr),
    /// Sent to a multicast group (only Packet Too Big answers those).
    #[error("destination {0} is a multicast group")]
    MulticastDestination(Ipv6Addr),
}

impl Suppressed {
    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Suppressed::Malformed(_) => "malformed",
            Suppressed::IcmpError => "icmp_error",
            Suppressed::NotUnicastSource(_) => "not_unicast_source",
            Suppressed::MulticastDestination(_) => "multicast_destination",
        }
    }
}

/// Decides whether `offending` may be answered with `error` at all.
pub fn check_may_answer(offending: &[u8], error: Icmp6Error) -> Result<Ipv6Header, Suppressed> {
    let header = ipv6::parse(offending)?;
    if !ipv6::is_routable_unicast(&header.src) {
        return Err(Suppressed::NotUnicastSource(header.src));
    }
    if header.dst.is_multicast() && !matches!(error, Icmp6Error::PacketTooBig { .. }) {
        return Err(Suppressed::MulticastDestination(header.dst));
    }
    let upper = ipv6::upper_layer(offending, &header)?;
    if upper.protocol == NEXT_ICMPV6 && !upper.non_first_fragment {
        match offending.get(upper.offset) {
            Some(&t) if !is_error_type(t) => {}
            _ => return Err(Suppressed::IcmpError),
        }
    }
    Ok(header)
}

/// Builds the complete IPv6 packet carrying `error` about `offending`, from `router` (our
/// address) to the offending packet's source, quoting as much of it as keeps the error within
/// [`ipv6::MIN_MTU`].
pub fn error_for(offending: &[u8], error: Icmp6Error, router: Ipv6Addr) -> Result<Vec<u8>, Suppressed> {
    let header = check_may_answer(offending, error)?;
    let quoted = header.total_len().min(ipv6::MIN_MTU - ipv6::HEADER_LEN - HEADER_LEN);
    let (icmp_type, code, body) = match error {
        Icmp6Error::TimeExceeded => (TYPE_TIME_EXCEEDED, CODE_HOP_LIMIT_EXCEEDED, 0u32),
        Icmp6Error::PacketTooBig { mtu } => (TYPE_PACKET_TOO_BIG, 0, mtu),
    };
    let mut icmp = Vec::with_capacity(HEADER_LEN + quoted);
    icmp.extend_from_slice(&[icmp_type, code, 0, 0]);
    icmp.extend_from_slice(&body.to_be_bytes());
    icmp.extend_from_slice(&offending[..quoted]);
    set_checksum(&router, &header.src, &mut icmp);
    Ok(ipv6::build_packet(router, header.src, NEXT_ICMPV6, ERROR_HOP_LIMIT, ERROR_TRAFFIC_CLASS, &icmp))
}

/// An ICMPv6 echo request or reply message (the ICMPv6 part only) from `src` to `dst`, with a
/// valid checksum.
pub fn echo(src: &Ipv6Addr, dst: &Ipv6Addr, icmp_type: u8, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(HEADER_LEN + payload.len());
    icmp.extend_from_slice(&[icmp_type, 0, 0, 0]);
    icmp.extend_from_slice(&ident.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    set_checksum(src, dst, &mut icmp);
    icmp
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
    const VM: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);
    const FE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, 1);

    fn ping(src: Ipv6Addr, dst: Ipv6Addr, len: usize) -> Vec<u8> {
        let icmp = echo(&src, &dst, TYPE_ECHO_REQUEST, 1, 2, &vec![7; len]);
        ipv6::build_packet(src, dst, NEXT_ICMPV6, 1, 0, &icmp)
    }

    #[test]
    fn packet_too_big_quotes_up_to_the_minimum_mtu() {
        let offending = ping(CLIENT, VM, 1452);
        let reply = error_for(&offending, Icmp6Error::PacketTooBig { mtu: 1480 }, FE).unwrap();
        assert_eq!(reply.len(), ipv6::MIN_MTU);
        let h = ipv6::parse(&reply).unwrap();
        assert_eq!((h.src, h.dst, h.next_header, h.hop_limit), (FE, CLIENT, NEXT_ICMPV6, ERROR_HOP_LIMIT));
        let icmp = &reply[40..];
        assert!(checksum_ok(&FE, &CLIENT, icmp));
        assert_eq!((icmp[0], icmp[1]), (TYPE_PACKET_TOO_BIG, 0));
        assert_eq!(u32::from_be_bytes(icmp[4..8].try_into().unwrap()), 1480);
        assert_eq!(&icmp[8..], &offending[..ipv6::MIN_MTU - 48]);
        // etherparse, as an independent decoder, agrees.
        let parsed = etherparse::SlicedPacket::from_ip(&reply).unwrap();
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = parsed.transport else { panic!("no ICMPv6") };
        assert_eq!(icmp.icmp_type(), etherparse::Icmpv6Type::PacketTooBig { mtu: 1480 });
        assert!(icmp.is_checksum_valid(FE.octets(), CLIENT.octets()));
    }

    #[test]
    fn time_exceeded_quotes_short_packets_whole() {
        let offending = ping(CLIENT, VM, 16);
        let reply = error_for(&offending, Icmp6Error::TimeExceeded, FE).unwrap();
        let icmp = &reply[40..];
        assert_eq!((icmp[0], icmp[1]), (TYPE_TIME_EXCEEDED, 0));
        assert_eq!(&icmp[8..], &offending[..]);
        assert!(checksum_ok(&FE, &CLIENT, icmp));
    }

    #[test]
    fn never_answers_errors_or_bad_sources() {
        let te = error_for(&ping(CLIENT, VM, 8), Icmp6Error::TimeExceeded, FE).unwrap();
        assert_eq!(error_for(&te, Icmp6Error::TimeExceeded, VM), Err(Suppressed::IcmpError));
        for src in ["::", "ff02::1", "::1", "fe80::1", "::ffff:192.0.2.1"] {
            let src: Ipv6Addr = src.parse().unwrap();
            assert_eq!(
                error_for(&ping(src, VM, 8), Icmp6Error::TimeExceeded, FE),
                Err(Suppressed::NotUnicastSource(src))
            );
        }
        let group: Ipv6Addr = "ff0e::1".parse().unwrap();
        assert_eq!(
            error_for(&ping(CLIENT, group, 8), Icmp6Error::TimeExceeded, FE),
            Err(Suppressed::MulticastDestination(group))
        );
        assert!(error_for(&ping(CLIENT, group, 8), Icmp6Error::PacketTooBig { mtu: 1280 }, FE).is_ok());
        assert_eq!(error_for(&[0x60; 20], Icmp6Error::TimeExceeded, FE).unwrap_err().reason(), "malformed");
        let truncated_icmp = ipv6::build_packet(CLIENT, VM, NEXT_ICMPV6, 1, 0, &[]);
        assert_eq!(error_for(&truncated_icmp, Icmp6Error::TimeExceeded, FE), Err(Suppressed::IcmpError));
        let udp = ipv6::build_packet(CLIENT, VM, ipv6::NEXT_UDP, 1, 0, &[0; 8]);
        assert!(error_for(&udp, Icmp6Error::TimeExceeded, FE).is_ok());
    }

    proptest! {
        #[test]
        fn builder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), mtu in any::<u32>()) {
            if let Ok(reply) = error_for(&bytes, Icmp6Error::PacketTooBig { mtu }, FE) {
                let h = ipv6::parse(&reply).unwrap();
                prop_assert!(reply.len() <= ipv6::MIN_MTU);
                prop_assert!(checksum_ok(&FE, &h.dst, &reply[40..]));
            }
        }
    }
}
