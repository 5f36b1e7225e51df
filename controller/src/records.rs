//! The values the controller stores, as protobuf messages (prost derives; not part of the public
//! wire contract, but protobuf so that fields can be added without breaking older replicas).

use prost::Message;

/// A binding as stored under `{p}/b/...` — or, with `removed`, its tombstone: what is left of a
/// removed binding so that a report made before the removal cannot bring it back (docs/design.md,
/// section 3). Tombstones are hidden from every reader but the registry and are collected by
/// housekeeping after `--tombstone-retention`.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct BindingRecord {
    /// The FE the VM sits behind. In a tombstone: the FE whose GONE removed it ("" when the
    /// controller removed it: UndeclareVm with remove_binding, or housekeeping).
    #[prost(string, tag = "1")]
    pub fe_id: String,
    /// VM MAC (6 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub mac: Vec<u8>,
    /// Moves since first bound (a binding created again over a tombstone continues it: + 1).
    #[prost(uint64, tag = "3")]
    pub move_seq: u64,
    /// A [`BindingSource`] (its number).
    #[prost(int32, tag = "4")]
    pub source: i32,
    /// When `fe_id` last observed the VM (that FE's own wall clock, ns; for an orchestrator's
    /// placement the controller's commit time). In a tombstone: the remover's GONE time (0 when
    /// the controller removed it). Compared only with later observations of the same FE.
    #[prost(int64, tag = "5")]
    pub observed_at_unix_nanos: i64,
    /// When the binding was committed (controller wall clock, ns).
    #[prost(int64, tag = "6")]
    pub committed_at_unix_nanos: i64,
    /// Frozen by flap damping.
    #[prost(bool, tag = "7")]
    pub frozen: bool,
    /// When damping froze it (ns; 0 if not frozen).
    #[prost(int64, tag = "8")]
    pub frozen_at_unix_nanos: i64,
    /// Commit times of recent moves (ns), oldest first, pruned to the damping window.
    #[prost(int64, repeated, tag = "9")]
    pub recent_moves_unix_nanos: Vec<i64>,
    /// FE announced by the orchestrator as the migration target ("" = none).
    #[prost(string, tag = "10")]
    pub pending_fe_id: String,
    /// Until when the announcement holds (ns).
    #[prost(int64, tag = "11")]
    pub pending_until_unix_nanos: i64,
    /// A tombstone: the binding was removed (GONE, UndeclareVm, housekeeping).
    #[prost(bool, tag = "12")]
    pub removed: bool,
    /// The store revision at which the observation this record holds was committed: the bind or
    /// move, the owner's latest newer observation, the orchestrator's placement, the removal.
    /// A report from another FE orders after it only if it was made knowing this revision. 0 =
    /// this record's own mod revision (a write cannot know its revision before it commits; a
    /// later write that keeps the observation stores the value explicitly).
    #[prost(uint64, tag = "13")]
    pub observed_revision: u64,
    /// The FE the binding pointed at before its latest move ("" = never moved).
    #[prost(string, tag = "14")]
    pub moved_from_fe_id: String,
}

/// The tombstone horizon as stored under `{p}/m/tombstone-horizon`: the highest removal revision
/// of the tombstones housekeeping has collected. An observation of a VM without any record that
/// was made knowing less than this may be older than a removal whose trace is gone, so it is
/// answered STALE (the agent observes again).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct HorizonRecord {
    /// The revision.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
}

/// Who produced a binding, as stored in [`BindingRecord::source`]. The numbers are those of the
/// wire's `victor.v1.BindingSource`, so the stored value is sent as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum BindingSource {
    /// An FE learned the VM from ARP.
    Arp = 1,
    /// An orchestrator placed the VM (AnnounceMigration with commit).
    Orchestrator = 2,
}

/// A declared VM as stored under `{p}/v/...`.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct VmRecord {
    /// VM MAC (6 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub mac: Vec<u8>,
    /// Sites where the VM may be bound (empty = anywhere).
    #[prost(string, repeated, tag = "2")]
    pub allowed_sites: Vec<String>,
    /// Operator's free text.
    #[prost(string, tag = "3")]
    pub description: String,
}

/// A registered FE as stored under `{p}/f/<id>`.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct FeRecord {
    /// Underlay address (4 or 16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub underlay_addr: Vec<u8>,
    /// Site.
    #[prost(string, tag = "2")]
    pub site: String,
    /// Mobile prefixes served (CIDR text).
    #[prost(string, repeated, tag = "3")]
    pub mobile_prefixes: Vec<String>,
    /// Registration time (controller wall clock, ns).
    #[prost(int64, tag = "4")]
    pub registered_at_unix_nanos: i64,
    /// Agent version.
    #[prost(string, tag = "5")]
    pub agent_version: String,
    /// The lease of the FE's session key.
    #[prost(int64, tag = "6")]
    pub session_lease: i64,
}

/// An FE's liveness session as stored under `{p}/s/<id>` (attached to the FE's lease).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct SessionRecord {
    /// The replica that opened the session.
    #[prost(string, tag = "1")]
    pub replica_id: String,
    /// When it was opened (ns).
    #[prost(int64, tag = "2")]
    pub opened_at_unix_nanos: i64,
}

/// A live replica as stored under `{p}/r/<id>` (attached to the replica's lease).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct ReplicaRecord {
    /// gRPC address the replica listens on.
    #[prost(string, tag = "1")]
    pub grpc_addr: String,
    /// When the replica started (ns).
    #[prost(int64, tag = "2")]
    pub started_at_unix_nanos: i64,
    /// Bumped on every cache (re)load; the write is the load's fence.
    #[prost(uint64, tag = "3")]
    pub load_generation: u64,
    /// Software version.
    #[prost(string, tag = "4")]
    pub version: String,
}

/// Wall-clock now in Unix nanoseconds.
pub fn now_unix_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}
