//! What the workers of one forwarder share ([`Shared`]), one worker's descriptors ([`Queue`]) and
//! the two writes every path ends in: [`send_all`] to the underlay, [`write_tun`] into TUN.

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tun_rs::AsyncDevice;

use super::ratelimit::TokenBucket;
use super::raw::Mmsg;
use crate::counters::{Counters, DropReason, Family};
use crate::fib::Fib;
use crate::packet::ipv4;

/// What the workers of one forwarder share.
pub(crate) struct Shared {
    pub(crate) fib: Arc<Fib>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) tunnel_mtu: usize,
    pub(crate) outer_ttl: u8,
    pub(crate) icmp_source: Ipv4Addr,
    pub(crate) icmp6_source: Ipv6Addr,
    /// Shared by ICMP and ICMPv6 errors.
    pub(crate) icmp_limit: Mutex<TokenBucket>,
    /// The TUN queues carry a virtio-net header.
    pub(crate) offload: bool,
    /// Handing the device over: the other forwarder writes into TUN ([`super::HandOver`]).
    pub(crate) handing_over: super::HandOver,
}

/// One worker's descriptors.
pub(crate) struct Queue {
    pub(crate) dev: AsyncDevice,
    /// IP-in-IP: receives protocol 4, sends every tunnel packet and the ICMP errors.
    pub(crate) sock: AsyncFd<Socket>,
    /// 6in4: receives protocol 41.
    pub(crate) sock6: AsyncFd<Socket>,
    /// Sends the ICMPv6 errors.
    pub(crate) icmp6: Socket,
}

/// The family of the packet starting `p` (by its version nibble; anything but 6 counts as IPv4).
pub(crate) fn family_of(p: &[u8]) -> Family {
    if ipv4::version(p) == Some(6) { Family::V6 } else { Family::V4 }
}

/// An IO error that ends the forwarder (device or socket gone), as opposed to one bad packet.
pub(crate) fn is_fatal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADF | libc::EBADFD | libc::ENODEV | libc::ENXIO | libc::EIO))
}

/// Sends messages `0..count` to the underlay with as few `sendmmsg` calls as the socket buffer
/// allows, waiting for room when it is full. Messages the kernel refuses (no route, ...) are
/// counted and skipped. Returns (messages sent, bytes sent).
pub(crate) async fn send_all<'a>(
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
                let (head, _, dst) = message(sent);
                tracing::debug!(error = %e, %dst, "underlay send failed");
                // The outer header's protocol tells the inner family.
                let family = if head.get(9) == Some(&ipv4::PROTO_IPV6) { Family::V6 } else { Family::V4 };
                sh.counters.discard(family, DropReason::UnderlaySendError);
                sent += 1;
            }
        }
    }
    sh.counters.underlay_sends(calls);
    Ok((sent as u64, bytes))
}

/// One gather write into TUN carrying `packets` received packets (`bytes` of them).
pub(crate) async fn write_tun(
    sh: &Shared,
    q: &Queue,
    family: Family,
    iov: &[IoSlice<'_>],
    packets: u64,
    bytes: u64,
    gso: bool,
) -> io::Result<()> {
    match q.dev.send_vectored(iov).await {
        Ok(_) => {
            sh.counters.tun_write(gso);
            sh.counters.tun_tx(family, packets, bytes);
            Ok(())
        }
        Err(e) if is_fatal(&e) => Err(e),
        Err(e) => {
            tracing::debug!(error = %e, "TUN write failed");
            sh.counters.drops_n(family, DropReason::TunWriteError, packets);
            Ok(())
        }
    }
}
