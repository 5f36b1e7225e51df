//! What can go wrong, as one message and an exit status: 1 for the controller's refusals and for
//! unreachable controllers, 2 for bad usage and unreadable local files.

use tonic::{Code, Status};

/// A failed victorctl run.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad options or local files (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A controller answered with an error (exit 1).
    #[error("{}: {}{}", code_name(.0.code()), .0.message(), hint(.0))]
    Rpc(Status),
    /// No controller could be reached (exit 1).
    #[error("no controller answered: {0}")]
    Unreachable(String),
    /// Writing the output failed (exit 1), e.g. a closed pipe.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl CtlError {
    /// The process exit status.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            CtlError::Rpc(_) | CtlError::Unreachable(_) | CtlError::Output(_) => 1,
        }
    }
}

impl From<victor_proto::tls::TlsSetupError> for CtlError {
    fn from(e: victor_proto::tls::TlsSetupError) -> Self {
        CtlError::Usage(e.to_string())
    }
}

/// gRPC code names as in the protocol (NOT_FOUND, PERMISSION_DENIED, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn hint(status: &Status) -> &'static str {
    match status.code() {
        Code::Unauthenticated if status.message().contains("authorization") || status.message().contains("token") => {
            " (give a token with --token, --token-file or VICTOR_TOKEN)"
        }
        Code::Unauthenticated => " (check --cert-file/--key-file)",
        _ => "",
    }
}

/// An error and its sources, joined (tonic's transport errors say little at the top level).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
