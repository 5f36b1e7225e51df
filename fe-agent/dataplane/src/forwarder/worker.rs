//! One forwarding worker: a TUN queue, the raw underlay sockets (IP-in-IP and 6in4) and an ICMPv6
//! socket, served on the worker's own thread by three loops on a tokio current-thread runtime.
//!
//! * [`egress_loop`]: TUN → encapsulate → underlay, IPv4 and IPv6 alike. Reads up to [`FRAMES`]
//!   packets per wake-up, each possibly a 64 KiB GSO super-packet; decides once per super-packet
//!   ([`pipeline::egress_super`]); splits it with [`gso::segment`], which writes each segment's
//!   outer (IP-in-IP or 6in4) + inner headers into an arena and leaves the payload in place;
//!   sends everything with `sendmmsg` on the IP-in-IP socket (header included, so 6in4 too), each
//!   message `[headers, payload slice]`. One checksum pass over the payload, one copy (the
//!   kernel's), no allocation per packet.
//! * [`ingress_loop`], once per protocol: underlay → decapsulate → TUN. Receives up to
//!   [`INGRESS_BATCH`] packets with one `recvmmsg`, decapsulates in place ([`pipeline::ingress`]
//!   or [`pipeline::ingress6`]), and writes into TUN what [`gro::Coalescer`] plans: runs of TCP
//!   segments as one super-packet each (virtio-net GSO header + the segments' bytes gathered with
//!   `writev`), packets the underlay's GRO already coalesced as super-packets, everything else as
//!   it is. During an announced migration, [`relay`] sorts each batch first (copies to the
//!   announced FE, packets held for a VM about to arrive) and writes what an arrival released.

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::buf::PacketBuf;
use super::pipeline::{self, Egress};
use super::raw::Mmsg;
use super::relay::{self, Relay};
use super::shared::{Queue, Shared, family_of, is_fatal, send_all, write_tun};
use crate::counters::{DropReason, Family};
use crate::fib::Fib;
use crate::packet::gro::{self, Coalescer};
use crate::packet::gso::{self, GsoKind, Segment, VNET_F_NEEDS_CSUM, VNET_HDR_LEN, VnetHdr};
use crate::packet::icmp::{self, IcmpError};
use crate::packet::icmp6::{self, Icmp6Error};
use crate::packet::ipv4::{self, HEADER_LEN, MAX_PACKET_LEN, Tunnel};
use crate::packet::{ipv6, sixin4};

/// Packets (each possibly a super-packet) read from TUN per batch.
pub(crate) const FRAMES: usize = 8;
/// Packets per `recvmmsg` from the underlay.
pub(crate) const INGRESS_BATCH: usize = 64;
/// Where a packet read from TUN starts in its frame: room for the outer header in front of it
/// (and for the virtio-net header, which the read puts just before the packet).
const PACKET_AT: usize = HEADER_LEN;
const FRAME_LEN: usize = PACKET_AT + MAX_PACKET_LEN;

/// Where one message to the underlay lies.
#[derive(Debug, Clone, Copy)]
enum Out {
    /// `frames[frame][..len]`: a packet encapsulated in place.
    Whole { frame: usize, len: usize },
    /// `segs[seg]`: headers in the arena, payload in `frames[frame]`.
    Segment { frame: usize, seg: usize },
}

/// The egress loop's reusable state.
struct EgressState {
    frames: Vec<Vec<u8>>,
    arena: Vec<u8>,
    segs: Vec<Segment>,
    out: Vec<(Out, Ipv4Addr)>,
    /// Of `out`: 6in4 messages.
    out_v6: u64,
    icmp: Vec<Vec<u8>>,
    icmp6: Vec<Vec<u8>>,
}

impl EgressState {
    /// Decides and prepares frame `f` (`read` bytes from TUN, virtio-net header included when
    /// `vnet`).
    fn frame(&mut self, sh: &Shared, f: usize, read: usize, vnet: bool) {
        let Some(len) = read.checked_sub(if vnet { VNET_HDR_LEN } else { 0 }) else {
            sh.counters.discard(Family::V4, DropReason::Malformed);
            return;
        };
        let frame = &mut self.frames[f];
        let hdr = if vnet { VnetHdr::decode(&frame[PACKET_AT - VNET_HDR_LEN..PACKET_AT]) } else { None };
        let gso = hdr.map_or(Ok(None), |h| h.gso());
        sh.counters.tun_read(matches!(gso, Ok(Some(_))));
        let packet = &mut frame[PACKET_AT..PACKET_AT + len];
        let family = family_of(packet);
        match (gso, hdr) {
            (Ok(Some(kind)), Some(h)) => self.super_packet(sh, f, len, kind, usize::from(h.gso_size)),
            (Ok(None), h) => {
                sh.counters.tun_rx(family, 1, len);
                if let Some(h) = h.filter(|h| h.flags & VNET_F_NEEDS_CSUM != 0)
                    && gso::complete_checksum(packet, usize::from(h.csum_start), usize::from(h.csum_offset)).is_err()
                {
                    sh.counters.discard(family, DropReason::Malformed);
                    return;
                }
                self.single(sh, f, len);
            }
            (Err(_), _) | (Ok(Some(_)), None) => {
                sh.counters.tun_rx(family, 1, len);
                sh.counters.discard(family, DropReason::Malformed);
            }
        }
    }

    /// Queues the encapsulated frame `f` (outer header written in place) for `peer`.
    fn push_whole(&mut self, f: usize, len: usize, peer: Ipv4Addr, family: Family) {
        self.out.push((Out::Whole { frame: f, len }, peer));
        self.out_v6 += u64::from(family == Family::V6);
    }

    fn single(&mut self, sh: &Shared, f: usize, len: usize) {
        let frame = &mut self.frames[f];
        let packet = &mut frame[PACKET_AT..PACKET_AT + len];
        let family = family_of(packet);
        match pipeline::egress(packet, &sh.fib, sh.tunnel_mtu) {
            Egress::Encap(peer) => {
                let tunnel = Tunnel { src: sh.fib.local_underlay(), dst: peer, ttl: sh.outer_ttl };
                let whole = &mut frame[..PACKET_AT + len];
                let encapsulated = match family {
                    Family::V4 => ipv4::encapsulate_in_place(whole, &tunnel, 0).ok(),
                    Family::V6 => sixin4::encapsulate_in_place(whole, &tunnel, 0).ok(),
                };
                match encapsulated {
                    Some(outer_len) => self.push_whole(f, outer_len, peer, family),
                    None => sh.counters.discard(family, DropReason::Malformed),
                }
            }
            Egress::Drop(reason) => sh.counters.discard(family, reason),
            Egress::DropWithIcmp(reason, error) => {
                sh.counters.discard(family, reason);
                answer(sh, packet, error, &mut self.icmp);
            }
            Egress::DropWithIcmp6(reason, error) => {
                sh.counters.discard(family, reason);
                answer6(sh, packet, error, &mut self.icmp6);
            }
        }
    }

    fn super_packet(&mut self, sh: &Shared, f: usize, len: usize, kind: GsoKind, gso_size: usize) {
        let packet = &mut self.frames[f][PACKET_AT..PACKET_AT + len];
        let family = family_of(packet);
        let layout = match gso::layout(packet, kind) {
            Ok(l) if gso_size > 0 && l.payload_len() > 0 => l,
            _ => {
                sh.counters.tun_rx(family, 1, len);
                let reason = if matches!(ipv4::version(packet), Some(4 | 6)) {
                    DropReason::Malformed
                } else {
                    DropReason::NotIp
                };
                sh.counters.discard(family, reason);
                return;
            }
        };
        let segments = layout.payload_len().div_ceil(gso_size) as u64;
        sh.counters.tun_rx(family, segments, len);
        let largest = layout.headers_len() + gso_size.min(layout.payload_len());
        match pipeline::egress_super(packet, &sh.fib, sh.tunnel_mtu, largest) {
            Egress::Encap(peer) => {
                let tunnel = Tunnel { src: sh.fib.local_underlay(), dst: peer, ttl: sh.outer_ttl };
                let first = self.segs.len();
                match gso::segment(packet, kind, gso_size, Some(&tunnel), &mut self.arena, &mut self.segs) {
                    Ok(()) => {
                        self.out.extend((first..self.segs.len()).map(|seg| (Out::Segment { frame: f, seg }, peer)));
                        if family == Family::V6 {
                            self.out_v6 += (self.segs.len() - first) as u64;
                        }
                    }
                    Err(_) => sh.counters.drops_n(family, DropReason::Malformed, segments),
                }
            }
            Egress::Drop(reason) => sh.counters.drops_n(family, reason, segments),
            Egress::DropWithIcmp(reason, error) => {
                sh.counters.drops_n(family, reason, segments);
                answer(sh, packet, error, &mut self.icmp);
            }
            Egress::DropWithIcmp6(reason, error) => {
                sh.counters.drops_n(family, reason, segments);
                answer6(sh, packet, error, &mut self.icmp6);
            }
        }
    }

    /// Message `i` of `out`.
    fn message(&self, i: usize) -> (&[u8], &[u8], Ipv4Addr) {
        match self.out[i] {
            (Out::Whole { frame, len }, dst) => (&self.frames[frame][..len], &[], dst),
            (Out::Segment { frame, seg }, dst) => {
                let s = &self.segs[seg];
                let payload = PACKET_AT + s.payload.start..PACKET_AT + s.payload.end;
                (&self.arena[s.header.clone()], &self.frames[frame][payload], dst)
            }
        }
    }
}

/// Takes a token from the ICMP rate limit, counting a refusal.
fn icmp_allowed(sh: &Shared) -> bool {
    let allowed = sh.icmp_limit.lock().expect("ICMP limiter lock").allow(Instant::now());
    if !allowed {
        sh.counters.icmp_rate_limited();
    }
    allowed
}

/// Queues the ICMP error `error` about `offending` for sending, unless the packet must not be
/// answered or the rate limit is exhausted.
fn answer(sh: &Shared, offending: &[u8], error: IcmpError, icmp_out: &mut Vec<Vec<u8>>) {
    if icmp::check_may_answer(offending).is_err() {
        sh.counters.icmp_suppressed();
        return;
    }
    if !icmp_allowed(sh) {
        return;
    }
    match icmp::error_for(offending, error, sh.icmp_source) {
        Ok(reply) => {
            sh.counters.icmp_sent(matches!(error, IcmpError::FragmentationNeeded { .. }));
            icmp_out.push(reply);
        }
        Err(_) => sh.counters.icmp_suppressed(),
    }
}

/// The ICMPv6 counterpart of [`answer`] (same rate limit).
fn answer6(sh: &Shared, offending: &[u8], error: Icmp6Error, icmp_out: &mut Vec<Vec<u8>>) {
    if icmp6::check_may_answer(offending, error).is_err() {
        sh.counters.icmp_suppressed();
        return;
    }
    if !icmp_allowed(sh) {
        return;
    }
    match icmp6::error_for(offending, error, sh.icmp6_source) {
        Ok(reply) => {
            sh.counters.icmp6_sent(matches!(error, Icmp6Error::PacketTooBig { .. }));
            icmp_out.push(reply);
        }
        Err(_) => sh.counters.icmp_suppressed(),
    }
}

/// Sends ICMPv6 errors (complete IPv6 packets) on the raw IPv6 socket; a refusal (no route back,
/// buffer full) loses that error only.
fn send_icmp6(q: &Queue, errors: &[Vec<u8>]) {
    for e in errors {
        let Ok(h) = ipv6::parse(e) else { continue };
        let dst = SocketAddr::from((h.dst, 0));
        if let Err(err) = q.icmp6.send_to(e, &dst.into()) {
            tracing::debug!(error = %err, dst = %h.dst, "ICMPv6 error not sent");
        }
    }
}

/// TUN → underlay until `stop` fires or the device fails.
pub(crate) async fn egress_loop(sh: Arc<Shared>, q: Arc<Queue>, mut stop: watch::Receiver<bool>) -> io::Result<()> {
    let vnet = sh.offload;
    let read_at = if vnet { PACKET_AT - VNET_HDR_LEN } else { PACKET_AT };
    let mut st = EgressState {
        frames: (0..FRAMES).map(|_| vec![0u8; FRAME_LEN]).collect(),
        arena: Vec::new(),
        segs: Vec::new(),
        out: Vec::new(),
        out_v6: 0,
        icmp: Vec::new(),
        icmp6: Vec::new(),
    };
    let mut mmsg = Mmsg::with_capacity(FRAMES * 64);
    let mut reads = [0usize; FRAMES];
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = q.dev.recv(&mut st.frames[0][read_at..]) => r,
        };
        let mut n = match first {
            Ok(len) => {
                reads[0] = len;
                1
            }
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "TUN read failed");
                continue;
            }
        };
        while n < FRAMES {
            match q.dev.try_recv(&mut st.frames[n][read_at..]) {
                Ok(len) => {
                    reads[n] = len;
                    n += 1;
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(_would_block_or_bad) => break,
            }
        }
        st.arena.clear();
        st.segs.clear();
        st.out.clear();
        st.out_v6 = 0;
        st.icmp.clear();
        st.icmp6.clear();
        for (f, &read) in reads.iter().enumerate().take(n) {
            st.frame(&sh, f, read, vnet);
        }
        if !st.out.is_empty() {
            let (packets, bytes) = send_all(&sh, &q, &mut mmsg, st.out.len(), |i| st.message(i)).await?;
            sh.counters.tunnel_tx(packets, bytes);
            sh.counters.ipv6_tunnel_tx(st.out_v6);
        }
        send_icmp6(&q, &st.icmp6);
        if !st.icmp.is_empty() {
            let icmp = &st.icmp;
            let dst = |p: &[u8]| ipv4::parse(p).map(|h| h.dst).unwrap_or(Ipv4Addr::UNSPECIFIED);
            send_all(&sh, &q, &mut mmsg, icmp.len(), |i| (&icmp[i][..], &[][..], dst(&icmp[i]))).await?;
        }
    }
}

/// [`pipeline::ingress`] or [`pipeline::ingress6`].
type Decapsulate = fn(&mut [u8], &Fib) -> Result<Range<usize>, DropReason>;

/// Underlay → TUN until `stop` fires or the socket/device fails: the IP-in-IP socket
/// (`family` V4) or the 6in4 socket (V6).
pub(crate) async fn ingress_loop(
    sh: Arc<Shared>,
    q: Arc<Queue>,
    family: Family,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let (sock, decapsulate): (&AsyncFd<Socket>, Decapsulate) = match family {
        Family::V4 => (&q.sock, pipeline::ingress),
        Family::V6 => (&q.sock6, pipeline::ingress6),
    };
    let mut bufs: Vec<PacketBuf> = (0..INGRESS_BATCH).map(|_| PacketBuf::new(MAX_PACKET_LEN)).collect();
    let mut mmsg = Mmsg::with_capacity(INGRESS_BATCH);
    let mut accepted: Vec<(usize, Range<usize>)> = Vec::with_capacity(INGRESS_BATCH);
    let mut coalescer = Coalescer::new();
    let (mut arena, mut segs) = (Vec::new(), Vec::new());
    let mut relay = Relay::new();
    loop {
        if sh.handing_over.started() {
            // The forwarder taking over reads the underlay now (our sockets, handed on, or its
            // own copies of every packet): read nothing more, so nothing is written twice.
            let _ = stop.changed().await;
            return Ok(());
        }
        let n = tokio::select! {
            _ = stop.changed() => return Ok(()),
            () = sh.fib.migrations().released() => {
                relay::write_released(&sh, &q).await?;
                continue;
            }
            r = async {
                loop {
                    let mut guard = sock.readable().await?;
                    match guard.try_io(|s| mmsg.recv(s.as_raw_fd(), &mut bufs)) {
                        Ok(r) => return r,
                        Err(_would_block) => continue,
                    }
                }
            } => r,
        };
        let n = match n {
            Ok(n) => n,
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "underlay receive failed");
                continue;
            }
        };
        accepted.clear();
        for (i, buf) in bufs.iter_mut().enumerate().take(n) {
            sh.counters.tunnel_rx(family, buf.as_ref().len());
            match decapsulate(buf.as_mut(), &sh.fib) {
                Ok(inner) => accepted.push((i, inner)),
                Err(reason) => sh.counters.discard(family, reason),
            }
        }
        if !sh.fib.migrations().is_empty() {
            relay.sort(&sh, &bufs, &mut accepted);
            relay.send_copies(&sh, &q).await?;
        }
        let coalesced = accepted.iter().filter(|(_, r)| r.len() > sh.tunnel_mtu).count();
        sh.counters.underlay_recv(coalesced as u64);
        let inner = |k: usize| -> &[u8] {
            let (i, r) = &accepted[k];
            &bufs[*i].as_ref()[r.clone()]
        };
        if sh.offload {
            coalescer.plan(accepted.len(), inner, sh.tunnel_mtu);
            for _ in coalescer.rejected() {
                sh.counters.discard(family, DropReason::CoalescedNotTcp);
            }
            for w in coalescer.writes() {
                let members = &coalescer.members()[w.members.clone()];
                let mut iov = [IoSlice::new(&[]); gro::MAX_SEGMENTS + 1];
                iov[0] = IoSlice::new(&coalescer.arena()[w.header.clone()]);
                let mut bytes = 0;
                for (slot, &m) in iov[1..].iter_mut().zip(members) {
                    let p = inner(m);
                    bytes += p.len();
                    *slot = IoSlice::new(&p[w.skip..]);
                }
                let packets = members.len() as u64;
                write_tun(&sh, &q, family, &iov[..=members.len()], packets, bytes as u64, w.gso).await?;
            }
        } else {
            for k in 0..accepted.len() {
                let p = inner(k);
                if p.len() <= sh.tunnel_mtu {
                    write_tun(&sh, &q, family, &[IoSlice::new(p)], 1, p.len() as u64, false).await?;
                    continue;
                }
                // Coalesced by the underlay and no GSO towards TUN: split it here.
                arena.clear();
                segs.clear();
                let gso_size = gso::layout(p, GsoKind::Tcp).map(|l| sh.tunnel_mtu.saturating_sub(l.headers_len()));
                match gso_size.map(|g| gso::segment(p, GsoKind::Tcp, g.max(1), None, &mut arena, &mut segs)) {
                    Ok(Ok(())) => {
                        // Counted as the one packet received.
                        for (k, s) in segs.iter().enumerate() {
                            let iov = [IoSlice::new(&arena[s.header.clone()]), IoSlice::new(&p[s.payload.clone()])];
                            let (packets, bytes) = if k == 0 { (1, p.len() as u64) } else { (0, 0) };
                            write_tun(&sh, &q, family, &iov, packets, bytes, false).await?;
                        }
                    }
                    _ => sh.counters.discard(family, DropReason::CoalescedNotTcp),
                }
            }
        }
    }
}
