//! What several fuzz targets check the same way: the tunnel decapsulation path, whichever
//! encapsulation it serves (IP-in-IP for IPv4, 6in4 for IPv6).

use std::net::Ipv4Addr;
use std::ops::Range;

use victor_dataplane::counters::DropReason;
use victor_dataplane::fib::Fib;
use victor_dataplane::packet::gro::Coalescer;
use victor_dataplane::packet::ipv4;

/// One encapsulation's decapsulation path and what must hold for a packet it accepts.
pub struct Decapsulation {
    /// Its name in assertion messages ("IP-in-IP", "6in4").
    pub name: &'static str,
    /// The pipeline's ingress: decapsulates in place, returns the inner packet's range.
    pub ingress: fn(&mut [u8], &Fib) -> Result<Range<usize>, DropReason>,
    /// Checks an accepted inner packet (`packet[inner]`, received as `original`); returns its
    /// total length as its header says.
    pub check_inner: fn(original: &[u8], packet: &[u8], inner: Range<usize>) -> usize,
}

/// The decapsulation path (packets received on the underlay raw socket): never panics, only
/// accepts packets from registered peers, and what it accepts passes `check_inner`. The input is
/// cut into up to four received packets (first byte: cut points); the accepted ones go through
/// the TUN-write planner (userspace GRO), which never panics, writes every accepted packet
/// exactly once, and rejects only coalesced packets longer than the MTU.
pub fn check_decapsulation(input: &[u8], path: &Decapsulation) {
    let Some((&cuts, data)) = input.split_first() else { return };
    let fib = Fib::new(Ipv4Addr::new(192, 0, 2, 1));
    fib.set_peers([Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)]);
    // Up to four packets: cut points from the first byte's 2-bit fields, scaled to the data.
    let mut bounds = vec![0];
    for k in 0..3 {
        let at = usize::from((cuts >> (2 * k)) & 3) * data.len() / 4;
        bounds.push(at.max(*bounds.last().expect("non-empty")));
    }
    bounds.push(data.len());
    let mut accepted: Vec<(Vec<u8>, usize)> = Vec::new();
    for w in bounds.windows(2) {
        let original = &data[w[0]..w[1]];
        let mut packet = original.to_vec();
        if let Ok(inner) = (path.ingress)(&mut packet, &fib) {
            assert!(inner.end <= packet.len() && inner.start <= inner.end);
            let outer = ipv4::parse_header(original).expect("accepted packets have a valid outer header");
            assert!(fib.is_peer(outer.src), "accepted {} from an unregistered source {}", path.name, outer.src);
            let total_len = (path.check_inner)(original, &packet, inner.clone());
            accepted.push((packet[inner].to_vec(), total_len));
        }
    }
    let mut c = Coalescer::new();
    c.plan(accepted.len(), |i| &accepted[i].0, 1480);
    let mut written: Vec<usize> = c.writes().iter().flat_map(|w| c.members()[w.members.clone()].to_vec()).collect();
    written.extend(c.rejected().iter().map(|(i, _)| *i));
    written.sort_unstable();
    assert_eq!(written, (0..accepted.len()).collect::<Vec<_>>(), "every packet written or rejected once");
    for (i, _) in c.rejected() {
        assert!(accepted[*i].1 > 1480, "only coalesced packets are rejected");
    }
}
