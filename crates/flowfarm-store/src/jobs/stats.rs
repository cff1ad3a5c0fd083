//! Queue state: pauses, per-model counts, GPU-seconds per submitter, and
//! what the results sweeper needs.

use std::collections::HashMap;
use std::time::Duration;

use flowfarm_core::{JobState, TextEncoderSet};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::rows::parse_state;
use crate::{JobCounts, ModelStats, PgStore, QueuePause, StoreError};

impl PgStore {
    /// [`Store::set_paused`](crate::Store::set_paused) on Postgres.
    pub async fn set_paused(&self, model: &str, paused: bool, reason: &str, by: &str) -> Result<QueuePause, StoreError> {
        let row = sqlx::query(
            "INSERT INTO queue_state (model, paused, reason, updated_by) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (model) DO UPDATE SET paused = $2, reason = $3, updated_by = $4, updated_at = now() \
             RETURNING model, paused, reason, updated_by, updated_at",
        )
        .bind(model)
        .bind(paused)
        .bind(reason)
        .bind(by)
        .fetch_one(&self.pool)
        .await?;
        pause_from_row(&row)
    }

    /// [`Store::pauses`](crate::Store::pauses) on Postgres.
    pub async fn pauses(&self) -> Result<Vec<QueuePause>, StoreError> {
        let rows = sqlx::query("SELECT model, paused, reason, updated_by, updated_at FROM queue_state ORDER BY model")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(pause_from_row).collect()
    }

    /// [`Store::queue_stats`](crate::Store::queue_stats) on Postgres.
    pub async fn queue_stats(&self, model: Option<&str>) -> Result<Vec<ModelStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, state, count(*) AS n, \
                    EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest \
             FROM jobs WHERE ($1::text IS NULL OR model = $1) GROUP BY model, state ORDER BY model",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        // Waiting jobs no active worker can take: grouped first, then each
        // group held against the (small) workers table.
        let unserved: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT g.model, g.text_encoders, g.n FROM (SELECT model, text_encoders, count(*) AS n FROM jobs \
                 WHERE state IN ('queued', 'dispatched') AND ($1::text IS NULL OR model = $1) GROUP BY model, text_encoders) g \
             WHERE NOT EXISTS (SELECT 1 FROM workers w WHERE w.state = 'active' AND g.model = ANY(w.models) \
                 AND g.text_encoders = ANY(w.text_encoder_sets)) ORDER BY 1, 2",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        let pauses = self.pauses().await?;
        let mut stats: Vec<ModelStats> = Vec::new();
        for row in rows {
            let name: String = row.try_get("model")?;
            if stats.last().map(|s| &s.model) != Some(&name) {
                let paused = pauses.iter().any(|p| p.paused && p.model == name);
                let waiting_for_worker = unserved
                    .iter()
                    .filter(|(m, _, _)| *m == name)
                    .map(|(_, set, n)| {
                        let set = TextEncoderSet::parse(set).ok_or_else(|| StoreError::Corrupt(format!("text_encoders `{set}`")))?;
                        Ok((set, *n as u64))
                    })
                    .collect::<Result<_, StoreError>>()?;
                stats.push(ModelStats {
                    model: name,
                    counts: JobCounts::default(),
                    paused,
                    oldest_queued_seconds: 0.0,
                    waiting_for_worker,
                });
            }
            let entry = stats.last_mut().expect("pushed above");
            let state = parse_state(row.try_get("state")?)?;
            entry.counts.add(state, row.try_get::<i64, _>("n")? as u64);
            if state == JobState::Queued {
                entry.oldest_queued_seconds = row.try_get("oldest")?;
            }
        }
        Ok(stats)
    }

    /// [`Store::batches_finished_within`](crate::Store::batches_finished_within) on Postgres.
    pub async fn batches_finished_within(&self, within: Duration) -> Result<Vec<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT batch_id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead') \
                 AND updated_at > now() - make_interval(secs => $1) \
             UNION SELECT batch_id FROM batch_purges WHERE purged_at > now() - make_interval(secs => $1) ORDER BY 1",
        )
        .bind(within.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    /// [`Store::result_keys`](crate::Store::result_keys) on Postgres.
    pub async fn result_keys(&self, batch: Uuid) -> Result<HashMap<Uuid, (JobState, Option<String>)>, StoreError> {
        let rows: Vec<(Uuid, String, Option<String>)> =
            sqlx::query_as("SELECT id, state, result_key FROM jobs WHERE batch_id = $1").bind(batch).fetch_all(&self.pool).await?;
        rows.into_iter().map(|(id, state, key)| Ok((id, (parse_state(&state)?, key)))).collect()
    }

    /// [`Store::gpu_seconds_by_submitter`](crate::Store::gpu_seconds_by_submitter) on Postgres.
    pub async fn gpu_seconds_by_submitter(&self) -> Result<Vec<(String, f64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT b.submitter, sum(j.gpu_seconds)::float8 FROM jobs j JOIN batches b ON b.id = j.batch_id \
             GROUP BY b.submitter HAVING sum(j.gpu_seconds) > 0 ORDER BY 2 DESC, 1",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}

fn pause_from_row(row: &PgRow) -> Result<QueuePause, StoreError> {
    Ok(QueuePause {
        model: row.try_get("model")?,
        paused: row.try_get("paused")?,
        reason: row.try_get("reason")?,
        updated_by: row.try_get("updated_by")?,
        updated_at: row.try_get("updated_at")?,
    })
}
