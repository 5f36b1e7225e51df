//! Reads shared by range requests, transaction `Get`s and watch replay: key ranges over the `kv`
//! table and revision ranges over the `log` table, on any redb table (read or write transaction).

use std::ops::Bound;

use redb::{ReadableTable, StorageError};

use super::schema::{Corrupt, decode_events, decode_kv};
use crate::{Event, KeyRange, KeyValue, Revision};

/// A failed read: the file could not be read, or it holds something we never wrote.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Corrupt(#[from] Corrupt),
}

/// Bounds of a key range as redb takes them.
pub(super) type Bounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The redb bounds of a [`KeyRange`], or `None` if it is empty (end before start).
pub(super) fn bounds(range: &KeyRange) -> Option<Bounds<'_>> {
    let start = range.start.as_slice();
    if range.end.is_empty() {
        Some((Bound::Included(start), Bound::Included(start)))
    } else if range.end == [0] {
        Some((Bound::Included(start), Bound::Unbounded))
    } else if range.end.as_slice() <= start {
        None
    } else {
        Some((Bound::Included(start), Bound::Excluded(range.end.as_slice())))
    }
}

/// Up to `limit` keys of `range` (0 = all), ascending, and whether more matched.
pub(super) fn read_range<T>(table: &T, range: &KeyRange, limit: usize) -> Result<(Vec<KeyValue>, bool), ReadError>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
{
    let Some(bounds) = bounds(range) else {
        return Ok((Vec::new(), false));
    };
    let mut kvs = Vec::new();
    for item in table.range::<&[u8]>(bounds)? {
        if limit != 0 && kvs.len() == limit {
            return Ok((kvs, true));
        }
        let (k, v) = item?;
        kvs.push(decode_kv(k.value(), v.value())?);
    }
    Ok((kvs, false))
}

/// Events of revisions `from..=to` in `range`, reading at most `max_revisions` log rows.
/// Returns the events and the last revision read (`from - 1` if none).
pub(super) fn read_log<T>(
    log: &T,
    range: &KeyRange,
    from: Revision,
    to: Revision,
    max_revisions: usize,
) -> Result<(Vec<Event>, Revision), ReadError>
where
    T: ReadableTable<u64, &'static [u8]>,
{
    let mut events = Vec::new();
    let mut last = from.saturating_sub(1);
    if from > to {
        return Ok((events, last));
    }
    for item in log.range(from..=to)?.take(max_revisions) {
        let (rev, data) = item?;
        last = rev.value();
        events.extend(decode_events(last, data.value())?.into_iter().filter(|e| range.contains(&e.kv.key)));
    }
    Ok((events, last))
}
