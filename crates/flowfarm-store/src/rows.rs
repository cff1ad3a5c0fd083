//! Rows as the store hands them out.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, TextEncoderSet, WorkerState};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::StoreError;

/// Number of jobs in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub queued: u64,
    pub dispatched: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub dead: u64,
}

impl JobCounts {
    /// Adds `n` jobs in `state`.
    pub fn add(&mut self, state: JobState, n: u64) {
        *self.slot(state) += n;
    }

    fn slot(&mut self, state: JobState) -> &mut u64 {
        match state {
            JobState::Queued => &mut self.queued,
            JobState::Dispatched => &mut self.dispatched,
            JobState::Running => &mut self.running,
            JobState::Succeeded => &mut self.succeeded,
            JobState::Failed => &mut self.failed,
            JobState::Cancelled => &mut self.cancelled,
            JobState::Dead => &mut self.dead,
        }
    }

    /// Moves one job from `from` to `to` as an event says; a creation event
    /// (`from` None) adds it. Saturates rather than wraps: counts read in one
    /// snapshot and events read from its log never make it go below zero.
    pub fn apply(&mut self, from: Option<JobState>, to: JobState) {
        if let Some(from) = from {
            let slot = self.slot(from);
            *slot = slot.saturating_sub(1);
        }
        *self.slot(to) += 1;
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &JobCounts) {
        self.queued += other.queued;
        self.dispatched += other.dispatched;
        self.running += other.running;
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.dead += other.dead;
    }

    pub fn total(&self) -> u64 {
        self.queued + self.dispatched + self.running + self.succeeded + self.failed + self.cancelled + self.dead
    }

    /// Jobs in a terminal state.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled + self.dead
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    pub id: Uuid,
    pub submitter: String,
    pub idempotency_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub total_jobs: u64,
    pub created_at: DateTime<Utc>,
    pub counts: JobCounts,
    /// Device time over all its jobs' attempts.
    pub gpu_seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: Uuid,
    pub batch_id: Uuid,
    pub index: u32,
    pub spec: ResolvedJob,
    pub state: JobState,
    pub attempt: u32,
    pub worker_id: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub progress_step: u32,
    pub error: Option<String>,
    pub result: Option<JobResultRow>,
    /// Device time over all its attempts, as their workers reported it.
    pub gpu_seconds: f64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where a succeeded job's image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResultRow {
    pub key: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub content_type: String,
    /// Identity of the weights that rendered it; empty if not reported.
    pub model_hash: String,
}

/// The columns [`JobRow::from_row`] reads, for SELECT lists.
pub(crate) const JOB_COLUMNS: &str = "id, batch_id, idx, model, prompt, negative_prompt, width, height, steps, \
    guidance, seed, shift, text_encoders, priority, max_attempts, labels, state, attempt, worker_id, \
    lease_expires_at, progress_step, error, result_key, result_sha256, result_size, result_content_type, \
    result_model_hash, gpu_seconds, tile_vae, created_at, updated_at";

pub(crate) fn parse_state(s: &str) -> Result<JobState, StoreError> {
    s.parse().map_err(|e| StoreError::Corrupt(format!("{e}")))
}

pub(crate) fn labels_from_json(value: serde_json::Value) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_value(value).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))
}

fn to_u32(v: i32, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} = {v}")))
}

impl JobRow {
    pub(crate) fn from_row(row: &PgRow) -> Result<JobRow, StoreError> {
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
        Ok(JobRow {
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
                guidance: row.try_get("guidance")?,
                seed: row.try_get::<i64, _>("seed")? as u64,
                shift: row.try_get("shift")?,
                text_encoders: TextEncoderSet::parse(&text_encoders)
                    .ok_or_else(|| StoreError::Corrupt(format!("text_encoders = {text_encoders}")))?,
                priority: row.try_get("priority")?,
                max_attempts: to_u32(row.try_get("max_attempts")?, "max_attempts")?,
                labels: labels_from_json(row.try_get("labels")?)?,
                tile_vae: row.try_get("tile_vae")?,
            },
            state: parse_state(row.try_get("state")?)?,
            attempt: to_u32(row.try_get("attempt")?, "attempt")?,
            worker_id: row.try_get("worker_id")?,
            lease_expires_at: row.try_get("lease_expires_at")?,
            progress_step: to_u32(row.try_get("progress_step")?, "progress_step")?,
            error: row.try_get("error")?,
            result,
            created_at: row.try_get("created_at")?,
            gpu_seconds: row.try_get("gpu_seconds")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// One `job_events` row: a state transition.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub id: i64,
    pub job_id: Uuid,
    pub batch_id: Uuid,
    /// `None` for the creation event.
    pub from_state: Option<JobState>,
    pub to_state: JobState,
    pub attempt: u32,
    pub actor: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// On the event that ends an attempt: the device time the worker reported.
    pub gpu_seconds: Option<f64>,
}

impl EventRow {
    pub(crate) fn from_row(row: &PgRow) -> Result<EventRow, StoreError> {
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
            at: row.try_get("at")?,
            gpu_seconds: row.try_get("gpu_seconds")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub id: Uuid,
    pub name: String,
    pub hostname: String,
    pub state: WorkerState,
    /// `[{"name": "cuda:0", "memory_bytes": 85899345920}, …]`
    pub devices: serde_json::Value,
    pub models: Vec<String>,
    /// Model name → identity of the weights the worker serves it with.
    pub model_hashes: BTreeMap<String, String>,
    /// Model name → how the worker serves it on its devices (see [`crate::NewWorker::placements`]).
    pub placements: serde_json::Value,
    pub text_encoder_sets: Vec<TextEncoderSet>,
    pub capacity: u32,
    pub version: String,
    pub current_job_ids: Vec<Uuid>,
    pub images_done: u64,
    pub gpu_seconds: f64,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
}

impl WorkerRow {
    pub(crate) fn from_row(row: &PgRow) -> Result<WorkerRow, StoreError> {
        let state: String = row.try_get("state")?;
        let sets: Vec<String> = row.try_get("text_encoder_sets")?;
        Ok(WorkerRow {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            hostname: row.try_get("hostname")?,
            state: WorkerState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("worker state {state}")))?,
            devices: row.try_get("devices")?,
            models: row.try_get("models")?,
            model_hashes: serde_json::from_value(row.try_get("model_hashes")?)
                .map_err(|e| StoreError::Corrupt(format!("model_hashes: {e}")))?,
            placements: row.try_get("placements")?,
            text_encoder_sets: sets
                .iter()
                .map(|s| TextEncoderSet::parse(s).ok_or_else(|| StoreError::Corrupt(format!("text encoder set {s}"))))
                .collect::<Result<_, _>>()?,
            capacity: to_u32(row.try_get("capacity")?, "capacity")?,
            version: row.try_get("version")?,
            current_job_ids: row.try_get("current_job_ids")?,
            images_done: row.try_get::<i64, _>("images_done")? as u64,
            gpu_seconds: row.try_get("gpu_seconds")?,
            registered_at: row.try_get("registered_at")?,
            last_heartbeat_at: row.try_get("last_heartbeat_at")?,
        })
    }
}

/// A pause switch: `model` empty for the global one.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuePause {
    pub model: String,
    pub paused: bool,
    pub reason: String,
    pub updated_by: String,
    pub updated_at: DateTime<Utc>,
}

/// Queue figures of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStats {
    pub model: String,
    pub counts: JobCounts,
    pub paused: bool,
    pub oldest_queued_seconds: f64,
    /// Text-encoder sets no active worker serves this model with, and how
    /// many queued or dispatched jobs wait for one.
    pub waiting_for_worker: Vec<(TextEncoderSet, u64)>,
}
