//! etcd backend (etcd-client 0.21): the [`Store`] contract mapped onto etcd's v3 API.
//!
//! * One etcd-client [`Client`](etcd_client::Client) over every endpoint (tonic's balancer
//!   spreads calls; a call that fails before reaching a member is retried and lands on another
//!   one, so a killed member — even the leader — does not make the store unusable).
//! * Every call has one deadline (`request_timeout`) for all its attempts; connection failures
//!   and deadlines become [`StoreError::Unavailable`] naming the endpoints (`call.rs`).
//! * Transactions are checked before sending (size, keys) exactly like the embedded store.
//! * Linearizable reads; `current_revision` is a count-only range of one key (the readiness
//!   probe: it needs a leader).
//! * Lease keep-alives are one-shot rounds on a reused stream per lease (`lease.rs`).
//! * Watches: see `watch.rs`.
//!
//! Cloning is cheap: clones share the client, its connections and the keep-alive streams.
//!
//! etcd 3.4 behaviours this backend is built around (each covered by a test):
//! * A write sent to a follower right after the leader died is forwarded to the dead leader and
//!   lost; etcd answers only when its own timeout (5 s + 2 election timeouts) fires. The caller
//!   sees `Unavailable` (outcome unknown) at our deadline, so `request_timeout` bounds the write
//!   stall of a leader failover (1–2 s is a good value when failover latency matters).
//! * etcd closes connections that ping more often than `--grpc-keepalive-min-time` (5 s) or ping
//!   while idle (`too_many_pings`): HTTP/2 keep-alive stays ≥ 5 s and only on busy connections.
//! * `--max-txn-ops` (128) limits compares, success and failure ops each, not their sum.
//! * A `Value` compare on a missing key is false whatever the operator.
//! * There is no empty key: "from the first key" is `"\0"`.
//! * Range responses over 4 MiB need a raised client decode limit (set to 1 GiB here).
//! * Watches: see `watch.rs` (compaction reported after `created`; progress notifications).

mod call;
mod convert;
mod lease;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use etcd_client as ec;

use self::call::{CallPolicy, Idempotent};
use self::convert::{get_options, header_revision, key_value, to_i64, to_u64};
use self::lease::KeepAlives;
use crate::validate::{check_range, check_txn};
use crate::{
    KeyRange, LeaseId, RangeRequest, RangeResult, Revision, Store, StoreError, StoreResult, Txn, TxnOp, TxnResult,
    WatchStream,
};

/// Biggest range response accepted (a cold-start read of every binding in one go).
const MAX_RANGE_MESSAGE: usize = 1024 * 1024 * 1024;

/// TLS towards etcd's client port (etcd's `--cert-file`/`--trusted-ca-file` setup).
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// PEM of the CA that signed the etcd servers' certificates.
    pub ca_cert_pem: Vec<u8>,
    /// PEM certificate and private key presented to etcd (`--client-cert-auth`), if any.
    pub client_cert_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to check the servers' certificates against (default: each endpoint's host).
    pub domain_name: Option<String>,
}

/// How to reach the etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379` (`https://` with [`EtcdConfig::tls`]).
    pub endpoints: Vec<String>,
    /// Deadline of each request, retries included.
    pub request_timeout: Duration,
    /// Deadline of connection establishment.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval on busy connections, to notice a dead peer. Keep it at or above
    /// etcd's `--grpc-keepalive-min-time` (5 s), or etcd closes the connection (too many pings).
    pub keepalive_interval: Duration,
    /// TLS towards etcd (`None` = plain HTTP).
    pub tls: Option<EtcdTls>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// etcd-backed store.
#[derive(Clone)]
pub struct EtcdStore {
    /// Boxed: etcd-client's client is several KiB, and every store handle is cloned around.
    client: Arc<ec::Client>,
    policy: CallPolicy,
    keep_alives: Arc<KeepAlives>,
}

impl EtcdStore {
    /// Connects to the cluster. Connections are made lazily; this fails only on a bad
    /// configuration. Use [`Store::current_revision`] to check that etcd answers.
    pub async fn connect(config: EtcdConfig) -> StoreResult<Self> {
        if config.endpoints.is_empty() {
            return Err(StoreError::InvalidArgument("no etcd endpoint given (e.g. http://127.0.0.1:2379)".into()));
        }
        let mut opts = ec::ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(config.keepalive_interval, config.request_timeout)
            .with_tcp_keepalive(config.keepalive_interval);
        if let Some(tls) = &config.tls {
            opts = opts.with_tls(tls_options(tls));
        }
        let endpoints = config.endpoints.join(",");
        let client = ec::Client::connect(&config.endpoints, Some(opts))
            .await
            .map_err(|e| StoreError::InvalidArgument(format!("etcd endpoints {endpoints}: {e}")))?;
        Ok(EtcdStore {
            client: Arc::new(client),
            policy: CallPolicy { endpoints, timeout: config.request_timeout },
            keep_alives: Arc::default(),
        })
    }

    fn kv(&self) -> ec::KvClient {
        self.client.kv_client().max_decoding_message_size(MAX_RANGE_MESSAGE)
    }
}

fn tls_options(tls: &EtcdTls) -> ec::TlsOptions {
    let mut opts = ec::TlsOptions::new().ca_certificate(ec::Certificate::from_pem(&tls.ca_cert_pem));
    if let Some((cert, key)) = &tls.client_cert_pem {
        opts = opts.identity(ec::Identity::from_pem(cert, key));
    }
    if let Some(name) = &tls.domain_name {
        opts = opts.domain_name(name.clone());
    }
    opts
}

/// The lease a refused transaction most likely named (for `LeaseNotFound`).
fn first_lease(txn: &Txn) -> LeaseId {
    txn.success
        .iter()
        .chain(&txn.failure)
        .find_map(|op| match op {
            TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
            _ => None,
        })
        .unwrap_or(0)
}

fn with_lease(e: StoreError, lease: LeaseId) -> StoreError {
    match e {
        StoreError::LeaseNotFound(0) => StoreError::LeaseNotFound(lease),
        other => other,
    }
}

impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn range(&self, req: RangeRequest) -> StoreResult<RangeResult> {
        check_range(&req.range)?;
        let (key, mut opts) = get_options(&req.range);
        if req.limit > 0 {
            opts = opts.with_limit(to_i64(req.limit as u64));
        }
        let mut resp = self
            .policy
            .call("range", Idempotent::Yes, || {
                let mut kv = self.kv();
                let (key, opts) = (key.clone(), opts.clone());
                async move { kv.get(key, Some(opts)).await }
            })
            .await?;
        Ok(RangeResult {
            revision: header_revision(resp.header()),
            more: resp.more(),
            kvs: resp.take_kvs().into_iter().map(key_value).collect(),
        })
    }

    async fn txn(&self, txn: Txn) -> StoreResult<TxnResult> {
        check_txn(&txn)?;
        let request = convert::txn(&txn);
        let resp = self
            .policy
            .call("txn", Idempotent::No, || {
                let mut kv = self.kv();
                let request = request.clone();
                async move { kv.txn(request).await }
            })
            .await
            .map_err(|e| with_lease(e, first_lease(&txn)))?;
        let revision = header_revision(resp.header());
        let reads = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                ec::TxnOpResponse::Get(mut get) => Some(RangeResult {
                    revision,
                    more: get.more(),
                    kvs: get.take_kvs().into_iter().map(key_value).collect(),
                }),
                _ => None,
            })
            .collect();
        Ok(TxnResult { succeeded: resp.succeeded(), revision, reads })
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let secs = to_i64(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
        // Repeating a grant after an unknown outcome leaks at most a lease that expires alone.
        let resp = self
            .policy
            .call("lease grant", Idempotent::Yes, || {
                let mut lc = self.client.lease_client();
                async move { lc.grant(secs, None).await }
            })
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let ttl = self
            .policy
            .call("lease keep-alive", Idempotent::Yes, || self.keep_alives.keep_alive(&self.client, lease))
            .await
            .map_err(|e| with_lease(e, lease))?;
        Ok(Duration::from_secs(to_u64(ttl)))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        let mut attempts = 0;
        let result = self
            .policy
            .call("lease revoke", Idempotent::Yes, || {
                attempts += 1;
                let mut lc = self.client.lease_client();
                async move { lc.revoke(lease).await }
            })
            .await;
        self.keep_alives.forget(lease);
        match result {
            Ok(_) => Ok(()),
            // A repeated revoke finding nothing: an earlier attempt revoked it.
            Err(StoreError::LeaseNotFound(_)) if attempts > 1 => Ok(()),
            Err(e) => Err(with_lease(e, lease)),
        }
    }

    async fn watch(&self, range: KeyRange, from_revision: Revision) -> StoreResult<WatchStream> {
        check_range(&range)?;
        // etcd starts a watch without a start revision at the revision of the member serving it,
        // and a follower may not have applied a write the leader already acknowledged (it would
        // then be reported as new). "After now" is resolved with a linearizable read instead.
        let from = match from_revision {
            0 => self.current_revision().await? + 1,
            from => from,
        };
        watch::watch(&self.client, &self.policy, range, from).await
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        let result = self
            .policy
            .call("compact", Idempotent::Yes, || {
                let mut kv = self.kv();
                async move { kv.compact(to_i64(revision), None).await }
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // At or below the compaction revision already: nothing to do.
            Err(StoreError::Compacted { .. }) => Ok(()),
            Err(StoreError::FutureRevision { .. }) => {
                Err(StoreError::FutureRevision { requested: revision, current: self.current_revision().await? })
            }
            Err(e) => Err(e),
        }
    }

    async fn current_revision(&self) -> StoreResult<Revision> {
        let resp = self
            .policy
            .call("current revision", Idempotent::Yes, || {
                let mut kv = self.kv();
                async move { kv.get(vec![0], Some(ec::GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(header_revision(resp.header()))
    }
}
