//! Why a registry operation did not complete. A refusal by the binding rules is
//! [`RegistryError::Rejected`]; every other variant is a failure of this replica or its store,
//! and says whether anything may have been written.

use std::net::IpAddr;

use victor_store::StoreError;

use super::rejection::Rejection;

/// Compare-and-swap attempts before a request on a hot key gives up.
pub const MAX_ATTEMPTS: usize = 16;

/// The error of a registry operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The binding rules refused the request; nothing was written.
    #[error("{}", .0.message)]
    Rejected(Rejection),
    /// The replica's store health probe fails: the write was not sent, so nothing was written.
    #[error(
        "the store is unreachable from this controller replica (its health probe fails); nothing was written, \
         retry later"
    )]
    StoreUnreachable,
    /// A store request failed (its variant says whether the outcome is known).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The binding changed under every one of [`MAX_ATTEMPTS`] compare-and-swap attempts.
    #[error("binding of {0} is changing too fast (gave up after {MAX_ATTEMPTS} compare-and-swap conflicts); retry")]
    BindingContended(IpAddr),
    /// The VM's binding or declaration changed under every attempt to declare it.
    #[error("VM {0} is changing too fast; retry")]
    DeclarationContended(IpAddr),
    /// The FE's registration or session changed under every attempt to remove it.
    #[error("FE {0} registered again or changed under every attempt to remove it; check ListFes and retry")]
    FeContended(String),
    /// A stored value does not decode (a bug or a foreign writer).
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt {
        /// What was read ("binding", "VM declaration", "FE fe1").
        what: String,
        /// Why it does not decode.
        detail: String,
    },
}

/// Result of a registry operation.
pub type RegistryResult<T> = Result<T, RegistryError>;
