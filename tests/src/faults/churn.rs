//! Continuous migrations while faults are injected, and the truth they leave behind.
//!
//! A background task moves random VMs to random other FEs at a fixed offered rate: every tick the
//! moves are grouped per target FE and sent as that FE's `Report` (as an agent's reporter
//! batches), through one of the replicas it may use (round robin; a replica whose call failed is
//! avoided for a second). Each VM has at most one claim in flight.
//!
//! The truth per VM is what the controller acknowledged: a `MOVED` result makes the target FE the
//! VM's known binding. A claim whose outcome the caller cannot know — the call failed, or the
//! claim came back `UNAVAILABLE` — leaves the VM *uncertain* between its previous FE and the
//! target (with the controller's message, to check what it promised), and the VM is not moved
//! again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;
use victor_proto::clock::{monotonic_ns, unix_nanos};
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::{ClaimOutcome, ObservationKind, ReportRequest, VmObservation};

use crate::bench::driver::{vm_ip, vm_mac};

/// Deadline of one Report call: longer than the controller's own store deadline (`--etcd-timeout`).
const REPORT_TIMEOUT: Duration = Duration::from_secs(8);
/// A replica whose call failed is avoided this long.
const AVOID: Duration = Duration::from_secs(1);

/// What the controller told us about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmTruth {
    /// Bound to this FE (index into the FE list), acknowledged.
    Known(u32),
    /// A claim's outcome is unknown: the binding is at `from` or at `to`, nothing else.
    Uncertain {
        /// FE before the claim.
        from: u32,
        /// FE of the claim.
        to: u32,
        /// What the controller (or the transport) said.
        said: String,
    },
}

/// How to churn.
#[derive(Debug, Clone)]
pub struct ChurnConfig {
    /// Offered moves per second.
    pub rate: f64,
    /// Claims are grouped per target FE every tick.
    pub tick: Duration,
    /// Report calls in flight at most.
    pub inflight: usize,
    /// Seed of the random choices.
    pub seed: u64,
}

/// What the churn did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ChurnLog {
    /// Report calls sent.
    pub reports: u64,
    /// Report calls that failed as a whole.
    pub failed_calls: u64,
    /// Claims committed (`MOVED`).
    pub moved: u64,
    /// Claims answered `UNAVAILABLE`.
    pub unavailable: u64,
    /// Claims refused for another reason (a binding rule).
    pub refused: u64,
    /// Offered moves not sent (no idle VM found, or every target excluded).
    pub skipped: u64,
    /// The first failure or refusal, for messages.
    pub first_error: Option<String>,
    /// When each committed claim's answer arrived (CLOCK_MONOTONIC ns), roughly in order.
    #[serde(skip)]
    pub commits_ns: Vec<u64>,
}

impl ChurnLog {
    /// Claims committed with an answer inside `[from_ns, to_ns]`.
    pub fn commits_between(&self, from_ns: u64, to_ns: u64) -> usize {
        self.commits_ns.iter().filter(|&&t| t >= from_ns && t <= to_ns).count()
    }

    /// The longest time without a committed claim inside `[from_ns, to_ns]` (ns), counting the
    /// window's edges: how long writes stalled around a fault.
    pub fn longest_gap_ns(&self, from_ns: u64, to_ns: u64) -> u64 {
        let mut inside: Vec<u64> = self.commits_ns.iter().copied().filter(|&t| t >= from_ns && t <= to_ns).collect();
        inside.sort_unstable();
        let mut last = from_ns;
        let mut gap = 0;
        for t in inside {
            gap = gap.max(t - last);
            last = t;
        }
        gap.max(to_ns.saturating_sub(last))
    }
}

struct Shared {
    truth: Vec<VmTruth>,
    busy: Vec<bool>,
    excluded: HashSet<u32>,
    via: Vec<usize>,
    avoid_until: Vec<Option<Instant>>,
    next_replica: usize,
    log: ChurnLog,
}

/// The running churn.
pub struct Churn {
    shared: Arc<Mutex<Shared>>,
    paused: watch::Sender<bool>,
    /// Held by the driver while it sends one tick's claims.
    ticking: Arc<tokio::sync::Mutex<()>>,
    inflight: Arc<(AtomicUsize, Notify)>,
    task: JoinHandle<()>,
}

impl Churn {
    /// Starts moving VMs whose current FE is `initial[vm]` among `fes` (ids; the first Report of
    /// FE `i` says `fe_id = fes[i]`), through `replicas` (one client each).
    pub fn start(
        replicas: Vec<AgentServiceClient<Channel>>,
        fes: Vec<String>,
        initial: Vec<u32>,
        config: ChurnConfig,
    ) -> Churn {
        let vms = initial.len();
        let shared = Arc::new(Mutex::new(Shared {
            truth: initial.into_iter().map(VmTruth::Known).collect(),
            busy: vec![false; vms],
            excluded: HashSet::new(),
            via: (0..replicas.len()).collect(),
            avoid_until: vec![None; replicas.len()],
            next_replica: 0,
            log: ChurnLog::default(),
        }));
        let (paused, paused_rx) = watch::channel(false);
        let inflight = Arc::new((AtomicUsize::new(0), Notify::new()));
        let ticking = Arc::new(tokio::sync::Mutex::new(()));
        let driver = Driver {
            replicas,
            fes: Arc::new(fes),
            shared: shared.clone(),
            inflight: inflight.clone(),
            ticking: ticking.clone(),
            config,
        };
        let task = tokio::spawn(driver.run(paused_rx));
        Churn { shared, paused, ticking, inflight, task }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().expect("churn lock")
    }

    /// Stops sending new claims and waits until every call in flight has been answered.
    pub async fn pause(&self) {
        self.paused.send_replace(true);
        // A tick that started before the flag flipped finishes sending first.
        drop(self.ticking.lock().await);
        let (count, done) = &*self.inflight;
        loop {
            let notified = done.notified();
            if count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Sends claims again.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Sends claims only through these replicas from now on.
    pub fn set_via(&self, replicas: &[usize]) {
        self.shared().via = replicas.to_vec();
    }

    /// Moves no VM to FE `fe` from now on (its agent is down), or again.
    pub fn exclude_fe(&self, fe: u32, excluded: bool) {
        let mut s = self.shared();
        if excluded {
            s.excluded.insert(fe);
        } else {
            s.excluded.remove(&fe);
        }
    }

    /// Takes an idle VM with a known binding away from the churn for a write of the test's own
    /// (towards another FE chosen by `target(current FE)`): the VM is uncertain from now on, between
    /// its FE and the target. Returns `(vm, current FE, target FE)`.
    pub fn reserve(&self, target: impl Fn(u32) -> u32) -> Option<(usize, u32, u32)> {
        let mut s = self.shared();
        let (vm, from) = s.truth.iter().enumerate().find_map(|(vm, t)| match t {
            VmTruth::Known(fe) if !s.busy[vm] => Some((vm, *fe)),
            _ => None,
        })?;
        let to = target(from);
        s.truth[vm] = VmTruth::Uncertain { from, to, said: "reserved by the test".into() };
        Some((vm, from, to))
    }

    /// Records what the controller answered to the test's own write of a [`Churn::reserve`]d VM.
    pub fn settle_reserved(&self, vm: usize, truth: VmTruth) {
        self.shared().truth[vm] = truth;
    }

    /// The truth so far.
    pub fn truth(&self) -> Vec<VmTruth> {
        self.shared().truth.clone()
    }

    /// The log so far.
    pub fn log(&self) -> ChurnLog {
        self.shared().log.clone()
    }

    /// Claims committed so far.
    pub fn moved(&self) -> u64 {
        self.shared().log.moved
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One tick's claims for one target FE: `(vm, current FE)` pairs, and the replica to send them to.
struct Group {
    replica: usize,
    fe: u32,
    vms: Vec<(usize, u32)>,
}

struct Driver {
    replicas: Vec<AgentServiceClient<Channel>>,
    fes: Arc<Vec<String>>,
    shared: Arc<Mutex<Shared>>,
    inflight: Arc<(AtomicUsize, Notify)>,
    ticking: Arc<tokio::sync::Mutex<()>>,
    config: ChurnConfig,
}

impl Driver {
    async fn run(self, mut paused: watch::Receiver<bool>) {
        let mut rng = StdRng::seed_from_u64(self.config.seed);
        let per_tick = self.config.rate * self.config.tick.as_secs_f64();
        let mut owed = 0.0;
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let guard = self.ticking.lock().await;
            if *paused.borrow() {
                drop(guard);
                owed = 0.0;
                if paused.wait_for(|p| !*p).await.is_err() {
                    return;
                }
                continue;
            }
            owed += per_tick;
            let due = owed.floor() as usize;
            owed -= due as f64;
            for Group { replica, fe, vms } in self.pick(&mut rng, due) {
                if self.inflight.0.load(Ordering::Acquire) >= self.config.inflight {
                    self.release(&vms);
                    self.shared.lock().expect("churn lock").log.skipped += vms.len() as u64;
                    continue;
                }
                self.inflight.0.fetch_add(1, Ordering::AcqRel);
                let call = Call {
                    client: self.replicas[replica].clone(),
                    replica,
                    fe,
                    fe_id: self.fes[fe as usize].clone(),
                    vms,
                    shared: self.shared.clone(),
                    inflight: self.inflight.clone(),
                };
                tokio::spawn(call.run());
            }
        }
    }

    /// Chooses `due` idle, certain VMs and a new FE for each; groups them per target FE and picks
    /// the replica for each group.
    fn pick(&self, rng: &mut StdRng, due: usize) -> Vec<Group> {
        let fes = self.fes.len() as u32;
        let mut s = self.shared.lock().expect("churn lock");
        let targets: Vec<u32> = (0..fes).filter(|f| !s.excluded.contains(f)).collect();
        let mut groups: Vec<(u32, Vec<(usize, u32)>)> = Vec::new();
        for _ in 0..due {
            let vms = s.truth.len();
            let found = (0..8).map(|_| rng.random_range(0..vms)).find(|&vm| !s.busy[vm]);
            let Some((vm, from)) = found.and_then(|vm| match s.truth[vm] {
                VmTruth::Known(fe) => Some((vm, fe)),
                VmTruth::Uncertain { .. } => None,
            }) else {
                s.log.skipped += 1;
                continue;
            };
            let choices: Vec<u32> = targets.iter().copied().filter(|&t| t != from).collect();
            if choices.is_empty() {
                s.log.skipped += 1;
                continue;
            }
            let to = choices[rng.random_range(0..choices.len())];
            s.busy[vm] = true;
            match groups.iter_mut().find(|(fe, _)| *fe == to) {
                Some((_, group)) => group.push((vm, from)),
                None => groups.push((to, vec![(vm, from)])),
            }
        }
        let now = Instant::now();
        groups
            .into_iter()
            .map(|(fe, vms)| {
                let usable: Vec<usize> =
                    s.via.iter().copied().filter(|&r| s.avoid_until[r].is_none_or(|t| t <= now)).collect();
                let pool = if usable.is_empty() { s.via.clone() } else { usable };
                s.next_replica += 1;
                let replica = pool[s.next_replica % pool.len()];
                Group { replica, fe, vms }
            })
            .collect()
    }

    fn release(&self, vms: &[(usize, u32)]) {
        let mut s = self.shared.lock().expect("churn lock");
        for &(vm, _) in vms {
            s.busy[vm] = false;
        }
    }
}

struct Call {
    client: AgentServiceClient<Channel>,
    replica: usize,
    fe: u32,
    fe_id: String,
    vms: Vec<(usize, u32)>,
    shared: Arc<Mutex<Shared>>,
    inflight: Arc<(AtomicUsize, Notify)>,
}

impl Call {
    async fn run(mut self) {
        let observations = self
            .vms
            .iter()
            .map(|&(vm, _)| VmObservation {
                vm_ip: vm_ip(vm).octets().to_vec(),
                mac: vm_mac(vm).to_vec(),
                kind: ObservationKind::Learned as i32,
                observed_at_unix_nanos: unix_nanos(),
                port: "faults".into(),
                known_revision: None,
            })
            .collect();
        let mut request = tonic::Request::new(ReportRequest { fe_id: self.fe_id.clone(), observations });
        request.set_timeout(REPORT_TIMEOUT);
        let result = self.client.report(request).await;
        let done = monotonic_ns();
        {
            let mut s = self.shared.lock().expect("churn lock");
            s.log.reports += 1;
            match result {
                Err(status) => {
                    s.log.failed_calls += 1;
                    s.avoid_until[self.replica] = Some(Instant::now() + AVOID);
                    let said = format!("Report failed: {} {}", status.code(), status.message());
                    s.log.first_error.get_or_insert_with(|| said.clone());
                    for &(vm, from) in &self.vms {
                        s.truth[vm] = VmTruth::Uncertain { from, to: self.fe, said: said.clone() };
                    }
                }
                Ok(response) => {
                    let results = response.into_inner().results;
                    for (&(vm, from), r) in self.vms.iter().zip(&results) {
                        match ClaimOutcome::try_from(r.outcome) {
                            Ok(ClaimOutcome::Moved | ClaimOutcome::Bound | ClaimOutcome::Unchanged) => {
                                s.truth[vm] = VmTruth::Known(self.fe);
                                s.log.moved += 1;
                                s.log.commits_ns.push(done);
                            }
                            _ if r.code == tonic::Code::Unavailable as i32 => {
                                s.log.unavailable += 1;
                                s.avoid_until[self.replica] = Some(Instant::now() + AVOID);
                                s.truth[vm] = VmTruth::Uncertain { from, to: self.fe, said: r.message.clone() };
                            }
                            _ => {
                                s.log.refused += 1;
                                s.log.first_error.get_or_insert_with(|| format!("code {}: {}", r.code, r.message));
                            }
                        }
                    }
                    if results.len() != self.vms.len() {
                        s.log.first_error.get_or_insert_with(|| "Report answered the wrong number of results".into());
                        for &(vm, from) in &self.vms[results.len().min(self.vms.len())..] {
                            s.truth[vm] = VmTruth::Uncertain { from, to: self.fe, said: "no result".into() };
                        }
                    }
                }
            }
            for &(vm, _) in &self.vms {
                s.busy[vm] = false;
            }
        }
        let (count, done_notify) = &*self.inflight;
        count.fetch_sub(1, Ordering::AcqRel);
        done_notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_counts_the_window_edges() {
        let log = ChurnLog { commits_ns: vec![100, 400, 150, 420], ..ChurnLog::default() };
        assert_eq!(log.longest_gap_ns(100, 500), 250);
        assert_eq!(log.longest_gap_ns(0, 1000), 580, "nothing after 420 up to the end");
        assert_eq!(log.longest_gap_ns(500, 600), 100, "no commit at all: the whole window");
    }
}
