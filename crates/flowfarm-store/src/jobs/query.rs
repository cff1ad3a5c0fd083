//! Reading batches, jobs and their events.

use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::*;
use crate::rows::{labels_from_json, parse_state, JOB_COLUMNS};
use crate::{BatchRow, EventRow, JobCounts, JobRow, PgStore, StoreError};

impl PgStore {
    /// [`Store::get_batch`](crate::Store::get_batch) on Postgres.
    pub async fn get_batch(&self, id: Uuid) -> Result<BatchRow, StoreError> {
        let row = sqlx::query(
            "SELECT id, submitter, idempotency_key, labels, total_jobs, created_at, \
                 (SELECT COALESCE(sum(gpu_seconds), 0) FROM jobs WHERE batch_id = $1) AS gpu_seconds FROM batches WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "batch", id })?;
        let counts = self.batch_counts(id).await?;
        batch_from_row(&row, counts)
    }

    /// [`Store::recent_batches`](crate::Store::recent_batches) on Postgres.
    pub async fn recent_batches(&self, submitter: Option<&str>, limit: u32) -> Result<Vec<BatchRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT b.id, b.submitter, b.idempotency_key, b.labels, b.total_jobs, b.created_at, \
                 COALESCE(sum(j.gpu_seconds), 0)::float8 AS gpu_seconds, \
                 count(*) FILTER (WHERE j.state = 'queued') AS queued, \
                 count(*) FILTER (WHERE j.state = 'dispatched') AS dispatched, \
                 count(*) FILTER (WHERE j.state = 'running') AS running, \
                 count(*) FILTER (WHERE j.state = 'succeeded') AS succeeded, \
                 count(*) FILTER (WHERE j.state = 'failed') AS failed, \
                 count(*) FILTER (WHERE j.state = 'cancelled') AS cancelled, \
                 count(*) FILTER (WHERE j.state = 'dead') AS dead \
             FROM (SELECT * FROM batches WHERE $1::text IS NULL OR submitter = $1 \
                   ORDER BY created_at DESC, id DESC LIMIT $2) b \
             LEFT JOIN jobs j ON j.batch_id = b.id \
             GROUP BY b.id, b.submitter, b.idempotency_key, b.labels, b.total_jobs, b.created_at \
             ORDER BY b.created_at DESC, b.id DESC",
        )
        .bind(submitter)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let n = |state: &str| row.try_get::<i64, _>(state).map(|n| n as u64);
                let counts = JobCounts {
                    queued: n("queued")?,
                    dispatched: n("dispatched")?,
                    running: n("running")?,
                    succeeded: n("succeeded")?,
                    failed: n("failed")?,
                    cancelled: n("cancelled")?,
                    dead: n("dead")?,
                };
                batch_from_row(row, counts)
            })
            .collect()
    }

    /// [`Store::batch_counts`](crate::Store::batch_counts) on Postgres.
    pub async fn batch_counts(&self, batch_id: Uuid) -> Result<JobCounts, StoreError> {
        let rows = sqlx::query("SELECT state, count(*) AS n FROM jobs WHERE batch_id = $1 GROUP BY state")
            .bind(batch_id)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = JobCounts::default();
        for row in rows {
            counts.add(parse_state(row.try_get("state")?)?, row.try_get::<i64, _>("n")? as u64);
        }
        Ok(counts)
    }

    /// [`Store::get_job`](crate::Store::get_job) on Postgres.
    pub async fn get_job(&self, id: Uuid) -> Result<JobRow, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "job", id })?;
        JobRow::from_row(&row)
    }

    /// [`Store::list_jobs`](crate::Store::list_jobs) on Postgres.
    pub async fn list_jobs(&self, filter: &JobFilter, after: Option<Uuid>, limit: u32) -> Result<Vec<JobRow>, StoreError> {
        let mut qb = QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE TRUE"));
        if let Some(batch) = filter.batch_id {
            qb.push(" AND batch_id = ").push_bind(batch);
        }
        if !filter.states.is_empty() {
            let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
            qb.push(" AND state = ANY(").push_bind(states).push(")");
        }
        if let Some((key, value)) = &filter.label {
            // A batch's labels are its jobs' labels too.
            let pair = serde_json::json!({ key: value });
            qb.push(" AND (labels @> ").push_bind(pair.clone());
            qb.push(" OR batch_id IN (SELECT id FROM batches WHERE labels @> ").push_bind(pair).push("))");
        }
        if let Some(model) = &filter.model {
            qb.push(" AND model = ").push_bind(model.clone());
        }
        if let Some(submitter) = &filter.submitter {
            qb.push(" AND batch_id IN (SELECT id FROM batches WHERE submitter = ").push_bind(submitter.clone()).push(")");
        }
        if let Some(after) = after {
            qb.push(" AND id > ").push_bind(after);
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(JobRow::from_row).collect()
    }

    /// [`Store::job_events`](crate::Store::job_events) on Postgres.
    pub async fn job_events(&self, job_id: Uuid) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, job_id, batch_id, from_state, to_state, attempt, actor, reason, at, gpu_seconds FROM job_events \
             WHERE job_id = $1 ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(EventRow::from_row).collect()
    }
}

/// A batch row (`id`, `submitter`, `idempotency_key`, `labels`,
/// `total_jobs`, `created_at`, `gpu_seconds`) with its counts.
fn batch_from_row(row: &sqlx::postgres::PgRow, counts: JobCounts) -> Result<BatchRow, StoreError> {
    Ok(BatchRow {
        id: row.try_get("id")?,
        submitter: row.try_get("submitter")?,
        idempotency_key: row.try_get("idempotency_key")?,
        labels: labels_from_json(row.try_get("labels")?)?,
        total_jobs: row.try_get::<i32, _>("total_jobs")? as u64,
        created_at: row.try_get("created_at")?,
        counts,
        gpu_seconds: row.try_get("gpu_seconds")?,
    })
}
