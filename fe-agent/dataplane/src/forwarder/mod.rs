//! The userspace tunnel forwarder: a TUN device (the agent routes the mobile prefixes and remote
//! host routes into it, IPv4 and IPv6) and raw IPv4 sockets on the underlay for protocol 4
//! (IP-in-IP, RFC 2003) and protocol 41 (6in4, RFC 4213). The underlay is IPv4 for both families.
//!
//! * From TUN: look the destination up in the [`Fib`] (/32 or /128); `Remote(peer)` → decrement
//!   TTL / hop limit, encapsulate (IP-in-IP or 6in4), send to `peer`; no binding → drop; TTL /
//!   hop limit ≤ 1 → ICMP / ICMPv6 time exceeded; longer than the tunnel MTU → ICMP
//!   fragmentation needed (IPv4 with DF) or ICMPv6 packet too big (IPv6), carrying the tunnel MTU
//!   (PMTUD).
//! * From the underlay: only tunnel packets whose outer source is a registered peer and whose
//!   inner packet is valid IPv4 (protocol 4) or IPv6 (protocol 41) are accepted; the inner packet
//!   is written into TUN and the kernel routes it — by its host route to a local VM, or back into
//!   TUN when the VM has moved on, so the forwarder relays it to the new binding FE (each pass
//!   through the kernel costs a TTL / hop limit, so loops end).
//!
//! ICMP errors are sent through the raw IP-in-IP socket, ICMPv6 errors through a raw IPv6 socket
//! (locally originated, routed by the kernel, no martian-source issue that writing them into TUN
//! with our own source address would have), together at most [`ForwarderConfig::icmp_rate_per_s`]
//! per second (token bucket shared by the workers). The TUN MTU is the underlay MTU − 20, so the
//! kernel fragments or answers "fragmentation needed" / "packet too big" itself before packets
//! reach us; our own check covers a TUN MTU raised by hand and GSO super-packets. IPv6 needs a
//! tunnel MTU of at least 1280 (the kernel disables IPv6 on a smaller device).
//!
//! # Workers, queues, batches
//! [`ForwarderConfig::queues`] workers (default: one per core), each on its own thread with its
//! own TUN queue (`IFF_MULTI_QUEUE`) and its own raw socket. The kernel picks the TUN queue of a
//! packet by its flow hash (and keeps a flow on the queue that last wrote its other direction);
//! received tunnel packets are steered to workers by their inner flow (module `steer`), so every flow
//! is handled by one worker and TCP sees no reordering. With offloads on (virtio-net header), a
//! read from TUN returns a GSO super-packet of up to 64 KiB which the worker splits once into
//! encapsulated segments ([`crate::packet::gso`]); received segments are coalesced back into
//! super-packets for the TUN write ([`crate::packet::gro`]). See module `worker` for the loops.
//!
//! # Surviving a restart
//! With [`ForwarderConfig::persist`] the TUN device is persistent: when the process dies the
//! device stays, with its address and every route into it (packets routed into it meanwhile are
//! dropped by the kernel, as no queue is attached), and the next forwarder adopts it. A
//! forwarder meant to take over at once ([`Prepared`]) opens its queues ahead and keeps them
//! detached until it starts.
//!
//! **Handing the queues and sockets on.** Closing the last descriptor of a TUN queue detaches
//! it, and the kernel drops what it holds; steering moves a flow to another queue only when the
//! queue count changes; a raw socket's receive buffer dies with its last descriptor. So a
//! forwarder that takes over from another one on the same device forwards on *the other's*
//! queues and underlay sockets ([`HandedOn`]): it gets duplicates of their descriptors (passed
//! over a Unix socket, [`Forwarder::handed_on`]) and starts on them ([`Forwarder::start_on`]);
//! its own queues, opened only as containers for them, are detached the moment they are opened
//! and replaced. Queues and sockets then live as long as any forwarder holds them: nothing is
//! dropped when the previous forwarder closes its descriptors or dies, what was queued while
//! nobody read is forwarded by the next one, and no tunnel packet is written twice.
//!
//! Modules: [`pipeline`] (per-packet decisions, pure), `worker` (the loops), `raw` (the
//! underlay sockets, `sendmmsg`/`recvmmsg`), `steer` (the per-worker socket filters),
//! `ratelimit` (the ICMP token bucket), `tun` (persistence ioctls), `buf` (receive buffers).

mod buf;
pub mod pipeline;
mod ratelimit;
mod raw;
mod relay;
mod shared;
mod steer;
mod tun;
mod worker;

pub use tun::remove_persistent as remove_persistent_tun;

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::watch;

pub use pipeline::{Egress, egress, ingress};

use crate::counters::{CounterSnapshot, Counters, Family};
use crate::fib::Fib;
use crate::packet::ipv4::{DEFAULT_OUTER_TTL, HEADER_LEN, PROTO_IPIP, PROTO_IPV6};
use crate::packet::ipv6;

/// How to run a forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// Name of the TUN device to create (≤ 15 bytes), e.g. `victor0`.
    pub tun_name: String,
    /// MTU of the underlay path between FEs; the tunnel (and TUN) MTU is this − 20.
    pub underlay_mtu: u16,
    /// TTL of outer headers.
    pub outer_ttl: u8,
    /// Source address of the ICMP errors we send (default: the FE's underlay address).
    pub icmp_source: Option<Ipv4Addr>,
    /// Source address of the ICMPv6 errors we send (default: [`ForwarderConfig::icmp6_source_for`]
    /// of the ICMP source — the 6to4 address embedding it, RFC 3056). The agent sets an address of
    /// the FE's (e.g. the gateway's on the VM ports).
    pub icmp6_source: Option<Ipv6Addr>,
    /// Use TUN offloads (virtio-net header: GSO super-packets in, GRO-coalesced writes out).
    pub offload: bool,
    /// Workers, each with its own TUN queue, raw socket and thread; 0 = one per core.
    pub queues: usize,
    /// Most ICMP and ICMPv6 errors (together) the forwarder sends per second (0: none at all).
    pub icmp_rate_per_s: u32,
    /// How many ICMP errors may go out back to back before the rate applies.
    pub icmp_burst: u32,
    /// Make the TUN device persistent (`TUNSETPERSIST`): it — and every route the agent pointed
    /// into it — outlives this forwarder and its process, and the next forwarder started with
    /// the same name adopts it (see [`Forwarder::adopted`]). Remove it with
    /// [`Forwarder::remove`] or [`remove_persistent_tun`]. A persistent device is always
    /// multi-queue, so that two forwarders can read it at once while one hands over to the other.
    pub persist: bool,
}

impl ForwarderConfig {
    /// Defaults: underlay MTU 1500, outer TTL 64, ICMP from the underlay address, offload on,
    /// one worker per core, ICMP errors at most 1000/s with bursts of 50 (Linux's defaults).
    pub fn new(tun_name: impl Into<String>) -> Self {
        ForwarderConfig {
            tun_name: tun_name.into(),
            underlay_mtu: 1500,
            outer_ttl: DEFAULT_OUTER_TTL,
            icmp_source: None,
            icmp6_source: None,
            offload: true,
            queues: 0,
            icmp_rate_per_s: 1000,
            icmp_burst: 50,
            persist: false,
        }
    }

    /// The tunnel MTU: the largest inner packet, underlay MTU − 20.
    pub fn tunnel_mtu(&self) -> u16 {
        self.underlay_mtu.saturating_sub(HEADER_LEN as u16)
    }

    /// The default ICMPv6 source for an FE whose ICMP source is `v4`: the 6to4 address
    /// `2002:<v4>::` (RFC 3056), a routable unicast address that names this FE without it having
    /// to own an IPv6 address.
    pub fn icmp6_source_for(v4: Ipv4Addr) -> Ipv6Addr {
        let o = v4.octets();
        Ipv6Addr::new(0x2002, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]), 0, 0, 0, 0, 0)
    }

    /// The number of workers `queues` asks for (0 resolved to the number of cores).
    pub fn worker_count(&self) -> usize {
        match self.queues {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Most workers (TUN queues) a forwarder runs.
pub const MAX_QUEUES: usize = 64;

/// Why the forwarder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// Configuration refused.
    #[error("invalid forwarder config: {0}")]
    Config(String),
    /// The TUN device could not be created or configured.
    #[error("TUN device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        /// Device name.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// A raw underlay socket could not be opened.
    #[error(
        "raw IP-in-IP / 6in4 / ICMPv6 socket on {addr}: {source} (needs CAP_NET_RAW; is {addr} configured on an interface?)"
    )]
    Socket {
        /// Underlay address.
        addr: Ipv4Addr,
        /// Cause.
        source: io::Error,
    },
    /// The worker thread could not start.
    #[error("forwarder thread: {0}")]
    Thread(io::Error),
}

/// A running forwarder. Dropping it stops it (like [`Forwarder::stop`]); the TUN device
/// disappears with it, and with it every route the agent pointed into it — unless the device is
/// persistent ([`ForwarderConfig::persist`]).
pub struct Forwarder {
    tun_name: String,
    tun_index: u32,
    tunnel_mtu: u16,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    /// For a persistent device: a duplicate of queue 0's descriptor, to clear the persistence
    /// flag from wherever [`Forwarder::remove`] is called.
    control: Option<OwnedFd>,
    adopted: bool,
    hand_over: HandOver,
    /// Duplicates of the workers' descriptors, to hand on ([`Forwarder::handed_on`]).
    handed: HandedOn,
}

/// What a forwarder hands on to the one that takes over from it on the same persistent device
/// ([`Forwarder::handed_on`], [`Forwarder::start_on`]): per worker, in worker order, its TUN
/// queue and its IP-in-IP and 6in4 underlay sockets (each with its worker's steering filter).
/// The next forwarder reads the same queues and sockets: what they hold when the previous one
/// stops or dies is forwarded, not dropped, and no packet is read twice.
#[derive(Debug, Default)]
pub struct HandedOn {
    /// TUN queues.
    pub queues: Vec<OwnedFd>,
    /// Raw IP-in-IP (protocol 4) sockets.
    pub ipip: Vec<OwnedFd>,
    /// Raw 6in4 (protocol 41) sockets.
    pub sixin4: Vec<OwnedFd>,
}

impl HandedOn {
    /// All descriptors in one list (to pass over a Unix socket): queues, IP-in-IP sockets, 6in4
    /// sockets.
    pub fn into_fds(self) -> Vec<OwnedFd> {
        let HandedOn { mut queues, ipip, sixin4 } = self;
        queues.extend(ipip);
        queues.extend(sixin4);
        queues
    }

    /// The inverse of [`HandedOn::into_fds`]; a list that is not three equal parts yields none.
    pub fn from_fds(mut fds: Vec<OwnedFd>) -> HandedOn {
        if !fds.len().is_multiple_of(3) {
            tracing::warn!(
                descriptors = fds.len(),
                "descriptors handed on are not queues and two sockets per worker: ignored"
            );
            return HandedOn::default();
        }
        let n = fds.len() / 3;
        let sixin4 = fds.split_off(2 * n);
        let ipip = fds.split_off(n);
        HandedOn { queues: fds, ipip, sixin4 }
    }

    /// Workers it has descriptors for.
    pub fn workers(&self) -> usize {
        self.queues.len()
    }

    fn try_clone(&self) -> io::Result<HandedOn> {
        let dup = |fds: &[OwnedFd]| fds.iter().map(OwnedFd::try_clone).collect::<io::Result<Vec<_>>>();
        Ok(HandedOn { queues: dup(&self.queues)?, ipip: dup(&self.ipip)?, sixin4: dup(&self.sixin4)? })
    }
}

/// Handing a persistent device over to another forwarder on it without losing a packet (the
/// fe-agent's standby: the next process starts while this one still runs). Once
/// [`HandOver::start`] is called this forwarder reads its underlay sockets no more (what it had
/// read it still writes): the other reads them — the same sockets when it took them over
/// ([`Forwarder::start_on`]), else its own, which received a copy of every tunnel packet since
/// it opened them. It keeps reading its TUN queues and encapsulating until it stops: when the
/// other took the queues over they share them and closing this one's descriptors drops nothing;
/// otherwise TUN steers a two-way flow to the queue that last wrote it, so within a round trip
/// such flows move to the other's queues (a one-way flow stays where its hash puts it, and what
/// its queue holds at the close is lost).
#[derive(Debug, Clone, Default)]
pub struct HandOver(Arc<AtomicBool>);

impl HandOver {
    /// From now on the other forwarder reads the underlay and writes into TUN; this one only
    /// encapsulates.
    pub fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`HandOver::start`] was called.
    pub fn started(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("tun_name", &self.tun_name)
            .field("tunnel_mtu", &self.tunnel_mtu)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Creates the TUN device (up, MTU = tunnel MTU, one queue per worker) and one underlay
    /// socket per worker bound to `fib.local_underlay()` in the calling thread's network
    /// namespace, then forwards on the workers' threads until stopped.
    pub fn start(config: ForwarderConfig, fib: Arc<Fib>) -> Result<Forwarder, ForwarderError> {
        Forwarder::start_on(config, fib, HandedOn::default())
    }

    /// Like [`Forwarder::start`], but forwards on what another forwarder of the same persistent
    /// device handed on ([`HandedOn`], [`Forwarder::handed_on`]): its TUN queues and underlay
    /// sockets, one of each per worker. Nothing they hold is lost, and the queues stay attached
    /// when the other forwarder closes its descriptors (see the module doc). What does not fit
    /// (not one per worker, another device or address, a device that is not persistent) is
    /// replaced by our own (said in the log).
    pub fn start_on(config: ForwarderConfig, fib: Arc<Fib>, handed: HandedOn) -> Result<Forwarder, ForwarderError> {
        let workers = validate(&config)?;
        let handed = usable(&config, fib.local_underlay(), workers, handed);
        // Our own queues only carry the inherited ones: detached as soon as they are opened.
        let device = Device::open(&config, fib.local_underlay(), workers, !handed.queues.is_empty())?;
        let threads = spawn_workers(&config.tun_name, workers)?;
        run(config, device, threads, fib, handed)
    }

    /// Duplicates of this forwarder's TUN queues and underlay sockets, for the forwarder that
    /// takes over next ([`Forwarder::start_on`]).
    pub fn handed_on(&self) -> io::Result<HandedOn> {
        self.handed.try_clone()
    }

    /// Name of the TUN device (route the mobile prefix and remote /32s into it).
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// Interface index of the TUN device (for rtnetlink routes).
    pub fn tun_index(&self) -> u32 {
        self.tun_index
    }

    /// MTU of the TUN device = tunnel MTU.
    pub fn tunnel_mtu(&self) -> u16 {
        self.tunnel_mtu
    }

    /// Current counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// The live counters, to read from elsewhere (e.g. a metrics endpoint) after moving the
    /// forwarder.
    pub fn counters_handle(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The handle that hands the device over to another forwarder ([`HandOver`]).
    pub fn hand_over_handle(&self) -> HandOver {
        self.hand_over.clone()
    }

    /// True when the TUN device was left by an earlier (persistent) forwarder and adopted, with
    /// its interface index and the routes into it unchanged.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Stops forwarding and deletes the TUN device even if it is persistent (with it, every
    /// route into it).
    pub fn remove(mut self) -> io::Result<()> {
        if let Some(fd) = self.control.take() {
            tun::set_persist(fd.as_raw_fd(), false)?;
        }
        self.shutdown()
    }

    /// Number of workers (TUN queues).
    pub fn queues(&self) -> usize {
        self.threads.len()
    }

    /// True while every worker runs (false after a fatal device/socket error in any).
    pub fn is_running(&self) -> bool {
        !self.threads.is_empty() && self.threads.iter().all(|t| !t.is_finished())
    }

    /// Stops forwarding, waits for the workers and closes their TUN queues and sockets: the TUN
    /// device disappears with them unless it is persistent ([`ForwarderConfig::persist`]).
    /// Returns the error that had ended a worker early, if any.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let _ = self.stop.send(true);
        let mut result = Ok(());
        for t in self.threads.drain(..) {
            let r = t.join().unwrap_or_else(|_| Err(io::Error::other("forwarder thread panicked")));
            result = result.and(r);
        }
        result
    }
}

/// What of `handed` a forwarder of `config` on underlay address `local` with `workers` workers
/// can forward on: the queues if there is one per worker of this persistent device, the sockets
/// if there is one of each per worker, raw IPv4 sockets of the right protocol bound to `local`;
/// the rest is dropped (said in the log) and replaced by our own.
fn usable(config: &ForwarderConfig, local: Ipv4Addr, workers: usize, handed: HandedOn) -> HandedOn {
    let HandedOn { queues, ipip, sixin4 } = handed;
    if queues.is_empty() && ipip.is_empty() && sixin4.is_empty() {
        return HandedOn::default();
    }
    let queues_fit = queues.len() == workers
        && config.persist
        && queues.iter().all(|q| tun::device_name(q.as_raw_fd()).is_ok_and(|name| name == config.tun_name));
    let sockets_fit = |fds: &[OwnedFd], protocol: u8| {
        fds.len() == workers && fds.iter().all(|fd| raw::is_underlay_socket(fd.as_fd(), local, protocol))
    };
    let sockets_fit = sockets_fit(&ipip, PROTO_IPIP) && sockets_fit(&sixin4, PROTO_IPV6);
    if !queues_fit || !sockets_fit {
        tracing::warn!(
            tun = %config.tun_name, workers, queues = queues.len(), queues_fit, sockets = ipip.len(), sockets_fit,
            "cannot forward on everything handed on (not one per worker of this persistent device and address): opening our own"
        );
    }
    HandedOn {
        queues: if queues_fit { queues } else { Vec::new() },
        ipip: if sockets_fit { ipip } else { Vec::new() },
        sixin4: if sockets_fit { sixin4 } else { Vec::new() },
    }
}

/// Checks `config`; returns the number of workers.
fn validate(config: &ForwarderConfig) -> Result<usize, ForwarderError> {
    if config.tun_name.is_empty() || config.tun_name.len() > 15 {
        return Err(ForwarderError::Config(format!("tun_name {:?} must be 1..=15 bytes", config.tun_name)));
    }
    if config.underlay_mtu < 68 + HEADER_LEN as u16 {
        return Err(ForwarderError::Config(format!(
            "underlay_mtu {} is below the IPv4 minimum 68 + 20",
            config.underlay_mtu
        )));
    }
    if config.outer_ttl == 0 {
        return Err(ForwarderError::Config("outer_ttl must be at least 1".into()));
    }
    let workers = config.worker_count();
    if workers > MAX_QUEUES {
        return Err(ForwarderError::Config(format!("queues {workers} is more than {MAX_QUEUES}")));
    }
    Ok(workers)
}

/// The TUN device as a forwarder holds it: one queue per worker.
struct Device {
    queues: Vec<tun_rs::SyncDevice>,
    tun_index: u32,
    tunnel_mtu: u16,
    /// For a persistent device: a duplicate of queue 0's descriptor (see `Forwarder`).
    control: Option<OwnedFd>,
    adopted: bool,
    /// The queues are detached (`TUNSETQUEUE`): the kernel steers nothing to them.
    detached: bool,
}

impl Device {
    /// Creates or adopts the device of `config` with `workers` queues, up, configured. With
    /// `detached` each queue is detached right after it is opened (a multi-queue device only):
    /// the kernel steers nothing to it, so nothing is lost in it when it closes unread.
    fn open(
        config: &ForwarderConfig,
        local: Ipv4Addr,
        workers: usize,
        detached: bool,
    ) -> Result<Device, ForwarderError> {
        let tunnel_mtu = config.tunnel_mtu();
        if usize::from(tunnel_mtu) < ipv6::MIN_MTU {
            tracing::warn!(tunnel_mtu, "tunnel MTU below 1280: the kernel carries no IPv6 on the TUN device");
        }
        let tun_err = |source| ForwarderError::Tun { name: config.tun_name.clone(), source };
        // The TUN device carries the underlay address as a /32: the kernel's reverse-path
        // check drops everything arriving on an address-less interface whenever rp_filter is on,
        // and packets the FE itself sends towards remote VMs get a routable source.
        let existed = config.persist && tun::exists(&config.tun_name);
        let build = |adopt: bool| {
            let builder = tun_rs::DeviceBuilder::new()
                .name(&config.tun_name)
                .ipv4(local, 32u8, None)
                .mtu(tunnel_mtu)
                .offload(config.offload)
                // A persistent device is multi-queue: the next forwarder (a standby, a restarted
                // agent) attaches its queues before this one lets go of its own.
                .multi_queue(workers > 1 || config.persist);
            // An adopted device stays up: taking it down would flush every route into it.
            if adopt { builder.inherit_enable_state() } else { builder.enable(false) }.build_sync()
        };
        let detach = |dev: tun_rs::SyncDevice| -> io::Result<tun_rs::SyncDevice> {
            if detached {
                tun::set_queue(dev.as_raw_fd(), false)?;
            }
            Ok(dev)
        };
        let (dev, adopted) = match build(existed).and_then(detach) {
            Ok(dev) => (dev, existed),
            // A device left by an earlier forwarder with other flags (queues, offload): it
            // cannot be adopted, so it is replaced (the agent re-installs its routes).
            Err(e) if existed && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(tun = %config.tun_name, "persistent TUN device has other flags; replacing it");
                tun::remove_persistent(&config.tun_name).map_err(tun_err)?;
                (build(false).and_then(detach).map_err(tun_err)?, false)
            }
            Err(e) => return Err(tun_err(e)),
        };
        let control = if config.persist {
            dev.persist().map_err(tun_err)?;
            Some(dev.as_fd().try_clone_to_owned().map_err(tun_err)?)
        } else {
            None
        };
        let tun_index = dev.if_index().map_err(tun_err)?;
        // Decapsulated packets arrive on TUN from clients reached through other interfaces:
        // loose reverse-path filtering (the effective value is max(all, dev), so strict mode
        // on `all` would still drop them; the agent checks that).
        // IPv6 on, but quiet: no address of its own (no link-local, so no DAD or router
        // solicitation; none is needed to route through it), not a router *on this device*
        // (per-device `forwarding` 0: it joins no all-routers groups, so the kernel sends no MLD
        // reports into it — forwarding itself follows `all.forwarding`), no router advertisements
        // taken from it. addr_gen_mode first: enabling IPv6 on an up device generates the
        // link-local address at once. (Writing `all.forwarding` later resets the device's value:
        // its MLD reports then reach the forwarder, which drops them as `multicast`.)
        for (key, value) in [
            ("ipv4/conf/{}/rp_filter", "2"),
            ("ipv6/conf/{}/addr_gen_mode", "1"),
            ("ipv6/conf/{}/forwarding", "0"),
            ("ipv6/conf/{}/accept_ra", "0"),
            ("ipv6/conf/{}/disable_ipv6", "0"),
        ] {
            let path = format!("/proc/sys/net/{}", key.replace("{}", &config.tun_name));
            if let Err(e) = std::fs::write(&path, value) {
                tracing::warn!(%path, error = %e, "could not set a sysctl of the TUN device");
            }
        }
        let mut queues = Vec::with_capacity(workers);
        for _ in 1..workers {
            queues.push(dev.try_clone().and_then(detach).map_err(tun_err)?);
        }
        queues.insert(0, dev);
        queues[0].enabled(true).map_err(tun_err)?;
        Ok(Device { queues, tun_index, tunnel_mtu, control, adopted, detached })
    }

    /// Puts `inherited` (one per queue) behind our queues' descriptor numbers (`dup3`): the
    /// `tun_rs` devices, opened with this device's flags and offloads, then read and write the
    /// inherited queues; ours (detached) close. The control descriptor follows.
    fn take_queues(&mut self, inherited: &[OwnedFd]) -> io::Result<()> {
        debug_assert!(self.detached && inherited.len() == self.queues.len());
        for (ours, theirs) in self.queues.iter().zip(inherited) {
            // SAFETY: both are open descriptors; nobody uses `ours` meanwhile (no worker has it
            // yet), and the `tun_rs` device keeps owning the number, now for the inherited queue.
            let rc = unsafe { libc::dup3(theirs.as_raw_fd(), ours.as_raw_fd(), libc::O_CLOEXEC) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if self.control.is_some() {
            self.control = Some(inherited[0].try_clone()?);
        }
        self.detached = false;
        Ok(())
    }

    /// Attaches (true) or detaches every queue ([`tun::set_queue`]).
    fn set_queues(&self, attach: bool) -> io::Result<()> {
        self.queues.iter().try_for_each(|q| tun::set_queue(q.as_raw_fd(), attach))
    }
}

/// What a worker needs to forward: its queue, its sockets, what the workers share.
struct Go {
    dev: tun_rs::SyncDevice,
    sock: socket2::Socket,
    sock6: socket2::Socket,
    icmp6: socket2::Socket,
    shared: Arc<shared::Shared>,
    stop: watch::Receiver<bool>,
}

/// A worker thread with its runtime built, waiting for its [`Go`] (it ends if that never comes).
struct Waiting {
    thread: JoinHandle<io::Result<()>>,
    go: std::sync::mpsc::SyncSender<Go>,
}

/// Starts `n` worker threads for device `tun`, each waiting for its [`Go`].
fn spawn_workers(tun: &str, n: usize) -> Result<Vec<Waiting>, ForwarderError> {
    (0..n)
        .map(|i| {
            let (go, wait) = std::sync::mpsc::sync_channel::<Go>(1);
            let thread = std::thread::Builder::new()
                .name(format!("fwd-{tun}-{i}"))
                .spawn(move || -> io::Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
                    let Ok(Go { dev, sock, sock6, icmp6, shared, stop }) = wait.recv() else { return Ok(()) };
                    rt.block_on(async move {
                        let queue = Arc::new(shared::Queue {
                            dev: tun_rs::AsyncDevice::new(dev)?,
                            sock: crate::aio::register(sock)?,
                            sock6: crate::aio::register(sock6)?,
                            icmp6,
                        });
                        let egress = worker::egress_loop(shared.clone(), queue.clone(), stop.clone());
                        let ingress = worker::ingress_loop(shared.clone(), queue.clone(), Family::V4, stop.clone());
                        let ingress6 = worker::ingress_loop(shared, queue, Family::V6, stop);
                        let (e, i, i6) = tokio::join!(egress, ingress, ingress6);
                        for (result, what) in [(&e, "TUN → underlay"), (&i, "IP-in-IP → TUN"), (&i6, "6in4 → TUN")]
                        {
                            if let Err(err) = result {
                                tracing::error!(error = %err, "forwarder {what} loop failed");
                            }
                        }
                        e.and(i).and(i6)
                    })
                })
                .map_err(ForwarderError::Thread)?;
            Ok(Waiting { thread, go })
        })
        .collect()
}

/// Opens the underlay sockets, puts the `inherited` queues behind the device's (if any) or
/// attaches its own if they are detached, and sets the waiting workers going on `device` with
/// `fib`.
fn run(
    config: ForwarderConfig,
    mut device: Device,
    workers: Vec<Waiting>,
    fib: Arc<Fib>,
    handed: HandedOn,
) -> Result<Forwarder, ForwarderError> {
    let local = fib.local_underlay();
    let n = workers.len() as u32;
    let HandedOn { queues: inherited, ipip, sixin4 } = handed;
    // The sockets first: they need no lock, and from now on they keep what arrives for us.
    let socket_err = |source| ForwarderError::Socket { addr: local, source };
    let mut sockets = Vec::with_capacity(workers.len());
    let mut handed_sockets = ipip.into_iter().zip(sixin4);
    for i in 0..n {
        let (sock, sock6) = match handed_sockets.next() {
            Some((sock, sock6)) => (socket2::Socket::from(sock), socket2::Socket::from(sock6)),
            None => (
                raw::open(local, PROTO_IPIP, i, n).map_err(socket_err)?,
                raw::open(local, PROTO_IPV6, i, n).map_err(socket_err)?,
            ),
        };
        let icmp6 = raw::open_icmp6().map_err(socket_err)?;
        sockets.push((sock, sock6, icmp6));
    }
    let tun_err = |source| ForwarderError::Tun { name: config.tun_name.clone(), source };
    if !inherited.is_empty() {
        device.take_queues(&inherited).map_err(tun_err)?;
        drop(inherited);
    } else if device.detached {
        device.set_queues(true).map_err(tun_err)?;
    }
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
    let handed = HandedOn {
        queues: device.queues.iter().map(|q| dup(q.as_fd())).collect::<io::Result<_>>().map_err(tun_err)?,
        ipip: sockets.iter().map(|(s, _, _)| dup(s.as_fd())).collect::<io::Result<_>>().map_err(socket_err)?,
        sixin4: sockets.iter().map(|(_, s, _)| dup(s.as_fd())).collect::<io::Result<_>>().map_err(socket_err)?,
    };
    let counters = Arc::new(Counters::default());
    let (stop, stop_rx) = watch::channel(false);
    let shared = Arc::new(shared::Shared {
        fib,
        counters: counters.clone(),
        tunnel_mtu: usize::from(device.tunnel_mtu),
        outer_ttl: config.outer_ttl,
        icmp_source: config.icmp_source.unwrap_or(local),
        icmp6_source: config
            .icmp6_source
            .unwrap_or_else(|| ForwarderConfig::icmp6_source_for(config.icmp_source.unwrap_or(local))),
        icmp_limit: Mutex::new(ratelimit::TokenBucket::new(config.icmp_rate_per_s, config.icmp_burst, Instant::now())),
        offload: config.offload,
        handing_over: HandOver::default(),
    });
    let hand_over = shared.handing_over.clone();
    let mut threads = Vec::with_capacity(workers.len());
    for (w, (dev, (sock, sock6, icmp6))) in workers.into_iter().zip(device.queues.into_iter().zip(sockets)) {
        let go = Go { dev, sock, sock6, icmp6, shared: shared.clone(), stop: stop_rx.clone() };
        // A worker that cannot take its Go has ended: its error comes out of `stop`.
        let _ = w.go.send(go);
        threads.push(w.thread);
    }
    Ok(Forwarder {
        tun_name: config.tun_name,
        tun_index: device.tun_index,
        tunnel_mtu: device.tunnel_mtu,
        counters,
        stop,
        threads,
        control: device.control,
        adopted: device.adopted,
        hand_over,
        handed,
    })
}

/// A forwarder made ready to start at once on a persistent device another process forwards on
/// (the fe-agent's standby, while its agent runs): the device adopted and configured, its
/// queues open but detached (`TUNSETQUEUE`/`IFF_DETACH_QUEUE`: the kernel steers nothing to
/// them and keeps nothing in them), its workers' threads and runtimes started. Starting it
/// attaches the queues, opens the underlay sockets and sets the workers going: no device
/// configuration, no thread to start, nothing that waits for a lock but the attach (RTNL).
pub struct Prepared {
    config: ForwarderConfig,
    local: Ipv4Addr,
    device: Device,
    workers: Vec<Waiting>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("tun_name", &self.config.tun_name).finish_non_exhaustive()
    }
}

impl Prepared {
    /// Prepares a forwarder for `config`, which must ask for a persistent device (only a
    /// multi-queue device can hold detached queues).
    pub fn new(config: ForwarderConfig, local: Ipv4Addr) -> Result<Prepared, ForwarderError> {
        if !config.persist {
            return Err(ForwarderError::Config("only a persistent device can be prepared ahead".into()));
        }
        let n = validate(&config)?;
        let device = Device::open(&config, local, n, true)?;
        let workers = spawn_workers(&config.tun_name, n)?;
        Ok(Prepared { config, local, device, workers })
    }

    /// The configuration it was prepared for.
    pub fn config(&self) -> &ForwarderConfig {
        &self.config
    }

    /// Starts forwarding with `fib` (see [`Forwarder::start`]). Fails if the device is no
    /// longer the one prepared (deleted, replaced).
    pub fn start(self, fib: Arc<Fib>) -> Result<Forwarder, ForwarderError> {
        self.start_on(fib, HandedOn::default())
    }

    /// Starts forwarding with `fib` on what the forwarder it takes over from handed on (see
    /// [`Forwarder::start_on`]); on its own queues and sockets where nothing fits. Fails like
    /// [`Prepared::start`].
    pub fn start_on(self, fib: Arc<Fib>, handed: HandedOn) -> Result<Forwarder, ForwarderError> {
        self.check(&fib)?;
        let handed = usable(&self.config, self.local, self.workers.len(), handed);
        run(self.config, self.device, self.workers, fib, handed)
    }

    /// Whether it can start with `fib`: same underlay address, same device (else start a
    /// forwarder afresh).
    pub fn check(&self, fib: &Fib) -> Result<(), ForwarderError> {
        let tun_err = |source| ForwarderError::Tun { name: self.config.tun_name.clone(), source };
        if fib.local_underlay() != self.local {
            return Err(ForwarderError::Config("prepared for another underlay address".into()));
        }
        let index = self.device.queues[0].if_index().map_err(tun_err)?;
        if index != self.device.tun_index {
            return Err(tun_err(io::Error::other("the device was replaced since it was prepared")));
        }
        Ok(())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(tun = %self.tun_name, error = %e, "forwarder ended with an error");
        }
    }
}
