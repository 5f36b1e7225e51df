//! One BGP peer (the site's border router): connects to it, runs a [`Session`] over TCP, keeps the
//! session alive (KEEPALIVEs, hold timer) and keeps the router's view of our prefixes equal to the
//! desired one — announced while the FE is healthy, withdrawn otherwise. Reconnects with backoff.
//! On stop it closes with a Cease NOTIFICATION. If the agent process dies, the kernel closes the
//! connection and the router withdraws at once; if the agent hangs, the router's hold timer does.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use victor_daemon::Backoff;

use super::session::{Params, Reaction, Session, SessionError, State};
use crate::codec::bgp::{Community, Notification, frame_len, keepalive};
use crate::metrics::{Metrics, PeerLabel};

/// Time allowed for a TCP connection to be established.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one write (a router that stops reading is a dead router).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long we wait for the peer's OPEN.
const OPEN_WAIT: Duration = Duration::from_secs(60);
/// First and longest pause between connection attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// One peer's configuration.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Where the router listens.
    pub addr: SocketAddrV4,
    /// Session parameters.
    pub params: Params,
    /// NEXT_HOP of our routes; None = the local address of the connection (next-hop self).
    pub next_hop: Option<Ipv4Addr>,
    /// Communities on our routes.
    pub communities: Vec<Community>,
    /// The prefixes.
    pub prefixes: Vec<Ipv4Net>,
}

/// What the advertiser wants the routers to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// The prefixes, announced.
    Announce,
    /// Nothing (and why).
    Withdraw(String),
}

/// A peer's state, for the advertiser.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStatus {
    /// The session is established.
    pub established: bool,
    /// The router has our prefixes (announced and not withdrawn since).
    pub announced: bool,
}

/// The advertiser's end of a peer task.
#[derive(Debug)]
pub struct Channels {
    /// What to announce.
    pub desired: watch::Receiver<Desired>,
    /// Set to true to close the session and end the task.
    pub stop: watch::Receiver<bool>,
    /// The peer's state.
    pub status: watch::Sender<PeerStatus>,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the router closed the connection")]
    Closed,
    #[error("no message from the router within the hold time; sent hold timer expired")]
    HoldExpired,
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// Runs the peer until `stop` turns true.
pub async fn run(config: PeerConfig, mut ch: Channels, metrics: Arc<Metrics>) {
    let label = PeerLabel { peer: config.addr.to_string() };
    let mut backoff = Backoff::exact(BACKOFF.0, BACKOFF.1);
    let mut failures = 0u32;
    loop {
        if *ch.stop.borrow() {
            return;
        }
        let connected = tokio::select! {
            r = timeout(CONNECT_TIMEOUT, TcpStream::connect(config.addr)) => r,
            _ = ch.stop.changed() => return,
        };
        let outcome = match connected {
            Ok(Ok(stream)) => {
                let mut conn = Connection::new(&config, stream, &label, &metrics, &ch.status);
                let outcome = conn.run(&mut ch.desired, &mut ch.stop).await;
                if conn.was_established {
                    backoff.reset();
                    failures = 0;
                }
                outcome
            }
            Ok(Err(e)) => Err(PeerError::Io("connect", e)),
            Err(_) => Err(PeerError::Timeout("connect")),
        };
        ch.status.send_replace(PeerStatus::default());
        metrics.bgp_session_up.get_or_create(&label).set(0);
        metrics.bgp_announced.get_or_create(&label).set(0);
        let retry_in = backoff.next_delay();
        match outcome {
            Ok(()) => return,
            Err(err) => {
                failures += 1;
                // The first failure of a streak is worth a warning; the retries are not.
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(peer = %config.addr, error = %err, ?retry_in, "BGP session down");
                } else {
                    tracing::debug!(peer = %config.addr, error = %err, ?retry_in, "BGP session down");
                }
            }
        }
        tokio::select! {
            _ = sleep(retry_in) => {}
            _ = ch.stop.changed() => return,
        }
    }
}

/// One TCP connection to the router.
struct Connection<'a> {
    config: &'a PeerConfig,
    rd: tokio::net::tcp::OwnedReadHalf,
    wr: OwnedWriteHalf,
    session: Session,
    next_hop: Ipv4Addr,
    /// When the peer's silence ends the session (its OPEN, then the negotiated hold time).
    hold_deadline: Option<Instant>,
    /// When we send the next KEEPALIVE.
    keepalive_at: Option<Instant>,
    announced: bool,
    was_established: bool,
    label: &'a PeerLabel,
    metrics: &'a Metrics,
    status: &'a watch::Sender<PeerStatus>,
}

impl<'a> Connection<'a> {
    fn new(
        config: &'a PeerConfig,
        stream: TcpStream,
        label: &'a PeerLabel,
        metrics: &'a Metrics,
        status: &'a watch::Sender<PeerStatus>,
    ) -> Self {
        let _ = stream.set_nodelay(true);
        let local = match stream.local_addr() {
            Ok(SocketAddr::V4(a)) => *a.ip(),
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let (rd, wr) = stream.into_split();
        Connection {
            config,
            rd,
            wr,
            session: Session::new(config.params),
            next_hop: config.next_hop.unwrap_or(local),
            hold_deadline: Some(Instant::now() + OPEN_WAIT),
            keepalive_at: None,
            announced: false,
            was_established: false,
            label,
            metrics,
            status,
        }
    }

    /// Runs the session until it fails (Err) or `stop` turns true (Ok, after a Cease).
    async fn run(
        &mut self,
        desired: &mut watch::Receiver<Desired>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), PeerError> {
        self.write(&self.session.open()).await?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let established = self.session.state() == State::Established;
            let far = Instant::now() + Duration::from_secs(86400);
            tokio::select! {
                changed = stop.changed() => {
                    // A dropped advertiser stops us too.
                    if changed.is_err() || *stop.borrow() {
                        // Best effort: the router withdraws on the NOTIFICATION or on the close.
                        let _ = self.write(&Notification::admin_shutdown().encode()).await;
                        let _ = self.wr.shutdown().await;
                        return Ok(());
                    }
                }
                read = self.rd.read(&mut chunk) => {
                    let n = read.map_err(|e| PeerError::Io("read", e))?;
                    if n == 0 {
                        return Err(PeerError::Closed);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(len) = self.frame(&buf).await? {
                        if buf.len() < len {
                            break;
                        }
                        let msg: Vec<u8> = buf.drain(..len).collect();
                        self.receive(&msg, desired).await?;
                    }
                }
                _ = sleep_until(self.hold_deadline.unwrap_or(far)) => {
                    if self.hold_deadline.is_some() {
                        let _ = self.write(&Notification::hold_timer_expired().encode()).await;
                        return Err(PeerError::HoldExpired);
                    }
                }
                _ = sleep_until(self.keepalive_at.unwrap_or(far)) => {
                    if self.keepalive_at.is_some() {
                        self.write(&keepalive()).await?;
                        self.schedule_keepalive();
                    }
                }
                changed = desired.changed(), if established => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.sync(desired, false).await?;
                }
            }
        }
    }

    fn schedule_keepalive(&mut self) {
        self.keepalive_at = self.session.negotiated().and_then(|n| n.keepalive()).map(|k| Instant::now() + k);
    }

    /// The length of the next frame, answering a malformed header with its NOTIFICATION.
    async fn frame(&mut self, buf: &[u8]) -> Result<Option<usize>, PeerError> {
        match frame_len(buf) {
            Ok(len) => Ok(len),
            Err(e) => {
                let _ = self.write(&e.notification.encode()).await;
                Err(PeerError::Session(SessionError::Protocol { reason: e.what, notification: e.notification }))
            }
        }
    }

    async fn receive(&mut self, msg: &[u8], desired: &mut watch::Receiver<Desired>) -> Result<(), PeerError> {
        let reaction = self.session.receive(msg);
        if let Some(n) = self.session.negotiated() {
            // Any message from the peer restarts the hold timer.
            self.hold_deadline = n.hold().map(|h| Instant::now() + h);
        }
        match reaction {
            Ok(Reaction::None) => Ok(()),
            Ok(Reaction::Keepalive) => {
                self.write(&keepalive()).await?;
                self.schedule_keepalive();
                Ok(())
            }
            Ok(Reaction::Established) => {
                self.was_established = true;
                let n = self.session.negotiated().expect("negotiated before established");
                tracing::info!(
                    peer = %self.config.addr,
                    peer_id = %n.peer_id,
                    hold_time = n.hold_time,
                    next_hop = %self.next_hop,
                    "BGP session established"
                );
                self.status.send_modify(|s| s.established = true);
                self.metrics.bgp_session_up.get_or_create(self.label).set(1);
                self.metrics.bgp_sessions_established.get_or_create(self.label).inc();
                self.sync(desired, false).await
            }
            Ok(Reaction::Refresh) => self.sync(desired, true).await,
            Err(err) => {
                if let SessionError::Protocol { notification, .. } = &err {
                    let _ = self.write(&notification.encode()).await;
                }
                Err(err.into())
            }
        }
    }

    /// Makes the router's view match `desired` (`again`: re-send an announcement it has).
    async fn sync(&mut self, desired: &mut watch::Receiver<Desired>, again: bool) -> Result<(), PeerError> {
        let want = desired.borrow_and_update().clone();
        let announce = want == Desired::Announce;
        if announce == self.announced && !(again && announce) {
            return Ok(());
        }
        let prefixes = &self.config.prefixes;
        let msgs = if announce {
            self.session.announce(prefixes, self.next_hop, &self.config.communities)
        } else {
            self.session.withdraw(prefixes)
        };
        for m in &msgs {
            self.write(m).await?;
        }
        self.announced = announce;
        self.status.send_modify(|s| s.announced = announce);
        self.metrics.bgp_announced.get_or_create(self.label).set(i64::from(announce));
        match want {
            Desired::Announce => tracing::info!(
                peer = %self.config.addr,
                prefixes = ?prefixes,
                next_hop = %self.next_hop,
                "BGP: mobile prefixes announced"
            ),
            Desired::Withdraw(why) => {
                tracing::info!(peer = %self.config.addr, prefixes = ?prefixes, reason = %why, "BGP: mobile prefixes withdrawn")
            }
        }
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), PeerError> {
        match timeout(WRITE_TIMEOUT, self.wr.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PeerError::Io("write", e)),
            Err(_) => Err(PeerError::Timeout("write")),
        }
    }
}
