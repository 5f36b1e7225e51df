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
pub mod encoded;
pub mod pacer;

use std::net::IpAddr;
use std::ops::Bound;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::cache::BindingView;

/// How often an idle stream sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Target size of one snapshot part (a part ends with the entry that reaches it).
pub const SNAPSHOT_PART_BYTES: usize = 64 << 10;
/// Largest stream message: deltas, and the patch that ends a snapshot, are split to stay under
/// it (far below the 4 MiB gRPC clients accept by default).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Messages a stream may have waiting for its client.
pub const CHANNEL_MESSAGES: usize = 2;

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

/// The client went away (or the replica is shutting down).
#[derive(Debug)]
pub(crate) struct Closed;

/// The sending end of a stream: a message is built only once the channel has room for it, so a
/// client that does not read holds at most [`CHANNEL_MESSAGES`] built messages.
pub(crate) struct Out<M> {
    tx: mpsc::Sender<Result<M, tonic::Status>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl<M> Out<M> {
    /// Sends to `tx` until `shutdown` turns true.
    pub(crate) fn new(
        tx: mpsc::Sender<Result<M, tonic::Status>>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Out { tx, shutdown }
    }

    /// Room for one message.
    pub(crate) async fn slot(&mut self) -> Result<mpsc::OwnedPermit<Result<M, tonic::Status>>, Closed> {
        tokio::select! {
            permit = self.tx.clone().reserve_owned() => permit.map_err(|_| Closed),
            _ = shutting_down(&mut self.shutdown) => Err(Closed),
        }
    }

    /// Sends `msg` if there is room for it now; false if not (the client has messages waiting).
    pub(crate) fn try_send(&self, msg: M) -> bool {
        match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(Ok(msg));
                true
            }
            Err(_) => false,
        }
    }

    /// Sends one message once there is room.
    pub(crate) async fn send(&mut self, msg: M) -> Result<(), Closed> {
        self.slot().await?.send(Ok(msg));
        Ok(())
    }

    /// Ends the stream with `status` once there is room for it.
    pub(crate) async fn fail(&mut self, status: tonic::Status) {
        if let Ok(slot) = self.slot().await {
            slot.send(Err(status));
        }
    }

    /// Ends the stream with `status` if there is room for it now (a client that still reads
    /// learns why its stream ends).
    pub(crate) fn try_fail(&self, status: tonic::Status) {
        let _ = self.tx.try_send(Err(status));
    }

    /// Resolves when the client went away.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
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
