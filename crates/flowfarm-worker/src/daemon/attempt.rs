//! One render: a batch of claimed jobs of one model, size and text-encoder
//! set (one job when `max_batch` is 1), rendered together on a blocking
//! thread with a progress report per job and step; then each job's image
//! stored and its outcome reported on its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use flowfarm_engine::EngineError;
use flowfarm_proto::v1 as pb;
use flowfarm_queue::Delivery;
use futures::future::join_all;
use tokio::sync::OwnedSemaphorePermit;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use super::devices::Slot;
use super::*;
use crate::render::resolved_job;
use flowfarm_results::ResultStore;

/// One job of a render: its message, claim and stop flags, and its span
/// (job, batch, attempt, worker) that every log line about it carries.
struct Member {
    delivery: Delivery,
    job: pb::Job,
    job_id: Uuid,
    attempt: u32,
    /// Set when the job is no longer ours (revoked, refused report).
    revoked: Arc<AtomicBool>,
    /// Set when the drain deadline passed: hand the job back.
    handed_back: Arc<AtomicBool>,
    span: tracing::Span,
}

/// What became of one job of a render.
enum Outcome {
    Rendered(Vec<u8>),
    /// Stopped by its step callback after `step` steps.
    Stopped {
        step: usize,
    },
    Failed {
        error: String,
        cause: pb::FailureCause,
    },
}

impl Outcome {
    fn of(rendered: Result<Vec<u8>, EngineError>) -> Outcome {
        rendered.map_or_else(|e| Outcome::failed(&e), Outcome::Rendered)
    }

    /// Bad input can only fail again; anything else may be this machine's trouble.
    fn failed(e: &EngineError) -> Outcome {
        let cause = match e {
            EngineError::Cancelled { step } => return Outcome::Stopped { step: *step },
            EngineError::Input(_) | EngineError::TooLarge { .. } => pb::FailureCause::BadInput,
            EngineError::Unserved(_) => pb::FailureCause::WorkerCannot,
            _ => pb::FailureCause::Transient,
        };
        Outcome::Failed { error: e.to_string(), cause }
    }
}

/// Renders claimed jobs of one model, size and encoder set as one batch on
/// one of the model's slots, then settles each job.
pub(super) async fn run_batch(shared: Arc<Shared>, claimed: Vec<(Delivery, pb::StartJobResponse)>, permit: OwnedSemaphorePermit) {
    let members: Vec<Member> = claimed
        .into_iter()
        .filter_map(|(delivery, start)| {
            let job = start.job?;
            let job_id = Uuid::parse_str(&job.id).ok()?;
            let span = tracing::info_span!("job_attempt", job = %job.id, batch = %job.batch_id, attempt = start.attempt, worker = %shared.worker_id);
            let revoked = Arc::new(AtomicBool::new(false));
            let handed_back = Arc::new(AtomicBool::new(false));
            Some(Member { delivery, job, job_id, attempt: start.attempt, revoked, handed_back, span })
        })
        .collect();
    let Some(first) = members.first() else { return };
    let model = first.job.spec.as_ref().map(|s| s.model.clone()).unwrap_or_default();
    {
        let mut running = lock(&shared.running);
        for m in &members {
            running.insert(m.job_id, RunningJob { attempt: m.attempt, revoked: m.revoked.clone(), handed_back: m.handed_back.clone() });
        }
    }
    let jobs = members.len();
    shared.metrics.busy(jobs as i64);
    let slot = shared.devices.take(&model);
    let on = slot.map(|slot| shared.devices.labels(&model, slot)).unwrap_or_default();
    for m in &members {
        m.span.in_scope(|| tracing::info!(job = %m.job_id, attempt = m.attempt, device = %on.join("+"), batch_of = jobs, "started"));
    }

    let started = Instant::now();
    let outcomes = match slot {
        Some(slot) => render(&shared, &model, slot, &members).await,
        None => {
            members.iter().map(|_| Outcome::failed(&EngineError::Unserved(format!("this worker does not serve model `{model}`")))).collect()
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let images = outcomes.iter().filter(|o| matches!(o, Outcome::Rendered(_))).count();
    // The render's device time, shared by the jobs that took part.
    let share = seconds / jobs as f64;
    let model_hash = shared.devices.models.get(&model).map(|m| m.renderer().model_hash()).unwrap_or_default();
    join_all(members.iter().zip(outcomes).map(|(m, outcome)| settle(&shared, m, outcome, &model_hash, share).instrument(m.span.clone())))
        .await;
    if let Some(slot) = slot {
        shared.devices.give(&model, slot, images as u64, seconds);
        if images > 0 {
            shared.metrics.observe_render(&on, seconds, jobs);
        }
    }
    shared.metrics.busy(-(jobs as i64));
    drop(permit);
}

/// Reports one job's outcome, acknowledges its message and forgets it.
async fn settle(shared: &Shared, m: &Member, outcome: Outcome, model_hash: &str, seconds: f64) {
    let report = match outcome {
        Outcome::Rendered(png) => complete(shared, &m.job, m.attempt, png, model_hash, seconds).await,
        Outcome::Stopped { step } if m.handed_back.load(Ordering::SeqCst) => {
            // Handed back: another worker takes it without an attempt used up.
            let why = format!("the worker shut down at step {step} before finishing");
            fail(shared, &m.job.id, m.attempt, &why, pb::FailureCause::WorkerCannot, seconds).await
        }
        Outcome::Stopped { step } => {
            tracing::info!(job = %m.job_id, step, "stopped: the job is no longer this worker's");
            shared.metrics.finished("dropped");
            Ok(())
        }
        Outcome::Failed { error, cause } => {
            tracing::warn!(job = %m.job_id, %error, ?cause, "render failed");
            fail(shared, &m.job.id, m.attempt, &error, cause, seconds).await
        }
    };
    if let Err(status) = report {
        tracing::warn!(job = %m.job_id, code = ?status.code(), reason = %status.message(), "report refused: dropping the job");
        shared.metrics.finished("dropped");
    }
    acknowledge(shared, &m.delivery).await;
    lock(&shared.running).remove(&m.job_id);
}

/// Renders the batch on a blocking thread, reporting each job's steps; a
/// refused report takes that job out at its next step.
async fn render(shared: &Arc<Shared>, model: &str, slot: Slot, members: &[Member]) -> Vec<Outcome> {
    let Some(renderer) = shared.devices.renderer(model, slot) else {
        return members
            .iter()
            .map(|_| Outcome::failed(&EngineError::Unserved(format!("this worker does not serve model `{model}`"))))
            .collect();
    };
    // Jobs whose spec cannot be rendered fail alone; the rest render together.
    let specs: Vec<Result<flowfarm_core::ResolvedJob, EngineError>> = members.iter().map(|m| resolved_job(&m.job)).collect();
    let rendering: Vec<usize> = (0..members.len()).filter(|&i| specs[i].is_ok()).collect();
    let jobs: Vec<flowfarm_core::ResolvedJob> = specs.iter().filter_map(|s| s.as_ref().ok().cloned()).collect();
    struct Watch {
        job_id: String,
        attempt: u32,
        revoked: Arc<AtomicBool>,
        handed_back: Arc<AtomicBool>,
    }
    let watches: Vec<Watch> = rendering
        .iter()
        .map(|&i| {
            let m = &members[i];
            Watch { job_id: m.job.id.clone(), attempt: m.attempt, revoked: m.revoked.clone(), handed_back: m.handed_back.clone() }
        })
        .collect();
    let model_name = model.to_owned();
    let handle = tokio::runtime::Handle::current();
    let thread_shared = shared.clone();
    // The first job's span goes along, so the render thread's logs carry its ids.
    let span = members[rendering.first().copied().unwrap_or(0)].span.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let shared = thread_shared;
        shared.devices.run(&model_name, slot, || {
            // Entered on the thread that renders (the device's own, for a CPU device with threads of its own).
            let _render = span.enter();
            renderer.render_pngs(&jobs, &mut |job, step, total| {
                let w = &watches[job];
                if w.revoked.load(Ordering::SeqCst) || w.handed_back.load(Ordering::SeqCst) {
                    return false;
                }
                let mut client = shared.client.clone();
                let request = pb::ReportProgressRequest {
                    worker_id: shared.worker_id.clone(),
                    job_id: w.job_id.clone(),
                    attempt: w.attempt,
                    step: step as u32,
                    total_steps: total as u32,
                };
                match handle.block_on(client.report_progress(request)) {
                    Ok(_) => true,
                    Err(status) if transient(&status) => true, // the lease outlives a short outage
                    Err(status) => {
                        tracing::info!(job = %w.job_id, reason = %status.message(), "progress refused");
                        w.revoked.store(true, Ordering::SeqCst);
                        false
                    }
                }
            })
        })
    })
    .await;
    let mut rendered = match rendered {
        Ok(Ok(pngs)) => pngs.into_iter().map(Outcome::of).collect::<Vec<_>>(),
        Ok(Err(e)) => rendering.iter().map(|_| Outcome::failed(&e)).collect(),
        Err(e) => rendering.iter().map(|_| Outcome::failed(&EngineError::Input(format!("render thread failed: {e}")))).collect(),
    }
    .into_iter();
    specs
        .into_iter()
        .map(|spec| match spec {
            Ok(_) => rendered.next().unwrap_or_else(|| Outcome::failed(&EngineError::Input("the job was not rendered".into()))),
            Err(e) => Outcome::failed(&e),
        })
        .collect()
}

pub(super) async fn complete(
    shared: &Shared,
    job: &pb::Job,
    attempt: u32,
    png: Vec<u8>,
    model_hash: &str,
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
