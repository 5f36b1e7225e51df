//! The control runtime: a small tokio runtime of its own (two worker threads) for the work whose
//! delay costs the cluster — keeping this replica's leases alive (presence and housekeeping
//! election; a lease left unrenewed for its 5 s TTL hands housekeeping to another replica and
//! re-lists nothing but flaps), housekeeping itself (FE liveness, expiries), the store prober
//! (which decides whether writes are attempted at all), the cache loader that follows the
//! store's watch (so reads, read-your-writes and the streams stay current), and the fan-out
//! clock, whose ticks then wake the streams in a stable order (`stream/clock.rs`).
//!
//! Why a runtime and not just tasks: tokio schedules the tasks of one runtime first come, first
//! served. Thousands of streams and connections make the main runtime's run queue long, and a
//! keep-alive timer that fires behind them runs late; the socket of a store client created on the
//! main runtime is polled by that runtime too. Tasks spawned here run on threads that only serve
//! them, with their own store client (their own etcd connection), so the kernel's scheduler gives
//! them their turn whatever the main runtime is doing.

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Worker threads of the control runtime (the loader may be busy applying a large batch while a
/// keep-alive is due).
const WORKERS: usize = 2;

/// The running control runtime; dropping it stops it.
pub struct ControlRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ControlRuntime {
    /// Starts the runtime on threads of its own.
    pub fn start() -> std::io::Result<ControlRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("victor-control")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("victor-control".into()).spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
        Ok(ControlRuntime { handle, stop: Some(stop), thread: Some(thread) })
    }

    /// The runtime's handle (to spawn on it, or to enter it while creating what spawns tasks).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `future` on the control runtime and waits for its result from any runtime.
    pub async fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.handle.spawn(future).await {
            Ok(output) => output,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    /// Stops the runtime and waits (off the async threads) for its thread to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for ControlRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
