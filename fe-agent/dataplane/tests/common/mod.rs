//! The netns lab shared by the data-plane integration tests and the throughput example:
//!
//! ```text
//!  client ──(192.0.2.0/24)── fe1 ═╗                       ╔═ fe2 ──(10.10.0.1/32 port)── vm
//!         (2001:db8:2::/64)       ╚══ ul: bridge, underlay 198.51.100.0/24 ══╣   (2001:db8:10::1/128)
//!                                                         ╚═ fe3 ──(10.10.0.1/32 port)── vm3
//! ```
//! Dual stack: the VM is also 2001:db8:10::11/64 (mobile prefix 2001:db8:10::/48, gateway
//! 2001:db8:10::1 on each FE's VM port), the client 2001:db8:2::10/64 behind fe1. The underlay is
//! IPv4 only, so IPv6 goes through the tunnel (6in4) both ways: fe2 and fe3 route the client's
//! /64 into their TUN and bind the client /128 to fe1 (the underlay also carries IPv6 addresses,
//! 2001:db8:ff::n/64, used only by the throughput example's plain-veth baseline).
//! Each FE runs an in-process [`Forwarder`] (started on a thread inside its namespace). The
//! routes and bindings the agent will later program are set up here with `ip` and [`Fib`] calls:
//! the mobile prefix 10.10.0.0/16 points into each FE's TUN; fe2 has the VM's /32 on its VM port
//! with a permanent neighbour entry; fe2 and fe3 reach the client directly over the underlay
//! (plain routing, no tunnel: no triangle routing).
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use victor_dataplane::fib::{Action, Fib};
use victor_dataplane::forwarder::{Forwarder, ForwarderConfig};
use victor_dataplane::packet::{icmp, icmp6, ipv4};
use victor_testkit::netns::{NetNs, Veth};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const FE1_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const VM_MAC: &str = "02:00:00:00:00:11";
pub const MOBILE_PREFIX: &str = "10.10.0.0/16";
pub const UNDERLAY_MTU: u16 = 1500;
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
pub const FE1_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
pub const VM6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x11);
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1);
pub const MOBILE_PREFIX6: &str = "2001:db8:10::/48";
pub const CLIENT_NET6: &str = "2001:db8:2::/64";

/// IPv6 address of FE `n` on the underlay (plain-veth baseline only; tunnels run over IPv4).
pub fn fe_addr6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, u16::from(n))
}

/// Underlay address of FE `n` (1-based).
pub fn fe_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n)
}

pub struct Fe {
    pub fib: Arc<Fib>,
    pub forwarder: Option<Forwarder>,
    pub tun: String,
}

impl Fe {
    pub fn fwd(&self) -> &Forwarder {
        self.forwarder.as_ref().expect("forwarder running")
    }
}

/// How the lab's forwarders run.
#[derive(Debug, Clone, Copy)]
pub struct LabConfig {
    /// TUN offloads (virtio-net header).
    pub offload: bool,
    /// Workers per forwarder (0: one per core).
    pub queues: usize,
    /// ICMP errors per second and burst.
    pub icmp_rate_per_s: u32,
    pub icmp_burst: u32,
}

impl Default for LabConfig {
    /// The forwarder's defaults.
    fn default() -> Self {
        let c = ForwarderConfig::new("x");
        LabConfig { offload: c.offload, queues: c.queues, icmp_rate_per_s: c.icmp_rate_per_s, icmp_burst: c.icmp_burst }
    }
}

/// The lab. Field order is drop order: forwarders stop first, then links, then namespaces.
pub struct Lab {
    pub fes: Vec<Fe>,
    pub links: Vec<Veth>,
    pub client: NetNs,
    pub ul: NetNs,
    pub fe_ns: Vec<NetNs>,
    pub vm: NetNs,
    pub vm3: NetNs,
}

impl Lab {
    pub fn fe(&self, n: usize) -> &Fe {
        &self.fes[n - 1]
    }

    pub fn ns(&self, n: usize) -> &NetNs {
        &self.fe_ns[n - 1]
    }

    /// Builds the lab with `offload` on or off for all forwarders, one worker per core.
    pub fn build(offload: bool) -> Result<Lab> {
        Self::build_with(LabConfig { offload, ..LabConfig::default() })
    }

    /// Builds the lab with forwarders configured as `lab`.
    pub fn build_with(lab_config: LabConfig) -> Result<Lab> {
        victor_testkit::require_root("the data-plane lab");
        let client = NetNs::new("dpc")?;
        let ul = NetNs::new("dpu")?;
        let fe_ns = vec![NetNs::new("dpf1")?, NetNs::new("dpf2")?, NetNs::new("dpf3")?];
        let vm = NetNs::new("dpv")?;
        let vm3 = NetNs::new("dpw")?;
        let mut links = Vec::new();

        // Underlay: a bridge in `ul`, each FE's `ul0` on it.
        ul.ip(&["link", "add", "br0", "type", "bridge"])?;
        ul.link_up("br0")?;
        // The underlay is a plain switch: no iptables on bridged frames (br_netfilter is loaded
        // on this host and would otherwise run every underlay packet through netfilter).
        for family in ["iptables", "ip6tables", "arptables"] {
            let _ = ul.sysctl(&format!("net.bridge.bridge-nf-call-{family}"), "0");
        }
        for (i, ns) in fe_ns.iter().enumerate() {
            let port = format!("p{}", i + 1);
            links.push(Veth::create(ns, "ul0", &ul, &port)?);
            ul.ip(&["link", "set", &port, "master", "br0"])?;
            ns.add_addr("ul0", &format!("{}/24", fe_addr(i as u8 + 1)))?;
            ns.ip(&["-6", "addr", "add", &format!("{}/64", fe_addr6(i as u8 + 1)), "dev", "ul0", "nodad"])?;
            ns.enable_forwarding()?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }

        // Client behind fe1.
        links.push(Veth::create(&client, "eth0", &fe_ns[0], "cl0")?);
        client.add_addr("eth0", &format!("{CLIENT}/24"))?;
        client.route(&["default", "via", &FE1_CLIENT_SIDE.to_string()])?;
        fe_ns[0].add_addr("cl0", &format!("{FE1_CLIENT_SIDE}/24"))?;
        client.ip(&["-6", "addr", "add", &format!("{CLIENT6}/64"), "dev", "eth0", "nodad"])?;
        client.ip(&["-6", "route", "replace", "default", "via", &FE1_CLIENT_SIDE6.to_string()])?;
        fe_ns[0].ip(&["-6", "addr", "add", &format!("{FE1_CLIENT_SIDE6}/64"), "dev", "cl0", "nodad"])?;

        // VMs: `vm` behind fe2, `vm3` (the same VM after a move) behind fe3.
        for (vm_ns, fe) in [(&vm, &fe_ns[1]), (&vm3, &fe_ns[2])] {
            links.push(Veth::create(vm_ns, "eth0", fe, "vm0")?);
            vm_ns.ip(&["link", "set", "eth0", "address", VM_MAC])?;
            vm_ns.add_addr("eth0", &format!("{VM}/24"))?;
            vm_ns.route(&["default", "via", &GATEWAY.to_string()])?;
            fe.add_addr("vm0", &format!("{GATEWAY}/32"))?;
            // The client's network is reached directly over the underlay via fe1 (not tunnelled).
            fe.route(&["192.0.2.0/24", "via", &fe_addr(1).to_string()])?;
            vm_ns.ip(&["-6", "addr", "add", &format!("{VM6}/64"), "dev", "eth0", "nodad"])?;
            vm_ns.ip(&["-6", "route", "replace", "default", "via", &GATEWAY6.to_string()])?;
            fe.ip(&["-6", "addr", "add", &format!("{GATEWAY6}/128"), "dev", "vm0", "nodad"])?;
        }

        let mut lab = Lab { fes: Vec::new(), links, client, ul, fe_ns, vm, vm3 };
        for n in 1..=3u8 {
            let fib = Arc::new(Fib::new(fe_addr(n)));
            fib.set_peers((1..=3).filter(|&m| m != n).map(fe_addr));
            let tun = format!("vtun{n}");
            let mut config = ForwarderConfig::new(&tun);
            config.underlay_mtu = UNDERLAY_MTU;
            config.offload = lab_config.offload;
            config.queues = lab_config.queues;
            config.icmp_rate_per_s = lab_config.icmp_rate_per_s;
            config.icmp_burst = lab_config.icmp_burst;
            let ns = &lab.fe_ns[n as usize - 1];
            let fwd_fib = fib.clone();
            let forwarder = ns.run_in(move || Forwarder::start(config, fwd_fib))??;
            ns.route(&[MOBILE_PREFIX, "dev", &tun])?;
            ns.ip(&["-6", "route", "replace", MOBILE_PREFIX6, "dev", &tun])?;
            if n != 1 {
                // IPv6 back to the client: through the tunnel to fe1 (the underlay is IPv4).
                ns.ip(&["-6", "route", "replace", CLIENT_NET6, "dev", &tun])?;
                fib.set(CLIENT6, Action::Remote(fe_addr(1)))?;
            }
            lab.fes.push(Fe { fib, forwarder: Some(forwarder), tun });
        }
        // Initial state: the VM is bound to fe2; fe1 tunnels to fe2; fe2 delivers locally.
        for n in [1, 3] {
            lab.fe(n).fib.set(VM, Action::Remote(fe_addr(2)))?;
            lab.fe(n).fib.set(VM6, Action::Remote(fe_addr(2)))?;
        }
        lab.bind_local(2)?;
        Ok(lab)
    }

    /// Makes FE `n` deliver the VM locally: binding Local, /32 on its VM port, permanent
    /// neighbour entry (what the agent's reconciler will program).
    pub fn bind_local(&self, n: usize) -> Result<()> {
        let ns = self.ns(n);
        ns.route(&[&format!("{VM}/32"), "dev", "vm0"])?;
        ns.ip(&["neigh", "replace", &VM.to_string(), "lladdr", VM_MAC, "dev", "vm0", "nud", "permanent"])?;
        self.fe(n).fib.set(VM, Action::Local)?;
        ns.ip(&["-6", "route", "replace", &format!("{VM6}/128"), "dev", "vm0"])?;
        ns.ip(&["-6", "neigh", "replace", &VM6.to_string(), "lladdr", VM_MAC, "dev", "vm0", "nud", "permanent"])?;
        self.fe(n).fib.set(VM6, Action::Local)?;
        Ok(())
    }

    /// Announces (or, `to` None, withdraws) the migration of `vm` to FE `to` on every FE, as
    /// the agents do from the binding's pending FE.
    pub fn announce_migration(&self, vm: impl Into<IpAddr>, to: Option<u8>) {
        let vm = vm.into();
        for fe in &self.fes {
            fe.fib.migrations().set_target(vm, to.map(fe_addr));
        }
    }

    /// Makes FE `n` tunnel the VM to FE `to`: binding Remote, host routes removed (the prefix
    /// routes send it into TUN).
    pub fn bind_remote(&self, n: usize, to: u8) -> Result<()> {
        self.fe(n).fib.set(VM, Action::Remote(fe_addr(to)))?;
        let _ = self.ns(n).ip(&["route", "del", &format!("{VM}/32")]);
        self.fe(n).fib.set(VM6, Action::Remote(fe_addr(to)))?;
        let _ = self.ns(n).ip(&["-6", "route", "del", &format!("{VM6}/128")]);
        Ok(())
    }
}

/// A raw ICMP socket with `IP_HDRINCL`, opened inside a namespace (call from `run_in`): sends
/// hand-built IPv4 packets, receives every ICMP packet addressed to the namespace.
pub struct IcmpSocket {
    sock: Socket,
}

/// An ICMP echo request to send.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// Total IPv4 length.
    pub total_len: usize,
    pub df: bool,
    pub seq: u16,
}

impl Probe {
    /// An 84-byte echo (like `ping`), TTL 64, no DF.
    pub fn echo(dst: Ipv4Addr, seq: u16) -> Self {
        Probe { dst, ttl: 64, total_len: 84, df: false, seq }
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// `total_len` bytes with DF set.
    pub fn df_size(mut self, total_len: usize) -> Self {
        self.total_len = total_len;
        self.df = true;
        self
    }
}

/// What came back for a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeReply {
    EchoReply { from: Ipv4Addr },
    Error { from: Ipv4Addr, icmp_type: u8, code: u8, mtu: u16 },
}

impl IcmpSocket {
    pub fn open() -> Result<Self> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        sock.set_header_included_v4(true)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        // Send even above a learned path MTU: the probes test how the path answers.
        let probe: libc::c_int = libc::IP_PMTUDISC_PROBE;
        // SAFETY: plain setsockopt with an int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&probe as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(rc == 0, "IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
        Ok(IcmpSocket { sock })
    }

    pub fn send(&self, packet: &[u8]) -> Result<()> {
        let dst = ipv4::parse(packet).context("probe packet")?.dst;
        self.sock.send_to(packet, &std::net::SocketAddr::from((dst, 0)).into()).context("send probe")?;
        Ok(())
    }

    /// Sends the echo request `probe` from `src` and waits up to `timeout` for the echo reply or
    /// an ICMP error about it, resending every 250 ms.
    pub fn probe(&self, src: Ipv4Addr, probe: &Probe, timeout: Duration) -> Option<ProbeReply> {
        let Probe { dst, ttl, total_len, df, seq } = *probe;
        let ident = (std::process::id() & 0xffff) as u16;
        let payload = vec![0x5a; total_len.saturating_sub(28)];
        let request = icmp::echo(icmp::TYPE_ECHO_REQUEST, ident, seq, &payload);
        let packet = ipv4::build_packet(src, dst, ipv4::PROTO_ICMP, ttl, 0, df, &request);
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 65536];
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                self.send(&packet).ok()?;
                next_send = Instant::now() + Duration::from_millis(250);
            }
            let Ok(n) = self.sock.recv(&mut buf) else { continue };
            // SAFETY: recv initialised the first n bytes.
            let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            if let Some(reply) = match_reply(&data, ident, seq) {
                return Some(reply);
            }
        }
        None
    }
}

impl IcmpSocket {
    /// Every ICMP reply to one of our echoes (any sequence number) that arrives within `window`.
    pub fn replies(&self, window: Duration) -> Vec<ProbeReply> {
        let ident = (std::process::id() & 0xffff) as u16;
        let deadline = Instant::now() + window;
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 65536];
        let mut out = Vec::new();
        while Instant::now() < deadline {
            let Ok(n) = self.sock.recv(&mut buf) else { continue };
            // SAFETY: recv initialised the first n bytes.
            let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let seq = data.get(20..).and_then(|icmp| match icmp.first() {
                Some(&icmp::TYPE_ECHO_REPLY) => icmp.get(6..8).map(|s| u16::from_be_bytes([s[0], s[1]])),
                // An error quotes our header (20 bytes) and the echo's first 8 bytes.
                _ => icmp.get(34..36).map(|s| u16::from_be_bytes([s[0], s[1]])),
            });
            if let Some(reply) = seq.and_then(|seq| match_reply(&data, ident, seq)) {
                out.push(reply);
            }
        }
        out
    }

    /// The echo request `probe` from `src` as a packet (what [`IcmpSocket::probe`] sends).
    pub fn echo_packet(src: Ipv4Addr, probe: &Probe) -> Vec<u8> {
        let Probe { dst, ttl, total_len, df, seq } = *probe;
        let ident = (std::process::id() & 0xffff) as u16;
        let request = icmp::echo(icmp::TYPE_ECHO_REQUEST, ident, seq, &vec![0x5a; total_len.saturating_sub(28)]);
        ipv4::build_packet(src, dst, ipv4::PROTO_ICMP, ttl, 0, df, &request)
    }
}

/// Matches an ICMP packet (with IP header) to our echo (ident, seq).
fn match_reply(data: &[u8], ident: u16, seq: u16) -> Option<ProbeReply> {
    let h = ipv4::parse(data).ok()?;
    let icmp = &data[h.header_len..h.total_len];
    if icmp.len() < 8 {
        return None;
    }
    let ours = |msg: &[u8]| msg.len() >= 8 && msg[4..6] == ident.to_be_bytes() && msg[6..8] == seq.to_be_bytes();
    match icmp[0] {
        icmp::TYPE_ECHO_REPLY if ours(icmp) => Some(ProbeReply::EchoReply { from: h.src }),
        icmp::TYPE_DEST_UNREACHABLE | icmp::TYPE_TIME_EXCEEDED => {
            let quoted = &icmp[8..];
            let qh = ipv4::parse_header(quoted).ok()?;
            if qh.protocol != ipv4::PROTO_ICMP || !ours(&quoted[qh.header_len..]) {
                return None;
            }
            Some(ProbeReply::Error {
                from: h.src,
                icmp_type: icmp[0],
                code: icmp[1],
                mtu: u16::from_be_bytes([icmp[6], icmp[7]]),
            })
        }
        _ => None,
    }
}

/// Probes from the client namespace (socket opened inside it).
pub fn client_probe(lab: &Lab, probe: Probe, timeout: Duration) -> Result<Option<ProbeReply>> {
    lab.client.run_in(move || -> Result<Option<ProbeReply>> {
        let sock = IcmpSocket::open()?;
        Ok(sock.probe(CLIENT, &probe, timeout))
    })?
}

/// A raw ICMPv6 socket, opened inside a namespace (call from `run_in`): sends echo requests with
/// a chosen hop limit and size (never fragmented locally, above a learned path MTU too), receives
/// every ICMPv6 message addressed to the namespace (the kernel strips the IPv6 header).
pub struct Icmp6Socket {
    sock: Socket,
}

/// What came back for an IPv6 probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe6Reply {
    EchoReply { from: Ipv6Addr },
    Error { from: Ipv6Addr, icmp_type: u8, code: u8, mtu: u32 },
}

fn setsockopt_int(sock: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: plain setsockopt with an int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(rc == 0, "setsockopt {level}/{name}: {}", std::io::Error::last_os_error());
    Ok(())
}

impl Icmp6Socket {
    pub fn open() -> Result<Self> {
        let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        setsockopt_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_PROBE)?;
        setsockopt_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)?;
        Ok(Icmp6Socket { sock })
    }

    /// Sends one echo request of `total_len` IPv6 bytes to `dst` with hop limit `hop`.
    pub fn send_echo(&self, dst: Ipv6Addr, seq: u16, hop: u8, total_len: usize) -> Result<()> {
        setsockopt_int(&self.sock, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, i32::from(hop))?;
        let ident = (std::process::id() & 0xffff) as u16;
        // The kernel fills in the checksum of ICMPv6 raw sockets.
        let request = icmp6::echo(
            &Ipv6Addr::UNSPECIFIED,
            &dst,
            icmp6::TYPE_ECHO_REQUEST,
            ident,
            seq,
            &vec![0x5a; total_len.saturating_sub(48)],
        );
        self.sock.send_to(&request, &std::net::SocketAddr::from((dst, 0)).into()).context("send ICMPv6 probe")?;
        Ok(())
    }

    /// Sends the echo (resending every 250 ms) and waits up to `timeout` for its reply or an
    /// error about it.
    pub fn probe(&self, dst: Ipv6Addr, seq: u16, hop: u8, total_len: usize, timeout: Duration) -> Option<Probe6Reply> {
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                self.send_echo(dst, seq, hop, total_len).ok()?;
                next_send = Instant::now() + Duration::from_millis(250);
            }
            if let Some(reply) = self.recv().filter(|(s, _)| *s == seq).map(|(_, r)| r) {
                return Some(reply);
            }
        }
        None
    }

    /// Every reply to one of our echoes arriving within `window`.
    pub fn replies(&self, window: Duration) -> Vec<Probe6Reply> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            if let Some((_, r)) = self.recv() {
                out.push(r);
            }
        }
        out
    }

    /// One ICMPv6 message about one of our echoes: (sequence, reply).
    fn recv(&self) -> Option<(u16, Probe6Reply)> {
        let ident = (std::process::id() & 0xffff) as u16;
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 65536];
        let (n, from) = self.sock.recv_from(&mut buf).ok()?;
        // SAFETY: recv_from initialised the first n bytes.
        let icmp: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        let from = *from.as_socket_ipv6()?.ip();
        let ours =
            |msg: &[u8]| msg.len() >= 8 && msg[0] == icmp6::TYPE_ECHO_REQUEST && msg[4..6] == ident.to_be_bytes();
        let seq = |msg: &[u8]| u16::from_be_bytes([msg[6], msg[7]]);
        match *icmp.first()? {
            icmp6::TYPE_ECHO_REPLY if icmp.len() >= 8 && icmp[4..6] == ident.to_be_bytes() => {
                Some((seq(&icmp), Probe6Reply::EchoReply { from }))
            }
            t if icmp6::is_error_type(t) => {
                let quoted = icmp.get(8 + 40..)?;
                if icmp.get(8 + 6) != Some(&58) || !ours(quoted) {
                    return None;
                }
                let mtu = u32::from_be_bytes(icmp[4..8].try_into().ok()?);
                Some((seq(quoted), Probe6Reply::Error { from, icmp_type: t, code: icmp[1], mtu }))
            }
            _ => None,
        }
    }
}

/// IPv6 probe from the client namespace (socket opened inside it).
pub fn client_probe6(
    lab: &Lab,
    dst: Ipv6Addr,
    seq: u16,
    hop: u8,
    total_len: usize,
    timeout: Duration,
) -> Result<Option<Probe6Reply>> {
    lab.client.run_in(move || -> Result<Option<Probe6Reply>> {
        let sock = Icmp6Socket::open()?;
        Ok(sock.probe(dst, seq, hop, total_len, timeout))
    })?
}

/// Drops other than the kernel's own multicast chatter on the TUN device (MLD reports sent while
/// the device is first brought up, before the forwarder's sysctls apply; dropped as `multicast`).
pub fn unexpected_drops(c: &victor_dataplane::counters::CounterSnapshot) -> u64 {
    c.dropped_total() - c.dropped(victor_dataplane::counters::DropReason::Multicast)
}

/// Waits until `check` holds (polling every 10 ms) or fails with `what`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Opens `flows` TCP connections at once from the client to `vm_addr` (a listener in the VM's
/// namespace), each sending `bytes` of a different pattern; the VM's side of each answers with the
/// length and a position-weighted sum of what it received. Asserts that every flow arrived intact
/// and in order.
pub fn parallel_flows_arrive_intact(lab: &Lab, vm_addr: IpAddr, flows: usize, bytes: usize, timeout: Duration) {
    let pattern = move |flow: usize, i: usize| (i.wrapping_mul(31) ^ flow.wrapping_mul(7)) as u8;
    let digest = |data: &[u8]| -> u64 {
        data.iter().enumerate().fold(0u64, |acc, (i, &b)| acc.wrapping_mul(1_000_003).wrapping_add(b as u64 ^ i as u64))
    };
    let listener = lab.vm.run_in(|| std::net::TcpListener::bind((vm_addr, 0)).unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut handles = Vec::new();
        for _ in 0..flows {
            let (mut s, _) = listener.accept().unwrap();
            handles.push(std::thread::spawn(move || {
                let mut data = Vec::new();
                s.read_to_end(&mut data).unwrap();
                s.write_all(&[(data.len() as u64).to_be_bytes(), digest(&data).to_be_bytes()].concat()).unwrap();
            }));
        }
        handles.into_iter().for_each(|h| h.join().unwrap());
    });
    let answers = lab
        .client
        .run_in(move || {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..flows)
                    .map(|flow| {
                        scope.spawn(move || {
                            use std::io::{Read, Write};
                            let data: Vec<u8> = (0..bytes).map(|i| pattern(flow, i)).collect();
                            let mut s = std::net::TcpStream::connect_timeout(&(vm_addr, port).into(), timeout).unwrap();
                            s.write_all(&data).unwrap();
                            s.shutdown(std::net::Shutdown::Write).unwrap();
                            let mut answer = [0u8; 16];
                            s.read_exact(&mut answer).unwrap();
                            (answer, digest(&data))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
            })
        })
        .unwrap();
    server.join().unwrap();
    for (answer, want) in answers {
        assert_eq!(u64::from_be_bytes(answer[..8].try_into().unwrap()), bytes as u64);
        assert_eq!(u64::from_be_bytes(answer[8..].try_into().unwrap()), want, "bytes arrived intact and in order");
    }
    let (f1, f2) = (lab.fe(1).fwd().counters(), lab.fe(2).fwd().counters());
    assert_eq!(unexpected_drops(&f1) + unexpected_drops(&f2), 0, "{f1:?} {f2:?}");
}
