//! MAC claims: an FE saw a frame that names a VM's MAC and no IP address (a RARP frame, e.g.
//! QEMU's `announce-self` after a live migration). The claim is expanded through the cache's MAC
//! index ([`crate::cache::macs`]) to every IP whose live binding has the MAC or that is declared
//! with it, and each IP gets exactly what a LEARNED of that IP by the same FE, at the same time,
//! knowing the same revision would get ([`rules::decide_batch`] per IP: declared MAC, site policy,
//! ordering and STALE, damping). The writes of all of them are one compare-and-swap transaction,
//! so a dual-stack VM's addresses move at one revision; a conflict re-decides on the values the
//! failed transaction read back, as [`Registry::cas`] does for one IP.
//!
//! Trust model (docs/design.md, section 3): a MAC claim moves every undeclared IP bound with the
//! MAC; a declared VM's IP moves only with its declared MAC (an IP bound with the MAC but declared
//! with another is MAC_MISMATCH, like a LEARNED would be).

use std::net::IpAddr;

use prost::Message;
use victor_proto::Mac;
use victor_store::{Compare, KeyRange, MAX_TXN_OPS, Revision, Store, Txn, TxnOp};

use super::rules::{self, Knowledge, Observation, Observed, Verdict};
use super::{Claim, ClaimOutcome, Current, Reason, Refusal, Registry, RegistryError, RegistryResult, Rejection};
use crate::cache::FeView;
use crate::records::{BindingRecord, HorizonRecord, now_unix_nanos};

/// Most IPs one MAC claim moves: every IP's compares (binding, declaration, horizon) and failure
/// reads must fit one transaction of etcd 3.4 ([`MAX_TXN_OPS`] operations per list).
pub const MAX_MAC_IPS: usize = 32;
const _: () = assert!(3 * MAX_MAC_IPS <= MAX_TXN_OPS);

/// A MAC claim, validated (MAC syntax).
#[derive(Debug, Clone, Copy)]
pub struct ValidMacClaim {
    /// The MAC seen.
    pub mac: Mac,
    /// Agent's observation time (ns, its own clock).
    pub observed_at: i64,
    /// The store revision the agent's desired state was complete up to when it saw the frame.
    pub known_revision: Option<u64>,
}

/// One IP of a MAC claim while it is decided.
struct Expanded {
    ip: IpAddr,
    current: Current,
    /// Set when the IP was refused before the rules (outside the FE's prefixes).
    refused: Option<Rejection>,
}

impl<S: Store> Registry<S> {
    /// Applies the MAC claim `claim` by `fe`: expanded to every IP bound or declared with the MAC
    /// (each checked with `admit` first: the mobile prefixes the FE serves), each decided as a
    /// LEARNED, all written in one transaction. An unknown MAC, or one with more than
    /// [`MAX_MAC_IPS`] IPs, is a rejected claim that wrote nothing. `Err` is a failure of the
    /// store or of contention (nothing was written; the agent sends the claim again).
    pub async fn claim_mac(
        &self,
        fe: &FeView,
        claim: ValidMacClaim,
        admit: impl Fn(IpAddr) -> Result<(), Rejection>,
        received_mono_ns: u64,
    ) -> RegistryResult<Claim> {
        let ips = self.cache.read(|s| s.macs.ips(claim.mac));
        if ips.is_empty() {
            let rejection = Rejection::new(
                Reason::UnknownMac,
                Refusal::Absent,
                format!("no VM is bound or declared with MAC {}; nothing to move", claim.mac),
            );
            self.count_rejection(&rejection, crate::metrics::NO_FAMILY);
            return Ok(Claim::refused(rejection));
        }
        if ips.len() > MAX_MAC_IPS {
            let rejection = Rejection::new(
                Reason::TooManyIps,
                Refusal::Precondition,
                format!(
                    "MAC {} is bound or declared with {} IPs; a MAC claim moves at most {MAX_MAC_IPS}: report them \
                     one by one",
                    claim.mac,
                    ips.len()
                ),
            );
            self.count_rejection(&rejection, crate::metrics::NO_FAMILY);
            return Ok(Claim::refused(rejection));
        }
        let mut expanded: Vec<Expanded> =
            ips.into_iter().map(|ip| Expanded { ip, current: self.cached(ip), refused: admit(ip).err() }).collect();
        let observation = Observation {
            kind: Observed::Learned,
            fe_id: &fe.fe_id,
            fe_site: &fe.record.site,
            mac: claim.mac,
            observed_at: claim.observed_at,
            known: Knowledge::from_wire(claim.known_revision),
        };
        for _ in 0..super::MAX_ATTEMPTS {
            let now = now_unix_nanos();
            let decided: Vec<(Option<BindingRecord>, Option<Verdict>)> = expanded
                .iter()
                .map(|e| {
                    if e.refused.is_some() {
                        return (None, None);
                    }
                    let (write, mut verdicts) =
                        rules::decide_batch(&self.rules, &e.current.state, e.current.vm.as_ref(), &[observation], now);
                    (write, verdicts.pop())
                })
                .collect();
            let writes: Vec<usize> = (0..expanded.len()).filter(|&i| decided[i].0.is_some()).collect();
            if writes.is_empty() {
                return Ok(self.expanded_claim(fe, expanded, decided, 0, received_mono_ns));
            }
            let result = self.txn(self.mac_transaction(&expanded, &decided, &writes)).await?;
            if result.succeeded {
                return Ok(self.expanded_claim(fe, expanded, decided, result.revision, received_mono_ns));
            }
            self.metrics.cas_retries.inc();
            self.refresh(&mut expanded, &writes, result.reads).await?;
        }
        Err(RegistryError::BindingContended(expanded[0].ip))
    }

    /// The transaction writing the decided records of the IPs `writes`: every one of them still
    /// as decided on (binding, declaration, and the tombstone horizon for a decision made on no
    /// record), or nothing; on failure it reads those keys back.
    fn mac_transaction(
        &self,
        expanded: &[Expanded],
        decided: &[(Option<BindingRecord>, Option<Verdict>)],
        writes: &[usize],
    ) -> Txn {
        let keys = self.cache.keys();
        let mut txn = Txn { compares: Vec::new(), success: Vec::new(), failure: Vec::new() };
        for &i in writes {
            let (e, record) = (&expanded[i], decided[i].0.as_ref().expect("a write"));
            let (binding_key, vm_key) = (keys.binding(e.ip), keys.vm(e.ip));
            txn.compares.push(Compare::mod_revision(binding_key.clone(), e.current.binding_rev));
            txn.compares.push(Compare::mod_revision(vm_key.clone(), e.current.vm_rev));
            txn.success.push(TxnOp::put(binding_key.clone(), record.encode_to_vec()));
            txn.failure.push(TxnOp::Get(KeyRange::key(binding_key)));
            txn.failure.push(TxnOp::Get(KeyRange::key(vm_key)));
            if e.current.state.record.is_none() {
                let horizon = keys.tombstone_horizon();
                txn.compares.push(Compare::mod_revision(horizon.clone(), e.current.horizon_rev));
                txn.failure.push(TxnOp::Get(KeyRange::key(horizon)));
            }
        }
        txn
    }

    /// After a failed transaction: the current state of the IPs it wanted to write, from what it
    /// read back.
    async fn refresh(
        &self,
        expanded: &mut [Expanded],
        writes: &[usize],
        reads: Vec<victor_store::RangeResult>,
    ) -> RegistryResult<()> {
        let mut reads = reads.into_iter().map(|r| r.kvs.into_iter().next());
        for &i in writes {
            let guarded = expanded[i].current.state.record.is_none();
            let (binding, vm) = (reads.next().flatten(), reads.next().flatten());
            let horizon = if guarded { reads.next().flatten() } else { None };
            let mut current = Current::decode(binding, vm)?;
            if current.state.record.is_none() {
                (current.state.horizon, current.horizon_rev) = match horizon {
                    Some(kv) => (
                        HorizonRecord::decode(kv.value.as_slice())
                            .map_err(|e| RegistryError::Corrupt {
                                what: "tombstone horizon".into(),
                                detail: e.to_string(),
                            })?
                            .revision,
                        kv.mod_revision,
                    ),
                    None if guarded => (0, 0),
                    // Decided on a record that is gone now: the horizon was not read.
                    None => self.stored_horizon().await?,
                };
            }
            expanded[i].current = current;
        }
        Ok(())
    }

    /// The answer to a MAC claim whose writes were committed at `revision` (0: none).
    fn expanded_claim(
        &self,
        fe: &FeView,
        expanded: Vec<Expanded>,
        decided: Vec<(Option<BindingRecord>, Option<Verdict>)>,
        revision: Revision,
        received_mono_ns: u64,
    ) -> Claim {
        let answers = expanded
            .into_iter()
            .zip(decided)
            .map(|(e, (write, verdict))| {
                let claim = match e.refused {
                    Some(rejection) => {
                        self.count_rejection(&rejection, crate::metrics::family(e.ip));
                        Claim::refused(rejection)
                    }
                    None => {
                        let mut verdict = verdict.expect("every admitted IP is decided");
                        if revision != 0 {
                            rules::name_commit_revision(std::slice::from_mut(&mut verdict), revision);
                        }
                        let final_seq = match &write {
                            Some(record) if !record.removed => record.move_seq,
                            Some(_) => 0,
                            None => e.current.state.binding().map_or(0, |b| b.move_seq),
                        };
                        let written = if write.is_some() { revision } else { 0 };
                        self.claim_of(fe, e.ip, verdict, written, final_seq, received_mono_ns)
                    }
                };
                (e.ip, claim)
            })
            .collect();
        Claim { outcome: ClaimOutcome::Expanded(answers), move_seq: 0, revision }
    }
}
