//! The IP-in-IP data plane behind the reconciler: which backend runs ([`choose`]), starting it,
//! and the per-VM tunnel entry.
//!
//! * **Userspace** (`tun`): the data-plane crate's forwarder on a TUN device. The mobile prefixes
//!   are routed into the TUN device (proto = ours); the forwarding table says per VM IP
//!   Local / Remote(peer) / nothing (drop); tunnel packets are accepted only from the registered
//!   FEs' underlay addresses ([`Dataplane::set_peers`]).
//! * **Kernel** (`kernel`, needs the `ipip` module): an ipip device in collect-metadata
//!   (external) mode; each remote VM gets a /32 route through it with `encap ip dst PEER`; the
//!   mobile prefixes are blackholed (no binding → drop). The kernel's ipip receive path has no
//!   peer filter: restricting tunnel sources to registered FEs needs a firewall rule there.

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoData, InfoIpTunnel};
use rtnetlink::packet_route::route::{RouteIpTunnel, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{LinkMessageBuilder, RouteMessageBuilder};
use victor_dataplane::counters::CounterSnapshot;
use victor_dataplane::fib::{Action, Fib};
use victor_dataplane::forwarder::{Forwarder, ForwarderConfig};

use crate::config::DataplaneMode;
use crate::netlink::Kernel;
use crate::reconcile::plan::Tunnel;

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
pub enum Dataplane {
    /// Userspace.
    Tun {
        /// The forwarder (stops when dropped).
        forwarder: Forwarder,
        /// Its forwarding table.
        fib: Arc<Fib>,
    },
    /// Kernel ipip.
    Kernel {
        /// The ipip device.
        ifindex: u32,
        /// Our underlay address (outer source).
        underlay: Ipv4Addr,
        /// Remote VMs and their peers as programmed.
        remotes: std::collections::HashMap<Ipv4Addr, Ipv4Addr>,
        /// Local VMs (no kernel object beyond the /32 on the VM port).
        locals: std::collections::HashSet<Ipv4Addr>,
    },
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane").field("backend", &self.backend()).finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Starts the data plane in the calling thread's namespace and routes the mobile prefixes
    /// into it.
    pub async fn start(config: &DataplaneConfig, kernel: &Kernel) -> Result<Dataplane> {
        match config.backend {
            Backend::Tun => {
                let fib = Arc::new(Fib::new(config.underlay));
                let mut fc = ForwarderConfig::new(&config.device);
                fc.underlay_mtu = config.underlay_mtu;
                let forwarder = Forwarder::start(fc, fib.clone()).context("start the userspace forwarder")?;
                for net in &config.prefixes {
                    kernel.replace_prefix_route(*net, forwarder.tun_index()).await?;
                }
                tracing::info!(
                    tun = forwarder.tun_name(),
                    mtu = forwarder.tunnel_mtu(),
                    "userspace IP-in-IP forwarder running"
                );
                Ok(Dataplane::Tun { forwarder, fib })
            }
            Backend::Kernel => {
                let handle = kernel.handle();
                let link = LinkMessageBuilder::<rtnetlink::LinkIpIp>::new(&config.device)
                    .set_info_data(InfoData::IpTunnel(vec![InfoIpTunnel::CollectMetadata]))
                    .mtu(u32::from(config.underlay_mtu.saturating_sub(20)))
                    .up()
                    .build();
                if kernel.link_by_name(&config.device).await?.is_none() {
                    handle.link().add(link).execute().await.context("create the ipip device")?;
                }
                let Some(dev) = kernel.link_by_name(&config.device).await? else {
                    bail!("ipip device {} vanished after creation", config.device);
                };
                for net in &config.prefixes {
                    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(net.network(), net.prefix_len())
                        .protocol(RouteProtocol::from(kernel.protocol()))
                        .kind(RouteType::BlackHole)
                        .build();
                    handle.route().add(msg).replace().execute().await.context("blackhole the mobile prefix")?;
                }
                Ok(Dataplane::Kernel {
                    ifindex: dev.index,
                    underlay: config.underlay,
                    remotes: Default::default(),
                    locals: Default::default(),
                })
            }
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        match self {
            Dataplane::Tun { .. } => Backend::Tun,
            Dataplane::Kernel { .. } => Backend::Kernel,
        }
    }

    /// The forwarding table (userspace backend).
    pub fn fib(&self) -> Option<&Arc<Fib>> {
        match self {
            Dataplane::Tun { fib, .. } => Some(fib),
            Dataplane::Kernel { .. } => None,
        }
    }

    /// What the data plane does with `ip` now.
    pub fn tunnel(&self, ip: Ipv4Addr) -> Tunnel {
        match self {
            Dataplane::Tun { fib, .. } => match fib.lookup(ip) {
                None => Tunnel::None,
                Some(Action::Local) => Tunnel::Local,
                Some(Action::Remote(p)) => Tunnel::Remote(p),
            },
            Dataplane::Kernel { remotes, locals, .. } => match remotes.get(&ip) {
                Some(p) => Tunnel::Remote(*p),
                None if locals.contains(&ip) => Tunnel::Local,
                None => Tunnel::None,
            },
        }
    }

    /// Sets the data-plane entry of `ip`.
    pub async fn set_tunnel(&mut self, kernel: &Kernel, ip: Ipv4Addr, tunnel: Tunnel) -> Result<()> {
        match self {
            Dataplane::Tun { fib, .. } => {
                match tunnel {
                    Tunnel::None => {
                        fib.remove(ip);
                    }
                    Tunnel::Local => {
                        fib.set(ip, Action::Local)?;
                    }
                    Tunnel::Remote(peer) => {
                        fib.set(ip, Action::Remote(peer))?;
                    }
                }
                Ok(())
            }
            Dataplane::Kernel { ifindex, underlay, remotes, locals } => {
                let route = |peer: Option<Ipv4Addr>| {
                    let b = RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(ip, 32)
                        .output_interface(*ifindex)
                        .protocol(RouteProtocol::from(kernel.protocol()))
                        .scope(RouteScope::Link);
                    match peer {
                        Some(peer) => b
                            .encap_ip(vec![
                                RouteIpTunnel::Destination(peer),
                                RouteIpTunnel::Source(*underlay),
                                RouteIpTunnel::Ttl(64),
                            ])
                            .build(),
                        None => b.build(),
                    }
                };
                match tunnel {
                    Tunnel::Remote(peer) => {
                        kernel.handle().route().add(route(Some(peer))).replace().execute().await?;
                        remotes.insert(ip, peer);
                        locals.remove(&ip);
                    }
                    Tunnel::Local | Tunnel::None => {
                        if remotes.remove(&ip).is_some()
                            && let Err(e) = kernel.handle().route().del(route(None)).execute().await
                        {
                            tracing::warn!(%ip, error = %e, "could not remove the encap route");
                        }
                        if tunnel == Tunnel::Local {
                            locals.insert(ip);
                        } else {
                            locals.remove(&ip);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Replaces the set of FEs whose tunnel packets are accepted.
    pub fn set_peers(&self, peers: &[Ipv4Addr]) {
        if let Dataplane::Tun { fib, .. } = self {
            fib.set_peers(peers.iter().copied());
        }
    }

    /// Forwarder counters (userspace backend).
    pub fn counters(&self) -> Option<CounterSnapshot> {
        match self {
            Dataplane::Tun { forwarder, .. } => Some(forwarder.counters()),
            Dataplane::Kernel { .. } => None,
        }
    }

    /// Live counters handle (for /metrics).
    pub fn counters_handle(&self) -> Option<Arc<victor_dataplane::counters::Counters>> {
        match self {
            Dataplane::Tun { forwarder, .. } => Some(forwarder.counters_handle()),
            Dataplane::Kernel { .. } => None,
        }
    }

    /// False once the userspace forwarder has died.
    pub fn is_running(&self) -> bool {
        match self {
            Dataplane::Tun { forwarder, .. } => forwarder.is_running(),
            Dataplane::Kernel { .. } => true,
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
