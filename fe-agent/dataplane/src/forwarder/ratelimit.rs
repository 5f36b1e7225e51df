//! The forwarder's ICMP error rate limit: a token bucket shared by the workers (RFC 1812
//! §4.3.2.8 asks routers to limit the ICMP errors they originate; Linux's own default is 1000
//! per second with a burst of 50).

use std::time::Instant;

/// `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A rate of 0 never allows anything.
    pub(crate) fn new(rate_per_s: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(rate_per_s), burst, tokens: burst, last: now }
    }

    /// Takes one token if there is one at `now`.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return false;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 5, t0);
        let allowed = (0..20).filter(|_| b.allow(t0)).count();
        assert_eq!(allowed, 5, "the burst");
        assert!(!b.allow(t0 + Duration::from_millis(5)), "half a token after 5 ms");
        assert!(b.allow(t0 + Duration::from_millis(10)), "one token after 10 ms");
        // One second later the bucket holds the burst again, not 100 tokens.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..200).filter(|_| b.allow(t1)).count(), 5);
        // Over a second at a steady pace, about `rate` get through.
        let mut n = 0;
        for ms in 0..1000u64 {
            n += usize::from(b.allow(t1 + Duration::from_millis(ms)));
        }
        assert!((99..=101).contains(&n), "{n}");
    }

    #[test]
    fn zero_rate_allows_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 10, t0);
        assert!(!b.allow(t0 + Duration::from_secs(5)));
    }
}
