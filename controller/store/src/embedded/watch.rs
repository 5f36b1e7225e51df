//! Embedded watches: replay retained history from the `log` table, then follow the writer's
//! broadcast of committed batches.
//!
//! The watcher subscribes to the broadcast *before* reading the log, and the writer broadcasts
//! only *after* committing, so every revision is either in the log read or in the broadcast (or
//! both: revisions below `next` are skipped) — no gap, no duplicate at the hand-over. A watcher
//! that falls behind the broadcast buffer (`Lagged`) catches up from the log again; only if the
//! log was compacted past it does it end with [`StoreError::Compacted`].

use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::read::read_log;
use super::schema::{LOG, META};
use super::writer::{Committed, load_state};
use crate::{KeyRange, Revision, StoreError, StoreResult, WatchBatch, WatchStream};

/// Log rows read per catch-up step (one blocking read each).
const CATCH_UP_REVISIONS: usize = 1024;

/// Runs a watch task and returns its stream. `next` is the first revision to deliver.
pub(super) fn spawn(
    db: Arc<Database>,
    live: broadcast::Receiver<Arc<Committed>>,
    range: KeyRange,
    next: Revision,
    progress: Option<Duration>,
) -> WatchStream {
    let (tx, rx) = mpsc::channel(16);
    let watcher = Watcher { db, range, next, tx };
    tokio::spawn(watcher.run(live, progress));
    Box::pin(ReceiverStream::new(rx))
}

struct Watcher {
    db: Arc<Database>,
    range: KeyRange,
    /// Every revision below this one has been delivered (or did not concern the range).
    next: Revision,
    tx: mpsc::Sender<StoreResult<WatchBatch>>,
}

/// The watch consumer is gone.
struct Gone;

impl Watcher {
    async fn run(mut self, mut live: broadcast::Receiver<Arc<Committed>>, progress: Option<Duration>) {
        let _ = self.follow(&mut live, progress).await;
    }

    async fn follow(
        &mut self,
        live: &mut broadcast::Receiver<Arc<Committed>>,
        progress: Option<Duration>,
    ) -> Result<(), Gone> {
        self.catch_up().await?;
        let period = progress.unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut sent_since_tick = false;
        loop {
            tokio::select! {
                msg = live.recv() => match msg {
                    Ok(committed) => sent_since_tick |= self.deliver(&committed).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        sent_since_tick |= self.catch_up().await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return self
                            .send(Err(StoreError::Unavailable("embedded store closed".into())))
                            .await;
                    }
                },
                _ = ticker.tick(), if progress.is_some() => {
                    if !sent_since_tick && self.next > 1 {
                        self.send(Ok(WatchBatch { revision: self.next - 1, events: Vec::new() }))
                            .await?;
                    }
                    sent_since_tick = false;
                }
                () = self.tx.closed() => return Err(Gone),
            }
        }
    }

    async fn send(&self, item: StoreResult<WatchBatch>) -> Result<(), Gone> {
        self.tx.send(item).await.map_err(|_| Gone)
    }

    /// Delivers a live batch; returns whether something was sent.
    async fn deliver(&mut self, committed: &Committed) -> Result<bool, Gone> {
        if committed.revision < self.next {
            return Ok(false);
        }
        let events: Vec<_> = committed
            .events
            .iter()
            .filter(|e| e.kv.mod_revision >= self.next && self.range.contains(&e.kv.key))
            .cloned()
            .collect();
        self.next = committed.revision + 1;
        if events.is_empty() {
            return Ok(false);
        }
        self.send(Ok(WatchBatch { revision: committed.revision, events })).await?;
        Ok(true)
    }

    /// Replays the log from `next` up to the committed revision; returns whether something was
    /// sent. Ends the watch with an error if the history is compacted or unreadable.
    async fn catch_up(&mut self) -> Result<bool, Gone> {
        let mut sent = false;
        loop {
            let db = self.db.clone();
            let range = self.range.clone();
            let next = self.next;
            let step = tokio::task::spawn_blocking(move || read_step(&db, &range, next))
                .await
                .unwrap_or_else(|e| Err(StoreError::Internal(format!("watch replay: {e}"))));
            let (batch, done) = match step {
                Ok(v) => v,
                Err(e) => {
                    self.send(Err(e)).await?;
                    return Err(Gone);
                }
            };
            self.next = self.next.max(batch.revision + 1);
            if !batch.events.is_empty() {
                self.send(Ok(batch)).await?;
                sent = true;
            }
            if done {
                return Ok(sent);
            }
        }
    }
}

/// One catch-up read from `next`: the batch (its revision = everything up to it was read) and
/// whether the log is exhausted.
fn read_step(db: &Database, range: &KeyRange, next: Revision) -> StoreResult<(WatchBatch, bool)> {
    let internal = |e: &dyn std::fmt::Display| StoreError::Internal(format!("watch replay: {e}"));
    let rtx = db.begin_read().map_err(|e| internal(&e))?;
    let meta = rtx.open_table(META).map_err(|e| internal(&e))?;
    let state = load_state(&meta).map_err(|e| internal(&e))?;
    if next < state.compacted {
        return Err(StoreError::Compacted { requested: next, compacted: state.compacted });
    }
    let log = rtx.open_table(LOG).map_err(|e| internal(&e))?;
    let (events, last) = read_log(&log, range, next, state.revision, CATCH_UP_REVISIONS).map_err(|e| internal(&e))?;
    let done = last >= state.revision || last < next;
    let revision = if done { state.revision.max(next.saturating_sub(1)) } else { last };
    Ok((WatchBatch { revision, events }, done))
}
