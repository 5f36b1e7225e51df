//! Who is calling: the FE identity of an agent (from its mTLS client certificate) and the role
//! of an orchestrator/operator (from a bearer token). Without TLS/tokens configured every caller
//! is trusted (lab and quick start only; the server logs that loudly at start).
//!
//! * **FE identity.** With `--tls-client-ca-file`, an agent must present a client certificate
//!   signed by that CA (rustls verifies the chain during the handshake); the FE ids it may act for
//!   are the certificate's DNS subject alternative names of the form `<fe_id>.fe.victor`
//!   ([`FE_NAME_SUFFIX`]). The subject CN is ignored. A call naming another FE fails with
//!   `PERMISSION_DENIED`, a call without a certificate with `UNAUTHENTICATED`, before anything is
//!   read or written.
//! * **Operator roles.** With `--auth-tokens-file`, BindingService callers send
//!   `authorization: Bearer <token>`; each token is read-only or read-write.

use std::sync::Arc;

use tonic::Request;
use tonic::transport::CertificateDer;

use super::error::{ApiError, ApiResult};
use crate::metrics::Metrics;

/// DNS SAN suffix that marks an FE identity: `fe1.fe.victor` identifies FE `fe1`.
pub const FE_NAME_SUFFIX: &str = ".fe.victor";

/// A caller's permission on the BindingService.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Get/List/Watch/Status only.
    ReadOnly,
    /// Everything.
    ReadWrite,
}

/// How callers are authenticated.
#[derive(Clone, Default)]
pub struct Auth {
    /// Agents must present a client certificate naming their FE.
    pub require_fe_certificates: bool,
    /// Bearer tokens and their roles; empty = BindingService open to everyone.
    pub tokens: Vec<(String, Role)>,
    /// Counts refused calls (`victor_auth_failures_total`), when set.
    pub metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens.
        f.debug_struct("Auth")
            .field("require_fe_certificates", &self.require_fe_certificates)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Auth {
    /// Checks that the caller may act for `fe_id`.
    pub fn authorize_fe<T>(&self, request: &Request<T>, fe_id: &str) -> ApiResult<()> {
        if !self.require_fe_certificates {
            return Ok(());
        }
        let result = check_fe(request.peer_certs().as_deref().map(Vec::as_slice), fe_id);
        if let Err(err) = &result {
            self.count("agent", err);
            tracing::warn!(fe_id, remote = %remote(request), %err, "agent call refused");
        }
        result
    }

    /// Checks that the caller holds `needed` on the BindingService.
    pub fn authorize_role<T>(&self, request: &Request<T>, needed: Role) -> ApiResult<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let header = request.metadata().get("authorization").map(|h| h.to_str().unwrap_or(""));
        let result = check_token(&self.tokens, header, needed);
        if let Err(err) = &result {
            self.count("binding", err);
            tracing::warn!(remote = %remote(request), %err, "BindingService call refused");
        }
        result
    }

    fn count(&self, service: &'static str, err: &ApiError) {
        if let Some(m) = &self.metrics {
            let reason =
                if matches!(err, ApiError::PermissionDenied(_)) { "permission_denied" } else { "unauthenticated" };
            m.auth_failure(service, reason);
        }
    }
}

fn remote<T>(request: &Request<T>) -> String {
    request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into())
}

/// The FE ids a client certificate (DER) may act for: its DNS SANs ending in [`FE_NAME_SUFFIX`].
pub fn fe_ids_in_certificate(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let cert = webpki::EndEntityCert::try_from(der).map_err(|e| format!("unreadable client certificate: {e}"))?;
    Ok(cert
        .valid_dns_names()
        .filter_map(|name| name.strip_suffix(FE_NAME_SUFFIX))
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The FE rule on the verified peer chain (leaf first).
fn check_fe(chain: Option<&[CertificateDer<'static>]>, fe_id: &str) -> ApiResult<()> {
    let leaf = chain.and_then(<[_]>::first).ok_or_else(|| {
        ApiError::Unauthenticated(format!(
            "FE {fe_id}: no client certificate; agents must connect with a certificate signed by the \
             controller's --tls-client-ca-file whose DNS name is {fe_id}{FE_NAME_SUFFIX}"
        ))
    })?;
    let ids = fe_ids_in_certificate(leaf).map_err(ApiError::Unauthenticated)?;
    if ids.iter().any(|id| id == fe_id) {
        return Ok(());
    }
    Err(ApiError::PermissionDenied(if ids.is_empty() {
        format!(
            "the client certificate names no FE (no DNS name ending in {FE_NAME_SUFFIX}); it cannot act for FE {fe_id}"
        )
    } else {
        format!("the client certificate identifies FE {}; it cannot act for FE {fe_id}", ids.join(", "))
    }))
}

/// The token rule on the `authorization` metadata value.
fn check_token(tokens: &[(String, Role)], header: Option<&str>, needed: Role) -> ApiResult<()> {
    let header =
        header.ok_or_else(|| ApiError::Unauthenticated("missing 'authorization: Bearer <token>' metadata".into()))?;
    let token = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| ApiError::Unauthenticated("authorization metadata must be 'Bearer <token>'".into()))?;
    // Compare with every token (no early exit) so timing does not tell which one nearly matched.
    let role = tokens
        .iter()
        .fold(None, |found, (t, r)| if constant_time_eq(t.as_bytes(), token.as_bytes()) { Some(*r) } else { found });
    let role = role.ok_or_else(|| ApiError::Unauthenticated("unknown bearer token".into()))?;
    if needed == Role::ReadWrite && role == Role::ReadOnly {
        return Err(ApiError::PermissionDenied("this token is read-only; the call needs a read-write token".into()));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn fe_identity_comes_from_dns_sans() {
        let cert = cert_with(&["fe1.fe.victor", "host.example", "fe-2.site.fe.victor"]);
        assert_eq!(fe_ids_in_certificate(&cert).unwrap(), vec!["fe1".to_owned(), "fe-2.site".to_owned()]);
        let chain = [cert];
        assert!(check_fe(Some(&chain), "fe1").is_ok());
        assert!(check_fe(Some(&chain), "fe-2.site").is_ok());
        let err = check_fe(Some(&chain), "fe3").unwrap_err();
        assert!(matches!(&err, ApiError::PermissionDenied(m) if m.contains("identifies FE fe1, fe-2.site")), "{err}");
        let err = check_fe(None, "fe1").unwrap_err();
        assert!(matches!(&err, ApiError::Unauthenticated(m) if m.contains("fe1.fe.victor")), "{err}");
        let plain = [cert_with(&["fe1.example"])];
        assert!(
            matches!(check_fe(Some(&plain), "fe1"), Err(ApiError::PermissionDenied(m)) if m.contains("names no FE"))
        );
        let garbage = [CertificateDer::from(vec![1u8, 2, 3])];
        assert!(matches!(check_fe(Some(&garbage), "fe1"), Err(ApiError::Unauthenticated(_))));
    }

    #[test]
    fn tokens_and_roles() {
        let tokens = vec![("ro-secret".to_owned(), Role::ReadOnly), ("rw-secret".to_owned(), Role::ReadWrite)];
        assert!(check_token(&tokens, Some("Bearer rw-secret"), Role::ReadWrite).is_ok());
        assert!(check_token(&tokens, Some("Bearer ro-secret"), Role::ReadOnly).is_ok());
        assert!(matches!(
            check_token(&tokens, Some("Bearer ro-secret"), Role::ReadWrite),
            Err(ApiError::PermissionDenied(_))
        ));
        assert!(matches!(check_token(&tokens, Some("Bearer nope"), Role::ReadOnly), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(check_token(&tokens, Some("rw-secret"), Role::ReadOnly), Err(ApiError::Unauthenticated(_))));
        assert!(matches!(check_token(&tokens, None, Role::ReadOnly), Err(ApiError::Unauthenticated(_))));
    }
}
