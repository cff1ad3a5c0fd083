//! Tokens and tenants on SQLite: secrets stored as SHA-256 hashes, whose
//! batches are whose, and the quotas a tenant's submissions are held to.
//!
//! Invariant: a quota check and the insert of its batch run in one write
//! transaction, and writes are serial, so two submissions cannot both fit a
//! limit only one of them fits.

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::rows::{micros, now_micros, token_from_row};
use super::{push_ids, SqliteStore};
use crate::tenants::quota_refusal;
use crate::tokens::{hash, limit_column, secret_of, TOKEN_COLUMNS};
use crate::{JobSelector, NewToken, Quotas, StoreError, TokenInfo};

/// A day, in microseconds: the window of `max_gpu_seconds_per_day`.
const DAY_MICROS: i64 = 24 * 3600 * 1_000_000;

/// Checks a new batch of `new_jobs` jobs against `submitter`'s `quotas`,
/// inside the write transaction that will insert it.
pub(super) async fn enforce_quotas(
    conn: &mut SqliteConnection,
    submitter: &str,
    quotas: &Quotas,
    new_jobs: usize,
) -> Result<(), StoreError> {
    let unfinished = match quotas.max_queued_jobs {
        Some(_) => {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM jobs j JOIN batches b ON b.id = j.batch_id \
                 WHERE b.submitter = ? AND j.state IN ('queued', 'dispatched', 'running')",
            )
            .bind(submitter)
            .fetch_one(&mut *conn)
            .await? as u64
        }
        None => 0,
    };
    let used = match quotas.max_gpu_seconds_per_day {
        Some(_) => {
            sqlx::query_scalar::<_, f64>(
                "SELECT COALESCE(sum(e.gpu_seconds), 0.0) FROM job_events e JOIN batches b ON b.id = e.batch_id \
                 WHERE b.submitter = ? AND e.gpu_seconds IS NOT NULL AND e.at > ?",
            )
            .bind(submitter)
            .bind(now_micros() - DAY_MICROS)
            .fetch_one(&mut *conn)
            .await?
        }
        None => 0.0,
    };
    match quota_refusal(submitter, quotas, new_jobs, unfinished, used) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

pub(super) async fn create_token(s: &SqliteStore, token: &NewToken, entropy: [u8; 32]) -> Result<(TokenInfo, String), StoreError> {
    let secret = secret_of(entropy);
    let mut conn = s.writer.acquire().await?;
    let row = sqlx::query(&format!(
        "INSERT INTO api_tokens (id, name, role, token_hash, created_at, expires_at, max_queued_jobs, max_batch_jobs, \
             max_gpu_seconds_per_day) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {TOKEN_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(&token.name)
    .bind(token.role.as_str())
    .bind(hash(&secret))
    .bind(now_micros())
    .bind(token.expires_at.map(micros))
    .bind(limit_column(token.quotas.max_queued_jobs))
    .bind(limit_column(token.quotas.max_batch_jobs))
    .bind(token.quotas.max_gpu_seconds_per_day)
    .fetch_one(&mut *conn)
    .await?;
    Ok((token_from_row(&row)?, secret))
}

pub(super) async fn create_first_admin_token(
    s: &SqliteStore,
    name: &str,
    entropy: [u8; 32],
) -> Result<Option<(TokenInfo, String)>, StoreError> {
    let secret = secret_of(entropy);
    let now = now_micros();
    // One statement on the one writer: two coordinators cannot both see no admin.
    let mut conn = s.writer.acquire().await?;
    let row = sqlx::query(&format!(
        "INSERT INTO api_tokens (id, name, role, token_hash, created_at) SELECT ?1, ?2, 'admin', ?3, ?4 \
         WHERE NOT EXISTS (SELECT 1 FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL \
                           AND (expires_at IS NULL OR expires_at > ?4)) \
         RETURNING {TOKEN_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(hash(&secret))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|row| Ok((token_from_row(&row)?, secret))).transpose()
}

pub(super) async fn authenticate(s: &SqliteStore, secret: &str) -> Result<Option<TokenInfo>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
    ))
    .bind(hash(secret))
    .bind(now_micros())
    .fetch_optional(&s.readers)
    .await?;
    row.as_ref().map(token_from_row).transpose()
}

pub(super) async fn list_tokens(s: &SqliteStore, include_dead: bool) -> Result<Vec<TokenInfo>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE ?1 OR (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)) ORDER BY id"
    ))
    .bind(include_dead)
    .bind(now_micros())
    .fetch_all(&s.readers)
    .await?;
    rows.iter().map(token_from_row).collect()
}

pub(super) async fn revoke_token(s: &SqliteStore, id: Uuid) -> Result<TokenInfo, StoreError> {
    let mut conn = s.writer.acquire().await?;
    let row = sqlx::query(&format!("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}"))
        .bind(now_micros())
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound { what: "token", id })?;
    token_from_row(&row)
}

pub(super) async fn batch_submitter(s: &SqliteStore, batch_id: Uuid) -> Result<String, StoreError> {
    sqlx::query_scalar("SELECT submitter FROM batches WHERE id = ?")
        .bind(batch_id)
        .fetch_optional(&s.readers)
        .await?
        .ok_or(StoreError::NotFound { what: "batch", id: batch_id })
}

pub(super) async fn job_submitter(s: &SqliteStore, job_id: Uuid) -> Result<String, StoreError> {
    sqlx::query_scalar("SELECT b.submitter FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE j.id = ?")
        .bind(job_id)
        .fetch_optional(&s.readers)
        .await?
        .ok_or(StoreError::NotFound { what: "job", id: job_id })
}

pub(super) async fn check_owned(s: &SqliteStore, selector: &JobSelector, submitter: &str) -> Result<(), StoreError> {
    match selector {
        JobSelector::Batch(id) => {
            if batch_submitter(s, *id).await? != submitter {
                return Err(StoreError::NotFound { what: "batch", id: *id });
            }
        }
        JobSelector::Ids(ids) => {
            let mut owned = std::collections::HashSet::new();
            for chunk in ids.chunks(1000) {
                let mut qb: QueryBuilder<'_, Sqlite> =
                    QueryBuilder::new("SELECT j.id FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE b.submitter = ");
                qb.push_bind(submitter).push(" AND j.");
                push_ids(&mut qb, chunk.iter().copied());
                owned.extend(qb.build_query_scalar::<Uuid>().fetch_all(&s.readers).await?);
            }
            // The first one named that is not the submitter's, as a missing one.
            if let Some(id) = ids.iter().find(|id| !owned.contains(*id)) {
                return Err(StoreError::NotFound { what: "job", id: *id });
            }
        }
    }
    Ok(())
}
