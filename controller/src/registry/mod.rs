//! The binding registry: every write to bindings, VM declarations and FE registrations, with the
//! pure [`rules`] deciding and compare-and-swap committing.
//!
//! Every change to a binding is a compare-and-swap transaction on the binding key's mod revision
//! (and on the VM declaration's, so a concurrent re-declaration cannot be bypassed). The first
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
//! * [`operator`] — withdrawing a migration announcement, removing a decommissioned FE.

pub mod batch;
pub mod error;
mod fes;
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
use victor_store::{Compare, KeyRange, KeyValue, Revision, Store, Txn, TxnOp, TxnResult};

use crate::cache::{Cache, FeView};
use crate::metrics::Metrics;
use crate::move_timeline::{MoveTimeline, MoveTimelines};
use crate::records::{BindingRecord, VmRecord, now_unix_nanos};
use batch::{Batcher, CasOutcome, CasRequest};
pub use error::{MAX_ATTEMPTS, RegistryError, RegistryResult};
pub use fes::FeRegistration;
pub use operator::FeRemoved;
pub use rejection::{Reason, Refusal, Rejection};
use rules::{Change, Observation, Observed, Rules, Verdict};

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
    /// Agent's observation time (ns).
    pub observed_at: i64,
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
}

/// The registry's answer to one FE observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// What happened.
    pub outcome: ClaimOutcome,
    /// The binding's move sequence afterwards (0 without a binding).
    pub move_seq: u64,
    /// Revision of the write (0 if nothing was written).
    pub revision: Revision,
}

impl Claim {
    /// A claim refused before it reached the rules (validation).
    fn refused(rejection: Rejection) -> Claim {
        Claim { outcome: ClaimOutcome::Rejected(rejection), move_seq: 0, revision: 0 }
    }
}

/// What a CAS loop ended with.
#[derive(Debug, Clone)]
struct Committed {
    /// The final verdict (the one that was written, or why nothing was).
    verdict: Verdict,
    /// Revision of the write (0 if nothing was written).
    revision: Revision,
    /// The binding after the operation (None if absent/removed).
    binding: Option<BindingRecord>,
}

impl Committed {
    /// The revision written (0 for "already so"), or the rules' rejection as an error.
    fn into_revision(self) -> RegistryResult<Revision> {
        match self.verdict {
            Verdict::Reject(r) => Err(RegistryError::Rejected(r)),
            _ => Ok(self.revision),
        }
    }
}

/// The current binding and declaration of one VM with their mod revisions.
#[derive(Debug, Clone, Default)]
struct Current {
    binding: Option<BindingRecord>,
    binding_rev: Revision,
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
    /// observations. Observations that failed validation (`Err`) are counted and answered as
    /// rejected without touching the store. An `Err` answer is a failure of the store or the
    /// replica for that observation alone (the agent retries it); nothing is half-written.
    pub async fn report(
        &self,
        fe: &FeView,
        observations: Vec<Result<ValidObservation, Rejection>>,
        received_mono_ns: u64,
    ) -> Vec<RegistryResult<Claim>> {
        futures::stream::iter(observations)
            .map(|obs| async move {
                match obs {
                    Ok(obs) => self.observe(fe, obs, received_mono_ns).await,
                    Err(rejection) => {
                        self.count_rejection(&rejection);
                        Ok(Claim::refused(rejection))
                    }
                }
            })
            .buffered(REPORT_CONCURRENCY)
            .collect()
            .await
    }

    /// Applies one observation by `fe` (received at `received_mono_ns`, for the move timeline).
    pub async fn observe(&self, fe: &FeView, obs: ValidObservation, received_mono_ns: u64) -> RegistryResult<Claim> {
        let observation = Observation {
            kind: obs.kind,
            fe_id: &fe.fe_id,
            fe_site: &fe.record.site,
            mac: obs.mac,
            observed_at: obs.observed_at,
        };
        let committed = self
            .cas(obs.ip, |cur| {
                rules::decide_observation(
                    &self.rules,
                    cur.binding.as_ref(),
                    cur.vm.as_ref(),
                    &observation,
                    now_unix_nanos(),
                )
            })
            .await
            .inspect_err(|_| self.metrics.claim("rejected"))?;
        let move_seq = committed.binding.as_ref().map(|b| b.move_seq).unwrap_or(0);
        let outcome = match committed.verdict {
            Verdict::Write(_, Change::Bound) => ClaimOutcome::Bound,
            Verdict::Write(_, Change::Moved { .. }) => ClaimOutcome::Moved,
            Verdict::Write(_, Change::Updated) | Verdict::Unchanged => ClaimOutcome::Unchanged,
            Verdict::Delete => ClaimOutcome::Removed,
            Verdict::Reject(r) => ClaimOutcome::Rejected(r),
        };
        if matches!(outcome, ClaimOutcome::Bound | ClaimOutcome::Moved) {
            self.timelines.committed(MoveTimeline {
                vm_ip: obs.ip,
                move_seq,
                fe_id: fe.fe_id.to_string(),
                revision: committed.revision,
                received_mono_ns,
                committed_mono_ns: monotonic_ns(),
                cached_mono_ns: 0,
                first_sent_mono_ns: 0,
                last_sent_mono_ns: 0,
                streams_sent: 0,
            });
        }
        Ok(Claim { outcome, move_seq, revision: committed.revision })
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
            .cas(ip, |cur| {
                let now = now_unix_nanos();
                rules::decide_announcement(
                    &self.rules,
                    cur.binding.as_ref(),
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
            .cas(ip, |cur| match cur.binding.as_ref() {
                None => Verdict::Reject(Rejection::new(
                    Reason::Unspecified,
                    Refusal::Absent,
                    format!("VM {ip} has no binding"),
                )),
                Some(b) => match rules::clear_damping(b, now_unix_nanos()) {
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
        self.cas(ip, |cur| match cur.binding.as_ref().and_then(|b| rules::expire_pending(b, now_unix_nanos())) {
            Some(next) => Verdict::Write(next, Change::Updated),
            None => Verdict::Unchanged,
        })
        .await?
        .into_revision()
    }

    /// Housekeeping: unfreezes the VM's binding (its damping hold has expired).
    pub async fn thaw(&self, ip: IpAddr) -> RegistryResult<Revision> {
        self.cas(ip, |cur| match cur.binding.as_ref().map(|b| rules::clear_damping(b, now_unix_nanos())) {
            Some(Ok(next)) => Verdict::Write(next, Change::Updated),
            _ => Verdict::Unchanged,
        })
        .await?
        .into_revision()
    }

    /// Housekeeping: removes the VM's binding if it still points at FE `fe_id` (down too long).
    pub async fn remove_if_bound_to(&self, ip: IpAddr, fe_id: &str) -> RegistryResult<Revision> {
        self.cas(ip, |cur| match cur.binding.as_ref() {
            Some(b) if b.fe_id == fe_id => Verdict::Delete,
            _ => Verdict::Unchanged,
        })
        .await?
        .into_revision()
    }

    /// Runs `decide` on the VM's current state and commits its verdict with compare-and-swap,
    /// re-deciding on fresh state after every conflict. Rejections are returned in the verdict,
    /// not as errors; errors are store failures.
    async fn cas(&self, ip: IpAddr, mut decide: impl FnMut(&Current) -> Verdict) -> RegistryResult<Committed> {
        let keys = self.cache.keys();
        let binding_key = keys.binding(ip);
        let vm_key = keys.vm(ip);
        let mut current = self.cached(ip);
        for _ in 0..MAX_ATTEMPTS {
            let verdict = decide(&current);
            let op = match &verdict {
                Verdict::Write(record, _) => TxnOp::put(binding_key.clone(), record.encode_to_vec()),
                Verdict::Delete => TxnOp::delete(binding_key.clone()),
                Verdict::Unchanged | Verdict::Reject(_) => {
                    self.count(&verdict);
                    return Ok(Committed { verdict, revision: 0, binding: current.binding });
                }
            };
            let request = CasRequest {
                binding_key: binding_key.clone(),
                vm_key: vm_key.clone(),
                binding_rev: current.binding_rev,
                vm_rev: current.vm_rev,
                op,
            };
            self.writable()?;
            match self.batcher().submit(request).await? {
                CasOutcome::Committed(revision) => {
                    self.count(&verdict);
                    let binding = match &verdict {
                        Verdict::Write(record, _) => Some(record.clone()),
                        _ => None,
                    };
                    return Ok(Committed { verdict, revision, binding });
                }
                CasOutcome::Conflict { binding, vm } => {
                    self.metrics.cas_retries.inc();
                    current = Current::decode(binding, vm)?;
                }
            }
        }
        Err(RegistryError::BindingContended(ip))
    }

    /// Writes a VM declaration after checking it against the current binding.
    pub async fn declare(&self, ip: IpAddr, decl: VmRecord) -> RegistryResult<Revision> {
        let keys = self.cache.keys();
        let mut current = self.cached(ip);
        for _ in 0..MAX_ATTEMPTS {
            if let Some(binding) = &current.binding {
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

    /// Removes a declaration (and optionally the binding) atomically.
    pub async fn undeclare(&self, ip: IpAddr, remove_binding: bool) -> RegistryResult<Revision> {
        let keys = self.cache.keys();
        let mut success = vec![TxnOp::delete(keys.vm(ip))];
        if remove_binding {
            success.push(TxnOp::delete(keys.binding(ip)));
        }
        let txn = Txn {
            compares: vec![Compare {
                key: keys.vm(ip),
                op: victor_store::CmpOp::NotEqual,
                target: victor_store::CompareTarget::Version(0),
            }],
            success,
            failure: vec![],
        };
        let result = self.txn(txn).await?;
        if !result.succeeded {
            return Err(RegistryError::Rejected(Rejection::new(
                Reason::Unspecified,
                Refusal::Absent,
                format!("VM {ip} is not declared"),
            )));
        }
        Ok(result.revision)
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
            let (binding, binding_rev) =
                s.bindings.get(&ip).map(|b| (Some(b.to_record()), b.revision)).unwrap_or((None, 0));
            let (vm, vm_rev) = s.vms.get(&ip).map(|v| (Some(v.record.clone()), v.revision)).unwrap_or((None, 0));
            Current { binding, binding_rev, vm, vm_rev }
        })
    }

    fn count(&self, verdict: &Verdict) {
        match verdict {
            Verdict::Write(_, Change::Bound) => self.metrics.claim("bound"),
            Verdict::Write(_, Change::Moved { froze }) => {
                self.metrics.claim("moved");
                self.metrics.moves.inc();
                if *froze {
                    self.metrics.damping_frozen.inc();
                    tracing::warn!("flap damping froze a binding");
                }
            }
            Verdict::Write(_, Change::Updated) | Verdict::Unchanged => self.metrics.claim("unchanged"),
            Verdict::Delete => self.metrics.claim("removed"),
            Verdict::Reject(r) => self.count_rejection(r),
        }
    }

    fn count_rejection(&self, rejection: &Rejection) {
        self.metrics.claim("rejected");
        self.metrics.rejected(rejection.reason.label());
    }
}

impl Current {
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
        Ok(Current { binding, binding_rev, vm, vm_rev })
    }
}
