//! The agent's wall clock ([`WallClock`]): the host's, shifted by the test-only `--clock-offset`,
//! for every wall-clock time the agent stamps — observation times (including the kernel's ARP
//! capture times), GONE times, move-hint send times. Nothing in VICTOR compares two FEs' clocks
//! (docs/design.md, section 3); the offset lets a lab prove it by running FEs whose clocks
//! disagree. And [`Stamps`]: observation times that only go forwards within this process, as the
//! controller requires of one FE's reports of a VM.

use victor_proto::clock::unix_nanos;

/// The host's wall clock plus a fixed offset (0 in production).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    offset_ns: i64,
}

impl WallClock {
    /// The host's clock shifted by `offset_ns`.
    pub fn with_offset(offset_ns: i64) -> Self {
        WallClock { offset_ns }
    }

    /// Now, in Unix ns.
    pub fn now(&self) -> i64 {
        self.shift(unix_nanos())
    }

    /// A time the host's clock gave (a kernel capture time), on this clock.
    pub fn shift(&self, host_unix_nanos: i64) -> i64 {
        host_unix_nanos.saturating_add(self.offset_ns)
    }
}

/// Observation stamps of this process: each is `max(time, previous + 1)`, so two observations of
/// this FE never share a time or go backwards, even when the clock is stepped back.
#[derive(Debug, Default)]
pub struct Stamps {
    last: i64,
}

impl Stamps {
    /// The stamp for an observation made at `wall`.
    pub fn stamp(&mut self, wall: i64) -> i64 {
        self.last = wall.max(self.last.saturating_add(1));
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_only_go_forwards_and_the_offset_shifts_every_time() {
        let mut s = Stamps::default();
        assert_eq!((s.stamp(100), s.stamp(100), s.stamp(50), s.stamp(200)), (100, 101, 102, 200));
        let behind = WallClock::with_offset(-5_000_000_000);
        assert_eq!(behind.shift(10_000_000_000), 5_000_000_000);
        let (host, shifted) = (unix_nanos(), behind.now());
        assert!((host - shifted - 5_000_000_000).abs() < 1_000_000_000, "{host} vs {shifted}");
    }
}
