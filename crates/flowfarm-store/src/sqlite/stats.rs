//! Queue state on SQLite: pauses, per-model counts, GPU-seconds per
//! submitter, and what the results sweeper needs.

use std::collections::HashMap;
use std::time::Duration;

use flowfarm_core::{JobState, TextEncoderSet};
use sqlx::Row;
use uuid::Uuid;

use super::rows::{active_workers, duration_micros, now_micros, pause_from_row};
use super::SqliteStore;
use crate::rows::parse_state;
use crate::{JobCounts, ModelStats, QueuePause, StoreError};

pub(super) async fn set_paused(s: &SqliteStore, model: &str, paused: bool, reason: &str, by: &str) -> Result<QueuePause, StoreError> {
    let mut conn = s.writer.acquire().await?;
    let row = sqlx::query(
        "INSERT INTO queue_state (model, paused, reason, updated_by, updated_at) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (model) DO UPDATE SET paused = ?2, reason = ?3, updated_by = ?4, updated_at = ?5 \
         RETURNING model, paused, reason, updated_by, updated_at",
    )
    .bind(model)
    .bind(paused)
    .bind(reason)
    .bind(by)
    .bind(now_micros())
    .fetch_one(&mut *conn)
    .await?;
    pause_from_row(&row)
}

pub(super) async fn pauses(s: &SqliteStore) -> Result<Vec<QueuePause>, StoreError> {
    let rows =
        sqlx::query("SELECT model, paused, reason, updated_by, updated_at FROM queue_state ORDER BY model").fetch_all(&s.readers).await?;
    rows.iter().map(pause_from_row).collect()
}

pub(super) async fn queue_stats(s: &SqliteStore, model: Option<&str>) -> Result<Vec<ModelStats>, StoreError> {
    let now = now_micros();
    let mut tx = s.readers.begin().await?;
    let rows = sqlx::query(
        "SELECT model, state, count(*) AS n, min(created_at) AS oldest FROM jobs WHERE (?1 IS NULL OR model = ?1) \
         GROUP BY model, state ORDER BY model",
    )
    .bind(model)
    .fetch_all(&mut *tx)
    .await?;
    let waiting: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT model, text_encoders, count(*) FROM jobs WHERE state IN ('queued', 'dispatched') AND (?1 IS NULL OR model = ?1) \
         GROUP BY model, text_encoders ORDER BY 1, 2",
    )
    .bind(model)
    .fetch_all(&mut *tx)
    .await?;
    let fleet = active_workers(&mut tx).await?;
    let pause_rows = sqlx::query("SELECT model, paused, reason, updated_by, updated_at FROM queue_state").fetch_all(&mut *tx).await?;
    tx.commit().await?;
    let pauses: Vec<QueuePause> = pause_rows.iter().map(pause_from_row).collect::<Result<_, _>>()?;
    let mut stats: Vec<ModelStats> = Vec::new();
    for row in rows {
        let name: String = row.try_get("model")?;
        if stats.last().map(|s| &s.model) != Some(&name) {
            // Waiting jobs no active worker can take.
            let waiting_for_worker = waiting
                .iter()
                .filter(|(m, set, _)| *m == name && !fleet.iter().any(|w| w.models.contains(m) && w.sets.iter().any(|s| s.as_str() == set)))
                .map(|(_, set, n)| {
                    let set = TextEncoderSet::parse(set).ok_or_else(|| StoreError::Corrupt(format!("text_encoders `{set}`")))?;
                    Ok((set, *n as u64))
                })
                .collect::<Result<_, StoreError>>()?;
            stats.push(ModelStats {
                paused: pauses.iter().any(|p| p.paused && p.model == name),
                model: name,
                counts: JobCounts::default(),
                oldest_queued_seconds: 0.0,
                waiting_for_worker,
            });
        }
        let entry = stats.last_mut().expect("pushed above");
        let state = parse_state(row.try_get("state")?)?;
        entry.counts.add(state, row.try_get::<i64, _>("n")? as u64);
        if state == JobState::Queued {
            entry.oldest_queued_seconds = (now - row.try_get::<i64, _>("oldest")?) as f64 / 1e6;
        }
    }
    Ok(stats)
}

pub(super) async fn batches_finished_within(s: &SqliteStore, within: Duration) -> Result<Vec<Uuid>, StoreError> {
    let since = now_micros() - duration_micros(within);
    Ok(sqlx::query_scalar(
        "SELECT batch_id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead') AND updated_at > ?1 \
         UNION SELECT batch_id FROM batch_purges WHERE purged_at > ?1 ORDER BY 1",
    )
    .bind(since)
    .fetch_all(&s.readers)
    .await?)
}

pub(super) async fn result_keys(s: &SqliteStore, batch: Uuid) -> Result<HashMap<Uuid, (JobState, Option<String>)>, StoreError> {
    let rows: Vec<(Uuid, String, Option<String>)> =
        sqlx::query_as("SELECT id, state, result_key FROM jobs WHERE batch_id = ?").bind(batch).fetch_all(&s.readers).await?;
    rows.into_iter().map(|(id, state, key)| Ok((id, (parse_state(&state)?, key)))).collect()
}

pub(super) async fn gpu_seconds_by_submitter(s: &SqliteStore) -> Result<Vec<(String, f64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT b.submitter, sum(j.gpu_seconds) FROM jobs j JOIN batches b ON b.id = j.batch_id \
         GROUP BY b.submitter HAVING sum(j.gpu_seconds) > 0 ORDER BY 2 DESC, 1",
    )
    .fetch_all(&s.readers)
    .await?)
}
