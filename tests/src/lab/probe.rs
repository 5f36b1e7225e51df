//! Measuring instruments of the lab, both resident in a namespace so they add no start-up delay:
//! * [`Prober`] — ICMP (or ICMPv6) echo requests at exact intervals from the client, replies counted by
//!   sequence number, each send time recorded (iputils `ping -i 0.01` really sends every ~16 ms
//!   and slows down while replies are missing, so it under-counts loss);
//! * [`FrameSender`] — the VM's gratuitous ARP from an AF_PACKET socket opened once (opening one
//!   per move would add a syscall storm, and `arping` takes 35–70 ms to start), timestamped; or the
//!   hypervisor's announcement of it ([`announce_self`]: QEMU's RARP frames and timing).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use victor_dataplane::arp_io::ArpSender;
use victor_dataplane::packet::arp::{ArpOp, MacAddr, build_frame, gratuitous};
use victor_dataplane::packet::{icmp, ipv4, rarp};
use victor_proto::clock::monotonic_ns;
use victor_testkit::netns::NetNs;

/// What a prober saw.
#[derive(Debug, Default, Clone)]
pub struct Probes {
    /// Requests sent (sequence numbers 0..sent).
    pub sent: u32,
    /// Send time of each request (CLOCK_MONOTONIC ns), by sequence number.
    pub sent_at: Vec<u64>,
    /// Sequence numbers that got a reply (each once, however many replies it got).
    pub replied: BTreeSet<u32>,
    /// Sequence numbers of replies beyond a request's first, once per extra reply (a request
    /// the network delivered twice, e.g. a migration relay's copy that reached the VM as well as
    /// the original): they never make a lost request look answered nor count a reply twice.
    pub duplicates: Vec<u32>,
}

impl Probes {
    /// Requests without a reply, ignoring the last `grace` (still in flight).
    pub fn lost(&self, grace: u32) -> u32 {
        self.lost_seqs(0, self.sent.saturating_sub(grace)).len() as u32
    }

    /// Unanswered sequence numbers in `from..to`.
    pub fn lost_seqs(&self, from: u32, to: u32) -> Vec<u32> {
        (from..to.min(self.sent)).filter(|s| !self.replied.contains(s)).collect()
    }

    /// Extra replies (beyond each request's first) to requests in `from..to`.
    pub fn duplicates_in(&self, from: u32, to: u32) -> u32 {
        self.duplicates.iter().filter(|s| (from..to).contains(s)).count() as u32
    }

    /// Records a reply to `seq`: the first one answers it, later ones are duplicates.
    pub fn record_reply(&mut self, seq: u32) {
        if !self.replied.insert(seq) {
            self.duplicates.push(seq);
        }
    }

    /// Replies to requests sent at or after `seq`.
    pub fn replies_from(&self, seq: u32) -> usize {
        self.replied.range(seq..).count()
    }

    /// The first sequence number sent at or after `mono_ns`.
    pub fn first_sent_after(&self, mono_ns: u64) -> u32 {
        self.sent_at.partition_point(|t| *t < mono_ns) as u32
    }
}

/// ICMPv6 echo request and reply types.
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// The prober thread sends and counts, then (after `stop`) only counts late replies, then ends.
const PROBING: u8 = 0;
const DRAINING: u8 = 1;
const STOPPED: u8 = 2;
/// How long `stop` waits for replies still in flight.
const DRAIN: Duration = Duration::from_secs(1);
/// The prober's longest sleep between two looks at its phase.
const MAX_SLEEP: Duration = Duration::from_millis(1);

/// Waits up to `timeout` for `sock` to have something to read (`ppoll`: a high-resolution
/// timeout, to the microsecond).
fn readable(sock: &Socket, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) > 0 }
}

/// How the prober thread is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Like every other thread.
    Normal,
    /// `SCHED_FIFO` (needs root; falls back to normal with a warning): the prober keeps its
    /// interval while CPU-bound neighbours (TCG guests) saturate the host. Between its sends it
    /// sleeps in `ppoll`, so it never takes a core for itself.
    Realtime,
}

impl Schedule {
    fn apply(self) {
        if self == Schedule::Realtime {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
                eprintln!(
                    "prober: SCHED_FIFO refused ({}): probing at normal priority",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Sends ICMP echo requests at exact intervals from a namespace and counts replies by sequence.
pub struct Prober {
    phase: Arc<AtomicU8>,
    state: Arc<Mutex<Probes>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Prober {
    /// Starts probing the IPv4 address `dst` from `ns` every `interval`.
    pub fn start(ns: &NetNs, dst: Ipv4Addr, interval: Duration) -> Result<Prober> {
        Prober::start_ip(ns, IpAddr::V4(dst), interval)
    }

    /// Starts probing `dst` (IPv4, or IPv6 with ICMPv6 echo) from `ns` every `interval`.
    pub fn start_ip(ns: &NetNs, dst: IpAddr, interval: Duration) -> Result<Prober> {
        Prober::start_with(ns, dst, interval, Schedule::Normal)
    }

    /// [`Prober::start_ip`] with the prober thread scheduled as `schedule` says.
    pub fn start_with(ns: &NetNs, dst: IpAddr, interval: Duration, schedule: Schedule) -> Result<Prober> {
        let phase = Arc::new(AtomicU8::new(PROBING));
        let state = Arc::new(Mutex::new(Probes::default()));
        let ident = (std::process::id() as u16) ^ rand::random::<u16>();
        let (phase2, state2) = (phase.clone(), state.clone());
        // ICMPv6 raw sockets get the checksum filled in by the kernel and deliver no IPv6 header.
        let (domain, protocol, request, reply) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, icmp::TYPE_ECHO_REQUEST, icmp::TYPE_ECHO_REPLY),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
        };
        let thread = ns.spawn_thread("prober", move || -> Result<()> {
            schedule.apply();
            let sock = Socket::new(domain, Type::RAW, Some(protocol))?;
            sock.set_nonblocking(true)?;
            let dst_addr = SocketAddr::from((dst, 0)).into();
            let mut next = Instant::now();
            let mut seq: u32 = 0;
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            let mut drain_until = None;
            loop {
                match phase2.load(Ordering::Relaxed) {
                    PROBING => {}
                    DRAINING => {
                        let until = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN);
                        let s = state2.lock().expect("probes");
                        if Instant::now() >= until || s.replied.len() as u32 >= s.sent {
                            return Ok(());
                        }
                    }
                    _ => return Ok(()),
                }
                if drain_until.is_none() && Instant::now() >= next {
                    let msg = icmp::echo(request, ident, seq as u16, &[0x5a; 56]);
                    let at = monotonic_ns();
                    let _ = sock.send_to(&msg, &dst_addr);
                    let mut s = state2.lock().expect("probes");
                    s.sent = seq + 1;
                    s.sent_at.push(at);
                    drop(s);
                    seq += 1;
                    next += interval;
                }
                // Sleep until the next request is due or a reply comes, on a high-resolution
                // timer: a socket's receive timeout counts in jiffies (4 ms and more here), which
                // made the prober fall behind and send in bursts exactly while no reply came —
                // during a move.
                let due =
                    if drain_until.is_none() { next.saturating_duration_since(Instant::now()) } else { MAX_SLEEP };
                if !readable(&sock, due.min(MAX_SLEEP)) {
                    continue;
                }
                let Ok(n) = sock.recv(&mut buf) else { continue };
                // SAFETY: recv initialised the first n bytes.
                let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                let m = match dst {
                    IpAddr::V4(_) => {
                        let Ok(h) = ipv4::parse(&data) else { continue };
                        &data[h.header_len..]
                    }
                    IpAddr::V6(_) => &data[..],
                };
                if m.len() >= 8 && m[0] == reply && m[4..6] == ident.to_be_bytes() {
                    let low = u16::from_be_bytes([m[6], m[7]]) as u32;
                    // Rebuild the full sequence number from its low 16 bits (sent recently).
                    let full = (seq.saturating_sub(1) & !0xffff) | low;
                    let full = if full > seq { full.saturating_sub(0x10000) } else { full };
                    state2.lock().expect("probes").record_reply(full);
                }
            }
        })?;
        Ok(Prober { phase, state, thread: Some(thread) })
    }

    /// What was seen so far.
    pub fn probes(&self) -> Probes {
        self.state.lock().expect("probes").clone()
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u32 {
        self.state.lock().expect("probes").sent
    }

    /// Waits until at least `n` replies to requests sent at or after `seq` arrived.
    pub fn wait_replies_from(&self, seq: u32, n: usize, timeout: Duration) -> Result<()> {
        wait("echo replies", timeout, || self.probes().replies_from(seq) >= n)
    }

    /// Waits until every request in `from..to` has its reply but `tolerated`; on timeout, says
    /// which are missing.
    pub fn wait_answered(&self, from: u32, to: u32, tolerated: usize, timeout: Duration) -> Result<()> {
        if wait("echo replies", timeout, || self.probes().lost_seqs(from, to).len() <= tolerated).is_ok() {
            return Ok(());
        }
        let lost = self.probes().lost_seqs(from, to);
        anyhow::bail!("{} of the echo requests {from}..{to} unanswered after {timeout:?}: {lost:?}", lost.len())
    }

    /// Stops sending, waits for the replies still in flight (up to a second) and returns
    /// everything seen.
    pub fn stop(mut self) -> Result<Probes> {
        self.phase.store(DRAINING, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow::anyhow!("prober panicked"))??;
        }
        Ok(self.probes())
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.phase.store(STOPPED, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A gratuitous ARP frame for `ip` at `mac`.
pub fn garp_frame(mac: &str, ip: Ipv4Addr) -> Result<Vec<u8>> {
    let mac: MacAddr = mac.parse().map_err(|_| anyhow::anyhow!("bad MAC {mac}"))?;
    Ok(build_frame(&gratuitous(mac, ip, ArpOp::Request, None)))
}

/// The RARP frame QEMU's `announce-self` sends for a NIC with `mac` (`net/announce.c`).
pub fn rarp_announce_frame(mac: &str) -> Result<Vec<u8>> {
    let mac: MacAddr = mac.parse().map_err(|_| anyhow::anyhow!("bad MAC {mac}"))?;
    Ok(rarp::build_frame(&rarp::announce(mac)))
}

/// Sends QEMU's `announce-self` for `mac` from `sender` with QEMU's default schedule: five RARP
/// frames, the second 50 ms after the first, then 100 ms more between each
/// ([`rarp::QEMU_ANNOUNCE_OFFSETS_MS`]: 0, 50, 200, 450, 800 ms). Blocks for the whole
/// announcement; returns the send time (CLOCK_MONOTONIC ns) of each frame.
pub fn announce_self(sender: &FrameSender, mac: &str) -> Result<Vec<u64>> {
    let frame = rarp_announce_frame(mac)?;
    let start = Instant::now();
    let mut sent = Vec::with_capacity(rarp::QEMU_ANNOUNCE_OFFSETS_MS.len());
    for offset in rarp::QEMU_ANNOUNCE_OFFSETS_MS {
        let due = start + Duration::from_millis(offset);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        sent.push(sender.send(&frame)?);
    }
    Ok(sent)
}

/// A frame to send and where to answer with its send time.
type SendJob = (Vec<u8>, mpsc::Sender<Result<u64>>);

/// Sends frames out of one interface of a namespace from a resident thread.
pub struct FrameSender {
    tx: Option<mpsc::Sender<SendJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FrameSender {
    /// Opens the sender on `ifname` inside `ns`.
    pub fn open(ns: &NetNs, ifname: &str) -> Result<FrameSender> {
        let (tx, rx) = mpsc::channel::<SendJob>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let ifname = ifname.to_owned();
        let thread = ns.spawn_thread("frames", move || {
            let sender = match ArpSender::open(&ifname) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("open AF_PACKET on {ifname}: {e}")));
                    return;
                }
            };
            for (frame, reply) in rx {
                let at = monotonic_ns();
                let _ = reply.send(sender.send_raw(&frame).map(|()| at).context("send frame"));
            }
        })?;
        ready_rx.recv().context("GARP sender thread died")??;
        Ok(FrameSender { tx: Some(tx), thread: Some(thread) })
    }

    /// Sends `frame` now; returns the CLOCK_MONOTONIC ns just before the send.
    pub fn send(&self, frame: &[u8]) -> Result<u64> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .as_ref()
            .context("sender closed")?
            .send((frame.to_vec(), reply_tx))
            .context("GARP sender thread died")?;
        reply_rx.recv().context("GARP sender thread died")?
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one gratuitous ARP for `ip` at `mac` out of `ifname` in `ns` (opens a socket each time:
/// for tests, not for timing).
pub fn send_garp(ns: &NetNs, ifname: &str, mac: &str, ip: Ipv4Addr) -> Result<()> {
    send_frames(ns, ifname, vec![garp_frame(mac, ip)?])
}

/// Sends `frames` out of `ifname` in `ns`, back to back.
pub fn send_frames(ns: &NetNs, ifname: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let sender = FrameSender::open(ns, ifname)?;
    frames.iter().try_for_each(|f| sender.send(f).map(drop))
}

/// Polls `check` every 5 ms until it holds.
pub fn wait(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    anyhow::bail!("timed out after {timeout:?} waiting for {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_reply_is_counted_apart_and_answers_nothing_twice() {
        let mut p = Probes { sent: 6, sent_at: (0..6).collect(), ..Probes::default() };
        for seq in [0, 1, 1, 3, 1, 5] {
            p.record_reply(seq);
        }
        // 2 and 4 stay lost however often 1 was answered.
        assert_eq!(p.lost_seqs(0, 6), vec![2, 4]);
        assert_eq!(p.replies_from(0), 4);
        assert_eq!(p.duplicates, vec![1, 1]);
        assert_eq!((p.duplicates_in(0, 6), p.duplicates_in(2, 6)), (2, 0));
    }
}
