//! The status page on the HTTP admin port: `/status` (plain HTML and a little vanilla JS, embedded
//! in the binary), its JSON snapshot (`/status/api/summary`), binding search
//! (`/status/api/bindings?q=&limit=`) and the live feed as server-sent events (`/status/events`,
//! fed by [`super::feed`]). Read-only, like `/metrics`: keep the admin port on a trusted network.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::{Stream, StreamExt};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::AdminState;
use super::feed::{BindingRow, FeRow, FeedEvent, MoveRecord};

const PAGE: &str = include_str!("status.html");
const SCRIPT: &str = include_str!("status.js");
/// Most bindings one search returns.
const MAX_LIMIT: usize = 1000;

/// `GET /status`.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /status/app.js`.
pub async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

/// The page's snapshot.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// This replica.
    pub replica_id: String,
    /// Cache revision the snapshot reflects (feed events at or below it are already included).
    pub revision: u64,
    /// Store answered the last probe.
    pub store_reachable: bool,
    /// Store kind.
    pub store_kind: &'static str,
    /// The elected housekeeper.
    pub housekeeper_id: String,
    /// Mobile prefixes.
    pub mobile_prefixes: Vec<String>,
    /// Every FE.
    pub fes: Vec<FeRow>,
    /// Number of bindings.
    pub binding_count: usize,
    /// Bindings frozen by flap damping (the damping alerts).
    pub frozen: Vec<BindingRow>,
    /// Bindings with a pending migration announcement (at most 1000).
    pub pending: Vec<BindingRow>,
    /// Latest moves, newest first.
    pub moves: Vec<MoveRecord>,
    /// Agent streams served by this replica.
    pub agent_streams: i64,
}

/// `GET /status/api/summary`.
pub async fn summary(State(state): State<AdminState>) -> axum::Json<Summary> {
    let ((fes, binding_count, (frozen, pending), housekeeper_id), revision) = state.cache.read_with_revision(|s| {
        let site = |fe: &str| s.fes.get(fe).map(|f| f.record.site.clone()).unwrap_or_default();
        let fes = s
            .fes
            .values()
            .map(|f| FeRow::new(f, s.bindings_per_fe.get(&f.fe_id).copied().unwrap_or(0)))
            .collect::<Vec<_>>();
        let (mut frozen, mut pending) = (Vec::new(), Vec::new());
        for (ip, b) in &s.bindings {
            if b.frozen && frozen.len() < MAX_LIMIT {
                frozen.push(BindingRow::new(*ip, b, site(&b.fe_id)));
            }
            if !b.pending_fe_id().is_empty() && pending.len() < MAX_LIMIT {
                pending.push(BindingRow::new(*ip, b, site(&b.fe_id)));
            }
        }
        (fes, s.bindings.len(), (frozen, pending), s.housekeeper.as_ref().map(|h| h.0.clone()).unwrap_or_default())
    });
    axum::Json(Summary {
        replica_id: state.replica_id.clone(),
        revision,
        store_reachable: state.store_reachable.load(Ordering::Relaxed),
        store_kind: state.store_kind,
        housekeeper_id,
        mobile_prefixes: state.mobile_prefixes.clone(),
        fes,
        binding_count,
        frozen,
        pending,
        moves: state.feed.recent_moves(),
        agent_streams: state.metrics.agent_streams.get(),
    })
}

/// Search parameters.
#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    /// A CIDR prefix (`10.10.1.0/24`), an IP, or text matched against IP, FE, site and MAC.
    #[serde(default)]
    pub q: String,
    /// Most rows (default 200, at most 1000).
    pub limit: Option<usize>,
}

/// Search results.
#[derive(Debug, Serialize)]
pub struct SearchResult {
    /// Revision the rows reflect.
    pub revision: u64,
    /// Matching bindings in IP order (at most `limit`).
    pub bindings: Vec<BindingRow>,
    /// More bindings matched than returned.
    pub truncated: bool,
}

/// What a search matches.
#[derive(Debug)]
enum Filter {
    All,
    Prefix(IpNet),
    Text(String),
}

impl Filter {
    fn parse(q: &str) -> Filter {
        let q = q.trim();
        if q.is_empty() {
            Filter::All
        } else if let Ok(net) = q.parse::<IpNet>() {
            Filter::Prefix(net.trunc())
        } else if let Ok(ip) = q.parse::<IpAddr>() {
            Filter::Prefix(IpNet::from(ip))
        } else {
            Filter::Text(q.to_ascii_lowercase())
        }
    }
}

/// `GET /status/api/bindings`.
pub async fn bindings(State(state): State<AdminState>, Query(q): Query<SearchQuery>) -> axum::Json<SearchResult> {
    let limit = q.limit.unwrap_or(200).clamp(1, MAX_LIMIT);
    let filter = Filter::parse(&q.q);
    let (mut rows, revision) = state.cache.read_with_revision(|s| {
        let site = |fe: &str| s.fes.get(fe).map(|f| f.record.site.clone()).unwrap_or_default();
        let candidates: Box<dyn Iterator<Item = (&IpAddr, &crate::cache::BindingView)>> = match &filter {
            Filter::Prefix(net) => Box::new(s.bindings.range(net.network()..=net.broadcast())),
            _ => Box::new(s.bindings.iter()),
        };
        candidates
            .map(|(ip, b)| BindingRow::new(*ip, b, site(&b.fe_id)))
            .filter(|row| match &filter {
                Filter::Text(t) => {
                    row.vm_ip.to_string().contains(t.as_str())
                        || row.fe_id.to_ascii_lowercase().contains(t.as_str())
                        || row.site.to_ascii_lowercase().contains(t.as_str())
                        || row.mac.contains(t.as_str())
                }
                _ => true,
            })
            .take(limit + 1)
            .collect::<Vec<_>>()
    });
    let truncated = rows.len() > limit;
    rows.truncate(limit);
    axum::Json(SearchResult { revision, bindings: rows, truncated })
}

/// Decrements the SSE client gauge when the stream is dropped (the browser went away).
struct ClientGuard(std::sync::Arc<crate::metrics::Metrics>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.status_clients.dec();
    }
}

/// `GET /status/events`: the live feed. Each event's name is its type, its data the JSON event.
pub async fn events(State(state): State<AdminState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    state.metrics.status_clients.inc();
    let guard = ClientGuard(state.metrics.clone());
    let hello = Event::default().event("hello").data(format!("{{\"revision\":{}}}", state.cache.revision()));
    let feed = BroadcastStream::new(state.feed.subscribe()).map(move |item| {
        let _alive = &guard;
        let event = match item {
            Ok(event) => event,
            Err(BroadcastStreamRecvError::Lagged(_)) => std::sync::Arc::new(FeedEvent::Resync),
        };
        let data = serde_json::to_string(&*event).expect("feed events serialise");
        Ok(Event::default().event(event.name()).data(data))
    });
    Sse::new(futures::stream::once(async move { Ok(hello) }).chain(feed)).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_filters() {
        assert!(matches!(Filter::parse(""), Filter::All));
        assert!(matches!(Filter::parse("10.10.1.7/24"), Filter::Prefix(n) if n.to_string() == "10.10.1.0/24"));
        assert!(matches!(Filter::parse("10.10.0.11"), Filter::Prefix(n) if n.to_string() == "10.10.0.11/32"));
        assert!(matches!(Filter::parse(" FE2 "), Filter::Text(t) if t == "fe2"));
    }
}
