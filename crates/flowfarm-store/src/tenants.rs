//! Tenants: whose batches and jobs are whose, and the quotas a tenant's
//! submissions are held to.
//!
//! Invariant: a tenant's quota check and the insert of its batch run in one
//! transaction under a lock on the tenant, so two submissions cannot both fit
//! a limit that only one of them fits.

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::{JobSelector, PgStore, Quotas, StoreError};

/// The refusal of a new batch of `new_jobs` jobs by `submitter`'s `quotas`,
/// given `unfinished` jobs of theirs waiting or rendering and `used`
/// GPU-seconds in the last 24 hours; None if it fits.
pub(crate) fn quota_refusal(submitter: &str, quotas: &Quotas, new_jobs: usize, unfinished: u64, used: f64) -> Option<StoreError> {
    if let Some(limit) = quotas.max_batch_jobs {
        if new_jobs > limit as usize {
            return Some(StoreError::QuotaExceeded {
                quota: "max_batch_jobs",
                detail: format!("the batch has {new_jobs} jobs and this token may submit at most {limit} per batch; split it"),
            });
        }
    }
    if let Some(limit) = quotas.max_queued_jobs {
        if unfinished + new_jobs as u64 > u64::from(limit) {
            return Some(StoreError::QuotaExceeded {
                quota: "max_queued_jobs",
                detail: format!(
                    "`{submitter}` has {unfinished} jobs waiting or rendering and this batch adds {new_jobs}, \
                     above the limit of {limit} at once; wait for some to finish or cancel some"
                ),
            });
        }
    }
    if let Some(limit) = quotas.max_gpu_seconds_per_day {
        if used >= limit {
            return Some(StoreError::QuotaExceeded {
                quota: "max_gpu_seconds_per_day",
                detail: format!(
                    "`{submitter}` used {used:.0} GPU-seconds in the last 24 hours, the limit is {limit:.0}; \
                     submit again once older work ages out"
                ),
            });
        }
    }
    None
}

/// Checks a new batch of `new_jobs` jobs against `submitter`'s `quotas`,
/// inside the transaction that will insert it.
pub(crate) async fn enforce_quotas(conn: &mut PgConnection, submitter: &str, quotas: &Quotas, new_jobs: usize) -> Result<(), StoreError> {
    // What the batch alone breaks needs no lock and no count.
    if let Some(refusal) = quota_refusal(submitter, quotas, new_jobs, 0, 0.0) {
        return Err(refusal);
    }
    if quotas.max_queued_jobs.is_none() && quotas.max_gpu_seconds_per_day.is_none() {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('flowfarm quota' || E'\\x1f' || $1, 0))")
        .bind(submitter)
        .execute(&mut *conn)
        .await?;
    let unfinished: i64 = match quotas.max_queued_jobs {
        Some(_) => {
            sqlx::query_scalar(
                "SELECT count(*) FROM jobs j JOIN batches b ON b.id = j.batch_id \
                 WHERE b.submitter = $1 AND j.state IN ('queued', 'dispatched', 'running')",
            )
            .bind(submitter)
            .fetch_one(&mut *conn)
            .await?
        }
        None => 0,
    };
    let used: f64 = match quotas.max_gpu_seconds_per_day {
        Some(_) => {
            sqlx::query_scalar(
                "SELECT COALESCE(sum(e.gpu_seconds), 0)::float8 FROM job_events e JOIN batches b ON b.id = e.batch_id \
                 WHERE b.submitter = $1 AND e.gpu_seconds IS NOT NULL AND e.at > now() - interval '24 hours'",
            )
            .bind(submitter)
            .fetch_one(&mut *conn)
            .await?
        }
        None => 0.0,
    };
    match quota_refusal(submitter, quotas, new_jobs, unfinished as u64, used) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

impl PgStore {
    /// [`Store::batch_submitter`](crate::Store::batch_submitter) on Postgres.
    pub async fn batch_submitter(&self, batch_id: Uuid) -> Result<String, StoreError> {
        sqlx::query_scalar("SELECT submitter FROM batches WHERE id = $1")
            .bind(batch_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "batch", id: batch_id })
    }

    /// [`Store::job_submitter`](crate::Store::job_submitter) on Postgres.
    pub async fn job_submitter(&self, job_id: Uuid) -> Result<String, StoreError> {
        sqlx::query_scalar("SELECT b.submitter FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE j.id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "job", id: job_id })
    }

    /// [`Store::check_owned`](crate::Store::check_owned) on Postgres.
    pub async fn check_owned(&self, selector: &JobSelector, submitter: &str) -> Result<(), StoreError> {
        match selector {
            JobSelector::Batch(id) => {
                if self.batch_submitter(*id).await? != submitter {
                    return Err(StoreError::NotFound { what: "batch", id: *id });
                }
            }
            JobSelector::Ids(ids) => {
                let foreign = sqlx::query(
                    "SELECT u.id FROM UNNEST($1::uuid[]) WITH ORDINALITY AS u(id, n) WHERE NOT EXISTS \
                     (SELECT 1 FROM jobs j JOIN batches b ON b.id = j.batch_id WHERE j.id = u.id AND b.submitter = $2) \
                     ORDER BY u.n LIMIT 1",
                )
                .bind(ids)
                .bind(submitter)
                .fetch_optional(&self.pool)
                .await?;
                if let Some(row) = foreign {
                    return Err(StoreError::NotFound { what: "job", id: row.try_get("id")? });
                }
            }
        }
        Ok(())
    }
}
