//! The per-packet decisions of the forwarder, pure (no IO) so they are unit-tested directly:
//! what to do with a packet read from TUN ([`egress`], IPv4 or IPv6) and with one received from
//! the underlay ([`ingress`] for IP-in-IP, [`ingress6`] for 6in4).

use std::net::Ipv4Addr;
use std::ops::Range;

use crate::counters::DropReason;
use crate::fib::{Action, Fib, FibAddr};
use crate::packet::icmp::IcmpError;
use crate::packet::icmp6::Icmp6Error;
use crate::packet::{ipv4, ipv6, sixin4};

/// Verdict for a packet read from TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Encapsulate (TTL / hop limit already decremented) and send to this peer: IP-in-IP for an
    /// IPv4 packet, 6in4 for an IPv6 packet.
    Encap(Ipv4Addr),
    /// Drop silently (counted).
    Drop(DropReason),
    /// Drop (counted) and answer the IPv4 source with this ICMP error, if allowed.
    DropWithIcmp(DropReason, IcmpError),
    /// Drop (counted) and answer the IPv6 source with this ICMPv6 error, if allowed.
    DropWithIcmp6(DropReason, Icmp6Error),
}

/// Decides the fate of `packet` (exactly one IPv4 or IPv6 packet read from TUN). The tunnel is
/// one router hop: TTL / hop limit ≤ 1 is answered with time exceeded, otherwise it is
/// decremented in place. A packet longer than `tunnel_mtu` gets "fragmentation needed" (IPv4
/// with DF; without DF it is dropped) or "packet too big" (IPv6, never fragmented on the way),
/// carrying `tunnel_mtu`.
pub fn egress(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize) -> Egress {
    decide(packet, fib, tunnel_mtu, None)
}

/// [`egress`] for a super-packet read from TUN that will leave as segments of at most
/// `largest_segment` bytes (IP header included): the decision is taken once for all of them,
/// and the MTU check applies to a segment.
pub fn egress_super(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize, largest_segment: usize) -> Egress {
    decide(packet, fib, tunnel_mtu, Some(largest_segment))
}

fn decide(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize, segment: Option<usize>) -> Egress {
    match ipv4::version(packet) {
        Some(4) => decide4(packet, fib, tunnel_mtu, segment),
        Some(6) => decide6(packet, fib, tunnel_mtu, segment),
        Some(_) => Egress::Drop(DropReason::NotIp),
        None => Egress::Drop(DropReason::Malformed),
    }
}

/// The binding of `dst`: the peer to tunnel to, or why not.
fn peer_of<A: FibAddr>(fib: &Fib, dst: A) -> Result<Ipv4Addr, DropReason> {
    match fib.lookup(dst) {
        None => Err(DropReason::NoBinding),
        Some(Action::Local) => Err(DropReason::LocalWithoutRoute),
        Some(Action::Remote(peer)) => Ok(peer),
    }
}

fn decide4(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize, segment: Option<usize>) -> Egress {
    let Ok(header) = ipv4::parse(packet) else { return Egress::Drop(DropReason::Malformed) };
    let peer = match peer_of(fib, header.dst) {
        Ok(peer) => peer,
        Err(reason) => return Egress::Drop(reason),
    };
    if header.ttl <= 1 {
        return Egress::DropWithIcmp(DropReason::TtlExceeded, IcmpError::TimeExceeded);
    }
    if segment.unwrap_or(header.total_len) > tunnel_mtu {
        return if header.dont_fragment {
            let mtu = u16::try_from(tunnel_mtu).unwrap_or(u16::MAX);
            Egress::DropWithIcmp(DropReason::TooBigDf, IcmpError::FragmentationNeeded { mtu })
        } else {
            Egress::Drop(DropReason::TooBigNoDf)
        };
    }
    ipv4::decrement_ttl(packet);
    Egress::Encap(peer)
}

fn decide6(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize, segment: Option<usize>) -> Egress {
    let Ok(header) = ipv6::parse(packet) else { return Egress::Drop(DropReason::Malformed) };
    if header.dst.is_multicast() {
        return Egress::Drop(DropReason::Multicast);
    }
    let peer = match peer_of(fib, header.dst) {
        Ok(peer) => peer,
        Err(reason) => return Egress::Drop(reason),
    };
    if header.hop_limit <= 1 {
        return Egress::DropWithIcmp6(DropReason::TtlExceeded, Icmp6Error::TimeExceeded);
    }
    if segment.unwrap_or(header.total_len()) > tunnel_mtu {
        let mtu = u32::try_from(tunnel_mtu).unwrap_or(u32::MAX);
        return Egress::DropWithIcmp6(DropReason::TooBigDf, Icmp6Error::PacketTooBig { mtu });
    }
    ipv6::decrement_hop_limit(packet);
    Egress::Encap(peer)
}

/// Validates a packet from the IP-in-IP raw socket (outer header included) and returns where its
/// inner packet lies: only IP-in-IP from a registered peer carrying valid IPv4 is accepted.
pub fn ingress(packet: &mut [u8], fib: &Fib) -> Result<Range<usize>, DropReason> {
    use ipv4::DecapError as E;
    let d = ipv4::decapsulate(packet).map_err(|e| match e {
        E::Outer(_) | E::NotIpInIp(_) | E::OuterFragment => DropReason::OuterMalformed,
        E::InnerNotIpv4(_) => DropReason::InnerNotIpv4,
        E::Inner(_) => DropReason::InnerMalformed,
        E::EcnDrop => DropReason::EcnDrop,
    })?;
    if !fib.is_peer(d.outer_src) {
        return Err(DropReason::UnknownPeer);
    }
    Ok(d.inner)
}

/// Validates a packet from the 6in4 raw socket (outer header included) and returns where its
/// inner packet lies: only protocol 41 from a registered peer carrying valid IPv6 is accepted
/// (RFC 4213 §3.6: the decapsulator checks the tunnel source).
pub fn ingress6(packet: &mut [u8], fib: &Fib) -> Result<Range<usize>, DropReason> {
    use sixin4::DecapError as E;
    let d = sixin4::decapsulate(packet).map_err(|e| match e {
        E::Outer(_) | E::NotSixInFour(_) | E::OuterFragment => DropReason::OuterMalformed,
        E::InnerNotIpv6(_) => DropReason::InnerNotIpv6,
        E::Inner(_) => DropReason::InnerMalformed,
        E::EcnDrop => DropReason::EcnDrop,
    })?;
    if !fib.is_peer(d.outer_src) {
        return Err(DropReason::UnknownPeer);
    }
    Ok(d.inner)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::packet::ipv4::{Tunnel, build_packet, encapsulate};

    const ME: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
    const LOCAL_VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 12);

    fn fib() -> Fib {
        let fib = Fib::new(ME);
        fib.set(VM, Action::Remote(PEER)).unwrap();
        fib.set(LOCAL_VM, Action::Local).unwrap();
        fib.set_peers([PEER]);
        fib
    }

    fn to(dst: Ipv4Addr, ttl: u8, df: bool, len: usize) -> Vec<u8> {
        build_packet(CLIENT, dst, 17, ttl, 0, df, &vec![0; len - 20])
    }

    #[test]
    fn egress_verdicts() {
        let fib = fib();
        let mut p = to(VM, 10, true, 100);
        assert_eq!(egress(&mut p, &fib, 1480), Egress::Encap(PEER));
        assert_eq!(ipv4::parse(&p).unwrap().ttl, 9, "tunnel is one hop");
        let cases = [
            (to(Ipv4Addr::new(10, 10, 9, 9), 10, true, 100), Egress::Drop(DropReason::NoBinding)),
            (to(LOCAL_VM, 10, true, 100), Egress::Drop(DropReason::LocalWithoutRoute)),
            (to(VM, 1, true, 100), Egress::DropWithIcmp(DropReason::TtlExceeded, IcmpError::TimeExceeded)),
            (
                to(VM, 10, true, 1481),
                Egress::DropWithIcmp(DropReason::TooBigDf, IcmpError::FragmentationNeeded { mtu: 1480 }),
            ),
            (to(VM, 10, false, 1481), Egress::Drop(DropReason::TooBigNoDf)),
            (vec![0x75; 40], Egress::Drop(DropReason::NotIp)),
            (vec![0x45; 10], Egress::Drop(DropReason::Malformed)),
        ];
        for (mut packet, verdict) in cases {
            assert_eq!(egress(&mut packet, &fib, 1480), verdict);
        }
        let mut exact = to(VM, 10, true, 1480);
        assert_eq!(egress(&mut exact, &fib, 1480), Egress::Encap(PEER));
    }

    #[test]
    fn super_packets_are_judged_by_their_segments() {
        let fib = fib();
        let mut sp = to(VM, 10, true, 30_000);
        assert_eq!(egress_super(&mut sp, &fib, 1480, 1480), Egress::Encap(PEER));
        assert_eq!(ipv4::parse(&sp).unwrap().ttl, 9);
        let mut sp = to(VM, 10, true, 30_000);
        assert_eq!(
            egress_super(&mut sp, &fib, 1480, 1500),
            Egress::DropWithIcmp(DropReason::TooBigDf, IcmpError::FragmentationNeeded { mtu: 1480 })
        );
        let mut sp = to(VM, 1, true, 30_000);
        assert_eq!(
            egress_super(&mut sp, &fib, 1480, 1480),
            Egress::DropWithIcmp(DropReason::TtlExceeded, IcmpError::TimeExceeded)
        );
    }

    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
    const VM6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);
    const LOCAL_VM6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x12);

    fn fib6() -> Fib {
        let fib = fib();
        fib.set(VM6, Action::Remote(PEER)).unwrap();
        fib.set(LOCAL_VM6, Action::Local).unwrap();
        fib
    }

    fn to6(dst: Ipv6Addr, hop: u8, len: usize) -> Vec<u8> {
        ipv6::build_packet(CLIENT6, dst, 17, hop, 0, &vec![0; len - 40])
    }

    #[test]
    fn egress6_verdicts() {
        let fib = fib6();
        let mut p = to6(VM6, 10, 100);
        assert_eq!(egress(&mut p, &fib, 1480), Egress::Encap(PEER));
        assert_eq!(ipv6::parse(&p).unwrap().hop_limit, 9, "tunnel is one hop");
        let too_big = Egress::DropWithIcmp6(DropReason::TooBigDf, Icmp6Error::PacketTooBig { mtu: 1480 });
        let cases = [
            (to6("2001:db8:10::99".parse().unwrap(), 10, 100), Egress::Drop(DropReason::NoBinding)),
            (to6(LOCAL_VM6, 10, 100), Egress::Drop(DropReason::LocalWithoutRoute)),
            (to6(VM6, 1, 100), Egress::DropWithIcmp6(DropReason::TtlExceeded, Icmp6Error::TimeExceeded)),
            (to6(VM6, 10, 1481), too_big),
            (vec![0x60; 30], Egress::Drop(DropReason::Malformed)),
            (to6("ff02::16".parse().unwrap(), 1, 76), Egress::Drop(DropReason::Multicast)),
            // An IPv4-mapped address is never looked up in the IPv4 table.
            (to6("::ffff:10.10.0.11".parse().unwrap(), 10, 100), Egress::Drop(DropReason::NoBinding)),
        ];
        for (mut packet, verdict) in cases {
            assert_eq!(egress(&mut packet, &fib, 1480), verdict);
        }
        let mut exact = to6(VM6, 10, 1480);
        assert_eq!(egress(&mut exact, &fib, 1480), Egress::Encap(PEER));
        let mut sp = to6(VM6, 10, 30_000);
        assert_eq!(egress_super(&mut sp, &fib, 1480, 1480), Egress::Encap(PEER));
        let mut sp = to6(VM6, 10, 30_000);
        assert_eq!(egress_super(&mut sp, &fib, 1480, 1481), too_big);
    }

    #[test]
    fn ingress6_accepts_only_registered_peers() {
        let fib = fib6();
        let inner = to6(VM6, 10, 80);
        let from = |src| Tunnel { src, dst: ME, ttl: 64 };
        let mut ok = sixin4::encapsulate(&inner, &from(PEER), 0).unwrap();
        let range = ingress6(&mut ok, &fib).unwrap();
        assert_eq!(&ok[range], &inner[..]);
        let mut spoofed = sixin4::encapsulate(&inner, &from(Ipv4Addr::new(203, 0, 113, 9)), 0).unwrap();
        assert_eq!(ingress6(&mut spoofed, &fib), Err(DropReason::UnknownPeer));
        let mut v4 = build_packet(PEER, ME, 41, 64, 0, false, &to(VM, 10, false, 40));
        assert_eq!(ingress6(&mut v4, &fib), Err(DropReason::InnerNotIpv6));
        let mut junk = build_packet(PEER, ME, 41, 64, 0, false, &[0x60; 30]);
        assert_eq!(ingress6(&mut junk, &fib), Err(DropReason::InnerMalformed));
        let mut ipip = encapsulate(&to(VM, 10, false, 60), &from(PEER), 0).unwrap();
        assert_eq!(ingress6(&mut ipip, &fib), Err(DropReason::OuterMalformed));
        // And the IP-in-IP path refuses 6in4.
        let mut six = sixin4::encapsulate(&inner, &from(PEER), 0).unwrap();
        assert_eq!(ingress(&mut six, &fib), Err(DropReason::OuterMalformed));
    }

    #[test]
    fn ingress_accepts_only_registered_peers() {
        let fib = fib();
        let inner = to(VM, 10, false, 60);
        let from = |src| Tunnel { src, dst: ME, ttl: 64 };
        let mut ok = encapsulate(&inner, &from(PEER), 0).unwrap();
        let range = ingress(&mut ok, &fib).unwrap();
        assert_eq!(&ok[range], &inner[..]);
        let mut stranger = encapsulate(&inner, &from(Ipv4Addr::new(203, 0, 113, 9)), 0).unwrap();
        assert_eq!(ingress(&mut stranger, &fib), Err(DropReason::UnknownPeer));
        let mut v6 = build_packet(PEER, ME, 4, 64, 0, false, &[0x60; 40]);
        assert_eq!(ingress(&mut v6, &fib), Err(DropReason::InnerNotIpv4));
        let mut junk = build_packet(PEER, ME, 4, 64, 0, false, &[0x45; 30]);
        assert_eq!(ingress(&mut junk, &fib), Err(DropReason::InnerMalformed));
        assert_eq!(ingress(&mut [1, 2, 3], &fib), Err(DropReason::OuterMalformed));
    }
}
