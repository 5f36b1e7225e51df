//! The orchestrators' binding watch (`BindingService.WatchBindings`).

use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use victor_proto::v1::{BindingEvent, BindingEventKind, WatchBindingsResponse};
use victor_store::Revision;

use super::{HEARTBEAT, MAX_ENTRIES_PER_MESSAGE};
use crate::cache::{Cache, CacheChange, Since};
use crate::metrics::Metrics;
use crate::wire;

/// What the watcher asked for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// Deliver changes after this revision (0 = from now).
    pub from_revision: Revision,
    /// Start with every current binding.
    pub include_snapshot: bool,
    /// Only bindings inside this prefix.
    pub prefix: Option<IpNet>,
}

type Tx = mpsc::Sender<Result<WatchBindingsResponse, Status>>;

/// Starts a watch stream.
pub fn start(
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    spec: WatchSpec,
    shutdown: tokio::sync::watch::Receiver<bool>,
    backfill: Arc<dyn crate::cache::backfill::Backfill>,
) -> ReceiverStream<Result<WatchBindingsResponse, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        metrics.binding_watchers.inc();
        let _ = run(&cache, &tx, spec, shutdown, &*backfill).await;
        metrics.binding_watchers.dec();
    });
    ReceiverStream::new(rx)
}

async fn run(
    cache: &Cache,
    tx: &Tx,
    spec: WatchSpec,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    backfill: &dyn crate::cache::backfill::Backfill,
) -> Result<(), ()> {
    let in_scope = |ip: &std::net::IpAddr| spec.prefix.is_none_or(|p| p.contains(ip));
    let mut cursor = if spec.from_revision == 0 { cache.revision() } else { spec.from_revision };
    if spec.include_snapshot {
        let (events, revision) = cache.read_with_revision(|s| {
            s.bindings
                .iter()
                .filter(|(ip, _)| in_scope(ip))
                .map(|(ip, b)| BindingEvent {
                    kind: BindingEventKind::Upsert as i32,
                    binding: Some(wire::binding(s, *ip, b)),
                })
                .collect::<Vec<_>>()
        });
        let mut chunks = events.chunks(MAX_ENTRIES_PER_MESSAGE).peekable();
        if chunks.peek().is_none() {
            send(tx, WatchBindingsResponse { revision, events: vec![], snapshot_done: true }).await?;
        }
        while let Some(chunk) = chunks.next() {
            let snapshot_done = chunks.peek().is_none();
            send(tx, WatchBindingsResponse { revision, events: chunk.to_vec(), snapshot_done }).await?;
        }
        cursor = revision;
    }
    let mut revisions = cache.subscribe();
    loop {
        let idle_revision = match cache.since(cursor) {
            Since::TooOld { floor } => {
                // Older than this replica's history: read it back from the store if it still has it.
                if backfill.extend_to(cursor).await.is_ok() && !matches!(cache.since(cursor), Since::TooOld { .. }) {
                    continue;
                }
                let _ = tx
                    .send(Err(Status::out_of_range(format!(
                        "revision {cursor} is no longer retained by this replica (history starts after {floor}); list the bindings again and watch from the listing's revision"
                    ))))
                    .await;
                return Err(());
            }
            Since::Frames { frames, revision } if !frames.is_empty() => {
                let events: Vec<BindingEvent> = cache.read(|s| {
                    frames
                        .iter()
                        .flat_map(|f| f.changes.iter())
                        .filter_map(|change| match change {
                            CacheChange::Binding { ip, revision, view } if in_scope(ip) => Some(match view {
                                Some(view) => BindingEvent {
                                    kind: BindingEventKind::Upsert as i32,
                                    binding: Some(wire::binding(s, *ip, view)),
                                },
                                None => BindingEvent {
                                    kind: BindingEventKind::Remove as i32,
                                    binding: Some(victor_proto::v1::Binding {
                                        vm_ip: ip.to_string(),
                                        revision: *revision,
                                        ..Default::default()
                                    }),
                                },
                            }),
                            _ => None,
                        })
                        .collect()
                });
                for chunk in events.chunks(MAX_ENTRIES_PER_MESSAGE) {
                    send(tx, WatchBindingsResponse { revision, events: chunk.to_vec(), snapshot_done: false }).await?;
                }
                cursor = revision;
                continue;
            }
            Since::Frames { revision, .. } => revision,
        };
        tokio::select! {
            changed = revisions.changed() => changed.map_err(|_| ())?,
            _ = tokio::time::sleep(HEARTBEAT) => {
                send(tx, WatchBindingsResponse { revision: idle_revision, events: vec![], snapshot_done: false }).await?;
                cursor = idle_revision;
            }
            _ = tx.closed() => return Err(()),
            _ = super::shutting_down(&mut shutdown) => {
                let _ = tx.send(Err(Status::unavailable("controller replica is shutting down; watch again (from the last revision) on another replica"))).await;
                return Err(());
            }
        }
    }
}

async fn send(tx: &Tx, msg: WatchBindingsResponse) -> Result<(), ()> {
    tx.send(Ok(msg)).await.map_err(|_| ())
}
