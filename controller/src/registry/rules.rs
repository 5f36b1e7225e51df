//! The binding rules (docs/design.md, invariants I1–I4) as pure functions: given the stored
//! state of a VM IP, the VM's declaration and one observation or command, decide what to write. No
//! IO, no clocks (the caller passes `now`), so every rule is unit- and property-tested here; the
//! registry's IO layer only adds compare-and-swap and retries.
//!
//! Ordering (invariant I2, docs/design.md section 3) never compares two FEs' clocks:
//!
//! * every record holds the revision at which its observation was committed
//!   ([`BindingRecord::observed_revision`]); a report from another FE orders after it only if it
//!   was made knowing that revision (its `known_revision`, the agent's stream position when it
//!   captured the frame) — otherwise it may be older, and is STALE with the revision to wait for;
//! * observations of one FE are ordered by that FE's own clock (the agent keeps it monotonic), or
//!   by knowledge of the record's revision;
//! * a removal leaves a tombstone, so a report older than the removal finds it; collected
//!   tombstones leave a horizon revision below which an observation of an unknown VM is STALE;
//! * several observations of one VM in one report are applied in observation order
//!   ([`decide_batch`]), each on the state the previous left.

use victor_proto::Mac;
use victor_store::Revision;

use super::rejection::{Reason, Refusal, Rejection};
use crate::records::{BindingRecord, BindingSource, VmRecord};

/// Flap damping parameters (invariant I4): more than `max_moves` moves within `window_ns` freeze
/// a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DampingPolicy {
    /// Moves allowed within the window.
    pub max_moves: u32,
    /// The window (ns).
    pub window_ns: i64,
}

/// Rule parameters fixed by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Flap damping.
    pub damping: DampingPolicy,
    /// Only declared VMs may be bound.
    pub require_declared: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules { damping: DampingPolicy { max_moves: 5, window_ns: 180 * 1_000_000_000 }, require_declared: false }
    }
}

/// What an FE saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The VM is here (ARP).
    Learned,
    /// The VM stopped answering here.
    Gone,
}

/// What the reporting FE knew of the cluster when it made an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knowledge {
    /// Every change up to this store revision (the agent's stream position).
    Upto(Revision),
    /// Not said (a client that does not track revisions): across FEs, reports order by arrival;
    /// one FE's own reports by its clock alone.
    Unstated,
}

impl Knowledge {
    /// From the wire's optional `known_revision`.
    pub fn from_wire(known_revision: Option<u64>) -> Knowledge {
        known_revision.map_or(Knowledge::Unstated, Knowledge::Upto)
    }

    /// Whether an observation made with this knowledge was made after `committed` (None: a write
    /// of this same report, not committed yet, which nobody can know). Unstated counts as yes.
    fn after(self, committed: Option<Revision>) -> bool {
        match self {
            Knowledge::Upto(k) => committed.is_some_and(|r| k >= r),
            Knowledge::Unstated => true,
        }
    }

    /// [`Knowledge::after`], but Unstated counts as no (for one FE's own reports the clock decides).
    fn surely_after(self, committed: Option<Revision>) -> bool {
        matches!(self, Knowledge::Upto(_)) && self.after(committed)
    }

    fn describe(self) -> String {
        match self {
            Knowledge::Upto(k) => format!("revision {k}"),
            Knowledge::Unstated => "no revision".into(),
        }
    }
}

/// One observation from one FE, already validated for address syntax and mobile prefixes.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Learned or gone.
    pub kind: Observed,
    /// The reporting FE (authenticated).
    pub fe_id: &'a str,
    /// The reporting FE's site.
    pub fe_site: &'a str,
    /// The VM's MAC as seen.
    pub mac: Mac,
    /// When the FE saw it (ns, the FE's own clock: compared only with that FE's other reports).
    pub observed_at: i64,
    /// What the FE knew when it saw it.
    pub known: Knowledge,
}

/// The stored state of one VM IP, as the rules decide on it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The binding or its tombstone (`removed`); None: no record.
    pub record: Option<BindingRecord>,
    /// The record's mod revision; None while it is the result of an earlier observation of the
    /// same report that is not committed yet.
    pub mod_revision: Option<Revision>,
    /// The tombstone horizon (only consulted when there is no record).
    pub horizon: Revision,
}

impl State {
    /// The state of a stored record (`mod_revision` 0 = none).
    pub fn stored(record: Option<BindingRecord>, mod_revision: Revision, horizon: Revision) -> State {
        State { record, mod_revision: Some(mod_revision), horizon }
    }

    /// The live binding, if any (not a tombstone).
    pub fn binding(&self) -> Option<&BindingRecord> {
        self.record.as_ref().filter(|r| !r.removed)
    }

    /// The tombstone, if the binding was removed.
    pub fn tombstone(&self) -> Option<&BindingRecord> {
        self.record.as_ref().filter(|r| r.removed)
    }

    /// The revision at which the record's observation was committed (None: not yet).
    pub fn observed_revision(&self) -> Option<Revision> {
        let record = self.record.as_ref()?;
        if record.observed_revision != 0 { Some(record.observed_revision) } else { self.mod_revision }
    }

    /// What a rewrite that keeps the record's observation stores as its `observed_revision`.
    pub(crate) fn carried_revision(&self) -> Revision {
        self.observed_revision().unwrap_or(0)
    }

    /// The state after `verdict` was decided on it (not committed).
    fn after(&self, verdict: &Verdict) -> State {
        match verdict {
            Verdict::Write(record, _) => {
                State { record: Some(record.clone()), mod_revision: None, horizon: self.horizon }
            }
            Verdict::Unchanged | Verdict::Reject(_) => self.clone(),
        }
    }
}

/// What kind of change a write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new binding (also over a tombstone).
    Bound,
    /// The binding moved to another FE; `froze` when this move tripped flap damping.
    Moved {
        /// Damping froze the binding with this move.
        froze: bool,
    },
    /// Same FE (or still removed), but something stored changed: a newer observation, the MAC, a
    /// pending announcement, damping, the tombstone's remover.
    Updated,
    /// The binding was removed (a tombstone is written).
    Removed,
}

/// The decision for one observation or command.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Store this record (a binding or a tombstone).
    Write(BindingRecord, Change),
    /// Nothing to do (already so).
    Unchanged,
    /// Refused.
    Reject(Rejection),
}

/// Decides several observations of one VM by one FE (`obs`, in request order): they are applied
/// in observation order — one FE, one clock; equal times keep request order — each on the state
/// the previous one left. Returns the record to write for the final state (None when nothing
/// changed) and each observation's verdict, in request order. A STALE verdict against a write of
/// this same batch cannot name its revision yet: [`name_commit_revision`] fills it in.
pub fn decide_batch(
    rules: &Rules,
    state: &State,
    vm: Option<&VmRecord>,
    obs: &[Observation<'_>],
    now: i64,
) -> (Option<BindingRecord>, Vec<Verdict>) {
    let mut order: Vec<usize> = (0..obs.len()).collect();
    order.sort_by_key(|&i| obs[i].observed_at);
    let mut verdicts = vec![Verdict::Unchanged; obs.len()];
    let mut current = state.clone();
    let mut write = None;
    for i in order {
        let verdict = decide_observation(rules, &current, vm, &obs[i], now);
        if let Verdict::Write(record, _) = &verdict {
            write = Some(record.clone());
        }
        current = current.after(&verdict);
        verdicts[i] = verdict;
    }
    (write, verdicts)
}

/// Fills the revision of the batch's commit into its STALE verdicts that were decided against an
/// earlier write of the same batch (they name 0 until then).
pub fn name_commit_revision(verdicts: &mut [Verdict], committed: Revision) {
    for verdict in verdicts {
        if let Verdict::Reject(r) = verdict
            && r.reason == Reason::Stale
            && r.revision == 0
        {
            r.revision = committed;
            r.message = r.message.replace("(this report)", &committed.to_string());
        }
    }
}

/// Decides what an FE's observation does to the state of a VM (`vm` = its declaration, if any).
pub fn decide_observation(
    rules: &Rules,
    state: &State,
    vm: Option<&VmRecord>,
    obs: &Observation<'_>,
    now: i64,
) -> Verdict {
    if obs.observed_at <= 0 {
        return Verdict::Reject(Rejection::new(
            Reason::BadTimestamp,
            Refusal::Invalid,
            format!("observation time {} ns is unusable; it must be positive", obs.observed_at),
        ));
    }
    match obs.kind {
        Observed::Learned => decide_learned(rules, state, vm, obs, now),
        Observed::Gone => decide_gone(state, obs, now),
    }
}

/// Whether `obs` is newer than the observation `record` holds, which the reporting FE itself made
/// (so the clocks compare) unless the record is an orchestrator's placement: a later time by
/// that FE's clock, or made knowing the record's revision.
fn newer_than_own(state: &State, record: &BindingRecord, obs: &Observation<'_>) -> bool {
    let own_clock = record.source != BindingSource::Orchestrator as i32 || record.removed;
    if own_clock {
        obs.observed_at > record.observed_at_unix_nanos || obs.known.surely_after(state.observed_revision())
    } else {
        obs.known.after(state.observed_revision())
    }
}

fn stale(needed: Option<Revision>, message: String) -> Verdict {
    Verdict::Reject(
        Rejection::new(Reason::Stale, Refusal::Precondition, format!("stale report: {message}"))
            .needing(needed.unwrap_or(0)),
    )
}

fn decide_learned(rules: &Rules, state: &State, vm: Option<&VmRecord>, obs: &Observation<'_>, now: i64) -> Verdict {
    if !obs.mac.is_unicast() {
        return Verdict::Reject(Rejection::new(
            Reason::Malformed,
            Refusal::Invalid,
            format!("MAC {} is not a unicast address", obs.mac),
        ));
    }
    match vm {
        Some(vm) => {
            if vm.mac != obs.mac.octets() {
                return Verdict::Reject(Rejection::new(
                    Reason::MacMismatch,
                    Refusal::Forbidden,
                    format!(
                        "VM is declared with MAC {} but FE {} saw MAC {}; refusing a possibly spoofed claim",
                        display_mac(&vm.mac),
                        obs.fe_id,
                        obs.mac
                    ),
                ));
            }
            if let Some(rejection) = check_site(vm, obs.fe_site) {
                return Verdict::Reject(rejection);
            }
        }
        None if rules.require_declared => {
            return Verdict::Reject(Rejection::new(
                Reason::Undeclared,
                Refusal::Precondition,
                "VM is not declared and the controller requires declared VMs; call BindingService.DeclareVm first",
            ));
        }
        None => {}
    }

    let fresh = |move_seq: u64| BindingRecord {
        fe_id: obs.fe_id.to_owned(),
        mac: obs.mac.octets().to_vec(),
        move_seq,
        source: BindingSource::Arp as i32,
        observed_at_unix_nanos: obs.observed_at,
        committed_at_unix_nanos: now,
        ..Default::default()
    };
    let Some(record) = &state.record else {
        if state.horizon > 0 && !obs.known.after(Some(state.horizon)) {
            return stale(
                Some(state.horizon),
                format!(
                    "the observation was made knowing {} but removals up to revision {} are no longer \
                     remembered, so it cannot be ordered; observe the VM again once revision {} is known",
                    obs.known.describe(),
                    state.horizon,
                    state.horizon
                ),
            );
        }
        return Verdict::Write(fresh(0), Change::Bound);
    };

    if record.removed {
        let newer = if !record.fe_id.is_empty() && record.fe_id == obs.fe_id {
            newer_than_own(state, record, obs)
        } else {
            obs.known.after(state.observed_revision())
        };
        if !newer {
            return stale(
                state.observed_revision(),
                format!(
                    "the VM's binding was removed at revision {} and this observation may be older (made knowing {}); \
                     observe the VM again",
                    display_rev(state.observed_revision()),
                    obs.known.describe()
                ),
            );
        }
        return Verdict::Write(fresh(record.move_seq + 1), Change::Bound);
    }

    if record.fe_id == obs.fe_id {
        // Already bound here. A newer observation is recorded (its revision then orders other
        // FEs' reports: one made before it cannot take the VM away); an older one — agents
        // re-report their VMs on reconnect with the original observation — writes nothing.
        let mut next = record.clone();
        let observed = newer_than_own(state, record, obs);
        if observed {
            next.mac = obs.mac.octets().to_vec();
            next.observed_at_unix_nanos = obs.observed_at;
            next.source = BindingSource::Arp as i32;
            next.observed_revision = 0;
        } else {
            next.observed_revision = state.carried_revision();
        }
        let announced_here = next.pending_fe_id == obs.fe_id;
        if announced_here {
            next.pending_fe_id.clear();
            next.pending_until_unix_nanos = 0;
        }
        return if observed || announced_here {
            next.committed_at_unix_nanos = now;
            Verdict::Write(next, Change::Updated)
        } else {
            Verdict::Unchanged
        };
    }

    if !obs.known.after(state.observed_revision()) {
        return stale(
            state.observed_revision(),
            format!(
                "the VM is bound to FE {} since revision {} and this observation was made knowing {}, so it may be \
                 older; observe the VM again once revision {} is known",
                record.fe_id,
                display_rev(state.observed_revision()),
                obs.known.describe(),
                display_rev(state.observed_revision())
            ),
        );
    }
    if record.frozen {
        return Verdict::Reject(damped(record));
    }
    move_to(rules, record, obs.fe_id, obs.mac, obs.observed_at, BindingSource::Arp, now)
}

fn decide_gone(state: &State, obs: &Observation<'_>, now: i64) -> Verdict {
    let Some(record) = &state.record else {
        // Nothing to remove — but this FE's own LEARNED may still be on its way (reports can be
        // reordered): the absence is recorded, so that it cannot bind the VM after this GONE.
        // Not when the GONE may be older than a collected removal: its tombstone would let this
        // FE's reports that are newer by its clock, but maybe older than that removal, through
        // (without it they meet the horizon).
        if state.horizon > 0 && !obs.known.after(Some(state.horizon)) {
            return Verdict::Unchanged;
        }
        let absence = BindingRecord {
            fe_id: obs.fe_id.to_owned(),
            mac: obs.mac.octets().to_vec(),
            source: BindingSource::Arp as i32,
            observed_at_unix_nanos: obs.observed_at,
            committed_at_unix_nanos: now,
            removed: true,
            ..Default::default()
        };
        return Verdict::Write(absence, Change::Updated);
    };
    if record.removed {
        // Already removed. A newer absence is recorded as the tombstone's (so that this FE's
        // reports made before it stay older than the tombstone); anything else writes nothing.
        let newer = if record.fe_id == obs.fe_id {
            newer_than_own(state, record, obs)
        } else {
            obs.known.after(state.observed_revision())
        };
        if !newer {
            return Verdict::Unchanged;
        }
        let next = BindingRecord {
            fe_id: obs.fe_id.to_owned(),
            source: BindingSource::Arp as i32,
            observed_at_unix_nanos: obs.observed_at,
            committed_at_unix_nanos: now,
            observed_revision: 0,
            ..record.clone()
        };
        return Verdict::Write(next, Change::Updated);
    }
    if record.fe_id != obs.fe_id {
        if obs.known.surely_after(state.observed_revision()) {
            // This FE saw the VM after the binding's observation and then lost it: its LEARNED
            // from in between may still be on its way, and would take the VM. The binding's
            // observation revision moves to this write, so that LEARNED is STALE when it comes.
            let mut next = record.clone();
            next.observed_revision = 0;
            next.committed_at_unix_nanos = now;
            return Verdict::Write(next, Change::Updated);
        }
        return Verdict::Reject(Rejection::new(
            Reason::NotBoundHere,
            Refusal::Precondition,
            format!(
                "VM is bound to FE {}, not {}; a GONE report only removes a binding to the reporting FE",
                record.fe_id, obs.fe_id
            ),
        ));
    }
    if !newer_than_own(state, record, obs) {
        return stale(
            state.observed_revision(),
            format!(
                "GONE observed at {} ns is not newer than this FE's observation at {} ns recorded at revision {}",
                obs.observed_at,
                record.observed_at_unix_nanos,
                display_rev(state.observed_revision())
            ),
        );
    }
    if record.frozen {
        return Verdict::Reject(damped(record));
    }
    Verdict::Write(tombstone(record, obs.fe_id, obs.observed_at, now), Change::Removed)
}

/// The tombstone of `record`, removed by FE `by` ("" = the controller) whose GONE was at `at`
/// (its clock; 0 for the controller).
pub fn tombstone(record: &BindingRecord, by: &str, at: i64, now: i64) -> BindingRecord {
    BindingRecord {
        fe_id: by.to_owned(),
        mac: record.mac.clone(),
        move_seq: record.move_seq,
        source: if by.is_empty() { BindingSource::Orchestrator } else { BindingSource::Arp } as i32,
        observed_at_unix_nanos: at,
        committed_at_unix_nanos: now,
        removed: true,
        ..Default::default()
    }
}

/// The controller removes the binding in `state` (UndeclareVm with remove_binding, housekeeping):
/// a tombstone, or None when there is no live binding.
pub fn remove(state: &State, now: i64) -> Option<BindingRecord> {
    state.binding().map(|b| tombstone(b, "", 0, now))
}

/// Decides an orchestrator's announcement of a migration to `target` (at `target_site`).
/// Without `commit` only the pending target is recorded (after the policy check); with `commit`
/// the binding moves now. `declared_mac` is used when the VM has no binding yet.
#[allow(clippy::too_many_arguments)]
pub fn decide_announcement(
    rules: &Rules,
    state: &State,
    vm: Option<&VmRecord>,
    target: &str,
    target_site: &str,
    commit: bool,
    pending_until: i64,
    now: i64,
) -> Verdict {
    if let Some(vm) = vm
        && let Some(rejection) = check_site(vm, target_site)
    {
        return Verdict::Reject(rejection);
    }
    match state.binding() {
        None => {
            let Some(vm) = vm else {
                return Verdict::Reject(Rejection::new(
                    Reason::Undeclared,
                    Refusal::Precondition,
                    "VM has no binding and is not declared, so its MAC is unknown; declare it first (DeclareVm)",
                ));
            };
            if !commit {
                return Verdict::Reject(Rejection::new(
                    Reason::NotBoundHere,
                    Refusal::Precondition,
                    "VM has no binding yet; announce with commit = true to place it, or let its FE learn it from ARP",
                ));
            }
            let record = BindingRecord {
                fe_id: target.to_owned(),
                mac: vm.mac.clone(),
                move_seq: state.tombstone().map_or(0, |t| t.move_seq + 1),
                source: BindingSource::Orchestrator as i32,
                observed_at_unix_nanos: now,
                committed_at_unix_nanos: now,
                ..Default::default()
            };
            Verdict::Write(record, Change::Bound)
        }
        Some(cur) if cur.fe_id == target => {
            if cur.pending_fe_id.is_empty() {
                Verdict::Unchanged
            } else {
                let mut next = cur.clone();
                next.pending_fe_id.clear();
                next.pending_until_unix_nanos = 0;
                next.committed_at_unix_nanos = now;
                next.observed_revision = state.carried_revision();
                Verdict::Write(next, Change::Updated)
            }
        }
        Some(cur) if cur.frozen => Verdict::Reject(damped(cur)),
        Some(cur) if commit => {
            let mac = Mac::from_bytes(&cur.mac).unwrap_or(Mac::ZERO);
            move_to(rules, cur, target, mac, now, BindingSource::Orchestrator, now)
        }
        Some(cur) => {
            let mut next = cur.clone();
            next.pending_fe_id = target.to_owned();
            next.pending_until_unix_nanos = pending_until;
            next.committed_at_unix_nanos = now;
            next.observed_revision = state.carried_revision();
            Verdict::Write(next, Change::Updated)
        }
    }
}

/// Decides whether a (re-)declaration is compatible with the current binding: a bound VM cannot
/// be re-declared with another MAC or with a policy that excludes the site it is bound at.
pub fn check_declaration(current: Option<(&BindingRecord, &str)>, decl: &VmRecord) -> Result<(), Rejection> {
    let Some((cur, site)) = current else {
        return Ok(());
    };
    if cur.mac != decl.mac {
        return Err(Rejection::new(
            Reason::MacMismatch,
            Refusal::Precondition,
            format!(
                "VM is bound at FE {} with MAC {}; declaring MAC {} would orphan it — undeclare with remove_binding first",
                cur.fe_id,
                display_mac(&cur.mac),
                display_mac(&decl.mac)
            ),
        ));
    }
    if let Some(mut rejection) = check_site(decl, site) {
        rejection.refusal = Refusal::Precondition;
        rejection.message = format!(
            "VM is currently bound at FE {} in site {site:?}, which the new policy excludes; move it first",
            cur.fe_id
        );
        return Err(rejection);
    }
    Ok(())
}

/// Unfreezes a damped binding (operator's ClearDamping or the damping hold timer).
pub fn clear_damping(state: &State, now: i64) -> Result<BindingRecord, Rejection> {
    let Some(current) = state.binding().filter(|b| b.frozen) else {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Precondition,
            "binding is not frozen; nothing to clear",
        ));
    };
    let mut next = current.clone();
    next.frozen = false;
    next.frozen_at_unix_nanos = 0;
    next.recent_moves_unix_nanos.clear();
    next.committed_at_unix_nanos = now;
    next.observed_revision = state.carried_revision();
    Ok(next)
}

/// Removes an expired migration announcement; `None` if there is nothing to expire.
pub fn expire_pending(state: &State, now: i64) -> Option<BindingRecord> {
    let current = state.binding()?;
    if current.pending_fe_id.is_empty() || current.pending_until_unix_nanos > now {
        return None;
    }
    let mut next = current.clone();
    next.pending_fe_id.clear();
    next.pending_until_unix_nanos = 0;
    next.committed_at_unix_nanos = now;
    next.observed_revision = state.carried_revision();
    Some(next)
}

fn move_to(
    rules: &Rules,
    cur: &BindingRecord,
    target: &str,
    mac: Mac,
    observed_at: i64,
    source: BindingSource,
    now: i64,
) -> Verdict {
    let window_start = now.saturating_sub(rules.damping.window_ns);
    let mut recent: Vec<i64> = cur.recent_moves_unix_nanos.iter().copied().filter(|t| *t > window_start).collect();
    recent.push(now);
    let froze = recent.len() > rules.damping.max_moves as usize;
    let record = BindingRecord {
        fe_id: target.to_owned(),
        mac: mac.octets().to_vec(),
        move_seq: cur.move_seq + 1,
        source: source as i32,
        observed_at_unix_nanos: observed_at,
        committed_at_unix_nanos: now,
        frozen: froze,
        frozen_at_unix_nanos: if froze { now } else { 0 },
        recent_moves_unix_nanos: recent,
        moved_from_fe_id: cur.fe_id.clone(),
        ..Default::default()
    };
    Verdict::Write(record, Change::Moved { froze })
}

fn check_site(vm: &VmRecord, site: &str) -> Option<Rejection> {
    if vm.allowed_sites.is_empty() || vm.allowed_sites.iter().any(|s| s == site) {
        return None;
    }
    Some(Rejection::new(
        Reason::SitePolicy,
        Refusal::Forbidden,
        format!("site policy allows only {:?}; site {site:?} is not allowed", vm.allowed_sites),
    ))
}

fn damped(cur: &BindingRecord) -> Rejection {
    Rejection::new(
        Reason::Damped,
        Refusal::Precondition,
        format!(
            "binding is frozen at FE {} by flap damping ({} moves in the window); an operator must call ClearDamping",
            cur.fe_id,
            cur.recent_moves_unix_nanos.len()
        ),
    )
}

fn display_rev(revision: Option<Revision>) -> String {
    revision.map_or_else(|| "(this report)".into(), |r| r.to_string())
}

fn display_mac(bytes: &[u8]) -> String {
    Mac::from_bytes(bytes).map(|m| m.to_string()).unwrap_or_else(|_| format!("{bytes:02x?}"))
}

#[cfg(test)]
mod interleavings;
#[cfg(test)]
mod tests;
