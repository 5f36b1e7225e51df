//! The ARP socket: one AF_PACKET socket for every interface of the namespace, with a classic BPF
//! filter that lets only ARP frames (untagged or behind one 802.1Q tag) through, our own
//! transmissions ignored, and kernel receive timestamps. Frames are sent out of one interface by
//! index.
//!
//! One socket for all interfaces (not one per VM port) so a VM link that moves into this
//! namespace is heard from its first frame: there is no window between the link appearing and a
//! per-port socket being opened in which the VM's gratuitous ARP would be lost.
//!
//! This is a private helper: the data-plane crate (`victor-dataplane`) owns the ARP codecs used
//! here; it has no capture socket yet.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{ControlMessageOwned, LinkAddr, MsgFlags, recvmsg, setsockopt, sockopt};
use socket2::{Domain, Protocol, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;
use victor_dataplane::packet::arp::{ETHERTYPE_ARP, ETHERTYPE_VLAN};

/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h, Linux ≥ 4.20): do not deliver frames this host
/// sends (our own proxy-ARP replies and probes) back to the socket.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Largest frame read (ARP frames are 42–64 bytes; anything longer is truncated and still parsed).
const FRAME_BUF: usize = 256;

/// One received frame.
#[derive(Debug, Clone)]
pub struct Received {
    /// Interface index it arrived on.
    pub ifindex: u32,
    /// The frame (Ethernet header on).
    pub frame: Vec<u8>,
    /// Kernel receive time, wall clock (ns since the Unix epoch).
    pub wall_ns: i64,
    /// Receive time on CLOCK_MONOTONIC (ns), derived from the kernel timestamp.
    pub mono_ns: u64,
}

/// The classic BPF program as (code, jt, jf, k): accept ARP (EtherType 0x0806), directly or after
/// one 802.1Q tag; drop everything else.
const ARP_FILTER: [(u16, u8, u8, u32); 7] = {
    const LDH_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    [
        (LDH_ABS, 0, 0, 12),
        (JEQ_K, 3, 0, ETHERTYPE_ARP as u32),
        (JEQ_K, 0, 3, ETHERTYPE_VLAN as u32),
        (LDH_ABS, 0, 0, 16),
        (JEQ_K, 0, 1, ETHERTYPE_ARP as u32),
        (RET_K, 0, 0, 0x0004_0000),
        (RET_K, 0, 0, 0),
    ]
};

fn arp_filter() -> Vec<SockFilter> {
    ARP_FILTER.iter().map(|&(code, jt, jf, k)| SockFilter::new(code, jt, jf, k)).collect()
}

/// The ARP socket, registered with tokio.
#[derive(Debug)]
pub struct ArpSocket {
    fd: AsyncFd<Socket>,
}

impl ArpSocket {
    /// Opens the socket in the calling thread's network namespace (needs CAP_NET_RAW). Must run
    /// inside a tokio runtime.
    pub fn open() -> io::Result<Self> {
        let proto = Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
        let socket = Socket::new(Domain::PACKET, Type::RAW, Some(proto))?;
        socket.attach_filter(&arp_filter())?;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with an int that outlives the call and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_IGNORE_OUTGOING,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            tracing::warn!(%err, "PACKET_IGNORE_OUTGOING unsupported; our own frames are filtered by source MAC");
        }
        setsockopt(&socket, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)?;
        socket.set_recv_buffer_size(4 << 20)?;
        socket.set_nonblocking(true)?;
        // SAFETY: the socket is owned by the AsyncFd for as long as it is registered.
        Ok(ArpSocket { fd: unsafe { AsyncFd::register(socket) }? })
    }

    /// Waits for the next ARP frame.
    pub async fn recv(&self) -> io::Result<Received> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_one(inner.get_ref().as_raw_fd())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends `frame` (a complete Ethernet frame) out of interface `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        // SAFETY: all-zero is a valid sockaddr_ll; the fields we need are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETHERTYPE_ARP.to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are live for the call and their lengths are passed.
        let rc = unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

fn recv_one(fd: RawFd) -> io::Result<Received> {
    let mut buf = vec![0u8; FRAME_BUF];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let (len, ifindex, stamp) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            recvmsg::<LinkAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
        let ifindex = msg.address.map(|a| a.ifindex() as u32).unwrap_or(0);
        let stamp = msg.cmsgs().ok().and_then(|mut c| {
            c.find_map(|m| match m {
                ControlMessageOwned::ScmTimestampns(ts) => Some(ts.tv_sec() * 1_000_000_000 + ts.tv_nsec()),
                _ => None,
            })
        });
        (msg.bytes, ifindex, stamp)
    };
    buf.truncate(len.min(FRAME_BUF));
    let (now_wall, now_mono) = (victor_proto::clock::unix_nanos(), victor_proto::clock::monotonic_ns());
    // The kernel stamps on CLOCK_REALTIME; carry the frame's age over to CLOCK_MONOTONIC.
    let (wall_ns, mono_ns) = match stamp {
        Some(wall) if wall <= now_wall => (wall, now_mono.saturating_sub((now_wall - wall) as u64)),
        _ => (now_wall, now_mono),
    };
    Ok(Received { ifindex, frame: buf, wall_ns, mono_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interprets [`ARP_FILTER`] (only the opcodes it uses).
    fn run(frame: &[u8]) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let (code, jt, jf, k) = ARP_FILTER[pc];
            match code {
                0x28 => {
                    let at = k as usize;
                    if at + 2 > frame.len() {
                        return 0;
                    }
                    acc = u32::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
                    pc += 1;
                }
                0x15 => pc += 1 + usize::from(if acc == k { jt } else { jf }),
                0x06 => return k,
                other => panic!("opcode {other:#x} not interpreted"),
            }
        }
    }

    #[test]
    fn filter_accepts_arp_and_tagged_arp_only() {
        assert_eq!(arp_filter().len(), ARP_FILTER.len());
        let mut frame = vec![0u8; 60];
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_ne!(run(&frame), 0);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(run(&frame), 0, "IPv4 is dropped");
        frame[12..14].copy_from_slice(&[0x81, 0x00]);
        frame[16..18].copy_from_slice(&[0x08, 0x06]);
        assert_ne!(run(&frame), 0, "802.1Q-tagged ARP passes");
        frame[16..18].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(run(&frame), 0);
    }
}
