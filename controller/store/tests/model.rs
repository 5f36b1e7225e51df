//! Model-based property test: random transaction sequences run against a store and against a
//! `BTreeMap` model of etcd's semantics; every result, the final key space and the full watch
//! history must match. Run against the embedded store and against a real etcd, it checks both
//! backends against one model (and so against each other).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::events;
use victor_store::{
    CmpOp, Compare, CompareTarget, Event, EventKind, KeyRange, KeyValue, RangeRequest, RangeResult, Store, Txn, TxnOp,
    TxnResult,
};

const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];

/// A compare whose operand is relative to the model's state when the transaction runs, so that
/// compares hold about half of the time.
#[derive(Debug, Clone)]
struct CmpSpec {
    key: usize,
    kind: u8,
    op: CmpOp,
    delta: i8,
}

#[derive(Debug, Clone)]
enum OpSpec {
    Put(usize, u8),
    Delete(usize),
    DeleteRange(usize, usize),
    Get(usize),
    GetAll,
}

#[derive(Debug, Clone)]
struct TxnSpec {
    compares: Vec<CmpSpec>,
    success: Vec<OpSpec>,
    failure: Vec<OpSpec>,
}

fn cmp_spec() -> impl Strategy<Value = CmpSpec> {
    let op = prop_oneof![Just(CmpOp::Equal), Just(CmpOp::NotEqual), Just(CmpOp::Less), Just(CmpOp::Greater)];
    (0..KEYS.len(), 0..4u8, op, -1..=1i8).prop_map(|(key, kind, op, delta)| CmpSpec { key, kind, op, delta })
}

/// A branch: each key at most once (etcd refuses a key put twice or put and deleted), plus
/// range operations that only read, or only delete keys the branch does not put.
fn branch() -> impl Strategy<Value = Vec<OpSpec>> {
    let per_key = proptest::collection::vec(0..5u8, KEYS.len());
    (per_key, any::<u8>(), any::<bool>(), 0..KEYS.len(), 0..KEYS.len()).prop_map(|(choice, v, all, lo, hi)| {
        let mut ops: Vec<OpSpec> = Vec::new();
        for (k, c) in choice.iter().enumerate() {
            match c {
                0 => ops.push(OpSpec::Put(k, v.wrapping_add(k as u8))),
                1 => ops.push(OpSpec::Delete(k)),
                2 => ops.push(OpSpec::Get(k)),
                _ => {}
            }
        }
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        let puts_inside = choice.iter().enumerate().any(|(k, c)| *c == 0 && k >= lo && k < hi);
        if !puts_inside && lo < hi {
            ops.push(OpSpec::DeleteRange(lo, hi));
        }
        if all {
            ops.push(OpSpec::GetAll);
        }
        ops
    })
}

fn txn_spec() -> impl Strategy<Value = TxnSpec> {
    (proptest::collection::vec(cmp_spec(), 0..3), branch(), branch()).prop_map(|(compares, success, failure)| TxnSpec {
        compares,
        success,
        failure,
    })
}

/// etcd's semantics over a map (keys without the test prefix).
struct Model {
    prefix: String,
    revision: u64,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    events: Vec<Event>,
}

impl Model {
    fn key(&self, k: usize) -> Vec<u8> {
        format!("{}{}", self.prefix, KEYS[k]).into_bytes()
    }

    /// The concrete transaction of a spec, given the current state.
    fn concrete(&self, spec: &TxnSpec) -> Txn {
        let compares = spec
            .compares
            .iter()
            .map(|c| {
                let key = self.key(c.key);
                let kv = self.kvs.get(&key).cloned().unwrap_or_default();
                let rel = |v: u64| v.saturating_add_signed(c.delta.into());
                let target = match c.kind {
                    0 => CompareTarget::ModRevision(rel(kv.mod_revision)),
                    1 => CompareTarget::CreateRevision(rel(kv.create_revision)),
                    2 => CompareTarget::Version(rel(kv.version)),
                    _ => CompareTarget::Value(if c.delta == 0 { kv.value } else { vec![b'0' + (c.delta + 1) as u8] }),
                };
                Compare { key, op: c.op, target }
            })
            .collect();
        let ops = |ops: &[OpSpec]| -> Vec<TxnOp> {
            ops.iter()
                .map(|o| match o {
                    OpSpec::Put(k, v) => TxnOp::put(self.key(*k), vec![*v]),
                    OpSpec::Delete(k) => TxnOp::delete(self.key(*k)),
                    OpSpec::DeleteRange(lo, hi) => TxnOp::Delete(KeyRange::between(self.key(*lo), self.key(*hi))),
                    OpSpec::Get(k) => TxnOp::Get(KeyRange::key(self.key(*k))),
                    OpSpec::GetAll => TxnOp::Get(KeyRange::prefix(self.prefix.clone())),
                })
                .collect()
        };
        Txn { compares, success: ops(&spec.success), failure: ops(&spec.failure) }
    }

    fn holds(&self, c: &Compare) -> bool {
        use std::cmp::Ordering::*;
        let kv = self.kvs.get(&c.key);
        let ord = match (&c.target, kv) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(kv)) => kv.value.cmp(v),
            (CompareTarget::ModRevision(r), _) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
            (CompareTarget::CreateRevision(r), _) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            (CompareTarget::Version(v), _) => kv.map_or(0, |kv| kv.version).cmp(v),
        };
        match c.op {
            CmpOp::Equal => ord == Equal,
            CmpOp::NotEqual => ord != Equal,
            CmpOp::Less => ord == Less,
            CmpOp::Greater => ord == Greater,
        }
    }

    fn apply(&mut self, txn: &Txn) -> TxnResult {
        let succeeded = txn.compares.iter().all(|c| self.holds(c));
        let rev = self.revision + 1;
        let mut changed = Vec::new();
        let mut reads = Vec::new();
        for op in if succeeded { &txn.success } else { &txn.failure } {
            match op {
                TxnOp::Put { key, value, .. } => {
                    let old = self.kvs.get(key);
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: old.map_or(rev, |o| o.create_revision),
                        mod_revision: rev,
                        version: old.map_or(1, |o| o.version + 1),
                        lease: 0,
                    };
                    self.kvs.insert(key.clone(), kv.clone());
                    changed.push(Event { kind: EventKind::Put, kv });
                }
                TxnOp::Delete(r) => {
                    let gone: Vec<_> = self.kvs.keys().filter(|k| r.contains(k)).cloned().collect();
                    for key in gone {
                        self.kvs.remove(&key);
                        let kv = KeyValue { key, mod_revision: rev, ..KeyValue::default() };
                        changed.push(Event { kind: EventKind::Delete, kv });
                    }
                }
                TxnOp::Get(r) => reads.push(RangeResult {
                    kvs: self.kvs.values().filter(|kv| r.contains(&kv.key)).cloned().collect(),
                    revision: 0,
                    more: false,
                }),
            }
        }
        if !changed.is_empty() {
            self.revision = rev;
            self.events.extend(changed);
        }
        for r in &mut reads {
            r.revision = self.revision;
        }
        TxnResult { succeeded, revision: self.revision, reads }
    }
}

/// Runs one random sequence against `store` under a fresh prefix and compares with the model.
async fn check<S: Store>(store: &S, specs: &[TxnSpec]) -> Result<(), TestCaseError> {
    static CASE: AtomicU32 = AtomicU32::new(0);
    let prefix = format!("/model/{}/", CASE.fetch_add(1, Ordering::Relaxed));
    let start = store.current_revision().await.unwrap();
    let mut model = Model { prefix: prefix.clone(), revision: start, kvs: BTreeMap::new(), events: Vec::new() };
    for (i, spec) in specs.iter().enumerate() {
        let txn = model.concrete(spec);
        let want = model.apply(&txn);
        let got = store.txn(txn.clone()).await.unwrap();
        prop_assert_eq!(got, want, "txn #{}: {:?}", i, txn);
    }
    let all = store.range(RangeRequest { range: KeyRange::prefix(prefix.clone()), limit: 0 }).await.unwrap();
    prop_assert_eq!(all.kvs, model.kvs.values().cloned().collect::<Vec<_>>());
    prop_assert_eq!(all.revision, model.revision);
    if !model.events.is_empty() {
        let mut w = store.watch(KeyRange::prefix(prefix), start + 1).await.unwrap();
        let seen = events(&mut w, model.events.len(), Duration::from_secs(5)).await;
        prop_assert_eq!(seen, model.events);
    }
    Ok(())
}

fn run_model<S: Store>(rt: &tokio::runtime::Runtime, store: S, cases: u32) {
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let strategy = proptest::collection::vec(txn_spec(), 1..25);
    runner.run(&strategy, |specs| rt.block_on(check(&store, &specs))).unwrap();
}

#[test]
fn embedded_matches_model() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fixture = rt.block_on(support::embedded());
    run_model(&rt, fixture.store.clone(), 128);
}

#[test]
fn etcd_matches_model() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fixture = rt.block_on(support::etcd1());
    run_model(&rt, fixture.store.clone(), 48);
}
