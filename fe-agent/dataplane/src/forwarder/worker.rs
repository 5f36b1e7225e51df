//! The two forwarding loops of one forwarder, run on its own thread's tokio current-thread
//! runtime: TUN → encapsulate → underlay ([`egress_loop`]) and underlay → decapsulate → TUN
//! ([`ingress_loop`]). Both work in batches: a TUN read with offload yields a whole GSO
//! super-packet split into segments, more reads are drained without waiting, and everything
//! goes out with one `sendmmsg`; the underlay side reads with `recvmmsg` and writes into TUN
//! through tun-rs's GRO coalescing.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

use super::buf::PacketBuf;
use super::pipeline::{self, Egress};
use super::raw::Mmsg;
use crate::counters::{Counters, DropReason};
use crate::fib::Fib;
use crate::packet::icmp::{self, IcmpError};
use crate::packet::ipv4::{self, HEADER_LEN, MAX_PACKET_LEN, Tunnel};

/// Packet buffers per batch from TUN (a 64 KiB GSO packet at MSS 1440 is 46 segments).
const EGRESS_BATCH: usize = 128;
/// Keep reading TUN without waiting while at least this many buffers are free.
const EGRESS_MIN_FREE: usize = 64;
/// Packets per `recvmmsg` from the underlay.
const INGRESS_BATCH: usize = 64;

/// What both loops share.
pub(crate) struct Shared {
    pub(crate) dev: AsyncDevice,
    pub(crate) sock: AsyncFd<Socket>,
    pub(crate) fib: Arc<Fib>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) tunnel_mtu: usize,
    pub(crate) outer_ttl: u8,
    pub(crate) icmp_source: Ipv4Addr,
}

/// An IO error that ends the forwarder (device or socket gone), as opposed to one bad packet.
fn is_fatal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADF | libc::EBADFD | libc::ENODEV | libc::ENXIO | libc::EIO))
}

/// Sends complete IPv4 packets to the underlay, waiting for room when the socket is full.
/// Packets the kernel refuses (no route, too big, ...) are counted and skipped.
async fn send_all(sh: &Shared, mmsg: &mut Mmsg, packets: &[(&[u8], Ipv4Addr)]) -> io::Result<(u64, u64)> {
    let (mut sent, mut bytes) = (0usize, 0u64);
    while sent < packets.len() {
        let mut guard = sh.sock.writable().await?;
        let r = guard.try_io(|s| mmsg.send(s.as_raw_fd(), &packets[sent..]));
        sh.counters.underlay_sends(1);
        match r {
            Err(_would_block) => continue,
            Ok(Ok(n)) => {
                bytes += packets[sent..sent + n].iter().map(|(p, _)| p.len() as u64).sum::<u64>();
                sent += n;
            }
            Ok(Err(e)) if is_fatal(&e) => return Err(e),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, dst = %packets[sent].1, "underlay send failed");
                sh.counters.discard(DropReason::UnderlaySendError);
                sent += 1;
            }
        }
    }
    Ok((sent as u64, bytes))
}

/// TUN → underlay until `stop` fires or the device fails.
pub(crate) async fn egress_loop(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) -> io::Result<()> {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET_LEN];
    let mut bufs: Vec<Vec<u8>> = (0..EGRESS_BATCH).map(|_| vec![0u8; HEADER_LEN + MAX_PACKET_LEN]).collect();
    let mut sizes = vec![0usize; EGRESS_BATCH];
    let mut mmsg = Mmsg::with_capacity(EGRESS_BATCH);
    let mut out: Vec<(usize, usize, Ipv4Addr)> = Vec::with_capacity(EGRESS_BATCH);
    let mut icmp_out: Vec<Vec<u8>> = Vec::new();
    let local = sh.fib.local_underlay();
    loop {
        let first = tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = sh.dev.recv_multiple(&mut original, &mut bufs, &mut sizes, HEADER_LEN) => r,
        };
        let mut filled = match first {
            Ok(n) => {
                sh.counters.tun_read(n > 1);
                n
            }
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "unusable packet from TUN");
                sh.counters.discard(DropReason::Malformed);
                0
            }
        };
        while EGRESS_BATCH - filled >= EGRESS_MIN_FREE {
            match sh.dev.try_recv_multiple(&mut original, &mut bufs[filled..], &mut sizes[filled..], HEADER_LEN) {
                Ok(n) => {
                    sh.counters.tun_read(n > 1);
                    filled += n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_fatal(&e) => return Err(e),
                Err(_) => sh.counters.discard(DropReason::Malformed),
            }
        }

        out.clear();
        icmp_out.clear();
        for (i, buf) in bufs.iter_mut().enumerate().take(filled) {
            let len = sizes[i];
            sh.counters.tun_rx(len);
            let packet = &mut buf[HEADER_LEN..HEADER_LEN + len];
            match pipeline::egress(packet, &sh.fib, sh.tunnel_mtu) {
                Egress::Encap(peer) => {
                    let tunnel = Tunnel { src: local, dst: peer, ttl: sh.outer_ttl };
                    match ipv4::encapsulate_in_place(&mut buf[..HEADER_LEN + len], &tunnel, 0) {
                        Ok(outer_len) => out.push((i, outer_len, peer)),
                        Err(_) => sh.counters.discard(DropReason::Malformed),
                    }
                }
                Egress::Drop(reason) => sh.counters.discard(reason),
                Egress::DropWithIcmp(reason, error) => {
                    sh.counters.discard(reason);
                    match icmp::error_for(packet, error, sh.icmp_source) {
                        Ok(reply) => {
                            sh.counters.icmp_sent(matches!(error, IcmpError::FragmentationNeeded { .. }));
                            icmp_out.push(reply);
                        }
                        Err(_) => sh.counters.icmp_suppressed(),
                    }
                }
            }
        }
        if !out.is_empty() {
            let packets: Vec<(&[u8], Ipv4Addr)> = out.iter().map(|&(i, len, peer)| (&bufs[i][..len], peer)).collect();
            let (n, bytes) = send_all(&sh, &mut mmsg, &packets).await?;
            sh.counters.tunnel_tx(n, bytes);
        }
        if !icmp_out.is_empty() {
            let packets: Vec<(&[u8], Ipv4Addr)> = icmp_out
                .iter()
                .map(|p| (&p[..], ipv4::parse(p).map(|h| h.dst).unwrap_or(Ipv4Addr::UNSPECIFIED)))
                .collect();
            send_all(&sh, &mut mmsg, &packets).await?;
        }
    }
}

/// Underlay → TUN until `stop` fires or the socket/device fails.
pub(crate) async fn ingress_loop(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) -> io::Result<()> {
    // Layout of each buffer: [virtio-net header room][outer header][inner packet]. The inner
    // packet is written into TUN from `TUN_OFFSET`; tun-rs puts the virtio header just before it.
    const RECV_OFFSET: usize = VIRTIO_NET_HDR_LEN;
    const TUN_OFFSET: usize = RECV_OFFSET + HEADER_LEN;
    let mut bufs: Vec<PacketBuf> = (0..INGRESS_BATCH).map(|_| PacketBuf::new(RECV_OFFSET + MAX_PACKET_LEN)).collect();
    let mut mmsg = Mmsg::with_capacity(INGRESS_BATCH);
    let mut gro = GROTable::default();
    loop {
        let n = tokio::select! {
            _ = stop.changed() => return Ok(()),
            r = async {
                loop {
                    let mut guard = sh.sock.readable().await?;
                    match guard.try_io(|s| mmsg.recv(s.as_raw_fd(), &mut bufs, RECV_OFFSET)) {
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
        sh.counters.underlay_recv(0);
        let mut accepted = 0;
        for i in 0..n {
            let len = bufs[i].as_ref().len() - RECV_OFFSET;
            sh.counters.tunnel_rx(len);
            let packet = &mut bufs[i].storage_mut()[RECV_OFFSET..RECV_OFFSET + len];
            match pipeline::ingress(packet, &sh.fib) {
                Ok(inner) => {
                    let inner_len = inner.len();
                    if inner.start != HEADER_LEN {
                        // Outer header with options: move the inner packet to the fixed offset.
                        packet.copy_within(inner, HEADER_LEN);
                    }
                    bufs[i].set_len(TUN_OFFSET + inner_len);
                    bufs.swap(i, accepted);
                    accepted += 1;
                }
                Err(reason) => sh.counters.discard(reason),
            }
        }
        if accepted > 0 {
            let bytes: u64 = bufs[..accepted].iter().map(|b| (b.as_ref().len() - TUN_OFFSET) as u64).sum();
            match sh.dev.send_multiple(&mut gro, &mut bufs[..accepted], TUN_OFFSET).await {
                Ok(_) => sh.counters.tun_tx(accepted as u64, bytes),
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "TUN write failed");
                    sh.counters.discard(DropReason::TunWriteError);
                }
            }
        }
        for b in &mut bufs {
            let full = tun_rs::ExpandBuffer::buf_capacity(b);
            b.set_len(full);
        }
    }
}
