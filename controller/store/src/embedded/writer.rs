//! The embedded store's single writer thread: it owns every redb write transaction.
//!
//! Requests queue on a channel; the thread takes every queued request (up to `max_batch`),
//! applies them in order inside ONE write transaction (each successful write transaction gets
//! its own revision, exactly as if committed alone) and commits once — group commit: one fsync
//! for many small CAS transactions. Only after the commit succeeded are the callers answered and
//! the events broadcast to watchers, so nothing is acknowledged or seen that is not durable.
//! If the commit fails, every request of the batch fails and the in-memory state is rolled back.
//!
//! The thread also expires leases: it wakes up at the earliest lease deadline and revokes every
//! lease whose deadline passed (each revocation is one revision of `Delete` events).

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, Table, WriteTransaction};
use tokio::sync::{broadcast, oneshot};

use super::read::{ReadError, bounds, read_range};
use super::schema::{
    KV, KvMeta, LEASE_KEYS, LEASES, LOG, META, META_COMPACTED, META_LEASE_SEQ, META_REVISION, decode_meta,
    encode_events, encode_kv, lease_key, record_value,
};
use crate::validate::show_key;
use crate::{
    CmpOp, Compare, CompareTarget, Event, EventKind, KeyRange, KeyValue, LeaseId, RangeResult, Revision, StoreError,
    StoreResult, Txn, TxnOp, TxnResult, prefix_end,
};

/// What a caller asks of the writer.
#[derive(Debug)]
pub(super) enum Op {
    Txn(Txn),
    LeaseGrant { ttl_secs: u64 },
    LeaseRevoke(LeaseId),
    Compact(Revision),
}

/// The writer's answer.
#[derive(Debug)]
pub(super) enum Reply {
    Txn(TxnResult),
    Lease(LeaseId),
    Done,
}

/// A queued request.
#[derive(Debug)]
pub(super) struct Request {
    pub op: Op,
    pub reply: oneshot::Sender<StoreResult<Reply>>,
}

/// Changes committed together, broadcast to watchers in commit order.
#[derive(Debug)]
pub(super) struct Committed {
    /// Every event of the batch, in revision order (`kv.mod_revision` is each one's revision).
    pub events: Vec<Event>,
    /// The store revision after the batch.
    pub revision: Revision,
}

/// A live lease's expiry clock (in memory only: it restarts when the store is reopened).
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseClock {
    pub ttl: Duration,
    pub deadline: Instant,
}

/// Lease clocks, shared with `lease_keep_alive` (which only moves deadlines).
pub(super) type LeaseClocks = Arc<Mutex<HashMap<LeaseId, LeaseClock>>>;

/// Persistent counters, also kept in the `meta` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct State {
    pub revision: Revision,
    pub compacted: Revision,
    pub lease_seq: u64,
}

/// Writer configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct WriterConfig {
    pub max_batch: usize,
    pub history_revisions: u64,
}

pub(super) struct Writer {
    pub db: Arc<Database>,
    pub rx: Receiver<Request>,
    pub events: broadcast::Sender<Arc<Committed>>,
    pub leases: LeaseClocks,
    pub committed: Arc<std::sync::atomic::AtomicU64>,
    pub state: State,
    pub config: WriterConfig,
}

/// A lease change to apply to the clocks once the batch is committed.
enum LeaseChange {
    Granted(LeaseId, Duration),
    Revoked(LeaseId),
}

/// What applying a batch produced, published only after the commit.
#[derive(Default)]
struct Output {
    events: Vec<Event>,
    lease_changes: Vec<LeaseChange>,
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("embedded store: {e}"))
}

impl From<ReadError> for redb::Error {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Storage(s) => s.into(),
            ReadError::Corrupt(c) => redb::Error::Corrupted(c.to_string()),
        }
    }
}

/// The tables a batch writes.
struct Tables<'t> {
    kv: Table<'t, &'static [u8], &'static [u8]>,
    log: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
    leases: Table<'t, i64, u64>,
    lease_keys: Table<'t, &'static [u8], ()>,
}

impl<'t> Tables<'t> {
    fn open(wtx: &'t WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Tables {
            kv: wtx.open_table(KV)?,
            log: wtx.open_table(LOG)?,
            meta: wtx.open_table(META)?,
            leases: wtx.open_table(LEASES)?,
            lease_keys: wtx.open_table(LEASE_KEYS)?,
        })
    }

    fn meta_of(&self, key: &[u8]) -> Result<Option<KvMeta>, redb::Error> {
        match self.kv.get(key)? {
            Some(v) => Ok(Some(decode_meta(v.value()).map_err(|c| redb::Error::Corrupted(c.to_string()))?)),
            None => Ok(None),
        }
    }

    fn write_state(&mut self, s: &State) -> Result<(), redb::Error> {
        self.meta.insert(META_REVISION, s.revision)?;
        self.meta.insert(META_COMPACTED, s.compacted)?;
        self.meta.insert(META_LEASE_SEQ, s.lease_seq)?;
        Ok(())
    }

    /// Removes `key` (and its lease link), returning its delete event at `revision`.
    fn delete_key(&mut self, key: &[u8], meta: &KvMeta, revision: Revision) -> Result<Event, redb::Error> {
        self.kv.remove(key)?;
        if meta.lease != 0 {
            self.lease_keys.remove(lease_key(meta.lease, key).as_slice())?;
        }
        Ok(Event {
            kind: EventKind::Delete,
            kv: KeyValue { key: key.to_vec(), mod_revision: revision, ..KeyValue::default() },
        })
    }

    /// Keys (with metadata) in `range`.
    fn keys_in(&self, range: &KeyRange) -> Result<Vec<(Vec<u8>, KvMeta)>, redb::Error> {
        let Some(b) = bounds(range) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.kv.range::<&[u8]>(b)? {
            let (k, v) = item?;
            let meta = decode_meta(v.value()).map_err(|c| redb::Error::Corrupted(c.to_string()))?;
            out.push((k.value().to_vec(), meta));
        }
        Ok(out)
    }
}

/// Whether `cmp` holds for a key with metadata `meta` and value `value` (`None` = absent).
fn compare_holds(cmp: &Compare, found: Option<(&KvMeta, &[u8])>) -> bool {
    use std::cmp::Ordering;
    let ord = match (&cmp.target, found) {
        // etcd: a value compare on a missing key never holds.
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(want), Some((_, value))) => value.cmp(want.as_slice()),
        (target, found) => {
            let meta = found.map(|(m, _)| *m).unwrap_or_default();
            let (have, want) = match target {
                CompareTarget::ModRevision(r) => (meta.mod_revision, *r),
                CompareTarget::CreateRevision(r) => (meta.create_revision, *r),
                CompareTarget::Version(v) => (meta.version, *v),
                CompareTarget::Value(_) => unreachable!("handled above"),
            };
            have.cmp(&want)
        }
    };
    match cmp.op {
        CmpOp::Equal => ord == Ordering::Equal,
        CmpOp::NotEqual => ord != Ordering::Equal,
        CmpOp::Less => ord == Ordering::Less,
        CmpOp::Greater => ord == Ordering::Greater,
    }
}

impl Writer {
    /// Runs until every sender is gone.
    pub(super) fn run(mut self) {
        let mut next_expiry_check = Instant::now();
        loop {
            let wait = next_expiry_check.saturating_duration_since(Instant::now());
            let mut batch = Vec::new();
            match self.rx.recv_timeout(wait) {
                Ok(req) => batch.push(req),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < self.config.max_batch {
                match self.rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            let mut expired = Vec::new();
            if now >= next_expiry_check {
                let (due, next) = self.due_leases(now);
                expired = due;
                next_expiry_check = next;
            }
            if !batch.is_empty() || !expired.is_empty() {
                self.commit_batch(batch, &expired);
            }
        }
    }

    /// Leases past their deadline, and when to look again (at most 250 ms from now, so that
    /// leases granted meanwhile are not overlooked for long).
    fn due_leases(&self, now: Instant) -> (Vec<LeaseId>, Instant) {
        let clocks = self.leases.lock().expect("lease clocks poisoned");
        let mut next = now + Duration::from_millis(250);
        let mut due = Vec::new();
        for (&id, clock) in clocks.iter() {
            if clock.deadline <= now {
                due.push(id);
            } else {
                next = next.min(clock.deadline);
            }
        }
        (due, next)
    }

    fn commit_batch(&mut self, batch: Vec<Request>, expired: &[LeaseId]) {
        let mut state = self.state;
        let mut out = Output::default();
        let mut results: Vec<StoreResult<Reply>> = Vec::with_capacity(batch.len());
        let outcome = self.apply_batch(&batch, expired, &mut state, &mut out, &mut results);
        let commit: Result<(), StoreError> = match outcome {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!("embedded store batch failed, nothing written: {e}");
                Err(storage(e))
            }
        };
        if commit.is_ok() {
            self.state = state;
            self.committed.store(state.revision, std::sync::atomic::Ordering::Release);
            self.apply_lease_changes(out.lease_changes);
            if !out.events.is_empty() {
                // No receiver is fine: nobody watches.
                let _ = self.events.send(Arc::new(Committed { events: out.events, revision: state.revision }));
            }
        }
        let mut results = results.into_iter();
        for req in batch {
            let result = match (results.next(), &commit) {
                (Some(Err(e)), _) => Err(e),
                (Some(Ok(reply)), Ok(())) => Ok(reply),
                (_, Err(e)) => Err(e.clone()),
                (None, Ok(())) => Err(StoreError::Internal("request was not applied".into())),
            };
            let _ = req.reply.send(result);
        }
    }

    fn apply_lease_changes(&self, changes: Vec<LeaseChange>) {
        let mut clocks = self.leases.lock().expect("lease clocks poisoned");
        let now = Instant::now();
        for change in changes {
            match change {
                LeaseChange::Granted(id, ttl) => {
                    clocks.insert(id, LeaseClock { ttl, deadline: now + ttl });
                }
                LeaseChange::Revoked(id) => {
                    clocks.remove(&id);
                }
            }
        }
    }

    /// Applies the batch in one write transaction and commits it.
    fn apply_batch(
        &self,
        batch: &[Request],
        expired: &[LeaseId],
        state: &mut State,
        out: &mut Output,
        results: &mut Vec<StoreResult<Reply>>,
    ) -> Result<(), redb::Error> {
        let wtx = self.db.begin_write()?;
        {
            let mut t = Tables::open(&wtx)?;
            for req in batch {
                let result = match &req.op {
                    Op::Txn(txn) => apply_txn(&mut t, state, txn, out)?.map(Reply::Txn),
                    Op::LeaseGrant { ttl_secs } => {
                        state.lease_seq += 1;
                        let id = state.lease_seq as LeaseId;
                        t.leases.insert(id, *ttl_secs)?;
                        out.lease_changes.push(LeaseChange::Granted(id, Duration::from_secs(*ttl_secs)));
                        Ok(Reply::Lease(id))
                    }
                    Op::LeaseRevoke(id) => revoke(&mut t, state, *id, out)?.map(|()| Reply::Done),
                    Op::Compact(rev) => compact(&mut t, state, *rev)?.map(|()| Reply::Done),
                };
                results.push(result);
            }
            for &id in expired {
                // Already revoked explicitly in this batch: nothing to do.
                let _ = revoke(&mut t, state, id, out)?;
            }
            let history = self.config.history_revisions;
            let slack = (history / 16).max(1);
            if history > 0 && state.revision.saturating_sub(state.compacted) > history + slack {
                compact(&mut t, state, state.revision - history)?.map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            }
            t.write_state(state)?;
        }
        wtx.commit()?;
        Ok(())
    }
}

/// Applies one transaction. `Err` = storage failure (the batch aborts); `Ok(Err)` = this
/// transaction is refused (nothing of it was written).
fn apply_txn(
    t: &mut Tables<'_>,
    state: &mut State,
    txn: &Txn,
    out: &mut Output,
) -> Result<StoreResult<TxnResult>, redb::Error> {
    let mut succeeded = true;
    for cmp in &txn.compares {
        let found = t.kv.get(cmp.key.as_slice())?;
        let holds = match &found {
            Some(v) => {
                let rec = v.value();
                let meta = decode_meta(rec).map_err(|c| redb::Error::Corrupted(c.to_string()))?;
                compare_holds(cmp, Some((&meta, record_value(rec))))
            }
            None => compare_holds(cmp, None),
        };
        if !holds {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { &txn.success } else { &txn.failure };
    // Refuse before writing anything if a put names an unknown lease.
    for op in ops {
        if let TxnOp::Put { lease, .. } = op
            && *lease != 0
            && t.leases.get(*lease)?.is_none()
        {
            return Ok(Err(StoreError::LeaseNotFound(*lease)));
        }
    }
    let revision = state.revision + 1;
    let mut events = Vec::new();
    let mut reads = Vec::new();
    for op in ops {
        match op {
            TxnOp::Put { key, value, lease } => {
                let old = t.meta_of(key)?;
                let meta = KvMeta {
                    create_revision: old.map_or(revision, |m| m.create_revision),
                    mod_revision: revision,
                    version: old.map_or(1, |m| m.version + 1),
                    lease: *lease,
                };
                t.kv.insert(key.as_slice(), encode_kv(&meta, value).as_slice())?;
                if let Some(old) = old
                    && old.lease != 0
                    && old.lease != *lease
                {
                    t.lease_keys.remove(lease_key(old.lease, key).as_slice())?;
                }
                if *lease != 0 {
                    t.lease_keys.insert(lease_key(*lease, key).as_slice(), ())?;
                }
                events.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: meta.create_revision,
                        mod_revision: revision,
                        version: meta.version,
                        lease: *lease,
                    },
                });
            }
            TxnOp::Delete(range) => {
                for (key, meta) in t.keys_in(range)? {
                    events.push(t.delete_key(&key, &meta, revision)?);
                }
            }
            TxnOp::Get(range) => {
                let (kvs, more) = read_range(&t.kv, range, 0)?;
                reads.push(RangeResult { kvs, revision: 0, more });
            }
        }
    }
    if !events.is_empty() {
        state.revision = revision;
        t.log.insert(revision, encode_events(&events).as_slice())?;
        out.events.extend(events);
    }
    for r in &mut reads {
        r.revision = state.revision;
    }
    Ok(Ok(TxnResult { succeeded, revision: state.revision, reads }))
}

/// Revokes a lease: deletes its keys (one revision) and the lease.
fn revoke(
    t: &mut Tables<'_>,
    state: &mut State,
    id: LeaseId,
    out: &mut Output,
) -> Result<StoreResult<()>, redb::Error> {
    if t.leases.remove(id)?.is_none() {
        return Ok(Err(StoreError::LeaseNotFound(id)));
    }
    out.lease_changes.push(LeaseChange::Revoked(id));
    let prefix = lease_key(id, &[]);
    let end = prefix_end(&prefix);
    let mut attached = Vec::new();
    for item in t.lease_keys.range::<&[u8]>(prefix.as_slice()..end.as_slice())? {
        let (k, _) = item?;
        attached.push(k.value()[8..].to_vec());
    }
    let revision = state.revision + 1;
    let mut events = Vec::new();
    for key in attached {
        match t.meta_of(&key)? {
            Some(meta) if meta.lease == id => events.push(t.delete_key(&key, &meta, revision)?),
            _ => {
                tracing::warn!("stale lease link {id:#x} -> {}", show_key(&key));
                t.lease_keys.remove(lease_key(id, &key).as_slice())?;
            }
        }
    }
    if !events.is_empty() {
        state.revision = revision;
        t.log.insert(revision, encode_events(&events).as_slice())?;
        out.events.extend(events);
    }
    Ok(Ok(()))
}

/// Drops log entries before `revision`.
fn compact(t: &mut Tables<'_>, state: &mut State, revision: Revision) -> Result<StoreResult<()>, redb::Error> {
    if revision > state.revision {
        return Ok(Err(StoreError::FutureRevision { requested: revision, current: state.revision }));
    }
    if revision <= state.compacted {
        return Ok(Ok(()));
    }
    t.log.retain_in(..revision, |_, _| false)?;
    state.compacted = revision;
    Ok(Ok(()))
}

/// Reads the persistent counters (defaults for a new file).
pub(super) fn load_state<T>(meta: &T) -> Result<State, redb::StorageError>
where
    T: ReadableTable<&'static str, u64>,
{
    let get =
        |k: &str, default: u64| -> Result<u64, redb::StorageError> { Ok(meta.get(k)?.map_or(default, |v| v.value())) };
    Ok(State {
        revision: get(META_REVISION, 1)?,
        compacted: get(META_COMPACTED, 0)?,
        lease_seq: get(META_LEASE_SEQ, 0)?,
    })
}
