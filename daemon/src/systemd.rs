//! systemd's service protocol for `Type=notify` units with a watchdog (sd_notify(3),
//! sd_watchdog_enabled(3)), so a daemon tells systemd when it is ready and proves it is alive:
//!
//! * [`Notifier`] — one datagram per message (`READY=1`, `STATUS=…`, `WATCHDOG=1`,
//!   `STOPPING=1`) to the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//!   abstract namespace). The protocol is that one `sendto`, so it is written here rather than
//!   pulled in as a crate.
//! * [`Service`] — the task every daemon runs under systemd: `READY=1` once [`ServiceChecks::ready`]
//!   says so (what is missing until then goes to `STATUS=`, shown by `systemctl status`), and a
//!   `WATCHDOG=1` every half `WatchdogSec` **only while** [`ServiceChecks::healthy`] says so; when
//!   it does not, the pings stop, the reason is logged and put in `STATUS=`, and systemd restarts
//!   the daemon once `WatchdogSec` has passed (`Restart=always`). Without `$NOTIFY_SOCKET` (not
//!   run by systemd) it does nothing.
//! * [`Liveness`] — when a future was last polled: the health of an event loop that wakes itself
//!   periodically (a stuck or busy-looping loop stops being polled).
//! * [`AdminProbe`] — checks a daemon's own HTTP admin port (`/readyz`, `/healthz`), so systemd
//!   and Kubernetes probes judge readiness by the same answer.

use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::task::AbortOnDrop;

/// Why the notification socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` names neither a path nor an abstract socket.
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor @name")]
    BadAddress(String),
    /// Creating the socket or sending failed.
    #[error("systemd notification socket {address}: {source}")]
    Io {
        /// `$NOTIFY_SOCKET`.
        address: String,
        /// The error.
        source: io::Error,
    },
}

/// Sends notifications to systemd's socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: UnixAddr,
    address: String,
}

impl Notifier {
    /// The notifier of `$NOTIFY_SOCKET`; `None` when the daemon was not started by systemd with
    /// `Type=notify`.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(address) if !address.is_empty() => Notifier::connect(&address).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `address`: an absolute path, or `@name` for the abstract namespace.
    pub fn connect(address: &OsStr) -> Result<Notifier, NotifyError> {
        let text = address.to_string_lossy().into_owned();
        let target = if let Some(name) = text.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            UnixAddr::from_abstract_name(name.as_bytes())
        } else if text.starts_with('/') {
            UnixAddr::from_pathname(address)
        } else {
            return Err(NotifyError::BadAddress(text));
        }
        .map_err(|source| NotifyError::Io { address: text.clone(), source })?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Io { address: text.clone(), source })?;
        Ok(Notifier { socket, target, address: text })
    }

    /// Sends one message (`KEY=value` lines).
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.target)
            .map(|_| ())
            .map_err(|source| NotifyError::Io { address: self.address.clone(), source })
    }
}

/// How often systemd expects a `WATCHDOG=1` (`WatchdogSec=`), from `$WATCHDOG_USEC` and
/// `$WATCHDOG_PID`; `None` when the unit has no watchdog (or it is meant for another process).
pub fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec))
}

/// What a daemon tells its [`Service`] task.
pub trait ServiceChecks: Send + Sync + 'static {
    /// Ready to serve: `READY=1` is sent the first time this is `Ok`; until then the reason is
    /// shown as the unit's status.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Alive and working: the watchdog is pinged only while this is `Ok`.
    fn healthy(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// One line for `systemctl status` once ready (e.g. "headless for 12 s"); `None` keeps the
    /// last one.
    fn status(&self) -> Option<String> {
        None
    }
}

/// How often readiness is checked until the daemon is ready, and the status refreshed after.
const READY_POLL: Duration = Duration::from_millis(200);

/// The daemon's side of the systemd service: see the module documentation. Dropping it stops
/// the task.
#[derive(Debug)]
pub struct Service {
    notifier: Option<Arc<Notifier>>,
    _task: Option<AbortOnDrop<()>>,
}

impl Service {
    /// Starts the service task when the daemon runs under systemd (`$NOTIFY_SOCKET`), with the
    /// unit's watchdog interval (`$WATCHDOG_USEC`); otherwise a handle that does nothing.
    pub fn start(checks: impl ServiceChecks) -> Service {
        match Notifier::from_env() {
            Ok(Some(notifier)) => Service::start_with(notifier, watchdog_from_env(), checks),
            Ok(None) => Service { notifier: None, _task: None },
            Err(err) => {
                tracing::warn!("{err}: not reporting readiness to systemd");
                Service { notifier: None, _task: None }
            }
        }
    }

    /// Starts the service task on `notifier` with a watchdog of `watchdog` (pinged every half).
    pub fn start_with(notifier: Notifier, watchdog: Option<Duration>, checks: impl ServiceChecks) -> Service {
        let notifier = Arc::new(notifier);
        if let Some(w) = watchdog {
            tracing::info!(watchdog_ms = w.as_millis() as u64, "systemd watchdog enabled");
        }
        let task = AbortOnDrop::spawn(run(notifier.clone(), watchdog.map(|w| w / 2), checks));
        Service { notifier: Some(notifier), _task: Some(task) }
    }

    /// Tells systemd the daemon is stopping (`STOPPING=1`), e.g. on SIGTERM before a drain.
    pub fn stopping(&self) {
        if let Some(n) = &self.notifier {
            let _ = n.send("STOPPING=1\nSTATUS=stopping");
        }
    }
}

/// The service task: readiness until ready, status, and watchdog pings while healthy.
async fn run(notifier: Arc<Notifier>, ping_every: Option<Duration>, checks: impl ServiceChecks) {
    let send = |messages: Vec<String>| {
        for message in messages {
            if let Err(err) = notifier.send(&message) {
                tracing::debug!("{err}");
            }
        }
    };
    let mut state = Protocol::default();
    let mut next_ping = Instant::now();
    loop {
        let now = Instant::now();
        if let Some(every) = ping_every.filter(|_| now >= next_ping) {
            next_ping = now + every;
            send(state.health(checks.healthy().await));
        }
        if state.unhealthy.is_none() {
            let readiness = if state.ready { Ok(()) } else { checks.ready().await };
            send(state.readiness(readiness, checks.status()));
        }
        let mut wake = Instant::now() + READY_POLL;
        if ping_every.is_some() {
            wake = wake.min(next_ping);
        }
        tokio::time::sleep_until(wake).await;
    }
}

/// What the service task has told systemd, and what to tell it next (pure: the messages to send
/// for each check's outcome).
#[derive(Debug, Default)]
struct Protocol {
    ready: bool,
    status: String,
    unhealthy: Option<String>,
}

impl Protocol {
    /// After a health check: a ping while healthy; the reason (once) while not.
    fn health(&mut self, outcome: Result<(), String>) -> Vec<String> {
        match outcome {
            Ok(()) => {
                if let Some(why) = self.unhealthy.take() {
                    tracing::info!(was = %why, "healthy again: pinging the systemd watchdog");
                    self.status.clear();
                }
                vec!["WATCHDOG=1".into()]
            }
            Err(why) if self.unhealthy.as_ref() == Some(&why) => vec![],
            Err(why) => {
                tracing::warn!(%why, "unhealthy: not pinging the systemd watchdog (restarted when WatchdogSec passes)");
                let message = format!("STATUS=unhealthy: {why}");
                self.status = message.clone();
                self.unhealthy = Some(why);
                vec![message]
            }
        }
    }

    /// After a readiness check (while healthy): READY=1 the first time it is `Ok`, and the status
    /// line when it changed.
    fn readiness(&mut self, outcome: Result<(), String>, status: Option<String>) -> Vec<String> {
        let mut out = Vec::new();
        let line = match outcome {
            Ok(()) if !self.ready => {
                self.ready = true;
                tracing::info!("ready: told systemd");
                out.push("READY=1".into());
                Some(status.unwrap_or_else(|| "ready".into()))
            }
            Ok(()) => status,
            Err(why) => Some(format!("starting: {why}")),
        };
        if let Some(line) = line.map(|l| format!("STATUS={l}")).filter(|l| *l != self.status) {
            out.push(line.clone());
            self.status = line;
        }
        out
    }
}

/// When a tracked future was last polled (see [`Liveness::track`]).
#[derive(Debug, Clone)]
pub struct Liveness {
    origin: Instant,
    last_poll_ns: Arc<AtomicU64>,
}

impl Liveness {
    /// Wraps `future` so that every poll records the time. An event loop that wakes itself at
    /// least every tick is polled at least that often while it works; a loop stuck in an
    /// await that never completes, or busy in one poll, stops being polled.
    pub fn track<F: Future>(future: F) -> (Tracked<F>, Liveness) {
        let liveness = Liveness { origin: Instant::now(), last_poll_ns: Arc::new(AtomicU64::new(0)) };
        (Tracked { inner: Box::pin(future), liveness: liveness.clone() }, liveness)
    }

    /// Time since the tracked future was last polled (since tracking began if never).
    pub fn idle_for(&self) -> Duration {
        let last = self.origin + Duration::from_nanos(self.last_poll_ns.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(last)
    }

    /// `Ok` when the future was polled within `limit`; otherwise says how long `what` has not run.
    pub fn check(&self, what: &str, limit: Duration) -> Result<(), String> {
        let idle = self.idle_for();
        if idle <= limit {
            Ok(())
        } else {
            Err(format!("{what} has not run for {} s (limit {} s)", idle.as_secs(), limit.as_secs()))
        }
    }
}

/// A future whose polls are recorded by a [`Liveness`].
#[derive(Debug)]
pub struct Tracked<F> {
    inner: Pin<Box<F>>,
    liveness: Liveness,
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let since = Instant::now().saturating_duration_since(self.liveness.origin);
        self.liveness.last_poll_ns.store(since.as_nanos() as u64, Ordering::Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

/// [`ServiceChecks`] from a daemon's own HTTP admin port: ready when `GET /readyz` answers 200,
/// healthy while `GET /healthz` answers 200 within the timeout (the runtime, the accept loop and
/// the HTTP stack all work).
#[derive(Debug, Clone)]
pub struct AdminProbe {
    addr: SocketAddr,
    timeout: Duration,
}

impl AdminProbe {
    /// Probes the admin port listening on `listen` (an unspecified address is reached on loopback).
    pub fn new(listen: SocketAddr, timeout: Duration) -> AdminProbe {
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        AdminProbe { addr: SocketAddr::new(ip, listen.port()), timeout }
    }

    /// `GET path`: the status code and body, or why there was none.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr);
            stream.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            stream.take(64 * 1024).read_to_end(&mut answer).await?;
            Ok::<_, io::Error>(String::from_utf8_lossy(&answer).into_owned())
        };
        let answer = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(err)) => return Err(format!("{path} on {}: {err}", self.addr)),
            Err(_) => return Err(format!("{path} on {} did not answer within {:?}", self.addr, self.timeout)),
        };
        let code = answer
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("{path} on {}: not an HTTP answer", self.addr))?;
        let body = answer.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_owned()).unwrap_or_default();
        Ok((code, body))
    }

    async fn expect_ok(&self, path: &str) -> Result<(), String> {
        match self.get(path).await? {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{path}: {code} {body}")),
        }
    }
}

impl ServiceChecks for AdminProbe {
    async fn ready(&self) -> Result<(), String> {
        self.expect_ok("/readyz").await
    }

    async fn healthy(&self) -> Result<(), String> {
        self.expect_ok("/healthz").await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[test]
    fn the_watchdog_is_ours_only_with_our_pid() {
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), Some(Duration::from_secs(30)));
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(30)));
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None, "meant for another process");
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("x"), None, 7), None);
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert!(Notifier::connect(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(Notifier::connect(OsStr::new("@victor-test")).is_ok());
        assert!(matches!(Notifier::connect(OsStr::new("relative")), Err(NotifyError::BadAddress(_))));
    }

    #[test]
    fn ready_once_and_pings_only_while_healthy() {
        let mut p = Protocol::default();
        assert_eq!(p.health(Ok(())), ["WATCHDOG=1"], "a starting daemon that works pings too");
        assert_eq!(p.readiness(Err("no snapshot yet".into()), None), ["STATUS=starting: no snapshot yet"]);
        assert!(p.readiness(Err("no snapshot yet".into()), None).is_empty(), "an unchanged status is not resent");
        assert_eq!(p.readiness(Ok(()), None), ["READY=1", "STATUS=ready"]);
        assert!(p.readiness(Ok(()), None).is_empty(), "READY=1 is sent once");
        assert_eq!(p.readiness(Ok(()), Some("headless for 3 s".into())), ["STATUS=headless for 3 s"]);

        assert_eq!(
            p.health(Err("the engine has not run for 20 s".into())),
            ["STATUS=unhealthy: the engine has not run for 20 s"]
        );
        assert!(p.health(Err("the engine has not run for 20 s".into())).is_empty(), "no ping, no repeat");
        assert_eq!(
            p.health(Err("the engine has not run for 25 s".into())),
            ["STATUS=unhealthy: the engine has not run for 25 s"]
        );
        assert_eq!(p.health(Ok(())), ["WATCHDOG=1"]);
        assert_eq!(
            p.readiness(Ok(()), Some("headless for 3 s".into())),
            ["STATUS=headless for 3 s"],
            "status restored"
        );
    }

    /// Readiness and health the test flips.
    #[derive(Clone)]
    struct Flags {
        ready: Arc<AtomicBool>,
        healthy: Arc<AtomicBool>,
    }

    impl ServiceChecks for Flags {
        async fn ready(&self) -> Result<(), String> {
            if self.ready.load(Ordering::Relaxed) { Ok(()) } else { Err("no snapshot yet".into()) }
        }

        async fn healthy(&self) -> Result<(), String> {
            if self.healthy.load(Ordering::Relaxed) { Ok(()) } else { Err("the engine has not run".into()) }
        }
    }

    /// systemd's end: a bound datagram socket; `next` waits for the next message.
    struct Systemd {
        socket: tokio::net::UnixDatagram,
        _dir: tempfile::TempDir,
    }

    impl Systemd {
        fn new() -> (Systemd, Notifier) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
            (Systemd { socket, _dir: dir }, Notifier::connect(path.as_os_str()).unwrap())
        }

        async fn next(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(30), self.socket.recv(&mut buf))
                .await
                .expect("no notification within 30 s")
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }

        /// Messages until `want` arrives (included).
        async fn until(&self, want: &str) -> Vec<String> {
            let mut seen = Vec::new();
            loop {
                let m = self.next().await;
                seen.push(m.clone());
                if m == want {
                    return seen;
                }
            }
        }
    }

    #[tokio::test]
    async fn the_service_task_speaks_the_protocol_on_a_real_socket() {
        let (systemd, notifier) = Systemd::new();
        let flags = Flags { ready: Arc::new(AtomicBool::new(false)), healthy: Arc::new(AtomicBool::new(true)) };
        let service = Service::start_with(notifier, Some(Duration::from_millis(100)), flags.clone());

        let before = systemd.until("STATUS=starting: no snapshot yet").await;
        assert!(!before.contains(&"READY=1".to_string()), "{before:?}");
        systemd.until("WATCHDOG=1").await;
        flags.ready.store(true, Ordering::Relaxed);
        systemd.until("READY=1").await;

        // Unhealthy: after saying why, no ping until healthy again.
        flags.healthy.store(false, Ordering::Relaxed);
        systemd.until("STATUS=unhealthy: the engine has not run").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        flags.healthy.store(true, Ordering::Relaxed);
        let first = systemd.next().await;
        assert_eq!(first, "WATCHDOG=1", "nothing was sent while unhealthy but the next ping");

        service.stopping();
        systemd.until("STOPPING=1\nSTATUS=stopping").await;
    }

    #[tokio::test]
    async fn liveness_sees_a_loop_that_stops_running() {
        let stuck = Arc::new(AtomicBool::new(false));
        let flag = stuck.clone();
        let event_loop = async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                if flag.load(Ordering::Relaxed) {
                    // An await that never completes (e.g. a kernel request with no answer).
                    std::future::pending::<()>().await;
                }
            }
        };
        let (tracked, liveness) = Liveness::track(event_loop);
        let _task = AbortOnDrop::spawn(tracked);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(liveness.check("the engine", Duration::from_secs(10)), Ok(()));
        stuck.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let err = liveness.check("the engine", Duration::from_millis(200)).unwrap_err();
        assert!(err.starts_with("the engine has not run for "), "{err}");
    }

    #[tokio::test]
    async fn admin_probe_reads_status_and_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), listener.local_addr().unwrap().port());
        let _server = AbortOnDrop::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                let answer = if String::from_utf8_lossy(&buf[..n]).starts_with("GET /readyz ") {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 28\r\n\r\nnot ready: cache not loaded\n"
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
                };
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let probe = AdminProbe::new(listen, Duration::from_secs(5));
        assert_eq!(probe.healthy().await, Ok(()));
        assert_eq!(probe.ready().await, Err("/readyz: 503 not ready: cache not loaded".into()));
        let nobody = AdminProbe::new("127.0.0.1:1".parse().unwrap(), Duration::from_secs(5));
        assert!(nobody.healthy().await.unwrap_err().contains("/healthz on 127.0.0.1:1"));
    }
}
