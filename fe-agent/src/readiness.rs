//! Whether this FE may attract traffic, as `/readyz` reports it and the BGP advertiser judges it:
//! a complete desired state has been applied, and a controller stream is up or went away less
//! than the headless grace period ago. The engine writes it; readers only load. It also carries
//! which data plane runs and why, for the `/readyz` body.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use victor_proto::clock::monotonic_ns;

/// Readiness as /readyz reports it.
#[derive(Debug)]
pub struct Readiness {
    /// A stream is up.
    pub connected: AtomicBool,
    /// A complete snapshot has been applied.
    pub synced: AtomicBool,
    /// Last time (monotonic ns) a stream message arrived.
    pub last_message_mono: AtomicU64,
    /// Headless grace (ns).
    pub grace_ns: u64,
    /// The data plane running and why (set once at start).
    dataplane: OnceLock<String>,
}

impl Readiness {
    /// Not connected, not synced; the headless clock starts now.
    pub fn new(grace_ns: u64) -> Self {
        Readiness {
            connected: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            last_message_mono: AtomicU64::new(monotonic_ns()),
            grace_ns,
            dataplane: OnceLock::new(),
        }
    }

    /// Records which data plane runs and why (e.g. `kernel (auto: ...)`); the first call wins.
    pub fn set_dataplane(&self, text: String) {
        let _ = self.dataplane.set(text);
    }

    /// Which data plane runs and why, if recorded.
    pub fn dataplane(&self) -> Option<&str> {
        self.dataplane.get().map(String::as_str)
    }

    /// Ready: synced, and connected or headless for less than the grace period.
    pub fn check(&self) -> Result<(), String> {
        if !self.synced.load(Ordering::Relaxed) {
            return Err("no complete desired state from a controller yet".into());
        }
        if self.connected.load(Ordering::Relaxed) {
            return Ok(());
        }
        let silent = monotonic_ns().saturating_sub(self.last_message_mono.load(Ordering::Relaxed));
        if silent < self.grace_ns {
            Ok(())
        } else {
            Err(format!("headless for {} s (grace {} s)", silent / 1_000_000_000, self.grace_ns / 1_000_000_000))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_synced_and_connected_or_headless_within_the_grace() {
        let r = Readiness::new(u64::MAX);
        assert!(r.check().unwrap_err().contains("no complete desired state"));
        r.synced.store(true, Ordering::Relaxed);
        assert_eq!(r.check(), Ok(()), "headless, within the grace");
        let strict = Readiness { grace_ns: 0, ..Readiness::new(0) };
        strict.synced.store(true, Ordering::Relaxed);
        assert!(strict.check().unwrap_err().contains("headless"));
        strict.connected.store(true, Ordering::Relaxed);
        assert_eq!(strict.check(), Ok(()));
    }
}
