//! Per-move stage timestamps (CLOCK_MONOTONIC ns) kept by each replica for the lab's per-stage
//! breakdown: claim received → committed in the store → applied to this replica's cache → first
//! and last sent to an agent. Keyed by the commit revision; a bounded ring.
//!
//! The registry records a trace when its transaction returns, and the watch can deliver the
//! change to the cache — and the agent streams can send it — before that (the embedded store
//! notifies watchers inside the commit). So recent sends are remembered too, and a trace recorded
//! late picks up the sends that already carried its revision.

use std::collections::{BTreeMap, VecDeque};
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

/// Stream sends remembered for traces recorded after the send.
const SEND_HISTORY: usize = 4096;

/// One stream message: it carried the changes in `(after, upto]`.
#[derive(Debug, Clone, Copy)]
struct Send {
    after: Revision,
    upto: Revision,
    cached_mono_ns: u64,
    at: u64,
}

#[derive(Default)]
struct Inner {
    traces: BTreeMap<Revision, MoveTrace>,
    sends: VecDeque<Send>,
    /// Highest revision any stream has sent.
    max_sent: Revision,
}

/// A bounded set of recent traces.
pub struct MoveTraces {
    capacity: usize,
    traces: Mutex<Inner>,
}

impl MoveTraces {
    /// Keeps the latest `capacity` traces (0 disables tracing).
    pub fn new(capacity: usize) -> Self {
        MoveTraces { capacity, traces: Mutex::new(Inner::default()) }
    }

    /// Records a commit, with the sends that already carried it.
    pub fn committed(&self, mut trace: MoveTrace) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.traces.lock().expect("trace lock");
        if trace.revision <= inner.max_sent {
            let rev = trace.revision;
            // Newest first, back to the claim's arrival: no earlier send can have carried it.
            let since = trace.received_mono_ns;
            let sends = inner.sends.iter().rev().take_while(|s| s.at >= since);
            for send in sends.filter(|s| s.after < rev && rev <= s.upto) {
                if trace.cached_mono_ns == 0 {
                    trace.cached_mono_ns = send.cached_mono_ns;
                }
                if trace.first_sent_mono_ns == 0 || send.at < trace.first_sent_mono_ns {
                    trace.first_sent_mono_ns = send.at;
                }
                trace.last_sent_mono_ns = trace.last_sent_mono_ns.max(send.at);
                trace.streams_sent += 1;
            }
        }
        let traces = &mut inner.traces;
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
        let mut inner = self.traces.lock().expect("trace lock");
        if inner.sends.len() >= SEND_HISTORY {
            inner.sends.pop_front();
        }
        inner.sends.push_back(Send { after, upto, cached_mono_ns, at: now });
        inner.max_sent = inner.max_sent.max(upto);
        for trace in inner.traces.range_mut(after + 1..=upto).map(|(_, t)| t) {
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

    /// The traces of these revisions (`None` where this replica recorded none), under one lock.
    pub fn get_many(&self, revisions: &[Revision]) -> Vec<Option<MoveTrace>> {
        if self.capacity == 0 {
            return vec![None; revisions.len()];
        }
        let inner = self.traces.lock().expect("trace lock");
        revisions.iter().map(|r| inner.traces.get(r).cloned()).collect()
    }

    /// The traces, oldest first, optionally only for one VM.
    pub fn list(&self, vm_ip: Option<IpAddr>) -> Vec<MoveTrace> {
        let inner = self.traces.lock().expect("trace lock");
        inner.traces.values().filter(|t| vm_ip.is_none_or(|ip| t.vm_ip == ip)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(revision: Revision) -> MoveTrace {
        MoveTrace {
            vm_ip: "10.10.0.11".parse().unwrap(),
            move_seq: 1,
            fe_id: "fe2".into(),
            revision,
            received_mono_ns: 100,
            committed_mono_ns: 300,
            cached_mono_ns: 0,
            first_sent_mono_ns: 0,
            last_sent_mono_ns: 0,
            streams_sent: 0,
        }
    }

    #[test]
    fn sends_before_and_after_the_commit_are_both_counted() {
        let traces = MoveTraces::new(8);
        traces.committed(trace(5));
        traces.sent(4, 5, 250, 400);
        traces.sent(3, 6, 250, 500);
        let t = &traces.get_many(&[5])[0].clone().unwrap();
        assert_eq!((t.cached_mono_ns, t.first_sent_mono_ns, t.last_sent_mono_ns, t.streams_sent), (250, 400, 500, 2));

        // Revision 9 reaches the cache and two streams before the registry records its trace.
        traces.sent(8, 9, 280, 290);
        traces.sent(6, 9, 280, 295);
        traces.sent(9, 10, 281, 299);
        traces.committed(trace(9));
        let t = traces.get_many(&[9])[0].clone().unwrap();
        assert_eq!((t.cached_mono_ns, t.first_sent_mono_ns, t.last_sent_mono_ns, t.streams_sent), (280, 290, 295, 2));
        // A trace no stream has sent yet stays unsent.
        traces.committed(trace(11));
        assert_eq!(traces.get_many(&[11])[0].as_ref().unwrap().streams_sent, 0);
    }
}
