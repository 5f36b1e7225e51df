//! `victor-lab migrate`: the migration experiment (README, "See it work"). A VM moves back and forth between fe2 and fe3
//! while the client (behind fe1) pings it at a fixed interval; the lab reports the packets lost
//! per move and the convergence of every move, from timestamps the agents and the controller
//! take themselves (CLOCK_MONOTONIC, shared by every process on the host):
//!
//! convergence = the latest time any FE finished applying the new binding − the time the new FE
//! captured the VM's gratuitous ARP.
//!
//! With move hints (`--move-hints`, on by default; the agents share a generated key) the new FE
//! also tells the other FEs directly, and they forward to it before the controller's delta
//! arrives. `convergence_ms` keeps meaning the authoritative path (the controller's delta applied
//! everywhere); `dataplane_convergence_ms` is when every FE's data plane first forwarded to the
//! new FE: per FE the earliest of its local install (the new FE), an applied hint that the delta
//! later confirmed, and the delta's apply — the latest of those over the FEs, − the capture.
//!
//! Every move is announced to the controller first, as an orchestrator does before it starts a
//! migration (AnnounceMigration without commit, for every address of the VM, naming the new FE:
//! [`ControlPlane::announce_migration`]); `--no-announce` leaves the move to what the new FE
//! captures alone. Per move the report says whether it was announced, how the data plane's
//! migration relay counters changed at each FE (`relay`: the old FE copies the VM's packets to the
//! announced FE, which holds them until the VM is local; empty when the agents export no such
//! counters) and the duplicate replies the prober saw (a relayed copy may reach the VM as well as
//! the original: counted apart, never as an answer to a lost request).
//!
//! With `--bgp` the client enters through the BGP upstream router instead (see [`super::bgp`]).
//!
//! With `--vm qemu` the VM is a real guest that QEMU live-migrates instead, with a report of its
//! own ([`super::qemu`]); both build the lab with [`start_lab`].
//!
//! Two ways to switch the link (`--switch`):
//! * `move`: the VM's link is moved from the old FE's namespace to the new one's
//!   (break before make: while it moves no path to the VM exists), then the VM sends its GARP;
//! * `clone`: make before break, like a migration whose destination is ready before the source
//!   stops — a second link to the new FE appears first (same MAC and IP), the VM switches its
//!   default route to it and sends its GARP, and the old link is removed once every FE converged.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use victor_fe_agent::forwarding::DataplaneMode;
use victor_fe_agent::forwarding::kernel::devices::peer_name;
use victor_proto::clock::monotonic_ns;
use victor_testkit::netns::NetNs;

use super::addressing::fe_addr;
use super::agents::{
    Agent, AgentCommand, RELAY_METRIC, RelayCounters, agent_counters, agent_get, move_hint_flags, relay_counters,
    wait_agent_ready,
};
use super::announce::{self, Announce, Announcer, Family, GATEWAY6, MOBILE6};
use super::bgp::{self, AnycastPath};
use super::controlplane::ControlPlane;
use super::guest::Nic;
use super::netlink::LinkSwitch;
use super::probe::{FrameSender, Prober, Probes};
use super::topology::{GATEWAY, GATEWAY_MAC, Ingress, Topology, VM_PORT, VmSpec, attach_with, netns_for};

/// How the VM's link is switched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchMode {
    /// Move the link between FE namespaces (break before make).
    Move,
    /// Add a link to the new FE first, switch, remove the old one after convergence.
    Clone,
}

/// `victor-lab migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Number of moves (fe2 → fe3 → fe2 ...).
    #[arg(long, default_value_t = 10)]
    pub moves: usize,
    /// Interval between the client's echo requests.
    #[arg(long, default_value_t = 10)]
    pub ping_interval_ms: u64,
    /// etcd members: 0 = the controller's embedded store, 1 or 3.
    #[arg(long, default_value_t = 1)]
    pub etcd_members: usize,
    /// Controller replicas (agents spread over them; >1 needs etcd).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// How the link is switched.
    #[arg(long, value_enum, default_value = "move")]
    pub switch: SwitchMode,
    /// Pause after a move has converged before the next one (keeps moves apart in the ping log).
    #[arg(long, default_value_t = 200)]
    pub settle_ms: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the lab's logs (controller, agents, etcd) in this directory.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// The client sits behind a BGP router (real BIRD 2) that learns the mobile prefix from every
    /// FE's agent and spreads flows over them (ECMP), instead of entering at fe1 statically; its
    /// flow is pinned to fe1 (see docs/bgp.md).
    #[arg(long)]
    pub bgp: bool,
    /// Move hints between the agents (`--move-hints off` for the controller's path alone).
    #[arg(
        long,
        default_value = "on",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
        value_name = "on|off"
    )]
    pub move_hints: bool,
    /// The agents' data plane (`--dataplane` of victor-fe-agent): auto picks the kernel's ipip
    /// when it can be loaded, else the userspace forwarder; the report names what ran.
    #[arg(long, value_enum, default_value = "auto")]
    pub dataplane: DataplaneMode,
    /// Shifts FE N's clock by OFFSET (its agent's test-only `--clock-offset`; repeatable), e.g.
    /// `--fe-clock-offset 2=-5s --fe-clock-offset 3=+5s`: FEs whose clocks disagree move VMs as
    /// fast as FEs that agree (docs/design.md, section 3).
    #[arg(long = "fe-clock-offset", value_name = "N=OFFSET", value_parser = parse_fe_clock_offset, allow_hyphen_values = true)]
    pub fe_clock_offsets: Vec<(usize, String)>,
    /// Runs the FE agents at real-time priority (`chrt -f 1`: SCHED_FIFO, every thread), as a
    /// border router gives its routing daemons precedence over other work. On this lab's host
    /// the agents share two cores with QEMU's TCG guests, which delay their reaction to an
    /// announcement by milliseconds (`--vm qemu`: BENCHMARKS.md, "Migration with a real VM").
    #[arg(long)]
    pub agents_realtime: bool,
    /// How the moved VM announces itself: `garp` (its gratuitous ARP, repeated until bound),
    /// `rarp` (what unmodified QEMU's announce-self sends: five RARP frames naming only the MAC, at
    /// 0, 50, 200, 450 and 800 ms, nothing after) or `na` (an unsolicited Neighbor Advertisement
    /// for its IPv6 address; needs --family ipv6|dual).
    #[arg(long, value_enum, default_value = "garp")]
    pub announce: Announce,
    /// The VM's address families: `ipv4`, `ipv6` or `dual` (the client pings both addresses;
    /// losses are reported per family). IPv6: the mobile prefix fd00:10::/64, gateway fd00:10::1,
    /// 6in4 between FEs over the IPv4 underlay.
    #[arg(long, value_enum, default_value = "ipv4")]
    pub family: Family,
    /// The VM: `veth` (a namespace whose link the lab re-attaches) or `qemu` (a real guest that
    /// QEMU live-migrates between hypervisors at fe2 and fe3).
    #[arg(long, value_enum, default_value = "veth")]
    pub vm: VmKind,
    /// Do not announce the migrations to the controller before they start (AnnounceMigration
    /// without commit, naming the new FE, for each address of the VM; on by default, as an
    /// orchestrator does): the move is then learned only from what the new FE captures.
    #[arg(long)]
    pub no_announce: bool,
    /// With `--vm qemu`: the guest's NIC (`virtio` announces itself after a migration, `e1000`
    /// leaves it to QEMU's RARP).
    #[arg(long, value_enum, default_value = "virtio")]
    pub nic: Nic,
}

/// What moves (`--vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    /// A namespace whose veth the lab re-attaches to the other FE, then sends its GARP.
    Veth,
    /// A QEMU guest, live-migrated.
    Qemu,
}

/// Parses `N=OFFSET` (N an FE number 1–3, OFFSET a signed duration like `-5s`).
fn parse_fe_clock_offset(text: &str) -> Result<(usize, String), String> {
    let (n, offset) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected N=OFFSET, e.g. 2=-5s"))?;
    let n: usize = n.trim().parse().map_err(|_| format!("{n:?} is not an FE number (1-3)"))?;
    if !(1..=3).contains(&n) {
        return Err(format!("FE {n} does not exist (the lab has fe1-fe3)"));
    }
    victor_fe_agent::config::parse_clock_offset(offset)?;
    Ok((n, offset.trim().to_owned()))
}

impl Default for MigrateArgs {
    fn default() -> Self {
        MigrateArgs {
            moves: 10,
            ping_interval_ms: 10,
            etcd_members: 1,
            replicas: 1,
            switch: SwitchMode::Move,
            settle_ms: 200,
            json: false,
            out: None,
            log_dir: None,
            bgp: false,
            move_hints: true,
            dataplane: DataplaneMode::Auto,
            fe_clock_offsets: Vec::new(),
            agents_realtime: false,
            vm: VmKind::Veth,
            nic: Nic::Virtio,
            no_announce: false,
            announce: Announce::Garp,
            family: Family::Ipv4,
        }
    }
}

/// p50 / p99 / max of a series (ms).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (empty → zeros).
    pub fn of(values: &[f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| v[(((q * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
        Summary { p50: round(rank(0.5)), p99: round(rank(0.99)), max: round(v[v.len() - 1]) }
    }
}

pub(super) fn round(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// What happened in one move.
#[derive(Debug, Clone, Serialize)]
pub struct MoveResult {
    /// 1-based.
    pub index: usize,
    /// Old FE.
    pub from: String,
    /// New FE.
    pub to: String,
    /// The binding's move_seq after the move.
    pub move_seq: u64,
    /// Time the lab spent switching the link.
    pub link_switch_ms: f64,
    /// Announcement frames (GARP, RARP or NA, `--announce`) sent until the binding moved.
    pub garps_sent: u32,
    /// Latest apply on any FE − capture on the new FE.
    pub convergence_ms: f64,
    /// Latest time any FE's data plane first forwarded to the new FE (local install, confirmed
    /// hint or delta) − capture on the new FE.
    pub dataplane_convergence_ms: f64,
    /// FEs that forwarded to the new FE on a hint before the delta came (and the delta confirmed).
    pub hints_applied: u32,
    /// Echo requests without a reply, sent from this move's start to the next one's (to the
    /// first address of `--family`: IPv4 unless `ipv6`).
    pub lost: u32,
    /// The same per address family (`ipv4`, `ipv6`; both with `--family dual`).
    pub lost_by_family: BTreeMap<String, u32>,
    /// Per family with losses: when its first and its last lost request were sent, relative to
    /// the start of the link switch (ms) — tells a short gap from a late tail.
    pub lost_window_ms_by_family: BTreeMap<String, [f64; 2]>,
    /// Of those, sent while the lab itself was switching the link.
    pub lost_during_link_switch: u32,
    /// Per-stage durations (ms) of this move.
    pub stages_ms: BTreeMap<String, f64>,
    /// The move was announced to the controller before it started (not `--no-announce`).
    pub migration_announced: bool,
    /// Per FE (the old and the new), how long after the announcement's answer its agent had
    /// applied it (ms); an FE missing had not after 2 s (the move started anyway).
    pub announce_applied_ms: BTreeMap<String, f64>,
    /// Per FE, how its migration relay counters changed from just before the announcement to
    /// the end of the move (empty: the agents export none).
    pub relay: BTreeMap<String, RelayCounters>,
    /// Extra replies to the move's requests (to the first address) beyond each one's first.
    pub duplicate_replies: u32,
    /// When each FE finished applying the move, relative to the capture (ms).
    pub applied_ms: BTreeMap<String, f64>,
    /// When each FE's data plane first forwarded to the new FE, relative to the capture (ms).
    pub dataplane_applied_ms: BTreeMap<String, f64>,
}

/// The report of `victor-lab migrate` (`--json` prints it as one JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// Moves made.
    pub moves: usize,
    /// Echo interval.
    pub ping_interval_ms: u64,
    /// etcd members (0 = embedded store).
    pub etcd_members: usize,
    /// Controller replicas.
    pub replicas: usize,
    /// The data plane the agents run and why (`kernel (auto: ...)`, `tun (--dataplane tun)`),
    /// as fe1's `/readyz` says.
    pub dataplane: String,
    /// How links were switched.
    pub switch: SwitchMode,
    /// How the VM announced itself (`--announce`).
    pub announce: Announce,
    /// The VM's address families (`--family`).
    pub family: Family,
    /// Echo requests lost over the whole run, per address family.
    pub lost_total_by_family: BTreeMap<String, u32>,
    /// Echo requests sent.
    pub probes_sent: u32,
    /// Echo requests lost over the whole run (after the first move started), to the VM's first
    /// address (IPv4 when it has one; every family's in `lost_total_by_family`).
    pub lost_total: u32,
    /// The worst move.
    pub lost_max_per_move: u32,
    /// Lost while the lab itself was switching a link (no path can exist then in `move` mode).
    pub lost_during_link_switch: u32,
    /// Time the lab spent switching links.
    pub link_switch_ms: Summary,
    /// Move hints were on.
    pub move_hints: bool,
    /// Moves were announced to the controller before they started (not `--no-announce`).
    pub migration_announced: bool,
    /// Duplicate replies over the run (first address).
    pub duplicate_replies_total: u32,
    /// Convergence over the moves (the controller's delta applied on every FE).
    pub convergence_ms: Summary,
    /// Data-plane convergence over the moves (every FE forwards to the new FE: local install,
    /// confirmed move hint or delta, whichever came first on each FE).
    pub dataplane_convergence_ms: Summary,
    /// FEs that acted on a confirmed hint before the delta, over all moves.
    pub hints_applied: u32,
    /// Per-stage breakdown over the moves.
    pub stages_ms: BTreeMap<String, Summary>,
    /// Each move.
    pub per_move: Vec<MoveResult>,
    /// The host's 1-minute load average at the end (the machine is shared and noisy).
    pub load_avg_1m: f64,
    /// The agents ran at real-time priority (`--agents-realtime`).
    pub agents_realtime: bool,
    /// The paper's figure for comparison: packets lost per handoff at a 10 ms ping interval.
    pub paper_lost_per_move_at_10ms: &'static str,
    /// FE clock offsets (`--fe-clock-offset`), by FE.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fe_clock_offsets: BTreeMap<String, String>,
    /// With `--bgp`: the anycast path the client's traffic took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bgp: Option<AnycastPath>,
}

/// The data plane the agent in `ns` runs and why: the `dataplane:` line of its `/readyz`.
pub fn dataplane_of(ns: &NetNs) -> Result<String> {
    let (_, body) = agent_get(ns, "/readyz")?;
    body.lines()
        .find_map(|l| l.strip_prefix("dataplane: "))
        .map(str::to_owned)
        .with_context(|| format!("the agent in {} does not say which data plane runs: {body:?}", ns.name()))
}

/// Builds the lab, runs the experiment, tears everything down and returns the report.
pub async fn run(args: &MigrateArgs) -> Result<MigrateReport> {
    ensure!(args.vm == VmKind::Veth, "--vm qemu has its own report: see lab::qemu::run");
    with_log_dir(args, |dir| async move { experiment(args, &dir).await }).await
}

/// Runs `experiment` with the lab's log directory (`--log-dir`, else a temporary one, removed
/// after a successful run and kept after a failure).
pub(super) async fn with_log_dir<T, F, Fut>(args: &MigrateArgs, experiment: F) -> Result<T>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    ensure!(args.moves >= 1, "--moves must be at least 1");
    ensure!(args.ping_interval_ms >= 1, "--ping-interval-ms must be at least 1");
    let log_dir = match &args.log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::Builder::new().prefix("migrate-").tempdir_in(dir)?.keep()
        }
        None => tempfile::Builder::new().prefix("victor-lab-").tempdir()?.keep(),
    };
    let result = experiment(log_dir.clone()).await;
    if result.is_ok() && args.log_dir.is_none() {
        let _ = std::fs::remove_dir_all(&log_dir);
    } else if result.is_err() {
        eprintln!("victor-lab: logs kept in {}", log_dir.display());
    }
    result
}

/// A running lab: topology, control plane and agents (fields drop in this order: agents first,
/// namespaces last).
pub(super) struct Lab {
    /// One per FE (index = FE number − 1).
    pub agents: Vec<Agent>,
    /// The BGP upstream router (`--bgp`).
    pub upstream: Option<bgp::Bird>,
    /// etcd and the controllers.
    pub plane: ControlPlane,
    /// The namespaces.
    pub topo: Topology,
    /// The data plane the agents run (fe1's `/readyz`).
    pub dataplane: String,
}

/// Builds the topology (with the veth VM `vm` behind fe2, if given), starts the control plane
/// and one agent per FE as `args` asks, and waits until every agent is ready.
pub(super) async fn start_lab(args: &MigrateArgs, dir: &std::path::Path, vm: Option<&VmSpec>) -> Result<Lab> {
    let controller_bin = victor_testkit::workspace_binary("victor-controller");
    let agent_bin = victor_testkit::workspace_binary("victor-fe-agent");
    let namer = |role: &str| netns_for("vm", role);
    let mut topo = Topology::build_with(3, &namer, if args.bgp { Ingress::Bgp } else { Ingress::Static })?;
    if let Some(vm) = vm {
        topo.add_vm(vm.clone(), 2, &namer)?;
    }
    let upstream = topo.upstream.as_ref().map(|ns| bgp::start_upstream(ns, 3, dir)).transpose()?;

    // Flap damping would freeze a VM bouncing between two FEs every few hundred ms: the lab
    // lifts it (it is tested on its own) so that every move is a real move.
    let mut controller_flags = vec!["--damping-max-moves", "1000000"];
    if args.family.v6() {
        controller_flags.extend(["--mobile-prefix", MOBILE6]);
        if let Some(vm) = vm {
            add_ipv6(&topo, vm)?;
        }
    }
    let plane = ControlPlane::start(&controller_bin, dir, args.etcd_members, args.replicas, &controller_flags).await?;
    let netns_path = controller_netns()?;
    let urls = plane.urls();
    let hint_flags = if args.move_hints { move_hint_flags(dir)? } else { Vec::new() };
    let mut agents = Vec::new();
    for n in 1..=3 {
        // Spread agents over the replicas (each still fails over to the others).
        let mut ordered = urls.clone();
        ordered.rotate_left((n - 1) % urls.len());
        let mut flags = if args.bgp { bgp::agent_flags(n) } else { Vec::new() };
        flags.extend(hint_flags.iter().cloned());
        flags.extend(["--dataplane".to_owned(), args.dataplane.label().to_owned()]);
        if args.family.v6() {
            flags.extend(["--mobile-prefix", MOBILE6, "--gateway", GATEWAY6].map(str::to_owned));
        }
        for (_, offset) in args.fe_clock_offsets.iter().filter(|(fe, _)| *fe == n) {
            flags.extend(["--clock-offset".to_owned(), offset.clone()]);
        }
        let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut argv =
            AgentCommand { bin: &agent_bin, controllers: &ordered, controller_netns: &netns_path, extra: &extra }
                .argv(n);
        if args.agents_realtime {
            argv.splice(0..0, ["chrt", "-f", "1"].map(str::to_owned));
        }
        agents.push(Agent::spawn(topo.fe(n), n, argv, dir)?);
    }
    for n in 1..=3 {
        wait_agent_ready(topo.fe(n), &mut agents[n - 1], Duration::from_secs(30))?;
    }
    let dataplane = dataplane_of(topo.fe(1))?;
    Ok(Lab { agents, upstream, plane, topo, dataplane })
}

async fn experiment(args: &MigrateArgs, dir: &std::path::Path) -> Result<MigrateReport> {
    args.announce.check(args.family)?;
    ensure!(!(args.family.v6() && args.bgp), "--family ipv6|dual with --bgp: the BGP upstream is IPv4-only in the lab");
    let vm = VmSpec::numbered(1);
    let Lab { agents, upstream, plane, topo, dataplane } = start_lab(args, dir, Some(&vm)).await?;

    // The VM appears behind fe2 (its own GARP and NA: how it appears first is not measured).
    let mut vm_if = "eth0".to_owned();
    let mut port = vm.port.clone();
    let mut sender = FrameSender::open(topo.vm(1), &vm_if)?;
    let addresses = announce::addresses(&vm, args.family);
    let primary = addresses[0];
    for kind in [Announce::Garp, Announce::Na] {
        if kind.check(args.family).is_ok()
            && let (Some(frame), _) = Announcer::new(kind, &vm)?.step()
        {
            sender.send(frame)?;
        }
    }
    let mut first = None;
    for ip in &addresses {
        let waited = Duration::from_secs(10);
        let bound = match plane.wait_bound(*ip, "fe2", waited).await {
            Ok(b) => b,
            Err(_) if let IpAddr::V6(v6) = ip => bail!(announce::no_ipv6_binding(*v6, "fe2", waited)),
            Err(err) => return Err(err),
        };
        first.get_or_insert(bound);
    }
    let mut move_seq = first.expect("at least one address").move_seq;
    wait_applied(&topo, primary, move_seq, 2, Duration::from_secs(10)).await?;
    let anycast = match (&upstream, &topo.upstream) {
        (Some(bird), Some(ns)) => Some(bgp::anycast_ready(&topo.client, ns, bird, 3, vm.ip, 1)?),
        _ => None,
    };

    if args.family.v6() {
        wait_dad_done(&topo)?;
    }
    let interval = Duration::from_millis(args.ping_interval_ms);
    let probers: Vec<(IpAddr, Prober)> =
        addresses.iter().map(|ip| Ok((*ip, Prober::start_ip(&topo.client, *ip, interval)?))).collect::<Result<_>>()?;
    for (ip, prober) in &probers {
        prober
            .wait_replies_from(0, 20, Duration::from_secs(10))
            .with_context(|| format!("the VM does not answer the client at {ip} before any move"))?;
    }
    let prober = &probers[0].1;

    let switch = LinkSwitch::open(&topo)?;
    let mut moves = Vec::new();
    let mut at = 2usize;
    for index in 1..=args.moves {
        let to = if at == 2 { 3 } else { 2 };
        let relay_before = relay_snapshot(&topo)?;
        let announced = announce_move(args, &plane, &topo, &addresses, (at, to), index).await?;
        let start_seq = prober.sent();
        // ── switch the link ──
        let (switch_start, switch_end) = match args.switch {
            SwitchMode::Move => {
                let prepared = switch.prepare(&vm.port, to).await?;
                let t0 = monotonic_ns();
                switch.attach(prepared).await?;
                (t0, monotonic_ns())
            }
            SwitchMode::Clone => {
                let new_if = if vm_if == "eth0" { "eth1" } else { "eth0" };
                // The hypervisor-side names alternate too (v1h / v1i): both links exist for a while.
                port = if port == vm.port { format!("{}i", vm.port.trim_end_matches('h')) } else { vm.port.clone() };
                let spec = VmSpec { port: port.clone(), ..vm.clone() };
                clone_link(topo.vm(1), new_if, &topo.hv, &spec, to)?;
                let t0 = monotonic_ns();
                topo.vm(1).ip(&["route", "replace", "default", "via", GATEWAY, "dev", new_if, "onlink"])?;
                let t1 = monotonic_ns();
                sender = FrameSender::open(topo.vm(1), new_if)?;
                (t0, t1)
            }
        };
        // ── the VM (or its hypervisor) announces itself, as `--announce` says, until the
        //    controller moved the binding (QEMU's RARP stops after five frames) ──
        let target = format!("fe{to}");
        let mut announcer = Announcer::for_family(args.announce, &vm, args.family)?;
        let mut first_garp = 0u64;
        let announcing_since = std::time::Instant::now();
        let mut next_due;
        let bound = loop {
            let (frame, wait) = announcer.step();
            if let Some(frame) = frame {
                let sent = sender.send(frame)?;
                if first_garp == 0 {
                    first_garp = sent;
                }
                if let Some(companion) = announcer.companion() {
                    sender.send(companion)?;
                }
            }
            let poll_until = std::time::Instant::now() + wait;
            next_due = poll_until;
            let mut found = None;
            while std::time::Instant::now() < poll_until {
                if let Some(b) = plane.binding(primary).await?
                    && b.fe_id == target
                    && b.move_seq > move_seq
                {
                    found = Some(b);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if let Some(b) = found {
                break b;
            }
            ensure!(
                announcing_since.elapsed() < Duration::from_secs(10),
                "move {index}: {primary} was not bound to {target} after {} {} frames in 10 s",
                announcer.sent(),
                args.announce.as_str()
            );
        };
        let garps = announcer.sent();
        if args.announce == Announce::Rarp {
            // QEMU sends all its rounds whatever the network did with the first.
            loop {
                tokio::time::sleep(next_due.saturating_duration_since(std::time::Instant::now())).await;
                let (frame, wait) = announcer.step();
                let Some(frame) = frame else { break };
                sender.send(frame)?;
                next_due = std::time::Instant::now() + wait;
            }
        }
        move_seq = bound.move_seq;
        wait_applied(&topo, primary, move_seq, to, Duration::from_secs(10)).await?;
        // The VM answers again (every address) and every FE points where it should.
        for (ip, prober) in &probers {
            let after = prober.sent();
            prober
                .wait_replies_from(after, 3, Duration::from_secs(5))
                .with_context(|| format!("move {index}: the VM stopped answering at {ip} after moving to {target}"))?;
        }
        if args.family.v4() {
            check_forwarding(&topo, &vm, to, if to == 2 { 3 } else { 2 }, args.switch, &dataplane)?;
        }
        if args.switch == SwitchMode::Clone {
            // Break after make: the old link goes once every FE has converged.
            topo.vm(1).ip(&["link", "del", &vm_if])?;
            vm_if = if vm_if == "eth0" { "eth1".into() } else { "eth0".into() };
        }
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        moves.push(PendingMove {
            index,
            from: at,
            to,
            move_seq,
            switch_start,
            switch_end,
            first_garp,
            garps,
            start_seq,
            applied: BTreeMap::new(),
            announced,
            relay: relay_change(&relay_before, &relay_snapshot(&topo)?),
        });
        at = to;
    }
    // Let the last probes come back.
    tokio::time::sleep(Duration::from_millis(300).max(interval * 5)).await;
    let mut all_probes = Vec::new();
    for (ip, prober) in probers {
        all_probes.push((family_of(ip), prober.stop()?));
    }
    let probes = &all_probes[0].1;
    let traces = controller_traces(&plane, primary).await?;
    // Every agent's stage timestamps for every move, read once at the end.
    let events = agent_events(&topo, primary)?;
    for m in &mut moves {
        m.applied = events.iter().filter_map(|(fe, list)| Some((*fe, list.get(&m.move_seq)?.clone()))).collect();
    }
    let load_avg_1m = load_avg_1m();

    let mut per_move = Vec::new();
    for (k, m) in moves.iter().enumerate() {
        let end_seq = moves.get(k + 1).map(|n| n.start_seq).unwrap_or(probes.sent.saturating_sub(5));
        let mut result = m.result(probes, end_seq, &traces, args.ping_interval_ms)?;
        // Each family's requests of the same window, delimited by send time.
        let end_at = moves.get(k + 1).map(|n| n.switch_start);
        for (family, p) in &all_probes {
            let from = p.first_sent_after(m.switch_start.saturating_sub(interval.as_nanos() as u64));
            let to = end_at.map_or(p.sent.saturating_sub(5), |t| p.first_sent_after(t));
            let lost = p.lost_seqs(from, to);
            let offset_ms = |seq: &u32| (p.sent_at[*seq as usize] as f64 - m.switch_start as f64) / 1e6;
            if let (Some(first), Some(last)) = (lost.first(), lost.last()) {
                result
                    .lost_window_ms_by_family
                    .insert((*family).to_owned(), [round(offset_ms(first)), round(offset_ms(last))]);
            }
            result.lost_by_family.insert((*family).to_owned(), lost.len() as u32);
        }
        per_move.push(result);
    }
    drop(agents);
    drop(upstream);
    drop(plane);
    drop(topo);
    Ok(MigrateReport { bgp: anycast, ..report(args, dataplane, probes, per_move, load_avg_1m) })
}

fn family_of(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "ipv4" } else { "ipv6" }
}

/// Gives the VM its IPv6 address (default route via the gateway fd00:10::1, which every FE
/// answers once the agents speak NDP) and the client an IPv6 address on its link to fe1, with a
/// route to the IPv6 mobile prefix through fe1.
fn add_ipv6(topo: &Topology, vm: &VmSpec) -> Result<()> {
    // Every FE routes IPv6; the underlay carries it too (fd00:198::N), so that fe2 and fe3 send
    // the VM's replies to the client through fe1, as they do for IPv4.
    for n in 1..=topo.fes.len() {
        topo.fe(n).sysctl("net.ipv6.conf.all.forwarding", "1")?;
        topo.fe(n).ip(&["-6", "addr", "add", &format!("fd00:198::{n}/64"), "dev", "ul0", "nodad"])?;
        if n > 1 {
            topo.fe(n).ip(&["-6", "route", "replace", "2001:db8:c::/64", "via", "fd00:198::1"])?;
        }
    }
    let v6 = announce::vm_ipv6(vm);
    topo.vm(1).ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
    topo.vm(1).ip(&["-6", "route", "replace", "default", "via", GATEWAY6, "dev", "eth0", "onlink"])?;
    topo.client.ip(&["-6", "addr", "add", "2001:db8:c::10/64", "dev", "eth0", "nodad"])?;
    topo.fe(1).ip(&["-6", "addr", "add", "2001:db8:c::1/64", "dev", "cl0", "nodad"])?;
    topo.client.ip(&["-6", "route", "replace", MOBILE6, "via", "2001:db8:c::1"])?;
    Ok(())
}

/// Waits until no lab namespace has a tentative IPv6 address. A fresh link's link-local address
/// stays tentative for a second (duplicate address detection), and the kernel sends no Neighbor
/// Solicitation without a usable link-local source: an FE that first forwards to the client over
/// the underlay inside that second (the first move to fe3, whose `ul0` never carried IPv6 before)
/// held the VM's replies for a whole retransmit interval — a 765 ms IPv6 outage measured in
/// `--family dual` runs that a long-running border router never has.
fn wait_dad_done(topo: &Topology) -> Result<()> {
    let namespaces: Vec<&NetNs> = topo.fes.iter().chain(&topo.vms).chain([&topo.client, &topo.ul]).collect();
    let mut failed = None;
    super::probe::wait("duplicate address detection on the lab's links", Duration::from_secs(10), || {
        namespaces.iter().all(|ns| match ns.ip(&["-6", "addr", "show", "tentative"]) {
            Ok(out) => out.trim().is_empty(),
            Err(e) => {
                failed = Some(e);
                true
            }
        })
    })?;
    failed.map_or(Ok(()), Err)
}

/// A move whose numbers are computed once the run is over.
struct PendingMove {
    index: usize,
    from: usize,
    to: usize,
    move_seq: u64,
    switch_start: u64,
    switch_end: u64,
    first_garp: u64,
    garps: u32,
    applied: BTreeMap<usize, Value>,
    start_seq: u32,
    announced: Option<BTreeMap<String, f64>>,
    relay: BTreeMap<String, RelayCounters>,
}

impl PendingMove {
    fn result(&self, probes: &Probes, end_seq: u32, traces: &[Value], interval_ms: u64) -> Result<MoveResult> {
        let new = &self.applied[&self.to];
        let ns = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).filter(|t| *t > 0);
        let captured = ns(new, "captured_mono_ns").with_context(|| {
            format!("move {}: fe{} recorded no ARP capture for move_seq {}", self.index, self.to, self.move_seq)
        })?;
        let ms = |from: u64, to: u64| round((to as f64 - from as f64) / 1e6);
        let mut applied_ms = BTreeMap::new();
        let mut dataplane_applied_ms = BTreeMap::new();
        let (mut latest, mut dataplane_latest, mut hints_applied) = (0u64, 0u64, 0u32);
        for (fe, event) in &self.applied {
            let Some(t) = ns(event, "applied_mono_ns") else { continue };
            applied_ms.insert(format!("fe{fe}"), ms(captured, t));
            latest = latest.max(t);
            let Some(first) = dataplane_applied(event, *fe == self.to) else { continue };
            hints_applied += u32::from(first.hinted);
            dataplane_applied_ms.insert(format!("fe{fe}"), ms(captured, first.at));
            dataplane_latest = dataplane_latest.max(first.at);
        }
        let mut stages = BTreeMap::new();
        let mut stage = |name: &str, from: Option<u64>, to: Option<u64>| {
            if let (Some(a), Some(b)) = (from, to) {
                stages.insert(name.to_owned(), ms(a, b));
            }
        };
        stage("garp_to_capture", Some(self.first_garp), Some(captured));
        stage("capture_to_local_install", Some(captured), ns(new, "provisional_applied_mono_ns"));
        stage("capture_to_claim_sent", Some(captured), ns(new, "claim_sent_mono_ns"));
        stage("capture_to_hint_sent", Some(captured), ns(new, "hint_sent_mono_ns"));
        let hint_received = self.applied.values().filter_map(|e| ns(e, "hint_received_mono_ns")).max();
        stage("hint_to_last_receiver", ns(new, "hint_sent_mono_ns"), hint_received);
        let trace = traces.iter().find(|t| {
            t.get("move_seq").and_then(Value::as_u64) == Some(self.move_seq) && ns(t, "received_mono_ns").is_some()
        });
        if let Some(t) = trace {
            stage("claim_rpc", ns(new, "claim_sent_mono_ns"), ns(t, "received_mono_ns"));
            stage("store_commit", ns(t, "received_mono_ns"), ns(t, "committed_mono_ns"));
            stage("watch_to_cache", ns(t, "committed_mono_ns"), ns(t, "cached_mono_ns"));
            stage("cache_to_first_send", ns(t, "cached_mono_ns"), ns(t, "first_sent_mono_ns"));
            stage("first_to_last_send", ns(t, "first_sent_mono_ns"), ns(t, "last_sent_mono_ns"));
            let received = self.applied.values().filter_map(|e| ns(e, "delta_received_mono_ns")).max();
            stage("stream_to_last_agent", ns(t, "first_sent_mono_ns"), received);
        }
        let apply = self
            .applied
            .values()
            .filter_map(|e| Some(ns(e, "applied_mono_ns")? as f64 - ns(e, "delta_received_mono_ns")? as f64))
            .fold(0.0f64, f64::max);
        stages.insert("agent_apply_max".into(), round(apply / 1e6));
        stages.insert("convergence".into(), ms(captured, latest));

        let lost = probes.lost_seqs(self.start_seq, end_seq);
        let window_start = self.switch_start.saturating_sub(interval_ms.min(1) * 1_000_000);
        let during = lost
            .iter()
            .filter(|s| probes.sent_at.get(**s as usize).is_some_and(|t| *t >= window_start && *t <= self.switch_end))
            .count() as u32;
        Ok(MoveResult {
            index: self.index,
            from: format!("fe{}", self.from),
            to: format!("fe{}", self.to),
            move_seq: self.move_seq,
            link_switch_ms: ms(self.switch_start, self.switch_end),
            garps_sent: self.garps,
            convergence_ms: ms(captured, latest),
            dataplane_convergence_ms: ms(captured, dataplane_latest),
            hints_applied,
            lost: lost.len() as u32,
            lost_by_family: BTreeMap::new(),
            lost_window_ms_by_family: BTreeMap::new(),
            lost_during_link_switch: during,
            stages_ms: stages,
            applied_ms,
            dataplane_applied_ms,
            migration_announced: self.announced.is_some(),
            announce_applied_ms: self.announced.clone().unwrap_or_default(),
            relay: self.relay.clone(),
            duplicate_replies: probes.duplicates_in(self.start_seq, end_seq),
        })
    }
}

fn report(
    args: &MigrateArgs,
    dataplane: String,
    probes: &Probes,
    per_move: Vec<MoveResult>,
    load_avg_1m: f64,
) -> MigrateReport {
    let collect = |f: &dyn Fn(&MoveResult) -> f64| per_move.iter().map(f).collect::<Vec<_>>();
    let mut stage_names: Vec<String> = per_move.iter().flat_map(|m| m.stages_ms.keys().cloned()).collect();
    stage_names.sort();
    stage_names.dedup();
    let stages_ms = stage_names
        .into_iter()
        .map(|name| {
            let values: Vec<f64> = per_move.iter().filter_map(|m| m.stages_ms.get(&name).copied()).collect();
            (name, Summary::of(&values))
        })
        .collect();
    MigrateReport {
        moves: per_move.len(),
        ping_interval_ms: args.ping_interval_ms,
        etcd_members: args.etcd_members,
        replicas: args.replicas,
        dataplane,
        switch: args.switch,
        announce: args.announce,
        family: args.family,
        lost_total_by_family: per_move.iter().flat_map(|m| &m.lost_by_family).fold(
            BTreeMap::new(),
            |mut acc, (f, n)| {
                *acc.entry(f.clone()).or_insert(0) += n;
                acc
            },
        ),
        probes_sent: probes.sent,
        lost_total: per_move.iter().map(|m| m.lost).sum(),
        lost_max_per_move: per_move.iter().map(|m| m.lost).max().unwrap_or(0),
        lost_during_link_switch: per_move.iter().map(|m| m.lost_during_link_switch).sum(),
        link_switch_ms: Summary::of(&collect(&|m| m.link_switch_ms)),
        move_hints: args.move_hints,
        migration_announced: !args.no_announce,
        duplicate_replies_total: per_move.iter().map(|m| m.duplicate_replies).sum(),
        convergence_ms: Summary::of(&collect(&|m| m.convergence_ms)),
        dataplane_convergence_ms: Summary::of(&collect(&|m| m.dataplane_convergence_ms)),
        hints_applied: per_move.iter().map(|m| m.hints_applied).sum(),
        stages_ms,
        per_move,
        load_avg_1m,
        agents_realtime: args.agents_realtime,
        paper_lost_per_move_at_10ms: "1-2 (Hao et al. §5, physical host moved between access points)",
        fe_clock_offsets: args.fe_clock_offsets.iter().map(|(n, o)| (format!("fe{n}"), o.clone())).collect(),
        bgp: None,
    }
}

/// Writes `report` as JSON to `--out` (if given) and, with `--json`, prints it; returns whether
/// it printed it (else the caller prints its table).
pub(super) fn emit_json(args: &MigrateArgs, report: &impl Serialize) -> Result<bool> {
    let json = serde_json::to_string_pretty(report)?;
    if let Some(path) = &args.out {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, &json).with_context(|| format!("write {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    }
    Ok(args.json)
}

/// Prints the report as a table (or JSON) and writes `--out`.
pub fn print(args: &MigrateArgs, report: &MigrateReport) -> Result<()> {
    if emit_json(args, report)? {
        return Ok(());
    }
    println!(
        "victor-lab migrate: {} moves ({} switch, announced by {}, {}), ping every {} ms, etcd members {}, {} replica(s), data plane {}, move hints {}",
        report.moves,
        args.switch.as_str(),
        args.announce.as_str(),
        args.family.as_str(),
        report.ping_interval_ms,
        report.etcd_members,
        report.replicas,
        report.dataplane,
        if report.move_hints { "on" } else { "off" }
    );
    println!("{}", announced_line(report.migration_announced));
    if !report.fe_clock_offsets.is_empty() {
        let offsets: Vec<String> = report.fe_clock_offsets.iter().map(|(fe, o)| format!("{fe} {o}")).collect();
        println!("FE clocks shifted: {}", offsets.join(", "));
    }
    if let Some(b) = &report.bgp {
        println!(
            "ingress: BGP upstream ({}) with ECMP over {}; the client's flow (source {}) enters at {}",
            b.router,
            b.paths.join(", "),
            b.client_source,
            b.ingress_fe
        );
    }
    println!(
        "{:>4}  {:<10} {:>9} {:>6} {:>14} {:>14} {:>6} {:>5} {:>13}",
        "move", "from→to", "move_seq", "garps", "convergence", "data plane", "hints", "lost", "link switch"
    );
    for m in &report.per_move {
        println!(
            "{:>4}  {:<10} {:>9} {:>6} {:>11.3} ms {:>11.3} ms {:>6} {:>5} {:>10.3} ms",
            m.index,
            format!("{}→{}", m.from, m.to),
            m.move_seq,
            m.garps_sent,
            m.convergence_ms,
            m.dataplane_convergence_ms,
            m.hints_applied,
            m.lost,
            m.link_switch_ms
        );
        println!(
            "      {}; {}; duplicate replies {}",
            applied_line(m.migration_announced, &m.announce_applied_ms),
            relay_line(&m.relay),
            m.duplicate_replies
        );
    }
    if report.lost_total_by_family.len() > 1 {
        let by: Vec<String> = report.lost_total_by_family.iter().map(|(f, n)| format!("{f} {n}")).collect();
        println!("lost by family: {}", by.join(", "));
    }
    let (c, d) = (report.convergence_ms, report.dataplane_convergence_ms);
    // The run's own figures are those of the first address (IPv4 when the VM has one).
    let first = if report.lost_total_by_family.len() > 1 { " (first address)" } else { "" };
    println!(
        "lost{first}: {} in total, at most {} per move ({} while the lab was switching the link); convergence p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        report.lost_total, report.lost_max_per_move, report.lost_during_link_switch, c.p50, c.p99, c.max
    );
    println!(
        "data-plane convergence (local install, confirmed move hint or delta): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} FEs acted on a hint before the delta",
        d.p50, d.p99, d.max, report.hints_applied
    );
    println!("stages (p50 ms):");
    for (name, s) in &report.stages_ms {
        println!("  {name:<24} {:>8.3}", s.p50);
    }
    println!("paper (§5): {} packets lost per move at a 10 ms ping interval", report.paper_lost_per_move_at_10ms);
    Ok(())
}

/// How long the lab waits for the old and the new FE's agents to apply an announcement before
/// it starts the move anyway.
const ANNOUNCE_APPLY_WAIT: Duration = Duration::from_secs(2);

/// Announces move `index` (FE `from` to FE `to`) for the VM's addresses `ips` unless
/// `--no-announce` (None). A refused announcement fails the move. Then waits (up to
/// [`ANNOUNCE_APPLY_WAIT`], not an error) until the agents of `from` (which relays) and `to`
/// (which holds) applied the announcement's revision, as a migration's own setup would give them
/// time to; returns per FE (`feN`) how long that took (ms; an FE missing did not within the wait).
pub(super) async fn announce_move(
    args: &MigrateArgs,
    plane: &ControlPlane,
    topo: &Topology,
    ips: &[IpAddr],
    (from, to): (usize, usize),
    index: usize,
) -> Result<Option<BTreeMap<String, f64>>> {
    if args.no_announce {
        return Ok(None);
    }
    let revision = plane
        .announce_migration(ips, &format!("fe{to}"))
        .await
        .with_context(|| format!("move {index}: announcing the migration to fe{to} (--no-announce moves without)"))?;
    let announced = std::time::Instant::now();
    let mut applied = BTreeMap::new();
    while announced.elapsed() < ANNOUNCE_APPLY_WAIT {
        for fe in [from, to] {
            let key = format!("fe{fe}");
            if !applied.contains_key(&key) && agent_counters(topo.fe(fe))?.revision >= revision as f64 {
                applied.insert(key, round(announced.elapsed().as_secs_f64() * 1e3));
            }
        }
        if applied.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(Some(applied))
}

/// Every FE's migration relay counters, by FE number (FEs whose agent exports none are left out).
pub(super) fn relay_snapshot(topo: &Topology) -> Result<BTreeMap<usize, RelayCounters>> {
    let mut all = BTreeMap::new();
    for n in 1..=topo.fes.len() {
        if let Some(c) = relay_counters(topo.fe(n))? {
            all.insert(n, c);
        }
    }
    Ok(all)
}

/// Per FE (`feN`) the change of its relay counters from `before` to `after` (FEs that exported
/// them both times).
pub(super) fn relay_change(
    before: &BTreeMap<usize, RelayCounters>,
    after: &BTreeMap<usize, RelayCounters>,
) -> BTreeMap<String, RelayCounters> {
    after.iter().filter_map(|(fe, a)| Some((format!("fe{fe}"), a.since(before.get(fe)?)))).collect()
}

/// The summary's line about the announcements.
pub(super) fn announced_line(announced: bool) -> &'static str {
    if announced {
        "moves announced to the controller first (AnnounceMigration without commit, naming the new FE)"
    } else {
        "moves not announced (--no-announce): learned only from what the new FE captures"
    }
}

/// When the agents applied one move's announcement, for the summary.
pub(super) fn applied_line(announced: bool, applied_ms: &BTreeMap<String, f64>) -> String {
    if !announced {
        return "not announced".into();
    }
    if applied_ms.is_empty() {
        return "announcement applied by neither FE within 2 s".into();
    }
    let per_fe: Vec<String> = applied_ms.iter().map(|(fe, ms)| format!("{fe} {ms:.1} ms")).collect();
    format!("announcement applied at {}", per_fe.join(", "))
}

/// One move's relay counters for the summary.
pub(super) fn relay_line(relay: &BTreeMap<String, RelayCounters>) -> String {
    if relay.is_empty() {
        return format!("relay: absent (the agents export no {RELAY_METRIC}_total)");
    }
    let per_fe: Vec<String> = relay
        .iter()
        .filter(|(_, c)| **c != RelayCounters::default())
        .map(|(fe, c)| {
            format!("{fe} copied {} held {} released {} expired {}", c.copied, c.held, c.released, c.expired)
        })
        .collect();
    if per_fe.is_empty() { "relay: nothing relayed".into() } else { format!("relay: {}", per_fe.join(", ")) }
}

impl SwitchMode {
    fn as_str(self) -> &'static str {
        match self {
            SwitchMode::Move => "move",
            SwitchMode::Clone => "clone",
        }
    }
}

/// Adds the VM's second link (same MAC and IP, a /32 so both can coexist until the old one is
/// removed) on FE `fe`'s bridge; the VM keeps its gateway's MAC (the shared virtual router MAC), as
/// a migrated VM keeps its ARP cache.
fn clone_link(vm_ns: &NetNs, new_if: &str, hv: &NetNs, spec: &VmSpec, fe: usize) -> Result<()> {
    attach_with(vm_ns, new_if, hv, spec, fe, &format!("{}/32", spec.ip))?;
    vm_ns.ip(&["neigh", "replace", GATEWAY, "lladdr", GATEWAY_MAC, "dev", new_if, "nud", "permanent"])?;
    Ok(())
}

/// Every agent's stage timestamps for `ip`: FE number → move_seq → event.
/// When an FE's data plane first forwarded to a move's new FE ([`dataplane_applied`]).
pub(super) struct DataplaneApplied {
    /// CLOCK_MONOTONIC ns.
    pub at: u64,
    /// It was a move hint (that the delta confirmed), before the delta.
    pub hinted: bool,
}

/// From an FE's event of one move: the earliest of its delta's apply, its local install (the new
/// FE: `is_new`) and a move hint the delta confirmed.
pub(super) fn dataplane_applied(event: &Value, is_new: bool) -> Option<DataplaneApplied> {
    let ns = |k: &str| event.get(k).and_then(Value::as_u64).filter(|t| *t > 0);
    let applied = ns("applied_mono_ns")?;
    let local = if is_new { ns("provisional_applied_mono_ns") } else { None };
    let confirmed = event.get("hint_end").and_then(Value::as_str) == Some("confirmed");
    let hinted = ns("hint_applied_mono_ns").filter(|h| confirmed && *h < applied);
    let at = [Some(applied), local, hinted].into_iter().flatten().min().unwrap_or(applied);
    Some(DataplaneApplied { at, hinted: hinted.is_some() })
}

pub(super) fn agent_events(topo: &Topology, ip: IpAddr) -> Result<BTreeMap<usize, BTreeMap<u64, Value>>> {
    let mut all = BTreeMap::new();
    for n in 1..=topo.fes.len() {
        let (_, body) = agent_get(topo.fe(n), &format!("/debug/events?vm={ip}"))?;
        let list: Value = serde_json::from_str(&body).with_context(|| format!("fe{n} /debug/events: {body}"))?;
        let by_seq = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.get("move_seq")?.as_u64()?, e.clone())))
            .collect();
        all.insert(n, by_seq);
    }
    Ok(all)
}

/// Waits until every FE's agent has applied binding version `move_seq` of `ip`, and the new
/// binding FE `local_fe` has also recorded the capture and the claim's answer.
pub(super) async fn wait_applied(
    topo: &Topology,
    ip: IpAddr,
    move_seq: u64,
    local_fe: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let set = |e: &Value, k: &str| e.get(k).and_then(Value::as_u64).unwrap_or(0) > 0;
    loop {
        let events = agent_events(topo, ip)?;
        let done: Vec<usize> = events
            .iter()
            .filter(|(fe, list)| {
                list.get(&move_seq).is_some_and(|e| {
                    set(e, "applied_mono_ns") && (**fe != local_fe || set(e, "claim_answered_mono_ns"))
                })
            })
            .map(|(fe, _)| *fe)
            .collect();
        if done.len() == topo.fes.len() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("binding {ip} move_seq {move_seq} complete only at FEs {done:?} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a move to FE `to`: `to` delivers the VM on its port (host route with VICTOR's protocol),
/// the old FE `old` no longer does, and the client's FE (fe1) has no local route for it. With
/// the kernel data plane (`dataplane` starts with `kernel`) fe1 and `old` route it through their
/// tunnel device to `to` instead (the userspace one keeps remote VMs in its own table).
pub(super) fn check_forwarding(
    topo: &Topology,
    vm: &VmSpec,
    to: usize,
    old: usize,
    mode: SwitchMode,
    dataplane: &str,
) -> Result<()> {
    let host = format!("{}/32", vm.ip);
    let new_routes = topo.routes(to, &[&host, "proto", "158"])?;
    ensure!(
        new_routes.contains(&format!(" dev {VM_PORT}")),
        "fe{to} has no host route to {} on a VM port: {new_routes:?}",
        vm.ip
    );
    let tunnel = peer_name(fe_addr(to));
    for n in [1, old] {
        let routes = topo.routes(n, &[&host])?;
        if dataplane.starts_with("kernel") {
            ensure!(
                routes.trim() == format!("{} dev {tunnel} proto 158 scope link", vm.ip),
                "fe{n} does not route {} through its tunnel to fe{to} ({tunnel}) after the move ({mode:?}): {routes:?}",
                vm.ip
            );
        } else {
            ensure!(
                routes.trim().is_empty(),
                "fe{n} still routes {} locally after the move ({mode:?}): {routes:?}",
                vm.ip
            );
        }
    }
    Ok(())
}

async fn controller_traces(plane: &ControlPlane, ip: IpAddr) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    for replica in &plane.replicas {
        let (_, body) = replica.get(&format!("/debug/moves?vm={ip}")).await?;
        if let Value::Array(list) = serde_json::from_str(&body).with_context(|| format!("/debug/moves: {body}"))? {
            all.extend(list);
        }
    }
    Ok(all)
}

/// The host's 1-minute load average (the machine is shared and noisy).
pub(super) fn load_avg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

/// The path agents use to reach the controllers on the host's loopback (`--controller-netns`).
pub fn controller_netns() -> Result<String> {
    let me = std::fs::metadata("/proc/self/ns/net")?;
    let init = std::fs::metadata("/proc/1/ns/net");
    use std::os::unix::fs::MetadataExt;
    // /proc/1/ns/net stays valid after we exit (victor-lab up); fall back to our own namespace.
    if init.is_ok_and(|m| m.ino() == me.ino() && m.dev() == me.dev()) {
        Ok("/proc/1/ns/net".into())
    } else {
        Ok(format!("/proc/{}/ns/net", std::process::id()))
    }
}
