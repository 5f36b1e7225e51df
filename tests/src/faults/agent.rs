//! Simulated FE agents that live through faults: real gRPC clients of the controller cluster that
//! run the same link logic as the fe-agent (`fe-agent/src/controller/mod.rs`), without a data
//! plane:
//!
//! * an ordered list of controller endpoints, one session at a time: connect, register (again
//!   when the session expired), heartbeat, `Sync` from the last completely applied revision (0 =
//!   full snapshot);
//! * a stream silent for `stream_timeout`, a failed heartbeat (optional, as the fe-agent does)
//!   or a broken connection ends the session; the next endpoint is tried at once, with a backoff
//!   only after every endpoint failed in a row.
//!
//! The desired state is a compact map fed by the lean decoder of [`crate::bench::wire`]. Beyond
//! the state, everything a fault test asserts on is recorded: every session (endpoint, resume
//! revision, open / first message / end times, whether it carried a snapshot), and the messages
//! that would churn routes on a real FE — binding removals and upserts of a binding the agent
//! already holds at that revision (a re-send) — in totals and in a window the test can reset
//! ([`AgentState::mark`]).
//!
//! [`SimAgent::kill`] aborts the task: its connection drops mid-stream, like `kill -9` of the
//! agent; a restarted agent starts empty, from revision 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use victor_fe_agent::controller::heartbeat::{Beat, heartbeat, heartbeats};
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::{RegisterRequest, SyncPhase, SyncRequest};

use crate::bench::agent::underlay;
use crate::bench::wire::LeanSyncUpdate;

/// Deadline of Register and Heartbeat calls (the fe-agent's).
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// A session that lived this long resets the failure count (the fe-agent's).
const HEALTHY_SESSION: Duration = Duration::from_secs(5);

/// How the link behaves.
#[derive(Debug, Clone, Copy)]
pub struct LinkPolicy {
    /// TCP connect timeout (the HTTP/2 handshake gets twice as long).
    pub connect_timeout: Duration,
    /// A stream silent this long is dead (the controller sends a heartbeat every second).
    pub stream_timeout: Duration,
    /// A failed Heartbeat call ends the session, as in the fe-agent. When false the agent keeps
    /// its stream while heartbeats fail (to watch what the replica it is on does meanwhile).
    pub heartbeat_failure_ends_session: bool,
}

impl Default for LinkPolicy {
    /// The fe-agent's defaults.
    fn default() -> Self {
        LinkPolicy {
            connect_timeout: Duration::from_secs(1),
            stream_timeout: Duration::from_millis(1500),
            heartbeat_failure_ends_session: true,
        }
    }
}

/// One binding as the agent holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// [`crate::bench::wire::fe_key`] of the binding FE.
    pub fe: u64,
    /// VM MAC.
    pub mac: [u8; 6],
    /// Move sequence.
    pub move_seq: u64,
    /// Store revision.
    pub revision: u64,
    /// The message that set it (within one message, several entries of a key are legal).
    message: u64,
}

/// Counters of what the stream delivered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Messages applied.
    pub messages: u64,
    /// Binding upserts received.
    pub upserts: u64,
    /// Binding removals received (the fault tests never remove a binding: each is a route flap).
    pub removals: u64,
    /// Upserts of a binding already held at that revision or newer, outside a snapshot (a
    /// re-send: a real agent would ignore it, but "only real differences are sent" is broken).
    pub redundant: u64,
    /// Complete snapshots applied (full resyncs).
    pub snapshots: u64,
    /// Entries the lean decoder could not read (must stay 0).
    pub malformed: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.messages += o.messages;
        self.upserts += o.upserts;
        self.removals += o.removals;
        self.redundant += o.redundant;
        self.snapshots += o.snapshots;
        self.malformed += o.malformed;
    }
}

/// One controller session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionLog {
    /// Index of the endpoint in the agent's list.
    pub endpoint: usize,
    /// The revision the stream resumed from (0 = full snapshot requested).
    pub from_revision: u64,
    /// When the stream was opened (CLOCK_MONOTONIC ns).
    pub opened_ns: u64,
    /// When its first message was applied (0 = none yet).
    pub first_message_ns: u64,
    /// Whether it delivered a snapshot.
    pub snapshot: bool,
    /// When it ended (0 = still up).
    pub ended_ns: u64,
    /// Why it ended.
    pub end: String,
}

/// The agent's state, shared with the test.
#[derive(Debug, Default)]
pub struct AgentState {
    /// The desired bindings by IPv4 address.
    pub map: HashMap<u32, Held>,
    /// The revision the agent is complete up to (its resume point once `synced`).
    pub revision: u64,
    /// A snapshot has completed at least once.
    pub synced: bool,
    /// A snapshot is being received.
    in_snapshot: bool,
    /// Since the agent started.
    pub total: Counters,
    /// Since the last [`AgentState::mark`].
    pub window: Counters,
    /// Every session, oldest first.
    pub sessions: Vec<SessionLog>,
    /// Endpoint of the session whose stream is up.
    pub connected: Option<usize>,
    /// Registrations made.
    pub registrations: u64,
    /// Heartbeats that failed.
    pub heartbeat_failures: u64,
    /// Connection or session attempts that failed before a stream opened.
    pub failed_attempts: u64,
    messages: u64,
}

impl AgentState {
    /// Resets the window counters.
    pub fn mark(&mut self) {
        self.window = Counters::default();
    }

    /// The revision to resume from (0 = a snapshot is needed).
    pub fn resume_revision(&self) -> u64 {
        if self.synced && !self.in_snapshot { self.revision } else { 0 }
    }

    /// Sessions opened at or after `since_ns`.
    pub fn sessions_since(&self, since_ns: u64) -> impl Iterator<Item = &SessionLog> {
        self.sessions.iter().filter(move |s| s.opened_ns >= since_ns)
    }

    fn apply(&mut self, msg: &LeanSyncUpdate, now: u64) {
        self.messages += 1;
        let seq = self.messages;
        if let Some(s) = self.sessions.last_mut()
            && s.first_message_ns == 0
        {
            s.first_message_ns = now;
        }
        if msg.reset {
            self.map.clear();
            self.in_snapshot = true;
        }
        let mut c = Counters { messages: 1, malformed: u64::from(msg.malformed), ..Counters::default() };
        for b in &msg.upserts {
            c.upserts += 1;
            let new = Held { fe: b.fe, mac: b.mac, move_seq: b.move_seq, revision: b.revision, message: seq };
            match self.map.get_mut(&b.ip) {
                Some(held) if held.revision >= b.revision => {
                    if held.message != seq && !self.in_snapshot {
                        c.redundant += 1;
                    }
                }
                Some(held) => *held = new,
                None => {
                    self.map.insert(b.ip, new);
                }
            }
        }
        for r in &msg.removals {
            c.removals += 1;
            if self.map.get(&r.ip).is_some_and(|held| held.revision < r.revision) {
                self.map.remove(&r.ip);
            }
        }
        match SyncPhase::try_from(msg.phase) {
            Ok(SyncPhase::Snapshot) => self.in_snapshot = true,
            Ok(SyncPhase::SnapshotEnd) => {
                self.in_snapshot = false;
                self.synced = true;
                c.snapshots = 1;
                if let Some(s) = self.sessions.last_mut() {
                    s.snapshot = true;
                }
                self.revision = msg.revision;
            }
            _ if !self.in_snapshot => self.revision = self.revision.max(msg.revision),
            _ => {}
        }
        self.total += c;
        self.window += c;
    }
}

/// A running simulated agent.
pub struct SimAgent {
    /// FE id.
    pub id: String,
    /// FE number (its underlay address is [`underlay`]`(index)`).
    pub index: usize,
    /// Controller endpoints, in order of preference.
    pub endpoints: Vec<SocketAddr>,
    state: Arc<Mutex<AgentState>>,
    task: JoinHandle<()>,
}

impl SimAgent {
    /// Starts FE `id` (number `index`) on `endpoints`.
    pub fn start(id: String, index: usize, endpoints: Vec<SocketAddr>, policy: LinkPolicy) -> SimAgent {
        let state = Arc::new(Mutex::new(AgentState::default()));
        let link = Link {
            register: RegisterRequest {
                fe_id: id.clone(),
                underlay_addr: underlay(index).to_string(),
                site: format!("site-{}", index % 4),
                mobile_prefixes: vec![],
                agent_version: "victor-faults".into(),
            },
            endpoints: endpoints.clone(),
            policy,
            state: state.clone(),
        };
        let task = tokio::spawn(link.run());
        SimAgent { id, index, endpoints, state, task }
    }

    /// The agent's state (do not hold the guard across an await).
    pub fn state(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().expect("agent state lock")
    }

    /// The revision the agent is complete up to (0 before its first snapshot).
    pub fn revision(&self) -> u64 {
        self.state().resume_revision()
    }

    /// Kills the agent (its connection drops mid-stream) and returns its final state.
    pub fn kill(self) -> AgentState {
        self.task.abort();
        std::mem::take(&mut *self.state())
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Link {
    register: RegisterRequest,
    endpoints: Vec<SocketAddr>,
    policy: LinkPolicy,
    state: Arc<Mutex<AgentState>>,
}

impl Link {
    fn state(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().expect("agent state lock")
    }

    async fn run(self) {
        let n = self.endpoints.len();
        let (mut index, mut failures, mut registered) = (0usize, 0usize, false);
        let mut heartbeat_every = Duration::from_secs(1);
        let mut backoff = Duration::from_millis(100);
        loop {
            let endpoint = index % n;
            let started = Instant::now();
            let reason = self.session(endpoint, &mut registered, &mut heartbeat_every).await;
            {
                let mut st = self.state();
                match st.connected.take() {
                    Some(_) => {
                        if let Some(s) = st.sessions.last_mut() {
                            s.ended_ns = monotonic_ns();
                            s.end = reason;
                        }
                    }
                    None => st.failed_attempts += 1,
                }
            }
            if started.elapsed() >= HEALTHY_SESSION {
                failures = 0;
                backoff = Duration::from_millis(100);
            } else {
                failures += 1;
            }
            index += 1;
            if failures >= n && failures.is_multiple_of(n) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// Runs one session until it breaks; returns why.
    async fn session(&self, endpoint: usize, registered: &mut bool, heartbeat_every: &mut Duration) -> String {
        let policy = self.policy;
        let addr = self.endpoints[endpoint];
        let builder = Endpoint::from(
            tonic::codegen::http::Uri::try_from(format!("http://{addr}")).expect("a socket address is a valid URI"),
        )
        .connect_timeout(policy.connect_timeout)
        .http2_keep_alive_interval(Duration::from_millis(500))
        .keep_alive_timeout(policy.stream_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
        let connecting = builder.connect();
        let channel = match tokio::time::timeout(policy.connect_timeout * 2, connecting).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return format!("connect {addr}: {e}"),
            Err(_) => return format!("connect {addr}: no HTTP/2 handshake in time"),
        };
        let mut client = AgentServiceClient::new(channel.clone());
        let fe_id = self.register.fe_id.clone();
        let need_register = match *registered {
            false => true,
            true => match heartbeat(&mut client, &fe_id).await {
                Ok(beat) => beat == Beat::NotRegistered,
                Err(e) => {
                    self.state().heartbeat_failures += 1;
                    return e;
                }
            },
        };
        if need_register {
            match self.do_register(&mut client).await {
                Ok(every) => {
                    *heartbeat_every = every;
                    *registered = true;
                }
                Err(e) => return e,
            }
        }
        let from_revision = self.state().resume_revision();
        let mut stream =
            match tokio::time::timeout(policy.stream_timeout, open_sync(channel, &fe_id, from_revision)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return e,
                Err(_) => return "Sync did not answer in time".into(),
            };
        {
            let mut st = self.state();
            st.connected = Some(endpoint);
            st.sessions.push(SessionLog {
                endpoint,
                from_revision,
                opened_ns: monotonic_ns(),
                first_message_ns: 0,
                snapshot: false,
                ended_ns: 0,
                end: String::new(),
            });
        }
        let (beats_tx, mut beats) = mpsc::channel(1);
        let beating = tokio::spawn(heartbeats(client.clone(), fe_id, *heartbeat_every, beats_tx));
        let _abort = AbortOnDrop(beating);
        let mut deadline = Instant::now() + policy.stream_timeout;
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(msg)) => {
                        deadline = Instant::now() + policy.stream_timeout;
                        self.state().apply(&msg, monotonic_ns());
                    }
                    Ok(None) => return "stream closed by the controller".into(),
                    Err(status) => return format!("stream: {} {}", status.code(), status.message()),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return format!("stream silent for {:?}", policy.stream_timeout);
                }
                beat = beats.recv() => match beat {
                    Some(Ok(Beat::Alive)) => {}
                    Some(Ok(Beat::NotRegistered)) => match self.do_register(&mut client).await {
                        Ok(every) => *heartbeat_every = every,
                        Err(e) => return e,
                    },
                    Some(Err(e)) => {
                        self.state().heartbeat_failures += 1;
                        if policy.heartbeat_failure_ends_session {
                            return e;
                        }
                    }
                    None => return "heartbeat task ended".into(),
                },
            }
        }
    }

    async fn do_register(&self, client: &mut AgentServiceClient<Channel>) -> Result<Duration, String> {
        let mut request = tonic::Request::new(self.register.clone());
        request.set_timeout(RPC_TIMEOUT);
        let r =
            client.register(request).await.map_err(|s| format!("Register: {} {}", s.code(), s.message()))?.into_inner();
        self.state().registrations += 1;
        Ok(Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(100))))
    }
}

async fn open_sync(
    channel: Channel,
    fe_id: &str,
    from_revision: u64,
) -> Result<tonic::Streaming<LeanSyncUpdate>, String> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(256 << 20);
    grpc.ready().await.map_err(|e| format!("channel not ready: {e}"))?;
    let codec = tonic_prost::ProstCodec::<SyncRequest, LeanSyncUpdate>::default();
    let path = PathAndQuery::from_static("/victor.v1.AgentService/Sync");
    let request = tonic::Request::new(SyncRequest { fe_id: fe_id.to_owned(), from_revision });
    grpc.server_streaming(request, path, codec)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("Sync: {} {}", s.code(), s.message()))
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::wire::{LeanBinding, LeanRemoval, fe_key};

    fn up(ip: u32, fe: &str, revision: u64) -> LeanBinding {
        LeanBinding { ip, fe: fe_key(fe.as_bytes()), revision, ..Default::default() }
    }

    fn msg(phase: SyncPhase, revision: u64, upserts: Vec<LeanBinding>) -> LeanSyncUpdate {
        LeanSyncUpdate { phase: phase as i32, revision, upserts, ..Default::default() }
    }

    #[test]
    fn counts_resends_and_removals_but_not_snapshots() {
        let mut st = AgentState::default();
        st.sessions.push(SessionLog {
            endpoint: 0,
            from_revision: 0,
            opened_ns: 1,
            first_message_ns: 0,
            snapshot: false,
            ended_ns: 0,
            end: String::new(),
        });
        let mut first = msg(SyncPhase::Snapshot, 10, vec![up(1, "a", 5), up(2, "a", 6)]);
        first.reset = true;
        st.apply(&first, 100);
        assert_eq!(st.resume_revision(), 0, "no resume point inside a snapshot");
        st.apply(&msg(SyncPhase::SnapshotEnd, 10, vec![up(3, "b", 7)]), 101);
        assert_eq!((st.resume_revision(), st.total.snapshots, st.total.redundant), (10, 1, 0));
        assert_eq!(st.sessions[0].first_message_ns, 100);
        assert!(st.sessions[0].snapshot);

        st.mark();
        // A real move, a re-send of what is held, and two entries of one key in one message.
        st.apply(&msg(SyncPhase::Delta, 12, vec![up(1, "b", 11), up(2, "a", 6), up(3, "a", 12), up(3, "b", 7)]), 102);
        assert_eq!(st.window.redundant, 1, "only the re-send of 10.0.0.2 counts");
        assert_eq!(st.map[&1].fe, fe_key(b"b"));
        assert_eq!(st.map[&3].revision, 12);
        let removal = LeanSyncUpdate {
            phase: SyncPhase::Delta as i32,
            revision: 13,
            removals: vec![LeanRemoval { ip: 2, revision: 13 }],
            ..Default::default()
        };
        st.apply(&removal, 103);
        assert_eq!((st.window.removals, st.map.len(), st.resume_revision()), (1, 2, 13));
        assert_eq!(st.total.messages, 4);
    }
}
