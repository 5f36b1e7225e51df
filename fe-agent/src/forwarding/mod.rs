//! The IP-in-IP data plane behind the reconciler — which backend forwards and why ([`start`],
//! [`choose`]), and each VM IP's entry in it ([`Tunnel`]):
//!
//! * **Userspace** ([`tun`]): the `victor_dataplane` crate's forwarder on a persistent TUN device.
//!   The mobile prefixes are routed into the TUN device (proto = ours); the forwarding table says
//!   per VM IP Local / Remote(peer) / nothing (drop); tunnel packets are accepted only from the
//!   registered FEs' underlay addresses ([`Dataplane::set_peers`]). The device, its routes and a
//!   record of the forwarding table stay in the kernel across agent restarts and are adopted by
//!   the next run; while no agent runs, its standby forwarder ([`standby`]) forwards.
//! * **Kernel** ([`kernel`], needs the `ipip` module): one point-to-point ipip device per
//!   registered FE and a /32 route per remote VM through it; the kernel decapsulates only what
//!   matches a device, so only registered FEs' packets get in (the catch-all device counts and
//!   drops the rest); the mobile prefixes go to a dummy device that drops and counts. Everything
//!   stays in the kernel across agent restarts (forwarding goes on while the agent is down) and
//!   is adopted by the next run.
//!
//! IPv6 VMs (/128 bindings) are carried over the IPv4 underlay as 6in4 (IP protocol 41, RFC 4213)
//! by the userspace forwarder; the IPv6 mobile prefixes are routed into its TUN device too. The
//! kernel backend has no `sit` counterpart of its ipip devices yet: `--dataplane kernel` refuses
//! IPv6 mobile prefixes, and `auto` runs the userspace forwarder when there are any
//! ([`ipv6_choice`]).
//!
//! `--dataplane auto` runs the kernel backend when the `ipip` module is there or can be loaded
//! (`modprobe`, then the kernel's own module autoload through a netlink request), else the
//! userspace one; the choice and its reason go to the log, `/readyz` and
//! `victor_agent_dataplane_choice`.

pub mod kernel;
pub mod standby;
pub mod tun;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::ValueEnum;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::LinkIpIp;
use serde::Serialize;
use victor_dataplane::counters::{CounterSnapshot, Counters};
use victor_dataplane::fib::Fib;
use victor_dataplane::forwarder::HandOver;
use victor_dataplane::kernel::ModuleLoad;

use crate::netlink::Kernel;
use kernel::KernelPlane;
pub use kernel::PeerChanges;
use kernel::counters::KernelCounters;
use tun::TunPlane;

/// Which IP-in-IP implementation carries traffic for remote VMs (`--dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// The kernel's ipip driver when the kernel has it or can load it, else the userspace TUN
    /// forwarder.
    Auto,
    /// The userspace forwarder on a TUN device.
    Tun,
    /// The kernel's ipip driver: one tunnel device per registered FE (needs the kernel's ipip
    /// module; loaded if possible).
    Kernel,
}

impl DataplaneMode {
    /// The flag value (`auto` / `tun` / `kernel`).
    pub fn label(self) -> &'static str {
        match self {
            DataplaneMode::Auto => "auto",
            DataplaneMode::Tun => "tun",
            DataplaneMode::Kernel => "kernel",
        }
    }
}

/// The backend actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Userspace forwarder on TUN.
    Tun,
    /// Kernel ipip, one device per registered FE.
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

/// Whether the kernel's ipip module is there, and how we know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpipSupport {
    /// Loaded or built in already.
    Present,
    /// Loaded now with `modprobe`.
    Modprobed,
    /// Loaded now by the kernel itself, asked for an ipip link through netlink.
    Autoloaded,
    /// Cannot be had: why.
    Unavailable(String),
}

/// The backend chosen: what was asked for, what runs and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// What `--dataplane` said.
    pub mode: DataplaneMode,
    /// What runs.
    pub backend: Backend,
    /// Why, as a short code (a metric label): `requested`, `ipip_loaded`, `ipip_modprobed`,
    /// `ipip_autoloaded`, `ipip_unavailable`, `kernel_failed`.
    pub code: &'static str,
    /// Why, in words (log, `/readyz`).
    pub why: String,
}

impl Choice {
    /// `kernel (auto: ...)`, for `/readyz`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.backend.label(), self.why)
    }
}

/// Picks the backend for `mode` given what the kernel offers; says why. Only
/// `--dataplane kernel` on a kernel without ipip is an error.
pub fn choose(mode: DataplaneMode, ipip: &IpipSupport) -> Result<Choice, String> {
    let how = match ipip {
        IpipSupport::Present => "the kernel has the ipip module",
        IpipSupport::Modprobed => "loaded the kernel's ipip module with modprobe",
        IpipSupport::Autoloaded => "the kernel loaded its ipip module when asked for an ipip link",
        IpipSupport::Unavailable(_) => "",
    };
    let choice = |backend, code, why: String| Ok(Choice { mode, backend, code, why });
    match (mode, ipip) {
        (DataplaneMode::Tun, _) => choice(Backend::Tun, "requested", "--dataplane tun".into()),
        (DataplaneMode::Kernel, IpipSupport::Unavailable(why)) => Err(format!(
            "--dataplane kernel needs the kernel's ipip module, which cannot be loaded here ({why}); \
             use --dataplane tun (or auto)"
        )),
        (DataplaneMode::Kernel, _) => choice(Backend::Kernel, "requested", format!("--dataplane kernel; {how}")),
        (DataplaneMode::Auto, IpipSupport::Unavailable(why)) => choice(
            Backend::Tun,
            "ipip_unavailable",
            format!("auto: the kernel's ipip module cannot be loaded ({why}); using the userspace TUN forwarder"),
        ),
        (DataplaneMode::Auto, IpipSupport::Present) => choice(Backend::Kernel, "ipip_loaded", format!("auto: {how}")),
        (DataplaneMode::Auto, IpipSupport::Modprobed) => {
            choice(Backend::Kernel, "ipip_modprobed", format!("auto: {how}"))
        }
        (DataplaneMode::Auto, IpipSupport::Autoloaded) => {
            choice(Backend::Kernel, "ipip_autoloaded", format!("auto: {how}"))
        }
    }
}

/// Finds out whether the kernel has ipip, loading it if it can: `/sys/module/ipip`, then
/// `modprobe ipip`, then a netlink request for an ipip link (the kernel autoloads the module
/// through its own helper — that works where the agent has no `modprobe`, e.g. in a container).
pub async fn probe_ipip(kernel: &Kernel) -> IpipSupport {
    let modprobe = match victor_dataplane::kernel::load_module("ipip") {
        ModuleLoad::Present => return IpipSupport::Present,
        ModuleLoad::Loaded => return IpipSupport::Modprobed,
        ModuleLoad::Unavailable(why) => why,
    };
    let asked = request_ipip_link(kernel).await;
    if victor_dataplane::kernel::ipip_available() {
        return IpipSupport::Autoloaded;
    }
    let netlink = match asked {
        Ok(()) => "created, yet /sys/module/ipip is missing".to_owned(),
        Err(e) => e,
    };
    IpipSupport::Unavailable(format!("{modprobe}; netlink request for an ipip link: {netlink}"))
}

/// Asks the kernel for a throwaway ipip link (loopback addresses no packet carries) and removes
/// it again.
async fn request_ipip_link(kernel: &Kernel) -> Result<(), String> {
    const NAME: &str = "victor-probe";
    let msg = LinkIpIp::new(NAME).local(Ipv4Addr::new(127, 0, 0, 2)).remote(Ipv4Addr::new(127, 0, 0, 3)).build();
    let result = kernel.handle().link().add(msg).execute().await.map_err(|e| e.to_string());
    if let Ok(Some(dev)) = kernel::devices::by_name(kernel.handle(), NAME).await {
        let _ = kernel::devices::delete(kernel.handle(), dev.index, NAME).await;
    }
    result
}

/// Chooses the backend for `mode` (probing and loading ipip unless `tun` was asked for), starts
/// it and routes the mobile prefixes into it. In `auto` mode a kernel data plane that fails to
/// start is removed again and the userspace one runs instead, saying why.
pub async fn start(mode: DataplaneMode, config: &DataplaneConfig, kernel: &Kernel) -> Result<(Dataplane, Choice)> {
    if let Some(choice) = ipv6_choice(mode, &config.prefixes6) {
        let choice = choice.map_err(anyhow::Error::msg)?;
        return Ok((start_tun(config, kernel).await?, choice));
    }
    let choice = match mode {
        DataplaneMode::Tun => choose(mode, &IpipSupport::Unavailable("not probed".into())),
        _ => choose(mode, &probe_ipip(kernel).await),
    }
    .map_err(anyhow::Error::msg)?;
    if choice.backend == Backend::Kernel {
        // A userspace data plane's standby and persistent TUN device (it has the catch-all's name).
        retire_standby(&config.device).await;
        if tun::remove(&config.device)? {
            tracing::info!(tun = %config.device, "removed the TUN device a userspace data plane left in this namespace");
        }
        match KernelPlane::start(config, kernel).await {
            Ok(plane) => return Ok((Dataplane::Kernel(plane), choice)),
            Err(err) if mode == DataplaneMode::Auto => {
                let fallback = Choice {
                    mode,
                    backend: Backend::Tun,
                    code: "kernel_failed",
                    why: format!(
                        "auto: the kernel data plane could not start ({err}); using the userspace TUN forwarder"
                    ),
                };
                tracing::warn!(error = %err, "kernel data plane failed to start; falling back to the userspace forwarder");
                return Ok((start_tun(config, kernel).await?, fallback));
            }
            Err(err) => return Err(err).context("start the kernel data plane (--dataplane kernel)"),
        }
    }
    Ok((start_tun(config, kernel).await?, choice))
}

/// Starts the userspace backend after removing what a kernel data plane left here (it would
/// otherwise keep forwarding beside it).
async fn start_tun(config: &DataplaneConfig, kernel: &Kernel) -> Result<Dataplane> {
    let removed = kernel::remove_leftovers(kernel).await.context("remove the devices of a kernel data plane")?;
    if removed > 0 {
        tracing::info!(removed, "removed the devices a kernel data plane left in this namespace");
    }
    let plane = TunPlane::start(config, kernel).await?;
    if !config.prefixes6.is_empty() {
        let tun = kernel
            .link_by_name(&config.device)
            .await?
            .with_context(|| format!("the TUN device {} vanished", config.device))?;
        for net in &config.prefixes6 {
            kernel.replace_prefix_route6(*net, tun.index).await?;
        }
    }
    // This run forwards now: the standby of the previous one (if any) stops.
    retire_standby(&config.device).await;
    Ok(Dataplane::Tun(plane))
}

/// The backend when IPv6 mobile prefixes are configured (None: there are none, choose as usual):
/// the kernel backend has no `sit` devices yet, so `kernel` is refused and `auto` runs the
/// userspace forwarder (which carries IPv6 as 6in4).
pub fn ipv6_choice(mode: DataplaneMode, prefixes6: &[Ipv6Net]) -> Option<Result<Choice, String>> {
    let first = prefixes6.first()?;
    Some(match mode {
        DataplaneMode::Kernel => Err(format!(
            "--dataplane kernel does not carry IPv6 VMs yet (no sit tunnel devices), but --mobile-prefix {first} is              IPv6; use --dataplane tun (or auto), whose userspace forwarder carries IPv6 as 6in4"
        )),
        DataplaneMode::Auto => Ok(Choice {
            mode,
            backend: Backend::Tun,
            code: "ipv6_prefixes",
            why: format!(
                "auto: --mobile-prefix {first} is IPv6, which only the userspace forwarder carries (6in4); using it"
            ),
        }),
        DataplaneMode::Tun => {
            Ok(Choice { mode, backend: Backend::Tun, code: "requested", why: "--dataplane tun".into() })
        }
    })
}

/// Stops the standby forwarder a previous run left for `device`, if any (see [`standby`]).
async fn retire_standby(device: &str) {
    match standby::retire(device, std::time::Duration::from_secs(2)).await {
        Ok(true) => tracing::info!(tun = %device, "retired the standby forwarder of the previous run"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(tun = %device, error = %e, "could not retire the standby forwarder of the previous run")
        }
    }
}

/// Removes everything a data plane of this agent left in the namespace (`--remove-dataplane-on-exit`,
/// when the FE is decommissioned): the userspace backend's persistent TUN device (with its
/// routes and records) or the kernel backend's devices (with theirs), then every other route and
/// neighbour entry carrying our protocol (local VMs' host routes and neighbours). Returns how many
/// devices it removed.
pub async fn remove_all(config: &DataplaneConfig, kernel: &Kernel) -> Result<usize> {
    let mut removed = usize::from(tun::remove(&config.device)?);
    removed += kernel::remove_leftovers(kernel).await?;
    for r in kernel.our_routes().await? {
        if r.dst.prefix_len() == r.dst.max_prefix_len() && r.oif != 0 {
            kernel.del_host_route(r.dst.addr(), r.oif).await?;
        }
    }
    for n in kernel.our_neighbours().await? {
        kernel.del_neighbour(n.ip, n.ifindex).await?;
    }
    Ok(removed)
}

/// What the data plane does with one VM IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// Nothing (packets are dropped).
    None,
    /// Delivered locally (the data plane leaves it to the kernel's /32).
    Local,
    /// Encapsulated to this underlay address (IPv6 VMs too: 6in4 over the IPv4 underlay).
    Remote(Ipv4Addr),
}

/// How to start the data plane.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// This FE's underlay address.
    pub underlay: Ipv4Addr,
    /// Underlay MTU.
    pub underlay_mtu: u16,
    /// The TUN device's name (userspace) or the catch-all ipip device's (kernel).
    pub device: String,
    /// Mobile prefixes routed into the data plane.
    pub prefixes: Vec<Ipv4Net>,
    /// IPv6 mobile prefixes routed into the data plane (userspace backend only).
    pub prefixes6: Vec<Ipv6Net>,
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
    pub fn tunnel(&self, ip: IpAddr) -> Tunnel {
        match self {
            Dataplane::Tun(plane) => plane.tunnel(ip),
            Dataplane::Kernel(plane) => plane.tunnel(ip),
        }
    }

    /// Remote VMs the data plane has an entry for (both backends adopt those a previous run
    /// left: the kernel backend's routes and the userspace one's records outlive the agent).
    pub fn tunnel_ips(&self) -> Vec<IpAddr> {
        match self {
            Dataplane::Tun(plane) => plane.tunnel_ips(),
            Dataplane::Kernel(plane) => plane.tunnel_ips(),
        }
    }

    /// Sets the data-plane entry of `ip`.
    pub async fn set_tunnel(&mut self, kernel: &Kernel, ip: IpAddr, tunnel: Tunnel) -> Result<()> {
        match self {
            Dataplane::Tun(plane) => Ok(plane.set_tunnel(kernel, ip, tunnel).await?),
            Dataplane::Kernel(plane) => Ok(plane.set_tunnel(kernel, ip, tunnel).await?),
        }
    }

    /// Replaces the set of FEs whose tunnel packets are accepted.
    pub async fn set_peers(&mut self, kernel: &Kernel, peers: &[Ipv4Addr]) -> Result<PeerChanges> {
        match self {
            Dataplane::Tun(plane) => {
                plane.set_peers(kernel, peers).await?;
                Ok(PeerChanges::default())
            }
            Dataplane::Kernel(plane) => Ok(plane.set_peers(kernel, peers).await?),
        }
    }

    /// Forwarder counters (userspace backend).
    pub fn counters(&self) -> Option<CounterSnapshot> {
        match self {
            Dataplane::Tun(plane) => Some(plane.counters()),
            Dataplane::Kernel(_) => None,
        }
    }

    /// Live counters handle (for /metrics; userspace backend).
    pub fn counters_handle(&self) -> Option<Arc<Counters>> {
        match self {
            Dataplane::Tun(plane) => Some(plane.counters_handle()),
            Dataplane::Kernel(_) => None,
        }
    }

    /// The userspace forwarder's hand-over to a standby (None: the kernel backend).
    pub fn hand_over_handle(&self) -> Option<HandOver> {
        match self {
            Dataplane::Tun(plane) => Some(plane.hand_over_handle()),
            Dataplane::Kernel(_) => None,
        }
    }

    /// The kernel devices' counters (for /metrics; kernel backend).
    pub fn kernel_counters(&self) -> Option<Arc<KernelCounters>> {
        match self {
            Dataplane::Tun(_) => None,
            Dataplane::Kernel(plane) => Some(plane.counters()),
        }
    }

    /// False once the userspace forwarder has died (the kernel's forwards without us).
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
        let missing = IpipSupport::Unavailable("modprobe: FATAL: Module ipip not found".into());
        let auto = choose(DataplaneMode::Auto, &missing).unwrap();
        assert_eq!((auto.backend, auto.code), (Backend::Tun, "ipip_unavailable"));
        assert!(auto.why.contains("cannot be loaded") && auto.why.contains("Module ipip not found"), "{}", auto.why);
        for (support, code) in [
            (IpipSupport::Present, "ipip_loaded"),
            (IpipSupport::Modprobed, "ipip_modprobed"),
            (IpipSupport::Autoloaded, "ipip_autoloaded"),
        ] {
            let c = choose(DataplaneMode::Auto, &support).unwrap();
            assert_eq!((c.backend, c.code), (Backend::Kernel, code));
            assert!(c.describe().starts_with("kernel (auto: "), "{}", c.describe());
        }
        assert_eq!(choose(DataplaneMode::Tun, &IpipSupport::Present).unwrap().backend, Backend::Tun);
        let kernel = choose(DataplaneMode::Kernel, &IpipSupport::Modprobed).unwrap();
        assert_eq!((kernel.backend, kernel.code), (Backend::Kernel, "requested"));
        let err = choose(DataplaneMode::Kernel, &missing).unwrap_err();
        assert!(err.contains("ipip module") && err.contains("--dataplane tun") && err.contains("not found"), "{err}");
    }

    #[test]
    fn ipv6_prefixes_need_the_userspace_forwarder() {
        assert!(ipv6_choice(DataplaneMode::Kernel, &[]).is_none(), "IPv4 only: the usual choice");
        let v6: Vec<Ipv6Net> = vec!["fd00:10::/64".parse().unwrap()];
        let err = ipv6_choice(DataplaneMode::Kernel, &v6).unwrap().unwrap_err();
        assert!(err.contains("fd00:10::/64") && err.contains("--dataplane tun"), "{err}");
        let auto = ipv6_choice(DataplaneMode::Auto, &v6).unwrap().unwrap();
        assert_eq!((auto.backend, auto.code), (Backend::Tun, "ipv6_prefixes"));
        assert_eq!(ipv6_choice(DataplaneMode::Tun, &v6).unwrap().unwrap().backend, Backend::Tun);
    }
}
