//! `victor.v1.BindingService`: declare VMs, announce (and cancel) migrations, read and watch
//! bindings, list and remove FEs.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};
use victor_proto::v1::binding_service_server::BindingService;
use victor_proto::v1::*;
use victor_store::Store;

use super::auth::Role;
use super::error::{ApiError, ApiResult};
use super::{ApiContext, validate};
use crate::filter::{self, BindingFilter};
use crate::records::VmRecord;
use crate::stream::admission::StreamKind;
use crate::stream::bindings::{self as watch, WatchContext, WatchSpec};
use crate::wire;

/// Default lifetime of a migration announcement.
const DEFAULT_ANNOUNCE_TTL: u32 = 300;
/// Longest lifetime of a migration announcement.
const MAX_ANNOUNCE_TTL: u32 = 3600;

/// The BindingService implementation.
pub struct BindingApi<S: Store> {
    ctx: Arc<ApiContext<S>>,
}

impl<S: Store> BindingApi<S> {
    /// Serves from `ctx`.
    pub fn new(ctx: Arc<ApiContext<S>>) -> Self {
        BindingApi { ctx }
    }

    fn guard<T>(&self, request: &Request<T>, role: Role) -> ApiResult<()> {
        self.ctx.auth.authorize_role(request, role)?;
        self.ctx.ready()
    }

    fn binding_of(&self, ip: IpAddr) -> ApiResult<Binding> {
        self.ctx
            .replica
            .cache
            .read(|s| s.bindings.get(&ip).map(|b| wire::binding(s, ip, b)))
            .ok_or_else(|| ApiError::NotFound(format!("VM {ip} has no binding")))
    }

    async fn declare(&self, req: DeclareVmRequest) -> ApiResult<Vm> {
        let ip = validate::vm_ip(&req.vm_ip, &self.ctx.mobile)?;
        let mac = validate::vm_mac(&req.mac)?;
        let sites = req.site_policy.map(|p| p.allowed_sites).unwrap_or_default();
        if sites.len() > validate::MAX_POLICY_SITES {
            return Err(ApiError::InvalidArgument(format!(
                "site_policy lists {} sites; at most {}",
                sites.len(),
                validate::MAX_POLICY_SITES
            )));
        }
        for site in &sites {
            validate::name("site_policy.allowed_sites entry", site)?;
        }
        if req.description.len() > validate::MAX_DESCRIPTION_LEN {
            return Err(ApiError::InvalidArgument(format!(
                "description is {} bytes; at most {}",
                req.description.len(),
                validate::MAX_DESCRIPTION_LEN
            )));
        }
        let record = VmRecord { mac: mac.octets().to_vec(), allowed_sites: sites, description: req.description };
        let replica = &self.ctx.replica;
        let revision = replica.registry.declare(ip, record).await?;
        replica.settle(revision).await;
        replica.cache.read(|s| s.vms.get(&ip).map(|v| wire::vm(ip, v))).ok_or_else(|| {
            ApiError::Unavailable("declaration committed but not yet visible; retry GetBinding/ListVms".into())
        })
    }

    async fn announce(&self, req: AnnounceMigrationRequest) -> ApiResult<Binding> {
        let ip = validate::vm_ip(&req.vm_ip, &self.ctx.mobile)?;
        validate::name("target_fe_id", &req.target_fe_id)?;
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_ANNOUNCE_TTL,
            t if t > MAX_ANNOUNCE_TTL => {
                return Err(ApiError::InvalidArgument(format!(
                    "ttl_seconds {t} is too long; at most {MAX_ANNOUNCE_TTL}"
                )));
            }
            t => t,
        };
        let replica = &self.ctx.replica;
        let ttl = Duration::from_secs(u64::from(ttl));
        let revision = replica.registry.announce(ip, &req.target_fe_id, req.commit, ttl).await?;
        replica.settle(revision).await;
        self.binding_of(ip)
    }

    async fn clear(&self, req: ClearDampingRequest) -> ApiResult<Binding> {
        let ip = validate::vm_ip(&req.vm_ip, &self.ctx.mobile)?;
        let replica = &self.ctx.replica;
        let revision = replica.registry.clear_damping(ip).await?;
        replica.settle(revision).await;
        self.binding_of(ip)
    }

    async fn cancel(&self, req: CancelMigrationRequest) -> ApiResult<CancelMigrationResponse> {
        let ip = validate::vm_ip(&req.vm_ip, &self.ctx.mobile)?;
        let expected = if req.target_fe_id.is_empty() {
            None
        } else {
            validate::name("target_fe_id", &req.target_fe_id)?;
            Some(req.target_fe_id.as_str())
        };
        let replica = &self.ctx.replica;
        let (revision, cancelled_fe_id) = replica.registry.cancel_announcement(ip, expected).await?;
        replica.settle(revision).await;
        Ok(CancelMigrationResponse { binding: Some(self.binding_of(ip)?), cancelled_fe_id, revision })
    }

    async fn remove(&self, req: RemoveFeRequest) -> ApiResult<RemoveFeResponse> {
        validate::name("fe_id", &req.fe_id)?;
        let replica = &self.ctx.replica;
        let removed = replica.registry.remove_fe(&req.fe_id, req.force).await?;
        replica.settle(removed.last_revision).await;
        Ok(RemoveFeResponse {
            revision: removed.revision,
            removed_bindings: removed.removed_bindings,
            cancelled_announcements: removed.cancelled_announcements,
        })
    }

    fn binding_filter(req: &ListBindingsRequest) -> ApiResult<BindingFilter> {
        let fe_id = if req.fe_id.is_empty() {
            None
        } else {
            validate::name("fe_id", &req.fe_id)?;
            Some(req.fe_id.clone())
        };
        let source = match BindingSource::try_from(req.source) {
            Ok(BindingSource::Unspecified) => None,
            Ok(source) => Some(source as u8),
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "source {} is not a BindingSource: use BINDING_SOURCE_ARP (1) or BINDING_SOURCE_ORCHESTRATOR (2), \
                     or leave it unset for any source",
                    req.source
                )));
            }
        };
        Ok(BindingFilter { prefix: validate::filter_prefix("prefix", &req.prefix)?, fe_id, frozen: req.frozen, source })
    }

    fn list_bindings_page(&self, req: ListBindingsRequest) -> ApiResult<ListBindingsResponse> {
        let size = validate::page_size(req.page_size)?;
        let after = validate::page_token(&req.page_token)?;
        let filter = Self::binding_filter(&req)?;
        let (page, revision) = self.ctx.replica.cache.read_with_revision(|s| {
            filter::page(filter.range(&s.bindings, after), size, filter::SCAN_BUDGET, |ip, b| {
                filter.matches(ip, b).then(|| wire::binding(s, *ip, b))
            })
        });
        Ok(ListBindingsResponse {
            bindings: page.items.into_iter().map(|(_, b)| b).collect(),
            next_page_token: page.next.map(|ip| ip.to_string()).unwrap_or_default(),
            revision,
        })
    }

    fn list_vms_page(&self, req: ListVmsRequest) -> ApiResult<ListVmsResponse> {
        let size = validate::page_size(req.page_size)?;
        let after = validate::page_token(&req.page_token)?;
        let prefix = validate::filter_prefix("prefix", &req.prefix)?;
        let page = self.ctx.replica.cache.read(|s| {
            filter::page(filter::range_after(&s.vms, prefix, after), size, filter::SCAN_BUDGET, |ip, v| {
                Some(wire::vm(*ip, v))
            })
        });
        Ok(ListVmsResponse {
            vms: page.items.into_iter().map(|(_, v)| v).collect(),
            next_page_token: page.next.map(|ip| ip.to_string()).unwrap_or_default(),
        })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBindingsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> BindingService for BindingApi<S> {
    async fn declare_vm(&self, request: Request<DeclareVmRequest>) -> Result<Response<DeclareVmResponse>, Status> {
        self.guard(&request, Role::ReadWrite)?;
        let vm = self.declare(request.into_inner()).await?;
        Ok(Response::new(DeclareVmResponse { vm: Some(vm) }))
    }

    async fn undeclare_vm(
        &self,
        request: Request<UndeclareVmRequest>,
    ) -> Result<Response<UndeclareVmResponse>, Status> {
        self.guard(&request, Role::ReadWrite)?;
        let req = request.into_inner();
        let ip = validate::vm_ip(&req.vm_ip, &self.ctx.mobile)?;
        let replica = &self.ctx.replica;
        let revision = replica.registry.undeclare(ip, req.remove_binding).await?;
        replica.settle(revision).await;
        Ok(Response::new(UndeclareVmResponse { revision }))
    }

    async fn announce_migration(
        &self,
        request: Request<AnnounceMigrationRequest>,
    ) -> Result<Response<AnnounceMigrationResponse>, Status> {
        self.guard(&request, Role::ReadWrite)?;
        let binding = self.announce(request.into_inner()).await?;
        Ok(Response::new(AnnounceMigrationResponse { binding: Some(binding) }))
    }

    async fn get_binding(&self, request: Request<GetBindingRequest>) -> Result<Response<Binding>, Status> {
        self.guard(&request, Role::ReadOnly)?;
        let ip = validate::vm_ip(&request.get_ref().vm_ip, &self.ctx.mobile)?;
        Ok(Response::new(self.binding_of(ip)?))
    }

    async fn list_bindings(
        &self,
        request: Request<ListBindingsRequest>,
    ) -> Result<Response<ListBindingsResponse>, Status> {
        self.guard(&request, Role::ReadOnly)?;
        Ok(Response::new(self.list_bindings_page(request.into_inner())?))
    }

    type WatchBindingsStream = WatchStream;

    async fn watch_bindings(
        &self,
        request: Request<WatchBindingsRequest>,
    ) -> Result<Response<Self::WatchBindingsStream>, Status> {
        self.guard(&request, Role::ReadOnly)?;
        let ticket = self.ctx.admit(StreamKind::Watch, &request)?;
        let req = request.into_inner();
        let prefix = validate::filter_prefix("prefix", &req.prefix)?;
        let fe_id = if req.fe_id.is_empty() {
            None
        } else {
            validate::name("fe_id", &req.fe_id)?;
            Some(req.fe_id)
        };
        if req.from_revision > self.ctx.replica.cache.revision() + 1_000_000 {
            return Err(ApiError::InvalidArgument(format!(
                "from_revision {} is in the future (current {})",
                req.from_revision,
                self.ctx.replica.cache.revision()
            ))
            .into());
        }
        let spec =
            WatchSpec { from_revision: req.from_revision, include_snapshot: req.include_snapshot, prefix, fe_id };
        let replica = &self.ctx.replica;
        let ctx = WatchContext {
            cache: replica.cache.clone(),
            metrics: replica.metrics.clone(),
            shutdown: replica.shutdown.clone(),
            backfill: replica.backfill.clone(),
            pacer: self.ctx.pacer.clone(),
        };
        Ok(Response::new(Box::pin(watch::start(ctx, spec, ticket))))
    }

    async fn list_vms(&self, request: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        self.guard(&request, Role::ReadOnly)?;
        Ok(Response::new(self.list_vms_page(request.into_inner())?))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        self.guard(&request, Role::ReadOnly)?;
        let ip = validate::vm_ip(&request.get_ref().vm_ip, &self.ctx.mobile)?;
        let vm = self.ctx.replica.cache.read(|s| s.vms.get(&ip).map(|v| wire::vm(ip, v)));
        Ok(Response::new(vm.ok_or_else(|| {
            ApiError::NotFound(format!(
                "VM {ip} is not declared (DeclareVm declares it; a VM learned from ARP has a binding without a \
                 declaration: GetBinding)"
            ))
        })?))
    }

    async fn cancel_migration(
        &self,
        request: Request<CancelMigrationRequest>,
    ) -> Result<Response<CancelMigrationResponse>, Status> {
        self.guard(&request, Role::ReadWrite)?;
        Ok(Response::new(self.cancel(request.into_inner()).await?))
    }

    async fn remove_fe(&self, request: Request<RemoveFeRequest>) -> Result<Response<RemoveFeResponse>, Status> {
        self.guard(&request, Role::ReadWrite)?;
        Ok(Response::new(self.remove(request.into_inner()).await?))
    }

    async fn list_fes(&self, request: Request<ListFesRequest>) -> Result<Response<ListFesResponse>, Status> {
        self.guard(&request, Role::ReadOnly)?;
        let fes = self.ctx.replica.cache.read(|s| s.fes.values().map(|f| wire::fe(s, f)).collect());
        Ok(Response::new(ListFesResponse { fes }))
    }

    async fn clear_damping(
        &self,
        request: Request<ClearDampingRequest>,
    ) -> Result<Response<ClearDampingResponse>, Status> {
        self.guard(&request, Role::ReadWrite)?;
        let binding = self.clear(request.into_inner()).await?;
        Ok(Response::new(ClearDampingResponse { binding: Some(binding) }))
    }

    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        self.ctx.auth.authorize_role(&request, Role::ReadOnly)?;
        let replica = &self.ctx.replica;
        let (binding_count, fe_count, housekeeper_id) = replica.cache.read(|s| {
            (
                s.bindings.len() as u64,
                s.fes.len() as u64,
                s.housekeeper.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
            )
        });
        Ok(Response::new(GetStatusResponse {
            replica_id: replica.id.clone(),
            store_kind: replica.registry.store().kind().to_owned(),
            store_reachable: replica.store_reachable.load(Ordering::Relaxed),
            cache_revision: replica.cache.revision(),
            housekeeper_id,
            binding_count,
            fe_count,
            agent_streams: replica.metrics.agent_streams.get().max(0) as u64,
            mobile_prefixes: self.ctx.mobile.to_strings(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }
}
