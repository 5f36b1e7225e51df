//! The agents' desired-state stream (`AgentService.Sync`): a snapshot, then deltas.
//!
//! One task per stream, generic over how its messages are represented ([`SyncMessage`]): decoded
//! `SyncUpdate`s for the generated gRPC service (deltas coalesced per key), or pre-encoded
//! [`EncodedSync`] bytes that share each frame's encoding across every stream
//! ([`super::encoded`]). The snapshot is read in parts through the replica's
//! [`SnapshotPacer`] and ends with its patch (see [`super`]); every message is bounded by bytes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::types::ip_to_bytes;
use victor_proto::v1::{BindingEntry, BindingRemoval, FeEntry, FeRemoval, SyncPhase, SyncUpdate};
use victor_store::Revision;

use super::admission::StreamTicket;
use super::encoded::{self, EncodedSync, EntryRef};
use super::pacer::SnapshotPacer;
use super::{CHANNEL_MESSAGES, Closed, HEARTBEAT, MAX_MESSAGE_BYTES, Out, SNAPSHOT_PART_BYTES, split_by_bytes};
use crate::cache::{Cache, CacheChange, CacheState, Frame, Since};
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
    pub shutdown: watch::Receiver<bool>,
    /// Reads history this replica does not hold back from the store (resumes after restarts).
    pub backfill: Arc<dyn crate::cache::backfill::Backfill>,
    /// The replica's snapshot lane.
    pub pacer: Arc<SnapshotPacer>,
}

/// How a stream's messages are represented.
pub trait SyncMessage: Send + Sized + 'static {
    /// An empty message with this header (phase, revision, prefixes, send time).
    fn with_header(header: SyncUpdate) -> Self;
    /// The header, to adjust before sending (snapshot end, reset).
    fn header_mut(&mut self) -> &mut SyncUpdate;
    /// Adds the FEs of a snapshot.
    fn add_fes(&mut self, fes: Vec<FeEntry>);
    /// Adds a part of a snapshot's bindings.
    fn add_snapshot(&mut self, part: &[SnapshotEntry]);
    /// Adds the changes of consecutive frames.
    fn add_frames(&mut self, frames: &[Frame]);
    /// Adds some of the changes of one frame (a frame too large for one message).
    fn add_changes(&mut self, changes: &[CacheChange]);
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

    fn add_snapshot(&mut self, part: &[SnapshotEntry]) {
        self.binding_upserts.extend(part.iter().map(SnapshotEntry::to_wire));
    }

    fn add_frames(&mut self, frames: &[Frame]) {
        coalesce(frames.iter().flat_map(|f| f.changes.iter()), self);
    }

    fn add_changes(&mut self, changes: &[CacheChange]) {
        coalesce(changes.iter(), self);
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

    fn add_snapshot(&mut self, part: &[SnapshotEntry]) {
        let mut buf = bytes::BytesMut::with_capacity(part.iter().map(|e| encoded::binding_len(&e.as_ref())).sum());
        for e in part {
            encoded::put_binding(&mut buf, &e.as_ref());
        }
        self.parts.push(buf.freeze());
    }

    fn add_frames(&mut self, frames: &[Frame]) {
        self.parts.extend(frames.iter().map(encoded::frame_bytes));
    }

    fn add_changes(&mut self, changes: &[CacheChange]) {
        self.parts.push(encoded::encode_changes(changes));
    }
}

/// Starts the stream for one agent; it holds `ticket` (its admission) while it runs.
pub fn start<M: SyncMessage>(
    ctx: SyncContext,
    fe_id: String,
    from_revision: Revision,
    ticket: StreamTicket,
) -> ReceiverStream<Result<M, Status>> {
    let (tx, rx) = mpsc::channel(CHANNEL_MESSAGES);
    tokio::spawn(async move {
        let _ticket = ticket;
        ctx.metrics.agent_streams.inc();
        let mut out = Out::new(tx, ctx.shutdown.clone());
        let result = run(&ctx, &mut out, from_revision).await;
        ctx.metrics.agent_streams.dec();
        if let Err(Closed) = result {
            tracing::debug!(fe_id, "agent stream closed");
        }
    });
    ReceiverStream::new(rx)
}

async fn run<M: SyncMessage>(ctx: &SyncContext, out: &mut Out<M>, from_revision: Revision) -> Result<(), Closed> {
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
            cursor = send_snapshot(ctx, out, &mut first).await?;
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
                let phases = (SyncPhase::Delta, SyncPhase::Delta);
                cursor = send_frames(ctx, out, cursor, &frames, revision, &mut first, phases).await?;
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
                out.send(message::<M>(ctx, &mut first, SyncPhase::Heartbeat, idle_revision)).await?;
                cursor = idle_revision;
            }
            _ = out.closed() => return Err(Closed),
            _ = super::shutting_down(&mut shutdown) => {
                // Best effort: a client that still reads learns why its stream ends.
                out.try_fail(Status::unavailable(
                    "controller replica is shutting down; reconnect to another replica and resume",
                ));
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

/// One snapshot part as read from the cache.
struct Part {
    fes: Vec<FeEntry>,
    entries: Vec<SnapshotEntry>,
    /// The last IP of the part (the next part starts after it).
    last_ip: Option<IpAddr>,
    /// No binding after this part.
    exhausted: bool,
    /// Encoded size.
    bytes: usize,
}

/// Reads the bindings after `after` up to [`SNAPSHOT_PART_BYTES`], and the FEs if asked. Only
/// what the agents need is copied, so the read lock is held briefly; the wire message is built
/// after it is released.
fn read_part(s: &CacheState, after: Option<IpAddr>, with_fes: bool) -> Part {
    let fes: Vec<FeEntry> = if with_fes { s.fes.values().map(wire::fe_entry).collect() } else { Vec::new() };
    let mut bytes: usize = fes.iter().map(|f| prost::encoding::message::encoded_len(4, f)).sum();
    let mut part = Part { fes, entries: Vec::new(), last_ip: after, exhausted: true, bytes: 0 };
    for (ip, b) in super::bindings_after(&s.bindings, after) {
        if bytes >= SNAPSHOT_PART_BYTES {
            part.exhausted = false;
            break;
        }
        let entry =
            SnapshotEntry { ip: *ip, fe_id: b.fe_id.clone(), mac: b.mac, move_seq: b.move_seq, revision: b.revision };
        bytes += encoded::binding_len(&entry.as_ref());
        part.entries.push(entry);
        part.last_ip = Some(*ip);
    }
    part.bytes = bytes;
    part
}

/// Sends a full snapshot: parts read through the pacer (each at the cache's revision of the
/// moment), then the patch — every change after the first part's revision — ending with
/// `SNAPSHOT_END` at the revision it brings the agent to, which it returns.
async fn send_snapshot<M: SyncMessage>(
    ctx: &SyncContext,
    out: &mut Out<M>,
    first: &mut bool,
) -> Result<Revision, Closed> {
    loop {
        ctx.metrics.snapshots_sent.inc();
        let mut after = None;
        let mut base = None;
        let (last, base) = loop {
            let slot = out.slot().await?;
            let with_fes = base.is_none();
            let building = ctx.pacer.part(|| {
                let (part, read_at) = ctx.cache.read_with_revision(|s| read_part(s, after, with_fes));
                let bytes = part.bytes;
                ctx.metrics.snapshot_bytes.inc_by(bytes as u64);
                ((part, read_at), bytes)
            });
            let (part, read_at) = keep_alive(ctx, out, first, base, building).await;
            let base = *base.get_or_insert(read_at);
            after = part.last_ip;
            let mut msg: M = message(ctx, first, SyncPhase::Snapshot, base);
            if with_fes {
                msg.header_mut().reset = true;
                msg.add_fes(part.fes);
            }
            msg.add_snapshot(&part.entries);
            if part.exhausted {
                break (msg, base);
            }
            slot.send(Ok(msg));
        };
        let Some((frames, revision)) = patch(ctx, base).await else {
            // The history no longer reaches back to the first part: start over (reset).
            tracing::info!(base, "snapshot outlived the history it needs to be exact; sending it again");
            out.send(last).await?;
            continue;
        };
        if frames.is_empty() {
            let mut last = last;
            let header = last.header_mut();
            header.phase = SyncPhase::SnapshotEnd as i32;
            header.revision = revision;
            out.send(last).await?;
            return Ok(revision);
        }
        out.send(last).await?;
        let phases = (SyncPhase::Snapshot, SyncPhase::SnapshotEnd);
        return send_frames(ctx, out, base, &frames, revision, first, phases).await;
    }
}

/// Waits for `building` (a snapshot part waiting for its turn in the replica's lane), sending an
/// empty snapshot part every [`HEARTBEAT`] meanwhile when the client has room for it: an agent
/// ends a stream it has not heard from for its stream timeout (1.5 s by default), and a thousand
/// snapshots sharing the lane can leave one stream waiting longer than that. Before the first
/// real part (`base` is None) the empty part opens the snapshot (reset).
async fn keep_alive<M: SyncMessage, T>(
    ctx: &SyncContext,
    out: &Out<M>,
    first: &mut bool,
    base: Option<Revision>,
    building: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(building);
    loop {
        tokio::select! {
            built = &mut building => return built,
            _ = tokio::time::sleep(HEARTBEAT) => {
                let mut empty: M = message(ctx, first, SyncPhase::Snapshot, base.unwrap_or(0));
                empty.header_mut().reset = base.is_none();
                out.try_send(empty);
            }
        }
    }
}

/// Every change after `base` and the cache revision they lead to, from the history (extended
/// from the store if needed); `None` when they cannot be had any more.
async fn patch(ctx: &SyncContext, base: Revision) -> Option<(Vec<Frame>, Revision)> {
    if let Since::Frames { frames, revision } = ctx.cache.since(base) {
        return Some((frames, revision));
    }
    ctx.backfill.extend_to(base).await.ok()?;
    match ctx.cache.since(base) {
        Since::Frames { frames, revision } => Some((frames, revision)),
        Since::TooOld { .. } => None,
    }
}

/// Bytes a frame takes in a message.
fn frame_len(frame: &Frame) -> usize {
    encoded::frame_bytes(frame).len()
}

/// Sends `frames` (every change after `cursor`, read at cache revision `revision`) in messages
/// of at most [`MAX_MESSAGE_BYTES`], all of phase `phases.0` but the last (`phases.1`). A message
/// brings the agent to the revision of its last whole frame — the last one to `revision`; a frame
/// too large for one message is split by changes, and only its last piece advances the revision.
async fn send_frames<M: SyncMessage>(
    ctx: &SyncContext,
    out: &mut Out<M>,
    mut cursor: Revision,
    frames: &[Frame],
    revision: Revision,
    first: &mut bool,
    phases: (SyncPhase, SyncPhase),
) -> Result<Revision, Closed> {
    let groups = split_by_bytes(frames.iter().map(frame_len), MAX_MESSAGE_BYTES);
    for (n, group) in groups.iter().enumerate() {
        let batch = &frames[group.clone()];
        let last_group = n + 1 == groups.len();
        let upto = if last_group { revision } else { batch.last().expect("non-empty").revision };
        let phase = if last_group { phases.1 } else { phases.0 };
        if let [frame] = batch
            && frame_len(frame) > MAX_MESSAGE_BYTES
        {
            let pieces = split_by_bytes(frame.changes.iter().map(encoded::change_len), MAX_MESSAGE_BYTES);
            for (i, piece) in pieces.iter().enumerate() {
                let whole = i + 1 == pieces.len();
                let slot = out.slot().await?;
                let (phase, at) = if whole { (phase, upto) } else { (phases.0, cursor) };
                let mut msg: M = message(ctx, first, phase, at);
                msg.add_changes(&frame.changes[piece.clone()]);
                slot.send(Ok(msg));
            }
        } else {
            let slot = out.slot().await?;
            let mut msg: M = message(ctx, first, phase, upto);
            msg.add_frames(batch);
            slot.send(Ok(msg));
        }
        ctx.metrics.stream_lag_revisions.observe(ctx.cache.revision().saturating_sub(upto) as f64);
        let cached = batch.last().map(|f| f.applied_mono_ns).unwrap_or(0);
        ctx.timelines.sent(cursor, upto, cached, monotonic_ns());
        cursor = upto;
    }
    Ok(cursor)
}

/// Folds changes into one message, keeping only the latest change per key.
fn coalesce<'a>(changes: impl Iterator<Item = &'a CacheChange>, msg: &mut SyncUpdate) {
    let mut bindings: HashMap<IpAddr, &CacheChange> = HashMap::new();
    let mut fes: HashMap<&str, &CacheChange> = HashMap::new();
    for change in changes {
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
