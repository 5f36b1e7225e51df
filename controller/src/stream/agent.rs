//! The agents' desired-state stream (`AgentService.Sync`): a snapshot at a revision, then deltas.
//!
//! One task per stream, generic over how its messages are represented ([`SyncMessage`]): decoded
//! `SyncUpdate`s for the generated gRPC service (deltas coalesced per key), or pre-encoded
//! [`EncodedSync`] bytes that share each frame's encoding across every stream
//! ([`super::encoded`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::types::ip_to_bytes;
use victor_proto::v1::{BindingEntry, BindingRemoval, FeEntry, FeRemoval, SyncPhase, SyncUpdate};
use victor_store::Revision;

use super::encoded::{self, EncodedSync, EntryRef};
use super::{HEARTBEAT, MAX_ENTRIES_PER_MESSAGE};
use crate::cache::{Cache, CacheChange, Frame, Since};
use crate::metrics::Metrics;
use crate::move_timeline::MoveTimelines;
use crate::wire;

/// How long a resume from a revision ahead of this replica's cache may wait for the cache.
const CATCH_UP: Duration = Duration::from_secs(3);

/// Delta messages per second a replica aims to stay under when every stream is busy. Every
/// message costs a wake-up, HTTP/2 framing and a `writev` whatever its size, so under churn a
/// stream that has just sent waits `streams / FANOUT_MESSAGES_PER_S` before its next delta and
/// folds everything that arrived meanwhile into it. An idle stream sends at once: pacing only
/// applies to the second message of a burst, and the gap never exceeds [`MAX_PACING`].
/// BENCHMARKS.md reports the replica's cost per delivered message.
const FANOUT_MESSAGES_PER_S: f64 = 50_000.0;
/// Upper bound of the pacing gap.
const MAX_PACING: Duration = Duration::from_millis(20);

/// The gap between two delta messages of one stream, for `streams` streams on this replica.
fn pacing(streams: i64) -> Duration {
    Duration::from_secs_f64(streams.max(1) as f64 / FANOUT_MESSAGES_PER_S).min(MAX_PACING)
}

/// Everything a stream task needs.
#[derive(Clone)]
pub struct SyncContext {
    /// The replica cache.
    pub cache: Arc<Cache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-move stage timestamps.
    pub timelines: Arc<MoveTimelines>,
    /// The mobile prefixes (sent in the first message).
    pub mobile_prefixes: Vec<String>,
    /// Flips to true when the replica shuts down: the stream ends so the agent fails over.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Reads history this replica does not hold back from the store (resumes after restarts).
    pub backfill: Arc<dyn crate::cache::backfill::Backfill>,
}

/// How a stream's messages are represented.
pub trait SyncMessage: Send + Sized + 'static {
    /// An empty message with this header (phase, revision, prefixes, send time).
    fn with_header(header: SyncUpdate) -> Self;
    /// The header, to adjust before sending (snapshot end, reset).
    fn header_mut(&mut self) -> &mut SyncUpdate;
    /// Adds the FEs of a snapshot.
    fn add_fes(&mut self, fes: Vec<FeEntry>);
    /// Adds a chunk of a snapshot's bindings.
    fn add_snapshot(&mut self, chunk: &[SnapshotEntry]);
    /// Adds the changes of consecutive frames.
    fn add_frames(&mut self, frames: &[Frame]);
}

impl SyncMessage for SyncUpdate {
    fn with_header(header: SyncUpdate) -> Self {
        header
    }

    fn header_mut(&mut self) -> &mut SyncUpdate {
        self
    }

    fn add_fes(&mut self, fes: Vec<FeEntry>) {
        self.fe_upserts.extend(fes);
    }

    fn add_snapshot(&mut self, chunk: &[SnapshotEntry]) {
        self.binding_upserts.extend(chunk.iter().map(SnapshotEntry::to_wire));
    }

    fn add_frames(&mut self, frames: &[Frame]) {
        coalesce(frames, self);
    }
}

impl SyncMessage for EncodedSync {
    fn with_header(header: SyncUpdate) -> Self {
        EncodedSync { header, parts: Vec::new() }
    }

    fn header_mut(&mut self) -> &mut SyncUpdate {
        &mut self.header
    }

    fn add_fes(&mut self, fes: Vec<FeEntry>) {
        self.parts.push(encoded::encode_fes(&fes));
    }

    fn add_snapshot(&mut self, chunk: &[SnapshotEntry]) {
        let mut buf = bytes::BytesMut::with_capacity(chunk.len() * 40);
        for e in chunk {
            encoded::put_binding(&mut buf, &e.as_ref());
        }
        self.parts.push(buf.freeze());
    }

    fn add_frames(&mut self, frames: &[Frame]) {
        self.parts.extend(frames.iter().map(encoded::frame_bytes));
    }
}

/// Starts the stream for one agent.
pub fn start<M: SyncMessage>(
    ctx: SyncContext,
    fe_id: String,
    from_revision: Revision,
) -> ReceiverStream<Result<M, Status>> {
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

async fn run<M: SyncMessage>(
    ctx: &SyncContext,
    tx: &mpsc::Sender<Result<M, Status>>,
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
    let mut next_delta = tokio::time::Instant::now();
    loop {
        if need_snapshot {
            cursor = send_snapshot(ctx, tx, &mut first).await?;
            need_snapshot = false;
        }
        if ctx.cache.revision() > cursor {
            // Changes are waiting: respect the pacing gap after the previous delta, so that
            // everything arriving meanwhile goes into one message.
            tokio::time::sleep_until(next_delta).await;
        }
        let idle_revision = match ctx.cache.since(cursor) {
            Since::TooOld { floor } => {
                // Older than this replica's history: read the missing changes back from the store
                // (it keeps them until compaction); only if that fails, a full snapshot.
                if cursor > 0
                    && let Err(err) = ctx.backfill.extend_to(cursor).await
                {
                    tracing::info!(cursor, floor, %err, "cannot resume from the store's history; sending a snapshot");
                    need_snapshot = true;
                }
                if matches!(ctx.cache.since(cursor), Since::TooOld { .. }) {
                    need_snapshot = true;
                }
                continue;
            }
            Since::Frames { frames, revision } if !frames.is_empty() => {
                cursor = send_deltas(ctx, tx, cursor, &frames, revision, &mut first).await?;
                next_delta = tokio::time::Instant::now() + pacing(ctx.metrics.agent_streams.get());
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
                send(tx, message::<M>(ctx, &mut first, SyncPhase::Heartbeat, idle_revision)).await?;
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

/// A binding as copied for a snapshot (only what the agents receive).
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    ip: IpAddr,
    fe_id: Arc<str>,
    mac: victor_proto::Mac,
    move_seq: u64,
    revision: Revision,
}

impl SnapshotEntry {
    fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            ip: self.ip,
            fe_id: &self.fe_id,
            mac: self.mac.octets(),
            move_seq: self.move_seq,
            revision: self.revision,
        }
    }

    fn to_wire(&self) -> BindingEntry {
        BindingEntry {
            vm_ip: ip_to_bytes(self.ip),
            fe_id: self.fe_id.to_string(),
            mac: self.mac.octets().to_vec(),
            move_seq: self.move_seq,
            revision: self.revision,
        }
    }
}

async fn send_snapshot<M: SyncMessage>(
    ctx: &SyncContext,
    tx: &mpsc::Sender<Result<M, Status>>,
    first: &mut bool,
) -> Result<Revision, Closed> {
    // Only what the agents need is copied under the read lock (not whole views with their damping
    // history), so a snapshot of a million bindings holds up the cache's writer briefly; the wire
    // messages are built after the lock is released.
    let ((fes, bindings), revision) = ctx.cache.read_with_revision(|s| {
        let fes: Vec<_> = s.fes.values().map(wire::fe_entry).collect();
        let bindings: Vec<SnapshotEntry> = s
            .bindings
            .iter()
            .map(|(ip, b)| SnapshotEntry {
                ip: *ip,
                fe_id: b.fe_id.clone(),
                mac: b.mac,
                move_seq: b.move_seq,
                revision: b.revision,
            })
            .collect();
        (fes, bindings)
    });
    ctx.metrics.snapshots_sent.inc();
    let mut msg: M = message(ctx, first, SyncPhase::Snapshot, revision);
    msg.header_mut().reset = true;
    msg.add_fes(fes);
    let mut chunks = bindings.chunks(MAX_ENTRIES_PER_MESSAGE).peekable();
    if chunks.peek().is_none() {
        msg.header_mut().phase = SyncPhase::SnapshotEnd as i32;
        send(tx, msg).await?;
        return Ok(revision);
    }
    while let Some(chunk) = chunks.next() {
        msg.add_snapshot(chunk);
        if chunks.peek().is_none() {
            msg.header_mut().phase = SyncPhase::SnapshotEnd as i32;
        }
        send(tx, std::mem::replace(&mut msg, message(ctx, first, SyncPhase::Snapshot, revision))).await?;
    }
    Ok(revision)
}

async fn send_deltas<M: SyncMessage>(
    ctx: &SyncContext,
    tx: &mpsc::Sender<Result<M, Status>>,
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
        let mut msg: M = message(ctx, first, SyncPhase::Delta, upto);
        msg.add_frames(batch);
        ctx.metrics.stream_lag_revisions.observe(ctx.cache.revision().saturating_sub(upto) as f64);
        send(tx, msg).await?;
        let cached = batch.last().map(|f| f.applied_mono_ns).unwrap_or(0);
        ctx.timelines.sent(cursor, upto, cached, monotonic_ns());
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
                Some(view) => msg.binding_upserts.push(wire::binding_entry(*ip, view)),
                None => msg.binding_removals.push(BindingRemoval { vm_ip: ip_to_bytes(*ip), revision: *revision }),
            }
        }
    }
    for change in fes.into_values() {
        if let CacheChange::Fe { fe_id, revision, view } = change {
            match view {
                Some(view) => msg.fe_upserts.push(wire::fe_entry(view)),
                None => msg.fe_removals.push(FeRemoval { fe_id: fe_id.to_string(), revision: *revision }),
            }
        }
    }
}

fn message<M: SyncMessage>(ctx: &SyncContext, first: &mut bool, phase: SyncPhase, revision: Revision) -> M {
    let mobile_prefixes = if std::mem::take(first) { ctx.mobile_prefixes.clone() } else { Vec::new() };
    M::with_header(SyncUpdate {
        phase: phase as i32,
        revision,
        mobile_prefixes,
        sent_at_unix_nanos: unix_nanos(),
        ..Default::default()
    })
}

async fn send<M>(tx: &mpsc::Sender<Result<M, Status>>, msg: M) -> Result<(), Closed> {
    tx.send(Ok(msg)).await.map_err(|_| Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_grows_with_the_streams_and_is_bounded() {
        assert!(pacing(3) < Duration::from_micros(100));
        assert_eq!(pacing(500), Duration::from_millis(10));
        assert_eq!(pacing(1_000_000), MAX_PACING);
        assert_eq!(pacing(0), pacing(1));
    }
}
