//! The kernel backend (needs the `ipip` module): the kernel forwards, the agent only programs it.
//!
//! * **One point-to-point ipip device per registered FE** (`victor-<peer hex>`: local = our
//!   underlay address, remote = the FE's, TTL 64, path MTU discovery on, MTU = underlay − 20).
//!   A remote VM is a plain `/32` route through its FE's device (our route protocol).
//! * **Tunnel-source filter, kernel-enforced by construction**: the kernel decapsulates IP-in-IP
//!   only on a device whose (local, remote) pair matches the packet, so only the registered FEs'
//!   packets are accepted. Packets from any other source fall to the catch-all — the
//!   collect-metadata ipip device named `--tun-name` (the kernel consults it after every
//!   point-to-point match failed) — which exists to count them: no route points at it and its
//!   strict reverse-path filter (`rp_filter=1`, and `forwarding=0`) makes the kernel drop all it
//!   receives, to VMs and to the FE itself. Without the catch-all the kernel still drops them
//!   (there is no device to decapsulate on): the filter fails closed.
//! * **No binding → drop, counted**: the mobile prefixes are routed to a dummy device
//!   (`victor-nobind`, via the IPv4 dummy address 192.0.0.8 so one neighbour entry serves all
//!   destinations), which frees what it transmits.
//! * **Counters** ([`counters`]): the devices' own link statistics — per peer each way, totals,
//!   drops by reason.
//! * **Restarts**: all of it lives in the kernel and keeps forwarding while the agent is down;
//!   [`KernelPlane::start`] adopts what it finds (devices by their alias, routes by our protocol),
//!   changes only what differs, removes what is ours and stale. Peers that left are removed at
//!   the first [`KernelPlane::set_peers`] (after the first complete snapshot), never before.

pub mod counters;
pub mod devices;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope, RouteType};

use super::{DataplaneConfig, Tunnel};
use crate::netlink::{Kernel, NetlinkError};
use counters::{KernelCounters, watched_of};
use devices::{Device, DeviceError, Role, SINK_GATEWAY, SINK_NAME};

/// The catch-all's sysctls: strict reverse-path filter (no route points at it, so everything it
/// receives fails the check and is dropped) and no forwarding from it.
const CATCH_ALL_SYSCTLS: [(&str, &str); 2] = [("rp_filter", "1"), ("forwarding", "0")];

/// A failed kernel data-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A device operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A route operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A route operation on a prefix failed.
    #[error("{what}: {source}")]
    Route {
        /// The operation.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// An IPv6 VM behind another FE: this backend has no `sit` devices (6in4) yet.
    #[error("{0} is an IPv6 VM behind another FE; the kernel data plane carries IPv4 only (use --dataplane tun)")]
    Ipv6Remote(IpAddr),
    /// A tunnel to an address that is not a registered FE (the kernel would accept its packets).
    #[error("{0} is not a registered FE: no tunnel device for it")]
    NotRegistered(Ipv4Addr),
}

/// What [`KernelPlane::start`] found and changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Devices of a previous run kept as they were or fixed (catch-all, sink, peers).
    pub devices_adopted: usize,
    /// Devices created (none on a restart).
    pub devices_created: usize,
    /// Adopted devices whose MTU, state or alias had to be changed.
    pub devices_fixed: usize,
    /// Devices of ours removed (a peer tunnel from another underlay address, a catch-all under
    /// another name).
    pub devices_removed: usize,
    /// Remote VMs' routes adopted.
    pub tunnel_routes: usize,
    /// Mobile-prefix routes installed (none on a restart).
    pub prefix_routes_set: usize,
    /// Routes of ours removed as stale.
    pub stale_routes_removed: usize,
}

/// Peer tunnels added and removed by [`KernelPlane::set_peers`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// Devices created.
    pub added: usize,
    /// Devices deleted.
    pub removed: usize,
}

/// The running kernel data plane.
#[derive(Debug)]
pub struct KernelPlane {
    /// Our underlay address (local end of every tunnel).
    underlay: Ipv4Addr,
    /// MTU of the tunnel devices.
    tunnel_mtu: u32,
    /// The catch-all device's name and index.
    catch_all: (String, u32),
    /// The sink device's index.
    sink: u32,
    /// The registered FEs as last told; None until the first [`KernelPlane::set_peers`].
    registered: Option<BTreeSet<Ipv4Addr>>,
    /// Tunnel devices by peer.
    peers: BTreeMap<Ipv4Addr, u32>,
    /// Remote VMs and their peers as programmed.
    remotes: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Local VMs (no data-plane object: their host route on the VM port is the reconciler's).
    locals: HashSet<IpAddr>,
    counters: Arc<KernelCounters>,
    adoption: Adoption,
}

impl KernelPlane {
    /// Sets up the kernel data plane, adopting what a previous run left (see the module doc).
    pub async fn start(config: &DataplaneConfig, kernel: &Kernel) -> Result<KernelPlane, KernelError> {
        let handle = kernel.handle();
        let tunnel_mtu = u32::from(config.underlay_mtu.saturating_sub(20));
        let mut found = Adoption::default();
        let all = devices::all(handle).await?;

        // Ours but not what this configuration wants: gone first (one collect-metadata ipip
        // device per namespace: a catch-all under an old name would block the new one).
        let stale = |d: &Device| match d.role() {
            Some(Role::CatchAll) => d.name != config.device,
            Some(Role::Sink) => d.name != SINK_NAME,
            Some(Role::Peer(p)) => d.local != Some(config.underlay) || d.name != devices::peer_name(p),
            None => false,
        };
        for d in all.iter().filter(|d| stale(d)) {
            devices::delete(handle, d.index, &d.name).await?;
            found.devices_removed += 1;
        }
        let catch_all = match all.iter().find(|d| d.name == config.device) {
            // A collect-metadata ipip device under our name (also one from before aliases).
            Some(d) if d.is_external_ipip() => {
                found.devices_fixed +=
                    usize::from(devices::fix(handle, d, tunnel_mtu, &devices::alias(Role::CatchAll)).await?);
                found.devices_adopted += 1;
                d.index
            }
            Some(_) => return Err(DeviceError::NotOurs(config.device.clone()).into()),
            None => {
                found.devices_created += 1;
                devices::create_catch_all(handle, &config.device, tunnel_mtu).await?.index
            }
        };
        for (key, value) in CATCH_ALL_SYSCTLS {
            devices::ensure_sysctl(&config.device, key, value)?;
        }
        let sink = match all.iter().find(|d| d.name == SINK_NAME) {
            Some(d) if d.role() == Some(Role::Sink) => {
                found.devices_fixed += usize::from(devices::fix(handle, d, 65535, &devices::alias(Role::Sink)).await?);
                found.devices_adopted += 1;
                d.index
            }
            Some(_) => return Err(DeviceError::NotOurs(SINK_NAME.into()).into()),
            None => {
                found.devices_created += 1;
                devices::create_sink(handle).await?.index
            }
        };
        let mut peers = BTreeMap::new();
        for d in all.iter().filter(|d| !stale(d)) {
            if let Some(Role::Peer(peer)) = d.role() {
                found.devices_fixed +=
                    usize::from(devices::fix(handle, d, tunnel_mtu, &devices::alias(Role::Peer(peer))).await?);
                found.devices_adopted += 1;
                peers.insert(peer, d.index);
            }
        }

        let mut plane = KernelPlane {
            underlay: config.underlay,
            tunnel_mtu,
            catch_all: (config.device.clone(), catch_all),
            sink,
            registered: None,
            peers,
            remotes: HashMap::new(),
            locals: HashSet::new(),
            counters: Arc::new(KernelCounters::new(handle.clone(), Default::default())),
            adoption: found,
        };
        plane.adopt_routes(config, kernel).await?;
        plane.watch();
        tracing::info!(
            catch_all = %config.device,
            mtu = tunnel_mtu,
            peers = plane.peers.len(),
            adoption = ?plane.adoption,
            "kernel IP-in-IP data plane running (one ipip device per registered FE)"
        );
        Ok(plane)
    }

    /// Reads back our routes: remote VMs through peer devices, local VMs' /32s (the
    /// reconciler's), the mobile prefixes into the sink (installed if missing); removes ours
    /// that nothing wants.
    async fn adopt_routes(&mut self, config: &DataplaneConfig, kernel: &Kernel) -> Result<(), KernelError> {
        let by_index: HashMap<u32, Ipv4Addr> = self.peers.iter().map(|(p, i)| (*i, *p)).collect();
        let routes = kernel.our_routes().await?;
        for net in &config.prefixes {
            if !routes.iter().any(|r| r.dst == IpNet::V4(*net) && r.oif == self.sink) {
                self.route_prefix(kernel, *net).await?;
                self.adoption.prefix_routes_set += 1;
            }
        }
        for r in &routes {
            let IpNet::V4(dst) = r.dst else {
                // IPv6: only local VMs' /128s on VM ports (the reconciler's); nothing else is ours.
                if r.dst.prefix_len() == 128 && r.oif != 0 {
                    self.locals.insert(r.dst.addr());
                }
                continue;
            };
            if dst.prefix_len() == 32 {
                let ip = dst.addr();
                if let Some(peer) = by_index.get(&r.oif) {
                    self.remotes.insert(ip, *peer);
                    self.adoption.tunnel_routes += 1;
                } else if r.oif == self.catch_all.1 || r.oif == self.sink {
                    // Nothing of ours is routed there (an older run's encap route): stale.
                    kernel.del_host_route(IpAddr::V4(ip), r.oif).await?;
                    self.adoption.stale_routes_removed += 1;
                } else if r.oif != 0 {
                    self.locals.insert(IpAddr::V4(ip));
                }
            } else if (r.oif == self.sink || r.oif == 0) && !config.prefixes.contains(&dst) {
                self.del_prefix_route(kernel, dst, r.oif).await?;
                self.adoption.stale_routes_removed += 1;
            }
        }
        Ok(())
    }

    /// `ip route replace NET via 192.0.0.8 dev victor-nobind onlink proto P`.
    async fn route_prefix(&self, kernel: &Kernel, net: Ipv4Net) -> Result<(), KernelError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .gateway(SINK_GATEWAY)
            .output_interface(self.sink)
            .onlink()
            .protocol(RouteProtocol::from(kernel.protocol()))
            .build();
        kernel.handle().route().add(msg).replace().execute().await.map_err(|source| KernelError::Route {
            what: format!("route the mobile prefix {net} to {SINK_NAME}"),
            source,
        })
    }

    /// Deletes one of our prefix routes (into the sink, or a blackhole of an older run).
    async fn del_prefix_route(&self, kernel: &Kernel, dst: Ipv4Net, oif: u32) -> Result<(), KernelError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .protocol(RouteProtocol::from(kernel.protocol()));
        b = if oif == 0 { b.kind(RouteType::BlackHole) } else { b.output_interface(oif).scope(RouteScope::Universe) };
        kernel
            .handle()
            .route()
            .del(b.build())
            .execute()
            .await
            .map_err(|source| KernelError::Route { what: format!("delete the stale route {dst}"), source })
    }

    /// What start found and changed.
    pub fn adoption(&self) -> Adoption {
        self.adoption
    }

    /// The counters (for /metrics).
    pub fn counters(&self) -> Arc<KernelCounters> {
        self.counters.clone()
    }

    /// Remote VMs with a route (to sweep stale ones after a complete snapshot).
    pub fn tunnel_ips(&self) -> Vec<IpAddr> {
        self.remotes.keys().map(|ip| IpAddr::V4(*ip)).collect()
    }

    /// The peers with a tunnel device.
    pub fn peers(&self) -> Vec<Ipv4Addr> {
        self.peers.keys().copied().collect()
    }

    /// What the kernel does with `ip` now (as programmed or adopted).
    pub fn tunnel(&self, ip: IpAddr) -> Tunnel {
        let remote = match ip {
            IpAddr::V4(v4) => self.remotes.get(&v4),
            IpAddr::V6(_) => None,
        };
        match remote {
            Some(p) => Tunnel::Remote(*p),
            None if self.locals.contains(&ip) => Tunnel::Local,
            None => Tunnel::None,
        }
    }

    /// Programs `ip`'s entry: a /32 through the peer's device for a remote VM, none otherwise.
    /// IPv6 VMs can only be local here ([`KernelError::Ipv6Remote`]).
    pub async fn set_tunnel(&mut self, kernel: &Kernel, ip: IpAddr, tunnel: Tunnel) -> Result<(), KernelError> {
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) if matches!(tunnel, Tunnel::Remote(_)) => return Err(KernelError::Ipv6Remote(ip)),
            IpAddr::V6(_) => {
                if tunnel == Tunnel::Local {
                    self.locals.insert(ip);
                } else {
                    self.locals.remove(&ip);
                }
                return Ok(());
            }
        };
        match tunnel {
            Tunnel::Remote(peer) => {
                let dev = self.peer_device(kernel, peer).await?;
                kernel.replace_host_route(ip, dev).await?;
                self.remotes.insert(v4, peer);
                self.locals.remove(&ip);
            }
            Tunnel::Local | Tunnel::None => {
                // A route of ours through the peer device, unless a local /32 replaced it.
                if let Some(dev) = self.remotes.get(&v4).and_then(|p| self.peers.get(p)) {
                    kernel.del_host_route(ip, *dev).await?;
                }
                self.remotes.remove(&v4);
                if tunnel == Tunnel::Local {
                    self.locals.insert(ip);
                } else {
                    self.locals.remove(&ip);
                }
            }
        }
        Ok(())
    }

    /// The tunnel device to `peer`, created if `peer` is registered and has none yet.
    async fn peer_device(&mut self, kernel: &Kernel, peer: Ipv4Addr) -> Result<u32, KernelError> {
        if let Some(dev) = self.peers.get(&peer) {
            return Ok(*dev);
        }
        if !self.registered.as_ref().is_some_and(|r| r.contains(&peer)) {
            return Err(KernelError::NotRegistered(peer));
        }
        let dev = self.create_peer(kernel, peer).await?;
        self.watch();
        Ok(dev)
    }

    async fn create_peer(&mut self, kernel: &Kernel, peer: Ipv4Addr) -> Result<u32, KernelError> {
        let handle = kernel.handle();
        let index = match devices::create_peer(handle, peer, self.underlay, self.tunnel_mtu).await {
            Ok(dev) => dev.index,
            Err(err) => match devices::by_name(handle, &devices::peer_name(peer)).await? {
                // Created meanwhile by an earlier attempt that timed out: ours, adopt it.
                Some(d) if d.role() == Some(Role::Peer(peer)) && d.local == Some(self.underlay) => d.index,
                _ => return Err(err.into()),
            },
        };
        self.peers.insert(peer, index);
        tracing::info!(%peer, device = devices::peer_name(peer), "tunnel device to a registered FE created");
        Ok(index)
    }

    /// Makes the tunnel devices those of `registered`: creates the missing ones, deletes the
    /// others (the kernel removes their routes; the VMs behind them are dropped until they get a
    /// new binding). Checks the catch-all's reverse-path filter is still on.
    pub async fn set_peers(&mut self, kernel: &Kernel, registered: &[Ipv4Addr]) -> Result<PeerChanges, KernelError> {
        let wanted: BTreeSet<Ipv4Addr> = registered.iter().copied().filter(|p| *p != self.underlay).collect();
        self.registered = Some(wanted.clone());
        let mut changes = PeerChanges::default();
        let mut failure = None;
        for (key, value) in CATCH_ALL_SYSCTLS {
            match devices::ensure_sysctl(&self.catch_all.0, key, value) {
                Ok(true) => {
                    tracing::warn!(device = %self.catch_all.0, key, value, "catch-all sysctl was changed behind our back; restored")
                }
                Ok(false) => {}
                Err(e) => failure = failure.or(Some(e.into())),
            }
        }
        let missing: Vec<Ipv4Addr> = wanted.iter().copied().filter(|p| !self.peers.contains_key(p)).collect();
        for peer in missing {
            match self.create_peer(kernel, peer).await {
                Ok(_) => changes.added += 1,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot create the tunnel device (retried when a VM needs it)");
                    failure = failure.or(Some(e));
                }
            }
        }
        let gone: Vec<(Ipv4Addr, u32)> =
            self.peers.iter().filter(|(p, _)| !wanted.contains(p)).map(|(p, i)| (*p, *i)).collect();
        for (peer, index) in gone {
            let name = devices::peer_name(peer);
            match devices::delete(kernel.handle(), index, &name).await {
                Ok(()) => {
                    self.peers.remove(&peer);
                    self.remotes.retain(|_, p| *p != peer);
                    changes.removed += 1;
                    tracing::info!(%peer, device = name, "tunnel device of an FE that left removed");
                }
                Err(e) => failure = failure.or(Some(e.into())),
            }
        }
        self.watch();
        match failure {
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }

    /// Tells the counters which devices are ours now.
    fn watch(&self) {
        let roles = [(Role::CatchAll, self.catch_all.1), (Role::Sink, self.sink)]
            .into_iter()
            .chain(self.peers.iter().map(|(p, i)| (Role::Peer(*p), *i)));
        self.counters.watch(watched_of(roles));
    }
}

/// Removes every device of a kernel data plane this agent left in the namespace (and with them
/// their routes): for the userspace backend, which cannot share the namespace with it. Returns
/// how many it removed.
pub async fn remove_leftovers(kernel: &Kernel) -> Result<usize, KernelError> {
    let mut removed = 0;
    for d in devices::all(kernel.handle()).await?.iter().filter(|d| d.role().is_some()) {
        devices::delete(kernel.handle(), d.index, &d.name).await?;
        removed += 1;
    }
    Ok(removed)
}
