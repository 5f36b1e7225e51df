//! The embedded store's on-disk layout (redb tables) and its value codecs.
//!
//! * `kv`: key → [`KvMeta`] (create/mod revision, version, lease; 32 bytes, little endian) + value.
//! * `log`: revision → every event of that revision ([`encode_events`]), for watch replay.
//! * `meta`: `"revision"`, `"compacted"`, `"lease_seq"` → u64.
//! * `leases`: lease id → TTL in seconds.
//! * `lease_keys`: lease id (8 bytes big endian) ++ key → (), to find a lease's keys on revoke.
//!
//! The encodings are deliberately flat so that reading a million keys is a memcpy per key.

use redb::TableDefinition;

use crate::{Event, EventKind, KeyValue, LeaseId, Revision};

pub(super) const KV: TableDefinition<'static, &'static [u8], &'static [u8]> = TableDefinition::new("kv");
pub(super) const LOG: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("log");
pub(super) const META: TableDefinition<'static, &'static str, u64> = TableDefinition::new("meta");
pub(super) const LEASES: TableDefinition<'static, i64, u64> = TableDefinition::new("leases");
pub(super) const LEASE_KEYS: TableDefinition<'static, &'static [u8], ()> = TableDefinition::new("lease_keys");

pub(super) const META_REVISION: &str = "revision";
pub(super) const META_COMPACTED: &str = "compacted";
pub(super) const META_LEASE_SEQ: &str = "lease_seq";

/// Metadata stored in front of every value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct KvMeta {
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: u64,
    pub lease: LeaseId,
}

const META_LEN: usize = 32;

/// Corrupt bytes in the file (never produced by this module).
#[derive(Debug, thiserror::Error)]
#[error("corrupt embedded store record: {0}")]
pub(super) struct Corrupt(&'static str);

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// `meta` ++ `value`.
pub(super) fn encode_kv(meta: &KvMeta, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(META_LEN + value.len());
    out.extend_from_slice(&meta.create_revision.to_le_bytes());
    out.extend_from_slice(&meta.mod_revision.to_le_bytes());
    out.extend_from_slice(&meta.version.to_le_bytes());
    out.extend_from_slice(&meta.lease.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// The metadata of an encoded record.
pub(super) fn decode_meta(record: &[u8]) -> Result<KvMeta, Corrupt> {
    if record.len() < META_LEN {
        return Err(Corrupt("kv record shorter than its header"));
    }
    Ok(KvMeta {
        create_revision: u64_at(record, 0),
        mod_revision: u64_at(record, 8),
        version: u64_at(record, 16),
        lease: u64_at(record, 24) as i64,
    })
}

/// The value part of a record (whose header [`decode_meta`] accepted).
pub(super) fn record_value(record: &[u8]) -> &[u8] {
    &record[META_LEN..]
}

/// A full [`KeyValue`] from a key and its record.
pub(super) fn decode_kv(key: &[u8], record: &[u8]) -> Result<KeyValue, Corrupt> {
    let meta = decode_meta(record)?;
    Ok(KeyValue {
        key: key.to_vec(),
        value: record[META_LEN..].to_vec(),
        create_revision: meta.create_revision,
        mod_revision: meta.mod_revision,
        version: meta.version,
        lease: meta.lease,
    })
}

/// The `lease_keys` entry of `key` attached to `lease`.
pub(super) fn lease_key(lease: LeaseId, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&(lease as u64).to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// Events of one revision: `count:u32`, then per event `kind:u8 key_len:u32 key`, and for puts
/// `create:u64 version:u64 lease:i64 value_len:u32 value`. The revision is the log row's key.
pub(super) fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for ev in events {
        let kv = &ev.kv;
        out.push(match ev.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        out.extend_from_slice(&(kv.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&kv.key);
        if ev.kind == EventKind::Put {
            out.extend_from_slice(&kv.create_revision.to_le_bytes());
            out.extend_from_slice(&kv.version.to_le_bytes());
            out.extend_from_slice(&kv.lease.to_le_bytes());
            out.extend_from_slice(&(kv.value.len() as u32).to_le_bytes());
            out.extend_from_slice(&kv.value);
        }
    }
    out
}

/// Decodes the events of `revision`.
pub(super) fn decode_events(revision: Revision, mut b: &[u8]) -> Result<Vec<Event>, Corrupt> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], Corrupt> {
        if b.len() < n {
            return Err(Corrupt("truncated event log record"));
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Ok(head)
    }
    fn u32_of(b: &mut &[u8]) -> Result<usize, Corrupt> {
        Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64_of(b: &mut &[u8]) -> Result<u64, Corrupt> {
        Ok(u64::from_le_bytes(take(b, 8)?.try_into().expect("8 bytes")))
    }
    let count = u32_of(&mut b)?;
    let mut events = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let kind = take(&mut b, 1)?[0];
        let key_len = u32_of(&mut b)?;
        let key = take(&mut b, key_len)?.to_vec();
        let ev = match kind {
            0 => {
                let create_revision = u64_of(&mut b)?;
                let version = u64_of(&mut b)?;
                let lease = u64_of(&mut b)? as i64;
                let value_len = u32_of(&mut b)?;
                let value = take(&mut b, value_len)?.to_vec();
                Event {
                    kind: EventKind::Put,
                    kv: KeyValue { key, value, create_revision, mod_revision: revision, version, lease },
                }
            }
            1 => Event { kind: EventKind::Delete, kv: KeyValue { key, mod_revision: revision, ..KeyValue::default() } },
            _ => return Err(Corrupt("unknown event kind")),
        };
        events.push(ev);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = Event> {
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 1..20),
            proptest::collection::vec(any::<u8>(), 0..40),
            1..1000u64,
            1..50u64,
            any::<i64>(),
        )
            .prop_map(|(put, key, value, create, version, lease)| {
                if put {
                    Event {
                        kind: EventKind::Put,
                        kv: KeyValue { key, value, create_revision: create, mod_revision: 77, version, lease },
                    }
                } else {
                    Event { kind: EventKind::Delete, kv: KeyValue { key, mod_revision: 77, ..KeyValue::default() } }
                }
            })
    }

    proptest! {
        #[test]
        fn events_round_trip(events in proptest::collection::vec(event(), 0..10)) {
            let decoded = decode_events(77, &encode_events(&events)).unwrap();
            prop_assert_eq!(decoded, events);
        }

        #[test]
        fn kv_round_trip(key in proptest::collection::vec(any::<u8>(), 1..20),
                         value in proptest::collection::vec(any::<u8>(), 0..40),
                         c in any::<u64>(), m in any::<u64>(), v in any::<u64>(), l in any::<i64>()) {
            let meta = KvMeta { create_revision: c, mod_revision: m, version: v, lease: l };
            let rec = encode_kv(&meta, &value);
            prop_assert_eq!(decode_meta(&rec).unwrap(), meta);
            let kv = decode_kv(&key, &rec).unwrap();
            prop_assert_eq!(kv.value, value);
            prop_assert_eq!(kv.lease, l);
        }
    }

    #[test]
    fn truncated_records_are_errors() {
        assert!(decode_meta(&[0; 31]).is_err());
        let ev = Event { kind: EventKind::Delete, kv: KeyValue { key: b"k".to_vec(), ..KeyValue::default() } };
        let rec = encode_events(&[ev]);
        assert!(decode_events(1, &rec[..rec.len() - 1]).is_err());
    }
}
