//! The binding registry: every write to bindings, VM declarations and FE registrations, with the
//! pure [`rules`] deciding and compare-and-swap committing.
//!
//! Every change to a binding is a compare-and-swap transaction on the binding key's mod revision
//! (and on the VM declaration's, so a concurrent re-declaration cannot be bypassed). A removal
//! writes a tombstone at the binding key (docs/design.md, section 3), which the cache hides from
//! every other reader; housekeeping collects old tombstones ([`Registry::collect_tombstones`]) and
//! raises the tombstone horizon with them. Several observations of one VM in one report are
//! decided together, in observation order, and committed as one write. The first
//! attempt decides on the replica's cache (no extra read round-trip); when the cache was behind,
//! the CAS fails, its failure branch returns the current values, and the rule is decided again on
//! them. Concurrent claims therefore converge on the rules' winner (docs/design.md, invariant I2),
//! and a rejected request writes nothing. The CAS writes of concurrent claims are group-committed
//! ([`batch`]): one store transaction carries many of them, with the same per-claim outcome as a
//! CAS of its own.
//!
//! The registry speaks in its own terms — [`Claim`]s, [`Rejection`]s and [`RegistryError`]s — and
//! knows nothing of gRPC: the API layer validates requests into [`ValidObservation`]s and maps the
//! answers to wire messages and status codes.
//!
//! * [`rules`] — the binding rules, pure functions.
//! * [`rejection`] — why a request is refused.
//! * [`error`] — why an operation failed.
//! * [`batch`] — group commit of concurrent compare-and-swap writes.
//! * `fes` — FE registrations and their liveness sessions.
//! * [`mac`] — MAC claims (RARP): one claim expanded to every IP of the MAC, committed at once.
//! * [`operator`] — withdrawing a migration announcement, removing a decommissioned FE.

pub mod batch;
pub mod error;
mod fes;
pub mod mac;
pub mod operator;
pub mod rejection;
pub mod rules;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use victor_proto::Mac;
use victor_proto::clock::monotonic_ns;
use victor_store::{Compare, KeyRange, KeyValue, MAX_TXN_OPS, Revision, Store, Txn, TxnOp, TxnResult};

use crate::cache::{Cache, FeView};
use crate::metrics::Metrics;
use crate::move_timeline::{MoveTimeline, MoveTimelines};
use crate::records::{BindingRecord, HorizonRecord, VmRecord, now_unix_nanos};
use batch::{Batcher, CasOutcome, CasRequest};
pub use error::{MAX_ATTEMPTS, RegistryError, RegistryResult};
pub use fes::FeRegistration;
pub use mac::{MAX_MAC_IPS, ValidMacClaim};
pub use operator::FeRemoved;
pub use rejection::{Reason, Refusal, Rejection};
use rules::{Change, Knowledge, Observation, Observed, Rules, State, Verdict};

/// Observations of one report applied concurrently: enough to fill several group-committed
/// transactions from a single report.
const REPORT_CONCURRENCY: usize = 4 * batch::MAX_BATCH;

/// One observation, already validated (address syntax, prefixes).
#[derive(Debug, Clone, Copy)]
pub struct ValidObservation {
    /// VM IP.
    pub ip: IpAddr,
    /// VM MAC.
    pub mac: Mac,
    /// Learned or gone.
    pub kind: Observed,
    /// Agent's observation time (ns, its own clock).
    pub observed_at: i64,
    /// The store revision the agent's desired state was complete up to when it observed (None:
    /// not said).
    pub known_revision: Option<u64>,
}

/// What one FE observation did to the binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// A new binding.
    Bound,
    /// The binding moved to the reporting FE.
    Moved,
    /// The binding already said so (or only its bookkeeping changed).
    Unchanged,
    /// A GONE observation removed the binding.
    Removed,
    /// Refused; nothing was written.
    Rejected(Rejection),
    /// A MAC claim, expanded: the answer for every IP bound or declared with the MAC, IPv4 first,
    /// each family in address order ([`Registry::claim_mac`]).
    Expanded(Vec<(IpAddr, Claim)>),
}

/// The registry's answer to one FE observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// What happened.
    pub outcome: ClaimOutcome,
    /// The binding's move sequence afterwards (0 without a binding).
    pub move_seq: u64,
    /// Revision of the write (0 if nothing was written); for a STALE rejection the revision the
    /// FE must know before it observes again.
    pub revision: Revision,
}

impl Claim {
    /// A claim refused before it reached the rules (validation).
    pub fn refused(rejection: Rejection) -> Claim {
        Claim { outcome: ClaimOutcome::Rejected(rejection), move_seq: 0, revision: 0 }
    }
}

/// What a CAS loop ended with.
#[derive(Debug, Clone)]
struct Committed<T> {
    /// What the decision said (for the write that was made, or why nothing was).
    outcome: T,
    /// Revision of the write (0 if nothing was written).
    revision: Revision,
    /// The record after the operation (binding, tombstone or none).
    record: Option<BindingRecord>,
}

impl Committed<Verdict> {
    /// The revision written (0 for "already so"), or the rules' rejection as an error.
    fn into_revision(self) -> RegistryResult<Revision> {
        match self.outcome {
            Verdict::Reject(r) => Err(RegistryError::Rejected(r)),
            _ => Ok(self.revision),
        }
    }
}

/// The current state of one VM (binding or tombstone, and the horizon) and its declaration, with
/// their mod revisions.
#[derive(Debug, Clone, Default)]
struct Current {
    state: State,
    binding_rev: Revision,
    /// Mod revision of the tombstone horizon key (0 = absent).
    horizon_rev: Revision,
    vm: Option<VmRecord>,
    vm_rev: Revision,
}

/// Applies binding rules with compare-and-swap.
pub struct Registry<S: Store> {
    store: S,
    cache: Arc<Cache>,
    rules: Rules,
    metrics: Arc<Metrics>,
    timelines: Arc<MoveTimelines>,
    /// Started on first use (it needs a runtime).
    batcher: OnceLock<Batcher>,
    /// Whether the store answered this replica's last health probe: while it did not, writes
    /// are refused before anything is sent, so "nothing was written" is certain (a write sent to
    /// a stalled store could be applied later, and would only get "outcome unknown").
    reachable: Arc<AtomicBool>,
}

impl<S: Store> Registry<S> {
    /// A registry writing to `store` and reading through `cache`.
    pub fn new(
        store: S,
        cache: Arc<Cache>,
        rules: Rules,
        metrics: Arc<Metrics>,
        timelines: Arc<MoveTimelines>,
    ) -> Self {
        let reachable = Arc::new(AtomicBool::new(true));
        Registry { store, cache, rules, metrics, timelines, batcher: OnceLock::new(), reachable }
    }

    /// Refuses writes while `reachable` is false (the replica's store health probe).
    pub fn with_reachability(mut self, reachable: Arc<AtomicBool>) -> Self {
        self.reachable = reachable;
        self
    }

    /// Fails with [`RegistryError::StoreUnreachable`] (nothing was written) while the store is
    /// known to be unreachable.
    pub fn writable(&self) -> RegistryResult<()> {
        if self.reachable.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.metrics.store_unavailable.inc();
        Err(RegistryError::StoreUnreachable)
    }

    fn batcher(&self) -> &Batcher {
        self.batcher.get_or_init(|| Batcher::start(self.store.clone(), self.metrics.clone()))
    }

    /// The rule parameters.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Applies the observations of one report by `fe`; the answers are in the order of the
    /// observations. Observations that failed validation (`Err`) are answered as rejected without
    /// touching the store (the caller counts them, [`Registry::count_refused`]: it knows their IPs). Several observations of one VM are decided together,
    /// in observation order, and committed as one write. An `Err` answer is a failure of the store
    /// or the replica for that VM's observations alone (the agent retries them); nothing is
    /// half-written.
    pub async fn report(
        &self,
        fe: &FeView,
        observations: Vec<Result<ValidObservation, Rejection>>,
        received_mono_ns: u64,
    ) -> Vec<RegistryResult<Claim>> {
        let mut answers: Vec<Option<RegistryResult<Claim>>> = Vec::with_capacity(observations.len());
        let mut groups: Vec<(IpAddr, Vec<(usize, ValidObservation)>)> = Vec::new();
        let mut group_of: std::collections::HashMap<IpAddr, usize> = std::collections::HashMap::new();
        for (i, obs) in observations.into_iter().enumerate() {
            match obs {
                Ok(obs) => {
                    answers.push(None);
                    let g = *group_of.entry(obs.ip).or_insert_with(|| {
                        groups.push((obs.ip, Vec::new()));
                        groups.len() - 1
                    });
                    groups[g].1.push((i, obs));
                }
                Err(rejection) => {
                    answers.push(Some(Ok(Claim::refused(rejection))));
                }
            }
        }
        let decided: Vec<_> = futures::stream::iter(groups)
            .map(|(ip, group)| async move {
                let (indices, obs): (Vec<usize>, Vec<ValidObservation>) = group.into_iter().unzip();
                (indices, self.observe_all(fe, ip, &obs, received_mono_ns).await)
            })
            .buffered(REPORT_CONCURRENCY)
            .collect()
            .await;
        for (indices, result) in decided {
            match result {
                Ok(claims) => {
                    for (i, claim) in indices.into_iter().zip(claims) {
                        answers[i] = Some(Ok(claim));
                    }
                }
                Err(err) => {
                    for i in indices {
                        answers[i] = Some(Err(err.clone()));
                    }
                }
            }
        }
        answers.into_iter().map(|a| a.expect("every observation answered")).collect()
    }

    /// Applies one observation by `fe` (received at `received_mono_ns`, for the move timeline).
    pub async fn observe(&self, fe: &FeView, obs: ValidObservation, received_mono_ns: u64) -> RegistryResult<Claim> {
        let mut claims = self.observe_all(fe, obs.ip, &[obs], received_mono_ns).await?;
        Ok(claims.remove(0))
    }

    /// Applies observations of the VM `ip` by `fe` (request order) as one write.
    async fn observe_all(
        &self,
        fe: &FeView,
        ip: IpAddr,
        obs: &[ValidObservation],
        received_mono_ns: u64,
    ) -> RegistryResult<Vec<Claim>> {
        let observations: Vec<Observation<'_>> = obs
            .iter()
            .map(|o| Observation {
                kind: o.kind,
                fe_id: &fe.fe_id,
                fe_site: &fe.record.site,
                mac: o.mac,
                observed_at: o.observed_at,
                known: Knowledge::from_wire(o.known_revision),
            })
            .collect();
        let mut committed = self
            .cas(ip, |cur| {
                rules::decide_batch(&self.rules, &cur.state, cur.vm.as_ref(), &observations, now_unix_nanos())
            })
            .await
            .inspect_err(|_| {
                for _ in obs {
                    self.metrics.claim("rejected", crate::metrics::family(ip));
                }
            })?;
        if committed.revision != 0 {
            rules::name_commit_revision(&mut committed.outcome, committed.revision);
        }
        let final_seq = committed.record.as_ref().filter(|b| !b.removed).map_or(0, |b| b.move_seq);
        Ok(committed
            .outcome
            .into_iter()
            .map(|verdict| self.claim_of(fe, ip, verdict, committed.revision, final_seq, received_mono_ns))
            .collect())
    }

    /// The answer for one observation's `verdict` on the VM `ip` by `fe`, whose write (if any) was
    /// committed at `revision`; `final_seq` is the binding's move sequence after that write.
    /// Counts it and records the move timeline of a bind or move.
    fn claim_of(
        &self,
        fe: &FeView,
        ip: IpAddr,
        verdict: Verdict,
        revision: Revision,
        final_seq: u64,
        received_mono_ns: u64,
    ) -> Claim {
        self.count(ip, &verdict);
        let move_seq = match &verdict {
            Verdict::Write(record, _) if record.removed => 0,
            Verdict::Write(record, _) => record.move_seq,
            Verdict::Unchanged | Verdict::Reject(_) => final_seq,
        };
        let (outcome, answered_revision) = match verdict {
            Verdict::Write(_, Change::Bound) => (ClaimOutcome::Bound, revision),
            Verdict::Write(_, Change::Moved { .. }) => (ClaimOutcome::Moved, revision),
            Verdict::Write(_, Change::Updated) => (ClaimOutcome::Unchanged, revision),
            Verdict::Write(_, Change::Removed) => (ClaimOutcome::Removed, revision),
            Verdict::Unchanged => (ClaimOutcome::Unchanged, 0),
            Verdict::Reject(r) => {
                let needed = r.revision;
                (ClaimOutcome::Rejected(r), needed)
            }
        };
        if matches!(outcome, ClaimOutcome::Bound | ClaimOutcome::Moved) {
            self.timelines.committed(MoveTimeline {
                vm_ip: ip,
                move_seq,
                fe_id: fe.fe_id.to_string(),
                revision,
                received_mono_ns,
                committed_mono_ns: monotonic_ns(),
                cached_mono_ns: 0,
                first_sent_mono_ns: 0,
                last_sent_mono_ns: 0,
                streams_sent: 0,
            });
        }
        Claim { outcome, move_seq, revision: answered_revision }
    }

    /// An orchestrator announces that the VM `ip` migrates to FE `target_fe`: recorded as
    /// pending for `ttl` (the VM's ARP there completes the move), or, with `commit`, the binding
    /// moves now. Returns the revision written (0 if nothing changed).
    pub async fn announce(&self, ip: IpAddr, target_fe: &str, commit: bool, ttl: Duration) -> RegistryResult<Revision> {
        let site = self.cache.read(|s| s.fes.get(target_fe).map(|f| f.record.site.clone())).ok_or_else(|| {
            RegistryError::Rejected(Rejection::new(
                Reason::Unspecified,
                Refusal::Absent,
                format!("FE {target_fe:?} is not registered (ListFes shows the registered FEs)"),
            ))
        })?;
        let ttl_ns = i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX);
        let committed = self
            .cas_verdict(ip, |cur| {
                let now = now_unix_nanos();
                rules::decide_announcement(
                    &self.rules,
                    &cur.state,
                    cur.vm.as_ref(),
                    target_fe,
                    &site,
                    commit,
                    now.saturating_add(ttl_ns),
                    now,
                )
            })
            .await?;
        committed.into_revision()
    }

    /// An operator unfreezes a binding frozen by flap damping.
    pub async fn clear_damping(&self, ip: IpAddr) -> RegistryResult<Revision> {
        let revision = self
            .cas_verdict(ip, |cur| match cur.state.binding() {
                None => Verdict::Reject(Rejection::new(
                    Reason::Unspecified,
                    Refusal::Absent,
                    format!("VM {ip} has no binding"),
                )),
                Some(_) => match rules::clear_damping(&cur.state, now_unix_nanos()) {
                    Ok(next) => Verdict::Write(next, Change::Updated),
                    Err(r) => Verdict::Reject(r),
                },
            })
            .await?
            .into_revision()?;
        tracing::info!(vm_ip = %ip, "flap damping cleared by operator");
        Ok(revision)
    }

    /// Housekeeping: drops the VM's migration announcement if it has expired.
    pub async fn expire_announcement(&self, ip: IpAddr) -> RegistryResult<Revision> {
        self.cas_verdict(ip, |cur| match rules::expire_pending(&cur.state, now_unix_nanos()) {
            Some(next) => Verdict::Write(next, Change::Updated),
            None => Verdict::Unchanged,
        })
        .await?
        .into_revision()
    }

    /// Housekeeping: unfreezes the VM's binding (its damping hold has expired).
    pub async fn thaw(&self, ip: IpAddr) -> RegistryResult<Revision> {
        self.cas_verdict(ip, |cur| match rules::clear_damping(&cur.state, now_unix_nanos()) {
            Ok(next) => Verdict::Write(next, Change::Updated),
            Err(_) => Verdict::Unchanged,
        })
        .await?
        .into_revision()
    }

    /// Housekeeping: removes the VM's binding (leaving a tombstone) if it still points at FE
    /// `fe_id` (down too long).
    pub async fn remove_if_bound_to(&self, ip: IpAddr, fe_id: &str) -> RegistryResult<Revision> {
        self.cas_verdict(ip, |cur| match cur.state.binding() {
            Some(b) if b.fe_id == fe_id => match rules::remove(&cur.state, now_unix_nanos()) {
                Some(tombstone) => Verdict::Write(tombstone, Change::Removed),
                None => Verdict::Unchanged,
            },
            _ => Verdict::Unchanged,
        })
        .await?
        .into_revision()
    }

    /// Housekeeping: deletes the tombstones of `ips` that are still the ones the cache shows and
    /// were written before `older_than` (controller wall clock, ns), raising the tombstone horizon
    /// to the highest removal revision among them — one transaction, all or nothing (a tombstone
    /// that changed meanwhile fails it; the next round tries again). Returns how many were
    /// collected and the revision of the deletion (0 if none).
    pub async fn collect_tombstones(&self, ips: &[IpAddr], older_than: i64) -> RegistryResult<(usize, Revision)> {
        let keys = self.cache.keys();
        let horizon_key = keys.tombstone_horizon();
        let (victims, horizon, horizon_rev) = self.cache.read(|s| {
            let victims: Vec<(IpAddr, Revision, Revision)> = ips
                .iter()
                .filter_map(|ip| s.tombstones.get(ip).map(|t| (*ip, t)))
                .filter(|(_, t)| t.committed_at < older_than)
                .take(MAX_TXN_OPS - 1)
                .map(|(ip, t)| {
                    (ip, t.revision, if t.observed_revision != 0 { t.observed_revision } else { t.revision })
                })
                .collect();
            (victims, s.tombstone_horizon.0, s.tombstone_horizon.1)
        });
        if victims.is_empty() {
            return Ok((0, 0));
        }
        let new_horizon = victims.iter().map(|(_, _, removed_at)| *removed_at).max().unwrap_or(0).max(horizon);
        let mut compares = vec![Compare::mod_revision(horizon_key.clone(), horizon_rev)];
        let mut success = vec![TxnOp::put(horizon_key, HorizonRecord { revision: new_horizon }.encode_to_vec())];
        for (ip, revision, _) in &victims {
            compares.push(Compare::mod_revision(keys.binding(*ip), *revision));
            success.push(TxnOp::delete(keys.binding(*ip)));
        }
        let result = self.txn(Txn { compares, success, failure: vec![] }).await?;
        if !result.succeeded {
            return Ok((0, 0));
        }
        for (ip, _, _) in &victims {
            self.metrics.tombstone_collected(*ip);
        }
        tracing::debug!(collected = victims.len(), horizon = new_horizon, "tombstones collected");
        Ok((victims.len(), result.revision))
    }

    /// [`Registry::cas`] for a decision that is one verdict (counted in the metrics).
    async fn cas_verdict(
        &self,
        ip: IpAddr,
        mut decide: impl FnMut(&Current) -> Verdict,
    ) -> RegistryResult<Committed<Verdict>> {
        let committed = self
            .cas(ip, |cur| {
                let verdict = decide(cur);
                let write = match &verdict {
                    Verdict::Write(record, _) => Some(record.clone()),
                    Verdict::Unchanged | Verdict::Reject(_) => None,
                };
                (write, verdict)
            })
            .await?;
        self.count(ip, &committed.outcome);
        Ok(committed)
    }

    /// Runs `decide` on the VM's current state and commits the record it returns (if any) with
    /// compare-and-swap, re-deciding on fresh state after every conflict. Rejections are in the
    /// decision, not errors; errors are store failures.
    async fn cas<T>(
        &self,
        ip: IpAddr,
        mut decide: impl FnMut(&Current) -> (Option<BindingRecord>, T),
    ) -> RegistryResult<Committed<T>> {
        let keys = self.cache.keys();
        let binding_key = keys.binding(ip);
        let vm_key = keys.vm(ip);
        let horizon_key = keys.tombstone_horizon();
        let mut current = self.cached(ip);
        for _ in 0..MAX_ATTEMPTS {
            let (write, outcome) = decide(&current);
            let Some(record) = write else {
                return Ok(Committed { outcome, revision: 0, record: current.state.record });
            };
            let request = CasRequest {
                binding_key: binding_key.clone(),
                vm_key: vm_key.clone(),
                binding_rev: current.binding_rev,
                vm_rev: current.vm_rev,
                op: TxnOp::put(binding_key.clone(), record.encode_to_vec()),
                // Decided on "no record" (the horizon mattered): a collection meanwhile moves
                // the horizon key, and the decision is made again.
                guard: current.state.record.is_none().then(|| (horizon_key.clone(), current.horizon_rev)),
            };
            self.writable()?;
            match self.batcher().submit(request).await? {
                CasOutcome::Committed(revision) => return Ok(Committed { outcome, revision, record: Some(record) }),
                CasOutcome::Conflict { binding, vm } => {
                    self.metrics.cas_retries.inc();
                    current = Current::decode(binding, vm)?;
                    if current.state.record.is_none() {
                        // A tombstone may just have been collected: the horizon that replaced it
                        // comes from the store (the cache may not show it yet).
                        (current.state.horizon, current.horizon_rev) = self.stored_horizon().await?;
                    }
                }
            }
        }
        Err(RegistryError::BindingContended(ip))
    }

    /// The tombstone horizon as the store has it, with its mod revision.
    async fn stored_horizon(&self) -> RegistryResult<(Revision, Revision)> {
        let key = self.cache.keys().tombstone_horizon();
        match self.store.get(&key).await?.0 {
            Some(kv) => Ok((
                HorizonRecord::decode(kv.value.as_slice())
                    .map_err(|e| RegistryError::Corrupt { what: "tombstone horizon".into(), detail: e.to_string() })?
                    .revision,
                kv.mod_revision,
            )),
            None => Ok((0, 0)),
        }
    }

    /// Writes a VM declaration after checking it against the current binding.
    pub async fn declare(&self, ip: IpAddr, decl: VmRecord) -> RegistryResult<Revision> {
        let keys = self.cache.keys();
        let mut current = self.cached(ip);
        for _ in 0..MAX_ATTEMPTS {
            if let Some(binding) = current.state.binding() {
                let site = self
                    .cache
                    .read(|s| s.fes.get(binding.fe_id.as_str()).map(|f| f.record.site.clone()))
                    .unwrap_or_default();
                rules::check_declaration(Some((binding, &site)), &decl).map_err(RegistryError::Rejected)?;
            }
            let txn = Txn {
                compares: vec![
                    Compare::mod_revision(keys.binding(ip), current.binding_rev),
                    Compare::mod_revision(keys.vm(ip), current.vm_rev),
                ],
                success: vec![TxnOp::put(keys.vm(ip), decl.encode_to_vec())],
                failure: vec![TxnOp::Get(KeyRange::key(keys.binding(ip))), TxnOp::Get(KeyRange::key(keys.vm(ip)))],
            };
            let result = self.txn(txn).await?;
            if result.succeeded {
                return Ok(result.revision);
            }
            self.metrics.cas_retries.inc();
            let mut reads = result.reads.into_iter();
            current = Current::decode(
                reads.next().and_then(|r| r.kvs.into_iter().next()),
                reads.next().and_then(|r| r.kvs.into_iter().next()),
            )?;
        }
        Err(RegistryError::DeclarationContended(ip))
    }

    /// Removes a declaration (and optionally the binding, leaving a tombstone) atomically.
    pub async fn undeclare(&self, ip: IpAddr, remove_binding: bool) -> RegistryResult<Revision> {
        let keys = self.cache.keys();
        let mut current = self.cached(ip);
        for _ in 0..MAX_ATTEMPTS {
            let mut compares = vec![Compare {
                key: keys.vm(ip),
                op: victor_store::CmpOp::NotEqual,
                target: victor_store::CompareTarget::Version(0),
            }];
            let mut success = vec![TxnOp::delete(keys.vm(ip))];
            if remove_binding {
                compares.push(Compare::mod_revision(keys.binding(ip), current.binding_rev));
                if let Some(tombstone) = rules::remove(&current.state, now_unix_nanos()) {
                    success.push(TxnOp::put(keys.binding(ip), tombstone.encode_to_vec()));
                }
            }
            let failure = vec![TxnOp::Get(KeyRange::key(keys.binding(ip))), TxnOp::Get(KeyRange::key(keys.vm(ip)))];
            let result = self.txn(Txn { compares, success, failure }).await?;
            if result.succeeded {
                return Ok(result.revision);
            }
            let mut reads = result.reads.into_iter().map(|r| r.kvs.into_iter().next());
            let (binding, vm) = (reads.next().flatten(), reads.next().flatten());
            if vm.is_none() {
                return Err(RegistryError::Rejected(Rejection::new(
                    Reason::Unspecified,
                    Refusal::Absent,
                    format!("VM {ip} is not declared"),
                )));
            }
            self.metrics.cas_retries.inc();
            current = Current::decode(binding, vm)?;
        }
        Err(RegistryError::DeclarationContended(ip))
    }

    /// Runs a transaction (refused while the store is known to be unreachable), timing it and
    /// counting outages.
    pub async fn txn(&self, txn: Txn) -> RegistryResult<TxnResult> {
        self.writable()?;
        let started = Instant::now();
        let result = self.store.txn(txn).await;
        self.metrics.store_op("txn", started);
        if let Err(err) = &result
            && err.is_unavailable()
        {
            self.metrics.store_unavailable.inc();
        }
        Ok(result?)
    }

    fn cached(&self, ip: IpAddr) -> Current {
        self.cache.read(|s| {
            let (record, binding_rev) = s
                .bindings
                .get(&ip)
                .or_else(|| s.tombstones.get(&ip))
                .map(|b| (Some(b.to_record()), b.revision))
                .unwrap_or((None, 0));
            let (vm, vm_rev) = s.vms.get(&ip).map(|v| (Some(v.record.clone()), v.revision)).unwrap_or((None, 0));
            let (horizon, horizon_rev) = s.tombstone_horizon;
            Current { state: State::stored(record, binding_rev, horizon), binding_rev, horizon_rev, vm, vm_rev }
        })
    }

    fn count(&self, ip: IpAddr, verdict: &Verdict) {
        let family = crate::metrics::family(ip);
        match verdict {
            Verdict::Write(_, Change::Bound) => self.metrics.claim("bound", family),
            Verdict::Write(_, Change::Moved { froze }) => {
                self.metrics.claim("moved", family);
                self.metrics.moved(ip, *froze);
                if *froze {
                    tracing::warn!(%ip, "flap damping froze a binding");
                }
            }
            Verdict::Write(_, Change::Updated) | Verdict::Unchanged => self.metrics.claim("unchanged", family),
            Verdict::Write(_, Change::Removed) => self.metrics.claim("removed", family),
            Verdict::Reject(r) => self.count_rejection(r, family),
        }
    }

    /// Counts a claim the API refused before it reached the registry (validation; [`Registry::report`]
    /// answers such observations without counting them). `family` is the `family` label of the IP
    /// the claim named ([`crate::metrics::family_of_bytes`]).
    pub fn count_refused(&self, rejection: &Rejection, family: &'static str) {
        self.count_rejection(rejection, family);
    }

    fn count_rejection(&self, rejection: &Rejection, family: &'static str) {
        self.metrics.claim("rejected", family);
        self.metrics.rejected(rejection.reason.label(), family);
    }
}

impl Current {
    /// From store reads (the horizon is left 0: the caller fills it in when it matters).
    fn decode(binding: Option<KeyValue>, vm: Option<KeyValue>) -> RegistryResult<Current> {
        let corrupt =
            |what: &str, e: prost::DecodeError| RegistryError::Corrupt { what: what.into(), detail: e.to_string() };
        let (binding, binding_rev) = match binding {
            Some(kv) => {
                (Some(BindingRecord::decode(kv.value.as_slice()).map_err(|e| corrupt("binding", e))?), kv.mod_revision)
            }
            None => (None, 0),
        };
        let (vm, vm_rev) = match vm {
            Some(kv) => (
                Some(VmRecord::decode(kv.value.as_slice()).map_err(|e| corrupt("VM declaration", e))?),
                kv.mod_revision,
            ),
            None => (None, 0),
        };
        Ok(Current { state: State::stored(binding, binding_rev, 0), binding_rev, horizon_rev: 0, vm, vm_rev })
    }
}
