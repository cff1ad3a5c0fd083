//! Operators' moves: cancel, retry, requeue, reprioritise, purge.

use chrono::{DateTime, Utc};
use flowfarm_core::Transition;
use sqlx::{QueryBuilder, Row};
use uuid::Uuid;

use super::*;
use crate::{JobRow, PgStore, StoreError};

impl PgStore {
    /// [`Store::cancel_jobs`](crate::Store::cancel_jobs) on Postgres.
    pub async fn cancel_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Move { transition: Transition::Cancel, actor, reason }
            .run(
                &mut conn,
                |qb| push_selector(qb, selector),
                |qb| {
                    qb.push(", lease_expires_at = NULL");
                },
                "",
                false,
            )
            .await
    }

    /// [`Store::retry_jobs`](crate::Store::retry_jobs) on Postgres.
    pub async fn retry_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        self.reopen(Transition::Resubmit, selector, actor, reason).await
    }

    /// [`Store::requeue_jobs`](crate::Store::requeue_jobs) on Postgres.
    pub async fn requeue_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        self.reopen(Transition::Requeue, selector, actor, reason).await
    }

    /// An operator's move back to the queue: a new attempt, which is granted
    /// even if the job had used all of its own.
    async fn reopen(&self, transition: Transition, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Move { transition, actor, reason }
            .run(
                &mut conn,
                |qb| push_selector(qb, selector),
                |qb| {
                    qb.push(", max_attempts = GREATEST(j.max_attempts, j.attempt + 1), lease_expires_at = NULL");
                },
                "",
                false,
            )
            .await
    }

    /// [`Store::set_priority`](crate::Store::set_priority) on Postgres.
    pub async fn set_priority(&self, selector: &JobSelector, priority: i32) -> Result<u64, StoreError> {
        let mut qb = QueryBuilder::new("UPDATE jobs SET priority = ");
        qb.push_bind(priority).push(", updated_at = now() WHERE state = 'queued' AND ");
        push_selector(&mut qb, selector);
        Ok(qb.build().execute(&self.pool).await?.rows_affected())
    }

    /// [`Store::purge_jobs`](crate::Store::purge_jobs) on Postgres.
    pub async fn purge_jobs(&self, selector: Option<&JobSelector>, older_than: Option<DateTime<Utc>>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut qb = QueryBuilder::new("WITH del AS (DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead')");
        if let Some(selector) = selector {
            qb.push(" AND ");
            push_selector(&mut qb, selector);
        }
        if let Some(cutoff) = older_than {
            qb.push(" AND updated_at < ").push_bind(cutoff);
        }
        qb.push(" RETURNING id, batch_id), ev AS (DELETE FROM job_events WHERE job_id IN (SELECT id FROM del))");
        qb.push(" SELECT batch_id, count(*) AS n FROM del GROUP BY batch_id");
        let rows = qb.build().fetch_all(&mut *tx).await?;
        let mut deleted = 0u64;
        let mut batches = Vec::with_capacity(rows.len());
        for row in &rows {
            deleted += row.try_get::<i64, _>("n")? as u64;
            batches.push(row.try_get::<Uuid, _>("batch_id")?);
        }
        sqlx::query("DELETE FROM batches b WHERE b.id = ANY($1) AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id)")
            .bind(&batches)
            .execute(&mut *tx)
            .await?;
        // The result sweeper visits these batches next, for the purged jobs' objects.
        // Kept well past any sweep interval (each sweep looks back two).
        sqlx::query("DELETE FROM batch_purges WHERE purged_at < now() - interval '7 days'").execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO batch_purges (batch_id) SELECT DISTINCT unnest($1::uuid[]) \
             ON CONFLICT (batch_id) DO UPDATE SET purged_at = now()",
        )
        .bind(&batches)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }
}
