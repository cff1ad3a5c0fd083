//! SQLite rows: decoding into the store's row types, and the one way a job
//! row is written back after a move.
//!
//! Instants are stored as microseconds since the Unix epoch, ids as 16-byte
//! blobs, arrays and maps as JSON text (see `migrations/sqlite/`).

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, Role, TextEncoderSet, Transition, WorkerState};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use crate::rows::{labels_from_json, parse_state};
use crate::{EventRow, JobResultRow, JobRow, QueuePause, Quotas, StoreError, TokenInfo, WorkerRow};

/// Now, as stored.
pub(super) fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

pub(super) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

pub(super) fn instant(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| StoreError::Corrupt(format!("instant {us}")))
}

fn optional_instant(us: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    us.map(instant).transpose()
}

pub(super) fn duration_micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn to_u32(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} = {v}")))
}

fn json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A job as the store keeps it: what callers see, and the dispatch
/// bookkeeping they do not.
#[derive(Debug, Clone)]
pub(super) struct Live {
    pub(super) job: JobRow,
    pub(super) failed_workers: Vec<Uuid>,
    pub(super) dispatched_at: Option<i64>,
    pub(super) not_before: Option<i64>,
    pub(super) started_at: Option<i64>,
}

impl Live {
    pub(super) fn decode(row: &SqliteRow) -> Result<Live, StoreError> {
        let text_encoders: String = row.try_get("text_encoders")?;
        let result = match row.try_get::<Option<String>, _>("result_key")? {
            Some(key) => Some(JobResultRow {
                key,
                sha256: row.try_get::<Option<String>, _>("result_sha256")?.unwrap_or_default(),
                size_bytes: row.try_get::<Option<i64>, _>("result_size")?.unwrap_or(0) as u64,
                content_type: row.try_get::<Option<String>, _>("result_content_type")?.unwrap_or_default(),
                model_hash: row.try_get::<Option<String>, _>("result_model_hash")?.unwrap_or_default(),
            }),
            None => None,
        };
        let labels: String = row.try_get("labels")?;
        let job = JobRow {
            id: row.try_get("id")?,
            batch_id: row.try_get("batch_id")?,
            index: to_u32(row.try_get("idx")?, "idx")?,
            spec: ResolvedJob {
                model: row.try_get("model")?,
                prompt: row.try_get("prompt")?,
                negative_prompt: row.try_get("negative_prompt")?,
                width: to_u32(row.try_get("width")?, "width")?,
                height: to_u32(row.try_get("height")?, "height")?,
                steps: to_u32(row.try_get("steps")?, "steps")?,
                guidance: row.try_get::<f64, _>("guidance")? as f32,
                seed: row.try_get::<i64, _>("seed")? as u64,
                shift: row.try_get("shift")?,
                text_encoders: TextEncoderSet::parse(&text_encoders)
                    .ok_or_else(|| StoreError::Corrupt(format!("text_encoders = {text_encoders}")))?,
                priority: i32::try_from(row.try_get::<i64, _>("priority")?).map_err(|e| StoreError::Corrupt(format!("priority: {e}")))?,
                max_attempts: to_u32(row.try_get("max_attempts")?, "max_attempts")?,
                labels: labels_from_json(json(&labels, "labels")?)?,
                tile_vae: row.try_get("tile_vae")?,
            },
            state: parse_state(row.try_get("state")?)?,
            attempt: to_u32(row.try_get("attempt")?, "attempt")?,
            worker_id: row.try_get("worker_id")?,
            lease_expires_at: optional_instant(row.try_get("lease_expires_at")?)?,
            progress_step: to_u32(row.try_get("progress_step")?, "progress_step")?,
            error: row.try_get("error")?,
            result,
            gpu_seconds: row.try_get("gpu_seconds")?,
            created_at: instant(row.try_get("created_at")?)?,
            updated_at: instant(row.try_get("updated_at")?)?,
        };
        let failed: String = row.try_get("failed_workers")?;
        Ok(Live {
            job,
            failed_workers: json(&failed, "failed_workers")?,
            dispatched_at: row.try_get("dispatched_at")?,
            not_before: row.try_get("not_before")?,
            started_at: row.try_get("started_at")?,
        })
    }

    /// Moves the job along `transition` if its state allows it (a new
    /// attempt starts at step 0); false, and nothing changed, if not.
    pub(super) fn transit(&mut self, transition: Transition) -> bool {
        if !transition.from_states().contains(&self.job.state) {
            return false;
        }
        self.job.state = transition.to_state();
        if transition.starts_new_attempt() {
            self.job.attempt += 1;
            self.job.progress_step = 0;
        }
        true
    }

    /// Remembers the holder as a worker that failed the job.
    pub(super) fn remember_failed_holder(&mut self) {
        if let Some(worker) = self.job.worker_id {
            if !self.failed_workers.contains(&worker) {
                self.failed_workers.push(worker);
            }
        }
    }
}

/// One `job_events` row for a job that moved from `from`.
pub(super) struct Event {
    pub(super) from: JobState,
    pub(super) actor: String,
    pub(super) reason: String,
    pub(super) gpu_seconds: Option<f64>,
}

impl Event {
    pub(super) fn new(from: JobState, actor: impl Into<String>, reason: impl Into<String>) -> Event {
        Event { from, actor: actor.into(), reason: reason.into(), gpu_seconds: None }
    }
}

/// The mutable columns of `jobs`, in the order [`Moves::write`] binds them.
const MUTABLE: [&str; 18] = [
    "state",
    "attempt",
    "worker_id",
    "lease_expires_at",
    "progress_step",
    "error",
    "result_key",
    "result_sha256",
    "result_size",
    "result_content_type",
    "result_model_hash",
    "gpu_seconds",
    "max_attempts",
    "priority",
    "failed_workers",
    "dispatched_at",
    "not_before",
    "started_at",
];

/// Rows per statement: SQLite takes at most 32,766 parameters.
const ROWS_PER_UPDATE: usize = 32_000 / (MUTABLE.len() + 1);
const ROWS_PER_INSERT: usize = 32_000 / 9;

/// Job rows changed in one write transaction, each with its event, written
/// together: one UPDATE and one INSERT per few hundred rows rather than two
/// statements per job (each statement is a round trip to SQLite's thread).
pub(super) struct Moves {
    now: i64,
    moved: Vec<(Live, Event)>,
}

impl Moves {
    pub(super) fn new(now: i64) -> Moves {
        Moves { now, moved: Vec::new() }
    }

    pub(super) fn push(&mut self, live: Live, event: Event) {
        self.moved.push((live, event));
    }

    /// Writes every row's mutable columns (stamped `now`) and every event;
    /// returns the jobs in the order they were pushed.
    pub(super) async fn write(mut self, conn: &mut SqliteConnection) -> Result<Vec<JobRow>, StoreError> {
        let updated_at = instant(self.now)?;
        for (live, _) in &mut self.moved {
            live.job.updated_at = updated_at;
        }
        for chunk in self.moved.chunks(ROWS_PER_UPDATE) {
            let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(format!("WITH v(id, {}) AS (", MUTABLE.join(", ")));
            let mut failed = Vec::with_capacity(chunk.len());
            for (live, _) in chunk {
                failed.push(to_json(&live.failed_workers)?);
            }
            qb.push_values(chunk.iter().zip(failed), |mut row, ((live, _), failed_workers)| {
                let (job, result) = (&live.job, live.job.result.as_ref());
                row.push_bind(job.id)
                    .push_bind(job.state.as_str())
                    .push_bind(i64::from(job.attempt))
                    .push_bind(job.worker_id)
                    .push_bind(job.lease_expires_at.map(micros))
                    .push_bind(i64::from(job.progress_step))
                    .push_bind(job.error.clone())
                    .push_bind(result.map(|r| r.key.clone()))
                    .push_bind(result.map(|r| r.sha256.clone()))
                    .push_bind(result.map(|r| r.size_bytes as i64))
                    .push_bind(result.map(|r| r.content_type.clone()))
                    .push_bind(result.map(|r| r.model_hash.clone()).filter(|h| !h.is_empty()))
                    .push_bind(job.gpu_seconds)
                    .push_bind(i64::from(job.spec.max_attempts))
                    .push_bind(i64::from(job.spec.priority))
                    .push_bind(failed_workers)
                    .push_bind(live.dispatched_at)
                    .push_bind(live.not_before)
                    .push_bind(live.started_at);
            });
            let sets: Vec<String> = MUTABLE.iter().map(|column| format!("{column} = v.{column}")).collect();
            qb.push(") UPDATE jobs SET ").push(sets.join(", "));
            qb.push(", updated_at = ").push_bind(self.now).push(" FROM v WHERE jobs.id = v.id");
            qb.build().execute(&mut *conn).await?;
        }
        for chunk in self.moved.chunks(ROWS_PER_INSERT) {
            let mut qb: QueryBuilder<'_, Sqlite> = QueryBuilder::new(
                "INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason, at, gpu_seconds) ",
            );
            qb.push_values(chunk, |mut row, (live, event)| {
                row.push_bind(live.job.id)
                    .push_bind(live.job.batch_id)
                    .push_bind(event.from.as_str())
                    .push_bind(live.job.state.as_str())
                    .push_bind(i64::from(live.job.attempt))
                    .push_bind(event.actor.clone())
                    .push_bind(event.reason.clone())
                    .push_bind(self.now)
                    .push_bind(event.gpu_seconds);
            });
            qb.build().execute(&mut *conn).await?;
        }
        Ok(self.moved.into_iter().map(|(live, _)| live.job).collect())
    }
}

pub(super) fn event_from_row(row: &SqliteRow) -> Result<EventRow, StoreError> {
    let from_state: Option<String> = row.try_get("from_state")?;
    Ok(EventRow {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        batch_id: row.try_get("batch_id")?,
        from_state: from_state.as_deref().map(parse_state).transpose()?,
        to_state: parse_state(row.try_get("to_state")?)?,
        attempt: to_u32(row.try_get("attempt")?, "attempt")?,
        actor: row.try_get("actor")?,
        reason: row.try_get("reason")?,
        at: instant(row.try_get("at")?)?,
        gpu_seconds: row.try_get("gpu_seconds")?,
    })
}

/// A worker row; `current_job_ids` is filled by the caller.
pub(super) fn worker_from_row(row: &SqliteRow) -> Result<WorkerRow, StoreError> {
    let state: String = row.try_get("state")?;
    let sets: Vec<String> = json(&row.try_get::<String, _>("text_encoder_sets")?, "text_encoder_sets")?;
    Ok(WorkerRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        hostname: row.try_get("hostname")?,
        state: WorkerState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("worker state {state}")))?,
        devices: json(&row.try_get::<String, _>("devices")?, "devices")?,
        models: json(&row.try_get::<String, _>("models")?, "models")?,
        model_hashes: json(&row.try_get::<String, _>("model_hashes")?, "model_hashes")?,
        placements: json(&row.try_get::<String, _>("placements")?, "placements")?,
        text_encoder_sets: sets
            .iter()
            .map(|s| TextEncoderSet::parse(s).ok_or_else(|| StoreError::Corrupt(format!("text encoder set {s}"))))
            .collect::<Result<_, _>>()?,
        capacity: to_u32(row.try_get("capacity")?, "capacity")?,
        version: row.try_get("version")?,
        current_job_ids: Vec::new(),
        images_done: row.try_get::<i64, _>("images_done")? as u64,
        gpu_seconds: row.try_get("gpu_seconds")?,
        registered_at: instant(row.try_get("registered_at")?)?,
        last_heartbeat_at: instant(row.try_get("last_heartbeat_at")?)?,
    })
}

pub(super) fn token_from_row(row: &SqliteRow) -> Result<TokenInfo, StoreError> {
    let role: String = row.try_get("role")?;
    let limit = |column: &str| -> Result<Option<u32>, StoreError> {
        Ok(row.try_get::<Option<i64>, _>(column)?.map(|n| n.clamp(0, i64::from(u32::MAX)) as u32))
    };
    Ok(TokenInfo {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("token role {role}")))?,
        created_at: instant(row.try_get("created_at")?)?,
        expires_at: optional_instant(row.try_get("expires_at")?)?,
        revoked_at: optional_instant(row.try_get("revoked_at")?)?,
        quotas: Quotas {
            max_queued_jobs: limit("max_queued_jobs")?,
            max_batch_jobs: limit("max_batch_jobs")?,
            max_gpu_seconds_per_day: row.try_get("max_gpu_seconds_per_day")?,
        },
    })
}

pub(super) fn pause_from_row(row: &SqliteRow) -> Result<QueuePause, StoreError> {
    Ok(QueuePause {
        model: row.try_get("model")?,
        paused: row.try_get::<i64, _>("paused")? != 0,
        reason: row.try_get("reason")?,
        updated_by: row.try_get("updated_by")?,
        updated_at: instant(row.try_get("updated_at")?)?,
    })
}

/// An active worker's reach, for the checks of who may take a job.
#[derive(Debug, Clone)]
pub(super) struct Reach {
    pub(super) id: Uuid,
    pub(super) models: Vec<String>,
    pub(super) sets: Vec<TextEncoderSet>,
}

impl Reach {
    pub(super) fn serves(&self, job: &JobRow) -> bool {
        self.models.contains(&job.spec.model) && self.sets.contains(&job.spec.text_encoders)
    }
}

/// Every active worker's reach.
pub(super) async fn active_workers(conn: &mut SqliteConnection) -> Result<Vec<Reach>, StoreError> {
    let rows =
        sqlx::query("SELECT id, models, text_encoder_sets FROM workers WHERE state = 'active' ORDER BY id").fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|row| {
            let sets: Vec<String> = json(&row.try_get::<String, _>("text_encoder_sets")?, "text_encoder_sets")?;
            Ok(Reach {
                id: row.try_get("id")?,
                models: json(&row.try_get::<String, _>("models")?, "models")?,
                sets: sets
                    .iter()
                    .map(|s| TextEncoderSet::parse(s).ok_or_else(|| StoreError::Corrupt(format!("text encoder set {s}"))))
                    .collect::<Result<_, _>>()?,
            })
        })
        .collect()
}
