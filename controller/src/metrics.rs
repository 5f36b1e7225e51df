//! Prometheus metrics of one controller replica (prometheus-client, text exposition at /metrics).
//! Counters are updated where things happen; gauges that mirror the cache are refreshed when
//! scraped. Series about VM bindings carry the VM IP's address family (`family="ipv4|ipv6"`;
//! `none` on a refused claim that named no usable IP, e.g. a malformed address or an unknown MAC).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::IpAddr;

use crate::cache::Cache;

/// The `family` label of a VM IP.
pub fn family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => FAMILIES[0],
        IpAddr::V6(_) => FAMILIES[1],
    }
}

/// The `family` label of a VM IP as sent on the wire (4 or 16 bytes; anything else: `none`).
pub fn family_of_bytes(ip: &[u8]) -> &'static str {
    match ip.len() {
        4 => FAMILIES[0],
        16 => FAMILIES[1],
        _ => NO_FAMILY,
    }
}

/// The address families of VM IPs, as `family` label values.
pub const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

/// The `family` of a refused claim that named no usable IP.
pub const NO_FAMILY: &str = "none";

/// Label: the address family of the VM IPs counted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    /// ipv4 | ipv6
    pub family: &'static str,
}

/// Labels: a claim outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// bound | moved | unchanged | removed | rejected
    pub outcome: &'static str,
    /// ipv4 | ipv6 | none
    pub family: &'static str,
}

/// Labels: why a claim was rejected.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The rejection reason, snake case (`stale`, `mac_mismatch`, ...).
    pub reason: &'static str,
    /// ipv4 | ipv6 | none
    pub family: &'static str,
}

/// Label: a store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// txn | range | lease
    pub op: &'static str,
}

/// Label: FE health.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// up | down
    pub state: &'static str,
}

/// Labels: a refused call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    /// agent | binding
    pub service: &'static str,
    /// unauthenticated | permission_denied
    pub reason: &'static str,
}

/// Label: a stream limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// connection | agent | watch
    pub limit: &'static str,
}

/// Label: one of the replica's servers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabel {
    /// grpc | http
    pub server: &'static str,
}

/// Labels: a connection closed by a timeout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabel {
    /// grpc | http
    pub server: &'static str,
    /// handshake | idle
    pub reason: &'static str,
}

/// All metrics of the replica.
pub struct Metrics {
    registry: Registry,
    /// Claims by outcome.
    pub claims: Family<OutcomeLabel, Counter>,
    /// Rejected claims by reason.
    pub claims_rejected: Family<ReasonLabel, Counter>,
    /// Committed moves by family.
    pub moves: Family<FamilyLabel, Counter>,
    /// Bindings frozen by flap damping, by family.
    pub damping_frozen: Family<FamilyLabel, Counter>,
    /// CAS conflicts that needed a re-read.
    pub cas_retries: Counter,
    /// Tombstones of removed bindings collected by housekeeping, by family.
    pub tombstones_collected: Family<FamilyLabel, Counter>,
    /// Store request latency by operation.
    pub store_latency: Family<OpLabel, Histogram>,
    /// Store requests that failed as unavailable.
    pub store_unavailable: Counter,
    /// Commit → applied-by-this-replica's-cache latency of this replica's writes (observed by the
    /// status feed for claims that bound or moved a VM through this replica).
    pub commit_to_cache: Histogram,
    /// Claim received → first agent stream message carrying the new binding left this replica,
    /// for moves committed through this replica.
    pub move_convergence: Histogram,
    /// Calls refused by authentication or authorisation.
    pub auth_failures: Family<AuthLabel, Counter>,
    /// Status page live-feed (server-sent events) clients.
    pub status_clients: Gauge,
    /// Agent streams being served.
    pub agent_streams: Gauge,
    /// Revisions a stream was behind when it sent (lag).
    pub stream_lag_revisions: Histogram,
    /// Snapshots sent to agents.
    pub snapshots_sent: Counter,
    /// Agent stream messages sent (snapshot parts, deltas, heartbeats).
    pub stream_messages: Counter,
    /// Agent stream heartbeats sent (messages of idle streams).
    pub stream_heartbeats: Counter,
    /// Ticks of the fan-out clock (each lets every current agent stream send one delta).
    pub fanout_ticks: Counter,
    /// Fan-out time: from a tick until the last stream waiting for it has sent.
    pub fanout_seconds: Histogram,
    /// Binding watch streams being served.
    pub binding_watchers: Gauge,
    /// Streams refused by a limit.
    pub streams_refused: Family<LimitLabel, Counter>,
    /// Bytes of snapshot parts built (agent streams and binding watches).
    pub snapshot_bytes: Counter,
    /// Open client connections per server.
    pub connections: Family<ServerLabel, Gauge>,
    /// Connections closed at once because the server had its maximum.
    pub connections_refused: Family<ServerLabel, Counter>,
    /// Connections closed by the handshake or idle timeout.
    pub connections_timed_out: Family<TimeoutLabel, Counter>,
    /// Leases of this replica (presence, housekeeping election) that expired before renewal.
    pub replica_leases_lost: Counter,
    /// Binding events sent on binding watches (snapshot and changes), by family.
    pub watch_events: Family<FamilyLabel, Counter>,
    /// Bindings by family (from the cache).
    pub bindings: Family<FamilyLabel, Gauge>,
    /// Frozen bindings by family (from the cache).
    pub bindings_frozen: Family<FamilyLabel, Gauge>,
    /// Declared VMs by family.
    pub vms: Family<FamilyLabel, Gauge>,
    /// FEs by health.
    pub fes: Family<StateLabel, Gauge>,
    /// Highest revision in the cache.
    pub cache_revision: Gauge,
    /// Re-lists of the cache (compaction, outages).
    pub cache_relists: Gauge,
    /// 1 if this replica runs housekeeping.
    pub housekeeper: Gauge,
    /// 1 while the store answers.
    pub store_reachable: Gauge,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("victor");
        let latency = || Histogram::new(exponential_buckets(0.000_1, 2.0, 16));
        let m = Metrics {
            claims: Family::default(),
            claims_rejected: Family::default(),
            moves: Family::default(),
            damping_frozen: Family::default(),
            cas_retries: Counter::default(),
            tombstones_collected: Family::default(),
            store_latency: Family::new_with_constructor(latency),
            store_unavailable: Counter::default(),
            commit_to_cache: latency(),
            move_convergence: latency(),
            auth_failures: Family::default(),
            status_clients: Gauge::default(),
            agent_streams: Gauge::default(),
            stream_lag_revisions: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            snapshots_sent: Counter::default(),
            stream_messages: Counter::default(),
            stream_heartbeats: Counter::default(),
            fanout_ticks: Counter::default(),
            fanout_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 16)),
            binding_watchers: Gauge::default(),
            streams_refused: Family::default(),
            snapshot_bytes: Counter::default(),
            connections: Family::default(),
            connections_refused: Family::default(),
            connections_timed_out: Family::default(),
            replica_leases_lost: Counter::default(),
            watch_events: Family::default(),
            bindings: Family::default(),
            bindings_frozen: Family::default(),
            vms: Family::default(),
            fes: Family::default(),
            cache_revision: Gauge::default(),
            cache_relists: Gauge::default(),
            housekeeper: Gauge::default(),
            store_reachable: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("claims", "Agent observations by outcome", m.claims.clone());
        registry.register("claims_rejected", "Rejected agent observations by reason", m.claims_rejected.clone());
        registry.register("moves", "Committed VM moves", m.moves.clone());
        registry.register("damping_frozen", "Bindings frozen by flap damping", m.damping_frozen.clone());
        registry.register("cas_retries", "Compare-and-swap conflicts that needed a re-read", m.cas_retries.clone());
        registry.register(
            "tombstones_collected",
            "Tombstones of removed bindings collected after --tombstone-retention",
            m.tombstones_collected.clone(),
        );
        registry.register("store_request_seconds", "Store request latency", m.store_latency.clone());
        registry.register(
            "store_unavailable",
            "Store requests that failed as unavailable",
            m.store_unavailable.clone(),
        );
        registry.register(
            "commit_to_cache_seconds",
            "Time from a commit by this replica to its cache applying it",
            m.commit_to_cache.clone(),
        );
        registry.register(
            "move_convergence_seconds",
            "Claim received by this replica to the first agent stream message carrying the move",
            m.move_convergence.clone(),
        );
        registry.register("auth_failures", "Calls refused by authentication or authorisation", m.auth_failures.clone());
        registry.register("status_clients", "Status page live-feed clients", m.status_clients.clone());
        registry.register("agent_streams", "Agent sync streams served", m.agent_streams.clone());
        registry.register(
            "stream_lag_revisions",
            "Revisions an agent stream was behind when it sent",
            m.stream_lag_revisions.clone(),
        );
        registry.register("snapshots_sent", "Full snapshots sent to agents", m.snapshots_sent.clone());
        registry.register("stream_messages", "Agent stream messages sent", m.stream_messages.clone());
        registry.register("stream_heartbeats", "Agent stream heartbeats sent", m.stream_heartbeats.clone());
        registry.register(
            "fanout_ticks",
            "Ticks of the fan-out clock (each lets every current agent stream send one delta)",
            m.fanout_ticks.clone(),
        );
        registry.register(
            "fanout_seconds",
            "Time from a fan-out tick until the last agent stream waiting for it has sent",
            m.fanout_seconds.clone(),
        );
        registry.register("binding_watchers", "WatchBindings streams served", m.binding_watchers.clone());
        registry.register("streams_refused", "Streams refused by a limit", m.streams_refused.clone());
        registry.register(
            "snapshot_bytes",
            "Bytes of snapshot parts built for agent streams and binding watches",
            m.snapshot_bytes.clone(),
        );
        registry.register("connections", "Open client connections per server", m.connections.clone());
        registry.register(
            "connections_refused",
            "Connections closed at once because the server had its maximum",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_timed_out",
            "Connections closed by the handshake or idle timeout",
            m.connections_timed_out.clone(),
        );
        registry.register(
            "replica_leases_lost",
            "Leases of this replica (presence, housekeeping election) that expired before renewal",
            m.replica_leases_lost.clone(),
        );
        registry.register(
            "watch_events",
            "Binding events sent on WatchBindings streams (snapshots and changes)",
            m.watch_events.clone(),
        );
        registry.register("bindings", "Bindings in the cache", m.bindings.clone());
        registry.register("bindings_frozen", "Bindings frozen by flap damping", m.bindings_frozen.clone());
        registry.register("vms_declared", "Declared VMs", m.vms.clone());
        registry.register("fes", "Registered FEs by health", m.fes.clone());
        registry.register("cache_revision", "Highest store revision applied to the cache", m.cache_revision.clone());
        registry.register("cache_relists", "Cache re-lists after compaction or outages", m.cache_relists.clone());
        registry.register("housekeeper", "1 if this replica runs housekeeping", m.housekeeper.clone());
        registry.register("store_reachable", "1 while the store answers", m.store_reachable.clone());
        // Every family's series exists from the start (a rate over a dashboard's window needs it).
        for family in FAMILIES {
            let label = FamilyLabel { family };
            for counter in [&m.moves, &m.damping_frozen, &m.tombstones_collected, &m.watch_events] {
                drop(counter.get_or_create(&label));
            }
        }
        Metrics { registry, ..m }
    }

    /// Counts one claim outcome of a VM IP of `family`.
    pub fn claim(&self, outcome: &'static str, family: &'static str) {
        self.claims.get_or_create(&OutcomeLabel { outcome, family }).inc();
    }

    /// Counts one rejection, by the snake-case name of its reason.
    pub fn rejected(&self, reason: &'static str, family: &'static str) {
        self.claims_rejected.get_or_create(&ReasonLabel { reason, family }).inc();
    }

    /// Counts one committed move of `ip`, and its freezing by flap damping if it froze it.
    pub fn moved(&self, ip: IpAddr, froze: bool) {
        let label = FamilyLabel { family: family(ip) };
        self.moves.get_or_create(&label).inc();
        if froze {
            self.damping_frozen.get_or_create(&label).inc();
        }
    }

    /// Counts one collected tombstone of `ip`.
    pub fn tombstone_collected(&self, ip: IpAddr) {
        self.tombstones_collected.get_or_create(&FamilyLabel { family: family(ip) }).inc();
    }

    /// Counts one binding event of `ip` sent on a binding watch.
    pub fn watch_event(&self, ip: IpAddr) {
        self.watch_events.get_or_create(&FamilyLabel { family: family(ip) }).inc();
    }

    /// Counts one refused call.
    pub fn auth_failure(&self, service: &'static str, reason: &'static str) {
        self.auth_failures.get_or_create(&AuthLabel { service, reason }).inc();
    }

    /// Counts one refused stream, by limit.
    pub fn stream_refused(&self, limit: &'static str) {
        self.streams_refused.get_or_create(&LimitLabel { limit }).inc();
    }

    /// Observes a store request's latency.
    pub fn store_op(&self, op: &'static str, started: std::time::Instant) {
        self.store_latency.get_or_create(&OpLabel { op }).observe(started.elapsed().as_secs_f64());
    }

    /// Refreshes the cache-mirroring gauges and renders the text exposition.
    pub fn render(&self, cache: &Cache, is_housekeeper: bool, store_reachable: bool) -> String {
        cache.read(|s| {
            let (mut bindings, mut frozen, mut vms) = ([0i64; 2], [0i64; 2], [0i64; 2]);
            let slot = |ip: &IpAddr| usize::from(ip.is_ipv6());
            for (ip, b) in &s.bindings {
                bindings[slot(ip)] += 1;
                frozen[slot(ip)] += i64::from(b.frozen);
            }
            for ip in s.vms.keys() {
                vms[slot(ip)] += 1;
            }
            for (i, family) in FAMILIES.into_iter().enumerate() {
                let label = FamilyLabel { family };
                self.bindings.get_or_create(&label).set(bindings[i]);
                self.bindings_frozen.get_or_create(&label).set(frozen[i]);
                self.vms.get_or_create(&label).set(vms[i]);
            }
            let up = s.fes.values().filter(|f| f.up()).count() as i64;
            self.fes.get_or_create(&StateLabel { state: "up" }).set(up);
            self.fes.get_or_create(&StateLabel { state: "down" }).set(s.fes.len() as i64 - up);
        });
        self.cache_revision.set(cache.revision() as i64);
        self.cache_relists.set(cache.relists() as i64);
        self.housekeeper.set(i64::from(is_housekeeper));
        self.store_reachable.set(i64::from(store_reachable));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
