//! Conversions between the wire types (flowfarm-proto) and the domain and
//! store types, and the mapping of errors onto gRPC status codes.

use chrono::{DateTime, Utc};
use flowfarm_core::{FieldError, GridRequest, JobRequest, JobState, TextEncoderSet, ValidationErrors, WorkerState};
use flowfarm_proto::v1 as pb;
use flowfarm_store::{BatchRow, EventRow, JobCounts, JobRow, JobSelector, QueuePause, StoreError, WorkerRow};
use tonic::Status;
use uuid::Uuid;

/// Maps a store error onto the gRPC code a client can act on.
pub fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::NotFound { .. } => Status::not_found(err.to_string()),
        StoreError::IdempotencyConflict { .. } => Status::already_exists(err.to_string()),
        StoreError::QuotaExceeded { .. } => Status::resource_exhausted(err.to_string()),
        StoreError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
        StoreError::WrongState { .. } | StoreError::WorkerUnavailable { .. } | StoreError::Declined { .. } => {
            Status::failed_precondition(err.to_string())
        }
        StoreError::Database { ref message, transient } => {
            tracing::error!(error = %message, "database error");
            if transient {
                Status::unavailable("database unavailable; retry later")
            } else {
                Status::internal("database error (see coordinator logs)")
            }
        }
        StoreError::Migrate(_) | StoreError::Corrupt(_) => {
            tracing::error!(error = %err, "store error");
            Status::internal(err.to_string())
        }
    }
}

/// INVALID_ARGUMENT naming the field.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

pub fn validation_status(errors: &ValidationErrors) -> Status {
    Status::invalid_argument(errors.to_string())
}

fn field_status(err: FieldError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// Parses a UUID field.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, Status> {
    if value.is_empty() {
        return Err(invalid(field, "required"));
    }
    Uuid::parse_str(value).map_err(|_| invalid(field, format!("`{value}` is not a UUID")))
}

pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

pub fn state_to_proto(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Dispatched => pb::JobState::Dispatched,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::Dead => pb::JobState::Dead,
    }
}

/// A wire state; errors on UNSPECIFIED or unknown numbers.
pub fn state_from_proto(field: &str, value: i32) -> Result<JobState, Status> {
    match pb::JobState::try_from(value) {
        Ok(pb::JobState::Queued) => Ok(JobState::Queued),
        Ok(pb::JobState::Dispatched) => Ok(JobState::Dispatched),
        Ok(pb::JobState::Running) => Ok(JobState::Running),
        Ok(pb::JobState::Succeeded) => Ok(JobState::Succeeded),
        Ok(pb::JobState::Failed) => Ok(JobState::Failed),
        Ok(pb::JobState::Cancelled) => Ok(JobState::Cancelled),
        Ok(pb::JobState::Dead) => Ok(JobState::Dead),
        Ok(pb::JobState::Unspecified) | Err(_) => Err(invalid(field, format!("{value} is not a job state"))),
    }
}

pub fn encoders_to_proto(set: TextEncoderSet) -> pb::TextEncoderSet {
    match set {
        TextEncoderSet::All => pb::TextEncoderSet::All,
        TextEncoderSet::ClipOnly => pb::TextEncoderSet::ClipOnly,
    }
}

/// A wire encoder set: `None` for UNSPECIFIED, an error for unknown numbers.
pub fn encoders_from_proto(field: &str, value: i32) -> Result<Option<TextEncoderSet>, FieldError> {
    match pb::TextEncoderSet::try_from(value) {
        Ok(pb::TextEncoderSet::Unspecified) => Ok(None),
        Ok(pb::TextEncoderSet::All) => Ok(Some(TextEncoderSet::All)),
        Ok(pb::TextEncoderSet::ClipOnly) => Ok(Some(TextEncoderSet::ClipOnly)),
        Err(_) => Err(FieldError::new(field, format!("{value} is not a text encoder set"))),
    }
}

/// A wire job spec as a request; `path` names it in errors (`jobs[3]`).
pub fn job_request(path: &str, spec: &pb::JobSpec) -> Result<JobRequest, FieldError> {
    let nonzero = |v: u32| (v != 0).then_some(v);
    Ok(JobRequest {
        model: spec.model.clone(),
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        width: nonzero(spec.width),
        height: nonzero(spec.height),
        steps: nonzero(spec.steps),
        guidance: spec.guidance_scale,
        seed: spec.seed,
        shift: spec.shift,
        text_encoders: encoders_from_proto(&format!("{path}.text_encoders"), spec.text_encoders)?,
        priority: spec.priority,
        max_attempts: nonzero(spec.max_attempts),
        labels: spec.labels.clone(),
        tile_vae: spec.tile_vae,
    })
}

/// Every job request of a request's `jobs` list, or the first bad enum.
pub fn job_requests(jobs: &[pb::JobSpec]) -> Result<Vec<JobRequest>, Status> {
    jobs.iter().enumerate().map(|(i, spec)| job_request(&format!("jobs[{i}]"), spec)).collect::<Result<_, _>>().map_err(field_status)
}

pub fn grid_request(grid: &pb::JobGrid) -> Result<GridRequest, Status> {
    let base = match &grid.base {
        Some(base) => job_request("grid.base", base).map_err(field_status)?,
        None => return Err(invalid("grid.base", "required (it names the model)")),
    };
    // A zero size would silently mean "default" inside a grid that lists sizes; refuse it.
    for (i, size) in grid.sizes.iter().enumerate() {
        if size.width == 0 || size.height == 0 {
            return Err(invalid(&format!("grid.sizes[{i}]"), "width and height must both be set"));
        }
    }
    Ok(GridRequest {
        base,
        prompts: grid.prompts.clone(),
        seeds: grid.seeds.clone(),
        sizes: grid.sizes.iter().map(|s| (s.width, s.height)).collect(),
    })
}

/// A selector given as ids or a batch, exactly one of the two.
pub fn selector(field: &str, ids: &[String], batch_id: &str) -> Result<JobSelector, Status> {
    match (ids.is_empty(), batch_id.is_empty()) {
        (true, true) => Err(invalid(field, "give job ids or a batch id")),
        (false, false) => Err(invalid(field, "give job ids or a batch id, not both")),
        (true, false) => Ok(JobSelector::Batch(parse_id(&format!("{field}.batch_id"), batch_id)?)),
        (false, true) => {
            if ids.len() > 10_000 {
                return Err(invalid(&format!("{field}.job_ids"), "at most 10000 ids per call; select a batch instead"));
            }
            let parsed = ids.iter().enumerate().map(|(i, id)| parse_id(&format!("{field}.job_ids[{i}]"), id)).collect::<Result<_, _>>()?;
            Ok(JobSelector::Ids(parsed))
        }
    }
}

pub fn counts_to_proto(c: &JobCounts) -> pb::JobCounts {
    pb::JobCounts {
        queued: c.queued,
        dispatched: c.dispatched,
        running: c.running,
        succeeded: c.succeeded,
        failed: c.failed,
        cancelled: c.cancelled,
        dead: c.dead,
    }
}

pub fn batch_to_proto(b: &BatchRow) -> pb::Batch {
    pb::Batch {
        id: b.id.to_string(),
        idempotency_key: b.idempotency_key.clone().unwrap_or_default(),
        submitter: b.submitter.clone(),
        labels: b.labels.clone(),
        created_at: Some(timestamp(b.created_at)),
        total_jobs: b.total_jobs,
        counts: Some(counts_to_proto(&b.counts)),
        gpu_seconds: b.gpu_seconds,
    }
}

pub fn job_to_proto(j: &JobRow) -> pb::Job {
    let s = &j.spec;
    pb::Job {
        id: j.id.to_string(),
        batch_id: j.batch_id.to_string(),
        index: j.index,
        spec: Some(pb::JobSpec {
            model: s.model.clone(),
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            width: s.width,
            height: s.height,
            steps: s.steps,
            guidance_scale: Some(s.guidance),
            seed: Some(s.seed),
            shift: Some(s.shift),
            text_encoders: encoders_to_proto(s.text_encoders) as i32,
            priority: s.priority,
            max_attempts: s.max_attempts,
            labels: s.labels.clone(),
            tile_vae: s.tile_vae,
        }),
        state: state_to_proto(j.state) as i32,
        attempt: j.attempt,
        worker_id: j.worker_id.map(|w| w.to_string()).unwrap_or_default(),
        lease_expires_at: j.lease_expires_at.map(timestamp),
        progress_step: j.progress_step,
        error: j.error.clone().unwrap_or_default(),
        result: j.result.as_ref().map(|r| pb::JobResult {
            key: r.key.clone(),
            sha256: r.sha256.clone(),
            size_bytes: r.size_bytes,
            content_type: r.content_type.clone(),
            model_hash: r.model_hash.clone(),
        }),
        created_at: Some(timestamp(j.created_at)),
        updated_at: Some(timestamp(j.updated_at)),
        gpu_seconds: j.gpu_seconds,
    }
}

pub fn event_to_proto(e: &EventRow) -> pb::JobEvent {
    pb::JobEvent {
        id: e.id as u64,
        job_id: e.job_id.to_string(),
        from_state: e.from_state.map_or(pb::JobState::Unspecified, state_to_proto) as i32,
        to_state: state_to_proto(e.to_state) as i32,
        attempt: e.attempt,
        actor: e.actor.clone(),
        reason: e.reason.clone(),
        at: Some(timestamp(e.at)),
        gpu_seconds: e.gpu_seconds.unwrap_or(0.0),
    }
}

pub fn worker_state_to_proto(state: WorkerState) -> pb::WorkerState {
    match state {
        WorkerState::Active => pb::WorkerState::Active,
        WorkerState::Draining => pb::WorkerState::Draining,
        WorkerState::Cordoned => pb::WorkerState::Cordoned,
        WorkerState::Lost => pb::WorkerState::Lost,
        WorkerState::Gone => pb::WorkerState::Gone,
    }
}

/// A worker's stored placements; what cannot be read is left out.
fn placements_to_proto(placements: &serde_json::Value) -> std::collections::BTreeMap<String, pb::ModelPlacement> {
    let Some(map) = placements.as_object() else { return Default::default() };
    map.iter()
        .map(|(model, p)| {
            let text = |key: &str| p.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let units =
                p.get("units").and_then(|v| v.as_array()).map(|units| units.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect());
            let placement = pb::ModelPlacement {
                parallel: text("parallel"),
                units: units.unwrap_or_default(),
                encoders: text("encoders"),
                max_batch: p.get("max_batch").and_then(|v| v.as_u64()).unwrap_or(1) as u32,
            };
            (model.clone(), placement)
        })
        .collect()
}

pub fn worker_to_proto(w: &WorkerRow) -> pb::Worker {
    let devices = w
        .devices
        .as_array()
        .map(|list| {
            list.iter()
                .map(|d| pb::Device {
                    name: d.get("name").and_then(|v| v.as_str()).unwrap_or_default().to_owned(),
                    memory_bytes: d.get("memory_bytes").and_then(|v| v.as_u64()).unwrap_or(0),
                    busy_slots: d.get("busy_slots").and_then(|v| v.as_u64()).unwrap_or(0) as u32,
                    images_done: d.get("images_done").and_then(|v| v.as_u64()).unwrap_or(0),
                    busy_seconds: d.get("busy_seconds").and_then(|v| v.as_f64()).unwrap_or(0.0),
                })
                .collect()
        })
        .unwrap_or_default();
    pb::Worker {
        id: w.id.to_string(),
        name: w.name.clone(),
        hostname: w.hostname.clone(),
        state: worker_state_to_proto(w.state) as i32,
        devices,
        models: w.models.clone(),
        model_hashes: w.model_hashes.clone().into_iter().collect(),
        placements: placements_to_proto(&w.placements),
        text_encoder_sets: w.text_encoder_sets.iter().map(|s| encoders_to_proto(*s) as i32).collect(),
        capacity: w.capacity,
        current_job_ids: w.current_job_ids.iter().map(Uuid::to_string).collect(),
        images_done: w.images_done,
        gpu_seconds: w.gpu_seconds,
        registered_at: Some(timestamp(w.registered_at)),
        last_heartbeat_at: Some(timestamp(w.last_heartbeat_at)),
    }
}

pub fn pause_to_proto(p: &QueuePause) -> pb::QueueState {
    pb::QueueState {
        model: p.model.clone(),
        paused: p.paused,
        reason: p.reason.clone(),
        updated_by: p.updated_by.clone(),
        updated_at: Some(timestamp(p.updated_at)),
    }
}
