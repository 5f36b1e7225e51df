//! ARP on a VM-facing interface: capture (AF_PACKET + classic BPF, non-blocking under tokio)
//! and sending (proxy-ARP replies, gratuitous ARPs).
//!
//! The BPF filter passes only incoming (not our own outgoing) frames whose EtherType is ARP,
//! directly or behind one 802.1Q tag, so the socket wakes for nothing else. Frames that pass
//! but do not parse are counted by reason ([`crate::packet::arp::ArpError::REASONS`]) and
//! skipped. Each captured frame carries the kernel's receive time (`SO_TIMESTAMPNS`) as wall
//! clock and converted to `CLOCK_MONOTONIC` nanoseconds — the clock every namespace on one host
//! shares, which the lab uses to compare capture times across processes.
//!
//! VLAN: an in-band 802.1Q tag is parsed; a tag the NIC/veth stripped into packet metadata (VLAN
//! acceleration) is not reconstructed, so such frames read as untagged. VM ports are access
//! ports, where this does not arise.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::unix::AsyncFd;

use crate::packet::arp::{self, ArpError, ArpMessage, MacAddr};

/// Why an ARP socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ArpIoError {
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

/// A captured ARP message with its capture time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedArp {
    /// The parsed message.
    pub message: ArpMessage,
    /// Kernel receive time on `CLOCK_MONOTONIC`, in nanoseconds.
    pub mono_ns: u64,
    /// Kernel receive time, wall clock.
    pub wall: SystemTime,
}

/// Counters of one capture socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Frames that passed the filter.
    pub frames: u64,
    /// Frames parsed into ARP messages.
    pub parsed: u64,
    /// Malformed frames per [`ArpError::reason`].
    pub malformed: Vec<(&'static str, u64)>,
    /// Frames the kernel dropped because the socket's buffer was full (`PACKET_STATISTICS`).
    pub kernel_dropped: u64,
}

impl CaptureStats {
    /// Malformed frames with this reason label.
    pub fn malformed(&self, reason: &str) -> u64 {
        self.malformed.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
    }
}

#[derive(Debug, Default)]
struct Stats {
    frames: AtomicU64,
    parsed: AtomicU64,
    malformed: [AtomicU64; ArpError::REASONS.len()],
    /// Kernel drops summed over `PACKET_STATISTICS` reads (each read resets the kernel's count).
    kernel_dropped: AtomicU64,
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock [`CapturedArp::mono_ns`] uses).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const ETH_P_ALL: u16 = 0x0003;
const SKF_AD_OFF: u32 = 0xffff_f000;
const SKF_AD_PKTTYPE: u32 = 4;

/// The classic BPF program: drop our own outgoing frames, accept EtherType ARP, or 802.1Q then
/// ARP; drop everything else.
fn arp_filter() -> [libc::sock_filter; 9] {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        op(LD_W_ABS, 0, 0, SKF_AD_OFF + SKF_AD_PKTTYPE), // 0: A = pkttype
        op(JEQ_K, 5, 0, libc::PACKET_OUTGOING as u32),   // 1: outgoing → drop (7)
        op(LD_H_ABS, 0, 0, 12),                          // 2: A = ethertype
        op(JEQ_K, 4, 0, u32::from(arp::ETHERTYPE_ARP)),  // 3: ARP → accept (8)
        op(JEQ_K, 0, 2, u32::from(arp::ETHERTYPE_VLAN)), // 4: not 802.1Q → drop (7)
        op(LD_H_ABS, 0, 0, 16),                          // 5: A = inner ethertype
        op(JEQ_K, 1, 0, u32::from(arp::ETHERTYPE_ARP)),  // 6: ARP → accept (8)
        op(RET_K, 0, 0, 0),                              // 7: drop
        op(RET_K, 0, 0, 0x0004_0000),                    // 8: accept whole frame
    ]
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live T whose size is passed.
    check(unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t) })
        .map(drop)
}

/// Receive buffer of a capture socket: some 5,000 ARP frames (a frame costs ~800 B of buffer).
const CAPTURE_BUFFER: libc::c_int = 4 << 20;

/// An AF_PACKET socket bound to one interface: its fd, index and MAC.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    mac: MacAddr,
}

impl PacketSocket {
    /// Opens a socket on `ifname` (in the calling thread's namespace). With `capture`, it
    /// receives ARP through the filter, timestamped; without, it receives nothing (send only).
    fn open(ifname: &str, capture: bool) -> Result<Self, ArpIoError> {
        let sys = |what| {
            let ifname = ifname.to_owned();
            move |source| ArpIoError::Sys { what, ifname, source }
        };
        let ifindex =
            nix::net::if_::if_nametoindex(ifname).map_err(|_| ArpIoError::NoInterface(ifname.to_owned()))? as i32;
        // Protocol 0: no frame is queued before the filter is attached and the socket bound.
        // SAFETY: plain socket(2).
        let raw = check(unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
        })
        .map_err(sys("socket(AF_PACKET)"))?;
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let protocol = if capture {
            let filter = arp_filter();
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
            setsockopt(raw, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog).map_err(sys("SO_ATTACH_FILTER"))?;
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

    fn send(&self, frame: &[u8]) -> io::Result<()> {
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

/// Sends ARP frames on one interface; needs no runtime (for resident GARP senders and tools).
pub struct ArpSender {
    sock: PacketSocket,
}

impl ArpSender {
    /// Opens a send-only socket on `ifname` in the calling thread's network namespace.
    pub fn open(ifname: &str) -> Result<Self, ArpIoError> {
        Ok(ArpSender { sock: PacketSocket::open(ifname, false)? })
    }

    /// MAC address of the interface.
    pub fn mac(&self) -> MacAddr {
        self.sock.mac
    }

    /// Sends `msg` as one frame.
    pub fn send(&self, msg: &ArpMessage) -> io::Result<()> {
        self.sock.send(&arp::build_frame(msg))
    }

    /// Sends raw bytes as a frame (tests, tools).
    pub fn send_raw(&self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame)
    }
}

/// Captures ARP on one interface (and can send on it).
pub struct ArpCapture {
    fd: AsyncFd<OwnedFd>,
    sender: ArpSender,
    ifname: String,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for ArpCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArpCapture").field("ifname", &self.ifname).finish_non_exhaustive()
    }
}

impl ArpCapture {
    /// Opens a capture on `ifname` in the calling thread's network namespace. Must be called
    /// inside a tokio runtime (the socket is registered with its reactor).
    pub fn open(ifname: &str) -> Result<Self, ArpIoError> {
        let sock = PacketSocket::open(ifname, true)?;
        let sender = ArpSender::open(ifname)?;
        let fd = crate::aio::register(sock.fd).map_err(|source| ArpIoError::Sys {
            what: "register with tokio",
            ifname: ifname.to_owned(),
            source,
        })?;
        Ok(ArpCapture { fd, sender, ifname: ifname.to_owned(), stats: Arc::default() })
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// MAC address of the interface (the source of proxy-ARP replies).
    pub fn mac(&self) -> MacAddr {
        self.sender.mac()
    }

    /// Sends an ARP message on the interface (e.g. `arp::reply_to(&request, capture.mac())`).
    pub fn send(&self, msg: &ArpMessage) -> io::Result<()> {
        self.sender.send(msg)
    }

    /// The next valid ARP message; malformed frames are counted and skipped. Cancel-safe.
    pub async fn recv(&self) -> io::Result<CapturedArp> {
        let mut frame = [0u8; 2048];
        loop {
            let mut guard = self.fd.readable().await?;
            let got = match guard.try_io(|fd| recv_timestamped(fd.as_raw_fd(), &mut frame)) {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            let (len, wall) = got;
            self.stats.frames.fetch_add(1, Relaxed);
            match arp::parse_frame(&frame[..len]) {
                Ok(message) => {
                    self.stats.parsed.fetch_add(1, Relaxed);
                    return Ok(CapturedArp { message, mono_ns: wall_to_monotonic(wall), wall });
                }
                Err(e) => {
                    tracing::debug!(ifname = %self.ifname, reason = e.reason(), "malformed ARP frame");
                    self.stats.malformed[e.reason_index()].fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> CaptureStats {
        match packet_statistics(self.fd.get_ref().as_raw_fd()) {
            Ok(kernel) => {
                self.stats.kernel_dropped.fetch_add(u64::from(kernel.tp_drops), Relaxed);
            }
            Err(e) => tracing::debug!(ifname = %self.ifname, error = %e, "PACKET_STATISTICS"),
        }
        CaptureStats {
            kernel_dropped: self.stats.kernel_dropped.load(Relaxed),
            frames: self.stats.frames.load(Relaxed),
            parsed: self.stats.parsed.load(Relaxed),
            malformed: ArpError::REASONS
                .iter()
                .zip(&self.stats.malformed)
                .map(|(r, n)| (*r, n.load(Relaxed)))
                .collect(),
        }
    }
}

/// The kernel's counters of an AF_PACKET socket since the last read (reading resets them).
fn packet_statistics(fd: RawFd) -> io::Result<libc::tpacket_stats> {
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
fn wall_to_monotonic(wall: SystemTime) -> u64 {
    let mono_now = monotonic_ns();
    let age = SystemTime::now().duration_since(wall).unwrap_or(Duration::ZERO);
    mono_now.saturating_sub(age.as_nanos() as u64)
}

/// `recvmsg` one frame with its `SCM_TIMESTAMPNS` (falls back to "now" without one).
fn recv_timestamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SystemTime)> {
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
    fn filter_jumps_land_on_returns() {
        let f = arp_filter();
        let ret = (libc::BPF_RET | libc::BPF_K) as u16;
        for (i, ins) in f.iter().enumerate() {
            if ins.code & 0x07 == libc::BPF_JMP as u16 {
                for off in [ins.jt, ins.jf] {
                    let target = i + 1 + usize::from(off);
                    assert!(target < f.len(), "jump from {i} out of the program");
                }
            }
        }
        assert_eq!(f[7].code, ret);
        assert_eq!(f[7].k, 0);
        assert_eq!(f[8].code, ret);
        assert!(f[8].k > 0);
    }

    #[test]
    fn monotonic_conversion_is_close_to_now() {
        let before = monotonic_ns();
        let converted = wall_to_monotonic(SystemTime::now() - Duration::from_millis(5));
        let after = monotonic_ns();
        assert!(converted <= after && converted + 5_000_000 >= before.saturating_sub(1_000_000));
    }
}
