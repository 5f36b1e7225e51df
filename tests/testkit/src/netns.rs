//! Network namespaces and veth links for tests, released on drop (also when a test panics).
//!
//! * [`NetNs`] — a named namespace (`ip netns add`, name from [`crate::unique_name`]) with its
//!   loopback up. Dropping it deletes the namespace, which destroys every link inside it (a veth
//!   pair dies with either end). Commands run inside it with [`NetNs::exec`] / [`NetNs::ip`] /
//!   [`NetNs::spawn`]; Rust code runs inside it on a dedicated thread that `setns`es into it
//!   ([`NetNs::run_in`], [`NetNs::spawn_thread`], [`NetNs::block_on`]): sockets and TUN devices
//!   created on that thread belong to the namespace for their whole life.
//! * [`Veth`] — a veth pair between two namespaces, or between a namespace and the root
//!   namespace; only a root-namespace end needs deleting, which its drop does.
//!
//! Processes started inside a namespace are [`ChildGuard`]s and die with their guard; the
//! namespace itself is not in charge of them. Keep guards and threads declared *after* the
//! namespaces they use, so they are dropped (killed, joined) first.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::process::ChildGuard;

/// Runs `ip <args>` (in the root namespace), failing with its stderr.
fn run_ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Runs a prepared command, failing with its stderr (and the command line) on a non-zero exit.
fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// A network namespace owned by the test; deleted on drop (unless made persistent).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    persistent: bool,
}

impl NetNs {
    /// Creates a namespace named `prefix` + a unique suffix (keep `prefix` short, ≤ 8 bytes) and
    /// brings its loopback up.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::named(&crate::unique_name(prefix))
    }

    /// Creates a namespace with exactly this name (fails if it exists) and brings loopback up.
    pub fn named(name: &str) -> Result<Self> {
        crate::require_root("creating a network namespace");
        run_ip(&["netns", "add", name])?;
        let ns = NetNs { name: name.to_owned(), persistent: false };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Takes ownership of an existing namespace (e.g. to delete one a crashed run left behind).
    pub fn adopt(name: &str) -> Self {
        NetNs { name: name.to_owned(), persistent: false }
    }

    /// Keeps the namespace after this value is dropped (a lab left running by `victor-lab up`;
    /// whoever made it persistent must record its name to delete it later).
    pub fn make_persistent(&mut self) {
        self.persistent = true;
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace's bind mount, `/run/netns/<name>`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A `Command` that runs `program` inside the namespace (`ip netns exec <ns> program`), to be
    /// completed with arguments by the caller.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output; a non-zero exit is an error
    /// carrying the command's stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("exec: empty argv")?;
        run(self.command(program).args(args))
    }

    /// Runs `ip -n <ns> <args>` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = run_ip(&full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds `cidr` (e.g. `10.0.0.1/24`) to `dev`.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// Sets `dev` up.
    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// Sets the MTU of `dev`.
    pub fn set_mtu(&self, dev: &str, mtu: u32) -> Result<()> {
        self.ip(&["link", "set", dev, "mtu", &mtu.to_string()]).map(drop)
    }

    /// `ip route replace <route...>`, e.g. `["10.10.0.0/16", "dev", "tun0"]`.
    pub fn route(&self, route: &[&str]) -> Result<()> {
        let mut args = vec!["route", "replace"];
        args.extend_from_slice(route);
        self.ip(&args).map(drop)
    }

    /// Writes a sysctl inside the namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]).map(drop)
    }

    /// Turns on IPv4 forwarding (an FE is a router).
    pub fn enable_forwarding(&self) -> Result<()> {
        self.sysctl("net.ipv4.ip_forward", "1")
    }

    /// Spawns `argv` inside the namespace as a [`ChildGuard`] (killed on drop), logging to
    /// `log_path` if given.
    pub fn spawn(&self, name: &str, argv: &[&str], log_path: Option<&std::path::Path>) -> Result<ChildGuard> {
        let (program, args) = argv.split_first().context("spawn: empty argv")?;
        let mut cmd = self.command(program);
        cmd.args(args);
        ChildGuard::spawn(name, cmd, log_path)
    }

    /// Moves the *calling* thread into this namespace. Prefer [`NetNs::run_in`] or
    /// [`NetNs::spawn_thread`]: a thread pool or the test's main thread must never be moved.
    pub fn enter_current_thread(&self) -> Result<()> {
        let file = File::open(self.path()).with_context(|| format!("open namespace {}", self.path()))?;
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {}", self.name))?;
        Ok(())
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result (a panic in `f` is
    /// re-raised here). Everything `f` creates (sockets, TUN devices, threads it spawns) belongs
    /// to the namespace.
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("ns-{}", self.name))
                .spawn_scoped(scope, || -> Result<R> {
                    self.enter_current_thread()?;
                    Ok(f())
                })
                .context("spawn namespace thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts a long-running thread inside the namespace. Returns once the thread is inside
    /// (a `setns` failure is returned here, not inside the thread). Join the handle before the
    /// namespace is dropped.
    pub fn spawn_thread<F, R>(&self, name: &str, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        let ns_name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let entered = File::open(&path).with_context(|| format!("open namespace {path}")).and_then(|file| {
                    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {ns_name}"))
                });
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                // The caller gets the error; `f` must never run outside the namespace.
                assert!(ok, "thread could not enter namespace {path}");
                f()
            })
            .context("spawn namespace thread")?;
        rx.recv().context("namespace thread died before entering")??;
        Ok(handle)
    }

    /// Runs the future built by `make` to completion on a tokio current-thread runtime inside the
    /// namespace (on a dedicated thread).
    pub fn block_on<M, Fut>(&self, make: M) -> Result<Fut::Output>
    where
        M: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.run_in(|| -> Result<Fut::Output> {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().context("build tokio runtime")?;
            Ok(rt.block_on(make()))
        })?
    }

    /// Names of the links in the namespace (for assertions and debugging).
    pub fn links(&self) -> Result<Vec<String>> {
        Ok(link_names(&self.ip(&["-o", "link", "show"])?))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        kill_strays(&self.name);
        if let Err(err) = run_ip(&["netns", "delete", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {err:#}", self.name);
        }
    }
}

/// Kills the processes still inside namespace `name` when it goes. They are the test's own
/// (nobody else runs in a namespace a test created) and outlived their guards, which are dropped
/// before their namespace: an agent's standby forwarder, for one, runs in its own process group
/// and holds on for `--standby-hold` after its agent stopped. Each is signalled through a pidfd
/// opened while it was seen inside, so a recycled PID is never hit; this process is never one.
fn kill_strays(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else { return };
    let ours = std::process::id();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        if pid == ours {
            continue;
        }
        // SAFETY: plain syscalls on a PID and the descriptor they return, closed here.
        unsafe {
            let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as libc::c_int;
            if fd < 0 {
                continue; // already gone
            }
            // The PID may have been recycled since `ip` listed it: signal only what is inside now.
            let inside = |path: String| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
            if inside(format!("/proc/{pid}/ns/net")).is_none()
                || inside(format!("/proc/{pid}/ns/net")) != inside(format!("/run/netns/{name}"))
            {
                libc::close(fd);
                continue;
            }
            if libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0)
                == 0
            {
                let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                libc::poll(&mut poll, 1, 2000); // readable once it has exited
            }
            libc::close(fd);
        }
        eprintln!("netns {name}: killed stray process {pid} (still inside when the namespace went)");
    }
}

/// Extracts interface names from `ip -o link show` output (`3: veth0@if2: <...>`).
fn link_names(ip_o_link: &str) -> Vec<String> {
    ip_o_link
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// One end of a veth pair: a namespace we own, or the root namespace (`None`).
#[derive(Debug, Clone)]
struct End {
    ns: Option<String>,
    name: String,
}

impl End {
    fn ip_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = Vec::with_capacity(args.len() + 2);
        if let Some(ns) = &self.ns {
            full.extend_from_slice(&["-n", ns.as_str()]);
        }
        full.extend_from_slice(args);
        full
    }
}

/// A veth pair. Ends inside our namespaces die with them; an end in the root namespace is
/// deleted on drop (which also destroys its peer).
#[derive(Debug)]
pub struct Veth {
    a: End,
    b: End,
}

impl Veth {
    /// Creates `name_a` in `ns_a` paired with `name_b` in `ns_b` (names need only be unique
    /// inside their namespace), both set up.
    pub fn create(ns_a: &NetNs, name_a: &str, ns_b: &NetNs, name_b: &str) -> Result<Self> {
        Self::create_ends(
            End { ns: Some(ns_a.name.clone()), name: name_a.to_owned() },
            End { ns: Some(ns_b.name.clone()), name: name_b.to_owned() },
        )
    }

    /// Creates `name_in_ns` in `ns` paired with a root-namespace link named by
    /// [`crate::unique_name`]`(root_prefix)` (see [`Veth::name_b`]); deleted on drop.
    pub fn create_to_root(ns: &NetNs, name_in_ns: &str, root_prefix: &str) -> Result<Self> {
        Self::create_ends(
            End { ns: Some(ns.name.clone()), name: name_in_ns.to_owned() },
            End { ns: None, name: crate::unique_name(root_prefix) },
        )
    }

    fn create_ends(a: End, b: End) -> Result<Self> {
        // `ip -n X link add` puts a peer without `netns` into X, so a root-namespace end must be
        // the one created first.
        let (first, second) = if b.ns.is_none() { (&b, &a) } else { (&a, &b) };
        let mut add = vec!["link", "add", first.name.as_str(), "type", "veth"];
        add.extend_from_slice(&["peer", "name", second.name.as_str()]);
        if let Some(ns) = &second.ns {
            add.extend_from_slice(&["netns", ns.as_str()]);
        }
        run_ip(&first.ip_args(&add))?;
        // From here on the pair exists: the guard cleans a root-namespace end if `up` fails.
        let veth = Veth { a, b };
        for end in [&veth.a, &veth.b] {
            run_ip(&end.ip_args(&["link", "set", end.name.as_str(), "up"]))?;
        }
        Ok(veth)
    }

    /// Name of the first end.
    pub fn name_a(&self) -> &str {
        &self.a.name
    }

    /// Name of the second end.
    pub fn name_b(&self) -> &str {
        &self.b.name
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for end in [&self.a, &self.b] {
            if end.ns.is_none() {
                // Deleting one end destroys the pair; "Cannot find device" after the namespace
                // went first is fine.
                let _ = run_ip(&["link", "del", end.name.as_str()]);
            }
        }
    }
}

/// Names of all namespaces (`ip netns list`), for leak checks.
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = run_ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Names of the links in the root namespace, for leak checks.
pub fn root_links() -> Result<Vec<String>> {
    let out = run_ip(&["-o", "link", "show"])?;
    Ok(link_names(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_link_names() {
        let out = "1: lo: <LOOPBACK,UP> mtu 65536\n5: veth0@if4: <BROADCAST> mtu 1500\n";
        assert_eq!(link_names(out), vec!["lo", "veth0"]);
    }

    #[test]
    fn namespace_link_and_thread_work_and_vanish_on_drop() {
        crate::require_root("netns test");
        let a = NetNs::new("tka").unwrap();
        let b = NetNs::new("tkb").unwrap();
        let veth = Veth::create(&a, "va", &b, "vb").unwrap();
        a.add_addr("va", "192.0.2.1/30").unwrap();
        b.add_addr("vb", "192.0.2.2/30").unwrap();
        assert!(a.links().unwrap().contains(&"va".to_owned()));

        // Rust code inside `a` sees `va`, and a socket bound there reaches `b` over the veth.
        let listener = b.run_in(|| std::net::TcpListener::bind("192.0.2.2:0").unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let connected = a.run_in(move || std::net::TcpStream::connect(("192.0.2.2", port)).is_ok()).unwrap();
        assert!(connected, "TCP over the veth between namespaces");
        assert!(
            std::net::TcpStream::connect(("192.0.2.2", port)).is_err(),
            "the root namespace must not reach the test namespace"
        );
        let in_ns = a.block_on(|| async { 7 }).unwrap();
        assert_eq!(in_ns, 7);
        let err = a.exec(&["ip", "link", "show", "nonexistent0"]).unwrap_err();
        assert!(format!("{err:#}").contains("nonexistent0"), "{err:#}");

        let names = (a.name().to_owned(), b.name().to_owned());
        drop(listener);
        drop(veth);
        drop(a);
        drop(b);
        let left = list_namespaces().unwrap();
        assert!(!left.contains(&names.0) && !left.contains(&names.1), "{left:?}");
    }

    /// A process that escaped its guard (its own session, like an agent's standby forwarder)
    /// does not outlive the namespace it runs in.
    #[test]
    fn a_process_left_inside_goes_with_the_namespace() {
        crate::require_root("netns test");
        let ns = NetNs::new("tks").unwrap();
        let pid_file = tempfile::NamedTempFile::new().unwrap();
        let script = format!("setsid sleep 60 & echo $! > {}", pid_file.path().display());
        let status = Command::new("ip").args(["netns", "exec", ns.name(), "sh", "-c", &script]).status().unwrap();
        assert!(status.success());
        let pid: u32 = std::fs::read_to_string(pid_file.path()).unwrap().trim().parse().unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the stray runs");
        drop(ns);
        let gone = |p: u32| std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |s| s.contains(") Z "));
        assert!(gone(pid), "process {pid} outlived its namespace");
    }

    #[test]
    fn a_panicking_test_leaves_nothing_behind() {
        crate::require_root("netns test");
        let (tx, rx) = std::sync::mpsc::channel();
        let result = std::panic::catch_unwind(move || {
            let a = NetNs::new("tkp").unwrap();
            let b = NetNs::new("tkq").unwrap();
            let _pair = Veth::create(&a, "x0", &b, "x1").unwrap();
            let root = Veth::create_to_root(&a, "up0", "tkr").unwrap();
            let _child = a.spawn("sleeper", &["sleep", "30"], None).unwrap();
            tx.send((a.name().to_owned(), b.name().to_owned(), root.name_b().to_owned())).unwrap();
            panic!("deliberate failure");
        });
        assert!(result.is_err());
        let (a, b, root) = rx.recv().unwrap();
        let namespaces = list_namespaces().unwrap();
        assert!(!namespaces.contains(&a) && !namespaces.contains(&b), "{namespaces:?}");
        let links = root_links().unwrap();
        assert!(!links.contains(&root), "{root} left in {links:?}");
    }
}
