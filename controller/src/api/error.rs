//! API errors and their gRPC status codes, and how the registry's and the store's errors become
//! them. Every message says what the caller should fix.

use tonic::{Code, Status};
use victor_store::StoreError;

use crate::registry::{RegistryError, Rejection};
use crate::wire;

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
    /// A limit of this replica refuses the request (the message names the limit).
    #[error("{0}")]
    ResourceExhausted(String),
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
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Rejected(r) => wire::status_code(r.refusal),
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

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Rejected(r) => ApiError::Rejected(r),
            RegistryError::Store(err) => err.into(),
            RegistryError::StoreUnreachable
            | RegistryError::BindingContended(_)
            | RegistryError::DeclarationContended(_)
            | RegistryError::FeContended(_) => ApiError::Unavailable(err.to_string()),
            RegistryError::Corrupt { .. } => ApiError::Internal(err.to_string()),
        }
    }
}

impl From<RegistryError> for Status {
    fn from(err: RegistryError) -> Self {
        ApiError::from(err).into()
    }
}

/// Longest status message sent. Messages quote offending values only in short form
/// (`validate::quoted`); this is the backstop that keeps any message well inside a client's
/// header limit.
pub const MAX_MESSAGE_BYTES: usize = 1024;

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let mut message = err.to_string();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        Status::new(err.code(), message)
    }
}

/// Result alias of the API layer.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::registry::{Reason, Refusal};

    #[test]
    fn registry_errors_keep_their_status_codes_and_messages() {
        let ip: IpAddr = "10.10.0.11".parse().unwrap();
        let rejected = |refusal| RegistryError::Rejected(Rejection::new(Reason::Stale, refusal, "why"));
        let cases = [
            (
                RegistryError::StoreUnreachable,
                Code::Unavailable,
                "the store is unreachable from this controller replica (its health probe fails); nothing was \
                 written, retry later",
            ),
            (
                RegistryError::BindingContended(ip),
                Code::Unavailable,
                "binding of 10.10.0.11 is changing too fast (gave up after 16 compare-and-swap conflicts); retry",
            ),
            (RegistryError::DeclarationContended(ip), Code::Unavailable, "VM 10.10.0.11 is changing too fast; retry"),
            (
                RegistryError::Corrupt { what: "binding".into(), detail: "bad wire type".into() },
                Code::Internal,
                "internal error: stored binding is corrupt: bad wire type",
            ),
            (
                RegistryError::Store(StoreError::Unavailable("connection refused".into())),
                Code::Unavailable,
                "the store is unavailable (connection refused); nothing was written, retry later",
            ),
            (rejected(Refusal::Invalid), Code::InvalidArgument, "why"),
            (rejected(Refusal::Absent), Code::NotFound, "why"),
            (rejected(Refusal::Precondition), Code::FailedPrecondition, "why"),
            (rejected(Refusal::Forbidden), Code::PermissionDenied, "why"),
        ];
        for (err, code, message) in cases {
            let status = Status::from(err);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
