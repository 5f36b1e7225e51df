//! Snapshot pacing: every snapshot part of every stream on this replica (agent `Sync` and
//! `WatchBindings` alike) is built in one lane, one part at a time in arrival order, and the
//! lane's output is held to a byte rate (`--snapshot-bytes-per-second`).
//!
//! Building a part reads the cache under its read lock and costs CPU in proportion to its bytes,
//! and so does writing it to the client; a flood of streams asking for snapshots at once would
//! otherwise take every worker thread, and the unary calls (heartbeats, reports, reads) would
//! queue behind them. With the lane, snapshot work takes at most one worker at a time and no more
//! than the rate allows; the streams share it fairly (first come, first served, one part each).
//! Deltas are not paced here: they are small, encoded once for every stream, and each stream
//! already spaces them (`stream::agent`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Most bytes the rate may run ahead by (a small snapshot goes out at once): a second's worth of
/// the rate, at most this.
pub const BURST_BYTES: u64 = 4 << 20;

/// The replica's snapshot lane.
#[derive(Debug)]
pub struct SnapshotPacer {
    lane: Semaphore,
    /// Bytes per second; 0 = unpaced (the lane still serialises).
    rate: u64,
    /// Bytes the rate may run ahead by.
    burst: u64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be produced now (negative: the debt of the last part).
    tokens: f64,
    refilled: Instant,
}

impl SnapshotPacer {
    /// A lane producing at most `bytes_per_second` (0 = no rate limit).
    pub fn new(bytes_per_second: u64) -> SnapshotPacer {
        let burst = bytes_per_second.min(BURST_BYTES);
        SnapshotPacer {
            lane: Semaphore::new(1),
            rate: bytes_per_second,
            burst,
            bucket: Mutex::new(Bucket { tokens: burst as f64, refilled: Instant::now() }),
        }
    }

    /// Builds one part with `build` (which returns the part and its size in bytes) when the lane
    /// is free, then holds the lane until the rate allows the part's bytes; returns the part.
    pub async fn part<R>(&self, build: impl FnOnce() -> (R, usize)) -> R {
        let _lane = self.lane.acquire().await.expect("the lane is never closed");
        let (part, bytes) = build();
        let wait = self.charge(bytes as u64, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        part
    }

    /// Takes `bytes` from the bucket at `now`; returns how long until the bucket is out of debt.
    fn charge(&self, bytes: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate as f64;
        let mut bucket = self.bucket.lock().expect("pacer lock");
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(self.burst as f64) - bytes as f64;
        bucket.refilled = now;
        if bucket.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-bucket.tokens / rate) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_holds_after_the_burst() {
        let pacer = SnapshotPacer::new(64 << 20);
        let t0 = Instant::now();
        assert_eq!(pacer.charge(BURST_BYTES, t0), Duration::ZERO, "the burst goes at once");
        assert_eq!(pacer.charge(32 << 20, t0), Duration::from_millis(500), "then 64 MiB/s");
        // Half a second later the debt is paid; 16 MiB more cost a quarter second.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(pacer.charge(16 << 20, t1), Duration::from_millis(250));
        // Idle time refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(pacer.charge(BURST_BYTES, t2), Duration::ZERO);
        assert!(pacer.charge(1, t2) > Duration::ZERO);
    }

    #[test]
    fn a_slow_rate_bursts_one_seconds_worth() {
        let pacer = SnapshotPacer::new(1 << 20);
        let t0 = Instant::now();
        assert_eq!(pacer.charge(1 << 20, t0), Duration::ZERO);
        assert_eq!(pacer.charge(1 << 19, t0), Duration::from_millis(500));
    }

    #[test]
    fn unpaced_never_waits() {
        let pacer = SnapshotPacer::new(0);
        assert_eq!(pacer.charge(u64::MAX / 2, Instant::now()), Duration::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_part_at_a_time() {
        let pacer = std::sync::Arc::new(SnapshotPacer::new(0));
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (pacer, busy) = (pacer.clone(), busy.clone());
                tokio::spawn(async move {
                    pacer
                        .part(|| {
                            assert!(!busy.swap(true, std::sync::atomic::Ordering::SeqCst), "two parts at once");
                            std::thread::sleep(Duration::from_millis(2));
                            busy.store(false, std::sync::atomic::Ordering::SeqCst);
                            ((), 1)
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
}
