//! Exponential backoff between retries, the one every VICTOR retry loop uses: the agent's
//! controller failover and claim reporter, its BGP reconnects, the controller's store loader.

use std::time::Duration;

/// Delays that start at `first` and double up to `max`; [`reset`](Backoff::reset) after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    current: Duration,
    jitter: bool,
}

impl Backoff {
    /// From `first` doubling up to `max`, each delay varied by ±25 % so that clients that failed
    /// together do not retry together.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max, current: first, jitter: true }
    }

    /// From `first` doubling up to `max`, exactly.
    pub fn exact(first: Duration, max: Duration) -> Self {
        Backoff { jitter: false, ..Backoff::new(first, max) }
    }

    /// The next delay (and doubles the one after).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        if self.jitter { base.mul_f64(rand::random_range(0.75..1.25)) } else { base }
    }

    /// Sleeps for the next delay.
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.current = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert!((75..=125).contains(&d[0]) && (150..=250).contains(&d[1]) && (300..=500).contains(&d[3]), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn exact_delays_have_no_jitter() {
        let mut b = Backoff::exact(Duration::from_millis(50), Duration::from_millis(800));
        let d: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [50, 100, 200, 400, 800, 800]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }
}
