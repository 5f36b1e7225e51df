//! The VICTOR data plane: what an FE does with packets, apart from the agent's control logic.
//!
//! # Modules
//! * [`packet`] — pure codecs (no IO): Ethernet, ARP, RARP, NDP, IPv4, IPv6, IP-in-IP, 6in4,
//!   ICMP and ICMPv6 errors, checksums, TUN super-packets (GSO split, GRO coalescing).
//! * [`fib`] — the forwarding state (/32 and /128 bindings, peers) the agent writes and the
//!   workers read per packet.
//! * [`forwarder`] — the userspace tunnel forwarder (IPv4 in IP-in-IP, IPv6 in 6in4, both over
//!   the IPv4 underlay) on a multi-queue TUN device + raw underlay sockets, one worker per core.
//! * [`neigh_io`] — capture of ARP, RARP and NDP on VM ports (AF_PACKET + BPF, timestamped) and
//!   sending ARP / NDP; [`arp_io`] — its ARP-only form (the agent's API before IPv6).
//! * [`migration`] — announced migrations: copies of a leaving VM's packets to the FE it moves
//!   to, held there until the VM arrives.
//! * [`counters`] — forwarder counters by direction, family and drop reason, for `/metrics`.
//! * [`kernel`] — whether the kernel has `ipip` (if not, use the userspace forwarder).
//!
//! # How the agent uses it
//! ```no_run
//! use std::net::Ipv4Addr;
//! use std::sync::Arc;
//! use victor_dataplane::fib::{Action, Fib};
//! use victor_dataplane::forwarder::{Forwarder, ForwarderConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let me = Ipv4Addr::new(198, 51, 100, 1); // this FE's underlay address (must be configured)
//! let fib = Arc::new(Fib::with_capacity(me, 1_000_000));
//! fib.set_peers([Ipv4Addr::new(198, 51, 100, 2)]); // registered FEs (from ListFes / the stream)
//!
//! // Creates TUN `victor0` (up, MTU = underlay MTU − 20, the underlay address as /32, one queue
//! // per worker) in the calling thread's network namespace, forwards on one thread per worker
//! // until stopped/dropped. (`persist: true` keeps the device and its routes across a restart.)
//! let fwd = Forwarder::start(ForwarderConfig::new("victor0"), fib.clone())?;
//!
//! // Reconciler, per binding from the desired state (make-before-break order is the agent's):
//! //  * local VM:  rtnetlink /32 via the VM port + permanent neighbour, then
//! fib.set(Ipv4Addr::new(10, 10, 0, 11), Action::Local)?;
//! //  * remote VM: no /32 on a VM port (the mobile-prefix route into `fwd.tun_name()` covers it,
//! //    or add a /32 `dev victor0`), and
//! fib.set(Ipv4Addr::new(10, 10, 0, 12), Action::Remote(Ipv4Addr::new(198, 51, 100, 2)))?;
//! //  * unbound:   fib.remove(ip) → packets that reach the TUN are dropped and counted.
//! // IPv6 VMs the same way, /128 entries tunnelled (6in4) to the peer's IPv4 underlay address:
//! fib.set("2001:db8:10::12".parse::<std::net::Ipv6Addr>()?, Action::Remote(Ipv4Addr::new(198, 51, 100, 2)))?;
//! // Full sync from a snapshot: fib.replace_all(iter)? (per family, or both with IpAddr keys);
//! // incremental: set/remove/extend (Ipv4Addr, Ipv6Addr or IpAddr).
//!
//! let counters = fwd.counters(); // CounterSnapshot for /metrics (drops by DropReason)
//! # let _ = counters;
//! fwd.stop()?; // or drop: the TUN device and every route into it disappear
//! # Ok(()) }
//! ```
//! The agent owns all kernel routing state (mobile prefixes `dev <tun>` for both families, /32s
//! and /128s, neighbours, proxy ARP / NDP, `net.ipv6.conf.all.forwarding`); the data plane owns
//! only the TUN device, its sysctls (`rp_filter` = 2; IPv6 on but without addresses of its own:
//! `addr_gen_mode` = 1, `accept_ra` = 0) and its sockets. A packet for a `Local` VM that still
//! reaches the TUN (its host route is not installed yet) is dropped as `local_without_route`,
//! never looped. ICMPv6 errors leave from [`forwarder::ForwarderConfig::icmp6_source`].
//!
//! For ARP, RARP and NDP: [`neigh_io::NeighCapture::open`]`(port, Protocols::ALL)` on each VM port
//! (inside a tokio runtime, in the FE's namespace); `recv().await` yields a
//! [`neigh_io::Captured`] (a [`neigh_io::Frame`] + `CLOCK_MONOTONIC` ns + wall clock), to be rate
//! limited per [`neigh_io::Frame::source`]. What it means: `ArpMessage::kind()` (gratuitous /
//! request / reply / probe), `RarpMessage::claimed_mac()` (a hypervisor's announce: every IP of
//! that MAC), `NdpMessage::kind()` (DAD / solicitation / solicited or unsolicited advertisement /
//! router solicitation) and `NdpMessage::claim()` (the routable IPv6 address and MAC to learn,
//! never a link-local one). Answer with `send_arp(&packet::arp::reply_to(..))`,
//! `send_ndp(&packet::ndp::advertise_to(&ns, capture.mac(), ..))`, probe a VM with
//! `send_ndp(&packet::ndp::probe(..))`. [`arp_io::ArpCapture`] is the same for ARP alone.
//!
//! # Numbers (2-core VM, see `examples/throughput.rs`, `examples/send_floor.rs`, `tests/fib_scale.rs`; IPv6 figures in BENCHMARKS.md)
//! * FIB: ~19 bytes per binding at 1,000,000 bindings; bulk load ~30 ms, lookup ~60 ns (release).
//! * Forwarder (BENCHMARKS.md, "Data plane throughput"): iperf3 TCP through two forwarders at
//!   0.8–1.4 Gbit/s, 0.08–0.19 of plain veth routing in the same run, 0.65–1.1 cores per Gbit/s
//!   against 0.08–0.09. More than half of the tunnel's CPU time is the kernel's send path for
//!   each MTU-sized packet (~2–3 µs here): the baseline moves 64 KiB GSO packets end to end, while
//!   the kernel segments IP-in-IP GSO packets only when marked `SKB_GSO_IPXIP4`, which no
//!   userspace interface can set. Everything above the kernel is batched: 43–44 segments per TUN
//!   read, 150–265 packets per `sendmmsg`, received segments coalesced back into GSO writes.

mod aio;
pub mod arp_io;
mod bpf;
pub mod counters;
pub mod fib;
pub mod forwarder;
pub mod kernel;
pub mod migration;
pub mod neigh_io;
pub mod packet;
mod psock;
