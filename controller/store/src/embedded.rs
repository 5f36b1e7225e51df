//! Embedded single-file store (redb). PLACEHOLDER: being implemented.

use std::path::Path;
use std::time::Duration;

use crate::{
    KeyRange, LeaseId, RangeRequest, RangeResult, Revision, Store, StoreError, StoreResult, Txn,
    TxnResult, WatchStream,
};

/// Options of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Keep at least this many revisions of history for watchers (older ones are compacted).
    pub history_revisions: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_revisions: 100_000,
        }
    }
}

/// Single-file store.
#[derive(Clone)]
pub struct EmbeddedStore {}

impl EmbeddedStore {
    /// Opens (or creates) the store file.
    pub async fn open(_path: &Path, _options: EmbeddedOptions) -> StoreResult<Self> {
        Err(StoreError::Internal(
            "embedded store not implemented yet".into(),
        ))
    }
}

fn unimplemented_store<T>() -> StoreResult<T> {
    Err(StoreError::Internal(
        "embedded store not implemented yet".into(),
    ))
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
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
