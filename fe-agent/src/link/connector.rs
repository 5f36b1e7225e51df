//! How controller connections are opened: plain TCP from the agent's namespace, or — with
//! `--controller-netns` — from another network namespace. A socket belongs to the namespace it
//! was created in, so one helper thread lives in the target namespace and creates sockets on
//! request; connecting, reading and writing then happen on the runtime as usual.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tonic::transport::Uri;

type Request = (Domain, oneshot::Sender<io::Result<Socket>>);

/// Creates TCP sockets inside one network namespace.
#[derive(Debug)]
pub struct SocketFactory {
    requests: std::sync::Mutex<std_mpsc::Sender<Request>>,
}

impl SocketFactory {
    /// Starts the helper thread inside the namespace at `path` (e.g. `/proc/1/ns/net`).
    pub fn in_namespace(path: &Path) -> io::Result<SocketFactory> {
        let file = std::fs::File::open(path)?;
        let (tx, rx) = std_mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new().name("ctl-netns".into()).spawn(move || {
            let entered = setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            while let Ok((domain, reply)) = rx.recv() {
                let _ = reply.send(Socket::new(domain, Type::STREAM.cloexec(), None));
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("namespace helper thread died"))??;
        Ok(SocketFactory { requests: std::sync::Mutex::new(tx) })
    }

    async fn socket(&self, domain: Domain) -> io::Result<Socket> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .lock()
            .expect("factory lock")
            .send((domain, tx))
            .map_err(|_| io::Error::other("namespace helper thread is gone"))?;
        rx.await.map_err(|_| io::Error::other("namespace helper thread is gone"))?
    }
}

/// The tonic connector.
#[derive(Debug, Clone, Default)]
pub struct Connector {
    factory: Option<Arc<SocketFactory>>,
}

impl Connector {
    /// Connects from the agent's namespace, or through `factory`'s.
    pub fn new(factory: Option<Arc<SocketFactory>>) -> Self {
        Connector { factory }
    }

    async fn connect(factory: Option<Arc<SocketFactory>>, uri: Uri) -> io::Result<TokioIo<TcpStream>> {
        let host = uri.host().ok_or_else(|| io::Error::other(format!("{uri} has no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
        let mut last = io::Error::other(format!("{host} resolved to no address"));
        for addr in addrs {
            let domain = Domain::for_address(addr);
            let socket = match &factory {
                Some(f) => f.socket(domain).await?,
                None => Socket::new(domain, Type::STREAM.cloexec(), None)?,
            };
            socket.set_nonblocking(true)?;
            socket.set_tcp_nodelay(true)?;
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            match socket.connect(addr).await {
                Ok(stream) => return Ok(TokioIo::new(stream)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(Self::connect(self.factory.clone(), uri))
    }
}
