//! The status page's live feed. One task per replica follows the cache's change frames (like any
//! stream consumer, from its own cursor) and turns them into [`FeedEvent`]s: binding and FE
//! changes, moves, and — for moves committed through this replica — their convergence, joined
//! from the move timelines ([`crate::move_timeline`]). Events go to the page's server-sent-event clients
//! through a bounded broadcast channel: a client that falls behind gets a `resync` event and
//! reloads the snapshot instead of an unbounded queue.
//!
//! The join with the timelines also observes `victor_commit_to_cache_seconds` (commit acknowledged
//! by the store → the frame applied by this replica's cache) and
//! `victor_move_convergence_seconds` (claim received → first agent stream message carrying the
//! move left this replica). The registry records a timeline right after its transaction returns,
//! which can be after the cache applied the change, so an unmatched change is looked up once
//! more `LATE_CHECK` later before it is taken as another replica's commit.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use victor_store::Revision;

use crate::cache::{BindingView, Cache, CacheChange, FeView, Frame, Since};
use crate::metrics::Metrics;
use crate::move_timeline::{MoveTimeline, MoveTimelines};

/// Moves kept for page loads.
pub const RECENT_MOVES: usize = 100;
/// Events buffered per SSE client before it must resync.
const CLIENT_BUFFER: usize = 1024;
/// How long after a change's frame its timeline is looked up a second time.
const LATE_CHECK: Duration = Duration::from_millis(50);
/// How long a move of this replica may wait for its first agent stream message.
const SEND_WAIT: Duration = Duration::from_secs(3);
/// Bounds of the join queues (changes beyond them are not measured).
const MAX_LATE: usize = 65_536;
const MAX_AWAITING: usize = 4096;

/// Convergence of one move, in milliseconds (monotonic clock of this replica).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Convergence {
    /// Claim received by this replica → committed in the store.
    pub claim_to_commit_ms: f64,
    /// Committed → applied by this replica's cache.
    pub commit_to_cache_ms: f64,
    /// Committed → first agent stream message carrying it left this replica (None: no agent
    /// stream on this replica sent it within `SEND_WAIT`).
    pub commit_to_first_send_ms: Option<f64>,
    /// Claim received → first agent stream message (the controller's share of convergence).
    pub claim_to_first_send_ms: Option<f64>,
    /// Agent streams of this replica that carried it so far.
    pub streams_sent: u32,
}

/// A move as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MoveRecord {
    /// VM IP.
    pub vm_ip: IpAddr,
    /// The FE it moved from.
    pub from_fe_id: String,
    /// The FE it moved to.
    pub fe_id: String,
    /// Move sequence after the move.
    pub move_seq: u64,
    /// Commit revision.
    pub revision: Revision,
    /// Commit time (controller wall clock, ms since the epoch).
    pub committed_at_ms: i64,
    /// Damping froze the binding with this move.
    pub frozen: bool,
    /// Measured convergence, once known.
    pub convergence: Option<Convergence>,
    /// `pending`, `measured`, `not_sent` (no agent stream here carried it) or `other_replica`
    /// (committed through another replica: its timelines are there).
    pub convergence_state: &'static str,
}

/// A binding as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BindingRow {
    /// VM IP.
    pub vm_ip: IpAddr,
    /// Binding FE.
    pub fe_id: String,
    /// The FE's site.
    pub site: String,
    /// VM MAC.
    pub mac: String,
    /// Moves so far.
    pub move_seq: u64,
    /// Frozen by flap damping.
    pub frozen: bool,
    /// Announced migration target.
    pub pending_fe_id: String,
    /// Revision of the last change.
    pub revision: Revision,
    /// Commit time (ms since the epoch).
    pub committed_at_ms: i64,
}

impl BindingRow {
    /// From the cache view (`site` looked up by the caller).
    pub fn new(ip: IpAddr, b: &BindingView, site: String) -> Self {
        BindingRow {
            vm_ip: ip,
            fe_id: b.fe_id.to_string(),
            site,
            mac: b.mac.to_string(),
            move_seq: b.move_seq,
            frozen: b.frozen,
            pending_fe_id: b.pending_fe_id().to_owned(),
            revision: b.revision,
            committed_at_ms: b.committed_at / 1_000_000,
        }
    }
}

/// An FE as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeRow {
    /// FE id.
    pub fe_id: String,
    /// Site.
    pub site: String,
    /// Underlay address.
    pub underlay: IpAddr,
    /// Live session.
    pub up: bool,
    /// Agent version.
    pub agent_version: String,
    /// Bindings at this FE.
    pub bindings: u64,
}

impl FeRow {
    /// From the cache view.
    pub fn new(f: &FeView, bindings: u64) -> Self {
        FeRow {
            fe_id: f.fe_id.to_string(),
            site: f.record.site.clone(),
            underlay: f.underlay,
            up: f.up(),
            agent_version: f.record.agent_version.clone(),
            bindings,
        }
    }
}

/// One event of the live feed (the SSE event name is `type`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FeedEvent {
    /// A binding was created or changed.
    Binding {
        /// The binding after the change.
        binding: BindingRow,
    },
    /// A binding was removed.
    BindingRemoved {
        /// VM IP.
        vm_ip: IpAddr,
        /// Revision of the removal.
        revision: Revision,
    },
    /// A VM moved.
    Move {
        /// The move.
        #[serde(rename = "move")]
        record: MoveRecord,
    },
    /// A move's convergence became known.
    Convergence {
        /// Commit revision of the move.
        revision: Revision,
        /// VM IP.
        vm_ip: IpAddr,
        /// The measurement.
        convergence: Option<Convergence>,
        /// As in [`MoveRecord::convergence_state`].
        convergence_state: &'static str,
    },
    /// An FE registered, changed, went up or down.
    Fe {
        /// The FE.
        fe: FeRow,
        /// Revision of the change.
        revision: Revision,
    },
    /// An FE registration was removed.
    FeRemoved {
        /// FE id.
        fe_id: String,
        /// Revision of the removal.
        revision: Revision,
    },
    /// The client missed events: reload the snapshot.
    Resync,
}

impl FeedEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            FeedEvent::Binding { .. } => "binding",
            FeedEvent::BindingRemoved { .. } => "binding_removed",
            FeedEvent::Move { .. } => "move",
            FeedEvent::Convergence { .. } => "convergence",
            FeedEvent::Fe { .. } => "fe",
            FeedEvent::FeRemoved { .. } => "fe_removed",
            FeedEvent::Resync => "resync",
        }
    }
}

/// Whether a binding change is a move: the rules stamp a move's time into the damping history
/// and as the commit time, which no other change does.
pub fn is_move(b: &BindingView) -> bool {
    b.move_seq > 0 && b.extra.as_deref().and_then(|e| e.recent_moves.last()) == Some(&b.committed_at)
}

/// The feed shared by the task and the HTTP handlers.
pub struct Feed {
    tx: broadcast::Sender<Arc<FeedEvent>>,
    recent: Mutex<VecDeque<MoveRecord>>,
}

impl Default for Feed {
    fn default() -> Self {
        Self::new()
    }
}

impl Feed {
    /// An empty feed.
    pub fn new() -> Self {
        Feed { tx: broadcast::channel(CLIENT_BUFFER).0, recent: Mutex::new(VecDeque::new()) }
    }

    /// A new SSE client's receiver.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FeedEvent>> {
        self.tx.subscribe()
    }

    /// The latest moves, newest first.
    pub fn recent_moves(&self) -> Vec<MoveRecord> {
        self.recent.lock().expect("feed lock").iter().rev().cloned().collect()
    }

    fn publish(&self, event: FeedEvent) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(event));
        }
    }

    fn record_move(&self, record: MoveRecord) {
        let mut recent = self.recent.lock().expect("feed lock");
        recent.push_back(record);
        while recent.len() > RECENT_MOVES {
            recent.pop_front();
        }
    }

    fn update_move(&self, revision: Revision, vm_ip: IpAddr, c: Option<Convergence>, state: &'static str) {
        if let Some(m) = self.recent.lock().expect("feed lock").iter_mut().rev().find(|m| m.revision == revision) {
            m.convergence = c.clone();
            m.convergence_state = state;
        }
        self.publish(FeedEvent::Convergence { revision, vm_ip, convergence: c, convergence_state: state });
    }
}

/// A committed change waiting to be joined with its timeline.
#[derive(Debug, Clone)]
struct Pending {
    revision: Revision,
    vm_ip: IpAddr,
    applied_mono_ns: u64,
    is_move: bool,
    seen: Instant,
}

/// Follows the cache until `shutdown`.
pub async fn run(
    feed: Arc<Feed>,
    cache: Arc<Cache>,
    timelines: Arc<MoveTimelines>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut revisions = cache.subscribe();
    while !cache.is_loaded() {
        tokio::select! {
            _ = revisions.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = crate::stream::shutting_down(&mut shutdown) => return,
        }
    }
    let mut join = Join {
        feed: &feed,
        timelines: &timelines,
        metrics: &metrics,
        late: VecDeque::new(),
        awaiting: VecDeque::new(),
    };
    let mut cursor = cache.revision();
    loop {
        match cache.since(cursor) {
            Since::TooOld { .. } => {
                // Fell behind the history (a huge burst): the pages reload their snapshot.
                cursor = cache.revision();
                feed.publish(FeedEvent::Resync);
            }
            Since::Frames { frames, revision } => {
                for frame in &frames {
                    let pending = publish_frame(&feed, &cache, frame);
                    join.arrived(pending);
                }
                cursor = revision;
            }
        }
        join.tick();
        let wait = if join.is_idle() { Duration::from_secs(1) } else { Duration::from_millis(20) };
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
            _ = crate::stream::shutting_down(&mut shutdown) => return,
        }
    }
}

/// Publishes a frame's changes; returns the binding upserts to join with timelines.
fn publish_frame(feed: &Feed, cache: &Cache, frame: &Frame) -> Vec<Pending> {
    let mut pending = Vec::new();
    let listening = feed.tx.receiver_count() > 0;
    let mut events = Vec::new();
    cache.read(|s| {
        for change in frame.changes.iter() {
            match change {
                CacheChange::Binding { ip, revision, view: Some(b) } => {
                    let moved = is_move(b);
                    pending.push(Pending {
                        revision: *revision,
                        vm_ip: *ip,
                        applied_mono_ns: frame.applied_mono_ns,
                        is_move: moved,
                        seen: Instant::now(),
                    });
                    if moved {
                        let record = MoveRecord {
                            vm_ip: *ip,
                            from_fe_id: b.moved_from().to_owned(),
                            fe_id: b.fe_id.to_string(),
                            move_seq: b.move_seq,
                            revision: *revision,
                            committed_at_ms: b.committed_at / 1_000_000,
                            frozen: b.frozen,
                            convergence: None,
                            convergence_state: "pending",
                        };
                        tracing::debug!(vm_ip = %ip, fe_id = %b.fe_id, move_seq = b.move_seq, revision, "move");
                        feed.record_move(record.clone());
                        events.push(FeedEvent::Move { record });
                    }
                    if listening {
                        let site = s.fes.get(&b.fe_id).map(|f| f.record.site.clone()).unwrap_or_default();
                        events.push(FeedEvent::Binding { binding: BindingRow::new(*ip, b, site) });
                    }
                }
                CacheChange::Binding { ip, revision, view: None } => {
                    events.push(FeedEvent::BindingRemoved { vm_ip: *ip, revision: *revision });
                }
                CacheChange::Fe { fe_id, revision, view } if listening => {
                    events.push(match view {
                        Some(f) => FeedEvent::Fe {
                            fe: FeRow::new(f, s.bindings_per_fe.get(fe_id).copied().unwrap_or(0)),
                            revision: *revision,
                        },
                        None => FeedEvent::FeRemoved { fe_id: fe_id.to_string(), revision: *revision },
                    });
                }
                CacheChange::Fe { .. } => {}
            }
        }
    });
    for event in events {
        feed.publish(event);
    }
    pending
}

/// Joins committed changes with this replica's move timelines.
struct Join<'a> {
    feed: &'a Feed,
    timelines: &'a MoveTimelines,
    metrics: &'a Metrics,
    /// Changes whose timeline was not there yet at frame time.
    late: VecDeque<Pending>,
    /// Moves of this replica waiting for their first agent stream message.
    awaiting: VecDeque<(Pending, MoveTimeline)>,
}

impl Join<'_> {
    fn is_idle(&self) -> bool {
        self.late.is_empty() && self.awaiting.is_empty()
    }

    /// First look-up, at frame time.
    fn arrived(&mut self, pending: Vec<Pending>) {
        if pending.is_empty() {
            return;
        }
        let revisions: Vec<(Revision, IpAddr)> = pending.iter().map(|p| (p.revision, p.vm_ip)).collect();
        for (p, timeline) in pending.into_iter().zip(self.timelines.get_many(&revisions)) {
            match timeline {
                Some(t) => self.found(p, t),
                None => {
                    if self.late.len() >= MAX_LATE {
                        self.late.pop_front();
                    }
                    self.late.push_back(p);
                }
            }
        }
    }

    /// Second look-up of late changes, and moves waiting for their first send.
    fn tick(&mut self) {
        let now = Instant::now();
        let due = self.late.iter().take_while(|p| now.duration_since(p.seen) >= LATE_CHECK).count();
        if due > 0 {
            let batch: Vec<Pending> = self.late.drain(..due).collect();
            let revisions: Vec<(Revision, IpAddr)> = batch.iter().map(|p| (p.revision, p.vm_ip)).collect();
            for (p, timeline) in batch.into_iter().zip(self.timelines.get_many(&revisions)) {
                match timeline {
                    Some(t) => self.found(p, t),
                    None if p.is_move => self.feed.update_move(p.revision, p.vm_ip, None, "other_replica"),
                    None => {}
                }
            }
        }
        if self.awaiting.is_empty() {
            return;
        }
        let revisions: Vec<(Revision, IpAddr)> = self.awaiting.iter().map(|(p, _)| (p.revision, p.vm_ip)).collect();
        let timelines = self.timelines.get_many(&revisions);
        let waiting = std::mem::take(&mut self.awaiting);
        for ((p, old), timeline) in waiting.into_iter().zip(timelines) {
            let t = timeline.unwrap_or(old);
            if t.first_sent_mono_ns != 0 {
                self.converged(&p, &t);
            } else if now.duration_since(p.seen) >= SEND_WAIT {
                self.feed.update_move(p.revision, p.vm_ip, Some(convergence(&p, &t)), "not_sent");
            } else {
                self.awaiting.push_back((p, t));
            }
        }
    }

    fn found(&mut self, p: Pending, t: MoveTimeline) {
        let cached = p.applied_mono_ns.saturating_sub(t.committed_mono_ns);
        self.metrics.commit_to_cache.observe(cached as f64 / 1e9);
        if !p.is_move {
            return;
        }
        if t.first_sent_mono_ns != 0 {
            self.converged(&p, &t);
        } else {
            if self.awaiting.len() >= MAX_AWAITING {
                self.awaiting.pop_front();
            }
            self.awaiting.push_back((p, t));
        }
    }

    fn converged(&self, p: &Pending, t: &MoveTimeline) {
        let c = convergence(p, t);
        if let Some(ms) = c.claim_to_first_send_ms {
            self.metrics.move_convergence.observe(ms / 1e3);
            tracing::debug!(vm_ip = %p.vm_ip, fe_id = %t.fe_id, convergence_ms = ms, "move sent to agents");
        }
        self.feed.update_move(p.revision, p.vm_ip, Some(c), "measured");
    }
}

fn convergence(p: &Pending, t: &MoveTimeline) -> Convergence {
    let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
    let sent = (t.first_sent_mono_ns != 0).then_some(t.first_sent_mono_ns);
    Convergence {
        claim_to_commit_ms: ms(t.received_mono_ns, t.committed_mono_ns),
        commit_to_cache_ms: ms(t.committed_mono_ns, p.applied_mono_ns),
        commit_to_first_send_ms: sent.map(|s| ms(t.committed_mono_ns, s)),
        claim_to_first_send_ms: sent.map(|s| ms(t.received_mono_ns, s)),
        streams_sent: t.streams_sent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::state::BindingExtra;

    fn view(move_seq: u64, committed_at: i64, recent: Vec<i64>) -> BindingView {
        BindingView {
            fe_id: "fe2".into(),
            mac: victor_proto::Mac([2, 0, 0, 0, 0, 1]),
            frozen: false,
            source: 1,
            move_seq,
            revision: 7,
            observed_at: committed_at,
            committed_at,
            observed_revision: 0,
            removed: false,
            extra: (!recent.is_empty()).then(|| Box::new(BindingExtra { recent_moves: recent, ..Default::default() })),
        }
    }

    #[test]
    fn moves_are_told_from_binds_and_refreshes() {
        assert!(!is_move(&view(0, 100, vec![])), "first bind");
        assert!(is_move(&view(1, 100, vec![100])), "move");
        assert!(!is_move(&view(1, 200, vec![100])), "refresh after a move");
        assert!(is_move(&view(3, 300, vec![100, 200, 300])), "third move");
    }

    #[test]
    fn join_measures_this_replicas_moves_and_waits_for_the_first_send() {
        let timelines = MoveTimelines::new(16);
        let metrics = Metrics::new();
        let feed = Feed::new();
        let mut rx = feed.subscribe();
        let ip: IpAddr = "10.10.0.11".parse().unwrap();
        let timeline = |first_sent| MoveTimeline {
            vm_ip: ip,
            move_seq: 1,
            fe_id: "fe2".into(),
            revision: 9,
            received_mono_ns: 1_000_000,
            committed_mono_ns: 3_000_000,
            cached_mono_ns: 0,
            first_sent_mono_ns: first_sent,
            last_sent_mono_ns: first_sent,
            streams_sent: u32::from(first_sent != 0),
        };
        timelines.committed(timeline(0));
        let mut join = Join {
            feed: &feed,
            timelines: &timelines,
            metrics: &metrics,
            late: VecDeque::new(),
            awaiting: VecDeque::new(),
        };
        // Seen "in a minute": no deadline passes while the test runs, however slow the machine.
        let seen = Instant::now() + Duration::from_secs(60);
        let p = Pending { revision: 9, vm_ip: ip, applied_mono_ns: 3_500_000, is_move: true, seen };
        join.arrived(vec![p.clone(), Pending { revision: 10, ..p.clone() }]);
        assert_eq!((join.awaiting.len(), join.late.len()), (1, 1), "9 is ours, 10 not (yet)");
        // The first agent stream sends it: the next tick publishes the convergence.
        timelines.sent(8, 9, 3_500_000, 5_000_000);
        join.tick();
        let FeedEvent::Convergence { revision, convergence: Some(c), convergence_state, .. } = &*rx.try_recv().unwrap()
        else {
            panic!("expected a convergence event")
        };
        assert_eq!((*revision, *convergence_state), (9, "measured"));
        assert_eq!(c.claim_to_commit_ms, 2.0);
        assert_eq!(c.commit_to_cache_ms, 0.5);
        assert_eq!(c.commit_to_first_send_ms, Some(2.0));
        assert_eq!(c.claim_to_first_send_ms, Some(4.0));
        assert!(join.awaiting.is_empty());
        // Revision 10 has no timeline after the late check: another replica committed it.
        join.late[0].seen = Instant::now() - LATE_CHECK;
        join.tick();
        let FeedEvent::Convergence { revision: 10, convergence_state: "other_replica", .. } = &*rx.try_recv().unwrap()
        else {
            panic!("expected other_replica for revision 10")
        };
        let text = metrics.render(&Cache::new(crate::keys::Keys::new("/v"), 1000), false, true);
        assert!(text.contains("victor_commit_to_cache_seconds_count 1"), "{text}");
        assert!(text.contains("victor_move_convergence_seconds_count 1"), "{text}");
    }
}
