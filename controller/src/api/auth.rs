//! Who is calling: the FE identity of an agent (from its mTLS client certificate) and the role
//! of an orchestrator/operator (from a bearer token). Without TLS/tokens configured every caller
//! is trusted (lab and quick start only; the server logs that loudly at start).

use tonic::Request;

use super::error::{ApiError, ApiResult};

/// A caller's permission on the BindingService.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Get/List/Watch/Status only.
    ReadOnly,
    /// Everything.
    ReadWrite,
}

/// How callers are authenticated.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Agents must present a client certificate naming their FE.
    pub require_fe_certificates: bool,
    /// Bearer tokens and their roles; empty = BindingService open to everyone.
    pub tokens: Vec<(String, Role)>,
}

impl Auth {
    /// Checks that the caller may act for `fe_id`.
    pub fn authorize_fe<T>(&self, request: &Request<T>, fe_id: &str) -> ApiResult<()> {
        if !self.require_fe_certificates {
            return Ok(());
        }
        let _ = request;
        Err(ApiError::Unauthenticated(format!("FE {fe_id}: client certificates are not supported by this build")))
    }

    /// Checks that the caller holds `needed` on the BindingService.
    pub fn authorize_role<T>(&self, request: &Request<T>, needed: Role) -> ApiResult<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| ApiError::Unauthenticated("missing 'authorization: Bearer <token>' metadata".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::Unauthenticated("authorization metadata must be 'Bearer <token>'".into()))?;
        let role = self
            .tokens
            .iter()
            .find(|(t, _)| constant_time_eq(t.as_bytes(), token.as_bytes()))
            .map(|(_, r)| *r)
            .ok_or_else(|| ApiError::Unauthenticated("unknown bearer token".into()))?;
        if needed == Role::ReadWrite && role == Role::ReadOnly {
            return Err(ApiError::PermissionDenied(
                "this token is read-only; the call needs a read-write token".into(),
            ));
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
