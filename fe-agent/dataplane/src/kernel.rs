//! Does the kernel offer IP-in-IP tunnels itself? The agent uses kernel `ipip` links where they
//! exist and this crate's userspace [`crate::forwarder::Forwarder`] otherwise.

use std::path::Path;

/// True if the kernel's `ipip` module is loaded or built in (`/sys/module/ipip` exists; the
/// module has parameters, so it shows there even when built in). Does not load modules; a
/// kernel that could autoload it but has not yet reports false, which only costs the faster
/// path, never correctness.
pub fn ipip_available() -> bool {
    ipip_available_in(Path::new("/sys/module"))
}

/// [`ipip_available`] against another sysfs module directory (for tests).
pub fn ipip_available_in(sys_module: &Path) -> bool {
    sys_module.join("ipip").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_the_module_directory() {
        let dir = std::env::temp_dir().join(format!("victor-ipip-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!ipip_available_in(&dir));
        std::fs::create_dir(dir.join("ipip")).unwrap();
        assert!(ipip_available_in(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
