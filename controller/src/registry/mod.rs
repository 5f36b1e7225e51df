//! The binding registry: applies the pure [`rules`] to the store.
//!
//! Every change to a binding is a compare-and-swap transaction on the binding key's mod revision
//! (and on the VM declaration's, so a concurrent re-declaration cannot be bypassed). The first
//! attempt decides on the replica's cache (no extra read round-trip); when the cache was behind,
//! the CAS fails, its failure branch returns the current values, and the rule is decided again on
//! them. Concurrent claims therefore converge on the rules' winner (I2), and a rejected request
//! writes nothing. The CAS writes of concurrent claims are group-committed ([`batch`]): one store
//! transaction carries up to 64 of them, with the same per-claim outcome as a CAS of its own.

pub mod batch;
pub mod rules;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prost::Message;
use victor_proto::Mac;
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::{ClaimOutcome, ClaimResult, RejectReason};
use victor_store::{Compare, KeyValue, Revision, Store, Txn, TxnOp};

use crate::api::error::{ApiError, ApiResult};
use crate::cache::{Cache, FeView};
use crate::metrics::Metrics;
use crate::records::{BindingRecord, VmRecord, now_unix_nanos};
use crate::trace::{MoveTrace, MoveTraces};
use batch::{Batcher, CasOutcome, CasRequest};
use rules::{Change, Observation, Observed, Rules, Verdict};

/// CAS attempts before giving up on a hot key.
const MAX_ATTEMPTS: usize = 16;

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

/// What a CAS loop ended with.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The final verdict (the one that was written, or why nothing was).
    pub verdict: Verdict,
    /// Revision of the write (0 if nothing was written).
    pub revision: Revision,
    /// The binding after the operation (None if absent/removed).
    pub binding: Option<BindingRecord>,
}

/// The current binding and declaration of one VM with their mod revisions.
#[derive(Debug, Clone, Default)]
pub struct Current {
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
    traces: Arc<MoveTraces>,
    /// Started on first use (it needs a runtime).
    batcher: OnceLock<Batcher>,
    /// Whether the store answered this replica's last health probe: while it did not, writes
    /// are refused before anything is sent, so "nothing was written" is certain (a write sent to
    /// a stalled store could be applied later, and would only get "outcome unknown").
    reachable: Arc<AtomicBool>,
}

impl<S: Store> Registry<S> {
    /// A registry writing to `store` and reading through `cache`.
    pub fn new(store: S, cache: Arc<Cache>, rules: Rules, metrics: Arc<Metrics>, traces: Arc<MoveTraces>) -> Self {
        let reachable = Arc::new(AtomicBool::new(true));
        Registry { store, cache, rules, metrics, traces, batcher: OnceLock::new(), reachable }
    }

    /// Refuses writes while `reachable` is false (the replica's store health probe).
    pub fn with_reachability(mut self, reachable: Arc<AtomicBool>) -> Self {
        self.reachable = reachable;
        self
    }

    /// Fails with UNAVAILABLE (nothing was written) while the store is known to be unreachable.
    pub fn writable(&self) -> ApiResult<()> {
        if self.reachable.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.metrics.store_unavailable.inc();
        Err(ApiError::Unavailable(
            "the store is unreachable from this controller replica (its health probe fails); nothing was \
             written, retry later"
                .into(),
        ))
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

    /// Applies one FE observation and describes the outcome for the agent. Store failures become
    /// a rejected result with code UNAVAILABLE (the agent retries); nothing is half-written.
    pub async fn observe(&self, fe: &FeView, obs: ValidObservation, received_mono_ns: u64) -> ClaimResult {
        let ip_bytes = victor_proto::types::ip_to_bytes(obs.ip);
        let observation = Observation {
            kind: obs.kind,
            fe_id: &fe.fe_id,
            fe_site: &fe.record.site,
            mac: obs.mac,
            observed_at: obs.observed_at,
        };
        let result = self
            .cas(obs.ip, |cur| {
                rules::decide_observation(
                    &self.rules,
                    cur.binding.as_ref(),
                    cur.vm.as_ref(),
                    &observation,
                    now_unix_nanos(),
                )
            })
            .await;
        let committed = match result {
            Ok(c) => c,
            Err(err) => {
                self.metrics.claim("rejected");
                return ClaimResult {
                    vm_ip: ip_bytes,
                    outcome: ClaimOutcome::Rejected as i32,
                    code: err.code() as i32,
                    message: err.to_string(),
                    ..Default::default()
                };
            }
        };
        let move_seq = committed.binding.as_ref().map(|b| b.move_seq).unwrap_or(0);
        let outcome = match &committed.verdict {
            Verdict::Write(_, Change::Bound) => ClaimOutcome::Bound,
            Verdict::Write(_, Change::Moved { .. }) => ClaimOutcome::Moved,
            Verdict::Write(_, Change::Updated) | Verdict::Unchanged => ClaimOutcome::Unchanged,
            Verdict::Delete => ClaimOutcome::Removed,
            Verdict::Reject(_) => ClaimOutcome::Rejected,
        };
        if matches!(outcome, ClaimOutcome::Bound | ClaimOutcome::Moved) {
            self.traces.committed(MoveTrace {
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
        let (reject_reason, code, message) = match &committed.verdict {
            Verdict::Reject(r) => (r.reason, r.code as i32, r.message.clone()),
            _ => (RejectReason::Unspecified, 0, String::new()),
        };
        ClaimResult {
            vm_ip: ip_bytes,
            outcome: outcome as i32,
            reject_reason: reject_reason as i32,
            code,
            message,
            move_seq,
            revision: committed.revision,
        }
    }

    /// Runs `decide` on the VM's current state and commits its verdict with compare-and-swap,
    /// re-deciding on fresh state after every conflict. Rejections are returned in the verdict,
    /// not as errors; errors are store failures.
    pub async fn cas(&self, ip: IpAddr, mut decide: impl FnMut(&Current) -> Verdict) -> ApiResult<Committed> {
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
        Err(ApiError::Unavailable(format!(
            "binding of {ip} is changing too fast (gave up after {MAX_ATTEMPTS} compare-and-swap conflicts); retry"
        )))
    }

    /// Writes a VM declaration after checking it against the current binding.
    pub async fn declare(&self, ip: IpAddr, decl: VmRecord) -> ApiResult<Revision> {
        let keys = self.cache.keys();
        let mut current = self.cached(ip);
        for _ in 0..MAX_ATTEMPTS {
            if let Some(binding) = &current.binding {
                let site = self
                    .cache
                    .read(|s| s.fes.get(binding.fe_id.as_str()).map(|f| f.record.site.clone()))
                    .unwrap_or_default();
                rules::check_declaration(Some((binding, &site)), &decl).map_err(ApiError::Rejected)?;
            }
            let txn = Txn {
                compares: vec![
                    Compare::mod_revision(keys.binding(ip), current.binding_rev),
                    Compare::mod_revision(keys.vm(ip), current.vm_rev),
                ],
                success: vec![TxnOp::put(keys.vm(ip), decl.encode_to_vec())],
                failure: vec![
                    TxnOp::Get(victor_store::KeyRange::key(keys.binding(ip))),
                    TxnOp::Get(victor_store::KeyRange::key(keys.vm(ip))),
                ],
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
        Err(ApiError::Unavailable(format!("VM {ip} is changing too fast; retry")))
    }

    /// Removes a declaration (and optionally the binding) atomically.
    pub async fn undeclare(&self, ip: IpAddr, remove_binding: bool) -> ApiResult<Revision> {
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
            return Err(ApiError::NotFound(format!("VM {ip} is not declared")));
        }
        Ok(result.revision)
    }

    /// Runs a transaction, timing it and counting outages.
    pub async fn txn(&self, txn: Txn) -> ApiResult<victor_store::TxnResult> {
        self.writable()?;
        let started = Instant::now();
        let result = self.store.txn(txn).await;
        self.metrics.store_op("txn", started);
        match result {
            Err(err) if err.is_unavailable() => {
                self.metrics.store_unavailable.inc();
                Err(err.into())
            }
            other => Ok(other?),
        }
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
            Verdict::Reject(r) => {
                self.metrics.claim("rejected");
                self.metrics.rejected(r.reason);
            }
        }
    }
}

impl Current {
    /// The binding (if any).
    pub fn binding(&self) -> Option<&BindingRecord> {
        self.binding.as_ref()
    }

    /// The declaration (if any).
    pub fn vm(&self) -> Option<&VmRecord> {
        self.vm.as_ref()
    }

    fn decode(binding: Option<KeyValue>, vm: Option<KeyValue>) -> ApiResult<Current> {
        let corrupt = |what: &str, e: prost::DecodeError| ApiError::Internal(format!("stored {what} is corrupt: {e}"));
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

/// Turns a rule rejection into an API error (single-item RPCs).
pub fn rejected(verdict: &Verdict) -> Option<ApiError> {
    match verdict {
        Verdict::Reject(r) => Some(ApiError::Rejected(r.clone())),
        _ => None,
    }
}
