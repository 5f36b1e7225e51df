//! FE registrations and their liveness sessions. An FE's registration (`{p}/f/<id>`) is written
//! together with a session key (`{p}/s/<id>`) on a lease of the session TTL; heartbeats keep the
//! lease alive, and when it lapses the session key vanishes and every replica sees the FE down.

use std::net::IpAddr;
use std::time::Duration;

use prost::Message;
use victor_proto::types::{ip_from_bytes, ip_to_bytes};
use victor_store::{Revision, Store, StoreError, Txn, TxnOp};

use super::{Reason, Refusal, Registry, RegistryError, RegistryResult, Rejection};
use crate::cache::FeView;
use crate::records::{FeRecord, SessionRecord, now_unix_nanos};

/// A validated registration request.
#[derive(Debug, Clone)]
pub struct FeRegistration {
    /// FE id (authenticated by the caller).
    pub fe_id: String,
    /// Its underlay (tunnel endpoint) address.
    pub underlay: IpAddr,
    /// Its site.
    pub site: String,
    /// The mobile prefixes it serves (CIDR text, inside the controller's).
    pub mobile_prefixes: Vec<String>,
    /// The agent's version.
    pub agent_version: String,
}

impl<S: Store> Registry<S> {
    /// The FE's registration from the cache, or from the store if this replica has not seen it
    /// yet; `None` when the FE is not registered.
    pub async fn registered_fe(&self, fe_id: &str) -> RegistryResult<Option<FeView>> {
        if let Some(fe) = self.cache.read(|s| s.fes.get(fe_id).cloned()) {
            return Ok(Some(fe));
        }
        let (kv, _) = self.store.get(&self.cache.keys().fe(fe_id)).await?;
        let Some(kv) = kv else { return Ok(None) };
        let corrupt = |detail: String| RegistryError::Corrupt { what: format!("FE {fe_id}"), detail };
        let record = FeRecord::decode(kv.value.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let underlay = ip_from_bytes(&record.underlay_addr).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some(FeView { fe_id: fe_id.into(), underlay, record, revision: kv.mod_revision, session_revision: 0 }))
    }

    /// Registers (or re-registers) an FE: its registration and a new session on a lease of
    /// `session_ttl`, opened by replica `replica_id`. Every FE needs its own underlay address.
    pub async fn register_fe(
        &self,
        reg: FeRegistration,
        session_ttl: Duration,
        replica_id: &str,
    ) -> RegistryResult<Revision> {
        let (previous, clash) = self.cache.read(|s| {
            let previous = s.fes.get(reg.fe_id.as_str()).map(|f| f.record.session_lease);
            let clash = s
                .fes
                .values()
                .find(|f| f.underlay == reg.underlay && *f.fe_id != *reg.fe_id)
                .map(|f| f.fe_id.to_string());
            (previous, clash)
        });
        if let Some(other) = clash {
            return Err(RegistryError::Rejected(Rejection::new(
                Reason::Unspecified,
                Refusal::Precondition,
                format!(
                    "underlay_addr {} is already registered by FE {other}; every FE needs its own underlay address",
                    reg.underlay
                ),
            )));
        }
        let lease = self.store.lease_grant(session_ttl).await?;
        let keys = self.cache.keys();
        let record = FeRecord {
            underlay_addr: ip_to_bytes(reg.underlay),
            site: reg.site,
            mobile_prefixes: reg.mobile_prefixes,
            registered_at_unix_nanos: now_unix_nanos(),
            agent_version: reg.agent_version,
            session_lease: lease,
        };
        let session = SessionRecord { replica_id: replica_id.to_owned(), opened_at_unix_nanos: now_unix_nanos() };
        let txn = Txn {
            success: vec![
                TxnOp::put(keys.fe(&reg.fe_id), record.encode_to_vec()),
                TxnOp::Put { key: keys.session(&reg.fe_id), value: session.encode_to_vec(), lease },
            ],
            ..Default::default()
        };
        let result = self.txn(txn).await?;
        if let Some(old) = previous.filter(|old| *old != lease && *old != 0) {
            // The old session's key now hangs on the new lease; drop the orphaned lease early.
            let _ = self.store.lease_revoke(old).await;
        }
        tracing::info!(fe_id = %reg.fe_id, underlay = %reg.underlay, "FE registered");
        Ok(result.revision)
    }

    /// Keeps `fe`'s session alive; returns the TTL it has again, or `None` when the session
    /// already expired (the FE must register again).
    pub async fn keep_session_alive(&self, fe: &FeView) -> RegistryResult<Option<Duration>> {
        match self.store.lease_keep_alive(fe.record.session_lease).await {
            Ok(ttl) => Ok(Some(ttl)),
            Err(StoreError::LeaseNotFound(_)) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}
