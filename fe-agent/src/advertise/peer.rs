//! One BGP peer (the site's border router): connects to it, runs a [`Session`] over TCP, keeps the
//! session alive (KEEPALIVEs, hold timer) and keeps the router's view of our prefixes equal to the
//! desired one — announced while the FE is healthy, withdrawn otherwise, for each address family
//! the session negotiated and has a next hop for ([`super::nexthop`], read when it connects).
//! Reconnects with backoff. On stop it closes with a Cease NOTIFICATION. If the agent process
//! dies, the kernel closes the connection and the router withdraws at once; if the agent hangs,
//! the router's hold timer does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use victor_daemon::Backoff;

use super::nexthop::{self, Configured, LinkAddresses};
use super::session::{Families, Params, Reaction, Routes, Session, SessionError, State};
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
    /// Where the router listens (IPv4 or IPv6).
    pub addr: SocketAddr,
    /// Session parameters.
    pub params: Params,
    /// Configured next hops; a family without one uses this FE's address towards the router.
    pub next_hops: Configured,
    /// Communities on our routes.
    pub communities: Vec<Community>,
    /// The IPv4 prefixes.
    pub prefixes: Vec<Ipv4Net>,
    /// The IPv6 prefixes.
    pub prefixes6: Vec<Ipv6Net>,
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
                let (routes, link) = routes_towards(&config, &stream).await;
                let mut conn = Connection::new(&config, stream, routes, link, &label, &metrics, &ch.status);
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

/// Our prefixes with their next hops on the connection `stream` to the router, and the name of
/// the interface it runs over.
async fn routes_towards(config: &PeerConfig, stream: &TcpStream) -> (Routes, String) {
    let mut link = LinkAddresses::default();
    let next_hops = match stream.local_addr() {
        Ok(local) => {
            match nexthop::link_of(local.ip()).await {
                Ok(Some(found)) => link = found,
                Ok(None) => tracing::debug!(peer = %config.addr, %local, "no interface has the session's address"),
                Err(e) => tracing::warn!(peer = %config.addr, error = %e, "cannot read the interface addresses"),
            }
            nexthop::choose(local.ip(), config.addr.ip(), config.next_hops, &link)
        }
        Err(e) => {
            tracing::warn!(peer = %config.addr, error = %e, "the connection has no local address");
            nexthop::NextHops { v4: config.next_hops.v4, v6: None }
        }
    };
    let routes = Routes {
        v4: config.prefixes.clone(),
        next_hop4: next_hops.v4,
        v6: config.prefixes6.clone(),
        next_hop6: next_hops.v6,
    };
    (routes, link.name)
}

/// Why a family of ours is not announced on a session that negotiated `families`, per family
/// that has prefixes but is not sent.
fn not_announced(routes: &Routes, families: Families, link: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (name, has, negotiated, next_hop, flag) in [
        ("IPv4", !routes.v4.is_empty(), families.ipv4, routes.next_hop4.is_some(), "--bgp-next-hop"),
        ("IPv6", !routes.v6.is_empty(), families.ipv6, routes.next_hop6.is_some(), "--bgp-next-hop6"),
    ] {
        if !has {
            continue;
        }
        if !negotiated {
            out.push(format!(
                "the router did not negotiate {name} unicast: the {name} mobile prefixes are not announced"
            ));
        } else if !next_hop {
            let link = if link.is_empty() { "the interface towards the router" } else { link };
            out.push(format!(
                "no {name} next hop: {link} has no usable {name} address and {flag} is not set; \
                 the {name} mobile prefixes are not announced"
            ));
        }
    }
    out
}

/// One TCP connection to the router.
struct Connection<'a> {
    config: &'a PeerConfig,
    rd: tokio::net::tcp::OwnedReadHalf,
    wr: OwnedWriteHalf,
    session: Session,
    /// Our prefixes and their next hops on this connection.
    routes: Routes,
    /// The interface towards the router (for the log).
    link: String,
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
        routes: Routes,
        link: String,
        label: &'a PeerLabel,
        metrics: &'a Metrics,
        status: &'a watch::Sender<PeerStatus>,
    ) -> Self {
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        Connection {
            config,
            rd,
            wr,
            session: Session::new(config.params),
            routes,
            link,
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
                    families = %n.families,
                    next_hop = ?self.routes.next_hop4,
                    next_hop6 = ?self.routes.next_hop6,
                    "BGP session established"
                );
                for why in not_announced(&self.routes, n.families, &self.link) {
                    tracing::warn!(peer = %self.config.addr, "BGP: {why}");
                }
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
        let msgs = if announce {
            self.session.announce(&self.routes, &self.config.communities)
        } else {
            self.session.withdraw(&self.routes)
        };
        for m in &msgs {
            self.write(m).await?;
        }
        self.announced = announce;
        self.status.send_modify(|s| s.announced = announce);
        self.metrics.bgp_announced.get_or_create(self.label).set(i64::from(announce));
        let families = self.session.sendable(&self.routes);
        let r = &self.routes;
        let (v4, v6) = (families.ipv4.then_some(&r.v4), families.ipv6.then_some(&r.v6));
        match want {
            Desired::Announce => tracing::info!(
                peer = %self.config.addr,
                prefixes = ?v4,
                next_hop = ?families.ipv4.then_some(r.next_hop4).flatten(),
                prefixes6 = ?v6,
                next_hop6 = ?families.ipv6.then_some(r.next_hop6).flatten(),
                "BGP: mobile prefixes announced"
            ),
            Desired::Withdraw(why) => tracing::info!(
                peer = %self.config.addr,
                prefixes = ?v4,
                prefixes6 = ?v6,
                reason = %why,
                "BGP: mobile prefixes withdrawn"
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_that_are_not_announced_say_why() {
        let routes = Routes {
            v4: vec!["10.10.0.0/16".parse().unwrap()],
            next_hop4: Some("203.0.113.2".parse().unwrap()),
            v6: vec!["2001:db8:a::/48".parse().unwrap()],
            next_hop6: None,
        };
        let both = Families { ipv4: true, ipv6: true };
        let why = not_announced(&routes, both, "up0");
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("up0 has no usable IPv6 address and --bgp-next-hop6 is not set"), "{why:?}");
        let why = not_announced(&routes, Families { ipv4: true, ipv6: false }, "up0");
        assert!(why[0].contains("did not negotiate IPv6 unicast"), "{why:?}");
        // Nothing to say when every family with prefixes goes out, or a family has none.
        let full = Routes {
            next_hop6: Some(crate::codec::bgp::NextHop6 { global: "2001:db8::2".parse().unwrap(), link_local: None }),
            ..routes.clone()
        };
        assert!(not_announced(&full, both, "up0").is_empty());
        let v4_only = Routes { v6: vec![], ..routes };
        assert!(not_announced(&v4_only, Families { ipv4: true, ipv6: false }, "up0").is_empty());
    }
}
