//! Task ownership: a spawned task that must not outlive the scope that started it.

use tokio::task::JoinHandle;

/// Aborts the task when dropped (e.g. a session's heartbeat task when the session ends, however
/// it ends).
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Spawns `future` on the current runtime, owned by the returned guard.
    pub fn spawn<F>(future: F) -> AbortOnDrop<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        AbortOnDrop(tokio::spawn(future))
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_the_guard_ends_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let guard = AbortOnDrop::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(guard);
        assert!(rx.await.is_err(), "the task (and the sender it owned) is gone");
    }
}
