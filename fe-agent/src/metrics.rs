//! Prometheus metrics of the agent (prometheus-client; text exposition at /metrics, names
//! prefixed `victor_agent_`). Counters are bumped where things happen, with the label each
//! module gives its own outcomes; the data-plane and VM-port capture counters are read at scrape time
//! (from the userspace forwarder, or from whatever implements [`TunnelCounts`] — the kernel data
//! plane —, from whatever implements [`CaptureCounts`], and from the userspace data plane's
//! announced migrations, [`MigrationCounts`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use victor_dataplane::counters::{CounterSnapshot, Counters};
use victor_dataplane::fib::Fib;
use victor_dataplane::migration::MigrationStats;
use victor_dataplane::neigh_io::NeighStats;

/// The VM-port captures' counters (ARP, RARP, NDP), read at scrape time.
pub trait CaptureCounts: Send + Sync + std::fmt::Debug {
    /// Malformed frames and frames the kernel dropped, over every capture so far.
    fn totals(&self) -> CaptureTotals;
}

/// What VM-port captures counted: malformed frames by (protocol, reason), kernel drops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureTotals {
    /// Malformed frames by (protocol label, reason label).
    pub malformed: BTreeMap<(&'static str, &'static str), u64>,
    /// Frames the kernel dropped because a capture socket's buffer was full.
    pub kernel_dropped: u64,
}

impl CaptureTotals {
    /// Adds one capture's counters.
    pub fn add(&mut self, stats: &NeighStats) {
        for (protocol, reason, n) in &stats.malformed {
            *self.malformed.entry((protocol, reason)).or_default() += n;
        }
        self.kernel_dropped += stats.kernel_dropped;
    }
}

/// The userspace forwarder's counters, read at scrape time.
pub trait ForwarderCounts: Send + Sync + std::fmt::Debug {
    /// The counters now.
    fn snapshot(&self) -> CounterSnapshot;
}

impl ForwarderCounts for Counters {
    fn snapshot(&self) -> CounterSnapshot {
        Counters::snapshot(self)
    }
}

/// The userspace data plane's announced migrations (`victor_dataplane::migration`), read at
/// scrape time.
pub trait MigrationCounts: Send + Sync + std::fmt::Debug {
    /// Relay totals since start.
    fn stats(&self) -> MigrationStats;
    /// Announced migrations in force.
    fn announced(&self) -> usize;
}

impl MigrationCounts for Fib {
    fn stats(&self) -> MigrationStats {
        self.migrations().stats()
    }

    fn announced(&self) -> usize {
        self.migrations().targets().len()
    }
}

/// The kernel data plane's counters, read at scrape time.
pub trait TunnelCounts: Send + Sync + std::fmt::Debug {
    /// The counters as last read from the kernel.
    fn snapshot(&self) -> TunnelSnapshot;
}

/// Counters of the kernel data plane: totals over the tunnel devices, drops by reason, per peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelSnapshot {
    /// Packets encapsulated towards peers.
    pub tx_packets: u64,
    /// Bytes encapsulated towards peers.
    pub tx_bytes: u64,
    /// Packets decapsulated from peers.
    pub rx_packets: u64,
    /// Bytes decapsulated from peers.
    pub rx_bytes: u64,
    /// Dropped packets by reason.
    pub drops: Vec<(&'static str, u64)>,
    /// Per registered FE.
    pub peers: Vec<PeerCounts>,
}

/// The tunnel to one FE, each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCounts {
    /// The FE's underlay address.
    pub peer: std::net::Ipv4Addr,
    /// Packets sent to it.
    pub tx_packets: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
    /// Packets that could not be sent to it.
    pub tx_errors: u64,
    /// Packets received from it.
    pub rx_packets: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Malformed packets received from it.
    pub rx_errors: u64,
}

/// Labels of the data-plane choice.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChoiceLabel {
    /// The backend running (tun, kernel).
    pub backend: &'static str,
    /// What was asked for (--dataplane auto, tun, kernel).
    pub mode: &'static str,
    /// Why this backend (a short code; the log and /readyz say it in words).
    pub why: &'static str,
}

/// A single label `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: &'static str,
}

/// A single label `protocol` (`arp`, `rarp`, `ndp`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// The protocol.
    pub protocol: &'static str,
}

/// Labels `protocol` and `reason` (malformed frames).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MalformedLabel {
    protocol: &'static str,
    reason: &'static str,
}

/// A single label `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: String,
}

/// A single label `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The outcome.
    pub outcome: String,
}

/// A single label `peer` (a BGP router's address).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The router.
    pub peer: String,
}

/// A single label `how` (how a move-hint override ended).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabel {
    /// How.
    pub how: &'static str,
}

/// Labels of a reconcile operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// The operation.
    pub op: &'static str,
    /// ok | error
    pub result: &'static str,
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// Bindings by kind (local / remote), refreshed every second.
    pub bindings: Family<KindLabel, Gauge>,
    /// VMs tracked on this FE's ports.
    pub local_vms: Gauge,
    /// Observations sent in Report calls.
    pub claims_sent: Counter,
    /// Claim results by outcome.
    pub claim_results: Family<OutcomeLabel, Counter>,
    /// Rejected claims by reason.
    pub claims_rejected: Family<ReasonLabel, Counter>,
    /// Observations waiting to be reported.
    pub reports_queued: Gauge,
    /// Report calls that failed and were retried.
    pub report_retries: Counter,
    /// ARP frames received on VM ports by kind.
    pub arp_frames: Family<KindLabel, Counter>,
    /// NDP frames received on VM ports, by kind.
    pub ndp_frames: Family<KindLabel, Counter>,
    /// RARP frames received on VM ports by kind (announce / request / reply).
    pub rarp_frames: Family<KindLabel, Counter>,
    /// Frames (ARP, RARP, NDP) dropped by the per-source rate limit, by protocol.
    pub neigh_rate_limited: Family<ProtocolLabel, Counter>,
    /// ARP frames sent by kind (gateway / proxy / announce / probe).
    pub arp_sent: Family<KindLabel, Counter>,
    /// NDP frames sent by kind.
    pub ndp_sent: Family<KindLabel, Counter>,
    /// Reconcile operations by op and result.
    pub reconcile_ops: Family<OpLabel, Counter>,
    /// Local installs done before the controller answered (make-before-break).
    pub provisional_installs: Counter,
    /// Local installs undone after a rejected claim.
    pub claims_undone: Counter,
    /// Revision of the applied desired state.
    pub stream_revision: Gauge,
    /// Stream lag: agent wall clock at receipt minus controller wall clock at sending (µs).
    pub stream_lag_micros: Gauge,
    /// Stream messages by phase.
    pub stream_messages: Family<KindLabel, Counter>,
    /// Complete snapshots applied.
    pub snapshots_received: Counter,
    /// 1 while a controller stream is up.
    pub controller_connected: Gauge,
    /// Sessions opened to a controller (first connect and every failover).
    pub controller_sessions: Counter,
    /// Registrations.
    pub registrations: Counter,
    /// Binding-table bytes of the desired state (estimate).
    pub desired_bytes: Gauge,
    /// Forwarding-table bytes (estimate).
    pub fib_bytes: Gauge,
    /// 1 for the data-plane backend in use.
    pub dataplane: Family<KindLabel, Gauge>,
    /// 1 for the data-plane backend in use, with what was asked for and why it runs.
    pub dataplane_choice: Family<ChoiceLabel, Gauge>,
    /// 1 while the BGP session to a router is established.
    pub bgp_session_up: Family<PeerLabel, Gauge>,
    /// 1 while a router has the mobile prefixes from us.
    pub bgp_announced: Family<PeerLabel, Gauge>,
    /// BGP sessions established, by router.
    pub bgp_sessions_established: Family<PeerLabel, Counter>,
    /// 1 while the FE is healthy enough to attract traffic.
    pub bgp_healthy: Gauge,
    /// Withdrawals of the mobile prefixes by cause (headless, dataplane, shutdown).
    pub bgp_withdrawals: Family<KindLabel, Counter>,
    /// Move-hint datagrams sent by kind (move, cancel), one per receiving FE.
    pub hints_sent: Family<KindLabel, Counter>,
    /// Move hints accepted by kind.
    pub hints_accepted: Family<KindLabel, Counter>,
    /// Move hints rejected by reason.
    pub hints_rejected: Family<ReasonLabel, Counter>,
    /// Move-hint overrides ended, by how (confirmed, superseded, expired, cancelled, ...).
    pub hint_overrides_ended: Family<HowLabel, Counter>,
    /// Move-hint overrides in force.
    pub hint_overrides: Gauge,
    dataplane_counters: Arc<DataplaneCollector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("victor_agent");
        let collector = Arc::new(DataplaneCollector::default());
        let m = Metrics {
            registry: Registry::default(),
            bindings: Family::default(),
            local_vms: Gauge::default(),
            claims_sent: Counter::default(),
            claim_results: Family::default(),
            claims_rejected: Family::default(),
            reports_queued: Gauge::default(),
            report_retries: Counter::default(),
            arp_frames: Family::default(),
            ndp_frames: Family::default(),
            rarp_frames: Family::default(),
            neigh_rate_limited: Family::default(),
            arp_sent: Family::default(),
            ndp_sent: Family::default(),
            reconcile_ops: Family::default(),
            provisional_installs: Counter::default(),
            claims_undone: Counter::default(),
            stream_revision: Gauge::default(),
            stream_lag_micros: Gauge::default(),
            stream_messages: Family::default(),
            snapshots_received: Counter::default(),
            controller_connected: Gauge::default(),
            controller_sessions: Counter::default(),
            registrations: Counter::default(),
            desired_bytes: Gauge::default(),
            fib_bytes: Gauge::default(),
            dataplane: Family::default(),
            dataplane_choice: Family::default(),
            bgp_session_up: Family::default(),
            bgp_announced: Family::default(),
            bgp_sessions_established: Family::default(),
            bgp_healthy: Gauge::default(),
            bgp_withdrawals: Family::default(),
            hints_sent: Family::default(),
            hints_accepted: Family::default(),
            hints_rejected: Family::default(),
            hint_overrides_ended: Family::default(),
            hint_overrides: Gauge::default(),
            dataplane_counters: collector.clone(),
        };
        registry.register("bindings", "Bindings in the desired state by kind (local, remote)", m.bindings.clone());
        registry.register("local_vms", "VMs tracked on this FE's VM ports", m.local_vms.clone());
        registry.register("claims_sent", "Observations sent to the controller", m.claims_sent.clone());
        registry.register("claim_results", "Claim results by outcome", m.claim_results.clone());
        registry.register("claims_rejected", "Rejected claims by reason", m.claims_rejected.clone());
        registry.register("reports_queued", "Observations waiting to be reported", m.reports_queued.clone());
        registry.register("report_retries", "Report calls that failed and were retried", m.report_retries.clone());
        registry.register("arp_frames", "ARP frames received on VM ports by kind", m.arp_frames.clone());
        registry.register("ndp_frames", "NDP frames received on VM ports by kind", m.ndp_frames.clone());
        registry.register(
            "rarp_frames",
            "RARP frames received on VM ports by kind (announce: QEMU's announce-self; request; reply)",
            m.rarp_frames.clone(),
        );
        registry.register(
            "neigh_rate_limited",
            "Frames on VM ports (ARP, RARP, NDP) dropped by the per-source rate limit, by protocol",
            m.neigh_rate_limited.clone(),
        );
        registry.register("arp_sent", "ARP frames sent by kind", m.arp_sent.clone());
        registry.register("ndp_sent", "NDP frames sent by kind", m.ndp_sent.clone());
        registry.register("reconcile_ops", "Kernel and data-plane operations", m.reconcile_ops.clone());
        registry.register(
            "provisional_installs",
            "Local routes installed before the controller answered (make-before-break)",
            m.provisional_installs.clone(),
        );
        registry.register("claims_undone", "Local installs undone after a rejected claim", m.claims_undone.clone());
        registry.register("stream_revision", "Revision of the applied desired state", m.stream_revision.clone());
        registry.register(
            "stream_lag_microseconds",
            "Last stream message: receipt (agent wall clock) minus sending (controller wall clock)",
            m.stream_lag_micros.clone(),
        );
        registry.register("stream_messages", "Stream messages by phase", m.stream_messages.clone());
        registry.register("snapshots_received", "Complete snapshots applied", m.snapshots_received.clone());
        registry.register("controller_connected", "1 while a controller stream is up", m.controller_connected.clone());
        registry.register("controller_sessions", "Sessions opened to a controller", m.controller_sessions.clone());
        registry.register("registrations", "Registrations of this FE", m.registrations.clone());
        registry.register(
            "desired_bytes",
            "Heap bytes of the desired binding table (estimate)",
            m.desired_bytes.clone(),
        );
        registry.register("fib_bytes", "Heap bytes of the forwarding table (estimate)", m.fib_bytes.clone());
        registry.register("dataplane_backend", "1 for the data-plane backend in use", m.dataplane.clone());
        registry.register(
            "dataplane_choice",
            "1 for the data-plane backend in use: asked for (mode) and why (requested, ipip_loaded, ipip_modprobed, ipip_autoloaded, ipip_unavailable, sit_unavailable, kernel_failed)",
            m.dataplane_choice.clone(),
        );
        registry.register("bgp_session_up", "1 while the BGP session to the router is up", m.bgp_session_up.clone());
        registry.register(
            "bgp_announced",
            "1 while the router has the mobile prefixes from us",
            m.bgp_announced.clone(),
        );
        registry.register(
            "bgp_sessions_established",
            "BGP sessions established by router",
            m.bgp_sessions_established.clone(),
        );
        registry.register("bgp_healthy", "1 while this FE may attract traffic (advertiser)", m.bgp_healthy.clone());
        registry.register(
            "bgp_withdrawals",
            "Withdrawals of the mobile prefixes by cause (headless, dataplane, shutdown)",
            m.bgp_withdrawals.clone(),
        );
        registry.register(
            "move_hints_sent",
            "Move-hint datagrams sent by kind (move, cancel), one per receiving FE",
            m.hints_sent.clone(),
        );
        registry.register("move_hints_accepted", "Move hints accepted by kind", m.hints_accepted.clone());
        registry.register(
            "move_hints_rejected",
            "Move hints rejected by reason (bad_hmac, source_mismatch, stale_seq, replay, ...)",
            m.hints_rejected.clone(),
        );
        registry.register(
            "move_hint_overrides_ended",
            "Provisional overrides from move hints ended, by how (confirmed, superseded, expired, cancelled, peer_down, replaced)",
            m.hint_overrides_ended.clone(),
        );
        registry.register(
            "move_hint_overrides",
            "Provisional overrides from move hints in force",
            m.hint_overrides.clone(),
        );
        registry.register_collector(Box::new(collector));
        Metrics { registry, ..m }
    }

    /// Starts reporting the ARP captures' malformed-frame counts.
    pub fn attach_captures(&self, captures: Arc<dyn CaptureCounts>) {
        *self.dataplane_counters.captures.lock().expect("collector lock") = Some(captures);
    }

    /// Starts reporting the forwarder's counters.
    pub fn attach_dataplane(&self, counters: Arc<Counters>) {
        *self.dataplane_counters.counters.lock().expect("collector lock") = Some(counters);
    }

    /// Starts reporting the announced migrations' relay (userspace data plane).
    pub fn attach_migrations(&self, migrations: Arc<dyn MigrationCounts>) {
        *self.dataplane_counters.migrations.lock().expect("collector lock") = Some(migrations);
    }

    /// Starts reporting the kernel data plane's counters.
    pub fn attach_tunnels(&self, tunnels: Arc<dyn TunnelCounts>) {
        *self.dataplane_counters.tunnels.lock().expect("collector lock") = Some(tunnels);
    }

    /// Counts one reconcile operation.
    pub fn reconcile_op(&self, op: &'static str, ok: bool) {
        self.reconcile_ops.get_or_create(&OpLabel { op, result: if ok { "ok" } else { "error" } }).inc();
    }

    /// Counts one claim result.
    pub fn claim_result(&self, outcome: victor_proto::v1::ClaimOutcome, reason: victor_proto::v1::RejectReason) {
        let name = |s: &str, p: &str| s.trim_start_matches(p).to_ascii_lowercase();
        self.claim_results
            .get_or_create(&OutcomeLabel { outcome: name(outcome.as_str_name(), "CLAIM_OUTCOME_") })
            .inc();
        if outcome == victor_proto::v1::ClaimOutcome::Rejected {
            self.claims_rejected
                .get_or_create(&ReasonLabel { reason: name(reason.as_str_name(), "REJECT_REASON_") })
                .inc();
        }
    }

    /// Counts `n` move-hint datagrams of `kind` sent.
    pub fn hint_sent(&self, kind: &'static str, n: usize) {
        self.hints_sent.get_or_create(&KindLabel { kind }).inc_by(n as u64);
    }

    /// Counts an accepted move hint of `kind`.
    pub fn hint_accepted(&self, kind: &'static str) {
        self.hints_accepted.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts a move hint rejected for `reason`.
    pub fn hint_rejected(&self, reason: &'static str) {
        self.hints_rejected.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Counts an override that ended `how`.
    pub fn hint_override_ended(&self, how: &'static str) {
        self.hint_overrides_ended.get_or_create(&HowLabel { how }).inc();
    }

    /// Renders the text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the forwarder's counters at scrape time.
#[derive(Debug, Default)]
struct DataplaneCollector {
    counters: Mutex<Option<Arc<dyn ForwarderCounts>>>,
    tunnels: Mutex<Option<Arc<dyn TunnelCounts>>>,
    captures: Mutex<Option<Arc<dyn CaptureCounts>>>,
    migrations: Mutex<Option<Arc<dyn MigrationCounts>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhatLabel {
    what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirectionLabel {
    peer: String,
    direction: &'static str,
}

/// Renders the kernel data plane's counters (the same families as the userspace forwarder's
/// where they mean the same: `dataplane_packets`/`dataplane_bytes` by direction,
/// `dataplane_drops` by reason), plus per-peer families.
fn encode_tunnels(s: &TunnelSnapshot, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(0u64);
    let directions = [("tunnel_tx", s.tx_packets, s.tx_bytes), ("tunnel_rx", s.rx_packets, s.rx_bytes)];
    for (name, help, bytes) in [
        ("dataplane_packets", "Kernel data plane packets by direction (sums over the peer tunnel devices)", false),
        ("dataplane_bytes", "Kernel data plane bytes by direction (sums over the peer tunnel devices)", true),
    ] {
        let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
        for (direction, packets, octets) in directions {
            let value = if bytes { octets } else { packets };
            ConstCounter::new(value).encode(family.encode_family(&DirectionLabel { direction })?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "dataplane_drops",
        "Packets the kernel data plane dropped by reason (unknown_peer = IP-in-IP or 6in4 from an unregistered source; no_binding = for a mobile IP without a binding; tunnel_tx_error, tunnel_rx_error)",
        None,
        counter.metric_type(),
    )?;
    for (reason, n) in &s.drops {
        ConstCounter::new(*n).encode(family.encode_family(&ReasonLabel { reason: (*reason).to_owned() })?)?;
    }
    type Pick = fn(&PeerCounts) -> [(&'static str, u64); 2];
    let families: [(&str, &str, Pick); 3] = [
        (
            "dataplane_peer_packets",
            "Packets through the tunnel to each registered FE (tx: sent to it, rx: received from it)",
            |p| [("tx", p.tx_packets), ("rx", p.rx_packets)],
        ),
        ("dataplane_peer_bytes", "Bytes through the tunnel to each registered FE", |p| {
            [("tx", p.tx_bytes), ("rx", p.rx_bytes)]
        }),
        (
            "dataplane_peer_errors",
            "Errors on the tunnel to each registered FE (tx: could not be sent; rx: malformed)",
            |p| [("tx", p.tx_errors), ("rx", p.rx_errors)],
        ),
    ];
    for (name, help, pick) in families {
        let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
        for p in &s.peers {
            for (direction, value) in pick(p) {
                let label = PeerDirectionLabel { peer: p.peer.to_string(), direction };
                ConstCounter::new(value).encode(family.encode_family(&label)?)?;
            }
        }
    }
    let gauge = ConstGauge::new(s.peers.len() as i64);
    let metric = encoder.encode_descriptor(
        "dataplane_peers",
        "Registered FEs with a tunnel device (kernel data plane)",
        None,
        gauge.metric_type(),
    )?;
    gauge.encode(metric)
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Some(captures) = self.captures.lock().expect("collector lock").clone() {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "neigh_malformed",
                "Malformed frames on VM ports by protocol (arp, rarp, ndp, ethernet) and reason",
                None,
                counter.metric_type(),
            )?;
            let totals = captures.totals();
            for ((protocol, reason), n) in totals.malformed {
                ConstCounter::new(n).encode(family.encode_family(&MalformedLabel { protocol, reason })?)?;
            }
            let counter = ConstCounter::new(totals.kernel_dropped);
            let metric = encoder.encode_descriptor(
                "neigh_kernel_dropped",
                "Frames (ARP, RARP, NDP) the kernel dropped on VM ports because a capture socket's buffer was full",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        if let Some(tunnels) = self.tunnels.lock().expect("collector lock").clone() {
            encode_tunnels(&tunnels.snapshot(), &mut encoder)?;
        }
        if let Some(migrations) = self.migrations.lock().expect("collector lock").clone() {
            encode_migrations(&migrations.stats(), migrations.announced(), &mut encoder)?;
        }
        let Some(counters) = self.counters.lock().expect("collector lock").clone() else { return Ok(()) };
        encode_forwarder(&counters.snapshot(), &mut encoder)
    }
}

/// Renders the announced-migration relay: `migration_relay_packets_total{what}` and
/// `migrations_announced`.
fn encode_migrations(
    s: &MigrationStats,
    announced: usize,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(0u64);
    let mut family = encoder.encode_descriptor(
        "migration_relay_packets",
        "Packets of VMs with an announced migration (userspace data plane): copied = sent to the announced FE by the FE the VM is local at; held = kept by the announced FE until the VM is local there; released = held and then delivered; expired = held and dropped (too old, pushed out, never claimed)",
        None,
        counter.metric_type(),
    )?;
    for (what, n) in [("copied", s.copied), ("held", s.held), ("released", s.released), ("expired", s.expired)] {
        ConstCounter::new(n).encode(family.encode_family(&WhatLabel { what })?)?;
    }
    let gauge = ConstGauge::new(i64::try_from(announced).unwrap_or(i64::MAX));
    let metric = encoder.encode_descriptor(
        "migrations_announced",
        "VMs with an announced migration the data plane relays (Binding.pending_fe_id naming a registered FE)",
        None,
        gauge.metric_type(),
    )?;
    gauge.encode(metric)
}

/// Renders the userspace forwarder's counters.
fn encode_forwarder(s: &CounterSnapshot, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let directions = [
        ("tun_rx", s.tun_rx_packets, s.tun_rx_bytes),
        ("tunnel_tx", s.tunnel_tx_packets, s.tunnel_tx_bytes),
        ("tunnel_rx", s.tunnel_rx_packets, s.tunnel_rx_bytes),
        ("tun_tx", s.tun_tx_packets, s.tun_tx_bytes),
    ];
    for (name, help, pick) in [
        ("dataplane_packets", "Userspace forwarder packets by direction", 0usize),
        ("dataplane_bytes", "Userspace forwarder bytes by direction", 1),
    ] {
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
        for (direction, packets, bytes) in directions {
            let value = if pick == 0 { packets } else { bytes };
            ConstCounter::new(value).encode(family.encode_family(&DirectionLabel { direction })?)?;
        }
    }
    let counter = ConstCounter::new(0u64);
    let mut family = encoder.encode_descriptor(
            "dataplane_drops",
            "Packets dropped by the userspace forwarder by reason (no_binding = no binding here: dropped; unknown_peer = IP-in-IP from an unregistered source)",
            None,
            counter.metric_type(),
        )?;
    for (reason, n) in &s.drops {
        let label = ReasonLabel { reason: reason.as_str().to_owned() };
        ConstCounter::new(*n).encode(family.encode_family(&label)?)?;
    }
    let mut family = encoder.encode_descriptor(
        "dataplane_icmp_sent",
        "ICMP and ICMPv6 errors sent by the forwarder by kind",
        None,
        counter.metric_type(),
    )?;
    for (kind, n) in [
        ("time_exceeded", s.icmp_time_exceeded),
        ("frag_needed", s.icmp_frag_needed),
        ("icmp6_time_exceeded", s.icmp6_time_exceeded),
        ("icmp6_packet_too_big", s.icmp6_packet_too_big),
    ] {
        ConstCounter::new(n).encode(family.encode_family(&KindLabel { kind })?)?;
    }
    encode_forwarder_details(s, encoder)
}

/// A value by kind label.
type Kinded = (&'static str, u64);

/// The userspace forwarder's counters beyond packets, bytes, drops and ICMP sent: ICMP errors
/// not sent, system calls (batching and offload at work), and the IPv6 share of packets and drops.
fn encode_forwarder_details(s: &CounterSnapshot, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(0u64);
    let mut family = encoder.encode_descriptor(
        "dataplane_icmp_not_sent",
        "ICMP and ICMPv6 errors the forwarder did not send by reason (suppressed: the packet must not be answered; rate_limited)",
        None,
        counter.metric_type(),
    )?;
    for (reason, n) in [("suppressed", s.icmp_suppressed), ("rate_limited", s.icmp_rate_limited)] {
        ConstCounter::new(n).encode(family.encode_family(&ReasonLabel { reason: reason.to_owned() })?)?;
    }
    let calls: [(&str, &str, Vec<Kinded>); 2] = [
        (
            "dataplane_syscalls",
            "Forwarder system calls by kind (tun_read, tun_write, underlay_send = sendmmsg, underlay_recv = recvmmsg); packets per call = dataplane_packets / this",
            vec![
                ("tun_read", s.tun_reads),
                ("tun_write", s.tun_writes),
                ("underlay_send", s.underlay_sends),
                ("underlay_recv", s.underlay_recvs),
            ],
        ),
        (
            "dataplane_gso_syscalls",
            "Of dataplane_syscalls: TUN reads and writes that carried a GSO super-packet",
            vec![("tun_read", s.tun_reads_gso), ("tun_write", s.tun_writes_gso)],
        ),
    ];
    for (name, help, values) in calls {
        let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
        for (kind, n) in values {
            ConstCounter::new(n).encode(family.encode_family(&KindLabel { kind })?)?;
        }
    }
    let coalesced = ConstCounter::new(s.underlay_rx_coalesced);
    let metric = encoder.encode_descriptor(
        "dataplane_underlay_rx_coalesced",
        "Tunnel packets from the underlay longer than the tunnel MTU (already coalesced by the kernel's GRO), forwarded into TUN as one super-packet",
        None,
        coalesced.metric_type(),
    )?;
    coalesced.encode(metric)?;
    let mut family = encoder.encode_descriptor(
        "dataplane_ipv6_packets",
        "Of dataplane_packets: IPv6 packets (6in4 on the underlay) by direction",
        None,
        counter.metric_type(),
    )?;
    for (direction, n) in [
        ("tun_rx", s.ipv6_tun_rx_packets),
        ("tunnel_tx", s.ipv6_tunnel_tx_packets),
        ("tunnel_rx", s.ipv6_tunnel_rx_packets),
        ("tun_tx", s.ipv6_tun_tx_packets),
    ] {
        ConstCounter::new(n).encode(family.encode_family(&DirectionLabel { direction })?)?;
    }
    let mut family = encoder.encode_descriptor(
        "dataplane_ipv6_drops",
        "Of dataplane_drops: IPv6 packets (from TUN) and 6in4 packets (from the underlay) by reason",
        None,
        counter.metric_type(),
    )?;
    for (reason, n) in &s.drops_v6 {
        ConstCounter::new(*n).encode(family.encode_family(&ReasonLabel { reason: reason.as_str().to_owned() })?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(TunnelSnapshot);

    impl TunnelCounts for Fixed {
        fn snapshot(&self) -> TunnelSnapshot {
            self.0.clone()
        }
    }

    impl ForwarderCounts for CounterSnapshot {
        fn snapshot(&self) -> CounterSnapshot {
            self.clone()
        }
    }

    /// Every counter of the userspace forwarder's snapshot is exported, IPv6 ones included.
    #[test]
    fn forwarder_counters_are_exposed() {
        use victor_dataplane::counters::DropReason;
        let m = Metrics::new();
        let reason = DropReason::ALL[0];
        m.dataplane_counters.counters.lock().unwrap().replace(Arc::new(CounterSnapshot {
            tun_rx_packets: 10,
            ipv6_tun_rx_packets: 3,
            ipv6_tunnel_tx_packets: 4,
            ipv6_tunnel_rx_packets: 5,
            ipv6_tun_tx_packets: 6,
            icmp6_time_exceeded: 7,
            icmp6_packet_too_big: 8,
            icmp_suppressed: 9,
            icmp_rate_limited: 11,
            tun_reads: 12,
            tun_reads_gso: 13,
            tun_writes: 14,
            tun_writes_gso: 15,
            underlay_sends: 16,
            underlay_recvs: 17,
            underlay_rx_coalesced: 18,
            drops: vec![(reason, 20)],
            drops_v6: vec![(reason, 19)],
            ..CounterSnapshot::default()
        }));
        let text = m.render();
        let r = reason.as_str();
        for line in [
            "victor_agent_dataplane_packets_total{direction=\"tun_rx\"} 10".to_owned(),
            "victor_agent_dataplane_ipv6_packets_total{direction=\"tun_rx\"} 3".to_owned(),
            "victor_agent_dataplane_ipv6_packets_total{direction=\"tunnel_tx\"} 4".to_owned(),
            "victor_agent_dataplane_ipv6_packets_total{direction=\"tunnel_rx\"} 5".to_owned(),
            "victor_agent_dataplane_ipv6_packets_total{direction=\"tun_tx\"} 6".to_owned(),
            "victor_agent_dataplane_icmp_sent_total{kind=\"icmp6_time_exceeded\"} 7".to_owned(),
            "victor_agent_dataplane_icmp_sent_total{kind=\"icmp6_packet_too_big\"} 8".to_owned(),
            "victor_agent_dataplane_icmp_not_sent_total{reason=\"suppressed\"} 9".to_owned(),
            "victor_agent_dataplane_icmp_not_sent_total{reason=\"rate_limited\"} 11".to_owned(),
            "victor_agent_dataplane_syscalls_total{kind=\"tun_read\"} 12".to_owned(),
            "victor_agent_dataplane_gso_syscalls_total{kind=\"tun_read\"} 13".to_owned(),
            "victor_agent_dataplane_syscalls_total{kind=\"tun_write\"} 14".to_owned(),
            "victor_agent_dataplane_gso_syscalls_total{kind=\"tun_write\"} 15".to_owned(),
            "victor_agent_dataplane_syscalls_total{kind=\"underlay_send\"} 16".to_owned(),
            "victor_agent_dataplane_syscalls_total{kind=\"underlay_recv\"} 17".to_owned(),
            "victor_agent_dataplane_underlay_rx_coalesced_total 18".to_owned(),
            format!("victor_agent_dataplane_ipv6_drops_total{{reason=\"{r}\"}} 19"),
            format!("victor_agent_dataplane_drops_total{{reason=\"{r}\"}} 20"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    /// The announced-migration relay comes out under the names the lab reads, from the data
    /// plane's own table and totals.
    #[test]
    fn migration_relay_is_exposed() {
        let m = Metrics::new();
        assert!(!m.render().contains("migration"), "nothing before a userspace data plane is attached");
        let fib = Arc::new(Fib::new(std::net::Ipv4Addr::new(198, 51, 100, 1)));
        let to = std::net::Ipv4Addr::new(198, 51, 100, 3);
        fib.migrations().set_target(std::net::Ipv4Addr::new(10, 10, 0, 11), Some(to));
        fib.migrations().set_target(std::net::Ipv4Addr::new(10, 10, 0, 12), Some(to));
        fib.migrations().copied(3);
        fib.migrations().hold(std::net::IpAddr::from([10, 10, 0, 11]), b"packet", std::time::Instant::now());
        m.attach_migrations(fib);
        let text = m.render();
        for line in [
            "victor_agent_migration_relay_packets_total{what=\"copied\"} 3",
            "victor_agent_migration_relay_packets_total{what=\"held\"} 1",
            "victor_agent_migration_relay_packets_total{what=\"released\"} 0",
            "victor_agent_migration_relay_packets_total{what=\"expired\"} 0",
            "victor_agent_migrations_announced 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    /// The kernel data plane's counters come out under the userspace forwarder's family names
    /// where they mean the same, plus the per-peer families and the choice.
    #[test]
    fn kernel_counters_and_the_choice_are_exposed() {
        let m = Metrics::new();
        let peer = std::net::Ipv4Addr::new(198, 51, 100, 2);
        m.attach_tunnels(Arc::new(Fixed(TunnelSnapshot {
            tx_packets: 30,
            tx_bytes: 3000,
            rx_packets: 4,
            rx_bytes: 400,
            drops: vec![("unknown_peer", 5), ("no_binding", 7)],
            peers: vec![PeerCounts {
                peer,
                tx_packets: 30,
                tx_bytes: 3000,
                tx_errors: 1,
                rx_packets: 4,
                rx_bytes: 400,
                rx_errors: 0,
            }],
        })));
        let label = ChoiceLabel { backend: "kernel", mode: "auto", why: "ipip_modprobed" };
        m.dataplane_choice.get_or_create(&label).set(1);
        let text = m.render();
        for line in [
            "victor_agent_dataplane_packets_total{direction=\"tunnel_tx\"} 30",
            "victor_agent_dataplane_bytes_total{direction=\"tunnel_rx\"} 400",
            "victor_agent_dataplane_drops_total{reason=\"unknown_peer\"} 5",
            "victor_agent_dataplane_drops_total{reason=\"no_binding\"} 7",
            "victor_agent_dataplane_peer_packets_total{peer=\"198.51.100.2\",direction=\"tx\"} 30",
            "victor_agent_dataplane_peer_bytes_total{peer=\"198.51.100.2\",direction=\"rx\"} 400",
            "victor_agent_dataplane_peer_errors_total{peer=\"198.51.100.2\",direction=\"tx\"} 1",
            "victor_agent_dataplane_peers 1",
            "victor_agent_dataplane_choice{backend=\"kernel\",mode=\"auto\",why=\"ipip_modprobed\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
