//! etcd watches mapped onto [`WatchStream`].
//!
//! * The watch is created with `progress_notify`, so an idle watch gets empty batches carrying
//!   the current revision (as often as the server's
//!   `--experimental-watch-progress-notify-interval`, 10 min by default). Those timed
//!   notifications only reach watchers that are in sync, so their revision is safe to resume
//!   from. We never use the on-demand `RequestProgress`: on etcd 3.4.23 its answer can overtake
//!   pending events (etcd issue #15220, fixed in 3.4.24).
//! * A batch's revision is its last event's revision, not the response header's: responses to a
//!   catching-up watcher carry the store's current revision while more events are still to come.
//! * etcd 3.4 answers a watch from a compacted revision with `created`, then a separate
//!   `canceled` response carrying `compact_revision`: that becomes [`StoreError::Compacted`].
//! * A broken stream (its member killed, connection lost) ends the watch with
//!   [`StoreError::Unavailable`]; the caller watches again from its last revision + 1.

use etcd_client as ec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::call::{CallPolicy, Idempotent};
use super::convert::{event, header_revision, key_and_end, to_i64, to_u64};
use crate::{KeyRange, Revision, StoreError, StoreResult, WatchBatch, WatchStream};

/// Biggest watch response accepted (a transaction of 128 large values fits).
const MAX_WATCH_MESSAGE: usize = 256 * 1024 * 1024;

/// Creates the watch (retrying within the deadline) and spawns the task that feeds the stream.
pub(super) async fn watch(
    client: &ec::Client,
    policy: &CallPolicy,
    range: KeyRange,
    from: Revision,
) -> StoreResult<WatchStream> {
    let (key, end) = key_and_end(&range);
    let mut opts = ec::WatchOptions::new().with_progress_notify();
    if !end.is_empty() {
        opts = opts.with_range(end);
    }
    if from > 0 {
        opts = opts.with_start_revision(to_i64(from));
    }
    let (stream, created) = policy
        .call("watch", Idempotent::Yes, || {
            let mut wc = client.watch_client().max_decoding_message_size(MAX_WATCH_MESSAGE);
            let (key, opts) = (key.clone(), opts.clone());
            async move {
                let mut stream = wc.watch(key, Some(opts)).await?;
                match stream.message().await? {
                    Some(resp) if resp.created() => Ok((stream, resp)),
                    Some(resp) => Err(ec::Error::WatchError(format!("expected a created response, got {resp:?}"))),
                    None => Err(ec::Error::WatchError("closed before created".into())),
                }
            }
        })
        .await?;
    if created.canceled() {
        return Err(canceled(&created, from, policy));
    }
    let (tx, rx) = mpsc::channel(16);
    let follower = Follower { from, last: 0, tx, policy: policy.clone() };
    tokio::spawn(follower.run(stream));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// The error for a watch etcd canceled.
fn canceled(resp: &ec::WatchResponse, from: Revision, policy: &CallPolicy) -> StoreError {
    if resp.compact_revision() > 0 {
        StoreError::Compacted { requested: from, compacted: to_u64(resp.compact_revision()) }
    } else {
        policy.unavailable("watch", &format!("canceled by etcd: {}", resp.cancel_reason()))
    }
}

struct Follower {
    from: Revision,
    /// Revision of the last batch sent (0 = none yet).
    last: Revision,
    tx: mpsc::Sender<StoreResult<WatchBatch>>,
    policy: CallPolicy,
}

impl Follower {
    async fn run(mut self, mut stream: ec::WatchStream) {
        loop {
            let msg = tokio::select! {
                msg = stream.message() => msg,
                // The consumer dropped the stream: dropping ours cancels the watch in etcd.
                () = self.tx.closed() => return,
            };
            let item = match msg {
                Ok(Some(resp)) => match self.batch(&resp) {
                    Ok(Some(batch)) => Ok(batch),
                    Ok(None) => continue,
                    Err(e) => Err(e),
                },
                Ok(None) => Err(self.policy.unavailable("watch", "stream closed by etcd")),
                Err(e) => Err(self.policy.unavailable("watch", &format!("stream broken: {e}"))),
            };
            let end = item.is_err();
            if self.tx.send(item).await.is_err() || end {
                return;
            }
        }
    }

    /// The batch for one response (`None`: nothing to report).
    fn batch(&mut self, resp: &ec::WatchResponse) -> StoreResult<Option<WatchBatch>> {
        if resp.canceled() {
            let requested = if self.last == 0 { self.from } else { self.last + 1 };
            return Err(canceled(resp, requested, &self.policy));
        }
        let events: Vec<_> = resp.events().iter().filter_map(event).collect();
        let revision = match events.last() {
            Some(e) => e.kv.mod_revision,
            // A progress notification.
            None => header_revision(resp.header()),
        };
        if events.is_empty() && revision <= self.last {
            return Ok(None);
        }
        self.last = self.last.max(revision);
        Ok(Some(WatchBatch { revision, events }))
    }
}
