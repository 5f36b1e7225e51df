//! The replica's in-memory copy of everything under the key prefix, and how one store event
//! changes it. Pure: no IO, no locks — [`super::Cache`] wraps it.
//!
//! Applying is idempotent and order-safe: a put older than (or equal to) what the state already
//! holds for the key is ignored, so the loader can replay events that a paged load already saw.
//!
//! Tombstones (removed bindings, `BindingRecord::removed`) are kept apart from the bindings: to
//! every consumer but the registry a tombstone is no binding (agents see a removal), and the
//! tombstone horizon is kept with them (`registry::rules`, docs/design.md section 3).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use prost::Message;
use victor_proto::Mac;
use victor_proto::types::ip_from_bytes;
use victor_store::{Event, EventKind, Revision};

use super::macs::MacIndex;
use crate::keys::{KeyKind, Keys};
use crate::records::{BindingRecord, FeRecord, HorizonRecord, ReplicaRecord, VmRecord};

/// A binding as the cache holds it: compact (about 70 bytes plus the map entry), with the rarely
/// used fields boxed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingView {
    /// The binding FE (interned).
    pub fe_id: Arc<str>,
    /// VM MAC.
    pub mac: Mac,
    /// Frozen by damping.
    pub frozen: bool,
    /// `BindingSource` value.
    pub source: u8,
    /// Moves so far.
    pub move_seq: u64,
    /// Mod revision of the binding key.
    pub revision: Revision,
    /// Observation time (ns).
    pub observed_at: i64,
    /// Commit time (ns).
    pub committed_at: i64,
    /// `BindingRecord::observed_revision`.
    pub observed_revision: Revision,
    /// A tombstone (held in [`CacheState::tombstones`], never in the bindings).
    pub removed: bool,
    /// Damping history and announcement, when present.
    pub extra: Option<Box<BindingExtra>>,
}

/// The rarely set parts of a binding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BindingExtra {
    /// When damping froze it.
    pub frozen_at: i64,
    /// Recent move times.
    pub recent_moves: Vec<i64>,
    /// Announced migration target.
    pub pending_fe_id: String,
    /// Announcement expiry.
    pub pending_until: i64,
    /// The FE before the latest move (interned).
    pub moved_from: Option<Arc<str>>,
}

impl BindingView {
    /// The view of a stored record; `fe_id` and `moved_from` are the record's FE ids, interned.
    fn from_record(rec: BindingRecord, revision: Revision, fe_id: Arc<str>, moved_from: Option<Arc<str>>) -> Self {
        let extra = (rec.frozen_at_unix_nanos != 0
            || !rec.recent_moves_unix_nanos.is_empty()
            || !rec.pending_fe_id.is_empty()
            || moved_from.is_some())
        .then(|| {
            Box::new(BindingExtra {
                frozen_at: rec.frozen_at_unix_nanos,
                recent_moves: rec.recent_moves_unix_nanos,
                pending_fe_id: rec.pending_fe_id,
                pending_until: rec.pending_until_unix_nanos,
                moved_from,
            })
        });
        BindingView {
            fe_id,
            mac: Mac::from_bytes(&rec.mac).unwrap_or(Mac::ZERO),
            frozen: rec.frozen,
            source: rec.source.clamp(0, 255) as u8,
            move_seq: rec.move_seq,
            revision,
            observed_at: rec.observed_at_unix_nanos,
            committed_at: rec.committed_at_unix_nanos,
            observed_revision: rec.observed_revision,
            removed: rec.removed,
            extra,
        }
    }

    /// The stored form (what the registry compares and rewrites).
    pub fn to_record(&self) -> BindingRecord {
        let extra = self.extra.as_deref().cloned().unwrap_or_default();
        BindingRecord {
            fe_id: self.fe_id.to_string(),
            mac: self.mac.octets().to_vec(),
            move_seq: self.move_seq,
            source: i32::from(self.source),
            observed_at_unix_nanos: self.observed_at,
            committed_at_unix_nanos: self.committed_at,
            frozen: self.frozen,
            frozen_at_unix_nanos: extra.frozen_at,
            recent_moves_unix_nanos: extra.recent_moves,
            pending_fe_id: extra.pending_fe_id,
            pending_until_unix_nanos: extra.pending_until,
            removed: self.removed,
            observed_revision: self.observed_revision,
            moved_from_fe_id: extra.moved_from.as_deref().unwrap_or_default().to_owned(),
        }
    }

    /// The announced migration target, if any.
    pub fn pending_fe_id(&self) -> &str {
        self.extra.as_deref().map(|e| e.pending_fe_id.as_str()).unwrap_or("")
    }

    /// The FE before the latest move ("" if it never moved).
    pub fn moved_from(&self) -> &str {
        self.extra.as_deref().and_then(|e| e.moved_from.as_deref()).unwrap_or("")
    }
}

/// A declared VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    /// The declaration.
    pub record: VmRecord,
    /// Its mod revision.
    pub revision: Revision,
}

/// A registered FE with its liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeView {
    /// FE id.
    pub fe_id: Arc<str>,
    /// Underlay address.
    pub underlay: IpAddr,
    /// The registration.
    pub record: FeRecord,
    /// Mod revision of the registration.
    pub revision: Revision,
    /// Mod revision of the live session key (0 = no session: down).
    pub session_revision: Revision,
}

impl FeView {
    /// Session is live.
    pub fn up(&self) -> bool {
        self.session_revision != 0
    }

    /// Revision of the last change agents see (registration or session).
    pub fn change_revision(&self) -> Revision {
        self.revision.max(self.session_revision)
    }
}

/// A live replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    /// Its record.
    pub record: ReplicaRecord,
    /// Mod revision.
    pub revision: Revision,
}

/// One change that agents or binding watchers must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheChange {
    /// A binding was created/changed (`Some`) or removed (`None`) at `revision`.
    Binding {
        /// VM IP.
        ip: IpAddr,
        /// Revision of the change.
        revision: Revision,
        /// The new value.
        view: Option<BindingView>,
    },
    /// An FE was registered/changed/went up or down (`Some`) or removed (`None`).
    Fe {
        /// FE id.
        fe_id: Arc<str>,
        /// Revision of the change.
        revision: Revision,
        /// The new value.
        view: Option<FeView>,
    },
}

/// The key a [`CacheChange`] is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChangeKey {
    /// A binding, by VM IP.
    Binding(IpAddr),
    /// An FE, by id.
    Fe(Arc<str>),
}

impl CacheChange {
    /// What the change is about.
    pub fn key(&self) -> ChangeKey {
        match self {
            CacheChange::Binding { ip, .. } => ChangeKey::Binding(*ip),
            CacheChange::Fe { fe_id, .. } => ChangeKey::Fe(fe_id.clone()),
        }
    }

    /// About the bytes this change takes in the cache's history: itself and what it owns
    /// (interned FE ids are shared with the cache and not counted).
    pub fn history_bytes(&self) -> usize {
        let owned = match self {
            CacheChange::Binding { view: Some(view), .. } => view.extra.as_ref().map_or(0, |extra| {
                std::mem::size_of::<BindingExtra>()
                    + extra.recent_moves.capacity() * std::mem::size_of::<i64>()
                    + extra.pending_fe_id.capacity()
            }),
            CacheChange::Fe { view: Some(view), .. } => view.record.encoded_len(),
            _ => 0,
        };
        std::mem::size_of::<CacheChange>() + owned
    }
}

/// Everything under the prefix, as of `revision`.
#[derive(Debug, Default)]
pub struct CacheState {
    /// Highest revision applied.
    pub revision: Revision,
    /// Bindings by VM IP (ordered: listings page in IP order). Live ones only.
    pub bindings: BTreeMap<IpAddr, BindingView>,
    /// Tombstones of removed bindings by VM IP (the registry's business alone).
    pub tombstones: HashMap<IpAddr, BindingView>,
    /// The tombstone horizon and the mod revision of its key (0 = never set).
    pub tombstone_horizon: (Revision, Revision),
    /// Declared VMs.
    pub vms: BTreeMap<IpAddr, VmView>,
    /// Registered FEs.
    pub fes: BTreeMap<Arc<str>, FeView>,
    /// Session key revisions of FEs (may exist briefly before the FE record).
    sessions: HashMap<Arc<str>, Revision>,
    /// Live replicas.
    pub replicas: BTreeMap<String, ReplicaView>,
    /// The elected housekeeper and the revision of its election key.
    pub housekeeper: Option<(String, Revision)>,
    /// Bindings per FE.
    pub bindings_per_fe: HashMap<Arc<str>, u64>,
    /// MAC → the IPs whose live binding or declaration has it (MAC claims expand through it).
    pub macs: MacIndex,
    names: HashSet<Arc<str>>,
}

impl CacheState {
    /// An empty state at `revision`.
    pub fn at(revision: Revision) -> Self {
        CacheState { revision, ..Default::default() }
    }

    /// Interns an FE id so that a million bindings share a handful of strings.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(existing) = self.names.get(name) {
            return existing.clone();
        }
        let arc: Arc<str> = Arc::from(name);
        self.names.insert(arc.clone());
        arc
    }

    /// Applies one event; agent-visible changes are appended to `out`. Events for keys we do not
    /// own, undecodable values and stale replays are ignored (decode failures are counted by the
    /// caller via the returned flag).
    pub fn apply(&mut self, keys: &Keys, event: &Event, out: &mut Vec<CacheChange>) -> ApplyResult {
        let rev = event.kv.mod_revision;
        self.revision = self.revision.max(rev);
        let Some(kind) = keys.parse(&event.kv.key) else {
            return ApplyResult::Ignored;
        };
        let put = event.kind == EventKind::Put;
        match kind {
            KeyKind::Binding(ip) => {
                let held = self.bindings.get(&ip).or_else(|| self.tombstones.get(&ip)).map_or(0, |b| b.revision);
                if rev <= held {
                    return ApplyResult::Stale;
                }
                let before = self.bindings.get(&ip).map(|b| b.mac);
                self.tombstones.remove(&ip);
                if put {
                    let Ok(rec) = BindingRecord::decode(event.kv.value.as_slice()) else {
                        return ApplyResult::Undecodable;
                    };
                    let fe = self.intern(&rec.fe_id);
                    let from = (!rec.moved_from_fe_id.is_empty()).then(|| self.intern(&rec.moved_from_fe_id));
                    let view = BindingView::from_record(rec, rev, fe.clone(), from);
                    if view.removed {
                        self.tombstones.insert(ip, view);
                        if let Some(old) = self.bindings.remove(&ip) {
                            self.count_binding(&old.fe_id, -1);
                            out.push(CacheChange::Binding { ip, revision: rev, view: None });
                        }
                    } else {
                        if let Some(old) = self.bindings.insert(ip, view.clone()) {
                            self.count_binding(&old.fe_id, -1);
                        }
                        self.count_binding(&fe, 1);
                        out.push(CacheChange::Binding { ip, revision: rev, view: Some(view) });
                    }
                } else if let Some(old) = self.bindings.remove(&ip) {
                    self.count_binding(&old.fe_id, -1);
                    out.push(CacheChange::Binding { ip, revision: rev, view: None });
                }
                self.reindex(ip, before);
            }
            KeyKind::TombstoneHorizon => {
                if rev <= self.tombstone_horizon.1 && put {
                    return ApplyResult::Stale;
                }
                self.tombstone_horizon = if put {
                    let Ok(rec) = HorizonRecord::decode(event.kv.value.as_slice()) else {
                        return ApplyResult::Undecodable;
                    };
                    (rec.revision, rev)
                } else {
                    (0, 0)
                };
            }
            KeyKind::Vm(ip) => {
                if self.vms.get(&ip).is_some_and(|v| v.revision >= rev) {
                    return ApplyResult::Stale;
                }
                let before = self.vms.get(&ip).and_then(|v| Mac::from_bytes(&v.record.mac).ok());
                if put {
                    let Ok(record) = VmRecord::decode(event.kv.value.as_slice()) else {
                        return ApplyResult::Undecodable;
                    };
                    self.vms.insert(ip, VmView { record, revision: rev });
                } else {
                    self.vms.remove(&ip);
                }
                self.reindex(ip, before);
            }
            KeyKind::Fe(id) => {
                if self.fes.get(id.as_str()).is_some_and(|f| f.revision >= rev) {
                    return ApplyResult::Stale;
                }
                let fe_id = self.intern(&id);
                if put {
                    let Ok(record) = FeRecord::decode(event.kv.value.as_slice()) else {
                        return ApplyResult::Undecodable;
                    };
                    let Ok(underlay) = ip_from_bytes(&record.underlay_addr) else {
                        return ApplyResult::Undecodable;
                    };
                    let session_revision = self.sessions.get(&fe_id).copied().unwrap_or(0);
                    let view = FeView { fe_id: fe_id.clone(), underlay, record, revision: rev, session_revision };
                    self.fes.insert(fe_id.clone(), view.clone());
                    out.push(CacheChange::Fe { fe_id, revision: rev, view: Some(view) });
                } else if self.fes.remove(&fe_id).is_some() {
                    out.push(CacheChange::Fe { fe_id, revision: rev, view: None });
                }
            }
            KeyKind::Session(id) => {
                let fe_id = self.intern(&id);
                let held = self.sessions.get(&fe_id).copied().unwrap_or(0);
                if rev <= held && put {
                    return ApplyResult::Stale;
                }
                let session_revision = if put {
                    self.sessions.insert(fe_id.clone(), rev);
                    rev
                } else {
                    self.sessions.remove(&fe_id);
                    0
                };
                if let Some(fe) = self.fes.get_mut(&fe_id) {
                    let was_up = fe.up();
                    fe.session_revision = session_revision;
                    if was_up != fe.up() {
                        out.push(CacheChange::Fe { fe_id, revision: rev, view: Some(fe.clone()) });
                    }
                }
            }
            KeyKind::Replica(id) => {
                if put {
                    let Ok(record) = ReplicaRecord::decode(event.kv.value.as_slice()) else {
                        return ApplyResult::Undecodable;
                    };
                    self.replicas.insert(id, ReplicaView { record, revision: rev });
                } else {
                    self.replicas.remove(&id);
                }
            }
            KeyKind::Election => {
                self.housekeeper =
                    if put { Some((String::from_utf8_lossy(&event.kv.value).into_owned(), rev)) } else { None };
            }
        }
        ApplyResult::Applied
    }

    /// The change a store event *from the past* describes, by itself (not applied to this state):
    /// bindings and FE registrations as their event says; an FE's health comes from this (current)
    /// state. Used to rebuild history for resuming streams ([`super::backfill`]).
    pub fn replayed_change(&self, keys: &Keys, event: &Event) -> Option<CacheChange> {
        let rev = event.kv.mod_revision;
        let put = event.kind == EventKind::Put;
        match keys.parse(&event.kv.key)? {
            KeyKind::Binding(ip) => {
                let view = if put {
                    let rec = BindingRecord::decode(event.kv.value.as_slice()).ok()?;
                    let name = |id: &str| self.names.get(id).cloned().unwrap_or_else(|| Arc::from(id));
                    let fe = name(&rec.fe_id);
                    let from = (!rec.moved_from_fe_id.is_empty()).then(|| name(&rec.moved_from_fe_id));
                    // A tombstone is a removal to consumers.
                    Some(BindingView::from_record(rec, rev, fe, from)).filter(|v| !v.removed)
                } else {
                    None
                };
                Some(CacheChange::Binding { ip, revision: rev, view })
            }
            KeyKind::Fe(id) => {
                let fe_id: Arc<str> = self.names.get(id.as_str()).cloned().unwrap_or_else(|| Arc::from(id.as_str()));
                let view = if put {
                    let record = FeRecord::decode(event.kv.value.as_slice()).ok()?;
                    let underlay = ip_from_bytes(&record.underlay_addr).ok()?;
                    let session_revision = self.sessions.get(&fe_id).copied().unwrap_or(0);
                    Some(FeView { fe_id: fe_id.clone(), underlay, record, revision: rev, session_revision })
                } else {
                    None
                };
                Some(CacheChange::Fe { fe_id, revision: rev, view })
            }
            _ => None,
        }
    }

    /// Replaces this state with `fresh` (a full re-list) and returns the differences as changes,
    /// so that watchers see only what really changed — a re-list never flaps routes.
    pub fn replace_with(&mut self, fresh: CacheState) -> Vec<CacheChange> {
        let mut out = Vec::new();
        let revision = fresh.revision;
        for (ip, old) in &self.bindings {
            if !fresh.bindings.contains_key(ip) {
                let _ = old;
                out.push(CacheChange::Binding { ip: *ip, revision, view: None });
            }
        }
        for (ip, new) in &fresh.bindings {
            if self.bindings.get(ip).map(|old| old.revision) != Some(new.revision) {
                out.push(CacheChange::Binding { ip: *ip, revision: new.revision, view: Some(new.clone()) });
            }
        }
        for id in self.fes.keys() {
            if !fresh.fes.contains_key(id) {
                out.push(CacheChange::Fe { fe_id: id.clone(), revision, view: None });
            }
        }
        for (id, new) in &fresh.fes {
            let old = self.fes.get(id);
            if old.map(|o| (o.revision, o.up())) != Some((new.revision, new.up())) {
                out.push(CacheChange::Fe {
                    fe_id: id.clone(),
                    revision: new.change_revision().max(1),
                    view: Some(new.clone()),
                });
            }
        }
        *self = fresh;
        out
    }

    /// A state loaded from a list of key/values (a re-list), at `revision`.
    pub fn from_kvs(
        keys: &Keys,
        kvs: impl IntoIterator<Item = victor_store::KeyValue>,
        revision: Revision,
    ) -> (CacheState, u64) {
        let mut state = CacheState::default();
        let mut undecodable = 0;
        let mut sink = Vec::new();
        for kv in kvs {
            let event = Event { kind: EventKind::Put, kv };
            if state.apply(keys, &event, &mut sink) == ApplyResult::Undecodable {
                undecodable += 1;
            }
            sink.clear();
        }
        state.revision = state.revision.max(revision);
        (state, undecodable)
    }

    /// The MACs `ip` has now: its live binding's and its declaration's.
    fn macs_of(&self, ip: IpAddr) -> [Option<Mac>; 2] {
        [self.bindings.get(&ip).map(|b| b.mac), self.vms.get(&ip).and_then(|v| Mac::from_bytes(&v.record.mac).ok())]
    }

    /// Brings the MAC index up to date for `ip` after its binding or declaration changed from a
    /// value with MAC `before`.
    fn reindex(&mut self, ip: IpAddr, before: Option<Mac>) {
        let now = self.macs_of(ip);
        if let Some(old) = before
            && !now.contains(&Some(old))
        {
            self.macs.remove(old, ip);
        }
        for mac in now.into_iter().flatten() {
            self.macs.insert(mac, ip);
        }
    }

    fn count_binding(&mut self, fe: &Arc<str>, delta: i64) {
        let entry = self.bindings_per_fe.entry(fe.clone()).or_default();
        *entry = entry.saturating_add_signed(delta);
        if *entry == 0 {
            self.bindings_per_fe.remove(fe);
        }
    }
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyResult {
    /// The state changed.
    Applied,
    /// Already held (a replay).
    Stale,
    /// Not one of our keys.
    Ignored,
    /// Our key, but the value could not be decoded (a bug or a foreign writer).
    Undecodable,
}

#[cfg(test)]
mod tests {
    use super::*;
    use victor_store::KeyValue;

    fn put(key: Vec<u8>, value: Vec<u8>, rev: Revision) -> Event {
        Event {
            kind: EventKind::Put,
            kv: KeyValue { key, value, mod_revision: rev, create_revision: rev, version: 1, lease: 0 },
        }
    }

    fn del(key: Vec<u8>, rev: Revision) -> Event {
        Event { kind: EventKind::Delete, kv: KeyValue { key, mod_revision: rev, ..Default::default() } }
    }

    fn binding(fe: &str) -> Vec<u8> {
        BindingRecord { fe_id: fe.into(), mac: vec![2, 0, 0, 0, 0, 1], observed_at_unix_nanos: 1, ..Default::default() }
            .encode_to_vec()
    }

    fn fe_record() -> Vec<u8> {
        FeRecord { underlay_addr: vec![192, 168, 0, 1], site: "a".into(), ..Default::default() }.encode_to_vec()
    }

    #[test]
    fn replays_are_ignored_and_changes_reported_once() {
        let keys = Keys::new("/v");
        let ip: IpAddr = "10.10.0.11".parse().unwrap();
        let mut s = CacheState::default();
        let mut out = Vec::new();
        assert_eq!(s.apply(&keys, &put(keys.binding(ip), binding("fe2"), 5), &mut out), ApplyResult::Applied);
        assert_eq!(s.apply(&keys, &put(keys.binding(ip), binding("fe2"), 5), &mut out), ApplyResult::Stale);
        assert_eq!(s.apply(&keys, &put(keys.binding(ip), binding("fe1"), 4), &mut out), ApplyResult::Stale);
        assert_eq!(out.len(), 1);
        assert_eq!(s.bindings[&ip].fe_id.as_ref(), "fe2");
        assert_eq!(s.bindings_per_fe[&Arc::<str>::from("fe2")], 1);
        s.apply(&keys, &put(keys.binding(ip), binding("fe3"), 6), &mut out);
        assert!(!s.bindings_per_fe.contains_key(&Arc::<str>::from("fe2")));
        s.apply(&keys, &del(keys.binding(ip), 7), &mut out);
        assert!(s.bindings.is_empty() && s.bindings_per_fe.is_empty());
        assert_eq!(out.len(), 3);
        assert_eq!(s.revision, 7);
        assert_eq!(s.apply(&keys, &put(b"/v/b/4/zz".to_vec(), vec![], 8), &mut out), ApplyResult::Ignored);
        assert_eq!(s.apply(&keys, &put(keys.binding(ip), vec![0xff, 0xff], 9), &mut out), ApplyResult::Undecodable);
    }

    #[test]
    fn tombstones_are_no_binding_to_consumers() {
        let keys = Keys::new("/v");
        let ip: IpAddr = "10.10.0.11".parse().unwrap();
        let tomb = |fe: &str| {
            BindingRecord { fe_id: fe.into(), removed: true, observed_at_unix_nanos: 2, ..Default::default() }
                .encode_to_vec()
        };
        let mut s = CacheState::default();
        let mut out = Vec::new();
        s.apply(&keys, &put(keys.binding(ip), binding("fe2"), 5), &mut out);
        // The removal: consumers see the binding go; the tombstone is kept apart.
        s.apply(&keys, &put(keys.binding(ip), tomb("fe2"), 6), &mut out);
        assert!(matches!(out.last(), Some(CacheChange::Binding { revision: 6, view: None, .. })));
        assert!(s.bindings.is_empty() && s.bindings_per_fe.is_empty());
        assert_eq!(s.tombstones[&ip].revision, 6);
        // A tombstone over a tombstone, and its collection, change nothing for consumers.
        let before = out.len();
        s.apply(&keys, &put(keys.binding(ip), tomb("fe3"), 7), &mut out);
        assert_eq!(s.apply(&keys, &put(keys.binding(ip), tomb("fe1"), 7), &mut out), ApplyResult::Stale);
        s.apply(&keys, &del(keys.binding(ip), 8), &mut out);
        assert_eq!(out.len(), before);
        assert!(s.tombstones.is_empty());
        // The horizon comes with its key's revision.
        let horizon = crate::records::HorizonRecord { revision: 7 }.encode_to_vec();
        s.apply(&keys, &put(keys.tombstone_horizon(), horizon, 8), &mut out);
        assert_eq!(s.tombstone_horizon, (7, 8));
        // Bound again over a tombstone: an upsert.
        s.apply(&keys, &put(keys.binding(ip), tomb("fe2"), 9), &mut out);
        s.apply(&keys, &put(keys.binding(ip), binding("fe3"), 10), &mut out);
        assert!(matches!(out.last(), Some(CacheChange::Binding { revision: 10, view: Some(_), .. })));
        assert!(s.tombstones.is_empty() && s.bindings[&ip].fe_id.as_ref() == "fe3");
        // Replayed history (stream backfill) shows a tombstone as a removal.
        let replayed = s.replayed_change(&keys, &put(keys.binding(ip), tomb("fe3"), 11));
        assert!(matches!(replayed, Some(CacheChange::Binding { view: None, .. })));
    }

    #[test]
    fn the_mac_index_follows_bindings_and_declarations() {
        let keys = Keys::new("/v");
        let v4: IpAddr = "10.10.0.11".parse().unwrap();
        let v6: IpAddr = "fd00::11".parse().unwrap();
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let other = Mac([2, 0, 0, 0, 0, 9]);
        let bound_with = |m: Mac, removed: bool| {
            BindingRecord { fe_id: "fe2".into(), mac: m.octets().to_vec(), removed, ..Default::default() }
                .encode_to_vec()
        };
        let declared_with = |m: Mac| VmRecord { mac: m.octets().to_vec(), ..Default::default() }.encode_to_vec();
        let mut s = CacheState::default();
        let mut out = Vec::new();
        s.apply(&keys, &put(keys.binding(v4), bound_with(mac, false), 2), &mut out);
        s.apply(&keys, &put(keys.vm(v6), declared_with(mac), 3), &mut out);
        assert_eq!(s.macs.ips(mac), vec![v4, v6], "bound or declared, IPv4 first");
        // Declared with the same MAC as bound: removing the binding keeps the IP indexed.
        s.apply(&keys, &put(keys.vm(v4), declared_with(mac), 4), &mut out);
        s.apply(&keys, &put(keys.binding(v4), bound_with(mac, true), 5), &mut out);
        assert_eq!(s.macs.ips(mac), vec![v4, v6]);
        s.apply(&keys, &del(keys.vm(v4), 6), &mut out);
        assert_eq!(s.macs.ips(mac), vec![v6], "tombstoned and undeclared: gone from the index");
        // A binding that changes MAC moves in the index.
        s.apply(&keys, &put(keys.binding(v4), bound_with(mac, false), 7), &mut out);
        s.apply(&keys, &put(keys.binding(v4), bound_with(other, false), 8), &mut out);
        assert_eq!((s.macs.ips(mac), s.macs.ips(other)), (vec![v6], vec![v4]));
        // A re-declaration with another MAC, then the deletion of everything.
        s.apply(&keys, &put(keys.vm(v6), declared_with(other), 9), &mut out);
        assert_eq!((s.macs.ips(mac), s.macs.ips(other)), (vec![], vec![v4, v6]));
        s.apply(&keys, &del(keys.vm(v6), 10), &mut out);
        s.apply(&keys, &del(keys.binding(v4), 11), &mut out);
        assert!(s.macs.is_empty());
    }

    proptest::proptest! {
        /// The MAC index always equals a scan of the live bindings and the declarations, whatever
        /// the order of puts, tombstones and deletions of either.
        #[test]
        fn the_mac_index_equals_a_scan(ops in proptest::collection::vec((0u8..6, 0u8..4, 0u8..3, proptest::bool::ANY), 1..80)) {
            let keys = Keys::new("/v");
            let ip = |i: u8| if i.is_multiple_of(2) { IpAddr::from([10, 10, 0, i]) } else { IpAddr::from([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i]) };
            let mac = |m: u8| Mac([2, 0, 0, 0, 0, m]);
            let mut s = CacheState::default();
            let mut out = Vec::new();
            for (rev, (i, m, what, declaration)) in ops.into_iter().enumerate() {
                let rev = rev as u64 + 1;
                let key = if declaration { keys.vm(ip(i)) } else { keys.binding(ip(i)) };
                let event = match (what, declaration) {
                    (0, _) => del(key, rev),
                    (_, true) => put(key, VmRecord { mac: mac(m).octets().to_vec(), ..Default::default() }.encode_to_vec(), rev),
                    (w, false) => put(
                        key,
                        BindingRecord { fe_id: "fe1".into(), mac: mac(m).octets().to_vec(), removed: w == 2, ..Default::default() }.encode_to_vec(),
                        rev,
                    ),
                };
                s.apply(&keys, &event, &mut out);
                for m in 0..4 {
                    let mut scanned: Vec<IpAddr> = s
                        .bindings
                        .iter()
                        .filter(|(_, b)| b.mac == mac(m))
                        .map(|(ip, _)| *ip)
                        .chain(s.vms.iter().filter(|(_, v)| v.record.mac == mac(m).octets()).map(|(ip, _)| *ip))
                        .collect();
                    scanned.sort_unstable();
                    scanned.dedup();
                    proptest::prop_assert_eq!(s.macs.ips(mac(m)), scanned);
                }
            }
        }
    }

    #[test]
    fn sessions_flip_fe_health_in_either_order() {
        let keys = Keys::new("/v");
        let mut s = CacheState::default();
        let mut out = Vec::new();
        s.apply(&keys, &put(keys.session("fe1"), vec![], 3), &mut out);
        s.apply(&keys, &put(keys.fe("fe1"), fe_record(), 4), &mut out);
        assert!(s.fes["fe1"].up());
        s.apply(&keys, &del(keys.session("fe1"), 9), &mut out);
        assert!(!s.fes["fe1"].up());
        let last = out.last().unwrap();
        assert!(matches!(last, CacheChange::Fe { revision: 9, view: Some(v), .. } if !v.up()));
    }

    #[test]
    fn relist_reports_only_differences() {
        let keys = Keys::new("/v");
        let a: IpAddr = "10.10.0.1".parse().unwrap();
        let b: IpAddr = "10.10.0.2".parse().unwrap();
        let c: IpAddr = "10.10.0.3".parse().unwrap();
        let mut s = CacheState::default();
        let mut out = Vec::new();
        s.apply(&keys, &put(keys.binding(a), binding("fe1"), 2), &mut out);
        s.apply(&keys, &put(keys.binding(b), binding("fe1"), 3), &mut out);
        let kv = |ip, fe, rev| KeyValue {
            key: keys.binding(ip),
            value: binding(fe),
            mod_revision: rev,
            create_revision: 2,
            version: 1,
            lease: 0,
        };
        // After compaction: a unchanged, b moved, c new; nothing else.
        let (fresh, bad) = CacheState::from_kvs(&keys, vec![kv(a, "fe1", 2), kv(b, "fe2", 10), kv(c, "fe2", 11)], 12);
        assert_eq!(bad, 0);
        let diff = s.replace_with(fresh);
        let ips: Vec<IpAddr> = diff
            .iter()
            .map(|c| match c {
                CacheChange::Binding { ip, .. } => *ip,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(ips, vec![b, c]);
        assert_eq!(s.revision, 12);
    }

    #[test]
    fn view_roundtrips_record() {
        let rec = BindingRecord {
            fe_id: "fe9".into(),
            mac: vec![2, 1, 2, 3, 4, 5],
            move_seq: 7,
            source: 1,
            observed_at_unix_nanos: 11,
            committed_at_unix_nanos: 12,
            frozen: true,
            frozen_at_unix_nanos: 13,
            recent_moves_unix_nanos: vec![1, 2],
            pending_fe_id: "fe3".into(),
            pending_until_unix_nanos: 99,
            removed: true,
            observed_revision: 4,
            moved_from_fe_id: "fe1".into(),
        };
        let view = BindingView::from_record(rec.clone(), 5, Arc::from("fe9"), Some(Arc::from("fe1")));
        assert_eq!(view.to_record(), rec);
        assert_eq!(view.moved_from(), "fe1");
        let plain = BindingRecord { fe_id: "fe9".into(), mac: vec![2, 1, 2, 3, 4, 5], ..Default::default() };
        assert!(BindingView::from_record(plain, 1, Arc::from("fe9"), None).extra.is_none());
    }
}
