//! Test harness shared by every crate's integration tests and by `victor-lab`.
//!
//! Everything here owns real resources and releases them on drop, also when a test panics:
//! * [`controller`] — `victor-controller` replicas as processes (one builder for every rig);
//! * [`process::ChildGuard`] — a child process killed (by PID, with its process group) on drop;
//! * [`etcd::EtcdCluster`] — a real etcd 1- or 3-member cluster on loopback, temp data dirs;
//! * [`netns`] — network namespaces and veth links with unique names, deleted on drop;
//! * [`ports`] / [`unique_name`] — collision-free ports and names so parallel runs never clash;
//! * [`pki`] — a throw-away CA issuing server, FE and operator certificates (rcgen);
//! * [`http`] — a minimal GET for the daemons' admin ports.

pub mod controller;
pub mod etcd;
pub mod http;
pub mod netns;
pub mod pki;
pub mod ports;
pub mod process;

use std::sync::atomic::{AtomicU32, Ordering};

/// A short name unique to this process and call, e.g. `vt3f2a1`: `prefix` + pid + counter in hex,
/// at most 15 bytes so it is a valid interface name. Namespaces and links use it so two test runs
/// (or two tests in one run) never collide.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let name = format!("{prefix}{:x}{:x}", pid & 0xfffff, n);
    assert!(name.len() <= 15, "unique_name({prefix:?}) = {name:?} is longer than 15 bytes; use a shorter prefix");
    name
}

/// True when running as root (netns and raw-socket tests need it). Tests that need root and do not
/// have it fail with a clear message rather than silently passing.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Panics with a clear message unless running as root.
pub fn require_root(what: &str) {
    assert!(is_root(), "{what} needs root (network namespaces, raw sockets); run the test suite as root (CI does)");
}

/// True inside the VM runner's guest (tests/vm/run) when it is emulated in software (TCG): one
/// vCPU running about ten times slower than the host, and slower still when the host is busy, so
/// a test bounds only what does not depend on time there (and prints the times).
pub fn in_emulated_guest() -> bool {
    std::env::var("VICTOR_TEST_GUEST_ACCEL").is_ok_and(|accel| accel == "tcg")
}

/// Path of a workspace binary built by cargo (e.g. `victor-controller`), for tests that spawn
/// daemons. Looks next to the test executable's target dir (`target/<profile>/`).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>  →  target/<profile>/<name>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.exists(), "binary {} not found; build it first (cargo build --workspace --bins)", path.display());
    path
}
