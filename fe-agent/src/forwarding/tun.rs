//! The userspace backend: the `victor_dataplane` forwarder on a TUN device, with the mobile
//! prefixes routed into it and one forwarding-table entry per VM IP.

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{Context, Result};
use victor_dataplane::counters::{CounterSnapshot, Counters};
use victor_dataplane::fib::{Action, Fib};
use victor_dataplane::forwarder::{Forwarder, ForwarderConfig};

use super::{DataplaneConfig, Tunnel};
use crate::netlink::Kernel;

/// The running userspace forwarder.
pub struct TunPlane {
    /// The forwarder (stops when dropped).
    forwarder: Forwarder,
    /// Its forwarding table.
    fib: Arc<Fib>,
}

impl std::fmt::Debug for TunPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunPlane").field("tun", &self.forwarder.tun_name()).finish_non_exhaustive()
    }
}

impl TunPlane {
    /// Starts the forwarder and routes the mobile prefixes into its TUN device.
    pub async fn start(config: &DataplaneConfig, kernel: &Kernel) -> Result<TunPlane> {
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
        Ok(TunPlane { forwarder, fib })
    }

    /// The forwarding table.
    pub fn fib(&self) -> &Arc<Fib> {
        &self.fib
    }

    /// What the forwarder does with `ip` now.
    pub fn tunnel(&self, ip: Ipv4Addr) -> Tunnel {
        match self.fib.lookup(ip) {
            None => Tunnel::None,
            Some(Action::Local) => Tunnel::Local,
            Some(Action::Remote(p)) => Tunnel::Remote(p),
        }
    }

    /// Sets the forwarding-table entry of `ip`.
    pub fn set_tunnel(&self, ip: Ipv4Addr, tunnel: Tunnel) -> Result<()> {
        match tunnel {
            Tunnel::None => {
                self.fib.remove(ip);
            }
            Tunnel::Local => {
                self.fib.set(ip, Action::Local)?;
            }
            Tunnel::Remote(peer) => {
                self.fib.set(ip, Action::Remote(peer))?;
            }
        }
        Ok(())
    }

    /// Accepts tunnel packets only from `peers`.
    pub fn set_peers(&self, peers: &[Ipv4Addr]) {
        self.fib.set_peers(peers.iter().copied());
    }

    /// The forwarder's counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.forwarder.counters()
    }

    /// Live counters handle (for /metrics).
    pub fn counters_handle(&self) -> Arc<Counters> {
        self.forwarder.counters_handle()
    }

    /// False once the forwarder has died.
    pub fn is_running(&self) -> bool {
        self.forwarder.is_running()
    }
}
