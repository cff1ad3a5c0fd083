//! One job attempt: render on a blocking thread with a progress report per
//! step, store the image, report the outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use flowfarm_engine::EngineError;
use flowfarm_proto::v1 as pb;
use flowfarm_queue::Delivery;
use tokio::sync::OwnedSemaphorePermit;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use super::devices::Slot;
use super::*;
use crate::render::resolved_job;
use flowfarm_results::ResultStore;

/// One job attempt, in a span of its own (job, batch, attempt, worker) that
/// every log line of the attempt carries and OTLP exports.
pub(super) async fn run_job(shared: Arc<Shared>, delivery: Delivery, start: pb::StartJobResponse, permit: OwnedSemaphorePermit) {
    let Some(job) = start.job else { return };
    let span =
        tracing::info_span!("job_attempt", job = %job.id, batch = %job.batch_id, attempt = start.attempt, worker = %shared.worker_id);
    run_attempt(shared, delivery, job, start.attempt, permit).instrument(span).await;
}

pub(super) async fn run_attempt(shared: Arc<Shared>, delivery: Delivery, job: pb::Job, attempt: u32, permit: OwnedSemaphorePermit) {
    let Ok(job_id) = Uuid::parse_str(&job.id) else { return };
    let revoked = Arc::new(AtomicBool::new(false));
    let handed_back = Arc::new(AtomicBool::new(false));
    lock(&shared.running).insert(job_id, RunningJob { attempt, revoked: revoked.clone(), handed_back: handed_back.clone() });
    shared.metrics.busy(1);
    let model = job.spec.as_ref().map(|s| s.model.clone()).unwrap_or_default();
    let slot = shared.devices.take(&model);
    let on = slot.map(|slot| shared.devices.labels(&model, slot)).unwrap_or_default();
    tracing::info!(job = %job_id, attempt, device = %on.join("+"), "started");

    let started = Instant::now();
    let outcome = match slot {
        Some(slot) => render(&shared, &model, slot, &job, attempt, revoked.clone(), handed_back.clone()).await,
        None => Err(EngineError::Unserved(format!("this worker does not serve model `{model}`"))),
    };
    let seconds = started.elapsed().as_secs_f64();
    let rendered = outcome.is_ok().then_some(seconds);
    let report = match outcome {
        Ok(png) => {
            let model_hash = shared.devices.models.get(&model).map(|m| m.renderer().model_hash()).unwrap_or_default();
            complete(&shared, &job, attempt, png, &model_hash, &on, seconds).await
        }
        Err(EngineError::Cancelled { step }) if handed_back.load(Ordering::SeqCst) => {
            // Handed back: another worker takes it without an attempt used up.
            let why = format!("the worker shut down at step {step} before finishing");
            fail(&shared, &job.id, attempt, &why, pb::FailureCause::WorkerCannot, seconds).await
        }
        Err(EngineError::Cancelled { step }) => {
            tracing::info!(job = %job_id, step, "stopped: the job is no longer this worker's");
            shared.metrics.finished("dropped");
            Ok(())
        }
        Err(e) => {
            // Bad input can only fail again; anything else may be this machine's trouble.
            let cause = match e {
                EngineError::Input(_) | EngineError::TooLarge { .. } => pb::FailureCause::BadInput,
                EngineError::Unserved(_) => pb::FailureCause::WorkerCannot,
                _ => pb::FailureCause::Transient,
            };
            tracing::warn!(job = %job_id, error = %e, ?cause, "render failed");
            fail(&shared, &job.id, attempt, &e.to_string(), cause, seconds).await
        }
    };
    if let Err(status) = report {
        tracing::warn!(job = %job_id, code = ?status.code(), reason = %status.message(), "report refused: dropping the job");
        shared.metrics.finished("dropped");
    }
    acknowledge(&shared, &delivery).await;
    lock(&shared.running).remove(&job_id);
    if let Some(slot) = slot {
        shared.devices.give(&model, slot, rendered);
    }
    shared.metrics.busy(-1);
    drop(permit);
}

/// Renders on a blocking thread, reporting each step; a refused report
/// stops the render at the next step.
pub(super) async fn render(
    shared: &Arc<Shared>,
    model: &str,
    slot: Slot,
    job: &pb::Job,
    attempt: u32,
    revoked: Arc<AtomicBool>,
    handed_back: Arc<AtomicBool>,
) -> Result<Vec<u8>, EngineError> {
    let spec = resolved_job(job)?;
    let renderer =
        shared.devices.renderer(model, slot).ok_or_else(|| EngineError::Unserved(format!("this worker does not serve model `{model}`")))?;
    let model = model.to_owned();
    let handle = tokio::runtime::Handle::current();
    let shared = shared.clone();
    let job_id = job.id.clone();
    // The attempt's span goes along, so the render thread's logs carry its ids.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        shared.devices.run(&model, slot, || {
            // Entered on the thread that renders (the device's own, for a CPU device with threads of its own).
            let _attempt = span.enter();
            renderer.render_png(&spec, &mut |step, total| {
                if revoked.load(Ordering::SeqCst) || handed_back.load(Ordering::SeqCst) {
                    return false;
                }
                let mut client = shared.client.clone();
                let request = pb::ReportProgressRequest {
                    worker_id: shared.worker_id.clone(),
                    job_id: job_id.clone(),
                    attempt,
                    step: step as u32,
                    total_steps: total as u32,
                };
                match handle.block_on(client.report_progress(request)) {
                    Ok(_) => true,
                    Err(status) if transient(&status) => true, // the lease outlives a short outage
                    Err(status) => {
                        tracing::info!(job = %job_id, reason = %status.message(), "progress refused");
                        revoked.store(true, Ordering::SeqCst);
                        false
                    }
                }
            })
        })
    })
    .await
    .map_err(|e| EngineError::Input(format!("render thread failed: {e}")))?
}

pub(super) async fn complete(
    shared: &Shared,
    job: &pb::Job,
    attempt: u32,
    png: Vec<u8>,
    model_hash: &str,
    devices: &[String],
    seconds: f64,
) -> Result<(), Status> {
    let job_id = Uuid::parse_str(&job.id).map_err(|e| Status::internal(e.to_string()))?;
    let key = ResultStore::key_for(&job.batch_id, job_id, attempt, &shared.worker_id);
    let stored = match shared.results.put(&key, png).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "cannot store the image");
            return fail(shared, &job.id, attempt, &e.to_string(), pb::FailureCause::Transient, seconds).await;
        }
    };
    let completed = pb::CompletedJob {
        job_id: job.id.clone(),
        attempt,
        result: Some(pb::JobResult {
            key: stored.key,
            sha256: stored.sha256,
            size_bytes: stored.size_bytes,
            content_type: "image/png".into(),
            model_hash: model_hash.to_owned(),
        }),
        gpu_seconds: seconds,
    };
    let answer = shared.completions.call(completed).await.unwrap_or_else(|| Err(Status::cancelled("the worker is shutting down")));
    if let Err(status) = answer {
        // Refused for good (cancelled while the image was written, or the
        // attempt is no longer ours): the object belongs to no job. After a
        // transient error the completion may have been recorded: keep it.
        if !transient(&status) {
            if let Err(e) = shared.results.delete(&key).await {
                tracing::warn!(job = %job_id, %key, error = %e, "cannot remove the image of a refused completion");
            }
        }
        return Err(status);
    }
    tracing::info!(job = %job_id, attempt, seconds, "completed");
    shared.metrics.finished("succeeded");
    shared.metrics.observe_render(devices, seconds);
    Ok(())
}

pub(super) async fn fail(
    shared: &Shared,
    job_id: &str,
    attempt: u32,
    error: &str,
    cause: pb::FailureCause,
    gpu_seconds: f64,
) -> Result<(), Status> {
    let request = pb::FailJobRequest {
        worker_id: shared.worker_id.clone(),
        job_id: job_id.to_owned(),
        attempt,
        error: error.to_owned(),
        retryable: cause != pb::FailureCause::BadInput,
        cause: cause as i32,
        gpu_seconds,
    };
    retrying("FailJob", REPORT_PATIENCE, || {
        let mut client = shared.client.clone();
        let request = request.clone();
        async move { client.fail_job(request).await }
    })
    .await?;
    shared.metrics.finished("failed");
    Ok(())
}
