//! What the agent's engine receives from the link: every stream message with its receipt time,
//! and when a stream starts or ends ([`LinkEvent`]), over a bounded channel — the link waits
//! while the engine is busy, so nothing is dropped. The engine tells the link where to resume
//! through the shared revision ([`EngineFeed::new`]'s `resume`).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::v1::SyncUpdate;

use super::{SessionEnd, StreamOpened, SyncSink};
use crate::metrics::Metrics;

/// What the link tells the engine.
#[derive(Debug)]
pub enum LinkEvent {
    /// A stream message, with its receipt time.
    Sync {
        /// The message.
        update: Box<SyncUpdate>,
        /// CLOCK_MONOTONIC ns at receipt.
        received_mono: u64,
        /// Wall clock at receipt.
        received_wall: i64,
    },
    /// A session (and its stream) started; `generation` 1 is the first since the agent started.
    Connected {
        /// Session generation.
        generation: u64,
    },
    /// The stream ended: discard a partly received snapshot.
    StreamEnded,
}

/// The link's sink in the agent: forwards to the engine, counts sessions in the metrics.
#[derive(Debug)]
pub struct EngineFeed {
    events: mpsc::Sender<LinkEvent>,
    resume: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl EngineFeed {
    /// Feeds `events`; streams resume from `resume`, the revision the engine has applied
    /// completely (0 = a snapshot is needed).
    pub fn new(events: mpsc::Sender<LinkEvent>, resume: Arc<AtomicU64>, metrics: Arc<Metrics>) -> Self {
        EngineFeed { events, resume, metrics }
    }

    async fn send(&self, event: LinkEvent) -> ControlFlow<()> {
        match self.events.send(event).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
}

impl SyncSink for EngineFeed {
    type Message = SyncUpdate;

    fn resume_from(&mut self) -> u64 {
        self.resume.load(Ordering::Acquire)
    }

    async fn opened(&mut self, stream: StreamOpened) -> ControlFlow<()> {
        self.metrics.controller_sessions.inc();
        self.metrics.controller_connected.set(1);
        self.send(LinkEvent::Connected { generation: stream.generation }).await
    }

    async fn message(&mut self, update: SyncUpdate) -> ControlFlow<()> {
        let event =
            LinkEvent::Sync { update: Box::new(update), received_mono: monotonic_ns(), received_wall: unix_nanos() };
        self.send(event).await
    }

    async fn ended(&mut self, end: &SessionEnd) -> ControlFlow<()> {
        if !end.stream_opened {
            return ControlFlow::Continue(());
        }
        self.metrics.controller_connected.set(0);
        self.send(LinkEvent::StreamEnded).await
    }

    fn registered(&mut self) {
        self.metrics.registrations.inc();
    }
}
