//! The kernel backend (needs the `ipip` module, and `sit` for IPv6): the kernel forwards, the
//! agent only programs it.
//!
//! * **Two point-to-point devices per registered FE**: ipip (`victor-<peer hex>`) for IPv4 VMs
//!   and `sit` (`vsit-<peer hex>`, 6in4: IP protocol 41, RFC 4213, as the userspace forwarder
//!   sends it) for IPv6 VMs; both with local = our underlay address, remote = the FE's, TTL 64,
//!   path MTU discovery on, MTU = underlay − 20. A remote VM is a plain `/32` (IPv6: `/128`)
//!   route through its FE's device of that family (our route protocol). Without the `sit` module
//!   (only possible with IPv4 mobile prefixes alone, see [`super::choose`]) an IPv6 VM behind
//!   another FE is refused ([`KernelError::Ipv6Remote`]).
//! * **Tunnel-source filter, kernel-enforced by construction**: the kernel decapsulates IP-in-IP
//!   and 6in4 only on a device whose (local, remote) pair matches the packet, so only the
//!   registered FEs' packets are accepted. Packets from any other source fall to a catch-all,
//!   which exists to count them; the kernel drops all it receives, to VMs and to the FE itself:
//!   - IP-in-IP: the collect-metadata ipip device named `--tun-name` (the kernel consults it after
//!     every point-to-point match failed); no route points at it and its strict reverse-path
//!     filter (`rp_filter=1`, and `forwarding=0`) drops everything;
//!   - 6in4: the namespace's wildcard `sit` device (local and remote any; a collect-metadata one
//!     would collide with it): the kernel's own `sit0`, which it creates with the module and never
//!     deletes, adopted (alias, up), or `victor-6in4` where there is no `sit0`; IPv6 is disabled
//!     on it (`disable_ipv6=1`, set before it goes up), so the kernel discards what it
//!     decapsulates there. The userspace backend hands `sit0` back (down, no alias).
//!
//!   Without the catch-alls the kernel still drops such packets (there is no device to
//!   decapsulate on): the filter fails closed.
//! * **No binding → drop, counted**: the mobile prefixes are routed to a dummy device
//!   (`victor-nobind`), which frees what it transmits: IPv4 via the IPv4 dummy address 192.0.0.8
//!   (`onlink`), IPv6 via the link-local `fe80::8`, so one (NOARP) neighbour entry per family
//!   serves all destinations. A `blackhole` route would drop too, but uncounted per cause.
//! * **Counters** ([`counters`]): the devices' own link statistics — per peer each way (ipip and
//!   sit together), totals, drops by reason.
//! * **Restarts**: all of it lives in the kernel and keeps forwarding while the agent is down;
//!   [`KernelPlane::start`] adopts what it finds (devices by their alias, routes by our protocol),
//!   changes only what differs, removes what is ours and stale. Peers that left are removed at
//!   the first [`KernelPlane::set_peers`] (after the first complete snapshot), never before;
//!   registered peers missing a device (a previous run without `sit`) get it there.

pub mod counters;
pub mod devices;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};

use super::{DataplaneConfig, Tunnel};
use crate::netlink::{Kernel, NetlinkError};
use counters::{KernelCounters, watched_of};
use devices::{Device, DeviceError, Role, SINK_GATEWAY, SINK_GATEWAY6, SINK_NAME, SIT_FALLBACK};

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
    /// An IPv6 VM behind another FE, and the kernel cannot load its `sit` module (6in4).
    #[error(
        "{0} is an IPv6 VM behind another FE; the kernel's sit module (6in4) cannot be loaded here, so the kernel data plane carries IPv4 only (use --dataplane tun)"
    )]
    Ipv6Remote(IpAddr),
    /// A tunnel to an address that is not a registered FE (the kernel would accept its packets).
    #[error("{0} is not a registered FE: no tunnel device for it")]
    NotRegistered(Ipv4Addr),
}

/// What [`KernelPlane::start`] found and changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Devices of a previous run kept as they were or fixed (catch-alls, sink, peers).
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
    /// Peers whose devices were created.
    pub added: usize,
    /// Peers whose devices were deleted.
    pub removed: usize,
}

/// The devices to one registered FE, by interface index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PeerDevices {
    /// The ipip device (IPv4 VMs); 0 while missing.
    ipip: u32,
    /// The sit device (IPv6 VMs); 0 while missing (always, without the `sit` module).
    sit: u32,
}

impl PeerDevices {
    /// The device carrying `ip`'s family (0: none).
    fn for_ip(&self, ip: IpAddr) -> u32 {
        if ip.is_ipv4() { self.ipip } else { self.sit }
    }
}

/// The running kernel data plane.
#[derive(Debug)]
pub struct KernelPlane {
    /// Our underlay address (local end of every tunnel).
    underlay: Ipv4Addr,
    /// MTU of the tunnel devices.
    tunnel_mtu: u32,
    /// The kernel has `sit`: every peer gets a sit device too.
    sit: bool,
    /// The catch-all device's name and index.
    catch_all: (String, u32),
    /// The 6in4 catch-all's name and index (0: no `sit`).
    catch_all6: (String, u32),
    /// The sink device's index.
    sink: u32,
    /// The registered FEs as last told; None until the first [`KernelPlane::set_peers`].
    registered: Option<BTreeSet<Ipv4Addr>>,
    /// Tunnel devices by peer.
    peers: BTreeMap<Ipv4Addr, PeerDevices>,
    /// Remote VMs and their peers as programmed.
    remotes: HashMap<IpAddr, Ipv4Addr>,
    /// Local VMs (no data-plane object: their host route on the VM port is the reconciler's).
    locals: HashSet<IpAddr>,
    counters: Arc<KernelCounters>,
    adoption: Adoption,
}

impl KernelPlane {
    /// Sets up the kernel data plane, adopting what a previous run left (see the module doc).
    /// `sit`: the kernel has its `sit` module (IPv6 VMs behind other FEs are carried as 6in4).
    pub async fn start(config: &DataplaneConfig, kernel: &Kernel, sit: bool) -> Result<KernelPlane, KernelError> {
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
            Some(Role::Peer6(p)) => !sit || d.local != Some(config.underlay) || d.name != devices::sit_name(p),
            Some(Role::CatchAll6) | None => false,
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
        let catch_all6 = if sit { Self::catch_all6(handle, &all, &mut found).await? } else { (String::new(), 0) };
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
        let mut peers: BTreeMap<Ipv4Addr, PeerDevices> = BTreeMap::new();
        for d in all.iter().filter(|d| !stale(d)) {
            let (peer, role) = match d.role() {
                Some(role @ (Role::Peer(peer) | Role::Peer6(peer))) => (peer, role),
                _ => continue,
            };
            found.devices_fixed += usize::from(devices::fix(handle, d, tunnel_mtu, &devices::alias(role)).await?);
            found.devices_adopted += 1;
            let entry = peers.entry(peer).or_default();
            if matches!(role, Role::Peer(_)) {
                entry.ipip = d.index;
            } else {
                entry.sit = d.index;
            }
        }

        let mut plane = KernelPlane {
            underlay: config.underlay,
            tunnel_mtu,
            sit,
            catch_all: (config.device.clone(), catch_all),
            catch_all6,
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
            sit,
            peers = plane.peers.len(),
            adoption = ?plane.adoption,
            "kernel data plane running (per registered FE one ipip device{})",
            if sit { " and one sit device" } else { "; no sit module: IPv4 only" }
        );
        Ok(plane)
    }

    /// Adopts the namespace's wildcard `sit` device as the 6in4 catch-all (ours from a previous
    /// run, or the kernel's `sit0`), or creates one; returns its name and index.
    async fn catch_all6(
        handle: &rtnetlink::Handle,
        all: &[Device],
        found: &mut Adoption,
    ) -> Result<(String, u32), KernelError> {
        let existing = all.iter().find(|d| d.is_wildcard_sit());
        if let Some(d) = existing
            && d.role() != Some(Role::CatchAll6)
            && d.name != SIT_FALLBACK
        {
            // Someone else's wildcard sit device: the kernel gives it what ours would get.
            return Err(DeviceError::NotOurs(d.name.clone()).into());
        }
        let (dev, created) = devices::ensure_catch_all6(handle, existing).await?;
        if created {
            found.devices_created += 1;
        } else {
            found.devices_adopted += 1;
        }
        Ok((dev.name, dev.index))
    }

    /// True if `devices` has every device this plane gives a peer.
    fn complete(&self, devices: &PeerDevices) -> bool {
        devices.ipip != 0 && (!self.sit || devices.sit != 0)
    }

    /// Reads back our routes: remote VMs through peer devices, local VMs' /32s and /128s (the
    /// reconciler's), the mobile prefixes into the sink (installed if missing); removes ours
    /// that nothing wants.
    async fn adopt_routes(&mut self, config: &DataplaneConfig, kernel: &Kernel) -> Result<(), KernelError> {
        let mut by_index: HashMap<u32, Ipv4Addr> = HashMap::new();
        for (peer, d) in &self.peers {
            by_index.insert(d.ipip, *peer);
            by_index.insert(d.sit, *peer);
        }
        by_index.remove(&0);
        let routes = kernel.our_routes().await?;
        let wanted = config.all_prefixes();
        for net in &wanted {
            if !routes.iter().any(|r| r.dst == *net && r.oif == self.sink) {
                self.route_prefix(kernel, *net).await?;
                self.adoption.prefix_routes_set += 1;
            }
        }
        for r in &routes {
            if r.dst.prefix_len() == r.dst.max_prefix_len() {
                let ip = r.dst.addr();
                if let Some(peer) = by_index.get(&r.oif) {
                    self.remotes.insert(ip, *peer);
                    self.adoption.tunnel_routes += 1;
                } else if [self.catch_all.1, self.catch_all6.1, self.sink].contains(&r.oif) && r.oif != 0 {
                    // Nothing of ours is routed there (an older run's encap route): stale.
                    kernel.del_host_route(ip, r.oif).await?;
                    self.adoption.stale_routes_removed += 1;
                } else if r.oif != 0 {
                    self.locals.insert(ip);
                }
            } else if r.oif == self.sink && !wanted.contains(&r.dst) {
                self.del_prefix_route(kernel, r.dst, r.oif).await?;
                self.adoption.stale_routes_removed += 1;
            } else if r.oif == 0 && r.dst.addr().is_ipv4() && !wanted.contains(&r.dst) {
                // A blackhole of an older run (IPv4 only: IPv6 prefixes never had one).
                self.del_prefix_route(kernel, r.dst, r.oif).await?;
                self.adoption.stale_routes_removed += 1;
            }
        }
        Ok(())
    }

    /// `ip route replace NET via 192.0.0.8 dev victor-nobind onlink proto P`
    /// (IPv6: `via fe80::8`).
    async fn route_prefix(&self, kernel: &Kernel, net: IpNet) -> Result<(), KernelError> {
        let protocol = RouteProtocol::from(kernel.protocol());
        let msg = match net {
            IpNet::V4(net) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .gateway(SINK_GATEWAY)
                .output_interface(self.sink)
                .onlink()
                .protocol(protocol)
                .build(),
            IpNet::V6(net) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .gateway(SINK_GATEWAY6)
                .output_interface(self.sink)
                .protocol(protocol)
                .build(),
        };
        kernel.handle().route().add(msg).replace().execute().await.map_err(|source| KernelError::Route {
            what: format!("route the mobile prefix {net} to {SINK_NAME}"),
            source,
        })
    }

    /// Deletes one of our prefix routes (into the sink, or a blackhole of an older run).
    async fn del_prefix_route(&self, kernel: &Kernel, dst: IpNet, oif: u32) -> Result<(), KernelError> {
        fn finish<T>(b: RouteMessageBuilder<T>, oif: u32, protocol: RouteProtocol) -> RouteMessage {
            let b = b.protocol(protocol);
            if oif == 0 { b.kind(RouteType::BlackHole) } else { b.output_interface(oif).scope(RouteScope::Universe) }
                .build()
        }
        let protocol = RouteProtocol::from(kernel.protocol());
        let msg = match dst {
            IpNet::V4(n) => finish(
                RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(n.network(), n.prefix_len()),
                oif,
                protocol,
            ),
            IpNet::V6(n) => finish(
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(n.network(), n.prefix_len()),
                oif,
                protocol,
            ),
        };
        kernel
            .handle()
            .route()
            .del(msg)
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
        self.remotes.keys().copied().collect()
    }

    /// The peers with a tunnel device.
    pub fn peers(&self) -> Vec<Ipv4Addr> {
        self.peers.keys().copied().collect()
    }

    /// What the kernel does with `ip` now (as programmed or adopted).
    pub fn tunnel(&self, ip: IpAddr) -> Tunnel {
        match self.remotes.get(&ip) {
            Some(p) => Tunnel::Remote(*p),
            None if self.locals.contains(&ip) => Tunnel::Local,
            None => Tunnel::None,
        }
    }

    /// Programs `ip`'s entry: a /32 (IPv6: /128) through the peer's device of that family for a
    /// remote VM, none otherwise. Without `sit`, IPv6 VMs can only be local
    /// ([`KernelError::Ipv6Remote`]).
    pub async fn set_tunnel(&mut self, kernel: &Kernel, ip: IpAddr, tunnel: Tunnel) -> Result<(), KernelError> {
        match tunnel {
            Tunnel::Remote(_) if ip.is_ipv6() && !self.sit => return Err(KernelError::Ipv6Remote(ip)),
            Tunnel::Remote(peer) => {
                let dev = self.peer_device(kernel, peer).await?.for_ip(ip);
                kernel.replace_host_route(ip, dev).await?;
                self.remotes.insert(ip, peer);
                self.locals.remove(&ip);
            }
            Tunnel::Local | Tunnel::None => {
                // A route of ours through the peer device, unless a local /32 replaced it.
                if let Some(dev) = self.remotes.get(&ip).and_then(|p| self.peers.get(p)).map(|d| d.for_ip(ip))
                    && dev != 0
                {
                    kernel.del_host_route(ip, dev).await?;
                }
                self.remotes.remove(&ip);
                if tunnel == Tunnel::Local {
                    self.locals.insert(ip);
                } else {
                    self.locals.remove(&ip);
                }
            }
        }
        Ok(())
    }

    /// The tunnel devices to `peer`, created if `peer` is registered and lacks them.
    async fn peer_device(&mut self, kernel: &Kernel, peer: Ipv4Addr) -> Result<PeerDevices, KernelError> {
        if let Some(d) = self.peers.get(&peer)
            && self.complete(d)
        {
            return Ok(*d);
        }
        if !self.registered.as_ref().is_some_and(|r| r.contains(&peer)) {
            return Err(KernelError::NotRegistered(peer));
        }
        self.ensure_peer(kernel, peer).await?;
        self.watch();
        Ok(self.peers[&peer])
    }

    /// Creates `peer`'s missing devices (ipip, and sit when the kernel has it); returns how many
    /// it created.
    async fn ensure_peer(&mut self, kernel: &Kernel, peer: Ipv4Addr) -> Result<usize, KernelError> {
        let handle = kernel.handle();
        let mut devs = self.peers.get(&peer).copied().unwrap_or_default();
        let mut created = 0;
        let want_sit = self.sit;
        for role in [Role::Peer(peer), Role::Peer6(peer)] {
            let slot = match role {
                Role::Peer(_) => &mut devs.ipip,
                _ if want_sit => &mut devs.sit,
                _ => continue,
            };
            if *slot != 0 {
                continue;
            }
            let (name, made) = match role {
                Role::Peer(_) => {
                    (devices::peer_name(peer), devices::create_peer(handle, peer, self.underlay, self.tunnel_mtu).await)
                }
                _ => {
                    (devices::sit_name(peer), devices::create_peer6(handle, peer, self.underlay, self.tunnel_mtu).await)
                }
            };
            *slot = match made {
                Ok(dev) => dev.index,
                Err(err) => match devices::by_name(handle, &name).await? {
                    // Created meanwhile by an earlier attempt that timed out: ours, adopt it.
                    Some(d) if d.role() == Some(role) && d.local == Some(self.underlay) => d.index,
                    _ => {
                        self.peers.insert(peer, devs);
                        return Err(err.into());
                    }
                },
            };
            created += 1;
            tracing::info!(%peer, device = name, "tunnel device to a registered FE created");
        }
        self.peers.insert(peer, devs);
        Ok(created)
    }

    /// Makes the tunnel devices those of `registered`: creates the missing ones, deletes the
    /// others (the kernel removes their routes; the VMs behind them are dropped until they get a
    /// new binding). Checks the catch-alls' sysctls are still as set.
    pub async fn set_peers(&mut self, kernel: &Kernel, registered: &[Ipv4Addr]) -> Result<PeerChanges, KernelError> {
        let wanted: BTreeSet<Ipv4Addr> = registered.iter().copied().filter(|p| *p != self.underlay).collect();
        self.registered = Some(wanted.clone());
        let mut changes = PeerChanges::default();
        let mut failure = None;
        let mut checks: Vec<(bool, &str, &str, &str)> =
            CATCH_ALL_SYSCTLS.iter().map(|(k, v)| (false, self.catch_all.0.as_str(), *k, *v)).collect();
        if self.catch_all6.1 != 0 {
            checks.push((true, self.catch_all6.0.as_str(), "disable_ipv6", "1"));
        }
        for (v6, device, key, value) in checks {
            let result = if v6 {
                devices::ensure_sysctl6(device, key, value)
            } else {
                devices::ensure_sysctl(device, key, value)
            };
            match result {
                Ok(true) => {
                    tracing::warn!(device, key, value, "catch-all sysctl was changed behind our back; restored")
                }
                Ok(false) => {}
                Err(e) => failure = failure.or(Some(e.into())),
            }
        }
        let missing: Vec<Ipv4Addr> =
            wanted.iter().copied().filter(|p| !self.peers.get(p).is_some_and(|d| self.complete(d))).collect();
        for peer in missing {
            match self.ensure_peer(kernel, peer).await {
                Ok(_) => changes.added += 1,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot create the tunnel device (retried when a VM needs it)");
                    failure = failure.or(Some(e));
                }
            }
        }
        let gone: Vec<(Ipv4Addr, PeerDevices)> =
            self.peers.iter().filter(|(p, _)| !wanted.contains(p)).map(|(p, d)| (*p, *d)).collect();
        for (peer, devs) in gone {
            let mut left = devs;
            for (index, name) in [(devs.ipip, devices::peer_name(peer)), (devs.sit, devices::sit_name(peer))] {
                if index == 0 {
                    continue;
                }
                match devices::delete(kernel.handle(), index, &name).await {
                    Ok(()) => {
                        if index == devs.ipip {
                            left.ipip = 0;
                        } else {
                            left.sit = 0;
                        }
                        tracing::info!(%peer, device = name, "tunnel device of an FE that left removed");
                    }
                    Err(e) => failure = failure.or(Some(e.into())),
                }
            }
            if left == PeerDevices::default() {
                self.peers.remove(&peer);
                self.remotes.retain(|_, p| *p != peer);
                changes.removed += 1;
            } else {
                self.peers.insert(peer, left);
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
        let roles = [(Role::CatchAll, self.catch_all.1), (Role::CatchAll6, self.catch_all6.1), (Role::Sink, self.sink)]
            .into_iter()
            .chain(self.peers.iter().flat_map(|(p, d)| [(Role::Peer(*p), d.ipip), (Role::Peer6(*p), d.sit)]))
            .filter(|(_, index)| *index != 0);
        self.counters.watch(watched_of(roles));
    }
}

/// Removes every device of a kernel data plane this agent left in the namespace (and with them
/// their routes): for the userspace backend, which cannot share the namespace with it. The
/// kernel's `sit0`, which it never deletes, is handed back instead (down, no alias). Returns how
/// many it removed or handed back.
pub async fn remove_leftovers(kernel: &Kernel) -> Result<usize, KernelError> {
    let mut removed = 0;
    for d in devices::all(kernel.handle()).await?.iter().filter(|d| d.role().is_some()) {
        if d.role() == Some(Role::CatchAll6) && d.name == SIT_FALLBACK {
            devices::release(kernel.handle(), d).await?;
        } else {
            devices::delete(kernel.handle(), d.index, &d.name).await?;
        }
        removed += 1;
    }
    Ok(removed)
}
