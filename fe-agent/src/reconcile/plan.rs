//! The reconciler's decision, pure: given what is programmed for one VM IP and what it should get,
//! the minimal ordered list of operations. The order is what makes moves hitless
//! (docs/design.md, invariant I5, make-before-break):
//!
//! * becoming local: neighbour first, then the host route (/32, IPv6 /128) (the route never points at a VM whose
//!   MAC the kernel would have to resolve), then the tunnel entry is turned to Local;
//! * local → remote (the VM moved away): the tunnel entry is pointed at the new FE *before* the
//!   /32 route is removed, so from the moment the route is gone packets fall into the mobile
//!   prefix route, into the data plane and out to the new FE — never into a hole;
//! * → drop: route and neighbour removed, then the tunnel entry.

use crate::forwarding::Tunnel;
use crate::state::Target;

/// What is programmed for one VM IP on a VM port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalActual {
    /// The port.
    pub port: u32,
    /// A host route (/32 or /128) through the port exists.
    pub route: bool,
    /// The permanent neighbour entry's MAC, if one exists.
    pub mac: Option<[u8; 6]>,
}

/// One step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Install/replace the permanent neighbour entry on a port.
    SetNeighbour {
        /// Port.
        port: u32,
        /// MAC.
        mac: [u8; 6],
    },
    /// Install/replace the host route through a port.
    SetRoute {
        /// Port.
        port: u32,
    },
    /// Remove the host route through a port.
    DelRoute {
        /// Port.
        port: u32,
    },
    /// Remove the neighbour entry on a port.
    DelNeighbour {
        /// Port.
        port: u32,
    },
    /// Set the data-plane entry.
    SetTunnel(Tunnel),
}

/// The plan for one IP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Operations, in order.
    pub ops: Vec<Op>,
    /// The IP should be local but its port is unknown: probe the VM on every port.
    pub discover: bool,
}

/// Plans the change from (`local`, `tunnel`) to `target`.
pub fn plan(local: Option<LocalActual>, tunnel: Tunnel, target: Target) -> Plan {
    let mut p = Plan::default();
    let remove_local = |p: &mut Plan, l: LocalActual| {
        if l.route {
            p.ops.push(Op::DelRoute { port: l.port });
        }
        if l.mac.is_some() {
            p.ops.push(Op::DelNeighbour { port: l.port });
        }
    };
    match target {
        Target::Local { port, mac } => {
            let port = port.or(local.map(|l| l.port));
            let Some(port) = port else {
                p.discover = true;
                if tunnel != Tunnel::Local {
                    p.ops.push(Op::SetTunnel(Tunnel::Local));
                }
                return p;
            };
            let same_port = local.is_some_and(|l| l.port == port);
            if !same_port || local.and_then(|l| l.mac) != Some(mac) {
                p.ops.push(Op::SetNeighbour { port, mac });
            }
            if !same_port || !local.is_some_and(|l| l.route) {
                p.ops.push(Op::SetRoute { port });
            }
            if let Some(old) = local.filter(|l| l.port != port)
                && old.mac.is_some()
            {
                p.ops.push(Op::DelNeighbour { port: old.port });
            }
            if tunnel != Tunnel::Local {
                p.ops.push(Op::SetTunnel(Tunnel::Local));
            }
        }
        Target::Remote(peer) => {
            if tunnel != Tunnel::Remote(peer) {
                p.ops.push(Op::SetTunnel(Tunnel::Remote(peer)));
            }
            if let Some(l) = local {
                remove_local(&mut p, l);
            }
        }
        Target::Drop => {
            if let Some(l) = local {
                remove_local(&mut p, l);
            }
            if tunnel != Tunnel::None {
                p.ops.push(Op::SetTunnel(Tunnel::None));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);

    fn installed(port: u32) -> Option<LocalActual> {
        Some(LocalActual { port, route: true, mac: Some(MAC) })
    }

    #[test]
    fn becoming_local_installs_neighbour_before_route() {
        let p = plan(None, Tunnel::Remote(PEER), Target::Local { port: Some(5), mac: MAC });
        assert_eq!(
            p.ops,
            vec![Op::SetNeighbour { port: 5, mac: MAC }, Op::SetRoute { port: 5 }, Op::SetTunnel(Tunnel::Local)]
        );
    }

    #[test]
    fn moving_away_points_the_tunnel_before_removing_the_route() {
        let p = plan(installed(5), Tunnel::Local, Target::Remote(PEER));
        assert_eq!(
            p.ops,
            vec![Op::SetTunnel(Tunnel::Remote(PEER)), Op::DelRoute { port: 5 }, Op::DelNeighbour { port: 5 }]
        );
    }

    #[test]
    fn nothing_to_do_when_it_matches() {
        let local = Target::Local { port: Some(5), mac: MAC };
        assert_eq!(plan(installed(5), Tunnel::Local, local), Plan::default());
        assert_eq!(plan(None, Tunnel::Remote(PEER), Target::Remote(PEER)), Plan::default());
        assert_eq!(plan(None, Tunnel::None, Target::Drop), Plan::default());
        // Port unknown but the kernel already has the route (agent restart): keep it, no churn.
        assert_eq!(plan(installed(5), Tunnel::Local, Target::Local { port: None, mac: MAC }), Plan::default());
    }

    #[test]
    fn port_change_and_mac_change() {
        let p = plan(installed(5), Tunnel::Local, Target::Local { port: Some(6), mac: MAC });
        assert_eq!(
            p.ops,
            vec![Op::SetNeighbour { port: 6, mac: MAC }, Op::SetRoute { port: 6 }, Op::DelNeighbour { port: 5 }]
        );
        let other = [2, 0, 0, 0, 0, 0x99];
        let p = plan(installed(5), Tunnel::Local, Target::Local { port: Some(5), mac: other });
        assert_eq!(p.ops, vec![Op::SetNeighbour { port: 5, mac: other }]);
    }

    #[test]
    fn unknown_port_asks_for_discovery_and_drop_removes_everything() {
        let p = plan(None, Tunnel::None, Target::Local { port: None, mac: MAC });
        assert!(p.discover);
        assert_eq!(p.ops, vec![Op::SetTunnel(Tunnel::Local)]);
        let p = plan(installed(5), Tunnel::Local, Target::Drop);
        assert_eq!(p.ops, vec![Op::DelRoute { port: 5 }, Op::DelNeighbour { port: 5 }, Op::SetTunnel(Tunnel::None)]);
        let half = Some(LocalActual { port: 5, route: false, mac: Some(MAC) });
        let p = plan(half, Tunnel::None, Target::Local { port: Some(5), mac: MAC });
        assert_eq!(p.ops, vec![Op::SetRoute { port: 5 }, Op::SetTunnel(Tunnel::Local)]);
    }
}
