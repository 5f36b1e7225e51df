//! etcd backend (etcd-client). PLACEHOLDER: being implemented.

use std::time::Duration;

use crate::{
    KeyRange, LeaseId, RangeRequest, RangeResult, Revision, Store, StoreError, StoreResult, Txn,
    TxnResult, WatchStream,
};

/// How to reach the etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// Deadline of connection establishment.
    pub connect_timeout: Duration,
}

/// etcd-backed store.
#[derive(Clone)]
pub struct EtcdStore {}

impl EtcdStore {
    /// Connects to the cluster.
    pub async fn connect(_config: EtcdConfig) -> StoreResult<Self> {
        Err(StoreError::Internal(
            "etcd store not implemented yet".into(),
        ))
    }
}

fn unimplemented_store<T>() -> StoreResult<T> {
    Err(StoreError::Internal(
        "etcd store not implemented yet".into(),
    ))
}

impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }
    async fn range(&self, _req: RangeRequest) -> StoreResult<RangeResult> {
        unimplemented_store()
    }
    async fn txn(&self, _txn: Txn) -> StoreResult<TxnResult> {
        unimplemented_store()
    }
    async fn lease_grant(&self, _ttl: Duration) -> StoreResult<LeaseId> {
        unimplemented_store()
    }
    async fn lease_keep_alive(&self, _lease: LeaseId) -> StoreResult<Duration> {
        unimplemented_store()
    }
    async fn lease_revoke(&self, _lease: LeaseId) -> StoreResult<()> {
        unimplemented_store()
    }
    async fn watch(&self, _range: KeyRange, _from: Revision) -> StoreResult<WatchStream> {
        unimplemented_store()
    }
    async fn compact(&self, _revision: Revision) -> StoreResult<()> {
        unimplemented_store()
    }
    async fn current_revision(&self) -> StoreResult<Revision> {
        unimplemented_store()
    }
}
