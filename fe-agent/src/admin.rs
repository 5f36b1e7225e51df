//! The HTTP admin port (axum): `/healthz`, `/readyz` (with a `dataplane:` line saying which
//! backend runs and why), `/metrics` (the kernel data plane's counters are read from the kernel
//! just before rendering) and `/debug/events`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::events::EventLog;
use crate::forwarding::kernel::counters::KernelCounters;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// What the handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// Stage timestamps.
    pub events: Arc<Mutex<EventLog>>,
    /// The kernel data plane's counters (refreshed on every scrape), if it runs.
    pub kernel_counters: Option<Arc<KernelCounters>>,
}

/// The router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/events", get(events))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let dataplane = state.readiness.dataplane().map(|d| format!("dataplane: {d}\n")).unwrap_or_default();
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, format!("ready\n{dataplane}")).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n{dataplane}")).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    if let Some(counters) = &state.kernel_counters
        && let Err(err) = counters.refresh().await
    {
        tracing::warn!(error = %err, "cannot read the kernel data plane's counters");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    vm: Option<IpAddr>,
}

async fn events(State(state): State<AdminState>, Query(q): Query<EventsQuery>) -> Response {
    let list = state.events.lock().expect("events").list(q.vm);
    axum::Json(list).into_response()
}
