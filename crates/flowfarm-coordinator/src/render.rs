//! RenderService: submitting, querying, watching and cancelling batches.

use std::pin::Pin;

use flowfarm_core::spec::{check_idempotency_key, check_labels, resolve_jobs};
use flowfarm_core::{JobState, Role, TextEncoderSet};
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::render_service_server::RenderService;
use flowfarm_store::{JobFilter, JobSelector, NewBatch};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::Caller;
use crate::convert::*;
use crate::{spans, Coordinator};

const SUBMITTERS: &[Role] = &[Role::Submit, Role::Admin];
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
const RESULT_CHUNK: usize = 64 * 1024;

/// What a caller that may not see a batch or job is told: exactly what it
/// would be told if it did not exist.
fn not_found(what: &'static str, id: Uuid) -> Status {
    store_status(flowfarm_store::StoreError::NotFound { what, id })
}

impl Coordinator {
    /// NOT_FOUND unless the caller may see the job.
    async fn check_job_visible(&self, caller: &Caller, job_id: Uuid) -> Result<(), Status> {
        if caller.sees_all() {
            return Ok(());
        }
        let submitter = self.shared.store.job_submitter(job_id).await.map_err(store_status)?;
        if !caller.may_see(&submitter) {
            return Err(not_found("job", job_id));
        }
        Ok(())
    }

    /// NOT_FOUND unless the caller may see everything `selector` names.
    async fn check_owned(&self, caller: &Caller, selector: &JobSelector) -> Result<(), Status> {
        if caller.sees_all() {
            return Ok(());
        }
        self.shared.store.check_owned(selector, &caller.name).await.map_err(store_status)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RenderService for Coordinator {
    async fn submit_batch(&self, request: Request<pb::SubmitBatchRequest>) -> Result<Response<pb::SubmitBatchResponse>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), SUBMITTERS).await?;
        let req = request.into_inner();
        check_idempotency_key(&req.idempotency_key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut label_errors = Vec::new();
        check_labels("labels", &req.labels, &mut label_errors);
        if let Some(first) = label_errors.into_iter().next() {
            return Err(Status::invalid_argument(first.to_string()));
        }
        let shared = &self.shared;
        let mut pick_seed = || rand::random::<u64>() >> 1;
        let jobs = match (req.jobs.is_empty(), &req.grid) {
            (false, Some(_)) => return Err(invalid("grid", "give jobs or a grid, not both")),
            (true, None) => return Err(invalid("jobs", "a batch needs at least one job (or a grid)")),
            (false, None) => resolve_jobs(&job_requests(&req.jobs)?, &shared.registry, &shared.limits, &mut pick_seed),
            (true, Some(grid)) => grid_request(grid)?.resolve(&shared.registry, &shared.limits, &mut pick_seed),
        }
        .map_err(|e| validation_status(&e))?;

        let batch = NewBatch {
            submitter: caller.name.clone(),
            idempotency_key: (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone()),
            content_hash: Sha256::digest(req.encode_to_vec()).to_vec(),
            labels: req.labels.clone(),
            quotas: caller.quotas,
        };
        // Whether the fleet serves what the batch needs, asked beside the
        // write rather than after it, so the answer is not held up.
        let needs: Vec<(String, TextEncoderSet)> =
            jobs.iter().map(|j| (j.model.clone(), j.text_encoders)).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let (outcome, unserved) = tokio::join!(shared.store.submit_batch(&batch, &jobs), shared.store.unserved(&needs));
        let outcome = outcome.map_err(store_status)?;
        spans::ids(None, Some(outcome.batch.id), None, None);
        self.wake_dispatcher();
        tracing::info!(batch = %outcome.batch.id, jobs = jobs.len(), created = outcome.created, submitter = %caller.name, "batch submitted");
        // The batch is stored: a failed check only costs the warnings.
        let unserved = unserved.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot tell whether the fleet serves the batch");
            Vec::new()
        });
        let warnings = unserved
            .into_iter()
            .map(|(model, set)| {
                format!(
                    "model `{model}`: no active worker serves it with text encoders `{}`; its jobs wait in the queue until one registers",
                    set.as_str()
                )
            })
            .collect();
        Ok(Response::new(pb::SubmitBatchResponse { batch: Some(batch_to_proto(&outcome.batch)), created: outcome.created, warnings }))
    }

    async fn get_batch(&self, request: Request<pb::GetBatchRequest>) -> Result<Response<pb::Batch>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), SUBMITTERS).await?;
        let id = parse_id("batch_id", &request.get_ref().batch_id)?;
        spans::ids(None, Some(id), None, None);
        let batch = self.shared.store.get_batch(id).await.map_err(store_status)?;
        if !caller.may_see(&batch.submitter) {
            return Err(not_found("batch", id));
        }
        Ok(Response::new(batch_to_proto(&batch)))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), SUBMITTERS).await?;
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        spans::ids(None, None, Some(id), None);
        self.check_job_visible(&caller, id).await?;
        let job = self.shared.store.get_job(id).await.map_err(store_status)?;
        Ok(Response::new(job_to_proto(&job)))
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), SUBMITTERS).await?;
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => return Err(invalid("page_size", format!("{n} is above the maximum of {MAX_PAGE_SIZE}"))),
            n => n,
        };
        let filter = JobFilter {
            batch_id: (!req.batch_id.is_empty()).then(|| parse_id("batch_id", &req.batch_id)).transpose()?,
            states: req.states.iter().enumerate().map(|(i, s)| state_from_proto(&format!("states[{i}]"), *s)).collect::<Result<_, _>>()?,
            label: (!req.label.is_empty())
                .then(|| {
                    req.label
                        .split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| invalid("label", format!("`{}` is not key=value", req.label)))
                })
                .transpose()?,
            model: (!req.model.is_empty()).then(|| req.model.clone()),
            submitter: (!caller.sees_all()).then(|| caller.name.clone()),
        };
        if let Some(batch_id) = filter.batch_id {
            self.check_owned(&caller, &JobSelector::Batch(batch_id)).await?;
        }
        let after = (!req.page_token.is_empty())
            .then(|| {
                Uuid::parse_str(&req.page_token)
                    .map_err(|_| invalid("page_token", "not a token this server issued; start again without one"))
            })
            .transpose()?;
        let mut jobs = self.shared.store.list_jobs(&filter, after, page_size + 1).await.map_err(store_status)?;
        let next_page_token = if jobs.len() > page_size as usize {
            jobs.truncate(page_size as usize);
            jobs.last().map(|j| j.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse { jobs: jobs.iter().map(job_to_proto).collect(), next_page_token }))
    }

    type WatchBatchStream = BoxStream<pb::WatchBatchEvent>;

    async fn watch_batch(&self, request: Request<pb::WatchBatchRequest>) -> Result<Response<Self::WatchBatchStream>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), SUBMITTERS).await?;
        let req = request.into_inner();
        let batch_id = parse_id("batch_id", &req.batch_id)?;
        spans::ids(None, Some(batch_id), None, None);
        self.check_owned(&caller, &JobSelector::Batch(batch_id)).await?;
        let start = crate::watch::Start::parse(&req.after)?;
        // Subscribed before the log position is taken, so no progress between the two is lost.
        let progress = self.shared.progress.subscribe();
        let (tx, rx) = mpsc::channel(256);
        crate::watch::start(self.shared.store.clone(), &self.shared.tasks, batch_id, start, progress, tx).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_jobs(&self, request: Request<pb::CancelJobsRequest>) -> Result<Response<pb::CancelJobsResponse>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), SUBMITTERS).await?;
        let req = request.into_inner();
        let selector = selector("request", &req.job_ids, &req.batch_id)?;
        self.check_owned(&caller, &selector).await?;
        let reason = if req.reason.is_empty() { "cancelled" } else { req.reason.as_str() };
        let cancelled = self.shared.store.cancel_jobs(&selector, &caller.actor(), reason).await.map_err(store_status)?;
        Ok(Response::new(pb::CancelJobsResponse { cancelled: cancelled.len() as u64 }))
    }

    type GetResultStream = BoxStream<pb::ResultChunk>;

    async fn get_result(&self, request: Request<pb::GetResultRequest>) -> Result<Response<Self::GetResultStream>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), SUBMITTERS).await?;
        let id = parse_id("job_id", &request.get_ref().job_id)?;
        spans::ids(None, None, Some(id), None);
        self.check_job_visible(&caller, id).await?;
        let job = self.shared.store.get_job(id).await.map_err(store_status)?;
        let result = match (&job.result, job.state) {
            (Some(result), JobState::Succeeded) => result.clone(),
            _ => return Err(Status::failed_precondition(format!("job {id} is {}, it has no result", job.state))),
        };
        let (_, mut objects) = self.shared.results.get(&result.key).await.map_err(|e| match e {
            flowfarm_results::ResultError::Missing { .. } => {
                Status::not_found(format!("result object `{}` of job {id} is missing from the results store: {e}", result.key))
            }
            other => Status::unavailable(format!("reading the result of job {id}: {other}")),
        })?;
        let (tx, rx) = mpsc::channel(4);
        self.shared.tasks.spawn(async move {
            let mut first = true;
            // Re-chunked to RESULT_CHUNK: object stores hand out pieces of any size.
            let mut pending = bytes::BytesMut::new();
            loop {
                let next = objects.next().await;
                let done = next.is_none();
                match next {
                    Some(Ok(piece)) => pending.extend_from_slice(&piece),
                    Some(Err(e)) => {
                        let _ = tx.send(Err(Status::unavailable(format!("reading result: {e}")))).await;
                        return;
                    }
                    None => {}
                }
                while pending.len() >= RESULT_CHUNK || (done && !pending.is_empty()) {
                    let n = pending.len().min(RESULT_CHUNK);
                    let chunk = pb::ResultChunk {
                        content_type: if first { result.content_type.clone() } else { String::new() },
                        total_size: if first { result.size_bytes } else { 0 },
                        data: pending.split_to(n).to_vec(),
                    };
                    first = false;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
