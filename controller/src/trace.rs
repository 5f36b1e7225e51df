//! Per-move stage timestamps (CLOCK_MONOTONIC ns) kept by each replica for the lab's per-stage
//! breakdown: claim received → committed in the store → applied to this replica's cache → first
//! and last sent to an agent. Keyed by the commit revision; a bounded ring.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use serde::Serialize;
use victor_store::Revision;

/// The stages of one committed binding change.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MoveTrace {
    /// VM IP.
    pub vm_ip: IpAddr,
    /// Move sequence after the change.
    pub move_seq: u64,
    /// New binding FE.
    pub fe_id: String,
    /// Commit revision.
    pub revision: Revision,
    /// The Report RPC arrived.
    pub received_mono_ns: u64,
    /// The store acknowledged the transaction.
    pub committed_mono_ns: u64,
    /// This replica's cache applied it (0 = not yet / by another replica).
    pub cached_mono_ns: u64,
    /// First agent stream message carrying it left this replica.
    pub first_sent_mono_ns: u64,
    /// Last agent stream message carrying it left this replica.
    pub last_sent_mono_ns: u64,
    /// Agent streams that carried it from this replica.
    pub streams_sent: u32,
}

/// A bounded set of recent traces.
pub struct MoveTraces {
    capacity: usize,
    traces: Mutex<BTreeMap<Revision, MoveTrace>>,
}

impl MoveTraces {
    /// Keeps the latest `capacity` traces (0 disables tracing).
    pub fn new(capacity: usize) -> Self {
        MoveTraces { capacity, traces: Mutex::new(BTreeMap::new()) }
    }

    /// Records a commit.
    pub fn committed(&self, trace: MoveTrace) {
        if self.capacity == 0 {
            return;
        }
        let mut traces = self.traces.lock().expect("trace lock");
        traces.insert(trace.revision, trace);
        while traces.len() > self.capacity {
            traces.pop_first();
        }
    }

    /// Records that changes with revisions in `(after, upto]`, applied to the cache at
    /// `cached_mono_ns`, were sent on one stream at `now`.
    pub fn sent(&self, after: Revision, upto: Revision, cached_mono_ns: u64, now: u64) {
        if self.capacity == 0 || upto <= after {
            return;
        }
        let mut traces = self.traces.lock().expect("trace lock");
        for trace in traces.range_mut(after + 1..=upto).map(|(_, t)| t) {
            if trace.cached_mono_ns == 0 {
                trace.cached_mono_ns = cached_mono_ns;
            }
            if trace.first_sent_mono_ns == 0 {
                trace.first_sent_mono_ns = now;
            }
            trace.last_sent_mono_ns = now;
            trace.streams_sent += 1;
        }
    }

    /// The traces, oldest first, optionally only for one VM.
    pub fn list(&self, vm_ip: Option<IpAddr>) -> Vec<MoveTrace> {
        let traces = self.traces.lock().expect("trace lock");
        traces.values().filter(|t| vm_ip.is_none_or(|ip| t.vm_ip == ip)).cloned().collect()
    }
}
