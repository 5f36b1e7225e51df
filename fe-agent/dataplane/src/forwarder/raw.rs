//! The underlay sockets: raw IPv4 sockets for protocol 4 (IP-in-IP) and protocol 41 (6in4) with
//! `IP_HDRINCL`, batched `recvmmsg` / `sendmmsg` over them, and the raw IPv6 socket the ICMPv6
//! errors leave by.
//!
//! Why `IP_HDRINCL` (we write the outer header): the forwarder already has 20 bytes of headroom
//! in front of each inner packet, so writing the header costs nothing, and it lets every packet
//! carry its own DF bit and DSCP/ECN copied from the inner header (with a kernel-built header
//! these are per-socket options). The kernel still fills in the checksum, total length and, if
//! zero, the identification. With `IP_HDRINCL` the header's protocol is what goes out, so the
//! protocol-4 socket sends 6in4 packets too (one `sendmmsg` batch for both families); the
//! protocol-41 socket exists to receive them (a raw socket receives only its protocol). The
//! protocol-4 socket also sends the ICMP errors we originate (complete IPv4 packets), through the
//! kernel's output path, so they are routed like any local packet; ICMPv6 errors leave by an
//! `IPPROTO_RAW` IPv6 socket ([`open_icmp6`], header included, routed the same way — it needs an
//! IPv6 route to the offending source and some IPv6 address on the FE for the route lookup).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use super::buf::PacketBuf;
use super::steer;
use crate::packet::ipv4::PROTO_IPV6;

/// Receive buffer asked for (with `SO_RCVBUFFORCE`, as root, beyond `rmem_max`): room for
/// bursts while the worker is busy writing into TUN.
const RECEIVE_BUFFER: usize = 8 << 20;
/// Send buffer asked for (the kernel doubles it): it bounds the packets this socket has queued
/// below it at once (~2.3 KB of memory each), so a burst waits in `sendmmsg` instead of
/// overflowing the underlay device's queue — a raw socket is not told when its packets are
/// dropped there. 512 KiB: ~440 packets, half a default 1000-packet qdisc.
const SEND_BUFFER: usize = 512 << 10;

/// Opens worker `worker`'s (of `workers`) underlay socket for `protocol` (IP-in-IP or 6in4)
/// bound to `local` (so only tunnel packets addressed to this FE's underlay address are
/// received), non-blocking, with the flow filter attached before anything can be received.
pub(crate) fn open(local: Ipv4Addr, protocol: u8, worker: u32, workers: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(i32::from(protocol))))?;
    steer::attach(socket.as_raw_fd(), worker, workers, protocol == PROTO_IPV6)?;
    socket.set_header_included_v4(true)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(local, 0)).into())?;
    socket.set_nonblocking(true)?;
    for (force, fallback, size) in [
        (libc::SO_RCVBUFFORCE, Socket::set_recv_buffer_size as fn(&Socket, usize) -> io::Result<()>, RECEIVE_BUFFER),
        (libc::SO_SNDBUFFORCE, Socket::set_send_buffer_size, SEND_BUFFER),
    ] {
        if setsockopt_int(socket.as_raw_fd(), libc::SOL_SOCKET, force, size as libc::c_int).is_err() {
            fallback(&socket, size)?;
        }
    }
    Ok(socket)
}

/// True when `fd` is a raw IPv4 socket of `protocol` bound to `local` (one [`open`] made, handed
/// on by another forwarder).
pub(crate) fn is_underlay_socket(fd: std::os::fd::BorrowedFd<'_>, local: Ipv4Addr, protocol: u8) -> bool {
    let socket = socket2::SockRef::from(&fd);
    let bound = socket.local_addr().ok().and_then(|a| a.as_socket_ipv4()).map(|a| *a.ip());
    bound == Some(local)
        && socket.r#type().ok() == Some(Type::RAW)
        && socket.protocol().ok().flatten() == Some(Protocol::from(i32::from(protocol)))
}

/// Opens the send-only raw IPv6 socket for the ICMPv6 errors (complete IPv6 packets:
/// `IPPROTO_RAW` implies `IPV6_HDRINCL`, set explicitly too; it receives nothing), non-blocking.
pub(crate) fn open_icmp6() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
    setsockopt_int(socket.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, 1)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    }
}

/// Most messages per `sendmmsg` / `recvmmsg` call (the kernel's `UIO_MAXIOV`).
pub(crate) const MAX_BATCH: usize = 1024;

/// Reusable `mmsghdr` / `iovec` / address arrays for batched calls.
pub(crate) struct Mmsg {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
}

// SAFETY: the raw pointers inside are only meaningful during one call made by the owner, which
// rebuilds them from live borrows each time; between calls they are never dereferenced.
unsafe impl Send for Mmsg {}

impl Mmsg {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Mmsg { hdrs: Vec::with_capacity(n), iovs: Vec::with_capacity(2 * n), addrs: Vec::with_capacity(n) }
    }

    /// Sends messages `first..first + count` (at most [`MAX_BATCH`]) with one `sendmmsg`:
    /// `message(i)` gives message `i` as two byte slices sent back to back (the second may be
    /// empty; together one complete IPv4 packet) and its destination. Returns how many were
    /// sent (≥ 1), or the error of the first one (`WouldBlock` when the socket buffer is full).
    pub(crate) fn send<'a>(
        &mut self,
        fd: RawFd,
        first: usize,
        count: usize,
        message: impl Fn(usize) -> (&'a [u8], &'a [u8], Ipv4Addr),
    ) -> io::Result<usize> {
        let count = count.min(MAX_BATCH);
        self.iovs.clear();
        self.addrs.clear();
        self.hdrs.clear();
        for i in first..first + count {
            let (head, tail, dst) = message(i);
            self.iovs.push(libc::iovec { iov_base: head.as_ptr() as *mut libc::c_void, iov_len: head.len() });
            if !tail.is_empty() {
                self.iovs.push(libc::iovec { iov_base: tail.as_ptr() as *mut libc::c_void, iov_len: tail.len() });
            }
            self.addrs.push(sockaddr(dst));
            // SAFETY: all-zero is a valid mmsghdr; pointers are filled in below.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iovlen = if tail.is_empty() { 1 } else { 2 };
            self.hdrs.push(h);
        }
        // Point the headers into the (no longer growing) arrays.
        let mut iov = self.iovs.as_mut_ptr();
        for (h, a) in self.hdrs.iter_mut().zip(self.addrs.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
            // SAFETY: the iovecs of all messages were pushed in order, msg_iovlen each.
            iov = unsafe { iov.add(h.msg_hdr.msg_iovlen) };
            h.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        }
        // SAFETY: every pointer in `hdrs` points into `iovs`, `addrs` or the slices `message`
        // returned, which live for 'a, beyond this call; the kernel only reads them.
        let n =
            unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), self.hdrs.len() as libc::c_uint, libc::MSG_DONTWAIT) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// Receives up to `bufs.len()` packets with one `recvmmsg`, each into its buffer; sets each
    /// filled buffer's length to the packet's. Returns how many were received (`WouldBlock`
    /// when none is waiting).
    pub(crate) fn recv(&mut self, fd: RawFd, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        self.iovs.clear();
        self.hdrs.clear();
        for buf in bufs.iter_mut().take(MAX_BATCH) {
            let room = buf.storage_mut();
            self.iovs.push(libc::iovec { iov_base: room.as_mut_ptr().cast(), iov_len: room.len() });
        }
        for iov in self.iovs.iter_mut() {
            // SAFETY: all-zero is a valid mmsghdr.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
        // SAFETY: every iovec points into a distinct live buffer, writable for its length, and
        // the headers into `iovs`; nothing moves during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (buf, h) in bufs.iter_mut().zip(&self.hdrs).take(n) {
            buf.set_len(h.msg_len as usize);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_is_network_order() {
        let s = sockaddr(Ipv4Addr::new(198, 51, 100, 2));
        assert_eq!(s.sin_addr.s_addr.to_ne_bytes(), [198, 51, 100, 2]);
    }
}
