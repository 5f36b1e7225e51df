//! A TCP proxy on loopback that can be partitioned: the fault tests put it on a link (an agent's
//! controller connection, a replica's etcd connections) to cut that link alone.
//!
//! * [`LinkProxy::partition`] — no byte moves any more, in either direction, on the open
//!   connections, and new connections are accepted but never answered: to both ends the link
//!   looks like a pulled cable (only their own timeouts can tell).
//! * [`LinkProxy::lose_replies`] — an asymmetric partition: requests still reach the target, its
//!   answers are lost (a member that commits and dies before answering, a half-broken link): the
//!   client cannot know whether its request was applied.
//! * [`LinkProxy::heal`] — new connections are forwarded again; the connections held during the
//!   cut are reset (RST), as after a partition that outlasted the peers' TCP timers.
//!
//! Dropping the proxy closes everything it holds.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The state of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Bytes flow both ways.
    Up,
    /// Nothing flows.
    Down,
    /// Client → target flows, target → client is lost.
    RepliesLost,
}

/// A partitionable TCP proxy in front of one target.
pub struct LinkProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The proxied address.
    pub target: SocketAddr,
    state: watch::Sender<LinkState>,
    task: JoinHandle<()>,
}

impl LinkProxy {
    /// Starts forwarding `127.0.0.1:<free port>` to `target`.
    pub async fn start(target: SocketAddr) -> Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind the link proxy")?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(LinkState::Up);
        let rx = state.subscribe();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(serve(client, target, rx.clone()));
                // Reap finished connections so the set does not grow without bound.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(LinkProxy { addr, target, state, task })
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts the link (see the module doc).
    pub fn partition(&self) {
        self.state.send_replace(LinkState::Down);
    }

    /// Loses the target's answers from now on (see the module doc).
    pub fn lose_replies(&self) {
        self.state.send_replace(LinkState::RepliesLost);
    }

    /// Restores the link (see the module doc).
    pub fn heal(&self) {
        self.state.send_replace(LinkState::Up);
    }

    /// The link's state.
    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

/// Forwards one connection until either end closes it; a direction that is cut stops moving
/// bytes, and when the link is up again the whole connection is reset. A connection accepted
/// while the link is not up is held silent until it is, then reset.
async fn serve(client: TcpStream, target: SocketAddr, mut state: watch::Receiver<LinkState>) {
    if *state.borrow() != LinkState::Up {
        let _ = state.wait_for(|s| *s == LinkState::Up).await;
        let _ = client.set_zero_linger();
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (reset, _) = watch::channel(false);
    tokio::join!(
        pump(client_read, server_write, state.clone(), &reset, |s| s == LinkState::Down),
        pump(server_read, client_write, state, &reset, |s| s != LinkState::Up),
    );
}

/// Copies `from` to `to` while the link state is not `cut` for this direction. Once cut, nothing
/// more is read (or what was read is dropped) until the link is up again; then both connections
/// are reset (`reset` tells the other direction).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut state: watch::Receiver<LinkState>,
    reset: &watch::Sender<bool>,
    cut: fn(LinkState) -> bool,
) {
    let mut resets = reset.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    let mut was_cut = false;
    loop {
        let now = *state.borrow_and_update();
        if cut(now) {
            was_cut = true;
        } else if was_cut && now == LinkState::Up {
            reset.send_replace(true);
        }
        if *resets.borrow_and_update() {
            let _ = from.as_ref().set_zero_linger();
            let _ = to.as_ref().set_zero_linger();
            return;
        }
        tokio::select! {
            read = from.read(&mut buf), if !cut(now) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if !cut(*state.borrow()) && to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = state.changed() => if changed.is_err() { return },
            _ = resets.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, timeout: Duration) -> Option<Vec<u8>> {
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(timeout, s.read_exact(&mut buf)).await.ok()?.ok()?;
        Some(buf.to_vec())
    }

    #[tokio::test]
    async fn partition_freezes_and_heal_resets_held_connections() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut a, Duration::from_secs(5)).await.as_deref(), Some(&b"ping"[..]));

        proxy.partition();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(round_trip(&mut a, Duration::from_millis(300)).await, None, "no byte crosses a cut link");
        let mut b = TcpStream::connect(proxy.addr).await.expect("connections are still accepted");
        assert_eq!(round_trip(&mut b, Duration::from_millis(300)).await, None, "but never answered");

        proxy.heal();
        let mut buf = [0u8; 16];
        let closed =
            tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf)).await.expect("held connection closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "held connection ends at heal: {closed:?}");
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut c, Duration::from_secs(5)).await.as_deref(), Some(&b"ping"[..]), "healed");
    }

    #[tokio::test]
    async fn lost_replies_let_requests_through() {
        // The target counts the bytes it received, so the test sees requests arrive.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                let _ = seen_tx.send(n);
                let _ = s.write_all(&buf[..n]).await;
            }
        });
        let proxy = LinkProxy::start(target).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(round_trip(&mut a, Duration::from_secs(5)).await.is_some());
        assert_eq!(seen.recv().await, Some(4));
        proxy.lose_replies();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(round_trip(&mut a, Duration::from_millis(300)).await, None, "the answer is lost");
        let arrived = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await;
        assert_eq!(arrived.unwrap(), Some(4), "but the request arrived");
        proxy.heal();
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf)).await.expect("reset at heal");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
}
