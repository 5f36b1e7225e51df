//! ARP on the VM ports: the capture socket ([`socket`]), storm protection ([`ratelimit`]) and
//! what a frame means ([`classify`]). The capture task reads every ARP frame of the namespace,
//! keeps those arriving on VM ports, counts and drops malformed ones and sources over their rate
//! budget, and hands the rest to the agent core, which learns and answers.

pub mod classify;
pub mod ratelimit;
pub mod socket;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use victor_dataplane::packet::arp::parse_frame;

pub use socket::ArpSocket;

use crate::core::ArpFrame;
use crate::metrics::{Metrics, ReasonLabel};
use crate::ports::PortTable;
use ratelimit::RateLimiter;

/// Reads ARP frames until `out` closes.
pub async fn capture(
    socket: Arc<ArpSocket>,
    ports: Arc<PortTable>,
    mut limiter: RateLimiter,
    out: mpsc::Sender<ArpFrame>,
    metrics: Arc<Metrics>,
) {
    let mut last_gc = 0u64;
    loop {
        let rx = match socket.recv().await {
            Ok(rx) => rx,
            Err(err) => {
                tracing::warn!(%err, "ARP socket read failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(port) = ports.get(rx.ifindex) else { continue };
        let msg = match parse_frame(&rx.frame) {
            Ok(msg) => msg,
            Err(err) => {
                metrics.arp_malformed.get_or_create(&ReasonLabel { reason: err.reason().to_owned() }).inc();
                continue;
            }
        };
        if msg.sender_mac.0 == port.mac {
            continue; // our own frame (kernels without PACKET_IGNORE_OUTGOING)
        }
        if !limiter.allow(msg.sender_mac.0, msg.sender_ip, rx.mono_ns) {
            metrics.arp_rate_limited.inc();
            continue;
        }
        if rx.mono_ns.saturating_sub(last_gc) > 10_000_000_000 {
            limiter.gc(rx.mono_ns);
            last_gc = rx.mono_ns;
        }
        let frame = ArpFrame { port, msg, wall: rx.wall_ns, mono: rx.mono_ns };
        match out.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics.arp_rate_limited.inc();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
