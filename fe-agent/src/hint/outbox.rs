//! The hints this FE sent and still answers for, pure: one per VM whose claim is pending. When the
//! controller rejects the claim the hint is cancelled (the receivers revert at once instead of
//! waiting for their timeout); when it accepts, the stream confirms it and nothing more is sent.

use std::collections::HashMap;
use std::net::IpAddr;

/// A move hint sent for a pending claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// VM MAC.
    pub mac: [u8; 6],
    /// The binding version the move follows.
    pub move_seq: u64,
    /// Observation time of the claim (wall ns): identifies the claim its answer is for.
    pub observed_at: i64,
    /// When it was sent (monotonic ns).
    pub sent_mono: u64,
}

/// The hints sent.
#[derive(Debug)]
pub struct Outbox {
    keep_ns: u64,
    by_ip: HashMap<IpAddr, Sent>,
}

impl Outbox {
    /// Hints are forgotten `keep_ns` after sending (the receivers' overrides have expired by then).
    pub fn new(keep_ns: u64) -> Self {
        Outbox { keep_ns, by_ip: HashMap::new() }
    }

    /// A hint for `ip` went out (replaces an older one for the same VM).
    pub fn sent(&mut self, ip: IpAddr, sent: Sent) {
        self.by_ip.insert(ip, sent);
    }

    /// The claim of `ip` observed at `observed_at` was answered. Returns the hint to cancel when
    /// the claim was rejected.
    pub fn resolved(&mut self, ip: IpAddr, observed_at: i64, rejected: bool) -> Option<Sent> {
        let sent = self.by_ip.get(&ip).filter(|s| s.observed_at == observed_at).copied()?;
        self.by_ip.remove(&ip);
        rejected.then_some(sent)
    }

    /// Forgets hints sent before `now - keep`.
    pub fn expire(&mut self, now: u64) {
        let keep = self.keep_ns;
        self.by_ip.retain(|_, s| now.saturating_sub(s.sent_mono) < keep);
    }

    /// Hints outstanding.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 10, 0, 11));

    fn sent(observed_at: i64, at: u64) -> Sent {
        Sent { mac: [2, 0, 0, 0, 0, 0x11], move_seq: 4, observed_at, sent_mono: at }
    }

    #[test]
    fn a_rejection_cancels_an_acceptance_forgets() {
        let mut o = Outbox::new(10);
        o.sent(VM, sent(100, 0));
        assert_eq!(o.resolved(VM, 99, true), None, "an answer to an older claim");
        assert_eq!(o.resolved(VM, 100, true), Some(sent(100, 0)));
        assert!(o.is_empty());
        o.sent(VM, sent(200, 0));
        assert_eq!(o.resolved(VM, 200, false), None);
        assert!(o.is_empty(), "accepted: the stream confirms, nothing more to send");
    }

    #[test]
    fn old_hints_are_forgotten() {
        let mut o = Outbox::new(10);
        o.sent(VM, sent(100, 5));
        o.expire(14);
        assert_eq!(o.len(), 1);
        o.expire(15);
        assert!(o.is_empty());
    }
}
