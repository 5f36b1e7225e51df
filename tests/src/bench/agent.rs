//! Simulated FEs: real gRPC clients of the controller (Register, Heartbeat, Report, Sync) without
//! a data plane. Each holds its own HTTP/2 connection, keeps its session alive, and follows the
//! desired-state stream into a compact map shaped like the real agent's (`u32` IPv4 key and a
//! 32-byte record with the FE interned to an index; see fe-agent `state/desired.rs`), recording
//! when each message was applied. Nothing else: 1,000 of them share two cores with the system
//! under test.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::{HeartbeatRequest, RegisterRequest, SyncPhase, SyncRequest};

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
    /// Malformed entries or unknown FE ids (should stay 0).
    pub anomalies: AtomicU64,
    /// The stream failed or ended before it was stopped.
    pub failed: AtomicBool,
}

/// What an agent hands back when stopped.
#[derive(Debug, Default)]
pub struct AgentState {
    /// The desired bindings.
    pub map: BindingMap,
    /// `(revision, applied_ns)` of every message applied while recording was on.
    pub log: Vec<(u64, u64)>,
    /// Why the stream ended early, if it did.
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
    /// alive from then on (failures are counted in `heartbeat_failures`).
    pub async fn register(id: String, i: usize, grpc: SocketAddr, heartbeat_failures: Arc<AtomicU64>) -> Result<SimFe> {
        let channel = Channel::from_shared(format!("http://{grpc}"))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect {id} to controller {grpc}"))?;
        let mut client = AgentServiceClient::new(channel.clone()).max_decoding_message_size(256 << 20);
        let resp = client
            .register(RegisterRequest {
                fe_id: id.clone(),
                underlay_addr: underlay(i).to_string(),
                site: format!("site-{}", i % 4),
                mobile_prefixes: vec![],
                agent_version: "victor-lab-bench".into(),
            })
            .await
            .with_context(|| format!("register {id}"))?
            .into_inner();
        let interval = Duration::from_millis(u64::from(resp.heartbeat_interval_ms.max(100)));
        let mut hb_client = client.clone();
        let hb_id = id.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if hb_client.heartbeat(HeartbeatRequest { fe_id: hb_id.clone() }).await.is_err() {
                    heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(SimFe { id, client, channel, heartbeat: Some(heartbeat) })
    }

    /// Opens `Sync` from revision 0 and follows it in a task until `stop` flips to true.
    pub async fn follow(
        &self,
        fes: Arc<FeTable>,
        recording: Arc<AtomicBool>,
        stop: watch::Receiver<bool>,
    ) -> Result<(Arc<Progress>, JoinHandle<AgentState>)> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(256 << 20);
        grpc.ready().await.with_context(|| format!("{}: channel not ready", self.id))?;
        let codec = tonic_prost::ProstCodec::<SyncRequest, LeanSyncUpdate>::default();
        let path = PathAndQuery::from_static("/victor.v1.AgentService/Sync");
        let request = tonic::Request::new(SyncRequest { fe_id: self.id.clone(), from_revision: 0 });
        let stream = grpc
            .server_streaming(request, path, codec)
            .await
            .with_context(|| format!("{}: Sync", self.id))?
            .into_inner();
        let progress = Arc::new(Progress::default());
        let task = tokio::spawn(run(stream, fes, recording, stop, progress.clone()));
        Ok((progress, task))
    }
}

impl Drop for SimFe {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeat.take() {
            task.abort();
        }
    }
}

async fn run(
    mut stream: tonic::Streaming<LeanSyncUpdate>,
    fes: Arc<FeTable>,
    recording: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
    progress: Arc<Progress>,
) -> AgentState {
    let mut state = AgentState::default();
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            msg = stream.message() => msg,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                state.error = Some("stream ended".into());
                break;
            }
            Err(status) => {
                state.error = Some(format!("stream failed: {status}"));
                break;
            }
        };
        let anomalies = apply(&mut state.map, &fes, &msg);
        let now = monotonic_ns();
        if recording.load(Ordering::Relaxed) {
            state.log.push((msg.revision, now));
        }
        progress.messages.fetch_add(1, Ordering::Relaxed);
        progress.entries.fetch_add((msg.upserts.len() + msg.removals.len()) as u64, Ordering::Relaxed);
        progress.bytes.fetch_add(msg.encoded_bytes as u64, Ordering::Relaxed);
        if anomalies > 0 {
            progress.anomalies.fetch_add(anomalies, Ordering::Relaxed);
        }
        if msg.phase == SyncPhase::SnapshotEnd as i32 && progress.snapshot_end_ns.load(Ordering::Relaxed) == 0 {
            progress.snapshot_end_ns.store(now, Ordering::Release);
        }
        progress.revision.store(msg.revision, Ordering::Release);
    }
    if state.error.is_some() {
        progress.failed.store(true, Ordering::Release);
    }
    state
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
