//! The controller scale benchmark, `victor-lab bench` (BENCHMARKS.md reports its runs).
//!
//! One run, in order:
//! 1. start a real etcd cluster (or the embedded store) and 1–2 real `victor-controller` processes
//!    ([`cluster`]); measure the store floor in the same run ([`floor`]);
//! 2. register N simulated FEs — real gRPC clients, each with its own connection, session
//!    heartbeats and a `Sync` stream into a compact map ([`agent`], [`wire`]);
//! 3. bind M VMs through `Report` (claim throughput), and take the controller's resident memory
//!    before and after (bytes per binding);
//! 4. churn: move random VMs between FEs at R moves/s for S seconds ([`driver`]); every FE's
//!    apply times give each move's convergence (claim sent → the last FE applied it) and the rate
//!    of updates committed and delivered to every FE ([`stats`]); at the end every agent's state
//!    is compared with the truth;
//! 5. a fresh agent syncs from revision 0 (full sync time, agent bytes per binding), and a fresh
//!    controller replica starts against the M bindings (cold start).
//!
//! All timestamps are CLOCK_MONOTONIC on one host. The machine's load is recorded with the
//! results: the numbers are only as quiet as the host was.
//!
//! The controller's cost is measured per core: the replicas are pinned to one CPU, etcd and this
//! process (the simulated agents) to the others ([`Pinning`]), and the replicas' CPU time
//! (`/proc/<pid>/stat`) is divided by what they delivered — per message, entry and move during the
//! churn, per heartbeat in an idle window before it ([`ControllerCost`]). Simulated agents
//! reconnect and resume like real ones; drops are counted with their cause.
//!
//! `--repeats N` runs all of it N times and summarises the key figures ([`repeats`]).

pub mod agent;
pub mod cluster;
pub mod driver;
pub mod floor;
pub mod real_agent;
pub mod repeats;
pub mod stats;
pub mod sys;
pub mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use victor_proto::clock::monotonic_ns;
use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};
use victor_store::etcd::{EtcdConfig, EtcdStore};

use agent::{AgentState, Causes, FeTable, Progress, Rec, Sessions, SimFe};
use cluster::Cluster;
use driver::{ChurnConfig, Reporters};
use floor::Floor;
use repeats::{RepeatedReport, RunFailure};
use stats::{Percentiles, round3};
use sys::Machine;

/// `victor-lab bench`: drive a controller cluster with simulated agents.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Simulated FEs (each a gRPC client with its own connection and Sync stream).
    #[arg(long, default_value_t = 3)]
    pub fes: usize,
    /// VM bindings loaded before the churn (through Report, in batches).
    #[arg(long, default_value_t = 1000)]
    pub bindings: usize,
    /// Offered moves per second during the churn.
    #[arg(long, default_value_t = 200.0)]
    pub churn: f64,
    /// Duration of the churn in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// etcd members: 0 = embedded store (one replica), 1 or 3.
    #[arg(long, default_value_t = 3)]
    pub etcd_members: usize,
    /// Controller replicas (agents are spread over them); default 2 with etcd, 1 embedded.
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Print one JSON object on stdout instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON result (default bench-results/bench-<fes>fes-<bindings>.json).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The victor-controller binary (default: next to victor-lab).
    #[arg(long, value_name = "PATH")]
    pub controller_bin: Option<PathBuf>,
    /// Moves target only the first K FEs (0 = all); every FE still receives every update.
    /// Concentrating the reporters lets each Report carry many claims at high churn rates.
    #[arg(long, default_value_t = 0)]
    pub churn_fes: usize,
    /// Also time the full sync of a real `victor-fe-agent` in a namespace (needs root) and report
    /// its memory and kernel state (`real_agent`).
    #[arg(long)]
    pub real_agent: bool,
    /// Observations per Report while loading the bindings (the API allows 1024).
    #[arg(long, default_value_t = 1024)]
    pub report_batch: usize,
    /// Report calls in flight at most (preload and churn).
    #[arg(long, default_value_t = 64)]
    pub inflight: usize,
    /// Churn claims are grouped per FE and sent every tick (ms), as an agent's reporter batches.
    #[arg(long, default_value_t = 10)]
    pub tick_ms: u64,
    /// Sequential samples for each store floor figure.
    #[arg(long, default_value_t = 300)]
    pub floor_samples: usize,
    /// Seed of the churn's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Pin the controller replicas to the first CPU and etcd and the simulated agents to the
    /// others: `auto` does when at least two CPUs are allowed, `on` requires it, `off` does not.
    /// Pinned, each process's scheduler is sized for its CPUs (replicas `TOKIO_WORKER_THREADS`,
    /// etcd `GOMAXPROCS`, the benchmark's runtime workers).
    #[arg(long, value_enum, default_value_t = PinMode::Auto)]
    pub pin: PinMode,
    /// Same as `--pin off`.
    #[arg(long, conflicts_with = "pin")]
    pub no_pin: bool,
    /// Length of the idle window (no churn) in which the cost of heartbeats is measured (s).
    #[arg(long, default_value_t = 3.0)]
    pub idle_seconds: f64,
    /// Run the whole benchmark this many times (a fresh cluster each) and report the min /
    /// median / max of the key figures with every run (default output
    /// bench-results/bench-<fes>fes-<bindings>-x<N>.json).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeats: u32,
    /// The replicas' `--fanout-share` (most of a core their fan-out takes under churn); default:
    /// the controller's.
    #[arg(long)]
    pub fanout_share: Option<f64>,
}

/// The result of one run (printed with `--json`, always written to the output file).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Simulated FEs.
    pub fes: usize,
    /// Bindings loaded.
    pub bindings: usize,
    /// etcd members (0 = embedded store).
    pub etcd_members: usize,
    /// Controller replicas.
    pub replicas: usize,
    /// Moves committed during the churn and applied by every FE, per second of (first claim →
    /// the last FE applied the last move).
    pub updates_per_s: f64,
    /// Per move: claim sent → the last FE applied it.
    pub convergence_ms: Percentiles,
    /// A new replica against the loaded store: process start → /readyz 200.
    pub controller_cold_start_s: f64,
    /// A new agent: Sync from revision 0 → SNAPSHOT_END applied.
    pub agent_full_sync_s: f64,
    /// Controller resident memory growth while loading the bindings, per binding.
    pub controller_bytes_per_binding: f64,
    /// Heap of a simulated agent's binding map after a full sync, per binding.
    pub agent_bytes_per_binding: f64,
    /// The store floor, measured in this run.
    pub etcd_floor: Floor,
    /// Controller figures as multiples of the floor.
    pub ratios: Ratios,
    /// The churn in detail.
    pub churn: ChurnReport,
    /// Loading the bindings (claim throughput).
    pub preload: PreloadReport,
    /// What the agents received.
    pub delivery: DeliveryReport,
    /// Memory in detail.
    pub memory: MemoryReport,
    /// CPU seconds used during the churn (and its drain), by process.
    pub cpu_during_churn_s: CpuReport,
    /// The replicas' CPU time per unit delivered.
    pub controller_cost: ControllerCost,
    /// Where the processes ran.
    pub pinning: Pinning,
    /// The replicas' `--fanout-share` if the bench set it (otherwise the controller's default).
    pub fanout_share: Option<f64>,
    /// Where the time of a move goes inside the controller (its `/debug/moves` traces).
    pub controller_stages_ms: Stages,
    /// A real agent's full sync in a namespace (`--real-agent`).
    pub real_agent: Option<real_agent::RealAgentReport>,
    /// The host.
    pub machine: Machine,
    /// The arguments of the run.
    pub command: String,
}

impl BenchReport {
    /// Whether the delivery checks held: every agent equal to the truth, every committed move
    /// applied by every FE, every dropped stream reopened.
    pub fn checks_pass(&self) -> bool {
        self.delivery.agents_inconsistent == 0 && self.churn.undelivered == 0 && self.delivery.stream_failures == 0
    }
}

/// Controller figures over the floor.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// convergence p50 / (put → watch event) p50.
    pub convergence_p50_over_watch_p50: f64,
    /// convergence p99 / (put → watch event) p99.
    pub convergence_p99_over_watch_p99: f64,
    /// Claim throughput of the preload × CAS p50 (1.0 = as fast as sequential single CAS txns).
    pub preload_claims_per_s_times_cas_p50: f64,
}

/// The churn.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    /// Offered moves per second.
    pub offered_per_s: f64,
    /// Churn duration (s).
    pub seconds: f64,
    /// FEs the moves went to.
    pub target_fes: usize,
    /// Moves committed.
    pub committed: usize,
    /// Committed moves per second of churn.
    pub committed_per_s: f64,
    /// Claims refused.
    pub rejected: usize,
    /// Report calls that failed.
    pub failed_calls: usize,
    /// Offered moves not sent (every sampled VM was busy).
    pub skipped: usize,
    /// Report calls made.
    pub reports: usize,
    /// Committed moves some FE never applied (must be 0).
    pub undelivered: usize,
    /// The first refusal or failure, if any.
    pub first_rejection: Option<String>,
}

/// The preload.
#[derive(Debug, Clone, Serialize)]
pub struct PreloadReport {
    /// Wall time (s).
    pub seconds: f64,
    /// Claims committed per second.
    pub claims_per_s: f64,
    /// Report calls.
    pub reports: usize,
    /// Observations per Report.
    pub batch: usize,
    /// Time until every FE had applied the last binding (s, from the preload's start).
    pub delivered_s: f64,
    /// Report calls sent again after a failure, by cause.
    pub retries: BTreeMap<String, u64>,
}

/// Delivery to the agents.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    /// Stream messages applied (all agents, whole run).
    pub messages: u64,
    /// Binding entries applied.
    pub entries: u64,
    /// Encoded bytes received (MiB).
    pub mib: f64,
    /// Stream messages applied during the churn and its drain (all agents).
    pub churn_messages: u64,
    /// Binding entries applied during the churn and its drain (all agents).
    pub churn_entries: u64,
    /// Agents whose final state equals the truth.
    pub agents_consistent: usize,
    /// Agents whose final state differs (must be 0).
    pub agents_inconsistent: usize,
    /// The first difference found.
    pub first_inconsistency: Option<String>,
    /// VMs left out of the check (a failed Report may or may not have committed).
    pub uncertain_vms: usize,
    /// Streams that dropped and could not be reopened (must be 0).
    pub stream_failures: usize,
    /// Streams that dropped (or failed to reopen) and were reopened, whole run.
    pub stream_drops: u64,
    /// The causes of the drops and failed reopenings.
    pub drop_causes: BTreeMap<String, u64>,
    /// Snapshots received beyond each agent's first (resumes that needed one).
    pub resync_snapshots: u64,
    /// Malformed entries or unknown FE ids (must be 0).
    pub anomalies: u64,
    /// Session heartbeats answered.
    pub heartbeats: u64,
    /// Session heartbeats that failed.
    pub heartbeat_failures: u64,
    /// Their causes.
    pub heartbeat_failure_causes: BTreeMap<String, u64>,
    /// FEs that registered again after the controller expired their session.
    pub reregistered: u64,
    /// Session heartbeats, sent → answered (ms; whole run).
    pub heartbeat_rtt_ms: Percentiles,
    /// How late the simulated agents sent their session heartbeats after their due time (ms;
    /// whole run): the lateness of the benchmark's heartbeat runtime. Sessions that expire with
    /// this small and the round trip large point at the controller; with this large, at the load
    /// generator.
    pub heartbeat_late_ms: Percentiles,
}

/// Memory.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Replica 1's VmRSS before any FE registered (MiB).
    pub controller_rss_empty_mib: f64,
    /// Replica 1's VmRSS with FEs and streams, before the bindings (MiB).
    pub controller_rss_before_mib: f64,
    /// Replica 1's VmRSS after the bindings were loaded and delivered (MiB).
    pub controller_rss_after_mib: f64,
    /// The cold-started replica's VmRSS once ready (MiB).
    pub cold_replica_rss_mib: f64,
    /// (cold replica RSS − replica 1's empty RSS) / bindings: the cache alone, without the
    /// change history and stream buffers the live replica also holds.
    pub cold_replica_bytes_per_binding: f64,
    /// The simulated agent's map: entry size (bytes) and total heap (bytes).
    pub agent_entry_bytes: usize,
    /// Heap of the full-sync agent's map.
    pub agent_map_bytes: usize,
    /// How `agent_bytes_per_binding` is measured.
    pub agent_method: &'static str,
}

/// Per-stage latency of the churn's moves inside the replica that committed them (from its
/// `/debug/moves` ring of the latest 4096 traces; only moves that replica also sent).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    /// Traces used.
    pub traces: usize,
    /// Report received → store acknowledged the CAS.
    pub commit: Percentiles,
    /// Store acknowledged → applied to the replica's cache (watch delivery).
    pub watch_to_cache: Percentiles,
    /// Cache applied → first agent stream message sent.
    pub cache_to_first_send: Percentiles,
    /// First → last agent stream message sent by that replica (the fan-out).
    pub fan_out: Percentiles,
}

impl Stages {
    async fn fetch(cluster: &Cluster, since_ns: u64) -> Stages {
        let mut parts: [Vec<f64>; 4] = Default::default();
        for replica in &cluster.replicas {
            let Ok((200, body)) = replica.get("/debug/moves").await else { continue };
            let Ok(serde_json::Value::Array(traces)) = serde_json::from_str(&body) else { continue };
            for t in traces {
                let get = |k: &str| t.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                let stamps = [
                    get("received_mono_ns"),
                    get("committed_mono_ns"),
                    get("cached_mono_ns"),
                    get("first_sent_mono_ns"),
                    get("last_sent_mono_ns"),
                ];
                if stamps.contains(&0) || stamps[0] < since_ns {
                    continue;
                }
                for (i, part) in parts.iter_mut().enumerate() {
                    part.push(stamps[i + 1].saturating_sub(stamps[i]) as f64 / 1e6);
                }
            }
        }
        let p = |v: &[f64]| Percentiles::of(v).rounded();
        Stages {
            traces: parts[0].len(),
            commit: p(&parts[0]),
            watch_to_cache: p(&parts[1]),
            cache_to_first_send: p(&parts[2]),
            fan_out: p(&parts[3]),
        }
    }
}

/// `--pin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PinMode {
    /// Pin when at least two CPUs are allowed.
    Auto,
    /// Pin; fail with fewer than two CPUs.
    On,
    /// Do not pin.
    Off,
}

/// Where the processes of the run were pinned (`sched_setaffinity` on every thread).
#[derive(Debug, Clone, Serialize)]
pub struct Pinning {
    /// Whether the processes were pinned.
    pub pinned: bool,
    /// How that was decided (`--pin` and the CPUs allowed to the benchmark).
    pub reason: String,
    /// The controller replicas' CPUs (empty: not pinned); their tokio runtimes get one worker
    /// thread per CPU (`TOKIO_WORKER_THREADS`).
    pub controller_cpus: Vec<usize>,
    /// etcd's and the benchmark's (the simulated agents') CPUs (empty: not pinned); etcd gets
    /// one Go processor per CPU (`GOMAXPROCS`), the benchmark's runtime one worker per CPU
    /// ([`runtime_workers`]).
    pub others_cpus: Vec<usize>,
    /// Each process's `Cpus_allowed_list` as the kernel showed it at the end of the churn
    /// (replica ids, `etcd-<i>`, `bench`).
    pub seen: BTreeMap<String, String>,
    /// What each process sized its scheduler for, read back at the end of the churn: the
    /// replicas' `TOKIO_WORKER_THREADS` and etcd's `GOMAXPROCS` from `/proc/<pid>/environ`
    /// (`unset`: the CPUs seen at start), the benchmark's tokio worker threads.
    pub sized: BTreeMap<String, String>,
}

/// Worker threads for the benchmark process's runtime: when the run pins, one per CPU left to
/// etcd and the agents (the process pins itself there once the cluster runs, and a runtime sized
/// for every CPU would then run two workers on one core; sized, with etcd's `GOMAXPROCS` too, the
/// store commit p99 beside them fell from 39–103 to 14–35 ms: BENCHMARKS.md); `None` = tokio's
/// default.
pub fn runtime_workers(args: &BenchArgs) -> Option<usize> {
    let plan = Pinning::plan(if args.no_pin { PinMode::Off } else { args.pin }).ok()?;
    plan.pinned.then_some(plan.others_cpus.len())
}

/// The CPUs the benchmark was allowed when it first looked, before it pinned itself (a second
/// run of `--repeats` must not plan from the narrower mask the first one left).
static ALLOWED_CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

impl Pinning {
    /// The first allowed CPU for the replicas, the others for the rest.
    fn plan(mode: PinMode) -> Result<Pinning> {
        let cpus = ALLOWED_CPUS.get_or_init(sys::allowed_cpus).clone();
        let off = |reason: String| Pinning {
            pinned: false,
            reason,
            controller_cpus: Vec::new(),
            others_cpus: Vec::new(),
            seen: BTreeMap::new(),
            sized: BTreeMap::new(),
        };
        match mode {
            PinMode::Off => return Ok(off("--pin off".into())),
            PinMode::Auto if cpus.len() < 2 => return Ok(off(format!("--pin auto: only CPUs {cpus:?} allowed"))),
            PinMode::On if cpus.len() < 2 => {
                bail!("--pin on needs at least two CPUs; this process may only use {cpus:?} (use --pin off)")
            }
            PinMode::Auto | PinMode::On => {}
        }
        Ok(Pinning {
            pinned: true,
            reason: format!("--pin {}: {} CPUs allowed", if mode == PinMode::On { "on" } else { "auto" }, cpus.len()),
            controller_cpus: vec![cpus[0]],
            others_cpus: cpus[1..].to_vec(),
            seen: BTreeMap::new(),
            sized: BTreeMap::new(),
        })
    }

    /// What the replicas are started with: pinned, their tokio runtimes get one worker per CPU
    /// they are pinned to (`TOKIO_WORKER_THREADS`), as a replica given that many cores would
    /// size them (tokio asks the kernel for the CPUs at start — before the pinning, here).
    fn replica_env(&self) -> Vec<(String, String)> {
        self.scheduler_env("TOKIO_WORKER_THREADS", &self.controller_cpus)
    }

    /// What etcd is started with: pinned, Go's scheduler gets one processor per CPU etcd is
    /// pinned to (`GOMAXPROCS`; Go too sizes it from the CPUs it sees at start).
    fn etcd_env(&self) -> Vec<(String, String)> {
        self.scheduler_env("GOMAXPROCS", &self.others_cpus)
    }

    /// `var` = the number of `cpus` when the run pins, else nothing.
    fn scheduler_env(&self, var: &str, cpus: &[usize]) -> Vec<(String, String)> {
        if !self.pinned {
            return Vec::new();
        }
        vec![(var.to_owned(), cpus.len().to_string())]
    }

    /// Pins the replicas, etcd and this process (again: threads created since inherited the mask
    /// of their creator, so this only catches threads a process started before it was pinned).
    fn apply(&self, cluster: &mut Cluster) -> Result<()> {
        if !self.pinned {
            return Ok(());
        }
        for replica in &cluster.replicas {
            sys::pin(replica.pid(), &self.controller_cpus)?;
        }
        for pid in cluster.etcd_pids().into_iter().chain([std::process::id()]) {
            sys::pin(pid, &self.others_cpus)?;
        }
        Ok(())
    }

    /// Records where every process of the run may run now, and what it sized its scheduler for.
    fn observe(&mut self, cluster: &mut Cluster) {
        let (mut seen, mut sized) = (BTreeMap::new(), BTreeMap::new());
        let var = |pid, name: &str| format!("{name}={}", sys::env_var(pid, name).unwrap_or_else(|| "unset".into()));
        for replica in &cluster.replicas {
            seen.insert(replica.id().to_owned(), sys::allowed_list(replica.pid()));
            sized.insert(replica.id().to_owned(), var(replica.pid(), "TOKIO_WORKER_THREADS"));
        }
        for (i, pid) in cluster.etcd_pids().into_iter().enumerate() {
            seen.insert(format!("etcd-{i}"), sys::allowed_list(pid));
            sized.insert(format!("etcd-{i}"), var(pid, "GOMAXPROCS"));
        }
        seen.insert("bench".to_owned(), sys::allowed_list(std::process::id()));
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        sized.insert("bench".to_owned(), format!("{workers} tokio workers"));
        self.seen = seen;
        self.sized = sized;
    }
}

/// The controller replicas' CPU time divided by what they delivered. During the churn a replica
/// also commits the moves and reads them back from etcd, so the per-message and per-entry figures
/// carry that share too; the idle window has no moves.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControllerCost {
    /// Churn: the replicas' CPU seconds (churn and drain).
    pub churn_cpu_s: f64,
    /// Churn: µs per stream message applied by an agent.
    pub us_per_message: f64,
    /// Churn: µs per binding entry applied by an agent.
    pub us_per_entry: f64,
    /// Churn: µs per move (committed and delivered to every FE).
    pub us_per_move: f64,
    /// Churn: the replicas' CPU use in cores (CPU seconds / wall seconds).
    pub churn_cores: f64,
    /// Idle window: length (s).
    pub idle_s: f64,
    /// Idle window: the replicas' CPU seconds.
    pub idle_cpu_s: f64,
    /// Idle window: stream heartbeats applied by the agents.
    pub idle_stream_heartbeats: u64,
    /// Idle window: session heartbeats answered.
    pub idle_session_heartbeats: u64,
    /// Idle window: µs per stream heartbeat — an upper bound: it also pays for the session
    /// heartbeats and the replicas' own housekeeping.
    pub us_per_heartbeat: f64,
    /// Idle window: µs of replica CPU per FE per second.
    pub idle_us_per_fe_per_s: f64,
    /// Idle window: etcd's CPU seconds (all members; 0 with the embedded store).
    pub idle_etcd_cpu_s: f64,
    /// Idle window: µs of etcd CPU per session heartbeat (each renews the FE's session lease) —
    /// an upper bound: it also pays for raft's own heartbeats between the members.
    pub etcd_us_per_session_heartbeat: f64,
}

/// CPU use during the churn.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// Wall time of the churn and drain (s).
    pub wall: f64,
    /// Per controller replica.
    pub controllers: Vec<f64>,
    /// All etcd members together.
    pub etcd: f64,
    /// This process (the simulated agents and the churn driver).
    pub bench: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the benchmark (`--repeats` times) and prints the result.
pub async fn run(args: BenchArgs) -> Result<()> {
    if args.repeats > 1 {
        return run_repeated(&args).await;
    }
    let report = execute(&args).await?;
    let path = format!("bench-results/bench-{}fes-{}.json", args.fes, args.bindings);
    let json = write_json(&args, &path, &report)?;
    if args.json {
        println!("{json}");
    } else {
        print_summary(&report);
    }
    Ok(())
}

/// `--repeats N`: every run, then the spread; fails (after writing the file) if a run did not
/// complete.
async fn run_repeated(args: &BenchArgs) -> Result<()> {
    let n = args.repeats as usize;
    let (mut runs, mut failed) = (Vec::new(), Vec::new());
    for run in 1..=n {
        progress(format!("run {run} of {n}"));
        match execute(args).await {
            Ok(report) => {
                progress(format!(
                    "run {run}: convergence p50 {:.3} ms, p99 {:.3} ms; {:.0} updates/s; {:.2} µs/message",
                    report.convergence_ms.p50,
                    report.convergence_ms.p99,
                    report.updates_per_s,
                    report.controller_cost.us_per_message
                ));
                runs.push(report);
            }
            Err(err) => {
                progress(format!("run {run} failed: {err:#}"));
                failed.push(RunFailure { run, error: format!("{err:#}") });
            }
        }
    }
    let report = RepeatedReport::new(n, runs, failed);
    let path = format!("bench-results/bench-{}fes-{}-x{n}.json", args.fes, args.bindings);
    let json = write_json(args, &path, &report)?;
    if args.json {
        println!("{json}");
    } else {
        report.print();
    }
    if let Some(first) = report.failed.first() {
        bail!("{} of {n} runs failed; first (run {}): {}", report.failed.len(), first.run, first.error);
    }
    Ok(())
}

/// Writes `report` to `--output` (or `default`) and returns its JSON.
fn write_json(args: &BenchArgs, default: &str, report: &impl Serialize) -> Result<String> {
    let json = serde_json::to_string_pretty(report)?;
    let path = args.output.clone().unwrap_or_else(|| PathBuf::from(default));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&path, format!("{json}\n")).with_context(|| format!("write {}", path.display()))?;
    eprintln!("victor-lab bench: wrote {}", path.display());
    Ok(json)
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("[bench {:>8.3}s] {msg}", START.get_or_init(Instant::now).elapsed().as_secs_f64());
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// The running agents.
struct Agents {
    fes: Vec<SimFe>,
    progress: Vec<Arc<Progress>>,
    tasks: Vec<JoinHandle<AgentState>>,
    stop: watch::Sender<bool>,
    recording: Arc<AtomicBool>,
}

impl Agents {
    /// Waits until every agent has applied `revision` (or fails, naming the slowest).
    async fn wait_revision(&self, revision: u64, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(i) = self.progress.iter().position(|p| p.failed.load(Ordering::Acquire)) {
                bail!("the stream of {} failed", self.fes[i].id);
            }
            let behind = self.progress.iter().position(|p| p.revision.load(Ordering::Acquire) < revision);
            let Some(i) = behind else { return Ok(()) };
            if started.elapsed() > timeout {
                bail!(
                    "{} is at revision {} after {timeout:?}, expected {revision}",
                    self.fes[i].id,
                    self.progress[i].revision.load(Ordering::Acquire)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops every stream and collects the agents' states.
    async fn stop(self) -> Result<(Vec<SimFe>, Vec<AgentState>)> {
        self.stop.send_replace(true);
        let mut states = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            states.push(task.await.context("agent task panicked")?);
        }
        Ok((self.fes, states))
    }

    fn sum(&self, f: impl Fn(&Progress) -> &AtomicU64) -> u64 {
        self.progress.iter().map(|p| f(p).load(Ordering::Relaxed)).sum()
    }
}

async fn start_agents(
    cluster: &Cluster,
    count: usize,
    sessions: &Arc<Sessions>,
    drops: &Arc<Causes>,
) -> Result<(Agents, Arc<FeTable>)> {
    let ids: Vec<String> = (0..count).map(|i| format!("fe-{i:05}")).collect();
    let table = Arc::new(FeTable::new(ids.iter().map(String::as_str)));
    let replicas: Vec<_> = cluster.replicas.iter().map(|r| r.grpc()).collect();
    let fes: Vec<SimFe> = futures::stream::iter(ids.iter().enumerate())
        .map(|(i, id)| SimFe::register(id.clone(), i, replicas[i % replicas.len()], sessions.clone()))
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let (stop, stop_rx) = watch::channel(false);
    let recording = Arc::new(AtomicBool::new(false));
    let mut progress = Vec::with_capacity(count);
    let mut tasks = Vec::with_capacity(count);
    for fe in &fes {
        let (p, task) = fe.follow(table.clone(), recording.clone(), stop_rx.clone(), drops.clone()).await?;
        progress.push(p);
        tasks.push(task);
    }
    Ok((Agents { fes, progress, tasks, stop, recording }, table))
}

async fn wait_snapshots(progress: &[Arc<Progress>], timeout: Duration) -> Result<()> {
    let started = Instant::now();
    while progress.iter().any(|p| p.snapshot_end_ns.load(Ordering::Acquire) == 0) {
        if started.elapsed() > timeout {
            bail!("not every agent received its snapshot within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn execute(args: &BenchArgs) -> Result<BenchReport> {
    START.get_or_init(Instant::now);
    if args.fes < 2 {
        bail!("--fes must be at least 2 (moves go from one FE to another)");
    }
    if args.bindings == 0 || args.bindings > 16_000_000 {
        bail!("--bindings must be between 1 and 16,000,000 (VMs are numbered inside 10.0.0.0/8)");
    }
    if args.seconds <= 0.0 || args.churn <= 0.0 {
        bail!("--seconds and --churn must be positive");
    }
    let mut machine = Machine::probe();
    let replicas = args.replicas.unwrap_or(if args.etcd_members == 0 { 1 } else { 2 });
    let controller_bin = match &args.controller_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("victor-controller"),
    };
    let mut pinning = Pinning::plan(if args.no_pin { PinMode::Off } else { args.pin })?;
    progress(format!("starting etcd ({} members) and {replicas} controller replica(s)", args.etcd_members));
    let mut replica_env = pinning.replica_env();
    if let Some(share) = args.fanout_share {
        replica_env.push(("VICTOR_FANOUT_SHARE".to_owned(), share.to_string()));
    }
    let mut cluster =
        Cluster::start(args.etcd_members, replicas, controller_bin, replica_env, pinning.etcd_env()).await?;

    progress("measuring the store floor");
    let floor = match &cluster.etcd {
        Some(etcd) => {
            let store = EtcdStore::connect(EtcdConfig { endpoints: etcd.endpoints(), ..EtcdConfig::default() }).await?;
            floor::measure(&store, args.floor_samples).await?
        }
        None => {
            let store = EmbeddedStore::open(&cluster.dir().join("floor.redb"), EmbeddedOptions::default()).await?;
            floor::measure(&store, args.floor_samples).await?
        }
    };
    let rss_empty = sys::rss_bytes(cluster.replicas[0].pid())?;

    if pinning.pinned {
        progress(format!(
            "pinning the replicas to CPU {:?}, etcd and the agents to {:?}",
            pinning.controller_cpus, pinning.others_cpus
        ));
    } else {
        progress(format!("not pinning ({})", pinning.reason));
    }
    pinning.apply(&mut cluster)?;

    progress(format!("registering {} FEs and opening their streams", args.fes));
    let sessions = Arc::new(Sessions::default());
    let drops = Arc::new(Causes::default());
    let (agents, _table) = start_agents(&cluster, args.fes, &sessions, &drops).await?;
    wait_snapshots(&agents.progress, Duration::from_secs(120)).await?;
    let rss_before = sys::rss_bytes(cluster.replicas[0].pid())?;

    progress(format!("loading {} bindings through Report", args.bindings));
    let reporters: Reporters = Arc::new(agents.fes.iter().map(|f| (f.id.clone(), f.client.clone())).collect());
    let preload_started = Instant::now();
    let retries = Causes::default();
    let preloaded = driver::preload(&reporters, args.bindings, args.report_batch, args.inflight, &retries).await?;
    agents.wait_revision(preloaded.revision, Duration::from_secs(600)).await?;
    let delivered_s = preload_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = sys::rss_bytes(cluster.replicas[0].pid())?;
    progress(format!(
        "loaded in {:.2} s ({:.0} claims/s), delivered to every FE after {delivered_s:.2} s",
        preloaded.elapsed.as_secs_f64(),
        args.bindings as f64 / preloaded.elapsed.as_secs_f64()
    ));

    pinning.apply(&mut cluster)?;
    let pids: Vec<u32> = cluster.replicas.iter().map(|r| r.pid()).collect();
    let etcd_pids = cluster.etcd_pids();
    let cpu = |pids: &[u32]| pids.iter().map(|&p| sys::cpu_seconds(p).unwrap_or(0.0)).collect::<Vec<_>>();

    progress(format!("idle for {} s (the cost of heartbeats)", args.idle_seconds));
    let (idle_cpu0, idle_etcd0): (f64, f64) = (cpu(&pids).iter().sum(), cpu(&etcd_pids).iter().sum());
    let (hb0, session0) = (agents.sum(|p| &p.heartbeats), sessions.heartbeats.load(Ordering::Relaxed));
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.idle_seconds.max(0.0))).await;
    let idle_s = idle_started.elapsed().as_secs_f64();
    let idle_cpu_s = cpu(&pids).iter().sum::<f64>() - idle_cpu0;
    let idle_etcd_cpu_s = cpu(&etcd_pids).iter().sum::<f64>() - idle_etcd0;
    let idle_stream_heartbeats = agents.sum(|p| &p.heartbeats) - hb0;
    let idle_session_heartbeats = sessions.heartbeats.load(Ordering::Relaxed) - session0;

    progress(format!("churning {} moves/s for {} s", args.churn, args.seconds));
    let mut truth: Vec<u32> = (0..args.bindings).map(|i| (i % args.fes) as u32).collect();
    let (ctl_cpu0, etcd_cpu0, me_cpu0) = (cpu(&pids), cpu(&etcd_pids), sys::cpu_seconds(std::process::id())?);
    let (messages0, entries0) = (agents.sum(|p| &p.messages), agents.sum(|p| &p.entries));
    let churn_started = Instant::now();
    agents.recording.store(true, Ordering::Relaxed);
    let churned = driver::churn(
        &reporters,
        &mut truth,
        ChurnConfig {
            rate: args.churn,
            duration: Duration::from_secs_f64(args.seconds),
            tick: Duration::from_millis(args.tick_ms.max(1)),
            inflight: args.inflight,
            target_fes: if args.churn_fes == 0 { args.fes } else { args.churn_fes },
            seed: args.seed,
        },
    )
    .await?;
    let last_revision = churned.committed.last().map(|c| c.revision).unwrap_or(0);
    let drained = agents.wait_revision(last_revision, Duration::from_secs(120)).await;
    agents.recording.store(false, Ordering::Relaxed);
    pinning.observe(&mut cluster);
    let cpu_report = CpuReport {
        wall: round3(churn_started.elapsed().as_secs_f64()),
        controllers: cpu(&pids).iter().zip(&ctl_cpu0).map(|(a, b)| round3(a - b)).collect(),
        etcd: round3(cpu(&etcd_pids).iter().sum::<f64>() - etcd_cpu0.iter().sum::<f64>()),
        bench: round3(sys::cpu_seconds(std::process::id())? - me_cpu0),
    };
    if let Err(err) = &drained {
        progress(format!("not every FE caught up: {err:#}"));
    }
    let stages = Stages::fetch(&cluster, churned.window_ns.0).await;

    let messages = agents.sum(|p| &p.messages);
    let entries = agents.sum(|p| &p.entries);
    let (churn_messages, churn_entries) = (messages - messages0, entries - entries0);
    let bytes = agents.sum(|p| &p.bytes);
    let anomalies = agents.sum(|p| &p.anomalies);
    let stream_drops = agents.sum(|p| &p.drops);
    let resync_snapshots = agents.progress.iter().map(|p| p.snapshots.load(Ordering::Relaxed).saturating_sub(1)).sum();
    let (fes, states) = agents.stop().await?;
    let stream_failures = states.iter().filter(|s| s.error.is_some()).count();
    if let Some(err) = states.iter().find_map(|s| s.error.as_ref()) {
        progress(format!("{stream_failures} streams were not reopened; first: {err}"));
    }

    // Convergence and delivered rate.
    let logs: Vec<&[(u64, u64)]> = states.iter().map(|s| s.log.as_slice()).collect();
    let last = stats::last_applied(&churned.committed, &logs);
    let mut convergence = Vec::with_capacity(last.len());
    let mut undelivered = 0;
    let mut last_delivery = 0u64;
    for (c, at) in churned.committed.iter().zip(&last) {
        match at {
            Some(at) => {
                convergence.push(at.saturating_sub(c.claimed_ns) as f64 / 1e6);
                last_delivery = last_delivery.max(*at);
            }
            None => undelivered += 1,
        }
    }
    let delivered = convergence.len();
    let span_s = last_delivery.saturating_sub(churned.window_ns.0) as f64 / 1e9;
    let updates_per_s = if span_s > 0.0 { delivered as f64 / span_s } else { 0.0 };

    // Every agent's state against the truth.
    let uncertain: std::collections::HashSet<usize> = churned.uncertain.iter().copied().collect();
    let mut inconsistent = 0;
    let mut first_inconsistency = None;
    for (fe, state) in fes.iter().zip(&states) {
        if let Some(problem) = check_state(&state.map, &truth, &uncertain) {
            inconsistent += 1;
            first_inconsistency.get_or_insert_with(|| format!("{}: {problem}", fe.id));
        }
    }
    drop(states);
    drop(fes);

    progress("full sync of a fresh agent");
    let (full_sync_s, agent_map_bytes, synced) = full_sync(&cluster, args.fes, &sessions).await?;
    if synced != args.bindings {
        bail!("the full-sync agent received {synced} bindings, expected {}", args.bindings);
    }

    let real_agent = if args.real_agent {
        progress("full sync of a real fe-agent in a namespace");
        Some(tokio::task::block_in_place(|| real_agent::full_sync(&cluster, args.bindings))?)
    } else {
        None
    };

    progress("cold start of a controller replica");
    let (cold_start_s, cold_rss) = cold_start(&mut cluster, &pinning).await?;
    machine.loadavg_end = sys::loadavg();

    let m = args.bindings as f64;
    let convergence_ms = Percentiles::of(&convergence).rounded();
    let preload_rate = m / preloaded.elapsed.as_secs_f64();
    let entry_bytes = std::mem::size_of::<(u32, Rec)>();
    let churn_cpu_s: f64 = cpu_report.controllers.iter().sum();
    let per = |cpu_s: f64, n: u64| if n == 0 { 0.0 } else { round3(cpu_s * 1e6 / n as f64) };
    let (heartbeat_late_ms, heartbeat_rtt_ms) = sessions.timing();
    let controller_cost = ControllerCost {
        churn_cpu_s: round3(churn_cpu_s),
        us_per_message: per(churn_cpu_s, churn_messages),
        us_per_entry: per(churn_cpu_s, churn_entries),
        us_per_move: per(churn_cpu_s, delivered as u64),
        churn_cores: round3(churn_cpu_s / cpu_report.wall.max(1e-9)),
        idle_s: round3(idle_s),
        idle_cpu_s: round3(idle_cpu_s),
        idle_stream_heartbeats,
        idle_session_heartbeats,
        us_per_heartbeat: per(idle_cpu_s, idle_stream_heartbeats),
        idle_us_per_fe_per_s: round3(idle_cpu_s * 1e6 / (args.fes as f64 * idle_s.max(1e-9))),
        idle_etcd_cpu_s: round3(idle_etcd_cpu_s),
        etcd_us_per_session_heartbeat: per(idle_etcd_cpu_s, idle_session_heartbeats),
    };
    Ok(BenchReport {
        fes: args.fes,
        bindings: args.bindings,
        etcd_members: args.etcd_members,
        replicas,
        updates_per_s: updates_per_s.round(),
        convergence_ms,
        controller_cold_start_s: round3(cold_start_s),
        agent_full_sync_s: round3(full_sync_s),
        controller_bytes_per_binding: (rss_after as f64 - rss_before as f64) / m,
        agent_bytes_per_binding: round3(agent_map_bytes as f64 / m),
        ratios: Ratios {
            convergence_p50_over_watch_p50: round3(convergence_ms.p50 / floor.watch_ms.p50),
            convergence_p99_over_watch_p99: round3(convergence_ms.p99 / floor.watch_ms.p99),
            preload_claims_per_s_times_cas_p50: round3(preload_rate * floor.cas_txn_ms.p50 / 1e3),
        },
        etcd_floor: floor,
        churn: ChurnReport {
            offered_per_s: args.churn,
            seconds: args.seconds,
            target_fes: if args.churn_fes == 0 { args.fes } else { args.churn_fes.min(args.fes) },
            committed: churned.committed.len(),
            committed_per_s: (churned.committed.len() as f64
                / ((churned.window_ns.1 - churned.window_ns.0) as f64 / 1e9))
                .round(),
            rejected: churned.rejected,
            failed_calls: churned.failed_calls,
            skipped: churned.skipped,
            reports: churned.reports,
            undelivered,
            first_rejection: churned.first_rejection,
        },
        preload: PreloadReport {
            seconds: round3(preloaded.elapsed.as_secs_f64()),
            claims_per_s: preload_rate.round(),
            reports: preloaded.reports,
            batch: args.report_batch,
            delivered_s: round3(delivered_s),
            retries: retries.counts(),
        },
        delivery: DeliveryReport {
            messages,
            entries,
            mib: round3(bytes as f64 / MIB),
            churn_messages,
            churn_entries,
            agents_consistent: args.fes - inconsistent,
            agents_inconsistent: inconsistent,
            first_inconsistency,
            uncertain_vms: uncertain.len(),
            stream_failures,
            stream_drops,
            drop_causes: drops.counts(),
            resync_snapshots,
            anomalies,
            heartbeats: sessions.heartbeats.load(Ordering::Relaxed),
            heartbeat_failures: sessions.failures.total(),
            heartbeat_failure_causes: sessions.failures.counts(),
            reregistered: sessions.reregistered.load(Ordering::Relaxed),
            heartbeat_rtt_ms,
            heartbeat_late_ms,
        },
        memory: MemoryReport {
            controller_rss_empty_mib: round3(rss_empty as f64 / MIB),
            controller_rss_before_mib: round3(rss_before as f64 / MIB),
            controller_rss_after_mib: round3(rss_after as f64 / MIB),
            cold_replica_rss_mib: round3(cold_rss as f64 / MIB),
            cold_replica_bytes_per_binding: round3((cold_rss as f64 - rss_empty as f64) / m),
            agent_entry_bytes: entry_bytes,
            agent_map_bytes,
            agent_method: "heap of the full-sync agent's HashMap<u32, 32-byte record> (the real agent's layout), \
                           from its capacity and hashbrown's bucket layout (checked against a counting allocator \
                           in tests/bench_smoke.rs), divided by the bindings",
        },
        cpu_during_churn_s: cpu_report,
        controller_cost,
        pinning,
        fanout_share: args.fanout_share,
        controller_stages_ms: stages,
        real_agent,
        machine,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    })
}

/// Compares an agent's map with the truth; describes the first difference.
fn check_state(map: &agent::BindingMap, truth: &[u32], uncertain: &std::collections::HashSet<usize>) -> Option<String> {
    if map.len() != truth.len() {
        return Some(format!("{} bindings, expected {}", map.len(), truth.len()));
    }
    for (vm, &fe) in truth.iter().enumerate() {
        if uncertain.contains(&vm) {
            continue;
        }
        let ip = u32::from(driver::vm_ip(vm));
        match map.get(&ip) {
            Some(rec) if rec.fe == fe && rec.mac == driver::vm_mac(vm) => {}
            Some(rec) => {
                return Some(format!("{} at FE #{} (mac {:?}), expected FE #{fe}", driver::vm_ip(vm), rec.fe, rec.mac));
            }
            None => return Some(format!("{} missing", driver::vm_ip(vm))),
        }
    }
    None
}

/// A fresh agent syncs from revision 0; returns the time to SNAPSHOT_END applied, its map's heap
/// bytes and the number of bindings it holds.
async fn full_sync(cluster: &Cluster, fes: usize, sessions: &Arc<Sessions>) -> Result<(f64, usize, usize)> {
    let table =
        Arc::new(FeTable::new((0..fes).map(|i| format!("fe-{i:05}")).collect::<Vec<_>>().iter().map(String::as_str)));
    let fe = SimFe::register("fe-full-sync".into(), fes, cluster.replicas[0].grpc(), sessions.clone()).await?;
    let (stop, stop_rx) = watch::channel(false);
    let started = monotonic_ns();
    let drops = Arc::new(Causes::default());
    let (progress, task) = fe.follow(table, Arc::new(AtomicBool::new(false)), stop_rx, drops).await?;
    wait_snapshots(std::slice::from_ref(&progress), Duration::from_secs(300)).await?;
    let end = progress.snapshot_end_ns.load(Ordering::Acquire);
    stop.send_replace(true);
    let state = task.await?;
    if let Some(err) = state.error {
        bail!("full-sync stream: {err}");
    }
    let bytes = stats::hash_map_heap_bytes(state.map.capacity(), std::mem::size_of::<(u32, Rec)>());
    Ok(((end - started) as f64 / 1e9, bytes, state.map.len()))
}

/// Starts a fresh replica against the loaded store (with the embedded store: restarts the only
/// replica on its file); returns the time to /readyz and its RSS once ready.
async fn cold_start(cluster: &mut Cluster, pinning: &Pinning) -> Result<(f64, u64)> {
    let id = if cluster.etcd.is_some() {
        "bench-cold".to_owned()
    } else {
        let replica = &mut cluster.replicas[0];
        replica.stop(Duration::from_secs(10));
        replica.id().to_owned()
    };
    let started = Instant::now();
    let replica = cluster.spawn(&id)?;
    if pinning.pinned {
        sys::pin(replica.pid(), &pinning.controller_cpus)?;
    }
    replica.wait_ready(Duration::from_secs(300)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss = sys::rss_bytes(replica.pid())?;
    if cluster.etcd.is_none() {
        cluster.replicas[0] = replica;
    } else {
        cluster.replicas.push(replica);
    }
    Ok((elapsed, rss))
}

fn print_summary(r: &BenchReport) {
    let store =
        if r.etcd_members == 0 { "embedded store".to_owned() } else { format!("{}-member etcd", r.etcd_members) };
    println!("victor-lab bench: {} FEs, {} bindings, {} replica(s) on {store}", r.fes, r.bindings, r.replicas);
    println!(
        "  store floor         CAS txn p50 {:.3} ms p99 {:.3} ms; put→watch p50 {:.3} ms p99 {:.3} ms",
        r.etcd_floor.cas_txn_ms.p50, r.etcd_floor.cas_txn_ms.p99, r.etcd_floor.watch_ms.p50, r.etcd_floor.watch_ms.p99
    );
    println!(
        "  preload             {:.0} claims/s ({} Reports of {}), delivered to every FE after {:.2} s",
        r.preload.claims_per_s, r.preload.reports, r.preload.batch, r.preload.delivered_s
    );
    println!(
        "  churn               offered {:.0}/s, committed {:.0}/s, delivered to every FE {:.0}/s",
        r.churn.offered_per_s, r.churn.committed_per_s, r.updates_per_s
    );
    println!(
        "  convergence         p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({}× / {}× the watch floor)",
        r.convergence_ms.p50,
        r.convergence_ms.p99,
        r.convergence_ms.max,
        r.ratios.convergence_p50_over_watch_p50,
        r.ratios.convergence_p99_over_watch_p99
    );
    let s = &r.controller_stages_ms;
    println!(
        "  controller stages   p50/p99 ms: commit {:.3}/{:.3}, watch→cache {:.3}/{:.3}, cache→first send {:.3}/{:.3}, fan-out {:.3}/{:.3}",
        s.commit.p50,
        s.commit.p99,
        s.watch_to_cache.p50,
        s.watch_to_cache.p99,
        s.cache_to_first_send.p50,
        s.cache_to_first_send.p99,
        s.fan_out.p50,
        s.fan_out.p99
    );
    println!("  cold start          {:.3} s (controller replica, {} bindings)", r.controller_cold_start_s, r.bindings);
    println!("  agent full sync     {:.3} s", r.agent_full_sync_s);
    if let Some(a) = &r.real_agent {
        println!(
            "  real agent          full sync {:.3} s, RSS {:.1} MiB ({:.1} B/binding; {:.1} once recorded), {} kernel routes, {} restart records (complete at {:.3} s)",
            a.full_sync_s,
            a.rss_mib,
            a.rss_bytes_per_binding,
            a.rss_settled_bytes_per_binding,
            a.kernel_routes,
            a.record_routes,
            a.records_complete_s
        );
    }
    println!(
        "  memory per binding  controller {:.1} B, agent {:.1} B",
        r.controller_bytes_per_binding, r.agent_bytes_per_binding
    );
    let c = &r.controller_cost;
    println!(
        "  controller cost     churn: {:.2} µs/message, {:.3} µs/entry, {:.0} µs/move ({:.2} cores); idle: {:.2} µs/heartbeat, {:.1} µs per FE per s; etcd idle: {:.2} s, {:.1} µs per session heartbeat",
        c.us_per_message,
        c.us_per_entry,
        c.us_per_move,
        c.churn_cores,
        c.us_per_heartbeat,
        c.idle_us_per_fe_per_s,
        c.idle_etcd_cpu_s,
        c.etcd_us_per_session_heartbeat
    );
    let cpu = &r.cpu_during_churn_s;
    println!(
        "  CPU during churn    {:.2} s wall: replicas {:?} s, etcd {:.2} s, benchmark (agents) {:.2} s",
        cpu.wall, cpu.controllers, cpu.etcd, cpu.bench
    );
    let p = &r.pinning;
    if p.pinned {
        println!(
            "  pinning             replicas on CPUs {:?}, etcd and the benchmark on {:?} ({}); seen {:?}; sized {:?}",
            p.controller_cpus, p.others_cpus, p.reason, p.seen, p.sized
        );
    } else {
        println!("  pinning             none ({})", p.reason);
    }
    println!(
        "  checks              {}/{} agents consistent, {} undelivered, {} stream failures, {} rejected",
        r.delivery.agents_consistent, r.fes, r.churn.undelivered, r.delivery.stream_failures, r.churn.rejected
    );
    println!(
        "  drops               {} streams reopened {:?}; {} resync snapshots; {} preload retries {:?}",
        r.delivery.stream_drops,
        r.delivery.drop_causes,
        r.delivery.resync_snapshots,
        r.preload.retries.values().sum::<u64>(),
        r.preload.retries
    );
    println!(
        "  sessions            {} heartbeats failed {:?}, {} re-registered; heartbeat RTT p99 {:.1} max {:.1} ms, sent late p99 {:.1} max {:.1} ms",
        r.delivery.heartbeat_failures,
        r.delivery.heartbeat_failure_causes,
        r.delivery.reregistered,
        r.delivery.heartbeat_rtt_ms.p99,
        r.delivery.heartbeat_rtt_ms.max,
        r.delivery.heartbeat_late_ms.p99,
        r.delivery.heartbeat_late_ms.max
    );
    println!("  load average        {:?} → {:?}", r.machine.loadavg_start, r.machine.loadavg_end);
}
