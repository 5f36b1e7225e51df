//! The store contract the controller is built on, and its two backends.
//!
//! A [`Store`] is a key/value map with etcd's semantics:
//! * a single global [`Revision`] that grows by one with every successful write transaction;
//! * every key carries its create/mod revision and version, so writers can compare-and-swap on a
//!   key's `mod_revision` ([`Compare`]) inside a multi-key [`Txn`] (at most [`MAX_TXN_OPS`]
//!   operations, as etcd 3.4);
//! * leases: keys attached to a lease vanish (as deletes, visible to watchers) when it expires;
//! * [`Store::watch`] streams every change under a prefix from a revision on, in revision order;
//!   a revision older than the compacted history yields [`StoreError::Compacted`] and the caller
//!   re-lists.
//!
//! Backends: [`etcd::EtcdStore`] (production, replicated) and [`embedded::EmbeddedStore`]
//! (a single redb file; the default when no etcd endpoint is configured). [`AnyStore`] picks one
//! at runtime. Both pass the same conformance suite (`tests/conformance.rs`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

pub mod embedded;
pub mod etcd;

mod any;
mod validate;
pub use any::AnyStore;

/// The store's global revision. Starts at 1 for an empty store; every write transaction that
/// changes something increments it by one.
pub type Revision = u64;

/// A lease identifier. `0` means "no lease".
pub type LeaseId = i64;

/// Most operations a single transaction may hold (etcd 3.4's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// A stored key with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in delete events).
    pub value: Vec<u8>,
    /// Revision at which the key was created (0 in delete events).
    pub create_revision: Revision,
    /// Revision of the last change to the key (for delete events: the deletion's revision).
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after the first put; 0 in delete events).
    pub version: u64,
    /// Lease the key is attached to, 0 if none.
    pub lease: LeaseId,
}

/// A key range: one key, or all keys from `start` (inclusive) to `end` (exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// First key.
    pub start: Vec<u8>,
    /// End of the range (exclusive); empty = just `start`.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// Exactly one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        KeyRange { start: key.into(), end: Vec::new() }
    }

    /// Every key that starts with `prefix` (etcd's "prefix end": last byte + 1).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let start = prefix.into();
        let end = prefix_end(&start);
        KeyRange { start, end }
    }

    /// Every key from `start` (inclusive) to `end` (exclusive).
    pub fn between(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        KeyRange { start: start.into(), end: end.into() }
    }

    /// Whether `key` falls in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            key == self.start.as_slice()
        } else if self.end == [0] {
            key >= self.start.as_slice()
        } else {
            key >= self.start.as_slice() && key < self.end.as_slice()
        }
    }
}

/// The smallest key greater than every key starting with `prefix` (`[0]` = no upper bound).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

/// A range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    /// Keys to read.
    pub range: KeyRange,
    /// At most this many keys (0 = no limit). Keys come in ascending byte order.
    pub limit: usize,
}

/// The result of a range read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResult {
    /// The keys found, ascending.
    pub kvs: Vec<KeyValue>,
    /// The store revision the read reflects.
    pub revision: Revision,
    /// More keys matched than `limit` allowed.
    pub more: bool,
}

/// Comparison operator of a [`Compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `>`
    Greater,
}

/// What a [`Compare`] looks at. A missing key has mod revision 0, create revision 0, version 0
/// and an empty value. As in etcd, a `Value` compare on a missing key never holds (whatever the
/// operator): use `Version(0)` ([`Compare::absent`]) to test for absence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's mod revision (CAS: `Equal` to the revision you read; `Equal(0)` = absent).
    ModRevision(Revision),
    /// The key's create revision.
    CreateRevision(Revision),
    /// The key's version.
    Version(u64),
    /// The key's value.
    Value(Vec<u8>),
}

/// One guard of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// The operator.
    pub op: CmpOp,
    /// The operand.
    pub target: CompareTarget,
}

impl Compare {
    /// `key`'s mod revision equals `revision` (0 = the key does not exist).
    pub fn mod_revision(key: impl Into<Vec<u8>>, revision: Revision) -> Self {
        Compare { key: key.into(), op: CmpOp::Equal, target: CompareTarget::ModRevision(revision) }
    }

    /// `key` does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Compare { key: key.into(), op: CmpOp::Equal, target: CompareTarget::Version(0) }
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Write a key, optionally attached to a lease (the lease must exist).
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Lease (0 = none).
        lease: LeaseId,
    },
    /// Delete every key in the range (no-op if none).
    Delete(KeyRange),
    /// Read the keys in the range (results in [`TxnResult::reads`]).
    Get(KeyRange),
}

impl TxnOp {
    /// A put without lease.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put { key: key.into(), value: value.into(), lease: 0 }
    }

    /// Delete one key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete(KeyRange::key(key))
    }
}

/// An atomic transaction: if every compare holds, run `success`, else run `failure`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Txn {
    /// Guards (all must hold).
    pub compares: Vec<Compare>,
    /// Operations when all guards hold.
    pub success: Vec<TxnOp>,
    /// Operations otherwise.
    pub failure: Vec<TxnOp>,
}

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResult {
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if the branch wrote nothing).
    pub revision: Revision,
    /// One entry per `Get` of the branch that ran, in order.
    pub reads: Vec<RangeResult>,
}

/// Kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (explicitly or by lease expiry).
    Delete,
}

/// One change seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change. For deletes: key and `mod_revision` (the deletion revision) only.
    pub kv: KeyValue,
}

/// Changes delivered together. All events of one transaction arrive in the same batch; a batch
/// may hold several transactions. An empty batch is a progress notification.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchBatch {
    /// Every change up to this revision has been delivered.
    pub revision: Revision,
    /// The changes, in revision order.
    pub events: Vec<Event>,
}

/// A watch: batches in revision order. Any `Err` ends the stream; the caller watches again
/// from the last revision it saw + 1 (or re-lists after [`StoreError::Compacted`]).
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

/// Errors of every store operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the request before applying it: nothing was
    /// written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A write was sent but its answer never came (a member died after receiving it, the link
    /// broke, the deadline passed): it may or may not have been applied. The caller re-reads to
    /// find out; writes are not repeated blindly.
    #[error("the store did not confirm the write, it may or may not have been applied ({0})")]
    OutcomeUnknown(String),
    /// The requested revision is older than the retained history.
    #[error("revision {requested} is compacted (oldest retained revision is {compacted}); re-list")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The store's compaction revision: watches from here on still work.
        compacted: Revision,
    },
    /// A revision in the future was asked for.
    #[error("revision {requested} is newer than the store's current revision {current}")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },
    /// The transaction holds more operations than [`MAX_TXN_OPS`].
    #[error("transaction has {ops} operations, at most {max} allowed")]
    TooManyOps {
        /// Operations in the transaction.
        ops: usize,
        /// The limit.
        max: usize,
    },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0:#x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The request is malformed (empty key, duplicate key in one transaction, ...).
    #[error("invalid store request: {0}")]
    InvalidArgument(String),
    /// Anything else (a bug or a corrupt file).
    #[error("store internal error: {0}")]
    Internal(String),
}

impl StoreError {
    /// The store could not be used right now ([`StoreError::Unavailable`] or
    /// [`StoreError::OutcomeUnknown`]): a later attempt may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_))
    }
}

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// The store contract. Cloning is cheap (handles share one connection/database).
pub trait Store: Clone + Send + Sync + 'static {
    /// "etcd" or "embedded".
    fn kind(&self) -> &'static str;

    /// Reads keys.
    fn range(&self, req: RangeRequest) -> impl Future<Output = StoreResult<RangeResult>> + Send;

    /// Runs a transaction atomically.
    fn txn(&self, txn: Txn) -> impl Future<Output = StoreResult<TxnResult>> + Send;

    /// Grants a lease that expires `ttl` after the last keep-alive (rounded up to seconds).
    fn lease_grant(&self, ttl: Duration) -> impl Future<Output = StoreResult<LeaseId>> + Send;

    /// Refreshes a lease; returns its TTL. [`StoreError::LeaseNotFound`] if it expired.
    fn lease_keep_alive(&self, lease: LeaseId) -> impl Future<Output = StoreResult<Duration>> + Send;

    /// Revokes a lease now, deleting its keys. Revoking an unknown lease is `LeaseNotFound`.
    fn lease_revoke(&self, lease: LeaseId) -> impl Future<Output = StoreResult<()>> + Send;

    /// Watches every key in `range` for changes with revision `>= from_revision`
    /// (`from_revision` 0 = changes after now; a future revision waits for it).
    ///
    /// A compacted `from_revision` fails with [`StoreError::Compacted`], either from this call or
    /// as the first item of the stream (etcd only says so after the watch was created). While
    /// idle, the stream may yield empty batches (progress notifications) carrying the current
    /// revision.
    fn watch(&self, range: KeyRange, from_revision: Revision) -> impl Future<Output = StoreResult<WatchStream>> + Send;

    /// Discards history before `revision` (watches from older revisions fail with `Compacted`).
    /// Compacting at or below the current compaction revision is a no-op; a revision newer than
    /// the current one is [`StoreError::FutureRevision`].
    fn compact(&self, revision: Revision) -> impl Future<Output = StoreResult<()>> + Send;

    /// The current revision; also the health probe (`Unavailable` when unreachable).
    fn current_revision(&self) -> impl Future<Output = StoreResult<Revision>> + Send;

    /// Reads one key.
    fn get(&self, key: &[u8]) -> impl Future<Output = StoreResult<(Option<KeyValue>, Revision)>> + Send {
        let req = RangeRequest { range: KeyRange::key(key), limit: 1 };
        async move {
            let res = self.range(req).await?;
            Ok((res.kvs.into_iter().next(), res.revision))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/v/b/"), b"/v/b0".to_vec());
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
        assert_eq!(prefix_end(&[0xff, 0xff]), vec![0]);
    }

    proptest::proptest! {
        /// A prefix range holds exactly the keys that start with the prefix.
        #[test]
        fn prefix_range_is_starts_with(
            prefix in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4),
            key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6),
        ) {
            let range = KeyRange::prefix(prefix.clone());
            proptest::prop_assert_eq!(range.contains(&key), key.starts_with(&prefix));
        }
    }

    #[test]
    fn key_range_contains() {
        let r = KeyRange::prefix("/a/");
        assert!(r.contains(b"/a/x"));
        assert!(!r.contains(b"/b"));
        assert!(KeyRange::key("k").contains(b"k"));
        assert!(!KeyRange::key("k").contains(b"kk"));
    }
}
