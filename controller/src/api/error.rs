//! API errors and their gRPC status codes. Every message says what the caller should fix.

use tonic::{Code, Status};
use victor_store::StoreError;

use crate::registry::rules::Rejection;

/// An error returned by a controller RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or names an address outside the mobile prefixes.
    #[error("{0}")]
    InvalidArgument(String),
    /// The VM, binding or FE does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The current state does not allow the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Identity or policy forbids the request.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller is not authenticated.
    #[error("{0}")]
    Unauthenticated(String),
    /// The store cannot be reached, or this replica is not ready (the message says whether
    /// nothing was written or the outcome of a write is unknown).
    #[error("{0}")]
    Unavailable(String),
    /// A binding rule refused the request.
    #[error("{}", .0.message)]
    Rejected(Rejection),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Rejected(r) => r.code,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(msg) => {
                ApiError::Unavailable(format!("the store is unavailable ({msg}); nothing was written, retry later"))
            }
            StoreError::OutcomeUnknown(_) => ApiError::Unavailable(format!(
                "{err}: read the binding or VM back (GetBinding) once the store answers, or send the same \
                 request again (it is idempotent)"
            )),
            StoreError::Compacted { .. } | StoreError::FutureRevision { .. } => {
                ApiError::FailedPrecondition(err.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// Result alias of the API layer.
pub type ApiResult<T> = Result<T, ApiError>;
