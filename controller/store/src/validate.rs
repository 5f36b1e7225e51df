//! Request checks shared by both backends, so that both reject the same requests with the same
//! errors before anything is sent or written (etcd 3.4's rules: `--max-txn-ops` per list, no
//! empty keys, a branch may not put one key twice nor put a key it also deletes).

use std::collections::HashSet;

use crate::{KeyRange, MAX_TXN_OPS, StoreError, StoreResult, Txn, TxnOp};

/// Checks a transaction: size, keys, and each branch's put/delete overlaps.
pub(crate) fn check_txn(txn: &Txn) -> StoreResult<()> {
    let ops = txn.compares.len().max(txn.success.len()).max(txn.failure.len());
    if ops > MAX_TXN_OPS {
        return Err(StoreError::TooManyOps { ops, max: MAX_TXN_OPS });
    }
    if txn.compares.iter().any(|c| c.key.is_empty()) {
        return Err(StoreError::InvalidArgument("a transaction compare has an empty key".into()));
    }
    check_branch(&txn.success, "success")?;
    check_branch(&txn.failure, "failure")
}

fn check_branch(ops: &[TxnOp], branch: &str) -> StoreResult<()> {
    let mut deletes = Vec::new();
    for op in ops {
        match op {
            TxnOp::Put { key, .. } if key.is_empty() => {
                return Err(StoreError::InvalidArgument(format!("a put in the {branch} branch has an empty key")));
            }
            TxnOp::Put { .. } => {}
            TxnOp::Delete(range) => {
                check_range(range)?;
                deletes.push(range);
            }
            TxnOp::Get(range) => check_range(range)?,
        }
    }
    let mut puts = HashSet::new();
    for op in ops {
        let TxnOp::Put { key, .. } = op else { continue };
        if !puts.insert(key.as_slice()) {
            return Err(StoreError::InvalidArgument(format!(
                "key {} is put twice in the {branch} branch of one transaction",
                show_key(key)
            )));
        }
        if deletes.iter().any(|r| r.contains(key)) {
            return Err(StoreError::InvalidArgument(format!(
                "key {} is both put and deleted in the {branch} branch of one transaction",
                show_key(key)
            )));
        }
    }
    Ok(())
}

/// A range needs a key (an empty start is only allowed with an end: "from the first key").
pub(crate) fn check_range(range: &KeyRange) -> StoreResult<()> {
    if range.start.is_empty() && range.end.is_empty() {
        return Err(StoreError::InvalidArgument("empty key: give a key, or a range with an end".into()));
    }
    Ok(())
}

/// A key for error messages (lossy UTF-8, quoted).
pub(crate) fn show_key(key: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Compare;

    fn txn(success: Vec<TxnOp>) -> Txn {
        Txn { success, ..Txn::default() }
    }

    #[test]
    fn limits_each_list_to_max_ops() {
        let ops = |n: usize| (0..n).map(|i| TxnOp::put(format!("k{i}"), "v")).collect();
        assert!(check_txn(&txn(ops(MAX_TXN_OPS))).is_ok());
        assert_eq!(
            check_txn(&txn(ops(MAX_TXN_OPS + 1))),
            Err(StoreError::TooManyOps { ops: MAX_TXN_OPS + 1, max: MAX_TXN_OPS })
        );
        let compares = (0..=MAX_TXN_OPS).map(|i| Compare::absent(format!("k{i}"))).collect();
        let t = Txn { compares, ..Txn::default() };
        assert!(matches!(check_txn(&t), Err(StoreError::TooManyOps { .. })));
    }

    #[test]
    fn rejects_duplicate_and_overlapping_writes() {
        let dup = txn(vec![TxnOp::put("a", "1"), TxnOp::put("a", "2")]);
        assert!(matches!(check_txn(&dup), Err(StoreError::InvalidArgument(_))));
        let overlap = txn(vec![TxnOp::Delete(KeyRange::prefix("/x/")), TxnOp::put("/x/1", "v")]);
        assert!(matches!(check_txn(&overlap), Err(StoreError::InvalidArgument(_))));
        // Two deletes may overlap, and a get may read a put key.
        let ok = txn(vec![
            TxnOp::Delete(KeyRange::prefix("/x/")),
            TxnOp::delete("/x/1"),
            TxnOp::put("/y", "v"),
            TxnOp::Get(KeyRange::key("/y")),
        ]);
        assert_eq!(check_txn(&ok), Ok(()));
    }

    #[test]
    fn rejects_empty_keys() {
        assert!(check_txn(&txn(vec![TxnOp::put("", "v")])).is_err());
        assert!(check_txn(&txn(vec![TxnOp::delete("")])).is_err());
        assert!(check_range(&KeyRange::prefix("")).is_ok());
    }
}
