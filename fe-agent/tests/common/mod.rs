//! The namespace lab shared by the agent's integration tests:
//!
//! ```text
//!  client ──(192.0.2.0/24)── fe1 ═╗                          ╔═ fe2 ── vm1p ── vm (10.10.0.11)
//!                                 ╚═ ul: bridge, 198.51.100.0/24 ═╣
//!                                                            ╚═ fe3 ── (vm1p after a move)
//! ```
//! Real `victor-fe-agent` processes run inside the FE namespaces (`ip netns exec`) and reach the
//! controller — in-process in the test, on loopback of the root namespace — through
//! `--controller-netns /proc/<test pid>/ns/net`. Everything is released on drop, also when a test
//! fails: agents are killed (ChildGuard), then links, then namespaces.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use victor_controller::config::Config as ControllerConfig;
use victor_controller::server::Server;
use victor_dataplane::packet::arp::{ArpOp, MacAddr, build_frame, gratuitous};
use victor_dataplane::packet::{icmp, ipv4};
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::{Binding, DeclareVmRequest, GetBindingRequest};
use victor_testkit::netns::{NetNs, Veth};
use victor_testkit::process::ChildGuard;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
pub const VM_MAC: &str = "02:00:00:00:00:11";
pub const GATEWAY: &str = "10.10.0.1";
pub const GATEWAY_MAC: &str = "02:00:5e:10:00:01";
pub const MOBILE: &str = "10.10.0.0/16";
/// The FE-side name of the VM's link (the same in every FE it moves to).
pub const VM_PORT: &str = "vm1p";

/// Underlay address of FE `n`.
pub fn fe_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n as u8)
}

pub fn mac(text: &str) -> [u8; 6] {
    text.parse::<MacAddr>().expect("MAC").0
}

// ───────────────────────────── controller ─────────────────────────────

/// An in-process controller replica on loopback.
pub struct Controller {
    server: Option<Server>,
    args: Vec<String>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Controller {
    /// Starts a replica on the embedded store in `dir`, or on etcd when `etcd` is given.
    pub async fn start(dir: &std::path::Path, etcd: Option<&[String]>) -> Result<Controller> {
        Self::start_with(dir, etcd, &[]).await
    }

    /// [`Controller::start`] with extra controller flags.
    pub async fn start_with(dir: &std::path::Path, etcd: Option<&[String]>, extra: &[&str]) -> Result<Controller> {
        let grpc = victor_testkit::ports::free_addr();
        let http = victor_testkit::ports::free_addr();
        let mut args: Vec<String> = vec![
            "victor-controller".into(),
            "--mobile-prefix".into(),
            MOBILE.into(),
            "--grpc-listen".into(),
            grpc.to_string(),
            "--http-listen".into(),
            http.to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        if let Some(endpoints) = etcd {
            args.push("--etcd-endpoints".into());
            args.push(endpoints.join(","));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = Controller { server: None, args, grpc, http };
        c.restart().await?;
        Ok(c)
    }

    /// Starts (again) with the same ports and store.
    pub async fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(self.server.is_none(), "controller already running");
        let config = ControllerConfig::load_from(self.args.clone())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let server = loop {
            match Server::start(config.clone()).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("controller start: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.server = Some(server);
        wait_async("controller ready", Duration::from_secs(20), || async {
            http_get_async(self.http, "/readyz").await.is_ok_and(|(code, _)| code == 200)
        })
        .await
    }

    /// Stops the replica (graceful: streams close, leases revoked). A shutdown that cannot finish
    /// (a client that never reads keeps a stream open) is abandoned after 5 s.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(s) = self.server.take() {
            match tokio::time::timeout(Duration::from_secs(5), s.shutdown()).await {
                Ok(result) => result?,
                Err(_) => eprintln!("controller shutdown did not finish within 5 s; abandoned"),
            }
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn client(&self) -> Result<BindingServiceClient<tonic::transport::Channel>> {
        Ok(BindingServiceClient::connect(self.url()).await?)
    }

    /// The binding of `ip`, or None (NOT_FOUND).
    pub async fn binding(&self, ip: Ipv4Addr) -> Result<Option<Binding>> {
        match self.client().await?.get_binding(GetBindingRequest { vm_ip: ip.to_string() }).await {
            Ok(b) => Ok(Some(b.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => bail!("GetBinding({ip}): {s}"),
        }
    }

    /// Waits until `ip` is bound to `fe`.
    pub async fn wait_bound(&self, ip: Ipv4Addr, fe: &str, timeout: Duration) -> Result<Binding> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(b) = self.binding(ip).await?
                && b.fe_id == fe
            {
                return Ok(b);
            }
            if Instant::now() > deadline {
                bail!("{ip} not bound to {fe} after {timeout:?} (now {:?})", self.binding(ip).await?);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn declare(&self, ip: Ipv4Addr, mac: &str) -> Result<()> {
        let req = DeclareVmRequest { vm_ip: ip.to_string(), mac: mac.into(), ..Default::default() };
        self.client().await?.declare_vm(req).await?;
        Ok(())
    }

    pub async fn metrics(&self) -> Result<String> {
        let (code, body) = http_get_async(self.http, "/metrics").await?;
        anyhow::ensure!(code == 200, "controller /metrics answered {code}");
        Ok(body)
    }
}

// ───────────────────────────── lab ─────────────────────────────

/// An agent process.
pub struct Agent {
    pub guard: Option<ChildGuard>,
    pub argv: Vec<String>,
    pub log: PathBuf,
    runs: u32,
}

/// The lab. Field order is drop order: agents and helpers die first, then links, namespaces,
/// and the temp dir.
pub struct Lab {
    pub agents: Vec<Agent>,
    pub links: Vec<Veth>,
    pub client: NetNs,
    pub ul: NetNs,
    pub fes: Vec<NetNs>,
    pub vm: NetNs,
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Builds client, underlay, `n` FEs and the VM behind fe2 (no agents yet).
    pub fn build(n: usize) -> Result<Lab> {
        victor_testkit::require_root("the fe-agent lab");
        let client = NetNs::new("fac")?;
        let ul = NetNs::new("fau")?;
        let fes = (1..=n).map(|i| NetNs::new(&format!("fa{i}"))).collect::<Result<Vec<_>>>()?;
        let vm = NetNs::new("fav")?;
        let mut lab = Lab { agents: Vec::new(), links: Vec::new(), client, ul, fes, vm, dir: tempfile::tempdir()? };
        lab.ul.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.ul.link_up("br0")?;
        for i in 1..=n {
            let port = format!("p{i}");
            lab.links.push(Veth::create(&lab.fes[i - 1], "ul0", &lab.ul, &port)?);
            lab.ul.ip(&["link", "set", &port, "master", "br0"])?;
            let fe = &lab.fes[i - 1];
            fe.add_addr("ul0", &format!("{}/24", fe_addr(i)))?;
            fe.enable_forwarding()?;
            if i > 1 {
                // Outbound traffic leaves at the VM's FE straight over the underlay (no triangle).
                fe.route(&["192.0.2.0/24", "via", &fe_addr(1).to_string()])?;
            }
        }
        lab.links.push(Veth::create(&lab.client, "eth0", &lab.fes[0], "cl0")?);
        lab.client.add_addr("eth0", &format!("{CLIENT}/24"))?;
        lab.client.route(&["default", "via", "192.0.2.1"])?;
        lab.fes[0].add_addr("cl0", "192.0.2.1/24")?;
        lab.add_vm(&lab.vm, "eth0", VM_PORT, 2, VM, VM_MAC)?;
        Ok(lab)
    }

    /// Adds a VM interface `vm_if` in `ns` (IP/24, MAC, default via the gateway) linked to
    /// `port` in FE `fe`.
    pub fn add_vm(&self, ns: &NetNs, vm_if: &str, port: &str, fe: usize, ip: Ipv4Addr, vm_mac: &str) -> Result<()> {
        // Both ends live in namespaces of the lab and die with them: the guard has nothing to do.
        let _link = Veth::create(ns, vm_if, self.fe(fe), port)?;
        ns.ip(&["link", "set", vm_if, "address", vm_mac])?;
        ns.add_addr(vm_if, &format!("{ip}/24"))?;
        ns.route(&["default", "via", GATEWAY])?;
        Ok(())
    }

    pub fn fe(&self, n: usize) -> &NetNs {
        &self.fes[n - 1]
    }

    /// The agent command line for FE `n`.
    pub fn agent_argv(&self, n: usize, controllers: &[String], extra: &[&str]) -> Vec<String> {
        let bin = env!("CARGO_BIN_EXE_victor-fe-agent");
        let mut argv: Vec<String> = vec![
            bin.into(),
            "--controller".into(),
            controllers.join(","),
            "--controller-netns".into(),
            format!("/proc/{}/ns/net", std::process::id()),
            "--fe-id".into(),
            format!("fe{n}"),
            "--site".into(),
            format!("dc{n}"),
            "--underlay-addr".into(),
            fe_addr(n).to_string(),
            "--vm-port".into(),
            "vm*".into(),
            "--mobile-prefix".into(),
            MOBILE.into(),
            "--gateway".into(),
            GATEWAY.into(),
            "--gateway-mac".into(),
            GATEWAY_MAC.into(),
            "--tun-name".into(),
            format!("vtun{n}"),
            "--http-listen".into(),
            "127.0.0.1:9180".into(),
            "--log".into(),
            "info,victor_fe_agent=debug".into(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    }

    /// Starts the agent of FE `n` (agents are indexed by FE number − 1).
    pub fn start_agent(&mut self, n: usize, controllers: &[String], extra: &[&str]) -> Result<()> {
        let argv = self.agent_argv(n, controllers, extra);
        while self.agents.len() < n {
            self.agents.push(Agent { guard: None, argv: Vec::new(), log: PathBuf::new(), runs: 0 });
        }
        self.agents[n - 1].argv = argv;
        self.respawn(n)
    }

    /// (Re)starts agent `n` with its last command line, logging to a new file.
    pub fn respawn(&mut self, n: usize) -> Result<()> {
        let agent = &mut self.agents[n - 1];
        agent.runs += 1;
        agent.log = self.dir.path().join(format!("agent{n}.{}.log", agent.runs));
        let argv: Vec<&str> = agent.argv.iter().map(String::as_str).collect();
        agent.guard = Some(self.fes[n - 1].spawn(&format!("agent{n}"), &argv, Some(&agent.log))?);
        Ok(())
    }

    /// Stops agent `n` with SIGTERM.
    pub fn stop_agent(&mut self, n: usize) {
        if let Some(mut g) = self.agents[n - 1].guard.take() {
            g.stop(Duration::from_secs(5));
        }
    }

    /// The current log of agent `n`.
    pub fn agent_log(&self, n: usize) -> String {
        std::fs::read_to_string(&self.agents[n - 1].log).unwrap_or_default()
    }

    /// GET from agent `n`'s admin port.
    pub fn agent_get(&self, n: usize, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        self.fe(n).run_in(move || http_get("127.0.0.1:9180".parse().expect("addr"), &path))?
    }

    /// One metric of agent `n` (exact series name with labels), 0 if absent.
    pub fn agent_metric(&self, n: usize, series: &str) -> Result<f64> {
        let (_, body) = self.agent_get(n, "/metrics")?;
        Ok(metric(&body, series).unwrap_or(0.0))
    }

    /// Waits until agent `n` reports ready (stream up, snapshot applied).
    pub fn wait_ready(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.agent_get(n, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if let Some(g) = self.agents[n - 1].guard.as_mut()
                && !g.is_running()
            {
                bail!("agent {n} exited:\n{}", self.agent_log(n));
            }
            if Instant::now() > deadline {
                bail!("agent {n} not ready after {timeout:?}:\n{}", self.agent_log(n));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Moves the VM's link from FE `from` to FE `to` and brings it up there.
    pub fn move_vm_link(&self, from: usize, to: usize) -> Result<()> {
        self.fe(from).ip(&["link", "set", VM_PORT, "netns", self.fe(to).name()])?;
        self.fe(to).link_up(VM_PORT)?;
        Ok(())
    }

    /// `ip -n FE route show <args>` of FE `n`.
    pub fn routes(&self, n: usize, args: &[&str]) -> Result<String> {
        let mut full = vec!["route", "show"];
        full.extend_from_slice(args);
        self.fe(n).ip(&full)
    }
}

// ───────────────────────────── packets ─────────────────────────────

/// Sends a gratuitous ARP for `ip` at `mac` out of `ifname` in `ns` (as a hypervisor does
/// after a migration).
pub fn send_garp(ns: &NetNs, ifname: &str, mac_text: &str, ip: Ipv4Addr) -> Result<()> {
    let frame = build_frame(&gratuitous(MacAddr(mac(mac_text)), ip, ArpOp::Request, None));
    let ifname = ifname.to_owned();
    ns.run_in(move || send_frame(&ifname, &frame))?
}

/// Sends `frames` out of `ifname` in `ns`, back to back.
pub fn send_frames(ns: &NetNs, ifname: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let ifname = ifname.to_owned();
    ns.run_in(move || {
        let sender = FrameSender::open(&ifname)?;
        frames.iter().try_for_each(|f| sender.send(f))
    })?
}

/// A gratuitous ARP frame.
pub fn garp_frame(mac_text: &str, ip: Ipv4Addr) -> Vec<u8> {
    build_frame(&gratuitous(MacAddr(mac(mac_text)), ip, ArpOp::Request, None))
}

/// Sends one Ethernet frame out of `ifname` (calling thread's namespace).
pub fn send_frame(ifname: &str, frame: &[u8]) -> Result<()> {
    FrameSender::open(ifname)?.send(frame)
}

/// An AF_PACKET socket sending out of one interface (calling thread's namespace). Reuse it for
/// bursts: closing a packet socket waits for an RCU grace period (~15 ms).
pub struct FrameSender {
    sock: Socket,
    index: u32,
    ifname: String,
}

impl FrameSender {
    pub fn open(ifname: &str) -> Result<FrameSender> {
        let index = nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
        Ok(FrameSender { sock: Socket::new(Domain::PACKET, Type::RAW, None)?, index, ifname: ifname.to_owned() })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: all-zero is a valid sockaddr_ll; the fields needed are set.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and addr are live for the call; lengths passed.
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(rc >= 0, "send frame on {}: {}", self.ifname, std::io::Error::last_os_error());
        Ok(())
    }
}

/// What a prober saw.
#[derive(Debug, Default, Clone)]
pub struct Probes {
    pub sent: u32,
    pub replied: BTreeSet<u32>,
}

impl Probes {
    /// Echo requests without a reply, ignoring the last `grace` (still in flight).
    pub fn lost(&self, grace: u32) -> u32 {
        let upto = self.sent.saturating_sub(grace);
        (0..upto).filter(|s| !self.replied.contains(s)).count() as u32
    }

    /// Replies to requests sent at or after `seq`.
    pub fn replies_from(&self, seq: u32) -> usize {
        self.replied.range(seq..).count()
    }
}

/// Sends ICMP echo requests at exact intervals from a namespace and counts replies by sequence
/// number (iputils ping slows down while replies are missing and under-counts loss).
pub struct Prober {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<Probes>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Prober {
    pub fn start(ns: &NetNs, dst: Ipv4Addr, interval: Duration) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(Probes::default()));
        let ident = (std::process::id() as u16) ^ (rand::random::<u16>());
        let (stop2, state2) = (stop.clone(), state.clone());
        let thread = ns.spawn_thread("prober", move || -> Result<()> {
            let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
            sock.set_read_timeout(Some(Duration::from_millis(1)))?;
            let dst_addr = SocketAddr::from((dst, 0)).into();
            let mut next = Instant::now();
            let mut seq: u32 = 0;
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            while !stop2.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    let msg = icmp::echo(icmp::TYPE_ECHO_REQUEST, ident, seq as u16, &[0x5a; 56]);
                    let _ = sock.send_to(&msg, &dst_addr);
                    state2.lock().expect("probes").sent = seq + 1;
                    seq += 1;
                    next += interval;
                }
                let Ok(n) = sock.recv(&mut buf) else { continue };
                // SAFETY: recv initialised the first n bytes.
                let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                let Ok(h) = ipv4::parse(&data) else { continue };
                let m = &data[h.header_len..];
                if m.len() >= 8 && m[0] == icmp::TYPE_ECHO_REPLY && m[4..6] == ident.to_be_bytes() {
                    let low = u16::from_be_bytes([m[6], m[7]]) as u32;
                    // Rebuild the full sequence number from the low 16 bits (sent recently).
                    let full = (seq.saturating_sub(1) & !0xffff) | low;
                    let full = if full > seq { full.saturating_sub(0x10000) } else { full };
                    state2.lock().expect("probes").replied.insert(full);
                }
            }
            Ok(())
        })?;
        Ok(Prober { stop, state, thread: Some(thread) })
    }

    pub fn probes(&self) -> Probes {
        self.state.lock().expect("probes").clone()
    }

    /// Waits until at least `n` replies to requests sent at or after `seq` arrived.
    pub fn wait_replies_from(&self, seq: u32, n: usize, timeout: Duration) -> Result<()> {
        wait("echo replies", timeout, || self.probes().replies_from(seq) >= n)
    }

    pub fn stop(mut self) -> Result<Probes> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow::anyhow!("prober panicked"))??;
        }
        Ok(self.probes())
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ───────────────────────────── HTTP and waiting ─────────────────────────────

/// A blocking HTTP/1.0 GET (calling thread's namespace).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    parse_http(&text)
}

/// The same from async code (root namespace).
pub async fn http_get_async(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text)).await??;
    parse_http(&text)
}

fn parse_http(text: &str) -> Result<(u16, String)> {
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("HTTP status")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// The value of one series (`name{labels}` exactly as exposed) in a Prometheus text body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `check` every 10 ms until it holds.
pub fn wait(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Async version of [`wait`].
pub async fn wait_async<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

// ───────────────────────────── a freezable TCP proxy ─────────────────────────────

/// A TCP proxy on loopback in front of a controller. `freeze()` stops it from moving bytes in
/// either direction while keeping every connection open — a replica that died silently (host
/// gone, partition): only the agent's own liveness checks can notice.
pub struct FreezableProxy {
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    pub async fn start(target: SocketAddr) -> Result<FreezableProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let f = f.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, f.clone()), pump(sr, cw, f));
                });
            }
        });
        Ok(FreezableProxy { addr, frozen, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Hold the connection open and silent forever (until the test drops everything).
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
