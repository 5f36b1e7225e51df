//! Wiring: checks the host, starts the data plane, reads back what a previous run programmed,
//! then runs the tasks — controller link, reporter, ARP capture, port watcher, move-hint socket,
//! admin HTTP and the core that owns the state — until SIGINT/SIGTERM or a fatal error. Kernel state is left in place
//! on exit: a restarted agent adopts it (no flush).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use victor_proto::clock::monotonic_ns;
use victor_proto::v1::RegisterRequest;

use crate::advertise::health::DeviceProbe;
use crate::advertise::{Advertiser, HealthInputs};
use crate::arp::{self, Captures};
use crate::config::Config;
use crate::link::connector::{Connector, SocketFactory};
use crate::link::feed::EngineFeed;
use crate::link::{self, LinkConfig, LinkControl, reporter};
use crate::core::{Core, Inputs, Readiness};
use crate::dataplane::{self, Dataplane, DataplaneConfig};
use crate::events::EventLog;
use crate::hint::Hints;
use crate::hint::io::{HintSocket, Limits};
use crate::metrics::{KindLabel, Metrics};
use crate::netlink::Kernel;
use crate::ports::{self, PortTable};
use crate::reconcile::Reconciler;
use crate::state::desired::DesiredState;
use crate::state::local::{LocalVms, Timers};

/// Runs the agent until a signal or a fatal error.
pub async fn run(config: Config) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let kernel = Kernel::connect(config.route_protocol).context("open a netlink socket (needs CAP_NET_ADMIN)")?;

    // Host checks, each with what to fix.
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

    let (backend, why) =
        dataplane::choose(config.dataplane, victor_dataplane::kernel::ipip_available()).map_err(anyhow::Error::msg)?;
    tracing::info!(dataplane = backend.label(), reason = why, "data plane chosen");
    metrics.dataplane.get_or_create(&KindLabel { kind: backend.label() }).set(1);
    let dp_config = DataplaneConfig {
        backend,
        underlay: config.underlay_addr,
        underlay_mtu,
        device: config.tun_name.clone(),
        prefixes: config.mobile_prefixes.clone(),
    };
    let dataplane = Dataplane::start(&dp_config, &kernel).await?;
    if let Some(counters) = dataplane.counters_handle() {
        metrics.attach_dataplane(counters);
    }

    let gateway_mac = config.gateway_mac.map(|m| m.octets());
    let matcher = {
        let config = config.clone();
        move |name: &str| config.is_vm_port(name)
    };
    let ports = Arc::new(PortTable::new(matcher, gateway_mac));
    let captures = Arc::new(Captures::default());
    metrics.attach_captures(captures.clone());

    ports.seed(&kernel.links().await?);
    let mut reconciler = Reconciler::new(kernel.clone(), dataplane, metrics.clone());
    let readback = reconciler.read_back(|i| ports.get(i).is_some()).await?;
    tracing::info!(
        host_routes = readback.host_routes,
        neighbours = readback.neighbours,
        "read back the kernel state of a previous run (kept until the first snapshot says otherwise)"
    );

    // Controller link and reporter.
    let factory = match &config.controller_netns {
        Some(path) => Some(Arc::new(
            SocketFactory::in_namespace(path)
                .with_context(|| format!("enter --controller-netns {}", path.display()))?,
        )),
        None => None,
    };
    let link = Arc::new(LinkControl::default());
    let resume = Arc::new(AtomicU64::new(0));
    let (link_tx, link_rx) = mpsc::channel(256);
    let (answers_tx, answers_rx) = mpsc::channel(64);
    let reporter = reporter::spawn(
        config.fe_id.clone(),
        link.session.subscribe(),
        link.reregister.clone(),
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
            mobile_prefixes: config.mobile_prefixes.iter().map(|p| p.to_string()).collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        },
    };
    let mut tasks = tokio::task::JoinSet::new();
    {
        let feed = EngineFeed::new(link_tx, resume.clone(), metrics.clone());
        let link = link.clone();
        tasks.spawn(async move {
            link::run(link_config, Connector::new(factory), link, feed).await;
            Ok(())
        });
    }

    // The port watcher; the core opens an ARP capture on each VM port it announces.
    let (arp_tx, arp_rx) = mpsc::channel(4096);
    let (port_tx, port_rx) = mpsc::channel(64);
    {
        let (ports, kernel) = (ports.clone(), kernel.clone());
        tasks.spawn(async move { ports::watch(ports, kernel, port_tx).await.context("link watcher") });
    }

    // Admin HTTP.
    let readiness = Arc::new(Readiness {
        connected: AtomicBool::new(false),
        synced: AtomicBool::new(false),
        last_message_mono: AtomicU64::new(monotonic_ns()),
        grace_ns: config.headless_grace.as_nanos() as u64,
    });
    // The advertiser announces the mobile prefixes while this FE is healthy (readiness and the
    // data-plane device), and withdraws them before the agent exits.
    let advertiser = config.advertise().map(|bgp| {
        tracing::info!(peers = ?bgp.peers, local_as = bgp.local_as, peer_as = bgp.peer_as, "BGP advertiser enabled");
        let device = DeviceProbe::new(kernel.handle().clone(), config.tun_name.clone());
        Advertiser::spawn(bgp, HealthInputs { readiness: readiness.clone(), device }, metrics.clone())
    });
    let events = Arc::new(Mutex::new(EventLog::new(8192)));
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("bind --http-listen {}", config.http_listen))?;
    let admin_state =
        crate::admin::AdminState { metrics: metrics.clone(), readiness: readiness.clone(), events: events.clone() };
    tasks.spawn(async move { axum::serve(listener, crate::admin::router(admin_state)).await.context("admin HTTP") });

    // Move hints: one UDP socket on the underlay address; its task screens what arrives.
    let (hints, hint_rx) = match config.move_hints().map_err(anyhow::Error::msg)? {
        None => (Hints::disabled(&config.fe_id, metrics.clone(), events.clone()), None),
        Some(hc) => {
            warn_if_readable_by_others(config.move_hint_key_file.as_deref());
            let socket = HintSocket::bind(config.underlay_addr, hc.port, hc.keys.clone()).with_context(|| {
                format!("bind the move-hint socket {}:{} (--move-hint-port)", config.underlay_addr, hc.port)
            })?;
            let (tx, rx) = mpsc::channel(1024);
            let limits = Limits { max_age_ns: hc.max_age_ns, rate: hc.rate };
            let receiver = socket.clone().receive(limits, metrics.clone(), tx);
            tasks.spawn(async move {
                receiver.await;
                Ok(())
            });
            tracing::info!(
                port = hc.port,
                keys = hc.keys.len(),
                timeout_ms = hc.timeout_ns / 1_000_000,
                "move hints enabled"
            );
            let hints = Hints::enabled(&config.fe_id, socket, hc.timeout_ns, metrics.clone(), events.clone());
            (hints, Some(rx))
        }
    };

    let ns = 1_000_000_000u64;
    let timers = Timers {
        probe_after: config.arp_probe_after.as_nanos() as u64,
        probe_interval: config.arp_probe_interval.as_nanos() as u64,
        probe_count: config.arp_probe_count,
        reject_hold: 30 * ns,
    };
    let core = Core {
        fe_id: config.fe_id.clone(),
        desired: DesiredState::new(&config.fe_id),
        local: LocalVms::new(timers),
        reconciler,
        scope: arp::classify::Scope { prefixes: config.mobile_prefixes.clone(), gateways: config.gateways.clone() },
        ports,
        captures,
        capture_tasks: HashMap::new(),
        arp_frames: arp_tx,
        arp_budget: (config.arp_rate, config.arp_burst),
        reporter,
        link,
        resume,
        events,
        metrics,
        readiness,
        discovering: HashMap::new(),
        hints,
    };
    tasks.spawn(async move {
        core.run(Inputs { link: link_rx, answers: answers_rx, arp: arp_rx, ports: port_rx, hints: hint_rx }).await;
        bail!("the agent core stopped")
    });
    tracing::info!(fe_id = %config.fe_id, underlay = %config.underlay_addr, underlay_mtu, "agent running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
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
    };
    if let Some(advertiser) = advertiser {
        // A clean stop keeps forwarding (the tasks still run) while the routers move away.
        let drain = if outcome.is_ok() { config.bgp_shutdown_drain } else { std::time::Duration::ZERO };
        advertiser.shutdown(drain).await;
    }
    outcome
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
