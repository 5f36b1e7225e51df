//! The agent's view of the world, pure: the controller's desired state ([`desired`]), what it knew
//! of it when ([`known`]), the VMs seen on this FE's ports and their claims ([`local`]), and how
//! the two — with a move hint's override — combine into what each VM IP should get from this FE
//! ([`target`]).

pub mod desired;
pub mod known;
pub mod local;

use std::net::{IpAddr, Ipv4Addr};

use desired::DesiredState;
use local::{DesiredView, LocalVms};

/// What this FE should do with traffic for one VM IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Deliver on a VM port: host route (/32 or /128) + permanent neighbour. `port` is None when the VM is bound
    /// here but this agent has not (yet) seen it on a port (after a restart the kernel's existing
    /// route tells; otherwise the VM is probed on every port).
    Local {
        /// Port index.
        port: Option<u32>,
        /// VM MAC.
        mac: [u8; 6],
    },
    /// Tunnel to the binding FE's underlay address.
    Remote(Ipv4Addr),
    /// No binding (or the binding FE is unknown): drop.
    Drop,
}

/// The desired binding of `ip` as [`LocalVms`] sees it.
pub fn desired_view(desired: &DesiredState, ip: IpAddr) -> DesiredView {
    match desired.binding(ip) {
        Some(b) if b.fe == desired.me() => DesiredView::Here(b.mac, b.revision),
        Some(b) => DesiredView::Elsewhere(b.revision),
        None => DesiredView::Unbound,
    }
}

/// What `ip` should get: a local claim in progress wins (make-before-break), then an accepted
/// move hint's tunnel peer (`hinted`: the VM is moving to that FE), otherwise the desired state
/// decides.
pub fn target(desired: &DesiredState, local: &LocalVms, hinted: Option<Ipv4Addr>, ip: IpAddr) -> Target {
    let seen = local.get(ip).filter(|vm| vm.is_ours());
    if let Some(vm) = seen.filter(|vm| vm.overrides()) {
        return Target::Local { port: (vm.port != 0).then_some(vm.port), mac: vm.mac };
    }
    if let Some(peer) = hinted {
        return Target::Remote(peer);
    }
    match desired.binding(ip) {
        Some(b) if b.fe == desired.me() => {
            Target::Local { port: seen.map(|vm| vm.port).filter(|p| *p != 0), mac: b.mac }
        }
        Some(b) => desired.peer_of(&b).map_or(Target::Drop, Target::Remote),
        None => Target::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use local::{ClaimAnswer, Sighting, Timers};
    use victor_proto::v1::{BindingEntry, FeEntry, SyncPhase, SyncUpdate};

    const VM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 11));
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const FE2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const FE3: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);

    fn desired(binding_fe: Option<&str>) -> DesiredState {
        let mut d = DesiredState::new("fe1");
        let mut end =
            SyncUpdate { phase: SyncPhase::SnapshotEnd as i32, revision: 10, reset: true, ..Default::default() };
        end.fe_upserts = vec![
            FeEntry {
                fe_id: "fe1".into(),
                underlay_addr: vec![198, 51, 100, 1],
                up: true,
                revision: 2,
                ..Default::default()
            },
            FeEntry {
                fe_id: "fe2".into(),
                underlay_addr: FE2.octets().to_vec(),
                up: true,
                revision: 3,
                ..Default::default()
            },
        ];
        if let Some(fe) = binding_fe {
            end.binding_upserts = vec![BindingEntry {
                vm_ip: victor_proto::types::ip_to_bytes(VM),
                fe_id: fe.into(),
                mac: MAC.to_vec(),
                move_seq: 1,
                revision: 9,
                pending_fe_id: String::new(),
            }];
        }
        d.apply(&end).unwrap();
        d
    }

    fn local() -> LocalVms {
        LocalVms::new(Timers { probe_after: u64::MAX, probe_interval: 1, probe_count: 1, reject_hold: 1_000 })
    }

    #[test]
    fn desired_decides_without_local_claims() {
        let l = local();
        assert_eq!(target(&desired(Some("fe2")), &l, None, VM), Target::Remote(FE2));
        assert_eq!(target(&desired(Some("fe1")), &l, None, VM), Target::Local { port: None, mac: MAC });
        assert_eq!(target(&desired(None), &l, None, VM), Target::Drop);
        assert_eq!(target(&desired(Some("fe9")), &l, None, VM), Target::Drop, "unknown FE");
    }

    #[test]
    fn a_pending_claim_wins_and_a_rejection_gives_back() {
        let d = desired(Some("fe2"));
        let mut l = local();
        let s = Sighting { ip: VM, mac: MAC, port: 7, wall: 5, mono: 5, known: 0 };
        l.sighting(s, desired_view(&d, VM));
        assert_eq!(target(&d, &l, None, VM), Target::Local { port: Some(7), mac: MAC });
        assert_eq!(target(&d, &l, Some(FE3), VM), Target::Local { port: Some(7), mac: MAC }, "ours wins");
        l.resolved(VM, MAC, 5, ClaimAnswer::Rejected { reason: 3 }, 6, desired_view(&d, VM));
        assert_eq!(target(&d, &l, None, VM), Target::Remote(FE2));
    }

    #[test]
    fn a_move_hint_overrides_the_desired_state_also_where_the_vm_was_local() {
        let mut l = local();
        assert_eq!(target(&desired(Some("fe2")), &l, Some(FE3), VM), Target::Remote(FE3));
        // The old FE: bound here and seen here (settled), the hint turns it into a tunnel.
        let d = desired(Some("fe1"));
        l.sighting(Sighting { ip: VM, mac: MAC, port: 7, wall: 5, mono: 5, known: 0 }, desired_view(&d, VM));
        assert_eq!(target(&d, &l, None, VM), Target::Local { port: Some(7), mac: MAC });
        assert_eq!(target(&d, &l, Some(FE3), VM), Target::Remote(FE3));
    }
}
