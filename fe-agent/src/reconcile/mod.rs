//! The reconciler (kube-rs style): for each VM IP whose desired target may have changed, compare
//! with what is programmed (kernel /32 and /128 host routes and neighbours on VM ports, the data-plane entry)
//! and apply the minimal ordered change ([`plan`]) through its [`effects`]; and keep the data
//! plane's announced migration of the IP ([`Reconciler::set_migration`]). It owns the record of what it programmed,
//! read back from the kernel at start (objects carrying our route protocol), so an agent restart
//! changes nothing that is still right and removes only what is stale — after the first complete
//! snapshot, never before (no flush).

pub mod effects;
pub mod plan;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use effects::Effects;
use plan::{LocalActual, Op, Plan};

use crate::forwarding::Tunnel;
use crate::metrics::Metrics;
use crate::state::Target;

/// What applying one IP did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Operations executed successfully.
    pub ops: usize,
    /// Operations that failed (the IP is retried later).
    pub failed: usize,
    /// The VM should be local but its port is unknown.
    pub discover: bool,
    /// The IP became local on a port (announce the gateway there).
    pub became_local_on: Option<u32>,
}

/// Summary of the kernel read-back at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readback {
    /// Host routes (/32, /128) on VM ports.
    pub host_routes: usize,
    /// Neighbour entries.
    pub neighbours: usize,
    /// Other routes of ours (prefix routes of a previous run).
    pub other_routes: usize,
}

/// The reconciler.
#[derive(Debug)]
pub struct Reconciler<E> {
    effects: E,
    locals: HashMap<IpAddr, LocalActual>,
    dirty: HashSet<IpAddr>,
    metrics: Arc<Metrics>,
}

impl<E: Effects> Reconciler<E> {
    /// A reconciler programming through `effects`.
    pub fn new(effects: E, metrics: Arc<Metrics>) -> Self {
        Reconciler { effects, locals: HashMap::new(), dirty: HashSet::new(), metrics }
    }

    /// What it programs through.
    pub fn effects(&self) -> &E {
        &self.effects
    }

    /// What it programs through, to change or inspect it directly (tests).
    pub fn effects_mut(&mut self) -> &mut E {
        &mut self.effects
    }

    /// Reads back the host routes (/32, /128) and neighbour entries carrying our protocol on interfaces for
    /// which `is_vm_port` holds.
    pub async fn read_back(&mut self, is_vm_port: impl Fn(u32) -> bool) -> anyhow::Result<Readback> {
        let mut summary = Readback::default();
        for r in self.effects.our_routes().await? {
            if r.dst.prefix_len() == r.dst.max_prefix_len() && r.oif != 0 && is_vm_port(r.oif) {
                let e = self.locals.entry(r.dst.addr()).or_insert(LocalActual { port: r.oif, route: true, mac: None });
                e.port = r.oif;
                e.route = true;
                summary.host_routes += 1;
            } else {
                summary.other_routes += 1;
            }
        }
        for n in self.effects.our_neighbours().await? {
            if !is_vm_port(n.ifindex) {
                continue;
            }
            summary.neighbours += 1;
            match self.locals.get_mut(&n.ip) {
                Some(e) if e.port == n.ifindex => e.mac = Some(n.mac),
                Some(_) => {
                    // A neighbour on another port than the route: stale, removed now (it is ours).
                    let _ = self.effects.del_neighbour(n.ip, n.ifindex).await;
                }
                None => {
                    self.locals.insert(n.ip, LocalActual { port: n.ifindex, route: false, mac: Some(n.mac) });
                }
            }
        }
        Ok(summary)
    }

    /// The port the kernel delivers `ip` to, if any.
    pub fn local_port(&self, ip: IpAddr) -> Option<u32> {
        self.locals.get(&ip).map(|l| l.port)
    }

    /// IPs with something programmed on a VM port, the remote VMs whose data-plane entries
    /// a previous run left (kernel backend), and the VMs with an announced migration in the data
    /// plane: what a complete snapshot may make stale.
    pub fn local_ips(&self) -> Vec<IpAddr> {
        let programmed = self.locals.keys().copied().chain(self.effects.tunnel_ips());
        let mut ips: Vec<IpAddr> = programmed.chain(self.effects.migration_ips()).collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// Number of IPs delivered on VM ports.
    pub fn local_count(&self) -> usize {
        self.locals.len()
    }

    /// IPs whose last reconcile failed (to retry).
    pub fn take_dirty(&mut self) -> Vec<IpAddr> {
        self.dirty.drain().collect()
    }

    /// A VM port vanished: the kernel dropped its routes and neighbours. Returns the IPs that
    /// were delivered through it (to reconcile again).
    pub fn port_gone(&mut self, port: u32) -> Vec<IpAddr> {
        let ips: Vec<IpAddr> = self.locals.iter().filter(|(_, l)| l.port == port).map(|(ip, _)| *ip).collect();
        for ip in &ips {
            self.locals.remove(ip);
        }
        ips
    }

    /// The plan for `ip` towards `target` (no side effects).
    pub fn plan(&self, ip: IpAddr, target: Target) -> Plan {
        plan::plan(self.locals.get(&ip).copied(), self.effects.tunnel(ip), target)
    }

    /// Makes `ip` match `target`.
    pub async fn apply(&mut self, ip: IpAddr, target: Target) -> Applied {
        let plan = self.plan(ip, target);
        let mut out = Applied { discover: plan.discover, ..Applied::default() };
        for op in plan.ops {
            match self.execute(ip, op).await {
                Ok(()) => {
                    out.ops += 1;
                    self.metrics.reconcile_op(op_label(op), true);
                    if let Op::SetRoute { port } = op {
                        out.became_local_on = Some(port);
                    }
                }
                Err(err) => {
                    out.failed += 1;
                    self.metrics.reconcile_op(op_label(op), false);
                    tracing::warn!(%ip, ?op, error = %format!("{err:#}"), "reconcile step failed; will retry");
                    self.dirty.insert(ip);
                    break;
                }
            }
        }
        out
    }

    async fn execute(&mut self, ip: IpAddr, op: Op) -> anyhow::Result<()> {
        match op {
            Op::SetNeighbour { port, mac } => {
                self.effects.replace_neighbour(ip, port, mac).await?;
                let e = self.locals.entry(ip).or_insert(LocalActual { port, route: false, mac: None });
                if e.port != port {
                    // The old port's entries are handled by later steps; track the new port.
                    *e = LocalActual { port, route: false, mac: Some(mac) };
                } else {
                    e.mac = Some(mac);
                }
            }
            Op::SetRoute { port } => {
                self.effects.replace_host_route(ip, port).await?;
                let e = self.locals.entry(ip).or_insert(LocalActual { port, route: true, mac: None });
                e.port = port;
                e.route = true;
            }
            Op::DelRoute { port } => {
                self.effects.del_host_route(ip, port).await?;
                if let Some(e) = self.locals.get_mut(&ip).filter(|e| e.port == port) {
                    e.route = false;
                    if e.mac.is_none() {
                        self.locals.remove(&ip);
                    }
                }
            }
            Op::DelNeighbour { port } => {
                self.effects.del_neighbour(ip, port).await?;
                if let Some(e) = self.locals.get_mut(&ip).filter(|e| e.port == port) {
                    e.mac = None;
                    if !e.route {
                        self.locals.remove(&ip);
                    }
                }
            }
            Op::SetTunnel(t) => self.effects.set_tunnel(ip, t).await?,
        }
        Ok(())
    }

    /// Makes the data plane's announced migration of `ip` `to` (None: none), counted as a
    /// `migration_set` / `migration_clear` operation when the data plane took it (the kernel
    /// backend keeps none).
    pub fn set_migration(&mut self, ip: IpAddr, to: Option<Ipv4Addr>) {
        if self.effects.migration(ip) == to {
            return;
        }
        self.effects.set_migration(ip, to);
        if self.effects.migration(ip) == to {
            self.metrics.reconcile_op(if to.is_some() { "migration_set" } else { "migration_clear" }, true);
            tracing::debug!(%ip, ?to, "announced migration relay updated");
        }
    }

    /// Replaces the accepted tunnel peers (kernel backend: creates and deletes tunnel devices,
    /// counted as `peer_add` / `peer_remove` operations). A failure is logged; a device still
    /// missing is created when a VM behind that peer is reconciled.
    pub async fn set_peers(&mut self, peers: &[Ipv4Addr]) {
        match self.effects.set_peers(peers).await {
            Ok(changes) => {
                for _ in 0..changes.added {
                    self.metrics.reconcile_op("peer_add", true);
                }
                for _ in 0..changes.removed {
                    self.metrics.reconcile_op("peer_remove", true);
                }
            }
            Err(err) => {
                self.metrics.reconcile_op("set_peers", false);
                tracing::warn!(error = %format!("{err:#}"), "updating the tunnel peers failed");
            }
        }
    }
}

fn op_label(op: Op) -> &'static str {
    match op {
        Op::SetNeighbour { .. } => "set_neighbour",
        Op::SetRoute { .. } => "set_route",
        Op::DelRoute { .. } => "del_route",
        Op::DelNeighbour { .. } => "del_neighbour",
        Op::SetTunnel(Tunnel::None) => "tunnel_remove",
        Op::SetTunnel(Tunnel::Local) => "tunnel_local",
        Op::SetTunnel(Tunnel::Remote(_)) => "tunnel_remote",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::effects::InMemory;

    const VM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 11));
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];

    fn reconciler(effects: InMemory) -> Reconciler<InMemory> {
        Reconciler::new(effects, Arc::new(Metrics::new()))
    }

    /// A refused step stops the plan — no route without its neighbour — and the IP is retried.
    #[tokio::test]
    async fn a_failed_step_stops_the_plan_and_the_ip_is_retried() {
        let mut r = reconciler(InMemory::default());
        let here = Target::Local { port: Some(5), mac: MAC };
        r.effects_mut().failing.insert(VM);
        let applied = r.apply(VM, here).await;
        assert_eq!((applied.ops, applied.failed), (0, 1));
        assert!(r.effects().routes.is_empty(), "the route waits for its neighbour");
        assert_eq!(r.local_port(VM), None);
        assert_eq!(r.take_dirty(), vec![VM]);
        r.effects_mut().failing.clear();
        let applied = r.apply(VM, here).await;
        assert_eq!((applied.ops, applied.failed, applied.became_local_on), (3, 0, Some(5)));
        assert_eq!(r.local_port(VM), Some(5));
        assert!(r.take_dirty().is_empty());
    }

    /// Read-back adopts our routes and neighbours on VM ports only; a neighbour of ours on
    /// another port than the address's route is stale and goes at once.
    #[tokio::test]
    async fn read_back_adopts_our_objects_on_vm_ports() {
        let mut previous = InMemory::with_previous_run(&[(VM, 5, MAC)]);
        previous.neighbours.insert((VM, 6), MAC);
        previous.routes.insert(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 12)), 9);
        let mut r = reconciler(previous);
        let readback = r.read_back(|port| port == 5 || port == 6).await.unwrap();
        assert_eq!(readback, Readback { host_routes: 1, neighbours: 2, other_routes: 1 });
        assert_eq!(r.local_ips(), vec![VM]);
        assert_eq!(r.local_port(VM), Some(5));
        assert_eq!(r.effects_mut().take_log(), vec![(VM, Op::DelNeighbour { port: 6 })]);
        assert_eq!(r.plan(VM, Target::Local { port: None, mac: MAC }).ops, vec![Op::SetTunnel(Tunnel::Local)]);
    }

    /// An IPv6 VM's /128 route and NDP entry are adopted as an IPv4 VM's /32 and ARP entry.
    #[tokio::test]
    async fn read_back_adopts_ipv6_host_routes_and_ndp_entries() {
        let vm6: IpAddr = "fd00:10::11".parse().unwrap();
        let mut r = reconciler(InMemory::with_previous_run(&[(VM, 5, MAC), (vm6, 5, MAC)]));
        let readback = r.read_back(|port| port == 5).await.unwrap();
        assert_eq!(readback, Readback { host_routes: 2, neighbours: 2, other_routes: 0 });
        assert_eq!(r.local_ips(), vec![VM, vm6]);
        assert_eq!(r.plan(vm6, Target::Local { port: None, mac: MAC }).ops, vec![Op::SetTunnel(Tunnel::Local)]);
        let applied = r.apply(vm6, Target::Remote(Ipv4Addr::new(198, 51, 100, 3))).await;
        assert_eq!(applied.ops, 3, "tunnel first, then the /128 and the NDP entry go");
        assert!(r.effects().routes.keys().all(|ip| *ip == VM));
    }
}
