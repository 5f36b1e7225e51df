//! Child processes that cannot outlive the test that started them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// A spawned child in its own process group. Dropping the guard kills the group (SIGKILL) and
/// reaps the child. Only processes we started are ever signalled, by PID.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log_path: Option<std::path::PathBuf>,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group. Its stdout and stderr go to `log_path` if given
    /// (else they are discarded).
    pub fn spawn(name: impl Into<String>, mut cmd: Command, log_path: Option<&Path>) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let name = name.into();
        cmd.process_group(0).stdin(Stdio::null());
        if let Some(path) = log_path {
            let file = std::fs::File::create(path).with_context(|| format!("create log {}", path.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd.spawn().with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(ChildGuard { name, child: Some(child), log_path: log_path.map(Path::to_path_buf) })
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tail of the child's log (for assertion messages).
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let Some(path) = &self.log_path else {
            return String::new();
        };
        let data = std::fs::read(path).unwrap_or_default();
        let start = data.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&data[start..]).into_owned()
    }

    /// Lets the child outlive this guard (a daemon left running by `victor-lab up`); returns its
    /// PID, which the caller must record to stop it later.
    pub fn detach(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends a signal to the child only (not the group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid() as i32), signal).with_context(|| format!("signal {} ({})", self.name, self.pid()))
    }

    /// SIGKILLs the child's process group and reaps it (like `kill -9`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the child and waits up to `timeout` for it to exit, then SIGKILLs it.
    /// Returns the exit status if it exited on its own.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Waits for the child to exit on its own within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("child already reaped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 10 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
