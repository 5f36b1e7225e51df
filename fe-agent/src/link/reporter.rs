//! Reporting observed VMs: a queue keyed by VM IP, or by MAC for a MAC claim (the newest
//! observation of an IP or MAC replaces an unsent older one, a VM's report is never dropped), drained in batches of at most 1024 into
//! `AgentService.Report` on whichever controller session is current. A failed call puts its batch
//! back (unless newer observations of the same IPs arrived meanwhile) and is retried with
//! exponential backoff; nothing is lost while no controller answers (headless). So does a claim
//! the controller answered UNAVAILABLE on its own (its store was down, or did not confirm the
//! write): it is no verdict, the agent keeps what it learned and sends the claim again.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use victor_daemon::Backoff;
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::{ClaimResult, ObservationKind, ReportRequest, VmObservation};

use super::Session;
use crate::metrics::Metrics;

/// Most observations per Report call (the controller's limit).
pub const MAX_BATCH: usize = 1024;
/// Deadline of one Report call.
const REPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// One observation to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// VM IP (unused for a MAC claim: see [`Observation::mac_claim`]).
    pub ip: IpAddr,
    /// VM MAC.
    pub mac: [u8; 6],
    /// LEARNED, GONE or MAC_LEARNED (a MAC claim: a RARP frame named the MAC and no IP).
    pub kind: ObservationKind,
    /// Observation time (wall ns, this FE's clock) — kept across retries and reconnections.
    pub observed_at: i64,
    /// The stream revision known when the observation was made — kept with it.
    pub known_revision: u64,
    /// Port name (informational).
    pub port: String,
}

/// What the queue keeps one observation of: a VM IP, or a MAC for MAC claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Subject {
    Ip(IpAddr),
    Mac([u8; 6]),
}

impl Observation {
    /// A MAC claim: the VM with `mac` was seen (RARP) at `observed_at`, knowing `known_revision`.
    pub fn mac_claim(mac: [u8; 6], observed_at: i64, known_revision: u64, port: String) -> Observation {
        Observation {
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            mac,
            kind: ObservationKind::MacLearned,
            observed_at,
            known_revision,
            port,
        }
    }

    fn subject(&self) -> Subject {
        if self.kind == ObservationKind::MacLearned { Subject::Mac(self.mac) } else { Subject::Ip(self.ip) }
    }

    fn to_wire(&self) -> VmObservation {
        VmObservation {
            vm_ip: match self.subject() {
                Subject::Ip(ip) => victor_proto::types::ip_to_bytes(ip),
                Subject::Mac(_) => Vec::new(),
            },
            mac: self.mac.to_vec(),
            kind: self.kind as i32,
            observed_at_unix_nanos: self.observed_at,
            port: self.port.clone(),
            known_revision: Some(self.known_revision),
        }
    }
}

/// The answer to one batch.
#[derive(Debug, Clone)]
pub struct Answered {
    /// The observations sent, in order.
    pub observations: Vec<Observation>,
    /// One result per observation, in the same order.
    pub results: Vec<ClaimResult>,
    /// When the call was sent (monotonic ns).
    pub sent_mono: u64,
    /// When its answer arrived.
    pub answered_mono: u64,
}

/// The queue (pure).
#[derive(Debug, Default)]
pub struct ReportQueue {
    order: VecDeque<Subject>,
    pending: HashMap<Subject, Observation>,
}

impl ReportQueue {
    /// Queues `obs`, replacing an unsent observation of the same IP (of the same MAC for a MAC
    /// claim).
    pub fn push(&mut self, obs: Observation) {
        let subject = obs.subject();
        if self.pending.insert(subject, obs).is_none() {
            self.order.push_back(subject);
        }
    }

    /// Takes up to `max` observations, oldest first.
    pub fn take(&mut self, max: usize) -> Vec<Observation> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(subject) = self.order.pop_front() else { break };
            if let Some(obs) = self.pending.remove(&subject) {
                out.push(obs);
            }
        }
        out
    }

    /// Puts a failed batch back at the front, except observations superseded meanwhile.
    pub fn put_back(&mut self, batch: Vec<Observation>) {
        for obs in batch.into_iter().rev() {
            let subject = obs.subject();
            if !self.pending.contains_key(&subject) {
                self.order.push_front(subject);
                self.pending.insert(subject, obs);
            }
        }
    }

    /// Observations waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Splits a batch's answers: results with a verdict (for the engine), and the observations the
/// controller answered UNAVAILABLE — no verdict, to send again.
pub fn split_transient(
    observations: Vec<Observation>,
    results: Vec<ClaimResult>,
) -> (Vec<Observation>, Vec<ClaimResult>, Vec<Observation>) {
    let mut answered = (Vec::with_capacity(observations.len()), Vec::with_capacity(results.len()));
    let mut retry = Vec::new();
    for (obs, result) in observations.into_iter().zip(results) {
        if result.code == tonic::Code::Unavailable as i32 {
            retry.push(obs);
        } else {
            answered.0.push(obs);
            answered.1.push(result);
        }
    }
    (answered.0, answered.1, retry)
}

/// The handle the engine submits observations through.
#[derive(Debug, Clone)]
pub struct Reporter {
    queue: Arc<Mutex<ReportQueue>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    wake: Arc<Notify>,
}

impl Reporter {
    fn empty() -> Reporter {
        Reporter { queue: Arc::default(), in_flight: Arc::default(), wake: Arc::new(Notify::new()) }
    }

    /// Queues an observation for reporting.
    pub fn submit(&self, obs: Observation) {
        self.queue.lock().expect("report queue").push(obs);
        self.wake.notify_one();
    }

    /// Observations not yet answered (waiting or in flight).
    pub fn queued(&self) -> usize {
        self.queue.lock().expect("report queue").len() + self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
impl Reporter {
    /// A reporter without its task: what is submitted stays queued for [`Reporter::take_queued`].
    pub(crate) fn detached() -> Reporter {
        Reporter::empty()
    }

    /// Takes every queued observation, oldest first.
    pub(crate) fn take_queued(&self) -> Vec<Observation> {
        self.queue.lock().expect("report queue").take(usize::MAX)
    }
}

/// Starts the reporter task: drains the queue into Report calls on the current session and sends
/// each answer to `answers`.
pub fn spawn(
    fe_id: String,
    sessions: watch::Receiver<Option<Session>>,
    reregister: Arc<Notify>,
    answers: mpsc::Sender<Answered>,
    metrics: Arc<Metrics>,
) -> Reporter {
    let reporter = Reporter::empty();
    let task = reporter.clone();
    tokio::spawn(async move { task.run(fe_id, sessions, reregister, answers, metrics).await });
    reporter
}

impl Reporter {
    async fn run(
        self,
        fe_id: String,
        mut sessions: watch::Receiver<Option<Session>>,
        reregister: Arc<Notify>,
        answers: mpsc::Sender<Answered>,
        metrics: Arc<Metrics>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            if self.queue.lock().expect("report queue").is_empty() {
                self.wake.notified().await;
                continue;
            }
            let Some(session) = sessions.borrow_and_update().clone() else {
                if sessions.changed().await.is_err() {
                    return;
                }
                continue;
            };
            let batch = self.queue.lock().expect("report queue").take(MAX_BATCH);
            self.in_flight.store(batch.len(), std::sync::atomic::Ordering::Relaxed);
            metrics.reports_queued.set(self.queued() as i64);
            let mut request = tonic::Request::new(ReportRequest {
                fe_id: fe_id.clone(),
                observations: batch.iter().map(Observation::to_wire).collect(),
            });
            request.set_timeout(REPORT_TIMEOUT);
            let sent_mono = monotonic_ns();
            let result = AgentServiceClient::new(session.channel).report(request).await;
            let answered_mono = monotonic_ns();
            self.in_flight.store(0, std::sync::atomic::Ordering::Relaxed);
            match result {
                Ok(response) => {
                    metrics.claims_sent.inc_by(batch.len() as u64);
                    let results = response.into_inner().results;
                    if results.len() != batch.len() {
                        tracing::warn!(
                            sent = batch.len(),
                            got = results.len(),
                            "Report answered with a wrong number of results; retrying"
                        );
                        self.queue.lock().expect("report queue").put_back(batch);
                        continue;
                    }
                    let (observations, results, retry) = split_transient(batch, results);
                    if !observations.is_empty() {
                        let answered = Answered { observations, results, sent_mono, answered_mono };
                        if answers.send(answered).await.is_err() {
                            return;
                        }
                    }
                    if retry.is_empty() {
                        backoff.reset();
                    } else {
                        metrics.report_retries.inc();
                        tracing::info!(n = retry.len(), "claims answered UNAVAILABLE (no verdict); will retry");
                        self.queue.lock().expect("report queue").put_back(retry);
                        metrics.reports_queued.set(self.queued() as i64);
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
                Err(status) => {
                    metrics.report_retries.inc();
                    if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) {
                        // Not registered (e.g. the controller lost our session): register again.
                        reregister.notify_one();
                    }
                    tracing::info!(code = ?status.code(), message = status.message(), n = batch.len(), "Report failed; will retry");
                    self.queue.lock().expect("report queue").put_back(batch);
                    metrics.reports_queued.set(self.queued() as i64);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
            metrics.reports_queued.set(self.queued() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(last: u8, at: i64, kind: ObservationKind) -> Observation {
        Observation {
            ip: std::net::Ipv4Addr::new(10, 10, 0, last).into(),
            mac: [2, 0, 0, 0, 0, last],
            kind,
            observed_at: at,
            known_revision: 0,
            port: "vm0".into(),
        }
    }

    #[test]
    fn newest_observation_per_ip_in_fifo_order() {
        let mut q = ReportQueue::default();
        q.push(obs(1, 10, ObservationKind::Learned));
        q.push(obs(2, 11, ObservationKind::Learned));
        q.push(obs(1, 12, ObservationKind::Gone));
        assert_eq!(q.len(), 2);
        let batch = q.take(10);
        assert_eq!(batch, vec![obs(1, 12, ObservationKind::Gone), obs(2, 11, ObservationKind::Learned)]);
        assert!(q.is_empty());
    }

    #[test]
    fn failed_batches_go_back_unless_superseded_and_batches_are_bounded() {
        let mut q = ReportQueue::default();
        for i in 0..=255u8 {
            for j in 0..5i64 {
                q.push(Observation {
                    ip: std::net::Ipv4Addr::new(10, 10, j as u8, i).into(),
                    ..obs(i, j, ObservationKind::Learned)
                });
            }
        }
        let batch = q.take(MAX_BATCH);
        assert_eq!(batch.len(), MAX_BATCH);
        assert_eq!(q.len(), 256 * 5 - MAX_BATCH);
        let first = batch[0].clone();
        q.push(Observation { observed_at: 99, ..first.clone() });
        q.put_back(batch);
        assert_eq!(q.len(), 256 * 5, "nothing lost");
        let again = q.take(MAX_BATCH);
        assert_eq!(again[0].ip, batch_second_ip(), "the superseded one stays where the new one was queued");
        let all: Vec<_> = again.into_iter().chain(q.take(usize::MAX)).collect();
        let newest = all.iter().find(|o| o.ip == first.ip).unwrap();
        assert_eq!(newest.observed_at, 99);
    }

    #[test]
    fn mac_claims_queue_by_mac_beside_the_ips() {
        let mut q = ReportQueue::default();
        q.push(obs(1, 10, ObservationKind::Learned));
        q.push(Observation::mac_claim([2, 0, 0, 0, 0, 1], 11, 5, "vm0".into()));
        q.push(Observation::mac_claim([2, 0, 0, 0, 0, 2], 12, 5, "vm0".into()));
        q.push(Observation::mac_claim([2, 0, 0, 0, 0, 1], 13, 6, "vm0".into()));
        let batch = q.take(10);
        let at: Vec<i64> = batch.iter().map(|o| o.observed_at).collect();
        assert_eq!(at, vec![10, 13, 12], "one per MAC, the newest, in queue order; the IP's stays");
        let wire = batch[1].to_wire();
        assert_eq!(
            (wire.vm_ip.len(), wire.mac, wire.kind, wire.known_revision),
            (0, vec![2, 0, 0, 0, 0, 1], ObservationKind::MacLearned as i32, Some(6))
        );
        assert_eq!(batch[0].to_wire().vm_ip, vec![10, 10, 0, 1]);
    }

    fn batch_second_ip() -> IpAddr {
        std::net::Ipv4Addr::new(10, 10, 1, 0).into()
    }

    #[test]
    fn claims_answered_unavailable_are_retried_not_answered() {
        let batch = vec![obs(1, 1, ObservationKind::Learned), obs(2, 2, ObservationKind::Learned)];
        let verdict = ClaimResult { outcome: 2, ..Default::default() };
        let transient = ClaimResult { outcome: 4, code: tonic::Code::Unavailable as i32, ..Default::default() };
        let (answered, results, retry) = split_transient(batch.clone(), vec![verdict.clone(), transient]);
        assert_eq!((answered, results), (vec![batch[0].clone()], vec![verdict]));
        assert_eq!(retry, vec![batch[1].clone()]);
        let mut q = ReportQueue::default();
        q.put_back(retry);
        assert_eq!(q.take(10), vec![batch[1].clone()], "queued again with its original observation time");
        let wire = batch[1].to_wire();
        assert_eq!((wire.observed_at_unix_nanos, wire.known_revision), (2, Some(0)), "what it knew goes with it");
    }
}
