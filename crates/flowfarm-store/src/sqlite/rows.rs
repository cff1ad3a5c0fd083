//! SQLite rows: decoding into the store's row types, and the one way a job
//! row is written back after a move.
//!
//! Instants are stored as microseconds since the Unix epoch, ids as 16-byte
//! blobs, arrays and maps as JSON text (see `migrations/sqlite/`).

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, Role, TextEncoderSet, Transition, WorkerState};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
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

    /// Writes every mutable column back, stamped `now`.
    pub(super) async fn write_back(&mut self, conn: &mut SqliteConnection, now: i64) -> Result<(), StoreError> {
        self.job.updated_at = instant(now)?;
        let result = self.job.result.as_ref();
        sqlx::query(
            "UPDATE jobs SET state = ?, attempt = ?, worker_id = ?, lease_expires_at = ?, progress_step = ?, error = ?, \
                 result_key = ?, result_sha256 = ?, result_size = ?, result_content_type = ?, result_model_hash = ?, \
                 gpu_seconds = ?, max_attempts = ?, priority = ?, failed_workers = ?, dispatched_at = ?, not_before = ?, \
                 started_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(self.job.state.as_str())
        .bind(i64::from(self.job.attempt))
        .bind(self.job.worker_id)
        .bind(self.job.lease_expires_at.map(micros))
        .bind(i64::from(self.job.progress_step))
        .bind(&self.job.error)
        .bind(result.map(|r| r.key.as_str()))
        .bind(result.map(|r| r.sha256.as_str()))
        .bind(result.map(|r| r.size_bytes as i64))
        .bind(result.map(|r| r.content_type.as_str()))
        .bind(result.map(|r| r.model_hash.as_str()).filter(|h| !h.is_empty()))
        .bind(self.job.gpu_seconds)
        .bind(i64::from(self.job.spec.max_attempts))
        .bind(i64::from(self.job.spec.priority))
        .bind(to_json(&self.failed_workers)?)
        .bind(self.dispatched_at)
        .bind(self.not_before)
        .bind(self.started_at)
        .bind(now)
        .bind(self.job.id)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// One `job_events` row for a job that moved from `from`.
pub(super) struct Event<'a> {
    pub(super) from: Option<JobState>,
    pub(super) actor: &'a str,
    pub(super) reason: &'a str,
    pub(super) gpu_seconds: Option<f64>,
}

impl Event<'_> {
    pub(super) async fn insert(&self, conn: &mut SqliteConnection, job: &JobRow, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason, at, gpu_seconds) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job.id)
        .bind(job.batch_id)
        .bind(self.from.map(JobState::as_str))
        .bind(job.state.as_str())
        .bind(i64::from(job.attempt))
        .bind(self.actor)
        .bind(self.reason)
        .bind(now)
        .bind(self.gpu_seconds)
        .execute(&mut *conn)
        .await?;
        Ok(())
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
