//! The forwarder's side of announced migrations ([`crate::migration`]), on the ingress path:
//! sorts each received batch (copy to the announced FE, hold for a VM about to arrive, or
//! deliver), sends the copies, and writes into TUN what a VM's arrival released.
//!
//! Costs nothing while no migration is announced: the ingress loop checks
//! [`crate::migration::Migrations::is_empty`] once per batch and skips all of this.

use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::time::Instant;

use super::buf::PacketBuf;
use super::raw::Mmsg;
use super::shared::{Queue, Shared, family_of, send_all, write_tun};
use crate::counters::DropReason;
use crate::fib::Action;
use crate::migration::Verdict;
use crate::packet::gso::{self, GsoKind, Segment, VNET_HDR_LEN, VnetHdr};
use crate::packet::ipv4::{self, Tunnel};
use crate::packet::{ipv6, sixin4};

/// One ingress loop's relay state (buffers reused from batch to batch).
pub(crate) struct Relay {
    /// Encapsulated copies and where they go.
    copies: Vec<(Vec<u8>, Ipv4Addr)>,
    arena: Vec<u8>,
    segs: Vec<Segment>,
    mmsg: Mmsg,
}

/// The destination of a decapsulated packet (validated by the decapsulation).
fn destination(inner: &[u8]) -> Option<IpAddr> {
    match ipv4::version(inner)? {
        4 => ipv4::parse(inner).ok().map(|h| IpAddr::V4(h.dst)),
        6 => ipv6::parse(inner).ok().map(|h| IpAddr::V6(h.dst)),
        _ => None,
    }
}

/// Calls `each` with every packet of at most `mtu` bytes that `packet` stands for: itself, or
/// the segments of a TCP packet the underlay's GRO coalesced, each with an outer header for
/// `outer` if given, each built once into its own buffer. Returns false if it cannot be split.
fn for_each_packet(
    packet: &[u8],
    mtu: usize,
    outer: Option<&Tunnel>,
    arena: &mut Vec<u8>,
    segs: &mut Vec<Segment>,
    mut each: impl FnMut(Vec<u8>),
) -> bool {
    if packet.len() <= mtu {
        match outer {
            None => each(packet.to_vec()),
            Some(t) => {
                let encapsulated = match ipv4::version(packet) {
                    Some(6) => sixin4::encapsulate(packet, t, 0).ok(),
                    _ => ipv4::encapsulate(packet, t, 0).ok(),
                };
                match encapsulated {
                    Some(e) => each(e),
                    None => return false,
                }
            }
        }
        return true;
    }
    arena.clear();
    segs.clear();
    let Ok(layout) = gso::layout(packet, GsoKind::Tcp) else { return false };
    let size = mtu.saturating_sub(layout.headers_len()).max(1);
    if gso::segment(packet, GsoKind::Tcp, size, outer, arena, segs).is_err() {
        return false;
    }
    for s in segs.iter() {
        each([&arena[s.header.clone()], &packet[s.payload.clone()]].concat());
    }
    true
}

impl Relay {
    pub(crate) fn new() -> Self {
        Relay { copies: Vec::new(), arena: Vec::new(), segs: Vec::new(), mmsg: Mmsg::with_capacity(64) }
    }

    /// Sorts the `accepted` packets of a batch (index into `bufs`, inner packet range): queues a
    /// copy of those to copy, holds those to hold (and removes them from `accepted`), leaves the
    /// rest to be delivered.
    pub(crate) fn sort(&mut self, sh: &Shared, bufs: &[PacketBuf], accepted: &mut Vec<(usize, Range<usize>)>) {
        let migrations = sh.fib.migrations();
        let me = sh.fib.local_underlay();
        let now = Instant::now();
        self.copies.clear();
        accepted.retain(|(i, range)| {
            let whole = bufs[*i].as_ref();
            let inner = &whole[range.clone()];
            let (Some(vm), Ok(outer)) = (destination(inner), ipv4::parse(whole)) else { return true };
            let local = sh.fib.lookup(vm) == Some(Action::Local);
            match migrations.verdict(vm, outer.src, local, me) {
                Verdict::Deliver => true,
                Verdict::DeliverAndCopy(to) => {
                    let tunnel = Tunnel { src: me, dst: to, ttl: sh.outer_ttl };
                    let copies = &mut self.copies;
                    for_each_packet(inner, sh.tunnel_mtu, Some(&tunnel), &mut self.arena, &mut self.segs, |copy| {
                        copies.push((copy, to));
                    });
                    true
                }
                Verdict::Hold => {
                    let held = for_each_packet(inner, sh.tunnel_mtu, None, &mut self.arena, &mut self.segs, |packet| {
                        migrations.hold(vm, packet, now);
                    });
                    if !held {
                        sh.counters.discard(family_of(inner), DropReason::CoalescedNotTcp);
                    } else if sh.fib.lookup(vm) == Some(Action::Local) {
                        // It arrived while we decided: its release may have missed this one.
                        migrations.release(vm, Instant::now());
                    }
                    false
                }
            }
        });
    }

    /// Sends the copies queued by [`Relay::sort`].
    pub(crate) async fn send_copies(&mut self, sh: &Shared, q: &Queue) -> io::Result<()> {
        if self.copies.is_empty() {
            return Ok(());
        }
        let copies = &self.copies;
        let (sent, bytes) =
            send_all(sh, q, &mut self.mmsg, copies.len(), |i| (&copies[i].0[..], &[][..], copies[i].1)).await?;
        sh.counters.tunnel_tx(sent, bytes);
        sh.counters.ipv6_tunnel_tx(copies.iter().filter(|(c, _)| c.get(9) == Some(&ipv4::PROTO_IPV6)).count() as u64);
        sh.fib.migrations().copied(sent);
        Ok(())
    }
}

/// Writes into TUN the packets a VM's arrival released (with an empty virtio-net header when
/// the queues carry one).
pub(crate) async fn write_released(sh: &Shared, q: &Queue) -> io::Result<()> {
    let vnet = VnetHdr::default().encode();
    for p in sh.fib.migrations().take_released() {
        let packet = &p.packet[..];
        let family = family_of(packet);
        let len = packet.len() as u64;
        if sh.offload {
            let iov = [IoSlice::new(&vnet[..VNET_HDR_LEN]), IoSlice::new(packet)];
            write_tun(sh, q, family, &iov, 1, len, false).await?;
        } else {
            write_tun(sh, q, family, &[IoSlice::new(packet)], 1, len, false).await?;
        }
    }
    Ok(())
}
