//! Simulated FEs: real gRPC clients of the controller (Register, Heartbeat, Report, Sync) without
//! a data plane. Each holds its own HTTP/2 connection (and a second one on which its session
//! heartbeats run, on a runtime of their own: `heartbeat_runtime`), and follows the
//! desired-state stream into a compact map shaped like the real agent's (`u32` IPv4 key and a
//! 32-byte record with the FE interned to an index; see fe-agent `state/desired.rs`), recording
//! when each message was applied. Nothing else: 1,000 of them share two cores with the system
//! under test.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::{HeartbeatRequest, RegisterRequest, SyncPhase, SyncRequest};

use super::stats::Percentiles;
use super::wire::{LeanSyncUpdate, fe_key};

/// The record a simulated agent keeps per binding (32 bytes, as the real agent's `BindingRec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rec {
    /// Store revision.
    pub revision: u64,
    /// Move sequence.
    pub move_seq: u64,
    /// FE index in the [`FeTable`] ([`UNKNOWN_FE`] if the id was not registered by the bench).
    pub fe: u32,
    /// VM MAC.
    pub mac: [u8; 6],
}

/// FE index of ids the benchmark did not register.
pub const UNKNOWN_FE: u32 = u32::MAX;

/// The agent's desired bindings.
pub type BindingMap = HashMap<u32, Rec, foldhash::fast::RandomState>;

/// FE ids (as [`fe_key`]s) → index, shared read-only by all agents.
#[derive(Debug, Default)]
pub struct FeTable {
    by_key: HashMap<u64, u32>,
}

impl FeTable {
    /// The table of `ids`, indexed by position.
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> FeTable {
        FeTable { by_key: ids.into_iter().enumerate().map(|(i, id)| (fe_key(id.as_bytes()), i as u32)).collect() }
    }

    fn index(&self, key: u64) -> u32 {
        self.by_key.get(&key).copied().unwrap_or(UNKNOWN_FE)
    }
}

/// Failures counted by cause (shared by every agent of a run).
#[derive(Debug, Default)]
pub struct Causes(Mutex<BTreeMap<String, u64>>);

impl Causes {
    /// Counts one failure with `cause` (FE ids in it are replaced by `<fe>`, so that one cause
    /// is one entry whichever FEs it hit).
    pub fn count(&self, cause: String) {
        *self.0.lock().expect("causes lock").entry(without_fe_ids(&cause)).or_default() += 1;
    }

    /// The counts so far.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.0.lock().expect("causes lock").clone()
    }

    /// How many failures were counted.
    pub fn total(&self) -> u64 {
        self.0.lock().expect("causes lock").values().sum()
    }
}

/// `text` with every word that starts with `fe-` (an FE id) replaced by `<fe>`.
fn without_fe_ids(text: &str) -> String {
    text.split(' ').map(|word| if word.starts_with("fe-") { "<fe>" } else { word }).collect::<Vec<_>>().join(" ")
}

/// The cause of a failed call or stream: its code, its message and the errors underneath (the
/// HTTP/2 or IO error of a dropped connection), in one line.
pub fn cause(status: &tonic::Status) -> String {
    let mut cause = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        cause.push_str(&format!(" <- {err}"));
        source = err.source();
    }
    cause
}

/// The session heartbeats of every agent of a run.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Heartbeat calls answered.
    pub heartbeats: AtomicU64,
    /// Heartbeat calls that failed, by cause.
    pub failures: Causes,
    /// Registrations renewed after the controller said the session had expired (as the real
    /// agent does).
    pub reregistered: AtomicU64,
    /// Per heartbeat, µs: (how late it was sent after its due time, sent → answered).
    timings: Mutex<Vec<(u32, u32)>>,
}

impl Sessions {
    fn heartbeat_timed(&self, late: Duration, rtt: Duration) {
        let us = |d: Duration| d.as_micros().min(u128::from(u32::MAX)) as u32;
        self.timings.lock().expect("timings lock").push((us(late), us(rtt)));
    }

    /// Percentiles (ms) of how late heartbeats were sent after their due time — the lateness of
    /// the heartbeat runtime, i.e. of this process — and of their round trips (sent → answered:
    /// the connection and the controller).
    pub fn timing(&self) -> (Percentiles, Percentiles) {
        let timings = self.timings.lock().expect("timings lock");
        let ms = |f: fn(&(u32, u32)) -> u32| timings.iter().map(|t| f64::from(f(t)) / 1e3).collect::<Vec<_>>();
        (Percentiles::of(&ms(|t| t.0)).rounded(), Percentiles::of(&ms(|t| t.1)).rounded())
    }
}

/// The runtime every simulated agent's session heartbeats run on: one thread of its own, with
/// its own connection per FE, so that 1,000 agents decoding their streams on the benchmark's
/// runtime cannot delay a heartbeat until the controller expires the session. (A real agent
/// heartbeats on its stream's connection; on its own host nothing competes with it.)
fn heartbeat_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-heartbeats")
            .enable_all()
            .build()
            .expect("heartbeat runtime")
    })
}

/// A connection to `grpc` (driven by the runtime this is awaited on).
async fn connect(grpc: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{grpc}"))
        .expect("a valid URI")
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
}

/// How long a simulated agent keeps trying to reconnect its stream before it gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// Backoff between reconnection attempts: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Progress of one agent, read by the benchmark while the stream runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Revision of the last applied message.
    pub revision: AtomicU64,
    /// When the first snapshot completed (CLOCK_MONOTONIC ns; 0 = not yet).
    pub snapshot_end_ns: AtomicU64,
    /// Messages applied.
    pub messages: AtomicU64,
    /// Binding entries applied (upserts and removals).
    pub entries: AtomicU64,
    /// Encoded bytes received.
    pub bytes: AtomicU64,
    /// Heartbeat messages received (stream messages of an idle stream).
    pub heartbeats: AtomicU64,
    /// Streams that dropped and were reopened (causes in the run's [`Causes`]).
    pub drops: AtomicU64,
    /// Snapshots received (the first one included): a resume that needed a snapshot adds one.
    pub snapshots: AtomicU64,
    /// Malformed entries or unknown FE ids (should stay 0).
    pub anomalies: AtomicU64,
    /// The stream dropped and could not be reopened within [`RECONNECT_FOR`].
    pub failed: AtomicBool,
}

/// What an agent hands back when stopped.
#[derive(Debug, Default)]
pub struct AgentState {
    /// The desired bindings.
    pub map: BindingMap,
    /// `(revision, applied_ns)` of every message applied while recording was on.
    pub log: Vec<(u64, u64)>,
    /// Why the stream ended for good before it was stopped, if it did.
    pub error: Option<String>,
}

/// A simulated FE with its connection to one controller replica.
pub struct SimFe {
    /// FE id.
    pub id: String,
    /// Agent client (shares the FE's connection).
    pub client: AgentServiceClient<Channel>,
    channel: Channel,
    heartbeat: Option<JoinHandle<()>>,
}

/// Underlay address of the `i`-th simulated FE (198.18.0.0/15, the benchmarking range).
pub fn underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i as u32)
}

impl SimFe {
    /// Connects to `grpc` and registers FE `id` with underlay [`underlay`]`(i)`; keeps the session
    /// alive from then on (counted in `sessions`) on the `heartbeat_runtime`, over a second
    /// connection of its own.
    pub async fn register(id: String, i: usize, grpc: SocketAddr, sessions: Arc<Sessions>) -> Result<SimFe> {
        let channel = connect(grpc).await.with_context(|| format!("connect {id} to controller {grpc}"))?;
        let mut client = AgentServiceClient::new(channel.clone()).max_decoding_message_size(256 << 20);
        let registration = RegisterRequest {
            fe_id: id.clone(),
            underlay_addr: underlay(i).to_string(),
            site: format!("site-{}", i % 4),
            mobile_prefixes: vec![],
            agent_version: "victor-lab-bench".into(),
        };
        let resp = client.register(registration.clone()).await.with_context(|| format!("register {id}"))?.into_inner();
        let interval = Duration::from_millis(u64::from(resp.heartbeat_interval_ms.max(100)));
        let hb_channel = heartbeat_runtime()
            .spawn(connect(grpc))
            .await?
            .with_context(|| format!("connect {id}'s heartbeats to controller {grpc}"))?;
        let mut hb_client = AgentServiceClient::new(hb_channel);
        let heartbeat = heartbeat_runtime().spawn(async move {
            loop {
                let due = tokio::time::Instant::now() + interval;
                tokio::time::sleep_until(due).await;
                let sent = tokio::time::Instant::now();
                let answer = hb_client.heartbeat(HeartbeatRequest { fe_id: registration.fe_id.clone() }).await;
                sessions.heartbeat_timed(sent.saturating_duration_since(due), sent.elapsed());
                match answer {
                    Ok(_) => {
                        sessions.heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        sessions.failures.count(cause(&status));
                        // The session expired (the FE was marked down): register again.
                        if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound)
                            && hb_client.register(registration.clone()).await.is_ok()
                        {
                            sessions.reregistered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Ok(SimFe { id, client, channel, heartbeat: Some(heartbeat) })
    }

    /// Opens `Sync` from revision 0 and follows it in a task until `stop` flips to true; a dropped
    /// stream is reopened from the agent's revision and counted in `drops`.
    pub async fn follow(
        &self,
        fes: Arc<FeTable>,
        recording: Arc<AtomicBool>,
        stop: watch::Receiver<bool>,
        drops: Arc<Causes>,
    ) -> Result<(Arc<Progress>, JoinHandle<AgentState>)> {
        let sync = SyncOpener { id: self.id.clone(), channel: self.channel.clone() };
        let stream = sync.open(0).await?;
        let progress = Arc::new(Progress::default());
        let follower = Follower { sync, fes, recording, stop, progress: progress.clone(), drops };
        let task = tokio::spawn(follower.run(stream));
        Ok((progress, task))
    }
}

/// Opens the `Sync` stream of one FE on its connection.
struct SyncOpener {
    id: String,
    channel: Channel,
}

impl SyncOpener {
    async fn open(&self, from_revision: u64) -> Result<tonic::Streaming<LeanSyncUpdate>> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(256 << 20);
        grpc.ready().await.with_context(|| format!("{}: channel not ready", self.id))?;
        let codec = tonic_prost::ProstCodec::<SyncRequest, LeanSyncUpdate>::default();
        let path = PathAndQuery::from_static("/victor.v1.AgentService/Sync");
        let request = tonic::Request::new(SyncRequest { fe_id: self.id.clone(), from_revision });
        let response = grpc.server_streaming(request, path, codec).await;
        Ok(response
            .map_err(|status| anyhow::anyhow!(cause(&status)))
            .with_context(|| format!("{}: Sync", self.id))?
            .into_inner())
    }
}

impl Drop for SimFe {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeat.take() {
            task.abort();
        }
    }
}

/// One agent's stream follower.
struct Follower {
    sync: SyncOpener,
    fes: Arc<FeTable>,
    recording: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
    drops: Arc<Causes>,
}

impl Follower {
    async fn run(mut self, mut stream: tonic::Streaming<LeanSyncUpdate>) -> AgentState {
        let mut state = AgentState::default();
        // The revision the agent's state is complete at: 0 while a snapshot is under way.
        let mut resume_from = 0;
        let mut in_snapshot = false;
        loop {
            let msg = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => break,
                msg = stream.message() => msg,
            };
            let msg = match msg {
                Ok(Some(msg)) => msg,
                dropped => {
                    let why = match dropped {
                        Err(status) => cause(&status),
                        _ => "the controller ended the stream".to_owned(),
                    };
                    self.drops.count(why);
                    self.progress.drops.fetch_add(1, Ordering::Relaxed);
                    match self.reopen(resume_from).await {
                        Ok(Some(reopened)) => {
                            stream = reopened;
                            continue;
                        }
                        Ok(None) => break,
                        Err(err) => {
                            state.error = Some(format!("{err:#}"));
                            break;
                        }
                    }
                }
            };
            let anomalies = apply(&mut state.map, &self.fes, &msg);
            let now = monotonic_ns();
            if self.recording.load(Ordering::Relaxed) {
                state.log.push((msg.revision, now));
            }
            let p = &self.progress;
            p.messages.fetch_add(1, Ordering::Relaxed);
            p.entries.fetch_add((msg.upserts.len() + msg.removals.len()) as u64, Ordering::Relaxed);
            p.bytes.fetch_add(msg.encoded_bytes as u64, Ordering::Relaxed);
            if anomalies > 0 {
                p.anomalies.fetch_add(anomalies, Ordering::Relaxed);
            }
            if msg.reset {
                in_snapshot = true;
                p.snapshots.fetch_add(1, Ordering::Relaxed);
            }
            if msg.phase == SyncPhase::Heartbeat as i32 {
                p.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            if msg.phase == SyncPhase::SnapshotEnd as i32 {
                in_snapshot = false;
                if p.snapshot_end_ns.load(Ordering::Relaxed) == 0 {
                    p.snapshot_end_ns.store(now, Ordering::Release);
                }
            }
            if !in_snapshot {
                resume_from = msg.revision;
            }
            p.revision.store(msg.revision, Ordering::Release);
        }
        if state.error.is_some() {
            self.progress.failed.store(true, Ordering::Release);
        }
        state
    }

    /// Reopens the stream from `revision`, retrying with backoff for [`RECONNECT_FOR`]; `None`
    /// when stopped meanwhile. Failed attempts are counted as drops too.
    async fn reopen(&mut self, revision: u64) -> Result<Option<tonic::Streaming<LeanSyncUpdate>>> {
        let started = tokio::time::Instant::now();
        let mut backoff = BACKOFF.0;
        loop {
            tokio::select! {
                _ = self.stop.wait_for(|s| *s) => return Ok(None),
                _ = tokio::time::sleep(backoff) => {}
            }
            match self.sync.open(revision).await {
                Ok(stream) => return Ok(Some(stream)),
                Err(err) if started.elapsed() < RECONNECT_FOR => {
                    self.drops.count(format!("reopening: {}", err.root_cause()));
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
                Err(err) => return Err(err.context(format!("stream not reopened within {RECONNECT_FOR:?}"))),
            }
        }
    }
}

/// Applies one message (highest revision per key wins); returns the number of anomalies.
fn apply(map: &mut BindingMap, fes: &FeTable, msg: &LeanSyncUpdate) -> u64 {
    if msg.reset {
        map.clear();
    }
    let mut anomalies = u64::from(msg.malformed);
    for b in &msg.upserts {
        let fe = fes.index(b.fe);
        if fe == UNKNOWN_FE {
            anomalies += 1;
        }
        let rec = Rec { revision: b.revision, move_seq: b.move_seq, fe, mac: b.mac };
        map.entry(b.ip)
            .and_modify(|held| {
                if rec.revision > held.revision {
                    *held = rec;
                }
            })
            .or_insert(rec);
    }
    for r in &msg.removals {
        if map.get(&r.ip).is_some_and(|held| held.revision < r.revision) {
            map.remove(&r.ip);
        }
    }
    anomalies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::wire::{LeanBinding, LeanRemoval};

    #[test]
    fn causes_are_counted_without_fe_ids() {
        let causes = Causes::default();
        causes.count("NotFound: the session of FE fe-00001 expired".into());
        causes.count("NotFound: the session of FE fe-00913 expired".into());
        causes.count("Unavailable: GoAway".into());
        let counts = causes.counts();
        assert_eq!(counts["NotFound: the session of FE <fe> expired"], 2);
        assert_eq!(counts["Unavailable: GoAway"], 1);
        assert_eq!(causes.total(), 3);
    }

    #[test]
    fn highest_revision_wins_whatever_the_order() {
        let fes = FeTable::new(["a", "b"]);
        let up = |ip, fe: &str, revision| LeanBinding { ip, fe: fe_key(fe.as_bytes()), revision, ..Default::default() };
        let mut map = BindingMap::default();
        let msg = LeanSyncUpdate { upserts: vec![up(1, "b", 7), up(1, "a", 5), up(2, "zz", 3)], ..Default::default() };
        assert_eq!(apply(&mut map, &fes, &msg), 1, "unknown FE counted");
        assert_eq!(map[&1].fe, 1);
        let msg = LeanSyncUpdate {
            removals: vec![LeanRemoval { ip: 1, revision: 6 }, LeanRemoval { ip: 2, revision: 9 }],
            ..Default::default()
        };
        apply(&mut map, &fes, &msg);
        assert!(map.contains_key(&1), "an older removal does not remove a newer binding");
        assert!(!map.contains_key(&2));
        assert_eq!(std::mem::size_of::<Rec>(), 32);
    }
}
