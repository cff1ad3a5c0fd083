//! Bearer-token authentication and role checks for every RPC.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use flowfarm_core::Role;
use flowfarm_store::{Quotas, Store, TokenInfo};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::convert::store_status;

/// How long a verified token is trusted without asking the database again;
/// a token revoked elsewhere keeps working at most this long on each
/// coordinator (the one that revokes it forgets it at once; expiry is
/// checked on every call).
const CACHE_TTL: Duration = Duration::from_secs(10);

/// Who is calling, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's id.
    pub token_id: uuid::Uuid,
    /// The token's name, which is its tenant: the submitter of its batches.
    pub name: String,
    pub role: Role,
    pub quotas: Quotas,
}

impl Caller {
    /// Whether the caller sees every tenant's batches (admins), or only its own.
    pub fn sees_all(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether a batch submitted by `submitter` is visible to the caller.
    pub fn may_see(&self, submitter: &str) -> bool {
        self.sees_all() || self.name == submitter
    }

    /// `role:name`, as written in job events.
    pub fn actor(&self) -> String {
        let kind = match self.role {
            Role::Submit => "submitter",
            Role::Admin => "admin",
            Role::Worker => "worker",
        };
        format!("{kind}:{}", self.name)
    }
}

/// Checks `authorization: Bearer <token>` against the token table, with a
/// short positive cache so hot RPCs (progress reports) skip the database.
#[derive(Debug)]
pub struct Authenticator {
    store: std::sync::Arc<dyn Store>,
    cache: Mutex<HashMap<String, (TokenInfo, Instant)>>,
}

impl Authenticator {
    pub fn new(store: std::sync::Arc<dyn Store>) -> Self {
        Authenticator { store, cache: Mutex::new(HashMap::new()) }
    }

    /// The caller, if its token is valid and its role is one of `allowed`.
    ///
    /// # Errors
    /// UNAUTHENTICATED without a valid token; PERMISSION_DENIED for a role
    /// not in `allowed`; UNAVAILABLE if the token table cannot be read.
    pub async fn authorize(&self, metadata: &MetadataMap, allowed: &[Role]) -> Result<Caller, Status> {
        let header =
            metadata.get("authorization").ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` header"))?;
        let secret = header
            .to_str()
            .ok()
            .and_then(bearer_credentials)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Status::unauthenticated("authorization header must be `Bearer <token>`"))?;
        self.authorize_secret(secret, allowed).await
    }

    /// The caller holding `secret`, if it is a valid token whose role is one
    /// of `allowed` (the status page's cookie carries it).
    ///
    /// # Errors
    /// As [`Authenticator::authorize`].
    pub async fn authorize_secret(&self, secret: &str, allowed: &[Role]) -> Result<Caller, Status> {
        let info = self.lookup(secret).await?;
        if !allowed.contains(&info.role) {
            let wanted: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "token `{}` has role {}; this call needs {}",
                info.name,
                info.role.as_str(),
                wanted.join(" or ")
            )));
        }
        let caller = Caller { token_id: info.id, name: info.name, role: info.role, quotas: info.quotas };
        crate::spans::caller(&caller.actor());
        Ok(caller)
    }

    async fn lookup(&self, secret: &str) -> Result<TokenInfo, Status> {
        if let Some((info, at)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(secret) {
            if at.elapsed() < CACHE_TTL && info.is_live(Utc::now()) {
                return Ok(info.clone());
            }
        }
        let info = self
            .store
            .authenticate(secret)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(secret.to_owned(), (info.clone(), Instant::now()));
        Ok(info)
    }

    /// Drops a revoked token from the cache, so it stops working here at once.
    pub fn forget(&self, token_id: uuid::Uuid) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, (info, _)| info.id != token_id);
    }
}

/// The credentials of an `authorization` value using the Bearer scheme,
/// whose name is case-insensitive (RFC 7235 §2.1): `Bearer`, `bearer`, `BEARER`.
pub(crate) fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim())
}

#[cfg(test)]
mod tests {
    use super::bearer_credentials;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "BeArEr   abc  "] {
            assert_eq!(bearer_credentials(value), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearerabc", "abc", ""] {
            assert_eq!(bearer_credentials(value), None, "{value}");
        }
    }
}
