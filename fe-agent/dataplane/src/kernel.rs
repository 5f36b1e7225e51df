//! Does the kernel offer IP-in-IP and 6in4 tunnels itself, and can their modules be loaded? The
//! agent uses kernel `ipip` and `sit` links where they exist and this crate's userspace
//! [`crate::forwarder::Forwarder`] otherwise; `--dataplane auto` first tries to load the modules
//! ([`load_module`]: `ipip`, then `sit`), as distribution kernels ship both as modules that
//! nothing loads until a tunnel is configured.

use std::path::Path;
use std::process::Command;

/// True if the kernel's `ipip` module is loaded or built in (`/sys/module/ipip` exists; the
/// module has parameters, so it shows there even when built in). Does not load modules.
pub fn ipip_available() -> bool {
    ipip_available_in(Path::new("/sys/module"))
}

/// [`ipip_available`] against another sysfs module directory (for tests).
pub fn ipip_available_in(sys_module: &Path) -> bool {
    module_present_in(sys_module, "ipip")
}

/// True if module `name` is loaded or built in (`<sys_module>/<name>` exists).
pub fn module_present_in(sys_module: &Path, name: &str) -> bool {
    sys_module.join(name).is_dir()
}

/// What [`load_module`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleLoad {
    /// Loaded (or built in) before we asked.
    Present,
    /// Loaded now, by `modprobe`.
    Loaded,
    /// Not there and `modprobe` could not load it: why (modprobe's own words when it ran).
    Unavailable(String),
}

impl ModuleLoad {
    /// True unless [`ModuleLoad::Unavailable`].
    pub fn is_available(&self) -> bool {
        !matches!(self, ModuleLoad::Unavailable(_))
    }
}

/// Makes sure kernel module `name` is there: present in `/sys/module`, else `modprobe NAME`
/// (found on `PATH`, `/sbin` or `/usr/sbin`). Needs CAP_SYS_MODULE to load anything. A kernel
/// can also load tunnel modules by itself when asked for a link of that kind through netlink
/// (its module helper runs on the host, so that also works where no `modprobe` is installed,
/// e.g. in a container); the agent tries that next.
pub fn load_module(name: &str) -> ModuleLoad {
    load_module_in(Path::new("/sys/module"), name)
}

/// [`load_module`] against another sysfs module directory (for tests).
pub fn load_module_in(sys_module: &Path, name: &str) -> ModuleLoad {
    if module_present_in(sys_module, name) {
        return ModuleLoad::Present;
    }
    let Some(modprobe) = find_modprobe() else {
        return ModuleLoad::Unavailable("no modprobe on PATH, /sbin or /usr/sbin".into());
    };
    match Command::new(&modprobe).arg(name).output() {
        Ok(out) if out.status.success() && module_present_in(sys_module, name) => ModuleLoad::Loaded,
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr);
            let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            ModuleLoad::Unavailable(format!("`{} {name}` failed ({}): {said}", modprobe.display(), out.status))
        }
        Err(e) => ModuleLoad::Unavailable(format!("cannot run {}: {e}", modprobe.display())),
    }
}

fn find_modprobe() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin"].map(std::path::PathBuf::from))
        .map(|dir| dir.join("modprobe"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("victor-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn probes_the_module_directory() {
        let dir = scratch("ipip-probe");
        assert!(!ipip_available_in(&dir));
        std::fs::create_dir(dir.join("ipip")).unwrap();
        assert!(ipip_available_in(&dir));
        assert_eq!(load_module_in(&dir, "ipip"), ModuleLoad::Present);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A module no kernel has: unavailable, with modprobe's words (or why modprobe did not run).
    #[test]
    fn a_module_that_does_not_exist_is_unavailable_and_says_why() {
        let dir = scratch("modprobe");
        let load = load_module_in(&dir, "victor-no-such-module");
        let ModuleLoad::Unavailable(why) = &load else { panic!("{load:?}") };
        assert!(why.contains("victor-no-such-module") || why.contains("modprobe"), "{why}");
        assert!(!load.is_available());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
