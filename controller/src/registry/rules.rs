//! The binding rules (docs/design.md, invariants I1–I4) as pure functions: given the stored
//! binding, the VM's declaration and one observation or command, decide what to write. No IO, no
//! clocks (the caller passes `now`), so every rule is unit- and property-tested here; the
//! registry's IO layer only adds compare-and-swap and retries.
//!
//! Ordering (invariant I2): a binding moves only to an observation that is strictly newer than the
//! one it holds (observation time, then FE id as a deterministic tie-break), so a late or stale
//! report never rolls a newer binding back, and racing claims converge on the newest one whatever
//! order they are committed in.

use victor_proto::Mac;

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
    /// Observations more than this far in the future (agent clock ahead) are refused.
    pub max_clock_skew_ns: i64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            damping: DampingPolicy { max_moves: 5, window_ns: 180 * 1_000_000_000 },
            require_declared: false,
            max_clock_skew_ns: 30 * 1_000_000_000,
        }
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
    /// When the FE saw it (ns).
    pub observed_at: i64,
}

/// What kind of change a write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new binding.
    Bound,
    /// The binding moved to another FE; `froze` when this move tripped flap damping.
    Moved {
        /// Damping froze the binding with this move.
        froze: bool,
    },
    /// Same FE, but something stored changed (MAC, pending announcement cleared, damping).
    Updated,
}

/// The decision for one observation or command.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Store this record.
    Write(BindingRecord, Change),
    /// Delete the binding.
    Delete,
    /// Nothing to do (already so).
    Unchanged,
    /// Refused.
    Reject(Rejection),
}

/// Decides what an FE's observation does to the binding (`current`) of a VM (`vm` = its
/// declaration, if any).
pub fn decide_observation(
    rules: &Rules,
    current: Option<&BindingRecord>,
    vm: Option<&VmRecord>,
    obs: &Observation<'_>,
    now: i64,
) -> Verdict {
    if obs.observed_at <= 0 || obs.observed_at > now.saturating_add(rules.max_clock_skew_ns) {
        return Verdict::Reject(Rejection::new(
            Reason::BadTimestamp,
            Refusal::Invalid,
            format!(
                "observation time {} ns is unusable (controller time {now} ns); check the FE's clock (NTP)",
                obs.observed_at
            ),
        ));
    }
    match obs.kind {
        Observed::Learned => decide_learned(rules, current, vm, obs, now),
        Observed::Gone => decide_gone(current, obs),
    }
}

fn decide_learned(
    rules: &Rules,
    current: Option<&BindingRecord>,
    vm: Option<&VmRecord>,
    obs: &Observation<'_>,
    now: i64,
) -> Verdict {
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

    let Some(cur) = current else {
        let record = BindingRecord {
            fe_id: obs.fe_id.to_owned(),
            mac: obs.mac.octets().to_vec(),
            move_seq: 0,
            source: BindingSource::Arp as i32,
            observed_at_unix_nanos: obs.observed_at,
            committed_at_unix_nanos: now,
            ..Default::default()
        };
        return Verdict::Write(record, Change::Bound);
    };

    if cur.fe_id == obs.fe_id {
        // Already bound here. A newer observation is recorded (else a delayed claim from another
        // FE observed in between could win and roll the binding back); an old one — agents
        // re-report their VMs on reconnect with the original observation times — writes nothing.
        let mut next = cur.clone();
        let mut changed = false;
        if obs.observed_at > cur.observed_at_unix_nanos {
            next.mac = obs.mac.octets().to_vec();
            next.observed_at_unix_nanos = obs.observed_at;
            changed = true;
        }
        if next.pending_fe_id == obs.fe_id {
            next.pending_fe_id.clear();
            next.pending_until_unix_nanos = 0;
            changed = true;
        }
        return if changed {
            next.committed_at_unix_nanos = now;
            Verdict::Write(next, Change::Updated)
        } else {
            Verdict::Unchanged
        };
    }

    if !is_newer(obs.observed_at, obs.fe_id, cur.observed_at_unix_nanos, &cur.fe_id) {
        return Verdict::Reject(Rejection::new(
            Reason::Stale,
            Refusal::Precondition,
            format!(
                "observation at {} ns is not newer than the binding to FE {} observed at {} ns; ignoring the stale report",
                obs.observed_at, cur.fe_id, cur.observed_at_unix_nanos
            ),
        ));
    }
    if cur.frozen {
        return Verdict::Reject(damped(cur));
    }
    move_to(rules, cur, obs.fe_id, obs.mac, obs.observed_at, BindingSource::Arp, now)
}

fn decide_gone(current: Option<&BindingRecord>, obs: &Observation<'_>) -> Verdict {
    let Some(cur) = current else {
        return Verdict::Reject(Rejection::new(
            Reason::NotBoundHere,
            Refusal::Absent,
            "VM has no binding; nothing to remove",
        ));
    };
    if cur.fe_id != obs.fe_id {
        return Verdict::Reject(Rejection::new(
            Reason::NotBoundHere,
            Refusal::Precondition,
            format!(
                "VM is bound to FE {}, not {}; a GONE report only removes a binding to the reporting FE",
                cur.fe_id, obs.fe_id
            ),
        ));
    }
    if obs.observed_at < cur.observed_at_unix_nanos {
        return Verdict::Reject(Rejection::new(
            Reason::Stale,
            Refusal::Precondition,
            format!(
                "GONE observed at {} ns is older than the binding's observation at {} ns",
                obs.observed_at, cur.observed_at_unix_nanos
            ),
        ));
    }
    if cur.frozen {
        return Verdict::Reject(damped(cur));
    }
    Verdict::Delete
}

/// Decides an orchestrator's announcement of a migration to `target` (at `target_site`).
/// Without `commit` only the pending target is recorded (after the policy check); with `commit`
/// the binding moves now. `declared_mac` is used when the VM has no binding yet.
#[allow(clippy::too_many_arguments)]
pub fn decide_announcement(
    rules: &Rules,
    current: Option<&BindingRecord>,
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
    match current {
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
                Verdict::Write(next, Change::Updated)
            }
        }
        Some(cur) if cur.frozen => Verdict::Reject(damped(cur)),
        Some(cur) if commit => {
            let mac = Mac::from_bytes(&cur.mac).unwrap_or(Mac::ZERO);
            let observed = now.max(cur.observed_at_unix_nanos + 1);
            move_to(rules, cur, target, mac, observed, BindingSource::Orchestrator, now)
        }
        Some(cur) => {
            let mut next = cur.clone();
            next.pending_fe_id = target.to_owned();
            next.pending_until_unix_nanos = pending_until;
            next.committed_at_unix_nanos = now;
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
pub fn clear_damping(current: &BindingRecord, now: i64) -> Result<BindingRecord, Rejection> {
    if !current.frozen {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Precondition,
            "binding is not frozen; nothing to clear",
        ));
    }
    let mut next = current.clone();
    next.frozen = false;
    next.frozen_at_unix_nanos = 0;
    next.recent_moves_unix_nanos.clear();
    next.committed_at_unix_nanos = now;
    Ok(next)
}

/// Removes an expired migration announcement; `None` if there is nothing to expire.
pub fn expire_pending(current: &BindingRecord, now: i64) -> Option<BindingRecord> {
    if current.pending_fe_id.is_empty() || current.pending_until_unix_nanos > now {
        return None;
    }
    let mut next = current.clone();
    next.pending_fe_id.clear();
    next.pending_until_unix_nanos = 0;
    next.committed_at_unix_nanos = now;
    Some(next)
}

/// True when observation (`at`, `fe`) is strictly newer than (`cur_at`, `cur_fe`): later time, or
/// the same time and a larger FE id (a deterministic tie-break so racing claims converge).
pub fn is_newer(at: i64, fe: &str, cur_at: i64, cur_fe: &str) -> bool {
    (at, fe) > (cur_at, cur_fe)
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
        pending_fe_id: String::new(),
        pending_until_unix_nanos: 0,
        moved_from_fe_id: cur.fe_id.clone(),
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

fn display_mac(bytes: &[u8]) -> String {
    Mac::from_bytes(bytes).map(|m| m.to_string()).unwrap_or_else(|_| format!("{bytes:02x?}"))
}

#[cfg(test)]
mod tests;
