//! What the benchmark reads from `/proc`: resident memory and CPU time of a process, and the
//! machine's load (other developers share this host, so every result carries the load it ran
//! under); and the CPU pinning of the processes it started ([`pin`]).

use anyhow::{Context, Result};
use serde::Serialize;

/// `VmRSS` of a process in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User + system CPU time of a process (all its threads) in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    let ticks = parse_stat_ticks(&stat).with_context(|| format!("unexpected /proc/{pid}/stat format"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// utime + stime (fields 14 and 15; the command name in field 2 may contain spaces).
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14 → index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size matches the set passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET only reads the set, for indices below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// `Cpus_allowed_list` of process `pid` (e.g. `0` or `1-3`; `?` if it cannot be read).
pub fn allowed_list(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

/// The value of `name` in the environment process `pid` was started with (`None`: unset or
/// unreadable).
pub fn env_var(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Pins every thread of process `pid` to `cpus` (threads it creates later inherit the mask of
/// their creator). Returns the number of threads pinned.
pub fn pin(pid: u32, cpus: &[usize]) -> Result<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET writes inside the set for indices below CPU_SETSIZE (checked by the caller's
        // CPU list, which comes from sched_getaffinity).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("list threads of {pid}"))?;
    let mut pinned = 0;
    for task in tasks {
        let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse::<libc::pid_t>().ok()) else { continue };
        // SAFETY: the set is initialised and its size is passed; a thread that exited meanwhile
        // makes the call fail with ESRCH, which is ignored.
        if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } == 0 {
            pinned += 1;
        }
    }
    if pinned == 0 {
        anyhow::bail!("could not pin any thread of {pid} to CPUs {cpus:?}");
    }
    Ok(pinned)
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(f64::NAN));
    [it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN)]
}

/// The host the benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// Total memory in GiB.
    pub mem_gib: f64,
    /// Load averages when the run started.
    pub loadavg_start: [f64; 3],
    /// Load averages when the run ended.
    pub loadavg_end: [f64; 3],
}

impl Machine {
    /// Reads the host's CPUs and memory; `loadavg_end` is filled at the end of the run.
    pub fn probe() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            // Online CPUs, not this process's (pinned, after a first run of --repeats) mask.
            // SAFETY: sysconf has no preconditions.
            cpus: usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1),
            mem_gib: (kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            loadavg_start: loadavg(),
            loadavg_end: [f64::NAN; 3],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t   1234 kB\nVmHWM: 1 kB\n"), Some(1234 * 1024));
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 700 300 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_ticks(stat), Some(1000));
    }

    #[test]
    fn reads_a_childs_environment() {
        struct Killed(std::process::Child);
        impl Drop for Killed {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let cmd = std::process::Command::new("sleep").arg("5").env("VICTOR_SYS_TEST", "a=b").spawn().unwrap();
        let child = Killed(cmd);
        let pid = child.0.id();
        // Until the child has exec'd (and its new stack is set up), /proc shows the environment
        // it was forked with (ours) or none.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while env_var(pid, "VICTOR_SYS_TEST").is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(env_var(pid, "VICTOR_SYS_TEST").as_deref(), Some("a=b"));
        assert_eq!(env_var(pid, "VICTOR_SYS_TEST_UNSET"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 1 << 20);
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(loadavg()[0] >= 0.0);
    }

    #[test]
    fn pins_a_child_to_one_cpu() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert_eq!(pin(child.id(), &cpus[..1]).unwrap(), 1);
        assert_eq!(allowed_list(child.id()), cpus[0].to_string());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
