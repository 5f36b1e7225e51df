//! What `victor-lab up` leaves running, recorded so that `victor-lab down` can remove exactly that
//! (also after `up` crashed half-way: the record is written as resources are created).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Directory of lab records.
pub fn state_dir() -> PathBuf {
    PathBuf::from("/run/victor-lab")
}

/// One process the lab started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    /// What it is (controller1, agent2, etcd0, ...).
    pub role: String,
    /// Its PID.
    pub pid: u32,
    /// Its executable (checked before killing, so a recycled PID is never signalled).
    pub exe: PathBuf,
}

/// Everything a running lab owns.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabState {
    /// The lab's name.
    pub name: String,
    /// Namespaces, in creation order.
    pub namespaces: Vec<String>,
    /// Processes.
    pub processes: Vec<Process>,
    /// Directories to remove (logs, store, etcd data).
    pub dirs: Vec<PathBuf>,
}

impl LabState {
    /// The record file of lab `name`.
    pub fn path(name: &str) -> PathBuf {
        state_dir().join(format!("{name}.json"))
    }

    /// Writes the record (atomically).
    pub fn save(&self) -> Result<()> {
        std::fs::create_dir_all(state_dir())?;
        let path = Self::path(&self.name);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))
    }

    /// Reads the record of lab `name`, if any.
    pub fn load(name: &str) -> Result<Option<LabState>> {
        let path = Self::path(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Stops the processes (only if the PID still runs the recorded executable), deletes the
    /// namespaces and directories, then the record. Returns what was done, for the user.
    pub fn tear_down(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for p in self.processes.iter().rev() {
            if same_exe(p.pid, &p.exe) {
                // SIGTERM, then SIGKILL if it lingers.
                let pid = nix::unistd::Pid::from_raw(p.pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                for _ in 0..50 {
                    if !same_exe(p.pid, &p.exe) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                if same_exe(p.pid, &p.exe) {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                done.push(format!("stopped {} (pid {})", p.role, p.pid));
            }
        }
        let existing = victor_testkit::netns::list_namespaces().unwrap_or_default();
        for ns in self.namespaces.iter().rev() {
            if existing.contains(ns) {
                drop(victor_testkit::netns::NetNs::adopt(ns));
                done.push(format!("deleted namespace {ns}"));
            }
        }
        for dir in &self.dirs {
            if dir.exists() {
                std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
                done.push(format!("removed {}", dir.display()));
            }
        }
        let _ = std::fs::remove_file(Self::path(&self.name));
        Ok(done)
    }
}

/// Whether `pid` is alive and runs `exe` (reaps nothing: the lab's processes are not our children
/// after `up` exits).
fn same_exe(pid: u32, exe: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|p| p == exe || p.to_string_lossy().trim_end_matches(" (deleted)") == exe.to_string_lossy())
}
