//! `victor-lab migrate --vm qemu`: the migration experiment with a real virtual machine. The VM is
//! a QEMU guest ([`super::guest`]) that QEMU live-migrates between two "hypervisors":
//!
//! ```text
//!  fe2 ─vmnet─ hv: br2 ─ q2 ══ up0 ─ br0 ─ tap0 ── QEMU (source / destination)   ─ ul0 (198.51.100.102)
//!  fe3 ─vmnet─ hv: br3 ─ q3 ══ up0 ─ br0 ─ tap0 ── QEMU                          ─ ul0 (198.51.100.103)
//! ```
//! Each hypervisor is a namespace ([`Hypervisor`]) whose bridge joins the guest's tap to its FE's
//! VM segment, with a link on the underlay bridge that carries the migration stream. The guest
//! boots behind fe2; for each move a destination QEMU waits at the other FE with `-incoming`, the
//! source gets QMP's `migrate` and, once it completed, `quit`. Nothing re-attaches a link and the
//! lab sends no frame: the new FE learns the move from what the guest (virtio-net guest-announce:
//! GARP, unsolicited NA) or QEMU (`announce-self`: RARP) sends after the VM resumed.
//!
//! Per move the report gives QEMU's own figures (`query-migrate`: downtime, total time), the
//! pause the VM really had (the source's `STOP` event to the destination's `RESUME`), every
//! announcement the new FE's VM port saw and when relative to the resume (a capture on that port,
//! [`victor_dataplane::neigh_io::NeighCapture`]), the prober's losses, and the losses beyond the
//! VM's own pause: lost − the requests sent while it was paused (from 1 ms before `STOP`, a
//! request then still in flight reaches a stopped VM, to `RESUME`) — VICTOR's share.
//!
//! Like an orchestrator, the lab announces each migration to the controller before it starts it
//! (AnnounceMigration without commit for the guest's address, naming the destination FE; the
//! guest has IPv4 only), unless `--no-announce`; per move the report says whether it did, how
//! each FE's migration relay counters changed over the move, and the duplicate replies the
//! prober saw (see [`super::migrate`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;
use serde_json::{Value, json};
use victor_dataplane::neigh_io::{Captured, Frame, NeighCapture, Protocols};
use victor_dataplane::packet::arp::MacAddr;
use victor_dataplane::packet::ndp::NdpKind;
use victor_proto::clock::monotonic_ns;
use victor_testkit::netns::{NetNs, Veth};

use super::addressing::{GATEWAY, hypervisor_addr};
use super::agents::RelayCounters;
use super::controlplane::ControlPlane;
use super::guest::{Availability, GuestAssets, GuestConfig, Nic, QemuVm, accel};
use super::migrate::{
    self, MigrateArgs, Summary, SwitchMode, agent_events, announce_move, announced_line, applied_line,
    check_forwarding, dataplane_applied, load_avg_1m, relay_change, relay_line, relay_snapshot, round, start_lab,
    wait_applied, with_log_dir,
};
use super::probe::{Prober, Probes, Schedule};
use super::qmp::Qmp;
use super::topology::{Topology, VM_PORT, VmSpec};

/// The guest's memory (MiB): what a migration copies (mostly zero pages).
pub const VM_MEMORY_MB: u32 = 128;
/// The guest's tap in each hypervisor namespace.
const TAP: &str = "tap0";
/// Where a destination QEMU listens for the migration stream.
const MIGRATION_PORT: u16 = 4444;
/// The migration's bandwidth limit (bytes/s): high enough that the link, not QEMU, limits it.
const MAX_BANDWIDTH: u64 = 10_000_000_000;
/// How long a migration may take (TCG on a busy machine).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests sent this long before `STOP` count as lost in the pause (still in flight then).
const IN_FLIGHT_NS: u64 = 1_000_000;

/// A hypervisor: a namespace at FE `fe` whose bridge `br0` joins the guest's tap to the FE's VM
/// segment (`br<fe>` in the lab's `hv`), with an underlay address for migration streams.
pub struct Hypervisor {
    /// Its namespace (QEMU runs inside it).
    pub ns: NetNs,
    /// The FE it sits behind.
    pub fe: usize,
}

impl Hypervisor {
    /// Builds the hypervisor at FE `fe` (≥ 2) of `topo`.
    pub fn build(topo: &Topology, fe: usize) -> Result<Hypervisor> {
        let ns = NetNs::new(&format!("vmq{fe}"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        let _ = ns.sysctl("net.bridge.bridge-nf-call-iptables", "0");
        ns.link_up("br0")?;
        // Its uplink to the FE's VM segment.
        let uplink = format!("q{fe}");
        let _link = Veth::create(&ns, "up0", &topo.hv, &uplink)?;
        topo.hv.ip(&["link", "set", &uplink, "master", &format!("br{fe}")])?;
        ns.ip(&["link", "set", "up0", "master", "br0"])?;
        // The guest's tap (carrier only while a QEMU has it open).
        ns.ip(&["tuntap", "add", TAP, "mode", "tap"])?;
        ns.ip(&["link", "set", TAP, "master", "br0"])?;
        ns.link_up(TAP)?;
        // The migration network: the underlay.
        let port = format!("h{fe}");
        let _link = Veth::create(&ns, "ul0", &topo.ul, &port)?;
        topo.ul.ip(&["link", "set", &port, "master", "br0"])?;
        ns.add_addr("ul0", &format!("{}/24", hypervisor_addr(fe)))?;
        Ok(Hypervisor { ns, fe })
    }

    /// Where a destination QEMU here listens.
    pub fn incoming(&self) -> SocketAddrV4 {
        SocketAddrV4::new(hypervisor_addr(self.fe), MIGRATION_PORT)
    }
}

/// One announcement frame from the VM's MAC seen on a VM port.
#[derive(Debug, Clone, Serialize)]
pub struct Announcement {
    /// `RARP`, `GARP`, `NA` (unsolicited), or what else the VM sent (`ARP`, `NS`, `DAD`, `RS`,
    /// `NA(solicited)`).
    pub kind: &'static str,
    /// When the FE's port saw it, relative to the VM's resume (ms).
    pub at_ms: f64,
}

/// What a frame is, as the report names it.
fn frame_kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Rarp(_) => "RARP",
        Frame::Arp(m) if m.is_gratuitous() => "GARP",
        Frame::Arp(_) => "ARP",
        Frame::Ndp(m) => match m.kind() {
            NdpKind::UnsolicitedAdvertisement => "NA",
            NdpKind::SolicitedAdvertisement => "NA(solicited)",
            NdpKind::Dad => "DAD",
            NdpKind::Solicitation => "NS",
            NdpKind::RouterSolicitation => "RS",
            NdpKind::RouterAdvertisement => "RA",
        },
    }
}

/// Captures ARP, RARP and NDP from the VM's MAC on the VM ports of some FEs, from resident
/// threads inside their namespaces.
pub struct AnnouncementWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(usize, Captured)>>>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl AnnouncementWatch {
    /// Starts capturing on FEs `fes` of `topo` (returns once every capture is open).
    pub fn start(topo: &Topology, fes: &[usize], mac: MacAddr) -> Result<AnnouncementWatch> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(usize, Captured)>>> = Arc::default();
        let mut watch = AnnouncementWatch { stop: stop.clone(), seen: seen.clone(), threads: Vec::new() };
        for &fe in fes {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop, seen) = (stop.clone(), seen.clone());
            let thread = topo.fe(fe).spawn_thread(&format!("watch-fe{fe}"), move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let capture = match NeighCapture::open(VM_PORT, Protocols::ALL) {
                        Ok(c) => {
                            let _ = ready_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!("capture on fe{fe} {VM_PORT}: {e}")));
                            return Ok(());
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(frame) = tokio::time::timeout(Duration::from_millis(50), capture.recv()).await {
                            let frame = frame?;
                            if frame.frame.eth_src() == mac {
                                seen.lock().expect("announcements").push((fe, frame));
                            }
                        }
                    }
                    Ok(())
                })
            })?;
            watch.threads.push(thread);
            ready_rx.recv().context("capture thread died")??;
        }
        Ok(watch)
    }

    /// What FE `fe` saw from `since_ns` on, relative to `zero_ns` (for error messages).
    pub fn describe(&self, fe: usize, since_ns: u64, zero_ns: u64) -> String {
        let seen = self.seen.lock().expect("announcements");
        let list: Vec<String> = seen
            .iter()
            .filter(|(f, c)| *f == fe && c.mono_ns >= since_ns)
            .map(|(_, c)| format!("{} {:+.1}", frame_kind(&c.frame), (c.mono_ns as f64 - zero_ns as f64) / 1e6))
            .collect();
        if list.is_empty() { "nothing".into() } else { list.join(", ") }
    }

    /// Stops the captures; returns what each FE saw (FE number, frame), in time order.
    pub fn stop(mut self) -> Result<Vec<(usize, Captured)>> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().map_err(|_| anyhow::anyhow!("a capture thread panicked"))??;
        }
        let mut all = std::mem::take(&mut *self.seen.lock().expect("announcements"));
        all.sort_by_key(|(_, c)| c.mono_ns);
        Ok(all)
    }
}

impl Drop for AnnouncementWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What happened in one live migration.
#[derive(Debug, Clone, Serialize)]
pub struct QemuMove {
    /// 1-based.
    pub index: usize,
    /// Old FE.
    pub from: String,
    /// New FE.
    pub to: String,
    /// The binding's move_seq after the move.
    pub move_seq: u64,
    /// QEMU's own downtime figure (`query-migrate` on the source).
    pub qemu_downtime_ms: f64,
    /// QEMU's total migration time.
    pub qemu_total_time_ms: f64,
    /// QEMU's setup time.
    pub qemu_setup_time_ms: f64,
    /// RAM transferred (MiB).
    pub transferred_mib: f64,
    /// The VM's pause as the lab saw it: the destination's `RESUME` − the source's `STOP`.
    pub paused_ms: f64,
    /// Every frame from the VM's MAC the new FE's VM port saw from `STOP` until the next move,
    /// relative to `RESUME`.
    pub announcements: Vec<Announcement>,
    /// Those frames counted by kind.
    pub announced: BTreeMap<String, u32>,
    /// When the new FE captured the announcement it bound the VM from, relative to `RESUME`.
    pub bound_from_capture_ms: Option<f64>,
    /// The kind of that frame (the one the new FE's port saw at that time).
    pub bound_from: Option<String>,
    /// Latest apply on any FE − that capture.
    pub convergence_ms: Option<f64>,
    /// When each FE's data plane first forwarded to the new FE (local install, confirmed move
    /// hint or delta), relative to `RESUME`: requests that reached the client's FE before its
    /// time, or the old FE before its, went to the paused VM's port.
    pub dataplane_applied_ms: BTreeMap<String, f64>,
    /// Echo requests without a reply, sent from this migration's start to the next one's.
    pub lost: u32,
    /// Echo requests sent while the VM was paused (from 1 ms before `STOP` to `RESUME`): the
    /// prober's real rate in the pause (a starved prober sends in bursts).
    pub sent_in_pause: u32,
    /// Of the lost ones, sent while the VM was paused.
    pub lost_in_pause: u32,
    /// lost − lost_in_pause: VICTOR's share.
    pub lost_beyond_pause: u32,
    /// When those were sent, relative to `RESUME` (ms; negative: before the pause).
    pub lost_beyond_pause_sent_ms: Vec<f64>,
    /// The first answered request sent after `STOP`: its send time relative to `RESUME` (ms).
    pub first_reply_sent_ms: Option<f64>,
    /// The migration was announced to the controller before it started (not `--no-announce`).
    pub migration_announced: bool,
    /// Per FE (the old and the new), how long after the announcement's answer its agent had
    /// applied it (ms; the lab waits up to 2 s for both before it migrates); an FE missing had not.
    pub announce_applied_ms: BTreeMap<String, f64>,
    /// Per FE, how its migration relay counters changed from just before the announcement to
    /// the end of the move (empty: the agents export none).
    pub relay: BTreeMap<String, RelayCounters>,
    /// Extra replies to this move's requests beyond each one's first (a relayed copy that
    /// reached the VM as well as the original); not counted as answers.
    pub duplicate_replies: u32,
}

/// The report of `victor-lab migrate --vm qemu`.
#[derive(Debug, Clone, Serialize)]
pub struct QemuReport {
    /// Always `qemu`.
    pub vm: &'static str,
    /// The guest's NIC.
    pub nic: Nic,
    /// The guest's memory (MiB).
    pub memory_mb: u32,
    /// QEMU's accelerator.
    pub accel: String,
    /// The guest kernel's package.
    pub kernel: String,
    /// Time from starting QEMU until the guest's address was configured (ms).
    pub guest_boot_ms: f64,
    /// Moves made.
    pub moves: usize,
    /// Echo interval.
    pub ping_interval_ms: u64,
    /// etcd members (0 = embedded store).
    pub etcd_members: usize,
    /// Controller replicas.
    pub replicas: usize,
    /// The agents' data plane.
    pub dataplane: String,
    /// Move hints were on.
    pub move_hints: bool,
    /// Migrations were announced to the controller before they started (not `--no-announce`).
    pub migration_announced: bool,
    /// Echo requests sent.
    pub probes_sent: u32,
    /// Lost over the whole run (after the first migration started).
    pub lost_total: u32,
    /// Lost while the VM was paused, over the run.
    pub lost_in_pause_total: u32,
    /// Lost beyond the VM's own pause, over the run (VICTOR's share).
    pub lost_beyond_pause_total: u32,
    /// The worst move's share.
    pub lost_beyond_pause_max: u32,
    /// Duplicate replies over the run.
    pub duplicate_replies_total: u32,
    /// QEMU's downtime figures.
    pub qemu_downtime_ms: Summary,
    /// The pauses the lab saw (`RESUME` − `STOP`).
    pub paused_ms: Summary,
    /// QEMU's total migration times.
    pub qemu_total_time_ms: Summary,
    /// New FE's capture of the frame it bound from, relative to `RESUME`.
    pub bound_from_capture_ms: Summary,
    /// Convergence (latest apply − that capture).
    pub convergence_ms: Summary,
    /// QEMU's migration parameters of the first move (`query-migrate-parameters`): the
    /// `announce-*` schedule of its RARPs (ms), `downtime-limit` (ms), `max-bandwidth` (bytes/s).
    pub migration_parameters: BTreeMap<String, u64>,
    /// Each move.
    pub per_move: Vec<QemuMove>,
    /// The host's 1-minute load average at the end.
    pub load_avg_1m: f64,
    /// The agents ran at real-time priority (`--agents-realtime`).
    pub agents_realtime: bool,
}

/// Builds the lab with a QEMU guest, migrates it `args.moves` times and returns the report.
/// Fails with the reason when the guest cannot run here (QEMU or the kernel missing).
pub async fn run(args: &MigrateArgs) -> Result<QemuReport> {
    ensure!(args.switch == SwitchMode::Move, "--vm qemu migrates the VM itself: --switch does not apply");
    ensure!(!args.bgp, "--vm qemu runs with the static ingress (no --bgp yet)");
    let assets = match GuestAssets::prepare()? {
        Availability::Ready(assets) => assets,
        Availability::Skipped(reason) => bail!("--vm qemu: the guest cannot run here: {reason}"),
    };
    with_log_dir(args, |dir| async move { experiment(args, assets, &dir).await }).await
}

/// A migration whose numbers are computed once the run is over.
struct PendingMove {
    index: usize,
    from: usize,
    to: usize,
    move_seq: u64,
    start_seq: u32,
    start_ns: u64,
    stop_ns: u64,
    resume_ns: u64,
    info: Value,
    announced: Option<BTreeMap<String, f64>>,
    relay: BTreeMap<String, RelayCounters>,
}

async fn experiment(args: &MigrateArgs, assets: GuestAssets, dir: &Path) -> Result<QemuReport> {
    let vm = VmSpec::numbered(1);
    let lab = start_lab(args, dir, None).await?;
    let hypervisors = [Hypervisor::build(&lab.topo, 2)?, Hypervisor::build(&lab.topo, 3)?];
    let hv = |fe: usize| &hypervisors[fe - 2];
    let kernel = assets.kernel_package.clone();
    let config = GuestConfig {
        assets,
        nic: args.nic,
        mac: vm.mac.clone(),
        ip: (vm.ip, 24),
        gateway: GATEWAY.parse()?,
        memory_mb: VM_MEMORY_MB,
    };
    let mac: MacAddr = vm.mac.parse().map_err(|_| anyhow::anyhow!("bad MAC {}", vm.mac))?;
    let watch = AnnouncementWatch::start(&lab.topo, &[2, 3], mac)?;

    // The guest boots behind fe2 and announces its address once (as any OS does).
    let boot_start = monotonic_ns();
    let mut running = QemuVm::start(&hv(2).ns, "qemu-1", &config, TAP, dir, None)?;
    running.wait_ready(Duration::from_secs(120))?;
    let guest_boot_ms = round((monotonic_ns() - boot_start) as f64 / 1e6);
    let first = lab
        .plane
        .wait_bound(vm.ip, "fe2", Duration::from_secs(30))
        .await
        .context("the guest is up behind fe2 but was not bound there (its unsolicited ARP at boot)")?;
    let mut move_seq = first.move_seq;
    wait_applied(&lab.topo, vm.ip.into(), move_seq, 2, Duration::from_secs(10)).await?;

    let interval = Duration::from_millis(args.ping_interval_ms);
    let prober = Prober::start_with(&lab.topo.client, vm.ip.into(), interval, Schedule::Realtime)?;
    prober
        .wait_replies_from(0, 20, Duration::from_secs(10))
        .context("the guest does not answer the client before any migration")?;

    let mut moves = Vec::new();
    let mut migration_parameters = BTreeMap::new();
    let mut at = 2usize;
    for index in 1..=args.moves {
        let to = if at == 2 { 3 } else { 2 };
        let dest =
            QemuVm::start(&hv(to).ns, &format!("qemu-{}", index + 1), &config, TAP, dir, Some(hv(to).incoming()))?;
        running.qmp.execute("migrate-set-parameters", json!({ "max-bandwidth": MAX_BANDWIDTH }))?;
        if index == 1 {
            let params = running.qmp.execute("query-migrate-parameters", Value::Null)?;
            migration_parameters = params
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("announce-") || *k == "downtime-limit" || *k == "max-bandwidth")
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect();
        }
        let relay_before = relay_snapshot(&lab.topo)?;
        let announced = announce_move(args, &lab.plane, &lab.topo, &[vm.ip.into()], (at, to), index).await?;
        let start_seq = prober.sent();
        let start_ns = monotonic_ns();
        running.qmp.execute("migrate", json!({ "uri": format!("tcp:{}", hv(to).incoming()) }))?;
        let info = wait_migrated(&running.qmp, index)?;
        let stop_ns = running.qmp.wait_event("STOP", start_ns, Duration::from_secs(5))?.mono_ns;
        let resume_ns = dest.qmp.wait_event("RESUME", start_ns, Duration::from_secs(30))?.mono_ns;
        // The source is done (paused in `postmigrate`): it leaves, and its tap with it.
        std::mem::replace(&mut running, dest).quit()?;

        let target = format!("fe{to}");
        let bound =
            wait_moved(&lab.plane, vm.ip, &target, move_seq, Duration::from_secs(15)).await.with_context(|| {
                format!(
                    "move {index} ({} NIC): {target}'s VM port saw from the VM: {} (ms after RESUME)",
                    args.nic.as_str(),
                    watch.describe(to, stop_ns, resume_ns)
                )
            })?;
        move_seq = bound;
        wait_applied(&lab.topo, vm.ip.into(), move_seq, to, Duration::from_secs(10)).await?;
        let after = prober.sent();
        prober
            .wait_replies_from(after, 3, Duration::from_secs(5))
            .with_context(|| format!("move {index}: the VM does not answer at {target}"))?;
        check_forwarding(&lab.topo, &vm, to, at, SwitchMode::Move, &lab.dataplane)?;
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let relay = relay_change(&relay_before, &relay_snapshot(&lab.topo)?);
        moves.push(PendingMove {
            index,
            from: at,
            to,
            move_seq,
            start_seq,
            start_ns,
            stop_ns,
            resume_ns,
            info,
            announced,
            relay,
        });
        at = to;
    }
    tokio::time::sleep(Duration::from_millis(300).max(interval * 5)).await;
    let probes = prober.stop()?;
    let frames = watch.stop()?;
    let events = agent_events(&lab.topo, vm.ip.into())?;
    let mut per_move = Vec::new();
    for (k, m) in moves.iter().enumerate() {
        let next = moves.get(k + 1);
        let end_seq = next.map(|n| n.start_seq).unwrap_or(probes.sent.saturating_sub(5));
        let end_ns = next.map(|n| n.start_ns).unwrap_or(u64::MAX);
        let applied: Vec<(usize, &Value)> =
            events.iter().filter_map(|(fe, list)| Some((*fe, list.get(&m.move_seq)?))).collect();
        let new_fe_event = events.get(&m.to).and_then(|list| list.get(&m.move_seq));
        per_move.push(m.result(&probes, end_seq, end_ns, &frames, new_fe_event, &applied));
    }
    let dataplane = lab.dataplane.clone();
    drop(running);
    drop(hypervisors);
    drop(lab);
    Ok(QemuReport {
        dataplane,
        kernel,
        migration_parameters,
        ..report(args, config.nic, guest_boot_ms, &probes, per_move)
    })
}

/// Polls `query-migrate` on the source until the migration completed; returns its last answer.
fn wait_migrated(qmp: &Qmp, index: usize) -> Result<Value> {
    let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", Value::Null)?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(info),
            Some(status @ ("failed" | "cancelled")) => {
                bail!("move {index}: migration {status}: {}", info.get("error-desc").unwrap_or(&Value::Null))
            }
            _ => {}
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "move {index}: migration not completed after {MIGRATION_TIMEOUT:?}: {info}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the controller bound `ip` to `target` with a move_seq above `after`; returns it.
async fn wait_moved(plane: &ControlPlane, ip: Ipv4Addr, target: &str, after: u64, timeout: Duration) -> Result<u64> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(b) = plane.binding(ip).await?
            && b.fe_id == target
            && b.move_seq > after
        {
            return Ok(b.move_seq);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the VM was not bound to {target} within {timeout:?} after the migration (binding: {:?})",
                plane.binding(ip).await?.map(|b| (b.fe_id, b.move_seq))
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

impl PendingMove {
    fn result(
        &self,
        probes: &Probes,
        end_seq: u32,
        end_ns: u64,
        frames: &[(usize, Captured)],
        new_fe_event: Option<&Value>,
        applied: &[(usize, &Value)],
    ) -> QemuMove {
        let ms_after_resume = |t: u64| round((t as f64 - self.resume_ns as f64) / 1e6);
        let announcements: Vec<Announcement> = frames
            .iter()
            .filter(|(fe, c)| *fe == self.to && c.mono_ns >= self.stop_ns && c.mono_ns < end_ns)
            .map(|(_, c)| Announcement { kind: frame_kind(&c.frame), at_ms: ms_after_resume(c.mono_ns) })
            .collect();
        let mut announced = BTreeMap::new();
        for a in &announcements {
            *announced.entry(a.kind.to_owned()).or_insert(0u32) += 1;
        }
        let ns = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).filter(|t| *t > 0);
        let captured = new_fe_event.and_then(|e| ns(e, "captured_mono_ns"));
        // The frame the agent bound from: the new FE's port saw it at (about) the same time.
        let bound_from = captured.and_then(|t| {
            frames
                .iter()
                .filter(|(fe, _)| *fe == self.to)
                .min_by_key(|(_, c)| c.mono_ns.abs_diff(t))
                .filter(|(_, c)| c.mono_ns.abs_diff(t) < 5_000_000)
                .map(|(_, c)| frame_kind(&c.frame).to_owned())
        });
        let latest = applied.iter().filter_map(|(_, e)| ns(e, "applied_mono_ns")).max();
        let convergence_ms = captured.zip(latest).map(|(c, l)| round((l as f64 - c as f64) / 1e6));
        let dataplane_applied_ms = applied
            .iter()
            .filter_map(|(fe, e)| Some((format!("fe{fe}"), ms_after_resume(dataplane_applied(e, *fe == self.to)?.at))))
            .collect();

        let lost = probes.lost_seqs(self.start_seq, end_seq);
        let pause = self.stop_ns.saturating_sub(IN_FLIGHT_NS)..=self.resume_ns;
        let lost_in_pause =
            lost.iter().filter(|s| probes.sent_at.get(**s as usize).is_some_and(|t| pause.contains(t))).count() as u32;
        let sent_in_pause = probes.sent_at.iter().filter(|t| pause.contains(t)).count() as u32;
        let lost_beyond_pause_sent_ms = lost
            .iter()
            .filter_map(|s| probes.sent_at.get(*s as usize))
            .filter(|t| !pause.contains(t))
            .map(|t| ms_after_resume(*t))
            .collect();
        let first_reply = probes
            .replied
            .range(probes.first_sent_after(self.stop_ns)..)
            .next()
            .and_then(|s| probes.sent_at.get(*s as usize))
            .map(|t| ms_after_resume(*t));
        let f = |k: &str| self.info.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let transferred = self.info.get("ram").and_then(|r| r.get("transferred")).and_then(Value::as_f64);
        QemuMove {
            index: self.index,
            from: format!("fe{}", self.from),
            to: format!("fe{}", self.to),
            move_seq: self.move_seq,
            qemu_downtime_ms: f("downtime"),
            qemu_total_time_ms: f("total-time"),
            qemu_setup_time_ms: f("setup-time"),
            transferred_mib: round(transferred.unwrap_or(0.0) / (1024.0 * 1024.0)),
            paused_ms: round((self.resume_ns as f64 - self.stop_ns as f64) / 1e6),
            announcements,
            announced,
            bound_from_capture_ms: captured.map(ms_after_resume),
            bound_from,
            convergence_ms,
            dataplane_applied_ms,
            lost: lost.len() as u32,
            sent_in_pause,
            lost_in_pause,
            lost_beyond_pause: lost.len() as u32 - lost_in_pause,
            lost_beyond_pause_sent_ms,
            first_reply_sent_ms: first_reply,
            migration_announced: self.announced.is_some(),
            announce_applied_ms: self.announced.clone().unwrap_or_default(),
            relay: self.relay.clone(),
            duplicate_replies: probes.duplicates_in(self.start_seq, end_seq),
        }
    }
}

fn report(args: &MigrateArgs, nic: Nic, guest_boot_ms: f64, probes: &Probes, per_move: Vec<QemuMove>) -> QemuReport {
    let collect =
        |f: &dyn Fn(&QemuMove) -> Option<f64>| Summary::of(&per_move.iter().filter_map(f).collect::<Vec<_>>());
    QemuReport {
        vm: "qemu",
        nic,
        memory_mb: VM_MEMORY_MB,
        accel: accel(),
        kernel: String::new(),
        guest_boot_ms,
        moves: per_move.len(),
        ping_interval_ms: args.ping_interval_ms,
        etcd_members: args.etcd_members,
        replicas: args.replicas,
        dataplane: String::new(),
        move_hints: args.move_hints,
        migration_announced: !args.no_announce,
        probes_sent: probes.sent,
        lost_total: per_move.iter().map(|m| m.lost).sum(),
        lost_in_pause_total: per_move.iter().map(|m| m.lost_in_pause).sum(),
        lost_beyond_pause_total: per_move.iter().map(|m| m.lost_beyond_pause).sum(),
        lost_beyond_pause_max: per_move.iter().map(|m| m.lost_beyond_pause).max().unwrap_or(0),
        duplicate_replies_total: per_move.iter().map(|m| m.duplicate_replies).sum(),
        qemu_downtime_ms: collect(&|m| Some(m.qemu_downtime_ms)),
        paused_ms: collect(&|m| Some(m.paused_ms)),
        qemu_total_time_ms: collect(&|m| Some(m.qemu_total_time_ms)),
        bound_from_capture_ms: collect(&|m| m.bound_from_capture_ms),
        convergence_ms: collect(&|m| m.convergence_ms),
        migration_parameters: BTreeMap::new(),
        per_move,
        load_avg_1m: load_avg_1m(),
        agents_realtime: args.agents_realtime,
    }
}

/// Prints the report as a table (or JSON with `--json`) and writes `--out`.
pub fn print(args: &MigrateArgs, report: &QemuReport) -> Result<()> {
    if migrate::emit_json(args, report)? {
        return Ok(());
    }
    println!(
        "victor-lab migrate --vm qemu: {} live migrations of a {} MiB guest ({} NIC, {}, {}), ping every {} ms, data plane {}, move hints {}",
        report.moves,
        report.memory_mb,
        report.nic.as_str(),
        report.accel,
        report.kernel,
        report.ping_interval_ms,
        report.dataplane,
        if report.move_hints { "on" } else { "off" }
    );
    let params: Vec<String> = report.migration_parameters.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("guest boot: {:.0} ms; QEMU migration parameters: {}", report.guest_boot_ms, params.join(", "));
    println!("{}", announced_line(report.migration_announced));
    println!(
        "{:>4}  {:<10} {:>9} {:>10} {:>9} {:>10} {:>10} {:>12} {:>5} {:>6} {:>7} {:>14}",
        "move",
        "from→to",
        "move_seq",
        "downtime",
        "paused",
        "total",
        "bound at",
        "convergence",
        "lost",
        "pause",
        "beyond",
        "sent in pause"
    );
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into());
    for m in &report.per_move {
        println!(
            "{:>4}  {:<10} {:>9} {:>7.0} ms {:>6.1} ms {:>7.0} ms {:>10} {:>12} {:>5} {:>6} {:>7} {:>14}",
            m.index,
            format!("{}→{}", m.from, m.to),
            m.move_seq,
            m.qemu_downtime_ms,
            m.paused_ms,
            m.qemu_total_time_ms,
            opt(m.bound_from_capture_ms),
            opt(m.convergence_ms),
            m.lost,
            m.lost_in_pause,
            m.lost_beyond_pause,
            m.sent_in_pause
        );
        let seen: Vec<String> = m.announcements.iter().map(|a| format!("{} {:+.1}", a.kind, a.at_ms)).collect();
        println!(
            "      at {}: {} (ms after RESUME); bound from {}",
            m.to,
            if seen.is_empty() { "nothing".into() } else { seen.join(", ") },
            m.bound_from.as_deref().unwrap_or("?")
        );
        println!(
            "      {}; {}; duplicate replies {}",
            applied_line(m.migration_announced, &m.announce_applied_ms),
            relay_line(&m.relay),
            m.duplicate_replies
        );
    }
    println!(
        "downtime (QEMU) p50 {:.0} ms, max {:.0} ms; paused (STOP→RESUME) p50 {:.1} ms, max {:.1} ms; total p50 {:.0} ms",
        report.qemu_downtime_ms.p50,
        report.qemu_downtime_ms.max,
        report.paused_ms.p50,
        report.paused_ms.max,
        report.qemu_total_time_ms.p50
    );
    println!(
        "lost: {} in total, {} while the VM was paused, {} beyond its pause (VICTOR's share; at most {} per move)",
        report.lost_total, report.lost_in_pause_total, report.lost_beyond_pause_total, report.lost_beyond_pause_max
    );
    println!("duplicate replies: {} (counted apart: never as an answer)", report.duplicate_replies_total);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Requests every 10 ms from t = 0; the VM paused from 100 ms (STOP) to 150 ms (RESUME).
    fn pending() -> PendingMove {
        PendingMove {
            index: 1,
            from: 2,
            to: 3,
            move_seq: 1,
            start_seq: 5,
            start_ns: 50 * MS,
            stop_ns: 100 * MS,
            resume_ns: 150 * MS,
            info: json!({ "status": "completed", "downtime": 40, "total-time": 90, "setup-time": 1,
                          "ram": { "transferred": 2_097_152 } }),
            announced: Some(BTreeMap::new()),
            relay: BTreeMap::new(),
        }
    }

    fn probes(lost: &[u32]) -> Probes {
        let sent = 30;
        Probes {
            sent,
            sent_at: (0..sent as u64).map(|s| s * 10 * MS).collect(),
            replied: (0..sent).filter(|s| !lost.contains(s)).collect(),
            duplicates: Vec::new(),
        }
    }

    #[test]
    fn losses_split_at_the_pause() {
        // Requests 10..=15 were sent from STOP − 1 ms to RESUME (99 ms .. 150 ms): 10 at 100 ms
        // up to 15 at 150 ms. 9 (90 ms) went out before the pause, 16 and 17 after the resume.
        let p = probes(&[9, 10, 11, 12, 13, 14, 15, 16, 17]);
        let m = pending().result(&p, 25, u64::MAX, &[], None, &[]);
        assert_eq!((m.lost, m.sent_in_pause, m.lost_in_pause, m.lost_beyond_pause), (9, 6, 6, 3));
        assert_eq!(m.lost_beyond_pause_sent_ms, vec![-60.0, 10.0, 20.0]);
        assert_eq!((m.qemu_downtime_ms, m.qemu_total_time_ms, m.transferred_mib), (40.0, 90.0, 2.0));
        assert_eq!(m.paused_ms, 50.0);
        // The first answered request after STOP is 18, sent 30 ms after the resume.
        assert_eq!(m.first_reply_sent_ms, Some(30.0));
        assert_eq!((m.bound_from.as_deref(), m.convergence_ms), (None, None));
    }

    #[test]
    fn duplicate_replies_are_counted_apart_from_losses() {
        // Relayed copies of 16 and 17 reached the VM twice (16 even three times), 20 twice; 10..=15
        // stay lost in the pause; 3 (before the move) and 26 (after its window) do not count.
        let mut p = probes(&[10, 11, 12, 13, 14, 15]);
        for seq in [16, 16, 17, 20, 3, 26] {
            p.record_reply(seq);
        }
        let m = pending().result(&p, 25, u64::MAX, &[], None, &[]);
        assert_eq!((m.lost, m.lost_in_pause, m.lost_beyond_pause), (6, 6, 0));
        assert_eq!(m.duplicate_replies, 4);
        assert!(m.migration_announced);
    }

    #[test]
    fn losses_before_the_move_or_after_the_window_do_not_count() {
        // 2 is before the move's first request (5), 27 after its window (end_seq 25).
        let m = pending().result(&probes(&[2, 27]), 25, u64::MAX, &[], None, &[]);
        assert_eq!((m.lost, m.lost_beyond_pause), (0, 0));
        assert_eq!(m.first_reply_sent_ms, Some(-50.0), "10 at 100 ms answered: nothing lost in the pause");
    }
}
