//! Wires one replica together: store → cache loader → registry → gRPC services, HTTP admin,
//! store prober and housekeeping; and shuts it down cleanly (leases revoked so peers take over
//! at once).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use victor_proto::v1::binding_service_server::BindingServiceServer;
use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};
use victor_store::etcd::{EtcdConfig, EtcdStore, EtcdTls};
use victor_store::{AnyStore, Store};

use crate::admin::{self, AdminState};
use crate::api::ApiContext;
use crate::api::agent::AgentGrpc;
use crate::api::auth::Auth;
use crate::api::binding::BindingApi;
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

/// Largest gRPC message accepted (requests) — bigger ones fail with OUT_OF_RANGE.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// TTL of the replica's presence and election leases.
const REPLICA_LEASE_TTL: Duration = Duration::from_secs(5);

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
}

impl Server {
    /// Opens the store and starts serving. Returns once both ports listen (the cache keeps
    /// loading in the background; /readyz says when it is done).
    pub async fn start(config: Config) -> Result<Server> {
        let tls = grpc_tls(&config)?;
        let store = open_store(&config).await?;
        let replica_id = config.replica_id();
        let grpc =
            TcpListener::bind(config.grpc_listen).await.with_context(|| format!("bind gRPC {}", config.grpc_listen))?;
        let http =
            TcpListener::bind(config.http_listen).await.with_context(|| format!("bind HTTP {}", config.http_listen))?;
        let grpc_addr = grpc.local_addr()?;
        let http_addr = http.local_addr()?;

        let keys = Keys::new(&config.etcd_prefix);
        let cache = Cache::new(keys, config.stream_history);
        let metrics = Arc::new(Metrics::new());
        let timelines = Arc::new(MoveTimelines::new(4096));
        let store_reachable = Arc::new(AtomicBool::new(false));
        let is_housekeeper = Arc::new(AtomicBool::new(false));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let presence_lease = KeptLease::new(store.clone(), REPLICA_LEASE_TTL);
        let election_lease = KeptLease::new(store.clone(), REPLICA_LEASE_TTL);
        let presence = cache::loader::Presence {
            replica_id: replica_id.clone(),
            grpc_addr: grpc_addr.to_string(),
            lease: presence_lease.clone(),
        };
        tasks.spawn(loader(store.clone(), cache.clone(), presence, shutdown_rx.clone()));
        tasks.spawn(probe(store.clone(), store_reachable.clone(), shutdown_rx.clone()));

        let rules = Rules {
            damping: DampingPolicy {
                max_moves: config.damping_max_moves,
                window_ns: config.damping_window.as_nanos() as i64,
            },
            require_declared: config.require_declared,
        };
        let auth = load_auth(&config, metrics.clone())?;
        let replica = Arc::new(Replica {
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
        });
        let ctx = Arc::new(ApiContext {
            replica: replica.clone(),
            mobile: MobilePrefixes::new(config.mobile_prefixes.clone()),
            session_ttl: config.session_ttl,
            max_report_observations: config.max_report_observations,
            auth,
        });

        let hk = HousekeepingConfig {
            damping_hold: config.damping_hold,
            fe_dead_after: config.fe_dead_after,
            tombstone_retention: config.tombstone_retention,
            tick: Duration::from_secs(1),
        };
        let hk_task = housekeeping::run(replica, election_lease.clone(), hk, shutdown_rx.clone());
        tasks.spawn(async move {
            hk_task.await;
            Ok(())
        });

        tasks.spawn(serve_grpc(ctx, grpc, tls, shutdown_rx.clone()));
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
            metrics,
            timelines,
            store_reachable,
            is_housekeeper,
            feed,
            replica_id: replica_id.clone(),
            store_kind: store.kind(),
            mobile_prefixes: config.mobile_prefixes.iter().map(ToString::to_string).collect(),
        };
        let mut http_shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            axum::serve(http, admin::router(admin_state))
                .with_graceful_shutdown(async move {
                    let _ = http_shutdown.wait_for(|s| *s).await;
                })
                .await
                .context("HTTP admin server")
        });
        tracing::info!(%grpc_addr, %http_addr, replica = %replica_id, store = store.kind(), "controller started");
        Ok(Server { grpc_addr, http_addr, replica_id, shutdown, tasks, leases: vec![presence_lease, election_lease] })
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

async fn open_store(config: &Config) -> Result<AnyStore> {
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
/// against `--tls-client-ca-file` when given. Client certificates are optional at the TLS layer:
/// operators may connect with a bearer token only, while every AgentService call checks the
/// agent's certificate itself (UNAUTHENTICATED without one, see `api::auth`).
fn grpc_tls(config: &Config) -> Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
        return Ok(None);
    };
    let identity = tonic::transport::Identity::from_pem(
        read_pem("--tls-cert-file", cert, "CERTIFICATE")?,
        read_pem("--tls-key-file", key, "PRIVATE KEY")?,
    );
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity).timeout(Duration::from_secs(10));
    if let Some(ca) = &config.tls_client_ca_file {
        tls = tls
            .client_ca_root(tonic::transport::Certificate::from_pem(read_pem(
                "--tls-client-ca-file",
                ca,
                "CERTIFICATE",
            )?))
            .client_auth_optional(true);
    }
    // Building the acceptor parses the key and certificates: fail now, not in the serving task.
    tonic::transport::Server::builder().tls_config(tls.clone()).map_err(|e| {
        anyhow::anyhow!("gRPC TLS: {e} (check --tls-cert-file, --tls-key-file and --tls-client-ca-file)")
    })?;
    Ok(Some(tls))
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

async fn serve_grpc(
    ctx: Arc<ApiContext<AnyStore>>,
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(victor_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("build reflection service")?;
    // The agents' service with the Sync stream written from pre-encoded frames (each change is
    // encoded once for every stream); its other methods are the generated ones.
    let agent = AgentGrpc::new(ctx.clone(), MAX_REQUEST_BYTES);
    let binding = BindingServiceServer::new(BindingApi::new(ctx.clone())).max_decoding_message_size(MAX_REQUEST_BYTES);

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

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("gRPC TLS (--tls-cert-file/--tls-key-file)")?;
    }
    // `serve_with_incoming*` ignores the builder's tcp_nodelay: set it on the incoming sockets,
    // or small stream messages wait for the agent's delayed ACK (Nagle: up to 40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(agent)
        .add_service(binding)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
            // Streams end on shutdown; give unary calls in flight a moment to finish.
            tokio::time::sleep(Duration::from_millis(100)).await;
        })
        .await
        .context("gRPC server")
}
