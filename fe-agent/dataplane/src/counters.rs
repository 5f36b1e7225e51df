//! Forwarder counters: packets/bytes per direction, drops by reason, ICMP and ICMPv6 errors sent.
//! Updated with relaxed atomics by the workers, read as a plain [`CounterSnapshot`] by the agent's
//! `/metrics`. Totals count both families; the `ipv6_*` fields and [`CounterSnapshot::drops_v6`]
//! are the IPv6 share (IPv6 = total − IPv4 share), so metrics can be split by family.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the forwarder dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// From TUN: destination has no binding.
    NoBinding,
    /// From TUN: destination is bound here, but the kernel has no /32 route for it yet.
    LocalWithoutRoute,
    /// From TUN: neither IPv4 nor IPv6.
    NotIp,
    /// From TUN: invalid IPv4 or IPv6 header.
    Malformed,
    /// From TUN: TTL (IPv6: hop limit) expired (an ICMP / ICMPv6 time exceeded is sent when
    /// allowed).
    TtlExceeded,
    /// From TUN: larger than the tunnel MTU with DF set, or any IPv6 packet larger than it (an
    /// ICMP fragmentation needed / ICMPv6 packet too big is sent).
    TooBigDf,
    /// From TUN: larger than the tunnel MTU without DF (inner fragmentation is not done; cannot
    /// happen while the TUN MTU is the tunnel MTU, as the kernel fragments before TUN).
    TooBigNoDf,
    /// Sending to the underlay failed (no route, buffer full, ...).
    UnderlaySendError,
    /// From the underlay: outer source is not a registered FE.
    UnknownPeer,
    /// From the underlay: invalid outer header / not IP-in-IP or 6in4 / outer fragment.
    OuterMalformed,
    /// From the underlay: IP-in-IP (protocol 4) whose inner packet is not IPv4.
    InnerNotIpv4,
    /// From the underlay: inner IPv4 / IPv6 header invalid.
    InnerMalformed,
    /// From the underlay: outer CE over a not-ECT inner packet (RFC 6040).
    EcnDrop,
    /// Writing into TUN failed.
    TunWriteError,
    /// From the underlay: a packet the underlay NIC's GRO coalesced beyond the tunnel MTU that is
    /// not TCP (its segment boundaries are lost, it cannot be split again).
    CoalescedNotTcp,
    /// From the underlay: 6in4 (protocol 41) whose inner packet is not IPv6.
    InnerNotIpv6,
    /// From TUN: IPv6 to a multicast group (e.g. the kernel's own MLD reports on the device):
    /// bindings are unicast, nothing multicast is ever tunnelled.
    Multicast,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 17] = [
        DropReason::NoBinding,
        DropReason::LocalWithoutRoute,
        DropReason::NotIp,
        DropReason::Malformed,
        DropReason::TtlExceeded,
        DropReason::TooBigDf,
        DropReason::TooBigNoDf,
        DropReason::UnderlaySendError,
        DropReason::UnknownPeer,
        DropReason::OuterMalformed,
        DropReason::InnerNotIpv4,
        DropReason::InnerMalformed,
        DropReason::EcnDrop,
        DropReason::TunWriteError,
        DropReason::CoalescedNotTcp,
        DropReason::InnerNotIpv6,
        DropReason::Multicast,
    ];

    /// A stable label for metrics (`reason="no_binding"`).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoBinding => "no_binding",
            DropReason::LocalWithoutRoute => "local_without_route",
            DropReason::NotIp => "not_ip",
            DropReason::Malformed => "malformed",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::TooBigDf => "too_big_df",
            DropReason::TooBigNoDf => "too_big_no_df",
            DropReason::UnderlaySendError => "underlay_send_error",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::OuterMalformed => "outer_malformed",
            DropReason::InnerNotIpv4 => "inner_not_ipv4",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::EcnDrop => "ecn_drop",
            DropReason::TunWriteError => "tun_write_error",
            DropReason::CoalescedNotTcp => "coalesced_not_tcp",
            DropReason::InnerNotIpv6 => "inner_not_ipv6",
            DropReason::Multicast => "multicast",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Live counters (shared between the workers and readers).
#[derive(Debug, Default)]
pub struct Counters {
    tun_rx_packets: AtomicU64,
    tun_rx_bytes: AtomicU64,
    tunnel_tx_packets: AtomicU64,
    tunnel_tx_bytes: AtomicU64,
    tunnel_rx_packets: AtomicU64,
    tunnel_rx_bytes: AtomicU64,
    tun_tx_packets: AtomicU64,
    tun_tx_bytes: AtomicU64,
    icmp_time_exceeded: AtomicU64,
    icmp_frag_needed: AtomicU64,
    icmp_suppressed: AtomicU64,
    icmp_rate_limited: AtomicU64,
    tun_reads: AtomicU64,
    tun_reads_gso: AtomicU64,
    tun_writes: AtomicU64,
    tun_writes_gso: AtomicU64,
    underlay_sends: AtomicU64,
    underlay_recvs: AtomicU64,
    underlay_rx_coalesced: AtomicU64,
    ipv6_tun_rx_packets: AtomicU64,
    ipv6_tunnel_tx_packets: AtomicU64,
    ipv6_tunnel_rx_packets: AtomicU64,
    ipv6_tun_tx_packets: AtomicU64,
    icmp6_time_exceeded: AtomicU64,
    icmp6_packet_too_big: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    drops_v6: [AtomicU64; DropReason::ALL.len()],
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Packets read from TUN (towards the tunnel); each segment of a super-packet counts.
    pub tun_rx_packets: u64,
    /// Bytes read from TUN.
    pub tun_rx_bytes: u64,
    /// Encapsulated packets sent to peers.
    pub tunnel_tx_packets: u64,
    /// Bytes sent to peers (outer packets).
    pub tunnel_tx_bytes: u64,
    /// IP-in-IP packets received from the underlay (all, before checks); a packet the underlay
    /// NIC coalesced counts once (see `underlay_rx_coalesced`).
    pub tunnel_rx_packets: u64,
    /// Bytes received from the underlay (outer packets).
    pub tunnel_rx_bytes: u64,
    /// Decapsulated packets written into TUN (as received from the underlay: the packets
    /// coalesced into one write count one each; `tun_writes` counts the writes).
    pub tun_tx_packets: u64,
    /// Bytes written into TUN.
    pub tun_tx_bytes: u64,
    /// ICMP time exceeded sent.
    pub icmp_time_exceeded: u64,
    /// ICMP fragmentation needed sent.
    pub icmp_frag_needed: u64,
    /// ICMPv6 time exceeded (hop limit) sent.
    pub icmp6_time_exceeded: u64,
    /// ICMPv6 packet too big sent.
    pub icmp6_packet_too_big: u64,
    /// ICMP / ICMPv6 errors not sent because the offending packet must not be answered.
    pub icmp_suppressed: u64,
    /// ICMP / ICMPv6 errors not sent because the forwarder's rate limit (shared by both) was
    /// exhausted.
    pub icmp_rate_limited: u64,
    /// `read` calls on TUN that returned a packet (one call may return a GSO super-packet of
    /// many segments: segments per read = `tun_rx_packets / tun_reads`).
    pub tun_reads: u64,
    /// Of those, reads that returned a GSO super-packet.
    pub tun_reads_gso: u64,
    /// `write` calls into TUN (one may carry a coalesced super-packet of many received packets).
    pub tun_writes: u64,
    /// Of those, writes of a super-packet (virtio-net header with GSO).
    pub tun_writes_gso: u64,
    /// `sendmmsg` calls on the underlay socket (packets per call = `tunnel_tx_packets / this`).
    pub underlay_sends: u64,
    /// `recvmmsg` calls on the underlay socket that returned packets.
    pub underlay_recvs: u64,
    /// Packets from the underlay longer than the tunnel MTU: segments the kernel's GRO had
    /// already coalesced (the underlay NIC does GRO), forwarded into TUN as one super-packet.
    pub underlay_rx_coalesced: u64,
    /// Of `tun_rx_packets`: IPv6.
    pub ipv6_tun_rx_packets: u64,
    /// Of `tunnel_tx_packets`: 6in4.
    pub ipv6_tunnel_tx_packets: u64,
    /// Of `tunnel_rx_packets`: received on the 6in4 socket.
    pub ipv6_tunnel_rx_packets: u64,
    /// Of `tun_tx_packets`: IPv6.
    pub ipv6_tun_tx_packets: u64,
    /// Drops per reason (both families), in [`DropReason::ALL`] order.
    pub drops: Vec<(DropReason, u64)>,
    /// Of `drops`: IPv6 packets (from TUN) and 6in4 packets (from the underlay), same order.
    pub drops_v6: Vec<(DropReason, u64)>,
}

impl CounterSnapshot {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
    }

    /// All drops.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum()
    }

    /// IPv6 drops for one reason.
    pub fn dropped_v6(&self, reason: DropReason) -> u64 {
        self.drops_v6.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
    }
}

/// The address family of a packet (IPv4, or IPv6 / 6in4), for the per-family counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Counters {
    /// `packets` read from TUN (the segments of a super-packet count one each), `bytes` in all.
    pub(crate) fn tun_rx(&self, family: Family, packets: u64, bytes: usize) {
        self.tun_rx_packets.fetch_add(packets, Relaxed);
        self.tun_rx_bytes.fetch_add(bytes as u64, Relaxed);
        if family == Family::V6 {
            self.ipv6_tun_rx_packets.fetch_add(packets, Relaxed);
        }
    }

    pub(crate) fn tunnel_tx(&self, packets: u64, bytes: u64) {
        self.tunnel_tx_packets.fetch_add(packets, Relaxed);
        self.tunnel_tx_bytes.fetch_add(bytes, Relaxed);
    }

    /// `packets` 6in4 packets handed to the underlay socket (of those `tunnel_tx` counts).
    pub(crate) fn ipv6_tunnel_tx(&self, packets: u64) {
        self.ipv6_tunnel_tx_packets.fetch_add(packets, Relaxed);
    }

    pub(crate) fn tunnel_rx(&self, family: Family, bytes: usize) {
        self.tunnel_rx_packets.fetch_add(1, Relaxed);
        self.tunnel_rx_bytes.fetch_add(bytes as u64, Relaxed);
        if family == Family::V6 {
            self.ipv6_tunnel_rx_packets.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn tun_tx(&self, family: Family, packets: u64, bytes: u64) {
        self.tun_tx_packets.fetch_add(packets, Relaxed);
        self.tun_tx_bytes.fetch_add(bytes, Relaxed);
        if family == Family::V6 {
            self.ipv6_tun_tx_packets.fetch_add(packets, Relaxed);
        }
    }

    pub(crate) fn icmp_sent(&self, frag_needed: bool) {
        let c = if frag_needed { &self.icmp_frag_needed } else { &self.icmp_time_exceeded };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn icmp6_sent(&self, too_big: bool) {
        let c = if too_big { &self.icmp6_packet_too_big } else { &self.icmp6_time_exceeded };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn icmp_suppressed(&self) {
        self.icmp_suppressed.fetch_add(1, Relaxed);
    }

    pub(crate) fn icmp_rate_limited(&self) {
        self.icmp_rate_limited.fetch_add(1, Relaxed);
    }

    /// One `read` from TUN; `gso` when it returned a super-packet.
    pub(crate) fn tun_read(&self, gso: bool) {
        self.tun_reads.fetch_add(1, Relaxed);
        if gso {
            self.tun_reads_gso.fetch_add(1, Relaxed);
        }
    }

    /// One `write` into TUN; `gso` when it carried a super-packet.
    pub(crate) fn tun_write(&self, gso: bool) {
        self.tun_writes.fetch_add(1, Relaxed);
        if gso {
            self.tun_writes_gso.fetch_add(1, Relaxed);
        }
    }

    /// `calls` `sendmmsg` calls on the underlay socket.
    pub(crate) fn underlay_sends(&self, calls: u64) {
        self.underlay_sends.fetch_add(calls, Relaxed);
    }

    /// One `recvmmsg` that returned packets, `coalesced` of them longer than the tunnel MTU.
    pub(crate) fn underlay_recv(&self, coalesced: u64) {
        self.underlay_recvs.fetch_add(1, Relaxed);
        self.underlay_rx_coalesced.fetch_add(coalesced, Relaxed);
    }

    pub(crate) fn discard(&self, family: Family, reason: DropReason) {
        self.drops_n(family, reason, 1);
    }

    pub(crate) fn drops_n(&self, family: Family, reason: DropReason, n: u64) {
        self.drops[reason.index()].fetch_add(n, Relaxed);
        if family == Family::V6 {
            self.drops_v6[reason.index()].fetch_add(n, Relaxed);
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            tun_rx_packets: self.tun_rx_packets.load(Relaxed),
            tun_rx_bytes: self.tun_rx_bytes.load(Relaxed),
            tunnel_tx_packets: self.tunnel_tx_packets.load(Relaxed),
            tunnel_tx_bytes: self.tunnel_tx_bytes.load(Relaxed),
            tunnel_rx_packets: self.tunnel_rx_packets.load(Relaxed),
            tunnel_rx_bytes: self.tunnel_rx_bytes.load(Relaxed),
            tun_tx_packets: self.tun_tx_packets.load(Relaxed),
            tun_tx_bytes: self.tun_tx_bytes.load(Relaxed),
            icmp_time_exceeded: self.icmp_time_exceeded.load(Relaxed),
            icmp_frag_needed: self.icmp_frag_needed.load(Relaxed),
            icmp6_time_exceeded: self.icmp6_time_exceeded.load(Relaxed),
            icmp6_packet_too_big: self.icmp6_packet_too_big.load(Relaxed),
            icmp_suppressed: self.icmp_suppressed.load(Relaxed),
            icmp_rate_limited: self.icmp_rate_limited.load(Relaxed),
            tun_reads: self.tun_reads.load(Relaxed),
            tun_reads_gso: self.tun_reads_gso.load(Relaxed),
            tun_writes: self.tun_writes.load(Relaxed),
            tun_writes_gso: self.tun_writes_gso.load(Relaxed),
            underlay_sends: self.underlay_sends.load(Relaxed),
            underlay_recvs: self.underlay_recvs.load(Relaxed),
            underlay_rx_coalesced: self.underlay_rx_coalesced.load(Relaxed),
            ipv6_tun_rx_packets: self.ipv6_tun_rx_packets.load(Relaxed),
            ipv6_tunnel_tx_packets: self.ipv6_tunnel_tx_packets.load(Relaxed),
            ipv6_tunnel_rx_packets: self.ipv6_tunnel_rx_packets.load(Relaxed),
            ipv6_tun_tx_packets: self.ipv6_tun_tx_packets.load(Relaxed),
            drops: DropReason::ALL.iter().map(|&r| (r, self.drops[r.index()].load(Relaxed))).collect(),
            drops_v6: DropReason::ALL.iter().map(|&r| (r, self.drops_v6[r.index()].load(Relaxed))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let c = Counters::default();
        c.discard(Family::V4, DropReason::UnknownPeer);
        c.drops_n(Family::V6, DropReason::NoBinding, 2);
        c.drops_n(Family::V4, DropReason::NoBinding, 1);
        c.tun_rx(Family::V6, 3, 300);
        c.tun_rx(Family::V4, 1, 100);
        let s = c.snapshot();
        assert_eq!(s.dropped(DropReason::UnknownPeer), 1);
        assert_eq!(s.dropped(DropReason::NoBinding), 3);
        assert_eq!((s.dropped_v6(DropReason::NoBinding), s.dropped_v6(DropReason::UnknownPeer)), (2, 0));
        assert_eq!(s.dropped_total(), 4);
        assert_eq!((s.tun_rx_packets, s.ipv6_tun_rx_packets, s.tun_rx_bytes), (4, 3, 400));
    }
}
