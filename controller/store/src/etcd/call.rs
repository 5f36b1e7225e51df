//! Deadlines, retries and error mapping for etcd calls.
//!
//! Every call gets one deadline (`request_timeout`) for all its attempts. Within it, an attempt
//! that failed without reaching etcd (connection refused, no leader, proposal dropped — a killed
//! member or an election in progress) is retried with a short backoff; the client's balancer
//! then sends it to another member. An attempt whose outcome is unknown (connection lost after
//! sending) is retried only for idempotent calls; a transaction fails with `OutcomeUnknown`
//! (the caller must re-read, because it may have been applied), never with `Unavailable`, which
//! promises that nothing was written.

use std::error::Error as _;
use std::future::Future;
use std::time::Duration;

use etcd_client as ec;
use tokio::time::Instant;

use crate::StoreError;

/// Whether a call may be repeated after an attempt with unknown outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Idempotent {
    /// Reads, keep-alives, revokes, compactions: repeating is harmless.
    Yes,
    /// Transactions: repeating could apply them twice.
    No,
}

/// How an attempt failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// Surely not applied (not sent, or refused before the proposal); retry.
    NotApplied(String),
    /// Maybe applied (connection lost or timed out after sending).
    Unknown(String),
    /// etcd answered with an error.
    Refused(StoreError),
}

/// Messages of etcd errors that guarantee the request was not applied.
const NOT_APPLIED: &[&str] =
    &["etcdserver: no leader", "raft proposal dropped", "etcdserver: not capable", "etcdserver: unhealthy cluster"];

/// Messages of etcd errors after which a write may or may not have been applied.
const MAYBE_APPLIED: &[&str] = &[
    "etcdserver: request timed out",
    "etcdserver: server stopped",
    "etcdserver: too many requests",
    // Returned to reads (which are retried anyway); a write may have been committed.
    "etcdserver: leader changed",
];

fn connect_failed(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    let m = status.message();
    m.contains("error trying to connect") || m.contains("tcp connect error")
}

/// Classifies an etcd-client error.
pub(super) fn classify(e: &ec::Error) -> Failure {
    match e {
        ec::Error::GRpcStatus(status) => {
            let msg = status.message();
            if connect_failed(status) || NOT_APPLIED.iter().any(|m| msg.contains(m)) {
                return Failure::NotApplied(msg.to_string());
            }
            if MAYBE_APPLIED.iter().any(|m| msg.contains(m)) {
                return Failure::Unknown(msg.to_string());
            }
            match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Aborted => Failure::Unknown(format!("{status}")),
                // A broken HTTP/2 connection surfaces as Unknown/Internal without an etcd message.
                tonic::Code::Unknown | tonic::Code::Internal if !msg.starts_with("etcdserver:") => {
                    Failure::Unknown(format!("{status}"))
                }
                _ => Failure::Refused(refusal(status)),
            }
        }
        ec::Error::TransportError(t) => Failure::NotApplied(t.to_string()),
        ec::Error::IoError(io) => Failure::Unknown(io.to_string()),
        // The keep-alive or watch stream broke (e.g. its member was killed).
        ec::Error::WatchError(m) | ec::Error::LeaseKeepAliveError(m) => {
            if m.contains("lease not found") {
                Failure::Refused(StoreError::LeaseNotFound(0))
            } else {
                Failure::Unknown(m.clone())
            }
        }
        ec::Error::InvalidArgs(m) | ec::Error::EndpointError(m) => {
            Failure::Refused(StoreError::InvalidArgument(m.clone()))
        }
        other => Failure::Refused(StoreError::Internal(format!("etcd client: {other}"))),
    }
}

/// Maps an error etcd answered with. `LeaseNotFound(0)`: the caller fills in the lease.
fn refusal(status: &tonic::Status) -> StoreError {
    let msg = status.message();
    if msg.contains("lease not found") {
        StoreError::LeaseNotFound(0)
    } else if msg.contains("required revision has been compacted") {
        StoreError::Compacted { requested: 0, compacted: 0 }
    } else if msg.contains("required revision is a future revision") {
        StoreError::FutureRevision { requested: 0, current: 0 }
    } else if msg.contains("too many operations in txn request") {
        StoreError::TooManyOps { ops: crate::MAX_TXN_OPS + 1, max: crate::MAX_TXN_OPS }
    } else if status.code() == tonic::Code::InvalidArgument {
        StoreError::InvalidArgument(format!("etcd: {msg}"))
    } else {
        StoreError::Internal(format!("etcd: {status}"))
    }
}

/// Where calls go and how long they may take.
#[derive(Debug, Clone)]
pub(super) struct CallPolicy {
    pub endpoints: String,
    pub timeout: Duration,
}

impl CallPolicy {
    pub(super) fn unavailable(&self, what: &str, detail: &str) -> StoreError {
        StoreError::Unavailable(format!("etcd at {}: {what}: {detail}", self.endpoints))
    }

    /// Runs `attempt` until it succeeds, fails for good, or the deadline passes.
    pub(super) async fn call<T, F, Fut>(
        &self,
        what: &str,
        idempotent: Idempotent,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ec::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(10);
        let mut last = String::from("no attempt made");
        let mut maybe_applied = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Err(_) => {
                    last = format!("no answer within {:?}", self.timeout);
                    maybe_applied = true;
                    break;
                }
                Ok(Err(e)) => match classify(&e) {
                    Failure::Refused(err) => return Err(err),
                    Failure::NotApplied(m) => last = m,
                    Failure::Unknown(m) => {
                        maybe_applied = true;
                        last = m;
                        if idempotent == Idempotent::No {
                            break;
                        }
                    }
                },
            }
            tracing::debug!("etcd {what} attempt failed, retrying: {last}");
            tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        if maybe_applied && idempotent == Idempotent::No {
            return Err(StoreError::OutcomeUnknown(format!("etcd at {}: {what}: {last}", self.endpoints)));
        }
        Err(self.unavailable(what, &last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, msg: &str) -> ec::Error {
        ec::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn classifies_etcd_errors() {
        assert!(matches!(classify(&status(tonic::Code::Unavailable, "etcdserver: no leader")), Failure::NotApplied(_)));
        assert!(matches!(classify(&status(tonic::Code::Unknown, "raft proposal dropped")), Failure::NotApplied(_)));
        assert!(matches!(
            classify(&status(tonic::Code::Unavailable, "etcdserver: request timed out")),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            classify(&status(tonic::Code::NotFound, "etcdserver: requested lease not found")),
            Failure::Refused(StoreError::LeaseNotFound(0))
        ));
        assert!(matches!(
            classify(&status(tonic::Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")),
            Failure::Refused(StoreError::Compacted { .. })
        ));
        assert!(matches!(
            classify(&status(tonic::Code::InvalidArgument, "etcdserver: duplicate key given in txn request")),
            Failure::Refused(StoreError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn retries_until_deadline_then_names_endpoints() {
        let policy = CallPolicy { endpoints: "http://127.0.0.1:1".into(), timeout: Duration::from_secs(1) };
        let mut attempts = 0;
        let r: Result<(), _> = policy
            .call("range", Idempotent::Yes, || {
                attempts += 1;
                async { Err(status(tonic::Code::Unavailable, "etcdserver: no leader")) }
            })
            .await;
        let err = r.unwrap_err();
        assert!(attempts > 3, "retried: {attempts}");
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("127.0.0.1:1") && m.contains("no leader")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn txn_with_unknown_outcome_is_not_repeated() {
        let policy = CallPolicy { endpoints: "e".into(), timeout: Duration::from_secs(1) };
        let mut attempts = 0;
        let r: Result<(), _> = policy
            .call("txn", Idempotent::No, || {
                attempts += 1;
                async { Err(status(tonic::Code::Unavailable, "etcdserver: request timed out")) }
            })
            .await;
        assert_eq!(attempts, 1);
        assert!(matches!(r, Err(StoreError::OutcomeUnknown(m)) if m.contains("timed out")));
    }
}
