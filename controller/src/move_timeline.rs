//! Per-move stage timestamps (CLOCK_MONOTONIC ns), the controller's half of a move's timeline (the
//! agents keep theirs in their `events` module): claim received → committed in the store →
//! applied to this replica's cache → first and last sent to an agent. Keyed by the commit
//! revision and the VM IP (one transaction may commit several VMs at one revision: a batched
//! Report, or a dual-stack VM's two addresses); a bounded ring, served at `/debug/moves` for the
//! lab's per-stage breakdown.
//!
//! The registry records a timeline when its transaction returns, and the watch can deliver the
//! change to the cache — and the agent streams can send it — before that (the embedded store
//! notifies watchers inside the commit). So recent sends are remembered too, and a timeline
//! recorded late picks up the sends that already carried its revision.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

use serde::Serialize;
use victor_store::Revision;

/// The stages of one committed binding change.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MoveTimeline {
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

/// Stream sends remembered for timelines recorded after the send.
const SEND_HISTORY: usize = 4096;

/// One stream message: it carried the changes in `(after, upto]`.
#[derive(Debug, Clone, Copy)]
struct Send {
    after: Revision,
    upto: Revision,
    cached_mono_ns: u64,
    at: u64,
}

/// A timeline's key: commit revision, then VM IP.
type Key = (Revision, IpAddr);

/// The lowest and the highest IP, to cover every timeline of a revision range.
const LOWEST_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
const HIGHEST_IP: IpAddr = IpAddr::V6(std::net::Ipv6Addr::from_bits(u128::MAX));

#[derive(Default)]
struct Inner {
    timelines: BTreeMap<Key, MoveTimeline>,
    sends: VecDeque<Send>,
    /// Highest revision any stream has sent.
    max_sent: Revision,
}

/// A bounded set of recent timelines.
pub struct MoveTimelines {
    capacity: usize,
    timelines: Mutex<Inner>,
}

impl MoveTimelines {
    /// Keeps the latest `capacity` timelines (0 disables them).
    pub fn new(capacity: usize) -> Self {
        MoveTimelines { capacity, timelines: Mutex::new(Inner::default()) }
    }

    /// Records a commit, with the sends that already carried it.
    pub fn committed(&self, mut timeline: MoveTimeline) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.timelines.lock().expect("timeline lock");
        if timeline.revision <= inner.max_sent {
            let rev = timeline.revision;
            // Newest first, back to the claim's arrival: no earlier send can have carried it.
            let since = timeline.received_mono_ns;
            let sends = inner.sends.iter().rev().take_while(|s| s.at >= since);
            for send in sends.filter(|s| s.after < rev && rev <= s.upto) {
                if timeline.cached_mono_ns == 0 {
                    timeline.cached_mono_ns = send.cached_mono_ns;
                }
                if timeline.first_sent_mono_ns == 0 || send.at < timeline.first_sent_mono_ns {
                    timeline.first_sent_mono_ns = send.at;
                }
                timeline.last_sent_mono_ns = timeline.last_sent_mono_ns.max(send.at);
                timeline.streams_sent += 1;
            }
        }
        let timelines = &mut inner.timelines;
        timelines.insert((timeline.revision, timeline.vm_ip), timeline);
        while timelines.len() > self.capacity {
            timelines.pop_first();
        }
    }

    /// Records that changes with revisions in `(after, upto]`, applied to the cache at
    /// `cached_mono_ns`, were sent on one stream at `now`.
    pub fn sent(&self, after: Revision, upto: Revision, cached_mono_ns: u64, now: u64) {
        if self.capacity == 0 || upto <= after {
            return;
        }
        let mut inner = self.timelines.lock().expect("timeline lock");
        if inner.sends.len() >= SEND_HISTORY {
            inner.sends.pop_front();
        }
        inner.sends.push_back(Send { after, upto, cached_mono_ns, at: now });
        inner.max_sent = inner.max_sent.max(upto);
        for timeline in inner.timelines.range_mut((after + 1, LOWEST_IP)..=(upto, HIGHEST_IP)).map(|(_, t)| t) {
            if timeline.cached_mono_ns == 0 {
                timeline.cached_mono_ns = cached_mono_ns;
            }
            if timeline.first_sent_mono_ns == 0 {
                timeline.first_sent_mono_ns = now;
            }
            timeline.last_sent_mono_ns = now;
            timeline.streams_sent += 1;
        }
    }

    /// The timelines of these changes (revision, VM IP; `None` where this replica recorded
    /// none), under one lock.
    pub fn get_many(&self, changes: &[Key]) -> Vec<Option<MoveTimeline>> {
        if self.capacity == 0 {
            return vec![None; changes.len()];
        }
        let inner = self.timelines.lock().expect("timeline lock");
        changes.iter().map(|key| inner.timelines.get(key).cloned()).collect()
    }

    /// The timelines, oldest first, optionally only for one VM.
    pub fn list(&self, vm_ip: Option<IpAddr>) -> Vec<MoveTimeline> {
        let inner = self.timelines.lock().expect("timeline lock");
        inner.timelines.values().filter(|t| vm_ip.is_none_or(|ip| t.vm_ip == ip)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 10, 0, 11));

    fn timeline(revision: Revision) -> MoveTimeline {
        MoveTimeline {
            vm_ip: VM,
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
        let timelines = MoveTimelines::new(8);
        timelines.committed(timeline(5));
        timelines.sent(4, 5, 250, 400);
        timelines.sent(3, 6, 250, 500);
        let t = &timelines.get_many(&[(5, VM)])[0].clone().unwrap();
        assert_eq!((t.cached_mono_ns, t.first_sent_mono_ns, t.last_sent_mono_ns, t.streams_sent), (250, 400, 500, 2));

        // Revision 9 reaches the cache and two streams before the registry records its timeline.
        timelines.sent(8, 9, 280, 290);
        timelines.sent(6, 9, 280, 295);
        timelines.sent(9, 10, 281, 299);
        timelines.committed(timeline(9));
        let t = timelines.get_many(&[(9, VM)])[0].clone().unwrap();
        assert_eq!((t.cached_mono_ns, t.first_sent_mono_ns, t.last_sent_mono_ns, t.streams_sent), (280, 290, 295, 2));
        // A timeline no stream has sent yet stays unsent.
        timelines.committed(timeline(11));
        assert_eq!(timelines.get_many(&[(11, VM)])[0].as_ref().unwrap().streams_sent, 0);
    }

    /// Two VMs committed in one transaction (one revision) keep a timeline each, and a send of
    /// that revision counts for both.
    #[test]
    fn vms_committed_at_one_revision_keep_a_timeline_each() {
        let timelines = MoveTimelines::new(8);
        let v6: IpAddr = "fd00:10::11".parse().unwrap();
        timelines.committed(timeline(7));
        timelines.committed(MoveTimeline { vm_ip: v6, ..timeline(7) });
        timelines.sent(6, 7, 350, 400);
        let both = timelines.get_many(&[(7, VM), (7, v6)]);
        let sent: Vec<_> = both.iter().map(|t| t.as_ref().map(|t| (t.vm_ip, t.first_sent_mono_ns))).collect();
        assert_eq!(sent, vec![Some((VM, 400)), Some((v6, 400))]);
        assert_eq!(timelines.list(Some(v6)).len(), 1);
    }
}
