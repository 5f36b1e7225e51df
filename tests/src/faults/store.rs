//! The ground truth, read from etcd itself (not through a controller): every binding the
//! controller stored, decoded with the controller's own key layout and record type, and the checks
//! the fault tests make against it.
//!
//! * [`check_truth`] — nothing acknowledged is lost: every VM the churn saw committed is bound to
//!   that FE; a VM whose last claim had an unknown outcome is bound to its old FE or to the
//!   claimed one, and a claim the controller answered with "nothing was written" is not there;
//! * [`diff_agent`] — an agent's desired state equals the store, binding for binding (FE, MAC,
//!   move sequence and revision).

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use prost::Message;
use serde::Serialize;
use victor_controller::keys::{KeyKind, Keys};
use victor_controller::records::BindingRecord;
use victor_store::etcd::{EtcdConfig, EtcdStore};
use victor_store::{KeyRange, RangeRequest, Store, prefix_end};

use super::agent::Held;
use super::churn::VmTruth;
use crate::bench::driver::{vm_ip, vm_mac};
use crate::bench::wire::fe_key;

/// The controllers' key prefix (their default `--etcd-prefix`).
pub const PREFIX: &str = "/victor";

/// A binding as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The FE.
    pub fe: String,
    /// The MAC.
    pub mac: Vec<u8>,
    /// Move sequence.
    pub move_seq: u64,
    /// The key's mod revision.
    pub revision: u64,
}

/// Every binding in etcd at one revision.
#[derive(Debug, Clone, Default)]
pub struct StoreView {
    /// The revision of the read.
    pub revision: u64,
    /// Bindings by IPv4 address.
    pub bindings: HashMap<u32, Stored>,
}

impl StoreView {
    /// The newest binding change: an agent that applied this revision holds every binding of the
    /// view (the stream advances an agent past changes it does not carry only with its 1 s
    /// heartbeats, so waiting for the store revision itself would measure the heartbeat).
    pub fn latest_binding_revision(&self) -> u64 {
        self.bindings.values().map(|b| b.revision).max().unwrap_or(0)
    }
}

/// Reads every binding from etcd at `endpoints` (one linearizable range).
pub async fn read(endpoints: Vec<String>) -> Result<StoreView> {
    let store = EtcdStore::connect(EtcdConfig { endpoints, ..EtcdConfig::default() }).await?;
    let keys = Keys::new(PREFIX);
    let prefix = keys.bindings();
    let page = store
        .range(RangeRequest { range: KeyRange::between(prefix.clone(), prefix_end(&prefix)), limit: 0 })
        .await
        .context("read the bindings from etcd")?;
    let mut view = StoreView { revision: page.revision, bindings: HashMap::with_capacity(page.kvs.len()) };
    for kv in page.kvs {
        let Some(KeyKind::Binding(IpAddr::V4(ip))) = keys.parse(&kv.key) else {
            bail!("unexpected key under the bindings prefix: {}", String::from_utf8_lossy(&kv.key));
        };
        let record = BindingRecord::decode(kv.value.as_slice())
            .with_context(|| format!("stored binding of {ip} does not decode"))?;
        if record.removed {
            continue; // a removed binding's tombstone (docs/design.md, section 3): no binding
        }
        view.bindings.insert(
            u32::from(ip),
            Stored { fe: record.fe_id, mac: record.mac, move_seq: record.move_seq, revision: kv.mod_revision },
        );
    }
    Ok(view)
}

/// The truth held against the store.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TruthCheck {
    /// VMs whose last claim was acknowledged.
    pub known: usize,
    /// Acknowledged bindings missing or at another FE (must be 0); the first few, described.
    pub lost: Vec<String>,
    /// VMs with a claim of unknown outcome.
    pub uncertain: usize,
    /// ... of which the claim was applied.
    pub uncertain_applied: usize,
    /// Claims answered "nothing was written" that the store holds anyway (must be 0).
    pub written_after_nothing_was_written: Vec<String>,
    /// VMs with a wrong MAC, or a binding at neither candidate FE (must be 0).
    pub corrupt: Vec<String>,
    /// Bindings of VMs the churn does not own (the namespace lab's VM).
    pub other_bindings: usize,
}

impl TruthCheck {
    /// Whether everything acknowledged is there and nothing is corrupt.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.corrupt.is_empty()
    }
}

const SAMPLES: usize = 5;

fn note(list: &mut Vec<String>, what: impl FnOnce() -> String) {
    if list.len() < SAMPLES {
        list.push(what());
    }
}

/// Checks the churn's truth (`fes[i]` names FE `i`) against the store.
pub fn check_truth(view: &StoreView, truth: &[VmTruth], fes: &[String]) -> TruthCheck {
    let mut check = TruthCheck::default();
    for (vm, t) in truth.iter().enumerate() {
        let ip = vm_ip(vm);
        let stored = view.bindings.get(&u32::from(ip));
        if let Some(s) = stored
            && s.mac != vm_mac(vm)
        {
            note(&mut check.corrupt, || format!("{ip} has MAC {:02x?}", s.mac));
        }
        let at = stored.map(|s| s.fe.as_str());
        match t {
            VmTruth::Known(fe) => {
                check.known += 1;
                if at != Some(fes[*fe as usize].as_str()) {
                    note(&mut check.lost, || format!("{ip}: acknowledged at {}, store has {at:?}", fes[*fe as usize]));
                }
            }
            VmTruth::Uncertain { from, to, said } => {
                check.uncertain += 1;
                if at == Some(fes[*to as usize].as_str()) {
                    check.uncertain_applied += 1;
                    if said.contains("nothing was written") {
                        note(&mut check.written_after_nothing_was_written, || {
                            format!(
                                "{ip}: claim for {} is stored although the controller said: {said}",
                                fes[*to as usize]
                            )
                        });
                    }
                } else if at != Some(fes[*from as usize].as_str()) {
                    note(&mut check.corrupt, || {
                        format!("{ip}: store has {at:?}, expected {} or {}", fes[*from as usize], fes[*to as usize])
                    });
                }
            }
        }
    }
    let churned = u32::from(vm_ip(0))..u32::from(vm_ip(truth.len()));
    check.other_bindings = view.bindings.keys().filter(|ip| !churned.contains(ip)).count();
    check
}

/// The first difference between an agent's desired state and the store, if any (with the count
/// of differences).
pub fn diff_agent(map: &HashMap<u32, Held>, view: &StoreView) -> Option<String> {
    let mut differences = 0usize;
    let mut first = None;
    for (&ip, s) in &view.bindings {
        let wanted = (fe_key(s.fe.as_bytes()), s.mac.as_slice(), s.move_seq, s.revision);
        let problem = match map.get(&ip) {
            None => {
                Some(format!("{} missing (store: {} at revision {})", std::net::Ipv4Addr::from(ip), s.fe, s.revision))
            }
            Some(h) if (h.fe, &h.mac[..], h.move_seq, h.revision) != wanted => Some(format!(
                "{} held at revision {} (move_seq {}), store has {} at revision {} (move_seq {})",
                std::net::Ipv4Addr::from(ip),
                h.revision,
                h.move_seq,
                s.fe,
                s.revision,
                s.move_seq
            )),
            Some(_) => None,
        };
        if let Some(p) = problem {
            differences += 1;
            first.get_or_insert(p);
        }
    }
    for &ip in map.keys().filter(|ip| !view.bindings.contains_key(ip)) {
        differences += 1;
        first.get_or_insert_with(|| format!("{} held but not in the store", std::net::Ipv4Addr::from(ip)));
    }
    first.map(|f| format!("{differences} difference(s), first: {f}"))
}
