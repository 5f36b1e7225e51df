//! The agents' desired-state stream (`AgentService.Sync`): a snapshot at a revision, then deltas.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::types::ip_to_bytes;
use victor_proto::v1::{BindingRemoval, FeRemoval, SyncPhase, SyncUpdate};
use victor_store::Revision;

use super::{HEARTBEAT, MAX_ENTRIES_PER_MESSAGE};
use crate::api::convert;
use crate::cache::{Cache, CacheChange, Frame, Since};
use crate::metrics::Metrics;
use crate::trace::MoveTraces;

/// How long a resume from a revision ahead of this replica's cache may wait for the cache.
const CATCH_UP: Duration = Duration::from_secs(3);

/// Everything a stream task needs.
#[derive(Clone)]
pub struct SyncContext {
    /// The replica cache.
    pub cache: Arc<Cache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Move traces.
    pub traces: Arc<MoveTraces>,
    /// The mobile prefixes (sent in the first message).
    pub mobile_prefixes: Vec<String>,
    /// Flips to true when the replica shuts down: the stream ends so the agent fails over.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Starts the stream for one agent.
pub fn start(ctx: SyncContext, fe_id: String, from_revision: Revision) -> ReceiverStream<Result<SyncUpdate, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        ctx.metrics.agent_streams.inc();
        let result = run(&ctx, &tx, from_revision).await;
        ctx.metrics.agent_streams.dec();
        if let Err(Closed) = result {
            tracing::debug!(fe_id, "agent stream closed");
        }
    });
    ReceiverStream::new(rx)
}

/// The client went away.
struct Closed;

async fn run(
    ctx: &SyncContext,
    tx: &mpsc::Sender<Result<SyncUpdate, Status>>,
    from_revision: Revision,
) -> Result<(), Closed> {
    let mut revisions = ctx.cache.subscribe();
    let mut shutdown = ctx.shutdown.clone();
    let mut first = true;
    let mut cursor = from_revision;
    if cursor > ctx.cache.revision() {
        // The agent was served by a replica that is ahead of us; give our cache a moment.
        ctx.cache.wait_for(cursor, CATCH_UP).await;
    }
    let mut need_snapshot = cursor == 0 || cursor > ctx.cache.revision();
    loop {
        if need_snapshot {
            cursor = send_snapshot(ctx, tx, &mut first).await?;
            need_snapshot = false;
        }
        let idle_revision = match ctx.cache.since(cursor) {
            Since::TooOld { floor } => {
                tracing::info!(
                    cursor,
                    floor,
                    "agent resume revision is older than this replica's history; sending a snapshot"
                );
                need_snapshot = true;
                continue;
            }
            Since::Frames { frames, revision } if !frames.is_empty() => {
                cursor = send_deltas(ctx, tx, cursor, &frames, revision, &mut first).await?;
                continue;
            }
            // No frame in (cursor, revision]: a heartbeat may advance the agent to `revision`.
            Since::Frames { revision, .. } => revision,
        };
        tokio::select! {
            changed = revisions.changed() => {
                if changed.is_err() {
                    return Err(Closed);
                }
            }
            _ = tokio::time::sleep(HEARTBEAT) => {
                send(tx, message(ctx, &mut first, SyncPhase::Heartbeat, idle_revision)).await?;
                cursor = idle_revision;
            }
            _ = tx.closed() => return Err(Closed),
            _ = super::shutting_down(&mut shutdown) => {
                let _ = tx.send(Err(Status::unavailable("controller replica is shutting down; reconnect to another replica and resume"))).await;
                return Err(Closed);
            }
        }
    }
}

async fn send_snapshot(
    ctx: &SyncContext,
    tx: &mpsc::Sender<Result<SyncUpdate, Status>>,
    first: &mut bool,
) -> Result<Revision, Closed> {
    let ((fes, bindings), revision) = ctx.cache.read_with_revision(|s| {
        let fes: Vec<_> = s.fes.values().map(convert::fe_entry).collect();
        let bindings: Vec<_> = s.bindings.iter().map(|(ip, b)| (*ip, b.clone())).collect();
        (fes, bindings)
    });
    ctx.metrics.snapshots_sent.inc();
    let mut msg = message(ctx, first, SyncPhase::Snapshot, revision);
    msg.reset = true;
    msg.fe_upserts = fes;
    let mut chunks = bindings.chunks(MAX_ENTRIES_PER_MESSAGE).peekable();
    if chunks.peek().is_none() {
        msg.phase = SyncPhase::SnapshotEnd as i32;
        send(tx, msg).await?;
        return Ok(revision);
    }
    while let Some(chunk) = chunks.next() {
        msg.binding_upserts = chunk.iter().map(|(ip, b)| convert::binding_entry(*ip, b)).collect();
        if chunks.peek().is_none() {
            msg.phase = SyncPhase::SnapshotEnd as i32;
        }
        send(tx, std::mem::replace(&mut msg, message(ctx, first, SyncPhase::Snapshot, revision))).await?;
    }
    Ok(revision)
}

async fn send_deltas(
    ctx: &SyncContext,
    tx: &mpsc::Sender<Result<SyncUpdate, Status>>,
    mut cursor: Revision,
    frames: &[Frame],
    revision: Revision,
    first: &mut bool,
) -> Result<Revision, Closed> {
    let mut start = 0;
    while start < frames.len() {
        // Take frames until the message is full (never split a frame).
        let mut end = start;
        let mut entries = 0;
        while end < frames.len() && (end == start || entries + frames[end].changes.len() <= MAX_ENTRIES_PER_MESSAGE) {
            entries += frames[end].changes.len();
            end += 1;
        }
        let batch = &frames[start..end];
        // The last message brings the agent to the cache revision read with the frames.
        let upto = if end == frames.len() { revision } else { batch.last().expect("non-empty").revision };
        let mut msg = message(ctx, first, SyncPhase::Delta, upto);
        coalesce(batch, &mut msg);
        ctx.metrics.stream_lag_revisions.observe(ctx.cache.revision().saturating_sub(upto) as f64);
        send(tx, msg).await?;
        let cached = batch.last().map(|f| f.applied_mono_ns).unwrap_or(0);
        ctx.traces.sent(cursor, upto, cached, monotonic_ns());
        cursor = upto;
        start = end;
    }
    Ok(cursor)
}

/// Folds frames into one message, keeping only the latest change per key.
fn coalesce(frames: &[Frame], msg: &mut SyncUpdate) {
    let mut bindings: HashMap<IpAddr, &CacheChange> = HashMap::new();
    let mut fes: HashMap<&str, &CacheChange> = HashMap::new();
    for change in frames.iter().flat_map(|f| f.changes.iter()) {
        match change {
            CacheChange::Binding { ip, .. } => {
                bindings.insert(*ip, change);
            }
            CacheChange::Fe { fe_id, .. } => {
                fes.insert(fe_id, change);
            }
        }
    }
    for change in bindings.into_values() {
        if let CacheChange::Binding { ip, revision, view } = change {
            match view {
                Some(view) => msg.binding_upserts.push(convert::binding_entry(*ip, view)),
                None => msg.binding_removals.push(BindingRemoval { vm_ip: ip_to_bytes(*ip), revision: *revision }),
            }
        }
    }
    for change in fes.into_values() {
        if let CacheChange::Fe { fe_id, revision, view } = change {
            match view {
                Some(view) => msg.fe_upserts.push(convert::fe_entry(view)),
                None => msg.fe_removals.push(FeRemoval { fe_id: fe_id.to_string(), revision: *revision }),
            }
        }
    }
}

fn message(ctx: &SyncContext, first: &mut bool, phase: SyncPhase, revision: Revision) -> SyncUpdate {
    let mobile_prefixes = if std::mem::take(first) { ctx.mobile_prefixes.clone() } else { Vec::new() };
    SyncUpdate {
        phase: phase as i32,
        revision,
        mobile_prefixes,
        sent_at_unix_nanos: unix_nanos(),
        ..Default::default()
    }
}

async fn send(tx: &mpsc::Sender<Result<SyncUpdate, Status>>, msg: SyncUpdate) -> Result<(), Closed> {
    tx.send(Ok(msg)).await.map_err(|_| Closed)
}
