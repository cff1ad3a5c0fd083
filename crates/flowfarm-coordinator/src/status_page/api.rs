//! The JSON the status page's script reads, and the images it shows.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use flowfarm_core::JobState;
use flowfarm_store::{JobCounts, JobFilter, JobResultRow};
use futures::StreamExt;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{Page, Refusal};
use crate::auth::Caller;

/// Batches the overview lists, newest first.
const RECENT_BATCHES: u32 = 50;
/// Jobs one batch page shows; a larger batch's page shows its first ones.
const MAX_SHEET_JOBS: usize = 5000;
/// Longest side of a thumbnail, in pixels.
const THUMBNAIL_PX: u32 = 192;
/// Read at most this much of one result (a 4096² PNG is well under it).
const MAX_IMAGE_BYTES: usize = 256 * 1024 * 1024;

fn counts(c: &JobCounts) -> Value {
    json!({
        "queued": c.queued, "dispatched": c.dispatched, "running": c.running,
        "succeeded": c.succeeded, "failed": c.failed, "cancelled": c.cancelled, "dead": c.dead,
        "total": c.total(),
    })
}

fn json_response(value: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

fn parse_id(field: &str, text: &str) -> Result<Uuid, Refusal> {
    Uuid::parse_str(text).map_err(|_| Refusal::BadRequest(format!("{field} `{text}` is not a UUID")))
}

/// Queue depth per model and the workers, for admins.
async fn fleet(store: &dyn flowfarm_store::Store) -> Result<(Vec<Value>, Vec<Value>), Refusal> {
    let queues = store
        .queue_stats(None)
        .await?
        .iter()
        .map(|q| {
            json!({
                "model": q.model, "paused": q.paused, "counts": counts(&q.counts),
                "oldest_queued_seconds": q.oldest_queued_seconds,
            })
        })
        .collect();
    let now = Utc::now();
    let workers = store
        .list_workers(false)
        .await?
        .iter()
        .map(|w| {
            json!({
                "name": w.name, "hostname": w.hostname, "state": w.state.as_str(), "devices": w.devices,
                "models": w.models, "capacity": w.capacity, "busy": w.current_job_ids.len(),
                "current_jobs": w.current_job_ids, "images_done": w.images_done, "gpu_seconds": w.gpu_seconds,
                "version": w.version, "heartbeat_seconds_ago": (now - w.last_heartbeat_at).num_milliseconds() as f64 / 1000.0,
            })
        })
        .collect();
    Ok((queues, workers))
}

/// The overview: queues, workers, recent batches.
pub(super) async fn status(State(page): State<Page>, headers: HeaderMap) -> Result<Response, Refusal> {
    let caller = page.viewer(&headers).await?;
    let store = &page.coordinator.shared.store;
    // The fleet and the queues are the operators' view, as over gRPC
    // (ListWorkers, GetQueueStats): a submit token sees its batches only,
    // and its polls do not read them.
    let (queues, workers) = if caller.sees_all() { fleet(store.as_ref()).await? } else { (Vec::new(), Vec::new()) };
    let submitter = (!caller.sees_all()).then_some(caller.name.as_str());
    let batches: Vec<Value> = store
        .recent_batches(submitter, RECENT_BATCHES)
        .await?
        .iter()
        .map(|b| {
            json!({
                "id": b.id, "submitter": b.submitter, "labels": b.labels, "created_at": b.created_at,
                "counts": counts(&b.counts), "gpu_seconds": b.gpu_seconds,
            })
        })
        .collect();
    Ok(json_response(&json!({
        "viewer": { "name": caller.name, "role": caller.role.as_str() },
        "queues": queues,
        "workers": workers,
        "batches": batches,
    })))
}

/// Checks that the batch exists and that `caller` may see it; another
/// tenant's batch answers as a missing one does.
async fn check_batch_visible(page: &Page, caller: &Caller, id: Uuid) -> Result<(), Refusal> {
    let submitter = page.coordinator.shared.store.batch_submitter(id).await?;
    if caller.may_see(&submitter) {
        Ok(())
    } else {
        Err(Refusal::NotFound(format!("batch {id} not found")))
    }
}

/// One batch: its counts and its jobs (prompt, seed, state, progress).
pub(super) async fn batch(State(page): State<Page>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Refusal> {
    let caller = page.viewer(&headers).await?;
    let id = parse_id("batch id", &id)?;
    check_batch_visible(&page, &caller, id).await?;
    let store = &page.coordinator.shared.store;
    let batch = store.get_batch(id).await?;
    let filter = JobFilter { batch_id: Some(id), ..Default::default() };
    let mut jobs = Vec::new();
    let mut after = None;
    while jobs.len() < MAX_SHEET_JOBS {
        let page_rows = store.list_jobs(&filter, after, 1000).await?;
        let Some(last) = page_rows.last() else { break };
        after = Some(last.id);
        jobs.extend(page_rows);
    }
    jobs.truncate(MAX_SHEET_JOBS);
    let jobs: Vec<Value> = jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id, "index": j.index, "state": j.state.as_str(), "model": j.spec.model,
                "prompt": j.spec.prompt, "seed": j.spec.seed.to_string(), "steps": j.spec.steps,
                "progress_step": j.progress_step, "width": j.spec.width, "height": j.spec.height,
                "guidance": j.spec.guidance, "attempt": j.attempt, "error": j.error,
                "image": j.state == JobState::Succeeded && j.result.is_some(),
            })
        })
        .collect();
    Ok(json_response(&json!({
        "id": batch.id, "submitter": batch.submitter, "labels": batch.labels, "created_at": batch.created_at,
        "counts": counts(&batch.counts), "gpu_seconds": batch.gpu_seconds,
        "shown_jobs": jobs.len(), "jobs": jobs,
    })))
}

/// The bytes of a succeeded job's image, if `caller` may see the job.
async fn read_image(page: &Page, caller: &Caller, id: &str) -> Result<(JobResultRow, Vec<u8>), Refusal> {
    let id = parse_id("job id", id)?;
    let store = &page.coordinator.shared.store;
    let submitter = store.job_submitter(id).await?;
    if !caller.may_see(&submitter) {
        return Err(Refusal::NotFound(format!("job {id} not found")));
    }
    let job = store.get_job(id).await?;
    let result = match (&job.result, job.state) {
        (Some(result), JobState::Succeeded) => result.clone(),
        _ => return Err(Refusal::NotFound(format!("job {id} is {}: it has no image", job.state))),
    };
    let (_, mut pieces) = page.coordinator.shared.results.get(&result.key).await.map_err(|e| match e {
        flowfarm_results::ResultError::Missing { .. } => {
            Refusal::NotFound(format!("the image of job {id} is missing from the results store"))
        }
        other => Refusal::Unavailable(format!("reading the image of job {id}: {other}")),
    })?;
    // The recorded size is the worker's word: a hint, bounded.
    let mut bytes = Vec::with_capacity((result.size_bytes as usize).min(16 * 1024 * 1024));
    while let Some(piece) = pieces.next().await {
        let piece = piece.map_err(|e| Refusal::Unavailable(format!("reading the image of job {id}: {e}")))?;
        if bytes.len() + piece.len() > MAX_IMAGE_BYTES {
            return Err(Refusal::Unavailable(format!("the image of job {id} is larger than {MAX_IMAGE_BYTES} bytes")));
        }
        bytes.extend_from_slice(&piece);
    }
    Ok((result, bytes))
}

/// A result never changes once recorded: browsers may keep it. It is served
/// as an image only with an image type, and sandboxed whatever it is, so
/// bytes a worker labelled `text/html` or `text/javascript` never run here.
fn image_response(content_type: &str, bytes: Vec<u8>) -> Response {
    // CompleteJob accepts only these; a result recorded before it checked
    // goes out as a download.
    let image = crate::worker::RESULT_TYPES.contains(&content_type);
    let content_type = if image { content_type } else { "application/octet-stream" };
    let mut response = (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CACHE_CONTROL, "private, max-age=86400, immutable".to_owned()),
            (header::CONTENT_SECURITY_POLICY, "sandbox; default-src 'none'".to_owned()),
        ],
        Body::from(bytes),
    )
        .into_response();
    if !image {
        response.headers_mut().insert(header::CONTENT_DISPOSITION, axum::http::HeaderValue::from_static("attachment"));
    }
    response
}

/// The full image, as the worker wrote it.
pub(super) async fn image(State(page): State<Page>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Refusal> {
    let caller = page.viewer(&headers).await?;
    let (result, bytes) = read_image(&page, &caller, &id).await?;
    Ok(image_response(&result.content_type, bytes))
}

/// The image scaled to fit 192 × 192.
pub(super) async fn thumbnail(State(page): State<Page>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Refusal> {
    let caller = page.viewer(&headers).await?;
    let (_, bytes) = read_image(&page, &caller, &id).await?;
    let thumb = tokio::task::spawn_blocking(move || flowfarm_sheet::thumbnail(&bytes, THUMBNAIL_PX))
        .await
        .map_err(|e| Refusal::Unavailable(format!("making a thumbnail: {e}")))?
        .map_err(|e| Refusal::Unavailable(format!("job {id}: {e}")))?;
    Ok(image_response("image/png", thumb))
}
