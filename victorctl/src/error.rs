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
    /// An address answered HTTP without gRPC (exit 1): most likely a daemon's HTTP admin port.
    #[error(
        "{}: {} — {address} answers HTTP but not gRPC: it is probably an HTTP admin port (/healthz, \
         /metrics, the status page; 8080 by default). The controller's gRPC API listens on its \
         --grpc-listen address, port {DEFAULT_GRPC_PORT} by default: --controller HOST:{DEFAULT_GRPC_PORT}",
        code_name(.status.code()),
        .status.message()
    )]
    NotGrpc {
        /// The `--controller` address that answered.
        address: String,
        /// What tonic made of the HTTP answer.
        status: Status,
    },
    /// No controller could be reached (exit 1).
    #[error("no controller answered: {0}")]
    Unreachable(String),
    /// Writing the output failed (exit 1; a closed pipe is not reported, see
    /// [`CtlError::is_closed_output`]).
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// The controller's default gRPC port (`--grpc-listen 127.0.0.1:50051`).
pub const DEFAULT_GRPC_PORT: u16 = 50051;

impl CtlError {
    /// The process exit status.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            CtlError::Rpc(_) | CtlError::NotGrpc { .. } | CtlError::Unreachable(_) | CtlError::Output(_) => 1,
        }
    }

    /// The reader of our output went away (`victorctl ... | head`): it has what it wanted, so
    /// victorctl stops quietly with status 0, as a pipeline expects.
    pub fn is_closed_output(&self) -> bool {
        matches!(self, CtlError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// Classifies a call's error status: an HTTP answer without gRPC becomes [`CtlError::NotGrpc`].
    pub fn from_status(address: &str, status: Status) -> CtlError {
        // tonic's words when the HTTP/2 response carries no grpc-status: a plain HTTP server.
        if status.code() == Code::Unimplemented && status.message().contains("grpc-status header missing") {
            CtlError::NotGrpc { address: address.to_owned(), status }
        } else {
            CtlError::Rpc(status)
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
