//! Session heartbeats: one `Heartbeat` call every interval the controller asked for, each outcome
//! reported to the session's owner — alive, not registered (the session expired: register
//! again), or failed (end the session and fail over).

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::transport::Channel;
use victor_proto::v1::HeartbeatRequest;
use victor_proto::v1::agent_service_client::AgentServiceClient;

use super::RPC_TIMEOUT;

/// The outcome of one heartbeat the controller answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The session is alive.
    Alive,
    /// The controller does not know the session (expired or never made): register again.
    NotRegistered,
}

/// Sends a heartbeat every `every` (the first after one interval) and reports each outcome
/// until `out` closes; `Err` describes a call that failed.
pub async fn heartbeats(
    mut client: AgentServiceClient<Channel>,
    fe_id: String,
    every: Duration,
    out: mpsc::Sender<Result<Beat, String>>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if out.send(heartbeat(&mut client, &fe_id).await).await.is_err() {
            return;
        }
    }
}

/// One heartbeat.
pub async fn heartbeat(client: &mut AgentServiceClient<Channel>, fe_id: &str) -> Result<Beat, String> {
    let mut request = tonic::Request::new(HeartbeatRequest { fe_id: fe_id.to_owned() });
    request.set_timeout(RPC_TIMEOUT);
    match client.heartbeat(request).await {
        Ok(_) => Ok(Beat::Alive),
        Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition) => {
            tracing::info!(message = s.message(), "session expired; registering again");
            Ok(Beat::NotRegistered)
        }
        Err(s) => Err(format!("Heartbeat: {} {}", s.code(), s.message())),
    }
}
