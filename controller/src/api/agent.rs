//! `victor.v1.AgentService`: FE registration and liveness, VM reports, desired-state stream.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ipnet::IpNet;
use prost::Message;
use tonic::{Request, Response, Status};
use victor_proto::Mac;
use victor_proto::clock::monotonic_ns;
use victor_proto::types::ip_from_bytes;
use victor_proto::v1::agent_service_server::AgentService;
use victor_proto::v1::*;
use victor_store::{Store, StoreError, Txn, TxnOp};

use super::ApiContext;
use super::error::{ApiError, ApiResult};
use super::validate::{self, is_host_in};
use crate::cache::FeView;
use crate::records::{FeRecord, SessionRecord, now_unix_nanos};
use crate::registry::ValidObservation;
use crate::registry::rules::Observed;
use crate::stream::agent::{self as sync, SyncContext};

/// Observations of one Report processed concurrently: enough to fill several group-committed
/// transactions (`registry::batch`) from a single Report.
const REPORT_CONCURRENCY: usize = 4 * crate::registry::batch::MAX_BATCH;

/// The AgentService implementation.
pub struct AgentApi<S: Store> {
    ctx: Arc<ApiContext<S>>,
}

impl<S: Store> AgentApi<S> {
    /// Serves from `ctx`.
    pub fn new(ctx: Arc<ApiContext<S>>) -> Self {
        AgentApi { ctx }
    }

    /// The FE's registration from the cache, or from the store if this replica has not seen it yet.
    async fn registered_fe(&self, fe_id: &str) -> ApiResult<FeView> {
        if let Some(fe) = self.ctx.cache.read(|s| s.fes.get(fe_id).cloned()) {
            return Ok(fe);
        }
        let key = self.ctx.cache.keys().fe(fe_id);
        let (kv, _) = self.ctx.registry.store().get(&key).await?;
        let kv = kv.ok_or_else(|| {
            ApiError::FailedPrecondition(format!("FE {fe_id} is not registered; call AgentService.Register first"))
        })?;
        let record = FeRecord::decode(kv.value.as_slice())
            .map_err(|e| ApiError::Internal(format!("stored FE {fe_id} is corrupt: {e}")))?;
        let underlay = ip_from_bytes(&record.underlay_addr).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(FeView { fe_id: fe_id.into(), underlay, record, revision: kv.mod_revision, session_revision: 0 })
    }

    async fn register(&self, req: RegisterRequest) -> ApiResult<RegisterResponse> {
        let ctx = &self.ctx;
        let underlay: IpAddr = req.underlay_addr.trim().parse().map_err(|_| {
            ApiError::InvalidArgument(format!("underlay_addr {:?} is not an IP address", req.underlay_addr))
        })?;
        if underlay.is_unspecified() || underlay.is_multicast() {
            return Err(ApiError::InvalidArgument(format!(
                "underlay_addr {underlay} cannot be a tunnel endpoint (unspecified or multicast)"
            )));
        }
        validate::name("site", &req.site)?;
        if req.agent_version.len() > validate::MAX_NAME_LEN {
            return Err(ApiError::InvalidArgument("agent_version is too long (at most 63 bytes)".into()));
        }
        let mut prefixes = Vec::with_capacity(req.mobile_prefixes.len());
        for text in &req.mobile_prefixes {
            let net: IpNet = text.parse().map_err(|_| {
                ApiError::InvalidArgument(format!("mobile prefix {text:?} is not a CIDR prefix like 10.10.0.0/16"))
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
        let (previous, clash) = ctx.cache.read(|s| {
            let previous = s.fes.get(req.fe_id.as_str()).map(|f| f.record.session_lease);
            let clash =
                s.fes.values().find(|f| f.underlay == underlay && *f.fe_id != *req.fe_id).map(|f| f.fe_id.to_string());
            (previous, clash)
        });
        if let Some(other) = clash {
            return Err(ApiError::FailedPrecondition(format!(
                "underlay_addr {underlay} is already registered by FE {other}; every FE needs its own underlay address"
            )));
        }
        let lease = ctx.registry.store().lease_grant(ctx.session_ttl).await.map_err(ApiError::from)?;
        let keys = ctx.cache.keys();
        let record = FeRecord {
            underlay_addr: victor_proto::types::ip_to_bytes(underlay),
            site: req.site,
            mobile_prefixes: prefixes,
            registered_at_unix_nanos: now_unix_nanos(),
            agent_version: req.agent_version,
            session_lease: lease,
        };
        let session = SessionRecord { replica_id: ctx.replica_id.clone(), opened_at_unix_nanos: now_unix_nanos() };
        let txn = Txn {
            success: vec![
                TxnOp::put(keys.fe(&req.fe_id), record.encode_to_vec()),
                TxnOp::Put { key: keys.session(&req.fe_id), value: session.encode_to_vec(), lease },
            ],
            ..Default::default()
        };
        let result = ctx.registry.txn(txn).await?;
        if let Some(old) = previous.filter(|old| *old != lease && *old != 0) {
            // The old session's key now hangs on the new lease; drop the orphaned lease early.
            let _ = ctx.registry.store().lease_revoke(old).await;
        }
        tracing::info!(fe_id = %req.fe_id, %underlay, "FE registered");
        ctx.settle(result.revision).await;
        let ttl_ms = ctx.session_ttl.as_millis() as u32;
        Ok(RegisterResponse {
            mobile_prefixes: ctx.mobile.to_strings(),
            heartbeat_interval_ms: ttl_ms / 4,
            session_ttl_ms: ttl_ms,
            revision: result.revision,
            replica_id: ctx.replica_id.clone(),
        })
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
        let fe = self.registered_fe(&req.fe_id).await?;
        let served: Vec<IpNet> = fe.record.mobile_prefixes.iter().filter_map(|p| p.parse().ok()).collect();
        let fe = &fe;
        let served = &served;
        let results = futures::stream::iter(req.observations)
            .map(|obs| async move {
                match self.validate(obs, served) {
                    Ok(valid) => self.ctx.registry.observe(fe, valid, received).await,
                    Err((ip, reason, message)) => {
                        self.ctx.metrics.claim("rejected");
                        self.ctx.metrics.rejected(reason);
                        ClaimResult {
                            vm_ip: ip,
                            outcome: ClaimOutcome::Rejected as i32,
                            reject_reason: reason as i32,
                            code: tonic::Code::InvalidArgument as i32,
                            message,
                            ..Default::default()
                        }
                    }
                }
            })
            .buffered(REPORT_CONCURRENCY)
            .collect()
            .await;
        Ok(ReportResponse { results })
    }

    fn validate(
        &self,
        obs: VmObservation,
        served: &[IpNet],
    ) -> Result<ValidObservation, (Vec<u8>, RejectReason, String)> {
        let ip = match ip_from_bytes(&obs.vm_ip) {
            Ok(ip) => ip,
            Err(e) => return Err((obs.vm_ip, RejectReason::Malformed, format!("vm_ip: {e}"))),
        };
        let mac = match Mac::from_bytes(&obs.mac) {
            Ok(mac) => mac,
            Err(e) => return Err((obs.vm_ip, RejectReason::Malformed, format!("mac: {e}"))),
        };
        let kind = match ObservationKind::try_from(obs.kind) {
            Ok(ObservationKind::Learned) => Observed::Learned,
            Ok(ObservationKind::Gone) => Observed::Gone,
            _ => return Err((obs.vm_ip, RejectReason::Malformed, "kind must be LEARNED or GONE".into())),
        };
        if let Err(message) = self.ctx.mobile.check_vm_ip(ip) {
            return Err((obs.vm_ip, RejectReason::OutsideMobilePrefix, message));
        }
        if !is_host_in(ip, served) {
            return Err((
                obs.vm_ip,
                RejectReason::OutsideMobilePrefix,
                format!("{ip} is outside the prefixes this FE registered to serve"),
            ));
        }
        Ok(ValidObservation { ip, mac, kind, observed_at: obs.observed_at_unix_nanos })
    }
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
        let fe = self.registered_fe(fe_id).await.map_err(|e| match e {
            ApiError::FailedPrecondition(m) => ApiError::NotFound(m),
            other => other,
        })?;
        match self.ctx.registry.store().lease_keep_alive(fe.record.session_lease).await {
            Ok(ttl) => Ok(Response::new(HeartbeatResponse { session_ttl_ms: ttl.as_millis() as u32 })),
            Err(StoreError::LeaseNotFound(_)) => {
                Err(ApiError::NotFound(format!("the session of FE {fe_id} expired; call Register again")).into())
            }
            Err(err) => Err(ApiError::from(err).into()),
        }
    }

    async fn report(&self, request: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        validate::name("fe_id", &request.get_ref().fe_id)?;
        self.ctx.auth.authorize_fe(&request, &request.get_ref().fe_id)?;
        self.ctx.ready()?;
        Ok(Response::new(self.report(request.into_inner()).await?))
    }

    type SyncStream = SyncStream;

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<Self::SyncStream>, Status> {
        let req = request.get_ref();
        validate::name("fe_id", &req.fe_id)?;
        self.ctx.auth.authorize_fe(&request, &req.fe_id)?;
        self.ctx.ready()?;
        let ctx = SyncContext {
            cache: self.ctx.cache.clone(),
            metrics: self.ctx.metrics.clone(),
            traces: self.ctx.traces.clone(),
            mobile_prefixes: self.ctx.mobile.to_strings(),
            shutdown: self.ctx.shutdown.clone(),
        };
        let req = request.into_inner();
        Ok(Response::new(Box::pin(sync::start(ctx, req.fe_id, req.from_revision))))
    }
}
