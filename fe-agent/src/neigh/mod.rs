//! Neighbour discovery on the VM ports: one capture task per port on the data-plane crate's
//! [`victor_dataplane::neigh_io::NeighCapture`] (ARP, RARP and IPv6 NDP; AF_PACKET + BPF, kernel
//! receive timestamps, malformed frames counted by the capture per protocol), storm protection
//! ([`crate::ratelimit`], per source) and what a frame means ([`arp`] for IPv4, [`ndp`] for IPv6,
//! [`rarp`] for a hypervisor's announcement of a MAC). A capture task drops
//! sources over their rate budget and hands the rest to the engine, which learns and answers
//! through [`NeighPorts`]. The kernel's receive time is put on the agent's clock ([`WallClock`]:
//! the test-only `--clock-offset` shifts it too).

pub mod arp;
pub mod ndp;
pub mod rarp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use tokio::sync::mpsc;
use victor_dataplane::neigh_io::{Frame, NeighCapture, NeighStats, Protocols};
use victor_dataplane::packet::arp::ArpMessage;
use victor_dataplane::packet::ndp::NdpMessage;

use crate::clock::WallClock;
use crate::metrics::{CaptureCounts, CaptureTotals, KindLabel, Metrics, ProtocolLabel};
use crate::ports::Port;
use crate::ratelimit::RateLimiter;

/// A frame from a VM port (ARP, RARP or NDP), parsed and within its source's rate budget.
#[derive(Debug, Clone)]
pub struct NeighFrame {
    /// The port.
    pub port: Port,
    /// The frame.
    pub frame: Frame,
    /// Capture time (the kernel's), wall ns on the agent's clock.
    pub wall: i64,
    /// Capture time, monotonic ns.
    pub mono: u64,
}

/// Reads `port`'s frames until `out` closes (aborted when the port leaves).
async fn capture_task(
    capture: Arc<NeighCapture>,
    port: Port,
    mut limiter: RateLimiter,
    out: mpsc::Sender<NeighFrame>,
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
                tracing::warn!(port = %port.name, %err, "capture read failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let frame = rx.frame;
        let (sender_mac, sender_ip) = frame.source();
        if sender_mac.0 == port.mac || frame.eth_src().0 == port.mac {
            continue; // our own frame
        }
        let protocol = frame.protocol().as_str();
        if !limiter.allow((sender_mac.0, sender_ip), rx.mono_ns) {
            metrics.neigh_rate_limited.get_or_create(&ProtocolLabel { protocol }).inc();
            continue;
        }
        if rx.mono_ns.saturating_sub(last_gc) > 10_000_000_000 {
            limiter.gc(rx.mono_ns);
            last_gc = rx.mono_ns;
        }
        let wall = clock.shift(rx.wall.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0));
        let frame = NeighFrame { port: port.clone(), frame, wall, mono: rx.mono_ns };
        match out.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics.neigh_rate_limited.get_or_create(&ProtocolLabel { protocol }).inc();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Stops a capture task and closes its socket off the caller's task: closing a packet socket
/// waits for an RCU grace period (~10–15 ms), which must not stall the engine.
fn retire(task: Option<tokio::task::JoinHandle<()>>, capture: Option<Arc<NeighCapture>>) {
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

/// Neighbour discovery on the VM ports, as the engine drives it: a capture (socket and task) per
/// port, and sending on a port's socket.
#[derive(Debug)]
pub struct NeighPorts {
    captures: Arc<Captures>,
    tasks: HashMap<u32, tokio::task::JoinHandle<()>>,
    frames: mpsc::Sender<NeighFrame>,
    budget: (u32, u32),
    metrics: Arc<Metrics>,
    clock: WallClock,
}

impl NeighPorts {
    /// Captures register in `captures`, send what they read to `frames`, each source within
    /// `budget` (frames/s, burst), capture times on `clock`.
    pub fn new(
        captures: Arc<Captures>,
        frames: mpsc::Sender<NeighFrame>,
        budget: (u32, u32),
        metrics: Arc<Metrics>,
        clock: WallClock,
    ) -> Self {
        NeighPorts { captures, tasks: HashMap::new(), frames, budget, metrics, clock }
    }

    /// Starts capturing ARP, RARP and NDP on `port` (replacing a capture of the same index).
    pub fn open(&mut self, port: &Port) {
        let capture = match NeighCapture::open(&port.name, Protocols::ALL) {
            Ok(c) => Arc::new(c),
            Err(err) => {
                tracing::warn!(port = %port.name, %err, "cannot capture ARP/RARP/NDP on the VM port");
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
        match capture.send_arp(msg) {
            Ok(()) => {
                self.metrics.arp_sent.get_or_create(&KindLabel { kind }).inc();
            }
            Err(err) => tracing::debug!(ifindex, %err, kind, "could not send an ARP frame"),
        }
    }

    /// Sends the NDP message `msg` on port `ifindex` (counted by `kind`); nothing happens without
    /// a capture there.
    pub fn send_ndp(&self, ifindex: u32, msg: &NdpMessage, kind: &'static str) {
        let Some(capture) = self.captures.get(ifindex) else { return };
        match capture.send_ndp(msg) {
            Ok(()) => {
                self.metrics.ndp_sent.get_or_create(&KindLabel { kind }).inc();
            }
            Err(err) => tracing::debug!(ifindex, %err, kind, "could not send an NDP frame"),
        }
    }
}

/// The capture sockets of the VM ports (for sending, and for their malformed-frame counts).
#[derive(Debug, Default)]
pub struct Captures {
    live: Mutex<HashMap<u32, Arc<NeighCapture>>>,
    retired: Mutex<CaptureTotals>,
}

impl Captures {
    /// Registers the capture of port `ifindex`; returns the one it replaces (retired).
    pub fn insert(&self, ifindex: u32, capture: Arc<NeighCapture>) -> Option<Arc<NeighCapture>> {
        let old = self.live.lock().expect("captures").insert(ifindex, capture);
        if let Some(old) = &old {
            self.retire(&old.stats());
        }
        old
    }

    /// Forgets the capture of port `ifindex` (the port left); returns it (retired).
    pub fn remove(&self, ifindex: u32) -> Option<Arc<NeighCapture>> {
        let old = self.live.lock().expect("captures").remove(&ifindex);
        if let Some(old) = &old {
            self.retire(&old.stats());
        }
        old
    }

    /// The capture of port `ifindex`.
    pub fn get(&self, ifindex: u32) -> Option<Arc<NeighCapture>> {
        self.live.lock().expect("captures").get(&ifindex).cloned()
    }

    fn retire(&self, stats: &NeighStats) {
        self.retired.lock().expect("captures").add(stats);
    }
}

/// Malformed frames by protocol and reason and frames the kernel dropped (socket buffer full),
/// over every capture this agent has run.
impl CaptureCounts for Captures {
    fn totals(&self) -> CaptureTotals {
        let mut totals = self.retired.lock().expect("captures").clone();
        for capture in self.live.lock().expect("captures").values() {
            totals.add(&capture.stats());
        }
        totals
    }
}
