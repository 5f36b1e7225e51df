//! Cache views → wire messages.

use std::net::IpAddr;

use victor_proto::types::ip_to_bytes;
use victor_proto::v1;

use crate::cache::{BindingView, CacheState, FeView, VmView};

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
