//! The kernel's cost of sending one MTU-sized IP-in-IP packet from userspace, by send method:
//! the floor under any userspace IP-in-IP forwarder, which must hand the kernel one packet per
//! 1480 bytes of inner data (the kernel segments IP-in-IP GSO packets only when they are marked
//! `SKB_GSO_IPXIP4`, which userspace cannot do).
//!
//! Two namespaces joined by a veth pair; the far namespace has no address and no forwarding, so
//! every packet goes through the whole send path (syscall, socket, route, IP output, neighbour,
//! veth) and is dropped at the far end's IP input (a route lookup that finds nothing; it runs as
//! a softirq inside the sender's syscall and is counted, the same for every method). One thread sends batches of 64 with
//! `sendmmsg`; its CPU time (`CLOCK_THREAD_CPUTIME_ID`) per packet is the figure.
//!
//! ```text
//! cargo run --release -p victor-dataplane --example send_floor -- [--seconds 3]
//! ```
//! Methods: `raw_hdrinc` (raw socket, `IP_HDRINCL`: what the forwarder used at first — the route
//! is looked up and a route entry allocated per packet, as `IP_HDRINCL` disables the route cache
//! for directly connected destinations), `raw_kernel_header` (raw socket, the kernel writes the
//! outer header, TOS per packet by `IP_TOS` control message; cached route), `packet_bypass`
//! (`AF_PACKET` datagram socket with `PACKET_QDISC_BYPASS`: no route, IP output or neighbour
//! work). Writes `bench-results/dataplane-send-floor.json`.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use victor_dataplane::packet::ipv4;
use victor_testkit::netns::{NetNs, Veth};

const SRC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const BATCH: usize = 64;
const INNER_LEN: usize = 1480;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn cvt(rc: libc::c_int, what: &str) -> Result<libc::c_int> {
    if rc < 0 { Err(std::io::Error::last_os_error()).context(what.to_owned()) } else { Ok(rc) }
}

/// One send method: a socket and the messages it sends (built once, sent again and again).
struct Method {
    name: &'static str,
    fd: OwnedFd,
    /// Per message: the bytes, the destination address, an optional control message.
    payloads: Vec<Vec<u8>>,
    addr: AddrKind,
    tos_cmsg: bool,
}

enum AddrKind {
    Inet(libc::sockaddr_in),
    Link(libc::sockaddr_ll),
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    }
}

fn inner_packet() -> Vec<u8> {
    ipv4::build_packet(
        Ipv4Addr::new(192, 0, 2, 10),
        Ipv4Addr::new(10, 10, 0, 11),
        6,
        64,
        0,
        true,
        &[0x5a; INNER_LEN - 20],
    )
}

fn outer_packet() -> Vec<u8> {
    ipv4::encapsulate(&inner_packet(), &ipv4::Tunnel { src: SRC, dst: DST, ttl: 64 }, 0).expect("encapsulate")
}

fn raw_hdrinc() -> Result<Method> {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4)))?;
    s.set_header_included_v4(true)?;
    Ok(Method {
        name: "raw_hdrinc",
        fd: s.into(),
        payloads: vec![outer_packet(); BATCH],
        addr: AddrKind::Inet(sockaddr_in(DST)),
        tos_cmsg: false,
    })
}

fn raw_kernel_header() -> Result<Method> {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(4)))?;
    Ok(Method {
        name: "raw_kernel_header",
        fd: s.into(),
        payloads: vec![inner_packet(); BATCH],
        addr: AddrKind::Inet(sockaddr_in(DST)),
        tos_cmsg: true,
    })
}

fn packet_bypass(ifindex: i32, mac: [u8; 6]) -> Result<Method> {
    // SAFETY: plain socket(2); the descriptor is owned right after.
    let fd = cvt(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from((libc::ETH_P_IP as u16).to_be())) },
        "AF_PACKET socket",
    )?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int that outlives the call.
    cvt(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        },
        "PACKET_QDISC_BYPASS",
    )?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    ll.sll_ifindex = ifindex;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&mac);
    let mut packet = outer_packet();
    // The kernel fills neither the checksum nor the identification on this path.
    ipv4::fix_checksum(&mut packet);
    Ok(Method { name: "packet_bypass", fd, payloads: vec![packet; BATCH], addr: AddrKind::Link(ll), tos_cmsg: false })
}

/// Sends batches for `seconds`; returns (packets, wall seconds, thread CPU seconds).
fn run(method: &mut Method, seconds: f64) -> Result<(u64, f64, f64)> {
    let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; cmsg_space * BATCH];
    let mut iovs: Vec<libc::iovec> = method
        .payloads
        .iter()
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    let (name, namelen) = match &mut method.addr {
        AddrKind::Inet(a) => ((a as *mut libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>()),
        AddrKind::Link(a) => ((a as *mut libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>()),
    };
    let mut hdrs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|i| {
            // SAFETY: all-zero is a valid mmsghdr.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = name;
            h.msg_hdr.msg_namelen = namelen as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            if method.tos_cmsg {
                let buf = &mut control[i * cmsg_space..(i + 1) * cmsg_space];
                h.msg_hdr.msg_control = buf.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = cmsg_space;
                // SAFETY: the control buffer has room for one int-sized message.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_TOS;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
                    *(libc::CMSG_DATA(c) as *mut libc::c_int) = 0x02;
                }
            }
            h
        })
        .collect();
    let (wall0, cpu0) = (Instant::now(), thread_cpu());
    let mut sent = 0u64;
    while wall0.elapsed().as_secs_f64() < seconds {
        // SAFETY: every pointer in `hdrs` points into buffers alive for the call.
        let n = unsafe { libc::sendmmsg(method.fd.as_raw_fd(), hdrs.as_mut_ptr(), BATCH as libc::c_uint, 0) };
        if n < 0 {
            bail!("{}: sendmmsg: {}", method.name, std::io::Error::last_os_error());
        }
        sent += n as u64;
    }
    Ok((sent, wall0.elapsed().as_secs_f64(), (thread_cpu() - cpu0).as_secs_f64()))
}

fn main() -> Result<()> {
    let mut seconds = 3.0;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().context("--seconds needs a value")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    victor_testkit::require_root("the send-floor benchmark");
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let a = NetNs::new("sfa")?;
    let b = NetNs::new("sfb")?;
    let _link = Veth::create(&a, "ul0", &b, "ul0")?;
    a.add_addr("ul0", &format!("{SRC}/24"))?;
    let mac_text = b.exec(&["cat", "/sys/class/net/ul0/address"])?;
    let mac_text = String::from_utf8_lossy(&mac_text.stdout).trim().to_owned();
    let mac: Vec<u8> =
        mac_text.split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>().context("peer MAC")?;
    let mac: [u8; 6] = mac.try_into().map_err(|_| anyhow::anyhow!("MAC {mac_text}"))?;
    a.ip(&["neigh", "replace", &DST.to_string(), "lladdr", &mac_text, "dev", "ul0", "nud", "permanent"])?;
    let ifindex: i32 =
        String::from_utf8_lossy(&a.exec(&["cat", "/sys/class/net/ul0/ifindex"])?.stdout).trim().parse()?;

    let results = a.run_in(move || -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for make in [raw_hdrinc as fn() -> Result<Method>, raw_kernel_header] {
            out.push(measure(make()?, seconds)?);
        }
        out.push(measure(packet_bypass(ifindex, mac)?, seconds)?);
        Ok(out)
    })??;
    let json = serde_json::json!({
        "benchmark": "dataplane-send-floor",
        "inner_packet_bytes": INNER_LEN,
        "batch": BATCH,
        "seconds": seconds,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "loadavg_before": loadavg.trim(),
        "methods": results,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench-results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("dataplane-send-floor.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(())
}

fn measure(mut method: Method, seconds: f64) -> Result<serde_json::Value> {
    let (packets, wall, cpu) = run(&mut method, seconds)?;
    let us = cpu / packets as f64 * 1e6;
    // Inner Gbit/s one fully busy core could push at this cost.
    let gbit = INNER_LEN as f64 * 8.0 / (us * 1e3);
    println!(
        "{:18} {:>10.0} packets/s wall, {:5.2} us CPU per packet -> at most {:5.2} Gbit/s of inner data per core",
        method.name,
        packets as f64 / wall,
        us,
        gbit
    );
    Ok(serde_json::json!({
        "method": method.name,
        "packets": packets,
        "wall_s": wall,
        "thread_cpu_s": cpu,
        "cpu_us_per_packet": us,
        "max_inner_gbit_per_core": gbit,
    }))
}
