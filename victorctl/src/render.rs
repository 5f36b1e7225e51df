//! Wire messages → JSON values (field names as in the proto, enums as short lower-case words)
//! and → aligned text tables. Pure: no IO.

use serde_json::{Value, json};
use victor_proto::v1::{Binding, BindingEvent, BindingEventKind, BindingSource, Fe, FeHealth, GetStatusResponse, Vm};

/// A binding as JSON.
pub fn binding(b: &Binding) -> Value {
    json!({
        "vm_ip": b.vm_ip,
        "fe_id": b.fe_id,
        "site": b.site,
        "mac": b.mac,
        "move_seq": b.move_seq,
        "source": source(b.source),
        "frozen": b.frozen,
        "pending_fe_id": b.pending_fe_id,
        "previous_fe_id": b.previous_fe_id,
        "revision": b.revision,
        "observed_at_unix_nanos": b.observed_at_unix_nanos,
        "committed_at_unix_nanos": b.committed_at_unix_nanos,
    })
}

/// An FE as JSON.
pub fn fe(f: &Fe) -> Value {
    json!({
        "fe_id": f.fe_id,
        "site": f.site,
        "underlay_addr": f.underlay_addr,
        "health": health(f.health),
        "binding_count": f.binding_count,
        "mobile_prefixes": f.mobile_prefixes,
        "agent_version": f.agent_version,
        "registered_at_unix_nanos": f.registered_at_unix_nanos,
    })
}

/// A declared VM as JSON.
pub fn vm(v: &Vm) -> Value {
    json!({
        "vm_ip": v.vm_ip,
        "mac": v.mac,
        "allowed_sites": v.site_policy.as_ref().map(|p| p.allowed_sites.clone()).unwrap_or_default(),
        "description": v.description,
        "revision": v.revision,
    })
}

/// The replica status as JSON.
pub fn status(s: &GetStatusResponse) -> Value {
    json!({
        "replica_id": s.replica_id,
        "version": s.version,
        "store_kind": s.store_kind,
        "store_reachable": s.store_reachable,
        "cache_revision": s.cache_revision,
        "housekeeper_id": s.housekeeper_id,
        "binding_count": s.binding_count,
        "fe_count": s.fe_count,
        "agent_streams": s.agent_streams,
        "mobile_prefixes": s.mobile_prefixes,
    })
}

/// One watch event as JSON (`binding` holds only vm_ip and revision for removals).
pub fn event(revision: u64, e: &BindingEvent) -> Value {
    let kind = match BindingEventKind::try_from(e.kind) {
        Ok(BindingEventKind::Upsert) => "upsert",
        Ok(BindingEventKind::Remove) => "remove",
        _ => "unknown",
    };
    let b = e.binding.clone().unwrap_or_default();
    let binding = if kind == "remove" { json!({"vm_ip": b.vm_ip, "revision": b.revision}) } else { binding(&b) };
    json!({"revision": revision, "kind": kind, "binding": binding})
}

fn source(s: i32) -> &'static str {
    match BindingSource::try_from(s) {
        Ok(BindingSource::Arp) => "arp",
        Ok(BindingSource::Orchestrator) => "orchestrator",
        _ => "unspecified",
    }
}

fn health(h: i32) -> &'static str {
    match FeHealth::try_from(h) {
        Ok(FeHealth::Up) => "up",
        Ok(FeHealth::Down) => "down",
        _ => "unknown",
    }
}

/// Table columns of a binding.
pub const BINDING_HEADER: [&str; 8] = ["VM_IP", "FE", "SITE", "MAC", "MOVES", "SOURCE", "STATE", "REVISION"];

/// A binding as a table row.
pub fn binding_row(b: &Binding) -> Vec<String> {
    let state = if b.frozen {
        "frozen".to_owned()
    } else if !b.pending_fe_id.is_empty() {
        format!("migrating->{}", b.pending_fe_id)
    } else {
        "active".to_owned()
    };
    vec![
        b.vm_ip.clone(),
        b.fe_id.clone(),
        b.site.clone(),
        b.mac.clone(),
        b.move_seq.to_string(),
        source(b.source).to_owned(),
        state,
        b.revision.to_string(),
    ]
}

/// Table columns of an FE.
pub const FE_HEADER: [&str; 6] = ["FE", "SITE", "UNDERLAY", "HEALTH", "BINDINGS", "VERSION"];

/// An FE as a table row.
pub fn fe_row(f: &Fe) -> Vec<String> {
    vec![
        f.fe_id.clone(),
        f.site.clone(),
        f.underlay_addr.clone(),
        health(f.health).to_owned(),
        f.binding_count.to_string(),
        f.agent_version.clone(),
    ]
}

/// Table columns of a VM.
pub const VM_HEADER: [&str; 5] = ["VM_IP", "MAC", "SITES", "DESCRIPTION", "REVISION"];

/// A VM as a table row.
pub fn vm_row(v: &Vm) -> Vec<String> {
    let sites = v.site_policy.as_ref().map(|p| p.allowed_sites.join(",")).unwrap_or_default();
    vec![
        v.vm_ip.clone(),
        v.mac.clone(),
        if sites.is_empty() { "any".into() } else { sites },
        v.description.clone(),
        v.revision.to_string(),
    ]
}

/// The status as `key: value` lines.
pub fn status_lines(s: &GetStatusResponse) -> String {
    let rows = [
        ("replica", s.replica_id.clone()),
        ("version", s.version.clone()),
        ("store", format!("{} ({})", s.store_kind, if s.store_reachable { "reachable" } else { "UNREACHABLE" })),
        ("revision", s.cache_revision.to_string()),
        ("housekeeper", if s.housekeeper_id.is_empty() { "(none elected)".into() } else { s.housekeeper_id.clone() }),
        ("fes", s.fe_count.to_string()),
        ("bindings", s.binding_count.to_string()),
        ("agent streams", s.agent_streams.to_string()),
        ("mobile prefixes", s.mobile_prefixes.join(", ")),
    ];
    table(&["KEY", "VALUE"], &rows.iter().map(|(k, v)| vec![format!("{k}:"), v.clone()]).collect::<Vec<_>>())
        .lines()
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_json_uses_words() {
        let b = Binding {
            vm_ip: "10.10.0.11".into(),
            fe_id: "fe2".into(),
            site: "dc-b".into(),
            mac: "02:00:00:00:00:0b".into(),
            move_seq: 3,
            source: BindingSource::Arp as i32,
            frozen: true,
            revision: 42,
            ..Default::default()
        };
        let text = table(&BINDING_HEADER, &[binding_row(&b)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "VM_IP       FE   SITE  MAC                MOVES  SOURCE  STATE   REVISION");
        assert_eq!(lines[1], "10.10.0.11  fe2  dc-b  02:00:00:00:00:0b  3      arp     frozen  42");
        let j = binding(&b);
        assert_eq!(
            (j["source"].as_str(), j["frozen"].as_bool(), j["move_seq"].as_u64()),
            (Some("arp"), Some(true), Some(3))
        );
        let removed = BindingEvent {
            kind: BindingEventKind::Remove as i32,
            binding: Some(Binding { vm_ip: "10.10.0.11".into(), revision: 50, ..Default::default() }),
        };
        assert_eq!(
            event(50, &removed),
            json!({"revision": 50, "kind": "remove", "binding": {"vm_ip": "10.10.0.11", "revision": 50}})
        );
    }
}
