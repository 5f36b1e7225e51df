//! What an IPv6 Neighbor Discovery frame on a VM port means to the agent (pure), the IPv6
//! counterpart of [`super::arp`]: whom it teaches us about (a claim for the VM's address) and
//! whether we answer it (the gateway address, or proxy NDP for mobile IPv6 addresses reached
//! through this FE: docs/design.md, invariant I8 for IPv6).
//!
//! Learned (the VM says it owns an address): an unsolicited Neighbor Advertisement with the
//! override flag (what a host or hypervisor sends after a move), a DAD solicitation (source `::`,
//! target = the address the VM is about to use: it claims it), an ordinary solicitation from the
//! VM's address, and a solicited advertisement (the VM answering our NUD probe, with or without
//! the override flag: Linux clears it when answering a unicast solicitation). An *unsolicited*
//! advertisement without the override flag is an anycast or proxy announcement (RFC 4861
//! §7.2.6), not a claim.
//! Link-local addresses (fe80::/10) and anything outside the IPv6 mobile prefixes are never
//! learned; router messages never.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use victor_dataplane::packet::arp::MacAddr;
use victor_dataplane::packet::ndp::{self, Ndp, NdpKind, NdpMessage, advertise_to, unsolicited_advertisement};

pub use super::arp::{Answer, TargetView};

/// The IPv6 addresses the agent cares about.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// IPv6 mobile prefixes served here.
    pub prefixes: Vec<Ipv6Net>,
    /// IPv6 VM gateway addresses answered here.
    pub gateways: Vec<Ipv6Addr>,
}

impl Scope {
    /// True for a VM address: a routable unicast address (not link-local) inside a mobile prefix,
    /// not a gateway, not the prefix's subnet-router anycast address (its first address).
    pub fn is_vm_ip(&self, ip: Ipv6Addr) -> bool {
        victor_dataplane::packet::ipv6::is_routable_unicast(&ip)
            && !self.gateways.contains(&ip)
            && self.prefixes.iter().any(|p| p.contains(&ip) && (p.prefix_len() >= 127 || ip != p.network()))
    }

    /// True for a gateway address.
    pub fn is_gateway(&self, ip: Ipv6Addr) -> bool {
        self.gateways.contains(&ip)
    }

    /// The source address of our NUD probes on a port with `port_mac`: the first gateway (the VM
    /// answers its router), else the port's EUI-64 link-local address.
    pub fn probe_source(&self, port_mac: [u8; 6]) -> Ipv6Addr {
        self.gateways.first().copied().unwrap_or_else(|| link_local(port_mac))
    }
}

/// The EUI-64 link-local address of `mac` (RFC 4291 appendix A).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let m = mac;
    Ipv6Addr::from([0xfe, 0x80, 0, 0, 0, 0, 0, 0, m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]])
}

/// A label for metrics.
pub fn kind_label(kind: NdpKind) -> &'static str {
    match kind {
        NdpKind::Dad => "dad",
        NdpKind::Solicitation => "solicitation",
        NdpKind::SolicitedAdvertisement => "solicited_advertisement",
        NdpKind::UnsolicitedAdvertisement => "unsolicited_advertisement",
        NdpKind::RouterSolicitation => "router_solicitation",
        NdpKind::RouterAdvertisement => "router_advertisement",
    }
}

/// The VM address a frame teaches us about, and its MAC (see the module doc for which frames).
pub fn learned(msg: &NdpMessage, scope: &Scope) -> Option<(Ipv6Addr, [u8; 6])> {
    if let Ndp::NeighborAdvertisement { flags, .. } = msg.body
        && !flags.override_
        && !flags.solicited
    {
        return None;
    }
    let (ip, mac) = msg.claim()?;
    (mac != MacAddr::ZERO && scope.is_vm_ip(ip)).then_some((ip, mac.0))
}

/// Whether (and why) to answer `msg`. Only solicitations are answered: for a gateway address
/// (also its DAD: a VM must not take the gateway's address), and proxy NDP for a VM address
/// reached through this FE — never a DAD probe for a VM address: a VM that just moved here
/// probes its own address, still bound to its old FE, and must not be told it is taken.
pub fn answer(msg: &NdpMessage, scope: &Scope, view: impl FnOnce(Ipv6Addr) -> TargetView) -> Option<Answer> {
    let Ndp::NeighborSolicitation { target, .. } = msg.body else { return None };
    match msg.kind() {
        NdpKind::Dad | NdpKind::Solicitation if scope.is_gateway(target) => Some(Answer::Gateway),
        NdpKind::Solicitation if scope.is_vm_ip(target) => match view(target) {
            TargetView::ReachedThroughUs => Some(Answer::Proxy),
            TargetView::SamePort | TargetView::Unbound => None,
        },
        _ => None,
    }
}

/// The advertisement answering the solicitation `ns` with `port_mac`: the router flag for the
/// gateway; the override flag always (the FE is the only router on a VM port, and a VM's cached
/// MAC for a moved neighbour must be replaced).
pub fn reply(ns: &NdpMessage, port_mac: [u8; 6], why: Answer) -> Option<NdpMessage> {
    advertise_to(ns, MacAddr(port_mac), why == Answer::Gateway, true)
}

/// An unsolicited advertisement (router and override flags) of `gateway` at `port_mac`: sent on
/// a port a VM just arrived on, so its cached gateway MAC is refreshed.
pub fn gateway_announcement(gateway: Ipv6Addr, port_mac: [u8; 6]) -> NdpMessage {
    unsolicited_advertisement(MacAddr(port_mac), gateway, true, None)
}

/// A unicast NUD probe asking `vm_ip` (at `vm_mac`) to answer — the ageing probe, from
/// [`Scope::probe_source`]. The VM answers with a solicited advertisement.
pub fn probe(vm_ip: Ipv6Addr, vm_mac: [u8; 6], port_mac: [u8; 6], scope: &Scope) -> NdpMessage {
    ndp::probe(MacAddr(port_mac), scope.probe_source(port_mac), MacAddr(vm_mac), vm_ip, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use victor_dataplane::packet::ndp::{NaFlags, build_frame, dad, parse_frame, solicitation};

    const VM_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const PORT_MAC: [u8; 6] = [2, 0, 0x5e, 0x10, 0, 1];

    fn vm() -> Ipv6Addr {
        "fd00:10::11".parse().unwrap()
    }

    fn gw() -> Ipv6Addr {
        "fd00:10::1".parse().unwrap()
    }

    fn scope() -> Scope {
        Scope { prefixes: vec!["fd00:10::/64".parse().unwrap()], gateways: vec![gw()] }
    }

    fn na(addr: Ipv6Addr, flags: NaFlags) -> NdpMessage {
        let mut m = unsolicited_advertisement(MacAddr(VM_MAC), addr, false, None);
        if let Ndp::NeighborAdvertisement { flags: f, .. } = &mut m.body {
            *f = flags;
        }
        if flags.solicited {
            // An answer goes back to the solicitor (our probe's source), never to a group.
            (m.eth_dst, m.ip_dst) = (MacAddr(PORT_MAC), gw());
        }
        m
    }

    /// Every message through the wire format first: what the capture hands over.
    fn wire(m: NdpMessage) -> NdpMessage {
        parse_frame(&build_frame(&m)).unwrap()
    }

    #[test]
    fn learns_announcements_dad_and_solicitations_from_vm_addresses() {
        let s = scope();
        let unsolicited = wire(unsolicited_advertisement(MacAddr(VM_MAC), vm(), false, None));
        assert_eq!(kind_label(unsolicited.kind()), "unsolicited_advertisement");
        assert_eq!(learned(&unsolicited, &s), Some((vm(), VM_MAC)));
        let probe = wire(dad(MacAddr(VM_MAC), vm(), None));
        assert_eq!(kind_label(probe.kind()), "dad");
        assert_eq!(learned(&probe, &s), Some((vm(), VM_MAC)), "DAD: the VM claims the target");
        let asks = wire(solicitation(MacAddr(VM_MAC), vm(), gw(), None));
        assert_eq!(learned(&asks, &s), Some((vm(), VM_MAC)), "resolving its gateway from its address");
        let answers = wire(na(vm(), NaFlags { router: false, solicited: true, override_: true }));
        assert_eq!(learned(&answers, &s), Some((vm(), VM_MAC)), "answering our NUD probe");
        // Linux answers a unicast solicitation (our NUD probe) with the override flag clear.
        let linux = wire(na(vm(), NaFlags { router: false, solicited: true, override_: false }));
        assert_eq!(learned(&linux, &s), Some((vm(), VM_MAC)), "a Linux VM answering our NUD probe");
    }

    #[test]
    fn never_learns_link_local_outside_gateway_anycast_or_router_messages() {
        let s = scope();
        let ll = link_local(VM_MAC);
        assert_eq!(learned(&wire(unsolicited_advertisement(MacAddr(VM_MAC), ll, false, None)), &s), None);
        assert_eq!(learned(&wire(dad(MacAddr(VM_MAC), ll, None)), &s), None, "DAD of a link-local address");
        assert_eq!(learned(&wire(solicitation(MacAddr(VM_MAC), ll, gw(), None)), &s), None, "from link-local");
        let outside: Ipv6Addr = "2001:db8::5".parse().unwrap();
        assert_eq!(learned(&wire(unsolicited_advertisement(MacAddr(VM_MAC), outside, false, None)), &s), None);
        assert_eq!(learned(&wire(unsolicited_advertisement(MacAddr(VM_MAC), gw(), false, None)), &s), None);
        let anycast = wire(na(vm(), NaFlags { router: false, solicited: false, override_: false }));
        assert_eq!(learned(&anycast, &s), None, "unsolicited without override: anycast or proxy, not a claim");
        let subnet_router: Ipv6Addr = "fd00:10::".parse().unwrap();
        assert!(!s.is_vm_ip(subnet_router));
        let rs = NdpMessage { body: Ndp::RouterSolicitation { source_ll: Some(MacAddr(VM_MAC)) }, ..asks_from(vm()) };
        assert_eq!(learned(&rs, &s), None);
    }

    fn asks_from(src: Ipv6Addr) -> NdpMessage {
        solicitation(MacAddr(VM_MAC), src, gw(), None)
    }

    #[test]
    fn answers_gateway_and_proxy_but_never_a_vm_address_dad() {
        let s = scope();
        let through = |_| TargetView::ReachedThroughUs;
        assert_eq!(answer(&asks_from(vm()), &s, through), Some(Answer::Gateway));
        assert_eq!(answer(&asks_from(link_local(VM_MAC)), &s, through), Some(Answer::Gateway), "from link-local");
        let other: Ipv6Addr = "fd00:10::12".parse().unwrap();
        let for_other = solicitation(MacAddr(VM_MAC), vm(), other, None);
        assert_eq!(answer(&for_other, &s, through), Some(Answer::Proxy));
        assert_eq!(answer(&for_other, &s, |_| TargetView::SamePort), None);
        assert_eq!(answer(&for_other, &s, |_| TargetView::Unbound), None);
        assert_eq!(answer(&dad(MacAddr(VM_MAC), vm(), None), &s, through), None, "DAD probe of a moved VM");
        assert_eq!(answer(&dad(MacAddr(VM_MAC), gw(), None), &s, through), Some(Answer::Gateway));
        let outside = solicitation(MacAddr(VM_MAC), vm(), "2001:db8::1".parse().unwrap(), None);
        assert_eq!(answer(&outside, &s, through), None, "not ours");
        assert_eq!(answer(&unsolicited_advertisement(MacAddr(VM_MAC), vm(), false, None), &s, through), None);
    }

    #[test]
    fn frames_we_send() {
        let s = scope();
        let ns = asks_from(vm());
        let na = wire(reply(&ns, PORT_MAC, Answer::Gateway).unwrap());
        let Ndp::NeighborAdvertisement { target, flags, target_ll } = na.body else { panic!("{na:?}") };
        assert_eq!((target, target_ll, na.eth_dst.0, na.ip_dst), (gw(), Some(MacAddr(PORT_MAC)), VM_MAC, vm()));
        assert!(flags.router && flags.solicited && flags.override_, "{flags:?}");
        let proxy = wire(
            reply(&solicitation(MacAddr(VM_MAC), vm(), "fd00:10::12".parse().unwrap(), None), PORT_MAC, Answer::Proxy)
                .unwrap(),
        );
        let Ndp::NeighborAdvertisement { flags, .. } = proxy.body else { panic!() };
        assert!(!flags.router && flags.override_);
        let ann = wire(gateway_announcement(gw(), PORT_MAC));
        assert_eq!(ann.kind(), NdpKind::UnsolicitedAdvertisement);
        assert_eq!(ann.claim(), Some((gw(), MacAddr(PORT_MAC))));
        let p = wire(probe(vm(), VM_MAC, PORT_MAC, &s));
        assert_eq!((p.eth_dst.0, p.ip_dst, p.target(), p.ip_src), (VM_MAC, vm(), Some(vm()), gw()));
        let no_gw = Scope { gateways: Vec::new(), ..scope() };
        let p = wire(probe(vm(), VM_MAC, PORT_MAC, &no_gw));
        assert_eq!(p.ip_src, link_local(PORT_MAC));
        assert_eq!(link_local(PORT_MAC), "fe80::5eff:fe10:1".parse::<Ipv6Addr>().unwrap());
    }
}
