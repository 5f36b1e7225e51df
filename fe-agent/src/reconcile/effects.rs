//! What the reconciler changes, behind one trait ([`Effects`]): the permanent neighbour entries
//! and host routes (/32, /128) of local VMs on the VM ports, each VM IP's data-plane entry, and
//! the data plane's announced migrations (where it relays a migrating VM's packets). [`Host`] is the
//! real thing (rtnetlink and the running data plane); [`InMemory`] keeps the same objects in
//! maps and logs every change, so the engine's event sequences run in tests without root.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use ipnet::IpNet;

use super::plan::Op;
use crate::forwarding::{Dataplane, PeerChanges, Tunnel};
use crate::netlink::{Kernel, OurNeighbour, OurRoute};

/// The kernel and data-plane operations of the reconciler. Deleting what is already gone is not
/// an error.
pub trait Effects: Send {
    /// The routes carrying our protocol (what a previous run left).
    fn our_routes(&mut self) -> impl Future<Output = Result<Vec<OurRoute>>> + Send;
    /// The neighbour entries carrying our protocol.
    fn our_neighbours(&mut self) -> impl Future<Output = Result<Vec<OurNeighbour>>> + Send;
    /// Installs or replaces the permanent neighbour entry of `ip` on `port`.
    fn replace_neighbour(&mut self, ip: IpAddr, port: u32, mac: [u8; 6]) -> impl Future<Output = Result<()>> + Send;
    /// Installs or replaces the host route (/32 or /128) of `ip` through `port`.
    fn replace_host_route(&mut self, ip: IpAddr, port: u32) -> impl Future<Output = Result<()>> + Send;
    /// Removes the host route of `ip` through `port`.
    fn del_host_route(&mut self, ip: IpAddr, port: u32) -> impl Future<Output = Result<()>> + Send;
    /// Removes the neighbour entry of `ip` on `port`.
    fn del_neighbour(&mut self, ip: IpAddr, port: u32) -> impl Future<Output = Result<()>> + Send;
    /// What the data plane does with `ip` now.
    fn tunnel(&self, ip: IpAddr) -> Tunnel;
    /// Sets the data-plane entry of `ip`.
    fn set_tunnel(&mut self, ip: IpAddr, tunnel: Tunnel) -> impl Future<Output = Result<()>> + Send;
    /// Data-plane entries of remote VMs a previous run left (to sweep after a snapshot).
    fn tunnel_ips(&self) -> Vec<IpAddr>;
    /// Where the data plane relays `ip`'s packets during an announced migration.
    fn migration(&self, ip: IpAddr) -> Option<Ipv4Addr>;
    /// VMs with an announced migration in the data plane.
    fn migration_ips(&self) -> Vec<IpAddr>;
    /// Announces (the announced FE's underlay address) or withdraws (None) `ip`'s migration in
    /// the data plane. In memory only: nothing to fail.
    fn set_migration(&mut self, ip: IpAddr, to: Option<Ipv4Addr>);
    /// Accepts tunnel packets only from these underlay addresses.
    fn set_peers(&mut self, peers: &[Ipv4Addr]) -> impl Future<Output = Result<PeerChanges>> + Send;
    /// Heap bytes of the data plane's forwarding table, if it has one in this process.
    fn table_bytes(&self) -> Option<usize>;
}

/// The host: rtnetlink for routes and neighbours, the running data plane for tunnel entries.
#[derive(Debug)]
pub struct Host {
    kernel: Kernel,
    dataplane: Dataplane,
}

impl Host {
    /// Programs `kernel` and `dataplane`.
    pub fn new(kernel: Kernel, dataplane: Dataplane) -> Self {
        Host { kernel, dataplane }
    }

    /// The data plane.
    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }
}

impl Effects for Host {
    async fn our_routes(&mut self) -> Result<Vec<OurRoute>> {
        Ok(self.kernel.our_routes().await?)
    }

    async fn our_neighbours(&mut self) -> Result<Vec<OurNeighbour>> {
        Ok(self.kernel.our_neighbours().await?)
    }

    async fn replace_neighbour(&mut self, ip: IpAddr, port: u32, mac: [u8; 6]) -> Result<()> {
        Ok(self.kernel.replace_neighbour(ip, port, mac).await?)
    }

    async fn replace_host_route(&mut self, ip: IpAddr, port: u32) -> Result<()> {
        Ok(self.kernel.replace_host_route(ip, port).await?)
    }

    async fn del_host_route(&mut self, ip: IpAddr, port: u32) -> Result<()> {
        Ok(self.kernel.del_host_route(ip, port).await?)
    }

    async fn del_neighbour(&mut self, ip: IpAddr, port: u32) -> Result<()> {
        Ok(self.kernel.del_neighbour(ip, port).await?)
    }

    fn tunnel(&self, ip: IpAddr) -> Tunnel {
        self.dataplane.tunnel(ip)
    }

    async fn set_tunnel(&mut self, ip: IpAddr, tunnel: Tunnel) -> Result<()> {
        self.dataplane.set_tunnel(&self.kernel, ip, tunnel).await
    }

    fn tunnel_ips(&self) -> Vec<IpAddr> {
        self.dataplane.tunnel_ips()
    }

    fn migration(&self, ip: IpAddr) -> Option<Ipv4Addr> {
        self.dataplane.migration(ip)
    }

    fn migration_ips(&self) -> Vec<IpAddr> {
        self.dataplane.migration_ips()
    }

    fn set_migration(&mut self, ip: IpAddr, to: Option<Ipv4Addr>) {
        self.dataplane.set_migration(ip, to);
    }

    async fn set_peers(&mut self, peers: &[Ipv4Addr]) -> Result<PeerChanges> {
        self.dataplane.set_peers(&self.kernel, peers).await
    }

    fn table_bytes(&self) -> Option<usize> {
        self.dataplane.fib().map(|fib| fib.heap_bytes())
    }
}

/// Routes, neighbours and tunnel entries in maps, with the kernel's semantics where the
/// reconciler relies on them (one host route per address; neighbour entries per port; deleting
/// what is gone succeeds), and a log of every change in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InMemory {
    /// Host routes: address → port.
    pub routes: BTreeMap<IpAddr, u32>,
    /// Permanent neighbour entries: (address, port) → MAC.
    pub neighbours: BTreeMap<(IpAddr, u32), [u8; 6]>,
    /// Data-plane entries (absent = [`Tunnel::None`]).
    pub tunnels: BTreeMap<IpAddr, Tunnel>,
    /// Accepted tunnel sources.
    pub peers: Vec<Ipv4Addr>,
    /// Announced migrations: VM → the announced FE's underlay address.
    pub migrations: BTreeMap<IpAddr, Ipv4Addr>,
    /// Every change made through [`Effects`], oldest first (migrations apart: `migration_log`).
    pub log: Vec<(IpAddr, Op)>,
    /// Every [`Effects::set_migration`], oldest first.
    pub migration_log: Vec<(IpAddr, Option<Ipv4Addr>)>,
    /// Addresses whose changes fail (as a kernel that refuses them), changing nothing.
    pub failing: BTreeSet<IpAddr>,
}

impl InMemory {
    /// What a previous run left: routes and neighbours carrying our protocol (not logged).
    pub fn with_previous_run(local: &[(IpAddr, u32, [u8; 6])]) -> Self {
        let mut m = InMemory::default();
        for &(ip, port, mac) in local {
            m.routes.insert(ip, port);
            m.neighbours.insert((ip, port), mac);
        }
        m
    }

    /// Takes the log (the changes since the last call).
    pub fn take_log(&mut self) -> Vec<(IpAddr, Op)> {
        std::mem::take(&mut self.log)
    }

    /// Logs `op` on `ip`, or fails if `ip` is failing.
    fn change(&mut self, ip: IpAddr, op: Op) -> Result<()> {
        if self.failing.contains(&ip) {
            bail!("{op:?} of {ip} refused");
        }
        self.log.push((ip, op));
        Ok(())
    }
}

impl Effects for InMemory {
    async fn our_routes(&mut self) -> Result<Vec<OurRoute>> {
        Ok(self.routes.iter().map(|(ip, port)| OurRoute { dst: IpNet::from(*ip), oif: *port }).collect())
    }

    async fn our_neighbours(&mut self) -> Result<Vec<OurNeighbour>> {
        Ok(self.neighbours.iter().map(|(&(ip, ifindex), &mac)| OurNeighbour { ip, ifindex, mac }).collect())
    }

    async fn replace_neighbour(&mut self, ip: IpAddr, port: u32, mac: [u8; 6]) -> Result<()> {
        self.change(ip, Op::SetNeighbour { port, mac })?;
        self.neighbours.insert((ip, port), mac);
        Ok(())
    }

    async fn replace_host_route(&mut self, ip: IpAddr, port: u32) -> Result<()> {
        self.change(ip, Op::SetRoute { port })?;
        self.routes.insert(ip, port);
        Ok(())
    }

    async fn del_host_route(&mut self, ip: IpAddr, port: u32) -> Result<()> {
        self.change(ip, Op::DelRoute { port })?;
        if self.routes.get(&ip) == Some(&port) {
            self.routes.remove(&ip);
        }
        Ok(())
    }

    async fn del_neighbour(&mut self, ip: IpAddr, port: u32) -> Result<()> {
        self.change(ip, Op::DelNeighbour { port })?;
        self.neighbours.remove(&(ip, port));
        Ok(())
    }

    fn tunnel(&self, ip: IpAddr) -> Tunnel {
        self.tunnels.get(&ip).copied().unwrap_or(Tunnel::None)
    }

    async fn set_tunnel(&mut self, ip: IpAddr, tunnel: Tunnel) -> Result<()> {
        self.change(ip, Op::SetTunnel(tunnel))?;
        match tunnel {
            Tunnel::None => self.tunnels.remove(&ip),
            t => self.tunnels.insert(ip, t),
        };
        Ok(())
    }

    fn tunnel_ips(&self) -> Vec<IpAddr> {
        self.tunnels.iter().filter(|(_, t)| matches!(t, Tunnel::Remote(_))).map(|(ip, _)| *ip).collect()
    }

    fn migration(&self, ip: IpAddr) -> Option<Ipv4Addr> {
        self.migrations.get(&ip).copied()
    }

    fn migration_ips(&self) -> Vec<IpAddr> {
        self.migrations.keys().copied().collect()
    }

    fn set_migration(&mut self, ip: IpAddr, to: Option<Ipv4Addr>) {
        self.migration_log.push((ip, to));
        match to {
            Some(to) => self.migrations.insert(ip, to),
            None => self.migrations.remove(&ip),
        };
    }

    async fn set_peers(&mut self, peers: &[Ipv4Addr]) -> Result<PeerChanges> {
        self.peers = peers.to_vec();
        Ok(PeerChanges::default())
    }

    fn table_bytes(&self) -> Option<usize> {
        None
    }
}
