//! Whether an authenticated hint may act, pure: the replay window ([`ReplayGuard`]) and the
//! acceptance rules against the desired state ([`check_sender`], [`check_move`]). A hint is only
//! ever a shortcut for a move the controller is about to commit, so the rules accept exactly that
//! case and nothing else:
//!
//! * the UDP source is the registered underlay address of an FE that is up, and that FE is the
//!   hint's new FE (an FE can only speak for itself, as with IP-in-IP, which is accepted only
//!   from registered underlay addresses);
//! * the VM's desired binding is at another FE, with the MAC of the hint and exactly the hinted
//!   move_seq (the hint is "the move after this version": a stale or replayed hint for an older
//!   version can never act once the controller has moved on);
//! * this FE has no claim of its own in progress for the VM (its local claim wins until the
//!   controller decides).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::codec::hint::Hint;
use crate::state::desired::{DesiredState, FeIdx};

/// Why a hint was not applied (the `reason` label of `victor_agent_move_hints_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not a hint datagram.
    Malformed,
    /// The HMAC does not verify with any configured key.
    BadHmac,
    /// Sent longer ago than the replay window allows, by the sender's own clock (its hints'
    /// usual offset from this FE's clock taken out).
    Clock,
    /// A nonce already seen inside the window.
    Replay,
    /// The sender's hint budget is spent.
    RateLimited,
    /// No complete desired state yet.
    NotSynced,
    /// The hint names an FE that is not registered.
    UnknownSender,
    /// The hint's FE is registered but its session is down.
    SenderDown,
    /// The datagram does not come from the hint's FE's registered underlay address.
    SourceMismatch,
    /// The hint names this FE.
    FromSelf,
    /// The VM has no binding.
    Unbound,
    /// The binding is already at the hint's FE (the controller's delta came first).
    AlreadyThere,
    /// The binding's move_seq is not the hinted one (an old or replayed hint, or a race).
    StaleSeq,
    /// The binding's MAC is not the hint's.
    MacMismatch,
    /// This FE has a claim of its own in progress for the VM.
    LocalClaim,
    /// A competing hint for the same move is already in place (the first one holds until the
    /// controller decides).
    Outranked,
    /// The same override is already in place.
    Duplicate,
    /// Too many overrides at once.
    TooMany,
    /// A cancel for an override that does not exist (or belongs to another FE or move).
    NoOverride,
}

impl Reject {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadHmac => "bad_hmac",
            Reject::Clock => "clock",
            Reject::Replay => "replay",
            Reject::RateLimited => "rate_limited",
            Reject::NotSynced => "not_synced",
            Reject::UnknownSender => "unknown_sender",
            Reject::SenderDown => "sender_down",
            Reject::SourceMismatch => "source_mismatch",
            Reject::FromSelf => "from_self",
            Reject::Unbound => "unbound",
            Reject::AlreadyThere => "already_there",
            Reject::StaleSeq => "stale_seq",
            Reject::MacMismatch => "mac_mismatch",
            Reject::LocalClaim => "local_claim",
            Reject::Outranked => "outranked",
            Reject::Duplicate => "duplicate",
            Reject::TooMany => "too_many",
            Reject::NoOverride => "no_override",
        }
    }
}

/// Senders' clocks are estimated over epochs of this length (see [`ReplayGuard`]).
const EPOCH_NS: u64 = 60_000_000_000;

/// Replay protection that never compares the sender's clock with the receiver's (FE clocks need
/// not agree, docs/design.md section 3). Per sender, the smallest *receive time − send time* seen
/// recently is that sender's clock offset plus its fastest delivery; a hint is fresh if its own
/// receive − send is within `max_age` of that smallest one — its age by the sender's clock as the
/// receiver sees it. The smallest is kept over the current and the previous epoch, so a sender
/// whose clock was stepped back is believed again two epochs later; the first hint from a sender
/// (or after two quiet epochs) sets it. A (source, nonce) seen within the window is a replay; a
/// replayed hint older than the window is too old. A replay that does get through (the sender
/// quiet for two epochs) can only repeat a move for the exact binding version it named, for the
/// hint timeout (see [`check_move`] and the override timeout).
#[derive(Debug)]
pub struct ReplayGuard {
    max_age_ns: i64,
    cap: usize,
    /// (source, nonce) → when it was received (monotonic ns).
    seen: HashMap<(Ipv4Addr, u64), u64>,
    senders: HashMap<Ipv4Addr, SenderClock>,
}

/// What one sender's hints say about its clock.
#[derive(Debug, Clone, Copy)]
struct SenderClock {
    /// Smallest receive − send (ns) in the current epoch and in the previous one.
    current: i64,
    previous: i64,
    /// When the current epoch started (monotonic ns).
    epoch_start: u64,
}

impl SenderClock {
    /// Records a sample taken at `now` and returns the smallest over the two epochs.
    fn observe(&mut self, sample: i64, now: u64) -> i64 {
        let epochs = now.saturating_sub(self.epoch_start) / EPOCH_NS;
        if epochs >= 2 {
            (self.previous, self.current, self.epoch_start) = (i64::MAX, sample, now);
        } else if epochs == 1 {
            (self.previous, self.current, self.epoch_start) = (self.current, sample, now);
        } else {
            self.current = self.current.min(sample);
        }
        self.current.min(self.previous)
    }
}

impl ReplayGuard {
    /// A window of `max_age_ns`, remembering at most `cap` nonces (more hints inside one window
    /// than that are refused until older ones leave it) and as many senders.
    pub fn new(max_age_ns: u64, cap: usize) -> Self {
        ReplayGuard {
            max_age_ns: i64::try_from(max_age_ns).unwrap_or(i64::MAX),
            cap,
            seen: HashMap::new(),
            senders: HashMap::new(),
        }
    }

    /// Checks (and records) an authenticated hint from `src`, received at `now_wall` (this FE's
    /// clock) and `now_mono`.
    pub fn check(&mut self, src: Ipv4Addr, hint: &Hint, now_wall: i64, now_mono: u64) -> Result<(), Reject> {
        if self.seen.len() >= self.cap || self.senders.len() >= self.cap {
            self.prune(now_mono);
            if self.seen.len() >= self.cap || self.senders.len() >= self.cap {
                return Err(Reject::RateLimited);
            }
        }
        let sample = now_wall.saturating_sub(hint.sent_at);
        let fastest = self
            .senders
            .entry(src)
            .or_insert(SenderClock { current: sample, previous: i64::MAX, epoch_start: now_mono })
            .observe(sample, now_mono);
        if sample.saturating_sub(fastest) > self.max_age_ns {
            return Err(Reject::Clock);
        }
        let key = (src, hint.nonce);
        if self.seen.contains_key(&key) {
            return Err(Reject::Replay);
        }
        self.seen.insert(key, now_mono);
        Ok(())
    }

    /// Forgets nonces received longer ago than the window (a replay of them now is too old) and
    /// senders quiet for two epochs.
    pub fn prune(&mut self, now_mono: u64) {
        let max = self.max_age_ns.unsigned_abs();
        self.seen.retain(|_, received| now_mono.saturating_sub(*received) <= max);
        self.senders.retain(|_, c| now_mono.saturating_sub(c.epoch_start) < 2 * EPOCH_NS);
    }

    /// Nonces remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when none are.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The hint's FE, if the datagram really comes from it: registered, up, not this FE, and `src`
/// is its underlay address.
pub fn check_sender(hint: &Hint, src: Ipv4Addr, desired: &DesiredState) -> Result<FeIdx, Reject> {
    if !desired.is_complete() {
        return Err(Reject::NotSynced);
    }
    let fe = desired.fes().lookup(&hint.fe_id).ok_or(Reject::UnknownSender)?;
    if fe == desired.me() {
        return Err(Reject::FromSelf);
    }
    let info = desired.fes().get(fe).filter(|f| f.present).ok_or(Reject::UnknownSender)?;
    if !info.up {
        return Err(Reject::SenderDown);
    }
    if info.underlay != Some(src) {
        return Err(Reject::SourceMismatch);
    }
    Ok(fe)
}

/// The acceptance rules of a move hint (see the module doc). `local_claim`: this FE has a claim
/// of its own in progress for the VM. Returns the new FE.
pub fn check_move(hint: &Hint, src: Ipv4Addr, desired: &DesiredState, local_claim: bool) -> Result<FeIdx, Reject> {
    let fe = check_sender(hint, src, desired)?;
    let b = desired.binding(hint.vm_ip).ok_or(Reject::Unbound)?;
    if b.fe == fe {
        return Err(Reject::AlreadyThere);
    }
    if b.move_seq != hint.move_seq {
        return Err(Reject::StaleSeq);
    }
    if b.mac != hint.mac {
        return Err(Reject::MacMismatch);
    }
    if local_claim {
        return Err(Reject::LocalClaim);
    }
    Ok(fe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::hint::Kind;
    use std::net::IpAddr;
    use victor_proto::v1::{BindingEntry, FeEntry, SyncPhase, SyncUpdate};

    const VM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 11));
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const S: i64 = 1_000_000_000;

    fn fe(n: u8, up: bool) -> FeEntry {
        FeEntry {
            fe_id: format!("fe{n}"),
            underlay_addr: vec![198, 51, 100, n],
            up,
            revision: u64::from(n),
            ..Default::default()
        }
    }

    /// fe1's view: fe2 (VM bound there at move_seq 4), fe3 up, fe4 down.
    fn desired() -> DesiredState {
        let mut d = DesiredState::new("fe1");
        let end = SyncUpdate {
            phase: SyncPhase::SnapshotEnd as i32,
            revision: 10,
            reset: true,
            fe_upserts: vec![fe(1, true), fe(2, true), fe(3, true), fe(4, false)],
            binding_upserts: vec![BindingEntry {
                vm_ip: victor_proto::types::ip_to_bytes(VM),
                fe_id: "fe2".into(),
                mac: MAC.to_vec(),
                move_seq: 4,
                revision: 9,
                pending_fe_id: String::new(),
            }],
            ..Default::default()
        };
        d.apply(&end).unwrap();
        d
    }

    fn hint(fe: &str, move_seq: u64) -> Hint {
        Hint {
            kind: Kind::Move,
            fe_id: fe.into(),
            vm_ip: VM,
            mac: MAC,
            move_seq,
            observed_at: 100 * S,
            sent_at: 100 * S,
            nonce: 1,
        }
    }

    fn ul(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, n)
    }

    #[test]
    fn the_new_fe_from_its_underlay_for_the_current_version_is_accepted() {
        let d = desired();
        let fe3 = d.fes().lookup("fe3").unwrap();
        assert_eq!(check_move(&hint("fe3", 4), ul(3), &d, false), Ok(fe3));
    }

    #[test]
    fn senders_must_be_registered_up_and_speak_for_themselves() {
        let d = desired();
        assert_eq!(check_move(&hint("fe9", 4), ul(9), &d, false), Err(Reject::UnknownSender));
        assert_eq!(check_move(&hint("fe4", 4), ul(4), &d, false), Err(Reject::SenderDown));
        assert_eq!(check_move(&hint("fe3", 4), ul(4), &d, false), Err(Reject::SourceMismatch), "fe4 posing as fe3");
        let outsider = Ipv4Addr::new(198, 51, 100, 99);
        assert_eq!(check_move(&hint("fe3", 4), outsider, &d, false), Err(Reject::SourceMismatch));
        assert_eq!(check_move(&hint("fe1", 4), ul(1), &d, false), Err(Reject::FromSelf));
        assert_eq!(check_move(&hint("fe3", 4), ul(3), &DesiredState::new("fe1"), false), Err(Reject::NotSynced));
    }

    #[test]
    fn only_the_move_after_the_current_version_with_its_mac() {
        let d = desired();
        assert_eq!(check_move(&hint("fe3", 3), ul(3), &d, false), Err(Reject::StaleSeq), "old version");
        assert_eq!(check_move(&hint("fe3", 5), ul(3), &d, false), Err(Reject::StaleSeq), "ahead of us");
        assert_eq!(check_move(&hint("fe2", 4), ul(2), &d, false), Err(Reject::AlreadyThere));
        let other_mac = Hint { mac: [2, 0, 0, 0, 0, 0x99], ..hint("fe3", 4) };
        assert_eq!(check_move(&other_mac, ul(3), &d, false), Err(Reject::MacMismatch));
        let unbound = Hint { vm_ip: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 12)), ..hint("fe3", 4) };
        assert_eq!(check_move(&unbound, ul(3), &d, false), Err(Reject::Unbound));
        assert_eq!(check_move(&hint("fe3", 4), ul(3), &d, true), Err(Reject::LocalClaim));
    }

    #[test]
    fn replay_window_and_nonces() {
        let mut g = ReplayGuard::new(2 * S as u64, 3);
        let h = hint("fe3", 4);
        let mono = |s: i64| (s * S) as u64;
        assert_eq!(g.check(ul(3), &h, 100 * S, mono(1)), Ok(()));
        assert_eq!(g.check(ul(3), &h, 100 * S + 1, mono(1)), Err(Reject::Replay), "same nonce inside the window");
        assert_eq!(g.check(ul(2), &h, 100 * S, mono(1)), Ok(()), "nonces are per source");
        assert_eq!(g.check(ul(3), &Hint { nonce: 2, ..h.clone() }, 103 * S, mono(4)), Err(Reject::Clock), "3 s old");
        assert_eq!(g.check(ul(3), &Hint { nonce: 3, sent_at: 101 * S, ..h.clone() }, 102 * S, mono(3)), Ok(()));
        assert_eq!(g.len(), 3);
        // Full: nothing has left the window yet, so the next one is refused...
        let late = Hint { nonce: 4, sent_at: 102 * S, ..h.clone() };
        assert_eq!(g.check(ul(3), &late, 102 * S, mono(3)), Err(Reject::RateLimited));
        // ...until the first ones have.
        assert_eq!(g.check(ul(3), &late, 102 * S, mono(3) + 1), Ok(()));
        g.prune(mono(200));
        assert!(g.is_empty());
    }

    /// Two FEs whose clocks are 5 s behind and 5 s ahead of the receiver's: their fresh hints pass,
    /// their stale ones (by their own clocks) and replays do not.
    #[test]
    fn senders_clocks_need_not_agree_with_the_receivers() {
        let mut g = ReplayGuard::new(2 * S as u64, 100);
        let now = 1_000 * S;
        for (n, offset) in [(2u8, -5 * S), (3, 5 * S)] {
            let sent = |at: i64, nonce| Hint { sent_at: at + offset, nonce, ..hint(&format!("fe{n}"), 4) };
            // 3 ms on the wire; the first hint sets what this sender's clock looks like.
            assert_eq!(g.check(ul(n), &sent(now, 1), now + 3_000_000, 10 * S as u64), Ok(()), "fe{n}");
            assert_eq!(g.check(ul(n), &sent(now + S, 2), now + S + 1_000_000, 11 * S as u64), Ok(()));
            // Sent 3 s before it arrived, by the sender's own clock: too old however its clock runs.
            assert_eq!(g.check(ul(n), &sent(now + 2 * S, 3), now + 5 * S, 15 * S as u64), Err(Reject::Clock), "fe{n}");
            // A copy of the first one, replayed 10 s later.
            assert_eq!(g.check(ul(n), &sent(now, 1), now + 10 * S, 20 * S as u64), Err(Reject::Clock));
        }
    }

    /// A sender whose clock is stepped back is believed again two epochs later.
    #[test]
    fn a_sender_whose_clock_steps_back_recovers() {
        let mut g = ReplayGuard::new(2 * S as u64, 100);
        let step = 10 * S;
        let at = |epoch_s: u64| epoch_s * S as u64;
        assert_eq!(g.check(ul(3), &Hint { sent_at: 0, ..hint("fe3", 4) }, 0, at(0)), Ok(()));
        let stepped = |nonce, t: i64| Hint { sent_at: t - step, nonce, ..hint("fe3", 4) };
        assert_eq!(g.check(ul(3), &stepped(2, S), S, at(1)), Err(Reject::Clock));
        assert_eq!(g.check(ul(3), &stepped(3, 70 * S), 70 * S, at(70)), Err(Reject::Clock), "one epoch later");
        assert_eq!(g.check(ul(3), &stepped(4, 130 * S), 130 * S, at(130)), Ok(()), "two epochs later");
    }
}
