//! Dispatch: queued jobs into the work streams, the window of what may be
//! out per lane, and jobs dispatched again when their message was lost.

use std::time::Duration;

use flowfarm_core::{TextEncoderSet, Transition};

use super::*;
use crate::rows::JOB_COLUMNS;
use crate::{JobRow, PgStore, StoreError};

impl PgStore {
    /// [`Store::dispatch_jobs`](crate::Store::dispatch_jobs) on Postgres.
    pub async fn dispatch_jobs(&self, model: &str, set: TextEncoderSet, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError> {
        // One statement (the pause checked in it): a pass over an empty lane
        // costs one round trip.
        let mut conn = self.pool.acquire().await?;
        let rows = Move { transition: Transition::Dispatch, actor, reason: "dispatched" }
            .run(
                &mut conn,
                |qb| {
                    qb.push("model = ").push_bind(model.to_owned());
                    qb.push(" AND text_encoders = ").push_bind(set.as_str());
                    qb.push(" AND (not_before IS NULL OR not_before <= now())");
                    qb.push(" AND NOT EXISTS (SELECT 1 FROM queue_state WHERE paused AND (model = '' OR model = ")
                        .push_bind(model.to_owned())
                        .push("))");
                },
                |qb| {
                    qb.push(", dispatched_at = now(), not_before = NULL");
                },
                &format!("ORDER BY priority DESC, id LIMIT {limit}"),
                true,
            )
            .await?;
        // In the order they are to run, for the work stream.
        let mut rows = rows;
        rows.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then(a.id.cmp(&b.id)));
        Ok(rows)
    }

    /// [`Store::dispatch_window`](crate::Store::dispatch_window) on Postgres.
    pub async fn dispatch_window(&self, model: &str, set: TextEncoderSet, lookahead_per_worker: u32) -> Result<u32, StoreError> {
        let (capacity, workers, outstanding): (i64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(sum(capacity), 0)::int8, count(*), \
                 (SELECT count(*) FROM jobs WHERE model = $1 AND state IN ('dispatched', 'running') \
                     AND ($2 = 'clip-only' OR text_encoders = $2)) \
             FROM workers WHERE state = 'active' AND $1 = ANY(models) AND $2 = ANY(text_encoder_sets)",
        )
        .bind(model)
        .bind(set.as_str())
        .fetch_one(&self.pool)
        .await?;
        let window = capacity + workers * i64::from(lookahead_per_worker) - outstanding;
        Ok(window.clamp(0, i64::from(u32::MAX)) as u32)
    }

    /// [`Store::lane_heads`](crate::Store::lane_heads) on Postgres.
    pub async fn lane_heads(&self, model: &str) -> Result<Vec<(TextEncoderSet, i32)>, StoreError> {
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "SELECT text_encoders, max(priority) FROM jobs WHERE model = $1 AND state = 'queued' \
                 AND (not_before IS NULL OR not_before <= now()) GROUP BY text_encoders ORDER BY 1",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(set, priority)| {
                let parsed = TextEncoderSet::parse(&set).ok_or_else(|| StoreError::Corrupt(format!("text_encoders = {set}")))?;
                Ok((parsed, priority))
            })
            .collect()
    }

    /// [`Store::unserved`](crate::Store::unserved) on Postgres.
    pub async fn unserved(&self, needs: &[(String, TextEncoderSet)]) -> Result<Vec<(String, TextEncoderSet)>, StoreError> {
        let models: Vec<&str> = needs.iter().map(|(m, _)| m.as_str()).collect();
        let sets: Vec<&str> = needs.iter().map(|(_, s)| s.as_str()).collect();
        let unserved: Vec<i32> = sqlx::query_scalar(
            "SELECT (n.i - 1)::int4 FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS n(model, set, i) \
             WHERE NOT EXISTS (SELECT 1 FROM workers w WHERE w.state = 'active' AND n.model = ANY(w.models) \
                 AND n.set = ANY(w.text_encoder_sets)) ORDER BY n.i",
        )
        .bind(&models)
        .bind(&sets)
        .fetch_all(&self.pool)
        .await?;
        Ok(unserved.into_iter().filter_map(|i| needs.get(i as usize).cloned()).collect())
    }

    /// [`Store::redispatch_stale`](crate::Store::redispatch_stale) on Postgres.
    pub async fn redispatch_stale(&self, older_than: Duration, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "WITH target AS (SELECT id FROM jobs WHERE state = 'dispatched' \
                 AND dispatched_at < now() - make_interval(secs => $1) ORDER BY dispatched_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
             upd AS (UPDATE jobs j SET dispatched_at = now(), updated_at = now() FROM target t WHERE j.id = t.id RETURNING j.*), \
             ev AS (INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason) \
                 SELECT id, batch_id, 'dispatched', 'dispatched', attempt, $3, 'dispatched again: not started in time' FROM upd) \
             SELECT {JOB_COLUMNS} FROM upd ORDER BY id"
        ))
        .bind(older_than.as_secs_f64())
        .bind(i64::from(limit))
        .bind(actor)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(JobRow::from_row).collect()
    }
}
