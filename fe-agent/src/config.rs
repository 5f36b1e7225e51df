//! Agent configuration: command-line flags, `VICTOR_*` environment variables and an optional TOML
//! file, in that order of precedence (flag > env > file > default) — the controller's scheme: the
//! file's keys are the long flag names and are turned into arguments placed before the real ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;
pub use victor_daemon::{ConfigError, LogFormat};
use victor_proto::Mac;

use crate::advertise::AdvertiseConfig;
use crate::clock::WallClock;
use crate::codec::bgp::Community;
use crate::codec::hint::Keys;
pub use crate::forwarding::DataplaneMode;
use crate::hint::HintConfig;

/// The route protocol number stamped on every route and neighbour the agent creates (see
/// `/etc/iproute2/rt_protos`: 158 is unassigned; BGP daemons use 186, zebra 11, OSPF 188).
pub const DEFAULT_ROUTE_PROTOCOL: u8 = 158;

/// The default UDP port of move hints. Chosen away from the underlay's usual UDP ports: VXLAN
/// (4789), VXLAN-GPE (4790), RoCEv2 (4791, which RDMA NICs may consume in hardware), Geneve
/// (6081), BFD (3784/4784).
pub const DEFAULT_MOVE_HINT_PORT: u16 = 4796;

/// victor-fe-agent: the VICTOR forwarding-element agent.
///
/// Learns the VMs behind this FE from ARP on its VM-facing ports and reports them to the
/// controller; receives every binding (VM IP → FE) as a stream and programs the kernel and the
/// IP-in-IP data plane so that local VMs get a host route, remote VMs a tunnel to their FE and
/// unbound addresses are dropped. Keeps forwarding on its last state when no controller answers.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "victor-fe-agent", version, about, long_about = None, args_override_self = true)]
pub struct Config {
    /// TOML file with any of these options (keys are the long flag names, e.g.
    /// `fe-id = "fe1"`, `vm-port = ["vm0", "vm1"]`). Flags and environment variables override it.
    #[arg(long, env = "VICTOR_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Controller gRPC endpoints, comma separated (e.g. http://10.0.0.1:50051,http://10.0.0.2:50051).
    /// The agent uses one at a time and fails over to the next when it stops answering.
    #[arg(long, env = "VICTOR_CONTROLLER", value_delimiter = ',', required = true, value_name = "URL,...")]
    pub controller: Vec<String>,

    /// Network namespace (a path such as /proc/1/ns/net or /run/netns/mgmt) in which the
    /// controller connections are opened. Lets an agent that runs inside an FE namespace reach a
    /// controller on the host's loopback. Default: the agent's own namespace.
    #[arg(long, env = "VICTOR_CONTROLLER_NETNS", value_name = "PATH")]
    pub controller_netns: Option<PathBuf>,

    /// CA certificate (PEM) that signs the controllers' server certificates. Enables TLS
    /// (addresses become https://). Without it the controller link is plaintext (lab only).
    #[arg(long, env = "VICTOR_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// This FE's client certificate (PEM) for mutual TLS; it must name the FE as the DNS
    /// subject alternative name `<fe-id>.fe.victor` (with --key-file).
    #[arg(long, env = "VICTOR_CERT_FILE", value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// The client certificate's private key (PEM) (with --cert-file).
    #[arg(long, env = "VICTOR_KEY_FILE", value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,

    /// Name to verify in the controllers' server certificates (default: each address's host).
    #[arg(long, env = "VICTOR_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// This FE's identifier (letters, digits, '-', '_', '.'; at most 63 bytes).
    #[arg(long, env = "VICTOR_FE_ID")]
    pub fe_id: String,

    /// The site (data centre) of this FE, used by the controller's site policies.
    #[arg(long, env = "VICTOR_SITE", default_value = "default")]
    pub site: String,

    /// This FE's underlay IPv4 address: outer source of the tunnels it sends and the address
    /// other FEs tunnel to. Must be configured on an interface of this host.
    #[arg(long, env = "VICTOR_UNDERLAY_ADDR")]
    pub underlay_addr: Ipv4Addr,

    /// The underlay interface (for the underlay MTU). Default: the interface that carries
    /// --underlay-addr.
    #[arg(long, env = "VICTOR_UNDERLAY_DEV", value_name = "IFNAME")]
    pub underlay_dev: Option<String>,

    /// Underlay MTU; the tunnel MTU is 20 bytes less. Default: the MTU of the underlay interface.
    #[arg(long, env = "VICTOR_UNDERLAY_MTU")]
    pub underlay_mtu: Option<u16>,

    /// A VM-facing interface (repeatable; env: comma separated). A trailing `*` matches a name
    /// prefix (`vm*`). Ports may appear and disappear while the agent runs (VM links moving in
    /// and out); ARP is learned and answered only on them.
    #[arg(long = "vm-port", env = "VICTOR_VM_PORT", value_delimiter = ',', required = true, value_name = "IFNAME")]
    pub vm_ports: Vec<String>,

    /// A mobile VM prefix this FE serves (repeatable; env: comma separated). Routed into the data
    /// plane; only VMs inside it are learned. Must lie inside the controller's mobile prefixes.
    /// IPv4 or IPv6; the IPv6 ones are announced by BGP (--bgp-peer) next to the IPv4 ones. At
    /// least one must be IPv4.
    #[arg(long = "mobile-prefix", env = "VICTOR_MOBILE_PREFIX", value_delimiter = ',', required = true)]
    #[serde(skip)]
    pub mobile_prefix: Vec<IpNet>,

    /// The IPv4 prefixes of --mobile-prefix.
    #[arg(skip)]
    pub mobile_prefixes: Vec<Ipv4Net>,

    /// The IPv6 prefixes of --mobile-prefix.
    #[arg(skip)]
    pub mobile_prefixes6: Vec<Ipv6Net>,

    /// A default-gateway address of the VMs (repeatable; env: comma separated), e.g. 10.10.0.1 or
    /// fd00:10::1. The agent answers ARP (IPv4) or Neighbor Solicitations (IPv6, router flag) for
    /// it on VM ports and announces it (gratuitous ARP, unsolicited Neighbor Advertisement) on the
    /// port of every VM that arrives here.
    #[arg(long = "gateway", env = "VICTOR_GATEWAY", value_delimiter = ',', value_name = "IP")]
    pub gateways: Vec<IpAddr>,

    /// A virtual router MAC set on every VM port (the same on every FE, like EVPN's anycast
    /// gateway MAC), so a VM keeps a valid gateway MAC in its ARP cache when it moves to another
    /// FE. Without it each port keeps its own MAC and a moved VM relies on the gratuitous ARP for
    /// the gateway the agent sends after the move.
    #[arg(long, env = "VICTOR_GATEWAY_MAC", value_name = "MAC")]
    #[serde(serialize_with = "ser_display_opt")]
    pub gateway_mac: Option<Mac>,

    /// IP-in-IP implementation: auto (the kernel's ipip if the module is loaded or can be loaded,
    /// else tun), tun (userspace forwarder), kernel (refuses to start without ipip).
    #[arg(long, env = "VICTOR_DATAPLANE", value_enum, default_value = "auto")]
    pub dataplane: DataplaneMode,

    /// Name of the TUN device of the userspace data plane, or of the kernel data plane's catch-all
    /// ipip device (at most 15 bytes).
    #[arg(long, env = "VICTOR_TUN_NAME", default_value = "victor0")]
    pub tun_name: String,

    /// Decommissioning: on SIGTERM/SIGINT, remove everything the data plane keeps in the kernel
    /// across restarts — the persistent TUN device (userspace) or the ipip devices (kernel), their
    /// routes, and the agent's routes and neighbour entries on the VM ports — before exiting.
    /// Without it a stopped agent leaves all of it for the next run to adopt (see "Restarts" in
    /// the README). Not applied when the agent ends on an error.
    #[arg(long, env = "VICTOR_REMOVE_DATAPLANE_ON_EXIT")]
    pub remove_dataplane_on_exit: bool,

    /// Userspace data plane: how long the standby forwarder (the process that forwards while no
    /// agent runs, see "Restarts" in the README) keeps forwarding after the agent stopped or died
    /// without a new agent taking over.
    #[arg(long, env = "VICTOR_STANDBY_HOLD", default_value = "2m", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub standby_hold: Duration,

    /// Address of the HTTP admin server (/healthz, /readyz, /metrics, /debug/events).
    #[arg(long, env = "VICTOR_HTTP_LISTEN", default_value = "127.0.0.1:9180")]
    pub http_listen: SocketAddr,

    /// Route protocol number on every route and neighbour entry the agent creates; the agent
    /// only ever reads back and changes objects carrying it. Pick one no other daemon uses.
    #[arg(long, env = "VICTOR_ROUTE_PROTOCOL", default_value_t = DEFAULT_ROUTE_PROTOCOL)]
    pub route_protocol: u8,

    /// Probe a local VM (ARP request; IPv6: NUD Neighbor Solicitation) after it has been silent
    /// this long.
    #[arg(long, env = "VICTOR_ARP_PROBE_AFTER", default_value = "30s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub arp_probe_after: Duration,

    /// Interval between probes (ARP, NDP) of a silent VM.
    #[arg(long, env = "VICTOR_ARP_PROBE_INTERVAL", default_value = "1s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub arp_probe_interval: Duration,

    /// Unanswered probes after which a VM is reported gone.
    #[arg(long, env = "VICTOR_ARP_PROBE_COUNT", default_value_t = 3)]
    pub arp_probe_count: u32,

    /// ARP frames per second accepted from one source (MAC, IP) on a VM port; more is dropped
    /// and counted (storm protection), never forwarded to the controller.
    #[arg(long, env = "VICTOR_ARP_RATE", default_value_t = 20)]
    pub arp_rate: u32,

    /// Burst of ARP frames accepted from one source before --arp-rate applies.
    #[arg(long, env = "VICTOR_ARP_BURST", default_value_t = 40)]
    pub arp_burst: u32,

    /// Connect timeout towards one controller endpoint.
    #[arg(long, env = "VICTOR_CONNECT_TIMEOUT", default_value = "500ms", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub connect_timeout: Duration,

    /// A stream silent this long is dead (the controller sends a heartbeat every second);
    /// the agent fails over to the next endpoint.
    #[arg(long, env = "VICTOR_STREAM_TIMEOUT", default_value = "1500ms", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub stream_timeout: Duration,

    /// /readyz stays ready this long after the agent lost every controller (it keeps
    /// forwarding on its last state meanwhile).
    #[arg(long, env = "VICTOR_HEADLESS_GRACE", default_value = "5m", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub headless_grace: Duration,

    /// A BGP router to announce the mobile prefixes to (repeatable; env: comma separated): an
    /// IPv4 or IPv6 address, with a port as `IPv4:PORT` or `[IPv6]:PORT` (default 179). The agent
    /// connects to it, announces every --mobile-prefix (IPv4 and IPv6, each family if the router
    /// negotiates it) with itself as next hop while this FE is healthy, and withdraws them when it
    /// is not (see docs/bgp.md). Without it the agent announces nothing.
    #[arg(long = "bgp-peer", env = "VICTOR_BGP_PEER", value_delimiter = ',', value_parser = parse_peer, value_name = "IP[:PORT]")]
    pub bgp_peers: Vec<SocketAddr>,

    /// This FE's AS number for BGP (with --bgp-peer). Use the same on every FE: the mobile
    /// prefixes then have one origin AS everywhere, as multi-homing expects.
    #[arg(long, env = "VICTOR_BGP_LOCAL_AS", value_name = "ASN")]
    pub bgp_local_as: Option<u32>,

    /// The routers' AS number (with --bgp-peer). Equal to --bgp-local-as = iBGP (empty AS path,
    /// LOCAL_PREF 100); different = eBGP (our AS in the path).
    #[arg(long, env = "VICTOR_BGP_PEER_AS", value_name = "ASN")]
    pub bgp_peer_as: Option<u32>,

    /// BGP identifier. Default: --underlay-addr.
    #[arg(long, env = "VICTOR_BGP_ROUTER_ID", value_name = "IP")]
    pub bgp_router_id: Option<Ipv4Addr>,

    /// NEXT_HOP of the announced IPv4 prefixes. Default: this FE's IPv4 address on each BGP
    /// session (next-hop self), which is where the router should send the traffic; on an IPv6
    /// session, the IPv4 address of the interface that carries it.
    #[arg(long, env = "VICTOR_BGP_NEXT_HOP", value_name = "IP")]
    pub bgp_next_hop: Option<Ipv4Addr>,

    /// Next hop of the announced IPv6 prefixes (a global address). Default: this FE's global IPv6
    /// address on each BGP session (the session's own address on an IPv6 session, else the
    /// global IPv6 address of the interface that carries it), plus that interface's link-local
    /// address when the router is on the same link (RFC 2545). A session without one announces
    /// no IPv6 prefixes.
    #[arg(long, env = "VICTOR_BGP_NEXT_HOP6", value_name = "IPV6")]
    pub bgp_next_hop6: Option<Ipv6Addr>,

    /// BGP hold time proposed to the routers (0 or at least 3 s; the smaller of both sides
    /// applies). A hung agent is withdrawn by the router after this long.
    #[arg(long, env = "VICTOR_BGP_HOLD_TIME", default_value = "9s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub bgp_hold_time: Duration,

    /// A community to attach to the announced prefixes (repeatable; env: comma separated), e.g.
    /// 65010:100, for the routers' policies.
    #[arg(long = "bgp-community", env = "VICTOR_BGP_COMMUNITY", value_delimiter = ',', value_name = "ASN:VALUE")]
    pub bgp_communities: Vec<Community>,

    /// On SIGTERM/SIGINT the agent withdraws the prefixes first, then keeps forwarding this long
    /// (while the routers move the traffic to other FEs) before it exits.
    #[arg(long, env = "VICTOR_BGP_SHUTDOWN_DRAIN", default_value = "1s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub bgp_shutdown_drain: Duration,

    /// Enables move hints: a file with the cluster-wide hint key(s), one per line as hex (at
    /// least 16 bytes; e.g. `openssl rand -hex 32`; keep it readable by the agent only). With it,
    /// an FE that takes over a VM tells the other FEs directly (UDP over the underlay,
    /// HMAC-SHA256 with the first key; every key in the file is accepted, for rotation), and
    /// they point the VM at it before the controller's update arrives, until that update (or a
    /// timeout) decides. Every FE needs the same keys. Without it hints are off.
    #[arg(long, env = "VICTOR_MOVE_HINT_KEY_FILE", value_name = "FILE")]
    pub move_hint_key_file: Option<PathBuf>,

    /// UDP port for move hints on every FE's underlay address (the same on every FE; allow it
    /// between the FEs' underlay addresses).
    #[arg(long, env = "VICTOR_MOVE_HINT_PORT", default_value_t = DEFAULT_MOVE_HINT_PORT)]
    pub move_hint_port: u16,

    /// A move hint's effect ends after this long unless the controller confirmed the move (the
    /// VM is then forwarded by the controller's state again).
    #[arg(long, env = "VICTOR_MOVE_HINT_TIMEOUT", default_value = "1s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub move_hint_timeout: Duration,

    /// Replay window: hints sent longer ago than this (by the sender's clock, which must be
    /// NTP-synchronised) are refused, as are repeated ones inside it.
    #[arg(long, env = "VICTOR_MOVE_HINT_MAX_AGE", default_value = "2s", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub move_hint_max_age: Duration,

    /// Move hints accepted per second from one FE (also the burst); more are dropped and counted
    /// (those moves take the controller's path).
    #[arg(long, env = "VICTOR_MOVE_HINT_RATE", default_value_t = 1000)]
    pub move_hint_rate: u32,

    /// Announced migrations (userspace data plane): when a VM announced to move here becomes
    /// local, the copies of its packets the old FE sent that arrived at most this long before are
    /// delivered; older ones are dropped (the VM had them before it stopped). Longer recovers
    /// more of the VM's pause and duplicates more when the pause is short; 0 delivers none.
    #[arg(long, env = "VICTOR_MIGRATION_HOLD", default_value = "5ms", value_parser = victor_daemon::duration::parse)]
    #[serde(serialize_with = "victor_daemon::duration::serialize")]
    pub migration_hold: Duration,

    /// Testing aid: shifts every wall-clock time this agent stamps — observation times
    /// (including the kernel's ARP capture times), GONE times, move-hint send and receive times —
    /// by this much, e.g. `-5s` or `+5s`. The lab uses it to run FEs whose clocks disagree (the
    /// kernel's capture times escape libfaketime); nothing in VICTOR compares two FEs' clocks.
    /// Leave it at 0s in production.
    #[arg(
        long,
        env = "VICTOR_CLOCK_OFFSET",
        default_value = "0s",
        value_parser = parse_clock_offset,
        allow_hyphen_values = true,
        value_name = "[+|-]DURATION"
    )]
    #[serde(serialize_with = "serialize_clock_offset")]
    pub clock_offset: i64,

    /// Log format.
    #[arg(long, env = "VICTOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info,victor_fe_agent=debug`).
    #[arg(long, env = "VICTOR_LOG", default_value = "info")]
    pub log: String,

    /// Validate the configuration, print it as JSON and exit (0 = valid) without starting.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
}

impl Config {
    /// Parses the process arguments, merging the config file named by `--config`/`VICTOR_CONFIG`.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(victor_daemon::config_file::process_args())
    }

    /// Parses `args` (including the program name), merging the config file if any.
    pub fn load_from(args: Vec<String>) -> Result<Config, ConfigError> {
        let mut config = Config::try_parse_from(victor_daemon::config_file::merge(args)?)?;
        config.split_mobile_prefixes();
        config.validate()?;
        Ok(config)
    }

    /// The IPv4 addresses of --gateway.
    pub fn gateways_v4(&self) -> Vec<Ipv4Addr> {
        self.gateways.iter().filter_map(|g| if let IpAddr::V4(a) = g { Some(*a) } else { None }).collect()
    }

    /// The IPv6 addresses of --gateway.
    pub fn gateways_v6(&self) -> Vec<Ipv6Addr> {
        self.gateways.iter().filter_map(|g| if let IpAddr::V6(a) = g { Some(*a) } else { None }).collect()
    }

    /// Fills [`Config::mobile_prefixes`] and [`Config::mobile_prefixes6`] from --mobile-prefix.
    fn split_mobile_prefixes(&mut self) {
        self.mobile_prefixes.clear();
        self.mobile_prefixes6.clear();
        for p in &self.mobile_prefix {
            match p {
                IpNet::V4(p) => self.mobile_prefixes.push(*p),
                IpNet::V6(p) => self.mobile_prefixes6.push(*p),
            }
        }
    }

    /// The client TLS files (all `None` = plaintext).
    pub fn tls_files(&self) -> victor_proto::tls::ClientTlsFiles {
        victor_proto::tls::ClientTlsFiles {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }

    /// The controller endpoints with TLS applied (reads the TLS files).
    pub fn controller_endpoints(&self) -> Result<Vec<tonic::transport::Endpoint>, String> {
        let tls = self.tls_files().load().map_err(|e| e.to_string())?;
        self.controller
            .iter()
            .map(|address| {
                victor_proto::tls::endpoint(address, tls.as_ref(), self.connect_timeout)
                    .map_err(|e| format!("--controller entry {address:?}: {e}"))
            })
            .collect()
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Err(e) = self.controller_endpoints() {
            return bad(e);
        }
        let id_ok = |s: &str| {
            !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !id_ok(&self.fe_id) {
            return bad(format!("--fe-id {:?} must be 1-63 letters, digits, '-', '_' or '.'", self.fe_id));
        }
        if !id_ok(&self.site) {
            return bad(format!("--site {:?} must be 1-63 letters, digits, '-', '_' or '.'", self.site));
        }
        let ul = self.underlay_addr;
        if ul.is_unspecified() || ul.is_multicast() || ul.is_broadcast() || ul.is_loopback() {
            return bad(format!("--underlay-addr {ul} cannot be a tunnel endpoint; use this FE's underlay IPv4"));
        }
        if let Some(a) = self.mobile_prefix.iter().find(|a| a.trunc() != **a) {
            return bad(format!("--mobile-prefix {a} has host bits set; did you mean {}?", a.trunc()));
        }
        for (i, a) in self.mobile_prefix.iter().enumerate() {
            for b in &self.mobile_prefix[i + 1..] {
                if a.contains(b) || b.contains(a) {
                    return bad(format!("--mobile-prefix {a} and {b} overlap; give each range once"));
                }
            }
        }
        if self.mobile_prefixes.is_empty() {
            return bad(format!(
                "--mobile-prefix {} has no IPv4 prefix; give at least one (IPv6 prefixes are announced by BGP \
                 next to the IPv4 ones)",
                self.mobile_prefixes6.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            ));
        }
        for a in &self.mobile_prefixes {
            if a.contains(&ul) {
                return bad(format!(
                    "--underlay-addr {ul} lies inside --mobile-prefix {a}; the underlay must be outside"
                ));
            }
        }
        for port in &self.vm_ports {
            let name = port.strip_suffix('*').unwrap_or(port);
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '*']) {
                return bad(format!(
                    "--vm-port {port:?} must be an interface name (≤ 15 bytes) or a prefix ending in '*'"
                ));
            }
        }
        for gw in &self.gateways {
            if !self.mobile_prefix.iter().any(|p| p.contains(gw)) {
                return bad(format!(
                    "--gateway {gw} is outside every --mobile-prefix; the VMs' gateway must be in their subnet"
                ));
            }
        }
        if let Some(mac) = self.gateway_mac
            && !mac.is_unicast()
        {
            return bad(format!("--gateway-mac {mac} must be a unicast MAC (e.g. 02:00:5e:10:00:01)"));
        }
        if self.tun_name.is_empty() || self.tun_name.len() > 15 {
            return bad(format!("--tun-name {:?} must be 1..=15 bytes", self.tun_name));
        }
        if let Some(mtu) = self.underlay_mtu
            && mtu < 88
        {
            return bad(format!("--underlay-mtu {mtu} is too small (at least 88: 68 + the 20-byte outer header)"));
        }
        if matches!(self.route_protocol, 0..=4 | 255) {
            return bad(format!(
                "--route-protocol {} is reserved by the kernel (0-4) or invalid; use e.g. 158",
                self.route_protocol
            ));
        }
        if self.arp_probe_count == 0 || self.arp_rate == 0 || self.arp_burst == 0 {
            return bad("--arp-probe-count, --arp-rate and --arp-burst must be at least 1".into());
        }
        if self.stream_timeout < Duration::from_millis(1100) {
            return bad(format!(
                "--stream-timeout {:?} is shorter than the controller's 1 s heartbeat; use at least 1100ms",
                self.stream_timeout
            ));
        }
        if let Some(ns) = &self.controller_netns
            && !ns.exists()
        {
            return bad(format!("--controller-netns {} does not exist", ns.display()));
        }
        if self.migration_hold > Duration::from_secs(1) {
            return bad(format!(
                "--migration-hold {:?} is too long: held packets older than a second are stale; use at most 1s (default 5ms)",
                self.migration_hold
            ));
        }
        self.move_hints().map_err(ConfigError::Invalid)?;
        self.validate_bgp()
    }

    /// The move-hint settings (reads the key file), None when hints are off.
    pub fn move_hints(&self) -> Result<Option<HintConfig>, String> {
        let Some(path) = &self.move_hint_key_file else { return Ok(None) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--move-hint-key-file {}: cannot read it: {e}", path.display()))?;
        let keys = Keys::parse(&text).map_err(|e| format!("--move-hint-key-file {}: {e}", path.display()))?;
        if self.move_hint_port == 0 {
            return Err("--move-hint-port 0 is not a port; use the same fixed port on every FE (e.g. 4796)".into());
        }
        let timeout = self.move_hint_timeout;
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&timeout) {
            return Err(format!("--move-hint-timeout {timeout:?} must be between 10ms and 60s (e.g. 1s)"));
        }
        let max_age = self.move_hint_max_age;
        if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&max_age) {
            return Err(format!("--move-hint-max-age {max_age:?} must be between 100ms and 5m (e.g. 2s)"));
        }
        if self.move_hint_rate == 0 {
            return Err("--move-hint-rate must be at least 1".into());
        }
        Ok(Some(HintConfig {
            keys,
            port: self.move_hint_port,
            timeout_ns: timeout.as_nanos() as u64,
            max_age_ns: max_age.as_nanos() as u64,
            rate: self.move_hint_rate,
            clock: self.clock(),
        }))
    }

    /// The agent's wall clock (`--clock-offset`).
    pub fn clock(&self) -> WallClock {
        WallClock::with_offset(self.clock_offset)
    }

    fn validate_bgp(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let (Some(local), Some(peer)) = (self.bgp_local_as, self.bgp_peer_as) else {
            if !self.bgp_peers.is_empty() {
                return bad("--bgp-peer needs --bgp-local-as and --bgp-peer-as".into());
            }
            return Ok(());
        };
        for (flag, asn) in [("--bgp-local-as", local), ("--bgp-peer-as", peer)] {
            if matches!(asn, 0 | 23456 | 65535 | 4_294_967_295) {
                return bad(format!("{flag} {asn} is reserved; use a public AS or a private one (64512-65534)"));
            }
        }
        let hold = self.bgp_hold_time;
        if hold.subsec_nanos() != 0 || (hold.as_secs() != 0 && !(3..=65535).contains(&hold.as_secs())) {
            return bad(format!("--bgp-hold-time {hold:?} must be 0 or whole seconds from 3s to 65535s"));
        }
        let link_local = |a: &Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
        for (flag, addr) in self
            .bgp_peers
            .iter()
            .map(|p| ("--bgp-peer", p.ip()))
            .chain(self.bgp_next_hop.map(|n| ("--bgp-next-hop", IpAddr::V4(n))))
            .chain(self.bgp_next_hop6.map(|n| ("--bgp-next-hop6", IpAddr::V6(n))))
        {
            let unicast = match addr {
                IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
                IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast() || a.is_loopback()),
            };
            if !unicast {
                return bad(format!("{flag} {addr} is not a unicast address"));
            }
            if let IpAddr::V6(a) = addr
                && link_local(&a)
            {
                return bad(format!(
                    "{flag} {addr} is link-local; give a global address (the agent adds the link-local next hop itself)"
                ));
            }
            if let Some(p) = self.mobile_prefix.iter().find(|p| p.contains(&addr)) {
                return bad(format!("{flag} {addr} lies inside --mobile-prefix {p}; it must be outside"));
            }
        }
        if self.bgp_router_id.is_some_and(|r| r.is_unspecified()) {
            return bad("--bgp-router-id 0.0.0.0 is invalid; use this FE's IPv4 address".into());
        }
        Ok(())
    }

    /// The advertiser's configuration, if BGP is configured (`--bgp-peer`).
    pub fn advertise(&self) -> Option<AdvertiseConfig> {
        if self.bgp_peers.is_empty() {
            return None;
        }
        Some(AdvertiseConfig {
            peers: self.bgp_peers.clone(),
            local_as: self.bgp_local_as?,
            peer_as: self.bgp_peer_as?,
            router_id: self.bgp_router_id.unwrap_or(self.underlay_addr),
            hold_time: u16::try_from(self.bgp_hold_time.as_secs()).unwrap_or(u16::MAX),
            next_hop: self.bgp_next_hop,
            next_hop6: self.bgp_next_hop6,
            communities: self.bgp_communities.clone(),
            prefixes: self.mobile_prefixes.clone(),
            prefixes6: self.mobile_prefixes6.clone(),
        })
    }

    /// True if `ifname` is one of the configured VM ports.
    pub fn is_vm_port(&self, ifname: &str) -> bool {
        self.vm_ports.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => ifname.starts_with(prefix),
            None => p == ifname,
        })
    }
}

/// Parses a BGP router address: `IP` (port 179), `IPv4:PORT` or `[IPv6]:PORT`.
fn parse_peer(text: &str) -> Result<SocketAddr, String> {
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 179));
    }
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not IP, IPv4:PORT or [IPv6]:PORT (e.g. 203.0.113.1, 203.0.113.1:1179, 2001:db8::1 or \
             [2001:db8::1]:1179)"
        )
    })
}

fn ser_display_opt<S: serde::Serializer, T: std::fmt::Display>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&v.to_string()),
        None => s.serialize_none(),
    }
}

victor_daemon::impl_daemon_config!(Config);

/// Parses `--clock-offset`: a duration with an optional sign (`-5s`, `+250ms`), in ns.
pub fn parse_clock_offset(text: &str) -> Result<i64, String> {
    let (sign, magnitude) = match text.trim().as_bytes().first() {
        Some(b'-') => (-1, &text.trim()[1..]),
        Some(b'+') => (1, &text.trim()[1..]),
        _ => (1, text.trim()),
    };
    let d = victor_daemon::duration::parse(magnitude)?;
    let ns = i64::try_from(d.as_nanos()).map_err(|_| format!("{text} is too large"))?;
    Ok(sign * ns)
}

fn serialize_clock_offset<S: serde::Serializer>(ns: &i64, s: S) -> Result<S::Ok, S::Error> {
    let (sign, n) = (if *ns < 0 { "-" } else { "" }, ns.unsigned_abs());
    let text = match n {
        _ if n % 1_000_000_000 == 0 => format!("{sign}{}s", n / 1_000_000_000),
        _ if n % 1_000_000 == 0 => format!("{sign}{}ms", n / 1_000_000),
        _ => format!("{sign}{n}ns"),
    };
    s.serialize_str(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[&str] = &[
        "--controller",
        "http://127.0.0.1:50051",
        "--fe-id",
        "fe1",
        "--underlay-addr",
        "198.51.100.1",
        "--vm-port",
        "vm0",
        "--mobile-prefix",
        "10.10.0.0/16",
    ];

    fn load(extra: &[&str]) -> Result<Config, ConfigError> {
        let args = std::iter::once("victor-fe-agent").chain(BASE.iter().copied()).chain(extra.iter().copied());
        Config::load_from(args.map(String::from).collect())
    }

    #[test]
    fn defaults() {
        let c = load(&[]).unwrap();
        assert_eq!(c.dataplane, DataplaneMode::Auto);
        assert_eq!(c.route_protocol, 158);
        assert_eq!(c.tun_name, "victor0");
        assert!(!c.remove_dataplane_on_exit);
        assert_eq!(c.stream_timeout, Duration::from_millis(1500));
        assert!(c.is_vm_port("vm0") && !c.is_vm_port("vm01"));
        assert_eq!(c.migration_hold, Duration::from_millis(5));
        assert_eq!(load(&["--migration-hold", "20ms"]).unwrap().migration_hold, Duration::from_millis(20));
        let err = load(&["--migration-hold", "2s"]).unwrap_err().to_string();
        assert!(err.contains("--migration-hold 2s is too long"), "{err}");
    }

    #[test]
    fn repeatable_and_wildcard_ports() {
        let c = load(&["--vm-port", "tap*", "--gateway", "10.10.0.1", "--gateway-mac", "02:00:5e:10:00:01"]).unwrap();
        assert!(c.is_vm_port("tap17") && c.is_vm_port("vm0") && !c.is_vm_port("eth0"));
        assert_eq!(c.gateways, vec![IpAddr::V4(Ipv4Addr::new(10, 10, 0, 1))]);
        assert_eq!(c.gateway_mac.unwrap().to_string(), "02:00:5e:10:00:01");
    }

    #[test]
    fn ipv6_gateways_need_an_ipv6_mobile_prefix() {
        let c = load(&["--mobile-prefix", "fd00:10::/64", "--gateway", "10.10.0.1,fd00:10::1"]).unwrap();
        assert_eq!(c.gateways_v4(), vec![Ipv4Addr::new(10, 10, 0, 1)]);
        assert_eq!(c.gateways_v6(), vec!["fd00:10::1".parse::<Ipv6Addr>().unwrap()]);
        let err = load(&["--gateway", "fd00:10::1"]).unwrap_err().to_string();
        assert!(err.contains("--gateway fd00:10::1 is outside every --mobile-prefix"), "{err}");
    }

    #[test]
    fn bad_values_say_what_to_fix() {
        for (extra, needle) in [
            (&["--mobile-prefix", "10.10.0.1/16"][..], "did you mean 10.10.0.0/16"),
            (&["--gateway", "192.0.2.1"][..], "outside every --mobile-prefix"),
            (&["--gateway-mac", "01:00:5e:00:00:01"][..], "unicast"),
            (&["--route-protocol", "2"][..], "reserved"),
            (&["--stream-timeout", "500ms"][..], "heartbeat"),
            (&["--controller", "ftp://127.0.0.1:50051"][..], "unknown scheme"),
            (&["--fe-id", "fe 1"][..], "--fe-id"),
            (&["--underlay-addr", "10.10.3.3"][..], "inside --mobile-prefix"),
        ] {
            let err = load(extra).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
    }

    #[test]
    fn bgp_flags() {
        assert!(load(&[]).unwrap().advertise().is_none(), "no --bgp-peer, no advertiser");
        let c = load(&[
            "--bgp-peer",
            "203.0.113.1,203.0.113.5:1179",
            "--bgp-local-as",
            "65010",
            "--bgp-peer-as",
            "65000",
            "--bgp-community",
            "65010:100",
        ])
        .unwrap();
        let a = c.advertise().unwrap();
        assert_eq!(a.peers, vec!["203.0.113.1:179".parse().unwrap(), "203.0.113.5:1179".parse().unwrap()]);
        assert_eq!((a.local_as, a.peer_as, a.hold_time), (65010, 65000, 9));
        assert_eq!(a.router_id, c.underlay_addr);
        assert_eq!(a.prefixes, c.mobile_prefixes);
        assert!(a.prefixes6.is_empty() && a.next_hop6.is_none());
        assert_eq!(a.communities[0].to_string(), "65010:100");
        assert_eq!(c.bgp_shutdown_drain, Duration::from_secs(1));
        let bgp = ["--bgp-peer", "203.0.113.1", "--bgp-local-as", "65010", "--bgp-peer-as", "65000"];
        let err = load(&["--bgp-peer", "203.0.113.1", "--bgp-local-as", "65010"]).unwrap_err().to_string();
        assert!(err.contains("needs --bgp-local-as and --bgp-peer-as"), "{err}");
        for (extra, needle) in [
            (&["--bgp-hold-time", "2s"][..], "--bgp-hold-time"),
            (&["--bgp-hold-time", "3500ms"][..], "whole seconds"),
            (&["--bgp-local-as", "23456"][..], "reserved"),
            (&["--bgp-next-hop", "10.10.0.1"][..], "inside --mobile-prefix"),
            (&["--bgp-peer", "0.0.0.0"][..], "not a unicast address"),
            (&["--bgp-peer", "ff02::1"][..], "not a unicast address"),
            (&["--bgp-peer", "fe80::1"][..], "link-local"),
            (&["--bgp-next-hop6", "fe80::2"][..], "link-local"),
            (&["--bgp-next-hop6", "::"][..], "not a unicast address"),
            (&["--mobile-prefix", "2001:db8:a::/48", "--bgp-next-hop6", "2001:db8:a::1"][..], "inside --mobile-prefix"),
        ] {
            let args: Vec<&str> = bgp.iter().copied().chain(extra.iter().copied()).collect();
            let err = load(&args).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
        for bad in [&["--bgp-peer", "router1"][..], &["--bgp-community", "65010"][..]] {
            let args: Vec<&str> = bgp.iter().copied().chain(bad.iter().copied()).collect();
            assert!(load(&args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipv6_mobile_prefixes_and_bgp_peers() {
        let c = load(&[
            "--mobile-prefix",
            "2001:db8:a::/48,2001:db8:b::/48",
            "--bgp-peer",
            "2001:db8:ff:1::1,[2001:db8:ff:2::1]:1179,203.0.113.1",
            "--bgp-local-as",
            "65010",
            "--bgp-peer-as",
            "65000",
            "--bgp-next-hop6",
            "2001:db8:ff::9",
        ])
        .unwrap();
        // The rest of the agent sees the IPv4 prefixes as before; the advertiser gets both.
        assert_eq!(c.mobile_prefixes, vec!["10.10.0.0/16".parse::<Ipv4Net>().unwrap()]);
        let six: Vec<Ipv6Net> = vec!["2001:db8:a::/48".parse().unwrap(), "2001:db8:b::/48".parse().unwrap()];
        assert_eq!(c.mobile_prefixes6, six);
        let a = c.advertise().unwrap();
        assert_eq!((a.prefixes.len(), &a.prefixes6), (1, &six));
        assert_eq!(a.next_hop6, Some("2001:db8:ff::9".parse().unwrap()));
        let peers: Vec<SocketAddr> = ["[2001:db8:ff:1::1]:179", "[2001:db8:ff:2::1]:1179", "203.0.113.1:179"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(a.peers, peers);
        for (extra, needle) in [
            (&["--mobile-prefix", "2001:db8:a::1/48"][..], "did you mean 2001:db8:a::/48"),
            (&["--mobile-prefix", "2001:db8::/32,2001:db8:a::/48"][..], "overlap"),
        ] {
            let err = load(extra).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
        // IPv6 alone is not (yet) an FE: the rest of the agent serves IPv4.
        let args = ["victor-fe-agent", "--controller", "http://127.0.0.1:50051", "--fe-id", "fe1"].into_iter().chain([
            "--underlay-addr",
            "198.51.100.1",
            "--vm-port",
            "vm0",
            "--mobile-prefix",
            "2001:db8:a::/48",
        ]);
        let err = Config::load_from(args.map(String::from).collect()).unwrap_err().to_string();
        assert!(err.contains("no IPv4 prefix"), "{err}");
        assert_eq!(parse_peer("[2001:db8::1]"), Ok("[2001:db8::1]:179".parse().unwrap()));
        for bad in ["[2001:db8::1]:x", "2001:db8::1]:179", "router1:179"] {
            assert!(parse_peer(bad).unwrap_err().contains("[IPv6]:PORT"), "{bad}");
        }
    }

    #[test]
    fn clock_offset_is_signed_and_off_by_default() {
        assert_eq!(load(&[]).unwrap().clock_offset, 0);
        for (text, ns, shown) in
            [("-5s", -5_000_000_000, "-5s"), ("+5s", 5_000_000_000, "5s"), ("250ms", 250_000_000, "250ms")]
        {
            let c = load(&["--clock-offset", text]).unwrap();
            assert_eq!(c.clock_offset, ns, "{text}");
            assert_eq!(c.clock().shift(10_000_000_000), 10_000_000_000 + ns);
            let json = serde_json::to_value(&c).unwrap();
            assert_eq!(json["clock_offset"], shown);
        }
        assert!(load(&["--clock-offset", "-soon"]).is_err());
    }

    #[test]
    fn move_hint_flags() {
        assert!(load(&[]).unwrap().move_hints().unwrap().is_none(), "off without a key file");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("hint.key");
        std::fs::write(&key, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
        let path = key.to_str().unwrap();
        let c = load(&["--move-hint-key-file", path, "--move-hint-timeout", "500ms"]).unwrap();
        let h = c.move_hints().unwrap().unwrap();
        assert_eq!((h.port, h.timeout_ns, h.max_age_ns, h.rate), (4796, 500_000_000, 2_000_000_000, 1000));
        assert_eq!(h.keys.len(), 1);
        for (extra, needle) in [
            (&["--move-hint-timeout", "5ms"][..], "between 10ms and 60s"),
            (&["--move-hint-max-age", "10m"][..], "between 100ms and 5m"),
            (&["--move-hint-port", "0"][..], "not a port"),
            (&["--move-hint-rate", "0"][..], "at least 1"),
        ] {
            let args: Vec<&str> = ["--move-hint-key-file", path].into_iter().chain(extra.iter().copied()).collect();
            let err = load(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
        std::fs::write(&key, "secret\n").unwrap();
        let err = load(&["--move-hint-key-file", path]).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("openssl rand -hex 32"), "{err}");
        let err = load(&["--move-hint-key-file", "/nonexistent/hint.key"]).unwrap_err().to_string();
        assert!(err.contains("cannot read it"), "{err}");
    }

    #[test]
    fn config_file_is_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "site = \"dc2\"\ngateway = [\"10.10.0.1\", \"10.10.1.1\"]\ntun-name = \"vtun9\"\n")
            .unwrap();
        let c = load(&["--config", path.to_str().unwrap(), "--tun-name", "vtun1"]).unwrap();
        assert_eq!(c.site, "dc2");
        assert_eq!(c.gateways.len(), 2);
        assert_eq!(c.tun_name, "vtun1");
        std::fs::write(&path, "no-such-flag = 1\n").unwrap();
        let err = load(&["--config", path.to_str().unwrap()]).unwrap_err().to_string();
        assert!(err.contains("no-such-flag"), "{err}");
    }
}
