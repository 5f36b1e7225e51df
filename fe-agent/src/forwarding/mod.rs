//! The IP-in-IP data plane behind the reconciler — which backend forwards ([`choose`]), starting
//! it, and each VM IP's entry in it ([`Tunnel`]):
//!
//! * **Userspace** ([`tun`]): the `victor_dataplane` crate's forwarder on a TUN device. The mobile
//!   prefixes are routed into the TUN device (proto = ours); the forwarding table says per VM IP
//!   Local / Remote(peer) / nothing (drop); tunnel packets are accepted only from the registered
//!   FEs' underlay addresses ([`Dataplane::set_peers`]).
//! * **Kernel** ([`kernel`], needs the `ipip` module): an ipip device in collect-metadata
//!   (external) mode; each remote VM gets a /32 route through it with `encap ip dst PEER`; the
//!   mobile prefixes are blackholed (no binding → drop). The kernel's ipip receive path has no
//!   peer filter: restricting tunnel sources to registered FEs needs a firewall rule there.

pub mod kernel;
pub mod tun;

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::Result;
use clap::ValueEnum;
use ipnet::Ipv4Net;
use serde::Serialize;
use victor_dataplane::counters::{CounterSnapshot, Counters};
use victor_dataplane::fib::Fib;

use crate::netlink::Kernel;
use kernel::KernelPlane;
use tun::TunPlane;

/// Which IP-in-IP implementation carries traffic for remote VMs (`--dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// The kernel's ipip driver when the kernel has it, else the userspace TUN forwarder.
    Auto,
    /// The userspace forwarder on a TUN device.
    Tun,
    /// Kernel ipip device in collect-metadata mode with per-route encapsulation (needs the
    /// kernel's ipip module).
    Kernel,
}

/// The backend actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Userspace forwarder on TUN.
    Tun,
    /// Kernel ipip with per-route encapsulation.
    Kernel,
}

impl Backend {
    /// A label (`tun` / `kernel`).
    pub fn label(self) -> &'static str {
        match self {
            Backend::Tun => "tun",
            Backend::Kernel => "kernel",
        }
    }
}

/// Picks the backend for `mode`, given whether the kernel has ipip; says why.
pub fn choose(mode: DataplaneMode, kernel_has_ipip: bool) -> Result<(Backend, &'static str), String> {
    match (mode, kernel_has_ipip) {
        (DataplaneMode::Tun, _) => Ok((Backend::Tun, "--dataplane tun")),
        (DataplaneMode::Kernel, true) => Ok((Backend::Kernel, "--dataplane kernel")),
        (DataplaneMode::Kernel, false) => Err("--dataplane kernel needs the kernel's ipip module, which this kernel \
             does not have (/sys/module/ipip is missing; try `modprobe ipip`), or use --dataplane tun"
            .into()),
        (DataplaneMode::Auto, true) => Ok((Backend::Kernel, "auto: the kernel has the ipip module")),
        (DataplaneMode::Auto, false) => Ok((
            Backend::Tun,
            "auto: the kernel has no ipip module (/sys/module/ipip missing), using the userspace TUN forwarder",
        )),
    }
}

/// What the data plane does with one VM IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// Nothing (packets are dropped).
    None,
    /// Delivered locally (the data plane leaves it to the kernel's /32).
    Local,
    /// Encapsulated to this underlay address.
    Remote(Ipv4Addr),
}

/// How to start the data plane.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// Backend.
    pub backend: Backend,
    /// This FE's underlay address.
    pub underlay: Ipv4Addr,
    /// Underlay MTU.
    pub underlay_mtu: u16,
    /// TUN (or ipip) device name.
    pub device: String,
    /// Mobile prefixes routed into the data plane.
    pub prefixes: Vec<Ipv4Net>,
}

/// A running data plane.
#[derive(Debug)]
pub enum Dataplane {
    /// Userspace.
    Tun(TunPlane),
    /// Kernel ipip.
    Kernel(KernelPlane),
}

impl Dataplane {
    /// Starts the data plane in the calling thread's namespace and routes the mobile prefixes
    /// into it.
    pub async fn start(config: &DataplaneConfig, kernel: &Kernel) -> Result<Dataplane> {
        Ok(match config.backend {
            Backend::Tun => Dataplane::Tun(TunPlane::start(config, kernel).await?),
            Backend::Kernel => Dataplane::Kernel(KernelPlane::start(config, kernel).await?),
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        match self {
            Dataplane::Tun(_) => Backend::Tun,
            Dataplane::Kernel(_) => Backend::Kernel,
        }
    }

    /// The forwarding table (userspace backend).
    pub fn fib(&self) -> Option<&Arc<Fib>> {
        match self {
            Dataplane::Tun(plane) => Some(plane.fib()),
            Dataplane::Kernel(_) => None,
        }
    }

    /// What the data plane does with `ip` now.
    pub fn tunnel(&self, ip: Ipv4Addr) -> Tunnel {
        match self {
            Dataplane::Tun(plane) => plane.tunnel(ip),
            Dataplane::Kernel(plane) => plane.tunnel(ip),
        }
    }

    /// Sets the data-plane entry of `ip`.
    pub async fn set_tunnel(&mut self, kernel: &Kernel, ip: Ipv4Addr, tunnel: Tunnel) -> Result<()> {
        match self {
            Dataplane::Tun(plane) => plane.set_tunnel(ip, tunnel),
            Dataplane::Kernel(plane) => plane.set_tunnel(kernel, ip, tunnel).await,
        }
    }

    /// Replaces the set of FEs whose tunnel packets are accepted.
    pub fn set_peers(&self, peers: &[Ipv4Addr]) {
        if let Dataplane::Tun(plane) = self {
            plane.set_peers(peers);
        }
    }

    /// Forwarder counters (userspace backend).
    pub fn counters(&self) -> Option<CounterSnapshot> {
        match self {
            Dataplane::Tun(plane) => Some(plane.counters()),
            Dataplane::Kernel(_) => None,
        }
    }

    /// Live counters handle (for /metrics).
    pub fn counters_handle(&self) -> Option<Arc<Counters>> {
        match self {
            Dataplane::Tun(plane) => Some(plane.counters_handle()),
            Dataplane::Kernel(_) => None,
        }
    }

    /// False once the userspace forwarder has died.
    pub fn is_running(&self) -> bool {
        match self {
            Dataplane::Tun(plane) => plane.is_running(),
            Dataplane::Kernel(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_says_why() {
        assert_eq!(choose(DataplaneMode::Auto, false).unwrap().0, Backend::Tun);
        assert!(choose(DataplaneMode::Auto, false).unwrap().1.contains("no ipip module"));
        assert_eq!(choose(DataplaneMode::Auto, true).unwrap().0, Backend::Kernel);
        assert_eq!(choose(DataplaneMode::Tun, true).unwrap().0, Backend::Tun);
        let err = choose(DataplaneMode::Kernel, false).unwrap_err();
        assert!(err.contains("ipip module") && err.contains("--dataplane tun"), "{err}");
    }
}
