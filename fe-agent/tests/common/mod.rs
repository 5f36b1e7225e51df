//! The namespace lab of the agent's integration tests (probes, frame sender and agent command line
//! come from the `victor-lab` library, `victor_tests::lab`):
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
//!
//! **Data planes.** The namespace suites run against both backends ([`Plane`]): [`plane_tests!`]
//! makes `<test>::tun` and `<test>::kernel` of one body, the agents get `--dataplane <plane>`,
//! [`Lab::wait_ready`] checks their `/readyz` names that backend, and the kernel variant prints
//! `SKIPPED: <reason>` where the `ipip` or `sit` module cannot be loaded (then it checks nothing). Checks
//! that hold for one backend only are written under `match plane`.
#![allow(dead_code, unreachable_pub, unused_imports, unused_macros)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use victor_controller::config::Config as ControllerConfig;
use victor_controller::server::Server;
use victor_dataplane::packet::arp::MacAddr;
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::{Binding, DeclareVmRequest, GetBindingRequest};
use victor_testkit::netns::{NetNs, Veth};
use victor_testkit::process::ChildGuard;
use victor_tests::lab::agents::{AgentCommand, agent_get};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
pub const VM_MAC: &str = "02:00:00:00:00:11";
pub const GATEWAY: &str = "10.10.0.1";
pub const GATEWAY_MAC: &str = "02:00:5e:10:00:01";
pub const MOBILE: &str = "10.10.0.0/16";
/// The VM's IPv6 address (the dual-stack lab: [`Lab::add_ipv6`]).
pub const VM6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x11);
/// The client's IPv6 address, behind fe1.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10);
pub const GATEWAY6: &str = "fd00:10::1";
pub const MOBILE6: &str = "fd00:10::/64";
/// The FE-side name of the VM's link (the same in every FE it moves to).
pub const VM_PORT: &str = "vm1p";
/// The agent flags of the dual-stack lab ([`Lab::add_ipv6`]).
pub const V6_FLAGS: [&str; 4] = ["--mobile-prefix", MOBILE6, "--gateway", GATEWAY6];

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
    pub async fn binding(&self, ip: impl Into<IpAddr>) -> Result<Option<Binding>> {
        let ip = ip.into();
        match self.client().await?.get_binding(GetBindingRequest { vm_ip: ip.to_string() }).await {
            Ok(b) => Ok(Some(b.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => bail!("GetBinding({ip}): {s}"),
        }
    }

    /// Waits until `ip` is bound to `fe`.
    pub async fn wait_bound(&self, ip: impl Into<IpAddr>, fe: &str, timeout: Duration) -> Result<Binding> {
        let ip = ip.into();
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

// ───────────────────────────── data planes ─────────────────────────────

/// A data-plane backend a suite runs against (`--dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// The userspace forwarder on TUN.
    Tun,
    /// The kernel's ipip and sit, devices per registered FE.
    Kernel,
}

impl Plane {
    /// `tun` / `kernel`.
    pub fn label(self) -> &'static str {
        match self {
            Plane::Tun => "tun",
            Plane::Kernel => "kernel",
        }
    }

    /// Why this backend cannot run here (the kernel's ipip or sit module cannot be loaded; `auto`
    /// needs both), or None.
    pub fn unavailable(self) -> Option<String> {
        if self == Plane::Tun {
            return None;
        }
        ["ipip", "sit"].into_iter().find_map(|m| match victor_dataplane::kernel::load_module(m) {
            victor_dataplane::kernel::ModuleLoad::Unavailable(why) => Some(format!("{m}: {why}")),
            _ => None,
        })
    }

    /// The agent flags selecting it.
    pub fn flags(self) -> [&'static str; 2] {
        ["--dataplane", self.label()]
    }
}

/// Runs `body` on `plane`, or prints `SKIPPED: ...` (and passes) where it cannot run.
pub async fn run_on<F, Fut>(test: &str, plane: Plane, body: F) -> Result<()>
where
    F: FnOnce(Plane) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    if let Some(why) = plane.unavailable() {
        println!(
            "SKIPPED: {test} on the {} data plane: the kernel's module cannot be loaded here: {why}",
            plane.label()
        );
        return Ok(());
    }
    println!("data plane under test: {}", plane.label());
    body(plane).await
}

/// `plane_tests!(name, ...)`: for each `async fn name(plane: Plane) -> anyhow::Result<()>` in
/// scope, the tests `name::tun` and `name::kernel`.
macro_rules! plane_tests {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use super::common::{Plane, run_on};

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn tun() -> anyhow::Result<()> {
                run_on(stringify!($name), Plane::Tun, super::$name).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn kernel() -> anyhow::Result<()> {
                run_on(stringify!($name), Plane::Kernel, super::$name).await
            }
        }
    )+};
}
pub(crate) use plane_tests;

/// FE `from`'s route to `ip` through its kernel tunnel device to FE `to`, as `ip route` shows it.
pub fn tunnel_route(ip: Ipv4Addr, to: usize) -> String {
    format!("{ip} dev {} proto 158 scope link", tunnel_device(to))
}

/// The name of the kernel tunnel device to FE `to`.
pub fn tunnel_device(to: usize) -> String {
    victor_fe_agent::forwarding::kernel::devices::peer_name(fe_addr(to))
}

/// The name of the kernel's 6in4 (`sit`) device to FE `to`.
pub fn sit_device(to: usize) -> String {
    victor_fe_agent::forwarding::kernel::devices::sit_name(fe_addr(to))
}

/// The start of FE `from`'s route to the IPv6 `ip` through its `sit` device to FE `to`, as
/// `ip -6 route` shows it (metric and preference follow).
pub fn sit_route(ip: Ipv6Addr, to: usize) -> String {
    format!("{ip} dev {} proto 158 ", sit_device(to))
}

/// Sends one `size`-byte ICMP echo request with DF set from `ns` (source `src`) to `dst` and
/// returns the next-hop MTU of the ICMP "fragmentation needed" that comes back within 3 s, if
/// any.
pub fn frag_needed_mtu(ns: &NetNs, src: Ipv4Addr, dst: Ipv4Addr, size: usize) -> Result<Option<u16>> {
    use socket2::{Domain, Protocol, Socket, Type};
    use victor_dataplane::packet::{icmp, ipv4};
    ns.run_in(move || -> Result<Option<u16>> {
        let listen = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        listen.set_read_timeout(Some(Duration::from_millis(100)))?;
        let send = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
        let echo = icmp::echo(icmp::TYPE_ECHO_REQUEST, 0x7a7a, 1, &vec![0x5a; size - 28]);
        let packet = ipv4::build_packet(src, dst, ipv4::PROTO_ICMP, 64, 0, true, &echo);
        send.send_to(&packet, &std::net::SocketAddr::from((dst, 0)).into())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while Instant::now() < deadline {
            let Ok(n) = listen.recv(&mut buf) else { continue };
            // SAFETY: recv initialised the first n bytes.
            let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let Ok(h) = ipv4::parse(&data) else { continue };
            let m = &data[h.header_len..];
            if m.len() >= 8 && m[0] == icmp::TYPE_DEST_UNREACHABLE && m[1] == icmp::CODE_FRAG_NEEDED {
                return Ok(Some(u16::from_be_bytes([m[6], m[7]])));
            }
        }
        Ok(None)
    })?
}

/// The sum of every `victor_agent_reconcile_ops_total` series in a metrics body.
pub fn reconcile_ops(body: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with("victor_agent_reconcile_ops_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
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
    /// The data plane every agent is started with (None: the agent's default, auto).
    pub plane: Option<Plane>,
}

impl Lab {
    /// Three FEs on `plane`, a controller on its embedded store, and an agent per FE with no
    /// extra flags, every agent ready: the common start of the namespace suites.
    pub async fn with_agents(plane: Plane) -> Result<(Lab, Controller)> {
        let mut lab = Lab::build_on(3, plane)?;
        let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
        for n in 1..=3 {
            lab.start_agent(n, &[ctl.url()], &[])?;
        }
        for n in 1..=3 {
            lab.wait_ready(n, Duration::from_secs(30))?;
        }
        Ok((lab, ctl))
    }

    /// [`Lab::build`] whose agents run `plane`.
    pub fn build_on(n: usize, plane: Plane) -> Result<Lab> {
        let mut lab = Lab::build(n)?;
        lab.plane = Some(plane);
        Ok(lab)
    }

    /// Builds client, underlay, `n` FEs and the VM behind fe2 (no agents yet).
    pub fn build(n: usize) -> Result<Lab> {
        victor_testkit::require_root("the fe-agent lab");
        let client = NetNs::new("fac")?;
        let ul = NetNs::new("fau")?;
        let fes = (1..=n).map(|i| NetNs::new(&format!("fa{i}"))).collect::<Result<Vec<_>>>()?;
        let vm = NetNs::new("fav")?;
        let mut lab =
            Lab { agents: Vec::new(), links: Vec::new(), client, ul, fes, vm, dir: tempfile::tempdir()?, plane: None };
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

    /// Makes the lab dual-stack: the client (fd00:99::10/64, behind fe1), IPv6 on the underlay
    /// (fd00:198::n/64; fe2 and fe3 route the client's prefix through fe1, as for IPv4) and
    /// forwarding in every FE, and the VM's IPv6 address fd00:10::11/64 with its default route via
    /// the IPv6 gateway. Addresses skip duplicate address detection: the tests send the VM's
    /// announcements (NA, DAD) themselves.
    pub fn add_ipv6(&self) -> Result<()> {
        for (i, fe) in self.fes.iter().enumerate() {
            fe.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            fe.ip(&["-6", "addr", "add", &format!("fd00:198::{}/64", i + 1), "dev", "ul0", "nodad"])?;
            if i > 0 {
                fe.ip(&["-6", "route", "add", "fd00:99::/64", "via", "fd00:198::1"])?;
            }
        }
        self.fes[0].ip(&["-6", "addr", "add", "fd00:99::1/64", "dev", "cl0", "nodad"])?;
        self.client.ip(&["-6", "addr", "add", &format!("{CLIENT6}/64"), "dev", "eth0", "nodad"])?;
        self.client.ip(&["-6", "route", "add", "default", "via", "fd00:99::1"])?;
        self.vm.ip(&["-6", "addr", "add", &format!("{VM6}/64"), "dev", "eth0", "nodad"])?;
        self.vm.ip(&["-6", "route", "add", "default", "via", GATEWAY6])?;
        Ok(())
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

    /// The agent command line for FE `n` (the lab's, with this test binary's agent).
    pub fn agent_argv(&self, n: usize, controllers: &[String], extra: &[&str]) -> Vec<String> {
        let netns = format!("/proc/{}/ns/net", std::process::id());
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_victor-fe-agent"));
        // A standby forwarder outlives its agent (userspace data plane): not the lab by much.
        let mut extra = [&["--standby-hold", "3s"], extra].concat();
        if let Some(plane) = self.plane {
            extra.extend(plane.flags());
        }
        AgentCommand { bin, controllers, controller_netns: &netns, extra: &extra }.argv(n)
    }

    /// Starts the agent of FE `n` (agents are indexed by FE number − 1).
    pub fn start_agent(&mut self, n: usize, controllers: &[String], extra: &[&str]) -> Result<()> {
        let argv = self.agent_argv(n, controllers, extra);
        self.start_argv(n, argv)
    }

    /// Starts `argv` (an agent command line, maybe wrapped) as the agent of FE `n`.
    pub fn start_argv(&mut self, n: usize, argv: Vec<String>) -> Result<()> {
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
        agent_get(self.fe(n), path)
    }

    /// One metric of agent `n` (exact series name with labels), 0 if absent.
    pub fn agent_metric(&self, n: usize, series: &str) -> Result<f64> {
        let (_, body) = self.agent_get(n, "/metrics")?;
        Ok(metric(&body, series).unwrap_or(0.0))
    }

    /// Waits until agent `n` reports ready (stream up, snapshot applied) — on the lab's data
    /// plane, if it has one: its `/readyz` must name it.
    pub fn wait_ready(&mut self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = self.agent_get(n, "/readyz") {
                if let Some(plane) = self.plane {
                    let want = format!("dataplane: {} ", plane.label());
                    anyhow::ensure!(body.contains(&want), "agent {n} runs another data plane than {plane:?}: {body}");
                }
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
        let ups = |lab: &Self| lab.agent_log(to).matches("VM port up").count();
        let running = self.agents.get(to - 1).is_some_and(|a| a.guard.is_some());
        let before = ups(self);
        self.fe(from).ip(&["link", "set", VM_PORT, "netns", self.fe(to).name()])?;
        self.fe(to).link_up(VM_PORT)?;
        if running {
            // A hypervisor's port exists long before the VM it carries announces itself: wait
            // until `to`'s agent has seen the port (and give its engine a moment to open the
            // capture) so that the announcement the test sends next is not sent into the void.
            wait("the agent to see its new VM port", Duration::from_secs(10), || ups(self) > before)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `ip -n FE route show <args>` of FE `n`.
    pub fn routes(&self, n: usize, args: &[&str]) -> Result<String> {
        let mut full = vec!["route", "show"];
        full.extend_from_slice(args);
        self.fe(n).ip(&full)
    }

    /// Starts `ip monitor route <objects>` in FE `n`, logging to `log`, and returns once it
    /// listens (a sentinel route changed after the start shows up in the log): it cannot miss
    /// what the test does next, however slowly it started.
    pub fn monitor(&self, n: usize, objects: &[&str], log: &std::path::Path) -> Result<ChildGuard> {
        let mut argv = vec!["ip", "monitor", "route"];
        argv.extend_from_slice(objects);
        let child = self.fe(n).spawn("monitor", &argv, Some(log))?;
        const SENTINEL: &str = "203.0.113.254/32";
        wait("ip monitor to listen", Duration::from_secs(10), || {
            let _ = self.fe(n).ip(&["route", "replace", "blackhole", SENTINEL]);
            let _ = self.fe(n).ip(&["route", "del", "blackhole", SENTINEL]);
            std::fs::read_to_string(log).is_ok_and(|l| l.contains("203.0.113.254"))
        })?;
        Ok(child)
    }
}

// ───────────────────────────── packets ─────────────────────────────

pub use victor_tests::lab::probe::{Prober, Probes, send_frames, send_garp, wait};

/// The VM's unsolicited Neighbor Advertisement for `addr` (override flag set), as a frame.
pub fn na_frame(addr: Ipv6Addr) -> Vec<u8> {
    use victor_dataplane::packet::ndp::{build_frame, unsolicited_advertisement};
    build_frame(&unsolicited_advertisement(MacAddr(mac(VM_MAC)), addr, false, None))
}

/// A gratuitous ARP frame (the lab's, for valid MAC text).
pub fn garp_frame(mac_text: &str, ip: Ipv4Addr) -> Vec<u8> {
    victor_tests::lab::probe::garp_frame(mac_text, ip).expect("a valid MAC")
}

// ───────────────────────────── HTTP and waiting ─────────────────────────────

/// GET from an address reachable from the test's own namespace.
pub async fn http_get_async(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    victor_testkit::http::get(addr, path).await
}

/// The value of one series (`name{labels}` exactly as exposed) in a Prometheus text body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
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

// ───────────────────────────── a partitionable TCP proxy ─────────────────────────────

/// The fault suite's link proxy: `partition()` freezes every connection (a replica that died
/// silently: only the agent's liveness checks can tell), `heal()` resets the held ones.
pub use victor_tests::faults::proxy::LinkProxy;

/// p50, max and every value of a benchmark series, as the BGP tests report them.
pub fn summary(values: &[f64]) -> serde_json::Value {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pick = |q: f64| v[(((q * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
    serde_json::json!({ "p50": pick(0.5), "max": pick(1.0), "all": values })
}

/// A namespace for a lab role, named `<tag><short role>` (`NetNs::new` makes it unique per run):
/// the BGP labs keep names short, as their interface names must fit in 15 characters.
pub fn short_netns(tag: &str, role: &str) -> Result<NetNs> {
    let short = match role {
        "client" => "c".to_owned(),
        "upstream" => "u".to_owned(),
        "ul" => "l".to_owned(),
        "hv" => "h".to_owned(),
        r => r.replace("fe", "").replace("vm", "v"),
    };
    NetNs::new(&format!("{tag}{short}"))
}
