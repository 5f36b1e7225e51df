//! Simulated FE agents that live through faults: the fe-agent's own controller link
//! ([`victor_fe_agent::link`]: endpoint failover, registration, heartbeats, `Sync` resumed from the
//! last completely applied revision, backoff) without a data plane. Each agent is the link's
//! [`SyncSink`]:
//!
//! * the desired state is a compact map fed by the lean decoder of [`crate::bench::wire`] (the
//!   same bytes as `SyncUpdate`, without an allocation per entry: 200 agents share two cores with
//!   the controllers and etcd);
//! * everything a fault test asserts on is recorded: every session (endpoint, resume revision,
//!   open / first message / end times, whether it carried a snapshot), and the messages that
//!   would churn routes on a real FE — binding removals and upserts of a binding the agent
//!   already holds at that revision (a re-send) — in totals and in a window the test can reset
//!   ([`AgentState::mark`]).
//!
//! [`SimAgent::kill`] aborts the task: its connection drops mid-stream, like `kill -9` of the
//! agent; a restarted agent starts empty, from revision 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;
use victor_fe_agent::link::connector::Connector;
use victor_fe_agent::link::{self, LinkConfig, LinkControl, SessionEnd, StreamOpened, SyncSink};
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::{RegisterRequest, SyncPhase};

use crate::bench::agent::underlay;
use crate::bench::wire::LeanSyncUpdate;

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
        let config = LinkConfig {
            endpoints: endpoints
                .iter()
                .map(|addr| Endpoint::from_shared(format!("http://{addr}")).expect("a socket address is a valid URI"))
                .collect(),
            connect_timeout: policy.connect_timeout,
            stream_timeout: policy.stream_timeout,
            heartbeat_failure_ends_session: policy.heartbeat_failure_ends_session,
            // The agent's limit: the controller splits snapshots and deltas into bounded messages.
            max_message_bytes: link::DEFAULT_MAX_MESSAGE_BYTES,
            register: RegisterRequest {
                fe_id: id.clone(),
                underlay_addr: underlay(index).to_string(),
                site: format!("site-{}", index % 4),
                mobile_prefixes: vec![],
                agent_version: "victor-faults".into(),
            },
        };
        let sink = Recorder(state.clone());
        let task = tokio::spawn(link::run(config, Connector::default(), Arc::new(LinkControl::default()), sink));
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

/// The link's sink: applies each message to the shared state and records the sessions.
struct Recorder(Arc<Mutex<AgentState>>);

impl Recorder {
    fn state(&self) -> MutexGuard<'_, AgentState> {
        self.0.lock().expect("agent state lock")
    }
}

impl SyncSink for Recorder {
    type Message = LeanSyncUpdate;

    fn resume_from(&mut self) -> u64 {
        self.state().resume_revision()
    }

    async fn opened(&mut self, stream: StreamOpened) -> ControlFlow<()> {
        let mut st = self.state();
        st.connected = Some(stream.endpoint);
        st.sessions.push(SessionLog {
            endpoint: stream.endpoint,
            from_revision: stream.from_revision,
            opened_ns: monotonic_ns(),
            first_message_ns: 0,
            snapshot: false,
            ended_ns: 0,
            end: String::new(),
        });
        ControlFlow::Continue(())
    }

    async fn message(&mut self, message: LeanSyncUpdate) -> ControlFlow<()> {
        self.state().apply(&message, monotonic_ns());
        ControlFlow::Continue(())
    }

    async fn ended(&mut self, end: &SessionEnd) -> ControlFlow<()> {
        let mut st = self.state();
        if end.stream_opened {
            st.connected = None;
            if let Some(s) = st.sessions.last_mut() {
                s.ended_ns = monotonic_ns();
                s.end = end.reason.clone();
            }
        } else {
            st.failed_attempts += 1;
        }
        ControlFlow::Continue(())
    }

    fn registered(&mut self) {
        self.state().registrations += 1;
    }

    fn heartbeat_failed(&mut self, _reason: &str) {
        self.state().heartbeat_failures += 1;
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
