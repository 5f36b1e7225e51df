//! Orchestrator and operator commands that undo state: withdrawing a pending migration
//! announcement, and removing a decommissioned FE (optionally with its bindings). The decisions
//! are pure functions ([`cancel_pending`], [`decide_fe_removal`]), unit-tested here; the
//! `Registry` methods commit them with compare-and-swap like every other write.
//!
//! Removing an FE: an FE whose agent holds a live session is never removed (the agent would
//! register again at once), and one that bindings still point at only with `force`, which removes
//! those bindings first. The registration is deleted with a compare on its mod revision and on
//! the absence of a session key, so an FE that registers again meanwhile is not removed. After the
//! deletion every binding still pointing at the FE (placed by an orchestrator while the removal
//! ran) is removed as well, and announcements naming the FE are cancelled: no binding is left
//! pointing at an FE the agents no longer know.

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use victor_store::{Compare, Revision, Store, Txn, TxnOp};

use super::rules::{Change, State, Verdict};
use super::{MAX_ATTEMPTS, Reason, Refusal, Registry, RegistryError, RegistryResult, Rejection};
use crate::records::{BindingRecord, now_unix_nanos};

/// Binding removals of one FE removal in flight at once (they are group-committed).
const SWEEP_CONCURRENCY: usize = 64;
/// How long an FE removal waits for this replica's cache to show a write it depends on.
const SETTLE: Duration = Duration::from_secs(2);

/// What an FE removal decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeState {
    /// Its agent holds a live session.
    pub up: bool,
    /// Bindings pointing at it.
    pub bindings: u64,
}

/// What an FE removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FeRemoved {
    /// Revision of the deletion of the registration.
    pub revision: Revision,
    /// Bindings removed with it.
    pub removed_bindings: u64,
    /// Announcements naming it that were cancelled.
    pub cancelled_announcements: u64,
    /// The latest revision written (what to settle on).
    pub last_revision: Revision,
}

/// Withdraws the pending announcement of the binding `current` of VM `ip` (only if it names
/// `expected`, when given). Returns the binding without it and the FE it named.
pub fn cancel_pending(
    state: &State,
    ip: IpAddr,
    expected: Option<&str>,
    now: i64,
) -> Result<(BindingRecord, String), Rejection> {
    let Some(cur) = state.binding() else {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Absent,
            format!("VM {ip} has no binding, so no migration announcement to cancel"),
        ));
    };
    if cur.pending_fe_id.is_empty() {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Absent,
            format!(
                "VM {ip} (bound at FE {}) has no pending migration announcement; nothing to cancel (it may have \
                 been cancelled already, completed by the VM's move, or expired)",
                cur.fe_id
            ),
        ));
    }
    if let Some(expected) = expected
        && cur.pending_fe_id != expected
    {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Precondition,
            format!(
                "the pending announcement of VM {ip} is a migration to FE {}, not {expected}; nothing was cancelled",
                cur.pending_fe_id
            ),
        ));
    }
    let mut next = cur.clone();
    let target = std::mem::take(&mut next.pending_fe_id);
    next.pending_until_unix_nanos = 0;
    next.committed_at_unix_nanos = now;
    // The observation the binding holds is unchanged (docs/design.md, section 3).
    next.observed_revision = state.carried_revision();
    Ok((next, target))
}

/// Decides whether FE `fe_id` (`state`: `None` when it is not registered) may be removed.
pub fn decide_fe_removal(fe_id: &str, state: Option<FeState>, force: bool) -> Result<(), Rejection> {
    let Some(state) = state else {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Absent,
            format!("FE {fe_id} is not registered (ListFes shows the registered FEs)"),
        ));
    };
    if state.up {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Precondition,
            format!(
                "FE {fe_id} holds a live session (its agent is running); stop its agent first and remove the FE \
                 once it shows down (its session expires after the session TTL). force does not override a live \
                 session: the agent would register again at once"
            ),
        ));
    }
    if state.bindings > 0 && !force {
        return Err(Rejection::new(
            Reason::Unspecified,
            Refusal::Precondition,
            format!(
                "FE {fe_id} still holds {} binding(s); move those VMs first (AnnounceMigration with commit), or \
                 remove with force, which also removes every binding pointing at the FE (every FE then drops \
                 those VMs' traffic until an FE learns them again)",
                state.bindings
            ),
        ));
    }
    Ok(())
}

impl<S: Store> Registry<S> {
    /// Withdraws the pending migration announcement of VM `ip` (only one naming `expected`, when
    /// given). Returns the revision written and the FE the announcement named.
    pub async fn cancel_announcement(&self, ip: IpAddr, expected: Option<&str>) -> RegistryResult<(Revision, String)> {
        let mut cancelled = String::new();
        let committed = self
            .cas_verdict(ip, |cur| match cancel_pending(&cur.state, ip, expected, now_unix_nanos()) {
                Ok((next, target)) => {
                    cancelled = target;
                    Verdict::Write(next, Change::Updated)
                }
                Err(rejection) => Verdict::Reject(rejection),
            })
            .await?;
        let revision = committed.into_revision()?;
        tracing::info!(vm_ip = %ip, target_fe_id = %cancelled, "migration announcement cancelled");
        Ok((revision, cancelled))
    }

    /// Removes the registration of FE `fe_id` (down, and without bindings unless `force`; see the
    /// module docs).
    pub async fn remove_fe(&self, fe_id: &str, force: bool) -> RegistryResult<FeRemoved> {
        let keys = self.cache.keys().clone();
        let mut done = FeRemoved::default();
        for _ in 0..MAX_ATTEMPTS {
            let cached = self.cache.read(|s| s.fes.get(fe_id).cloned());
            let fe = match cached {
                Some(fe) => Some(fe),
                None => self.registered_fe(fe_id).await?,
            };
            let bindings = self.cache.read(|s| s.bindings_per_fe.get(fe_id).copied().unwrap_or(0));
            let state = fe.as_ref().map(|f| FeState { up: f.up(), bindings });
            decide_fe_removal(fe_id, state, force).map_err(RegistryError::Rejected)?;
            let Some(fe) = fe else { unreachable!("an unregistered FE is refused above") };
            if force && bindings > 0 {
                let (removed, last) = self.remove_bindings_of(fe_id).await?;
                done.removed_bindings += removed;
                done.last_revision = done.last_revision.max(last);
            }
            let txn = Txn {
                compares: vec![
                    Compare::mod_revision(keys.fe(fe_id), fe.revision),
                    Compare::absent(keys.session(fe_id)),
                ],
                success: vec![TxnOp::delete(keys.fe(fe_id))],
                failure: vec![],
            };
            let result = self.txn(txn).await?;
            if !result.succeeded {
                // Registered again, or a session this replica has not seen yet: decide again on
                // the store's current state.
                self.metrics.cas_retries.inc();
                let now = self.store.current_revision().await?;
                self.cache.wait_for(now, SETTLE).await;
                continue;
            }
            done.revision = result.revision;
            done.last_revision = done.last_revision.max(result.revision);
            tracing::warn!(fe_id, force, removed_bindings = done.removed_bindings, "FE registration removed");
            // Bindings and announcements placed at the FE while it was being removed.
            self.cache.wait_for(result.revision, SETTLE).await;
            let (removed, last) = self.remove_bindings_of(fe_id).await?;
            done.removed_bindings += removed;
            let (cancelled, last_cancel) = self.cancel_announcements_to(fe_id).await?;
            done.cancelled_announcements = cancelled;
            done.last_revision = done.last_revision.max(last).max(last_cancel);
            return Ok(done);
        }
        Err(RegistryError::FeContended(fe_id.to_owned()))
    }

    /// Removes every binding this replica's cache shows at `fe_id`; returns how many were
    /// removed and the latest revision written.
    async fn remove_bindings_of(&self, fe_id: &str) -> RegistryResult<(u64, Revision)> {
        let ips: Vec<IpAddr> =
            self.cache.read(|s| s.bindings.iter().filter(|(_, b)| *b.fe_id == *fe_id).map(|(ip, _)| *ip).collect());
        let revisions = futures::stream::iter(ips)
            .map(|ip| self.remove_if_bound_to(ip, fe_id))
            .buffer_unordered(SWEEP_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        tally(revisions)
    }

    /// Cancels every pending announcement naming `fe_id`; returns how many and the latest revision.
    async fn cancel_announcements_to(&self, fe_id: &str) -> RegistryResult<(u64, Revision)> {
        let ips: Vec<IpAddr> = self
            .cache
            .read(|s| s.bindings.iter().filter(|(_, b)| b.pending_fe_id() == fe_id).map(|(ip, _)| *ip).collect());
        let mut results = Vec::with_capacity(ips.len());
        for ip in ips {
            results.push(match self.cancel_announcement(ip, Some(fe_id)).await {
                Ok((revision, _)) => Ok(revision),
                // Gone meanwhile (moved, expired, cancelled): nothing to do.
                Err(RegistryError::Rejected(_)) => Ok(0),
                Err(err) => Err(err),
            });
        }
        tally(results)
    }
}

/// How many writes happened (non-zero revisions) and the latest revision, or the first error.
fn tally(results: Vec<RegistryResult<Revision>>) -> RegistryResult<(u64, Revision)> {
    let mut count = 0;
    let mut last = 0;
    for result in results {
        let revision = result?;
        if revision > 0 {
            count += 1;
            last = last.max(revision);
        }
    }
    Ok((count, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(pending: &str) -> BindingRecord {
        BindingRecord {
            fe_id: "fe2".into(),
            mac: vec![2, 0, 0, 0, 0, 1],
            pending_fe_id: pending.into(),
            pending_until_unix_nanos: if pending.is_empty() { 0 } else { 500 },
            committed_at_unix_nanos: 1,
            ..Default::default()
        }
    }

    /// A stored record written at revision 5 (its observation's revision).
    fn stored(record: BindingRecord) -> State {
        State::stored(Some(record), 5, 0)
    }

    fn ip() -> IpAddr {
        "10.10.0.11".parse().unwrap()
    }

    #[test]
    fn cancelling_clears_only_a_pending_announcement() {
        let (next, target) = cancel_pending(&stored(bound("fe3")), ip(), None, 7).unwrap();
        assert_eq!(target, "fe3");
        assert_eq!(
            next,
            BindingRecord {
                pending_fe_id: String::new(),
                pending_until_unix_nanos: 0,
                committed_at_unix_nanos: 7,
                observed_revision: 5,
                ..bound("fe3")
            }
        );
        let (_, target) = cancel_pending(&stored(bound("fe3")), ip(), Some("fe3"), 7).unwrap();
        assert_eq!(target, "fe3");

        let none = cancel_pending(&State::stored(None, 0, 0), ip(), None, 7).unwrap_err();
        assert_eq!(none.refusal, Refusal::Absent);
        assert!(none.message.contains("VM 10.10.0.11 has no binding"), "{}", none.message);
        let idle = cancel_pending(&stored(bound("")), ip(), None, 7).unwrap_err();
        assert_eq!(idle.refusal, Refusal::Absent);
        assert!(idle.message.contains("bound at FE fe2) has no pending migration announcement"), "{}", idle.message);
        let other = cancel_pending(&stored(bound("fe3")), ip(), Some("fe4"), 7).unwrap_err();
        assert_eq!(other.refusal, Refusal::Precondition);
        assert!(other.message.contains("to FE fe3, not fe4; nothing was cancelled"), "{}", other.message);
    }

    #[test]
    fn an_fe_is_removed_only_when_down_and_without_bindings_unless_forced() {
        let down = |bindings| Some(FeState { up: false, bindings });
        assert_eq!(decide_fe_removal("fe3", down(0), false), Ok(()));
        assert_eq!(decide_fe_removal("fe3", down(2), true), Ok(()));

        let unknown = decide_fe_removal("fe9", None, true).unwrap_err();
        assert_eq!(unknown.refusal, Refusal::Absent);
        assert!(unknown.message.contains("FE fe9 is not registered"), "{}", unknown.message);

        let held = decide_fe_removal("fe3", down(2), false).unwrap_err();
        assert_eq!(held.refusal, Refusal::Precondition);
        for needle in ["FE fe3 still holds 2 binding(s)", "force", "also removes every binding pointing at the FE"] {
            assert!(held.message.contains(needle), "{needle}: {}", held.message);
        }

        for force in [false, true] {
            let live = decide_fe_removal("fe3", Some(FeState { up: true, bindings: 0 }), force).unwrap_err();
            assert_eq!(live.refusal, Refusal::Precondition);
            for needle in ["FE fe3 holds a live session", "stop its agent", "force does not override"] {
                assert!(live.message.contains(needle), "{needle}: {}", live.message);
            }
        }
    }
}
