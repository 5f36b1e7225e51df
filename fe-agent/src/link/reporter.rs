//! Reporting observed VMs: a queue keyed by VM IP, or by MAC for a MAC claim (the newest
//! observation of an IP or MAC replaces an unsent older one, a VM's report is never dropped), drained in batches of at most 1024 into
//! `AgentService.Report` on whichever controller session is current. A failed call puts its batch
//! back (unless newer observations of the same IPs arrived meanwhile) and is retried with
//! exponential backoff; nothing is lost while no controller answers (headless). So does a claim
//! the controller answered UNAVAILABLE on its own (its store was down, or did not confirm the
//! write): it is no verdict, the agent keeps what it learned and sends the claim again.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
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
    /// What was observed: a VM IP seen or gone, or a MAC seen without an IP (a MAC claim).
    pub subject: Subject,
    /// VM MAC.
    pub mac: [u8; 6],
    /// Observation time (wall ns, this FE's clock) — kept across retries and reconnections.
    pub observed_at: i64,
    /// The stream revision known when the observation was made — kept with it.
    pub known_revision: u64,
    /// Port name (informational).
    pub port: String,
}

/// What an observation is about (its kind on the wire follows from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// The VM with this IP (and [`Observation::mac`]) was heard on a port: LEARNED.
    Learned(IpAddr),
    /// The VM with this IP is no longer behind this FE: GONE.
    Gone(IpAddr),
    /// A frame named only [`Observation::mac`] (RARP): a MAC claim, MAC_LEARNED, which the
    /// controller expands to every IP bound or declared with the MAC.
    Mac,
}

/// What the queue keeps one observation of: a VM IP, or a MAC for MAC claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum QueueKey {
    Ip(IpAddr),
    Mac([u8; 6]),
}

impl Observation {
    /// A MAC claim: the VM with `mac` was seen (RARP) at `observed_at`, knowing `known_revision`.
    pub fn mac_claim(mac: [u8; 6], observed_at: i64, known_revision: u64, port: String) -> Observation {
        Observation { subject: Subject::Mac, mac, observed_at, known_revision, port }
    }

    /// The VM IP observed (None for a MAC claim).
    pub fn ip(&self) -> Option<IpAddr> {
        match self.subject {
            Subject::Learned(ip) | Subject::Gone(ip) => Some(ip),
            Subject::Mac => None,
        }
    }

    /// The kind sent to the controller.
    pub fn kind(&self) -> ObservationKind {
        match self.subject {
            Subject::Learned(_) => ObservationKind::Learned,
            Subject::Gone(_) => ObservationKind::Gone,
            Subject::Mac => ObservationKind::MacLearned,
        }
    }

    fn key(&self) -> QueueKey {
        self.ip().map_or(QueueKey::Mac(self.mac), QueueKey::Ip)
    }

    fn to_wire(&self) -> VmObservation {
        VmObservation {
            // A MAC claim names no IP (victor.proto, OBSERVATION_KIND_MAC_LEARNED).
            vm_ip: self.ip().map(victor_proto::types::ip_to_bytes).unwrap_or_default(),
            mac: self.mac.to_vec(),
            kind: self.kind() as i32,
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
    order: VecDeque<QueueKey>,
    pending: HashMap<QueueKey, Observation>,
}

impl ReportQueue {
    /// Queues `obs`, replacing an unsent observation of the same IP (of the same MAC for a MAC
    /// claim).
    pub fn push(&mut self, obs: Observation) {
        let key = obs.key();
        if self.pending.insert(key, obs).is_none() {
            self.order.push_back(key);
        }
    }

    /// Takes up to `max` observations, oldest first.
    pub fn take(&mut self, max: usize) -> Vec<Observation> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(key) = self.order.pop_front() else { break };
            if let Some(obs) = self.pending.remove(&key) {
                out.push(obs);
            }
        }
        out
    }

    /// Puts a failed batch back at the front, except observations superseded meanwhile.
    pub fn put_back(&mut self, batch: Vec<Observation>) {
        for obs in batch.into_iter().rev() {
            let key = obs.key();
            if !self.pending.contains_key(&key) {
                self.order.push_front(key);
                self.pending.insert(key, obs);
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
        let ip = std::net::Ipv4Addr::new(10, 10, 0, last).into();
        Observation {
            subject: if kind == ObservationKind::Gone { Subject::Gone(ip) } else { Subject::Learned(ip) },
            mac: [2, 0, 0, 0, 0, last],
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
                    subject: Subject::Learned(std::net::Ipv4Addr::new(10, 10, j as u8, i).into()),
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
        assert_eq!(again[0].ip(), Some(batch_second_ip()), "the superseded one stays where the new one was queued");
        let all: Vec<_> = again.into_iter().chain(q.take(usize::MAX)).collect();
        let newest = all.iter().find(|o| o.ip() == first.ip()).unwrap();
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

    #[test]
    fn the_subject_decides_the_wire_kind_and_ip() {
        let v6: IpAddr = "fd00:10::1".parse().unwrap();
        let learned = Observation { subject: Subject::Learned(v6), ..obs(1, 1, ObservationKind::Learned) };
        let gone = Observation { subject: Subject::Gone(v6), ..learned.clone() };
        let claim = Observation::mac_claim([2, 0, 0, 0, 0, 1], 1, 0, "vm0".into());
        let wire: Vec<(Vec<u8>, i32)> =
            [&learned, &gone, &claim].iter().map(|o| (o.to_wire().vm_ip, o.to_wire().kind)).collect();
        assert_eq!(
            wire,
            vec![
                (victor_proto::types::ip_to_bytes(v6), ObservationKind::Learned as i32),
                (victor_proto::types::ip_to_bytes(v6), ObservationKind::Gone as i32),
                (Vec::new(), ObservationKind::MacLearned as i32),
            ]
        );
        assert_eq!((learned.ip(), claim.ip()), (Some(v6), None));
        // A GONE replaces an unsent LEARNED of the same IP; the MAC claim of the same MAC is apart.
        let mut q = ReportQueue::default();
        for o in [learned, gone.clone(), claim.clone()] {
            q.push(o);
        }
        assert_eq!(q.take(10), vec![gone, claim]);
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
