//! ICMP errors an FE originates (RFC 792, RFC 1191, RFC 1812 §4.3.2.7): time exceeded and
//! destination unreachable / fragmentation needed, quoting the offending IPv4 header + 8 bytes.
//!
//! [`error_for`] refuses (with a reason) to answer ICMP errors, non-first fragments and packets
//! whose source is not a unicast host, so an FE never amplifies or loops error traffic.

use std::net::Ipv4Addr;

use super::checksum;
use super::ipv4::{self, Ipv4Header, PROTO_ICMP};

/// ICMP type: destination unreachable.
pub const TYPE_DEST_UNREACHABLE: u8 = 3;
/// ICMP type: time exceeded.
pub const TYPE_TIME_EXCEEDED: u8 = 11;
/// ICMP type: echo reply.
pub const TYPE_ECHO_REPLY: u8 = 0;
/// ICMP type: echo request.
pub const TYPE_ECHO_REQUEST: u8 = 8;
/// Code of destination unreachable: fragmentation needed and DF set.
pub const CODE_FRAG_NEEDED: u8 = 4;
/// Code of time exceeded: TTL exceeded in transit.
pub const CODE_TTL_EXCEEDED: u8 = 0;
/// TTL of the ICMP errors we originate.
pub const ERROR_TTL: u8 = 64;
/// TOS of the ICMP errors we originate (precedence "internetwork control", as routers do).
pub const ERROR_TOS: u8 = 0xc0;

/// The ICMP error to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// Type 11 code 0: TTL exceeded in transit.
    TimeExceeded,
    /// Type 3 code 4 with the next-hop MTU (RFC 1191).
    FragmentationNeeded {
        /// MTU of the next hop (the tunnel MTU).
        mtu: u16,
    },
}

/// Why no ICMP error may be sent for a packet. [`Suppressed::reason`] is a counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Suppressed {
    /// The offending packet is not valid IPv4.
    #[error("offending packet is not valid IPv4: {0}")]
    Malformed(#[from] ipv4::Ipv4Error),
    /// The offending packet is itself an ICMP error (or too short to tell).
    #[error("offending packet is an ICMP error")]
    IcmpError,
    /// The offending packet is a fragment other than the first.
    #[error("offending packet is a non-first fragment")]
    NonFirstFragment,
    /// The source is not a unicast host address (0.0.0.0, broadcast, multicast, loopback,
    /// class E).
    #[error("source {0} is not a unicast host")]
    NotUnicastSource(Ipv4Addr),
}

impl Suppressed {
    /// A short stable label, for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Suppressed::Malformed(_) => "malformed",
            Suppressed::IcmpError => "icmp_error",
            Suppressed::NonFirstFragment => "non_first_fragment",
            Suppressed::NotUnicastSource(_) => "not_unicast_source",
        }
    }
}

/// True for ICMP types that are errors (which must never trigger another error).
fn is_error_type(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

fn unicast_host(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified()
        || addr.is_broadcast()
        || addr.is_multicast()
        || addr.is_loopback()
        || addr.octets()[0] >= 240)
}

/// Decides whether `offending` may be answered with an ICMP error at all.
pub fn check_may_answer(offending: &[u8]) -> Result<Ipv4Header, Suppressed> {
    let header = ipv4::parse(offending)?;
    if header.fragment_offset != 0 {
        return Err(Suppressed::NonFirstFragment);
    }
    if !unicast_host(header.src) {
        return Err(Suppressed::NotUnicastSource(header.src));
    }
    if header.protocol == PROTO_ICMP {
        match offending.get(header.header_len) {
            Some(&t) if !is_error_type(t) => {}
            _ => return Err(Suppressed::IcmpError),
        }
    }
    Ok(header)
}

/// Builds the complete IPv4 packet carrying `error` about `offending`, from `router` (our
/// address) to the offending packet's source, quoting its header + 8 bytes of payload.
pub fn error_for(offending: &[u8], error: IcmpError, router: Ipv4Addr) -> Result<Vec<u8>, Suppressed> {
    let header = check_may_answer(offending)?;
    let quoted_len = (header.header_len + 8).min(header.total_len);
    let (icmp_type, code, rest) = match error {
        IcmpError::TimeExceeded => (TYPE_TIME_EXCEEDED, CODE_TTL_EXCEEDED, [0u8; 4]),
        IcmpError::FragmentationNeeded { mtu } => {
            let m = mtu.to_be_bytes();
            (TYPE_DEST_UNREACHABLE, CODE_FRAG_NEEDED, [0, 0, m[0], m[1]])
        }
    };
    let mut icmp = Vec::with_capacity(8 + quoted_len);
    icmp.extend_from_slice(&[icmp_type, code, 0, 0]);
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(&offending[..quoted_len]);
    let sum = checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Ok(ipv4::build_packet(router, header.src, PROTO_ICMP, ERROR_TTL, ERROR_TOS, false, &icmp))
}

/// An ICMP echo request or reply message (the ICMP part only), with a valid checksum.
pub fn echo(icmp_type: u8, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(8 + payload.len());
    icmp.extend_from_slice(&[icmp_type, 0, 0, 0]);
    icmp.extend_from_slice(&ident.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let sum = checksum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    icmp
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
    const FE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn ping(src: Ipv4Addr, len: usize) -> Vec<u8> {
        ipv4::build_packet(src, VM, PROTO_ICMP, 1, 0, true, &echo(TYPE_ECHO_REQUEST, 1, 2, &vec![7; len]))
    }

    #[test]
    fn time_exceeded_quotes_header_and_8_bytes() {
        let offending = ping(CLIENT, 100);
        let reply = error_for(&offending, IcmpError::TimeExceeded, FE).unwrap();
        let h = ipv4::parse(&reply).unwrap();
        assert_eq!((h.src, h.dst, h.protocol), (FE, CLIENT, PROTO_ICMP));
        let icmp = &reply[20..];
        assert_eq!((icmp[0], icmp[1]), (11, 0));
        assert_eq!(checksum::checksum(icmp), 0);
        assert_eq!(&icmp[8..], &offending[..28]);
    }

    #[test]
    fn frag_needed_carries_mtu() {
        let offending = ping(CLIENT, 1472);
        let reply = error_for(&offending, IcmpError::FragmentationNeeded { mtu: 1480 }, FE).unwrap();
        let icmp = &reply[20..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1480);
        assert_eq!(checksum::checksum(icmp), 0);
        // etherparse, as an independent decoder, agrees.
        let parsed = etherparse::SlicedPacket::from_ip(&reply).unwrap();
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = parsed.transport else {
            panic!("no ICMPv4");
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1480 }
            )
        );
    }

    #[test]
    fn short_packets_are_quoted_whole() {
        let tiny = ipv4::build_packet(CLIENT, VM, 17, 1, 0, false, &[1, 2, 3]);
        let reply = error_for(&tiny, IcmpError::TimeExceeded, FE).unwrap();
        assert_eq!(&reply[28..], &tiny[..]);
    }

    #[test]
    fn never_answers_errors_fragments_or_bad_sources() {
        let te = error_for(&ping(CLIENT, 8), IcmpError::TimeExceeded, FE).unwrap();
        assert_eq!(error_for(&te, IcmpError::TimeExceeded, FE), Err(Suppressed::IcmpError));
        let mut frag = ping(CLIENT, 8);
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        ipv4::fix_checksum(&mut frag);
        assert_eq!(error_for(&frag, IcmpError::TimeExceeded, FE), Err(Suppressed::NonFirstFragment));
        let mut first = ping(CLIENT, 8);
        first[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        ipv4::fix_checksum(&mut first);
        assert!(error_for(&first, IcmpError::TimeExceeded, FE).is_ok(), "first fragment is answered");
        for src in [
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(224, 0, 0, 5),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(250, 0, 0, 1),
        ] {
            assert_eq!(error_for(&ping(src, 8), IcmpError::TimeExceeded, FE), Err(Suppressed::NotUnicastSource(src)));
        }
        assert_eq!(error_for(&[0u8; 5], IcmpError::TimeExceeded, FE).unwrap_err().reason(), "malformed");
        let echo_reply = ipv4::build_packet(CLIENT, VM, PROTO_ICMP, 1, 0, false, &echo(TYPE_ECHO_REPLY, 1, 1, &[]));
        assert!(error_for(&echo_reply, IcmpError::TimeExceeded, FE).is_ok(), "queries are answered");
    }

    proptest! {
        #[test]
        fn builder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100), mtu in any::<u16>()) {
            if let Ok(reply) = error_for(&bytes, IcmpError::FragmentationNeeded { mtu }, FE) {
                prop_assert!(ipv4::parse(&reply).is_ok());
                prop_assert_eq!(checksum::checksum(&reply[20..]), 0);
            }
        }
    }
}
