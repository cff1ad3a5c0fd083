//! Batches and jobs on SQLite: submission, reads, and the operators' moves
//! (cancel, retry, requeue, priority, purge).

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, Transition};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::rows::{event_from_row, instant, micros, now_micros, to_json, Event, Live, Moves};
use super::{push_selector, push_states, select_live, SqliteStore, LIVE_COLUMNS};
use crate::rows::{labels_from_json, parse_state};
use crate::{BatchRow, EventRow, JobCounts, JobFilter, JobRow, JobSelector, NewBatch, StoreError, SubmitOutcome};

/// Job rows per INSERT: 19 parameters each.
const JOBS_PER_INSERT: usize = 32_000 / 19;

/// Jobs deleted per statement.
const PURGE_CHUNK: usize = 1000;

const TERMINAL: [JobState; 4] = [JobState::Succeeded, JobState::Failed, JobState::Cancelled, JobState::Dead];

pub(super) async fn submit_batch(s: &SqliteStore, batch: &NewBatch, jobs: &[ResolvedJob]) -> Result<SubmitOutcome, StoreError> {
    // The one writer serialises submissions: a replay of a key waits for the
    // first submission and then sees it, and quotas are checked against
    // every batch committed before this one.
    let mut tx = s.writer.begin().await?;
    if let Some(key) = &batch.idempotency_key {
        let existing = sqlx::query("SELECT id, content_hash FROM batches WHERE submitter = ? AND idempotency_key = ?")
            .bind(&batch.submitter)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = existing {
            let id: Uuid = row.try_get("id")?;
            let hash: Vec<u8> = row.try_get("content_hash")?;
            tx.rollback().await?;
            if hash != batch.content_hash {
                return Err(StoreError::IdempotencyConflict { key: key.clone(), batch_id: id });
            }
            return Ok(SubmitOutcome { batch: get_batch(s, id).await?, created: false });
        }
    }
    super::access::enforce_quotas(&mut tx, &batch.submitter, &batch.quotas, jobs.len()).await?;

    let now = now_micros();
    let batch_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO batches (id, submitter, idempotency_key, content_hash, labels, total_jobs, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(batch_id)
    .bind(&batch.submitter)
    .bind(&batch.idempotency_key)
    .bind(&batch.content_hash)
    .bind(to_json(&batch.labels)?)
    .bind(jobs.len() as i64)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    // Many rows per statement (SQLite takes at most 32,766 parameters).
    let labels: Vec<String> = jobs.iter().map(|job| to_json(&job.labels)).collect::<Result<_, _>>()?;
    let rows: Vec<(usize, &ResolvedJob, String)> = jobs.iter().zip(labels).enumerate().map(|(i, (job, labels))| (i, job, labels)).collect();
    for chunk in rows.chunks(JOBS_PER_INSERT) {
        let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
            "INSERT INTO jobs (id, batch_id, idx, model, prompt, negative_prompt, width, height, steps, guidance, seed, shift, \
                 text_encoders, priority, max_attempts, labels, tile_vae, state, attempt, created_at, updated_at) ",
        );
        qb.push_values(chunk, |mut row, (i, job, labels)| {
            row.push_bind(Uuid::now_v7())
                .push_bind(batch_id)
                .push_bind(*i as i64)
                .push_bind(job.model.clone())
                .push_bind(job.prompt.clone())
                .push_bind(job.negative_prompt.clone())
                .push_bind(i64::from(job.width))
                .push_bind(i64::from(job.height))
                .push_bind(i64::from(job.steps))
                .push_bind(f64::from(job.guidance))
                .push_bind(job.seed as i64)
                .push_bind(job.shift)
                .push_bind(job.text_encoders.as_str())
                .push_bind(i64::from(job.priority))
                .push_bind(i64::from(job.max_attempts))
                .push_bind(labels.clone())
                .push_bind(job.tile_vae)
                .push_unseparated(", 'queued', 1, ")
                .push_bind_unseparated(now)
                .push_unseparated(", ")
                .push_bind_unseparated(now);
        });
        qb.build().execute(&mut *tx).await?;
    }
    sqlx::query(
        "INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason, at) \
         SELECT id, batch_id, NULL, 'queued', 1, ?, 'submitted', ? FROM jobs WHERE batch_id = ? ORDER BY id",
    )
    .bind(format!("submitter:{}", batch.submitter))
    .bind(now)
    .bind(batch_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SubmitOutcome { batch: get_batch(s, batch_id).await?, created: true })
}

pub(super) async fn get_batch(s: &SqliteStore, id: Uuid) -> Result<BatchRow, StoreError> {
    let mut tx = s.readers.begin().await?;
    let batch = batch_in(&mut tx, id).await?;
    tx.commit().await?;
    Ok(batch)
}

/// The batch and its counts, read on one connection (inside a read
/// transaction, from one snapshot).
pub(super) async fn batch_in(conn: &mut SqliteConnection, id: Uuid) -> Result<BatchRow, StoreError> {
    let row = sqlx::query(
        "SELECT id, submitter, idempotency_key, labels, total_jobs, created_at, \
             (SELECT COALESCE(sum(gpu_seconds), 0.0) FROM jobs WHERE batch_id = batches.id) AS gpu_seconds \
         FROM batches WHERE id = ?",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NotFound { what: "batch", id })?;
    let counts = counts_in(conn, id).await?;
    batch_from_row(&row, counts)
}

fn batch_from_row(row: &sqlx::sqlite::SqliteRow, counts: JobCounts) -> Result<BatchRow, StoreError> {
    let labels: String = row.try_get("labels")?;
    Ok(BatchRow {
        id: row.try_get("id")?,
        submitter: row.try_get("submitter")?,
        idempotency_key: row.try_get("idempotency_key")?,
        labels: labels_from_json(serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))?)?,
        total_jobs: row.try_get::<i64, _>("total_jobs")? as u64,
        created_at: instant(row.try_get("created_at")?)?,
        counts,
        gpu_seconds: row.try_get("gpu_seconds")?,
    })
}

pub(super) async fn counts_in(conn: &mut SqliteConnection, batch_id: Uuid) -> Result<JobCounts, StoreError> {
    let rows =
        sqlx::query("SELECT state, count(*) AS n FROM jobs WHERE batch_id = ? GROUP BY state").bind(batch_id).fetch_all(&mut *conn).await?;
    let mut counts = JobCounts::default();
    for row in rows {
        counts.add(parse_state(row.try_get("state")?)?, row.try_get::<i64, _>("n")? as u64);
    }
    Ok(counts)
}

pub(super) async fn batch_counts(s: &SqliteStore, batch_id: Uuid) -> Result<JobCounts, StoreError> {
    let mut conn = s.readers.acquire().await?;
    counts_in(&mut conn, batch_id).await
}

pub(super) async fn recent_batches(s: &SqliteStore, submitter: Option<&str>, limit: u32) -> Result<Vec<BatchRow>, StoreError> {
    let mut tx = s.readers.begin().await?;
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM batches WHERE ?1 IS NULL OR submitter = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2")
            .bind(submitter)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
    let mut batches = Vec::with_capacity(ids.len());
    for id in ids {
        batches.push(batch_in(&mut tx, id).await?);
    }
    tx.commit().await?;
    Ok(batches)
}

pub(super) async fn get_job(s: &SqliteStore, id: Uuid) -> Result<JobRow, StoreError> {
    let mut conn = s.readers.acquire().await?;
    job_in(&mut conn, id).await
}

pub(super) async fn job_in(conn: &mut SqliteConnection, id: Uuid) -> Result<JobRow, StoreError> {
    select_live(
        conn,
        |qb| {
            qb.push("id = ").push_bind(id);
        },
        "",
    )
    .await?
    .pop()
    .map(|live| live.job)
    .ok_or(StoreError::NotFound { what: "job", id })
}

pub(super) async fn list_jobs(s: &SqliteStore, filter: &JobFilter, after: Option<Uuid>, limit: u32) -> Result<Vec<JobRow>, StoreError> {
    let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(format!("SELECT {LIVE_COLUMNS} FROM jobs WHERE 1"));
    if let Some(batch) = filter.batch_id {
        qb.push(" AND batch_id = ").push_bind(batch);
    }
    if !filter.states.is_empty() {
        qb.push(" AND ");
        push_states(&mut qb, &filter.states);
    }
    if let Some((key, value)) = &filter.label {
        // A batch's labels are its jobs' labels too.
        qb.push(" AND (EXISTS (SELECT 1 FROM json_each(jobs.labels) l WHERE l.key = ").push_bind(key.clone());
        qb.push(" AND l.value = ").push_bind(value.clone());
        qb.push(") OR batch_id IN (SELECT b.id FROM batches b, json_each(b.labels) l WHERE l.key = ").push_bind(key.clone());
        qb.push(" AND l.value = ").push_bind(value.clone()).push("))");
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
    let rows = qb.build().fetch_all(&s.readers).await?;
    rows.iter().map(|row| Live::decode(row).map(|live| live.job)).collect()
}

pub(super) async fn job_events(s: &SqliteStore, job_id: Uuid) -> Result<Vec<EventRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, job_id, batch_id, from_state, to_state, attempt, actor, reason, at, gpu_seconds FROM job_events \
         WHERE job_id = ? ORDER BY id",
    )
    .bind(job_id)
    .fetch_all(&s.readers)
    .await?;
    rows.iter().map(event_from_row).collect()
}

/// Moves every job `selector` picks that `transition` may move, with `adjust`
/// applied to each after the move; one event each. Returns them in id order.
async fn move_selected(
    s: &SqliteStore,
    selector: &JobSelector,
    transition: Transition,
    actor: &str,
    reason: &str,
    adjust: impl Fn(&mut Live),
) -> Result<Vec<JobRow>, StoreError> {
    let mut tx = s.writer.begin().await?;
    let candidates = select_live(
        &mut tx,
        |qb| {
            push_selector(qb, selector);
            qb.push(" AND ");
            push_states(qb, transition.from_states());
        },
        "ORDER BY id",
    )
    .await?;
    let mut moves = Moves::new(now_micros());
    for mut live in candidates {
        let from = live.job.state;
        if !live.transit(transition) {
            continue;
        }
        adjust(&mut live);
        moves.push(live, Event::new(from, actor, reason));
    }
    let moved = moves.write(&mut tx).await?;
    tx.commit().await?;
    Ok(moved)
}

pub(super) async fn cancel_jobs(s: &SqliteStore, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
    move_selected(s, selector, Transition::Cancel, actor, reason, |live| live.job.lease_expires_at = None).await
}

/// An operator's move back to the queue: a new attempt, which is granted
/// even if the job had used all of its own.
pub(super) async fn reopen(
    s: &SqliteStore,
    transition: Transition,
    selector: &JobSelector,
    actor: &str,
    reason: &str,
) -> Result<Vec<JobRow>, StoreError> {
    move_selected(s, selector, transition, actor, reason, |live| {
        live.job.spec.max_attempts = live.job.spec.max_attempts.max(live.job.attempt);
        live.job.lease_expires_at = None;
    })
    .await
}

pub(super) async fn set_priority(s: &SqliteStore, selector: &JobSelector, priority: i32) -> Result<u64, StoreError> {
    let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new("UPDATE jobs SET priority = ");
    qb.push_bind(i64::from(priority)).push(", updated_at = ").push_bind(now_micros());
    qb.push(" WHERE state = 'queued' AND ");
    push_selector(&mut qb, selector);
    let mut conn = s.writer.acquire().await?;
    Ok(qb.build().execute(&mut *conn).await?.rows_affected())
}

pub(super) async fn purge_jobs(
    s: &SqliteStore,
    selector: Option<&JobSelector>,
    older_than: Option<DateTime<Utc>>,
) -> Result<u64, StoreError> {
    let mut tx = s.writer.begin().await?;
    let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new("SELECT id, batch_id FROM jobs WHERE ");
    push_states(&mut qb, &TERMINAL);
    if let Some(selector) = selector {
        qb.push(" AND ");
        push_selector(&mut qb, selector);
    }
    if let Some(cutoff) = older_than {
        qb.push(" AND updated_at < ").push_bind(micros(cutoff));
    }
    let doomed: Vec<(Uuid, Uuid)> = qb.build_query_as().fetch_all(&mut *tx).await?;
    let mut batches: Vec<Uuid> = doomed.iter().map(|(_, batch)| *batch).collect();
    batches.sort();
    batches.dedup();
    // A few statements per thousand jobs, not two per job: the purge holds
    // the one writer, and heartbeats and reports wait behind it.
    for chunk in doomed.chunks(PURGE_CHUNK) {
        for sql in ["DELETE FROM job_events WHERE job_id IN (", "DELETE FROM jobs WHERE id IN ("] {
            let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(sql);
            let mut ids = qb.separated(", ");
            for (job, _) in chunk {
                ids.push_bind(*job);
            }
            ids.push_unseparated(")");
            qb.build().execute(&mut *tx).await?;
        }
    }
    let now = now_micros();
    // The result sweeper visits these batches next, for the purged jobs' objects.
    // Kept well past any sweep interval (each sweep looks back two).
    sqlx::query("DELETE FROM batch_purges WHERE purged_at < ?").bind(now - 7 * 24 * 3600 * 1_000_000).execute(&mut *tx).await?;
    for batch in &batches {
        sqlx::query("DELETE FROM batches WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM jobs WHERE batch_id = ?1)")
            .bind(batch)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO batch_purges (batch_id, purged_at) VALUES (?1, ?2) ON CONFLICT (batch_id) DO UPDATE SET purged_at = ?2")
            .bind(batch)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(doomed.len() as u64)
}
