//! What every client connection of both servers (gRPC and the HTTP admin port) goes through
//! before it is served, so that no client can hold the replica's sockets or file descriptors:
//!
//! * a **connection cap** per server ([`Gate`]): beyond it a new connection is accepted and
//!   closed at once (counted), so the listen backlog never fills with connections nobody serves;
//!   the caps are kept below the process's open-file limit ([`raise_fd_limit`], [`fit_caps`]),
//!   so running out of descriptors cannot stop both servers answering;
//! * a **handshake deadline**: a gRPC connection must complete TLS (when configured) and send the
//!   HTTP/2 connection preface within `--handshake-timeout`; an HTTP connection must send a request
//!   head within it (hyper's header read timeout, which also bounds the wait between requests);
//! * an **idle timeout** ([`Guarded`]): a connection on which nothing was received or sent for
//!   `--idle-timeout` is closed. Live gRPC clients answer the server's HTTP/2 keepalive pings
//!   (every 10 s; 5 s to answer), so only dead or silent sockets reach it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use crate::metrics::{Metrics, ServerLabel, TimeoutLabel};

/// Length of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const HTTP2_PREFACE_LEN: usize = 24;
/// Descriptors kept free of both connection caps: store connections, the embedded store's files,
/// listeners, logs, and whatever the runtime needs.
pub const FD_HEADROOM: u64 = 256;
/// Pause after a failed `accept` (e.g. out of descriptors) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Connections accepted but not yet handed to the server.
const ACCEPTED_QUEUE: usize = 64;

/// Timeouts of one server's connections.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TLS + preface (gRPC) or the request head (HTTP).
    pub handshake: Duration,
    /// Nothing received or sent for this long closes the connection.
    pub idle: Duration,
}

/// One server's connection cap, with its metrics.
#[derive(Clone)]
pub struct Gate {
    server: &'static str,
    slots: Arc<Semaphore>,
    max: usize,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
}

impl Gate {
    /// At most `max` open connections of `server` ("grpc" or "http").
    pub fn new(server: &'static str, max: usize, timeouts: Timeouts, metrics: Arc<Metrics>) -> Gate {
        Gate { server, slots: Arc::new(Semaphore::new(max)), max, timeouts, metrics }
    }

    /// The timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Accepts connections on `listener` until the returned receiver is dropped: each one within
    /// the cap goes through `handshake` (bounded by the handshake timeout) and comes out
    /// [`Guarded`], waiting for the first `preface` bytes if asked.
    pub fn accept<IO, H, F>(self, listener: TcpListener, preface: usize, handshake: H) -> mpsc::Receiver<Guarded<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(TcpStream) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<IO>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
        let handshake = Arc::new(handshake);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            tracing::warn!(server = self.server, %err, "accept failed; retrying");
                            tokio::time::sleep(ACCEPT_RETRY).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                    self.metrics.connections_refused.get_or_create(&ServerLabel { server: self.server }).inc();
                    tracing::debug!(server = self.server, %peer, max = self.max, "connection refused: server full");
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (gate, tx, handshake) = (self.clone(), tx.clone(), handshake.clone());
                tokio::spawn(async move {
                    let started = Instant::now();
                    let deadline = started + gate.timeouts.handshake;
                    let io = match tokio::time::timeout_at(deadline, handshake(tcp)).await {
                        Ok(Ok(io)) => io,
                        Ok(Err(err)) => {
                            tracing::debug!(server = gate.server, %peer, %err, "handshake failed");
                            return;
                        }
                        Err(_) => {
                            gate.timed_out("handshake");
                            tracing::debug!(server = gate.server, %peer, "handshake timed out");
                            return;
                        }
                    };
                    let guarded = Guarded::new(io, gate.clone(), slot, preface, deadline);
                    let _ = tx.send(guarded).await;
                });
            }
        });
        rx
    }

    fn timed_out(&self, reason: &'static str) {
        self.metrics.connections_timed_out.get_or_create(&TimeoutLabel { server: self.server, reason }).inc();
    }
}

/// A connection with its place under the cap, its handshake deadline and its idle timeout.
pub struct Guarded<IO> {
    io: IO,
    gate: Gate,
    _slot: OwnedSemaphorePermit,
    /// Preface bytes still to be received before the handshake deadline.
    preface_left: usize,
    handshake: Option<Pin<Box<Sleep>>>,
    last_activity: Instant,
    idle: Pin<Box<Sleep>>,
}

impl<IO> Guarded<IO> {
    fn new(io: IO, gate: Gate, slot: OwnedSemaphorePermit, preface: usize, deadline: Instant) -> Self {
        gate.metrics.connections.get_or_create(&ServerLabel { server: gate.server }).inc();
        let now = Instant::now();
        let idle = Box::pin(tokio::time::sleep_until(now + gate.timeouts.idle));
        let handshake = (preface > 0).then(|| Box::pin(tokio::time::sleep_until(deadline)));
        Guarded { io, gate, _slot: slot, preface_left: preface, handshake, last_activity: now, idle }
    }

    fn active(&mut self, bytes: usize) {
        if bytes > 0 {
            self.last_activity = Instant::now();
        }
    }

    /// Checks the timers while the connection waits; an error closes the connection.
    fn check_timers(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(handshake) = &mut self.handshake
            && handshake.as_mut().poll(cx).is_ready()
        {
            self.gate.timed_out("handshake");
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 connection preface in time"));
        }
        while self.idle.as_mut().poll(cx).is_ready() {
            let due = self.last_activity + self.gate.timeouts.idle;
            if due <= Instant::now() {
                self.gate.timed_out("idle");
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long"));
            }
            // There was activity since the timer was set: wait for the rest of the period.
            self.idle.as_mut().reset(due);
        }
        Ok(())
    }
}

impl<IO> Drop for Guarded<IO> {
    fn drop(&mut self) {
        self.gate.metrics.connections.get_or_create(&ServerLabel { server: self.gate.server }).dec();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                self.active(n);
                if self.preface_left > 0 {
                    self.preface_left = self.preface_left.saturating_sub(n);
                    if self.preface_left == 0 {
                        self.handshake = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => match self.check_timers(cx) {
                Ok(()) => Poll::Pending,
                Err(err) => Poll::Ready(Err(err)),
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.active(n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.active(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(err = %io::Error::last_os_error(), soft = limit.rlim_cur, hard = limit.rlim_max,
                "could not raise the open-file limit to its hard limit");
        }
    }
    Ok(limit.rlim_cur)
}

/// The connection caps (gRPC, HTTP) that fit in `fd_limit` descriptors with [`FD_HEADROOM`]
/// kept free: the HTTP cap first (it is small), the gRPC cap gets the rest. Caps are lowered,
/// never raised; the second value says whether anything was lowered.
pub fn fit_caps(grpc: usize, http: usize, fd_limit: u64) -> ((usize, usize), bool) {
    let available = fd_limit.saturating_sub(FD_HEADROOM).max(2) as usize;
    let http_fit = http.min(available / 2).max(1);
    let grpc_fit = grpc.min(available - http_fit).max(1);
    ((grpc_fit, http_fit), (grpc_fit, http_fit) != (grpc, http))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn gate(max: usize, handshake_ms: u64, idle_ms: u64) -> Gate {
        let timeouts =
            Timeouts { handshake: Duration::from_millis(handshake_ms), idle: Duration::from_millis(idle_ms) };
        Gate::new("grpc", max, timeouts, Arc::new(Metrics::new()))
    }

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[test]
    fn caps_fit_under_the_descriptor_limit() {
        assert_eq!(fit_caps(4096, 64, 1_048_576), ((4096, 64), false));
        assert_eq!(fit_caps(4096, 64, 1024), ((704, 64), true));
        assert_eq!(fit_caps(4096, 64, 100), ((1, 1), true), "never zero");
    }

    #[tokio::test]
    async fn over_the_cap_a_connection_is_closed_at_once() {
        let (l, addr) = listener().await;
        let mut accepted = gate(1, 5_000, 5_000).accept(l, 0, |tcp| async move { Ok(tcp) });
        let _first = TcpStream::connect(addr).await.unwrap();
        let held = accepted.recv().await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await.expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "the second connection was served: {n:?}");
        drop(held);
        let _third = TcpStream::connect(addr).await.unwrap();
        assert!(accepted.recv().await.is_some(), "a freed slot serves the next connection");
    }

    #[tokio::test]
    async fn a_missing_preface_and_an_idle_connection_time_out() {
        let (l, addr) = listener().await;
        let mut accepted = gate(8, 200, 400).accept(l, HTTP2_PREFACE_LEN, |tcp| async move { Ok(tcp) });
        // Half a preface, then silence: closed at the handshake deadline.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut conn = accepted.recv().await.unwrap();
        let mut buf = [0u8; 64];
        let started = Instant::now();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 16);
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // A whole preface, then silence: closed once idle for the idle timeout.
        let mut whole = TcpStream::connect(addr).await.unwrap();
        whole.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut conn = accepted.recv().await.unwrap();
        let mut total = 0;
        let err = loop {
            match conn.read(&mut buf).await {
                Ok(n) => total += n,
                Err(err) => break err,
            }
        };
        assert_eq!((err.kind(), total), (io::ErrorKind::TimedOut, HTTP2_PREFACE_LEN), "{err}");
    }

    #[tokio::test]
    async fn a_stalled_handshake_never_reaches_the_server() {
        let (l, addr) = listener().await;
        let mut accepted = gate(8, 200, 5_000).accept(l, 0, |tcp| async move {
            // A handshake that needs the client to speak first.
            let mut tcp = tcp;
            let mut b = [0u8; 1];
            tcp.read_exact(&mut b).await?;
            Ok(tcp)
        });
        let _silent = TcpStream::connect(addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), accepted.recv()).await;
        assert!(got.is_err(), "a connection that never completed its handshake was handed over");
    }
}
