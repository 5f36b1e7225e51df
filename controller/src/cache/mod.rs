//! The replica's watch-fed cache (kube-rs style: watch → cache → consumers).
//!
//! One loader task per replica ([`loader::run`]) lists the store once and then follows a single
//! watch of the whole key prefix, so etcd sees one watch per replica however many agents are
//! connected. Every applied watch batch that matters to agents becomes a [`Frame`] in a bounded
//! history; agent streams and binding watchers read frames after their own cursor, so a stream
//! that resumes from a revision still inside the history gets only the deltas (no snapshot), and a
//! slow stream simply coalesces more frames into its next message. The history is bounded by its
//! number of changes and by its (estimated) bytes, whichever is reached first
//! ([`CacheChange::history_bytes`]).

pub mod backfill;
pub mod loader;
pub mod macs;
pub mod state;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use victor_store::{Revision, WatchBatch};

use crate::keys::Keys;
pub use state::{BindingView, CacheChange, CacheState, FeView, VmView};

/// The changes of one applied watch batch (or of a re-list diff), at `revision`.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Highest revision in the frame.
    pub revision: Revision,
    /// Agent-visible changes, in revision order.
    pub changes: Arc<[CacheChange]>,
    /// When the cache applied it (CLOCK_MONOTONIC ns).
    pub applied_mono_ns: u64,
    /// The changes encoded for the agents, computed once by the first stream that sends the frame
    /// and shared by every other (`stream::encoded`).
    pub encoded: Arc<OnceLock<bytes::Bytes>>,
}

/// Result of asking for the changes after a revision.
#[derive(Debug)]
pub enum Since {
    /// Every change after the revision, as frames (possibly none), and the cache revision they
    /// bring the consumer to (read atomically with them: nothing between is missed).
    Frames {
        /// The frames.
        frames: Vec<Frame>,
        /// The cache's revision when they were read.
        revision: Revision,
    },
    /// The revision is older than the retained history: the consumer needs a snapshot.
    TooOld {
        /// The oldest revision from which deltas are still available.
        floor: Revision,
    },
}

struct Inner {
    state: CacheState,
    history: VecDeque<Frame>,
    history_changes: usize,
    /// Estimated bytes of the history ([`frame_bytes`]).
    history_bytes: usize,
    /// Frames cover changes with revision in (floor, state.revision].
    floor: Revision,
}

/// The cache shared by the API, the agent streams and housekeeping.
pub struct Cache {
    keys: Keys,
    inner: RwLock<Inner>,
    history_limit: usize,
    history_bytes_limit: usize,
    revision_tx: watch::Sender<Revision>,
    loaded: AtomicBool,
    undecodable: AtomicU64,
    relists: AtomicU64,
}

impl Cache {
    /// An empty cache that keeps about `history_limit` changes for resuming streams.
    pub fn new(keys: Keys, history_limit: usize) -> Arc<Cache> {
        Cache::with_history_bytes(keys, history_limit, usize::MAX)
    }

    /// An empty cache that keeps about `history_limit` changes for resuming streams, in at most
    /// about `history_bytes` bytes (the newest frame is always kept).
    pub fn with_history_bytes(keys: Keys, history_limit: usize, history_bytes: usize) -> Arc<Cache> {
        let (revision_tx, _) = watch::channel(0);
        Arc::new(Cache {
            keys,
            inner: RwLock::new(Inner {
                state: CacheState::default(),
                history: VecDeque::new(),
                history_changes: 0,
                history_bytes: 0,
                floor: 0,
            }),
            history_limit,
            history_bytes_limit: history_bytes,
            revision_tx,
            loaded: AtomicBool::new(false),
            undecodable: AtomicU64::new(0),
            relists: AtomicU64::new(0),
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs `f` on the current state under the read lock. Keep `f` short.
    pub fn read<R>(&self, f: impl FnOnce(&CacheState) -> R) -> R {
        f(&self.inner.read().expect("cache lock poisoned").state)
    }

    /// Runs `f` on the state and returns the state's revision with it: a snapshot taken by `f` is
    /// exactly at that revision, so frames after it follow without gap or repeat.
    pub fn read_with_revision<R>(&self, f: impl FnOnce(&CacheState) -> R) -> (R, Revision) {
        let inner = self.inner.read().expect("cache lock poisoned");
        (f(&inner.state), inner.state.revision)
    }

    /// The highest applied revision.
    pub fn revision(&self) -> Revision {
        *self.revision_tx.borrow()
    }

    /// Notified whenever the revision advances.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision_tx.subscribe()
    }

    /// Whether the initial load has completed (the cache may serve).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Values under our prefix that could not be decoded (should stay 0).
    pub fn undecodable(&self) -> u64 {
        self.undecodable.load(Ordering::Relaxed)
    }

    /// Completed re-lists after the first load (compaction or long outages).
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }

    /// Waits until the cache has applied `revision` (read-your-writes after a write through this
    /// replica). Returns false on timeout.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision)).await.is_ok_and(|r| r.is_ok())
    }

    /// Changes after `revision`.
    pub fn since(&self, revision: Revision) -> Since {
        let inner = self.inner.read().expect("cache lock poisoned");
        if revision < inner.floor {
            return Since::TooOld { floor: inner.floor };
        }
        let start = inner.history.partition_point(|f| f.revision <= revision);
        Since::Frames {
            frames: inner.history.range(start..).cloned().collect(),
            revision: inner.state.revision.max(revision),
        }
    }

    /// Applies a watch batch (loader only).
    pub(crate) fn apply_batch(&self, batch: &WatchBatch) {
        let mut changes = Vec::new();
        let mut undecodable = 0;
        let revision = {
            let mut inner = self.inner.write().expect("cache lock poisoned");
            for event in &batch.events {
                if inner.state.apply(&self.keys, event, &mut changes) == state::ApplyResult::Undecodable {
                    undecodable += 1;
                }
            }
            inner.state.revision = inner.state.revision.max(batch.revision);
            let revision = inner.state.revision;
            self.push_frame(&mut inner, revision, last_per_key(changes));
            revision
        };
        if undecodable > 0 {
            self.undecodable.fetch_add(undecodable, Ordering::Relaxed);
            tracing::error!(
                undecodable,
                "values under the VICTOR prefix could not be decoded; is another writer using the prefix?"
            );
        }
        self.revision_tx.send_replace(revision);
    }

    /// Installs a freshly loaded state. The first install starts the history at its revision; later
    /// installs (re-lists) publish only the differences as one frame.
    pub(crate) fn install(&self, fresh: CacheState) {
        let revision = {
            let mut inner = self.inner.write().expect("cache lock poisoned");
            let revision = fresh.revision;
            if self.is_loaded() {
                let changes = inner.state.replace_with(fresh);
                self.push_frame(&mut inner, revision, changes);
                self.relists.fetch_add(1, Ordering::Relaxed);
            } else {
                inner.state = fresh;
                inner.floor = revision;
                inner.history.clear();
                inner.history_changes = 0;
                inner.history_bytes = 0;
            }
            revision
        };
        self.loaded.store(true, Ordering::Release);
        self.revision_tx.send_replace(revision);
    }

    /// The revision of the newest frame (0 before the first): advances only with changes agents
    /// must hear about.
    pub fn latest_frame_revision(&self) -> Revision {
        self.inner.read().expect("cache lock poisoned").history.back().map_or(0, |f| f.revision)
    }

    /// The oldest revision deltas are available from.
    pub fn floor(&self) -> Revision {
        self.inner.read().expect("cache lock poisoned").floor
    }

    /// Runs `f` on the state under the read lock (for converting replayed store events).
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&CacheState) -> R) -> R {
        self.read(f)
    }

    /// Extends the history backwards: `frames` cover (`new_floor`, `expected_floor`] and go before
    /// every frame held. Refused (false) if the floor moved meanwhile or the history would exceed
    /// its limit (the consumer then takes a snapshot).
    pub(crate) fn prepend(
        &self,
        expected_floor: Revision,
        new_floor: Revision,
        frames: Vec<(Revision, Vec<CacheChange>)>,
    ) -> bool {
        let mut inner = self.inner.write().expect("cache lock poisoned");
        let added: usize = frames.iter().map(|(_, c)| c.len()).sum();
        let added_bytes: usize = frames.iter().filter(|(_, c)| !c.is_empty()).map(|(_, c)| frame_bytes(c)).sum();
        if inner.floor != expected_floor
            || new_floor >= expected_floor
            || inner.history_changes + added > self.history_limit
            || inner.history_bytes.saturating_add(added_bytes) > self.history_bytes_limit
        {
            return false;
        }
        let applied_mono_ns = victor_proto::clock::monotonic_ns();
        for (revision, changes) in frames.into_iter().rev().filter(|(_, c)| !c.is_empty()) {
            inner.history.push_front(Frame {
                revision,
                changes: changes.into(),
                applied_mono_ns,
                encoded: Arc::default(),
            });
        }
        inner.history_changes += added;
        inner.history_bytes += added_bytes;
        inner.floor = new_floor;
        true
    }

    fn push_frame(&self, inner: &mut Inner, revision: Revision, changes: Vec<CacheChange>) {
        if changes.is_empty() {
            return;
        }
        inner.history_changes += changes.len();
        inner.history_bytes += frame_bytes(&changes);
        let applied_mono_ns = victor_proto::clock::monotonic_ns();
        inner.history.push_back(Frame { revision, changes: changes.into(), applied_mono_ns, encoded: Arc::default() });
        while (inner.history_changes > self.history_limit || inner.history_bytes > self.history_bytes_limit)
            && inner.history.len() > 1
        {
            let old = inner.history.pop_front().expect("non-empty");
            inner.history_changes -= old.changes.len();
            inner.history_bytes -= frame_bytes(&old.changes);
            inner.floor = old.revision;
        }
    }

    /// The history's changes and estimated bytes.
    pub fn history_size(&self) -> (usize, usize) {
        let inner = self.inner.read().expect("cache lock poisoned");
        (inner.history_changes, inner.history_bytes)
    }
}

/// Estimated bytes of a history frame holding `changes`: the frame, its changes and what they
/// own, and their shared encoding once a stream has built it ([`ENCODED_BYTES_PER_CHANGE`]).
fn frame_bytes(changes: &[CacheChange]) -> usize {
    std::mem::size_of::<Frame>()
        + 2 * std::mem::size_of::<usize>()
        + changes.iter().map(|c| c.history_bytes() + ENCODED_BYTES_PER_CHANGE).sum::<usize>()
}

/// About the bytes of one change in a frame's shared encoding (an IPv4 binding entry is ~40).
const ENCODED_BYTES_PER_CHANGE: usize = 48;

/// Keeps only the last change of each key, in order. One transaction can change a key's agent
/// view twice at the same revision (an FE registration writes the FE record and its session: the
/// FE is seen down, then up); agents must only see the final view.
fn last_per_key(changes: Vec<CacheChange>) -> Vec<CacheChange> {
    if changes.len() < 2 {
        return changes;
    }
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<CacheChange> = changes.into_iter().rev().filter(|c| seen.insert(c.key())).collect();
    kept.reverse();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use victor_store::{Event, EventKind, KeyValue};

    use crate::records::BindingRecord;

    fn batch(keys: &Keys, rev: Revision, last_octet: u8) -> WatchBatch {
        let ip = std::net::IpAddr::from([10, 10, 0, last_octet]);
        let value =
            BindingRecord { fe_id: "fe1".into(), mac: vec![2, 0, 0, 0, 0, 1], ..Default::default() }.encode_to_vec();
        WatchBatch {
            revision: rev,
            events: vec![Event {
                kind: EventKind::Put,
                kv: KeyValue { key: keys.binding(ip), value, mod_revision: rev, ..Default::default() },
            }],
        }
    }

    #[test]
    fn frames_after_a_revision_and_history_floor() {
        let keys = Keys::new("/v");
        let cache = Cache::new(keys.clone(), 3);
        cache.install(CacheState::at(10));
        for (i, rev) in (11..=15).enumerate() {
            cache.apply_batch(&batch(&keys, rev, i as u8 + 1));
        }
        assert_eq!(cache.revision(), 15);
        // History keeps 3 changes: revisions 13, 14, 15; the floor moved to 12.
        let Since::Frames { frames, revision } = cache.since(12) else { panic!("12 is the floor") };
        assert_eq!(frames.iter().map(|f| f.revision).collect::<Vec<_>>(), vec![13, 14, 15]);
        assert_eq!(revision, 15);
        let Since::Frames { frames, .. } = cache.since(14) else { panic!() };
        assert_eq!(frames.len(), 1);
        let Since::Frames { frames, revision } = cache.since(15) else { panic!() };
        assert!(frames.is_empty());
        assert_eq!(revision, 15);
        assert!(matches!(cache.since(11), Since::TooOld { floor: 12 }));
    }

    #[test]
    fn history_is_bounded_by_bytes_too() {
        let keys = Keys::new("/v");
        let cache = Cache::new(keys.clone(), 100);
        cache.install(CacheState::at(10));
        cache.apply_batch(&batch(&keys, 11, 1));
        let (_, one) = cache.history_size();
        assert!(one > std::mem::size_of::<CacheChange>(), "a frame of one binding: {one} bytes");

        // Room for three such frames (not four), whatever the count bound.
        let limit = 3 * one + one / 2;
        let cache = Cache::with_history_bytes(keys.clone(), 1_000_000, limit);
        cache.install(CacheState::at(10));
        for (i, rev) in (11..=15).enumerate() {
            cache.apply_batch(&batch(&keys, rev, i as u8 + 1));
        }
        assert_eq!(cache.history_size(), (3, 3 * one));
        // A resume inside the history gets the deltas; one from before it needs a snapshot.
        let Since::Frames { frames, .. } = cache.since(12) else { panic!("12 is the floor") };
        assert_eq!(frames.iter().map(|f| f.revision).collect::<Vec<_>>(), vec![13, 14, 15]);
        assert!(matches!(cache.since(11), Since::TooOld { floor: 12 }));
        // Backfill cannot grow it past the bound either.
        let change = frames[0].changes[0].clone();
        assert!(!cache.prepend(12, 11, vec![(12, vec![change])]), "a fourth frame does not fit");
        assert!(matches!(cache.since(11), Since::TooOld { floor: 12 }));
    }

    #[test]
    fn a_registration_is_one_final_fe_change() {
        use crate::records::{FeRecord, SessionRecord};
        let keys = Keys::new("/v");
        let cache = Cache::new(keys.clone(), 100);
        cache.install(CacheState::at(1));
        let fe = FeRecord { underlay_addr: vec![192, 0, 2, 1], site: "a".into(), ..Default::default() }.encode_to_vec();
        let put = |key: Vec<u8>, value: Vec<u8>| Event {
            kind: EventKind::Put,
            kv: KeyValue { key, value, mod_revision: 2, create_revision: 2, version: 1, lease: 0 },
        };
        let session = SessionRecord::default().encode_to_vec();
        cache.apply_batch(&WatchBatch {
            revision: 2,
            events: vec![put(keys.fe("fe1"), fe), put(keys.session("fe1"), session)],
        });
        let Since::Frames { frames, .. } = cache.since(1) else { panic!() };
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].changes.len(), 1, "{:?}", frames[0].changes);
        assert!(matches!(&frames[0].changes[0], CacheChange::Fe { view: Some(v), .. } if v.up()));
    }

    #[tokio::test]
    async fn wait_for_sees_later_batches() {
        let keys = Keys::new("/v");
        let cache = Cache::new(keys.clone(), 100);
        cache.install(CacheState::at(1));
        assert!(!cache.wait_for(2, Duration::from_millis(10)).await);
        let c2 = cache.clone();
        let k2 = keys.clone();
        tokio::spawn(async move { c2.apply_batch(&batch(&k2, 2, 1)) });
        assert!(cache.wait_for(2, Duration::from_secs(5)).await);
    }
}
