//! The agents' desired-state stream (`AgentService.Sync`): a snapshot, then deltas.
//!
//! Messages are built as pre-encoded bytes ([`super::encoded`]): each cache frame is encoded once
//! for every stream, and a message is its header followed by the shared bytes of its frames,
//! framed for gRPC in one buffer. The stream's loop runs inside its response body ([`Pump`]).
//! The snapshot is read in parts through the replica's [`SnapshotPacer`] and ends with its patch
//! (see [`super`]); every message is bounded by bytes. After the snapshot the stream follows the
//! replica's [`FanoutClock`]: at each tick it sends everything after its cursor in one message; an
//! idle stream sends the shared heartbeat once a second.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::v1::{FeEntry, SyncPhase, SyncUpdate};
use victor_store::Revision;

use super::admission::StreamTicket;
use super::clock::FanoutClock;
use super::encoded::{self, EntryRef};
use super::pacer::SnapshotPacer;
use super::{Closed, HEARTBEAT, MAX_MESSAGE_BYTES, Out, Pump, SNAPSHOT_PART_BYTES, split_by_bytes};
use crate::cache::{Cache, CacheState, Frame, Since};
use crate::metrics::Metrics;
use crate::move_timeline::MoveTimelines;
use crate::wire;

/// How long a resume from a revision ahead of this replica's cache may wait for the cache.
const CATCH_UP: Duration = Duration::from_secs(3);

/// Everything a stream needs.
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
    /// When deltas are sent.
    pub clock: Arc<FanoutClock>,
}

/// The stream for one agent: gRPC-framed `SyncUpdate`s. It holds `ticket` (its admission) while
/// it runs; dropping it (the client went away) ends it.
pub fn start(ctx: SyncContext, fe_id: String, from_revision: Revision, ticket: StreamTicket) -> Pump<Bytes> {
    Pump::new(ctx.shutdown.clone(), move |out| async move {
        let _ticket = ticket;
        let _counted = super::Counted::new(&ctx.metrics.agent_streams);
        let mut stream = AgentStream { ctx: &ctx, out: &out, first: true, last_sent: Instant::now() };
        if let Err(Closed) = stream.run(from_revision).await {
            tracing::debug!(fe_id, "agent stream closed");
        }
    })
}

/// What a stream waiting for the snapshot lane keeps its client alive with.
#[derive(Debug, Clone, Copy)]
enum Waiting {
    /// A snapshot part (the snapshot's base revision once its first part was read).
    Snapshot(Option<Revision>),
    /// A delta after this cursor.
    Delta(Revision),
}

/// Why a parked stream woke up.
enum Woke {
    Tick,
    Heartbeat,
    Shutdown,
}

/// One stream's state.
struct AgentStream<'a> {
    ctx: &'a SyncContext,
    out: &'a Out<Bytes>,
    /// The next message is the stream's first (it carries the mobile prefixes).
    first: bool,
    last_sent: Instant,
}

impl AgentStream<'_> {
    async fn run(&mut self, from_revision: Revision) -> Result<(), Closed> {
        let ctx = self.ctx;
        let mut ticks = ctx.clock.subscribe();
        let mut cursor = from_revision;
        if cursor > ctx.cache.revision() {
            // The agent was served by a replica that is ahead of us; give our cache a moment.
            ctx.cache.wait_for(cursor, CATCH_UP).await;
        }
        let mut need_snapshot = cursor == 0 || cursor > ctx.cache.revision();
        let heartbeat = tokio::time::sleep(HEARTBEAT);
        tokio::pin!(heartbeat);
        let mut answer_tick = false;
        loop {
            if need_snapshot {
                ticks.borrow_and_update();
                cursor = self.send_snapshot().await?;
                need_snapshot = false;
            }
            // Everything after the cursor, in one message (several only beyond MAX_MESSAGE_BYTES).
            match ctx.cache.since(cursor) {
                Since::TooOld { floor } => {
                    // Older than this replica's history: read the missing changes back from the
                    // store (it keeps them until compaction); only if that fails, a full snapshot.
                    if cursor > 0
                        && let Err(err) = ctx.backfill.extend_to(cursor).await
                    {
                        tracing::info!(cursor, floor, %err, "cannot resume from the store's history; sending a snapshot");
                    }
                    need_snapshot = matches!(ctx.cache.since(cursor), Since::TooOld { .. });
                    continue;
                }
                Since::Frames { frames, revision } if !frames.is_empty() => {
                    let phases = (SyncPhase::Delta, SyncPhase::Delta);
                    cursor = self.send_frames(cursor, &frames, revision, phases).await?;
                }
                Since::Frames { .. } => {}
            }
            if std::mem::take(&mut answer_tick) {
                ctx.clock.answered();
            }
            // Until the next tick; an idle stream sends a heartbeat once a second.
            let woke = {
                let _parked = ctx.clock.park();
                tokio::select! {
                    biased;
                    changed = ticks.changed() => match changed {
                        Ok(()) if !ticks.borrow_and_update().shutdown => Woke::Tick,
                        _ => Woke::Shutdown,
                    },
                    _ = &mut heartbeat => Woke::Heartbeat,
                }
            };
            match woke {
                Woke::Tick => answer_tick = true,
                Woke::Shutdown => {
                    // Best effort: a client that still reads learns why its stream ends.
                    self.out.try_fail(Status::unavailable(
                        "controller replica is shutting down; reconnect to another replica and resume",
                    ));
                    return Err(Closed);
                }
                Woke::Heartbeat => {
                    // The timer is reset lazily: only here, not after every message.
                    if self.last_sent.elapsed() >= HEARTBEAT {
                        cursor = self.send_heartbeat(cursor).await?;
                    }
                    heartbeat.as_mut().reset(self.last_sent + HEARTBEAT);
                }
            }
        }
    }

    /// Something to keep an idle stream alive: the changes after the cursor if any wait for the
    /// next tick, else a heartbeat at the cache's revision (the agent may advance to it, no frame
    /// lies between). Returns the new cursor.
    async fn send_heartbeat(&mut self, cursor: Revision) -> Result<Revision, Closed> {
        let Since::Frames { frames, revision } = self.ctx.cache.since(cursor) else { return Ok(cursor) };
        if !frames.is_empty() {
            return self.send_frames(cursor, &frames, revision, (SyncPhase::Delta, SyncPhase::Delta)).await;
        }
        let message = if self.first {
            encoded::framed(&self.header(SyncPhase::Heartbeat, revision), &[])
        } else {
            self.ctx.clock.heartbeat(revision)
        };
        self.send(message).await?;
        self.ctx.metrics.stream_heartbeats.inc();
        Ok(revision)
    }

    fn sent(&mut self) {
        self.last_sent = Instant::now();
        self.ctx.metrics.stream_messages.inc();
    }

    /// The header of the next message (the first carries the mobile prefixes).
    fn header(&mut self, phase: SyncPhase, revision: Revision) -> SyncUpdate {
        let mobile_prefixes =
            if std::mem::take(&mut self.first) { self.ctx.mobile_prefixes.clone() } else { Vec::new() };
        SyncUpdate {
            phase: phase as i32,
            revision,
            mobile_prefixes,
            sent_at_unix_nanos: unix_nanos(),
            ..Default::default()
        }
    }

    /// Sends `message` once the client has room; `Closed` on shutdown.
    async fn send(&mut self, message: Bytes) -> Result<(), Closed> {
        self.out.send(message).await?;
        self.sent();
        Ok(())
    }

    /// Sends a full snapshot: parts read through the pacer (each at the cache's revision of the
    /// moment), then the patch — every change after the first part's revision — ending with
    /// `SNAPSHOT_END` at the revision it brings the agent to, which it returns.
    async fn send_snapshot(&mut self) -> Result<Revision, Closed> {
        let ctx = self.ctx;
        loop {
            ctx.metrics.snapshots_sent.inc();
            let mut after = None;
            let mut base = None;
            let (last, base) = loop {
                self.out.room().await?;
                let with_fes = base.is_none();
                let building = ctx.pacer.part(|| {
                    let (part, read_at) = ctx.cache.read_with_revision(|s| read_part(s, after, with_fes));
                    let bytes = part.bytes;
                    ctx.metrics.snapshot_bytes.inc_by(bytes as u64);
                    ((part, read_at), bytes)
                });
                let (part, read_at) = self.keep_alive(Waiting::Snapshot(base), building).await;
                let base = *base.get_or_insert(read_at);
                after = part.last_ip;
                let mut header = self.header(SyncPhase::Snapshot, base);
                header.reset = with_fes;
                if part.exhausted {
                    break ((header, part), base);
                }
                // Not `put`: a keep-alive part may have taken the room while the part waited.
                self.send(snapshot_message(&header, &part)).await?;
            };
            let Some((frames, revision)) = self.patch(base).await else {
                // The history no longer reaches back to the first part: start over (reset).
                tracing::info!(base, "snapshot outlived the history it needs to be exact; sending it again");
                let (header, part) = last;
                self.send(snapshot_message(&header, &part)).await?;
                continue;
            };
            let (mut header, part) = last;
            if frames.is_empty() {
                header.phase = SyncPhase::SnapshotEnd as i32;
                header.revision = revision;
                self.send(snapshot_message(&header, &part)).await?;
                return Ok(revision);
            }
            self.send(snapshot_message(&header, &part)).await?;
            let phases = (SyncPhase::Snapshot, SyncPhase::SnapshotEnd);
            return self.send_frames(base, &frames, revision, phases).await;
        }
    }

    /// Waits for `building` (a message waiting for its turn in the replica's lane), sending an
    /// empty message every [`HEARTBEAT`] meanwhile when the client has room for it: an agent
    /// ends a stream it has not heard from for its stream timeout (1.5 s by default), and a
    /// thousand snapshots sharing the lane can leave one stream waiting longer than that. For a
    /// snapshot it is an empty snapshot part (before the first real part, `base` None, it opens
    /// the snapshot: reset); for a delta, a heartbeat at the stream's cursor.
    async fn keep_alive<T>(&mut self, waiting: Waiting, building: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(building);
        loop {
            tokio::select! {
                built = &mut building => return built,
                _ = tokio::time::sleep(HEARTBEAT) => {
                    let header = match waiting {
                        Waiting::Snapshot(base) => {
                            let mut header = self.header(SyncPhase::Snapshot, base.unwrap_or(0));
                            header.reset = base.is_none();
                            header
                        }
                        Waiting::Delta(cursor) => self.header(SyncPhase::Heartbeat, cursor),
                    };
                    if self.out.try_send(encoded::framed(&header, &[])) {
                        self.sent();
                    }
                }
            }
        }
    }

    /// Sends one delta message of `body_len` bytes built by `build`. A large one — a stream far
    /// behind catching up, e.g. every agent after a bulk load — costs as much as a snapshot part,
    /// so from [`SNAPSHOT_PART_BYTES`] on it is built in the replica's snapshot lane and shares its
    /// byte rate: a thousand streams catching up at once must not starve the unary calls
    /// (heartbeats that keep sessions alive, reports) of the replica's CPU. Small deltas, the
    /// steady state, go at once.
    async fn send_delta(
        &mut self,
        waiting: Waiting,
        body_len: usize,
        build: impl FnOnce() -> Bytes,
    ) -> Result<(), Closed> {
        self.out.room().await?;
        if body_len < SNAPSHOT_PART_BYTES {
            self.out.put(build());
            self.sent();
            return Ok(());
        }
        let pacer = self.ctx.pacer.clone();
        let building = pacer.part(|| {
            let message = build();
            let len = message.len();
            (message, len)
        });
        let message = self.keep_alive(waiting, building).await;
        // Not `put`: a keep-alive may have taken the room while the message waited.
        self.send(message).await
    }

    /// Every change after `base` and the cache revision they lead to, from the history (extended
    /// from the store if needed); `None` when they cannot be had any more.
    async fn patch(&self, base: Revision) -> Option<(Vec<Frame>, Revision)> {
        let ctx = self.ctx;
        if let Since::Frames { frames, revision } = ctx.cache.since(base) {
            return Some((frames, revision));
        }
        ctx.backfill.extend_to(base).await.ok()?;
        match ctx.cache.since(base) {
            Since::Frames { frames, revision } => Some((frames, revision)),
            Since::TooOld { .. } => None,
        }
    }

    /// Sends `frames` (every change after `cursor`, read at cache revision `revision`) in messages
    /// of at most [`MAX_MESSAGE_BYTES`], all of phase `phases.0` but the last (`phases.1`). A
    /// message brings the agent to the revision of its last whole frame — the last one to
    /// `revision`; a frame too large for one message is split by changes, and only its last piece
    /// advances the revision.
    async fn send_frames(
        &mut self,
        mut cursor: Revision,
        frames: &[Frame],
        revision: Revision,
        phases: (SyncPhase, SyncPhase),
    ) -> Result<Revision, Closed> {
        let ctx = self.ctx;
        let encoded: Vec<Bytes> = frames.iter().map(encoded::frame_bytes).collect();
        let groups = split_by_bytes(encoded.iter().map(Bytes::len), MAX_MESSAGE_BYTES);
        // Keep-alives while a large message waits for the lane: inside a snapshot's patch, empty
        // snapshot parts; otherwise heartbeats.
        let in_snapshot = phases.1 == SyncPhase::SnapshotEnd;
        for (n, group) in groups.iter().enumerate() {
            let batch = &frames[group.clone()];
            let last_group = n + 1 == groups.len();
            let upto = if last_group { revision } else { batch.last().expect("non-empty").revision };
            let phase = if last_group { phases.1 } else { phases.0 };
            let waiting = if in_snapshot { Waiting::Snapshot(Some(cursor)) } else { Waiting::Delta(cursor) };
            if let [frame] = batch
                && encoded[group.start].len() > MAX_MESSAGE_BYTES
            {
                let pieces = split_by_bytes(frame.changes.iter().map(encoded::change_len), MAX_MESSAGE_BYTES);
                for (i, piece) in pieces.iter().enumerate() {
                    let whole = i + 1 == pieces.len();
                    let (phase, at) = if whole { (phase, upto) } else { (phases.0, cursor) };
                    let header = self.header(phase, at);
                    let changes = &frame.changes[piece.clone()];
                    let len = changes.iter().map(encoded::change_len).sum();
                    self.send_delta(waiting, len, || encoded::framed(&header, &[encoded::encode_changes(changes)]))
                        .await?;
                }
            } else {
                let header = self.header(phase, upto);
                let parts = &encoded[group.clone()];
                let len = parts.iter().map(Bytes::len).sum();
                self.send_delta(waiting, len, || encoded::framed(&header, parts)).await?;
            }
            ctx.metrics.stream_lag_revisions.observe(ctx.cache.revision().saturating_sub(upto) as f64);
            let cached = batch.last().map(|f| f.applied_mono_ns).unwrap_or(0);
            ctx.timelines.sent(cursor, upto, cached, monotonic_ns());
            cursor = upto;
        }
        Ok(cursor)
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
    /// The announced migration target ("" if none: no allocation).
    pending_fe_id: String,
}

impl SnapshotEntry {
    fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            ip: self.ip,
            fe_id: &self.fe_id,
            mac: self.mac.octets(),
            move_seq: self.move_seq,
            revision: self.revision,
            pending_fe_id: &self.pending_fe_id,
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
        let entry = SnapshotEntry {
            ip: *ip,
            fe_id: b.fe_id.clone(),
            mac: b.mac,
            move_seq: b.move_seq,
            revision: b.revision,
            pending_fe_id: b.pending_fe_id().to_owned(),
        };
        bytes += encoded::binding_len(&entry.as_ref());
        part.entries.push(entry);
        part.last_ip = Some(*ip);
    }
    part.bytes = bytes;
    part
}

/// A snapshot part as one message: `header`, the part's FEs (first part only), its bindings.
fn snapshot_message(header: &SyncUpdate, part: &Part) -> Bytes {
    let fes = encoded::encode_fes(&part.fes);
    let body_len = fes.len() + part.entries.iter().map(|e| encoded::binding_len(&e.as_ref())).sum::<usize>();
    encoded::framed_with(header, body_len, |buf: &mut BytesMut| {
        buf.extend_from_slice(&fes);
        for e in &part.entries {
            encoded::put_binding(buf, &e.as_ref());
        }
    })
}
