//! Forwarder counters: packets/bytes per direction, drops by reason, ICMP errors sent. Updated
//! with relaxed atomics by the workers, read as a plain [`CounterSnapshot`] by the agent's
//! `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the forwarder dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// From TUN: destination has no binding.
    NoBinding,
    /// From TUN: destination is bound here, but the kernel has no /32 route for it yet.
    LocalWithoutRoute,
    /// From TUN: not an IPv4 packet (IPv6 is not carried).
    NotIpv4,
    /// From TUN: invalid IPv4 header.
    Malformed,
    /// From TUN: TTL expired (an ICMP time exceeded is sent when allowed).
    TtlExceeded,
    /// From TUN: larger than the tunnel MTU with DF set (an ICMP fragmentation needed is sent).
    TooBigDf,
    /// From TUN: larger than the tunnel MTU without DF (inner fragmentation is not done; cannot
    /// happen while the TUN MTU is the tunnel MTU, as the kernel fragments before TUN).
    TooBigNoDf,
    /// Sending to the underlay failed (no route, buffer full, ...).
    UnderlaySendError,
    /// From the underlay: outer source is not a registered FE.
    UnknownPeer,
    /// From the underlay: invalid outer header / not IP-in-IP / outer fragment.
    OuterMalformed,
    /// From the underlay: inner packet is not IPv4.
    InnerNotIpv4,
    /// From the underlay: inner IPv4 header invalid.
    InnerMalformed,
    /// From the underlay: outer CE over a not-ECT inner packet (RFC 6040).
    EcnDrop,
    /// Writing into TUN failed.
    TunWriteError,
    /// From the underlay: a packet the underlay NIC's GRO coalesced beyond the tunnel MTU that is
    /// not TCP (its segment boundaries are lost, it cannot be split again).
    CoalescedNotTcp,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 15] = [
        DropReason::NoBinding,
        DropReason::LocalWithoutRoute,
        DropReason::NotIpv4,
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
    ];

    /// A stable label for metrics (`reason="no_binding"`).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoBinding => "no_binding",
            DropReason::LocalWithoutRoute => "local_without_route",
            DropReason::NotIpv4 => "not_ipv4",
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
    drops: [AtomicU64; DropReason::ALL.len()],
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
    /// ICMP errors not sent because the offending packet must not be answered.
    pub icmp_suppressed: u64,
    /// ICMP errors not sent because the forwarder's ICMP rate limit was exhausted.
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
    /// Drops per reason, in [`DropReason::ALL`] order.
    pub drops: Vec<(DropReason, u64)>,
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
}

impl Counters {
    /// `packets` read from TUN (the segments of a super-packet count one each), `bytes` in all.
    pub(crate) fn tun_rx(&self, packets: u64, bytes: usize) {
        self.tun_rx_packets.fetch_add(packets, Relaxed);
        self.tun_rx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn tunnel_tx(&self, packets: u64, bytes: u64) {
        self.tunnel_tx_packets.fetch_add(packets, Relaxed);
        self.tunnel_tx_bytes.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn tunnel_rx(&self, bytes: usize) {
        self.tunnel_rx_packets.fetch_add(1, Relaxed);
        self.tunnel_rx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub(crate) fn tun_tx(&self, packets: u64, bytes: u64) {
        self.tun_tx_packets.fetch_add(packets, Relaxed);
        self.tun_tx_bytes.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn icmp_sent(&self, frag_needed: bool) {
        let c = if frag_needed { &self.icmp_frag_needed } else { &self.icmp_time_exceeded };
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

    pub(crate) fn discard(&self, reason: DropReason) {
        self.drops_n(reason, 1);
    }

    pub(crate) fn drops_n(&self, reason: DropReason, n: u64) {
        self.drops[reason.index()].fetch_add(n, Relaxed);
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
            icmp_suppressed: self.icmp_suppressed.load(Relaxed),
            icmp_rate_limited: self.icmp_rate_limited.load(Relaxed),
            tun_reads: self.tun_reads.load(Relaxed),
            tun_reads_gso: self.tun_reads_gso.load(Relaxed),
            tun_writes: self.tun_writes.load(Relaxed),
            tun_writes_gso: self.tun_writes_gso.load(Relaxed),
            underlay_sends: self.underlay_sends.load(Relaxed),
            underlay_recvs: self.underlay_recvs.load(Relaxed),
            underlay_rx_coalesced: self.underlay_rx_coalesced.load(Relaxed),
            drops: DropReason::ALL.iter().map(|&r| (r, self.drops[r.index()].load(Relaxed))).collect(),
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
        c.discard(DropReason::UnknownPeer);
        c.drops_n(DropReason::NoBinding, 2);
        let s = c.snapshot();
        assert_eq!(s.dropped(DropReason::UnknownPeer), 1);
        assert_eq!(s.dropped(DropReason::NoBinding), 2);
        assert_eq!(s.dropped_total(), 3);
    }
}
