//! Pure arithmetic of the benchmark: percentiles, the spread of repeated runs, per-move
//! convergence from the agents' apply logs, and the heap size of the simulated agents' map. No
//! IO, no clocks.

use serde::Serialize;

/// p50 / p99 / max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (any order); all zero for an empty sample.
    pub fn of(values: &[f64]) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Percentiles { p50: rank(&v, 0.50), p99: rank(&v, 0.99), max: *v.last().expect("non-empty") }
    }

    /// Rounded to microseconds (readable JSON).
    pub fn rounded(self) -> Percentiles {
        Percentiles { p50: round3(self.p50), p99: round3(self.p99), max: round3(self.max) }
    }
}

/// min / median / max of one figure over repeated runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Smallest value.
    pub min: f64,
    /// Median (the mean of the two middle values for an even count).
    pub median: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (any order; NaNs are left out); all zero for an empty sample.
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Spread { min: round3(v[0]), median: round3(median), max: round3(v[n - 1]) }
    }
}

fn rank(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
    sorted[idx]
}

/// Rounds to three decimals.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One committed update whose delivery is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Store revision of the commit.
    pub revision: u64,
    /// When the claim was sent (CLOCK_MONOTONIC ns).
    pub claimed_ns: u64,
}

/// For every committed update (sorted by revision), the time the *last* agent applied a message
/// that brought it to that revision or beyond, or `None` if some agent never got there.
///
/// `logs` holds, per agent, `(revision, applied_ns)` of every message it applied, in stream order
/// (revisions never decrease along a stream). A message at revision `r` means the agent holds
/// every change up to `r`, so the first message at or past a commit's revision is when that
/// agent applied it (or a newer value of the same key).
pub fn last_applied(committed: &[Committed], logs: &[&[(u64, u64)]]) -> Vec<Option<u64>> {
    debug_assert!(committed.windows(2).all(|w| w[0].revision <= w[1].revision));
    let mut last: Vec<Option<u64>> = vec![Some(0); committed.len()];
    for log in logs {
        let mut p = 0;
        for (j, c) in committed.iter().enumerate() {
            while p < log.len() && log[p].0 < c.revision {
                p += 1;
            }
            match (log.get(p), &mut last[j]) {
                (Some(&(_, at)), Some(prev)) => *prev = (*prev).max(at),
                (None, slot) => *slot = None,
                (Some(_), None) => {}
            }
        }
    }
    last
}

/// Heap bytes of a `std::collections::HashMap<K, V>` with the given `capacity()` (hashbrown's
/// layout: a power-of-two number of buckets holding `(K, V)` plus one control byte each and a
/// 16-byte trailing group). Checked against a counting allocator in `tests/bench_smoke.rs`.
pub fn hash_map_heap_bytes(capacity: usize, entry_size: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 { capacity + 1 } else { capacity / 7 * 8 };
    const GROUP: usize = 16;
    let data = (buckets * entry_size).div_ceil(GROUP) * GROUP;
    data + buckets + GROUP
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Percentiles::of(&v), Percentiles { p50: 50.0, p99: 99.0, max: 100.0 });
        assert_eq!(Percentiles::of(&[3.0]), Percentiles { p50: 3.0, p99: 3.0, max: 3.0 });
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
    }

    #[test]
    fn spread_min_median_max() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Spread { min: 1.0, median: 2.0, max: 3.0 });
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 10.0]), Spread { min: 1.0, median: 3.0, max: 10.0 });
        assert_eq!(Spread::of(&[f64::NAN, 5.0]), Spread { min: 5.0, median: 5.0, max: 5.0 });
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn last_applied_takes_the_slowest_agent_and_flags_undelivered() {
        let c = |revision| Committed { revision, claimed_ns: 0 };
        let committed = [c(10), c(12), c(20)];
        let fast = [(11, 100), (20, 200)];
        let slow = [(10, 150), (15, 300), (25, 400)];
        let behind = [(12, 120)];
        assert_eq!(last_applied(&committed, &[&fast, &slow]), vec![Some(150), Some(300), Some(400)]);
        assert_eq!(last_applied(&committed, &[&fast, &behind]), vec![Some(120), Some(200), None]);
        assert_eq!(last_applied(&committed, &[]), vec![Some(0); 3]);
    }

    #[test]
    fn hash_map_sizes() {
        assert_eq!(hash_map_heap_bytes(0, 36), 0);
        // 3 items → 4 buckets.
        assert_eq!(hash_map_heap_bytes(3, 36), 144 + 4 + 16);
        // 896 usable → 1024 buckets.
        assert_eq!(hash_map_heap_bytes(896, 40), 1024 * 40 + 1024 + 16);
    }
}
