//! Event sequences of the engine on in-memory effects (no root, no kernel): what the engine
//! programs, and in which order, at each step of a move. FE underlay addresses are on loopback
//! (127.0.0.n), so the move hints the engine sends go to sockets of the test and nowhere else.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use victor_dataplane::neigh_io::Frame;
use victor_dataplane::packet::arp::{ArpOp, MacAddr, gratuitous};
use victor_dataplane::packet::ndp::{dad, unsolicited_advertisement};
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::v1::{
    BindingEntry, ClaimOutcome, ClaimResult, FeEntry, ObservationKind, RejectReason, SyncPhase, SyncUpdate,
};

use super::*;
use crate::codec::hint::{self as codec, Hint, Keys, Kind};
use crate::forwarding::Tunnel;
use crate::hint::io::HintSocket;
use crate::neigh::Captures;
use crate::netlink::Link;
use crate::reconcile::effects::InMemory;
use crate::reconcile::plan::Op;
use crate::state::local::Claim;

const VM: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 11));
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const OTHER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];
/// The VM ports of this FE (fe1): `vm5` and `vm6`.
const PORT: u32 = 5;
const OTHER_PORT: u32 = 6;
const NO_TIMEOUT: u64 = u64::MAX / 4;

fn underlay(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

fn vm(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 10, 0, last))
}

fn mac(last: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, last]
}

fn binding(ip: IpAddr, fe: u8, mac: [u8; 6], move_seq: u64, revision: u64) -> BindingEntry {
    BindingEntry {
        vm_ip: victor_proto::types::ip_to_bytes(ip),
        fe_id: format!("fe{fe}"),
        mac: mac.to_vec(),
        move_seq,
        revision,
        pending_fe_id: String::new(),
    }
}

/// A complete snapshot at `revision`: fe1 (this FE), fe2 and fe3, all up, and `bindings`.
fn snapshot(revision: u64, bindings: Vec<BindingEntry>) -> [SyncUpdate; 2] {
    let fes = (1..=3)
        .map(|n| FeEntry {
            fe_id: format!("fe{n}"),
            underlay_addr: underlay(n).octets().to_vec(),
            up: true,
            revision: u64::from(n),
            ..Default::default()
        })
        .collect();
    let first =
        SyncUpdate { phase: SyncPhase::Snapshot as i32, revision, reset: true, fe_upserts: fes, ..Default::default() };
    let end =
        SyncUpdate { phase: SyncPhase::SnapshotEnd as i32, revision, binding_upserts: bindings, ..Default::default() };
    [first, end]
}

fn delta(revision: u64, bindings: Vec<BindingEntry>) -> SyncUpdate {
    SyncUpdate { phase: SyncPhase::Delta as i32, revision, binding_upserts: bindings, ..Default::default() }
}

/// An engine for fe1 on in-memory effects, with the handles a test looks through.
struct Rig {
    engine: Engine<InMemory>,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    resume: Arc<AtomicU64>,
}

impl Rig {
    fn new(effects: InMemory) -> Rig {
        Rig::build(effects, |metrics, events| Hints::disabled("fe1", metrics, events))
    }

    /// With move hints on, sending from `socket`; overrides end after `timeout_ns` unconfirmed.
    fn with_hints(effects: InMemory, socket: HintSocket, timeout_ns: u64) -> Rig {
        Rig::build(effects, |metrics, events| {
            Hints::enabled("fe1", socket, timeout_ns, WallClock::default(), metrics, events)
        })
    }

    fn build(effects: InMemory, hints: impl FnOnce(Arc<Metrics>, Arc<Mutex<EventLog>>) -> Hints) -> Rig {
        let metrics = Arc::new(Metrics::new());
        let events = Arc::new(Mutex::new(EventLog::new(64)));
        let readiness = Arc::new(Readiness::new(NO_TIMEOUT));
        let resume = Arc::new(AtomicU64::new(0));
        let reporter = Reporter::detached();
        let ports = Arc::new(PortTable::new(|name| name.starts_with("vm"), None));
        ports.seed(&[PORT, OTHER_PORT].map(|index| Link {
            index,
            name: format!("vm{index}"),
            mac: [2, 0xfe, 0, 0, 0, index as u8],
            mtu: 1500,
            up: true,
        }));
        let (frames, _) = mpsc::channel(1);
        let engine = Engine::new(Parts {
            fe_id: "fe1".into(),
            timers: Timers {
                probe_after: NO_TIMEOUT,
                probe_interval: NO_TIMEOUT,
                probe_count: 3,
                reject_hold: NO_TIMEOUT,
            },
            reconciler: Reconciler::new(effects, metrics.clone()),
            scope: Scope {
                prefixes: vec!["10.10.0.0/16".parse().unwrap()],
                gateways: vec![Ipv4Addr::new(10, 10, 0, 1)],
            },
            scope6: ndp::Scope {
                prefixes: vec!["fd00:10::/64".parse().unwrap()],
                gateways: vec!["fd00:10::1".parse().unwrap()],
            },
            neigh: NeighPorts::new(
                Arc::new(Captures::default()),
                frames,
                (100, 100),
                metrics.clone(),
                WallClock::default(),
            ),
            ports,
            reporter: reporter.clone(),
            link: Arc::new(LinkControl::default()),
            resume: resume.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            hints: hints(metrics.clone(), events),
            clock: WallClock::default(),
        });
        Rig { engine, reporter, metrics, readiness, resume }
    }

    /// Reads back what a previous run left on the VM ports (the agent does it before it starts).
    async fn adopt(&mut self) -> crate::reconcile::Readback {
        let ports = self.engine.ports.clone();
        self.engine.reconciler.read_back(|i| ports.get(i).is_some()).await.unwrap()
    }

    async fn link(&mut self, event: LinkEvent) {
        self.engine.handle(Input::Link(event)).await;
    }

    async fn sync(&mut self, update: SyncUpdate) {
        let event =
            LinkEvent::Sync { update: Box::new(update), received_mono: monotonic_ns(), received_wall: unix_nanos() };
        self.link(event).await;
    }

    async fn connect_and_sync(&mut self, generation: u64, messages: [SyncUpdate; 2]) {
        self.link(LinkEvent::Connected { generation }).await;
        for m in messages {
            self.sync(m).await;
        }
    }

    /// A gratuitous ARP from the VM `ip`/`mac` on `port`, captured now.
    async fn garp(&mut self, ip: IpAddr, mac: [u8; 6], port: u32) {
        self.garp_captured_at(ip, mac, port, monotonic_ns()).await;
    }

    /// The same, captured by the kernel at `mono` (and handled now).
    async fn garp_captured_at(&mut self, ip: IpAddr, mac: [u8; 6], port: u32, mono: u64) {
        let IpAddr::V4(ip) = ip else { panic!("ARP is IPv4") };
        let port = self.engine.ports.get(port).expect("a VM port");
        let msg = gratuitous(MacAddr(mac), ip, ArpOp::Request, None);
        let frame = NeighFrame { port, frame: Frame::Arp(msg), wall: unix_nanos(), mono };
        self.engine.handle(Input::Neigh(frame)).await;
    }

    /// An NDP frame `msg` from the VM on `port`, captured now.
    async fn ndp(&mut self, msg: NdpMessage, port: u32) {
        let port = self.engine.ports.get(port).expect("a VM port");
        let frame = NeighFrame { port, frame: Frame::Ndp(msg), wall: unix_nanos(), mono: monotonic_ns() };
        self.engine.handle(Input::Neigh(frame)).await;
    }

    /// The controller's answer to `obs`.
    async fn answer(&mut self, obs: Observation, outcome: ClaimOutcome, reason: RejectReason, revision: u64) {
        let result = ClaimResult {
            vm_ip: obs.ip().map(victor_proto::types::ip_to_bytes).unwrap_or_default(),
            outcome: outcome as i32,
            reject_reason: reason as i32,
            revision,
            ..Default::default()
        };
        let now = monotonic_ns();
        let answered = Answered { observations: vec![obs], results: vec![result], sent_mono: now, answered_mono: now };
        self.engine.handle(Input::Answers(answered)).await;
    }

    /// The changes made since the last call, in order.
    fn changes(&mut self) -> Vec<(IpAddr, Op)> {
        self.engine.reconciler.effects_mut().take_log()
    }

    fn effects(&self) -> &InMemory {
        self.engine.reconciler.effects()
    }

    fn metric(&self, line: &str) -> bool {
        self.metrics.render().lines().any(|l| l == line)
    }
}

fn local_install(ip: IpAddr, port: u32, mac: [u8; 6]) -> Vec<(IpAddr, Op)> {
    vec![(ip, Op::SetNeighbour { port, mac }), (ip, Op::SetRoute { port }), (ip, Op::SetTunnel(Tunnel::Local))]
}

fn hint_keys() -> Keys {
    Keys::new(&[&[7u8; 32]]).unwrap()
}

/// This FE's hint socket on 127.0.0.1 and the sockets of fe2 and fe3, all on one port (hints go
/// to the hint port of each FE's underlay address).
fn hint_sockets() -> (HintSocket, [UdpSocket; 2]) {
    for _ in 0..20 {
        let fe2 = UdpSocket::bind((underlay(2), 0)).unwrap();
        let port = fe2.local_addr().unwrap().port();
        let (Ok(ours), Ok(fe3)) =
            (HintSocket::bind(underlay(1), port, hint_keys()), UdpSocket::bind((underlay(3), port)))
        else {
            continue;
        };
        for s in [&fe2, &fe3] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        return (ours, [fe2, fe3]);
    }
    panic!("no port free on 127.0.0.1-3");
}

fn receive_hint(socket: &UdpSocket) -> Hint {
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf).expect("a move hint arrives");
    codec::decode(&buf[..n], &hint_keys()).expect("a valid move hint")
}

/// Make-before-break and its undo: a VM heard on a port is delivered here at once — neighbour,
/// then route, then data plane — before the controller answers, and the other FEs are told; a
/// rejected claim puts the tunnel back towards the binding FE before the local route goes, the
/// hint is cancelled, and the VM's next ARP within the hold time changes nothing.
#[tokio::test]
async fn claim_installs_locally_at_once_and_a_rejection_undoes_it() {
    let (socket, [fe2, fe3]) = hint_sockets();
    let mut rig = Rig::with_hints(InMemory::default(), socket, NO_TIMEOUT);
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    assert_eq!(rig.changes(), vec![(VM, Op::SetTunnel(Tunnel::Remote(underlay(2))))]);

    rig.garp(VM, MAC, PORT).await;
    assert_eq!(rig.changes(), local_install(VM, PORT, MAC), "provisional local install, in order");
    let claims = rig.reporter.take_queued();
    assert_eq!(claims.len(), 1);
    assert_eq!((claims[0].subject, claims[0].mac), (Subject::Learned(VM), MAC));
    assert_eq!(claims[0].port, "vm5");
    for peer in [&fe2, &fe3] {
        let hint = receive_hint(peer);
        assert_eq!((hint.kind, hint.fe_id.as_str(), hint.vm_ip, hint.move_seq), (Kind::Move, "fe1", VM, 3));
    }
    assert!(rig.metric("victor_agent_provisional_installs_total 1"));

    rig.answer(claims[0].clone(), ClaimOutcome::Rejected, RejectReason::MacMismatch, 0).await;
    assert_eq!(
        rig.changes(),
        vec![
            (VM, Op::SetTunnel(Tunnel::Remote(underlay(2)))),
            (VM, Op::DelRoute { port: PORT }),
            (VM, Op::DelNeighbour { port: PORT }),
        ],
        "undo: the tunnel points back at fe2 before the local route goes"
    );
    assert!(rig.effects().routes.is_empty() && rig.effects().neighbours.is_empty());
    assert!(rig.metric("victor_agent_claims_undone_total 1"));
    assert_eq!(receive_hint(&fe2).kind, Kind::Cancel, "the other FEs drop the hint");

    rig.garp(VM, MAC, PORT).await;
    assert_eq!(rig.changes(), vec![], "a rejected VM is not claimed again within the hold time");
    assert!(rig.reporter.take_queued().is_empty());
}

/// A STALE claim (made before this FE knew of the VM's last move) is undone but not held: once
/// the stream has the revision the answer named, the VM is probed, frames captured before that
/// change nothing, and the first one captured after is a new claim that knew the revision.
#[tokio::test]
async fn a_stale_claim_is_undone_and_claimed_again_once_the_stream_has_its_revision() {
    let mut rig = Rig::new(InMemory::default());
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    rig.changes();
    rig.garp(VM, MAC, PORT).await;
    assert_eq!(rig.changes(), local_install(VM, PORT, MAC));
    let claim = rig.reporter.take_queued().remove(0);
    assert_eq!(claim.known_revision, 10, "the claim says what the agent knew when it captured the frame");
    // fe3 took the VM at revision 12 meanwhile; this FE's stream has not delivered it yet.
    rig.answer(claim.clone(), ClaimOutcome::Rejected, RejectReason::Stale, 12).await;
    assert_eq!(
        rig.changes(),
        vec![
            (VM, Op::SetTunnel(Tunnel::Remote(underlay(2)))),
            (VM, Op::DelRoute { port: PORT }),
            (VM, Op::DelNeighbour { port: PORT }),
        ],
        "undone, towards what the desired state says"
    );
    assert!(matches!(rig.engine.local.get(VM).unwrap().claim, Claim::Superseded { revision: 12, probed_at: None }));
    rig.garp(VM, MAC, PORT).await;
    assert_eq!((rig.changes(), rig.reporter.take_queued()), (vec![], vec![]), "captured knowing only 10");
    // The delta arrives: the VM is probed on its port, once.
    rig.sync(delta(12, vec![binding(VM, 3, MAC, 4, 12)])).await;
    assert_eq!(rig.changes(), vec![(VM, Op::SetTunnel(Tunnel::Remote(underlay(3))))]);
    assert!(matches!(rig.engine.local.get(VM).unwrap().claim, Claim::Superseded { probed_at: Some(_), .. }));
    // It answers: it really is here. Claimed again, knowing revision 12.
    rig.garp(VM, MAC, PORT).await;
    assert_eq!(rig.changes(), local_install(VM, PORT, MAC));
    let again = rig.reporter.take_queued().remove(0);
    assert_eq!((again.kind(), again.known_revision), (ObservationKind::Learned, 12));
    assert!(again.observed_at > claim.observed_at, "this FE's observation times only go forwards");
}

/// A frame the kernel captured before a delta was applied, handled after it, claims only what the
/// agent knew at the capture.
#[tokio::test]
async fn a_claim_knows_what_was_applied_before_its_capture_not_after() {
    let mut rig = Rig::new(InMemory::default());
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    let captured = monotonic_ns();
    rig.sync(delta(11, vec![binding(vm(12), 2, mac(12), 0, 11)])).await;
    rig.garp_captured_at(VM, MAC, PORT, captured).await;
    assert_eq!(rig.reporter.take_queued().remove(0).known_revision, 10);
    rig.garp(vm(13), mac(13), PORT).await;
    assert_eq!(rig.reporter.take_queued().remove(0).known_revision, 11);
}

/// An accepted claim keeps the local install, and the delta that confirms it changes nothing.
#[tokio::test]
async fn an_accepted_claim_is_kept_and_its_delta_changes_nothing() {
    let mut rig = Rig::new(InMemory::default());
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    rig.changes();
    rig.garp(VM, MAC, PORT).await;
    assert_eq!(rig.changes(), local_install(VM, PORT, MAC));
    let claim = rig.reporter.take_queued().remove(0);
    rig.answer(claim, ClaimOutcome::Moved, RejectReason::Unspecified, 11).await;
    rig.sync(delta(11, vec![binding(VM, 1, MAC, 4, 11)])).await;
    assert_eq!(rig.changes(), vec![]);
    assert_eq!(rig.effects().routes.get(&VM), Some(&PORT));
}

/// A move hint from the VM's new FE points the tunnel there before the controller's delta; the
/// delta then confirms it without another change.
#[tokio::test]
async fn a_move_hint_overrides_and_the_delta_confirms_without_a_change() {
    let (socket, _peers) = hint_sockets();
    let mut rig = Rig::with_hints(InMemory::default(), socket, NO_TIMEOUT);
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    rig.changes();

    rig.engine.handle(Input::Hint(hint_from(3, underlay(3), 3))).await;
    assert_eq!(rig.changes(), vec![(VM, Op::SetTunnel(Tunnel::Remote(underlay(3))))], "override before the delta");
    assert!(rig.metric("victor_agent_move_hint_overrides 1"));

    rig.sync(delta(12, vec![binding(VM, 3, MAC, 4, 12)])).await;
    assert_eq!(rig.changes(), vec![], "the data plane already points at fe3");
    assert!(rig.metric("victor_agent_move_hint_overrides_ended_total{how=\"confirmed\"} 1"));
    assert!(rig.metric("victor_agent_move_hint_overrides 0"));
}

/// A hint the controller never confirms ends after its timeout: back to the desired state.
#[tokio::test]
async fn an_unconfirmed_move_hint_expires_back_to_the_desired_state() {
    let (socket, _peers) = hint_sockets();
    let mut rig = Rig::with_hints(InMemory::default(), socket, 1);
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    rig.changes();
    rig.engine.handle(Input::Hint(hint_from(3, underlay(3), 3))).await;
    assert_eq!(rig.changes(), vec![(VM, Op::SetTunnel(Tunnel::Remote(underlay(3))))]);
    rig.engine.handle(Input::Tick).await;
    assert_eq!(rig.changes(), vec![(VM, Op::SetTunnel(Tunnel::Remote(underlay(2))))]);
    assert!(rig.metric("victor_agent_move_hint_overrides_ended_total{how=\"expired\"} 1"));
}

/// A hint that does not come from the named FE's underlay address, or names an old binding
/// version, changes nothing.
#[tokio::test]
async fn forged_or_stale_move_hints_change_nothing() {
    let (socket, _peers) = hint_sockets();
    let mut rig = Rig::with_hints(InMemory::default(), socket, NO_TIMEOUT);
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    rig.changes();
    rig.engine.handle(Input::Hint(hint_from(3, underlay(9), 3))).await;
    rig.engine.handle(Input::Hint(hint_from(3, underlay(3), 2))).await;
    assert_eq!(rig.changes(), vec![]);
    assert!(rig.metric("victor_agent_move_hints_rejected_total{reason=\"source_mismatch\"} 1"));
    assert!(rig.metric("victor_agent_move_hints_rejected_total{reason=\"stale_seq\"} 1"));
}

fn hint_from(fe: u8, src: Ipv4Addr, move_seq: u64) -> Received {
    let hint = Hint {
        kind: Kind::Move,
        fe_id: format!("fe{fe}"),
        vm_ip: VM,
        mac: MAC,
        move_seq,
        observed_at: unix_nanos(),
        sent_at: unix_nanos(),
        nonce: 1,
    };
    Received { hint, src, received_mono: monotonic_ns() }
}

/// Headless: when the stream ends the engine keeps what it programmed and keeps learning; the
/// next session resumes from the last complete revision, the engine reports its VMs again, and a
/// snapshot cut short by another loss is dropped whole.
#[tokio::test]
async fn stream_loss_keeps_forwarding_headless_and_the_next_session_resumes() {
    let mut rig = Rig::new(InMemory::default());
    rig.connect_and_sync(1, snapshot(10, vec![binding(vm(11), 2, mac(11), 0, 9)])).await;
    assert_eq!(rig.resume.load(Ordering::Acquire), 10);
    assert!(rig.readiness.check().is_ok());
    let programmed = rig.effects().clone();
    rig.changes();

    rig.link(LinkEvent::StreamEnded).await;
    assert_eq!(rig.changes(), vec![], "nothing is removed when the controller goes away");
    assert!(!rig.readiness.connected.load(Ordering::Relaxed));
    assert!(rig.readiness.check().is_ok(), "headless within the grace period stays ready");
    assert_eq!(rig.resume.load(Ordering::Acquire), 10);

    // Headless, a VM arrives: it is delivered here and its claim waits in the reporter.
    rig.garp(vm(12), mac(12), PORT).await;
    assert_eq!(rig.changes(), local_install(vm(12), PORT, mac(12)));
    let waiting = rig.reporter.take_queued();
    assert_eq!(waiting.len(), 1);

    rig.link(LinkEvent::Connected { generation: 2 }).await;
    let again = rig.reporter.take_queued();
    assert_eq!(again, waiting, "reported again on the new session, with the original observation time");
    rig.sync(delta(11, vec![binding(vm(11), 3, mac(11), 1, 11)])).await;
    assert_eq!(rig.changes(), vec![(vm(11), Op::SetTunnel(Tunnel::Remote(underlay(3))))]);
    assert_eq!(rig.resume.load(Ordering::Acquire), 11);

    // A snapshot cut short: nothing of it applies, the resume point stays.
    rig.link(LinkEvent::StreamEnded).await;
    rig.link(LinkEvent::Connected { generation: 3 }).await;
    let [first, _end] = snapshot(20, vec![]);
    rig.sync(first).await;
    rig.link(LinkEvent::StreamEnded).await;
    assert_eq!(rig.changes(), vec![]);
    assert_eq!(rig.resume.load(Ordering::Acquire), 11);
    assert_eq!(rig.engine.desired.binding(vm(11)).map(|b| b.revision), Some(11));
    assert_ne!(rig.effects().tunnels, programmed.tunnels, "the delta's change stays");
}

/// Restart without flush: what a previous run programmed is read back and kept — no change
/// before the first complete snapshot — and then only what the snapshot does not want goes.
#[tokio::test]
async fn restart_adopts_the_previous_programming_and_removes_only_stale_entries_after_the_snapshot() {
    let (kept, moved, unbound) = (vm(11), vm(12), vm(13));
    let previous =
        InMemory::with_previous_run(&[(kept, PORT, mac(11)), (moved, PORT, mac(12)), (unbound, OTHER_PORT, mac(13))]);
    let mut rig = Rig::new(previous);
    let readback = rig.adopt().await;
    assert_eq!((readback.host_routes, readback.neighbours), (3, 3));

    rig.link(LinkEvent::Connected { generation: 1 }).await;
    rig.engine.handle(Input::Tick).await;
    let [first, end] = snapshot(30, vec![binding(kept, 1, mac(11), 2, 21), binding(moved, 2, mac(12), 5, 22)]);
    rig.sync(first).await;
    assert_eq!(rig.changes(), vec![], "nothing changes before the snapshot is complete");

    rig.sync(end).await;
    assert_eq!(
        rig.changes(),
        vec![
            (kept, Op::SetTunnel(Tunnel::Local)),
            (moved, Op::SetTunnel(Tunnel::Remote(underlay(2)))),
            (moved, Op::DelRoute { port: PORT }),
            (moved, Op::DelNeighbour { port: PORT }),
            (unbound, Op::DelRoute { port: OTHER_PORT }),
            (unbound, Op::DelNeighbour { port: OTHER_PORT }),
        ],
        "the kept VM's route and neighbour are not touched"
    );
    assert_eq!(rig.effects().routes.iter().collect::<Vec<_>>(), vec![(&kept, &PORT)]);
    assert!(rig.readiness.synced.load(Ordering::Relaxed));
}

/// A change the kernel refused is made again on the next tick, in the same order.
#[tokio::test]
async fn a_refused_change_is_retried_on_the_next_tick() {
    let mut rig = Rig::new(InMemory::default());
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9)])).await;
    rig.changes();
    rig.engine.reconciler.effects_mut().failing.insert(VM);
    rig.garp(VM, MAC, PORT).await;
    assert_eq!(rig.changes(), vec![]);
    assert!(rig.metric("victor_agent_reconcile_ops_total{op=\"set_neighbour\",result=\"error\"} 1"));
    rig.engine.reconciler.effects_mut().failing.clear();
    rig.engine.handle(Input::Tick).await;
    assert_eq!(rig.changes(), local_install(VM, PORT, MAC));
}

fn vm6(last: u8) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, u16::from(last)))
}

/// An IPv6 VM announced by an unsolicited Neighbor Advertisement is claimed as a gratuitous ARP
/// claims an IPv4 one: installed locally at once (neighbour, /128 route, data plane), reported
/// with its 16-byte address, and the other FEs get a move hint carrying it. A link-local
/// announcement and an unsolicited advertisement without the override flag claim nothing; the move away
/// (the delta) points the tunnel at the new FE before the local route goes.
#[tokio::test]
async fn an_unsolicited_neighbor_advertisement_claims_an_ipv6_vm() {
    let (socket, [fe2, fe3]) = hint_sockets();
    let mut rig = Rig::with_hints(InMemory::default(), socket, NO_TIMEOUT);
    let vm = vm6(0x11);
    let IpAddr::V6(addr) = vm else { unreachable!() };
    // An IPv4 VM with another MAC beside it: NDP never claims it.
    rig.connect_and_sync(1, snapshot(10, vec![binding(vm, 2, MAC, 3, 9), binding(VM, 2, OTHER_MAC, 3, 9)])).await;
    let mut first = rig.changes();
    first.sort_by_key(|(ip, _)| *ip);
    assert_eq!(
        first,
        vec![(VM, Op::SetTunnel(Tunnel::Remote(underlay(2)))), (vm, Op::SetTunnel(Tunnel::Remote(underlay(2))))],
        "the IPv6 VM is tunnelled to its FE's IPv4 underlay address (6in4)"
    );

    let link_local = crate::neigh::ndp::link_local(MAC);
    rig.ndp(unsolicited_advertisement(MacAddr(MAC), link_local, false, None), PORT).await;
    let mut anycast = unsolicited_advertisement(MacAddr(MAC), addr, false, None);
    if let victor_dataplane::packet::ndp::Ndp::NeighborAdvertisement { flags, .. } = &mut anycast.body {
        flags.override_ = false;
    }
    rig.ndp(anycast, PORT).await;
    assert_eq!(rig.changes(), vec![], "link-local and override-less advertisements claim nothing");

    rig.ndp(unsolicited_advertisement(MacAddr(MAC), addr, false, None), PORT).await;
    assert_eq!(rig.changes(), local_install(vm, PORT, MAC), "provisional local install, in order");
    let claims = rig.reporter.take_queued();
    assert_eq!(claims.len(), 1);
    assert_eq!((claims[0].subject, claims[0].mac), (Subject::Learned(vm), MAC));
    for peer in [&fe2, &fe3] {
        let hint = receive_hint(peer);
        assert_eq!((hint.kind, hint.vm_ip, hint.move_seq), (Kind::Move, vm, 3), "the hint carries the IPv6 VM");
    }
    assert!(rig.metric("victor_agent_ndp_frames_total{kind=\"unsolicited_advertisement\"} 3"));
    assert_eq!(rig.engine.local.get(VM), None, "the IPv4 address of another MAC is not claimed by NDP");

    // A DAD probe of the same address from the same VM is a refresh, not a second claim.
    rig.ndp(dad(MacAddr(MAC), addr, None), PORT).await;
    assert_eq!(rig.changes(), vec![]);
    assert!(rig.reporter.take_queued().is_empty());

    // Accepted, then the VM moves on to fe3: tunnel first, then the local route and neighbour go.
    rig.answer(claims[0].clone(), ClaimOutcome::Moved, RejectReason::Unspecified, 11).await;
    rig.sync(delta(11, vec![binding(vm, 1, MAC, 4, 11)])).await;
    assert_eq!(rig.changes(), vec![]);
    rig.sync(delta(12, vec![binding(vm, 3, MAC, 5, 12)])).await;
    assert_eq!(
        rig.changes(),
        vec![
            (vm, Op::SetTunnel(Tunnel::Remote(underlay(3)))),
            (vm, Op::DelRoute { port: PORT }),
            (vm, Op::DelNeighbour { port: PORT }),
        ]
    );
}

/// MAC mobility: a dual-stack VM's gratuitous ARP claims its IPv6 address as well (both reported
/// before the first install, each installed before its move hint), so the IPv6 address does not
/// wait for the Neighbor Advertisement the guest sends next; that advertisement is then a refresh.
/// An IP bound to another MAC stays where it is.
#[tokio::test]
async fn a_dual_stack_vms_gratuitous_arp_moves_its_ipv6_address_too() {
    let (socket, [fe2, fe3]) = hint_sockets();
    let mut rig = Rig::with_hints(InMemory::default(), socket, NO_TIMEOUT);
    let (v6, stranger) = (vm6(0x11), vm(12));
    let IpAddr::V6(addr) = v6 else { unreachable!() };
    let bindings = vec![binding(VM, 2, MAC, 3, 9), binding(v6, 2, MAC, 3, 9), binding(stranger, 2, OTHER_MAC, 0, 8)];
    rig.connect_and_sync(1, snapshot(10, bindings)).await;
    rig.changes();

    rig.garp(VM, MAC, PORT).await;
    let mut installed = local_install(VM, PORT, MAC);
    installed.extend(local_install(v6, PORT, MAC));
    assert_eq!(rig.changes(), installed, "both addresses of the MAC, IPv4 first");
    let claims: Vec<_> = rig.reporter.take_queued().iter().map(|o| (o.subject, o.mac, o.port.clone())).collect();
    assert_eq!(
        claims,
        vec![(Subject::Learned(VM), MAC, "vm5".to_owned()), (Subject::Learned(v6), MAC, "vm5".to_owned())]
    );
    for peer in [&fe2, &fe3] {
        let hinted: Vec<_> = (0..2).map(|_| receive_hint(peer)).map(|h| (h.kind, h.vm_ip)).collect();
        assert_eq!(hinted, vec![(Kind::Move, VM), (Kind::Move, v6)], "a hint per address");
    }
    assert_eq!(rig.engine.local.get(stranger), None, "another MAC's IP does not follow");

    // The guest's own advertisement a moment later changes nothing.
    rig.ndp(unsolicited_advertisement(MacAddr(MAC), addr, false, None), PORT).await;
    assert_eq!(rig.changes(), vec![]);
    assert!(rig.reporter.take_queued().is_empty());
}

/// A VM that only probes its address (duplicate address detection, source ::) claims it.
#[tokio::test]
async fn a_dad_probe_claims_the_ipv6_address() {
    let mut rig = Rig::new(InMemory::default());
    let vm = vm6(0x12);
    let IpAddr::V6(addr) = vm else { unreachable!() };
    rig.connect_and_sync(1, snapshot(10, vec![binding(vm, 2, MAC, 0, 9)])).await;
    rig.changes();
    rig.ndp(dad(MacAddr(MAC), addr, None), OTHER_PORT).await;
    assert_eq!(rig.changes(), local_install(vm, OTHER_PORT, MAC));
    let claims = rig.reporter.take_queued();
    assert_eq!((claims.len(), claims[0].ip(), claims[0].port.as_str()), (1, Some(vm), "vm6"));
    assert!(rig.metric("victor_agent_ndp_frames_total{kind=\"dad\"} 1"));
}

/// QEMU's announce-self after a migration: RARP frames that name only the VM's MAC. Every IP the
/// desired state binds to that MAC is installed locally at once, as for a gratuitous ARP (with its
/// per-IP claim), and the first frame of the announcement adds one MAC claim; the later frames of
/// the same announcement add nothing. An IP the controller answers STALE for is probed.
#[tokio::test]
async fn a_rarp_announcement_claims_every_ip_of_its_mac_like_a_garp() {
    use victor_dataplane::packet::rarp::announce;
    let mut rig = Rig::new(InMemory::default());
    let other = vm(12);
    rig.connect_and_sync(1, snapshot(10, vec![binding(VM, 2, MAC, 3, 9), binding(other, 2, MAC, 0, 8)])).await;
    rig.changes();
    let port = rig.engine.ports.get(PORT).expect("a VM port");
    let rarp =
        |mono| NeighFrame { port: port.clone(), frame: Frame::Rarp(announce(MacAddr(MAC))), wall: unix_nanos(), mono };
    let first = rarp(monotonic_ns());
    rig.engine.handle(Input::Neigh(first)).await;
    let mut installed = local_install(VM, PORT, MAC);
    installed.extend(local_install(other, PORT, MAC));
    assert_eq!(rig.changes(), installed, "both addresses of the MAC, at once");
    let queued = rig.reporter.take_queued();
    let summary: Vec<_> = queued.iter().map(|o| (o.subject, o.known_revision)).collect();
    assert_eq!(summary, vec![(Subject::Learned(VM), 10), (Subject::Learned(other), 10), (Subject::Mac, 10)]);
    assert!(
        queued[2].observed_at < queued[0].observed_at,
        "the MAC claim is older than the sightings of its frame: it adds no write for their IPs"
    );
    // The rest of QEMU's rounds: nothing new.
    for offset_ms in [50, 200, 450, 800] {
        let later = rarp(monotonic_ns() + offset_ms * 1_000_000);
        rig.engine.handle(Input::Neigh(later)).await;
    }
    assert!(rig.reporter.take_queued().is_empty());
    assert!(rig.changes().is_empty());
    assert!(rig.metric("victor_agent_rarp_frames_total{kind=\"announce\"} 5"), "{}", rig.metrics.render());

    // The controller's answer: one address moved, one it cannot order yet.
    let per_ip = |ip: IpAddr, outcome: ClaimOutcome, reason: RejectReason| ClaimResult {
        vm_ip: victor_proto::types::ip_to_bytes(ip),
        outcome: outcome as i32,
        reject_reason: reason as i32,
        ..Default::default()
    };
    let result = ClaimResult {
        outcome: ClaimOutcome::Expanded as i32,
        ip_results: vec![
            per_ip(VM, ClaimOutcome::Moved, RejectReason::Unspecified),
            per_ip(vm(13), ClaimOutcome::Rejected, RejectReason::Stale),
        ],
        ..Default::default()
    };
    let now = monotonic_ns();
    let answered =
        Answered { observations: vec![queued[2].clone()], results: vec![result], sent_mono: now, answered_mono: now };
    rig.engine.handle(Input::Answers(answered)).await;
    assert!(rig.metric("victor_agent_claim_results_total{outcome=\"expanded\"} 1"), "{}", rig.metrics.render());
    assert!(rig.changes().is_empty(), "the stream, not the answer, moves what the agent did not know");
}

/// The binding of `ip` at fe`fe`, announced to migrate to fe`to` (`BindingEntry.pending_fe_id`).
fn announced(ip: IpAddr, fe: u8, mac: [u8; 6], move_seq: u64, revision: u64, to: u8) -> BindingEntry {
    BindingEntry { pending_fe_id: format!("fe{to}"), ..binding(ip, fe, mac, move_seq, revision) }
}

/// A delta of FE changes only.
fn fe_delta(revision: u64, upserts: Vec<FeEntry>, removals: Vec<&str>) -> SyncUpdate {
    let fe_removals =
        removals.into_iter().map(|id| victor_proto::v1::FeRemoval { fe_id: id.into(), revision }).collect();
    SyncUpdate { phase: SyncPhase::Delta as i32, revision, fe_upserts: upserts, fe_removals, ..Default::default() }
}

/// Announced migrations reach the data plane's relay table: every binding whose `pending_fe_id`
/// names a registered FE with an IPv4 underlay — this FE included (it holds what is relayed to
/// it) — and nothing else. A cancelled announcement, a committed move, a removed binding and an
/// FE that leaves each take the VM out; an FE that registers brings the announcements naming it
/// in; a snapshot leaves exactly its own announcements (what a previous state left goes). None
/// of it touches routes or tunnels.
#[tokio::test]
async fn announced_migrations_set_exactly_the_relay_targets_of_the_desired_state() {
    use std::collections::BTreeMap;
    let (here, there, unknown, leftover) = (vm(11), vm(12), vm(13), vm(14));
    let previous = InMemory { migrations: BTreeMap::from([(leftover, underlay(2))]), ..InMemory::default() };
    let mut rig = Rig::new(previous);
    rig.connect_and_sync(
        1,
        snapshot(
            10,
            vec![
                announced(here, 2, mac(11), 3, 7, 3),
                announced(there, 2, mac(12), 1, 8, 1),
                announced(unknown, 3, mac(13), 0, 9, 9),
            ],
        ),
    )
    .await;
    let relays = |rig: &Rig| rig.effects().migrations.clone();
    assert_eq!(
        relays(&rig),
        BTreeMap::from([(here, underlay(3)), (there, underlay(1))]),
        "fe3 and this FE (fe1) are registered; fe9 is not; the leftover is swept"
    );
    assert!(rig.metric("victor_agent_reconcile_ops_total{op=\"migration_set\",result=\"ok\"} 2"));
    let tunnels = rig.changes();
    assert!(tunnels.iter().all(|(_, op)| matches!(op, Op::SetTunnel(Tunnel::Remote(_)))), "{tunnels:?}");
    rig.engine.reconciler.effects_mut().migration_log.clear();

    // Cancelled (the binding's next revision has no pending FE): the relay goes, nothing else.
    rig.sync(delta(11, vec![binding(here, 2, mac(11), 3, 11)])).await;
    assert_eq!(relays(&rig), BTreeMap::from([(there, underlay(1))]));
    assert_eq!(rig.changes(), vec![], "the VM did not move");
    // Announced again, then the move commits at fe3: the tunnel follows and the relay ends.
    rig.sync(delta(12, vec![announced(here, 2, mac(11), 3, 12, 3)])).await;
    assert_eq!(relays(&rig).get(&here), Some(&underlay(3)));
    rig.sync(delta(13, vec![binding(here, 3, mac(11), 4, 13)])).await;
    assert_eq!(rig.changes(), vec![(here, Op::SetTunnel(Tunnel::Remote(underlay(3))))]);
    assert_eq!(relays(&rig).get(&here), None);
    assert_eq!(
        std::mem::take(&mut rig.engine.reconciler.effects_mut().migration_log),
        vec![(here, None), (here, Some(underlay(3))), (here, None)],
        "one change per announcement change, no repeats"
    );

    // fe9 registers: the announcement naming it takes effect; it leaves: the relay goes.
    let fe9 = FeEntry {
        fe_id: "fe9".into(),
        underlay_addr: underlay(9).octets().to_vec(),
        up: true,
        revision: 14,
        ..Default::default()
    };
    rig.sync(fe_delta(14, vec![fe9], vec![])).await;
    assert_eq!(relays(&rig).get(&unknown), Some(&underlay(9)));
    rig.sync(fe_delta(15, vec![], vec!["fe9"])).await;
    assert_eq!(relays(&rig).get(&unknown), None);

    // The binding is removed: its relay goes with it.
    let removal = victor_proto::v1::BindingRemoval { vm_ip: victor_proto::types::ip_to_bytes(there), revision: 16 };
    rig.sync(SyncUpdate { binding_removals: vec![removal], ..delta(16, vec![]) }).await;
    assert_eq!(relays(&rig), BTreeMap::new());

    // A new snapshot announces one VM and leaves exactly that.
    rig.sync(delta(17, vec![announced(here, 3, mac(11), 4, 17, 2)])).await;
    assert_eq!(relays(&rig), BTreeMap::from([(here, underlay(2))]));
    rig.link(LinkEvent::StreamEnded).await;
    rig.connect_and_sync(
        2,
        snapshot(20, vec![binding(here, 3, mac(11), 4, 18), announced(there, 2, mac(12), 1, 19, 3)]),
    )
    .await;
    assert_eq!(relays(&rig), BTreeMap::from([(there, underlay(3))]));
}
