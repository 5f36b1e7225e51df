//! The kernel data plane's own network devices, through rtnetlink: listing them with their tunnel
//! parameters and counters, creating, fixing and deleting them, and the per-device sysctls of the
//! catch-all devices. Every device the agent creates carries an alias (IFLA_IFALIAS) starting with
//! [`ALIAS_PREFIX`]: that is how a restarted agent recognises its own devices, and it never
//! touches a device without it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::IpProtocol;
use rtnetlink::packet_route::link::{
    InfoData, InfoIpTunnel, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkDummy, LinkIpIp, LinkSit, LinkUnspec};

/// Start of the alias of every device the agent creates.
pub const ALIAS_PREFIX: &str = "victor-fe-agent";

/// Name of the device the mobile prefixes are routed to: what it transmits is traffic for mobile
/// IPs without a binding, dropped (the dummy driver frees every packet) and counted.
pub const SINK_NAME: &str = "victor-nobind";

/// The gateway of the mobile-prefix routes through the sink (RFC 7600, the IPv4 dummy address):
/// one neighbour entry for all unbound traffic instead of one per destination.
pub const SINK_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 8);

/// The gateway of the IPv6 mobile-prefix routes through the sink: a link-local address (valid on
/// any device without `onlink`; the dummy device's own is derived from its MAC and never ends in
/// `::8`), so one neighbour entry (NOARP, as for IPv4) serves all unbound IPv6 traffic.
pub const SINK_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 8);

/// The kernel's own wildcard `sit` device (local and remote any) in every namespace where the
/// `sit` module is loaded (unless `net.core.fb_tunnels_only_for_init_net` says otherwise): the
/// kernel hands it 6in4 that no point-to-point `sit` device matches, while it is up. The kernel
/// never deletes it (a delete request is a no-op), so the agent adopts it as its 6in4 catch-all.
pub const SIT_FALLBACK: &str = "sit0";

/// The 6in4 catch-all the agent creates where the namespace has no [`SIT_FALLBACK`].
pub const SIT_CATCH_ALL: &str = "victor-6in4";

/// TTL of the outer header (not inherited from the inner packet).
pub const TUNNEL_TTL: u8 = 64;

/// A failed device operation.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// The request.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A device has the name we need but is not one of ours.
    #[error(
        "a device named {0} exists and is not the agent's (no \"{ALIAS_PREFIX}\" alias); remove it or choose another name"
    )]
    NotOurs(String),
    /// A device we created could not be found afterwards.
    #[error("device {0} vanished right after it was created")]
    Vanished(String),
    /// A sysctl of a device could not be read or written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        /// The /proc/sys path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DeviceError {
    let what = what.into();
    move |source| DeviceError::Netlink { what, source }
}

/// What one of our devices is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The collect-metadata ipip device (`--tun-name`): the kernel hands it IP-in-IP from sources
    /// no peer device matches; the agent routes nothing through it and its strict reverse-path
    /// filter drops everything it receives.
    CatchAll,
    /// The point-to-point ipip device to one registered FE.
    Peer(Ipv4Addr),
    /// The wildcard `sit` device (local and remote any; [`SIT_FALLBACK`] or [`SIT_CATCH_ALL`]):
    /// the kernel hands it 6in4 from sources no peer `sit` device matches; IPv6 is disabled on
    /// it (`disable_ipv6=1`), so the kernel drops everything it decapsulates.
    CatchAll6,
    /// The point-to-point `sit` device (6in4) to one registered FE.
    Peer6(Ipv4Addr),
    /// The dummy device the mobile prefixes are routed to (no binding → dropped).
    Sink,
}

/// The alias the agent gives a device of `role`.
pub fn alias(role: Role) -> String {
    match role {
        Role::CatchAll => format!("{ALIAS_PREFIX}: IP-in-IP from unregistered sources (dropped)"),
        Role::Peer(peer) => format!("{ALIAS_PREFIX}: IP-in-IP tunnel to FE {peer}"),
        Role::CatchAll6 => format!("{ALIAS_PREFIX}: 6in4 from unregistered sources (dropped)"),
        Role::Peer6(peer) => format!("{ALIAS_PREFIX}: 6in4 tunnel to FE {peer}"),
        Role::Sink => format!("{ALIAS_PREFIX}: traffic for mobile IPs without a binding (dropped)"),
    }
}

/// The name of the tunnel device to `peer` (15 bytes, the kernel's limit).
pub fn peer_name(peer: Ipv4Addr) -> String {
    format!("victor-{:08x}", u32::from(peer))
}

/// The name of the `sit` device to `peer` (15 bytes, the kernel's limit).
pub fn sit_name(peer: Ipv4Addr) -> String {
    format!("vsit-{:08x}", u32::from(peer))
}

/// A device's packet counters (the kernel's 64-bit link statistics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Received packets.
    pub rx_packets: u64,
    /// Received bytes.
    pub rx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Transmitted packets.
    pub tx_packets: u64,
    /// Transmitted bytes.
    pub tx_bytes: u64,
    /// Transmit errors (no route to the peer, packet too big for the path).
    pub tx_errors: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.rx_errors += o.rx_errors;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.tx_errors += o.tx_errors;
    }
}

/// A device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Alias (empty if none).
    pub alias: String,
    /// Link kind (`ipip`, `dummy`, ...), if any.
    pub kind: Option<InfoKind>,
    /// ipip/sit: collect-metadata mode.
    pub external: bool,
    /// ipip/sit: local address.
    pub local: Option<Ipv4Addr>,
    /// ipip/sit: remote address.
    pub remote: Option<Ipv4Addr>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Counters.
    pub counts: Counts,
}

impl Device {
    /// Reads a link message.
    pub fn from_message(msg: &LinkMessage) -> Device {
        let mut d = Device {
            index: msg.header.index,
            name: String::new(),
            alias: String::new(),
            kind: None,
            external: false,
            local: None,
            remote: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            counts: Counts::default(),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => d.name.clone_from(n),
                LinkAttribute::IfAlias(a) => d.alias.clone_from(a),
                LinkAttribute::Mtu(m) => d.mtu = *m,
                LinkAttribute::Stats64(s) => {
                    d.counts = Counts {
                        rx_packets: s.rx_packets,
                        rx_bytes: s.rx_bytes,
                        rx_errors: s.rx_errors,
                        tx_packets: s.tx_packets,
                        tx_bytes: s.tx_bytes,
                        tx_errors: s.tx_errors,
                    }
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => d.kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::IpTunnel(params)) => {
                                for p in params {
                                    match p {
                                        InfoIpTunnel::CollectMetadata => d.external = true,
                                        InfoIpTunnel::Local(IpAddr::V4(a)) => d.local = Some(*a),
                                        InfoIpTunnel::Remote(IpAddr::V4(a)) => d.remote = Some(*a),
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        d
    }

    /// The role of this device if it is one of ours (our alias, and a kind that fits it).
    pub fn role(&self) -> Option<Role> {
        if !self.alias.starts_with(ALIAS_PREFIX) {
            return None;
        }
        match &self.kind {
            Some(InfoKind::IpIp) if self.external => Some(Role::CatchAll),
            Some(InfoKind::IpIp) => self.remote.filter(|r| !r.is_unspecified()).map(Role::Peer),
            Some(InfoKind::SitTun) => match self.remote.filter(|r| !r.is_unspecified()) {
                Some(peer) => Some(Role::Peer6(peer)),
                None if self.is_wildcard_sit() => Some(Role::CatchAll6),
                None => None,
            },
            Some(InfoKind::Dummy) => Some(Role::Sink),
            _ => None,
        }
    }

    /// A `sit` device with neither local nor remote address (the one the kernel hands unmatched
    /// 6in4 to; ours or not).
    pub fn is_wildcard_sit(&self) -> bool {
        self.kind == Some(InfoKind::SitTun)
            && self.local.is_none_or(|a| a.is_unspecified())
            && self.remote.is_none_or(|a| a.is_unspecified())
    }

    /// An ipip device in collect-metadata mode (ours or not).
    pub fn is_external_ipip(&self) -> bool {
        self.kind == Some(InfoKind::IpIp) && self.external
    }
}

/// Every device of the namespace, with kind, tunnel parameters and counters.
pub async fn all(handle: &Handle) -> Result<Vec<Device>, DeviceError> {
    let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.map_err(nl("dump links"))?;
    Ok(msgs.iter().map(Device::from_message).collect())
}

/// The device named `name`, if any (one request, not a dump).
pub async fn by_name(handle: &Handle, name: &str) -> Result<Option<Device>, DeviceError> {
    let found: Result<Vec<LinkMessage>, _> = handle.link().get().match_name(name).execute().try_collect().await;
    match found {
        Ok(msgs) => Ok(msgs.first().map(Device::from_message)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.is_some_and(|c| -c.get() == libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("look up device {name}"))(e)),
    }
}

/// Creates a device, then gives it its alias (the kernel ignores IFLA_IFALIAS when creating).
async fn add(handle: &Handle, msg: LinkMessage, name: &str, role: Role) -> Result<Device, DeviceError> {
    handle.link().add(msg).execute().await.map_err(nl(format!("create device {name}")))?;
    let dev = by_name(handle, name).await?.ok_or_else(|| DeviceError::Vanished(name.to_owned()))?;
    adopt(handle, dev, role).await
}

/// Gives `dev` the alias of `role` and brings it up (keeping its MTU).
async fn adopt(handle: &Handle, mut dev: Device, role: Role) -> Result<Device, DeviceError> {
    let alias = alias(role);
    fix(handle, &dev, dev.mtu, &alias).await?;
    dev.alias = alias;
    dev.up = true;
    Ok(dev)
}

/// Creates the catch-all device `name`: ipip in collect-metadata mode, `mtu`, up.
pub async fn create_catch_all(handle: &Handle, name: &str, mtu: u32) -> Result<Device, DeviceError> {
    let msg = LinkIpIp::new(name).collect_metadata(true).mtu(mtu).up().build();
    add(handle, msg, name, Role::CatchAll).await
}

/// Creates the tunnel device to `peer`: ipip from `local` to `peer`, TTL 64, path MTU discovery
/// on (outer DF; the kernel answers too-big inner packets with ICMP "fragmentation needed"),
/// `mtu`, up.
pub async fn create_peer(handle: &Handle, peer: Ipv4Addr, local: Ipv4Addr, mtu: u32) -> Result<Device, DeviceError> {
    let name = peer_name(peer);
    let msg = LinkIpIp::new(&name).local(local).remote(peer).ttl(TUNNEL_TTL).pmtudisc(true).mtu(mtu).up().build();
    add(handle, msg, &name, Role::Peer(peer)).await
}

/// Creates the `sit` device (6in4) to `peer`, with the same parameters as its ipip device
/// ([`create_peer`]; the kernel answers too-big IPv6 packets with "packet too big").
pub async fn create_peer6(handle: &Handle, peer: Ipv4Addr, local: Ipv4Addr, mtu: u32) -> Result<Device, DeviceError> {
    let name = sit_name(peer);
    let msg = LinkSit::new(&name)
        .protocol(IpProtocol::Ipv6) // mode ip6ip: 6in4 only (IP-in-IP stays with the ipip device)
        .local(local)
        .remote(peer)
        .ttl(TUNNEL_TTL)
        .pmtudisc(true)
        .mtu(mtu)
        .up()
        .build();
    add(handle, msg, &name, Role::Peer6(peer)).await
}

/// Makes `existing` (the namespace's wildcard `sit` device, if any) or a new [`SIT_CATCH_ALL`]
/// the 6in4 catch-all: IPv6 disabled on it *before* it goes up (nothing it decapsulates is ever
/// delivered or forwarded), our alias, up. Returns it and whether it was created.
pub async fn ensure_catch_all6(handle: &Handle, existing: Option<&Device>) -> Result<(Device, bool), DeviceError> {
    let (dev, created) = match existing {
        Some(d) => (d.clone(), false),
        None => {
            let msg = LinkSit::new(SIT_CATCH_ALL).build();
            let what = format!("create device {SIT_CATCH_ALL}");
            handle.link().add(msg).execute().await.map_err(nl(what))?;
            let dev = by_name(handle, SIT_CATCH_ALL).await?;
            (dev.ok_or_else(|| DeviceError::Vanished(SIT_CATCH_ALL.to_owned()))?, true)
        }
    };
    ensure_sysctl6(&dev.name, "disable_ipv6", "1")?;
    if dev.up && dev.alias == alias(Role::CatchAll6) {
        return Ok((dev, created));
    }
    Ok((adopt(handle, dev, Role::CatchAll6).await?, created))
}

/// Creates the sink: a dummy device, MTU 65535 (unbound traffic is dropped, never answered with
/// "fragmentation needed"), up.
pub async fn create_sink(handle: &Handle) -> Result<Device, DeviceError> {
    let msg = LinkDummy::new(SINK_NAME).mtu(65535).up().build();
    add(handle, msg, SINK_NAME, Role::Sink).await
}

/// Sets what differs of MTU, up and alias on `dev` (nothing when it already matches).
pub async fn fix(handle: &Handle, dev: &Device, mtu: u32, alias: &str) -> Result<bool, DeviceError> {
    if dev.mtu == mtu && dev.up && dev.alias == alias {
        return Ok(false);
    }
    let mut b = LinkUnspec::new_with_index(dev.index).mtu(mtu).up();
    if dev.alias != alias {
        b = b.alias(alias);
    }
    handle.link().set(b.build()).execute().await.map_err(nl(format!("set MTU/up/alias of {}", dev.name)))?;
    Ok(true)
}

/// Hands back a device the kernel keeps when asked to delete it (its fallback `sit0`): down,
/// without our alias, IPv6 enabled again.
pub async fn release(handle: &Handle, dev: &Device) -> Result<(), DeviceError> {
    let msg = LinkUnspec::new_with_index(dev.index).down().alias("").build();
    handle.link().set(msg).execute().await.map_err(nl(format!("release device {}", dev.name)))?;
    ensure_sysctl6(&dev.name, "disable_ipv6", "0")?;
    Ok(())
}

/// Deletes a device (the kernel removes its routes with it). Gone already is not an error.
pub async fn delete(handle: &Handle, index: u32, name: &str) -> Result<(), DeviceError> {
    match handle.link().del(index).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.is_some_and(|c| -c.get() == libc::ENODEV) => Ok(()),
        other => other.map_err(nl(format!("delete device {name}"))),
    }
}

/// Sets `net.ipv4.conf.<dev>.<key>` in the calling thread's namespace unless it already has
/// `value`; true if it was written.
pub fn ensure_sysctl(dev: &str, key: &str, value: &str) -> Result<bool, DeviceError> {
    ensure_conf("ipv4", dev, key, value)
}

/// [`ensure_sysctl`] for `net.ipv6.conf.<dev>.<key>`.
pub fn ensure_sysctl6(dev: &str, key: &str, value: &str) -> Result<bool, DeviceError> {
    ensure_conf("ipv6", dev, key, value)
}

fn ensure_conf(family: &str, dev: &str, key: &str, value: &str) -> Result<bool, DeviceError> {
    let path = format!("/proc/sys/net/{family}/conf/{dev}/{key}");
    let err = |source| DeviceError::Sysctl { path: path.clone(), source };
    if std::fs::read_to_string(&path).map_err(err)?.trim() == value {
        return Ok(false);
    }
    std::fs::write(&path, value).map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(kind: InfoKind, alias: &str) -> Device {
        Device {
            index: 7,
            name: "x".into(),
            alias: alias.into(),
            kind: Some(kind),
            external: false,
            local: None,
            remote: None,
            mtu: 1480,
            up: true,
            counts: Counts::default(),
        }
    }

    #[test]
    fn peer_names_fit_the_kernel_limit_and_differ_per_peer() {
        let a = peer_name(Ipv4Addr::new(198, 51, 100, 2));
        assert_eq!(a, "victor-c6336402");
        assert!(a.len() <= 15);
        assert_ne!(a, peer_name(Ipv4Addr::new(198, 51, 100, 3)));
        assert!(peer_name(Ipv4Addr::BROADCAST).len() <= 15);
        assert_eq!(sit_name(Ipv4Addr::new(198, 51, 100, 2)), "vsit-c6336402");
        assert!(sit_name(Ipv4Addr::BROADCAST).len() <= 15);
        assert_ne!(SIT_CATCH_ALL, SIT_FALLBACK);
    }

    /// Only devices carrying our alias are ours, each with the role its kind and parameters say.
    #[test]
    fn roles_need_our_alias_and_the_right_kind() {
        let peer = Ipv4Addr::new(198, 51, 100, 2);
        let mut tunnel = device(InfoKind::IpIp, &alias(Role::Peer(peer)));
        tunnel.remote = Some(peer);
        assert_eq!(tunnel.role(), Some(Role::Peer(peer)));
        let mut catch_all = device(InfoKind::IpIp, &alias(Role::CatchAll));
        catch_all.external = true;
        assert_eq!(catch_all.role(), Some(Role::CatchAll));
        assert_eq!(device(InfoKind::Dummy, &alias(Role::Sink)).role(), Some(Role::Sink));
        // sit: a remote makes a 6in4 peer device, none (sit0 and ours alike) the catch-all.
        let mut sit = device(InfoKind::SitTun, &alias(Role::Peer6(peer)));
        sit.remote = Some(peer);
        assert_eq!(sit.role(), Some(Role::Peer6(peer)));
        let mut wildcard = device(InfoKind::SitTun, &alias(Role::CatchAll6));
        wildcard.local = Some(Ipv4Addr::UNSPECIFIED);
        assert_eq!(wildcard.role(), Some(Role::CatchAll6));
        assert_eq!(device(InfoKind::SitTun, "").role(), None, "the kernel's sit0 before we adopt it");
        let mut local_only = device(InfoKind::SitTun, &alias(Role::CatchAll6));
        local_only.local = Some(peer);
        assert_eq!(local_only.role(), None);
        // Someone else's tunnel or dummy, and an ipip device of ours without a remote.
        let mut foreign = tunnel.clone();
        foreign.alias = "uplink to the DC".into();
        assert_eq!(foreign.role(), None);
        assert_eq!(device(InfoKind::Dummy, "").role(), None);
        assert_eq!(device(InfoKind::IpIp, &alias(Role::Peer(peer))).role(), None);
        assert_eq!(device(InfoKind::Veth, &alias(Role::Sink)).role(), None);
    }
}
