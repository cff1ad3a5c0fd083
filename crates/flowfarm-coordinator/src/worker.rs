//! WorkerService: the coordinator's side of the worker daemons' protocol.
//! Every report is fenced by (job, attempt, worker); a stale one is refused
//! with FAILED_PRECONDITION.

use std::path::{Component, Path};

use flowfarm_core::TextEncoderSet;
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::worker_service_server::WorkerService;
use flowfarm_store::{FailureCause, JobResultRow, NewWorker};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::convert::*;
use crate::{spans, Coordinator};

/// What a result may be: what workers write and browsers may show.
pub(crate) const RESULT_TYPES: &[&str] = &["image/png", "image/jpeg", "image/webp"];

const MAX_ERROR_CHARS: usize = 4096;
const MAX_CAPACITY: u32 = 64;
const MAX_RESULT_KEY_CHARS: usize = 1024;

/// `field` names it in the error (`attempt`, `jobs[3].attempt`).
fn attempt_of(field: &str, value: u32) -> Result<u32, Status> {
    if value == 0 {
        return Err(invalid(field, "required: the attempt StartJob returned"));
    }
    Ok(value)
}

/// A result key must stay inside the results store: relative, no `..`.
fn check_result_key(field: &str, key: &str) -> Result<(), Status> {
    if key.is_empty() || key.chars().count() > MAX_RESULT_KEY_CHARS {
        return Err(invalid(field, format!("must be 1 to {MAX_RESULT_KEY_CHARS} characters")));
    }
    let inside = Path::new(key).components().all(|c| matches!(c, Component::Normal(_)));
    if !inside || key.contains('\0') {
        return Err(invalid(field, format!("`{key}` must be a relative path without `..`")));
    }
    Ok(())
}

/// A weights identity: 64 lower-case hex digits.
fn check_model_hash(field: &str, hash: &str) -> Result<(), Status> {
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        return Err(invalid(field, "must be 64 lower-case hex digits (the weights' identity)"));
    }
    Ok(())
}

/// Most device seconds one attempt may report: a week.
const MAX_ATTEMPT_GPU_SECONDS: f64 = 7.0 * 86_400.0;

fn check_gpu_seconds(field: &str, seconds: f64) -> Result<(), Status> {
    if !(seconds.is_finite() && (0.0..=MAX_ATTEMPT_GPU_SECONDS).contains(&seconds)) {
        return Err(invalid(field, format!("{seconds} is not a number of seconds from 0 to {MAX_ATTEMPT_GPU_SECONDS}")));
    }
    Ok(())
}

/// Most jobs one StartJobs or CompleteJobs call may carry.
const MAX_BATCH: usize = 256;

fn check_batch_len(field: &str, len: usize) -> Result<(), Status> {
    if len == 0 || len > MAX_BATCH {
        return Err(invalid(field, format!("{len} entries; send 1 to {MAX_BATCH}")));
    }
    Ok(())
}

fn check_distinct(field: &str, ids: &[Uuid]) -> Result<(), Status> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    match ids.iter().position(|id| !seen.insert(*id)) {
        Some(i) => Err(invalid(&format!("{field}[{i}]"), format!("job {} appears twice", ids[i]))),
        None => Ok(()),
    }
}

fn refusal(status: &Status) -> pb::Refusal {
    pb::Refusal { code: status.code() as i32, message: status.message().to_owned() }
}

/// A checked completion report; `field` prefixes the names in errors
/// (`jobs[3].` in a CompleteJobs call).
fn completion(
    worker_id: Uuid,
    job_id: Uuid,
    attempt: u32,
    result: Option<pb::JobResult>,
    gpu_seconds: f64,
    field: &str,
) -> Result<flowfarm_store::Completion, Status> {
    let named = |name: &str| format!("{field}{name}");
    let attempt = attempt_of(&named("attempt"), attempt)?;
    let result = result.ok_or_else(|| invalid(&named("result"), "required"))?;
    check_result_key(&named("result.key"), &result.key)?;
    if result.sha256.len() != 64 || !result.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        return Err(invalid(&named("result.sha256"), "must be 64 lower-case hex digits"));
    }
    if result.content_type.is_empty() {
        return Err(invalid(&named("result.content_type"), "required"));
    }
    // Results are served to browsers (the status page): only image types.
    if !RESULT_TYPES.contains(&result.content_type.as_str()) {
        return Err(invalid(
            &named("result.content_type"),
            format!("`{}` is not an image type this farm serves ({})", result.content_type, RESULT_TYPES.join(", ")),
        ));
    }
    if !result.model_hash.is_empty() {
        check_model_hash(&named("result.model_hash"), &result.model_hash)?;
    }
    check_gpu_seconds(&named("gpu_seconds"), gpu_seconds)?;
    Ok(flowfarm_store::Completion {
        job_id,
        attempt,
        worker_id,
        result: JobResultRow {
            key: result.key,
            sha256: result.sha256,
            size_bytes: result.size_bytes,
            content_type: result.content_type,
            model_hash: result.model_hash,
        },
        gpu_seconds,
    })
}

impl Coordinator {
    /// Refuses a worker RPC whose token is not the one `worker_id`
    /// registered with, so one worker's token cannot report for another.
    async fn check_worker(&self, caller: &crate::auth::Caller, worker_id: Uuid) -> Result<(), Status> {
        let known = self.shared.worker_tokens.lock().unwrap_or_else(|p| p.into_inner()).get(&worker_id).copied();
        let registered = match known {
            Some(token) => token,
            None => {
                let token = self.shared.store.worker_token(worker_id).await.map_err(store_status)?;
                let mut cache = self.shared.worker_tokens.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() > 100_000 {
                    cache.clear();
                }
                cache.insert(worker_id, token);
                token
            }
        };
        match registered {
            Some(token) if token != caller.token_id => Err(Status::permission_denied(format!(
                "worker {worker_id} registered with another token; a worker reports with the token it registered with"
            ))),
            _ => Ok(()),
        }
    }

    /// One StartJob, through the grouper.
    async fn start_one(&self, job_id: Uuid, worker_id: Uuid) -> Result<pb::StartJobResponse, Status> {
        let job = self
            .shared
            .starts
            .call((job_id, worker_id))
            .await
            .ok_or_else(|| Status::unavailable("the coordinator is shutting down"))?
            .map_err(store_status)?;
        if job.attempt == 1 {
            let waited = (chrono::Utc::now() - job.created_at).num_microseconds().unwrap_or(0).max(0);
            self.shared.metrics.submit_to_start.observe(waited as f64 / 1e6);
        }
        Ok(pb::StartJobResponse {
            attempt: job.attempt,
            lease_expires_at: job.lease_expires_at.map(timestamp),
            job: Some(job_to_proto(&job)),
        })
    }

    /// One CompleteJob, through the grouper.
    async fn complete_one(&self, completion: flowfarm_store::Completion) -> Result<(), Status> {
        let gpu_seconds = completion.gpu_seconds;
        self.shared
            .completions
            .call(completion)
            .await
            .ok_or_else(|| Status::unavailable("the coordinator is shutting down"))?
            .map_err(store_status)?;
        self.shared.metrics.completed.inc();
        self.shared.metrics.render_seconds.observe(gpu_seconds);
        self.wake_dispatcher();
        Ok(())
    }
}

#[tonic::async_trait]
impl WorkerService for Coordinator {
    async fn register_worker(&self, request: Request<pb::RegisterWorkerRequest>) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        if req.name.trim().is_empty() || req.name.chars().count() > 128 {
            return Err(invalid("name", "must be 1 to 128 characters"));
        }
        if req.models.is_empty() {
            return Err(invalid("models", "a worker must serve at least one model"));
        }
        for (i, model) in req.models.iter().enumerate() {
            if self.shared.registry.get(model).is_none() {
                return Err(invalid(&format!("models[{i}]"), format!("unknown model `{model}`")));
            }
        }
        if req.capacity == 0 || req.capacity > MAX_CAPACITY {
            return Err(invalid("capacity", format!("{} is outside 1..={MAX_CAPACITY}", req.capacity)));
        }
        let mut sets = Vec::new();
        for (i, set) in req.text_encoder_sets.iter().enumerate() {
            let field = format!("text_encoder_sets[{i}]");
            match encoders_from_proto(&field, *set).map_err(|e| Status::invalid_argument(e.to_string()))? {
                Some(set) => sets.push(set),
                None => return Err(invalid(&field, "must be ALL or CLIP_ONLY")),
            }
        }
        if sets.is_empty() {
            sets = vec![TextEncoderSet::All, TextEncoderSet::ClipOnly];
        }
        let mut hashed: Vec<&String> = req.model_hashes.keys().collect();
        hashed.sort();
        for model in hashed {
            let field = format!("model_hashes[{model}]");
            if !req.models.contains(model) {
                return Err(invalid(&field, "names a model that is not in `models`"));
            }
            check_model_hash(&field, &req.model_hashes[model])?;
        }
        for (model, placement) in &req.placements {
            check_placement(&format!("placements[{model}]"), model, placement, &req.models)?;
        }
        let devices = devices_json(&req.devices);
        let placements = placements_json(&req.placements);
        let worker = self
            .shared
            .store
            .register_worker(&NewWorker {
                name: req.name,
                hostname: req.hostname,
                devices,
                models: req.models,
                model_hashes: req.model_hashes.into_iter().collect(),
                placements,
                text_encoder_sets: sets,
                capacity: req.capacity,
                version: req.version,
                token_id: Some(caller.token_id),
            })
            .await
            .map_err(store_status)?;
        tracing::info!(worker = %worker.id, name = %worker.name, "worker registered");
        self.wake_dispatcher();
        let leases = &self.shared.leases;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: worker.id.to_string(),
            heartbeat_interval_seconds: leases.heartbeat_interval_seconds,
            lease_seconds: leases.lease_seconds,
        }))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        let worker_id = parse_id("worker_id", &req.worker_id)?;
        if !(req.gpu_seconds_delta.is_finite() && req.gpu_seconds_delta >= 0.0) {
            return Err(invalid("gpu_seconds_delta", format!("{} is not a non-negative number", req.gpu_seconds_delta)));
        }
        let running = req
            .running
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((parse_id(&format!("running[{i}].job_id"), &r.job_id)?, r.attempt)))
            .collect::<Result<Vec<(Uuid, u32)>, Status>>()?;
        self.check_worker(&caller, worker_id).await?;
        // A job the worker holds but no longer lists was dropped by it: it is
        // taken back now rather than when its lease would have run out. A
        // claim made within the last heartbeat interval may not be listed yet.
        let grace = std::time::Duration::from_secs(u64::from(self.shared.leases.heartbeat_interval_seconds.max(1)));
        let outcome = self.shared.store.heartbeat(worker_id, &running, self.shared.leases.lease(), grace).await.map_err(store_status)?;
        if !req.devices.is_empty() {
            self.shared.store.set_worker_devices(worker_id, &devices_json(&req.devices)).await.map_err(store_status)?;
        }
        for job in &outcome.taken_back {
            tracing::warn!(job = %job.id, worker = %worker_id, state = %job.state, "the worker dropped a job it held; taken back");
        }
        if !outcome.taken_back.is_empty() {
            self.wake_dispatcher();
        }
        Ok(Response::new(pb::HeartbeatResponse {
            state: worker_state_to_proto(outcome.state) as i32,
            revoked_job_ids: outcome.revoked.iter().map(Uuid::to_string).collect(),
            lease_expires_at: Some(timestamp(outcome.lease_expires_at)),
        }))
    }

    async fn start_job(&self, request: Request<pb::StartJobRequest>) -> Result<Response<pb::StartJobResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        let worker_id = parse_id("worker_id", &req.worker_id)?;
        let job_id = parse_id("job_id", &req.job_id)?;
        spans::ids(Some(worker_id), None, Some(job_id), None);
        self.check_worker(&caller, worker_id).await?;
        Ok(Response::new(self.start_one(job_id, worker_id).await?))
    }

    async fn start_jobs(&self, request: Request<pb::StartJobsRequest>) -> Result<Response<pb::StartJobsResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        let worker_id = parse_id("worker_id", &req.worker_id)?;
        spans::ids(Some(worker_id), None, None, None);
        check_batch_len("job_ids", req.job_ids.len())?;
        let job_ids =
            req.job_ids.iter().enumerate().map(|(i, id)| parse_id(&format!("job_ids[{i}]"), id)).collect::<Result<Vec<Uuid>, Status>>()?;
        check_distinct("job_ids", &job_ids)?;
        self.check_worker(&caller, worker_id).await?;
        // Each start joins the grouper's next statement with the other workers' calls.
        let outcomes = futures::future::join_all(job_ids.iter().map(|&job_id| self.start_one(job_id, worker_id))).await;
        let outcomes = outcomes
            .into_iter()
            .map(|outcome| pb::StartJobOutcome {
                outcome: Some(match outcome {
                    Ok(started) => pb::start_job_outcome::Outcome::Started(started),
                    Err(status) => pb::start_job_outcome::Outcome::Refused(refusal(&status)),
                }),
            })
            .collect();
        Ok(Response::new(pb::StartJobsResponse { outcomes }))
    }

    async fn report_progress(&self, request: Request<pb::ReportProgressRequest>) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        let worker_id = parse_id("worker_id", &req.worker_id)?;
        let job_id = parse_id("job_id", &req.job_id)?;
        let attempt = attempt_of("attempt", req.attempt)?;
        spans::ids(Some(worker_id), None, Some(job_id), Some(attempt));
        if req.step > req.total_steps {
            return Err(invalid("step", format!("{} is beyond total_steps {}", req.step, req.total_steps)));
        }
        self.check_worker(&caller, worker_id).await?;
        // Watchers on every coordinator learn of it from the store (crate::progress).
        let lease_expires_at = self
            .shared
            .store
            .report_progress(job_id, attempt, worker_id, req.step, self.shared.leases.lease())
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ReportProgressResponse { lease_expires_at: Some(timestamp(lease_expires_at)) }))
    }

    async fn complete_job(&self, request: Request<pb::CompleteJobRequest>) -> Result<Response<pb::CompleteJobResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        let worker_id = parse_id("worker_id", &req.worker_id)?;
        let job_id = parse_id("job_id", &req.job_id)?;
        spans::ids(Some(worker_id), None, Some(job_id), Some(req.attempt));
        let completion = completion(worker_id, job_id, req.attempt, req.result, req.gpu_seconds, "")?;
        self.check_worker(&caller, worker_id).await?;
        self.complete_one(completion).await?;
        Ok(Response::new(pb::CompleteJobResponse {}))
    }

    async fn complete_jobs(&self, request: Request<pb::CompleteJobsRequest>) -> Result<Response<pb::CompleteJobsResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        let worker_id = parse_id("worker_id", &req.worker_id)?;
        spans::ids(Some(worker_id), None, None, None);
        check_batch_len("jobs", req.jobs.len())?;
        // The whole request is checked before anything is recorded.
        let completions = req
            .jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| {
                let field = format!("jobs[{i}].");
                let job_id = parse_id(&format!("{field}job_id"), &job.job_id)?;
                completion(worker_id, job_id, job.attempt, job.result, job.gpu_seconds, &field)
            })
            .collect::<Result<Vec<_>, Status>>()?;
        check_distinct("jobs", &completions.iter().map(|c| c.job_id).collect::<Vec<_>>())?;
        self.check_worker(&caller, worker_id).await?;
        let outcomes = futures::future::join_all(completions.into_iter().map(|c| self.complete_one(c))).await;
        let outcomes =
            outcomes.into_iter().map(|outcome| pb::CompleteJobOutcome { refused: outcome.err().map(|status| refusal(&status)) }).collect();
        Ok(Response::new(pb::CompleteJobsResponse { outcomes }))
    }

    async fn fail_job(&self, request: Request<pb::FailJobRequest>) -> Result<Response<pb::FailJobResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let req = request.into_inner();
        let worker_id = parse_id("worker_id", &req.worker_id)?;
        let job_id = parse_id("job_id", &req.job_id)?;
        let attempt = attempt_of("attempt", req.attempt)?;
        spans::ids(Some(worker_id), None, Some(job_id), Some(attempt));
        let mut error: String = req.error.chars().filter(|&c| c != '\0').take(MAX_ERROR_CHARS).collect();
        if error.trim().is_empty() {
            error = "unspecified worker error".into();
        }
        check_gpu_seconds("gpu_seconds", req.gpu_seconds)?;
        let cause = match pb::FailureCause::try_from(req.cause) {
            Ok(pb::FailureCause::Unspecified) if req.retryable => FailureCause::Transient,
            Ok(pb::FailureCause::Unspecified) | Ok(pb::FailureCause::BadInput) => FailureCause::BadInput,
            Ok(pb::FailureCause::WorkerCannot) => FailureCause::WorkerCannot,
            Ok(pb::FailureCause::Transient) => FailureCause::Transient,
            Err(_) => return Err(invalid("cause", format!("{} is not a FailureCause", req.cause))),
        };
        self.check_worker(&caller, worker_id).await?;
        let state = self.shared.store.fail_job(job_id, attempt, worker_id, &error, cause, req.gpu_seconds).await.map_err(store_status)?;
        self.shared.metrics.failure(match cause {
            FailureCause::BadInput => "bad_input",
            FailureCause::WorkerCannot => "worker_cannot",
            FailureCause::Transient => "transient",
        });
        self.wake_dispatcher();
        Ok(Response::new(pb::FailJobResponse { state: state_to_proto(state) as i32 }))
    }

    async fn deregister_worker(
        &self,
        request: Request<pb::DeregisterWorkerRequest>,
    ) -> Result<Response<pb::DeregisterWorkerResponse>, Status> {
        let caller = self.authorize_worker(&request).await?;
        let worker_id = parse_id("worker_id", &request.into_inner().worker_id)?;
        self.check_worker(&caller, worker_id).await?;
        self.shared.store.set_worker_state(worker_id, flowfarm_core::WorkerState::Gone).await.map_err(store_status)?;
        tracing::info!(worker = %worker_id, "worker deregistered");
        Ok(Response::new(pb::DeregisterWorkerResponse {}))
    }
}

/// Devices as the store keeps them.
/// A registered placement must name one of the worker's models, a mode,
/// and units; what it says is shown to operators, not acted on.
fn check_placement(field: &str, model: &str, p: &pb::ModelPlacement, models: &[String]) -> Result<(), Status> {
    if !models.iter().any(|m| m == model) {
        return Err(invalid(field, "names a model that is not in `models`"));
    }
    if !["replicate", "cfg", "pipeline"].contains(&p.parallel.as_str()) {
        return Err(invalid(&format!("{field}.parallel"), format!("`{}` is not `replicate`, `cfg` or `pipeline`", p.parallel)));
    }
    if p.units.is_empty() || p.units.len() > 64 {
        return Err(invalid(&format!("{field}.units"), "must list 1 to 64 units"));
    }
    let named = |text: &str| !text.trim().is_empty() && text.chars().count() <= 256;
    if let Some(i) = p.units.iter().position(|u| !named(u)) {
        return Err(invalid(&format!("{field}.units[{i}]"), "must be 1 to 256 characters"));
    }
    if !named(&p.encoders) {
        return Err(invalid(&format!("{field}.encoders"), "must be 1 to 256 characters"));
    }
    if !(1..=16).contains(&p.max_batch) {
        return Err(invalid(&format!("{field}.max_batch"), format!("{} is outside 1..=16", p.max_batch)));
    }
    Ok(())
}

fn placements_json(placements: &std::collections::BTreeMap<String, pb::ModelPlacement>) -> serde_json::Value {
    placements
        .iter()
        .map(|(model, p)| {
            let placement = serde_json::json!({"parallel": p.parallel, "units": p.units, "encoders": p.encoders, "max_batch": p.max_batch});
            (model.clone(), placement)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn devices_json(devices: &[pb::Device]) -> serde_json::Value {
    serde_json::Value::Array(
        devices
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name, "memory_bytes": d.memory_bytes, "busy_slots": d.busy_slots,
                    "images_done": d.images_done, "busy_seconds": d.busy_seconds,
                })
            })
            .collect(),
    )
}
