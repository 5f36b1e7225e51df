//! Storm protection: a token bucket per source — per frame source on the VM ports (sender MAC
//! and sender IP of an ARP, RARP or NDP frame), per sending FE for move hints. Frames over the budget are dropped before they reach
//! learning, answering or the controller. Pure: time is passed in (CLOCK_MONOTONIC ns).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

/// A VM-port frame's source: sender MAC and sender IP
/// ([`victor_dataplane::neigh_io::Frame::source`]).
pub type FrameSource = ([u8; 6], IpAddr);

/// Most sources tracked; beyond it, unknown sources share one bucket (a flood of spoofed sources
/// cannot grow memory without bound).
const MAX_SOURCES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ns: u64,
}

/// Per-source token buckets, keyed by `K`.
#[derive(Debug)]
pub struct RateLimiter<K = FrameSource> {
    rate_per_ns: f64,
    burst: f64,
    buckets: HashMap<K, Bucket>,
    overflow: Bucket,
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// `rate` frames per second with bursts of `burst` frames, per source.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate_per_ns: f64::from(rate) / 1e9,
            burst,
            buckets: HashMap::new(),
            overflow: Bucket { tokens: burst, last_ns: 0 },
        }
    }

    /// True if a frame from `source` at `now_ns` is within budget (and takes a token).
    pub fn allow(&mut self, source: K, now_ns: u64) -> bool {
        let (rate, burst) = (self.rate_per_ns, self.burst);
        let full = self.buckets.len() >= MAX_SOURCES;
        let bucket = match self.buckets.get_mut(&source) {
            Some(b) => b,
            None if full => &mut self.overflow,
            None => self.buckets.entry(source).or_insert(Bucket { tokens: burst, last_ns: now_ns }),
        };
        let elapsed = now_ns.saturating_sub(bucket.last_ns) as f64;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last_ns = now_ns;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets sources whose bucket has refilled (they would start full anyway).
    pub fn gc(&mut self, now_ns: u64) {
        let (rate, burst) = (self.rate_per_ns, self.burst);
        self.buckets.retain(|_, b| b.tokens + now_ns.saturating_sub(b.last_ns) as f64 * rate < burst);
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_rate_per_source() {
        let mut rl: RateLimiter = RateLimiter::new(10, 5);
        let (a, b) = (
            ([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 10, 0, 1).into()),
            ([2, 0, 0, 0, 0, 2], Ipv4Addr::new(10, 10, 0, 2).into()),
        );
        let allowed = (0..100).filter(|_| rl.allow(a, 0)).count();
        assert_eq!(allowed, 5, "burst");
        assert!(rl.allow(b, 0), "another source has its own bucket");
        assert!(!rl.allow(a, 50 * MS), "half a token after 50 ms at 10/s");
        assert!(rl.allow(a, 100 * MS), "one token after 100 ms");
        // A steady storm of 1000 frames/s for one second gets ~rate through.
        let through = (0..1000).filter(|i| rl.allow(a, 200 * MS + i * MS)).count();
        assert!((9..=11).contains(&through), "{through}");
    }

    #[test]
    fn gc_forgets_refilled_sources() {
        let mut rl: RateLimiter = RateLimiter::new(10, 5);
        assert!(rl.allow(([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 10, 0, 1).into()), 0));
        rl.gc(10 * MS);
        assert_eq!(rl.len(), 1, "still refilling");
        rl.gc(1000 * MS);
        assert!(rl.is_empty());
    }
}
