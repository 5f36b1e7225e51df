//! Wires one replica together: store → cache loader → registry → gRPC services, HTTP admin,
//! store prober and housekeeping; and shuts it down cleanly (leases revoked so peers take over
//! at once).
//!
//! Two runtimes: the main one (the process's) serves the clients; the control runtime
//! ([`control`]) keeps the replica's leases, runs housekeeping, the store prober and the cache
//! loader, with a store client of its own, so that no client load can delay them. Both servers
//! accept connections through [`net`] (connection caps, handshake and idle timeouts).

pub mod control;
pub mod net;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use victor_proto::v1::binding_service_server::BindingServiceServer;
use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};
use victor_store::etcd::{EtcdConfig, EtcdStore, EtcdTls};
use victor_store::{AnyStore, Store};

use crate::admin::{self, AdminState};
use crate::api::ApiContext;
use crate::api::agent::AgentGrpc;
use crate::api::auth::Auth;
use crate::api::binding::BindingApi;
use crate::api::request_size::RequestSizeLayer;
use crate::api::validate::MobilePrefixes;
use crate::cache::{self, Cache};
use crate::config::Config;
use crate::housekeeping::{self, HousekeepingConfig};
use crate::keys::Keys;
use crate::lease::KeptLease;
use crate::metrics::Metrics;
use crate::move_timeline::MoveTimelines;
use crate::registry::Registry;
use crate::registry::rules::{DampingPolicy, Rules};
use crate::replica::Replica;
use crate::stream::admission::{Admission, StreamLimits};
use crate::stream::clock::FanoutClock;
use crate::stream::pacer::SnapshotPacer;
use control::ControlRuntime;
use net::{Gate, Timeouts};

/// Largest gRPC request message accepted — bigger ones fail with RESOURCE_EXHAUSTED
/// (`api::request_size`).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// TTL of the replica's presence and election leases.
const REPLICA_LEASE_TTL: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive: a ping after this long without frames from the client...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...which must be answered within this, or the connection is closed (hyper sends GOAWAY
/// NO_ERROR and drops it, failing every stream and call on it). It only has to catch dead peers
/// (a live agent's connection carries its session heartbeats every quarter TTL), so it is gRPC's
/// default of 20 s: a pong is late when either host is busy, and 5 s cut live agents off while a
/// 2-core host was saturated (issue 17: `GoAway(NO_ERROR, Remote)` during a 1,000-FE load).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2 streams a connection may have beyond its Sync/WatchBindings streams (unary calls in
/// flight), announced in the connection's SETTINGS.
const UNARY_STREAMS_PER_CONNECTION: u32 = 128;
/// How long in-flight work may take to finish at shutdown before connections are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running replica.
pub struct Server {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where the HTTP admin listens.
    pub http_addr: SocketAddr,
    /// The replica id.
    pub replica_id: String,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<Result<()>>,
    leases: Vec<Arc<KeptLease<AnyStore>>>,
    control: ControlRuntime,
}

impl Server {
    /// Opens the store and starts serving. Returns once both ports listen (the cache keeps
    /// loading in the background; /readyz says when it is done).
    pub async fn start(config: Config) -> Result<Server> {
        let tls = grpc_tls(&config)?;
        let fd_limit = net::raise_fd_limit().context("read the open-file limit")?;
        let ((grpc_cap, http_cap), lowered) =
            net::fit_caps(config.max_connections, config.max_http_connections, fd_limit);
        if lowered {
            tracing::warn!(
                fd_limit,
                grpc = grpc_cap,
                http = http_cap,
                "connection caps lowered to fit the open-file limit (raise it, e.g. LimitNOFILE / ulimit -n, for more)"
            );
        }
        let store = open_store(&config, "clients").await?;
        let control = ControlRuntime::start().context("start the control runtime")?;
        // The control runtime's own store client: its connection is driven by the control
        // runtime, not by the one serving clients.
        let control_store = match &store {
            AnyStore::Embedded(_) => store.clone(),
            AnyStore::Etcd(_) => {
                let config = config.clone();
                control.run(async move { open_store(&config, "control").await }).await?
            }
        };
        let replica_id = config.replica_id();
        let grpc =
            TcpListener::bind(config.grpc_listen).await.with_context(|| format!("bind gRPC {}", config.grpc_listen))?;
        let http =
            TcpListener::bind(config.http_listen).await.with_context(|| format!("bind HTTP {}", config.http_listen))?;
        let grpc_addr = grpc.local_addr()?;
        let http_addr = http.local_addr()?;

        let keys = Keys::new(&config.etcd_prefix);
        let history_bytes = usize::try_from(config.stream_history_bytes).unwrap_or(usize::MAX);
        let cache = Cache::with_history_bytes(keys, config.stream_history, history_bytes);
        let metrics = Arc::new(Metrics::new());
        let timelines = Arc::new(MoveTimelines::new(4096));
        let store_reachable = Arc::new(AtomicBool::new(false));
        let is_housekeeper = Arc::new(AtomicBool::new(false));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        // Created inside the control runtime: their keep-alive tasks run there.
        let (presence_lease, election_lease) = {
            let _control = control.handle().enter();
            (
                KeptLease::new(control_store.clone(), REPLICA_LEASE_TTL),
                KeptLease::new(control_store.clone(), REPLICA_LEASE_TTL),
            )
        };
        let presence = cache::loader::Presence {
            replica_id: replica_id.clone(),
            grpc_addr: grpc_addr.to_string(),
            lease: presence_lease.clone(),
        };
        let on_control = control.handle();
        tasks.spawn_on(loader(control_store.clone(), cache.clone(), presence, shutdown_rx.clone()), on_control);
        tasks.spawn_on(probe(control_store.clone(), store_reachable.clone(), shutdown_rx.clone()), on_control);
        for lease in [&presence_lease, &election_lease] {
            tasks.spawn_on(count_lost_leases(lease.lost(), metrics.clone(), shutdown_rx.clone()), on_control);
        }

        let rules = Rules {
            damping: DampingPolicy {
                max_moves: config.damping_max_moves,
                window_ns: config.damping_window.as_nanos() as i64,
            },
            require_declared: config.require_declared,
        };
        let auth = load_auth(&config, metrics.clone())?;
        // One replica view per runtime: the same cache, metrics and flags, each with a registry
        // (and so a store client) of its runtime.
        let replica_on = |store: &AnyStore| {
            Arc::new(Replica {
                id: replica_id.clone(),
                registry: Registry::new(store.clone(), cache.clone(), rules, metrics.clone(), timelines.clone())
                    .with_reachability(store_reachable.clone()),
                cache: cache.clone(),
                metrics: metrics.clone(),
                timelines: timelines.clone(),
                store_reachable: store_reachable.clone(),
                is_housekeeper: is_housekeeper.clone(),
                shutdown: shutdown_rx.clone(),
                backfill: Arc::new(cache::backfill::Backfiller::new(store.clone(), cache.clone(), replica_id.clone())),
            })
        };
        let replica = replica_on(&store);
        let housekeeping_replica = replica_on(&control_store);
        let limits = StreamLimits {
            per_connection: config.max_streams_per_connection,
            agent: config.max_agent_streams,
            watch: config.max_watch_streams,
        };
        let clock = Arc::new(FanoutClock::with_share(config.fanout_share));
        let ctx = Arc::new(ApiContext {
            replica,
            mobile: MobilePrefixes::new(config.mobile_prefixes.clone()),
            session_ttl: config.session_ttl,
            max_report_observations: config.max_report_observations,
            auth,
            admission: Admission::new(limits, metrics.clone()),
            pacer: Arc::new(SnapshotPacer::new(config.snapshot_rate)),
            clock: clock.clone(),
        });
        // The clock ticks from the control runtime: the streams it wakes are then queued on the
        // main runtime in the order they parked (see stream/clock.rs).
        tasks.spawn_on(
            {
                let (cache, metrics, shutdown) = (cache.clone(), metrics.clone(), shutdown_rx.clone());
                async move {
                    clock.run(&cache, &metrics, shutdown).await;
                    Ok(())
                }
            },
            on_control,
        );

        let hk = HousekeepingConfig {
            damping_hold: config.damping_hold,
            fe_dead_after: config.fe_dead_after,
            tombstone_retention: config.tombstone_retention,
            tick: Duration::from_secs(1),
        };
        let hk_task = housekeeping::run(housekeeping_replica, election_lease.clone(), hk, shutdown_rx.clone());
        tasks.spawn_on(
            async move {
                hk_task.await;
                Ok(())
            },
            on_control,
        );

        let timeouts = Timeouts { handshake: config.handshake_timeout, idle: config.idle_timeout };
        let grpc_gate = Gate::new("grpc", grpc_cap, timeouts, metrics.clone());
        tasks.spawn(serve_grpc(ctx, grpc, grpc_gate, tls, shutdown_rx.clone()));
        let feed = Arc::new(admin::feed::Feed::new());
        tasks.spawn({
            let run =
                admin::feed::run(feed.clone(), cache.clone(), timelines.clone(), metrics.clone(), shutdown_rx.clone());
            async move {
                run.await;
                Ok(())
            }
        });
        let admin_state = AdminState {
            cache,
            metrics: metrics.clone(),
            timelines,
            store_reachable,
            is_housekeeper,
            feed,
            replica_id: replica_id.clone(),
            store_kind: store.kind(),
            mobile_prefixes: config.mobile_prefixes.iter().map(ToString::to_string).collect(),
        };
        let http_gate = Gate::new("http", http_cap, timeouts, metrics);
        tasks.spawn(admin::serve(http, http_gate, admin::router(admin_state), shutdown_rx.clone()));
        tracing::info!(%grpc_addr, %http_addr, replica = %replica_id, store = store.kind(), "controller started");
        Ok(Server {
            grpc_addr,
            http_addr,
            replica_id,
            shutdown,
            tasks,
            leases: vec![presence_lease, election_lease],
            control,
        })
    }

    /// Stops serving, revokes this replica's leases and waits for every task.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.send_replace(true);
        for lease in &self.leases {
            lease.revoke().await;
        }
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    first_error.get_or_insert(err);
                }
                Err(err) if err.is_panic() => {
                    first_error.get_or_insert(anyhow::anyhow!("a controller task panicked: {err}"));
                }
                Err(_) => {}
            }
        }
        self.control.stop().await;
        first_error.map_or(Ok(()), Err)
    }

    /// Waits until a task fails (a fatal error) — for `main`, raced against signals.
    pub async fn failed(&mut self) -> anyhow::Error {
        loop {
            match self.tasks.join_next().await {
                Some(Ok(Ok(()))) => continue,
                Some(Ok(Err(err))) => return err,
                Some(Err(err)) => return anyhow::anyhow!("a controller task ended abnormally: {err}"),
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// Opens the store; with etcd, one client `for_runtime` ("clients" or "control").
async fn open_store(config: &Config, for_runtime: &'static str) -> Result<AnyStore> {
    if config.uses_embedded_store() {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("create --data-dir {}", config.data_dir.display()))?;
        let path = config.data_dir.join("victor.redb");
        let store = EmbeddedStore::open(&path, EmbeddedOptions::default()).await.with_context(|| {
            format!("open embedded store {} (is another controller using this --data-dir?)", path.display())
        })?;
        tracing::info!(path = %path.display(), "using the embedded store (single replica)");
        Ok(AnyStore::Embedded(store))
    } else {
        let etcd = EtcdConfig {
            endpoints: config.etcd_endpoints.clone(),
            request_timeout: config.etcd_timeout,
            connect_timeout: config.etcd_timeout,
            tls: etcd_tls(config)?,
            ..EtcdConfig::default()
        };
        let store = EtcdStore::connect(etcd.clone())
            .await
            .with_context(|| format!("connect to etcd {}", config.etcd_endpoints.join(",")))?;
        tracing::info!(
            endpoints = %config.etcd_endpoints.join(","),
            tls = etcd.tls.is_some(),
            client_cert = etcd.tls.as_ref().is_some_and(|t| t.client_cert_pem.is_some()),
            runtime = for_runtime,
            "using etcd"
        );
        Ok(AnyStore::Etcd(store))
    }
}

/// TLS towards etcd from `--etcd-ca-file` (and the optional client certificate), checked against
/// the endpoints' schemes so a mismatch fails at start with a clear message.
fn etcd_tls(config: &Config) -> Result<Option<EtcdTls>> {
    let https = config.etcd_endpoints.iter().filter(|e| e.starts_with("https://")).count();
    let Some(ca) = &config.etcd_ca_file else {
        if https > 0 {
            anyhow::bail!("--etcd-endpoints use https:// but no --etcd-ca-file is given to verify the etcd servers");
        }
        if config.etcd_cert_file.is_some() {
            anyhow::bail!("--etcd-cert-file needs --etcd-ca-file (the CA of the etcd server certificates)");
        }
        return Ok(None);
    };
    if https != config.etcd_endpoints.len() {
        anyhow::bail!("--etcd-ca-file enables TLS to etcd: every --etcd-endpoints URL must start with https://");
    }
    let client_cert_pem = match (&config.etcd_cert_file, &config.etcd_key_file) {
        (Some(cert), Some(key)) => {
            Some((read_pem("--etcd-cert-file", cert, "CERTIFICATE")?, read_pem("--etcd-key-file", key, "PRIVATE KEY")?))
        }
        _ => None,
    };
    Ok(Some(EtcdTls {
        ca_cert_pem: read_pem("--etcd-ca-file", ca, "CERTIFICATE")?,
        client_cert_pem,
        domain_name: None,
    }))
}

/// The gRPC server's TLS from `--tls-cert-file`/`--tls-key-file`, verifying client certificates
/// against `--tls-client-ca-file` when given (ALPN h2, as tonic's own acceptor). Client
/// certificates are optional at the TLS layer: operators may connect with a bearer token only,
/// while every AgentService call checks the agent's certificate itself (UNAUTHENTICATED without
/// one, see `api::auth`). The handshake runs in the accept loop ([`net`]) under
/// `--handshake-timeout`.
fn grpc_tls(config: &Config) -> Result<Option<TlsAcceptor>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
        return Ok(None);
    };
    let cert_pem = read_pem("--tls-cert-file", cert, "CERTIFICATE")?;
    let key_pem = read_pem("--tls-key-file", key, "PRIVATE KEY")?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--tls-cert-file {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("--tls-key-file {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .context("gRPC TLS protocol versions")?;
    let builder = match &config.tls_client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let ca_pem = read_pem("--tls-client-ca-file", ca, "CERTIFICATE")?;
            let mut roots = rustls::RootCertStore::empty();
            for der in CertificateDer::pem_slice_iter(&ca_pem) {
                let der = der.map_err(|e| anyhow::anyhow!("--tls-client-ca-file {}: {e}", ca.display()))?;
                roots.add(der).map_err(|e| anyhow::anyhow!("--tls-client-ca-file {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| anyhow::anyhow!("--tls-client-ca-file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("gRPC TLS: {e} (check that --tls-key-file is the key of --tls-cert-file)"))?;
    tls.alpn_protocols.push(b"h2".to_vec());
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}

/// Reads a PEM file named by `flag` and checks it holds a `label` block (so a key passed as a
/// certificate fails here, naming the flag, not in the first handshake).
fn read_pem(flag: &str, path: &std::path::Path, label: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{flag}: read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")))
        .any(|l| l.ends_with(label));
    if !found {
        anyhow::bail!("{flag}: {} holds no PEM {label} block (-----BEGIN {label}-----)", path.display());
    }
    Ok(bytes)
}

fn load_auth(config: &Config, metrics: Arc<Metrics>) -> Result<Auth> {
    let mut auth = Auth {
        require_fe_certificates: config.tls_client_ca_file.is_some(),
        tokens: Vec::new(),
        metrics: Some(metrics),
    };
    if let Some(path) = &config.auth_tokens_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(role), None) = (parts.next(), parts.next(), parts.next()) else {
                anyhow::bail!("{}:{}: expected '<token> <read-only|read-write>'", path.display(), n + 1);
            };
            let role = match role {
                "read-only" => crate::api::auth::Role::ReadOnly,
                "read-write" => crate::api::auth::Role::ReadWrite,
                other => anyhow::bail!("{}:{}: role {other:?} must be read-only or read-write", path.display(), n + 1),
            };
            auth.tokens.push((token.to_owned(), role));
        }
    } else {
        tracing::warn!("BindingService is open to every caller (no --auth-tokens-file); use only in a lab");
    }
    if config.tls_cert_file.is_none() {
        tracing::warn!("gRPC is PLAINTEXT and agents are not authenticated (no --tls-cert-file); use only in a lab");
    } else if config.tls_client_ca_file.is_none() {
        tracing::warn!(
            "gRPC uses TLS but agents are not authenticated (no --tls-client-ca-file): any client may act for any FE"
        );
    } else {
        tracing::info!(
            fe_identity = "client certificate DNS name <fe_id>.fe.victor",
            "gRPC uses mutual TLS for agents"
        );
    }
    Ok(auth)
}

async fn loader(
    store: AnyStore,
    cache: Arc<Cache>,
    presence: cache::loader::Presence<AnyStore>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    cache::loader::run(store, cache, presence, shutdown).await;
    Ok(())
}

/// Probes the store every second; drives /readyz and the gRPC health status.
async fn probe(store: AnyStore, reachable: Arc<AtomicBool>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(2), store.current_revision()).await.is_ok_and(|r| r.is_ok());
        if reachable.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("store reachable");
            } else {
                tracing::warn!("store unreachable: writes fail with UNAVAILABLE, agents keep their last state");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Counts the losses of one of this replica's leases (`victor_replica_leases_lost_total`).
async fn count_lost_leases(
    mut lost: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        tokio::select! {
            changed = lost.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                metrics.replica_leases_lost.inc();
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn serve_grpc(
    ctx: Arc<ApiContext<AnyStore>>,
    listener: TcpListener,
    gate: Gate,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Reflection in both versions: grpc.reflection.v1 and the older v1alpha that many clients
    // (older grpcurl, several GUI clients) still speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(victor_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("build reflection service (v1)")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("build reflection service (v1alpha)")?;
    // The agents' service with the Sync stream written from pre-encoded frames (each change is
    // encoded once for every stream); its other methods are the generated ones.
    let agent = AgentGrpc::new(ctx.clone(), MAX_REQUEST_BYTES);
    let binding = BindingServiceServer::new(BindingApi::new(ctx.clone())).max_decoding_message_size(MAX_REQUEST_BYTES);
    let streams_per_connection = u32::try_from(ctx.admission.limits().per_connection).unwrap_or(u32::MAX);

    // Health follows readiness: SERVING once the cache is loaded and the store answers.
    let health_ctx = ctx.replica.clone();
    let mut health_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ready = health_ctx.cache.is_loaded() && health_ctx.store_reachable.load(Ordering::Relaxed);
            if last != Some(ready) {
                let status =
                    if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
                health.set_service_status("", status).await;
                health.set_service_status("victor.v1.AgentService", status).await;
                health.set_service_status("victor.v1.BindingService", status).await;
                last = Some(ready);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = health_shutdown.changed() => return,
            }
        }
    });

    let router = tonic::transport::Server::builder()
        .layer(RequestSizeLayer::new(MAX_REQUEST_BYTES))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(streams_per_connection.saturating_add(UNARY_STREAMS_PER_CONNECTION))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(agent)
        .add_service(binding);
    let signal = {
        let mut shutdown = shutdown.clone();
        async move {
            let _ = shutdown.wait_for(|s| *s).await;
            // Streams end on shutdown; give unary calls in flight a moment to finish.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // Connections go through the gate: cap, TLS and the HTTP/2 preface within the handshake
    // timeout, idle timeout. (The accepted sockets have TCP_NODELAY set: small stream messages
    // must not wait for the agent's delayed ACK.)
    let serving = async move {
        match tls {
            None => {
                let accepted = gate.accept(listener, net::HTTP2_PREFACE_LEN, |tcp| async move { Ok(tcp) });
                router.serve_with_incoming_shutdown(incoming(accepted), signal).await
            }
            Some(tls) => {
                let accepted = gate.accept(listener, net::HTTP2_PREFACE_LEN, move |tcp| tls.accept(tcp));
                router.serve_with_incoming_shutdown(incoming(accepted), signal).await
            }
        }
    };
    // Graceful shutdown waits for every stream to end; a client that stopped reading would hold
    // it forever, so it gets SHUTDOWN_GRACE.
    tokio::select! {
        served = serving => served.context("gRPC server"),
        _ = async {
            let _ = shutdown.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

/// The accepted connections as the stream tonic serves from.
fn incoming<IO>(
    accepted: tokio::sync::mpsc::Receiver<net::Guarded<IO>>,
) -> impl futures::Stream<Item = Result<net::Guarded<IO>, std::io::Error>> {
    use futures::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(accepted).map(Ok)
}
