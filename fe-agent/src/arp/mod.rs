//! ARP on the VM ports: one capture task per port on the data-plane crate's
//! [`victor_dataplane::arp_io::ArpCapture`] (AF_PACKET + BPF, kernel receive timestamps,
//! malformed frames counted by the capture), storm protection ([`crate::ratelimit`]) and what a
//! frame means ([`classify`]). A capture task drops sources over their rate budget and hands the
//! rest to the engine, which learns and answers through [`ArpPorts`]. The kernel's receive time
//! is put on the agent's clock ([`WallClock`]: the test-only `--clock-offset` shifts it too).

pub mod classify;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use tokio::sync::mpsc;
use victor_dataplane::arp_io::{ArpCapture, CaptureStats};
use victor_dataplane::packet::arp::ArpMessage;

use crate::clock::WallClock;
use crate::metrics::{CaptureCounts, KindLabel, Metrics};
use crate::ports::Port;
use crate::ratelimit::RateLimiter;

/// An ARP frame from a VM port, parsed and within its source's rate budget.
#[derive(Debug, Clone)]
pub struct ArpFrame {
    /// The port.
    pub port: Port,
    /// The message.
    pub msg: ArpMessage,
    /// Capture time (the kernel's), wall ns on the agent's clock.
    pub wall: i64,
    /// Capture time, monotonic ns.
    pub mono: u64,
}

/// Reads `port`'s ARP frames until `out` closes (aborted when the port leaves).
async fn capture_task(
    capture: Arc<ArpCapture>,
    port: Port,
    mut limiter: RateLimiter,
    out: mpsc::Sender<ArpFrame>,
    metrics: Arc<Metrics>,
    clock: WallClock,
) {
    let mut last_gc = 0u64;
    loop {
        let rx = match capture.recv().await {
            Ok(rx) => rx,
            // The port went down (reported once; frames flow again when it is back up). A port
            // that leaves the namespace is reported by the link watcher, which ends this task.
            Err(err) if err.raw_os_error() == Some(libc::ENETDOWN) => continue,
            Err(err) => {
                tracing::warn!(port = %port.name, %err, "ARP capture read failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let msg = rx.message;
        if msg.sender_mac.0 == port.mac {
            continue; // our own frame
        }
        if !limiter.allow((msg.sender_mac.0, msg.sender_ip), rx.mono_ns) {
            metrics.arp_rate_limited.inc();
            continue;
        }
        if rx.mono_ns.saturating_sub(last_gc) > 10_000_000_000 {
            limiter.gc(rx.mono_ns);
            last_gc = rx.mono_ns;
        }
        let wall = clock.shift(rx.wall.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0));
        let frame = ArpFrame { port: port.clone(), msg, wall, mono: rx.mono_ns };
        match out.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics.arp_rate_limited.inc();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Stops a capture task and closes its socket off the caller's task: closing a packet socket
/// waits for an RCU grace period (~10–15 ms), which must not stall the engine.
fn retire(task: Option<tokio::task::JoinHandle<()>>, capture: Option<Arc<ArpCapture>>) {
    tokio::spawn(async move {
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        if let Some(capture) = capture {
            let _ = tokio::task::spawn_blocking(move || drop(capture)).await;
        }
    });
}

/// The ARP side of the VM ports, as the engine drives it: a capture (socket and task) per port,
/// and sending on a port's socket.
#[derive(Debug)]
pub struct ArpPorts {
    captures: Arc<Captures>,
    tasks: HashMap<u32, tokio::task::JoinHandle<()>>,
    frames: mpsc::Sender<ArpFrame>,
    budget: (u32, u32),
    metrics: Arc<Metrics>,
    clock: WallClock,
}

impl ArpPorts {
    /// Captures register in `captures`, send what they read to `frames`, each source within
    /// `budget` (frames/s, burst), capture times on `clock`.
    pub fn new(
        captures: Arc<Captures>,
        frames: mpsc::Sender<ArpFrame>,
        budget: (u32, u32),
        metrics: Arc<Metrics>,
        clock: WallClock,
    ) -> Self {
        ArpPorts { captures, tasks: HashMap::new(), frames, budget, metrics, clock }
    }

    /// Starts capturing ARP on `port` (replacing a capture of the same index).
    pub fn open(&mut self, port: &Port) {
        let capture = match ArpCapture::open(&port.name) {
            Ok(c) => Arc::new(c),
            Err(err) => {
                tracing::warn!(port = %port.name, %err, "cannot capture ARP on the VM port");
                return;
            }
        };
        let replaced = self.captures.insert(port.ifindex, capture.clone());
        retire(self.tasks.remove(&port.ifindex), replaced);
        let limiter = RateLimiter::new(self.budget.0, self.budget.1);
        let task = capture_task(capture, port.clone(), limiter, self.frames.clone(), self.metrics.clone(), self.clock);
        self.tasks.insert(port.ifindex, tokio::spawn(task));
    }

    /// Stops capturing on port `ifindex` (it left).
    pub fn close(&mut self, ifindex: u32) {
        retire(self.tasks.remove(&ifindex), self.captures.remove(ifindex));
    }

    /// Sends `msg` on port `ifindex` (counted by `kind`); nothing happens without a capture there.
    pub fn send(&self, ifindex: u32, msg: &ArpMessage, kind: &'static str) {
        let Some(capture) = self.captures.get(ifindex) else { return };
        match capture.send(msg) {
            Ok(()) => {
                self.metrics.arp_sent.get_or_create(&KindLabel { kind }).inc();
            }
            Err(err) => tracing::debug!(ifindex, %err, kind, "could not send an ARP frame"),
        }
    }
}

/// The capture sockets of the VM ports (for sending, and for their malformed-frame counts).
#[derive(Debug, Default)]
pub struct Captures {
    live: Mutex<HashMap<u32, Arc<ArpCapture>>>,
    retired: Mutex<Retired>,
}

/// What captures that are gone counted.
#[derive(Debug, Default)]
struct Retired {
    malformed: HashMap<&'static str, u64>,
    kernel_dropped: u64,
}

impl Captures {
    /// Registers the capture of port `ifindex`; returns the one it replaces (retired).
    pub fn insert(&self, ifindex: u32, capture: Arc<ArpCapture>) -> Option<Arc<ArpCapture>> {
        let old = self.live.lock().expect("captures").insert(ifindex, capture);
        if let Some(old) = &old {
            self.retire(&old.stats());
        }
        old
    }

    /// Forgets the capture of port `ifindex` (the port left); returns it (retired).
    pub fn remove(&self, ifindex: u32) -> Option<Arc<ArpCapture>> {
        let old = self.live.lock().expect("captures").remove(&ifindex);
        if let Some(old) = &old {
            self.retire(&old.stats());
        }
        old
    }

    /// The capture of port `ifindex`.
    pub fn get(&self, ifindex: u32) -> Option<Arc<ArpCapture>> {
        self.live.lock().expect("captures").get(&ifindex).cloned()
    }

    fn retire(&self, stats: &CaptureStats) {
        let mut retired = self.retired.lock().expect("captures");
        for (reason, n) in &stats.malformed {
            *retired.malformed.entry(reason).or_default() += n;
        }
        retired.kernel_dropped += stats.kernel_dropped;
    }
}

/// Malformed frames by reason and frames the kernel dropped (socket buffer full), over every
/// capture this agent has run.
impl CaptureCounts for Captures {
    fn totals(&self) -> (Vec<(&'static str, u64)>, u64) {
        let (mut malformed, mut kernel_dropped) = {
            let retired = self.retired.lock().expect("captures");
            (retired.malformed.clone(), retired.kernel_dropped)
        };
        for capture in self.live.lock().expect("captures").values() {
            let stats = capture.stats();
            for (reason, n) in stats.malformed {
                *malformed.entry(reason).or_default() += n;
            }
            kernel_dropped += stats.kernel_dropped;
        }
        let mut malformed: Vec<_> = malformed.into_iter().collect();
        malformed.sort();
        (malformed, kernel_dropped)
    }
}
