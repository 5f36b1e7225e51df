//! The VMs this FE has seen on its VM ports and the life of their claims (pure; time is passed in
//! as CLOCK_MONOTONIC ns, observation times as wall-clock ns).
//!
//! A VM heard on a port for the first time (or back after a move) is *claimed*: it is forwarded
//! locally at once (make-before-break: docs/design.md, invariant I5) and reported. The local
//! override holds while the claim is pending — also while no controller answers (headless,
//! invariant I6) — and after acceptance until the desired state has caught up with the accepted
//! revision; from then on the desired state governs. A rejected claim drops the override (the
//! caller undoes the local route) and is not repeated for the same MAC before a hold time passes.
//!
//! A STALE claim (the controller could not order it after the current binding: it was made
//! knowing less than the revision the answer names, docs/design.md section 3) also drops the
//! override, but is not held: once the desired state has reached that revision the VM is probed
//! once on its port ([`LocalVms::reverify`]); a reply — any frame captured knowing the revision —
//! is a new claim. A VM that is really here (it moved here before this FE heard of the move before)
//! is so claimed again within a probe's round trip; one that is not (a late report) never answers
//! and is forgotten.
//!
//! Ageing: a VM silent for `probe_after` is probed every `probe_interval`; after `probe_count`
//! unanswered probes it is reported gone and forgotten.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

/// Ageing and retry timers.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    /// Probe a VM silent this long (ns).
    pub probe_after: u64,
    /// Between probes (ns).
    pub probe_interval: u64,
    /// Unanswered probes before the VM is gone.
    pub probe_count: u32,
    /// A rejected claim is not repeated for the same MAC for this long (ns).
    pub reject_hold: u64,
}

/// Where a claim stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Reported (queued or in flight); forwarded locally meanwhile.
    Pending,
    /// Accepted at a store revision; forwarded locally until the desired state reaches it.
    Accepted {
        /// The desired state governs once a change of this VM with at least this revision arrives.
        until_revision: u64,
    },
    /// The desired state governs.
    Settled,
    /// Refused; the desired state governs; no new claim with the same MAC before `retry_at`.
    Rejected {
        /// `RejectReason` number.
        reason: i32,
        /// Monotonic ns.
        retry_at: u64,
    },
    /// STALE: the desired state governs; a frame captured knowing `revision` claims again, and
    /// once the desired state has it the VM is probed (at `probed_at`, monotonic ns).
    Superseded {
        /// The revision the answer named.
        revision: u64,
        /// When the probe went out (None: not yet).
        probed_at: Option<u64>,
    },
}

/// A VM seen on a VM port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalVm {
    /// Its MAC.
    pub mac: [u8; 6],
    /// The port it was seen on.
    pub port: u32,
    /// Observation time of the current claim (wall ns) — sent with every report of it.
    pub observed_at: i64,
    /// The stream revision known when the frame of the current claim was captured — sent with
    /// every report of it.
    pub known_revision: u64,
    /// When the frame that started the current claim was captured (monotonic ns).
    pub captured_mono: u64,
    /// Last frame from it (monotonic ns).
    pub last_seen: u64,
    /// Probes sent since then.
    pub probes: u32,
    /// Next probe due (monotonic ns).
    pub next_probe: u64,
    /// The claim.
    pub claim: Claim,
}

impl LocalVm {
    /// True while the VM is forwarded locally regardless of the desired state.
    pub fn overrides(&self) -> bool {
        matches!(self.claim, Claim::Pending | Claim::Accepted { .. })
    }

    /// True unless the claim was rejected or found stale.
    pub fn is_ours(&self) -> bool {
        !matches!(self.claim, Claim::Rejected { .. } | Claim::Superseded { .. })
    }
}

/// The desired binding of an IP, as far as [`LocalVms`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredView {
    /// Bound here with this MAC, at this revision.
    Here([u8; 6], u64),
    /// Bound to another FE, at this revision.
    Elsewhere(u64),
    /// No binding.
    Unbound,
}

impl DesiredView {
    fn revision(self) -> u64 {
        match self {
            DesiredView::Here(_, r) | DesiredView::Elsewhere(r) => r,
            DesiredView::Unbound => 0,
        }
    }
}

/// A frame from a VM (ARP or NDP): where, what, when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sighting {
    /// VM IP.
    pub ip: IpAddr,
    /// VM MAC.
    pub mac: [u8; 6],
    /// Port index.
    pub port: u32,
    /// Capture time, wall ns (the observation time it is reported with).
    pub wall: i64,
    /// Capture time, monotonic ns.
    pub mono: u64,
    /// The stream revision this agent had applied when the frame was captured.
    pub known: u64,
}

/// What a sighting means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// A new claim: forward locally now and report (LEARNED, `observed_at`).
    Claim {
        /// Observation time to report.
        observed_at: i64,
    },
    /// Known VM, now on another port of this FE: re-point its route, no report needed.
    Moved,
    /// Known VM: refreshed.
    Refreshed,
    /// A VM whose claim was rejected and is on hold, or found stale and not yet known to be
    /// here: ignored.
    Suppressed,
}

/// What a claim result does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Nothing changes for forwarding.
    Kept,
    /// The local override is dropped: forwarding follows the desired state again (undo).
    Undo,
    /// The result was for an older claim of this VM (or a forgotten VM): ignored.
    Stale,
}

/// An ageing action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ageing {
    /// Send a probe to the VM (ARP for IPv4, an NDP Neighbor Solicitation for IPv6).
    Probe {
        /// VM IP.
        ip: IpAddr,
        /// VM MAC.
        mac: [u8; 6],
        /// Port.
        port: u32,
    },
    /// The VM stopped answering: report GONE (it has been forgotten).
    Gone {
        /// VM IP.
        ip: IpAddr,
        /// VM MAC.
        mac: [u8; 6],
        /// Port.
        port: u32,
    },
}

/// The VMs seen here.
#[derive(Debug)]
pub struct LocalVms {
    timers: Timers,
    vms: HashMap<IpAddr, LocalVm>,
    /// VMs whose STALE claim has not been probed yet (so that [`LocalVms::reverify`], run on every
    /// stream message, looks at them only).
    unprobed: HashSet<IpAddr>,
}

impl LocalVms {
    /// An empty table.
    pub fn new(timers: Timers) -> Self {
        LocalVms { timers, vms: HashMap::new(), unprobed: HashSet::new() }
    }

    /// The VM with `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<&LocalVm> {
        self.vms.get(&ip)
    }

    /// Every VM (unordered).
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &LocalVm)> {
        self.vms.iter().map(|(ip, vm)| (*ip, vm))
    }

    /// Number of VMs tracked (including rejected ones on hold).
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// Handles a frame (ARP or NDP) from a VM.
    pub fn sighting(&mut self, s: Sighting, desired: DesiredView) -> Learn {
        let claim_new = |s: &Sighting| LocalVm {
            mac: s.mac,
            port: s.port,
            observed_at: s.wall,
            known_revision: s.known,
            captured_mono: s.mono,
            last_seen: s.mono,
            probes: 0,
            next_probe: 0,
            claim: Claim::Pending,
        };
        let Some(vm) = self.vms.get_mut(&s.ip) else {
            if matches!(desired, DesiredView::Here(mac, _) if mac == s.mac) {
                // Already bound here (e.g. after an agent restart): adopt without a claim.
                let vm = LocalVm { claim: Claim::Settled, ..claim_new(&s) };
                self.vms.insert(s.ip, vm);
                return Learn::Refreshed;
            }
            self.vms.insert(s.ip, claim_new(&s));
            return Learn::Claim { observed_at: s.wall };
        };
        let stray = match desired {
            DesiredView::Here(mac, _) => mac != s.mac,
            DesiredView::Elsewhere(_) | DesiredView::Unbound => true,
        };
        let reclaim = match vm.claim {
            Claim::Rejected { retry_at, .. } => vm.mac != s.mac || s.mono >= retry_at,
            // A frame captured knowing the revision the STALE answer named is a new observation.
            Claim::Superseded { revision, .. } => vm.mac != s.mac || s.known >= revision,
            // Back on a port after its port had left: it arrived again (a move here may race the
            // claim of the FE it just left) — report it.
            Claim::Settled => stray || vm.port == 0,
            Claim::Pending | Claim::Accepted { .. } => vm.mac != s.mac,
        };
        if reclaim {
            *vm = claim_new(&s);
            return Learn::Claim { observed_at: s.wall };
        }
        if !vm.is_ours() {
            return Learn::Suppressed;
        }
        vm.last_seen = s.mono;
        vm.probes = 0;
        if vm.port != s.port {
            vm.port = s.port;
            return Learn::Moved;
        }
        Learn::Refreshed
    }

    /// Handles the controller's answer to the claim of `ip` made at `observed_at` with `mac`.
    /// `outcome`/`reason`/`revision` are from the `ClaimResult`.
    pub fn resolved(
        &mut self,
        ip: IpAddr,
        mac: [u8; 6],
        observed_at: i64,
        result: ClaimAnswer,
        now: u64,
        desired: DesiredView,
    ) -> Resolution {
        let Some(vm) = self.vms.get_mut(&ip) else { return Resolution::Stale };
        if vm.mac != mac || vm.observed_at != observed_at {
            return Resolution::Stale;
        }
        match result {
            ClaimAnswer::Accepted { revision } => {
                if vm.claim == Claim::Pending {
                    vm.claim = match desired {
                        DesiredView::Here(m, r) if m == mac && r >= revision => Claim::Settled,
                        // Accepted without a write (UNCHANGED, revision 0): the binding already
                        // pointed here; wait for the desired state to show it or change.
                        _ if revision == 0 => Claim::Accepted { until_revision: desired.revision() + 1 },
                        _ => Claim::Accepted { until_revision: revision },
                    };
                }
                Resolution::Kept
            }
            ClaimAnswer::Rejected { reason } => {
                let was_override = vm.overrides();
                vm.claim = Claim::Rejected { reason, retry_at: now + self.timers.reject_hold };
                if was_override { Resolution::Undo } else { Resolution::Kept }
            }
            ClaimAnswer::Stale { revision } => {
                let was_override = vm.overrides();
                vm.claim = Claim::Superseded { revision, probed_at: None };
                self.unprobed.insert(ip);
                if was_override { Resolution::Undo } else { Resolution::Kept }
            }
        }
    }

    /// The VMs whose STALE claim waited for a revision the desired state (at `known`) now has:
    /// probe each once on its port (at `now`); a reply claims it again.
    pub fn reverify(&mut self, known: u64, now: u64) -> Vec<Ageing> {
        let mut probes = Vec::new();
        let vms = &mut self.vms;
        self.unprobed.retain(|ip| {
            let Some(vm) = vms.get_mut(ip) else { return false };
            let Claim::Superseded { revision, probed_at: probed @ None } = &mut vm.claim else { return false };
            if known < *revision {
                return true;
            }
            *probed = Some(now);
            if vm.port != 0 {
                probes.push(Ageing::Probe { ip: *ip, mac: vm.mac, port: vm.port });
            }
            false
        });
        probes.sort_by_key(|p| match p {
            Ageing::Probe { ip, .. } | Ageing::Gone { ip, .. } => *ip,
        });
        probes
    }

    /// The desired binding of `ip` changed (at `revision`). Ends an accepted claim's override once
    /// the desired state has caught up, and forgets a VM the desired state now places elsewhere.
    /// Returns true if the VM was forgotten.
    pub fn desired_changed(&mut self, ip: IpAddr, revision: u64, desired: DesiredView) -> bool {
        let Some(vm) = self.vms.get_mut(&ip) else { return false };
        if let Claim::Accepted { until_revision } = vm.claim
            && revision >= until_revision
        {
            vm.claim = Claim::Settled;
        }
        if matches!(vm.claim, Claim::Superseded { .. }) && matches!(desired, DesiredView::Here(m, _) if m == vm.mac) {
            vm.claim = Claim::Settled;
        }
        let here = matches!(desired, DesiredView::Here(..));
        if vm.claim == Claim::Settled && !here {
            self.vms.remove(&ip);
            return true;
        }
        false
    }

    /// The link `port` left this namespace: its VMs keep their entries with no port (0) — a VM
    /// that shows up on another port is re-pointed, one that never answers again ages out and is
    /// reported gone. No GONE is sent at once: the link usually left because the VM is migrating,
    /// and the new FE's claim must not race a removal. Returns the affected IPs.
    pub fn port_gone(&mut self, port: u32) -> Vec<IpAddr> {
        let mut affected = Vec::new();
        for (ip, vm) in self.vms.iter_mut().filter(|(_, vm)| vm.port == port && port != 0) {
            vm.port = 0;
            affected.push(*ip);
        }
        affected
    }

    /// The ageing actions due at `now`.
    pub fn age(&mut self, now: u64) -> Vec<Ageing> {
        let t = self.timers;
        let mut out = Vec::new();
        let mut forget = Vec::new();
        for (ip, vm) in &mut self.vms {
            if let Claim::Rejected { retry_at, .. } = vm.claim {
                if now >= retry_at && now.saturating_sub(vm.last_seen) >= t.reject_hold {
                    forget.push((*ip, None));
                }
                continue;
            }
            if let Claim::Superseded { probed_at, .. } = vm.claim {
                // Not ours: never reported gone. Forgotten once the probe went unanswered, or
                // after the hold time without a frame (the revision never came).
                let unanswered = probed_at.is_some_and(|p| {
                    now.saturating_sub(p) >= t.probe_interval.saturating_mul(u64::from(t.probe_count))
                });
                if unanswered || now.saturating_sub(vm.last_seen) >= t.reject_hold {
                    forget.push((*ip, None));
                }
                continue;
            }
            if now.saturating_sub(vm.last_seen) < t.probe_after || now < vm.next_probe {
                continue;
            }
            if vm.probes >= t.probe_count {
                forget.push((*ip, Some(Ageing::Gone { ip: *ip, mac: vm.mac, port: vm.port })));
                continue;
            }
            vm.probes += 1;
            vm.next_probe = now + t.probe_interval;
            out.push(Ageing::Probe { ip: *ip, mac: vm.mac, port: vm.port });
        }
        for (ip, action) in forget {
            self.vms.remove(&ip);
            out.extend(action);
        }
        out
    }
}

/// A claim result reduced to what [`LocalVms`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// BOUND, MOVED or UNCHANGED, with the store revision of the write (0 for none).
    Accepted {
        /// Revision.
        revision: u64,
    },
    /// REJECTED.
    Rejected {
        /// `RejectReason` number.
        reason: i32,
    },
    /// REJECTED with reason STALE, naming the revision to wait for.
    Stale {
        /// `ClaimResult.revision`.
        revision: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const VM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 10, 0, 11));
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const OTHER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x99];

    fn vms() -> LocalVms {
        LocalVms::new(Timers { probe_after: 30 * S, probe_interval: S, probe_count: 3, reject_hold: 30 * S })
    }

    fn seen(mac: [u8; 6], port: u32, at: u64) -> Sighting {
        Sighting { ip: VM, mac, port, wall: 1_700_000_000 * S as i64 + at as i64, mono: at, known: 0 }
    }

    #[test]
    fn new_vm_is_claimed_and_overrides_until_the_desired_state_catches_up() {
        let mut v = vms();
        let s = seen(MAC, 5, S);
        let Learn::Claim { observed_at } = v.sighting(s, DesiredView::Elsewhere(10)) else { panic!() };
        assert!(v.get(VM).unwrap().overrides(), "make-before-break: local at once");
        assert_eq!(v.sighting(seen(MAC, 5, 2 * S), DesiredView::Elsewhere(10)), Learn::Refreshed, "repeated GARP");
        let r =
            v.resolved(VM, MAC, observed_at, ClaimAnswer::Accepted { revision: 20 }, 2 * S, DesiredView::Elsewhere(10));
        assert_eq!(r, Resolution::Kept);
        assert!(v.get(VM).unwrap().overrides(), "delta not here yet: keep local");
        assert!(!v.desired_changed(VM, 15, DesiredView::Elsewhere(15)), "older change does not end it");
        assert!(v.get(VM).unwrap().overrides());
        assert!(!v.desired_changed(VM, 20, DesiredView::Here(MAC, 20)));
        assert_eq!(v.get(VM).unwrap().claim, Claim::Settled);
    }

    #[test]
    fn a_move_away_after_acceptance_forgets_the_vm() {
        let mut v = vms();
        let Learn::Claim { observed_at } = v.sighting(seen(MAC, 5, S), DesiredView::Unbound) else { panic!() };
        v.resolved(VM, MAC, observed_at, ClaimAnswer::Accepted { revision: 20 }, S, DesiredView::Unbound);
        // Both changes coalesced: the VM went on to fe3 at 25 before we saw our own binding.
        assert!(v.desired_changed(VM, 25, DesiredView::Elsewhere(25)));
        assert!(v.get(VM).is_none());
    }

    #[test]
    fn rejection_undoes_and_holds() {
        let mut v = vms();
        let Learn::Claim { observed_at } = v.sighting(seen(OTHER_MAC, 5, S), DesiredView::Unbound) else { panic!() };
        let r = v.resolved(VM, OTHER_MAC, observed_at, ClaimAnswer::Rejected { reason: 3 }, S, DesiredView::Unbound);
        assert_eq!(r, Resolution::Undo);
        assert!(!v.get(VM).unwrap().overrides());
        assert_eq!(v.sighting(seen(OTHER_MAC, 5, 2 * S), DesiredView::Unbound), Learn::Suppressed, "on hold");
        assert!(matches!(v.sighting(seen(MAC, 5, 3 * S), DesiredView::Unbound), Learn::Claim { .. }), "other MAC");
        let Learn::Claim { observed_at } = v.sighting(seen(OTHER_MAC, 5, 4 * S), DesiredView::Unbound) else {
            panic!()
        };
        v.resolved(VM, OTHER_MAC, observed_at, ClaimAnswer::Rejected { reason: 3 }, 4 * S, DesiredView::Unbound);
        assert!(
            matches!(v.sighting(seen(OTHER_MAC, 5, 40 * S), DesiredView::Unbound), Learn::Claim { .. }),
            "hold over"
        );
    }

    #[test]
    fn stale_results_are_ignored() {
        let mut v = vms();
        let Learn::Claim { observed_at: first } = v.sighting(seen(MAC, 5, S), DesiredView::Unbound) else { panic!() };
        let Learn::Claim { .. } = v.sighting(seen(OTHER_MAC, 5, 2 * S), DesiredView::Unbound) else { panic!() };
        let r = v.resolved(VM, MAC, first, ClaimAnswer::Rejected { reason: 5 }, 2 * S, DesiredView::Unbound);
        assert_eq!(r, Resolution::Stale);
        assert!(v.get(VM).unwrap().overrides());
    }

    #[test]
    fn unchanged_waits_for_the_key_to_change_and_adopts_after_restart() {
        let mut v = vms();
        let Learn::Claim { observed_at } = v.sighting(seen(MAC, 5, S), DesiredView::Elsewhere(7)) else { panic!() };
        v.resolved(VM, MAC, observed_at, ClaimAnswer::Accepted { revision: 0 }, S, DesiredView::Elsewhere(7));
        assert_eq!(v.get(VM).unwrap().claim, Claim::Accepted { until_revision: 8 });
        // After a restart the binding is already here: adopted, no claim.
        let mut fresh = vms();
        assert_eq!(fresh.sighting(seen(MAC, 5, S), DesiredView::Here(MAC, 7)), Learn::Refreshed);
        assert_eq!(fresh.get(VM).unwrap().claim, Claim::Settled);
        assert_eq!(fresh.sighting(seen(MAC, 6, 2 * S), DesiredView::Here(MAC, 7)), Learn::Moved);
        // The VM comes back after it had moved away: a settled VM is claimed again.
        assert!(matches!(fresh.sighting(seen(MAC, 6, 3 * S), DesiredView::Elsewhere(9)), Learn::Claim { .. }));
    }

    #[test]
    fn ageing_probes_then_reports_gone() {
        let mut v = vms();
        v.sighting(seen(MAC, 5, 0), DesiredView::Here(MAC, 7));
        assert!(v.age(29 * S).is_empty());
        let probe = Ageing::Probe { ip: VM, mac: MAC, port: 5 };
        assert_eq!(v.age(30 * S), vec![probe]);
        assert!(v.age(30 * S + S / 2).is_empty(), "interval");
        assert_eq!(v.age(31 * S), vec![probe]);
        // An answer resets the count.
        v.sighting(seen(MAC, 5, 31 * S + 1), DesiredView::Here(MAC, 7));
        assert!(v.age(32 * S).is_empty());
        for k in 0..3 {
            assert_eq!(v.age(62 * S + k * S), vec![probe]);
        }
        assert_eq!(v.age(65 * S), vec![Ageing::Gone { ip: VM, mac: MAC, port: 5 }]);
        assert!(v.is_empty());
    }

    #[test]
    fn port_gone_keeps_the_vm_portless_until_it_shows_up_again_and_is_reported() {
        let mut v = vms();
        v.sighting(seen(MAC, 5, 0), DesiredView::Here(MAC, 7));
        assert!(v.port_gone(6).is_empty());
        assert_eq!(v.port_gone(5), vec![VM]);
        assert_eq!(v.get(VM).unwrap().port, 0);
        // It arrived again (a move back here may race the claim of the FE it just left).
        assert!(matches!(v.sighting(seen(MAC, 8, S), DesiredView::Here(MAC, 7)), Learn::Claim { .. }));
        assert_eq!(v.get(VM).unwrap().port, 8);
        assert_eq!(v.sighting(seen(MAC, 9, 2 * S), DesiredView::Here(MAC, 7)), Learn::Moved, "port to port");
    }

    #[test]
    fn a_stale_claim_waits_for_its_revision_then_probes_once() {
        let mut v = vms();
        let Learn::Claim { observed_at } = v.sighting(seen(MAC, 5, S), DesiredView::Elsewhere(10)) else { panic!() };
        let r = v.resolved(VM, MAC, observed_at, ClaimAnswer::Stale { revision: 12 }, S, DesiredView::Elsewhere(10));
        assert_eq!(r, Resolution::Undo, "the local override goes");
        assert!(!v.get(VM).unwrap().is_ours());
        // Frames captured before the stream had revision 12 change nothing; no probe yet.
        assert_eq!(
            v.sighting(Sighting { known: 11, ..seen(MAC, 5, 2 * S) }, DesiredView::Elsewhere(12)),
            Learn::Suppressed
        );
        assert!(v.reverify(11, 2 * S).is_empty());
        // The stream has 12: one probe on its port, once.
        assert_eq!(v.reverify(12, 3 * S), vec![Ageing::Probe { ip: VM, mac: MAC, port: 5 }]);
        assert!(v.reverify(13, 3 * S).is_empty());
        // The reply (captured knowing 12) is a new claim, reported with what it knew.
        let Learn::Claim { .. } =
            v.sighting(Sighting { known: 12, ..seen(MAC, 5, 3 * S + 1) }, DesiredView::Elsewhere(12))
        else {
            panic!()
        };
        assert_eq!((v.get(VM).unwrap().known_revision, v.get(VM).unwrap().claim), (12, Claim::Pending));
    }

    #[test]
    fn a_stale_claim_that_no_one_answers_is_forgotten_without_a_gone() {
        let mut v = vms();
        let Learn::Claim { observed_at } = v.sighting(seen(MAC, 5, S), DesiredView::Elsewhere(10)) else { panic!() };
        v.resolved(VM, MAC, observed_at, ClaimAnswer::Stale { revision: 10 }, S, DesiredView::Elsewhere(10));
        assert_eq!(v.reverify(10, 2 * S).len(), 1);
        assert!(v.age(4 * S).is_empty(), "3 probe intervals not over yet");
        assert!(v.age(5 * S).is_empty(), "forgotten, and not reported gone: it was never ours");
        assert!(v.is_empty());
    }
}
