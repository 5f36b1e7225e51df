//! The load: VM claims sent as `AgentService.Report` calls by the simulated FEs themselves (each
//! FE reports its own VMs over its own connection, as an agent does after ARP).
//!
//! * [`preload`] binds `M` VMs, each FE reporting its share in batches — the controller's claim
//!   throughput.
//! * [`churn`] moves random VMs to random other FEs at a fixed offered rate for a fixed time;
//!   claims are grouped per target FE each tick (as an agent's reporter batches), with a bound on
//!   calls in flight, so an overloaded controller shows as a lower achieved rate, not as an
//!   unbounded queue in the benchmark.
//!
//! The benchmark keeps the truth: the FE every VM was last moved to, checked against every
//! agent's state at the end.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Semaphore, mpsc};
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::{ClaimOutcome, ClaimResult, ObservationKind, ReportRequest, VmObservation};

use super::agent::{Causes, cause};
use super::stats::Committed;

/// The `i`-th VM's IP (inside [`super::cluster::MOBILE_PREFIX`], never the network address).
pub fn vm_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i as u32)
}

/// The `i`-th VM's MAC.
pub fn vm_mac(i: usize) -> [u8; 6] {
    let b = (i as u32).to_be_bytes();
    [0x02, 0x0b, b[0], b[1], b[2], b[3]]
}

fn observation(vm: usize) -> VmObservation {
    VmObservation {
        vm_ip: vm_ip(vm).octets().to_vec(),
        mac: vm_mac(vm).to_vec(),
        kind: ObservationKind::Learned as i32,
        observed_at_unix_nanos: unix_nanos(),
        port: "bench".into(),
        known_revision: None,
    }
}

/// The reporters: one client per simulated FE, indexed like the FE table.
pub type Reporters = Arc<Vec<(String, AgentServiceClient<tonic::transport::Channel>)>>;

async fn report(reporters: &Reporters, fe: usize, vms: &[usize]) -> Result<Vec<ClaimResult>, tonic::Status> {
    let (fe_id, client) = &reporters[fe];
    let req = ReportRequest { fe_id: fe_id.clone(), observations: vms.iter().map(|&vm| observation(vm)).collect() };
    Ok(client.clone().report(req).await?.into_inner().results)
}

/// What loading the bindings took.
#[derive(Debug, Clone)]
pub struct Preloaded {
    /// Wall time of the load.
    pub elapsed: Duration,
    /// Report calls made.
    pub reports: usize,
    /// Highest revision written.
    pub revision: u64,
}

/// Attempts of one preload Report before the run fails, and the backoff between them (doubling
/// from the first to the second figure): long enough for an FE whose session expired to
/// register again at its next heartbeat.
const PRELOAD_ATTEMPTS: usize = 10;
const PRELOAD_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Binds VMs `0..bindings`, VM `i` at FE `i % fes`, in Reports of at most `batch` observations,
/// `inflight` calls at a time. Every claim must be bound (or already be, on a re-run). A failed
/// call is sent again (claims are idempotent: a VM already bound where it is reported is
/// unchanged), as an agent's reporter does; every failure is counted in `retries` by cause.
pub async fn preload(
    reporters: &Reporters,
    bindings: usize,
    batch: usize,
    inflight: usize,
    retries: &Causes,
) -> Result<Preloaded> {
    let fes = reporters.len();
    let mut calls = Vec::new();
    for fe in 0..fes {
        let vms: Vec<usize> = (fe..bindings).step_by(fes).collect();
        for chunk in vms.chunks(batch.max(1)) {
            calls.push((fe, chunk.to_vec()));
        }
    }
    let reports = calls.len();
    let started = Instant::now();
    let mut results = futures::stream::iter(calls)
        .map(|(fe, vms)| async move {
            let (mut attempt, mut backoff) = (1, PRELOAD_BACKOFF.0);
            loop {
                match report(reporters, fe, &vms).await {
                    Ok(results) => return Ok::<_, anyhow::Error>(results),
                    Err(status) if attempt < PRELOAD_ATTEMPTS => {
                        retries.count(cause(&status));
                        attempt += 1;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(PRELOAD_BACKOFF.1);
                    }
                    Err(status) => {
                        bail!("preload Report from FE {fe} failed {attempt} times; last: {}", cause(&status))
                    }
                }
            }
        })
        .buffer_unordered(inflight.max(1));
    let mut revision = 0;
    let mut rejected = Vec::new();
    while let Some(results) = results.next().await {
        for r in results? {
            match ClaimOutcome::try_from(r.outcome) {
                Ok(ClaimOutcome::Bound | ClaimOutcome::Unchanged) => revision = revision.max(r.revision),
                _ => rejected.push(r),
            }
        }
    }
    if let Some(first) = rejected.first() {
        bail!("{} preload claims were not bound; first: code {} {}", rejected.len(), first.code, first.message);
    }
    Ok(Preloaded { elapsed: started.elapsed(), reports, revision })
}

/// How to churn.
#[derive(Debug, Clone, Copy)]
pub struct ChurnConfig {
    /// Offered moves per second.
    pub rate: f64,
    /// Duration.
    pub duration: Duration,
    /// Claims are grouped per FE and sent every tick.
    pub tick: Duration,
    /// Report calls in flight at most.
    pub inflight: usize,
    /// Moves go to FEs `0..target_fes` (all FEs still receive every update).
    pub target_fes: usize,
    /// Seed of the random choice of VMs and targets.
    pub seed: u64,
}

/// What churning did.
#[derive(Debug, Default)]
pub struct Churned {
    /// Committed moves (sorted by revision).
    pub committed: Vec<Committed>,
    /// Claims the controller refused.
    pub rejected: usize,
    /// First refusal, for the report.
    pub first_rejection: Option<String>,
    /// Failed Report calls (their VMs are left out of the final check: they may or may not have
    /// been committed).
    pub failed_calls: usize,
    /// VMs whose state is uncertain after a failed call.
    pub uncertain: Vec<usize>,
    /// Moves offered but not sent (no idle VM to move).
    pub skipped: usize,
    /// Report calls made.
    pub reports: usize,
    /// When the first claim was sent and when the last result came back (CLOCK_MONOTONIC ns).
    pub window_ns: (u64, u64),
}

struct Outcome {
    fe: usize,
    vms: Vec<usize>,
    claimed_ns: u64,
    results: Result<Vec<ClaimResult>, tonic::Status>,
}

/// Moves random idle VMs to random other FEs; `truth[vm]` is updated to the FE of every committed
/// move.
pub async fn churn(reporters: &Reporters, truth: &mut [u32], config: ChurnConfig) -> Result<Churned> {
    let fes = reporters.len();
    let targets = config.target_fes.clamp(1, fes);
    if targets < 2 && fes > 1 {
        bail!("--churn-fes must be at least 2 (a move needs another FE)");
    }
    let vms = truth.len();
    if vms == 0 || fes < 2 {
        bail!("churn needs at least 1 binding and 2 FEs");
    }
    let permits = Arc::new(Semaphore::new(config.inflight.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let mut busy = vec![false; vms];
    let mut out = Churned::default();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let started = Instant::now();
    out.window_ns.0 = monotonic_ns();
    let mut offered = 0u64;
    let mut next_tick = started;
    while started.elapsed() < config.duration {
        while let Ok(outcome) = rx.try_recv() {
            settle(outcome, truth, &mut busy, &mut out);
        }
        let due = (config.rate * started.elapsed().as_secs_f64()) as u64;
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        while offered < due {
            offered += 1;
            let Some(vm) = (0..8).map(|_| rng.random_range(0..vms)).find(|&vm| !busy[vm]) else {
                out.skipped += 1;
                continue;
            };
            let current = truth[vm] as usize;
            let mut target = rng.random_range(0..targets);
            if target == current {
                target = (target + 1 + rng.random_range(0..targets - 1)) % targets;
            }
            busy[vm] = true;
            groups.entry(target).or_default().push(vm);
        }
        for (fe, group) in groups {
            for chunk in group.chunks(1024) {
                let permit = permits.clone().acquire_owned().await.expect("semaphore open");
                let reporters = reporters.clone();
                let tx = tx.clone();
                let vms = chunk.to_vec();
                out.reports += 1;
                tokio::spawn(async move {
                    let claimed_ns = monotonic_ns();
                    let results = report(&reporters, fe, &vms).await;
                    drop(permit);
                    let _ = tx.send(Outcome { fe, vms, claimed_ns, results });
                });
            }
        }
        next_tick += config.tick;
        tokio::time::sleep_until(next_tick.into()).await;
    }
    drop(tx);
    while let Some(outcome) = rx.recv().await {
        settle(outcome, truth, &mut busy, &mut out);
    }
    out.window_ns.1 = monotonic_ns();
    out.committed.sort_by_key(|c| c.revision);
    Ok(out)
}

fn settle(outcome: Outcome, truth: &mut [u32], busy: &mut [bool], out: &mut Churned) {
    for &vm in &outcome.vms {
        busy[vm] = false;
    }
    let results = match outcome.results {
        Ok(results) => results,
        Err(status) => {
            out.failed_calls += 1;
            out.first_rejection.get_or_insert_with(|| format!("Report failed: {}", cause(&status)));
            out.uncertain.extend(&outcome.vms);
            return;
        }
    };
    for (&vm, r) in outcome.vms.iter().zip(&results) {
        match ClaimOutcome::try_from(r.outcome) {
            Ok(ClaimOutcome::Moved) => {
                truth[vm] = outcome.fe as u32;
                out.committed.push(Committed { revision: r.revision, claimed_ns: outcome.claimed_ns });
            }
            _ => {
                out.rejected += 1;
                out.first_rejection.get_or_insert_with(|| format!("{vm}: code {} {}", r.code, r.message));
                if r.code == tonic::Code::Unavailable as i32 {
                    out.uncertain.push(vm);
                }
            }
        }
    }
}
