//! The kernel data plane's counters, as /metrics shows them: read from the link statistics of its
//! devices ([`super::devices`]) when `/metrics` is scraped ([`KernelCounters::refresh`]).
//!
//! * per peer: packets, bytes and errors each way on the tunnel devices to that FE (its ipip and
//!   its `sit` device added up: IPv4 and IPv6 VMs behind it alike);
//! * totals: the sums over the peer devices (`tunnel_tx`, `tunnel_rx`);
//! * drops by reason: `unknown_peer` (IP-in-IP or 6in4 from a source that is no registered FE:
//!   what the two catch-all devices received, all of it dropped by the kernel), `no_binding` (what the sink
//!   transmitted: packets for mobile IPs without a binding), `tunnel_tx_error` and
//!   `tunnel_rx_error` (the peer devices' errors: no route to the peer, too big for the path,
//!   malformed on receive).
//!
//! The counters live in the kernel: they survive an agent restart; a peer device deleted and
//! created again starts from zero (a counter reset, as Prometheus understands it).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use rtnetlink::Handle;

use super::devices::{self, Counts, Role};
use crate::metrics::{PeerCounts, TunnelCounts, TunnelSnapshot};

/// Which devices to read, by interface index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    /// The catch-all device.
    pub catch_all: u32,
    /// The 6in4 catch-all device (0: none, the kernel has no `sit`).
    pub catch_all6: u32,
    /// The sink device.
    pub sink: u32,
    /// Peer tunnel devices (ipip and sit), by index.
    pub peers: BTreeMap<u32, Ipv4Addr>,
}

/// The counters of the running kernel data plane.
#[derive(Debug)]
pub struct KernelCounters {
    handle: Handle,
    watched: Mutex<Watched>,
    last: Mutex<TunnelSnapshot>,
}

impl KernelCounters {
    /// Counters of the devices in `watched`, read through `handle`.
    pub fn new(handle: Handle, watched: Watched) -> Self {
        KernelCounters { handle, watched: Mutex::new(watched), last: Mutex::new(TunnelSnapshot::default()) }
    }

    /// Replaces the set of devices (the plane calls this whenever it adds or removes one).
    pub fn watch(&self, watched: Watched) {
        *self.watched.lock().expect("counters lock") = watched;
    }

    /// Reads every device's statistics from the kernel now.
    pub async fn refresh(&self) -> Result<(), devices::DeviceError> {
        let all = devices::all(&self.handle).await?;
        let by_index: BTreeMap<u32, Counts> = all.iter().map(|d| (d.index, d.counts)).collect();
        let watched = self.watched.lock().expect("counters lock").clone();
        *self.last.lock().expect("counters lock") = snapshot(&watched, &by_index);
        Ok(())
    }
}

impl TunnelCounts for KernelCounters {
    fn snapshot(&self) -> TunnelSnapshot {
        self.last.lock().expect("counters lock").clone()
    }
}

/// The snapshot of `watched` given every device's counts (devices that vanished count zero; so
/// does an absent catch-all, index 0).
pub fn snapshot(watched: &Watched, counts: &BTreeMap<u32, Counts>) -> TunnelSnapshot {
    let of = |index: u32| counts.get(&index).copied().unwrap_or_default();
    // A peer's ipip and sit devices add up to one series.
    let mut per_peer: BTreeMap<Ipv4Addr, Counts> = BTreeMap::new();
    for (&index, &peer) in &watched.peers {
        *per_peer.entry(peer).or_default() += of(index);
    }
    let mut total = Counts::default();
    let mut s = TunnelSnapshot::default();
    for (peer, c) in per_peer {
        total += c;
        s.peers.push(PeerCounts {
            peer,
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
            tx_errors: c.tx_errors,
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            rx_errors: c.rx_errors,
        });
    }
    (s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes) =
        (total.tx_packets, total.tx_bytes, total.rx_packets, total.rx_bytes);
    let mut catch_all = of(watched.catch_all);
    catch_all += of(watched.catch_all6);
    s.drops = vec![
        ("unknown_peer", catch_all.rx_packets),
        ("no_binding", of(watched.sink).tx_packets),
        ("tunnel_tx_error", total.tx_errors),
        ("tunnel_rx_error", total.rx_errors + catch_all.rx_errors),
    ];
    s
}

/// The watched set for a list of our devices by role.
pub fn watched_of<'a>(devices: impl IntoIterator<Item = (Role, u32)> + 'a) -> Watched {
    let mut w = Watched::default();
    for (role, index) in devices {
        match role {
            Role::CatchAll => w.catch_all = index,
            Role::CatchAll6 => w.catch_all6 = index,
            Role::Sink => w.sink = index,
            Role::Peer(peer) | Role::Peer6(peer) => {
                w.peers.insert(index, peer);
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_the_peer_sums_and_drops_come_from_catch_all_and_sink() {
        let (a, b) = (Ipv4Addr::new(198, 51, 100, 2), Ipv4Addr::new(198, 51, 100, 3));
        let watched = watched_of([(Role::CatchAll, 1), (Role::Sink, 2), (Role::Peer(b), 4), (Role::Peer(a), 3)]);
        let counts = BTreeMap::from([
            (1, Counts { rx_packets: 5, rx_bytes: 500, ..Counts::default() }),
            (2, Counts { tx_packets: 7, tx_bytes: 700, ..Counts::default() }),
            (3, Counts { tx_packets: 10, tx_bytes: 1000, rx_packets: 1, rx_bytes: 100, tx_errors: 2, rx_errors: 0 }),
            (4, Counts { tx_packets: 20, tx_bytes: 2000, rx_packets: 3, rx_bytes: 300, tx_errors: 0, rx_errors: 1 }),
        ]);
        let s = snapshot(&watched, &counts);
        assert_eq!((s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes), (30, 3000, 4, 400));
        assert_eq!(s.peers.iter().map(|p| p.peer).collect::<Vec<_>>(), vec![a, b], "sorted by peer");
        assert_eq!(s.peers[0].tx_errors, 2);
        let drops: BTreeMap<_, _> = s.drops.into_iter().collect();
        assert_eq!(drops["unknown_peer"], 5);
        assert_eq!(drops["no_binding"], 7);
        assert_eq!(drops["tunnel_tx_error"], 2);
        assert_eq!(drops["tunnel_rx_error"], 1);
        // A peer's sit device adds to its ipip device's series; the 6in4 catch-all to the drops.
        let watched = watched_of([
            (Role::CatchAll, 1),
            (Role::CatchAll6, 6),
            (Role::Sink, 2),
            (Role::Peer(a), 3),
            (Role::Peer6(a), 5),
        ]);
        let mut counts = counts;
        counts.insert(5, Counts { tx_packets: 4, tx_bytes: 400, rx_packets: 2, rx_bytes: 200, ..Counts::default() });
        counts.insert(6, Counts { rx_packets: 3, rx_errors: 1, ..Counts::default() });
        let s = snapshot(&watched, &counts);
        assert_eq!(s.peers.len(), 1, "one series per peer: {:?}", s.peers);
        assert_eq!((s.peers[0].tx_packets, s.peers[0].rx_packets, s.peers[0].tx_bytes), (14, 3, 1400));
        let drops: BTreeMap<_, _> = s.drops.into_iter().collect();
        assert_eq!(drops["unknown_peer"], 8);
        assert_eq!(drops["tunnel_rx_error"], 1);
        // A device that vanished counts zero instead of failing the scrape.
        let s = snapshot(&watched_of([(Role::Peer(a), 99)]), &counts);
        assert_eq!(s.peers[0].tx_packets, 0);
    }
}
