//! The per-packet decisions of the forwarder, pure (no IO) so they are unit-tested directly:
//! what to do with a packet read from TUN ([`egress`]) and with one received from the underlay
//! ([`ingress`]).

use std::net::Ipv4Addr;
use std::ops::Range;

use crate::counters::DropReason;
use crate::fib::{Action, Fib};
use crate::packet::icmp::IcmpError;
use crate::packet::ipv4;

/// Verdict for a packet read from TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Encapsulate (TTL already decremented) and send to this peer.
    Encap(Ipv4Addr),
    /// Drop silently (counted).
    Drop(DropReason),
    /// Drop (counted) and answer the source with this ICMP error, if allowed.
    DropWithIcmp(DropReason, IcmpError),
}

/// Decides the fate of `packet` (exactly one IPv4 packet read from TUN). The tunnel is one router
/// hop: TTL ≤ 1 is answered with time exceeded, otherwise the TTL is decremented in place. A
/// packet longer than `tunnel_mtu` with DF gets "fragmentation needed" carrying `tunnel_mtu`.
pub fn egress(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize) -> Egress {
    decide(packet, fib, tunnel_mtu, None)
}

/// [`egress`] for a super-packet read from TUN that will leave as segments of at most
/// `largest_segment` bytes (IPv4 header included): the decision is taken once for all of them,
/// and the MTU check applies to a segment.
pub fn egress_super(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize, largest_segment: usize) -> Egress {
    decide(packet, fib, tunnel_mtu, Some(largest_segment))
}

fn decide(packet: &mut [u8], fib: &Fib, tunnel_mtu: usize, segment: Option<usize>) -> Egress {
    let header = match ipv4::parse(packet) {
        Ok(h) => h,
        Err(ipv4::Ipv4Error::Version(_)) => return Egress::Drop(DropReason::NotIpv4),
        Err(_) => return Egress::Drop(DropReason::Malformed),
    };
    let peer = match fib.lookup(header.dst) {
        None => return Egress::Drop(DropReason::NoBinding),
        Some(Action::Local) => return Egress::Drop(DropReason::LocalWithoutRoute),
        Some(Action::Remote(peer)) => peer,
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

/// Validates a packet from the underlay raw socket (outer header included) and returns where its
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

#[cfg(test)]
mod tests {
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
            (vec![0x60; 40], Egress::Drop(DropReason::NotIpv4)),
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
