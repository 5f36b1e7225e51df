//! The orchestrators' binding watch (`BindingService.WatchBindings`): an optional snapshot, then
//! every change in revision order. The snapshot is read in parts through the replica's
//! [`SnapshotPacer`] and ends with its patch (see [`super`]); messages are bounded by bytes.
//! A watch filtered by FE follows the FE's set of bindings ([`FeScope`]): a binding that leaves
//! the FE gets one last event.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::watch;
use tonic::Status;
use victor_proto::v1::{Binding, BindingEvent, BindingEventKind, WatchBindingsResponse};
use victor_store::Revision;

use super::admission::StreamTicket;
use super::pacer::SnapshotPacer;
use super::{Closed, HEARTBEAT, MAX_MESSAGE_BYTES, Out, Pump, SNAPSHOT_PART_BYTES, split_by_bytes};
use crate::cache::{BindingView, Cache, CacheChange, CacheState, Frame, Since};
use crate::filter::{FeScope, SCAN_BUDGET, range_after};
use crate::metrics::Metrics;
use crate::wire;

/// What the watcher asked for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Deliver changes after this revision (0 = from now).
    pub from_revision: Revision,
    /// Start with every current binding.
    pub include_snapshot: bool,
    /// Only bindings inside this prefix.
    pub prefix: Option<IpNet>,
    /// Only the bindings at this FE (and the last change of each that leaves it).
    pub fe_id: Option<String>,
}

impl WatchSpec {
    fn in_scope(&self, ip: &IpAddr) -> bool {
        self.prefix.is_none_or(|p| p.contains(ip))
    }

    /// The bindings inside the prefix after `after`, in IP order.
    fn range<'s>(
        &self,
        bindings: &'s BTreeMap<IpAddr, BindingView>,
        after: Option<IpAddr>,
    ) -> impl Iterator<Item = (&'s IpAddr, &'s BindingView)> + 's {
        range_after(bindings, self.prefix, after)
    }
}

/// Whether a change in the prefix is sent: every one without an FE filter, else as the scope says.
fn admit(scope: &mut Option<FeScope>, change: &CacheChange) -> bool {
    let CacheChange::Binding { ip, revision, view } = change else { return false };
    scope.as_mut().is_none_or(|scope| scope.admit(*ip, *revision, view.as_ref()))
}

/// Everything a watch task needs.
#[derive(Clone)]
pub struct WatchContext {
    /// The replica cache.
    pub cache: Arc<Cache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Flips to true when the replica shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Reads history this replica does not hold back from the store.
    pub backfill: Arc<dyn crate::cache::backfill::Backfill>,
    /// The replica's snapshot lane.
    pub pacer: Arc<SnapshotPacer>,
}

/// A watch stream; it holds `ticket` (its admission) while it runs, and ends when dropped.
pub fn start(ctx: WatchContext, spec: WatchSpec, ticket: StreamTicket) -> Pump<WatchBindingsResponse> {
    Pump::new(ctx.shutdown.clone(), move |out| async move {
        let _ticket = ticket;
        let _counted = super::Counted::new(&ctx.metrics.binding_watchers);
        let _ = run(&ctx, &out, spec).await;
    })
}

async fn run(ctx: &WatchContext, out: &Out<WatchBindingsResponse>, spec: WatchSpec) -> Result<(), Closed> {
    let cache = &ctx.cache;
    let mut cursor = if spec.from_revision == 0 { cache.revision() } else { spec.from_revision };
    let mut scope = spec.fe_id.as_deref().map(FeScope::new);
    if spec.include_snapshot {
        cursor = send_snapshot(ctx, out, &spec, &mut scope).await?;
    } else if let Some(scope) = scope.as_mut() {
        // What the client may hold: the FE's bindings now, and whatever changed since `cursor`.
        let (held, now) = cache.read_with_revision(|s| {
            spec.range(&s.bindings, None).filter(|(_, b)| scope.is_here(b)).map(|(ip, _)| *ip).collect::<Vec<_>>()
        });
        scope.resume(held, now);
    }
    let mut revisions = cache.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let idle_revision = match cache.since(cursor) {
            Since::TooOld { floor } => {
                // Older than this replica's history: read it back from the store if it still has it.
                if ctx.backfill.extend_to(cursor).await.is_ok() && !matches!(cache.since(cursor), Since::TooOld { .. })
                {
                    continue;
                }
                out.fail(Status::out_of_range(format!(
                    "revision {cursor} is no longer retained by this replica (history starts after {floor}); list \
                     the bindings again and watch from the listing's revision"
                )))
                .await;
                return Err(Closed);
            }
            Since::Frames { frames, revision } if !frames.is_empty() => {
                cursor = send_changes(ctx, out, cursor, &frames, revision, &spec, &mut scope).await?;
                continue;
            }
            Since::Frames { revision, .. } => revision,
        };
        tokio::select! {
            changed = revisions.changed() => changed.map_err(|_| Closed)?,
            _ = tokio::time::sleep(HEARTBEAT) => {
                out.send(WatchBindingsResponse { revision: idle_revision, events: vec![], snapshot_done: false }).await?;
                cursor = idle_revision;
            }
            _ = super::shutting_down(&mut shutdown) => {
                out.try_fail(Status::unavailable(
                    "controller replica is shutting down; watch again (from the last revision) on another replica",
                ));
                return Err(Closed);
            }
        }
    }
}

/// The event of the binding `view` of `ip`, counted as sent.
fn upsert(metrics: &Metrics, s: &CacheState, ip: IpAddr, view: &BindingView) -> BindingEvent {
    metrics.watch_event(ip);
    BindingEvent { kind: BindingEventKind::Upsert as i32, binding: Some(wire::binding(s, ip, view)) }
}

/// The event of a binding change, counted as sent.
fn event(metrics: &Metrics, s: &CacheState, change: &CacheChange) -> Option<BindingEvent> {
    let CacheChange::Binding { ip, revision, view } = change else { return None };
    Some(match view {
        Some(view) => upsert(metrics, s, *ip, view),
        None => {
            metrics.watch_event(*ip);
            BindingEvent {
                kind: BindingEventKind::Remove as i32,
                binding: Some(Binding { vm_ip: ip.to_string(), revision: *revision, ..Default::default() }),
            }
        }
    })
}

/// Bytes an event takes in a response.
fn event_len(e: &BindingEvent) -> usize {
    prost::encoding::message::encoded_len(2, e)
}

/// Sends every binding in scope: parts read through the pacer (each at the cache's revision of
/// the moment), then the patch — the latest change of every key in scope changed after the first
/// part's revision — ending with `snapshot_done` at the revision it brings the watcher to, which
/// it returns.
async fn send_snapshot(
    ctx: &WatchContext,
    out: &Out<WatchBindingsResponse>,
    spec: &WatchSpec,
    scope: &mut Option<FeScope>,
) -> Result<Revision, Closed> {
    let mut after = None;
    let mut base = None;
    let (last, base) = loop {
        out.room().await?;
        let ((events, last_ip, exhausted), read_at) = ctx
            .pacer
            .part(|| {
                let (part, read_at) = ctx.cache.read_with_revision(|s| {
                    let (mut events, mut bytes, mut last_ip, mut exhausted) = (Vec::new(), 0, after, true);
                    for (examined, (ip, view)) in spec.range(&s.bindings, after).enumerate() {
                        if bytes >= SNAPSHOT_PART_BYTES || examined == SCAN_BUDGET {
                            exhausted = false;
                            break;
                        }
                        last_ip = Some(*ip);
                        if let Some(scope) = scope.as_mut() {
                            if !scope.is_here(view) {
                                continue;
                            }
                            scope.shown(*ip);
                        }
                        let e = upsert(&ctx.metrics, s, *ip, view);
                        bytes += event_len(&e);
                        events.push(e);
                    }
                    (events, last_ip, exhausted, bytes)
                });
                let (events, last_ip, exhausted, bytes) = part;
                ctx.metrics.snapshot_bytes.inc_by(bytes as u64);
                (((events, last_ip, exhausted), read_at), bytes)
            })
            .await;
        let base = *base.get_or_insert(read_at);
        after = last_ip;
        let msg = WatchBindingsResponse { revision: base, events, snapshot_done: false };
        if exhausted {
            break (msg, base);
        }
        out.put(msg);
    };
    // The patch; without it, the parts read at later revisions would not add up to one state.
    let mut frames = ctx.cache.since(base);
    if matches!(frames, Since::TooOld { .. }) && ctx.backfill.extend_to(base).await.is_ok() {
        frames = ctx.cache.since(base);
    }
    let Since::Frames { frames, revision } = frames else {
        out.fail(Status::aborted(
            "the snapshot took so long that the changes made meanwhile are no longer retained; watch again",
        ))
        .await;
        return Err(Closed);
    };
    let mut latest: BTreeMap<IpAddr, &CacheChange> = BTreeMap::new();
    for change in frames.iter().flat_map(|f| f.changes.iter()) {
        if let CacheChange::Binding { ip, .. } = change
            && spec.in_scope(ip)
        {
            latest.insert(*ip, change);
        }
    }
    latest.retain(|_, change| admit(scope, change));
    let patch: Vec<BindingEvent> =
        ctx.cache.read(|s| latest.values().filter_map(|c| event(&ctx.metrics, s, c)).collect());
    let mut last = last;
    if event_len_sum(&last.events) + event_len_sum(&patch) <= MAX_MESSAGE_BYTES {
        last.events.extend(patch);
        last.revision = revision;
        last.snapshot_done = true;
        out.send(last).await?;
        return Ok(revision);
    }
    out.send(last).await?;
    let pieces = split_by_bytes(patch.iter().map(event_len), MAX_MESSAGE_BYTES);
    let mut patch = patch.into_iter();
    for (n, piece) in pieces.iter().enumerate() {
        let done = n + 1 == pieces.len();
        let events: Vec<_> = patch.by_ref().take(piece.len()).collect();
        let at = if done { revision } else { base };
        out.send(WatchBindingsResponse { revision: at, events, snapshot_done: done }).await?;
    }
    Ok(revision)
}

fn event_len_sum(events: &[BindingEvent]) -> usize {
    events.iter().map(event_len).sum()
}

/// Sends the changes in scope of `frames` (every change after `cursor`, read at cache revision
/// `revision`) in order, in messages of at most [`MAX_MESSAGE_BYTES`]. A message's revision is
/// that of its last whole frame (the last message's is `revision`); a frame too large for one
/// message is split, and only its last piece advances the revision.
async fn send_changes(
    ctx: &WatchContext,
    out: &Out<WatchBindingsResponse>,
    mut cursor: Revision,
    frames: &[Frame],
    revision: Revision,
    spec: &WatchSpec,
    scope: &mut Option<FeScope>,
) -> Result<Revision, Closed> {
    let mut pending: Vec<BindingEvent> = Vec::new();
    let mut pending_bytes = 0;
    for (n, frame) in frames.iter().enumerate() {
        let events: Vec<BindingEvent> = ctx.cache.read(|s| {
            frame
                .changes
                .iter()
                .filter(|c| matches!(c, CacheChange::Binding { ip, .. } if spec.in_scope(ip)))
                .filter(|c| admit(scope, c))
                .filter_map(|c| event(&ctx.metrics, s, c))
                .collect()
        });
        let bytes = event_len_sum(&events);
        if !pending.is_empty() && pending_bytes + bytes > MAX_MESSAGE_BYTES {
            let msg =
                WatchBindingsResponse { revision: cursor, events: std::mem::take(&mut pending), snapshot_done: false };
            out.send(msg).await?;
            pending_bytes = 0;
        }
        let upto = if n + 1 == frames.len() { revision } else { frame.revision };
        if bytes > MAX_MESSAGE_BYTES {
            let pieces = split_by_bytes(events.iter().map(event_len), MAX_MESSAGE_BYTES);
            let mut events = events.into_iter();
            for (i, piece) in pieces.iter().enumerate() {
                let at = if i + 1 == pieces.len() { upto } else { cursor };
                let events: Vec<_> = events.by_ref().take(piece.len()).collect();
                out.send(WatchBindingsResponse { revision: at, events, snapshot_done: false }).await?;
            }
        } else {
            pending.extend(events);
            pending_bytes += bytes;
        }
        cursor = upto;
    }
    if !pending.is_empty() {
        out.send(WatchBindingsResponse { revision: cursor, events: pending, snapshot_done: false }).await?;
    }
    Ok(cursor)
}
