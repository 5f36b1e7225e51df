//! ARP on the VM ports: one capture task per port on the data-plane crate's
//! [`victor_dataplane::arp_io::ArpCapture`] (AF_PACKET + BPF, kernel receive timestamps,
//! malformed frames counted by the capture), storm protection ([`ratelimit`]) and what a frame
//! means ([`classify`]). A capture task drops sources over their rate budget and hands the rest
//! to the agent core, which learns and answers.

pub mod classify;
pub mod ratelimit;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use tokio::sync::mpsc;
use victor_dataplane::arp_io::{ArpCapture, CaptureStats};

use crate::core::ArpFrame;
use crate::metrics::Metrics;
use crate::ports::Port;
use ratelimit::RateLimiter;

/// Reads `port`'s ARP frames until `out` closes (the core aborts the task when the port leaves).
pub async fn capture(
    capture: Arc<ArpCapture>,
    port: Port,
    mut limiter: RateLimiter,
    out: mpsc::Sender<ArpFrame>,
    metrics: Arc<Metrics>,
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
        let wall = rx.wall.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
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
/// waits for an RCU grace period (~10–15 ms), which must not stall the agent core.
pub fn retire(task: Option<tokio::task::JoinHandle<()>>, capture: Option<Arc<ArpCapture>>) {
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

    /// Malformed frames by reason and frames the kernel dropped (socket buffer full), over every
    /// capture this agent has run.
    pub fn totals(&self) -> (Vec<(&'static str, u64)>, u64) {
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
