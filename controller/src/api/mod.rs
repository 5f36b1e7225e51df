//! The gRPC services: [`binding::BindingApi`] (orchestrators, operators) and
//! [`agent::AgentApi`] (fe-agents). A thin skin over the [`Replica`]: each method authenticates
//! the caller ([`auth`]), validates the request ([`validate`]), calls the registry or opens a
//! stream, and turns the answer into a wire message (`crate::wire`) or a status ([`error`]).
//! [`request_size`] refuses oversized requests for every service before they are decoded.

pub mod agent;
pub mod auth;
pub mod binding;
pub mod error;
pub mod request_size;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use victor_store::Store;

use crate::replica::Replica;
use crate::stream::admission::{Admission, StreamKind, StreamTicket};
use crate::stream::pacer::SnapshotPacer;
use error::{ApiError, ApiResult};
use validate::MobilePrefixes;

/// What both services serve from: the replica, and the settings of the API itself.
pub struct ApiContext<S: Store> {
    /// The replica (registry, cache, metrics, status).
    pub replica: Arc<Replica<S>>,
    /// Mobile prefixes.
    pub mobile: MobilePrefixes,
    /// Session TTL handed to agents.
    pub session_ttl: Duration,
    /// Most observations per Report.
    pub max_report_observations: usize,
    /// How callers are authenticated.
    pub auth: auth::Auth,
    /// How many streams a connection and this replica may have.
    pub admission: Arc<Admission>,
    /// The snapshot lane every stream of this replica shares.
    pub pacer: Arc<SnapshotPacer>,
}

impl<S: Store> ApiContext<S> {
    /// Admits a stream of `kind` for the caller of `request` (RESOURCE_EXHAUSTED over a limit).
    pub fn admit<T>(&self, kind: StreamKind, request: &tonic::Request<T>) -> ApiResult<StreamTicket> {
        self.admission
            .admit(kind, request.remote_addr())
            .map_err(|refused| ApiError::ResourceExhausted(refused.to_string()))
    }

    /// Fails with UNAVAILABLE until the cache has loaded.
    pub fn ready(&self) -> ApiResult<()> {
        if self.replica.cache.is_loaded() {
            Ok(())
        } else {
            Err(ApiError::Unavailable(
                "this controller replica is still loading its state from the store; retry in a moment".into(),
            ))
        }
    }
}
