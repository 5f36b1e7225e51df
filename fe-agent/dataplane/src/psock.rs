//! AF_PACKET sockets on one interface, shared by the ARP capture ([`crate::arp_io`]) and the
//! neighbour capture ([`crate::neigh_io`]): opening with a classic BPF filter attached before the
//! socket is bound (so nothing unfiltered is ever queued), a large receive buffer, kernel receive
//! timestamps (`SO_TIMESTAMPNS`, converted to `CLOCK_MONOTONIC`), sending whole frames, and the
//! kernel's drop counter (`PACKET_STATISTICS`).

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::packet::eth::MacAddr;

/// Why a capture socket on a VM port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// No such interface in this network namespace.
    #[error("interface {0:?} not found in this network namespace")]
    NoInterface(String),
    /// A system call failed.
    #[error("{what} on {ifname}: {source} (AF_PACKET needs CAP_NET_RAW)")]
    Sys {
        /// The failing step.
        what: &'static str,
        /// Interface.
        ifname: String,
        /// Cause.
        source: io::Error,
    },
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of capture times
/// ([`crate::arp_io::CapturedArp::mono_ns`], [`crate::neigh_io::Captured::mono_ns`]).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const ETH_P_ALL: u16 = 0x0003;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live T whose size is passed.
    check(unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t) })
        .map(drop)
}

/// Receive buffer of a capture socket: some 5,000 ARP/NDP frames (a frame costs ~800 B of
/// buffer).
const CAPTURE_BUFFER: libc::c_int = 4 << 20;

/// An AF_PACKET socket bound to one interface: its fd, index and MAC.
pub(crate) struct PacketSocket {
    pub(crate) fd: OwnedFd,
    ifindex: i32,
    pub(crate) mac: MacAddr,
}

impl PacketSocket {
    /// Opens a socket on `ifname` (in the calling thread's namespace). With a `filter`, it
    /// receives what the filter passes, timestamped; without, it receives nothing (send only).
    pub(crate) fn open(ifname: &str, filter: Option<&[libc::sock_filter]>) -> Result<Self, CaptureError> {
        let sys = |what| {
            let ifname = ifname.to_owned();
            move |source| CaptureError::Sys { what, ifname, source }
        };
        let ifindex =
            nix::net::if_::if_nametoindex(ifname).map_err(|_| CaptureError::NoInterface(ifname.to_owned()))? as i32;
        // Protocol 0: no frame is queued before the filter is attached and the socket bound.
        // SAFETY: plain socket(2).
        let raw = check(unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
        })
        .map_err(sys("socket(AF_PACKET)"))?;
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let protocol = if let Some(filter) = filter {
            crate::bpf::attach(raw, filter).map_err(sys("SO_ATTACH_FILTER"))?;
            setsockopt(raw, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, &1 as &libc::c_int)
                .map_err(sys("SO_TIMESTAMPNS"))?;
            // A burst (one VM's storm, many VMs announcing at once after a host move) must reach
            // the per-source rate limiter instead of overflowing the default ~200 KB buffer,
            // where the kernel would drop other VMs' announcements on the same port with it.
            // FORCE passes net.core.rmem_max (we have CAP_NET_ADMIN); without it, the capped size.
            if setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &CAPTURE_BUFFER).is_err() {
                setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, &CAPTURE_BUFFER).map_err(sys("SO_RCVBUF"))?;
            }
            ETH_P_ALL.to_be()
        } else {
            0
        };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = protocol;
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid sockaddr_ll of the given size.
        check(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(sys("bind"))?;
        let mac = interface_mac(raw, ifname).map_err(sys("SIOCGIFHWADDR"))?;
        Ok(PacketSocket { fd, ifindex, mac })
    }

    /// Sends one whole Ethernet frame (destination MAC first).
    pub(crate) fn send(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() < 6 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "frame shorter than a MAC address"));
        }
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sll` are live for the call and their sizes are passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::other(format!("short send: {n} of {} bytes", frame.len())));
        }
        Ok(())
    }
}

fn interface_mac(fd: RawFd, ifname: &str) -> io::Result<MacAddr> {
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes ifr_hwaddr inside `req`.
    check(unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) })?;
    // SAFETY: the ioctl filled the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(MacAddr(mac))
}

/// The kernel's counters of an AF_PACKET socket since the last read (reading resets them).
pub(crate) fn packet_statistics(fd: RawFd) -> io::Result<libc::tpacket_stats> {
    // SAFETY: all-zero is a valid tpacket_stats.
    let mut stats: libc::tpacket_stats = unsafe { zeroed() };
    let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `stats` and `len` are live and `len` is the size of `stats`.
    check(unsafe {
        libc::getsockopt(fd, libc::SOL_PACKET, libc::PACKET_STATISTICS, (&raw mut stats).cast(), &mut len)
    })?;
    Ok(stats)
}

/// Converts a wall-clock instant from the recent past to `CLOCK_MONOTONIC` ns by the current
/// offset between the two clocks.
pub(crate) fn wall_to_monotonic(wall: SystemTime) -> u64 {
    let mono_now = monotonic_ns();
    let age = SystemTime::now().duration_since(wall).unwrap_or(Duration::ZERO);
    mono_now.saturating_sub(age.as_nanos() as u64)
}

/// `recvmsg` one frame with its `SCM_TIMESTAMPNS` (falls back to "now" without one).
pub(crate) fn recv_timestamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SystemTime)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 16];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: every pointer in `msg` refers to live local buffers of the given sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut wall = SystemTime::now();
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                wall = UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // MSG_TRUNC makes n the real frame length; a longer frame than the buffer was cut.
    Ok(((n as usize).min(buf.len()), wall))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_conversion_is_close_to_now() {
        let before = monotonic_ns();
        let converted = wall_to_monotonic(SystemTime::now() - Duration::from_millis(5));
        let after = monotonic_ns();
        assert!(converted <= after && converted + 5_000_000 >= before.saturating_sub(1_000_000));
    }
}
