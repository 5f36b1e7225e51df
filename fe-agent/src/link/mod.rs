//! The agent's link to the controller cluster. One task owns it ([`run`]): it connects to one
//! endpoint of `--controller` at a time (connect timeout, HTTP/2 keepalive), registers (again when
//! the session expired), heartbeats at the interval the controller asks for, and runs the `Sync`
//! stream from the revision its consumer last applied completely — a full snapshot only when the
//! controller decides to send one. A stream silent for `--stream-timeout` (the controller sends a
//! heartbeat every second), a failed heartbeat or a broken connection ends the session; the next
//! endpoint is tried at once, and only after every endpoint failed in a row is there a backoff.
//! While no session is up the agent is headless: the engine keeps forwarding and learning, the
//! [`reporter`] keeps its queue.
//!
//! The link is generic over what consumes the stream ([`SyncSink`]): the agent's engine through
//! [`feed::EngineFeed`], or the fault suite's simulated agents, which decode the same bytes with a
//! leaner message type and record every session.
//!
//! * [`connector`] — how connections are opened (optionally from another network namespace);
//! * [`heartbeat`] — the `Heartbeat` calls of a session;
//! * `session` — one session: register, heartbeats, the stream;
//! * [`feed`] — what the agent's engine receives from the link;
//! * [`reporter`] — observed VMs to the controller (`Report`), on whichever session is current.

pub mod connector;
pub mod feed;
pub mod heartbeat;
pub mod reporter;
mod session;

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tonic::transport::{Channel, Endpoint};
use victor_daemon::Backoff;
use victor_proto::v1::RegisterRequest;

use connector::Connector;
use session::{Ended, SessionRun};

/// Deadline of Register and Heartbeat calls.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// A session that lived this long resets the failure count (no backoff for the next failover).
const HEALTHY_SESSION: Duration = Duration::from_secs(5);
/// Largest stream message the agent accepts (gRPC's default; the controller splits snapshots).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// A live controller session, as the reporter uses it.
#[derive(Debug, Clone)]
pub struct Session {
    /// The channel.
    pub channel: Channel,
    /// Increases with every new session.
    pub generation: u64,
}

/// What the link shares with the tasks around it.
#[derive(Debug)]
pub struct LinkControl {
    /// Asks for a fresh stream (the consumer could not apply a message).
    pub resync: Notify,
    /// Someone saw "not registered": register again on the current session.
    pub reregister: Arc<Notify>,
    /// The current session (None while headless), for the reporter.
    pub session: watch::Sender<Option<Session>>,
}

impl Default for LinkControl {
    fn default() -> Self {
        LinkControl { resync: Notify::new(), reregister: Arc::new(Notify::new()), session: watch::channel(None).0 }
    }
}

/// How the link runs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Controller endpoints (TLS applied), in order of preference.
    pub endpoints: Vec<Endpoint>,
    /// Connect timeout (the HTTP/2 handshake gets twice as long).
    pub connect_timeout: Duration,
    /// A silent stream is dead after this long.
    pub stream_timeout: Duration,
    /// A failed Heartbeat call ends the session (the agent's behaviour). When false the session
    /// keeps its stream while heartbeats fail (the fault suite uses this to watch what a replica
    /// whose store link is cut sends meanwhile).
    pub heartbeat_failure_ends_session: bool,
    /// Largest stream message accepted.
    pub max_message_bytes: usize,
    /// The registration (fe_id, underlay, site, prefixes, version).
    pub register: RegisterRequest,
}

/// A stream that just opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOpened {
    /// Session generation: 1 is the first since the link started.
    pub generation: u64,
    /// Index of the endpoint in [`LinkConfig::endpoints`].
    pub endpoint: usize,
    /// The revision the stream resumes from (0 = full snapshot).
    pub from_revision: u64,
}

/// A session attempt that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// Index of the endpoint in [`LinkConfig::endpoints`].
    pub endpoint: usize,
    /// Its stream had opened ([`SyncSink::opened`] was called for it).
    pub stream_opened: bool,
    /// Why it ended.
    pub reason: String,
}

/// What consumes the link's stream and hears about its sessions. Every hook may stop the link by
/// returning `Break` (its consumer went away).
pub trait SyncSink: Send {
    /// The stream's message type: `victor_proto::v1::SyncUpdate`, or any message decoded from the
    /// same bytes.
    type Message: prost::Message + Default + Send + 'static;

    /// The revision to resume from (0 = a snapshot is needed); asked before each stream opens.
    fn resume_from(&mut self) -> u64;

    /// A stream opened.
    fn opened(&mut self, stream: StreamOpened) -> impl Future<Output = ControlFlow<()>> + Send;

    /// One stream message, just received.
    fn message(&mut self, message: Self::Message) -> impl Future<Output = ControlFlow<()>> + Send;

    /// A session attempt ended (also one that failed before its stream opened).
    fn ended(&mut self, end: &SessionEnd) -> impl Future<Output = ControlFlow<()>> + Send;

    /// The controller accepted a registration.
    fn registered(&mut self) {}

    /// A Heartbeat call failed.
    fn heartbeat_failed(&mut self, _reason: &str) {}
}

/// Runs the link until `sink` stops it.
pub async fn run<S: SyncSink>(config: LinkConfig, connector: Connector, control: Arc<LinkControl>, mut sink: S) {
    let n = config.endpoints.len();
    let mut index = 0usize;
    let mut failures = 0usize;
    let mut generation = 0u64;
    let mut registered = false;
    let mut heartbeat_every = Duration::from_secs(1);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let endpoint = index % n;
        let uri = config.endpoints[endpoint].uri().clone();
        let started = Instant::now();
        let ended = match connect(&config, &connector, config.endpoints[endpoint].clone()).await {
            Err(err) => Ended::BeforeStream(format!("connect: {err}")),
            Ok(channel) => {
                generation += 1;
                let session =
                    SessionRun { config: &config, control: &control, sink: &mut sink, channel, generation, endpoint };
                let ended = session.run(&mut registered, &mut heartbeat_every).await;
                let _ = control.session.send(None);
                ended
            }
        };
        let (reason, stream_opened) = match ended {
            Ended::Stopped => return,
            Ended::BeforeStream(reason) => (reason, false),
            Ended::Stream(reason) => (reason, true),
        };
        let end = SessionEnd { endpoint, stream_opened, reason };
        if sink.ended(&end).await.is_break() {
            return;
        }
        tracing::warn!(controller = %uri, reason = %end.reason, "controller session ended; failing over");
        if started.elapsed() >= HEALTHY_SESSION {
            failures = 0;
            backoff.reset();
        } else {
            failures += 1;
        }
        index += 1;
        if failures >= n && failures.is_multiple_of(n) {
            backoff.sleep().await;
        }
    }
}

async fn connect(config: &LinkConfig, connector: &Connector, endpoint: Endpoint) -> Result<Channel, String> {
    let endpoint = endpoint
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_millis(500))
        .keep_alive_timeout(config.stream_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connecting = endpoint.connect_with_connector(connector.clone());
    // The connect timeout covers TCP; a peer that accepts but never speaks HTTP/2 is cut here.
    match tokio::time::timeout(config.connect_timeout * 2, connecting).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no HTTP/2 handshake within {:?}", config.connect_timeout * 2)),
    }
}
