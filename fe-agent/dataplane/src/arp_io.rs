//! ARP on a VM-facing interface: capture (AF_PACKET + classic BPF, non-blocking under tokio)
//! and sending (proxy-ARP replies, gratuitous ARPs). [`crate::neigh_io`] captures ARP, RARP and
//! NDP on one socket with the same machinery; this module is its ARP-only form.
//!
//! The BPF filter ([`crate::neigh_io::filter`] for ARP alone) passes only incoming (not our own
//! outgoing) frames whose EtherType is ARP, directly or behind one 802.1Q tag, so the socket wakes
//! for nothing else. Frames that pass
//! but do not parse are counted by reason ([`crate::packet::arp::ArpError::REASONS`]) and
//! skipped. Each captured frame carries the kernel's receive time (`SO_TIMESTAMPNS`) as wall
//! clock and converted to `CLOCK_MONOTONIC` nanoseconds — the clock every namespace on one host
//! shares, which the lab uses to compare capture times across processes.
//!
//! VLAN: an in-band 802.1Q tag is parsed; a tag the NIC/veth stripped into packet metadata (VLAN
//! acceleration) is not reconstructed, so such frames read as untagged. VM ports are access
//! ports, where this does not arise.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use tokio::io::unix::AsyncFd;

use crate::neigh_io::{self, Protocols};
use crate::packet::arp::{self, ArpError, ArpMessage, MacAddr};
pub use crate::psock::CaptureError;
pub use crate::psock::monotonic_ns;
use crate::psock::{self, PacketSocket};

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

/// Sends ARP frames on one interface; needs no runtime (for resident GARP senders and tools).
pub struct ArpSender {
    sock: PacketSocket,
}

impl ArpSender {
    /// Opens a send-only socket on `ifname` in the calling thread's network namespace.
    pub fn open(ifname: &str) -> Result<Self, CaptureError> {
        Ok(ArpSender { sock: PacketSocket::open(ifname, None)? })
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
    pub fn open(ifname: &str) -> Result<Self, CaptureError> {
        let filter = neigh_io::filter(Protocols::ARP);
        let sock = PacketSocket::open(ifname, Some(&filter))?;
        let sender = ArpSender::open(ifname)?;
        let fd = crate::aio::register(sock.fd).map_err(|source| CaptureError::Sys {
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
            let got = match guard.try_io(|fd| psock::recv_timestamped(fd.as_raw_fd(), &mut frame)) {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            let (len, wall) = got;
            self.stats.frames.fetch_add(1, Relaxed);
            match arp::parse_frame(&frame[..len]) {
                Ok(message) => {
                    self.stats.parsed.fetch_add(1, Relaxed);
                    return Ok(CapturedArp { message, mono_ns: psock::wall_to_monotonic(wall), wall });
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
        match psock::packet_statistics(self.fd.get_ref().as_raw_fd()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::rarp;

    #[test]
    fn filter_passes_arp_only() {
        let f = neigh_io::filter(Protocols::ARP);
        let garp = arp::build_frame(&arp::gratuitous(
            MacAddr([2, 0, 0, 0, 0, 1]),
            [10, 0, 0, 1].into(),
            arp::ArpOp::Request,
            None,
        ));
        let tagged = arp::gratuitous(MacAddr([2, 0, 0, 0, 0, 1]), [10, 0, 0, 1].into(), arp::ArpOp::Reply, Some(9));
        assert!(crate::bpf::run(&f, &garp, 0) > 0);
        assert!(crate::bpf::run(&f, &arp::build_frame(&tagged), 0) > 0);
        assert_eq!(crate::bpf::run(&f, &garp, libc::PACKET_OUTGOING as u32), 0, "our own frames");
        assert_eq!(crate::bpf::run(&f, &rarp::build_frame(&rarp::announce(MacAddr([2, 0, 0, 0, 0, 1]))), 0), 0);
    }
}
