//! The QEMU guest of `victor-lab migrate --vm qemu`: its assets, built by `tests/vm/lab-guest`
//! with the VM runner's code (Debian's stock kernel and busybox-static from the archive, cached;
//! see tests/vm/README.md), and one QEMU process running it ([`QemuVm`]).
//!
//! The guest is one vCPU, a little memory, one NIC on a tap device of the namespace QEMU runs in,
//! a serial console to a file and a QMP socket: `-nodefaults`, no other device, never a user-mode
//! network. Its address comes from the kernel command line; a destination QEMU gets the same
//! command line plus `-incoming`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde::Serialize;
use victor_testkit::netns::NetNs;
use victor_testkit::process::ChildGuard;

use super::qmp::Qmp;

/// The guest's NIC (`--nic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Nic {
    /// virtio-net: the guest negotiates guest-announce and sends its own GARP (and unsolicited
    /// NA) after a migration, besides QEMU's RARP rounds.
    Virtio,
    /// e1000: the guest sends nothing after a migration; only QEMU's `announce-self` RARPs.
    E1000,
}

impl Nic {
    /// QEMU's device name.
    pub fn device(self) -> &'static str {
        match self {
            Nic::Virtio => "virtio-net-pci",
            Nic::E1000 => "e1000",
        }
    }

    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Nic::Virtio => "virtio",
            Nic::E1000 => "e1000",
        }
    }
}

/// The kernel and initramfs of the guest.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// The kernel image (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs (`-initrd`).
    pub initrd: PathBuf,
    /// The kernel package they come from (`linux-image-... version`).
    pub kernel_package: String,
}

/// Whether the guest can run here.
#[derive(Debug, Clone)]
pub enum Availability {
    /// It can.
    Ready(GuestAssets),
    /// It cannot; why (QEMU missing, no kernel to fetch, ...).
    Skipped(String),
}

/// The QEMU binary (`$VICTOR_VM_QEMU`, as the VM runner).
pub fn qemu_binary() -> String {
    std::env::var("VICTOR_VM_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// The accelerator: `$VICTOR_VM_ACCEL`, else `tcg` (`/dev/kvm` may exist without hardware
/// virtualisation, where a guest hangs; the VM runner's probe tells, see tests/vm/README.md).
pub fn accel() -> String {
    std::env::var("VICTOR_VM_ACCEL").unwrap_or_else(|_| "tcg".into())
}

impl GuestAssets {
    /// Fetches (cached) and builds the guest's assets with `tests/vm/lab-guest`.
    pub fn prepare() -> Result<Availability> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/lab-guest");
        if !script.exists() {
            return Ok(Availability::Skipped(format!("{} is not there (not a source checkout)", script.display())));
        }
        let out = std::process::Command::new("bash")
            .arg(&script)
            .env("VICTOR_VM_QEMU", qemu_binary())
            .output()
            .with_context(|| format!("run {}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(reason) = stdout.lines().find_map(|l| l.strip_prefix("SKIPPED: ")) {
            return Ok(Availability::Skipped(reason.to_owned()));
        }
        if !out.status.success() {
            bail!("{} failed ({}): {}", script.display(), out.status, String::from_utf8_lossy(&out.stderr));
        }
        let field = |k: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .with_context(|| format!("{} printed no {k}: {stdout}", script.display()))
        };
        Ok(Availability::Ready(GuestAssets {
            kernel: field("VM_KERNEL")?.into(),
            initrd: field("VM_INITRD")?.into(),
            kernel_package: format!("{} {}", field("VM_KPKG")?, field("VM_KPKG_VERSION")?),
        }))
    }
}

/// One guest's configuration (identical on a migration's source and destination).
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Kernel and initramfs.
    pub assets: GuestAssets,
    /// Its NIC.
    pub nic: Nic,
    /// Its MAC.
    pub mac: String,
    /// Its address and prefix length.
    pub ip: (Ipv4Addr, u8),
    /// Its default gateway.
    pub gateway: Ipv4Addr,
    /// Memory (MiB).
    pub memory_mb: u32,
}

impl GuestConfig {
    /// QEMU's command line for this guest on tap `tap`, with its QMP socket at `qmp` and its
    /// console in `console`; a destination waits for the migration stream on `incoming`.
    pub fn argv(&self, tap: &str, qmp: &Path, console: &Path, incoming: Option<SocketAddrV4>) -> Vec<String> {
        let accel = accel();
        let cpu = if accel == "kvm" { "host" } else { "max" };
        let (ip, len) = self.ip;
        let mut argv: Vec<String> = [
            qemu_binary().as_str(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-M",
            "pc",
            "-accel",
            &accel,
            "-cpu",
            cpu,
            "-smp",
            "1",
            "-m",
            &self.memory_mb.to_string(),
            "-kernel",
            &self.assets.kernel.to_string_lossy(),
            "-initrd",
            &self.assets.initrd.to_string_lossy(),
            "-append",
            &format!("console=ttyS0 quiet panic=-1 victor.ip={ip}/{len} victor.gw={}", self.gateway),
            "-chardev",
            &format!("file,id=con,path={}", console.display()),
            "-serial",
            "chardev:con",
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device",
            &format!("{},netdev=n0,mac={}", self.nic.device(), self.mac),
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        if let Some(addr) = incoming {
            argv.extend(["-incoming".to_owned(), format!("tcp:{addr}")]);
        }
        argv
    }
}

/// The niceness QEMU runs at (`nice -n`).
const QEMU_NICENESS: u8 = 10;

/// A QEMU process running (or waiting for) the guest in a namespace, with its QMP session.
/// Dropping it kills QEMU (by PID, through its [`ChildGuard`]).
pub struct QemuVm {
    /// The QMP session.
    pub qmp: Qmp,
    /// Its serial console.
    pub console: PathBuf,
    process: ChildGuard,
}

impl QemuVm {
    /// Starts QEMU in `ns` on tap `tap` (files named `<name>.*` in `dir`) and connects to its QMP
    /// socket.
    pub fn start(
        ns: &NetNs,
        name: &str,
        config: &GuestConfig,
        tap: &str,
        dir: &Path,
        incoming: Option<SocketAddrV4>,
    ) -> Result<QemuVm> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let console = dir.join(format!("{name}.console"));
        let _ = std::fs::remove_file(&qmp_path);
        // Below the FEs and the prober: on real hosts hypervisors and FEs are different machines;
        // here a TCG guest takes a whole core whenever it runs.
        let mut argv = vec!["nice".to_owned(), "-n".to_owned(), QEMU_NICENESS.to_string()];
        argv.extend(config.argv(tap, &qmp_path, &console, incoming));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut process = ns.spawn(name, &argv, Some(&dir.join(format!("{name}.log"))))?;
        let qmp = match Qmp::connect(&qmp_path, Duration::from_secs(20)) {
            Ok(q) => q,
            Err(e) => {
                let alive = process.is_running();
                bail!("{name}: {e} (QEMU {}): {}", if alive { "running" } else { "exited" }, process.log_tail(2000))
            }
        };
        Ok(QemuVm { qmp, console, process })
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits until the guest's console says `vm: ready` (its address is configured).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        super::probe::wait("the guest's `vm: ready`", timeout, || {
            std::fs::read_to_string(&self.console).is_ok_and(|c| c.contains("vm: ready"))
        })
        .with_context(|| {
            let console = std::fs::read_to_string(&self.console).unwrap_or_default();
            let tail: String = console.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
            format!("console {}: {tail}", self.console.display())
        })
    }

    /// Asks QEMU to quit and waits for it to exit (kills it if it does not within 10 s).
    pub fn quit(mut self) -> Result<()> {
        let _ = self.qmp.execute("quit", serde_json::Value::Null);
        let status = self.process.wait_exit(Duration::from_secs(10));
        if status.is_err() {
            self.process.kill();
        }
        status.map(drop).with_context(|| format!("QEMU {} did not quit", self.process.name()))
    }
}
