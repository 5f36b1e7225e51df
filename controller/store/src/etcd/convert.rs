//! Pure conversions between the store contract and etcd-client's types (no IO).

use etcd_client as ec;

use crate::{CmpOp, Compare, CompareTarget, Event, EventKind, KeyRange, KeyValue, Revision, Txn, TxnOp};

/// etcd's (key, range_end) for a [`KeyRange`]. etcd has no empty key: a range from the first key
/// starts at `"\0"`.
pub(super) fn key_and_end(range: &KeyRange) -> (Vec<u8>, Vec<u8>) {
    let key = if range.start.is_empty() { vec![0] } else { range.start.clone() };
    (key, range.end.clone())
}

pub(super) fn get_options(range: &KeyRange) -> (Vec<u8>, ec::GetOptions) {
    let (key, end) = key_and_end(range);
    let mut opts = ec::GetOptions::new();
    if !end.is_empty() {
        opts = opts.with_range(end);
    }
    (key, opts)
}

fn delete_options(range: &KeyRange) -> (Vec<u8>, ec::DeleteOptions) {
    let (key, end) = key_and_end(range);
    let mut opts = ec::DeleteOptions::new();
    if !end.is_empty() {
        opts = opts.with_range(end);
    }
    (key, opts)
}

fn compare(c: &Compare) -> ec::Compare {
    let op = match c.op {
        CmpOp::Equal => ec::CompareOp::Equal,
        CmpOp::NotEqual => ec::CompareOp::NotEqual,
        CmpOp::Less => ec::CompareOp::Less,
        CmpOp::Greater => ec::CompareOp::Greater,
    };
    let key = c.key.clone();
    match &c.target {
        CompareTarget::ModRevision(r) => ec::Compare::mod_revision(key, op, to_i64(*r)),
        CompareTarget::CreateRevision(r) => ec::Compare::create_revision(key, op, to_i64(*r)),
        CompareTarget::Version(v) => ec::Compare::version(key, op, to_i64(*v)),
        CompareTarget::Value(v) => ec::Compare::value(key, op, v.clone()),
    }
}

fn op(o: &TxnOp) -> ec::TxnOp {
    match o {
        TxnOp::Put { key, value, lease } => {
            let opts = (*lease != 0).then(|| ec::PutOptions::new().with_lease(*lease));
            ec::TxnOp::put(key.clone(), value.clone(), opts)
        }
        TxnOp::Delete(range) => {
            let (key, opts) = delete_options(range);
            ec::TxnOp::delete(key, Some(opts))
        }
        TxnOp::Get(range) => {
            let (key, opts) = get_options(range);
            ec::TxnOp::get(key, Some(opts))
        }
    }
}

/// The etcd transaction for `txn`.
pub(super) fn txn(txn: &Txn) -> ec::Txn {
    ec::Txn::new()
        .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
        .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
        .or_else(txn.failure.iter().map(op).collect::<Vec<_>>())
}

/// Revisions and versions are non-negative in etcd; saturate instead of wrapping.
pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn key_value(kv: ec::KeyValue) -> KeyValue {
    let (create_revision, mod_revision, version, lease) =
        (to_u64(kv.create_revision()), to_u64(kv.mod_revision()), to_u64(kv.version()), kv.lease());
    let (key, value) = kv.into_key_value();
    KeyValue { key, value, create_revision, mod_revision, version, lease }
}

pub(super) fn header_revision(h: Option<&ec::ResponseHeader>) -> Revision {
    h.map_or(0, |h| to_u64(h.revision()))
}

/// A watch event. Deletes keep only the key and the deletion revision, as the contract says.
pub(super) fn event(e: &ec::Event) -> Option<Event> {
    let kv = e.kv()?;
    Some(match e.event_type() {
        ec::EventType::Put => Event { kind: EventKind::Put, kv: key_value(kv.clone()) },
        ec::EventType::Delete => Event {
            kind: EventKind::Delete,
            kv: KeyValue { key: kv.key().to_vec(), mod_revision: to_u64(kv.mod_revision()), ..KeyValue::default() },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_to_etcd_keys() {
        assert_eq!(key_and_end(&KeyRange::key("k")), (b"k".to_vec(), vec![]));
        assert_eq!(key_and_end(&KeyRange::prefix("/a/")), (b"/a/".to_vec(), b"/a0".to_vec()));
        // Every key: etcd's "\0" .. "\0".
        assert_eq!(key_and_end(&KeyRange::prefix("")), (vec![0], vec![0]));
    }

    #[test]
    fn numbers_saturate() {
        assert_eq!(to_i64(u64::MAX), i64::MAX);
        assert_eq!(to_u64(-1), 0);
        assert_eq!(to_u64(7), 7);
    }
}
