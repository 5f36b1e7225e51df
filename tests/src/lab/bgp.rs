//! The lab's BGP anycast path (docs/bgp.md): an `upstream` router running real BIRD 2 between the
//! client and the FEs. Every FE's agent holds an eBGP session with it (`--bgp-peer`) and announces
//! the mobile prefix while healthy; BIRD accepts exactly the mobile prefixes from the FEs and
//! installs one ECMP route over every FE that announces it.
//!
//! ```text
//!  client ── cl0 ─ upstream (BIRD, AS 65000) ─┬─ fe1 ── 203.0.113.0/30 ── fe1 up0 (agent, AS 65010)
//!  192.0.2.10      192.0.2.1                  ├─ fe2 ── 203.0.113.4/30 ── fe2 up0
//!                                             └─ fe3 ── 203.0.113.8/30 ── fe3 up0
//! ```
//! * [`wire_upstream`] — the links and routes (called by the topology); [`wire_upstream6`] adds
//!   IPv6 to the links (2001:db8:ff:<n>::/64) for IPv6 anycast ([`MOBILE6`]);
//! * [`router_config`] — the BIRD configuration of a border router for VICTOR, IPv4 and IPv6
//!   (docs/bgp.md shows its output; a test keeps them equal);
//! * [`Bird`] — a BIRD process with its own config, control socket and log in a directory;
//! * [`FibWatch`] — the upstream kernel's route for a mobile prefix (IPv4 or IPv6) as it changes,
//!   timestamped;
//! * [`pin_client`] — makes the client's flow hash to a chosen FE (ECMP is per flow).

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{MulticastGroup, RouteMessageBuilder};
use victor_proto::clock::monotonic_ns;
use victor_testkit::netns::{NetNs, Veth};
use victor_testkit::process::ChildGuard;

use super::addressing::{CLIENT_GATEWAY, CLIENT_NET, MOBILE};

/// The BIRD daemon.
pub const BIRD: &str = "/usr/sbin/bird";
/// Its command-line client.
pub const BIRDC: &str = "/usr/sbin/birdc";
/// The upstream router's AS.
pub const UPSTREAM_AS: u32 = 65000;
/// The FEs' AS (the same for every FE).
pub const VICTOR_AS: u32 = 65010;

/// The upstream router's address on its link to FE `n`.
pub fn upstream_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, (4 * (n - 1) + 1) as u8)
}

/// FE `n`'s address on its link to the upstream router (its BGP next hop).
pub fn edge_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, (4 * (n - 1) + 2) as u8)
}

/// The name of FE `n`'s BGP protocol in the upstream's BIRD (and of the upstream's link to it).
pub fn peer_name(n: usize) -> String {
    format!("fe{n}")
}

/// The IPv6 mobile prefix the lab's FEs announce with IPv6 anycast.
pub const MOBILE6: &str = "2001:db8:a::/48";

/// The upstream router's IPv6 address on its link to FE `n` ([`wire_upstream6`]).
pub fn upstream_addr6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, n as u16, 0, 0, 0, 1)
}

/// FE `n`'s IPv6 address on its link to the upstream router (its IPv6 next hop).
pub fn edge_addr6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, n as u16, 0, 0, 0, 2)
}

/// Links `upstream` (interfaces `fe<n>`) to every FE (interface `up0`), /30 each; every FE
/// routes the client network via the upstream (outbound traffic leaves at the VM's own FE).
pub fn wire_upstream(upstream: &NetNs, fes: &[NetNs]) -> Result<()> {
    upstream.enable_forwarding()?;
    for (i, fe) in fes.iter().enumerate() {
        let n = i + 1;
        let _link = Veth::create(upstream, &peer_name(n), fe, "up0")?;
        upstream.add_addr(&peer_name(n), &format!("{}/30", upstream_addr(n)))?;
        fe.add_addr("up0", &format!("{}/30", edge_addr(n)))?;
        fe.route(&[CLIENT_NET, "via", &upstream_addr(n).to_string()])?;
    }
    Ok(())
}

/// Adds IPv6 to the links of [`wire_upstream`]: 2001:db8:ff:<n>::1/64 at the upstream,
/// 2001:db8:ff:<n>::2/64 at FE `n` (no duplicate address detection: usable at once). Returns once
/// every link-local address of those links is past its duplicate address detection too (the
/// agents send theirs as the link-local next hop).
pub fn wire_upstream6(upstream: &NetNs, fes: &[NetNs]) -> Result<()> {
    upstream.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    for (i, fe) in fes.iter().enumerate() {
        let n = i + 1;
        upstream.ip(&["-6", "addr", "add", &format!("{}/64", upstream_addr6(n)), "dev", &peer_name(n), "nodad"])?;
        fe.ip(&["-6", "addr", "add", &format!("{}/64", edge_addr6(n)), "dev", "up0", "nodad"])?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let links = fes.iter().map(|fe| (fe, "up0".to_owned())).chain((1..=fes.len()).map(|n| (upstream, peer_name(n))));
    for (ns, dev) in links {
        loop {
            let addrs = ns.ip(&["-6", "addr", "show", "dev", &dev, "scope", "link"])?;
            if addrs.contains("inet6 fe80:") && !addrs.contains("tentative") {
                break;
            }
            ensure!(Instant::now() < deadline, "{dev} in {} has no usable link-local address: {addrs}", ns.name());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// FE `n`'s link-local address on its link to the upstream router.
pub fn edge_link_local(fe: &NetNs) -> Result<Ipv6Addr> {
    let addrs = fe.ip(&["-6", "-o", "addr", "show", "dev", "up0", "scope", "link"])?;
    addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .with_context(|| format!("no link-local address on up0 in {}: {addrs}", fe.name()))
}

/// The agent flags of FE `n` for the lab's upstream.
pub fn agent_flags(n: usize) -> Vec<String> {
    [
        "--bgp-peer",
        &upstream_addr(n).to_string(),
        "--bgp-local-as",
        &VICTOR_AS.to_string(),
        "--bgp-peer-as",
        &UPSTREAM_AS.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// A border router of a site, as BIRD 2 runs it for VICTOR.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// `log` target (e.g. `syslog all`, `stderr all`).
    pub log: String,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// The router's AS.
    pub local_as: u32,
    /// The IPv4 mobile prefixes: exactly these are accepted from the FEs.
    pub mobile: Vec<String>,
    /// The IPv6 mobile prefixes: exactly these are accepted from the FEs (none: IPv4 only).
    pub mobile6: Vec<String>,
    /// The FEs' AS.
    pub fe_as: u32,
    /// The FEs: protocol name and the agent's address (IPv4 or IPv6; either session carries
    /// both families).
    pub fes: Vec<(String, IpAddr)>,
    /// Upstream providers to announce the mobile prefixes to: address and AS; one with an IPv4
    /// address gets the IPv4 prefixes, one with an IPv6 address the IPv6 ones.
    pub providers: Vec<(IpAddr, u32)>,
}

/// The BIRD 2 configuration of `c`.
pub fn router_config(c: &RouterConfig) -> String {
    let dual = !c.mobile6.is_empty();
    let mut out = format!(
        r#"log {log};
router id {id};

protocol device {{
}}

# The mobile prefixes: exactly these (no more-specifics) are accepted from the FE agents.
define VICTOR_MOBILE = [ {mobile} ];
"#,
        log = c.log,
        id = c.router_id,
        mobile = c.mobile.join(", "),
    );
    if dual {
        out.push_str(&format!("define VICTOR_MOBILE6 = [ {} ];\n", c.mobile6.join(", ")));
    }
    out.push_str(&filter("victor_from_fe", "VICTOR_MOBILE"));
    if dual {
        out.push_str(&filter("victor6_from_fe", "VICTOR_MOBILE6"));
    }
    out.push_str("\n# One kernel route per prefix with a next hop per announcing FE (ECMP).\n");
    out.push_str(&kernel("ipv4"));
    if dual {
        out.push('\n');
        out.push_str(&kernel("ipv6"));
    }
    out.push_str(&format!(
        r#"
# The FE agents connect (passive) and announce the mobile prefixes while healthy; a session
# that ends (agent stopped, crashed or silent for the hold time) withdraws them at once. After
# an error (e.g. hold timer expired) BIRD refuses the agent for `error wait time` (default 60 s,
# doubling up to 300 s): 1 s, doubling up to 30 s, lets a recovered FE back quickly.
template bgp victor_fe {{
  local as {local_as};
  passive on;
  hold time 9;
  error wait time 1, 30;
{channels}}}
"#,
        local_as = c.local_as,
        channels = fe_channel("ipv4", "victor_from_fe")
            + &if dual { fe_channel("ipv6", "victor6_from_fe") } else { String::new() },
    ));
    out.push_str("\n# One protocol per FE agent.\n");
    for (name, addr) in &c.fes {
        out.push_str(&format!("protocol bgp {name} from victor_fe {{ neighbor {addr} as {}; }}\n", c.fe_as));
    }
    for (addr, asn) in &c.providers {
        let (name, channel, set, comment) = match addr {
            IpAddr::V4(_) => (
                "provider",
                "ipv4",
                "VICTOR_MOBILE",
                "# The provider learns the mobile prefixes from this site while at least one FE here announces\n\
                 # them (path: this AS, then the FEs' AS).",
            ),
            IpAddr::V6(_) => (
                "provider6",
                "ipv6",
                "VICTOR_MOBILE6",
                "# The provider's IPv6 session: the IPv6 mobile prefixes, on the same condition.",
            ),
        };
        out.push_str(&format!(
            r#"
{comment}
protocol bgp {name} {{
  local as {local_as};
  neighbor {addr} as {asn};
  {channel} {{
    import all;
    export where net ~ {set} && bgp_path.last = {fe_as};
  }};
}}
"#,
            local_as = c.local_as,
            fe_as = c.fe_as,
        ));
    }
    out
}

/// A filter accepting exactly the prefixes of set `set`.
fn filter(name: &str, set: &str) -> String {
    format!("\nfilter {name} {{\n  if net ~ {set} then accept;\n  reject;\n}}\n")
}

/// A kernel protocol exporting the BGP routes of one family, the paths of a prefix merged (ECMP).
fn kernel(channel: &str) -> String {
    format!(
        "protocol kernel {{\n  {channel} {{\n    import none;\n    export where source = RTS_BGP;\n  }};\n  \
         merge paths on;\n}}\n"
    )
}

/// A channel of the FE template: routes through `filter` in, nothing out.
fn fe_channel(channel: &str, filter: &str) -> String {
    format!("  {channel} {{\n    import filter {filter};\n    export none;\n  }};\n")
}

/// The lab upstream's configuration for `fes` FEs (IPv4 anycast, IPv4 sessions).
pub fn upstream_config(fes: usize) -> String {
    router_config(&RouterConfig {
        log: "stderr all".into(),
        router_id: upstream_addr(1),
        local_as: UPSTREAM_AS,
        mobile: vec![MOBILE.into()],
        mobile6: Vec::new(),
        fe_as: VICTOR_AS,
        fes: (1..=fes).map(|n| (peer_name(n), IpAddr::V4(edge_addr(n)))).collect(),
        providers: Vec::new(),
    })
}

/// The lab upstream's configuration for `fes` FEs announcing [`MOBILE`] and [`MOBILE6`], over
/// sessions to each FE's IPv4 address, or its IPv6 one (`ipv6_sessions`; [`wire_upstream6`]).
pub fn upstream_config_dual(fes: usize, ipv6_sessions: bool) -> String {
    let addr = |n| if ipv6_sessions { IpAddr::V6(edge_addr6(n)) } else { IpAddr::V4(edge_addr(n)) };
    router_config(&RouterConfig {
        log: "stderr all".into(),
        router_id: upstream_addr(1),
        local_as: UPSTREAM_AS,
        mobile: vec![MOBILE.into()],
        mobile6: vec![MOBILE6.into()],
        fe_as: VICTOR_AS,
        fes: (1..=fes).map(|n| (peer_name(n), addr(n))).collect(),
        providers: Vec::new(),
    })
}

/// Checks a configuration with `bird -p` (parse only).
pub fn check_config(config: &str) -> Result<()> {
    ensure_installed()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bird.conf");
    std::fs::write(&path, config)?;
    let out = std::process::Command::new(BIRD).arg("-p").arg("-c").arg(&path).output()?;
    ensure!(out.status.success(), "bird -p rejects the configuration: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn ensure_installed() -> Result<()> {
    ensure!(
        Path::new(BIRD).exists() && Path::new(BIRDC).exists(),
        "BIRD 2 is not installed ({BIRD}; apt install bird2)"
    );
    Ok(())
}

/// A BIRD process in a namespace, with its config, control socket and log in one directory.
pub struct Bird {
    guard: Option<ChildGuard>,
    /// The control socket.
    pub socket: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Bird {
    /// Writes `<dir>/<name>.conf` and runs BIRD in `ns` until dropped; returns once it answers
    /// on its control socket.
    pub fn start(ns: &NetNs, name: &str, config: &str, dir: &Path) -> Result<Bird> {
        ensure_installed()?;
        let conf = dir.join(format!("{name}.conf"));
        let socket = dir.join(format!("{name}.ctl"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&conf, config).with_context(|| format!("write {}", conf.display()))?;
        let args = ["-f", "-c", path_str(&conf)?, "-s", path_str(&socket)?];
        let mut argv = vec![BIRD];
        argv.extend(args);
        let guard = ns.spawn(&format!("bird-{name}"), &argv, Some(&log))?;
        let mut bird = Bird { guard: Some(guard), socket, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bird.cli("show status").is_err() {
            if !bird.guard.as_mut().is_some_and(ChildGuard::is_running) {
                bail!("BIRD {name} exited:\n{}", bird.log_text());
            }
            if Instant::now() > deadline {
                bail!("BIRD {name} does not answer on {} after 10 s:\n{}", bird.socket.display(), bird.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(bird)
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.guard.as_ref().map_or(0, ChildGuard::pid)
    }

    /// Lets it outlive this value (`victor-lab up`); returns its PID.
    pub fn detach(mut self) -> u32 {
        self.guard.take().map_or(0, ChildGuard::detach)
    }

    /// Its log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a `birdc` command (e.g. `show protocols`) and returns its output; BIRD's error
    /// replies are errors.
    pub fn cli(&self, command: &str) -> Result<String> {
        let (ok, text) = self.birdc(command)?;
        ensure!(ok, "birdc {command}: {text}");
        Ok(text)
    }

    /// Runs `birdc`: whether BIRD answered without error, and its output.
    fn birdc(&self, command: &str) -> Result<(bool, String)> {
        let out = std::process::Command::new(BIRDC)
            .arg("-s")
            .arg(&self.socket)
            .args(command.split_whitespace())
            .output()
            .context("run birdc")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(!text.contains("Unable to connect"), "birdc {command}: {text}");
        Ok((out.status.success(), text))
    }

    /// True if protocol `name`'s BGP session is established.
    pub fn established(&self, name: &str) -> Result<bool> {
        Ok(self.cli(&format!("show protocols {name}"))?.lines().any(|l| l.contains("Established")))
    }

    /// The protocols BIRD has a route for `prefix` from (e.g. `["fe1", "fe2"]`), sorted.
    pub fn route_sources(&self, prefix: &str) -> Result<Vec<String>> {
        let command = format!("show route for {prefix}");
        let (ok, text) = self.birdc(&command)?;
        if !ok && text.contains("Network not found") {
            return Ok(Vec::new());
        }
        ensure!(ok, "birdc {command}: {text}");
        let mut names: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_once("unicast [")?.1.split_whitespace().next().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Waits until BIRD has a route for `prefix` from exactly `expected`.
    pub fn wait_route_sources(&self, prefix: &str, expected: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.route_sources(prefix)?;
            if now == expected {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "BIRD has {prefix} from {now:?}, not {expected:?}, after {timeout:?}:\n{}\n{}",
                    self.cli("show protocols").unwrap_or_default(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

/// An address family [`FibWatch`] follows: IPv4 ([`Ipv4Addr`]) or IPv6 ([`Ipv6Addr`]).
pub trait FibFamily: Copy + Ord + Debug + Send + Sync + 'static {
    /// The rtnetlink notifications of its routes.
    const GROUP: MulticastGroup;
    /// A dump request for its routes.
    fn dump() -> RouteMessage;
    /// The address of this family in a route attribute.
    fn of(address: &RouteAddress) -> Option<Self>;
    /// Parses `address/len`.
    fn prefix(text: &str) -> Option<(Self, u8)>;
}

impl FibFamily for Ipv4Addr {
    const GROUP: MulticastGroup = MulticastGroup::Ipv4Route;
    fn dump() -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    }
    fn of(address: &RouteAddress) -> Option<Self> {
        if let RouteAddress::Inet(a) = address { Some(*a) } else { None }
    }
    fn prefix(text: &str) -> Option<(Self, u8)> {
        let (a, l) = text.split_once('/')?;
        Some((a.parse().ok()?, l.parse().ok()?))
    }
}

impl FibFamily for Ipv6Addr {
    const GROUP: MulticastGroup = MulticastGroup::Ipv6Route;
    fn dump() -> RouteMessage {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    }
    fn of(address: &RouteAddress) -> Option<Self> {
        if let RouteAddress::Inet6(a) = address { Some(*a) } else { None }
    }
    fn prefix(text: &str) -> Option<(Self, u8)> {
        let (a, l) = text.split_once('/')?;
        Some((a.parse().ok()?, l.parse().ok()?))
    }
}

/// The kernel route of one prefix in a namespace at one moment: its gateways (none = no route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FibEvent<A = Ipv4Addr> {
    /// When the change was seen (CLOCK_MONOTONIC ns).
    pub mono_ns: u64,
    /// The next hops, sorted.
    pub gateways: Vec<A>,
}

/// Follows the kernel route of one prefix (main table) in a namespace through rtnetlink route
/// notifications, timestamping every change: when a router's FIB stops sending traffic to an FE.
/// Each notification about the prefix is followed by a read of the route as it then is (an IPv6
/// multipath route changes one next hop at a time, and a deleted next hop's notification says
/// nothing of the others), recorded with the notification's time.
pub struct FibWatch<A: FibFamily = Ipv4Addr> {
    events: Arc<Mutex<Vec<FibEvent<A>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl<A: FibFamily> FibWatch<A> {
    /// Starts watching `prefix` (e.g. `10.10.0.0/16`, or `2001:db8:a::/48` for a
    /// `FibWatch<Ipv6Addr>`) in `ns`; the first event is the route as it is now.
    pub fn start(ns: &NetNs, prefix: &str) -> Result<FibWatch<A>> {
        let net = A::prefix(prefix).with_context(|| format!("{prefix:?} is not a prefix of this family"))?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, st) = (events.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = ns.spawn_thread("fib-watch", move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let (conn, handle, mut messages) = match rtnetlink::new_multicast_connection(&[A::GROUP]) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("netlink route monitor: {e}")));
                        return Ok(());
                    }
                };
                tokio::spawn(conn);
                // The route as it is now: one entry per next hop where the kernel lists them so.
                let current = || async {
                    let mut routes = handle.route().get(A::dump()).execute();
                    let mut now = Vec::new();
                    while let Some(Ok(m)) = routes.next().await {
                        if matches(&m, net) {
                            now.extend(gateways::<A>(&m));
                        }
                    }
                    now.sort();
                    now.dedup();
                    now
                };
                // Subscribed first, then the current state: no change can fall in between.
                let now = current().await;
                ev.lock().expect("events").push(FibEvent { mono_ns: monotonic_ns(), gateways: now });
                let _ = ready_tx.send(Ok(()));
                while !st.load(Ordering::Relaxed) {
                    let Ok(next) = tokio::time::timeout(Duration::from_millis(50), messages.next()).await else {
                        continue;
                    };
                    let Some((msg, _)) = next else { break };
                    let at = monotonic_ns();
                    match msg.payload {
                        NetlinkPayload::InnerMessage(
                            RouteNetlinkMessage::NewRoute(m) | RouteNetlinkMessage::DelRoute(m),
                        ) if matches(&m, net) => {}
                        _ => continue,
                    }
                    let gateways = current().await;
                    let mut events = ev.lock().expect("events");
                    if events.last().is_none_or(|e| e.gateways != gateways) {
                        events.push(FibEvent { mono_ns: at, gateways });
                    }
                }
                Ok(())
            })
        })?;
        ready_rx.recv().context("route monitor thread died")??;
        Ok(FibWatch { events, stop, thread: Some(thread) })
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<FibEvent<A>> {
        self.events.lock().expect("events").clone()
    }

    /// The current gateways.
    pub fn gateways(&self) -> Vec<A> {
        self.events.lock().expect("events").last().map(|e| e.gateways.clone()).unwrap_or_default()
    }

    /// Waits for the first event at or after `since` (monotonic ns) whose gateways satisfy
    /// `check` (also an event from before `since` if it is the current state).
    pub fn wait_for(
        &self,
        what: &str,
        since: u64,
        timeout: Duration,
        check: impl Fn(&[A]) -> bool,
    ) -> Result<FibEvent<A>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let events = self.events.lock().expect("events");
                let current = events.iter().rposition(|e| e.mono_ns < since).unwrap_or(0);
                if let Some(e) = events[current..].iter().find(|e| check(&e.gateways)) {
                    return Ok(e.clone());
                }
            }
            if Instant::now() > deadline {
                bail!("upstream FIB: no {what} within {timeout:?}; events: {:?}", self.events());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl<A: FibFamily> Drop for FibWatch<A> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn matches<A: FibFamily>(m: &RouteMessage, (network, len): (A, u8)) -> bool {
    let table = m
        .attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(m.header.table));
    table == 254
        && m.header.destination_prefix_length == len
        && m.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(d) if A::of(d) == Some(network)))
}

fn gateways<A: FibFamily>(m: &RouteMessage) -> Vec<A> {
    let mut out = Vec::new();
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(g) => out.extend(A::of(g)),
            RouteAttribute::MultiPath(hops) => {
                for hop in hops {
                    for h in &hop.attributes {
                        if let RouteAttribute::Gateway(g) = h {
                            out.extend(A::of(g));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out.sort();
    out
}

/// The anycast path of a lab run, for its report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnycastPath {
    /// The upstream router (`BIRD 2.0.12`).
    pub router: String,
    /// The FEs the upstream learned the mobile prefix from (one ECMP next hop each).
    pub paths: Vec<String>,
    /// The FE the client's flow enters at.
    pub ingress_fe: String,
    /// The client's source address that the upstream hashes to it.
    pub client_source: Ipv4Addr,
}

/// Starts the upstream's BIRD for `fes` FEs in `dir`.
pub fn start_upstream(upstream: &NetNs, fes: usize, dir: &Path) -> Result<Bird> {
    Bird::start(upstream, "upstream", &upstream_config(fes), dir)
}

/// Waits until the upstream learned the mobile prefix from each of `fes` FEs, then pins the
/// client's flow to `dst` to FE `ingress`.
pub fn anycast_ready(
    client: &NetNs,
    upstream: &NetNs,
    bird: &Bird,
    fes: usize,
    dst: Ipv4Addr,
    ingress: usize,
) -> Result<AnycastPath> {
    let paths: Vec<String> = (1..=fes).map(peer_name).collect();
    bird.wait_route_sources(MOBILE, &paths, Duration::from_secs(20))?;
    let client_source = pin_client(client, upstream, dst, ingress)?;
    let router = bird.cli("show status")?.lines().next().unwrap_or_default().trim_end_matches(" ready.").to_owned();
    Ok(AnycastPath { router, paths, ingress_fe: peer_name(ingress), client_source })
}

/// Makes the client's traffic to `dst` enter VICTOR at FE `fe`: ECMP hashes each flow (source,
/// destination) to one FE, so the client gets a source address the upstream hashes to `fe` (asked
/// with `ip route get`), used for everything it sends into the mobile prefix. Returns it.
pub fn pin_client(client: &NetNs, upstream: &NetNs, dst: Ipv4Addr, fe: usize) -> Result<Ipv4Addr> {
    let want = format!("via {} ", edge_addr(fe));
    for host in 100..=250u8 {
        let src = Ipv4Addr::new(192, 0, 2, host);
        let route = upstream.ip(&["route", "get", &dst.to_string(), "from", &src.to_string(), "iif", "cl0"])?;
        if !route.contains(&want) {
            continue;
        }
        let cidr = format!("{src}/24");
        if !client.ip(&["-o", "addr", "show", "dev", "eth0"])?.contains(&format!("inet {cidr}")) {
            client.add_addr("eth0", &cidr)?;
        }
        client.route(&[MOBILE, "via", &CLIENT_GATEWAY.to_string(), "src", &src.to_string()])?;
        return Ok(src);
    }
    bail!("no client address in 192.0.2.100-250 hashes to fe{fe} at the upstream (is its route there?)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample of docs/bgp.md: a border router with two FEs (one over IPv4, one over IPv6)
    /// announcing IPv4 and IPv6 mobile prefixes, and a provider reached over both families.
    fn docs_sample() -> RouterConfig {
        RouterConfig {
            log: "syslog all".into(),
            router_id: Ipv4Addr::new(192, 0, 2, 254),
            local_as: 64500,
            mobile: vec!["10.10.0.0/16".into(), "10.20.0.0/16".into()],
            mobile6: vec!["2001:db8:10::/48".into()],
            fe_as: 65010,
            fes: vec![
                ("fe1".into(), "203.0.113.2".parse().unwrap()),
                ("fe2".into(), "2001:db8:ff:2::2".parse().unwrap()),
            ],
            providers: vec![("198.18.0.1".parse().unwrap(), 64496), ("2001:db8:ffff::1".parse().unwrap(), 64496)],
        }
    }

    #[test]
    fn docs_show_the_configuration_bird_accepts() {
        let config = router_config(&docs_sample());
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/bgp.md")).unwrap();
        assert!(
            docs.contains(&config),
            "docs/bgp.md must show the border-router sample exactly as router_config() writes it:\n{config}"
        );
        check_config(&config).unwrap();
        check_config(&upstream_config(3)).unwrap();
        check_config(&upstream_config_dual(2, false)).unwrap();
        check_config(&upstream_config_dual(2, true)).unwrap();
        assert!(check_config("protocol bgp {").is_err());
    }

    #[test]
    fn ipv4_only_routers_have_no_ipv6_parts() {
        let config = upstream_config(2);
        assert!(!config.contains("ipv6") && !config.contains("VICTOR_MOBILE6"), "{config}");
        let dual = upstream_config_dual(2, true);
        assert!(dual.contains(&format!("define VICTOR_MOBILE6 = [ {MOBILE6} ];")), "{dual}");
        assert!(dual.contains("neighbor 2001:db8:ff:2::2 as 65010;"), "{dual}");
        assert_eq!(dual.matches("merge paths on;").count(), 2, "an ECMP kernel protocol per family: {dual}");
    }

    #[test]
    fn addressing() {
        assert_eq!((upstream_addr(1), edge_addr(1)), (Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)));
        assert_eq!((upstream_addr(3), edge_addr(3)), (Ipv4Addr::new(203, 0, 113, 9), Ipv4Addr::new(203, 0, 113, 10)));
        assert_eq!(agent_flags(2)[..2], ["--bgp-peer".to_owned(), "203.0.113.5".to_owned()]);
        assert_eq!(
            (upstream_addr6(2), edge_addr6(2)),
            ("2001:db8:ff:2::1".parse().unwrap(), "2001:db8:ff:2::2".parse().unwrap())
        );
    }
}
