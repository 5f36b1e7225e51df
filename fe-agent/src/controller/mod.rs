//! The agent's link to the controller cluster. One task owns it: it connects to one endpoint of
//! `--controller` at a time (connect timeout, HTTP/2 keepalive), registers (again when the
//! session expired), heartbeats at the interval the controller asks for, and runs the `Sync`
//! stream from the revision the agent core last applied — a full snapshot only when the
//! controller decides to send one. A stream silent for `--stream-timeout` (the controller sends a
//! heartbeat every second), a failed heartbeat or a broken connection ends the session; the next
//! endpoint is tried at once, and only after every endpoint failed in a row is there a backoff.
//! While no session is up the agent is headless: the core keeps forwarding and learning, the
//! [`reporter`] keeps its queue.

pub mod connector;
pub mod heartbeat;
pub mod reporter;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tonic::transport::{Channel, Endpoint};
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::{RegisterRequest, SyncRequest, SyncUpdate};

use crate::metrics::Metrics;
use connector::Connector;
use heartbeat::{Beat, heartbeat, heartbeats};
use reporter::Backoff;

/// Deadline of Register and Heartbeat calls.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// A session that lived this long resets the failure count (no backoff for the next failover).
const HEALTHY_SESSION: Duration = Duration::from_secs(5);

/// A live controller session, as the reporter uses it.
#[derive(Debug, Clone)]
pub struct Session {
    /// The channel.
    pub channel: Channel,
    /// Increases with every new session.
    pub generation: u64,
}

/// What the link tells the agent core.
#[derive(Debug)]
pub enum LinkEvent {
    /// A stream message, with its receipt time.
    Sync {
        /// The message.
        update: Box<SyncUpdate>,
        /// CLOCK_MONOTONIC ns at receipt.
        received_mono: u64,
        /// Wall clock at receipt.
        received_wall: i64,
    },
    /// A session (and its stream) started; `generation` 1 is the first since the agent started.
    Connected {
        /// Session generation.
        generation: u64,
    },
    /// The stream ended: discard a partly received snapshot.
    StreamEnded,
}

/// State shared between the link, the reporter and the core.
#[derive(Debug)]
pub struct LinkShared {
    /// The revision the core has applied completely (resume point), 0 = snapshot needed.
    pub resume: AtomicU64,
    /// The core asks for a fresh stream (it could not apply a message).
    pub resync: Notify,
    /// Someone saw "not registered": register again on the current session.
    pub reregister: Arc<Notify>,
    /// The current session, for the reporter.
    pub session: watch::Sender<Option<Session>>,
}

impl Default for LinkShared {
    fn default() -> Self {
        LinkShared {
            resume: AtomicU64::new(0),
            resync: Notify::new(),
            reregister: Arc::new(Notify::new()),
            session: watch::channel(None).0,
        }
    }
}

/// How the link runs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Controller endpoints (TLS applied), in order of preference.
    pub endpoints: Vec<Endpoint>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// A silent stream is dead after this long.
    pub stream_timeout: Duration,
    /// The registration (fe_id, underlay, site, prefixes, version).
    pub register: RegisterRequest,
}

/// Runs the link until `events` closes.
pub async fn run(
    config: LinkConfig,
    connector: Connector,
    shared: Arc<LinkShared>,
    events: mpsc::Sender<LinkEvent>,
    metrics: Arc<Metrics>,
) {
    let n = config.endpoints.len();
    let mut index = 0usize;
    let mut failures = 0usize;
    let mut generation = 0u64;
    let mut registered = false;
    let mut heartbeat_every = Duration::from_secs(1);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let endpoint = config.endpoints[index % n].clone();
        let uri = endpoint.uri().clone();
        let started = Instant::now();
        let outcome = match connect(&config, &connector, endpoint).await {
            Err(err) => Err(format!("connect: {err}")),
            Ok(channel) => {
                generation += 1;
                let session = SessionRun {
                    config: &config,
                    shared: &shared,
                    events: &events,
                    metrics: &metrics,
                    channel,
                    generation,
                };
                let result = session.run(&mut registered, &mut heartbeat_every).await;
                let _ = shared.session.send(None);
                metrics.controller_connected.set(0);
                if events.send(LinkEvent::StreamEnded).await.is_err() {
                    return;
                }
                result
            }
        };
        let Err(reason) = outcome else { return };
        tracing::warn!(controller = %uri, %reason, "controller session ended; failing over");
        if started.elapsed() >= HEALTHY_SESSION {
            failures = 0;
            backoff.reset();
        } else {
            failures += 1;
        }
        index += 1;
        if failures >= n && failures.is_multiple_of(n) {
            tokio::time::sleep(backoff.next_delay()).await;
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

struct SessionRun<'a> {
    config: &'a LinkConfig,
    shared: &'a LinkShared,
    events: &'a mpsc::Sender<LinkEvent>,
    metrics: &'a Metrics,
    channel: Channel,
    generation: u64,
}

impl SessionRun<'_> {
    /// Runs one session until it breaks (Err with the reason) or the core goes away (Ok).
    async fn run(self, registered: &mut bool, heartbeat_every: &mut Duration) -> Result<(), String> {
        let mut client = AgentServiceClient::new(self.channel.clone());
        let fe_id = self.config.register.fe_id.clone();
        if !*registered || heartbeat(&mut client, &fe_id).await? == Beat::NotRegistered {
            *heartbeat_every = self.register(&mut client).await?;
            *registered = true;
        }
        let from_revision = self.shared.resume.load(Ordering::Acquire);
        let mut request = tonic::Request::new(SyncRequest { fe_id: fe_id.clone(), from_revision });
        request.set_timeout(Duration::from_secs(365 * 24 * 3600));
        let mut stream = tokio::time::timeout(self.config.stream_timeout, client.sync(request))
            .await
            .map_err(|_| "Sync did not answer in time".to_string())?
            .map_err(|s| format!("Sync: {} {}", s.code(), s.message()))?
            .into_inner();
        tracing::info!(generation = self.generation, from_revision, "controller stream open");
        self.metrics.controller_sessions.inc();
        self.metrics.controller_connected.set(1);
        let _ = self.shared.session.send(Some(Session { channel: self.channel.clone(), generation: self.generation }));
        if self.events.send(LinkEvent::Connected { generation: self.generation }).await.is_err() {
            return Ok(());
        }
        let (beats_tx, mut beats) = mpsc::channel(1);
        let _heartbeats = AbortOnDrop(tokio::spawn(heartbeats(client.clone(), fe_id, *heartbeat_every, beats_tx)));
        let mut deadline = tokio::time::Instant::now() + self.config.stream_timeout;
        loop {
            tokio::select! {
                message = stream.message() => {
                    let update = match message {
                        Err(status) => return Err(format!("stream: {} {}", status.code(), status.message())),
                        Ok(None) => return Err("stream closed by the controller".into()),
                        Ok(Some(update)) => update,
                    };
                    deadline = tokio::time::Instant::now() + self.config.stream_timeout;
                    let event = LinkEvent::Sync {
                        update: Box::new(update),
                        received_mono: monotonic_ns(),
                        received_wall: victor_proto::clock::unix_nanos(),
                    };
                    if self.events.send(event).await.is_err() {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("stream silent for {:?}", self.config.stream_timeout));
                }
                beat = beats.recv() => match beat {
                    Some(Ok(Beat::Alive)) => {}
                    Some(Ok(Beat::NotRegistered)) => *heartbeat_every = self.register(&mut client).await?,
                    Some(Err(reason)) => return Err(reason),
                    None => return Err("heartbeat task ended".into()),
                },
                _ = self.shared.reregister.notified() => {
                    *heartbeat_every = self.register(&mut client).await?;
                }
                _ = self.shared.resync.notified() => {
                    return Err("the agent asked for a full resync".into());
                }
            }
        }
    }

    async fn register(&self, client: &mut AgentServiceClient<Channel>) -> Result<Duration, String> {
        let mut request = tonic::Request::new(self.config.register.clone());
        request.set_timeout(RPC_TIMEOUT);
        let response = client.register(request).await.map_err(|s| match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied => {
                tracing::error!(code = ?s.code(), message = s.message(), "the controller refused the registration; check --fe-id, --underlay-addr, --site and --mobile-prefix");
                format!("Register refused: {}", s.message())
            }
            _ => format!("Register: {} {}", s.code(), s.message()),
        })?;
        let r = response.into_inner();
        self.metrics.registrations.inc();
        let every = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(100)));
        tracing::info!(replica = %r.replica_id, revision = r.revision, heartbeat = ?every, "registered");
        Ok(every)
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
