//! What a RARP frame on a VM port means to the agent (pure). A RARP request or reply names a MAC
//! and no IP; sent by a hypervisor after a live migration (QEMU's `announce-self`: request
//! reverse, sender MAC = target MAC = the VM's MAC, broadcast), it says "the VM with this MAC is
//! now behind this port". The agent turns it into:
//!
//! * a gratuitous-ARP sighting of every IP its desired state binds to that MAC ([`bound_to`], from
//!   the desired state's MAC index), so
//!   a move announced only by RARP takes the GARP path (local install first, move hint, per-IP
//!   claim);
//! * one MAC claim to the controller per announcement ([`Announcements`]: QEMU sends five frames
//!   within 800 ms), which the controller expands to every IP bound to or declared with the MAC,
//!   including those the agent does not know;
//! * for an IP of that claim the controller answered STALE, an ARP probe of the VM on the port
//!   ([`follow_ups`]): its reply is an ordinary sighting, ordered by the ordinary rules.
//!
//! RARP is never answered (no FE is a RARP server).

use std::collections::HashMap;
use std::net::IpAddr;

use victor_dataplane::packet::rarp::{RarpMessage, RarpOp};
use victor_proto::types::ip_from_bytes;
use victor_proto::v1::{ClaimOutcome, ClaimResult, RejectReason};

use super::arp::Scope;
use super::ndp;
use crate::state::desired::DesiredState;

/// One MAC claim per MAC at most this often (ns): QEMU's five rounds span 800 ms.
pub const ANNOUNCEMENT_WINDOW_NS: u64 = 1_000_000_000;

/// A label for metrics.
pub fn kind_label(msg: &RarpMessage) -> &'static str {
    match (msg.op, msg.is_hypervisor_announce()) {
        (RarpOp::Request, true) => "announce",
        (RarpOp::Request, false) => "request",
        (RarpOp::Reply, _) => "reply",
    }
}

/// The MAC a frame claims for this port: the sender hardware address, if it can be a VM's
/// (unicast, not zero).
pub fn claimed(msg: &RarpMessage) -> Option<[u8; 6]> {
    let mac = msg.claimed_mac();
    (mac.0 != [0; 6] && !mac.is_multicast()).then_some(mac.0)
}

/// The VM addresses the desired state binds with `mac`, through its MAC index
/// ([`DesiredState::ips_with_mac`]: a lookup, not a scan), that are VM addresses here (IPv4
/// inside `scope`, IPv6 inside `scope6`), in address order (IPv4 first).
pub fn bound_to(desired: &DesiredState, mac: [u8; 6], scope: &Scope, scope6: &ndp::Scope) -> Vec<IpAddr> {
    let is_vm_ip = |ip: &IpAddr| match ip {
        IpAddr::V4(ip) => scope.is_vm_ip(*ip),
        IpAddr::V6(ip) => scope6.is_vm_ip(*ip),
    };
    let mut ips: Vec<IpAddr> = desired.ips_with_mac(mac).filter(is_vm_ip).collect();
    ips.sort_unstable();
    ips
}

/// When each MAC was last claimed, so that one announcement (several frames) makes one claim.
#[derive(Debug, Default)]
pub struct Announcements {
    last: HashMap<[u8; 6], u64>,
}

impl Announcements {
    /// Whether a frame of `mac` captured at `mono` (ns) starts a new announcement, i.e. needs a MAC
    /// claim; remembers it if so. Forgets announcements older than the window.
    pub fn starts(&mut self, mac: [u8; 6], mono: u64) -> bool {
        self.last.retain(|_, at| mono.saturating_sub(*at) < ANNOUNCEMENT_WINDOW_NS);
        if self.last.contains_key(&mac) {
            return false;
        }
        self.last.insert(mac, mono);
        true
    }
}

/// What the agent does after the controller answered a MAC claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    /// The controller could not order the claim for this address (STALE): ask the VM (an ARP
    /// probe, or an NDP solicitation, on the port); its reply is an ordinary sighting.
    Probe(IpAddr),
}

/// The follow-ups of the answer to a MAC claim (`result`, outcome EXPANDED); none for the other
/// answers (UNKNOWN_MAC: the VM is learned from its ARP instead; an old controller's MALFORMED:
/// the per-IP sightings already went out).
pub fn follow_ups(result: &ClaimResult) -> Vec<FollowUp> {
    if result.outcome != ClaimOutcome::Expanded as i32 {
        return Vec::new();
    }
    result
        .ip_results
        .iter()
        .filter(|r| r.outcome == ClaimOutcome::Rejected as i32 && r.reject_reason == RejectReason::Stale as i32)
        .filter_map(|r| Some(FollowUp::Probe(ip_from_bytes(&r.vm_ip).ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use victor_dataplane::packet::eth::MacAddr;
    use victor_dataplane::packet::rarp::{announce, build_frame, parse_frame};
    use victor_proto::v1::{BindingEntry, SyncPhase, SyncUpdate};

    const VM_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];

    fn scope() -> Scope {
        Scope { prefixes: vec!["10.10.0.0/16".parse().unwrap()], gateways: vec![Ipv4Addr::new(10, 10, 0, 1)] }
    }

    /// A desired state holding `bindings` (VM IP, MAC), all at fe2.
    fn desired(bindings: &[(IpAddr, [u8; 6])]) -> DesiredState {
        let mut state = DesiredState::new("fe1");
        let snapshot = SyncUpdate {
            phase: SyncPhase::SnapshotEnd as i32,
            revision: 10,
            reset: true,
            binding_upserts: bindings
                .iter()
                .map(|(ip, mac)| BindingEntry {
                    vm_ip: victor_proto::types::ip_to_bytes(*ip),
                    fe_id: "fe2".into(),
                    mac: mac.to_vec(),
                    move_seq: 0,
                    revision: 5,
                    pending_fe_id: String::new(),
                })
                .collect(),
            ..Default::default()
        };
        state.apply(&snapshot).unwrap();
        state
    }

    #[test]
    fn qemus_announce_claims_the_vms_mac() {
        let frame = parse_frame(&build_frame(&announce(MacAddr(VM_MAC)))).unwrap();
        assert_eq!((kind_label(&frame), claimed(&frame)), ("announce", Some(VM_MAC)));
        let reply = RarpMessage { op: RarpOp::Reply, ..frame };
        assert_eq!((kind_label(&reply), claimed(&reply)), ("reply", Some(VM_MAC)));
        let multicast = RarpMessage { sender_mac: MacAddr([1, 0, 0x5e, 0, 0, 1]), ..frame };
        assert_eq!(claimed(&multicast), None);
        let zero = RarpMessage { sender_mac: MacAddr([0; 6]), ..frame };
        assert_eq!(claimed(&zero), None);
    }

    #[test]
    fn finds_the_vm_addresses_bound_with_the_mac() {
        let other = [2, 0, 0, 0, 0, 0x99];
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let state = desired(&[
            (v6("fd00:10::11"), VM_MAC),
            (Ipv4Addr::new(10, 10, 0, 12).into(), VM_MAC),
            (Ipv4Addr::new(10, 10, 0, 11).into(), VM_MAC),
            (Ipv4Addr::new(10, 10, 0, 13).into(), other),
            (Ipv4Addr::new(192, 0, 2, 1).into(), VM_MAC),
            (v6("2001:db8::11"), VM_MAC),
        ]);
        let scope6 = ndp::Scope { prefixes: vec!["fd00:10::/64".parse().unwrap()], gateways: vec![] };
        let ips = bound_to(&state, VM_MAC, &scope(), &scope6);
        assert_eq!(
            ips,
            vec![Ipv4Addr::new(10, 10, 0, 11).into(), Ipv4Addr::new(10, 10, 0, 12).into(), v6("fd00:10::11")],
            "both families, each inside its mobile prefixes"
        );
        assert_eq!(bound_to(&state, other, &scope(), &scope6), vec![IpAddr::from(Ipv4Addr::new(10, 10, 0, 13))]);
        assert!(bound_to(&state, [2, 0, 0, 0, 0, 0x77], &scope(), &scope6).is_empty(), "a MAC nobody has");
    }

    #[test]
    fn one_claim_per_announcement() {
        let mut a = Announcements::default();
        let ms = 1_000_000;
        // QEMU's five rounds: one claim.
        let claims: Vec<bool> = [0, 50, 200, 450, 800].iter().map(|t| a.starts(VM_MAC, t * ms)).collect();
        assert_eq!(claims, vec![true, false, false, false, false]);
        assert!(a.starts([2, 0, 0, 0, 0, 0x12], 810 * ms), "another VM");
        assert!(a.starts(VM_MAC, 1000 * ms), "the next announcement");
    }

    #[test]
    fn stale_addresses_are_probed() {
        let per_ip = |ip: &[u8], outcome: ClaimOutcome, reason: RejectReason| ClaimResult {
            vm_ip: ip.to_vec(),
            outcome: outcome as i32,
            reject_reason: reason as i32,
            ..Default::default()
        };
        let v6 = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
        let result = ClaimResult {
            outcome: ClaimOutcome::Expanded as i32,
            ip_results: vec![
                per_ip(&[10, 10, 0, 11], ClaimOutcome::Rejected, RejectReason::Stale),
                per_ip(&[10, 10, 0, 12], ClaimOutcome::Moved, RejectReason::Unspecified),
                per_ip(&[10, 10, 0, 13], ClaimOutcome::Rejected, RejectReason::MacMismatch),
                per_ip(&v6, ClaimOutcome::Rejected, RejectReason::Stale),
            ],
            ..Default::default()
        };
        assert_eq!(
            follow_ups(&result),
            vec![FollowUp::Probe(Ipv4Addr::new(10, 10, 0, 11).into()), FollowUp::Probe(IpAddr::from(v6))]
        );
        let unknown = ClaimResult {
            outcome: ClaimOutcome::Rejected as i32,
            reject_reason: RejectReason::UnknownMac as i32,
            ..Default::default()
        };
        assert!(follow_ups(&unknown).is_empty());
    }
}
