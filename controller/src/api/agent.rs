//! `victor.v1.AgentService`: FE registration and liveness, VM reports, desired-state stream.
//!
//! [`AgentApi`] implements the generated service. [`AgentGrpc`] serves the same service but
//! answers `Sync` with pre-encoded, gRPC-framed messages written as they are
//! ([`crate::stream::encoded`], [`crate::stream::body`]): a change fanned out to every agent is
//! encoded once instead of once per stream; the bytes on the wire obey the same contract.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use ipnet::IpNet;
use prost::Message;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use victor_proto::Mac;
use victor_proto::clock::monotonic_ns;
use victor_proto::types::{ip_from_bytes, ip_to_bytes};
use victor_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use victor_proto::v1::*;
use victor_store::Store;

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::validate::{self, is_host_in};
use crate::registry::rules::Observed;
use crate::registry::{
    Claim, FeRegistration, Reason, Refusal, RegistryResult, Rejection, ValidMacClaim, ValidObservation,
};
use crate::stream::admission::StreamKind;
use crate::stream::agent::{self as sync, SyncContext};
use crate::stream::encoded::GRPC_PREFIX_LEN;
use crate::stream::{Pump, body};
use crate::wire;

/// The AgentService implementation.
pub struct AgentApi<S: Store> {
    ctx: Arc<ApiContext<S>>,
}

impl<S: Store> AgentApi<S> {
    /// Serves from `ctx`.
    pub fn new(ctx: Arc<ApiContext<S>>) -> Self {
        AgentApi { ctx }
    }

    async fn register(&self, req: RegisterRequest) -> ApiResult<RegisterResponse> {
        let ctx = &self.ctx;
        let underlay = validate::underlay(&req.underlay_addr, &ctx.mobile)?;
        validate::name("site", &req.site)?;
        if req.agent_version.len() > validate::MAX_NAME_LEN {
            return Err(ApiError::InvalidArgument("agent_version is too long (at most 63 bytes)".into()));
        }
        let mut prefixes = Vec::with_capacity(req.mobile_prefixes.len());
        for text in &req.mobile_prefixes {
            let net: IpNet = text.parse().map_err(|_| {
                ApiError::InvalidArgument(format!(
                    "mobile prefix {} is not a CIDR prefix like 10.10.0.0/16",
                    validate::quoted(text)
                ))
            })?;
            if net.trunc() != net {
                return Err(ApiError::InvalidArgument(format!(
                    "mobile prefix {net} has host bits set; did you mean {}?",
                    net.trunc()
                )));
            }
            ctx.mobile.check_subnet(&net).map_err(ApiError::InvalidArgument)?;
            prefixes.push(net.to_string());
        }
        if prefixes.is_empty() {
            prefixes = ctx.mobile.to_strings();
        }
        let registration = FeRegistration {
            fe_id: req.fe_id,
            underlay,
            site: req.site,
            mobile_prefixes: prefixes,
            agent_version: req.agent_version,
        };
        let replica = &ctx.replica;
        let revision = replica.registry.register_fe(registration, ctx.session_ttl, &replica.id).await?;
        replica.settle(revision).await;
        let ttl_ms = ctx.session_ttl.as_millis() as u32;
        Ok(RegisterResponse {
            mobile_prefixes: ctx.mobile.to_strings(),
            heartbeat_interval_ms: ttl_ms / 4,
            session_ttl_ms: ttl_ms,
            revision,
            replica_id: replica.id.clone(),
        })
    }

    async fn heartbeat(&self, fe_id: &str) -> ApiResult<HeartbeatResponse> {
        let registry = &self.ctx.replica.registry;
        let fe = registry.registered_fe(fe_id).await?.ok_or_else(|| ApiError::NotFound(not_registered(fe_id)))?;
        match registry.keep_session_alive(&fe).await? {
            Some(ttl) => Ok(HeartbeatResponse { session_ttl_ms: ttl.as_millis() as u32 }),
            None => Err(ApiError::NotFound(format!("the session of FE {fe_id} expired; call Register again"))),
        }
    }

    async fn report(&self, req: ReportRequest) -> ApiResult<ReportResponse> {
        let received = monotonic_ns();
        let max = self.ctx.max_report_observations;
        if req.observations.len() > max {
            return Err(ApiError::InvalidArgument(format!(
                "{} observations in one Report; at most {max} — split the batch",
                req.observations.len()
            )));
        }
        let replica = &self.ctx.replica;
        let registry = &replica.registry;
        let fe = registry
            .registered_fe(&req.fe_id)
            .await?
            .ok_or_else(|| ApiError::FailedPrecondition(not_registered(&req.fe_id)))?;
        // An FE whose session expired is down for every replica: what it reports now must not
        // bind. The agent registers again on this answer and sends the batch again.
        if !replica.session_alive(&fe).await? {
            return Err(ApiError::FailedPrecondition(format!(
                "the session of FE {} expired; call Register again (nothing of this report was applied)",
                req.fe_id
            )));
        }
        let served: Vec<IpNet> = fe.record.mobile_prefixes.iter().filter_map(|p| p.parse().ok()).collect();
        // Per-IP observations first (their own grouping and order), then the MAC claims, each on
        // its own, in request order (victor.proto, OBSERVATION_KIND_MAC_LEARNED).
        let mut sent_ips: Vec<Vec<u8>> = Vec::with_capacity(req.observations.len());
        let (mut by_ip, mut by_mac) = (Vec::new(), Vec::new());
        for (i, obs) in req.observations.into_iter().enumerate() {
            if obs.kind == ObservationKind::MacLearned as i32 {
                by_mac.push((i, Self::validate_mac_claim(&obs)));
                sent_ips.push(obs.vm_ip);
                continue;
            }
            match self.validate(&obs, &served) {
                Ok(valid) => {
                    sent_ips.push(ip_to_bytes(valid.ip));
                    by_ip.push((i, Ok(valid)));
                }
                Err(rejection) => {
                    registry.count_refused(&rejection, crate::metrics::family_of_bytes(&obs.vm_ip));
                    sent_ips.push(obs.vm_ip);
                    by_ip.push((i, Err(rejection)));
                }
            }
        }
        let (ip_indices, checked): (Vec<usize>, Vec<_>) = by_ip.into_iter().unzip();
        let mut claims: Vec<Option<RegistryResult<Claim>>> = (0..sent_ips.len()).map(|_| None).collect();
        for (i, claim) in ip_indices.into_iter().zip(registry.report(&fe, checked, received).await) {
            claims[i] = Some(claim);
        }
        // MAC claims are decided on this replica's cache: it must show the per-IP writes of this
        // report first (a LEARNED in the same report may have just bound an IP of the MAC).
        if !by_mac.is_empty() {
            let written = claims.iter().flatten().filter_map(|c| c.as_ref().ok()).map(|c| c.revision).max();
            replica.settle(written.unwrap_or(0)).await;
        }
        for (i, valid) in by_mac {
            claims[i] = Some(match valid {
                Ok(claim) => registry.claim_mac(&fe, claim, |ip| self.admit(ip, &served), received).await,
                Err(rejection) => {
                    registry.count_refused(&rejection, crate::metrics::NO_FAMILY);
                    Ok(Claim::refused(rejection))
                }
            });
        }
        let claims: Vec<RegistryResult<Claim>> =
            claims.into_iter().map(|c| c.expect("every observation answered")).collect();
        // Read-your-writes: answer once this replica's cache shows every write of the report.
        replica.settle(claims.iter().filter_map(|c| c.as_ref().ok()).map(|c| c.revision).max().unwrap_or(0)).await;
        let results = sent_ips
            .into_iter()
            .zip(claims)
            .map(|(ip, claim)| match claim {
                Ok(claim) => wire::claim_result(ip, &claim),
                Err(err) => wire::claim_failure(ip, &Status::from(err)),
            })
            .collect();
        Ok(ReportResponse { results })
    }

    /// Checks a MAC claim: no IP, a unicast MAC, a usable time.
    fn validate_mac_claim(obs: &VmObservation) -> Result<ValidMacClaim, Rejection> {
        let invalid = |reason, message: String| Rejection::new(reason, Refusal::Invalid, message);
        if !obs.vm_ip.is_empty() {
            return Err(invalid(
                Reason::Malformed,
                "vm_ip must be empty in a MAC claim (OBSERVATION_KIND_MAC_LEARNED); send a LEARNED for one IP".into(),
            ));
        }
        let mac = Mac::from_bytes(&obs.mac).map_err(|e| invalid(Reason::Malformed, format!("mac: {e}")))?;
        if !mac.is_unicast() {
            return Err(invalid(Reason::Malformed, format!("MAC {mac} is not a unicast address")));
        }
        if obs.observed_at_unix_nanos <= 0 {
            return Err(invalid(
                Reason::BadTimestamp,
                format!("observation time {} ns is unusable; it must be positive", obs.observed_at_unix_nanos),
            ));
        }
        Ok(ValidMacClaim { mac, observed_at: obs.observed_at_unix_nanos, known_revision: obs.known_revision })
    }

    /// Whether `ip` may be bound at an FE serving `served`: a mobile host address inside them.
    fn admit(&self, ip: std::net::IpAddr, served: &[IpNet]) -> Result<(), Rejection> {
        let invalid = |message: String| Rejection::new(Reason::OutsideMobilePrefix, Refusal::Invalid, message);
        self.ctx.mobile.check_vm_ip(ip).map_err(invalid)?;
        if !is_host_in(ip, served) {
            return Err(invalid(format!("{ip} is outside the prefixes this FE registered to serve")));
        }
        Ok(())
    }

    /// Checks one observation's addresses and kind, and that its IP is a mobile host address
    /// this FE serves.
    fn validate(&self, obs: &VmObservation, served: &[IpNet]) -> Result<ValidObservation, Rejection> {
        let invalid = |reason, message: String| Rejection::new(reason, Refusal::Invalid, message);
        let ip = ip_from_bytes(&obs.vm_ip).map_err(|e| invalid(Reason::Malformed, format!("vm_ip: {e}")))?;
        let mac = Mac::from_bytes(&obs.mac).map_err(|e| invalid(Reason::Malformed, format!("mac: {e}")))?;
        let kind = match ObservationKind::try_from(obs.kind) {
            Ok(ObservationKind::Learned) => Observed::Learned,
            Ok(ObservationKind::Gone) => Observed::Gone,
            _ => return Err(invalid(Reason::Malformed, "kind must be LEARNED, GONE or MAC_LEARNED".into())),
        };
        self.admit(ip, served)?;
        Ok(ValidObservation {
            ip,
            mac,
            kind,
            observed_at: obs.observed_at_unix_nanos,
            known_revision: obs.known_revision,
        })
    }
}

fn not_registered(fe_id: &str) -> String {
    format!("FE {fe_id} is not registered; call AgentService.Register first")
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> AgentService for AgentApi<S> {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        validate::name("fe_id", &request.get_ref().fe_id)?;
        self.ctx.auth.authorize_fe(&request, &request.get_ref().fe_id)?;
        self.ctx.ready()?;
        Ok(Response::new(self.register(request.into_inner()).await?))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let fe_id = &request.get_ref().fe_id;
        validate::name("fe_id", fe_id)?;
        self.ctx.auth.authorize_fe(&request, fe_id)?;
        self.ctx.ready()?;
        Ok(Response::new(self.heartbeat(fe_id).await?))
    }

    async fn report(&self, request: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        validate::name("fe_id", &request.get_ref().fe_id)?;
        self.ctx.auth.authorize_fe(&request, &request.get_ref().fe_id)?;
        self.ctx.ready()?;
        Ok(Response::new(self.report(request.into_inner()).await?))
    }

    type SyncStream = SyncStream;

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<Self::SyncStream>, Status> {
        // The same messages as [`AgentGrpc`] sends, decoded for tonic to encode again.
        let decoded = self.open_sync(request).await?.map(|framed| {
            framed.and_then(|bytes| {
                SyncUpdate::decode(&bytes[GRPC_PREFIX_LEN..]).map_err(|e| Status::internal(e.to_string()))
            })
        });
        Ok(Response::new(Box::pin(decoded)))
    }
}

impl<S: Store> AgentApi<S> {
    /// Checks a Sync request and starts its stream (gRPC-framed messages).
    async fn open_sync(&self, request: Request<SyncRequest>) -> Result<Pump<Bytes>, Status> {
        let req = request.get_ref();
        validate::name("fe_id", &req.fe_id)?;
        self.ctx.auth.authorize_fe(&request, &req.fe_id)?;
        self.ctx.ready()?;
        let replica = &self.ctx.replica;
        if replica.registry.registered_fe(&req.fe_id).await?.is_none() {
            return Err(ApiError::FailedPrecondition(not_registered(&req.fe_id)).into());
        }
        let ticket = self.ctx.admit(StreamKind::Agent, &request)?;
        let ctx = SyncContext {
            cache: replica.cache.clone(),
            metrics: replica.metrics.clone(),
            timelines: replica.timelines.clone(),
            mobile_prefixes: self.ctx.mobile.to_strings(),
            shutdown: replica.shutdown.clone(),
            backfill: replica.backfill.clone(),
            pacer: self.ctx.pacer.clone(),
            clock: self.ctx.clock.clone(),
        };
        let req = request.into_inner();
        Ok(sync::start(ctx, req.fe_id, req.from_revision, ticket))
    }
}

const SYNC_PATH: &str = "/victor.v1.AgentService/Sync";

/// The AgentService with pre-encoded `Sync` streams; add it to a tonic server in place of
/// `AgentServiceServer::new(AgentApi::new(ctx))`.
pub struct AgentGrpc<S: Store> {
    api: Arc<AgentApi<S>>,
    generated: AgentServiceServer<AgentApi<S>>,
    max_decoding_message_size: usize,
}

impl<S: Store> AgentGrpc<S> {
    /// Serves from `ctx`; requests larger than `max_decoding_message_size` are refused.
    pub fn new(ctx: Arc<ApiContext<S>>, max_decoding_message_size: usize) -> Self {
        let api = Arc::new(AgentApi::new(ctx));
        let generated = AgentServiceServer::from_arc(api.clone()).max_decoding_message_size(max_decoding_message_size);
        AgentGrpc { api, generated, max_decoding_message_size }
    }
}

impl<S: Store> Clone for AgentGrpc<S> {
    fn clone(&self) -> Self {
        AgentGrpc {
            api: self.api.clone(),
            generated: self.generated.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

impl<S: Store> NamedService for AgentGrpc<S> {
    const NAME: &'static str = "victor.v1.AgentService";
}

impl<S: Store, B> Service<http::Request<B>> for AgentGrpc<S>
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SYNC_PATH {
            return self.generated.call(req);
        }
        let api = self.api.clone();
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let request = match body::read_request::<SyncRequest, _>(req, max).await {
                Ok(request) => request,
                Err(status) => return Ok(status.into_http()),
            };
            Ok(match api.open_sync(request).await {
                Ok(stream) => body::response(stream),
                Err(status) => status.into_http(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use tonic::transport::Channel;
    use victor_proto::v1::agent_service_client::AgentServiceClient;
    use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};

    use super::*;
    use crate::cache::{Cache, loader};
    use crate::keys::Keys;
    use crate::lease::KeptLease;
    use crate::metrics::Metrics;
    use crate::move_timeline::MoveTimelines;
    use crate::registry::Registry;
    use crate::registry::rules::Rules;
    use crate::replica::Replica;

    /// A replica on the embedded store serving only [`AgentGrpc`].
    async fn serve(dir: &std::path::Path) -> (AgentServiceClient<Channel>, tokio::sync::watch::Sender<bool>) {
        let store = EmbeddedStore::open(&dir.join("s.redb"), EmbeddedOptions::default()).await.unwrap();
        let cache = Cache::new(Keys::new("/t"), 10_000);
        let metrics = Arc::new(Metrics::new());
        let timelines = Arc::new(MoveTimelines::new(64));
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let presence = loader::Presence {
            replica_id: "r1".into(),
            grpc_addr: String::new(),
            lease: KeptLease::new(store.clone(), Duration::from_secs(5)),
        };
        tokio::spawn(loader::run(store.clone(), cache.clone(), presence, shutdown_rx.clone()));
        while !cache.is_loaded() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let backfill = Arc::new(crate::cache::backfill::Backfiller::new(store.clone(), cache.clone(), "r1".into()));
        let clock = Arc::new(crate::stream::clock::FanoutClock::new());
        tokio::spawn({
            let (clock, cache, metrics, shutdown) =
                (clock.clone(), cache.clone(), metrics.clone(), shutdown_rx.clone());
            async move { clock.run(&cache, &metrics, shutdown).await }
        });
        let replica = Arc::new(Replica {
            id: "r1".into(),
            registry: Registry::new(store, cache.clone(), Rules::default(), metrics.clone(), timelines.clone()),
            cache,
            metrics,
            timelines,
            store_reachable: Arc::new(AtomicBool::new(true)),
            is_housekeeper: Arc::new(AtomicBool::new(false)),
            shutdown: shutdown_rx,
            backfill,
        });
        let ctx = Arc::new(ApiContext {
            replica,
            mobile: super::validate::MobilePrefixes::new(vec!["10.10.0.0/16".parse().unwrap()]),
            session_ttl: Duration::from_secs(10),
            max_report_observations: 1024,
            auth: Default::default(),
            admission: crate::stream::admission::Admission::new(
                crate::stream::admission::StreamLimits { per_connection: 8, agent: 8, watch: 8 },
                Arc::new(Metrics::new()),
            ),
            pacer: Arc::new(crate::stream::pacer::SnapshotPacer::new(0)),
            clock: clock.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = AgentGrpc::new(ctx, 4 << 20);
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        (AgentServiceClient::new(channel), shutdown)
    }

    fn learn(fe: &str, last: u8) -> ReportRequest {
        ReportRequest {
            fe_id: fe.into(),
            observations: vec![VmObservation {
                vm_ip: vec![10, 10, 0, last],
                mac: vec![2, 0, 0, 0, 0, last],
                kind: ObservationKind::Learned as i32,
                observed_at_unix_nanos: victor_proto::clock::unix_nanos(),
                port: "p".into(),
                known_revision: None,
            }],
        }
    }

    async fn next(stream: &mut tonic::Streaming<SyncUpdate>, pred: impl Fn(&SyncUpdate) -> bool) -> SyncUpdate {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let msg = stream.message().await.unwrap().unwrap();
                if pred(&msg) {
                    return msg;
                }
            }
        })
        .await
        .expect("message in time")
    }

    #[tokio::test]
    async fn pre_encoded_sync_reads_as_the_standard_message_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut client, _shutdown) = serve(dir.path()).await;
        for (fe, n) in [("fe1", 1u8), ("fe2", 2)] {
            let req = RegisterRequest {
                fe_id: fe.into(),
                underlay_addr: format!("192.0.2.{n}"),
                site: "a".into(),
                ..Default::default()
            };
            client.register(req).await.unwrap();
        }
        let bound = client.report(learn("fe2", 11)).await.unwrap().into_inner().results.remove(0);
        assert_eq!(bound.outcome, ClaimOutcome::Bound as i32);

        let req = SyncRequest { fe_id: "fe1".into(), from_revision: 0 };
        let mut stream = client.sync(req).await.unwrap().into_inner();
        let snapshot = next(&mut stream, |m| m.phase == SyncPhase::SnapshotEnd as i32).await;
        assert!(snapshot.reset && snapshot.revision >= bound.revision);
        assert_eq!(snapshot.mobile_prefixes, vec!["10.10.0.0/16".to_string()]);
        assert_eq!(snapshot.fe_upserts.len(), 2);
        assert_eq!(snapshot.binding_upserts.len(), 1);
        assert_eq!(
            (snapshot.binding_upserts[0].fe_id.as_str(), snapshot.binding_upserts[0].vm_ip.as_slice()),
            ("fe2", &[10, 10, 0, 11][..])
        );

        let moved = client.report(learn("fe1", 11)).await.unwrap().into_inner().results.remove(0);
        assert_eq!(moved.outcome, ClaimOutcome::Moved as i32);
        let delta = next(&mut stream, |m| !m.binding_upserts.is_empty()).await;
        assert_eq!(delta.phase, SyncPhase::Delta as i32);
        assert!(delta.revision >= moved.revision);
        let entry = &delta.binding_upserts[0];
        assert_eq!((entry.fe_id.as_str(), entry.move_seq, entry.revision), ("fe1", 1, moved.revision));

        // Another stream resumes after the snapshot's revision: the move only, no snapshot.
        let req = SyncRequest { fe_id: "fe2".into(), from_revision: snapshot.revision };
        let mut resumed = client.sync(req).await.unwrap().into_inner();
        let first = resumed.message().await.unwrap().unwrap();
        assert_eq!(first.phase, SyncPhase::Delta as i32, "{first:?}");
        assert_eq!(first.binding_upserts, delta.binding_upserts);

        // Bad requests still get precise errors on the pre-encoded path.
        let err = client.sync(SyncRequest { fe_id: "bad id!".into(), from_revision: 0 }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
}
