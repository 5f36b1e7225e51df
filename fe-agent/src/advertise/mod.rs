//! The advertiser: every FE announces the mobile prefixes to the routers outside VICTOR, so a
//! client's packets enter at the nearest FE — while, and only while, this FE can forward them.
//!
//! The agent is its own BGP speaker, like ExaBGP or GoBGP used as route injectors: it holds one
//! BGP session per configured router (`--bgp-peer`, the site's BIRD/FRR/any BGP router), announces
//! the mobile prefixes with itself as next hop while the FE is healthy ([`health`]) and withdraws
//! them when it is not. The announcement lives exactly as long as the agent: a clean stop
//! withdraws first and keeps forwarding for `--bgp-shutdown-drain` while the routers move the
//! traffic; a crash (even `kill -9`) closes the TCP session in the kernel and the router
//! withdraws at once; a hung agent stops sending KEEPALIVEs and the router's hold timer
//! withdraws. Nothing is left behind in the kernel or in the router's configuration for a dead
//! agent to keep exporting. docs/bgp.md explains the choice and has the router configurations.
//!
//! IPv4 and IPv6 mobile prefixes are announced side by side (multiprotocol BGP, RFC 4760), over an
//! IPv4 or an IPv6 session, each family only to a router that negotiated it.
//!
//! The BGP-4 message codec is [`crate::codec::bgp`]; here:
//! * [`session`] — the session state machine (pure);
//! * [`peer`] — one router: TCP, timers, reconnects, announce/withdraw;
//! * [`nexthop`] — the next hop of each family on a session (configured, or next-hop self);
//! * [`health`] — the verdict: synced and fresh (or headless within the grace), data plane up.

pub mod health;
pub mod nexthop;
pub mod peer;
pub mod session;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::codec::bgp::Community;
use crate::metrics::{KindLabel, Metrics};
use crate::readiness::Readiness;
use health::{Cause, Device, DeviceProbe, Verdict, judge};
use nexthop::Configured;
use peer::{Channels, Desired, PeerConfig, PeerStatus};
use session::{Families, Params};

/// How often health is evaluated (the withdrawal delay after a failure is at most this).
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// What to announce, to whom.
#[derive(Debug, Clone)]
pub struct AdvertiseConfig {
    /// The routers (IPv4 or IPv6 addresses).
    pub peers: Vec<SocketAddr>,
    /// Our AS.
    pub local_as: u32,
    /// The routers' AS.
    pub peer_as: u32,
    /// Our BGP identifier.
    pub router_id: Ipv4Addr,
    /// Hold time we propose (s).
    pub hold_time: u16,
    /// NEXT_HOP of the IPv4 prefixes; None = this FE's IPv4 address towards each router.
    pub next_hop: Option<Ipv4Addr>,
    /// Next hop of the IPv6 prefixes; None = this FE's global IPv6 address (and link-local one)
    /// on the interface towards each router.
    pub next_hop6: Option<Ipv6Addr>,
    /// Communities on the routes.
    pub communities: Vec<Community>,
    /// The IPv4 mobile prefixes.
    pub prefixes: Vec<Ipv4Net>,
    /// The IPv6 mobile prefixes.
    pub prefixes6: Vec<Ipv6Net>,
}

/// What health is judged from.
#[derive(Debug)]
pub struct HealthInputs {
    /// The agent's readiness (synced; stream up or headless within the grace period).
    pub readiness: Arc<Readiness>,
    /// The data-plane device.
    pub device: DeviceProbe,
}

/// The running advertiser.
#[derive(Debug)]
pub struct Advertiser {
    shutdown: Option<oneshot::Sender<()>>,
    health: JoinHandle<watch::Sender<Desired>>,
    stop: watch::Sender<bool>,
    statuses: Vec<watch::Receiver<PeerStatus>>,
    peers: JoinSet<()>,
}

impl Advertiser {
    /// Starts the health watch and one task per router.
    pub fn spawn(config: AdvertiseConfig, inputs: HealthInputs, metrics: Arc<Metrics>) -> Advertiser {
        let (desired_tx, desired_rx) = watch::channel(Desired::Withdraw("starting".into()));
        let (stop, stop_rx) = watch::channel(false);
        let (shutdown, shutdown_rx) = oneshot::channel();
        let mut peers = JoinSet::new();
        let mut statuses = Vec::new();
        let families = Families { ipv4: !config.prefixes.is_empty(), ipv6: !config.prefixes6.is_empty() };
        for addr in &config.peers {
            let (status, status_rx) = watch::channel(PeerStatus::default());
            statuses.push(status_rx);
            let peer = PeerConfig {
                addr: *addr,
                params: Params {
                    local_as: config.local_as,
                    peer_as: config.peer_as,
                    router_id: config.router_id,
                    hold_time: config.hold_time,
                    families,
                },
                next_hops: Configured { v4: config.next_hop, v6: config.next_hop6 },
                communities: config.communities.clone(),
                prefixes: config.prefixes.clone(),
                prefixes6: config.prefixes6.clone(),
            };
            let channels = Channels { desired: desired_rx.clone(), stop: stop_rx.clone(), status };
            peers.spawn(peer::run(peer, channels, metrics.clone()));
        }
        let health = tokio::spawn(watch_health(inputs, desired_tx, shutdown_rx, metrics));
        Advertiser { shutdown: Some(shutdown), health, stop, statuses, peers }
    }

    /// Withdraws everywhere, keeps the caller alive (forwarding) for `drain` if anything had been
    /// announced, then closes every session with a Cease.
    pub async fn shutdown(mut self, drain: Duration) {
        let was_announced = self.statuses.iter().any(|s| s.borrow().announced);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // The sender stays alive until the sessions are closed (peers end when it goes).
        let _desired = (&mut self.health).await;
        let written = async {
            for status in &mut self.statuses {
                let _ = status.wait_for(|s| !s.announced).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), written).await.is_err() {
            tracing::warn!("BGP: a withdrawal could not be sent within 2 s; closing the sessions instead");
        }
        if was_announced && !drain.is_zero() {
            tracing::info!(?drain, "BGP: withdrawn; still forwarding while the routers move the traffic away");
            tokio::time::sleep(drain).await;
        }
        let _ = self.stop.send(true);
        let closed = async { while self.peers.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), closed).await.is_err() {
            self.peers.abort_all();
        }
    }
}

/// Judges health every [`HEALTH_INTERVAL`] and publishes what the routers should see; on
/// shutdown publishes the withdrawal and returns the sender.
async fn watch_health(
    inputs: HealthInputs,
    desired: watch::Sender<Desired>,
    mut shutdown: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
) -> watch::Sender<Desired> {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expected = None;
    let mut last: Option<Option<Cause>> = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                if last == Some(None) {
                    metrics.bgp_withdrawals.get_or_create(&KindLabel { kind: Cause::Shutdown.label() }).inc();
                }
                metrics.bgp_healthy.set(0);
                desired.send_replace(Desired::Withdraw("the agent is stopping".into()));
                return desired;
            }
            _ = tick.tick() => {}
        }
        let device = inputs.device.probe().await;
        if let Device::Present { ifindex, .. } = device {
            expected.get_or_insert(ifindex);
        }
        if let Device::Unknown(err) = &device {
            tracing::debug!(device = inputs.device.name(), %err, "cannot read the data-plane device");
        }
        let synced = inputs.readiness.synced.load(Ordering::Relaxed);
        let verdict =
            judge(synced, inputs.readiness.check(), inputs.device.name(), &device, expected.unwrap_or_default());
        let cause = match &verdict {
            Verdict::Healthy => None,
            Verdict::Unhealthy { cause, .. } => Some(*cause),
        };
        if last == Some(cause) {
            continue;
        }
        match (&verdict, cause) {
            (Verdict::Healthy, _) => tracing::info!("FE healthy: announcing the mobile prefixes"),
            (_, Some(c)) => {
                if last == Some(None) {
                    metrics.bgp_withdrawals.get_or_create(&KindLabel { kind: c.label() }).inc();
                    tracing::warn!(reason = %verdict, "FE unhealthy: withdrawing the mobile prefixes");
                } else {
                    tracing::info!(reason = %verdict, "not announcing the mobile prefixes yet");
                }
            }
            _ => {}
        }
        metrics.bgp_healthy.set(i64::from(cause.is_none()));
        desired.send_replace(match verdict {
            Verdict::Healthy => Desired::Announce,
            Verdict::Unhealthy { detail, .. } => Desired::Withdraw(detail),
        });
        last = Some(cause);
    }
}
