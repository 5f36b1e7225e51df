//! What an ARP frame on a VM port means to the agent (pure): whom it teaches us about (a claim
//! for the sender) and whether we answer it (the gateway address, or proxy ARP for mobile IPs
//! reached through this FE: docs/design.md, invariant I8 (proxy ARP)).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use victor_dataplane::packet::arp::{ArpKind, ArpMessage, ArpOp, MacAddr, gratuitous, reply_to};

/// The addresses the agent cares about.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Mobile prefixes served here.
    pub prefixes: Vec<Ipv4Net>,
    /// VM gateway addresses answered here.
    pub gateways: Vec<Ipv4Addr>,
}

impl Scope {
    /// True for a VM address: inside a mobile prefix, not a gateway, not the prefix's network or
    /// broadcast address.
    pub fn is_vm_ip(&self, ip: Ipv4Addr) -> bool {
        !self.gateways.contains(&ip)
            && self
                .prefixes
                .iter()
                .any(|p| p.contains(&ip) && (p.prefix_len() >= 31 || (ip != p.network() && ip != p.broadcast())))
    }

    /// True for a gateway address.
    pub fn is_gateway(&self, ip: Ipv4Addr) -> bool {
        self.gateways.contains(&ip)
    }
}

/// A label for metrics.
pub fn kind_label(kind: ArpKind) -> &'static str {
    match kind {
        ArpKind::Request => "request",
        ArpKind::Reply => "reply",
        ArpKind::Gratuitous(_) => "gratuitous",
        ArpKind::Probe => "probe",
    }
}

/// The sender a frame teaches us about: a VM inside the mobile prefixes announcing itself
/// (gratuitous ARP), asking (request) or answering (reply). Probes (sender 0.0.0.0) say nothing.
pub fn learned(msg: &ArpMessage, scope: &Scope) -> Option<(Ipv4Addr, [u8; 6])> {
    if msg.kind() == ArpKind::Probe || msg.sender_mac == MacAddr::ZERO || msg.sender_mac.is_multicast() {
        return None;
    }
    scope.is_vm_ip(msg.sender_ip).then_some((msg.sender_ip, msg.sender_mac.0))
}

/// Where a mobile IP asked about is, seen from the asking port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetView {
    /// Behind this FE on the asking port: the VM answers for itself.
    SamePort,
    /// Behind this FE on another port, or behind another FE: we route it, so we answer.
    ReachedThroughUs,
    /// No binding: nobody forwards it, nobody answers.
    Unbound,
}

/// Why we answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The target is a gateway address.
    Gateway,
    /// Proxy ARP for a mobile IP reached through this FE.
    Proxy,
}

impl Answer {
    /// A label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Answer::Gateway => "gateway",
            Answer::Proxy => "proxy",
        }
    }
}

/// Whether (and why) to answer `msg`. Gratuitous ARP and replies are never answered; a probe
/// (address conflict detection) only for a gateway address — a VM that just moved here probes its
/// own address, which is still bound to its old FE, and must not be told it is taken.
pub fn answer(msg: &ArpMessage, scope: &Scope, view: impl FnOnce(Ipv4Addr) -> TargetView) -> Option<Answer> {
    match msg.kind() {
        ArpKind::Request | ArpKind::Probe if scope.is_gateway(msg.target_ip) => Some(Answer::Gateway),
        ArpKind::Request if scope.is_vm_ip(msg.target_ip) => match view(msg.target_ip) {
            TargetView::ReachedThroughUs => Some(Answer::Proxy),
            TargetView::SamePort | TargetView::Unbound => None,
        },
        _ => None,
    }
}

/// The reply answering `request` with `port_mac`.
pub fn reply(request: &ArpMessage, port_mac: [u8; 6]) -> ArpMessage {
    reply_to(request, MacAddr(port_mac))
}

/// A gratuitous ARP announcing `gateway` at `port_mac` (sent on a port a VM just arrived on, so
/// the VM's cached gateway MAC is refreshed).
pub fn gateway_announcement(gateway: Ipv4Addr, port_mac: [u8; 6]) -> ArpMessage {
    gratuitous(MacAddr(port_mac), gateway, ArpOp::Request, None)
}

/// A unicast ARP request asking `vm_ip` (at `vm_mac`) to answer — the ageing probe. The sender
/// address is the gateway when one is configured (the VM answers its gateway) else 0.0.0.0.
pub fn probe(vm_ip: Ipv4Addr, vm_mac: [u8; 6], port_mac: [u8; 6], sender: Option<Ipv4Addr>) -> ArpMessage {
    ArpMessage {
        eth_dst: MacAddr(vm_mac),
        eth_src: MacAddr(port_mac),
        vlan: None,
        op: ArpOp::Request,
        sender_mac: MacAddr(port_mac),
        sender_ip: sender.unwrap_or(Ipv4Addr::UNSPECIFIED),
        target_mac: MacAddr::ZERO,
        target_ip: vm_ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use victor_dataplane::packet::arp::{build_frame, parse_frame};

    const VM_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const PORT_MAC: [u8; 6] = [2, 0, 0x5e, 0x10, 0, 1];
    const VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 11);
    const GW: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);

    fn scope() -> Scope {
        Scope { prefixes: vec!["10.10.0.0/16".parse().unwrap()], gateways: vec![GW] }
    }

    fn request(sender: Ipv4Addr, target: Ipv4Addr) -> ArpMessage {
        ArpMessage {
            eth_dst: MacAddr::BROADCAST,
            eth_src: MacAddr(VM_MAC),
            vlan: None,
            op: ArpOp::Request,
            sender_mac: MacAddr(VM_MAC),
            sender_ip: sender,
            target_mac: MacAddr::ZERO,
            target_ip: target,
        }
    }

    #[test]
    fn learns_vms_inside_the_prefixes_only() {
        let s = scope();
        assert_eq!(learned(&request(VM, GW), &s), Some((VM, VM_MAC)));
        let garp = gratuitous(MacAddr(VM_MAC), VM, ArpOp::Request, None);
        assert_eq!(learned(&garp, &s), Some((VM, VM_MAC)));
        assert_eq!(learned(&request(Ipv4Addr::new(192, 0, 2, 5), GW), &s), None, "outside");
        assert_eq!(learned(&request(GW, VM), &s), None, "the gateway is not a VM");
        assert_eq!(learned(&request(Ipv4Addr::UNSPECIFIED, VM), &s), None, "probe");
        assert_eq!(learned(&request(Ipv4Addr::new(10, 10, 255, 255), GW), &s), None, "broadcast");
    }

    #[test]
    fn answers_gateway_and_proxy_but_never_for_the_vm_itself() {
        let s = scope();
        let through = |_| TargetView::ReachedThroughUs;
        assert_eq!(answer(&request(VM, GW), &s, through), Some(Answer::Gateway));
        let other = Ipv4Addr::new(10, 10, 0, 12);
        assert_eq!(answer(&request(VM, other), &s, through), Some(Answer::Proxy));
        assert_eq!(answer(&request(VM, other), &s, |_| TargetView::SamePort), None);
        assert_eq!(answer(&request(VM, other), &s, |_| TargetView::Unbound), None);
        assert_eq!(answer(&request(Ipv4Addr::UNSPECIFIED, VM), &s, through), None, "DAD probe of a moved VM");
        assert_eq!(answer(&request(Ipv4Addr::UNSPECIFIED, GW), &s, through), Some(Answer::Gateway));
        let garp = gratuitous(MacAddr(VM_MAC), VM, ArpOp::Request, None);
        assert_eq!(answer(&garp, &s, through), None);
        assert_eq!(answer(&request(VM, Ipv4Addr::new(192, 0, 2, 1)), &s, through), None, "not ours");
    }

    #[test]
    fn frames_we_send() {
        let reply = parse_frame(&build_frame(&reply(&request(VM, GW), PORT_MAC))).unwrap();
        assert_eq!(
            (reply.op, reply.sender_ip, reply.sender_mac.0, reply.eth_dst.0),
            (ArpOp::Reply, GW, PORT_MAC, VM_MAC)
        );
        let garp = parse_frame(&build_frame(&gateway_announcement(GW, PORT_MAC))).unwrap();
        assert_eq!(garp.kind(), ArpKind::Gratuitous(ArpOp::Request));
        assert_eq!((garp.sender_ip, garp.sender_mac.0), (GW, PORT_MAC));
        let probe = parse_frame(&build_frame(&probe(VM, VM_MAC, PORT_MAC, Some(GW)))).unwrap();
        assert_eq!((probe.eth_dst.0, probe.target_ip, probe.sender_ip), (VM_MAC, VM, GW));
    }
}
