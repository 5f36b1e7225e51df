//! What the agent tells systemd when it runs as a `Type=notify` unit with a watchdog
//! (`packaging/systemd/victor-fe-agent.service`): **ready** once a complete desired state from a
//! controller has been applied (the `synced` flag that `/readyz` and the BGP advertiser read),
//! **healthy** while the engine runs (it wakes every 100 ms, so a [`Liveness`] of its future sees
//! it stop: stuck in a kernel request, or busy in one step), and the `/readyz` verdict as the
//! unit's status line (e.g. "headless for 40 s (grace 300 s)").

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use victor_daemon::systemd::{Liveness, ServiceChecks};

use crate::readiness::Readiness;

/// The engine may go this long without running before the agent stops pinging the watchdog.
/// Well above any single step of the engine (a full snapshot of 1,000,000 bindings is applied in
/// bounded steps), well below the unit's `WatchdogSec=30s`.
pub const ENGINE_STALL: Duration = Duration::from_secs(15);

/// The agent's [`ServiceChecks`].
#[derive(Debug, Clone)]
pub struct AgentChecks {
    /// The agent's readiness.
    pub readiness: Arc<Readiness>,
    /// When the engine last ran.
    pub engine: Liveness,
}

impl ServiceChecks for AgentChecks {
    async fn ready(&self) -> Result<(), String> {
        if self.readiness.synced.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("waiting for a complete desired state from a controller".into())
        }
    }

    async fn healthy(&self) -> Result<(), String> {
        self.engine.check("the agent engine", ENGINE_STALL)
    }

    fn status(&self) -> Option<String> {
        Some(match self.readiness.check() {
            Ok(()) if self.readiness.connected.load(Ordering::Relaxed) => "synced, controller stream up".into(),
            Ok(()) => "synced, headless within the grace period".into(),
            Err(why) => format!("not ready: {why}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_when_synced_and_the_status_is_the_readyz_verdict() {
        let (engine, liveness) = Liveness::track(std::future::pending::<()>());
        let _engine = tokio::spawn(engine);
        let checks = AgentChecks { readiness: Arc::new(Readiness::new(0)), engine: liveness };
        assert!(checks.ready().await.unwrap_err().contains("complete desired state"));
        checks.readiness.synced.store(true, Ordering::Relaxed);
        assert_eq!(checks.ready().await, Ok(()));
        assert!(checks.status().unwrap().starts_with("not ready: headless"), "grace 0, no stream");
        checks.readiness.connected.store(true, Ordering::Relaxed);
        assert_eq!(checks.status().unwrap(), "synced, controller stream up");
        assert_eq!(checks.healthy().await, Ok(()), "the engine was just polled");
    }
}
