//! The userspace backend: the `victor_dataplane` forwarder on a **persistent** TUN device, with
//! the mobile prefixes routed into it and one forwarding-table entry per VM IP.
//!
//! * **The device outlives the agent** (`TUNSETPERSIST`): on an exit — planned or `kill -9` — the
//!   TUN device stays in the kernel, and with it the mobile-prefix routes into it and every
//!   record below; [`TunPlane::start`] adopts it (same interface index, no route deleted or
//!   re-added) and changes only what differs. While no agent runs, the agent's standby forwarder
//!   ([`super::standby`]) reads the device; with no process attached the kernel drops what it
//!   routes into it.
//! * **What the forwarding table held is recorded in the kernel**, in a routing table no rule
//!   points at ([`RECORD_TABLE`], inert: nothing is routed by it), so a restarted agent forwards
//!   at once, before the controller's snapshot: per remote VM `VM/32 via PEER dev TUN onlink`, an
//!   IPv6 one (6in4) `VM/128 via ::ffff:PEER dev TUN onlink` (metric [`BINDING_METRIC`]; the
//!   peer's IPv4 underlay address as an IPv4-mapped gateway: [`super::records`] says why), per
//!   registered FE `FE/32 dev TUN` (metric [`PEER_METRIC`]). Local VMs need no record: their /32
//!   or /128 on a VM port (the reconciler's) says it. A remote VM's record is written by
//!   [`super::records`] a moment after its table entry changes.
//!   All of it carries our route protocol and goes with the device when it is deleted.
//! * **Decommissioning** ([`remove`], `--remove-dataplane-on-exit`): the device is deleted, and
//!   with it every route into it and every record.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use victor_dataplane::counters::{CounterSnapshot, Counters};
use victor_dataplane::fib::{Action, Fib, FibError};
use victor_dataplane::forwarder::{
    Forwarder, ForwarderConfig, ForwarderError, HandOver, HandedOn, Prepared, remove_persistent_tun,
};

pub use super::records::{BINDING_METRIC, PEER_METRIC, RECORD_TABLE};
use super::records::{Record, Recorder, delete, metric_read, peer_of, record_route};
use super::{DataplaneConfig, Tunnel};
use crate::netlink::{Kernel, NetlinkError};

/// A failed userspace data-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The forwarder could not start.
    #[error("start the userspace forwarder: {0}")]
    Forwarder(#[from] ForwarderError),
    /// A route or record operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The forwarding table refused an entry.
    #[error(transparent)]
    Fib(#[from] FibError),
    /// The persistent device could not be removed.
    #[error("remove the persistent TUN device {name}: {source}")]
    Remove {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What [`TunPlane::start`] found and changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adoption {
    /// The TUN device was left by a previous run and adopted (else created).
    pub device_adopted: bool,
    /// Remote VMs' entries restored from their records.
    pub tunnel_routes: usize,
    /// Local VMs' entries restored from their /32 or /128 on a VM port.
    pub local_routes: usize,
    /// Registered FEs restored from their records.
    pub peers: usize,
    /// Mobile-prefix routes installed (none on a restart).
    pub prefix_routes_set: usize,
    /// Routes and records of ours removed as stale.
    pub stale_routes_removed: usize,
}

/// A route of ours (either family) as the adoption reads it.
#[derive(Debug, Clone, Copy)]
struct Found {
    dst: IpAddr,
    len: u8,
    oif: u32,
    gateway: Option<IpAddr>,
    /// As written ([`metric_read`]).
    metric: u32,
    table: u32,
}

impl Found {
    /// Reads a dumped route.
    fn read(m: &RouteMessage) -> Found {
        let mut r = Found {
            dst: match m.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            },
            len: m.header.destination_prefix_length,
            oif: 0,
            gateway: None,
            metric: 0,
            table: u32::from(m.header.table),
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = IpAddr::V4(*d),
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => r.dst = IpAddr::V6(*d),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(IpAddr::V4(*g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(IpAddr::V6(*g)),
                RouteAttribute::Oif(i) => r.oif = *i,
                RouteAttribute::Priority(p) => r.metric = *p,
                RouteAttribute::Table(t) => r.table = *t,
                _ => {}
            }
        }
        r.metric = metric_read(r.dst, r.metric);
        r
    }

    /// A host route: /32, or /128 for IPv6.
    fn is_host(&self) -> bool {
        self.len == if self.dst.is_ipv4() { 32 } else { 128 }
    }

    /// The peer FE its gateway names (see [`peer_of`]).
    fn peer(&self) -> Option<Ipv4Addr> {
        self.gateway.and_then(peer_of)
    }

    /// A record in [`RECORD_TABLE`] on device `tun`.
    fn is_record_of(&self, tun: u32) -> bool {
        self.table == RECORD_TABLE && self.oif == tun && self.is_host()
    }
}

/// The running userspace forwarder.
pub struct TunPlane {
    /// The forwarder (stops when dropped; the device stays).
    forwarder: Forwarder,
    /// Its forwarding table.
    fib: Arc<Fib>,
    /// Remote VMs (both families) and their FEs as recorded.
    remotes: HashMap<IpAddr, Ipv4Addr>,
    /// Registered FEs as recorded.
    peers: BTreeSet<Ipv4Addr>,
    /// Writes the remote VMs' records off the forwarding path.
    recorder: Recorder,
    adoption: Adoption,
}

impl std::fmt::Debug for TunPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunPlane").field("tun", &self.forwarder.tun_name()).finish_non_exhaustive()
    }
}

impl TunPlane {
    /// Starts the forwarder on the persistent TUN device (adopting the one a previous run left,
    /// with its routes and records: see the module doc) and routes the mobile prefixes into it.
    /// Taking over from another forwarder on the device, it forwards on that one's TUN queues and
    /// starts the forwarder prepared ahead, if any ([`Takeover`]).
    pub async fn start(config: &DataplaneConfig, kernel: &Kernel, takeover: Takeover) -> Result<TunPlane, TunError> {
        let fib = Arc::new(Fib::new(config.underlay));
        // The table is filled from the records before the forwarder reads its first packet: a
        // packet it reads from an adopted device is forwarded as the previous run would have.
        let routes = our_routes(kernel).await?;
        let before = if_index(&config.device);
        let mut restored = Restored::default();
        if let Some(tun) = before {
            restored = restore(&fib, &routes, tun)?;
        }
        let forwarder = takeover.start(forwarder_config(config), fib.clone())?;
        if !forwarder.adopted() || before != Some(forwarder.tun_index()) {
            // A new device (none was left, or it could not be adopted): nothing of it is true.
            fib.replace_all::<IpAddr, _>([])?;
            fib.set_peers([]);
            restored = Restored::default();
        }
        let recorder = Recorder::start(kernel.clone(), forwarder.tun_index());
        let mut plane = TunPlane {
            forwarder,
            fib,
            remotes: restored.remotes,
            peers: restored.peers,
            recorder,
            adoption: restored.adoption,
        };
        plane.adoption.device_adopted = plane.forwarder.adopted();
        plane.adopt_routes(config, kernel, &routes).await?;
        tracing::info!(
            tun = plane.forwarder.tun_name(),
            mtu = plane.forwarder.tunnel_mtu(),
            queues = plane.forwarder.queues(),
            adoption = ?plane.adoption,
            "userspace IP-in-IP forwarder running (persistent TUN device)"
        );
        Ok(plane)
    }

    /// Installs the missing mobile-prefix routes and removes the routes and records of ours
    /// into the device that nothing wants. Routes that are right are not touched (no delete, no
    /// replace: a restart makes no route event).
    async fn adopt_routes(
        &mut self,
        config: &DataplaneConfig,
        kernel: &Kernel,
        routes: &[Found],
    ) -> Result<(), TunError> {
        let tun = self.forwarder.tun_index();
        // The mobile-prefix routes into the device, both families.
        let present: Vec<IpNet> = routes
            .iter()
            .filter(|r| r.table == MAIN_TABLE && r.oif == tun && !r.is_host())
            .filter_map(|r| IpNet::new(r.dst, r.len).ok())
            .collect();
        let wanted = config.all_prefixes();
        for net in present.iter().filter(|net| !wanted.contains(net)) {
            let msg = prefix_route(kernel, *net, tun);
            delete(kernel, msg, format!("delete the stale route {net}")).await?;
            self.adoption.stale_routes_removed += 1;
        }
        for net in wanted.iter().filter(|net| !present.contains(net)) {
            match net {
                IpNet::V4(net) => kernel.replace_prefix_route(*net, tun).await?,
                IpNet::V6(net) => kernel.replace_prefix_route6(*net, tun).await?,
            }
            self.adoption.prefix_routes_set += 1;
        }
        for r in routes.iter().filter(|r| r.is_record_of(tun)) {
            let kept = match (r.metric, r.dst) {
                (BINDING_METRIC, _) => r.peer().is_some() && self.remotes.get(&r.dst).copied() == r.peer(),
                (PEER_METRIC, IpAddr::V4(fe)) => r.gateway.is_none() && self.peers.contains(&fe),
                _ => false,
            };
            if !kept {
                // A record of a VM that is local now, or one not written by us: stale.
                let msg = record_route(kernel, r.dst, r.peer(), r.metric, r.oif);
                delete(kernel, msg, format!("delete the stale record {}", r.dst)).await?;
                self.adoption.stale_routes_removed += 1;
            }
        }
        Ok(())
    }

    /// What start found and changed.
    pub fn adoption(&self) -> Adoption {
        self.adoption
    }

    /// The forwarding table.
    pub fn fib(&self) -> &Arc<Fib> {
        &self.fib
    }

    /// What the forwarder does with `ip` now.
    pub fn tunnel(&self, ip: IpAddr) -> Tunnel {
        match self.fib.lookup(ip) {
            None => Tunnel::None,
            Some(Action::Local) => Tunnel::Local,
            Some(Action::Remote(p)) => Tunnel::Remote(p),
        }
    }

    /// Remote VMs with an entry (restored or set): what a complete snapshot may make stale.
    pub fn tunnel_ips(&self) -> Vec<IpAddr> {
        self.remotes.keys().copied().collect()
    }

    /// Sets the forwarding-table entry of `ip` and queues its record ([`super::records`]: written
    /// off this path, so a full sync does not wait for one netlink round trip per remote VM).
    /// Both families are recorded: an IPv6 VM's 6in4 entry as `VM/128 via ::ffff:PEER`.
    pub async fn set_tunnel(&mut self, _kernel: &Kernel, ip: IpAddr, tunnel: Tunnel) -> Result<(), TunError> {
        match tunnel {
            Tunnel::Remote(peer) => {
                self.fib.set(ip, Action::Remote(peer))?;
                if self.remotes.insert(ip, peer) != Some(peer) {
                    self.recorder.record(ip, Record::Via(peer));
                }
            }
            Tunnel::Local | Tunnel::None => {
                if tunnel == Tunnel::Local {
                    self.fib.set(ip, Action::Local)?;
                } else {
                    self.fib.remove(ip);
                }
                if let Some(peer) = self.remotes.remove(&ip) {
                    self.recorder.record(ip, Record::Gone(peer));
                }
            }
        }
        Ok(())
    }

    /// Accepts tunnel packets only from `peers` (at once), then records them.
    pub async fn set_peers(&mut self, kernel: &Kernel, peers: &[Ipv4Addr]) -> Result<(), TunError> {
        self.fib.set_peers(peers.iter().copied());
        let wanted: BTreeSet<Ipv4Addr> = peers.iter().copied().collect();
        let tun = self.forwarder.tun_index();
        for peer in wanted.difference(&self.peers.clone()) {
            let msg = record_route(kernel, IpAddr::V4(*peer), None, PEER_METRIC, tun);
            kernel.handle().route().add(msg).replace().execute().await.map_err(|source| NetlinkError {
                what: format!("record the registered FE {peer} in table {RECORD_TABLE}"),
                source,
            })?;
            self.peers.insert(*peer);
        }
        for peer in self.peers.clone().difference(&wanted) {
            let msg = record_route(kernel, IpAddr::V4(*peer), None, PEER_METRIC, tun);
            delete(kernel, msg, format!("delete the record of the FE {peer}")).await?;
            self.peers.remove(peer);
        }
        Ok(())
    }

    /// The forwarder's counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.forwarder.counters()
    }

    /// Live counters handle (for /metrics).
    pub fn counters_handle(&self) -> Arc<Counters> {
        self.forwarder.counters_handle()
    }

    /// Hands the device over to the standby ([`victor_dataplane::forwarder::HandOver`]).
    pub fn hand_over_handle(&self) -> HandOver {
        self.forwarder.hand_over_handle()
    }

    /// Duplicates of the forwarder's TUN queues and underlay sockets, for the forwarder that
    /// takes over.
    pub fn handed_on(&self) -> std::io::Result<HandedOn> {
        self.forwarder.handed_on()
    }

    /// False once the forwarder has died.
    pub fn is_running(&self) -> bool {
        self.forwarder.is_running()
    }
}

/// The forwarder a data plane starts on its persistent device (and [`prepare`] prepares).
fn forwarder_config(config: &DataplaneConfig) -> ForwarderConfig {
    let mut fc = ForwarderConfig::new(&config.device);
    fc.underlay_mtu = config.underlay_mtu;
    fc.persist = true;
    fc
}

/// Prepares the forwarder of `config` ahead of a take-over ([`Prepared`]: the device adopted
/// and configured, its queues open but detached, its threads started), for [`Takeover`].
pub fn prepare(config: &DataplaneConfig) -> Result<Prepared, ForwarderError> {
    Prepared::new(forwarder_config(config), config.underlay)
}

/// What a forwarder that takes over from another one on the device starts with (the
/// standby's, the next agent's); the default is a forwarder started afresh on its own queues.
#[derive(Debug, Default)]
pub struct Takeover {
    /// The TUN queues and underlay sockets of the forwarder taken over from ([`TunPlane::handed_on`]).
    pub handed: HandedOn,
    /// A forwarder prepared ahead ([`prepare`]), started if it still can.
    pub prepared: Option<Prepared>,
}

impl Takeover {
    /// Starts the forwarder of configuration `fc` with `fib`: the prepared one if it was
    /// prepared for `fc` and the device is still the same, else afresh; on what was handed on.
    fn start(self, fc: ForwarderConfig, fib: Arc<Fib>) -> Result<Forwarder, ForwarderError> {
        let Takeover { handed, prepared } = self;
        match prepared {
            Some(prepared) if *prepared.config() == fc => match prepared.check(&fib) {
                Ok(()) => return prepared.start_on(fib, handed),
                Err(e) => {
                    tracing::warn!(tun = %fc.tun_name, error = %e, "the prepared forwarder cannot start; starting afresh")
                }
            },
            Some(_) => {
                tracing::info!(tun = %fc.tun_name, "the forwarder was prepared for another configuration; starting afresh")
            }
            None => {}
        }
        Forwarder::start_on(fc, fib, handed)
    }
}

/// Deletes the persistent TUN device `name` a userspace data plane left in this namespace, and
/// with it every route into it and every record. Returns false when there was none (or `name`
/// is not a TUN device: the kernel backend's catch-all has the same name).
pub fn remove(name: &str) -> Result<bool, TunError> {
    if !is_tun(name) {
        return Ok(false);
    }
    remove_persistent_tun(name).map_err(|source| TunError::Remove { name: name.to_owned(), source })
}

/// True when `name` is a TUN/TAP device in this namespace.
fn is_tun(name: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{name}/tun_flags")).exists()
}

/// The main routing table's id.
const MAIN_TABLE: u32 = rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN as u32;

/// What the kernel said of the forwarding table of a previous run.
#[derive(Debug, Default)]
struct Restored {
    remotes: HashMap<IpAddr, Ipv4Addr>,
    peers: BTreeSet<Ipv4Addr>,
    adoption: Adoption,
}

/// Fills `fib` from what a previous run left for device `tun`, both families: Remote entries
/// from the records (not for a VM that has a /32 or /128 on a VM port now), Local ones from those
/// host routes, the registered FEs from their records.
fn restore(fib: &Fib, routes: &[Found], tun: u32) -> Result<Restored, TunError> {
    let mut out = Restored::default();
    let locals: BTreeSet<IpAddr> = routes
        .iter()
        .filter(|r| r.table == MAIN_TABLE && r.is_host() && r.oif != 0 && r.oif != tun)
        .map(|r| r.dst)
        .collect();
    for ip in &locals {
        fib.set(*ip, Action::Local)?;
        out.adoption.local_routes += 1;
    }
    for r in routes.iter().filter(|r| r.is_record_of(tun)) {
        match (r.metric, r.peer(), r.dst) {
            (BINDING_METRIC, Some(peer), _) if !locals.contains(&r.dst) => {
                fib.set(r.dst, Action::Remote(peer))?;
                out.remotes.insert(r.dst, peer);
                out.adoption.tunnel_routes += 1;
            }
            (PEER_METRIC, None, IpAddr::V4(fe)) if r.gateway.is_none() => {
                out.peers.insert(fe);
                out.adoption.peers += 1;
            }
            _ => {}
        }
    }
    fib.set_peers(out.peers.iter().copied());
    Ok(out)
}

/// The interface index of `name` in this namespace, if it exists.
fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// `NET dev TUN proto P` (IPv4: `scope link`), as [`Kernel::replace_prefix_route`] and
/// [`Kernel::replace_prefix_route6`] install it.
fn prefix_route(kernel: &Kernel, net: IpNet, tun: u32) -> RouteMessage {
    let protocol = RouteProtocol::from(kernel.protocol());
    match net {
        IpNet::V4(net) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(tun)
            .protocol(protocol)
            .scope(RouteScope::Link)
            .build(),
        IpNet::V6(net) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(tun)
            .protocol(protocol)
            .build(),
    }
}

/// Our routes of both families in every table, with what the adoption needs.
async fn our_routes(kernel: &Kernel) -> Result<Vec<Found>, NetlinkError> {
    let ours = RouteProtocol::from(kernel.protocol());
    let mut out = Vec::new();
    for (name, dump) in [
        ("IPv4", RouteMessageBuilder::<Ipv4Addr>::new().build()),
        ("IPv6", RouteMessageBuilder::<Ipv6Addr>::new().build()),
    ] {
        // A family the kernel lacks (`ipv6.disable=1`) is answered with every family's routes.
        let family = dump.header.address_family;
        let msgs: Vec<RouteMessage> = kernel
            .handle()
            .route()
            .get(dump)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetlinkError { what: format!("dump {name} routes"), source })?;
        let mine = |m: &&RouteMessage| m.header.protocol == ours && m.header.address_family == family;
        out.extend(msgs.iter().filter(mine).map(Found::read));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarding::records::IPV6_DEFAULT_METRIC;

    fn route(dst: impl Into<IpAddr>, oif: u32, gateway: Option<IpAddr>, metric: u32, table: u32) -> Found {
        let dst = dst.into();
        Found { dst, len: if dst.is_ipv4() { 32 } else { 128 }, oif, gateway, metric, table }
    }

    fn v6(text: &str) -> Ipv6Addr {
        text.parse().unwrap()
    }

    /// The table a restarted agent starts with: remote VMs (IPv4 and IPv6) and registered FEs
    /// from the records of this device, local VMs from their /32 or /128 on a VM port (which wins
    /// over a record), nothing from another device's records.
    #[test]
    fn restore_reads_the_records_of_this_device() {
        const TUN: u32 = 7;
        let peer = Ipv4Addr::new(192, 168, 0, 2);
        let other = Ipv4Addr::new(192, 168, 0, 3);
        let via = |p: Ipv4Addr| Some(IpAddr::V4(p));
        let via6 = |p: Ipv4Addr| Some(IpAddr::V6(p.to_ipv6_mapped()));
        let fib = Fib::new(Ipv4Addr::new(192, 168, 0, 1));
        let routes = [
            route([10, 10, 0, 11], TUN, via(peer), BINDING_METRIC, RECORD_TABLE),
            route([10, 10, 0, 12], 3, None, 0, MAIN_TABLE),
            route([10, 10, 0, 12], TUN, via(peer), BINDING_METRIC, RECORD_TABLE),
            route(peer, TUN, None, PEER_METRIC, RECORD_TABLE),
            route([10, 10, 0, 13], TUN + 1, via(other), BINDING_METRIC, RECORD_TABLE),
            route(other, TUN + 1, None, PEER_METRIC, RECORD_TABLE),
            // IPv6: a remote VM (6in4 to the peer), a local one whose old record loses, another
            // device's record, and an IPv6 gateway that names no IPv4 peer.
            route(v6("fd00:10::11"), TUN, via6(peer), BINDING_METRIC, RECORD_TABLE),
            route(v6("fd00:10::12"), 3, None, IPV6_DEFAULT_METRIC, MAIN_TABLE),
            route(v6("fd00:10::12"), TUN, via6(peer), BINDING_METRIC, RECORD_TABLE),
            route(v6("fd00:10::13"), TUN + 1, via6(other), BINDING_METRIC, RECORD_TABLE),
            route(v6("fd00:10::14"), TUN, Some(v6("fe80::1").into()), BINDING_METRIC, RECORD_TABLE),
        ];
        let restored = restore(&fib, &routes, TUN).unwrap();
        assert_eq!(fib.lookup(Ipv4Addr::new(10, 10, 0, 11)), Some(Action::Remote(peer)));
        assert_eq!(fib.lookup(Ipv4Addr::new(10, 10, 0, 12)), Some(Action::Local));
        assert_eq!(fib.lookup(Ipv4Addr::new(10, 10, 0, 13)), None);
        assert_eq!(fib.lookup(v6("fd00:10::11")), Some(Action::Remote(peer)));
        assert_eq!(fib.lookup(v6("fd00:10::12")), Some(Action::Local));
        assert_eq!(fib.lookup(v6("fd00:10::13")), None);
        assert_eq!(fib.lookup(v6("fd00:10::14")), None);
        assert_eq!(fib.peers(), vec![peer]);
        assert_eq!(
            restored.remotes,
            HashMap::from([(IpAddr::from([10, 10, 0, 11]), peer), (v6("fd00:10::11").into(), peer)])
        );
        assert_eq!(restored.adoption, Adoption { tunnel_routes: 2, local_routes: 2, peers: 1, ..Adoption::default() });
    }

    /// An IPv6 record as the kernel dumps it (`VM/128 via ::ffff:PEER onlink`, metric 1024 for the
    /// 0 it was written with) reads as a binding record of that peer; an IPv4 one as written.
    #[test]
    fn records_of_both_families_read_back_as_written() {
        let peer = Ipv4Addr::new(198, 51, 100, 2);
        let dumped = |b: RouteMessage| Found::read(&b);
        let r6 = dumped(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(v6("fd00:10::11"), 128)
                .gateway(peer.to_ipv6_mapped())
                .output_interface(7)
                .table_id(RECORD_TABLE)
                .priority(IPV6_DEFAULT_METRIC)
                .onlink()
                .build(),
        );
        assert_eq!((r6.dst, r6.peer(), r6.metric), (v6("fd00:10::11").into(), Some(peer), BINDING_METRIC));
        assert!(r6.is_record_of(7) && !r6.is_record_of(8));
        let r4 = dumped(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(peer, 32)
                .output_interface(7)
                .table_id(RECORD_TABLE)
                .priority(PEER_METRIC)
                .build(),
        );
        assert_eq!((r4.dst, r4.peer(), r4.metric), (peer.into(), None, PEER_METRIC));
        assert!(r4.is_record_of(7));
    }
}
