//! Wiring: checks the host, starts the data plane, reads back what a previous run programmed,
//! then runs the tasks — controller link, reporter, ARP capture, port watcher, move-hint socket,
//! admin HTTP and the engine that owns the state — until SIGINT/SIGTERM or a fatal error. Kernel
//! state (the data plane's devices, routes and records included) is left in place on exit: a
//! restarted agent adopts it (no flush); `--remove-dataplane-on-exit` removes it instead.
//!
//! Started with [`standby::STANDBY_FD`] set (by an agent of the userspace data plane), the
//! process is that agent's standby forwarder instead ([`standby::run`]).
//!
//! [`run`] reads as its phases: `check_host`, `start_dataplane` (and the standby),
//! `adopt_previous_run`, `start_link`, `start_admin`, `start_hints`, the engine, then
//! `wait_for_exit`. Under systemd it also reports readiness and pings the watchdog
//! ([`crate::service`]).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use victor_daemon::systemd::{Liveness, Service};
use victor_proto::v1::RegisterRequest;

use crate::advertise::health::DeviceProbe;
use crate::advertise::{Advertiser, HealthInputs};
use crate::config::Config;
use crate::engine::{Engine, Inputs, Parts};
use crate::events::EventLog;
use crate::forwarding::kernel::counters::KernelCounters;
use crate::forwarding::standby::{self, Lifeline, Standby};
use crate::forwarding::{self, Backend, Choice, Dataplane, DataplaneConfig};
use crate::hint::Hints;
use crate::hint::io::{HintSocket, Limits, Received};
use crate::link::connector::{Connector, SocketFactory};
use crate::link::feed::{EngineFeed, LinkEvent};
use crate::link::reporter::{self, Answered, Reporter};
use crate::link::{self, LinkConfig, LinkControl};
use crate::metrics::{ChoiceLabel, KindLabel, Metrics};
use crate::neigh::{self, Captures, NeighPorts};
use crate::netlink::Kernel;
use crate::ports::{self, PortTable};
use crate::readiness::Readiness;
use crate::reconcile::Reconciler;
use crate::reconcile::effects::Host;
use crate::service::AgentChecks;
use crate::state::local::Timers;

/// The agent's tasks: any of them ending ends the agent.
type Tasks = JoinSet<Result<()>>;

/// Runs the agent until a signal or a fatal error.
pub async fn run(config: Config) -> Result<()> {
    let standby_fd = std::env::var(standby::STANDBY_FD).ok().and_then(|v| v.parse().ok());
    let lifeline = match standby_fd {
        None => Some(Lifeline::new().context("socket pair for the standby forwarder")?),
        Some(_) => None,
    };
    let metrics = Arc::new(Metrics::new());
    let kernel = Kernel::connect(config.route_protocol).context("open a netlink socket (needs CAP_NET_ADMIN)")?;
    let underlay_mtu = check_host(&config, &kernel).await?;
    if let Some(fd) = standby_fd {
        let dp_config = dataplane_config(&config, underlay_mtu);
        return Ok(standby::run(fd, &dp_config, &kernel, config.standby_hold).await?);
    }
    let (dataplane, choice) = start_dataplane(&config, &kernel, underlay_mtu, &metrics).await?;
    // The userspace data plane's standby forwards while this agent is not running.
    let mut standby = match (choice.backend, lifeline) {
        (Backend::Tun, Some(lifeline)) => match dataplane.handed_on().and_then(|h| Standby::spawn(lifeline, h)) {
            Ok(s) => {
                tracing::info!(pid = s.pid(), "standby forwarder started");
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not start the standby forwarder: a restart will interrupt forwarding");
                None
            }
        },
        _ => None,
    };
    let kernel_counters = dataplane.kernel_counters();
    let hand_over = dataplane.hand_over_handle();
    let ports = Arc::new(PortTable::new(vm_port_matcher(&config), config.gateway_mac.map(|m| m.octets())));
    let reconciler = adopt_previous_run(&kernel, dataplane, &ports, &metrics).await?;

    let mut tasks = Tasks::new();
    let resume = Arc::new(AtomicU64::new(0));
    let link = start_link(&config, &mut tasks, resume.clone(), &metrics)?;
    // The port watcher; the engine opens an ARP capture on each VM port it announces.
    let (port_tx, port_rx) = mpsc::channel(64);
    {
        let (ports, kernel) = (ports.clone(), kernel.clone());
        tasks.spawn(async move { ports::watch(ports, kernel, port_tx).await.context("link watcher") });
    }
    let readiness = Arc::new(Readiness::new(config.headless_grace.as_nanos() as u64));
    let service_readiness = readiness.clone();
    readiness.set_dataplane(choice.describe());
    let events = Arc::new(Mutex::new(EventLog::new(8192)));
    // The advertiser announces the mobile prefixes while this FE is healthy (readiness and the
    // data-plane device), and withdraws them before the agent exits.
    let advertiser = config.advertise().map(|bgp| {
        tracing::info!(peers = ?bgp.peers, local_as = bgp.local_as, peer_as = bgp.peer_as, "BGP advertiser enabled");
        let device = DeviceProbe::new(kernel.handle().clone(), config.tun_name.clone());
        Advertiser::spawn(bgp, HealthInputs { readiness: readiness.clone(), device }, metrics.clone())
    });
    start_admin(&config, &mut tasks, &metrics, &readiness, &events, kernel_counters).await?;
    let (hints, hint_rx) = start_hints(&config, &mut tasks, &metrics, &events)?;

    let (neigh_tx, neigh_rx) = mpsc::channel(4096);
    let captures = Arc::new(Captures::default());
    metrics.attach_captures(captures.clone());
    let engine = Engine::new(Parts {
        fe_id: config.fe_id.clone(),
        timers: Timers {
            probe_after: config.arp_probe_after.as_nanos() as u64,
            probe_interval: config.arp_probe_interval.as_nanos() as u64,
            probe_count: config.arp_probe_count,
            reject_hold: 30_000_000_000,
        },
        reconciler,
        scope: neigh::arp::Scope { prefixes: config.mobile_prefixes.clone(), gateways: config.gateways_v4() },
        scope6: neigh::ndp::Scope { prefixes: config.mobile_prefixes6.clone(), gateways: config.gateways_v6() },
        ports,
        neigh: NeighPorts::new(
            captures,
            neigh_tx,
            (config.arp_rate, config.arp_burst),
            metrics.clone(),
            config.clock(),
        ),
        reporter: link.reporter,
        link: link.control,
        resume,
        events,
        metrics,
        readiness,
        hints,
        clock: config.clock(),
    });
    let inputs = Inputs { link: link.events, answers: link.answers, neigh: neigh_rx, ports: port_rx, hints: hint_rx };
    // Under systemd: READY=1 once synced, watchdog pings while the engine runs (see `service`).
    let (engine_run, engine_alive) = Liveness::track(engine.run(inputs));
    let service = Service::start(AgentChecks { readiness: service_readiness, engine: engine_alive });
    tasks.spawn(async move {
        engine_run.await;
        bail!("the agent engine stopped")
    });
    tracing::info!(fe_id = %config.fe_id, underlay = %config.underlay_addr, underlay_mtu, "agent running");

    let outcome = wait_for_exit(&mut tasks).await;
    service.stopping();
    if let Some(advertiser) = advertiser {
        // A clean stop keeps forwarding (the tasks still run) while the routers move away.
        let drain = if outcome.is_ok() { config.bgp_shutdown_drain } else { std::time::Duration::ZERO };
        advertiser.shutdown(drain).await;
    }
    // The engine (and with it the data plane's forwarder) stops here; what the data plane keeps
    // in the kernel stays for the next run unless the FE is being decommissioned. On a planned
    // stop the standby forwards before we stop; after an error it takes over when we are gone.
    let decommission = outcome.is_ok() && config.remove_dataplane_on_exit;
    match standby.take() {
        Some(standby) if decommission => standby.kill(),
        Some(mut standby) if outcome.is_ok() => match standby.take_over(Duration::from_secs(5)).await {
            Ok(()) => {
                // Drain: the standby writes every tunnel packet into TUN from now on, so the
                // kernel moves each flow to its queues; ours are empty when they close.
                if let Some(hand_over) = &hand_over {
                    hand_over.start();
                    tokio::time::sleep(standby::HAND_OVER_DRAIN).await;
                }
                tracing::info!(pid = standby.pid(), "the standby forwarder took over");
            }
            Err(e) => tracing::warn!(error = %e, "the standby forwarder did not take over"),
        },
        _ => {}
    }
    tasks.shutdown().await;
    if decommission {
        let removed = forwarding::remove_all(&dataplane_config(&config, underlay_mtu), &kernel)
            .await
            .context("remove the data plane (--remove-dataplane-on-exit)")?;
        tracing::info!(devices = removed, "--remove-dataplane-on-exit: removed the data plane and our routes");
    }
    outcome
}

/// What the data plane is started with.
fn dataplane_config(config: &Config, underlay_mtu: u16) -> DataplaneConfig {
    DataplaneConfig {
        underlay: config.underlay_addr,
        underlay_mtu,
        device: config.tun_name.clone(),
        prefixes: config.mobile_prefixes.clone(),
        prefixes6: config.mobile_prefixes6.clone(),
    }
}

/// Checks what the agent needs from the host, each failure with what to fix; returns the
/// underlay MTU.
async fn check_host(config: &Config, kernel: &Kernel) -> Result<u16> {
    let Some(underlay_if) = kernel.link_of_address(config.underlay_addr).await? else {
        bail!("--underlay-addr {} is not configured on any interface of this host", config.underlay_addr);
    };
    let underlay_mtu = match config.underlay_mtu {
        Some(mtu) => mtu,
        None => {
            let dev = match &config.underlay_dev {
                Some(name) => {
                    kernel.link_by_name(name).await?.with_context(|| format!("--underlay-dev {name} does not exist"))?
                }
                None => {
                    kernel.links().await?.into_iter().find(|l| l.index == underlay_if).context("underlay interface")?
                }
            };
            u16::try_from(dev.mtu).unwrap_or(1500)
        }
    };
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!("net.ipv4.ip_forward is 0: this FE will not route between its VM ports and the tunnel");
    }
    Ok(underlay_mtu)
}

/// Chooses the data-plane backend (probing and loading the kernel's ipip module for
/// `--dataplane auto|kernel`), starts it and says which runs and why: log, metrics, and the
/// returned [`Choice`] for `/readyz`.
async fn start_dataplane(
    config: &Config,
    kernel: &Kernel,
    underlay_mtu: u16,
    metrics: &Metrics,
) -> Result<(Dataplane, Choice)> {
    let (dataplane, choice) =
        forwarding::start(config.dataplane, &dataplane_config(config, underlay_mtu), kernel).await?;
    tracing::info!(dataplane = choice.backend.label(), mode = choice.mode.label(), reason = %choice.why, "data plane chosen");
    metrics.dataplane.get_or_create(&KindLabel { kind: choice.backend.label() }).set(1);
    let label = ChoiceLabel { backend: choice.backend.label(), mode: choice.mode.label(), why: choice.code };
    metrics.dataplane_choice.get_or_create(&label).set(1);
    if let Some(counters) = dataplane.counters_handle() {
        metrics.attach_dataplane(counters);
    }
    if let Some(counters) = dataplane.kernel_counters() {
        metrics.attach_tunnels(counters);
    }
    if let Some(fib) = dataplane.fib() {
        fib.migrations().set_hold_window(config.migration_hold);
        metrics.attach_migrations(fib.clone());
    }
    Ok((dataplane, choice))
}

fn vm_port_matcher(config: &Config) -> impl Fn(&str) -> bool + Send + Sync + 'static {
    let config = config.clone();
    move |name: &str| config.is_vm_port(name)
}

/// Learns the VM ports and reads back what a previous run programmed on them: kept until the
/// first complete snapshot says otherwise (restart without flush).
async fn adopt_previous_run(
    kernel: &Kernel,
    dataplane: Dataplane,
    ports: &PortTable,
    metrics: &Arc<Metrics>,
) -> Result<Reconciler<Host>> {
    ports.seed(&kernel.links().await?);
    let mut reconciler = Reconciler::new(Host::new(kernel.clone(), dataplane), metrics.clone());
    let readback = reconciler.read_back(|i| ports.get(i).is_some()).await?;
    tracing::info!(
        host_routes = readback.host_routes,
        neighbours = readback.neighbours,
        "read back the kernel state of a previous run (kept until the first snapshot says otherwise)"
    );
    Ok(reconciler)
}

/// The running link, as the engine uses it.
struct LinkParts {
    control: Arc<LinkControl>,
    reporter: Reporter,
    events: mpsc::Receiver<LinkEvent>,
    answers: mpsc::Receiver<Answered>,
}

/// Starts the controller link (streams resume from `resume`) and the reporter.
fn start_link(config: &Config, tasks: &mut Tasks, resume: Arc<AtomicU64>, metrics: &Arc<Metrics>) -> Result<LinkParts> {
    let factory = match &config.controller_netns {
        Some(path) => Some(Arc::new(
            SocketFactory::in_namespace(path)
                .with_context(|| format!("enter --controller-netns {}", path.display()))?,
        )),
        None => None,
    };
    let control = Arc::new(LinkControl::default());
    let (link_tx, link_rx) = mpsc::channel(256);
    let (answers_tx, answers_rx) = mpsc::channel(64);
    let reporter = reporter::spawn(
        config.fe_id.clone(),
        control.session.subscribe(),
        control.reregister.clone(),
        answers_tx,
        metrics.clone(),
    );
    let link_config = LinkConfig {
        endpoints: config.controller_endpoints().map_err(anyhow::Error::msg)?,
        connect_timeout: config.connect_timeout,
        stream_timeout: config.stream_timeout,
        heartbeat_failure_ends_session: true,
        max_message_bytes: link::DEFAULT_MAX_MESSAGE_BYTES,
        register: RegisterRequest {
            fe_id: config.fe_id.clone(),
            underlay_addr: config.underlay_addr.to_string(),
            site: config.site.clone(),
            mobile_prefixes: config.mobile_prefix.iter().map(|p| p.to_string()).collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        },
    };
    let feed = EngineFeed::new(link_tx, resume, metrics.clone());
    let running = control.clone();
    tasks.spawn(async move {
        link::run(link_config, Connector::new(factory), running, feed).await;
        Ok(())
    });
    Ok(LinkParts { control, reporter, events: link_rx, answers: answers_rx })
}

/// Serves `/healthz`, `/readyz`, `/metrics` and `/debug/events`.
async fn start_admin(
    config: &Config,
    tasks: &mut Tasks,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    events: &Arc<Mutex<EventLog>>,
    kernel_counters: Option<Arc<KernelCounters>>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("bind --http-listen {}", config.http_listen))?;
    let state = crate::admin::AdminState {
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        events: events.clone(),
        kernel_counters,
    };
    tasks.spawn(async move { axum::serve(listener, crate::admin::router(state)).await.context("admin HTTP") });
    Ok(())
}

/// Move hints: one UDP socket on the underlay address; its task screens what arrives. Returns
/// the engine's handle and the screened hints (None when hints are off).
fn start_hints(
    config: &Config,
    tasks: &mut Tasks,
    metrics: &Arc<Metrics>,
    events: &Arc<Mutex<EventLog>>,
) -> Result<(Hints, Option<mpsc::Receiver<Received>>)> {
    let Some(hc) = config.move_hints().map_err(anyhow::Error::msg)? else {
        return Ok((Hints::disabled(&config.fe_id, metrics.clone(), events.clone()), None));
    };
    warn_if_readable_by_others(config.move_hint_key_file.as_deref());
    let socket = HintSocket::bind(config.underlay_addr, hc.port, hc.keys.clone()).with_context(|| {
        format!("bind the move-hint socket {}:{} (--move-hint-port)", config.underlay_addr, hc.port)
    })?;
    let (tx, rx) = mpsc::channel(1024);
    let limits = Limits { max_age_ns: hc.max_age_ns, rate: hc.rate, clock: hc.clock };
    let receiver = socket.clone().receive(limits, metrics.clone(), tx);
    tasks.spawn(async move {
        receiver.await;
        Ok(())
    });
    tracing::info!(port = hc.port, keys = hc.keys.len(), timeout_ms = hc.timeout_ns / 1_000_000, "move hints enabled");
    let hints = Hints::enabled(&config.fe_id, socket, hc.timeout_ns, hc.clock, metrics.clone(), events.clone());
    Ok((hints, Some(rx)))
}

/// Waits for SIGINT, SIGTERM (Ok) or the first task to end (Err: every task runs for the agent's
/// whole life).
async fn wait_for_exit(tasks: &mut Tasks) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: exiting (kernel state is kept for the next run)");
            Ok(())
        }
        _ = term.recv() => {
            tracing::info!("SIGTERM: exiting (kernel state is kept for the next run)");
            Ok(())
        }
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err(anyhow::anyhow!("an agent task ended unexpectedly")),
            Ok(Err(err)) => Err(err),
            Err(err) => Err(anyhow::anyhow!("an agent task failed: {err}")),
        },
    }
}

/// Warns when the move-hint key file can be read by other users (the key lets anyone who can
/// send from an FE's underlay address move traffic for a second).
fn warn_if_readable_by_others(path: Option<&std::path::Path>) {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = path else { return };
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the move-hint key file is readable by other users; chmod 600 it"
        );
    }
}
