//! One controller session on a connected channel: register (unless a heartbeat shows the
//! registration is still alive), open the `Sync` stream from the sink's resume revision, then
//! forward every message to the sink while heartbeats run beside it — until the stream breaks or
//! goes silent, a heartbeat fails, the sink asks for a resync, or the sink stops.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use victor_daemon::task::AbortOnDrop;
use victor_proto::v1::SyncRequest;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::agent_service_server::SERVICE_NAME;

use super::heartbeat::{Beat, heartbeat, heartbeats};
use super::{LinkConfig, LinkControl, RPC_TIMEOUT, Session, StreamOpened, SyncSink};

/// How a session ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// The sink stopped the link.
    Stopped,
    /// The session broke before its stream opened.
    BeforeStream(String),
    /// The session broke after its stream opened.
    Stream(String),
}

/// One session.
pub(super) struct SessionRun<'a, S> {
    pub(super) config: &'a LinkConfig,
    pub(super) control: &'a LinkControl,
    pub(super) sink: &'a mut S,
    pub(super) channel: Channel,
    pub(super) generation: u64,
    pub(super) endpoint: usize,
}

impl<S: SyncSink> SessionRun<'_, S> {
    /// Runs the session until it ends.
    pub(super) async fn run(mut self, registered: &mut bool, heartbeat_every: &mut Duration) -> Ended {
        let mut client = AgentServiceClient::new(self.channel.clone());
        let (stream, from_revision) = match self.open(&mut client, registered, heartbeat_every).await {
            Ok(opened) => opened,
            Err(reason) => return Ended::BeforeStream(reason),
        };
        tracing::info!(generation = self.generation, from_revision, "controller stream open");
        let _ = self.control.session.send(Some(Session { channel: self.channel.clone(), generation: self.generation }));
        let opened = StreamOpened { generation: self.generation, endpoint: self.endpoint, from_revision };
        if self.sink.opened(opened).await.is_break() {
            return Ended::Stopped;
        }
        match self.follow(stream, client, heartbeat_every).await {
            Ok(()) => Ended::Stopped,
            Err(reason) => Ended::Stream(reason),
        }
    }

    /// Registers if needed and opens the stream; returns it with the revision it resumes from.
    async fn open(
        &mut self,
        client: &mut AgentServiceClient<Channel>,
        registered: &mut bool,
        heartbeat_every: &mut Duration,
    ) -> Result<(tonic::Streaming<S::Message>, u64), String> {
        let fe_id = &self.config.register.fe_id;
        let expired = match *registered {
            false => true,
            true => match heartbeat(client, fe_id).await {
                Ok(beat) => beat == Beat::NotRegistered,
                Err(reason) => {
                    self.sink.heartbeat_failed(&reason);
                    return Err(reason);
                }
            },
        };
        if expired {
            *heartbeat_every = self.register(client).await?;
            *registered = true;
        }
        let from_revision = self.sink.resume_from();
        let request = SyncRequest { fe_id: fe_id.clone(), from_revision };
        let stream = tokio::time::timeout(self.config.stream_timeout, self.sync(request))
            .await
            .map_err(|_| "Sync did not answer in time".to_string())??;
        Ok((stream, from_revision))
    }

    /// `AgentService.Sync`, decoding the stream as the sink's message type.
    async fn sync(&self, request: SyncRequest) -> Result<tonic::Streaming<S::Message>, String> {
        let mut grpc =
            tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(self.config.max_message_bytes);
        grpc.ready().await.map_err(|e| format!("Sync: channel not ready: {e}"))?;
        let path = PathAndQuery::try_from(format!("/{SERVICE_NAME}/Sync")).expect("a valid gRPC path");
        let codec = tonic_prost::ProstCodec::<SyncRequest, S::Message>::default();
        let mut request = tonic::Request::new(request);
        // The stream lives as long as the session: no deadline.
        request.set_timeout(Duration::from_secs(365 * 24 * 3600));
        grpc.server_streaming(request, path, codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("Sync: {} {}", s.code(), s.message()))
    }

    /// Forwards the stream to the sink until the session breaks (Err) or the sink stops (Ok).
    async fn follow(
        &mut self,
        mut stream: tonic::Streaming<S::Message>,
        mut client: AgentServiceClient<Channel>,
        heartbeat_every: &mut Duration,
    ) -> Result<(), String> {
        let (beats_tx, mut beats) = mpsc::channel(1);
        let fe_id = self.config.register.fe_id.clone();
        let _heartbeats = AbortOnDrop::spawn(heartbeats(client.clone(), fe_id, *heartbeat_every, beats_tx));
        let stream_timeout = self.config.stream_timeout;
        let mut deadline = tokio::time::Instant::now() + stream_timeout;
        loop {
            tokio::select! {
                message = stream.message() => {
                    let message = match message {
                        Err(status) => return Err(format!("stream: {} {}", status.code(), status.message())),
                        Ok(None) => return Err("stream closed by the controller".into()),
                        Ok(Some(message)) => message,
                    };
                    deadline = tokio::time::Instant::now() + stream_timeout;
                    if self.sink.message(message).await.is_break() {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("stream silent for {stream_timeout:?}"));
                }
                beat = beats.recv() => match beat {
                    Some(Ok(Beat::Alive)) => {}
                    Some(Ok(Beat::NotRegistered)) => *heartbeat_every = self.register(&mut client).await?,
                    Some(Err(reason)) => {
                        self.sink.heartbeat_failed(&reason);
                        if self.config.heartbeat_failure_ends_session {
                            return Err(reason);
                        }
                    }
                    None => return Err("heartbeat task ended".into()),
                },
                _ = self.control.reregister.notified() => {
                    *heartbeat_every = self.register(&mut client).await?;
                }
                _ = self.control.resync.notified() => {
                    return Err("the agent asked for a full resync".into());
                }
            }
        }
    }

    /// Registers; returns the heartbeat interval the controller asks for.
    async fn register(&mut self, client: &mut AgentServiceClient<Channel>) -> Result<Duration, String> {
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
        self.sink.registered();
        let every = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(100)));
        tracing::info!(replica = %r.replica_id, revision = r.revision, heartbeat = ?every, "registered");
        Ok(every)
    }
}
