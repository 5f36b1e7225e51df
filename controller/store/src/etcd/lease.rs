//! One-shot lease keep-alives over etcd's bidirectional `LeaseKeepAlive` stream.
//!
//! etcd-client only offers a stream (a `LeaseKeeper` to send, a response stream to read) and
//! swallows the first response's TTL. We drive it ourselves: one stream per lease, opened on the
//! first keep-alive and reused, one request → one response. A stream is taken out of its slot
//! while in use, so a call abandoned half-way (deadline) drops it instead of leaving an unread
//! response behind; the next call opens a fresh one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use etcd_client as ec;

use crate::LeaseId;

type Stream = (ec::LeaseKeeper, ec::LeaseKeepAliveStream);
type Slot = Arc<tokio::sync::Mutex<Option<Stream>>>;

/// Open keep-alive streams by lease.
#[derive(Default)]
pub(super) struct KeepAlives {
    slots: Mutex<HashMap<LeaseId, Slot>>,
}

fn not_found() -> ec::Error {
    ec::Error::LeaseKeepAliveError("lease not found".into())
}

/// Sends one keep-alive and reads its answer: the lease's TTL in seconds.
async fn round(stream: &mut Stream) -> Result<i64, ec::Error> {
    stream.0.keep_alive().await?;
    match stream.1.message().await? {
        Some(resp) if resp.ttl() > 0 => Ok(resp.ttl()),
        Some(_) => Err(not_found()),
        None => Err(ec::Error::LeaseKeepAliveError("keep-alive stream closed by etcd".into())),
    }
}

impl KeepAlives {
    fn slot(&self, lease: LeaseId) -> Slot {
        self.slots.lock().expect("keep-alive slots poisoned").entry(lease).or_default().clone()
    }

    /// Forgets a lease's stream (revoked or expired).
    pub(super) fn forget(&self, lease: LeaseId) {
        self.slots.lock().expect("keep-alive slots poisoned").remove(&lease);
    }

    /// Refreshes `lease`; returns its TTL in seconds.
    pub(super) async fn keep_alive(&self, client: &ec::Client, lease: LeaseId) -> Result<i64, ec::Error> {
        let slot = self.slot(lease);
        let mut guard = slot.lock().await;
        let result = match guard.take() {
            Some(mut stream) => match round(&mut stream).await {
                Ok(ttl) => Ok((ttl, stream)),
                // The stream broke (member killed?): open a new one below.
                Err(e) if !is_not_found(&e) => Self::open(client, lease).await,
                Err(e) => Err(e),
            },
            None => Self::open(client, lease).await,
        };
        match result {
            Ok((ttl, stream)) => {
                *guard = Some(stream);
                Ok(ttl)
            }
            Err(e) => {
                drop(guard);
                if is_not_found(&e) {
                    self.forget(lease);
                }
                Err(e)
            }
        }
    }

    /// Opens a stream (its first round happens inside etcd-client and loses the TTL, so one
    /// more round tells it).
    async fn open(client: &ec::Client, lease: LeaseId) -> Result<(i64, Stream), ec::Error> {
        let mut stream = client.lease_client().keep_alive(lease).await?;
        let ttl = round(&mut stream).await?;
        Ok((ttl, stream))
    }
}

fn is_not_found(e: &ec::Error) -> bool {
    matches!(e, ec::Error::LeaseKeepAliveError(m) if m.contains("not found"))
        || matches!(e, ec::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}
