//! The hint socket: one UDP socket bound to this FE's underlay address and the hint port. Its
//! receive task drops what is not a fresh, authenticated hint from a sender within budget —
//! malformed, bad HMAC, per-source rate limit, replay window — counting each reason, and hands the
//! rest to the engine (which owns the desired state the acceptance rules need). The engine sends
//! through [`HintSocket::send`], a non-blocking send like its ARP replies (straight to the
//! kernel: no wait for the reactor to have seen the socket writable).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use victor_proto::clock::monotonic_ns;

use super::accept::{Reject, ReplayGuard};
use crate::clock::WallClock;
use crate::codec::hint::{self as codec, Hint, Keys, WireError};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;

/// Largest datagram read (a hint is at most 143 bytes).
const MAX_DATAGRAM: usize = 512;
/// Nonces remembered inside one replay window, over all senders.
const NONCE_CAP: usize = 131_072;

/// An authenticated, fresh hint, as the receive task hands it to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The hint.
    pub hint: Hint,
    /// The datagram's source address.
    pub src: Ipv4Addr,
    /// When it was read (monotonic ns).
    pub received_mono: u64,
}

/// Receive-side limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Replay window (ns, by the sender's clock; see [`ReplayGuard`]).
    pub max_age_ns: u64,
    /// Hints per second per source (and the burst).
    pub rate: u32,
    /// This FE's wall clock (receive times).
    pub clock: WallClock,
}

/// The socket.
#[derive(Debug, Clone)]
pub struct HintSocket {
    socket: Arc<UdpSocket>,
    sender: Arc<std::net::UdpSocket>,
    port: u16,
    keys: Arc<Keys>,
}

impl HintSocket {
    /// Binds `addr:port` (this FE's underlay address: hints leave from it, which is what the
    /// receivers check). Needs a Tokio runtime.
    pub fn bind(addr: Ipv4Addr, port: u16, keys: Keys) -> std::io::Result<HintSocket> {
        let std_socket = std::net::UdpSocket::bind(SocketAddrV4::new(addr, port))?;
        std_socket.set_nonblocking(true)?;
        let sender = Arc::new(std_socket.try_clone()?);
        let socket = Arc::new(UdpSocket::from_std(std_socket)?);
        Ok(HintSocket { socket, sender, port, keys: Arc::new(keys) })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Signs `hint` and sends it to the hint port of every address in `to`; returns how many
    /// datagrams left (a full socket buffer or an unreachable peer only loses that copy: the
    /// controller's delta follows anyway).
    pub fn send(&self, hint: &Hint, to: &[Ipv4Addr]) -> usize {
        let datagram = codec::encode(hint, &self.keys);
        let mut sent = 0;
        for peer in to {
            match self.sender.send_to(&datagram, SocketAddrV4::new(*peer, self.port)) {
                Ok(_) => sent += 1,
                Err(err) => tracing::debug!(%peer, %err, "could not send a move hint"),
            }
        }
        sent
    }

    /// Runs the receive loop until `out` closes.
    pub async fn receive(self, limits: Limits, metrics: Arc<Metrics>, out: mpsc::Sender<Received>) {
        let mut guard = ReplayGuard::new(limits.max_age_ns, NONCE_CAP);
        let mut limiter: RateLimiter<Ipv4Addr> = RateLimiter::new(limits.rate, limits.rate);
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut last_gc = 0u64;
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(%err, "move hint socket read failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let received_mono = monotonic_ns();
            let SocketAddr::V4(from) = from else { continue };
            let src = *from.ip();
            match screen(&buf[..n], src, &self.keys, &mut limiter, &mut guard, received_mono, limits.clock.now()) {
                Ok(hint) => {
                    if out.is_closed() {
                        return;
                    }
                    if out.try_send(Received { hint, src, received_mono }).is_err() {
                        metrics.hint_rejected(Reject::RateLimited.label());
                    }
                }
                Err(reason) => {
                    tracing::debug!(%src, reason = reason.label(), "move hint dropped");
                    metrics.hint_rejected(reason.label());
                }
            }
            if received_mono.saturating_sub(last_gc) >= 1_000_000_000 {
                guard.prune(received_mono);
                limiter.gc(received_mono);
                last_gc = received_mono;
            }
        }
    }
}

/// The receive task's checks on one datagram, in order of cost: authentication, the sender's
/// budget, the replay window.
fn screen(
    datagram: &[u8],
    src: Ipv4Addr,
    keys: &Keys,
    limiter: &mut RateLimiter<Ipv4Addr>,
    guard: &mut ReplayGuard,
    now_mono: u64,
    now_wall: i64,
) -> Result<Hint, Reject> {
    let hint = codec::decode(datagram, keys).map_err(|e| match e {
        WireError::Malformed(_) => Reject::Malformed,
        WireError::BadHmac => Reject::BadHmac,
    })?;
    if !limiter.allow(src, now_mono) {
        return Err(Reject::RateLimited);
    }
    guard.check(src, &hint, now_wall, now_mono)?;
    Ok(hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::hint::Kind;

    const S: i64 = 1_000_000_000;

    fn keys() -> Keys {
        Keys::new(&[&[7u8; 32]]).unwrap()
    }

    fn hint(nonce: u64) -> Hint {
        Hint {
            kind: Kind::Move,
            fe_id: "fe3".into(),
            vm_ip: Ipv4Addr::new(10, 10, 0, 11).into(),
            mac: [2, 0, 0, 0, 0, 0x11],
            move_seq: 4,
            observed_at: 100 * S,
            sent_at: 100 * S,
            nonce,
        }
    }

    #[test]
    fn screening_order_and_reasons() {
        let src = Ipv4Addr::new(198, 51, 100, 3);
        let mut limiter = RateLimiter::new(2, 2);
        let mut guard = ReplayGuard::new(2 * S as u64, 16);
        let mut run = |d: &[u8]| screen(d, src, &keys(), &mut limiter, &mut guard, 0, 100 * S);
        assert_eq!(run(b"hello"), Err(Reject::Malformed));
        let forged = codec::encode(&hint(1), &Keys::new(&[&[8u8; 32]]).unwrap());
        assert_eq!(run(&forged), Err(Reject::BadHmac), "forgeries cost no budget");
        let good = codec::encode(&hint(1), &keys());
        assert_eq!(run(&good), Ok(hint(1)));
        assert_eq!(run(&good), Err(Reject::Replay));
        assert_eq!(run(&codec::encode(&hint(2), &keys())), Err(Reject::RateLimited), "burst of 2 spent");
    }

    #[tokio::test]
    async fn hints_travel_over_loopback_and_strangers_are_dropped() {
        let a = HintSocket::bind(Ipv4Addr::LOCALHOST, 0, keys()).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = HintSocket { port, ..HintSocket::bind(Ipv4Addr::LOCALHOST, 0, keys()).unwrap() };
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = mpsc::channel(4);
        let limits = Limits { max_age_ns: 5 * S as u64, rate: 100, clock: WallClock::default() };
        let task = tokio::spawn(a.clone().receive(limits, metrics.clone(), tx));
        let h = Hint { sent_at: victor_proto::clock::unix_nanos(), ..hint(9) };
        let stranger = HintSocket { keys: Arc::new(Keys::new(&[&[1u8; 32]]).unwrap()), ..b.clone() };
        assert_eq!(stranger.send(&h, &[Ipv4Addr::LOCALHOST]), 1);
        assert_eq!(b.send(&h, &[Ipv4Addr::LOCALHOST]), 1);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!((got.hint, got.src), (h, Ipv4Addr::LOCALHOST));
        assert!(metrics.render().contains("victor_agent_move_hints_rejected_total{reason=\"bad_hmac\"} 1"));
        task.abort();
    }
}
