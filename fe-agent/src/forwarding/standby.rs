//! The standby forwarder of the userspace data plane: what forwards while no agent runs.
//!
//! The kernel backend forwards without the agent; the userspace one needs a process reading the
//! TUN device and the underlay sockets. So the agent starts a **standby** — the same binary and
//! command line, told by [`STANDBY_FD`] which descriptor connects it to the agent — that waits,
//! holding nothing, until the agent goes:
//!
//! **The TUN queues and underlay sockets are handed on, never closed.** The agent passes the
//! standby duplicates of its forwarder's TUN queues and raw underlay sockets right after
//! starting it ([`HANDED`], `SCM_RIGHTS` on their socket pair), and the standby forwards on
//! *those* when it takes over; the next agent asks the standby for them the same way
//! ([`predecessor`]) and forwards on them before it retires the standby. A queue is detached —
//! and what it holds dropped — only when its last descriptor closes, steering never has to move
//! a flow, and a socket's receive buffer lives as long as the socket: no hand-over loses what is
//! queued, a dead agent's queues and sockets are read on by the standby (what arrived while
//! nobody read is forwarded late, not lost), and no tunnel packet is read by both.
//!
//! * **Planned stop** (SIGTERM/SIGINT): the agent asks the standby to take over ([`Standby::take_over`])
//!   and keeps forwarding until it answers that it forwards; then it hands the device over
//!   ([`HAND_OVER_DRAIN`]: it stops writing decapsulated packets into TUN, which the standby
//!   does from then on) and stops. Nothing is dropped. The standby hands over to the next agent
//!   the same way.
//! * **Crash or `kill -9`**: the standby sees the agent die ([`super::death`]: a lock a thread of
//!   the agent holds is released as soon as that thread exits, long before the kernel has torn
//!   the rest down) or, failing that, its connection to the agent close ([`Lifeline`]), and takes
//!   over at once on the agent's queues and sockets; what the dead agent had read but not yet
//!   sent is lost.
//!
//! Taking over is starting a [`TunPlane`] on the persistent device: it adopts the forwarding
//! table from the kernel records (see [`super::tun`]), as the agent did — read at that moment,
//! as the agent changes them while it runs. Everything else is done while the standby waits
//! ([`prepare`]): the device adopted and configured, its own queues opened (detached at once:
//! the kernel steers nothing to them) to carry the agent's, the workers' threads and runtimes
//! started; taking over is then reading the records and putting the agent's queues behind its
//! own — about a millisecond (starting it all took 5–20 ms on a busy two-core host). Without
//! the agent's descriptors (an agent of an older version) it attaches its own queues, opens its
//! own sockets, and the kernel steers flows to its queues by hash.
//!
//! The next agent finds the standby over an abstract Unix socket named after the device (per
//! network namespace); the standby answers only processes of its own user. A standby that no agent retires stops after the hold time
//! (`--standby-hold`): the device and its routes stay; packets into it are then dropped until an
//! agent runs again.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use victor_dataplane::forwarder::{self, HandedOn};

use super::DataplaneConfig;
use super::tun::{Takeover, TunPlane};
use crate::netlink::Kernel;

/// The environment variable that makes `victor-fe-agent` a standby: the number of its
/// descriptor to the agent.
pub const STANDBY_FD: &str = "VICTOR_FE_AGENT_STANDBY_FD";

/// The environment variable with the standby's descriptor of the agent's death lock
/// ([`super::death`]), if the agent made one.
const DEATH_FD: &str = "VICTOR_FE_AGENT_STANDBY_DEATH_FD";

/// Agent → standby: take over now (planned stop).
const TAKE_OVER: u8 = b'T';
/// Standby → agent: forwarding.
const FORWARDING: u8 = b'F';
/// Standby → agent: cannot take over (the agent keeps forwarding as long as it can).
const FAILED: u8 = b'X';
/// Next agent → standby: stop, I forward.
const RETIRE: u8 = b'R';
/// Standby → next agent: stopped.
const RETIRED: u8 = b'D';
/// Agent → standby, right after starting it, and standby → next agent when asked ([`ASK`]): the
/// forwarder's TUN queues and underlay sockets follow (`SCM_RIGHTS`, [`HandedOn::into_fds`]).
const HANDED: u8 = b'H';
/// Next agent → standby: hand me your queues and sockets ([`HANDED`]).
const ASK: u8 = b'Q';

/// How long a forwarder that hands the device over ([`victor_dataplane::forwarder::HandOver`]) keeps
/// reading its TUN queues after the other forwards: the agent on a planned stop, the standby
/// when the next agent retires it. When the other took its queues over they share them and this
/// is only a grace period; when it could not (an older version), the kernel moves each two-way
/// flow to the other's queues within one round trip of it (200 ms covers a 10 ms ping and TCP's
/// delayed ACKs).
pub const HAND_OVER_DRAIN: Duration = Duration::from_millis(200);

/// The abstract socket the standby of device `tun` listens on.
fn address(tun: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("victor-fe-agent/standby/{tun}"))
}

/// The agent's handle on its standby.
#[derive(Debug)]
pub struct Standby {
    child: Child,
    control: tokio::net::UnixStream,
}

/// The connection between the agent and its standby. The agent's end is its highest descriptor:
/// the kernel releases a dying process's files last-numbered first, so the standby learns the
/// agent is gone before the rest is released — some of it (the ARP capture's packet sockets)
/// takes an RCU grace period each, tens of milliseconds on a busy host.
#[derive(Debug)]
pub struct Lifeline {
    ours: UnixStream,
    theirs: UnixStream,
    /// The agent's death lock, if it could be made (else the standby waits for the connection
    /// to close).
    death: Option<OwnedFd>,
}

impl Lifeline {
    /// A new connection, and the death lock of this process.
    pub fn new() -> io::Result<Lifeline> {
        let (ours, theirs) = UnixStream::pair()?;
        let death = match super::death::Held::new().and_then(|held| above(held.fd(), 64)) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "no death lock for the standby: it learns of a crash when our descriptors close");
                None
            }
        };
        Ok(Lifeline { ours: to_top(ours), theirs, death })
    }
}

/// A duplicate of `fd` numbered `min` or more (close-on-exec).
fn above(fd: &OwnedFd, min: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own into a fresh one.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `stream` moved to the highest descriptor number this process may use (at most 4095: the
/// descriptor table grows to it), or left where it is if that fails.
fn to_top(stream: UnixStream) -> UnixStream {
    // SAFETY: getrlimit writes the struct it is given.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return stream;
    }
    let top = limit.rlim_cur.clamp(64, 4096) as libc::c_int - 1;
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own into a fresh one.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    if fd < 0 {
        return stream;
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Standby {
    /// Starts the standby on `lifeline`: this program with this command line and environment,
    /// plus [`STANDBY_FD`]; then passes it `handed`, the forwarder's TUN queues and underlay
    /// sockets to take over on.
    pub fn spawn(lifeline: Lifeline, handed: HandedOn) -> io::Result<Standby> {
        let Lifeline { ours, theirs, death } = lifeline;
        let fd = theirs.as_raw_fd();
        // At 64 or above (see `Lifeline::new`): neither moving it to 4 nor the connection to 3
        // overwrites the other.
        let death_fd = death.as_ref().map(AsRawFd::as_raw_fd);
        let mut cmd = Command::new("/proc/self/exe");
        // Its own process group: what kills the agent's group (a supervisor, a terminal) must
        // not take the standby along — it is there for when the agent is gone.
        cmd.args(std::env::args_os().skip(1)).env(STANDBY_FD, "3").stdin(Stdio::null()).process_group(0);
        if death_fd.is_some() {
            cmd.env(DEATH_FD, "4");
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let rc = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(death) = death_fd
                    && libc::dup2(death, 4) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        drop(death);
        // A fresh socket pair: the message waits in its buffer until the standby reads it.
        send_with_fds(ours.as_fd(), HANDED, &handed.into_fds())?;
        ours.set_nonblocking(true)?;
        Ok(Standby { child, control: tokio::net::UnixStream::from_std(ours)? })
    }

    /// The standby's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Planned stop: asks the standby to take over and waits until it forwards.
    pub async fn take_over(&mut self, timeout: Duration) -> io::Result<()> {
        self.control.write_all(&[TAKE_OVER]).await?;
        let mut answer = [0u8; 1];
        match tokio::time::timeout(timeout, self.control.read(&mut answer)).await {
            Ok(Ok(1)) if answer[0] == FORWARDING => Ok(()),
            Ok(Ok(_)) => Err(io::Error::other("the standby could not take over")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the standby did not take over in time")),
        }
    }

    /// Stops the standby for good (decommissioning): kills it (it would otherwise take over).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the next agent waits for the standby's queues and sockets ([`predecessor`]).
const PREDECESSOR_WAIT: Duration = Duration::from_secs(15);

/// The standby a previous agent left, connected ([`predecessor`], [`retire`]).
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
}

/// Connects to the standby of device `tun`; `None` when there is none.
fn connect(tun: &str) -> io::Result<Option<UnixStream>> {
    match UnixStream::connect_addr(&address(tun)?) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(None),
        Err(e) => Err(e),
    }
}

/// Asks the standby a previous agent left for device `tun` for its TUN queues and sockets, to
/// forward on ([`victor_dataplane::forwarder::Forwarder::start_on`]); `None` when there is none,
/// or it does not hand them on (an older version: retire it with [`retire`]).
pub async fn predecessor(tun: &str) -> io::Result<Option<(Predecessor, HandedOn)>> {
    let tun = tun.to_owned();
    tokio::task::spawn_blocking(move || {
        let Some(stream) = connect(&tun)? else { return Ok(None) };
        // A standby that is still taking over (reading a million records after a crash takes
        // seconds) answers once it forwards; giving up early would start us on our own queues.
        stream.set_read_timeout(Some(PREDECESSOR_WAIT))?;
        send_with_fds(stream.as_fd(), ASK, &[])?;
        match recv_with_fds(stream.as_fd()) {
            Ok((HANDED, fds)) => Ok(Some((Predecessor { stream }, HandedOn::from_fds(fds)))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(io::Error::other)?
}

impl Predecessor {
    /// Retires it (this agent forwards now): returns once it stopped forwarding (or is gone).
    pub async fn retire(self, timeout: Duration) -> io::Result<()> {
        let Predecessor { stream } = self;
        tokio::task::spawn_blocking(move || {
            stream.set_read_timeout(Some(timeout))?;
            send_with_fds(stream.as_fd(), RETIRE, &[])?;
            match recv_with_fds(stream.as_fd()) {
                Ok((RETIRED, _)) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
                Ok((other, _)) => Err(io::Error::other(format!("the standby answered {:?} to retire", other as char))),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "the standby did not stop in time"))
                }
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Sends the byte `tag` with `fds` attached (`SCM_RIGHTS`) on the Unix stream socket `sock`.
fn send_with_fds(sock: BorrowedFd<'_>, tag: u8, fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&[tag])], cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent == 1 { Ok(()) } else { Err(io::Error::new(io::ErrorKind::WriteZero, "nothing sent")) }
}

/// Receives one byte and the descriptors sent with it ([`send_with_fds`]; at most
/// three per [`forwarder::MAX_QUEUES`]: a queue and two sockets per worker).
fn recv_with_fds(sock: BorrowedFd<'_>) -> io::Result<(u8, Vec<OwnedFd>)> {
    let mut tag = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut tag)];
    let mut space = nix::cmsg_space!([RawFd; 3 * forwarder::MAX_QUEUES]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: descriptors the kernel just installed for us; nobody else owns them.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "more descriptors than three per queue"));
    }
    match msg.bytes {
        0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other end closed")),
        _ => Ok((tag[0], fds)),
    }
}

/// Retires the standby a previous agent left for device `tun` (this agent forwards now): returns
/// once it stopped forwarding. False when there was none.
pub async fn retire(tun: &str, timeout: Duration) -> io::Result<bool> {
    let tun = tun.to_owned();
    let stream = tokio::task::spawn_blocking(move || connect(&tun)).await.map_err(io::Error::other)??;
    let Some(stream) = stream else { return Ok(false) };
    Predecessor { stream }.retire(timeout).await?;
    Ok(true)
}

/// Why the standby ended.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    /// Its socket or descriptor failed.
    #[error("standby: {0}")]
    Io(#[from] io::Error),
    /// The forwarder could not start.
    #[error("standby: {0}")]
    Start(#[from] super::tun::TunError),
}

/// Runs as the standby of the agent connected through descriptor `fd`: waits for the agent to
/// go, forwards until the next agent retires it or `hold` passes, then returns.
pub async fn run(fd: RawFd, config: &DataplaneConfig, kernel: &Kernel, hold: Duration) -> Result<(), StandbyError> {
    // SAFETY: the agent passed this descriptor to us for our exclusive use.
    let control = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // The agent's TUN queues and sockets: we forward on them when we take over (module doc).
    control.set_read_timeout(Some(Duration::from_secs(5)))?;
    let handed = match recv_with_fds(control.as_fd()) {
        Ok((HANDED, fds)) => HandedOn::from_fds(fds),
        Ok((other, _)) => {
            tracing::warn!(tun = %config.device, order = ?(other as char), "the agent handed nothing on: taking over on our own");
            HandedOn::default()
        }
        Err(e) => {
            tracing::warn!(tun = %config.device, error = %e, "nothing handed on by the agent: taking over on our own");
            HandedOn::default()
        }
    };
    control.set_read_timeout(None)?;
    control.set_nonblocking(true)?;
    let mut control = tokio::net::UnixStream::from_std(control)?;
    let prepared = prepare(config);
    tracing::info!(tun = %config.device, workers = handed.workers(), "standby forwarder waiting for the agent to stop");
    let died = watch_death();
    let mut order = [0u8; 1];
    let planned = tokio::select! {
        read = control.read(&mut order) => matches!(read, Ok(1) if order[0] == TAKE_OVER),
        Ok(()) = died => {
            tracing::info!(tun = %config.device, "the agent died (its death lock was released)");
            false
        }
    };
    let since = std::time::Instant::now();
    // Found by the next agent from now on (the standby of the previous run, if it is still
    // letting go of the name, was retired by our agent).
    let listener = bind(&config.device).await?;
    let plane = match TunPlane::start(config, kernel, Takeover { handed, prepared }).await {
        Ok(plane) => plane,
        Err(e) => {
            let _ = control.write_all(&[FAILED]).await;
            return Err(e.into());
        }
    };
    if planned {
        let _ = control.write_all(&[FORWARDING]).await;
    }
    tracing::info!(
        tun = %config.device,
        planned,
        hold = ?hold,
        took_ms = since.elapsed().as_secs_f64() * 1e3,
        adoption = ?plane.adoption(),
        "standby forwarder took over from the agent"
    );
    let deadline = tokio::time::Instant::now() + hold;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut next, _) = accepted?;
                // Anyone in the namespace can connect to an abstract socket: only a process of
                // our user (the next agent) may stop us or have the device's queues and sockets.
                match next.peer_cred() {
                    Ok(cred) if cred.uid() == nix::unistd::geteuid().as_raw() => {}
                    Ok(cred) => {
                        tracing::warn!(tun = %config.device, uid = cred.uid(), pid = ?cred.pid(), "refused a connection from another user");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(tun = %config.device, error = %e, "refused a connection whose user is unknown");
                        continue;
                    }
                }
                let mut order = [0u8; 1];
                let mut read = tokio::time::timeout(Duration::from_secs(1), next.read(&mut order)).await;
                if matches!(read, Ok(Ok(1)) if order[0] == ASK) {
                    // The next agent starts on our queues and sockets, then retires us on this connection
                    // (reading its records may take seconds with a million bindings).
                    let sent = plane
                        .handed_on()
                        .and_then(|handed| send_with_fds(next.as_fd(), HANDED, &handed.into_fds()));
                    if let Err(e) = sent {
                        tracing::warn!(tun = %config.device, error = %e, "could not hand our TUN queues and sockets to the next agent");
                        continue;
                    }
                    read = tokio::time::timeout(Duration::from_secs(120), next.read(&mut order)).await;
                }
                if matches!(read, Ok(Ok(1)) if order[0] == RETIRE) {
                    // The next agent forwards (on our queues: closing ours drops nothing; an
                    // agent of an older version on its own, to which the drain moves the flows).
                    plane.hand_over_handle().start();
                    tokio::time::sleep(HAND_OVER_DRAIN).await;
                    drop(plane);
                    let _ = next.write_all(&[RETIRED]).await;
                    tracing::info!(tun = %config.device, "the next agent forwards: standby stopped");
                    return Ok(());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(tun = %config.device, "no agent took over from the standby: stopped (the device stays)");
                return Ok(());
            }
        }
    }
}

/// Resolves when the agent's death lock ([`super::death`], descriptor [`DEATH_FD`]) tells the agent
/// died; never if there is none or the watch fails.
fn watch_death() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let Some(fd) = std::env::var(DEATH_FD).ok().and_then(|v| v.parse::<RawFd>().ok()) else { return rx };
    // SAFETY: the agent passed this descriptor to us for our exclusive use.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let watch = match super::death::Watch::new(fd) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the agent's death lock: waiting for its descriptors to close");
            return rx;
        }
    };
    let spawned = std::thread::Builder::new().name("death-watch".into()).spawn(move || {
        if watch.wait() {
            let _ = tx.send(());
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the agent's death lock: waiting for its descriptors to close");
    }
    rx
}

/// Prepares the forwarder the take-over starts ([`super::tun::prepare`]): the device's queues
/// open but detached, the workers' threads running, so that taking over is reading the records,
/// putting the agent's queues behind ours and opening the underlay sockets. If the preparation
/// fails, the take-over opens its own.
fn prepare(config: &DataplaneConfig) -> Option<forwarder::Prepared> {
    match super::tun::prepare(config) {
        Ok(prepared) => {
            tracing::info!(tun = %config.device, "standby forwarder prepared (queues detached)");
            Some(prepared)
        }
        Err(e) => {
            tracing::warn!(tun = %config.device, error = %e, "could not prepare the standby forwarder: it will open its own on taking over");
            None
        }
    }
}

/// Binds the standby's socket; the standby of the previous run may still be letting go of it.
async fn bind(tun: &str) -> io::Result<tokio::net::UnixListener> {
    let mut tries = 0;
    loop {
        match UnixListener::bind_addr(&address(tun)?) {
            Ok(l) => {
                l.set_nonblocking(true)?;
                return tokio::net::UnixListener::from_std(l);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
