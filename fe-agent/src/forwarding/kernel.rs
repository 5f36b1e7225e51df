//! The kernel backend: an ipip device in collect-metadata (external) mode, one /32 route with
//! `encap ip dst PEER` per remote VM, the mobile prefixes blackholed (no binding → drop).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use rtnetlink::packet_route::link::{InfoData, InfoIpTunnel};
use rtnetlink::packet_route::route::{RouteIpTunnel, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{LinkMessageBuilder, RouteMessageBuilder};

use super::{DataplaneConfig, Tunnel};
use crate::netlink::Kernel;

/// The running kernel data plane.
#[derive(Debug)]
pub struct KernelPlane {
    /// The ipip device.
    ifindex: u32,
    /// Our underlay address (outer source).
    underlay: Ipv4Addr,
    /// Remote VMs and their peers as programmed.
    remotes: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Local VMs (no kernel object beyond the /32 on the VM port).
    locals: HashSet<Ipv4Addr>,
}

impl KernelPlane {
    /// Creates the ipip device (unless it exists) and blackholes the mobile prefixes.
    pub async fn start(config: &DataplaneConfig, kernel: &Kernel) -> Result<KernelPlane> {
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
        Ok(KernelPlane {
            ifindex: dev.index,
            underlay: config.underlay,
            remotes: HashMap::new(),
            locals: HashSet::new(),
        })
    }

    /// What the kernel does with `ip` now (as programmed by this run).
    pub fn tunnel(&self, ip: Ipv4Addr) -> Tunnel {
        match self.remotes.get(&ip) {
            Some(p) => Tunnel::Remote(*p),
            None if self.locals.contains(&ip) => Tunnel::Local,
            None => Tunnel::None,
        }
    }

    /// Programs `ip`'s entry: an encap route for a remote VM, none otherwise.
    pub async fn set_tunnel(&mut self, kernel: &Kernel, ip: Ipv4Addr, tunnel: Tunnel) -> Result<()> {
        let route = |peer: Option<Ipv4Addr>| {
            let b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .output_interface(self.ifindex)
                .protocol(RouteProtocol::from(kernel.protocol()))
                .scope(RouteScope::Link);
            match peer {
                Some(peer) => b
                    .encap_ip(vec![
                        RouteIpTunnel::Destination(peer),
                        RouteIpTunnel::Source(self.underlay),
                        RouteIpTunnel::Ttl(64),
                    ])
                    .build(),
                None => b.build(),
            }
        };
        match tunnel {
            Tunnel::Remote(peer) => {
                kernel.handle().route().add(route(Some(peer))).replace().execute().await?;
                self.remotes.insert(ip, peer);
                self.locals.remove(&ip);
            }
            Tunnel::Local | Tunnel::None => {
                if self.remotes.contains_key(&ip)
                    && let Err(e) = kernel.handle().route().del(route(None)).execute().await
                {
                    tracing::warn!(%ip, error = %e, "could not remove the encap route");
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
}
