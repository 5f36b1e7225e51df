//! Server streams fed by the replica cache: the agents' desired-state stream ([`agent`]) and the
//! orchestrators' binding watch ([`bindings`]). Each stream is a task that owns its cursor,
//! wakes when the cache revision advances, and coalesces every frame after its cursor into its
//! next message.
//!
//! What keeps a replica serving whatever its streams do:
//! * [`admission`] — how many streams a connection and the replica may have;
//! * [`pacer`] — snapshot parts are built one at a time per replica, at a bounded byte rate;
//! * messages are bounded by bytes ([`SNAPSHOT_PART_BYTES`], [`MAX_MESSAGE_BYTES`]), not by
//!   entries, and a stream builds its next message only once the client has taken the previous
//!   one (a slot in a small channel is reserved first), so a client that reads slowly or never
//!   holds at most a few messages, and a slow stream simply folds more frames into its next one.
//!
//! A snapshot is read in parts, each under a short hold of the cache's read lock, so parts may
//! reflect successive revisions. The snapshot is made exact by a *patch*: every change after the
//! revision of the first part, sent as the last snapshot messages. After the message that ends
//! the snapshot, the receiver's state is the cluster state at that message's revision (both
//! receivers keep, per key, the entry with the highest revision).

pub mod admission;
pub mod agent;
pub mod bindings;
pub mod body;
pub mod clock;
pub mod encoded;
pub mod pacer;

use std::future::Future;
use std::net::IpAddr;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;

use crate::cache::BindingView;

/// How often an idle stream sends a heartbeat (agents end a stream silent for 1.5 s).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Target size of one snapshot part (a part ends with the entry that reaches it).
pub const SNAPSHOT_PART_BYTES: usize = 64 << 10;
/// Largest stream message: deltas, and the patch that ends a snapshot, are split to stay under
/// it (far below the 4 MiB gRPC clients accept by default).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// The bindings after `after` (all of them for `None`), in IP order.
pub fn bindings_after(
    bindings: &std::collections::BTreeMap<IpAddr, BindingView>,
    after: Option<IpAddr>,
) -> std::collections::btree_map::Range<'_, IpAddr, BindingView> {
    match after {
        Some(ip) => bindings.range((Bound::Excluded(ip), Bound::Unbounded)),
        None => bindings.range(..),
    }
}

/// Counts a stream in a gauge while it lives (a stream is dropped, not ended, when its client
/// goes away).
pub(crate) struct Counted(prometheus_client::metrics::gauge::Gauge);

impl Counted {
    pub(crate) fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The client went away (or the replica is shutting down).
#[derive(Debug)]
pub(crate) struct Closed;

/// One message (or the status that ends the stream) waiting for the response body to take it.
type Mailbox<M> = Arc<Mutex<Option<Result<M, tonic::Status>>>>;

/// The producing end of a stream: the stream's loop puts one message at a time into a mailbox that
/// the response body empties ([`Pump`]). The loop runs inside the body's poll (no task, no
/// channel of its own), so it builds a message only when the connection is ready to take one: a
/// client that reads slowly or never holds one built message here and one in the HTTP/2 layer.
pub(crate) struct Out<M> {
    mailbox: Mailbox<M>,
    shutdown: watch::Receiver<bool>,
}

impl<M> Out<M> {
    fn has_room(&self) -> bool {
        self.mailbox.lock().expect("mailbox lock").is_none()
    }

    /// Waits until the previous message was taken; `Closed` once the replica shuts down.
    ///
    /// No waker is registered: a full mailbox means [`Pump`] is about to hand its message over,
    /// and it polls this loop again right after.
    pub(crate) async fn room(&self) -> Result<(), Closed> {
        std::future::poll_fn(|_| if self.has_room() { Poll::Ready(()) } else { Poll::Pending }).await;
        if *self.shutdown.borrow() { Err(Closed) } else { Ok(()) }
    }

    /// Puts a message into the (empty) mailbox: call after [`Out::room`].
    pub(crate) fn put(&self, msg: M) {
        let previous = self.mailbox.lock().expect("mailbox lock").replace(Ok(msg));
        debug_assert!(previous.is_none(), "put without room");
    }

    /// Sends `msg` if there is room for it now; false if not (the client has a message waiting).
    pub(crate) fn try_send(&self, msg: M) -> bool {
        let mut mailbox = self.mailbox.lock().expect("mailbox lock");
        if mailbox.is_some() {
            return false;
        }
        *mailbox = Some(Ok(msg));
        true
    }

    /// Sends one message once there is room.
    pub(crate) async fn send(&self, msg: M) -> Result<(), Closed> {
        self.room().await?;
        self.put(msg);
        Ok(())
    }

    /// Ends the stream with `status` once there is room for it.
    pub(crate) async fn fail(&self, status: tonic::Status) {
        std::future::poll_fn(|_| if self.has_room() { Poll::Ready(()) } else { Poll::Pending }).await;
        *self.mailbox.lock().expect("mailbox lock") = Some(Err(status));
    }

    /// Ends the stream with `status` if there is room for it now (a client that still reads
    /// learns why its stream ends).
    pub(crate) fn try_fail(&self, status: tonic::Status) {
        let mut mailbox = self.mailbox.lock().expect("mailbox lock");
        if mailbox.is_none() {
            *mailbox = Some(Err(status));
        }
    }
}

/// A server stream whose messages are produced by a loop polled from the stream's own `poll_next`
/// (in hyper, the task that writes the response): one wake-up per message instead of a task per
/// stream handing messages over a channel to the writer. Dropping the stream (the client went
/// away) drops the loop and everything it holds (its admission ticket).
pub struct Pump<M> {
    producer: Pin<Box<dyn Future<Output = ()> + Send>>,
    mailbox: Mailbox<M>,
    finished: bool,
}

impl<M: Send + 'static> Pump<M> {
    /// A stream fed by `producer`, which gets the [`Out`] to send with; its loop ends when the
    /// replica shuts down (`shutdown` turns true) at the latest.
    pub(crate) fn new<F>(shutdown: watch::Receiver<bool>, producer: impl FnOnce(Out<M>) -> F) -> Pump<M>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mailbox: Mailbox<M> = Arc::new(Mutex::new(None));
        let out = Out { mailbox: mailbox.clone(), shutdown };
        Pump { producer: Box::pin(producer(out)), mailbox, finished: false }
    }

    fn take(&self) -> Option<Result<M, tonic::Status>> {
        self.mailbox.lock().expect("mailbox lock").take()
    }
}

impl<M: Send + 'static> futures::Stream for Pump<M> {
    type Item = Result<M, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(item) = self.take() {
                return Poll::Ready(Some(item));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            match self.producer.as_mut().poll(cx) {
                // The loop ended: hand over what it left (its last message or status), then end.
                Poll::Ready(()) => self.finished = true,
                Poll::Pending => return self.take().map_or(Poll::Pending, |item| Poll::Ready(Some(item))),
            }
        }
    }
}

/// Resolves once `shutdown` is (or becomes) true; never if its sender is gone.
pub async fn shutting_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let done = *shutdown.borrow_and_update();
        if done {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Splits `sizes` (bytes of consecutive items) into consecutive ranges of at most `max` bytes
/// each (an item larger than `max` gets a range of its own).
pub fn split_by_bytes(sizes: impl IntoIterator<Item = usize>, max: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes, mut n) = (0, 0, 0);
    for size in sizes {
        if n > start && bytes + size > max {
            ranges.push(start..n);
            start = n;
            bytes = 0;
        }
        bytes += size;
        n += 1;
    }
    if n > start {
        ranges.push(start..n);
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_keep_order_and_bound_each_range() {
        assert_eq!(split_by_bytes([4, 4, 4, 4, 4], 8), vec![0..2, 2..4, 4..5]);
        assert_eq!(split_by_bytes([10, 1, 1], 8), vec![0..1, 1..3], "an oversized item stands alone");
        assert_eq!(split_by_bytes([], 8), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(split_by_bytes([8, 8], 8), vec![0..1, 1..2]);
    }
}
