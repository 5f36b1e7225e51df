//! The controller's desired state as this agent holds it: every FE (interned) and every binding,
//! fed by `SyncUpdate`s. Pure: no IO, no clock.
//!
//! Merge rule (wire contract): per VM IP and per FE id the entry with the highest revision wins,
//! whatever the order of the lists inside one message. Across messages the stream only carries
//! changes newer than the previous message's revision, so no tombstones are kept for removed keys.
//! An FE's registration and its session are written in one transaction, so the controller can
//! send two views of the FE at one revision (registered, then up): at equal revisions the view
//! that is up wins, in any order.
//!
//! A snapshot (first part `reset = true`, last part `SNAPSHOT_END`) is staged apart and swapped
//! in whole at its end, so an agent that already forwards keeps its old state until the new one
//! is complete — a resync never opens a window without bindings.
//!
//! Memory: an IPv4 binding is a `u32` key plus a 32-byte [`BindingRec`] (FE ids are interned to a
//! `u32`), ~80 bytes per binding with hashbrown's spare capacity at 1,000,000 bindings (measured
//! by `tests/memory.rs`). IPv6 bindings (16-byte `vm_ip`) live in a second table keyed by `u128`,
//! so the IPv4 table keeps its size.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use std::hash::BuildHasher;
use victor_proto::types::ip_from_bytes;
use victor_proto::v1::{BindingEntry, SyncPhase, SyncUpdate};

/// Index of an interned FE id.
pub type FeIdx = u32;

/// No FE (a [`BindingRec::pending`] without an announced migration).
pub const NO_FE: FeIdx = FeIdx::MAX;

/// One binding as the agent needs it (32 bytes: the announced FE fits in the padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingRec {
    /// Store revision of the binding.
    pub revision: u64,
    /// Move sequence: increases with every move (docs/design.md, invariant I2).
    pub move_seq: u64,
    /// The binding FE.
    pub fe: FeIdx,
    /// The FE an orchestrator announced the VM is migrating to (`BindingEntry.pending_fe_id`),
    /// or [`NO_FE`].
    pub pending: FeIdx,
    /// The VM's MAC.
    pub mac: [u8; 6],
}

impl BindingRec {
    /// The announced migration target, if any.
    pub fn pending_fe(&self) -> Option<FeIdx> {
        (self.pending != NO_FE).then_some(self.pending)
    }
}

/// What the agent knows about one FE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeInfo {
    /// FE id.
    pub id: Arc<str>,
    /// Underlay IPv4 address (None: unknown, not IPv4, or the FE is not registered).
    pub underlay: Option<Ipv4Addr>,
    /// Site.
    pub site: String,
    /// Session is live.
    pub up: bool,
    /// Revision of the FE's last change.
    pub revision: u64,
    /// Registered (false after a removal, or for an id only named by bindings).
    pub present: bool,
}

impl FeInfo {
    fn absent(id: Arc<str>) -> Self {
        FeInfo { id, underlay: None, site: String::new(), up: false, revision: 0, present: false }
    }
}

/// FE ids interned to small integers, so a binding stores 4 bytes instead of a string.
#[derive(Debug, Default, Clone)]
pub struct FeTable {
    slots: Vec<FeInfo>,
    by_id: HashMap<Arc<str>, FeIdx>,
}

impl FeTable {
    /// The index of `id`, creating an absent entry if it is new.
    pub fn intern(&mut self, id: &str) -> FeIdx {
        if let Some(&idx) = self.by_id.get(id) {
            return idx;
        }
        let idx = self.slots.len() as FeIdx;
        let id: Arc<str> = Arc::from(id);
        self.slots.push(FeInfo::absent(id.clone()));
        self.by_id.insert(id, idx);
        idx
    }

    /// The index of `id`, if known.
    pub fn lookup(&self, id: &str) -> Option<FeIdx> {
        self.by_id.get(id).copied()
    }

    /// The FE at `idx`.
    pub fn get(&self, idx: FeIdx) -> Option<&FeInfo> {
        self.slots.get(idx as usize)
    }

    /// Every FE ever named (present or not), with its index.
    pub fn iter(&self) -> impl Iterator<Item = (FeIdx, &FeInfo)> {
        self.slots.iter().enumerate().map(|(i, f)| (i as FeIdx, f))
    }

    /// Registered FEs.
    pub fn present(&self) -> impl Iterator<Item = &FeInfo> {
        self.slots.iter().filter(|f| f.present)
    }

    fn get_mut(&mut self, idx: FeIdx) -> &mut FeInfo {
        &mut self.slots[idx as usize]
    }
}

/// The bindings of both families: IPv4 keyed by `u32`, IPv6 by `u128`; and their MAC index.
///
/// MAC index (for RARP frames, which name only a MAC): a hash table per family holding each
/// binding's IP once, hashed by the binding's MAC, so the IPs of a MAC are the entries under its
/// hash whose binding has that MAC — 4 bytes per IPv4 binding (16 per IPv6 one) instead of a
/// second copy of the MAC. Invariant: every key of `v4` (`v6`) is in `macs4` (`macs6`) exactly
/// once, under the hash of its binding's current MAC; every write goes through
/// [`Bindings::insert`] and [`Bindings::remove`], which keep it.
#[derive(Debug, Default, Clone)]
struct Bindings {
    v4: HashMap<u32, BindingRec, RandomState>,
    v6: HashMap<u128, BindingRec, RandomState>,
    macs4: HashTable<u32>,
    macs6: HashTable<u128>,
    mac_hasher: RandomState,
}

impl Bindings {
    fn get(&self, ip: IpAddr) -> Option<&BindingRec> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&u32::from(a)),
            IpAddr::V6(a) => self.v6.get(&u128::from(a)),
        }
    }

    fn mac_hash(&self, mac: [u8; 6]) -> u64 {
        self.mac_hasher.hash_one(mac)
    }

    /// Sets the binding of `ip`, keeping the MAC index (a changed MAC moves the IP in it).
    fn insert(&mut self, ip: IpAddr, rec: BindingRec) {
        let new = self.mac_hash(rec.mac);
        let hasher = &self.mac_hasher;
        match ip {
            IpAddr::V4(a) => {
                let key = u32::from(a);
                let old = self.v4.insert(key, rec);
                reindex(&mut self.macs4, &self.v4, hasher, key, old.map(|o| o.mac), rec.mac, new);
            }
            IpAddr::V6(a) => {
                let key = u128::from(a);
                let old = self.v6.insert(key, rec);
                reindex(&mut self.macs6, &self.v6, hasher, key, old.map(|o| o.mac), rec.mac, new);
            }
        }
    }

    /// Removes the binding of `ip` and its MAC index entry.
    fn remove(&mut self, ip: IpAddr) -> Option<BindingRec> {
        let removed = match ip {
            IpAddr::V4(a) => {
                let key = u32::from(a);
                let old = self.v4.remove(&key)?;
                unindex(&mut self.macs4, self.mac_hasher.hash_one(old.mac), key);
                old
            }
            IpAddr::V6(a) => {
                let key = u128::from(a);
                let old = self.v6.remove(&key)?;
                unindex(&mut self.macs6, self.mac_hasher.hash_one(old.mac), key);
                old
            }
        };
        Some(removed)
    }

    /// The IPs bound with `mac` (unordered): a lookup in the MAC index, not a scan.
    fn with_mac(&self, mac: [u8; 6]) -> impl Iterator<Item = IpAddr> + '_ {
        let hash = self.mac_hash(mac);
        // Entries under the same hash may be other MACs' (collisions): the binding says.
        let v4 = self.macs4.iter_hash(hash).filter(move |k| self.v4.get(k).is_some_and(|b| b.mac == mac));
        let v6 = self.macs6.iter_hash(hash).filter(move |k| self.v6.get(k).is_some_and(|b| b.mac == mac));
        v4.map(|&k| IpAddr::V4(Ipv4Addr::from(k))).chain(v6.map(|&k| IpAddr::V6(std::net::Ipv6Addr::from(k))))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.get(ip).is_some()
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (IpAddr, &BindingRec)> + '_ {
        let v4 = self.v4.iter().map(|(&ip, b)| (IpAddr::V4(Ipv4Addr::from(ip)), b));
        v4.chain(self.v6.iter().map(|(&ip, b)| (IpAddr::V6(std::net::Ipv6Addr::from(ip)), b)))
    }

    fn values(&self) -> impl Iterator<Item = &BindingRec> + '_ {
        self.v4.values().chain(self.v6.values())
    }

    fn reserve(&mut self, n: usize) {
        self.v4.reserve(n);
        let (v4, hasher) = (&self.v4, &self.mac_hasher);
        self.macs4.reserve(n, |k| hasher.hash_one(v4[k].mac));
    }

    fn shrink_to_fit(&mut self) {
        self.v4.shrink_to_fit();
        self.v6.shrink_to_fit();
        let (v4, v6, hasher) = (&self.v4, &self.v6, &self.mac_hasher);
        self.macs4.shrink_to_fit(|k| hasher.hash_one(v4[k].mac));
        self.macs6.shrink_to_fit(|k| hasher.hash_one(v6[k].mac));
    }

    /// Heap bytes (capacity-based estimate of hashbrown's layout).
    fn heap_bytes(&self) -> usize {
        fn table<T>(cap: usize) -> usize {
            if cap == 0 {
                return 0;
            }
            let buckets = (cap * 8 / 7).next_power_of_two();
            buckets * (std::mem::size_of::<T>() + 1) + 16
        }
        table::<(u32, BindingRec)>(self.v4.capacity())
            + table::<(u128, BindingRec)>(self.v6.capacity())
            + table::<u32>(self.macs4.capacity())
            + table::<u128>(self.macs6.capacity())
    }
}

/// Puts `key` (just bound with `mac`, hash `hash`; bound with `old` before, if it was) under its
/// MAC in `index`. `bindings` already holds the new binding: a resize rehashes by it.
fn reindex<K: Copy + Eq + std::hash::Hash>(
    index: &mut HashTable<K>,
    bindings: &HashMap<K, BindingRec, RandomState>,
    hasher: &RandomState,
    key: K,
    old: Option<[u8; 6]>,
    mac: [u8; 6],
    hash: u64,
) {
    match old {
        Some(old) if old == mac => return,
        Some(old) => unindex(index, hasher.hash_one(old), key),
        None => {}
    }
    index.insert_unique(hash, key, |k| hasher.hash_one(bindings[k].mac));
}

/// Removes `key` from `index`, where it sits under `hash` (its binding's MAC before the change).
fn unindex<K: Copy + Eq>(index: &mut HashTable<K>, hash: u64, key: K) {
    if let Ok(entry) = index.find_entry(hash, |k| *k == key) {
        entry.remove();
    }
}

/// An FE whose forwarding-relevant facts changed (underlay address or registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeChanged(pub FeIdx);

/// What applying one message changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Bindings that changed, with the revision of the change (upsert or removal).
    pub bindings: Vec<(IpAddr, u64)>,
    /// FEs whose underlay or registration changed (their bindings' tunnels change).
    pub fes: Vec<FeChanged>,
    /// A snapshot was completed by this message (the agent may remove what is stale).
    pub snapshot_completed: bool,
    /// Entries skipped because they were malformed (bad lengths, not a unicast address).
    pub skipped: usize,
}

/// Why a message could not be applied (the stream must be restarted from scratch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A delta or heartbeat arrived before any complete snapshot.
    #[error("{0:?} at revision {1} before any snapshot; resync from scratch")]
    NoBase(SyncPhase, u64),
    /// The phase is unknown.
    #[error("sync message with unknown phase {0}")]
    BadPhase(i32),
}

/// An FE as staged by a snapshot.
#[derive(Debug)]
struct StagedFe {
    underlay: Option<Ipv4Addr>,
    site: String,
    up: bool,
    revision: u64,
}

#[derive(Debug, Default)]
struct Staging {
    fes: HashMap<String, StagedFe>,
    bindings: Bindings,
    skipped: usize,
}

/// The desired state.
#[derive(Debug)]
pub struct DesiredState {
    me: FeIdx,
    fes: FeTable,
    bindings: Bindings,
    revision: u64,
    complete: bool,
    staging: Option<Staging>,
    mobile_prefixes: Vec<String>,
    snapshots: u64,
}

impl DesiredState {
    /// An empty state for the FE `me`.
    pub fn new(me: &str) -> Self {
        let mut fes = FeTable::default();
        let me = fes.intern(me);
        DesiredState {
            me,
            fes,
            bindings: Bindings::default(),
            revision: 0,
            complete: false,
            staging: None,
            mobile_prefixes: Vec::new(),
            snapshots: 0,
        }
    }

    /// This FE's index.
    pub fn me(&self) -> FeIdx {
        self.me
    }

    /// The revision the state is current up to (resume the stream from it), 0 before the first
    /// complete snapshot.
    pub fn revision(&self) -> u64 {
        if self.complete { self.revision } else { 0 }
    }

    /// True once a snapshot has been applied completely.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Completed snapshots so far.
    pub fn snapshots(&self) -> u64 {
        self.snapshots
    }

    /// The controller's mobile prefixes (from the first message of the last stream).
    pub fn mobile_prefixes(&self) -> &[String] {
        &self.mobile_prefixes
    }

    /// The FE table.
    pub fn fes(&self) -> &FeTable {
        &self.fes
    }

    /// The binding of `ip`.
    pub fn binding(&self, ip: IpAddr) -> Option<BindingRec> {
        self.bindings.get(ip).copied()
    }

    /// Number of bindings.
    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    /// True without bindings.
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// The IPs bound with `mac`, both families (unordered), from the MAC index.
    pub fn ips_with_mac(&self, mac: [u8; 6]) -> impl Iterator<Item = IpAddr> + '_ {
        self.bindings.with_mac(mac)
    }

    /// Entries of the MAC index (one per binding when it is consistent).
    #[cfg(test)]
    fn mac_index_len(&self) -> usize {
        self.bindings.macs4.len() + self.bindings.macs6.len()
    }

    /// Every binding (unordered).
    pub fn bindings(&self) -> impl Iterator<Item = (IpAddr, BindingRec)> + '_ {
        self.bindings.iter().map(|(ip, &b)| (ip, b))
    }

    /// Bindings split into (local, remote) counts.
    pub fn counts(&self) -> (usize, usize) {
        let local = self.bindings.values().filter(|b| b.fe == self.me).count();
        (local, self.bindings.len() - local)
    }

    /// The underlay address of a binding's FE when it is another registered FE.
    pub fn peer_of(&self, b: &BindingRec) -> Option<Ipv4Addr> {
        if b.fe == self.me {
            return None;
        }
        self.fes.get(b.fe).filter(|f| f.present).and_then(|f| f.underlay)
    }

    /// Where the data plane relays `ip`'s packets during an announced migration: the underlay
    /// address of the FE its binding names as `pending_fe_id`, when that is a registered FE with
    /// an IPv4 underlay (this FE included: the announced FE holds what is relayed to it).
    pub fn migration_target(&self, ip: IpAddr) -> Option<Ipv4Addr> {
        let pending = self.bindings.get(ip)?.pending_fe()?;
        self.fes.get(pending).filter(|f| f.present).and_then(|f| f.underlay)
    }

    /// Bindings with an announced migration (unordered): the VMs whose relay may change when
    /// one of `fes` changes.
    pub fn announced_to<'a>(&'a self, fes: &'a std::collections::HashSet<FeIdx>) -> impl Iterator<Item = IpAddr> + 'a {
        self.bindings.iter().filter(move |(_, b)| b.pending_fe().is_some_and(|p| fes.contains(&p))).map(|(ip, _)| ip)
    }

    /// Underlay addresses of every registered FE except this one (the allowed tunnel peers).
    pub fn peers(&self) -> Vec<Ipv4Addr> {
        let mine = self.fes.get(self.me).and_then(|f| f.underlay);
        let mut peers: Vec<_> = self.fes.present().filter_map(|f| f.underlay).filter(|u| Some(*u) != mine).collect();
        peers.sort();
        peers.dedup();
        peers
    }

    /// Heap bytes held by the binding table (capacity-based estimate of hashbrown's layout).
    pub fn heap_bytes(&self) -> usize {
        self.bindings.heap_bytes()
    }

    /// Drops a snapshot that was cut short (the stream broke before its end).
    pub fn abort_snapshot(&mut self) {
        self.staging = None;
    }

    /// Applies one message.
    pub fn apply(&mut self, msg: &SyncUpdate) -> Result<Applied, ApplyError> {
        let phase = SyncPhase::try_from(msg.phase).map_err(|_| ApplyError::BadPhase(msg.phase))?;
        if !msg.mobile_prefixes.is_empty() {
            self.mobile_prefixes = msg.mobile_prefixes.clone();
        }
        match phase {
            SyncPhase::Snapshot | SyncPhase::SnapshotEnd => {
                let mut staging = if msg.reset { Staging::default() } else { self.staging.take().unwrap_or_default() };
                let skipped = self.stage(&mut staging, msg);
                staging.skipped += skipped;
                if phase == SyncPhase::SnapshotEnd {
                    return Ok(self.swap_in(staging, msg.revision));
                }
                self.staging = Some(staging);
                Ok(Applied::default())
            }
            SyncPhase::Delta | SyncPhase::Heartbeat => {
                if !self.complete || self.staging.is_some() {
                    return Err(ApplyError::NoBase(phase, msg.revision));
                }
                // A message older than the state (a replayed tail after a reconnection) is harmless:
                // its entries lose on revision; the state's revision never goes back.
                let applied = if phase == SyncPhase::Delta { self.apply_delta(msg) } else { Applied::default() };
                self.revision = self.revision.max(msg.revision);
                Ok(applied)
            }
            SyncPhase::Unspecified => Err(ApplyError::BadPhase(msg.phase)),
        }
    }

    fn apply_delta(&mut self, msg: &SyncUpdate) -> Applied {
        let mut out = Applied::default();
        // FEs: highest (revision, up) per id wins within the message and against the state.
        let mut fes: HashMap<&str, ((u64, bool), Option<&victor_proto::v1::FeEntry>)> = HashMap::new();
        for fe in &msg.fe_upserts {
            keep_newest(&mut fes, fe.fe_id.as_str(), (fe.revision, fe.up), Some(fe));
        }
        for fe in &msg.fe_removals {
            keep_newest(&mut fes, fe.fe_id.as_str(), (fe.revision, false), None);
        }
        for (id, ((revision, up), entry)) in fes {
            let idx = self.fes.intern(id);
            let slot = self.fes.get_mut(idx);
            if (slot.revision, slot.up) >= (revision, up) && slot.revision != 0 {
                continue;
            }
            let before = (slot.present, slot.underlay);
            match entry {
                Some(e) => {
                    slot.underlay = ipv4_of(&e.underlay_addr);
                    slot.site.clone_from(&e.site);
                    slot.up = e.up;
                    slot.present = true;
                }
                None => {
                    slot.present = false;
                    slot.up = false;
                }
            }
            slot.revision = revision;
            if before != (slot.present, slot.underlay) {
                out.fes.push(FeChanged(idx));
            }
        }
        // Bindings: highest revision per IP wins within the message.
        let mut newest: HashMap<IpAddr, (u64, Option<BindingRec>), RandomState> = HashMap::default();
        for b in &msg.binding_upserts {
            let Some(ip) = vm_ip_of(&b.vm_ip) else {
                out.skipped += 1;
                continue;
            };
            let Ok(mac) = <[u8; 6]>::try_from(b.mac.as_slice()) else {
                out.skipped += 1;
                continue;
            };
            let rec = self.binding_rec(b, mac);
            keep_newest(&mut newest, ip, b.revision, Some(rec));
        }
        for r in &msg.binding_removals {
            let Some(ip) = vm_ip_of(&r.vm_ip) else {
                out.skipped += 1;
                continue;
            };
            keep_newest(&mut newest, ip, r.revision, None);
        }
        for (ip, (revision, rec)) in newest {
            let current = self.bindings.get(ip).map(|b| b.revision);
            if current.is_some_and(|c| c >= revision) {
                continue;
            }
            match rec {
                Some(rec) => {
                    self.bindings.insert(ip, rec);
                }
                None => {
                    if self.bindings.remove(ip).is_none() {
                        continue;
                    }
                }
            }
            out.bindings.push((ip, revision));
        }
        out
    }

    fn swap_in(&mut self, staging: Staging, revision: u64) -> Applied {
        let mut out = Applied { snapshot_completed: true, skipped: staging.skipped, ..Applied::default() };
        // FEs: registered now = those in the snapshot.
        let mut seen = Vec::new();
        for (id, fe) in staging.fes {
            let idx = self.fes.intern(&id);
            if seen.len() <= idx as usize {
                seen.resize(idx as usize + 1, false);
            }
            seen[idx as usize] = true;
            let slot = self.fes.get_mut(idx);
            let before = (slot.present, slot.underlay);
            *slot = FeInfo {
                id: slot.id.clone(),
                underlay: fe.underlay,
                site: fe.site,
                up: fe.up,
                revision: fe.revision,
                present: true,
            };
            if before != (true, fe.underlay) {
                out.fes.push(FeChanged(idx));
            }
        }
        let absent: Vec<FeIdx> = self
            .fes
            .iter()
            .filter(|(idx, f)| f.present && !seen.get(*idx as usize).copied().unwrap_or(false))
            .map(|(idx, _)| idx)
            .collect();
        for idx in absent {
            let slot = self.fes.get_mut(idx);
            slot.present = false;
            slot.up = false;
            out.fes.push(FeChanged(idx));
        }
        // Bindings: diff old against new, then swap.
        let old = std::mem::replace(&mut self.bindings, staging.bindings);
        for (ip, new) in self.bindings.iter() {
            if old.get(ip) != Some(new) {
                out.bindings.push((ip, new.revision));
            }
        }
        for (ip, _) in old.iter() {
            if !self.bindings.contains(ip) {
                out.bindings.push((ip, revision));
            }
        }
        self.bindings.shrink_to_fit();
        self.revision = revision;
        self.complete = true;
        self.snapshots += 1;
        out
    }

    /// The record of a well-formed entry (FE ids interned).
    fn binding_rec(&mut self, b: &BindingEntry, mac: [u8; 6]) -> BindingRec {
        let pending = if b.pending_fe_id.is_empty() { NO_FE } else { self.fes.intern(&b.pending_fe_id) };
        BindingRec { revision: b.revision, move_seq: b.move_seq, fe: self.fes.intern(&b.fe_id), pending, mac }
    }

    /// Adds one snapshot part to `staging` (highest revision per key wins); returns the number of
    /// malformed entries skipped.
    fn stage(&mut self, staging: &mut Staging, msg: &SyncUpdate) -> usize {
        let mut skipped = 0;
        for e in &msg.fe_upserts {
            let newer = staging.fes.get(&e.fe_id).is_none_or(|cur| (cur.revision, cur.up) < (e.revision, e.up));
            if newer {
                let fe = StagedFe {
                    underlay: ipv4_of(&e.underlay_addr),
                    site: e.site.clone(),
                    up: e.up,
                    revision: e.revision,
                };
                staging.fes.insert(e.fe_id.clone(), fe);
            }
        }
        for r in &msg.fe_removals {
            if staging.fes.get(&r.fe_id).is_some_and(|cur| cur.revision < r.revision) {
                staging.fes.remove(&r.fe_id);
            }
        }
        staging.bindings.reserve(msg.binding_upserts.len());
        for b in &msg.binding_upserts {
            let (Some(ip), Ok(mac)) = (vm_ip_of(&b.vm_ip), <[u8; 6]>::try_from(b.mac.as_slice())) else {
                skipped += 1;
                continue;
            };
            let rec = self.binding_rec(b, mac);
            if staging.bindings.get(ip).is_none_or(|cur| cur.revision < rec.revision) {
                staging.bindings.insert(ip, rec);
            }
        }
        for r in &msg.binding_removals {
            let Some(ip) = vm_ip_of(&r.vm_ip) else {
                skipped += 1;
                continue;
            };
            if staging.bindings.get(ip).is_some_and(|cur| cur.revision < r.revision) {
                staging.bindings.remove(ip);
            }
        }
        skipped
    }
}

fn keep_newest<K: std::hash::Hash + Eq, R: Ord, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, (R, V), S>,
    key: K,
    revision: R,
    value: V,
) {
    match map.get_mut(&key) {
        Some(cur) if cur.0 >= revision => {}
        Some(cur) => *cur = (revision, value),
        None => {
            map.insert(key, (revision, value));
        }
    }
}

/// A VM address from wire bytes, either family (None for malformed bytes and for addresses that
/// cannot be a VM's: unspecified, multicast, loopback).
pub fn vm_ip_of(bytes: &[u8]) -> Option<IpAddr> {
    ip_from_bytes(bytes).ok().filter(|ip| !(ip.is_unspecified() || ip.is_multicast() || ip.is_loopback()))
}

/// An IPv4 address from wire bytes (None for IPv6 or malformed).
pub fn ipv4_of(bytes: &[u8]) -> Option<Ipv4Addr> {
    match ip_from_bytes(bytes) {
        Ok(std::net::IpAddr::V4(v4)) => Some(v4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use victor_proto::v1::{BindingEntry, BindingRemoval, FeEntry, FeRemoval};

    fn fe(id: &str, last: u8, revision: u64) -> FeEntry {
        FeEntry { fe_id: id.into(), underlay_addr: vec![198, 51, 100, last], site: "s".into(), up: true, revision }
    }

    fn bind(last: u8, fe_id: &str, move_seq: u64, revision: u64) -> BindingEntry {
        BindingEntry {
            vm_ip: vec![10, 10, 0, last],
            fe_id: fe_id.into(),
            mac: vec![2, 0, 0, 0, 0, last],
            move_seq,
            revision,
            pending_fe_id: String::new(),
        }
    }

    fn unbind(last: u8, revision: u64) -> BindingRemoval {
        BindingRemoval { vm_ip: vec![10, 10, 0, last], revision }
    }

    fn msg(phase: SyncPhase, revision: u64) -> SyncUpdate {
        SyncUpdate { phase: phase as i32, revision, ..Default::default() }
    }

    fn vm(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 10, 0, last))
    }

    /// fe1 (me), fe2, fe3 and VMs .11 at fe2, .12 at fe1, snapshot at revision 10.
    fn synced() -> DesiredState {
        let mut s = DesiredState::new("fe1");
        let mut first = msg(SyncPhase::Snapshot, 10);
        first.reset = true;
        first.fe_upserts = vec![fe("fe1", 1, 3), fe("fe2", 2, 4), fe("fe3", 3, 5)];
        first.binding_upserts = vec![bind(11, "fe2", 0, 7)];
        first.mobile_prefixes = vec!["10.10.0.0/16".into()];
        assert_eq!(s.apply(&first).unwrap(), Applied::default(), "nothing applies before the snapshot ends");
        assert!(!s.is_complete() && s.revision() == 0);
        let mut end = msg(SyncPhase::SnapshotEnd, 10);
        end.binding_upserts = vec![bind(12, "fe1", 0, 8)];
        let applied = s.apply(&end).unwrap();
        assert!(applied.snapshot_completed);
        assert_eq!(applied.bindings.len(), 2);
        s
    }

    #[test]
    fn snapshot_then_views() {
        let s = synced();
        assert_eq!(s.revision(), 10);
        assert_eq!(s.mobile_prefixes(), ["10.10.0.0/16"]);
        assert_eq!(s.counts(), (1, 1));
        let b = s.binding(vm(11)).unwrap();
        assert_eq!(s.peer_of(&b), Some(Ipv4Addr::new(198, 51, 100, 2)));
        assert_eq!(s.peer_of(&s.binding(vm(12)).unwrap()), None, "local binding has no peer");
        assert_eq!(s.peers(), vec![Ipv4Addr::new(198, 51, 100, 2), Ipv4Addr::new(198, 51, 100, 3)]);
    }

    #[test]
    fn highest_revision_wins_inside_one_message() {
        let mut s = synced();
        let mut d = msg(SyncPhase::Delta, 20);
        // .11: moved to fe3 at 15, then removed at 17 — listed removal first.
        d.binding_removals = vec![unbind(11, 17)];
        d.binding_upserts = vec![bind(11, "fe3", 1, 15), bind(13, "fe3", 0, 19)];
        // .12: removal at 12 is older than the upsert at 18.
        d.binding_removals.push(unbind(12, 12));
        d.binding_upserts.push(bind(12, "fe2", 1, 18));
        let mut applied = s.apply(&d).unwrap();
        applied.bindings.sort();
        assert_eq!(applied.bindings, vec![(vm(11), 17), (vm(12), 18), (vm(13), 19)]);
        assert_eq!(s.binding(vm(11)), None);
        assert_eq!(s.binding(vm(12)).unwrap().move_seq, 1);
        assert_eq!(s.revision(), 20);
    }

    #[test]
    fn stale_entries_are_ignored() {
        let mut s = synced();
        let mut d = msg(SyncPhase::Delta, 11);
        d.binding_upserts = vec![bind(11, "fe3", 5, 7)];
        d.binding_removals = vec![unbind(12, 8)];
        assert!(s.apply(&d).unwrap().bindings.is_empty());
        assert_eq!(s.binding(vm(11)).unwrap().fe, s.fes().lookup("fe2").unwrap());
        assert!(s.binding(vm(12)).is_some());
    }

    #[test]
    fn resync_keeps_old_state_until_the_end_and_reports_only_differences() {
        let mut s = synced();
        let mut first = msg(SyncPhase::Snapshot, 30);
        first.reset = true;
        first.fe_upserts = vec![fe("fe1", 1, 3), fe("fe2", 2, 4)];
        first.binding_upserts = vec![bind(11, "fe2", 0, 7)];
        s.apply(&first).unwrap();
        assert!(s.binding(vm(12)).is_some(), "old state serves while the snapshot streams");
        // A stream cut mid-snapshot: the part is dropped, deltas resume on the old state.
        s.abort_snapshot();
        let mut d = msg(SyncPhase::Delta, 11);
        d.binding_upserts = vec![bind(14, "fe2", 0, 11)];
        assert_eq!(s.apply(&d).unwrap().bindings, vec![(vm(14), 11)]);
        s.apply(&first).unwrap();
        let mut applied = s.apply(&msg(SyncPhase::SnapshotEnd, 30)).unwrap();
        applied.bindings.sort();
        assert_eq!(applied.bindings, vec![(vm(12), 30), (vm(14), 30)], "only .12 and .14 went away");
        assert_eq!(applied.fes, vec![FeChanged(s.fes().lookup("fe3").unwrap())], "fe3 is gone");
        assert_eq!(s.peers(), vec![Ipv4Addr::new(198, 51, 100, 2)]);
        assert_eq!(s.snapshots(), 2);
    }

    #[test]
    fn fe_changes_and_removals() {
        let mut s = synced();
        let mut d = msg(SyncPhase::Delta, 12);
        d.fe_upserts = vec![fe("fe2", 9, 11)];
        d.fe_removals = vec![FeRemoval { fe_id: "fe3".into(), revision: 12 }];
        let applied = s.apply(&d).unwrap();
        assert_eq!(applied.fes.len(), 2);
        assert_eq!(s.peers(), vec![Ipv4Addr::new(198, 51, 100, 9)]);
        // Heartbeat only advances the revision.
        assert_eq!(s.apply(&msg(SyncPhase::Heartbeat, 15)).unwrap(), Applied::default());
        assert_eq!(s.revision(), 15);
        assert_eq!(s.apply(&msg(SyncPhase::Heartbeat, 14)).unwrap(), Applied::default());
        assert_eq!(s.revision(), 15, "a replayed older message never moves the revision back");
    }

    #[test]
    fn an_fe_registered_and_up_at_one_revision_is_up_in_any_order() {
        let down = |rev| FeEntry { up: false, ..fe("fe4", 4, rev) };
        let up_of = |s: &DesiredState| s.fes().get(s.fes().lookup("fe4").unwrap()).unwrap().up;
        // Two messages: registered (down), then the session at the same revision.
        let mut s = synced();
        let mut d = msg(SyncPhase::Delta, 11);
        d.fe_upserts = vec![down(11)];
        s.apply(&d).unwrap();
        assert!(!up_of(&s));
        d.fe_upserts = vec![fe("fe4", 4, 11)];
        s.apply(&d).unwrap();
        assert!(up_of(&s), "the up view of the same revision wins");
        d.fe_upserts = vec![down(11)];
        s.apply(&d).unwrap();
        assert!(up_of(&s), "and is not undone by a repeat of the registration");
        // One message, both orders; and in a snapshot.
        for pair in [vec![down(11), fe("fe4", 4, 11)], vec![fe("fe4", 4, 11), down(11)]] {
            let mut s = synced();
            let mut d = msg(SyncPhase::Delta, 11);
            d.fe_upserts = pair.clone();
            s.apply(&d).unwrap();
            assert!(up_of(&s), "{pair:?}");
            let mut snap = msg(SyncPhase::SnapshotEnd, 11);
            snap.reset = true;
            snap.fe_upserts = pair;
            let mut s = DesiredState::new("fe1");
            s.apply(&snap).unwrap();
            assert!(up_of(&s));
        }
        // A later session loss is a newer revision and takes the FE down.
        d.fe_upserts = vec![down(12)];
        s.apply(&d).unwrap();
        assert!(!up_of(&s));
    }

    #[test]
    fn deltas_need_a_base_and_bad_entries_are_skipped() {
        let mut s = DesiredState::new("fe1");
        assert!(matches!(s.apply(&msg(SyncPhase::Delta, 3)), Err(ApplyError::NoBase(..))));
        assert!(matches!(s.apply(&msg(SyncPhase::Unspecified, 3)), Err(ApplyError::BadPhase(0))));
        let mut end = msg(SyncPhase::SnapshotEnd, 5);
        end.reset = true;
        end.binding_upserts = vec![
            BindingEntry { vm_ip: vec![1, 2, 3], ..bind(1, "fe2", 0, 1) },
            BindingEntry { vm_ip: vec![0; 16], ..bind(1, "fe2", 0, 1) },
            BindingEntry { mac: vec![1], ..bind(1, "fe2", 0, 1) },
        ];
        let applied = s.apply(&end).unwrap();
        assert_eq!(applied.skipped, 3);
        assert!(s.is_empty() && s.is_complete());
    }

    #[test]
    fn ipv6_bindings_live_beside_the_ipv4_ones() {
        let mut s = synced();
        let v6: IpAddr = "fd00:10::11".parse().unwrap();
        let bytes = victor_proto::types::ip_to_bytes(v6);
        let mut d = msg(SyncPhase::Delta, 11);
        d.binding_upserts = vec![BindingEntry { vm_ip: bytes.clone(), ..bind(11, "fe3", 0, 11) }];
        assert_eq!(s.apply(&d).unwrap().bindings, vec![(v6, 11)]);
        assert_eq!(s.binding(v6).unwrap().fe, s.fes().lookup("fe3").unwrap());
        assert_eq!(s.binding(vm(11)).unwrap().fe, s.fes().lookup("fe2").unwrap(), "10.10.0.11 is another VM");
        assert_eq!((s.len(), s.counts()), (3, (1, 2)));
        assert!(s.bindings().any(|(ip, _)| ip == v6));
        // A snapshot without it reports it gone; a removal removes it.
        let mut snap = msg(SyncPhase::SnapshotEnd, 20);
        snap.reset = true;
        snap.fe_upserts = vec![fe("fe1", 1, 3), fe("fe2", 2, 4), fe("fe3", 3, 5)];
        snap.binding_upserts = vec![BindingEntry { vm_ip: bytes.clone(), ..bind(11, "fe2", 1, 19) }];
        let mut applied = s.apply(&snap).unwrap();
        applied.bindings.sort();
        assert_eq!(applied.bindings, vec![(vm(11), 20), (vm(12), 20), (v6, 19)]);
        let mut d = msg(SyncPhase::Delta, 21);
        d.binding_removals = vec![BindingRemoval { vm_ip: bytes, revision: 21 }];
        assert_eq!(s.apply(&d).unwrap().bindings, vec![(v6, 21)]);
        assert!(s.is_empty());
    }

    /// The IPs of `mac` by the index, and by a scan of every binding; both sorted.
    fn by_index_and_by_scan(s: &DesiredState, mac: [u8; 6]) -> (Vec<IpAddr>, Vec<IpAddr>) {
        let mut indexed: Vec<IpAddr> = s.ips_with_mac(mac).collect();
        let mut scanned: Vec<IpAddr> = s.bindings().filter(|(_, b)| b.mac == mac).map(|(ip, _)| ip).collect();
        indexed.sort();
        scanned.sort();
        (indexed, scanned)
    }

    #[test]
    fn the_mac_index_follows_inserts_mac_changes_removals_and_snapshots() {
        let mut s = synced();
        let mac = |last: u8| [2, 0, 0, 0, 0, last];
        assert_eq!(s.ips_with_mac(mac(11)).collect::<Vec<_>>(), vec![vm(11)]);
        assert_eq!(s.mac_index_len(), 2);
        // A dual-stack VM: its IPv6 address with the MAC of .11.
        let v6: IpAddr = "fd00:10::11".parse().unwrap();
        let mut d = msg(SyncPhase::Delta, 11);
        d.binding_upserts =
            vec![BindingEntry { vm_ip: victor_proto::types::ip_to_bytes(v6), ..bind(11, "fe3", 0, 11) }];
        s.apply(&d).unwrap();
        assert_eq!(by_index_and_by_scan(&s, mac(11)).0, vec![vm(11), v6]);
        // A move that keeps the MAC, then an update with another MAC: the IP follows its MAC.
        let mut d = msg(SyncPhase::Delta, 12);
        d.binding_upserts = vec![bind(11, "fe3", 1, 12)];
        s.apply(&d).unwrap();
        assert_eq!(by_index_and_by_scan(&s, mac(11)).0, vec![vm(11), v6]);
        let mut d = msg(SyncPhase::Delta, 13);
        d.binding_upserts = vec![BindingEntry { mac: mac(99).to_vec(), ..bind(11, "fe3", 2, 13) }];
        s.apply(&d).unwrap();
        assert_eq!(by_index_and_by_scan(&s, mac(11)).0, vec![v6]);
        assert_eq!(by_index_and_by_scan(&s, mac(99)).0, vec![vm(11)]);
        assert_eq!(s.mac_index_len(), 3);
        // A removal.
        let mut d = msg(SyncPhase::Delta, 14);
        d.binding_removals = vec![BindingRemoval { vm_ip: victor_proto::types::ip_to_bytes(v6), revision: 14 }];
        s.apply(&d).unwrap();
        assert!(by_index_and_by_scan(&s, mac(11)).0.is_empty());
        // A snapshot replaces the index with its own (staged, swapped in whole).
        let mut snap = msg(SyncPhase::SnapshotEnd, 20);
        snap.reset = true;
        snap.fe_upserts = vec![fe("fe1", 1, 3), fe("fe2", 2, 4)];
        snap.binding_upserts =
            vec![bind(13, "fe2", 0, 15), BindingEntry { mac: mac(13).to_vec(), ..bind(14, "fe2", 0, 16) }];
        s.apply(&snap).unwrap();
        assert_eq!(by_index_and_by_scan(&s, mac(13)).0, vec![vm(13), vm(14)]);
        assert!(by_index_and_by_scan(&s, mac(99)).0.is_empty());
        assert_eq!(s.mac_index_len(), 2);
    }

    proptest! {
        /// After any sequence of deltas and snapshots (IPs of both families, a few MACs shared
        /// between them, MACs changing on updates), the MAC index gives exactly what a scan of
        /// the bindings gives, and holds one entry per binding.
        #[test]
        fn the_mac_index_always_agrees_with_a_scan(
            messages in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec((0u8..8, any::<bool>(), 0u8..4, any::<bool>()), 0..12)),
                1..12,
            ),
        ) {
            let mut s = synced();
            let mut revision = 10;
            for (snapshot, ops) in messages {
                revision += 1;
                let mut m = msg(if snapshot { SyncPhase::SnapshotEnd } else { SyncPhase::Delta }, revision + 20);
                m.reset = snapshot;
                for (n, upsert, mac, v6) in ops {
                    revision += 1;
                    let ip = if v6 { IpAddr::from([0xfd00, 0x10, 0, 0, 0, 0, 0, u16::from(n)]) } else { vm(n) };
                    let ip = victor_proto::types::ip_to_bytes(ip);
                    if upsert {
                        let e = BindingEntry { vm_ip: ip, mac: vec![2, 0, 0, 0, 0, mac], ..bind(n, "fe2", revision, revision) };
                        m.binding_upserts.push(e);
                    } else {
                        m.binding_removals.push(BindingRemoval { vm_ip: ip, revision });
                    }
                }
                revision += 20;
                s.apply(&m).unwrap();
                for mac in 0..4u8 {
                    let (indexed, scanned) = by_index_and_by_scan(&s, [2, 0, 0, 0, 0, mac]);
                    prop_assert_eq!(indexed, scanned);
                }
                prop_assert_eq!(s.mac_index_len(), s.len());
            }
        }

        /// The order of the entries inside one delta never matters.
        #[test]
        fn order_inside_a_delta_does_not_matter(
            ops in proptest::collection::vec((0u8..6, 11u64..60, any::<bool>(), 0u8..3), 1..30),
            seed in any::<u64>(),
        ) {
            let build = |ops: &[(u8, u64, bool, u8)]| {
                let mut d = msg(SyncPhase::Delta, 100);
                for &(last, rev, upsert, fe) in ops {
                    if upsert {
                        d.binding_upserts.push(bind(last, ["fe1", "fe2", "fe3"][fe as usize], rev, rev));
                    } else {
                        d.binding_removals.push(unbind(last, rev));
                    }
                }
                d
            };
            let mut shuffled = ops.clone();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let (mut a, mut b) = (synced(), synced());
            a.apply(&build(&ops)).unwrap();
            b.apply(&build(&shuffled)).unwrap();
            let mut la: Vec<_> = a.bindings().collect();
            let mut lb: Vec<_> = b.bindings().collect();
            la.sort_by_key(|(ip, _)| *ip);
            lb.sort_by_key(|(ip, _)| *ip);
            // Equal revisions for one key with different content are not produced by a store.
            prop_assume!(ops.iter().all(|o| ops.iter().filter(|p| p.0 == o.0 && p.1 == o.1).count() == 1));
            prop_assert_eq!(la, lb);
        }
    }
}
