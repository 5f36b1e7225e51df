//! Provisional overrides from accepted move hints, pure (time passed in as CLOCK_MONOTONIC ns):
//! VM → Remote(new FE) in front of the desired state, for one VM each, until
//!
//! * the desired state moves past the hinted version ([`Overrides::desired_changed`]): a binding
//!   with a higher move_seq at the hinted FE *confirms* it, anything else (another FE won, the
//!   binding was removed) *supersedes* it — either way the authoritative state takes over;
//! * the sender cancels it (its claim was rejected) — [`Overrides::cancel`];
//! * the sender is no longer a registered, up FE at the same underlay address —
//!   [`Overrides::senders_changed`];
//! * no confirmation arrived within the timeout — [`Overrides::expire`].
//!
//! Two hints for the same move (two FEs both heard the VM before either's claim committed) cannot
//! be ranked without comparing the two FEs' clocks, which nothing in VICTOR does: the first one
//! accepted holds (its claim most likely commits first: the controller takes the first of such
//! concurrent claims, docs/design.md section 3) until the controller's answer ends it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::accept::Reject;
use crate::state::desired::FeIdx;

/// One override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// The new FE (the hint's sender).
    pub fe: FeIdx,
    /// Its id.
    pub fe_id: Arc<str>,
    /// Its underlay address (the tunnel peer).
    pub peer: Ipv4Addr,
    /// The hinted binding version (the move makes `move_seq + 1`).
    pub move_seq: u64,
    /// Observation time of the capture at the new FE (wall ns, that FE's clock; informational).
    pub observed_at: i64,
    /// When it was accepted (monotonic ns).
    pub accepted_mono: u64,
    /// When it expires without confirmation (monotonic ns).
    pub expires: u64,
}

/// How an override ended (the `how` label of `victor_agent_move_hint_overrides_ended_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The controller committed the hinted move.
    Confirmed,
    /// The controller decided otherwise (another FE, or no binding).
    Superseded,
    /// No confirmation within the timeout: back to the desired state.
    Expired,
    /// The sender's claim was rejected.
    Cancelled,
    /// The sender left, went down or changed its underlay address.
    PeerDown,
    /// A hint for a later move of the VM replaced it.
    Replaced,
}

impl End {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            End::Confirmed => "confirmed",
            End::Superseded => "superseded",
            End::Expired => "expired",
            End::Cancelled => "cancelled",
            End::PeerDown => "peer_down",
            End::Replaced => "replaced",
        }
    }
}

/// The overrides in force.
#[derive(Debug)]
pub struct Overrides {
    timeout_ns: u64,
    cap: usize,
    by_ip: HashMap<IpAddr, Override>,
}

impl Overrides {
    /// Overrides that expire `timeout_ns` after acceptance; at most `cap` at once.
    pub fn new(timeout_ns: u64, cap: usize) -> Self {
        Overrides { timeout_ns, cap, by_ip: HashMap::new() }
    }

    /// The tunnel peer overriding the desired state for `ip`.
    pub fn peer(&self, ip: IpAddr) -> Option<Ipv4Addr> {
        self.by_ip.get(&ip).map(|o| o.peer)
    }

    /// The override of `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<&Override> {
        self.by_ip.get(&ip)
    }

    /// Number in force.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Offers an accepted hint for `ip` at `now` (`o.accepted_mono` and `o.expires` are set here).
    /// Returns the override it replaced, if any.
    pub fn offer(&mut self, ip: IpAddr, mut o: Override, now: u64) -> Result<Option<Override>, Reject> {
        o.accepted_mono = now;
        o.expires = now.saturating_add(self.timeout_ns);
        match self.by_ip.get(&ip) {
            Some(cur) if cur.fe == o.fe && cur.move_seq == o.move_seq => Err(Reject::Duplicate),
            Some(cur) if cur.move_seq == o.move_seq => Err(Reject::Outranked),
            Some(_) => Ok(self.by_ip.insert(ip, o)),
            None if self.by_ip.len() >= self.cap => Err(Reject::TooMany),
            None => Ok(self.by_ip.insert(ip, o)),
        }
    }

    /// The sender `fe` cancels its hint for `ip` after version `move_seq`.
    pub fn cancel(&mut self, ip: IpAddr, fe: FeIdx, move_seq: u64) -> Result<Override, Reject> {
        match self.by_ip.get(&ip) {
            Some(o) if o.fe == fe && o.move_seq == move_seq => Ok(self.by_ip.remove(&ip).expect("present")),
            _ => Err(Reject::NoOverride),
        }
    }

    /// The desired binding of `ip` changed to `binding` (FE, move_seq), or was removed.
    pub fn desired_changed(&mut self, ip: IpAddr, binding: Option<(FeIdx, u64)>) -> Option<(Override, End)> {
        let o = self.by_ip.get(&ip)?;
        let end = match binding {
            None => End::Superseded,
            Some((fe, seq)) if seq > o.move_seq => {
                if fe == o.fe {
                    End::Confirmed
                } else {
                    End::Superseded
                }
            }
            Some(_) => return None,
        };
        self.by_ip.remove(&ip).map(|o| (o, end))
    }

    /// Ends every override whose sender no longer passes `still_valid(fe, peer)`.
    pub fn senders_changed(&mut self, still_valid: impl Fn(FeIdx, Ipv4Addr) -> bool) -> Vec<(IpAddr, Override)> {
        self.take(|o| !still_valid(o.fe, o.peer))
    }

    /// Ends every override unconfirmed at `now`.
    pub fn expire(&mut self, now: u64) -> Vec<(IpAddr, Override)> {
        self.take(|o| now >= o.expires)
    }

    fn take(&mut self, pred: impl Fn(&Override) -> bool) -> Vec<(IpAddr, Override)> {
        let ips: Vec<IpAddr> = self.by_ip.iter().filter(|(_, o)| pred(o)).map(|(ip, _)| *ip).collect();
        let mut out: Vec<_> = ips.into_iter().filter_map(|ip| Some((ip, self.by_ip.remove(&ip)?))).collect();
        out.sort_by_key(|(ip, _)| *ip);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 11));
    const MS: u64 = 1_000_000;
    const FE2: FeIdx = 1;
    const FE3: FeIdx = 2;
    const FE4: FeIdx = 3;

    fn from(fe: FeIdx, move_seq: u64, observed_at: i64) -> Override {
        Override {
            fe,
            fe_id: format!("fe{}", fe + 1).into(),
            peer: Ipv4Addr::new(198, 51, 100, fe as u8 + 1),
            move_seq,
            observed_at,
            accepted_mono: 0,
            expires: 0,
        }
    }

    fn overrides() -> Overrides {
        Overrides::new(1000 * MS, 2)
    }

    #[test]
    fn confirmed_by_the_hinted_move_superseded_by_anything_else() {
        let mut o = overrides();
        assert_eq!(o.offer(VM, from(FE3, 4, 10), 0), Ok(None));
        assert_eq!(o.peer(VM), Some(Ipv4Addr::new(198, 51, 100, 3)));
        assert_eq!(o.desired_changed(VM, Some((FE2, 4))), None, "same version refreshed: still waiting");
        let (ended, how) = o.desired_changed(VM, Some((FE3, 5))).unwrap();
        assert_eq!((ended.fe, how), (FE3, End::Confirmed));
        assert_eq!(o.peer(VM), None, "the desired state governs");

        o.offer(VM, from(FE3, 5, 20), 0).unwrap();
        assert_eq!(o.desired_changed(VM, Some((FE4, 6))).unwrap().1, End::Superseded, "another FE won");
        o.offer(VM, from(FE3, 6, 30), 0).unwrap();
        assert_eq!(o.desired_changed(VM, None).unwrap().1, End::Superseded, "binding removed");
        assert_eq!(o.desired_changed(VM, None), None, "nothing left");
    }

    #[test]
    fn expires_without_confirmation() {
        let mut o = overrides();
        o.offer(VM, from(FE3, 4, 10), 5 * MS).unwrap();
        assert!(o.expire(1004 * MS).is_empty());
        let gone = o.expire(1005 * MS);
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].0, gone[0].1.accepted_mono, gone[0].1.expires), (VM, 5 * MS, 1005 * MS));
        assert!(o.is_empty());
    }

    #[test]
    fn only_the_sender_cancels_its_own_move() {
        let mut o = overrides();
        o.offer(VM, from(FE3, 4, 10), 0).unwrap();
        assert_eq!(o.cancel(VM, FE4, 4), Err(Reject::NoOverride), "another FE");
        assert_eq!(o.cancel(VM, FE3, 3), Err(Reject::NoOverride), "another move");
        assert_eq!(o.cancel(VM, FE3, 4).unwrap().fe, FE3);
        assert_eq!(o.cancel(VM, FE3, 4), Err(Reject::NoOverride), "already gone");
    }

    #[test]
    fn the_first_of_competing_hints_holds_and_duplicates_change_nothing() {
        let mut o = overrides();
        o.offer(VM, from(FE3, 4, 10), 0).unwrap();
        assert_eq!(o.offer(VM, from(FE3, 4, 10), 7), Err(Reject::Duplicate));
        assert_eq!(o.get(VM).unwrap().expires, 1000 * MS, "a duplicate does not extend the timeout");
        // Another FE's hint for the same move: their clocks say nothing; the first one holds.
        assert_eq!(o.offer(VM, from(FE4, 4, 9), 0), Err(Reject::Outranked));
        assert_eq!(o.offer(VM, from(FE4, 4, 11), 0), Err(Reject::Outranked));
        assert_eq!(o.get(VM).unwrap().fe, FE3);
        // A hint for a later move replaces it.
        let replaced = o.offer(VM, from(FE4, 5, 1), 0).unwrap().unwrap();
        assert_eq!((replaced.fe, o.get(VM).unwrap().fe), (FE3, FE4));
    }

    #[test]
    fn bounded_and_ended_when_the_sender_goes() {
        let mut o = overrides();
        o.offer(VM, from(FE3, 4, 10), 0).unwrap();
        let vm2 = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 12));
        o.offer(vm2, from(FE4, 1, 10), 0).unwrap();
        assert_eq!(o.offer(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 13)), from(FE3, 1, 10), 0), Err(Reject::TooMany));
        let gone = o.senders_changed(|fe, _| fe != FE4);
        assert_eq!(gone.iter().map(|(ip, _)| *ip).collect::<Vec<_>>(), vec![vm2]);
        assert_eq!(o.len(), 1);
    }
}
