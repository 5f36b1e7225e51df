//! [`AnyStore`]: the backend chosen at runtime (etcd when endpoints are configured, else embedded).

use std::time::Duration;

use crate::embedded::EmbeddedStore;
use crate::etcd::EtcdStore;
use crate::{KeyRange, LeaseId, RangeRequest, RangeResult, Revision, Store, StoreResult, Txn, TxnResult, WatchStream};

/// Either backend behind one type, so the controller is not generic over its store.
#[derive(Clone)]
pub enum AnyStore {
    /// Replicated etcd cluster.
    Etcd(EtcdStore),
    /// Single-file embedded store.
    Embedded(EmbeddedStore),
}

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Etcd($store) => $call.await,
            AnyStore::Embedded($store) => $call.await,
        }
    };
}

impl Store for AnyStore {
    fn kind(&self) -> &'static str {
        match self {
            AnyStore::Etcd(s) => s.kind(),
            AnyStore::Embedded(s) => s.kind(),
        }
    }

    async fn range(&self, req: RangeRequest) -> StoreResult<RangeResult> {
        delegate!(self, s => s.range(req))
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResult> {
        delegate!(self, s => s.txn(txn))
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        delegate!(self, s => s.lease_grant(ttl))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        delegate!(self, s => s.lease_keep_alive(lease))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        delegate!(self, s => s.lease_revoke(lease))
    }

    async fn watch(&self, range: KeyRange, from_revision: Revision) -> StoreResult<WatchStream> {
        delegate!(self, s => s.watch(range, from_revision))
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        delegate!(self, s => s.compact(revision))
    }

    async fn current_revision(&self) -> StoreResult<Revision> {
        delegate!(self, s => s.current_revision())
    }
}
