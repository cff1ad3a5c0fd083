//! Token administration over the API (AdminService CreateToken, ListTokens,
//! RevokeToken), and the first admin token a coordinator makes when the farm
//! has none.

use std::io::Write;
use std::path::Path;

use chrono::Utc;
use flowfarm_core::Role;
use flowfarm_proto::v1 as pb;
use flowfarm_store::{check_token_name, NewToken, Quotas, Store, TokenInfo};
use tonic::{Request, Response, Status};

use crate::convert::{invalid, parse_id, store_status, timestamp};
use crate::Coordinator;

/// Longest expiry CreateToken accepts (ten years).
const MAX_EXPIRY_SECONDS: u64 = 10 * 366 * 86_400;
/// Largest GPU-seconds-per-day quota (a million GPUs all day).
const MAX_GPU_SECONDS_PER_DAY: f64 = 86_400.0 * 1e6;

pub fn role_to_proto(role: Role) -> pb::TokenRole {
    match role {
        Role::Submit => pb::TokenRole::Submit,
        Role::Admin => pb::TokenRole::Admin,
        Role::Worker => pb::TokenRole::Worker,
    }
}

fn role_from_proto(field: &str, value: i32) -> Result<Role, Status> {
    match pb::TokenRole::try_from(value) {
        Ok(pb::TokenRole::Submit) => Ok(Role::Submit),
        Ok(pb::TokenRole::Admin) => Ok(Role::Admin),
        Ok(pb::TokenRole::Worker) => Ok(Role::Worker),
        Ok(pb::TokenRole::Unspecified) => Err(invalid(field, "required: submit, admin or worker")),
        Err(_) => Err(invalid(field, format!("{value} is not a token role"))),
    }
}

fn quotas_to_proto(q: &Quotas) -> pb::TokenQuotas {
    pb::TokenQuotas {
        max_queued_jobs: q.max_queued_jobs.unwrap_or(0),
        max_batch_jobs: q.max_batch_jobs.unwrap_or(0),
        max_gpu_seconds_per_day: q.max_gpu_seconds_per_day.unwrap_or(0.0),
    }
}

fn quotas_from_proto(q: Option<&pb::TokenQuotas>) -> Result<Quotas, Status> {
    let Some(q) = q else { return Ok(Quotas::default()) };
    let gpu = q.max_gpu_seconds_per_day;
    if !(gpu.is_finite() && (0.0..=MAX_GPU_SECONDS_PER_DAY).contains(&gpu)) {
        return Err(invalid("quotas.max_gpu_seconds_per_day", format!("{gpu} must be 0 (no limit) or a positive number of seconds")));
    }
    if q.max_queued_jobs > i32::MAX as u32 || q.max_batch_jobs > i32::MAX as u32 {
        return Err(invalid("quotas", format!("job limits must be at most {}", i32::MAX)));
    }
    let nonzero = |n: u32| (n > 0).then_some(n);
    Ok(Quotas {
        max_queued_jobs: nonzero(q.max_queued_jobs),
        max_batch_jobs: nonzero(q.max_batch_jobs),
        max_gpu_seconds_per_day: (gpu > 0.0).then_some(gpu),
    })
}

pub fn token_to_proto(t: &TokenInfo) -> pb::Token {
    pb::Token {
        token_id: t.id.to_string(),
        name: t.name.clone(),
        role: role_to_proto(t.role) as i32,
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        revoked_at: t.revoked_at.map(timestamp),
        quotas: Some(quotas_to_proto(&t.quotas)),
    }
}

const ADMINS: &[Role] = &[Role::Admin];

impl Coordinator {
    pub(crate) async fn create_token_rpc(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        check_token_name(&req.name).map_err(|e| invalid("name", e))?;
        let role = role_from_proto("role", req.role)?;
        let expires_at = match req.expires_in_seconds {
            0 => None,
            s if s > MAX_EXPIRY_SECONDS => {
                return Err(invalid("expires_in_seconds", format!("{s} is more than ten years ({MAX_EXPIRY_SECONDS} s)")))
            }
            s => Some(Utc::now() + chrono::Duration::seconds(s as i64)),
        };
        let quotas = quotas_from_proto(req.quotas.as_ref())?;
        if role != Role::Submit && !quotas.is_unlimited() {
            return Err(invalid("quotas", "only submit tokens have quotas (admins are not limited, workers do not submit)"));
        }
        let new = NewToken { name: req.name, role, expires_at, quotas };
        let (token, secret) = self.shared.store.create_token(&new, rand::random()).await.map_err(store_status)?;
        tracing::info!(token = %token.id, name = %token.name, role = token.role.as_str(), by = %caller.actor(), "token created");
        Ok(Response::new(pb::CreateTokenResponse { token: Some(token_to_proto(&token)), secret }))
    }

    pub(crate) async fn list_tokens_rpc(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let tokens = self.shared.store.list_tokens(request.get_ref().include_dead).await.map_err(store_status)?;
        Ok(Response::new(pb::ListTokensResponse { tokens: tokens.iter().map(token_to_proto).collect() }))
    }

    pub(crate) async fn revoke_token_rpc(&self, request: Request<pb::RevokeTokenRequest>) -> Result<Response<pb::Token>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let id = parse_id("token_id", &request.get_ref().token_id)?;
        let token = self.shared.store.revoke_token(id).await.map_err(store_status)?;
        self.shared.auth.forget(id);
        tracing::info!(token = %id, name = %token.name, by = %caller.actor(), "token revoked");
        Ok(Response::new(token_to_proto(&token)))
    }
}

/// What became of the first admin token at start.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstAdmin {
    /// A live admin token exists: nothing made.
    Exists,
    /// Made, its secret written to this file.
    Written(std::path::PathBuf),
}

/// A failure to make or write the first admin token.
#[derive(Debug, thiserror::Error)]
pub enum FirstAdminError {
    #[error("first admin token: {0}")]
    Store(#[from] flowfarm_store::StoreError),
    #[error("cannot write the first admin token to {path}: {source} (the token was revoked; fix the path or its folder's permissions and start again)")]
    Write { path: std::path::PathBuf, source: std::io::Error },
}

/// Makes an admin token named `admin` when the farm has no live admin token,
/// and writes its secret to `path` (making its folder if missing), readable
/// by its owner only. The secret goes to a temporary file first and is
/// renamed into place, so `path` never holds a partial secret; if it cannot
/// be written, the token is revoked.
///
/// # Errors
/// [`FirstAdminError`] if the store fails or the file cannot be written.
pub async fn ensure_first_admin_token(store: &dyn Store, path: &Path) -> Result<FirstAdmin, FirstAdminError> {
    let Some((token, secret)) = store.create_first_admin_token("admin", rand::random()).await? else {
        return Ok(FirstAdmin::Exists);
    };
    match write_owner_only(path, &secret) {
        Ok(()) => Ok(FirstAdmin::Written(path.to_owned())),
        Err(source) => {
            if let Err(e) = store.revoke_token(token.id).await {
                tracing::error!(error = %e, token = %token.id, "could not revoke the unwritten first admin token; revoke it by hand");
            }
            Err(FirstAdminError::Write { path: path.to_owned(), source })
        }
    }
}

/// Writes `secret` to `path` (making its folder if missing) through a
/// temporary file renamed into place, readable by its owner only.
///
/// # Errors
/// The I/O error that stopped it; `path` is then untouched.
pub fn write_owner_only(path: &Path, secret: &str) -> std::io::Result<()> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)?;
    }
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = (|| {
        let mut file = options.open(&tmp)?;
        #[cfg(unix)]
        {
            // `mode` applies only to a file created now; an older one keeps its own.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        writeln!(file, "{secret}")?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
