//! The next hops of one session — where the router is to send the traffic for our prefixes: the
//! configured one of each family (`--bgp-next-hop`, `--bgp-next-hop6`), else this FE's own address
//! on the interface that carries the session (next-hop self). The session's local address serves
//! its own family; the other family takes the interface's address of that family (an IPv4
//! session announces IPv6 prefixes via the interface's global IPv6 address, an IPv6 session IPv4
//! prefixes via its IPv4 address). IPv6 routes also carry the interface's link-local address when
//! the router shares that link (RFC 2545). [`choose`] is the pure rule; [`link_of`] reads the
//! interface's addresses from the kernel when the session is connected, on a netlink socket of
//! its own (a dump on a socket that is dumping something else fails with EBUSY).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};

use crate::codec::bgp::NextHop6;

/// The usable addresses (neither tentative, nor deprecated, nor failed duplicate detection) of the
/// interface a session runs over, with their prefix lengths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkAddresses {
    /// The interface's name, for the log.
    pub name: String,
    /// IPv4 addresses.
    pub v4: Vec<Ipv4Net>,
    /// IPv6 addresses, link-local ones included.
    pub v6: Vec<Ipv6Net>,
}

/// The explicitly configured next hops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Configured {
    /// `--bgp-next-hop`.
    pub v4: Option<Ipv4Addr>,
    /// `--bgp-next-hop6`.
    pub v6: Option<Ipv6Addr>,
}

/// The next hops of a session; None = that family cannot be announced on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NextHops {
    /// IPv4 NEXT_HOP.
    pub v4: Option<Ipv4Addr>,
    /// IPv6 next hop.
    pub v6: Option<NextHop6>,
}

/// True for fe80::/10.
fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The next hops of a session from `local` to `peer` over interface `link`.
pub fn choose(local: IpAddr, peer: IpAddr, configured: Configured, link: &LinkAddresses) -> NextHops {
    let v4 = configured.v4.or(match local {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => link.v4.first().map(Ipv4Net::addr),
    });
    let on_link = match peer {
        IpAddr::V4(p) => link.v4.iter().any(|n| n.contains(&p)),
        IpAddr::V6(p) => is_link_local(&p) || link.v6.iter().any(|n| !is_link_local(&n.addr()) && n.contains(&p)),
    };
    let v6 = match configured.v6 {
        // A configured next hop may be another host's: its link-local address is not ours to add.
        Some(global) => Some(NextHop6 { global, link_local: None }),
        None => {
            let own_global = match local {
                IpAddr::V6(a) if !is_link_local(&a) => Some(a),
                _ => link.v6.iter().map(Ipv6Net::addr).find(|a| !is_link_local(a)),
            };
            own_global.map(|global| NextHop6 {
                global,
                link_local: on_link.then(|| link.v6.iter().map(Ipv6Net::addr).find(is_link_local)).flatten(),
            })
        }
    };
    NextHops { v4, v6 }
}

/// Why the interface addresses could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No netlink socket.
    #[error("cannot open a netlink socket: {0}")]
    Open(#[from] std::io::Error),
    /// The dump failed.
    #[error("cannot list the addresses: {0}")]
    Dump(#[from] rtnetlink::Error),
}

/// The usable addresses of the interface that has address `local`; None if no interface has it
/// (e.g. a session through a NAT).
pub async fn link_of(local: IpAddr) -> Result<Option<LinkAddresses>, ReadError> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    // Ends when `handle` is dropped.
    tokio::spawn(connection);
    let all: Vec<AddressMessage> = handle.address().get().execute().try_collect().await?;
    let Some(index) = all.iter().find(|m| address(m) == Some(local)).map(|m| m.header.index) else {
        return Ok(None);
    };
    let mut link = LinkAddresses::default();
    for m in all.iter().filter(|m| m.header.index == index) {
        if let Some(label) = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Label(l) => Some(l.clone()),
            _ => None,
        }) {
            link.name = label;
        }
        if !usable(m) {
            continue;
        }
        match address(m) {
            Some(IpAddr::V4(a)) => link.v4.extend(Ipv4Net::new(a, m.header.prefix_len).ok()),
            Some(IpAddr::V6(a)) => link.v6.extend(Ipv6Net::new(a, m.header.prefix_len).ok()),
            None => {}
        }
    }
    if link.name.is_empty() {
        link.name = format!("interface {index}");
    }
    Ok(Some(link))
}

/// The interface's own address of an address message (IFA_LOCAL for IPv4, where IFA_ADDRESS is
/// the peer's on point-to-point links; IFA_ADDRESS for IPv6).
fn address(m: &AddressMessage) -> Option<IpAddr> {
    let find = |local: bool| {
        m.attributes.iter().find_map(|a| match (a, local) {
            (AddressAttribute::Local(ip), true) | (AddressAttribute::Address(ip), false) => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// Not tentative (duplicate address detection running), deprecated or a detected duplicate.
fn usable(m: &AddressMessage) -> bool {
    let bad = AddressFlags::Tentative | AddressFlags::Deprecated | AddressFlags::Dadfailed;
    let header_bad = AddressHeaderFlags::Tentative | AddressHeaderFlags::Deprecated | AddressHeaderFlags::Dadfailed;
    let flags = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Flags(f) => Some(*f),
        _ => None,
    });
    match flags {
        Some(f) => !f.intersects(bad),
        None => !m.header.flags.intersects(header_bad),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> LinkAddresses {
        LinkAddresses {
            name: "up0".into(),
            v4: vec!["203.0.113.2/30".parse().unwrap()],
            v6: vec!["fe80::2/64".parse().unwrap(), "2001:db8:ff:1::2/64".parse().unwrap()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn hop6(global: &str, link_local: Option<&str>) -> Option<NextHop6> {
        Some(NextHop6 { global: global.parse().unwrap(), link_local: link_local.map(|l| l.parse().unwrap()) })
    }

    #[test]
    fn next_hop_self_per_family_over_an_ipv4_session() {
        let nh = choose(ip("203.0.113.2"), ip("203.0.113.1"), Configured::default(), &link());
        assert_eq!(nh.v4, Some(Ipv4Addr::new(203, 0, 113, 2)));
        assert_eq!(nh.v6, hop6("2001:db8:ff:1::2", Some("fe80::2")), "the link's global and link-local address");
        // A router beyond the link (multihop): no link-local next hop.
        let nh = choose(ip("203.0.113.2"), ip("198.18.0.1"), Configured::default(), &link());
        assert_eq!(nh.v6, hop6("2001:db8:ff:1::2", None));
        // No global IPv6 address on the interface: no IPv6 routes on this session.
        let v4_only = LinkAddresses { v6: vec!["fe80::2/64".parse().unwrap()], ..link() };
        let nh = choose(ip("203.0.113.2"), ip("203.0.113.1"), Configured::default(), &v4_only);
        assert_eq!(nh, NextHops { v4: Some(Ipv4Addr::new(203, 0, 113, 2)), v6: None });
    }

    #[test]
    fn next_hop_self_per_family_over_an_ipv6_session() {
        let nh = choose(ip("2001:db8:ff:1::2"), ip("2001:db8:ff:1::1"), Configured::default(), &link());
        assert_eq!(nh.v6, hop6("2001:db8:ff:1::2", Some("fe80::2")));
        assert_eq!(nh.v4, Some(Ipv4Addr::new(203, 0, 113, 2)), "IPv4 routes via the interface's IPv4 address");
        let nh = choose(ip("2001:db8:ff:1::2"), ip("2001:db8:77::1"), Configured::default(), &link());
        assert_eq!(nh.v6, hop6("2001:db8:ff:1::2", None), "a router beyond the link");
        let v6_only = LinkAddresses { v4: vec![], ..link() };
        assert_eq!(choose(ip("2001:db8:ff:1::2"), ip("2001:db8:ff:1::1"), Configured::default(), &v6_only).v4, None);
        // No interface found for the local address: the session's own family only.
        let nh =
            choose(ip("2001:db8:ff:1::2"), ip("2001:db8:ff:1::1"), Configured::default(), &LinkAddresses::default());
        assert_eq!(nh, NextHops { v4: None, v6: hop6("2001:db8:ff:1::2", None) });
    }

    #[test]
    fn configured_next_hops_win_and_carry_no_link_local() {
        let configured =
            Configured { v4: Some(Ipv4Addr::new(192, 0, 2, 9)), v6: Some("2001:db8:9::9".parse().unwrap()) };
        let nh = choose(ip("203.0.113.2"), ip("203.0.113.1"), configured, &link());
        assert_eq!(nh, NextHops { v4: configured.v4, v6: hop6("2001:db8:9::9", None) });
    }

    #[test]
    fn only_usable_addresses_count() {
        let mut m = AddressMessage::default();
        m.attributes.push(AddressAttribute::Address(ip("2001:db8::2")));
        assert!(usable(&m));
        m.attributes.push(AddressAttribute::Flags(AddressFlags::Tentative | AddressFlags::Permanent));
        assert!(!usable(&m));
        let mut m = AddressMessage::default();
        m.header.flags = AddressHeaderFlags::Dadfailed;
        assert!(!usable(&m));
        // IPv4 point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the far end.
        let mut m = AddressMessage::default();
        m.attributes.push(AddressAttribute::Address(ip("10.0.0.1")));
        m.attributes.push(AddressAttribute::Local(ip("10.0.0.2")));
        assert_eq!(address(&m), Some(ip("10.0.0.2")));
    }
}
