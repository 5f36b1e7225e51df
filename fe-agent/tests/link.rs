//! The agent's controller link against a real controller (in-process, embedded store, loopback;
//! no root): the link fails over past a dead endpoint at once, registers, streams a snapshot, and
//! after the controller went away and came back it resumes from the revision its consumer applied
//! — the consumer, not the link, owns the resume point; a consumer that goes away stops it.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use common::{Controller, MOBILE};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use victor_fe_agent::link::connector::Connector;
use victor_fe_agent::link::{self, LinkConfig, LinkControl, SessionEnd, StreamOpened, SyncSink};
use victor_proto::v1::{RegisterRequest, SyncPhase, SyncUpdate};

const WAIT: Duration = Duration::from_secs(20);

/// What the link told the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    Registered,
    Opened(StreamOpened),
    Message { phase: SyncPhase, revision: u64 },
    Ended(SessionEnd),
}

/// A consumer that applies revisions as the engine does (complete after a snapshot's end) and
/// reports everything it hears.
struct Recorder {
    revision: u64,
    heard: mpsc::UnboundedSender<Heard>,
}

impl Recorder {
    fn tell(&self, heard: Heard) -> ControlFlow<()> {
        match self.heard.send(heard) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }
}

impl SyncSink for Recorder {
    type Message = SyncUpdate;

    fn resume_from(&mut self) -> u64 {
        self.revision
    }

    async fn opened(&mut self, stream: StreamOpened) -> ControlFlow<()> {
        self.tell(Heard::Opened(stream))
    }

    async fn message(&mut self, update: SyncUpdate) -> ControlFlow<()> {
        let phase = SyncPhase::try_from(update.phase).unwrap_or(SyncPhase::Unspecified);
        match phase {
            SyncPhase::SnapshotEnd => self.revision = update.revision,
            SyncPhase::Delta | SyncPhase::Heartbeat if self.revision > 0 => {
                self.revision = self.revision.max(update.revision)
            }
            _ => {}
        }
        self.tell(Heard::Message { phase, revision: update.revision })
    }

    async fn ended(&mut self, end: &SessionEnd) -> ControlFlow<()> {
        self.tell(Heard::Ended(end.clone()))
    }

    fn registered(&mut self) {
        let _ = self.tell(Heard::Registered);
    }
}

fn config(endpoints: &[String]) -> LinkConfig {
    LinkConfig {
        endpoints: endpoints.iter().map(|e| Endpoint::from_shared(e.clone()).unwrap()).collect(),
        connect_timeout: Duration::from_secs(1),
        stream_timeout: Duration::from_millis(1500),
        heartbeat_failure_ends_session: true,
        max_message_bytes: link::DEFAULT_MAX_MESSAGE_BYTES,
        register: RegisterRequest {
            fe_id: "fe-link".into(),
            underlay_addr: "198.51.100.7".into(),
            site: "s1".into(),
            mobile_prefixes: vec![MOBILE.into()],
            agent_version: "link-test".into(),
        },
    }
}

/// Waits for the next thing heard that `pick` keeps.
async fn next<T>(
    heard: &mut mpsc::UnboundedReceiver<Heard>,
    what: &str,
    pick: impl Fn(Heard) -> Option<T>,
) -> Result<T> {
    tokio::time::timeout(WAIT, async {
        loop {
            let h = heard.recv().await.context("the link stopped")?;
            if let Some(t) = pick(h) {
                return Ok(t);
            }
        }
    })
    .await
    .with_context(|| format!("waiting for {what}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_past_a_dead_endpoint_and_resumes_after_the_controller_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut controller = Controller::start(dir.path(), None).await?;
    let dead = format!("http://{}", victor_testkit::ports::free_addr());
    let (tx, mut heard) = mpsc::unbounded_channel();
    let link = tokio::spawn(link::run(
        config(&[dead, controller.url()]),
        Connector::default(),
        Arc::new(LinkControl::default()),
        Recorder { revision: 0, heard: tx },
    ));

    // The dead endpoint fails before any stream; the next one is tried at once.
    let first = next(&mut heard, "the dead endpoint's end", |h| match h {
        Heard::Ended(end) => Some(end),
        _ => None,
    })
    .await?;
    assert_eq!((first.endpoint, first.stream_opened), (0, false), "{first:?}");
    assert_eq!(next(&mut heard, "a registration", |h| (h == Heard::Registered).then_some(())).await?, ());
    let opened = next(&mut heard, "a stream", |h| match h {
        Heard::Opened(o) => Some(o),
        _ => None,
    })
    .await?;
    assert_eq!((opened.endpoint, opened.generation, opened.from_revision), (1, 1, 0), "a full snapshot first");
    let synced = next(&mut heard, "the snapshot's end", |h| match h {
        Heard::Message { phase: SyncPhase::SnapshotEnd, revision } => Some(revision),
        _ => None,
    })
    .await?;

    // The controller goes away: the session ends after its stream had opened.
    controller.stop().await?;
    let ended = next(&mut heard, "the session's end", |h| match h {
        Heard::Ended(end) if end.stream_opened => Some(end),
        _ => None,
    })
    .await?;
    assert_eq!(ended.endpoint, 1);

    // Back: the link asks to resume from the revision the consumer applied, not from scratch.
    controller.restart().await?;
    let resumed = next(&mut heard, "a stream on the restarted controller", |h| match h {
        Heard::Opened(o) => Some(o),
        _ => None,
    })
    .await?;
    assert_eq!((resumed.endpoint, resumed.from_revision), (1, synced));
    assert!(resumed.generation > opened.generation);

    // The consumer going away stops the link.
    drop(heard);
    tokio::time::timeout(WAIT, link).await??;
    controller.stop().await
}

/// The consumer asks for a fresh stream (it could not apply a message): the session ends and a
/// new one opens; the reporter's view of the session follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_request_ends_the_stream_and_opens_a_new_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut controller = Controller::start(dir.path(), None).await?;
    let (tx, mut heard) = mpsc::unbounded_channel();
    let control = Arc::new(LinkControl::default());
    let mut session = control.session.subscribe();
    let link = tokio::spawn(link::run(
        config(&[controller.url()]),
        Connector::default(),
        control.clone(),
        Recorder { revision: 0, heard: tx },
    ));
    let synced = next(&mut heard, "the snapshot's end", |h| match h {
        Heard::Message { phase: SyncPhase::SnapshotEnd, revision } => Some(revision),
        _ => None,
    })
    .await?;
    assert_eq!(session.borrow_and_update().as_ref().map(|s| s.generation), Some(1));

    control.resync.notify_one();
    let ended = next(&mut heard, "the session's end", |h| match h {
        Heard::Ended(end) => Some(end),
        _ => None,
    })
    .await?;
    assert!(ended.stream_opened && ended.reason.contains("resync"), "{ended:?}");
    let reopened = next(&mut heard, "a new stream", |h| match h {
        Heard::Opened(o) => Some(o),
        _ => None,
    })
    .await?;
    assert_eq!((reopened.generation, reopened.from_revision), (2, synced));
    session.wait_for(|s| s.as_ref().is_some_and(|s| s.generation == 2)).await?;

    drop(heard);
    tokio::time::timeout(WAIT, link).await??;
    controller.stop().await
}
