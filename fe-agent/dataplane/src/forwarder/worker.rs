//! One forwarding worker: a TUN queue and a raw underlay socket, served on the worker's own
//! thread by two loops on a tokio current-thread runtime.
//!
//! * [`egress_loop`]: TUN → encapsulate → underlay. Reads up to [`FRAMES`] packets per wake-up,
//!   each possibly a 64 KiB GSO super-packet; decides once per super-packet
//!   ([`pipeline::egress_super`]); splits it with [`gso::segment`], which writes each segment's
//!   outer + inner headers into an arena and leaves the payload in place; sends everything with
//!   `sendmmsg`, each message `[headers, payload slice]`. One checksum pass over the payload,
//!   one copy (the kernel's), no allocation per packet.
//! * [`ingress_loop`]: underlay → decapsulate → TUN. Receives up to [`INGRESS_BATCH`] packets
//!   with one `recvmmsg`, decapsulates in place, and writes into TUN what [`gro::Coalescer`]
//!   plans: runs of TCP segments as one super-packet each (virtio-net GSO header + the segments'
//!   bytes gathered with `writev`), packets the underlay's GRO already coalesced as super-packets,
//!   everything else as it is.

use std::io::{self, IoSlice};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tun_rs::AsyncDevice;

use super::buf::PacketBuf;
use super::pipeline::{self, Egress};
use super::ratelimit::TokenBucket;
use super::raw::Mmsg;
use crate::counters::{Counters, DropReason};
use crate::fib::Fib;
use crate::packet::gro::{self, Coalescer};
use crate::packet::gso::{self, GsoKind, Segment, VNET_F_NEEDS_CSUM, VNET_HDR_LEN, VnetHdr};
use crate::packet::icmp::{self, IcmpError};
use crate::packet::ipv4::{self, HEADER_LEN, MAX_PACKET_LEN, Tunnel};

/// Packets (each possibly a super-packet) read from TUN per batch.
pub(crate) const FRAMES: usize = 8;
/// Packets per `recvmmsg` from the underlay.
pub(crate) const INGRESS_BATCH: usize = 64;
/// Where a packet read from TUN starts in its frame: room for the outer header in front of it
/// (and for the virtio-net header, which the read puts just before the packet).
const PACKET_AT: usize = HEADER_LEN;
const FRAME_LEN: usize = PACKET_AT + MAX_PACKET_LEN;

/// What the workers of one forwarder share.
pub(crate) struct Shared {
    pub(crate) fib: Arc<Fib>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) tunnel_mtu: usize,
    pub(crate) outer_ttl: u8,
    pub(crate) icmp_source: Ipv4Addr,
    pub(crate) icmp_limit: Mutex<TokenBucket>,
    /// The TUN queues carry a virtio-net header.
    pub(crate) offload: bool,
}

/// One worker's descriptors.
pub(crate) struct Queue {
    pub(crate) dev: AsyncDevice,
    pub(crate) sock: AsyncFd<Socket>,
}

/// An IO error that ends the forwarder (device or socket gone), as opposed to one bad packet.
fn is_fatal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADF | libc::EBADFD | libc::ENODEV | libc::ENXIO | libc::EIO))
}

/// Sends messages `0..count` to the underlay with as few `sendmmsg` calls as the socket buffer
/// allows, waiting for room when it is full. Messages the kernel refuses (no route, ...) are
/// counted and skipped. Returns (messages sent, bytes sent).
async fn send_all<'a>(
    sh: &Shared,
    q: &Queue,
    mmsg: &mut Mmsg,
    count: usize,
    message: impl Fn(usize) -> (&'a [u8], &'a [u8], Ipv4Addr),
) -> io::Result<(u64, u64)> {
    let (mut sent, mut bytes, mut calls) = (0usize, 0u64, 0u64);
    while sent < count {
        let mut guard = q.sock.writable().await?;
        let result = guard.try_io(|s| mmsg.send(s.as_raw_fd(), sent, count - sent, &message));
        match result {
            Err(_would_block) => continue,
            Ok(Ok(n)) => {
                calls += 1;
                bytes += (sent..sent + n)
                    .map(|i| {
                        let (a, b, _) = message(i);
                        (a.len() + b.len()) as u64
                    })
                    .sum::<u64>();
                sent += n;
            }
            Ok(Err(e)) if is_fatal(&e) => return Err(e),
            Ok(Err(e)) => {
                calls += 1;
                tracing::debug!(error = %e, dst = %message(sent).2, "underlay send failed");
                sh.counters.discard(DropReason::UnderlaySendError);
                sent += 1;
            }
        }
    }
    sh.counters.underlay_sends(calls);
    Ok((sent as u64, bytes))
}

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
    icmp: Vec<Vec<u8>>,
}

impl EgressState {
    /// Decides and prepares frame `f` (`read` bytes from TUN, virtio-net header included when
    /// `vnet`).
    fn frame(&mut self, sh: &Shared, f: usize, read: usize, vnet: bool) {
        let Some(len) = read.checked_sub(if vnet { VNET_HDR_LEN } else { 0 }) else {
            sh.counters.discard(DropReason::Malformed);
            return;
        };
        let frame = &mut self.frames[f];
        let hdr = if vnet { VnetHdr::decode(&frame[PACKET_AT - VNET_HDR_LEN..PACKET_AT]) } else { None };
        let gso = hdr.map_or(Ok(None), |h| h.gso());
        sh.counters.tun_read(matches!(gso, Ok(Some(_))));
        let packet = &mut frame[PACKET_AT..PACKET_AT + len];
        match (gso, hdr) {
            (Ok(Some(kind)), Some(h)) => self.super_packet(sh, f, len, kind, usize::from(h.gso_size)),
            (Ok(None), h) => {
                sh.counters.tun_rx(1, len);
                if let Some(h) = h.filter(|h| h.flags & VNET_F_NEEDS_CSUM != 0)
                    && gso::complete_checksum(packet, usize::from(h.csum_start), usize::from(h.csum_offset)).is_err()
                {
                    sh.counters.discard(DropReason::Malformed);
                    return;
                }
                self.single(sh, f, len);
            }
            (Err(_), _) | (Ok(Some(_)), None) => {
                sh.counters.tun_rx(1, len);
                let reason = if ipv4::version(packet) == Some(6) { DropReason::NotIpv4 } else { DropReason::Malformed };
                sh.counters.discard(reason);
            }
        }
    }

    fn single(&mut self, sh: &Shared, f: usize, len: usize) {
        let frame = &mut self.frames[f];
        let packet = &mut frame[PACKET_AT..PACKET_AT + len];
        match pipeline::egress(packet, &sh.fib, sh.tunnel_mtu) {
            Egress::Encap(peer) => {
                let tunnel = Tunnel { src: sh.fib.local_underlay(), dst: peer, ttl: sh.outer_ttl };
                match ipv4::encapsulate_in_place(&mut frame[..PACKET_AT + len], &tunnel, 0) {
                    Ok(outer_len) => self.out.push((Out::Whole { frame: f, len: outer_len }, peer)),
                    Err(_) => sh.counters.discard(DropReason::Malformed),
                }
            }
            Egress::Drop(reason) => sh.counters.discard(reason),
            Egress::DropWithIcmp(reason, error) => {
                sh.counters.discard(reason);
                answer(sh, packet, error, &mut self.icmp);
            }
        }
    }

    fn super_packet(&mut self, sh: &Shared, f: usize, len: usize, kind: GsoKind, gso_size: usize) {
        let packet = &mut self.frames[f][PACKET_AT..PACKET_AT + len];
        let layout = match gso::layout(packet, kind) {
            Ok(l) if gso_size > 0 && l.payload_len() > 0 => l,
            _ => {
                sh.counters.tun_rx(1, len);
                let reason = if ipv4::version(packet) == Some(6) { DropReason::NotIpv4 } else { DropReason::Malformed };
                sh.counters.discard(reason);
                return;
            }
        };
        let segments = layout.payload_len().div_ceil(gso_size) as u64;
        sh.counters.tun_rx(segments, len);
        let largest = layout.headers_len() + gso_size.min(layout.payload_len());
        match pipeline::egress_super(packet, &sh.fib, sh.tunnel_mtu, largest) {
            Egress::Encap(peer) => {
                let tunnel = Tunnel { src: sh.fib.local_underlay(), dst: peer, ttl: sh.outer_ttl };
                let first = self.segs.len();
                match gso::segment(packet, kind, gso_size, Some(&tunnel), &mut self.arena, &mut self.segs) {
                    Ok(()) => {
                        self.out.extend((first..self.segs.len()).map(|seg| (Out::Segment { frame: f, seg }, peer)));
                    }
                    Err(_) => sh.counters.drops_n(DropReason::Malformed, segments),
                }
            }
            Egress::Drop(reason) => sh.counters.drops_n(reason, segments),
            Egress::DropWithIcmp(reason, error) => {
                sh.counters.drops_n(reason, segments);
                answer(sh, packet, error, &mut self.icmp);
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

/// Queues the ICMP error `error` about `offending` for sending, unless the packet must not be
/// answered or the rate limit is exhausted.
fn answer(sh: &Shared, offending: &[u8], error: IcmpError, icmp_out: &mut Vec<Vec<u8>>) {
    if icmp::check_may_answer(offending).is_err() {
        sh.counters.icmp_suppressed();
        return;
    }
    if !sh.icmp_limit.lock().expect("ICMP limiter lock").allow(Instant::now()) {
        sh.counters.icmp_rate_limited();
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

/// TUN → underlay until `stop` fires or the device fails.
pub(crate) async fn egress_loop(sh: Arc<Shared>, q: Arc<Queue>, mut stop: watch::Receiver<bool>) -> io::Result<()> {
    let vnet = sh.offload;
    let read_at = if vnet { PACKET_AT - VNET_HDR_LEN } else { PACKET_AT };
    let mut st = EgressState {
        frames: (0..FRAMES).map(|_| vec![0u8; FRAME_LEN]).collect(),
        arena: Vec::new(),
        segs: Vec::new(),
        out: Vec::new(),
        icmp: Vec::new(),
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
        st.icmp.clear();
        for (f, &read) in reads.iter().enumerate().take(n) {
            st.frame(&sh, f, read, vnet);
        }
        if !st.out.is_empty() {
            let (packets, bytes) = send_all(&sh, &q, &mut mmsg, st.out.len(), |i| st.message(i)).await?;
            sh.counters.tunnel_tx(packets, bytes);
        }
        if !st.icmp.is_empty() {
            let icmp = &st.icmp;
            let dst = |p: &[u8]| ipv4::parse(p).map(|h| h.dst).unwrap_or(Ipv4Addr::UNSPECIFIED);
            send_all(&sh, &q, &mut mmsg, icmp.len(), |i| (&icmp[i][..], &[][..], dst(&icmp[i]))).await?;
        }
    }
}

/// Underlay → TUN until `stop` fires or the socket/device fails.
pub(crate) async fn ingress_loop(sh: Arc<Shared>, q: Arc<Queue>, mut stop: watch::Receiver<bool>) -> io::Result<()> {
    let mut bufs: Vec<PacketBuf> = (0..INGRESS_BATCH).map(|_| PacketBuf::new(MAX_PACKET_LEN)).collect();
    let mut mmsg = Mmsg::with_capacity(INGRESS_BATCH);
    let mut accepted: Vec<(usize, Range<usize>)> = Vec::with_capacity(INGRESS_BATCH);
    let mut coalescer = Coalescer::new();
    let (mut arena, mut segs) = (Vec::new(), Vec::new());
    loop {
        let n = tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = async {
                loop {
                    let mut guard = q.sock.readable().await?;
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
            sh.counters.tunnel_rx(buf.as_ref().len());
            match pipeline::ingress(buf.as_mut(), &sh.fib) {
                Ok(inner) => accepted.push((i, inner)),
                Err(reason) => sh.counters.discard(reason),
            }
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
                sh.counters.discard(DropReason::CoalescedNotTcp);
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
                write_tun(&sh, &q, &iov[..=members.len()], members.len() as u64, bytes as u64, w.gso).await?;
            }
        } else {
            for k in 0..accepted.len() {
                let p = inner(k);
                if p.len() <= sh.tunnel_mtu {
                    write_tun(&sh, &q, &[IoSlice::new(p)], 1, p.len() as u64, false).await?;
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
                            write_tun(&sh, &q, &iov, packets, bytes, false).await?;
                        }
                    }
                    _ => sh.counters.discard(DropReason::CoalescedNotTcp),
                }
            }
        }
    }
}

/// One gather write into TUN carrying `packets` received packets (`bytes` of them).
async fn write_tun(sh: &Shared, q: &Queue, iov: &[IoSlice<'_>], packets: u64, bytes: u64, gso: bool) -> io::Result<()> {
    match q.dev.send_vectored(iov).await {
        Ok(_) => {
            sh.counters.tun_write(gso);
            sh.counters.tun_tx(packets, bytes);
            Ok(())
        }
        Err(e) if is_fatal(&e) => Err(e),
        Err(e) => {
            tracing::debug!(error = %e, "TUN write failed");
            sh.counters.drops_n(DropReason::TunWriteError, packets);
            Ok(())
        }
    }
}
