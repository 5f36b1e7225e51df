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
//! * [`wire_upstream`] — the links and routes (called by the topology);
//! * [`router_config`] — the BIRD configuration of a border router for VICTOR (docs/bgp.md shows
//!   its output; a test keeps them equal);
//! * [`Bird`] — a BIRD process with its own config, control socket and log in a directory;
//! * [`FibWatch`] — the upstream kernel's route for the mobile prefix as it changes, timestamped;
//! * [`pin_client`] — makes the client's flow hash to a chosen FE (ECMP is per flow).

use std::net::Ipv4Addr;
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
    /// The mobile prefixes: exactly these are accepted from the FEs.
    pub mobile: Vec<String>,
    /// The FEs' AS.
    pub fe_as: u32,
    /// The FEs: protocol name and the agent's address.
    pub fes: Vec<(String, Ipv4Addr)>,
    /// An upstream provider to announce the mobile prefixes to: its address and AS.
    pub provider: Option<(Ipv4Addr, u32)>,
}

/// The BIRD 2 configuration of `c`.
pub fn router_config(c: &RouterConfig) -> String {
    let mut out = format!(
        r#"log {log};
router id {id};

protocol device {{
}}

# The mobile prefixes: exactly these (no more-specifics) are accepted from the FE agents.
define VICTOR_MOBILE = [ {mobile} ];

filter victor_from_fe {{
  if net ~ VICTOR_MOBILE then accept;
  reject;
}}

# One kernel route per prefix with a next hop per announcing FE (ECMP).
protocol kernel {{
  ipv4 {{
    import none;
    export where source = RTS_BGP;
  }};
  merge paths on;
}}

# The FE agents connect (passive) and announce the mobile prefixes while healthy; a session
# that ends (agent stopped, crashed or silent for the hold time) withdraws them at once. After
# an error (e.g. hold timer expired) BIRD refuses the agent for `error wait time` (default 60 s,
# doubling up to 300 s): 1 s, doubling up to 30 s, lets a recovered FE back quickly.
template bgp victor_fe {{
  local as {local_as};
  passive on;
  hold time 9;
  error wait time 1, 30;
  ipv4 {{
    import filter victor_from_fe;
    export none;
  }};
}}
"#,
        log = c.log,
        id = c.router_id,
        mobile = c.mobile.join(", "),
        local_as = c.local_as,
    );
    out.push_str("\n# One protocol per FE agent.\n");
    for (name, addr) in &c.fes {
        out.push_str(&format!("protocol bgp {name} from victor_fe {{ neighbor {addr} as {}; }}\n", c.fe_as));
    }
    if let Some((addr, asn)) = c.provider {
        out.push_str(&format!(
            r#"
# The provider learns the mobile prefixes from this site while at least one FE here announces
# them (path: this AS, then the FEs' AS).
protocol bgp provider {{
  local as {local_as};
  neighbor {addr} as {asn};
  ipv4 {{
    import all;
    export where net ~ VICTOR_MOBILE && bgp_path.last = {fe_as};
  }};
}}
"#,
            local_as = c.local_as,
            fe_as = c.fe_as,
        ));
    }
    out
}

/// The lab upstream's configuration for `fes` FEs.
pub fn upstream_config(fes: usize) -> String {
    router_config(&RouterConfig {
        log: "stderr all".into(),
        router_id: upstream_addr(1),
        local_as: UPSTREAM_AS,
        mobile: vec![MOBILE.into()],
        fe_as: VICTOR_AS,
        fes: (1..=fes).map(|n| (peer_name(n), edge_addr(n))).collect(),
        provider: None,
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

/// The kernel route of one prefix in a namespace at one moment: its gateways (none = no route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FibEvent {
    /// When the change was seen (CLOCK_MONOTONIC ns).
    pub mono_ns: u64,
    /// The next hops, sorted.
    pub gateways: Vec<Ipv4Addr>,
}

/// Follows the kernel route of one prefix (main table) in a namespace through rtnetlink route
/// notifications, timestamping every change: when a router's FIB stops sending traffic to an FE.
pub struct FibWatch {
    events: Arc<Mutex<Vec<FibEvent>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl FibWatch {
    /// Starts watching `prefix` (e.g. `10.10.0.0/16`) in `ns`; the first event is the route as it
    /// is now.
    pub fn start(ns: &NetNs, prefix: &str) -> Result<FibWatch> {
        let net = prefix
            .split_once('/')
            .and_then(|(a, l)| Some((a.parse::<Ipv4Addr>().ok()?, l.parse::<u8>().ok()?)))
            .with_context(|| format!("{prefix:?} is not an IPv4 prefix"))?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, st) = (events.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = ns.spawn_thread("fib-watch", move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let (conn, handle, mut messages) =
                    match rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Route]) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!("netlink route monitor: {e}")));
                            return Ok(());
                        }
                    };
                tokio::spawn(conn);
                // Subscribed first, then the current state: no change can fall in between.
                let dump = RouteMessageBuilder::<Ipv4Addr>::new().build();
                let mut routes = handle.route().get(dump).execute();
                let mut now = Vec::new();
                while let Some(Ok(m)) = routes.next().await {
                    if matches(&m, net) {
                        now = gateways(&m);
                    }
                }
                ev.lock().expect("events").push(FibEvent { mono_ns: monotonic_ns(), gateways: now });
                let _ = ready_tx.send(Ok(()));
                while !st.load(Ordering::Relaxed) {
                    let Ok(next) = tokio::time::timeout(Duration::from_millis(50), messages.next()).await else {
                        continue;
                    };
                    let Some((msg, _)) = next else { break };
                    let at = monotonic_ns();
                    let gw = match msg.payload {
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) if matches(&m, net) => {
                            gateways(&m)
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(m)) if matches(&m, net) => {
                            Vec::new()
                        }
                        _ => continue,
                    };
                    ev.lock().expect("events").push(FibEvent { mono_ns: at, gateways: gw });
                }
                Ok(())
            })
        })?;
        ready_rx.recv().context("route monitor thread died")??;
        Ok(FibWatch { events, stop, thread: Some(thread) })
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<FibEvent> {
        self.events.lock().expect("events").clone()
    }

    /// The current gateways.
    pub fn gateways(&self) -> Vec<Ipv4Addr> {
        self.events.lock().expect("events").last().map(|e| e.gateways.clone()).unwrap_or_default()
    }

    /// Waits for the first event at or after `since` (monotonic ns) whose gateways satisfy
    /// `check` (also an event from before `since` if it is the current state).
    pub fn wait_for(
        &self,
        what: &str,
        since: u64,
        timeout: Duration,
        check: impl Fn(&[Ipv4Addr]) -> bool,
    ) -> Result<FibEvent> {
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

impl Drop for FibWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn matches(m: &RouteMessage, (network, len): (Ipv4Addr, u8)) -> bool {
    let table = m
        .attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(m.header.table));
    table == 254
        && m.header.destination_prefix_length == len
        && m.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == network))
}

fn gateways(m: &RouteMessage) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for a in &m.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => out.push(*g),
            RouteAttribute::MultiPath(hops) => {
                for hop in hops {
                    for h in &hop.attributes {
                        if let RouteAttribute::Gateway(RouteAddress::Inet(g)) = h {
                            out.push(*g);
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

    /// The sample of docs/bgp.md: a border router with two FEs and a provider.
    fn docs_sample() -> RouterConfig {
        RouterConfig {
            log: "syslog all".into(),
            router_id: Ipv4Addr::new(192, 0, 2, 254),
            local_as: 64500,
            mobile: vec!["10.10.0.0/16".into(), "10.20.0.0/16".into()],
            fe_as: 65010,
            fes: vec![("fe1".into(), Ipv4Addr::new(203, 0, 113, 2)), ("fe2".into(), Ipv4Addr::new(203, 0, 113, 6))],
            provider: Some((Ipv4Addr::new(198, 18, 0, 1), 64496)),
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
        assert!(check_config("protocol bgp {").is_err());
    }

    #[test]
    fn addressing() {
        assert_eq!((upstream_addr(1), edge_addr(1)), (Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)));
        assert_eq!((upstream_addr(3), edge_addr(3)), (Ipv4Addr::new(203, 0, 113, 9), Ipv4Addr::new(203, 0, 113, 10)));
        assert_eq!(agent_flags(2)[..2], ["--bgp-peer".to_owned(), "203.0.113.5".to_owned()]);
    }
}
