//! API tokens: bearer secrets stored as SHA-256 hashes, with an optional
//! expiry and the quotas of their tenant.
//!
//! A token's name is its tenant: the batches it submits carry the name as
//! their `submitter`, and a submit token sees only its tenant's batches.
//! Tokens made with the same name (a rotation) share those batches.

use chrono::{DateTime, Utc};
use flowfarm_core::Role;
use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::{PgStore, StoreError};

/// Prefix of every secret, so leaked tokens are easy to grep for.
pub const TOKEN_PREFIX: &str = "fft_";

pub(crate) const TOKEN_COLUMNS: &str =
    "id, name, role, created_at, expires_at, revoked_at, max_queued_jobs, max_batch_jobs, max_gpu_seconds_per_day";

/// What a tenant's submissions are held to; `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quotas {
    /// Jobs of the tenant waiting or rendering (queued, dispatched, running) at once.
    pub max_queued_jobs: Option<u32>,
    /// Jobs in one batch.
    pub max_batch_jobs: Option<u32>,
    /// GPU-seconds the tenant's jobs used over the last 24 hours; a batch is
    /// refused once they reach it.
    pub max_gpu_seconds_per_day: Option<f64>,
}

impl Quotas {
    pub fn is_unlimited(&self) -> bool {
        *self == Quotas::default()
    }
}

/// A token about to be made.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
    /// After this instant the token no longer authenticates.
    pub expires_at: Option<DateTime<Utc>>,
    pub quotas: Quotas,
}

impl NewToken {
    /// A token that never expires and has no quotas.
    pub fn new(name: impl Into<String>, role: Role) -> Self {
        NewToken { name: name.into(), role, expires_at: None, quotas: Quotas::default() }
    }
}

/// Who a token belongs to and what it may do (never its secret).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub quotas: Quotas,
}

impl TokenInfo {
    /// Whether the token authenticates at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }

    fn from_row(row: &PgRow) -> Result<TokenInfo, StoreError> {
        let role: String = row.try_get("role")?;
        let limit =
            |column: &str| -> Result<Option<u32>, StoreError> { Ok(row.try_get::<Option<i32>, _>(column)?.map(|n| n.max(0) as u32)) };
        Ok(TokenInfo {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("token role {role}")))?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
            quotas: Quotas {
                max_queued_jobs: limit("max_queued_jobs")?,
                max_batch_jobs: limit("max_batch_jobs")?,
                max_gpu_seconds_per_day: row.try_get("max_gpu_seconds_per_day")?,
            },
        })
    }
}

/// Longest token name.
pub const MAX_TOKEN_NAME: usize = 128;

/// Checks a token name: 1 to 128 letters, digits, '.', '_', '-' or '@', so
/// it reads unambiguously in job events (`submitter:NAME`) and logs.
///
/// # Errors
/// What is wrong with the name, in words.
pub fn check_token_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > MAX_TOKEN_NAME {
        return Err(format!("must be 1 to {MAX_TOKEN_NAME} characters"));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))) {
        return Err(format!("`{name}` contains {bad:?}; use letters, digits, '.', '_', '-' or '@'"));
    }
    Ok(())
}

pub(crate) fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

pub(crate) fn secret_of(entropy: [u8; 32]) -> String {
    format!("{TOKEN_PREFIX}{}", hex::encode(entropy))
}

pub(crate) fn limit_column(limit: Option<u32>) -> Option<i32> {
    limit.map(|n| n.min(i32::MAX as u32) as i32)
}

impl PgStore {
    /// [`Store::create_token`](crate::Store::create_token) on Postgres.
    pub async fn create_token(&self, token: &NewToken, entropy: [u8; 32]) -> Result<(TokenInfo, String), StoreError> {
        let secret = secret_of(entropy);
        let row = sqlx::query(&format!(
            "INSERT INTO api_tokens (id, name, role, token_hash, expires_at, max_queued_jobs, max_batch_jobs, max_gpu_seconds_per_day) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(&token.name)
        .bind(token.role.as_str())
        .bind(hash(&secret))
        .bind(token.expires_at)
        .bind(limit_column(token.quotas.max_queued_jobs))
        .bind(limit_column(token.quotas.max_batch_jobs))
        .bind(token.quotas.max_gpu_seconds_per_day)
        .fetch_one(&self.pool)
        .await?;
        Ok((TokenInfo::from_row(&row)?, secret))
    }

    /// [`Store::create_first_admin_token`](crate::Store::create_first_admin_token) on Postgres.
    pub async fn create_first_admin_token(&self, name: &str, entropy: [u8; 32]) -> Result<Option<(TokenInfo, String)>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('flowfarm first admin token', 0))").execute(&mut *tx).await?;
        let secret = secret_of(entropy);
        let row = sqlx::query(&format!(
            "INSERT INTO api_tokens (id, name, role, token_hash) SELECT $1, $2, 'admin', $3 \
             WHERE NOT EXISTS (SELECT 1 FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL \
                               AND (expires_at IS NULL OR expires_at > now())) \
             RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(hash(&secret))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|row| Ok((TokenInfo::from_row(&row)?, secret))).transpose()
    }

    /// [`Store::authenticate`](crate::Store::authenticate) on Postgres.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<TokenInfo>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > now())"
        ))
        .bind(hash(secret))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(TokenInfo::from_row).transpose()
    }

    /// [`Store::list_tokens`](crate::Store::list_tokens) on Postgres.
    pub async fn list_tokens(&self, include_dead: bool) -> Result<Vec<TokenInfo>, StoreError> {
        let live = if include_dead { "TRUE" } else { "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())" };
        let rows = sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE {live} ORDER BY id")).fetch_all(&self.pool).await?;
        rows.iter().map(TokenInfo::from_row).collect()
    }

    /// [`Store::revoke_token`](crate::Store::revoke_token) on Postgres.
    pub async fn revoke_token(&self, id: Uuid) -> Result<TokenInfo, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "token", id })?;
        TokenInfo::from_row(&row)
    }
}
