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
}

impl<S: Store> ApiContext<S> {
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
