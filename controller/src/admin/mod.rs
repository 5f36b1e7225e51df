//! The HTTP admin port (axum): `/healthz`, `/readyz`, `/metrics`, `/debug/moves` and the status
//! page (`/status`, see [`status`]) with its live feed ([`feed`]). [`serve`] runs it over HTTP/1.1
//! behind the replica's connection gate (cap, request-head and idle timeouts).

pub mod feed;
pub mod status;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::move_timeline::MoveTimelines;
use crate::server::net::Gate;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// Replica cache.
    pub cache: Arc<Cache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-move stage timestamps.
    pub timelines: Arc<MoveTimelines>,
    /// Store answered the last probe.
    pub store_reachable: Arc<AtomicBool>,
    /// This replica runs housekeeping.
    pub is_housekeeper: Arc<AtomicBool>,
    /// The status page's live feed.
    pub feed: Arc<feed::Feed>,
    /// This replica's id.
    pub replica_id: String,
    /// `etcd` or `embedded`.
    pub store_kind: &'static str,
    /// The configured mobile prefixes.
    pub mobile_prefixes: Vec<String>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/moves", get(moves))
        .route("/", get(|| async { axum::response::Redirect::temporary("/status") }))
        .route("/status", get(status::page))
        .route("/status/app.js", get(status::script))
        .route("/status/api/summary", get(status::summary))
        .route("/status/api/bindings", get(status::bindings))
        .route("/status/events", get(status::events))
        .with_state(state)
}

/// How long connections may finish their responses at shutdown (the status page's event stream
/// never ends by itself).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown` turns true. Each connection comes through
/// `gate`; hyper closes one whose request head does not arrive within the gate's handshake
/// timeout (which also bounds the wait for the next request on a kept-alive connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    gate: Gate,
    router: Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let head_timeout = gate.timeouts().handshake;
    let mut accepted = gate.accept(listener, 0, |tcp| async move { Ok(tcp) });
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let io = tokio::select! {
            io = accepted.recv() => match io {
                Some(io) => io,
                None => break,
            },
            _ = shutdown.wait_for(|s| *s) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut stopping = stop.subscribe();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(head_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(conn);
            let stop = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(accepted);
    stop.send_replace(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    connections.abort_all();
    Ok(())
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let mut problems = Vec::new();
    if !state.store_reachable.load(Ordering::Relaxed) {
        problems.push("store unreachable");
    }
    if !state.cache.is_loaded() {
        problems.push("cache not loaded");
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join(", "))).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let text = state.metrics.render(
        &state.cache,
        state.is_housekeeper.load(Ordering::Relaxed),
        state.store_reachable.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

#[derive(Deserialize)]
struct MovesQuery {
    vm: Option<IpAddr>,
}

async fn moves(State(state): State<AdminState>, Query(q): Query<MovesQuery>) -> Response {
    axum::Json(state.timelines.list(q.vm)).into_response()
}
