//! The controller's own types → `victor.v1` wire messages and gRPC status codes: cache views for
//! the listings and the streams, the registry's claims and refusals for the agents. Used by the
//! gRPC services (`api`) and the streams (`stream`) alike; nothing here does IO.

use std::net::IpAddr;

use tonic::Code;
use victor_proto::types::ip_to_bytes;
use victor_proto::v1;

use crate::cache::{BindingView, CacheState, FeView, VmView};
use crate::registry::{Claim, ClaimOutcome, Reason, Refusal};

/// The status code a single-item request refused this way answers with.
pub fn status_code(refusal: Refusal) -> Code {
    match refusal {
        Refusal::Invalid => Code::InvalidArgument,
        Refusal::Absent => Code::NotFound,
        Refusal::Precondition => Code::FailedPrecondition,
        Refusal::Forbidden => Code::PermissionDenied,
    }
}

/// A rejection reason on the wire.
pub fn reject_reason(reason: Reason) -> v1::RejectReason {
    match reason {
        Reason::Unspecified => v1::RejectReason::Unspecified,
        Reason::Malformed => v1::RejectReason::Malformed,
        Reason::OutsideMobilePrefix => v1::RejectReason::OutsideMobilePrefix,
        Reason::MacMismatch => v1::RejectReason::MacMismatch,
        Reason::SitePolicy => v1::RejectReason::SitePolicy,
        Reason::Stale => v1::RejectReason::Stale,
        Reason::Damped => v1::RejectReason::Damped,
        Reason::NotBoundHere => v1::RejectReason::NotBoundHere,
        Reason::Undeclared => v1::RejectReason::Undeclared,
        Reason::BadTimestamp => v1::RejectReason::BadTimestamp,
        Reason::UnknownMac => v1::RejectReason::UnknownMac,
        Reason::TooManyIps => v1::RejectReason::TooManyIps,
    }
}

/// The answer to one observation of a Report (`vm_ip` as the agent sent it).
pub fn claim_result(vm_ip: Vec<u8>, claim: &Claim) -> v1::ClaimResult {
    let outcome = match &claim.outcome {
        ClaimOutcome::Bound => v1::ClaimOutcome::Bound,
        ClaimOutcome::Moved => v1::ClaimOutcome::Moved,
        ClaimOutcome::Unchanged => v1::ClaimOutcome::Unchanged,
        ClaimOutcome::Removed => v1::ClaimOutcome::Removed,
        ClaimOutcome::Rejected(_) => v1::ClaimOutcome::Rejected,
        ClaimOutcome::Expanded(_) => v1::ClaimOutcome::Expanded,
    };
    let (reject_reason, code, message) = match &claim.outcome {
        ClaimOutcome::Rejected(r) => (reject_reason(r.reason), status_code(r.refusal) as i32, r.message.clone()),
        _ => (v1::RejectReason::Unspecified, 0, String::new()),
    };
    let ip_results = match &claim.outcome {
        ClaimOutcome::Expanded(ips) => ips.iter().map(|(ip, c)| claim_result(ip_to_bytes(*ip), c)).collect(),
        _ => Vec::new(),
    };
    v1::ClaimResult {
        vm_ip,
        outcome: outcome as i32,
        reject_reason: reject_reason as i32,
        code,
        message,
        move_seq: claim.move_seq,
        revision: claim.revision,
        ip_results,
    }
}

/// The answer to one observation that failed for a reason of the controller's (store outage,
/// contention): rejected with that status, for the agent to retry.
pub fn claim_failure(vm_ip: Vec<u8>, status: &tonic::Status) -> v1::ClaimResult {
    v1::ClaimResult {
        vm_ip,
        outcome: v1::ClaimOutcome::Rejected as i32,
        code: status.code() as i32,
        message: status.message().to_owned(),
        ..Default::default()
    }
}

/// A binding for the BindingService (text addresses, site filled in from the FE).
pub fn binding(state: &CacheState, ip: IpAddr, view: &BindingView) -> v1::Binding {
    let extra = view.extra.as_deref();
    v1::Binding {
        vm_ip: ip.to_string(),
        fe_id: view.fe_id.to_string(),
        mac: view.mac.to_string(),
        move_seq: view.move_seq,
        source: i32::from(view.source),
        revision: view.revision,
        observed_at_unix_nanos: view.observed_at,
        frozen: view.frozen,
        site: state.fes.get(&view.fe_id).map(|f| f.record.site.clone()).unwrap_or_default(),
        committed_at_unix_nanos: view.committed_at,
        pending_fe_id: extra.map(|e| e.pending_fe_id.clone()).unwrap_or_default(),
        previous_fe_id: view.moved_from().to_owned(),
    }
}

/// A binding for the agents (byte addresses).
pub fn binding_entry(ip: IpAddr, view: &BindingView) -> v1::BindingEntry {
    v1::BindingEntry {
        vm_ip: ip_to_bytes(ip),
        fe_id: view.fe_id.to_string(),
        mac: view.mac.octets().to_vec(),
        move_seq: view.move_seq,
        revision: view.revision,
        pending_fe_id: view.pending_fe_id().to_owned(),
    }
}

/// An FE for the agents.
pub fn fe_entry(view: &FeView) -> v1::FeEntry {
    v1::FeEntry {
        fe_id: view.fe_id.to_string(),
        underlay_addr: ip_to_bytes(view.underlay),
        site: view.record.site.clone(),
        up: view.up(),
        revision: view.change_revision(),
    }
}

/// An FE for the BindingService.
pub fn fe(state: &CacheState, view: &FeView) -> v1::Fe {
    v1::Fe {
        fe_id: view.fe_id.to_string(),
        underlay_addr: view.underlay.to_string(),
        site: view.record.site.clone(),
        mobile_prefixes: view.record.mobile_prefixes.clone(),
        health: if view.up() { v1::FeHealth::Up } else { v1::FeHealth::Down } as i32,
        registered_at_unix_nanos: view.record.registered_at_unix_nanos,
        agent_version: view.record.agent_version.clone(),
        binding_count: state.bindings_per_fe.get(&view.fe_id).copied().unwrap_or(0),
    }
}

/// A declared VM.
pub fn vm(ip: IpAddr, view: &VmView) -> v1::Vm {
    v1::Vm {
        vm_ip: ip.to_string(),
        mac: victor_proto::Mac::from_bytes(&view.record.mac).map(|m| m.to_string()).unwrap_or_default(),
        site_policy: Some(v1::SitePolicy { allowed_sites: view.record.allowed_sites.clone() }),
        description: view.record.description.clone(),
        revision: view.revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::BindingSource;
    use crate::registry::Rejection;

    #[test]
    fn reasons_keep_their_wire_names_and_metric_labels() {
        for reason in Reason::ALL {
            let wire = reject_reason(reason);
            let name = wire.as_str_name().trim_start_matches("REJECT_REASON_").to_ascii_lowercase();
            assert_eq!(reason.label(), name, "{reason:?}");
        }
    }

    #[test]
    fn stored_binding_sources_are_the_wire_numbers() {
        assert_eq!(BindingSource::Arp as i32, v1::BindingSource::Arp as i32);
        assert_eq!(BindingSource::Orchestrator as i32, v1::BindingSource::Orchestrator as i32);
    }

    #[test]
    fn a_rejected_claim_carries_reason_status_and_message() {
        let rejection = Rejection::new(Reason::MacMismatch, Refusal::Forbidden, "spoofed?");
        let claim = Claim { outcome: ClaimOutcome::Rejected(rejection), move_seq: 3, revision: 0 };
        let wire = claim_result(vec![10, 10, 0, 11], &claim);
        assert_eq!(wire.outcome, v1::ClaimOutcome::Rejected as i32);
        assert_eq!(wire.reject_reason, v1::RejectReason::MacMismatch as i32);
        assert_eq!(wire.code, Code::PermissionDenied as i32);
        assert_eq!(
            (wire.message.as_str(), wire.move_seq, wire.vm_ip.as_slice()),
            ("spoofed?", 3, &[10, 10, 0, 11][..])
        );
        let moved = claim_result(vec![1], &Claim { outcome: ClaimOutcome::Moved, move_seq: 4, revision: 9 });
        assert_eq!((moved.outcome, moved.code, moved.revision), (v1::ClaimOutcome::Moved as i32, 0, 9));
        assert!(moved.message.is_empty());
    }

    #[test]
    fn an_expanded_mac_claim_carries_one_result_per_ip() {
        let v4: IpAddr = "10.10.0.11".parse().unwrap();
        let v6: IpAddr = "fd00::11".parse().unwrap();
        let stale = Rejection::new(Reason::Stale, Refusal::Precondition, "stale").needing(7);
        let claim = Claim {
            outcome: ClaimOutcome::Expanded(vec![
                (v4, Claim { outcome: ClaimOutcome::Moved, move_seq: 2, revision: 9 }),
                (v6, Claim { outcome: ClaimOutcome::Rejected(stale), move_seq: 1, revision: 7 }),
            ]),
            move_seq: 0,
            revision: 9,
        };
        let wire = claim_result(vec![], &claim);
        assert_eq!((wire.outcome, wire.revision, wire.vm_ip.len()), (v1::ClaimOutcome::Expanded as i32, 9, 0));
        let per_ip: Vec<_> =
            wire.ip_results.iter().map(|r| (r.vm_ip.len(), r.outcome, r.reject_reason, r.revision)).collect();
        assert_eq!(
            per_ip,
            vec![
                (4, v1::ClaimOutcome::Moved as i32, 0, 9),
                (16, v1::ClaimOutcome::Rejected as i32, v1::RejectReason::Stale as i32, 7)
            ]
        );
    }
}
