//! The lab's network (the migration testbed of the README's "See it work"), in namespaces:
//!
//! ```text
//!                                                    fe2 ─vmnet─┐        hv: br2 ─ v1h ── vm1 (10.10.0.11)
//!  client ──(192.0.2.0/24)── fe1 ══ ul: bridge ══╡                 ├── (hypervisor)
//!                                  198.51.100.0/24   fe3 ─vmnet─┘        hv: br3   (v1h after a move)
//! ```
//! `client` reaches the VMs through fe1 (its ingress FE); every FE has its own underlay address on
//! a bridge in the `ul` namespace. With [`Ingress::Bgp`] the client sits behind an `upstream`
//! router instead, linked to every FE, which learns the mobile prefix from the FEs' agents by BGP
//! and spreads traffic over them (ECMP) — the anycast path of docs/bgp.md. VMs run "on a
//! hypervisor" (`hv`): each VM's link is a port of the bridge that belongs to the FE it sits behind (`br<n>`, uplinked to that FE's `vmnet`
//! port). A move re-attaches the VM's port to the other FE's bridge — a hypervisor's vswitch
//! reconnecting a migrated vNIC — so the FEs' VM ports always exist and the switch itself is one
//! netlink call. Outbound traffic from a VM leaves at its own FE straight towards the client
//! network (no triangle through the ingress FE). Everything lives in namespaces this value owns:
//! dropping it deletes them (links die with them).

use std::net::Ipv4Addr;

use anyhow::Result;
use victor_testkit::netns::{NetNs, Veth};

pub use super::addressing::{CLIENT, CLIENT_GATEWAY, CLIENT_NET, GATEWAY, GATEWAY_MAC, MOBILE, fe_addr};

/// Name of every FE's VM-facing port (matches the agents' `--vm-port vm*`).
pub const VM_PORT: &str = "vmnet";

/// A VM of the lab.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Its address (inside [`MOBILE`], on a /24 with [`GATEWAY`]).
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: String,
    /// Name of its link's hypervisor-side end.
    pub port: String,
}

impl VmSpec {
    /// VM number `i` (1-based): 10.10.0.(10+i), MAC 02:00:00:00:00:(10+i), hypervisor port `v<i>h`.
    pub fn numbered(i: usize) -> VmSpec {
        let host = 10 + i as u8;
        VmSpec { ip: Ipv4Addr::new(10, 10, 0, host), mac: format!("02:00:00:00:00:{host:02x}"), port: format!("v{i}h") }
    }
}

/// How the client's traffic enters VICTOR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// The client is linked to fe1, which is its gateway.
    Static,
    /// The client is behind the `upstream` BGP router, linked to every FE.
    Bgp,
}

/// The namespaces of the lab (every link lives inside them and dies with them).
pub struct Topology {
    /// The client.
    pub client: NetNs,
    /// The BGP router between the client and the FEs ([`Ingress::Bgp`]).
    pub upstream: Option<NetNs>,
    /// The underlay (a bridge joining every FE).
    pub ul: NetNs,
    /// The hypervisor: one bridge per FE (`br<n>`), uplinked to the FE's `vmnet` port.
    pub hv: NetNs,
    /// fe1, fe2, ... (index = FE number − 1).
    pub fes: Vec<NetNs>,
    /// The VMs (index = VM number − 1).
    pub vms: Vec<NetNs>,
    /// Their specs.
    pub vm_specs: Vec<VmSpec>,
    /// Which FE each VM's link is attached to now.
    pub vm_at: Vec<usize>,
}

/// How namespaces are named: unique per run (tests) or fixed per lab name (`victor-lab up`).
pub type Namer<'a> = &'a dyn Fn(&str) -> Result<NetNs>;

/// A fresh namespace for `role`, named `<prefix><short role>` plus NetNs's unique suffix — the
/// usual [`Namer`]: `|role| netns_for("vm", role)`.
pub fn netns_for(prefix: &str, role: &str) -> Result<NetNs> {
    NetNs::new(&format!("{prefix}{}", short(role)))
}

/// A short name for a role (`client` → `c`, `ul` → `u`, `fe2` → `2`, `vm1` → `v1`).
fn short(role: &str) -> String {
    match role {
        "client" => "c".into(),
        "ul" => "u".into(),
        r if r.starts_with("fe") => r[2..].to_owned(),
        r if r.starts_with("vm") => format!("v{}", &r[2..]),
        r => r.chars().take(2).collect(),
    }
}

impl Topology {
    /// Builds client, underlay and `fes` FEs (no VMs yet). `namer` creates each namespace from a
    /// role name (`client`, `ul`, `fe1`, ...).
    pub fn build(fes: usize, namer: Namer<'_>) -> Result<Topology> {
        Self::build_with(fes, namer, Ingress::Static)
    }

    /// [`Topology::build`] with the client's ingress chosen (`upstream` is named by the namer
    /// too).
    pub fn build_with(fes: usize, namer: Namer<'_>, ingress: Ingress) -> Result<Topology> {
        victor_testkit::require_root("the VICTOR lab");
        let client = namer("client")?;
        let upstream = if ingress == Ingress::Bgp { Some(namer("upstream")?) } else { None };
        let ul = namer("ul")?;
        let hv = namer("hv")?;
        let fe_ns = (1..=fes).map(|i| namer(&format!("fe{i}"))).collect::<Result<Vec<_>>>()?;
        let topo =
            Topology { client, upstream, ul, hv, fes: fe_ns, vms: Vec::new(), vm_specs: Vec::new(), vm_at: Vec::new() };
        topo.ul.ip(&["link", "add", "br0", "type", "bridge"])?;
        // Bridged underlay frames must not go through the host's netfilter (br_netfilter).
        let _ = topo.ul.sysctl("net.bridge.bridge-nf-call-iptables", "0");
        topo.ul.link_up("br0")?;
        for i in 1..=fes {
            let port = format!("p{i}");
            let _link = Veth::create(&topo.fes[i - 1], "ul0", &topo.ul, &port)?;
            topo.ul.ip(&["link", "set", &port, "master", "br0"])?;
            let fe = &topo.fes[i - 1];
            fe.add_addr("ul0", &format!("{}/24", fe_addr(i)))?;
            fe.enable_forwarding()?;
            if i > 1 && ingress == Ingress::Static {
                // Outbound traffic leaves at the VM's FE straight over the underlay (no triangle).
                fe.route(&[CLIENT_NET, "via", &fe_addr(1).to_string()])?;
            }
            if i > 1 {
                // The FE's VM segment: a port to its bridge on the hypervisor.
                let (bridge, uplink) = (format!("br{i}"), format!("up{i}"));
                topo.hv.ip(&["link", "add", &bridge, "type", "bridge"])?;
                topo.hv.link_up(&bridge)?;
                let _link = Veth::create(fe, VM_PORT, &topo.hv, &uplink)?;
                topo.hv.ip(&["link", "set", &uplink, "master", &bridge])?;
            }
        }
        // The client's gateway: fe1, or the upstream router (each FE then leaves towards the client
        // over its own link to it).
        let gateway = match &topo.upstream {
            None => &topo.fes[0],
            Some(upstream) => {
                super::bgp::wire_upstream(upstream, &topo.fes)?;
                upstream
            }
        };
        let _link = Veth::create(&topo.client, "eth0", gateway, "cl0")?;
        topo.client.add_addr("eth0", &format!("{CLIENT}/24"))?;
        topo.client.route(&["default", "via", &CLIENT_GATEWAY.to_string()])?;
        gateway.add_addr("cl0", &format!("{CLIENT_GATEWAY}/24"))?;
        Ok(topo)
    }

    /// FE `n` (1-based).
    pub fn fe(&self, n: usize) -> &NetNs {
        &self.fes[n - 1]
    }

    /// VM `i` (1-based).
    pub fn vm(&self, i: usize) -> &NetNs {
        &self.vms[i - 1]
    }

    /// Adds a VM in its own namespace (named by `namer("vm<i>")`) behind FE `fe` (≥ 2):
    /// interface `eth0` with the VM's MAC and IP/24, default route via the gateway, its
    /// hypervisor port on `br<fe>`. Returns its number.
    pub fn add_vm(&mut self, spec: VmSpec, fe: usize, namer: Namer<'_>) -> Result<usize> {
        let i = self.vms.len() + 1;
        let ns = namer(&format!("vm{i}"))?;
        attach(&ns, "eth0", &self.hv, &spec, fe)?;
        ns.route(&["default", "via", GATEWAY])?;
        self.vms.push(ns);
        self.vm_specs.push(spec);
        self.vm_at.push(fe);
        Ok(i)
    }

    /// Re-attaches VM `i`'s link to FE `to`'s bridge with an `ip` command (the experiment switches
    /// links with a netlink socket opened once instead, which does not fork).
    pub fn move_vm_link(&mut self, i: usize, to: usize) -> Result<()> {
        self.hv.ip(&["link", "set", &self.vm_specs[i - 1].port, "master", &format!("br{to}")])?;
        self.vm_at[i - 1] = to;
        Ok(())
    }

    /// `ip route show <args>` in FE `n`.
    pub fn routes(&self, n: usize, args: &[&str]) -> Result<String> {
        let mut full = vec!["route", "show"];
        full.extend_from_slice(args);
        self.fe(n).ip(&full)
    }

    /// Every namespace's name.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.client.name().to_owned(), self.ul.name().to_owned(), self.hv.name().to_owned()];
        names.extend(self.upstream.iter().map(|ns| ns.name().to_owned()));
        names.extend(self.fes.iter().chain(&self.vms).map(|ns| ns.name().to_owned()));
        names
    }

    /// Keeps every namespace after drop (`victor-lab up`).
    pub fn make_persistent(&mut self) {
        let all = [&mut self.client, &mut self.ul, &mut self.hv].into_iter().chain(&mut self.upstream);
        for ns in all.chain(&mut self.fes).chain(&mut self.vms) {
            ns.make_persistent();
        }
    }
}

/// Creates VM interface `vm_if` in `vm_ns` with the VM's MAC and IP/24, linked to `spec.port` on
/// the hypervisor, attached to FE `fe`'s bridge (both ends live in lab namespaces).
pub fn attach(vm_ns: &NetNs, vm_if: &str, hv: &NetNs, spec: &VmSpec, fe: usize) -> Result<()> {
    attach_with(vm_ns, vm_if, hv, spec, fe, &format!("{}/24", spec.ip))
}

/// [`attach`] with an explicit address (`clone` switches add a /32 second link).
pub fn attach_with(vm_ns: &NetNs, vm_if: &str, hv: &NetNs, spec: &VmSpec, fe: usize, cidr: &str) -> Result<()> {
    let _link = Veth::create(vm_ns, vm_if, hv, &spec.port)?;
    vm_ns.ip(&["link", "set", vm_if, "address", &spec.mac])?;
    vm_ns.add_addr(vm_if, cidr)?;
    hv.ip(&["link", "set", &spec.port, "master", &format!("br{fe}")])?;
    Ok(())
}
