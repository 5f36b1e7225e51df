//! The kernel objects the agent programs, through rtnetlink: host routes (/32, /128) and permanent
//! neighbour entries (ARP, NDP) for local VMs of both families, prefix routes into the data plane,
//! link lookups — main table. Every route and neighbour we create carries our route protocol number; the read-back
//! functions return only objects carrying it, so the agent never touches anyone else's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// A failed netlink operation.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NetlinkError {
    /// The operation.
    pub what: String,
    /// The cause.
    #[source]
    pub source: rtnetlink::Error,
}

impl NetlinkError {
    fn new(what: impl Into<String>, source: rtnetlink::Error) -> Self {
        NetlinkError { what: what.into(), source }
    }

    /// The errno the kernel answered with, if any.
    pub fn errno(&self) -> Option<i32> {
        match &self.source {
            rtnetlink::Error::NetlinkError(e) => e.code.map(|c| -c.get()),
            _ => None,
        }
    }

    /// True if the object did not exist (a delete of something already gone).
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::ENXIO))
    }
}

/// Result of a netlink operation.
pub type NlResult<T> = Result<T, NetlinkError>;

/// An interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC address (zero for links without one, e.g. TUN).
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
}

impl Link {
    /// Reads a link message.
    pub fn from_message(msg: &LinkMessage) -> Option<Link> {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: [0; 6],
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(a),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                _ => {}
            }
        }
        (!link.name.is_empty()).then_some(link)
    }
}

/// A route carrying our protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OurRoute {
    /// Destination.
    pub dst: IpNet,
    /// Output interface (0 if none).
    pub oif: u32,
}

/// A neighbour entry carrying our protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OurNeighbour {
    /// IP.
    pub ip: IpAddr,
    /// Interface.
    pub ifindex: u32,
    /// MAC.
    pub mac: [u8; 6],
}

/// The kernel, as the agent programs it.
#[derive(Debug, Clone)]
pub struct Kernel {
    handle: Handle,
    protocol: u8,
}

impl Kernel {
    /// Opens a netlink connection in the calling thread's namespace (inside a tokio runtime).
    pub fn connect(protocol: u8) -> std::io::Result<Kernel> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Kernel { handle, protocol })
    }

    /// The raw handle (for the link watcher).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Our route protocol number.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    fn host_route(&self, ip: IpAddr, ifindex: u32) -> RouteMessage {
        let protocol = RouteProtocol::from(self.protocol);
        match ip {
            IpAddr::V4(ip) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .output_interface(ifindex)
                .protocol(protocol)
                .scope(RouteScope::Link)
                .build(),
            IpAddr::V6(ip) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(ip, 128)
                .output_interface(ifindex)
                .protocol(protocol)
                .build(),
        }
    }

    /// `ip route replace IP/32 dev IFINDEX proto P scope link` (IPv6: `IP/128`).
    pub async fn replace_host_route(&self, ip: IpAddr, ifindex: u32) -> NlResult<()> {
        self.handle
            .route()
            .add(self.host_route(ip, ifindex))
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("replace host route {ip} dev #{ifindex}"), e))
    }

    /// `ip route del IP/32 dev IFINDEX proto P` (IPv6: `IP/128`); a route already gone is not an
    /// error.
    pub async fn del_host_route(&self, ip: IpAddr, ifindex: u32) -> NlResult<()> {
        let result = self.handle.route().del(self.host_route(ip, ifindex)).execute().await;
        ignore_missing(result.map_err(|e| NetlinkError::new(format!("delete host route {ip} dev #{ifindex}"), e)))
    }

    /// `ip -6 route replace NET dev IFINDEX proto P` (the IPv6 mobile prefixes into the data plane).
    pub async fn replace_prefix_route6(&self, net: ipnet::Ipv6Net, ifindex: u32) -> NlResult<()> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(ifindex)
            .protocol(RouteProtocol::from(self.protocol))
            .build();
        self.replace_route(msg, IpNet::V6(net), ifindex).await
    }

    /// `ip route replace NET dev IFINDEX proto P` (the mobile prefixes into the data plane).
    pub async fn replace_prefix_route(&self, net: Ipv4Net, ifindex: u32) -> NlResult<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(ifindex)
            .protocol(RouteProtocol::from(self.protocol))
            .scope(RouteScope::Link)
            .build();
        self.replace_route(msg, IpNet::V4(net), ifindex).await
    }

    async fn replace_route(&self, msg: RouteMessage, net: IpNet, ifindex: u32) -> NlResult<()> {
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("replace route {net} dev #{ifindex}"), e))
    }

    /// `ip neigh replace IP lladdr MAC dev IFINDEX nud permanent proto P` (ARP or NDP entry).
    pub async fn replace_neighbour(&self, ip: IpAddr, ifindex: u32, mac: [u8; 6]) -> NlResult<()> {
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace();
        req.message_mut().attributes.push(NeighbourAttribute::Protocol(RouteProtocol::from(self.protocol)));
        req.execute().await.map_err(|e| NetlinkError::new(format!("replace neighbour {ip} dev #{ifindex}"), e))
    }

    /// `ip neigh del IP dev IFINDEX`; an entry already gone is not an error.
    pub async fn del_neighbour(&self, ip: IpAddr, ifindex: u32) -> NlResult<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = ifindex;
        let (family, dst) = match ip {
            IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(a)),
        };
        msg.header.family = family;
        msg.attributes.push(NeighbourAttribute::Destination(dst));
        let result = self.handle.neighbours().del(msg).execute().await;
        ignore_missing(result.map_err(|e| NetlinkError::new(format!("delete neighbour {ip} dev #{ifindex}"), e)))
    }

    /// Routes of the main table carrying our protocol, both families.
    pub async fn our_routes(&self) -> NlResult<Vec<OurRoute>> {
        let mut msgs: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new("dump routes", e))?;
        let v6: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new("dump IPv6 routes", e))?;
        msgs.extend(v6);
        let mut out = Vec::new();
        for m in msgs {
            let table = m
                .attributes
                .iter()
                .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
                .unwrap_or(u32::from(m.header.table));
            if m.header.protocol != RouteProtocol::from(self.protocol) || table != u32::from(RouteHeader::RT_TABLE_MAIN)
            {
                continue;
            }
            let mut dst = match m.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            let mut oif = 0;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = IpAddr::V4(*d),
                    RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = IpAddr::V6(*d),
                    RouteAttribute::Oif(i) => oif = *i,
                    _ => {}
                }
            }
            if let Ok(net) = IpNet::new(dst, m.header.destination_prefix_length) {
                out.push(OurRoute { dst: net, oif });
            }
        }
        Ok(out)
    }

    /// Neighbour entries (ARP and NDP) carrying our protocol.
    pub async fn our_neighbours(&self) -> NlResult<Vec<OurNeighbour>> {
        let mut msgs: Vec<_> = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let part: Vec<_> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(|e| NetlinkError::new("dump neighbours", e))?;
            msgs.extend(part);
        }
        let ours = RouteProtocol::from(self.protocol);
        let mut out = Vec::new();
        for m in msgs {
            let mut ip = None;
            let mut mac = None;
            let mut proto = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => ip = Some(IpAddr::V4(*d)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => ip = Some(IpAddr::V6(*d)),
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some(<[u8; 6]>::try_from(l.as_slice()).expect("6 bytes"))
                    }
                    NeighbourAttribute::Protocol(p) => proto = Some(*p),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac), Some(p)) = (ip, mac, proto)
                && p == ours
            {
                out.push(OurNeighbour { ip, ifindex: m.header.ifindex, mac });
            }
        }
        Ok(out)
    }

    /// Every link.
    pub async fn links(&self) -> NlResult<Vec<Link>> {
        let msgs: Vec<_> =
            self.handle.link().get().execute().try_collect().await.map_err(|e| NetlinkError::new("dump links", e))?;
        Ok(msgs.iter().filter_map(Link::from_message).collect())
    }

    /// The link named `name`.
    pub async fn link_by_name(&self, name: &str) -> NlResult<Option<Link>> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    /// Sets a link's MAC address.
    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> NlResult<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).address(mac.to_vec()).build())
            .execute()
            .await
            .map_err(|e| NetlinkError::new(format!("set MAC of link #{index}"), e))
    }

    /// The index of the interface carrying `addr`, if any.
    pub async fn link_of_address(&self, addr: Ipv4Addr) -> NlResult<Option<u32>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::new("dump addresses", e))?;
        Ok(msgs
            .iter()
            .find(|m| {
                m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Address(IpAddr::V4(a)) | AddressAttribute::Local(IpAddr::V4(a)) if *a == addr)
                })
            })
            .map(|m| m.header.index))
    }
}

fn ignore_missing(result: NlResult<()>) -> NlResult<()> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}
