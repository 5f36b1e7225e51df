//! The engine: one task that owns the desired state, the VMs seen here, the move hints and the
//! reconciler, and turns every input ([`Input`]) — stream messages, VM-port frames (ARP, RARP,
//! NDP), claim answers,
//! move hints, port changes, timer ticks — into the smallest set of kernel and data-plane
//! changes. Because one task owns all of it, there are no locks around forwarding state and the
//! order of changes is the order of events. [`Engine::handle`] takes one input at a time, so the
//! event sequences of a move are tested as sequences of calls (`tests`), on in-memory effects.

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use victor_dataplane::neigh_io::Frame;
use victor_dataplane::packet::arp::ArpMessage;
use victor_dataplane::packet::ndp::NdpMessage;
use victor_dataplane::packet::rarp::RarpMessage;
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::{ClaimOutcome, RejectReason, SyncPhase, SyncUpdate};

use crate::clock::{Stamps, WallClock};
use crate::events::EventLog;
use crate::hint::Hints;
use crate::hint::io::Received;
use crate::link::LinkControl;
use crate::link::feed::LinkEvent;
use crate::link::reporter::{Answered, Observation, Reporter, Subject};
use crate::metrics::{KindLabel, Metrics};
use crate::neigh::arp::{self as classify, Scope, TargetView};
use crate::neigh::ndp;
use crate::neigh::rarp::{self, Announcements};
use crate::neigh::{NeighFrame, NeighPorts};
use crate::ports::{PortEvent, PortTable};
use crate::readiness::Readiness;
use crate::reconcile::effects::Effects;
use crate::reconcile::{Applied, Reconciler};
use crate::state::desired::DesiredState;
use crate::state::known::KnownRevisions;
use crate::state::local::{Ageing, ClaimAnswer, Learn, LocalVms, Resolution, Sighting, Timers};
use crate::state::{Target, desired_view, target};

/// How often the engine runs its timers (ageing, retries, gauges).
const TICK: Duration = Duration::from_millis(100);
/// Between refreshes of the gauges.
const GAUGES_INTERVAL: u64 = 1_000_000_000;
/// Between discovery probes of a VM bound here whose port is unknown.
const DISCOVERY_INTERVAL: u64 = 1_000_000_000;

/// One input of the engine.
#[derive(Debug)]
pub enum Input {
    /// From the controller link.
    Link(LinkEvent),
    /// Claim answers from the reporter.
    Answers(Answered),
    /// A frame from a VM port (ARP, RARP or NDP).
    Neigh(NeighFrame),
    /// A VM port appeared or left.
    Port(PortEvent),
    /// A move hint that passed the socket's screening.
    Hint(Received),
    /// The timers (every 100 ms).
    Tick,
}

/// The input channels of the running engine.
#[derive(Debug)]
pub struct Inputs {
    /// From the controller link.
    pub link: mpsc::Receiver<LinkEvent>,
    /// Claim answers from the reporter.
    pub answers: mpsc::Receiver<Answered>,
    /// VM-port frames (ARP, RARP, NDP).
    pub neigh: mpsc::Receiver<NeighFrame>,
    /// Port changes.
    pub ports: mpsc::Receiver<PortEvent>,
    /// Move hints that passed the socket's screening (None: hints off).
    pub hints: Option<mpsc::Receiver<Received>>,
}

/// What the engine is built from (the tasks and shared state around it).
#[derive(Debug)]
pub struct Parts<E> {
    /// This FE's id.
    pub fe_id: String,
    /// Ageing and hold times of the VMs seen here.
    pub timers: Timers,
    /// The reconciler, with what a previous run left read back.
    pub reconciler: Reconciler<E>,
    /// IPv4 mobile prefixes and gateways.
    pub scope: Scope,
    /// IPv6 mobile prefixes and gateways.
    pub scope6: ndp::Scope,
    /// VM ports.
    pub ports: Arc<PortTable>,
    /// Neighbour discovery (ARP, RARP, NDP) on the VM ports.
    pub neigh: NeighPorts,
    /// Reporter handle.
    pub reporter: Reporter,
    /// The link (resync requests).
    pub link: Arc<LinkControl>,
    /// The revision applied completely, where the link resumes (0 = a snapshot is needed).
    pub resume: Arc<AtomicU64>,
    /// Stage timestamps.
    pub events: Arc<Mutex<EventLog>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// Move hints sent and overrides in force.
    pub hints: Hints,
    /// The agent's wall clock (observation times).
    pub clock: WallClock,
}

/// The engine.
pub struct Engine<E> {
    fe_id: String,
    desired: DesiredState,
    local: LocalVms,
    reconciler: Reconciler<E>,
    scope: Scope,
    scope6: ndp::Scope,
    ports: Arc<PortTable>,
    neigh: NeighPorts,
    reporter: Reporter,
    link: Arc<LinkControl>,
    resume: Arc<AtomicU64>,
    events: Arc<Mutex<EventLog>>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    /// Discovery probes sent (ip → monotonic ns).
    discovering: HashMap<IpAddr, u64>,
    hints: Hints,
    /// When the gauges were last refreshed (monotonic ns).
    gauges_at: u64,
    /// The stream revisions applied over time (what an observation knew).
    known: KnownRevisions,
    /// This FE's observation times, strictly increasing.
    stamps: Stamps,
    clock: WallClock,
    /// MACs claimed from RARP lately (one claim per announcement).
    announcements: Announcements,
}

impl<E> std::fmt::Debug for Engine<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("fe_id", &self.fe_id).finish_non_exhaustive()
    }
}

impl<E: Effects> Engine<E> {
    /// An engine with an empty desired state.
    pub fn new(parts: Parts<E>) -> Self {
        Engine {
            desired: DesiredState::new(&parts.fe_id),
            local: LocalVms::new(parts.timers),
            fe_id: parts.fe_id,
            reconciler: parts.reconciler,
            scope: parts.scope,
            scope6: parts.scope6,
            ports: parts.ports,
            neigh: parts.neigh,
            reporter: parts.reporter,
            link: parts.link,
            resume: parts.resume,
            events: parts.events,
            metrics: parts.metrics,
            readiness: parts.readiness,
            discovering: HashMap::new(),
            hints: parts.hints,
            gauges_at: 0,
            known: KnownRevisions::default(),
            stamps: Stamps::default(),
            clock: parts.clock,
            announcements: Announcements::default(),
        }
    }

    /// Runs until every input closes.
    pub async fn run(mut self, mut inputs: Inputs) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let input = tokio::select! {
                Some(frame) = inputs.neigh.recv() => Input::Neigh(frame),
                Some(event) = inputs.link.recv() => Input::Link(event),
                Some(answered) = inputs.answers.recv() => Input::Answers(answered),
                Some(event) = inputs.ports.recv() => Input::Port(event),
                Some(hint) = recv_opt(&mut inputs.hints) => Input::Hint(hint),
                _ = tick.tick() => Input::Tick,
                else => return,
            };
            self.handle(input).await;
        }
    }

    /// Acts on one input.
    pub async fn handle(&mut self, input: Input) {
        match input {
            Input::Link(event) => self.on_link(event).await,
            Input::Answers(answered) => self.on_answers(answered).await,
            Input::Neigh(frame) => self.on_frame(frame).await,
            Input::Port(event) => self.on_port(event).await,
            Input::Hint(hint) => self.on_hint(hint).await,
            Input::Tick => {
                self.on_tick().await;
                let now = monotonic_ns();
                if now.saturating_sub(self.gauges_at) >= GAUGES_INTERVAL {
                    self.refresh_gauges();
                    self.gauges_at = now;
                }
            }
        }
    }

    /// What `ip` should get from this FE now.
    fn target(&self, ip: IpAddr) -> Target {
        target(&self.desired, &self.local, self.hints.peer(ip), ip)
    }

    /// Makes `ip` match its target and does what the change implies (gateway announcement on a
    /// port a VM just arrived on; discovery of a VM bound here on an unknown port). The data
    /// plane's announced migration of `ip` follows the desired state (a move hint does not touch
    /// it), after the target: a relay ends only once the new path is programmed.
    async fn reconcile(&mut self, ip: IpAddr) -> Applied {
        let t = self.target(ip);
        let applied = self.reconciler.apply(ip, t).await;
        self.reconciler.set_migration(ip, self.desired.migration_target(ip));
        if let Some(port) = applied.became_local_on {
            self.announce_gateways(port);
        }
        if applied.discover {
            self.discover(ip, t);
        } else {
            self.discovering.remove(&ip);
        }
        applied
    }

    async fn on_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Sync { update, received_mono, received_wall } => {
                self.on_sync(&update, received_mono, received_wall).await;
            }
            LinkEvent::StreamEnded => {
                self.readiness.connected.store(false, Ordering::Relaxed);
                // A snapshot cut short is dropped; the next stream resumes from what is complete.
                self.desired.abort_snapshot();
                self.resume.store(self.desired.revision(), Ordering::Release);
            }
            LinkEvent::Connected { generation } => {
                self.readiness.connected.store(true, Ordering::Relaxed);
                if generation > 1 {
                    // Back after a disconnection: report every VM still here again with its
                    // original observation (the controller may have lost or aged them).
                    let again: Vec<_> = self
                        .local
                        .iter()
                        .filter(|(_, vm)| vm.is_ours())
                        .map(|(ip, vm)| (ip, vm.mac, vm.observed_at, vm.known_revision, vm.port))
                        .collect();
                    for (ip, mac, observed_at, known, port) in again {
                        self.report(Subject::Learned(ip), mac, observed_at, known, port);
                    }
                }
            }
        }
    }

    async fn on_sync(&mut self, update: &SyncUpdate, received_mono: u64, received_wall: i64) {
        let phase = SyncPhase::try_from(update.phase).unwrap_or(SyncPhase::Unspecified);
        self.metrics.stream_messages.get_or_create(&KindLabel { kind: phase_label(phase) }).inc();
        if update.sent_at_unix_nanos > 0 {
            self.metrics.stream_lag_micros.set((received_wall - update.sent_at_unix_nanos) / 1000);
        }
        self.readiness.last_message_mono.store(received_mono, Ordering::Relaxed);
        let applied = match self.desired.apply(update) {
            Ok(applied) => applied,
            Err(err) => {
                tracing::warn!(%err, "cannot apply a stream message; asking for a full resync");
                self.resume.store(0, Ordering::Release);
                self.link.resync.notify_one();
                return;
            }
        };
        if applied.skipped > 0 {
            tracing::warn!(skipped = applied.skipped, "stream entries skipped (malformed)");
        }
        let mut todo: Vec<IpAddr> = Vec::with_capacity(applied.bindings.len());
        for &(ip, revision) in &applied.bindings {
            self.local.desired_changed(ip, revision, desired_view(&self.desired, ip));
            self.hints.desired_changed(ip, &self.desired);
            todo.push(ip);
        }
        if !update.fe_upserts.is_empty() || !update.fe_removals.is_empty() || applied.snapshot_completed {
            // An override lasts only while its sender is a registered FE that is up.
            todo.extend(self.hints.senders_changed(&self.desired));
        }
        if !applied.fes.is_empty() {
            // Tunnels to an FE whose underlay address changed (or that left) change with it.
            self.reconciler.set_peers(&self.desired.peers()).await;
            let changed: std::collections::HashSet<u32> = applied.fes.iter().map(|f| f.0).collect();
            todo.extend(self.desired.bindings().filter(|(_, b)| changed.contains(&b.fe)).map(|(ip, _)| ip));
            // Relays to an FE whose underlay address changed (or that left) change with it.
            todo.extend(self.desired.announced_to(&changed));
        }
        if applied.snapshot_completed {
            // Stale removal: whatever is programmed locally that the new state does not want.
            todo.extend(self.reconciler.local_ips());
            self.metrics.snapshots_received.inc();
            tracing::info!(revision = update.revision, bindings = self.desired.len(), "snapshot applied");
        }
        todo.sort_unstable();
        todo.dedup();
        let record = phase == SyncPhase::Delta;
        for ip in todo {
            self.reconcile(ip).await;
            if record && let Some(b) = self.desired.binding(ip) {
                let fe = self.desired.fes().get(b.fe).map(|f| f.id.to_string()).unwrap_or_default();
                let local = b.fe == self.desired.me();
                self.events.lock().expect("events").delta_applied(
                    ip,
                    b.move_seq,
                    &fe,
                    local,
                    received_mono,
                    monotonic_ns(),
                );
            }
        }
        if applied.snapshot_completed {
            self.readiness.synced.store(true, Ordering::Relaxed);
        }
        // Stamped once everything is applied: a frame captured meanwhile knew the older revision.
        self.known.applied(self.desired.revision(), monotonic_ns());
        self.reverify();
        self.metrics.stream_revision.set(self.desired.revision() as i64);
        self.resume.store(self.desired.revision(), Ordering::Release);
    }

    /// Probes the VMs whose STALE claim waited for a revision the desired state now has.
    fn reverify(&mut self) {
        for probe in self.local.reverify(self.desired.revision(), monotonic_ns()) {
            if let Ageing::Probe { ip, mac, port } = probe
                && let Some(p) = self.ports.get(port)
            {
                tracing::debug!(%ip, port = %p.name, "stale claim: the stream has caught up; probing the VM");
                self.probe(port, p.mac, ip, mac);
            }
        }
    }

    async fn on_frame(&mut self, frame: NeighFrame) {
        match frame.frame {
            Frame::Arp(msg) => self.on_arp(&frame, &msg).await,
            Frame::Ndp(msg) => self.on_ndp(&frame, &msg).await,
            Frame::Rarp(msg) => self.on_rarp(&frame, &msg).await,
        }
    }

    /// Where the mobile IP `t` asked about on `port` is, seen from that port.
    fn view(&self, t: IpAddr, port: u32) -> TargetView {
        match self.target(t) {
            Target::Local { port: Some(p), .. } if p == port => TargetView::SamePort,
            Target::Local { port: None, .. } if self.reconciler.local_port(t) == Some(port) => TargetView::SamePort,
            Target::Local { .. } | Target::Remote(_) => TargetView::ReachedThroughUs,
            Target::Drop => TargetView::Unbound,
        }
    }

    async fn on_arp(&mut self, frame: &NeighFrame, msg: &ArpMessage) {
        self.metrics.arp_frames.get_or_create(&KindLabel { kind: classify::kind_label(msg.kind()) }).inc();
        // Answer first: the asker is waiting.
        let port = frame.port.ifindex;
        if let Some(answer) = classify::answer(msg, &self.scope, |t| self.view(IpAddr::V4(t), port)) {
            self.neigh.send(port, &classify::reply(msg, frame.port.mac), answer.label());
        }
        let Some((ip, mac)) = classify::learned(msg, &self.scope) else { return };
        self.learn(frame, vec![IpAddr::V4(ip)], mac, Siblings::Follow).await;
    }

    /// An NDP frame: proxy NDP and the gateway's advertisements first, then what it teaches.
    async fn on_ndp(&mut self, frame: &NeighFrame, msg: &NdpMessage) {
        self.metrics.ndp_frames.get_or_create(&KindLabel { kind: ndp::kind_label(msg.kind()) }).inc();
        let port = frame.port.ifindex;
        if let Some(answer) = ndp::answer(msg, &self.scope6, |t| self.view(IpAddr::V6(t), port))
            && let Some(reply) = ndp::reply(msg, frame.port.mac, answer)
        {
            self.neigh.send_ndp(port, &reply, answer.label());
        }
        let Some((ip, mac)) = ndp::learned(msg, &self.scope6) else { return };
        self.learn(frame, vec![IpAddr::V6(ip)], mac, Siblings::Follow).await;
    }

    /// A RARP frame (docs/design.md, section 3, "MAC claims"): every IP the desired state binds
    /// to its MAC is sighted as by a gratuitous ARP, and the first frame of an announcement sends
    /// one MAC claim, which the controller expands to every IP bound or declared with the MAC.
    async fn on_rarp(&mut self, frame: &NeighFrame, msg: &RarpMessage) {
        self.metrics.rarp_frames.get_or_create(&KindLabel { kind: rarp::kind_label(msg) }).inc();
        let Some(mac) = rarp::claimed(msg) else { return };
        // Stamped before the sightings of the same frame: for an IP they claim, the MAC claim is
        // the older observation and the controller writes nothing more for it.
        let claim = self
            .announcements
            .starts(mac, frame.mono)
            .then(|| (self.known.at(frame.mono), self.stamps.stamp(frame.wall)));
        let ips = rarp::bound_to(&self.desired, mac, &self.scope, &self.scope6);
        self.learn(frame, ips, mac, Siblings::Included).await;
        if let Some((known, at)) = claim {
            tracing::info!(mac = %victor_proto::Mac(mac), port = %frame.port.name, "RARP: claiming the MAC's IPs");
            self.reporter.submit(Observation::mac_claim(mac, at, known, frame.port.name.clone()));
        }
    }

    /// The VM at `mac` was heard on the frame's port with `ips` (ARP or NDP: the one IP of the
    /// frame; RARP: every IP bound to the MAC): a claim, a port change or a refresh of each.
    ///
    /// MAC mobility (docs/design.md, section 3, "MAC claims"): when the frame claims its IP here,
    /// the other IPs the desired state binds to the same MAC come with it (`Siblings::Follow`), so a
    /// dual-stack VM's gratuitous ARP moves its IPv6 address as well, without waiting for its
    /// Neighbor Advertisement to be read after the IPv4 install. Every claim is reported before
    /// the first local install, and each is installed before its move hint (make-before-break).
    async fn learn(&mut self, frame: &NeighFrame, mut ips: Vec<IpAddr>, mac: [u8; 6], siblings: Siblings) {
        let port = frame.port.ifindex;
        // What this FE knew when the kernel captured the frame, not now: a delta applied since
        // must not lend a late frame its knowledge.
        let known = self.known.at(frame.mono);
        let mut claimed = Vec::new();
        let mut refresh = Vec::new();
        let mut follow = siblings == Siblings::Follow;
        let mut next = 0;
        while let Some(&ip) = ips.get(next) {
            next += 1;
            let wall = self.stamps.stamp(frame.wall);
            let sighting = Sighting { ip, mac, port, wall, mono: frame.mono, known };
            match self.local.sighting(sighting, desired_view(&self.desired, ip)) {
                Learn::Claim { observed_at } => {
                    self.events.lock().expect("events").captured(ip, observed_at, frame.mono);
                    // Make-before-break: the claim goes out, and the VM is local before any answer.
                    self.report(Subject::Learned(ip), mac, observed_at, known, port);
                    claimed.push((ip, observed_at));
                    if std::mem::take(&mut follow) {
                        let others = rarp::bound_to(&self.desired, mac, &self.scope, &self.scope6);
                        ips.extend(others.into_iter().filter(|other| *other != ip));
                    }
                }
                Learn::Moved => refresh.push(ip),
                Learn::Refreshed => {
                    if self.discovering.contains_key(&ip) || self.reconciler.local_port(ip).is_none() {
                        refresh.push(ip);
                    }
                }
                Learn::Suppressed => {}
            }
        }
        for (ip, observed_at) in claimed {
            let applied = self.reconcile(ip).await;
            if applied.ops > 0 {
                self.metrics.provisional_installs.inc();
            }
            self.events.lock().expect("events").provisional_applied(ip, monotonic_ns());
            if applied.failed == 0 && self.reconciler.local_port(ip) == Some(port) {
                // Delivered here now: the other FEs may point at us before the controller's
                // delta (make-before-break: never before the local route exists).
                self.hints.claimed(ip, mac, observed_at, &self.desired);
            }
            tracing::info!(%ip, mac = %victor_proto::Mac(mac), port = %frame.port.name, "VM claimed");
        }
        for ip in refresh {
            self.reconcile(ip).await;
        }
    }

    async fn on_answers(&mut self, answered: Answered) {
        let now = monotonic_ns();
        for (obs, result) in answered.observations.iter().zip(&answered.results) {
            let outcome = ClaimOutcome::try_from(result.outcome).unwrap_or(ClaimOutcome::Unspecified);
            let reason = RejectReason::try_from(result.reject_reason).unwrap_or(RejectReason::Unspecified);
            self.metrics.claim_result(outcome, reason);
            let ip = match obs.subject {
                Subject::Learned(ip) => ip,
                Subject::Gone(_) => continue,
                Subject::Mac => {
                    for follow_up in rarp::follow_ups(result) {
                        self.after_mac_claim(obs, follow_up);
                    }
                    continue;
                }
            };
            let answer = match outcome {
                ClaimOutcome::Bound | ClaimOutcome::Moved | ClaimOutcome::Unchanged => {
                    ClaimAnswer::Accepted { revision: result.revision }
                }
                ClaimOutcome::Rejected if reason == RejectReason::Stale && result.revision > 0 => {
                    tracing::info!(%ip, wait_for = result.revision, message = %result.message, "claim stale; will probe the VM once the stream has the revision");
                    ClaimAnswer::Stale { revision: result.revision }
                }
                ClaimOutcome::Rejected => {
                    tracing::warn!(%ip, reason = reason.as_str_name(), message = %result.message, "claim rejected");
                    ClaimAnswer::Rejected { reason: result.reject_reason }
                }
                _ => continue,
            };
            if matches!(outcome, ClaimOutcome::Bound | ClaimOutcome::Moved) {
                let label = outcome.as_str_name().trim_start_matches("CLAIM_OUTCOME_").to_ascii_lowercase();
                self.events.lock().expect("events").claim_answered(
                    ip,
                    obs.observed_at,
                    result.move_seq,
                    &self.fe_id,
                    &label,
                    answered.sent_mono,
                    answered.answered_mono,
                );
            }
            let rejected = matches!(answer, ClaimAnswer::Rejected { .. });
            self.hints.claim_answered(ip, obs.observed_at, rejected, &self.desired);
            let view = desired_view(&self.desired, ip);
            match self.local.resolved(ip, obs.mac, obs.observed_at, answer, now, view) {
                Resolution::Undo => {
                    self.metrics.claims_undone.inc();
                    self.reconcile(ip).await;
                }
                Resolution::Kept | Resolution::Stale => {
                    self.reconcile(ip).await;
                }
            }
        }
        // A STALE answer may name a revision the stream has already delivered.
        self.reverify();
    }

    async fn on_port(&mut self, event: PortEvent) {
        match event {
            PortEvent::Up(port) => {
                self.neigh.open(&port);
                // VMs bound here whose port is unknown may be behind the new port.
                let waiting: Vec<IpAddr> = self.discovering.keys().copied().collect();
                for ip in waiting {
                    if let Target::Local { mac, .. } = self.target(ip) {
                        self.probe(port.ifindex, port.mac, ip, mac);
                    }
                }
            }
            PortEvent::Gone(ifindex) => {
                self.neigh.close(ifindex);
                let mut ips = self.reconciler.port_gone(ifindex);
                ips.extend(self.local.port_gone(ifindex));
                ips.sort();
                ips.dedup();
                for ip in ips {
                    self.reconcile(ip).await;
                }
            }
        }
    }

    async fn on_tick(&mut self) {
        let now = monotonic_ns();
        for action in self.local.age(now) {
            match action {
                Ageing::Probe { ip, mac, port } => {
                    if let Some(p) = self.ports.get(port) {
                        self.probe(port, p.mac, ip, mac);
                    }
                }
                Ageing::Gone { ip, mac, port } => {
                    tracing::info!(%ip, "VM stopped answering probes (ARP or NDP); reporting it gone");
                    let at = self.stamps.stamp(self.clock.now());
                    self.report(Subject::Gone(ip), mac, at, self.desired.revision(), port);
                    self.reconcile(ip).await;
                }
            }
        }
        for ip in self.hints.tick(now) {
            self.reconcile(ip).await;
        }
        for ip in self.reconciler.take_dirty() {
            self.reconcile(ip).await;
        }
        let due: Vec<IpAddr> = self
            .discovering
            .iter()
            .filter(|(_, sent)| now.saturating_sub(**sent) >= DISCOVERY_INTERVAL)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            self.reconcile(ip).await;
        }
    }

    async fn on_hint(&mut self, hint: Received) {
        if let Some(ip) = self.hints.received(hint, &self.desired, &self.local) {
            self.reconcile(ip).await;
            self.hints.applied(ip, monotonic_ns());
        }
    }

    /// Acts on the controller's answer for one IP of a MAC claim (`obs`).
    fn after_mac_claim(&self, obs: &Observation, follow_up: rarp::FollowUp) {
        match follow_up {
            rarp::FollowUp::Probe(ip) => {
                // The VM's reply is an ordinary sighting, ordered by the ordinary rules.
                let Some(port) = self.ports.ports().into_iter().find(|p| p.name == obs.port) else { return };
                tracing::debug!(%ip, port = %port.name, "MAC claim stale for this IP; probing the VM");
                self.probe(port.ifindex, port.mac, ip, obs.mac);
            }
        }
    }

    fn refresh_gauges(&self) {
        let (local, remote) = self.desired.counts();
        self.metrics.bindings.get_or_create(&KindLabel { kind: "local" }).set(local as i64);
        self.metrics.bindings.get_or_create(&KindLabel { kind: "remote" }).set(remote as i64);
        self.metrics.local_vms.set(self.local.len() as i64);
        self.metrics.desired_bytes.set(self.desired.heap_bytes() as i64);
        if let Some(bytes) = self.reconciler.effects().table_bytes() {
            self.metrics.fib_bytes.set(bytes as i64);
        }
        self.metrics.reports_queued.set(self.reporter.queued() as i64);
    }

    fn report(&self, subject: Subject, mac: [u8; 6], observed_at: i64, known: u64, port: u32) {
        let port = self.ports.get(port).map(|p| p.name).unwrap_or_default();
        self.reporter.submit(Observation { subject, mac, observed_at, known_revision: known, port });
    }

    /// Tells a VM that arrived on `port` where its gateways are: a gratuitous ARP per IPv4
    /// gateway, an unsolicited Neighbor Advertisement (router flag) per IPv6 gateway.
    fn announce_gateways(&self, port: u32) {
        let Some(p) = self.ports.get(port) else { return };
        for gw in &self.scope.gateways {
            self.neigh.send(port, &classify::gateway_announcement(*gw, p.mac), "announce");
        }
        for gw in &self.scope6.gateways {
            self.neigh.send_ndp(port, &ndp::gateway_announcement(*gw, p.mac), "announce");
        }
    }

    /// Asks the VM `ip` at `mac` on `port` (whose MAC is `port_mac`) to answer: a unicast ARP
    /// request for IPv4, a NUD Neighbor Solicitation for IPv6.
    fn probe(&self, port: u32, port_mac: [u8; 6], ip: IpAddr, mac: [u8; 6]) {
        match ip {
            IpAddr::V4(ip) => {
                let frame = classify::probe(ip, mac, port_mac, self.scope.gateways.first().copied());
                self.neigh.send(port, &frame, "probe");
            }
            IpAddr::V6(ip) => self.neigh.send_ndp(port, &ndp::probe(ip, mac, port_mac, &self.scope6), "probe"),
        }
    }

    /// Probes every VM port for a VM bound here whose port is unknown (at most once a second).
    fn discover(&mut self, ip: IpAddr, t: Target) {
        let Target::Local { mac, .. } = t else { return };
        let now = monotonic_ns();
        if self.discovering.get(&ip).is_some_and(|sent| now.saturating_sub(*sent) < DISCOVERY_INTERVAL) {
            return;
        }
        self.discovering.insert(ip, now);
        for port in self.ports.ports() {
            self.probe(port.ifindex, port.mac, ip, mac);
        }
    }
}

/// Whether a frame that claims its IP also moves the other IPs bound to its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Siblings {
    /// Yes: an ARP or NDP frame names one IP; the MAC's other IPs follow a claim of it.
    Follow,
    /// The frame's IPs already are every IP of the MAC (RARP).
    Included,
}

/// The next message of an optional input (pending forever without one).
async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn phase_label(phase: SyncPhase) -> &'static str {
    match phase {
        SyncPhase::Snapshot => "snapshot",
        SyncPhase::SnapshotEnd => "snapshot_end",
        SyncPhase::Delta => "delta",
        SyncPhase::Heartbeat => "heartbeat",
        SyncPhase::Unspecified => "unspecified",
    }
}
