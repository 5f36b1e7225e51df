//! Per-move stage timestamps for the lab's convergence measurement (`/debug/events`): for each
//! (VM IP, move_seq), the CLOCK_MONOTONIC ns at which this agent captured the gratuitous ARP,
//! installed the VM locally, sent the claim, got the answer, received the stream delta carrying
//! that binding and finished applying it to the kernel and the data plane — and, with move hints,
//! when the new FE sent its hint and when every other FE received and applied it (the data-plane
//! fast path, keyed by the move_seq the move makes) and how its override ended. Every timestamp is
//! taken where the work happens (the capture time is the kernel's receive timestamp). A bounded
//! log of the most recent moves.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use serde::Serialize;

/// The stages of one binding version as seen by this agent (0 = did not happen here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MoveEvent {
    /// VM IP.
    pub vm_ip: IpAddr,
    /// Move sequence of the binding.
    pub move_seq: u64,
    /// The binding FE.
    pub fe_id: String,
    /// The binding FE is this FE.
    pub local: bool,
    /// The VM's ARP frame that started the claim was captured (kernel receive time).
    pub captured_mono_ns: u64,
    /// The same, wall clock.
    pub captured_unix_nanos: i64,
    /// The local route and neighbour were installed (before the controller answered).
    pub provisional_applied_mono_ns: u64,
    /// The Report carrying the claim was sent.
    pub claim_sent_mono_ns: u64,
    /// Its answer arrived.
    pub claim_answered_mono_ns: u64,
    /// The claim outcome (bound, moved, unchanged).
    pub claim_outcome: String,
    /// The stream message carrying this binding version arrived.
    pub delta_received_mono_ns: u64,
    /// Its application to the kernel and the data plane finished.
    pub applied_mono_ns: u64,
    /// New FE: the move hint went out.
    pub hint_sent_mono_ns: u64,
    /// Other FEs: the FE whose move hint was accepted.
    pub hint_from: String,
    /// Other FEs: the accepted hint was read from the socket.
    pub hint_received_mono_ns: u64,
    /// Other FEs: its override was in the kernel and the data plane.
    pub hint_applied_mono_ns: u64,
    /// How the override ended (confirmed, superseded, expired, cancelled, peer_down, replaced;
    /// empty while in force).
    pub hint_end: String,
    /// When it ended.
    pub hint_ended_mono_ns: u64,
}

/// What is known about a claim before its move_seq is.
#[derive(Debug, Clone, Copy, Default)]
struct Capture {
    observed_at: i64,
    captured_mono_ns: u64,
    provisional_applied_mono_ns: u64,
}

/// The log.
#[derive(Debug)]
pub struct EventLog {
    capacity: usize,
    events: HashMap<(IpAddr, u64), MoveEvent>,
    order: VecDeque<(IpAddr, u64)>,
    captures: HashMap<IpAddr, Capture>,
}

impl EventLog {
    /// Keeps the latest `capacity` events.
    pub fn new(capacity: usize) -> Self {
        EventLog { capacity, events: HashMap::new(), order: VecDeque::new(), captures: HashMap::new() }
    }

    fn entry(&mut self, ip: IpAddr, move_seq: u64) -> &mut MoveEvent {
        let key = (ip, move_seq);
        if !self.events.contains_key(&key) {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.events.remove(&old);
                }
            }
        }
        self.events.entry(key).or_insert_with(|| MoveEvent {
            vm_ip: ip,
            move_seq,
            fe_id: String::new(),
            local: false,
            captured_mono_ns: 0,
            captured_unix_nanos: 0,
            provisional_applied_mono_ns: 0,
            claim_sent_mono_ns: 0,
            claim_answered_mono_ns: 0,
            claim_outcome: String::new(),
            delta_received_mono_ns: 0,
            applied_mono_ns: 0,
            hint_sent_mono_ns: 0,
            hint_from: String::new(),
            hint_received_mono_ns: 0,
            hint_applied_mono_ns: 0,
            hint_end: String::new(),
            hint_ended_mono_ns: 0,
        })
    }

    /// A claim started from a frame captured at `captured_mono_ns`.
    pub fn captured(&mut self, ip: IpAddr, observed_at: i64, captured_mono_ns: u64) {
        if self.captures.len() >= self.capacity {
            self.captures.clear();
        }
        self.captures.insert(ip, Capture { observed_at, captured_mono_ns, provisional_applied_mono_ns: 0 });
    }

    /// The claimed VM was installed locally.
    pub fn provisional_applied(&mut self, ip: IpAddr, at: u64) {
        if let Some(c) = self.captures.get_mut(&ip) {
            c.provisional_applied_mono_ns = at;
        }
    }

    /// The claim (`ip`, `observed_at`) was accepted as `move_seq` at this FE.
    #[allow(clippy::too_many_arguments)]
    pub fn claim_answered(
        &mut self,
        ip: IpAddr,
        observed_at: i64,
        move_seq: u64,
        fe_id: &str,
        outcome: &str,
        sent: u64,
        answered: u64,
    ) {
        let Some(c) = self.captures.get(&ip).copied().filter(|c| c.observed_at == observed_at) else { return };
        self.captures.remove(&ip);
        let e = self.entry(ip, move_seq);
        e.fe_id = fe_id.to_owned();
        e.local = true;
        e.captured_mono_ns = c.captured_mono_ns;
        e.captured_unix_nanos = observed_at;
        e.provisional_applied_mono_ns = c.provisional_applied_mono_ns;
        e.claim_sent_mono_ns = sent;
        e.claim_answered_mono_ns = answered;
        e.claim_outcome = outcome.to_owned();
    }

    /// The stream delivered binding (`ip`, `move_seq`) at `received` and it was applied at
    /// `applied`.
    pub fn delta_applied(&mut self, ip: IpAddr, move_seq: u64, fe_id: &str, local: bool, received: u64, applied: u64) {
        let e = self.entry(ip, move_seq);
        if e.delta_received_mono_ns == 0 {
            e.delta_received_mono_ns = received;
            e.applied_mono_ns = applied;
            e.fe_id = fe_id.to_owned();
            e.local = local;
        }
    }

    /// The new FE sent a move hint for the move that makes `move_seq`.
    pub fn hint_sent(&mut self, ip: IpAddr, move_seq: u64, at: u64) {
        self.entry(ip, move_seq).hint_sent_mono_ns = at;
    }

    /// A hint from `fe_id` for the move that makes `move_seq` was accepted (read at `received`).
    pub fn hint_received(&mut self, ip: IpAddr, move_seq: u64, fe_id: &str, received: u64) {
        let e = self.entry(ip, move_seq);
        e.hint_from = fe_id.to_owned();
        e.hint_received_mono_ns = received;
        e.hint_applied_mono_ns = 0;
        e.hint_end.clear();
        e.hint_ended_mono_ns = 0;
    }

    /// Its override was applied.
    pub fn hint_applied(&mut self, ip: IpAddr, move_seq: u64, at: u64) {
        let e = self.entry(ip, move_seq);
        if e.hint_applied_mono_ns == 0 {
            e.hint_applied_mono_ns = at;
        }
    }

    /// Its override ended.
    pub fn hint_ended(&mut self, ip: IpAddr, move_seq: u64, how: &str, at: u64) {
        let e = self.entry(ip, move_seq);
        e.hint_end = how.to_owned();
        e.hint_ended_mono_ns = at;
    }

    /// The events, ordered by IP and move_seq, optionally for one VM.
    pub fn list(&self, vm: Option<IpAddr>) -> Vec<MoveEvent> {
        let mut out: Vec<MoveEvent> =
            self.events.values().filter(|e| vm.is_none_or(|v| e.vm_ip == v)).cloned().collect();
        out.sort_by_key(|e| (e.vm_ip, e.move_seq));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 10, 0, 11));

    #[test]
    fn capture_claim_and_delta_merge_into_one_event_in_any_order() {
        let mut log = EventLog::new(10);
        log.captured(VM, 1000, 5);
        log.provisional_applied(VM, 6);
        log.delta_applied(VM, 3, "fe3", true, 9, 10); // the delta may beat the RPC answer
        log.claim_answered(VM, 1000, 3, "fe3", "moved", 7, 11);
        let events = log.list(Some(VM));
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(
            (e.captured_mono_ns, e.provisional_applied_mono_ns, e.claim_sent_mono_ns, e.claim_answered_mono_ns),
            (5, 6, 7, 11)
        );
        assert_eq!((e.delta_received_mono_ns, e.applied_mono_ns, e.local), (9, 10, true));
        // A second delivery of the same version (after a resync) keeps the first timestamps.
        log.delta_applied(VM, 3, "fe3", true, 50, 51);
        assert_eq!(log.list(None)[0].delta_received_mono_ns, 9);
    }

    #[test]
    fn hint_stages_merge_with_the_delta_of_the_same_move() {
        let mut log = EventLog::new(10);
        log.hint_received(VM, 4, "fe3", 20);
        log.hint_applied(VM, 4, 21);
        log.hint_applied(VM, 4, 99);
        log.delta_applied(VM, 4, "fe3", false, 30, 31);
        log.hint_ended(VM, 4, "confirmed", 30);
        let e = &log.list(Some(VM))[0];
        assert_eq!((e.hint_from.as_str(), e.hint_received_mono_ns, e.hint_applied_mono_ns), ("fe3", 20, 21));
        assert_eq!((e.hint_end.as_str(), e.hint_ended_mono_ns, e.applied_mono_ns), ("confirmed", 30, 31));
        log.hint_sent(VM, 5, 40);
        assert_eq!(log.list(Some(VM))[1].hint_sent_mono_ns, 40);
    }

    #[test]
    fn answers_for_other_observations_are_ignored_and_the_log_is_bounded() {
        let mut log = EventLog::new(2);
        log.captured(VM, 1000, 5);
        log.claim_answered(VM, 999, 1, "fe1", "bound", 1, 2);
        assert!(log.list(None).is_empty());
        for seq in 0..5 {
            log.delta_applied(VM, seq, "fe1", false, seq, seq);
        }
        assert_eq!(log.list(None).iter().map(|e| e.move_seq).collect::<Vec<_>>(), vec![3, 4]);
    }
}
