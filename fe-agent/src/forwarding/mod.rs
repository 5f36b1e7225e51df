//! The IP-in-IP data plane behind the reconciler — which backend forwards and why ([`start`],
//! [`choose`]), and each VM IP's entry in it ([`Tunnel`]):
//!
//! * **Userspace** ([`tun`]): the `victor_dataplane` crate's forwarder on a persistent TUN device.
//!   The mobile prefixes are routed into the TUN device (proto = ours); the forwarding table says
//!   per VM IP Local / Remote(peer) / nothing (drop); tunnel packets are accepted only from the
//!   registered FEs' underlay addresses ([`Dataplane::set_peers`]). The device, its routes and a
//!   record of the forwarding table stay in the kernel across agent restarts and are adopted by
//!   the next run; while no agent runs, its standby forwarder ([`standby`]) forwards.
//! * **Kernel** ([`kernel`], needs the `ipip` and `sit` modules): per registered FE one
//!   point-to-point ipip device and one `sit` device, and a /32 (IPv6: /128) route per remote VM
//!   through the one of its family; the kernel decapsulates only what matches a device, so only
//!   registered FEs' packets get in (the catch-all devices count and drop the rest); the mobile
//!   prefixes go to a dummy device that drops and counts. Everything stays in the kernel across
//!   agent restarts (forwarding goes on while the agent is down) and is adopted by the next run.
//!
//! IPv6 VMs (/128 bindings) are carried over the IPv4 underlay as 6in4 (IP protocol 41, RFC 4213)
//! by both backends: the userspace forwarder encapsulates itself and routes the IPv6 mobile
//! prefixes into its TUN device; the kernel backend uses the kernel's `sit` driver.
//!
//! `--dataplane auto` runs the kernel backend when both the `ipip` and the `sit` module are there
//! or can be loaded (each: `modprobe`, then the kernel's own module autoload through a netlink
//! request), else the userspace one ([`choose`]); `--dataplane kernel` needs `ipip`, and `sit`
//! too when an IPv6 mobile prefix is configured (without one and without `sit`, IPv6 VMs behind
//! other FEs are refused). The choice and its reason go to the log, `/readyz` and
//! `victor_agent_dataplane_choice`.

pub mod death;
pub mod kernel;
pub mod records;
pub mod standby;
pub mod tun;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::ValueEnum;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::{LinkIpIp, LinkSit};
use serde::Serialize;
use victor_dataplane::counters::{CounterSnapshot, Counters};
use victor_dataplane::fib::Fib;
use victor_dataplane::forwarder::{HandOver, HandedOn};
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
    /// The kernel's ipip and sit drivers when the kernel has them or can load them, else the
    /// userspace TUN forwarder.
    Auto,
    /// The userspace forwarder on a TUN device.
    Tun,
    /// The kernel's ipip and sit drivers: tunnel devices per registered FE (needs the kernel's
    /// ipip module, and sit with IPv6 mobile prefixes; loaded if possible).
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
    /// Kernel ipip and sit, devices per registered FE.
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

/// Whether one of the kernel's tunnel modules is there, and how we know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSupport {
    /// Loaded or built in already.
    Present,
    /// Loaded now with `modprobe`.
    Modprobed,
    /// Loaded now by the kernel itself, asked for a link of its kind through netlink.
    Autoloaded,
    /// Cannot be had: why.
    Unavailable(String),
}

impl ModuleSupport {
    fn is_available(&self) -> bool {
        !matches!(self, ModuleSupport::Unavailable(_))
    }

    /// How we know it is there (`module` is its name), for the choice's reason.
    fn how(&self, module: &str) -> String {
        match self {
            ModuleSupport::Present => format!("the kernel has the {module} module"),
            ModuleSupport::Modprobed => format!("loaded the kernel's {module} module with modprobe"),
            ModuleSupport::Autoloaded => {
                let article = if module.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
                format!("the kernel loaded its {module} module when asked for {article} {module} link")
            }
            ModuleSupport::Unavailable(why) => format!("the kernel's {module} module cannot be loaded ({why})"),
        }
    }
}

/// What the kernel offers the kernel backend: the `ipip` module (IPv4 VMs) and the `sit` module
/// (IPv6 VMs, 6in4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSupport {
    /// The `ipip` module.
    pub ipip: ModuleSupport,
    /// The `sit` module.
    pub sit: ModuleSupport,
}

impl KernelSupport {
    /// Neither module (what `--dataplane tun` assumes without probing).
    pub fn unprobed() -> KernelSupport {
        let no = || ModuleSupport::Unavailable("not probed".into());
        KernelSupport { ipip: no(), sit: no() }
    }
}

/// The backend chosen: what was asked for, what runs and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// What `--dataplane` said.
    pub mode: DataplaneMode,
    /// What runs.
    pub backend: Backend,
    /// Why, as a short code (a metric label): `requested`, `ipip_loaded`, `ipip_modprobed`,
    /// `ipip_autoloaded` (auto, kernel: how ipip came; sit came too), `ipip_unavailable`,
    /// `sit_unavailable` (auto, tun), `kernel_failed`.
    pub code: &'static str,
    /// Why, in words (log, `/readyz`).
    pub why: String,
    /// The kernel backend carries IPv6 VMs (the `sit` module is there).
    pub sit: bool,
}

impl Choice {
    /// `kernel (auto: ...)`, for `/readyz`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.backend.label(), self.why)
    }
}

/// Picks the backend for `mode` given what the kernel offers and the first IPv6 mobile prefix
/// (if any); says why. `auto` runs the kernel backend only with both modules;
/// `--dataplane kernel` needs ipip, and sit too with an IPv6 mobile prefix (that is the only
/// error).
pub fn choose(mode: DataplaneMode, support: &KernelSupport, prefix6: Option<&Ipv6Net>) -> Result<Choice, String> {
    let sit = support.sit.is_available();
    let choice = |backend, code, why: String| Ok(Choice { mode, backend, code, why, sit });
    let both = || format!("{}; {}", support.ipip.how("ipip"), support.sit.how("sit"));
    match (mode, &support.ipip) {
        (DataplaneMode::Tun, _) => choice(Backend::Tun, "requested", "--dataplane tun".into()),
        (DataplaneMode::Kernel, ModuleSupport::Unavailable(why)) => Err(format!(
            "--dataplane kernel needs the kernel's ipip module, which cannot be loaded here ({why}); \
             use --dataplane tun (or auto)"
        )),
        (DataplaneMode::Kernel, _) => match (&support.sit, prefix6) {
            (ModuleSupport::Unavailable(why), Some(prefix)) => Err(format!(
                "--dataplane kernel carries IPv6 VMs (--mobile-prefix {prefix}) through the kernel's sit module \
                 (6in4), which cannot be loaded here ({why}); use --dataplane tun (or auto), whose userspace \
                 forwarder carries IPv6 as 6in4"
            )),
            (ModuleSupport::Unavailable(_), None) => choice(
                Backend::Kernel,
                "requested",
                format!("--dataplane kernel; {} (IPv4 only: IPv6 VMs behind other FEs are refused)", both()),
            ),
            _ => choice(Backend::Kernel, "requested", format!("--dataplane kernel; {}", both())),
        },
        (DataplaneMode::Auto, ModuleSupport::Unavailable(why)) => choice(
            Backend::Tun,
            "ipip_unavailable",
            format!("auto: the kernel's ipip module cannot be loaded ({why}); using the userspace TUN forwarder"),
        ),
        (DataplaneMode::Auto, _) if !sit => choice(
            Backend::Tun,
            "sit_unavailable",
            format!(
                "auto: {} (IPv6 VMs need it); using the userspace TUN forwarder, which carries both families",
                support.sit.how("sit")
            ),
        ),
        (DataplaneMode::Auto, ipip) => {
            let code = match ipip {
                ModuleSupport::Modprobed => "ipip_modprobed",
                ModuleSupport::Autoloaded => "ipip_autoloaded",
                _ => "ipip_loaded",
            };
            choice(Backend::Kernel, code, format!("auto: {}", both()))
        }
    }
}

/// Finds out whether the kernel has the `ipip` and `sit` modules, loading them if it can.
pub async fn probe_kernel(kernel: &Kernel) -> KernelSupport {
    KernelSupport { ipip: probe_module(kernel, "ipip").await, sit: probe_module(kernel, "sit").await }
}

/// Whether the kernel has `module` (`ipip` or `sit`), loading it if it can: `/sys/module/<name>`,
/// then `modprobe`, then a netlink request for a link of that kind (the kernel autoloads the
/// module through its own helper — that works where the agent has no `modprobe`, e.g. in a
/// container).
async fn probe_module(kernel: &Kernel, module: &str) -> ModuleSupport {
    let modprobe = match victor_dataplane::kernel::load_module(module) {
        ModuleLoad::Present => return ModuleSupport::Present,
        ModuleLoad::Loaded => return ModuleSupport::Modprobed,
        ModuleLoad::Unavailable(why) => why,
    };
    let asked = request_link(kernel, module).await;
    if victor_dataplane::kernel::module_present_in(std::path::Path::new("/sys/module"), module) {
        return ModuleSupport::Autoloaded;
    }
    let netlink = match asked {
        Ok(()) => format!("created, yet /sys/module/{module} is missing"),
        Err(e) => e,
    };
    ModuleSupport::Unavailable(format!("{modprobe}; netlink request for a {module} link: {netlink}"))
}

/// Asks the kernel for a throwaway link of kind `module` (loopback addresses no packet carries)
/// and removes it again.
async fn request_link(kernel: &Kernel, module: &str) -> Result<(), String> {
    const NAME: &str = "victor-probe";
    let (local, remote) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let msg = match module {
        "sit" => LinkSit::new(NAME).local(local).remote(remote).build(),
        _ => LinkIpIp::new(NAME).local(local).remote(remote).build(),
    };
    let result = kernel.handle().link().add(msg).execute().await.map_err(|e| e.to_string());
    if let Ok(Some(dev)) = kernel::devices::by_name(kernel.handle(), NAME).await {
        let _ = kernel::devices::delete(kernel.handle(), dev.index, NAME).await;
    }
    result
}

/// Chooses the backend for `mode` (probing and loading ipip and sit unless `tun` was asked for),
/// starts it and routes the mobile prefixes into it. In `auto` mode a kernel data plane that
/// fails to start is removed again and the userspace one runs instead, saying why.
pub async fn start(mode: DataplaneMode, config: &DataplaneConfig, kernel: &Kernel) -> Result<(Dataplane, Choice)> {
    let support = match mode {
        DataplaneMode::Tun => KernelSupport::unprobed(),
        _ => probe_kernel(kernel).await,
    };
    let choice = choose(mode, &support, config.prefixes6.first()).map_err(anyhow::Error::msg)?;
    if choice.backend == Backend::Kernel {
        // A userspace data plane's standby and persistent TUN device (it has the catch-all's name).
        retire_standby(&config.device).await;
        if tun::remove(&config.device)? {
            tracing::info!(tun = %config.device, "removed the TUN device a userspace data plane left in this namespace");
        }
        match KernelPlane::start(config, kernel, choice.sit).await {
            Ok(plane) => return Ok((Dataplane::Kernel(plane), choice)),
            Err(err) if mode == DataplaneMode::Auto => {
                let fallback = Choice {
                    mode,
                    backend: Backend::Tun,
                    code: "kernel_failed",
                    why: format!(
                        "auto: the kernel data plane could not start ({err}); using the userspace TUN forwarder"
                    ),
                    sit: false,
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
    // The standby of the previous run (if any) forwards: we start on its TUN queues and sockets.
    let (predecessor, handed) = match standby::predecessor(&config.device).await {
        Ok(Some((predecessor, handed))) => (Some(predecessor), handed),
        Ok(None) => (None, HandedOn::default()),
        Err(e) => {
            tracing::warn!(tun = %config.device, error = %e, "could not ask the standby of the previous run for its TUN queues");
            (None, HandedOn::default())
        }
    };
    let plane = TunPlane::start(config, kernel, tun::Takeover { handed, prepared: None }).await?;
    // This run forwards now: the standby of the previous one (if any) stops.
    match predecessor {
        Some(predecessor) => match predecessor.retire(std::time::Duration::from_secs(2)).await {
            Ok(()) => {
                tracing::info!(tun = %config.device, "retired the standby forwarder of the previous run (we forward on its queues)")
            }
            Err(e) => {
                tracing::warn!(tun = %config.device, error = %e, "could not retire the standby forwarder of the previous run")
            }
        },
        None => retire_standby(&config.device).await,
    }
    Ok(Dataplane::Tun(plane))
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
    /// IPv6 mobile prefixes routed into the data plane.
    pub prefixes6: Vec<Ipv6Net>,
}

impl DataplaneConfig {
    /// The mobile prefixes of both families.
    pub fn all_prefixes(&self) -> Vec<ipnet::IpNet> {
        let v4 = self.prefixes.iter().map(|n| ipnet::IpNet::V4(*n));
        v4.chain(self.prefixes6.iter().map(|n| ipnet::IpNet::V6(*n))).collect()
    }
}

/// A running data plane.
#[derive(Debug)]
pub enum Dataplane {
    /// Userspace.
    Tun(TunPlane),
    /// Kernel ipip and sit.
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

    /// Where the data plane relays `ip`'s packets during an announced migration (userspace
    /// backend; always None for the kernel backend, which has no relay).
    pub fn migration(&self, ip: IpAddr) -> Option<Ipv4Addr> {
        self.fib().and_then(|fib| fib.migrations().target(ip))
    }

    /// VMs with an announced migration in the data plane (to sweep after a snapshot).
    pub fn migration_ips(&self) -> Vec<IpAddr> {
        self.fib().map(|fib| fib.migrations().targets().into_iter().map(|(ip, _)| ip).collect()).unwrap_or_default()
    }

    /// Announces (Some: the announced FE's underlay address) or withdraws `ip`'s migration: the
    /// userspace forwarder relays the VM's packets to that FE meanwhile
    /// (`victor_dataplane::migration`). The kernel backend has no relay: it says so once, at
    /// info, and does nothing.
    pub fn set_migration(&self, ip: IpAddr, to: Option<Ipv4Addr>) {
        match self {
            Dataplane::Tun(plane) => plane.fib().migrations().set_target(ip, to),
            Dataplane::Kernel(_) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                if to.is_some() {
                    SAID.call_once(|| {
                        tracing::info!(
                            vm_ip = %ip,
                            "migration announced: relaying a migrating VM's packets needs the userspace data plane (--dataplane tun); the kernel backend forwards as without an announcement"
                        );
                    });
                }
            }
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

    /// Duplicates of the userspace forwarder's TUN queues and underlay sockets, for its standby
    /// (none: the kernel backend).
    pub fn handed_on(&self) -> std::io::Result<HandedOn> {
        match self {
            Dataplane::Tun(plane) => plane.handed_on(),
            Dataplane::Kernel(_) => Ok(HandedOn::default()),
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
        let missing = |m: &str| ModuleSupport::Unavailable(format!("modprobe: FATAL: Module {m} not found"));
        let support = |ipip, sit| KernelSupport { ipip, sit };
        let none = support(missing("ipip"), missing("sit"));
        let auto = choose(DataplaneMode::Auto, &none, None).unwrap();
        assert_eq!((auto.backend, auto.code), (Backend::Tun, "ipip_unavailable"));
        assert!(auto.why.contains("cannot be loaded") && auto.why.contains("Module ipip not found"), "{}", auto.why);
        for (ipip, code) in [
            (ModuleSupport::Present, "ipip_loaded"),
            (ModuleSupport::Modprobed, "ipip_modprobed"),
            (ModuleSupport::Autoloaded, "ipip_autoloaded"),
        ] {
            let c = choose(DataplaneMode::Auto, &support(ipip, ModuleSupport::Modprobed), None).unwrap();
            assert_eq!((c.backend, c.code, c.sit), (Backend::Kernel, code, true));
            assert!(c.describe().starts_with("kernel (auto: ") && c.why.contains("sit"), "{}", c.describe());
        }
        let autoloaded = KernelSupport { ipip: ModuleSupport::Autoloaded, sit: ModuleSupport::Autoloaded };
        let why = choose(DataplaneMode::Auto, &autoloaded, None).unwrap().why;
        assert!(why.contains("for an ipip link; ") && why.ends_with("for a sit link"), "{why}");
        let present = support(ModuleSupport::Present, ModuleSupport::Present);
        assert_eq!(choose(DataplaneMode::Tun, &present, None).unwrap().backend, Backend::Tun);
        let kernel = choose(DataplaneMode::Kernel, &support(ModuleSupport::Modprobed, ModuleSupport::Present), None);
        assert_eq!(kernel.map(|k| (k.backend, k.code, k.sit)), Ok((Backend::Kernel, "requested", true)));
        let err = choose(DataplaneMode::Kernel, &none, None).unwrap_err();
        assert!(err.contains("ipip module") && err.contains("--dataplane tun") && err.contains("not found"), "{err}");
    }

    /// auto runs the kernel backend only with both modules; --dataplane kernel needs sit only
    /// for IPv6 mobile prefixes (IPv4 alone runs without it, refusing remote IPv6 VMs).
    #[test]
    fn sit_is_needed_by_auto_and_by_kernel_with_ipv6_prefixes() {
        let no_sit = KernelSupport {
            ipip: ModuleSupport::Present,
            sit: ModuleSupport::Unavailable("modprobe: FATAL: Module sit not found".into()),
        };
        let v6: Ipv6Net = "fd00:10::/64".parse().unwrap();
        for prefix in [None, Some(&v6)] {
            let auto = choose(DataplaneMode::Auto, &no_sit, prefix).unwrap();
            assert_eq!((auto.backend, auto.code), (Backend::Tun, "sit_unavailable"));
            assert!(auto.why.contains("sit module cannot be loaded") && auto.why.contains("not found"), "{}", auto.why);
        }
        let err = choose(DataplaneMode::Kernel, &no_sit, Some(&v6)).unwrap_err();
        assert!(err.contains("fd00:10::/64") && err.contains("sit") && err.contains("--dataplane tun"), "{err}");
        let ipv4 = choose(DataplaneMode::Kernel, &no_sit, None).unwrap();
        assert_eq!((ipv4.backend, ipv4.sit), (Backend::Kernel, false));
        assert!(ipv4.why.contains("IPv4 only"), "{}", ipv4.why);
        let both = KernelSupport { ipip: ModuleSupport::Present, sit: ModuleSupport::Autoloaded };
        let kernel6 = choose(DataplaneMode::Kernel, &both, Some(&v6)).unwrap();
        assert_eq!((kernel6.backend, kernel6.sit), (Backend::Kernel, true));
        assert_eq!(choose(DataplaneMode::Tun, &no_sit, Some(&v6)).unwrap().backend, Backend::Tun);
    }
}
