//! AdminService: the operators' controls over the queue and the fleet.

use chrono::Utc;
use flowfarm_core::spec::PRIORITY_LIMIT;
use flowfarm_core::{Role, WorkerState};
use flowfarm_proto::v1 as pb;
use flowfarm_proto::v1::admin_service_server::AdminService;
use flowfarm_store::{JobCounts, JobSelector};
use tonic::{Request, Response, Status};

use crate::convert::*;
use crate::Coordinator;

/// Oldest age PurgeJobs takes (100 years), as documented in admin.proto.
pub const MAX_PURGE_AGE_SECONDS: u64 = 3_155_760_000;

const ADMINS: &[Role] = &[Role::Admin];

fn job_selector(field: &str, jobs: Option<&pb::JobSelector>) -> Result<JobSelector, Status> {
    let jobs = jobs.ok_or_else(|| invalid(field, "required: give job ids or a batch id"))?;
    selector(field, &jobs.job_ids, &jobs.batch_id)
}

impl Coordinator {
    fn check_model(&self, field: &str, model: &str) -> Result<(), Status> {
        if !model.is_empty() && self.shared.registry.get(model).is_none() {
            let served: Vec<&str> = self.shared.registry.names().collect();
            return Err(invalid(field, format!("unknown model `{model}` (served: {})", served.join(", "))));
        }
        Ok(())
    }

    async fn move_worker(&self, request: Request<pb::WorkerRef>, state: WorkerState) -> Result<Response<pb::Worker>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let id = parse_id("worker_id", &request.get_ref().worker_id)?;
        let worker = self.shared.store.set_worker_state(id, state).await.map_err(store_status)?;
        tracing::info!(worker = %id, state = state.as_str(), by = %caller.actor(), "worker state set");
        Ok(Response::new(worker_to_proto(&worker)))
    }
}

#[tonic::async_trait]
impl AdminService for Coordinator {
    async fn pause_queue(&self, request: Request<pb::PauseQueueRequest>) -> Result<Response<pb::QueueState>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        self.check_model("model", &req.model)?;
        let state = self.shared.store.set_paused(&req.model, true, &req.reason, &caller.actor()).await.map_err(store_status)?;
        Ok(Response::new(pause_to_proto(&state)))
    }

    async fn resume_queue(&self, request: Request<pb::ResumeQueueRequest>) -> Result<Response<pb::QueueState>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        self.check_model("model", &req.model)?;
        let state = self.shared.store.set_paused(&req.model, false, "", &caller.actor()).await.map_err(store_status)?;
        self.wake_dispatcher();
        Ok(Response::new(pause_to_proto(&state)))
    }

    async fn set_priority(&self, request: Request<pb::SetPriorityRequest>) -> Result<Response<pb::UpdateJobsResponse>, Status> {
        self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        let selector = job_selector("jobs", req.jobs.as_ref())?;
        if !(-PRIORITY_LIMIT..=PRIORITY_LIMIT).contains(&req.priority) {
            return Err(invalid("priority", format!("{} is outside {}..={PRIORITY_LIMIT}", req.priority, -PRIORITY_LIMIT)));
        }
        let updated = self.shared.store.set_priority(&selector, req.priority).await.map_err(store_status)?;
        Ok(Response::new(pb::UpdateJobsResponse { updated }))
    }

    async fn retry_jobs(&self, request: Request<pb::RetryJobsRequest>) -> Result<Response<pb::UpdateJobsResponse>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        let selector = job_selector("jobs", req.jobs.as_ref())?;
        let reason = if req.reason.is_empty() { "retried by operator" } else { &req.reason };
        let moved = self.shared.store.retry_jobs(&selector, &caller.actor(), reason).await.map_err(store_status)?;
        Ok(Response::new(pb::UpdateJobsResponse { updated: moved.len() as u64 }))
    }

    async fn requeue_jobs(&self, request: Request<pb::RequeueJobsRequest>) -> Result<Response<pb::UpdateJobsResponse>, Status> {
        let caller = self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        let selector = job_selector("jobs", req.jobs.as_ref())?;
        let reason = if req.reason.is_empty() { "requeued by operator" } else { &req.reason };
        let moved = self.shared.store.requeue_jobs(&selector, &caller.actor(), reason).await.map_err(store_status)?;
        Ok(Response::new(pb::UpdateJobsResponse { updated: moved.len() as u64 }))
    }

    async fn purge_jobs(&self, request: Request<pb::PurgeJobsRequest>) -> Result<Response<pb::UpdateJobsResponse>, Status> {
        self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        let (selector, cutoff) = match (&req.jobs, req.older_than_seconds) {
            (Some(_), s) if s > 0 => return Err(invalid("older_than_seconds", "give a job selector or an age, not both")),
            (Some(jobs), _) => (Some(job_selector("jobs", Some(jobs))?), None),
            (None, 0) => return Err(invalid("jobs", "give a job selector or older_than_seconds")),
            (None, secs) => {
                if secs > MAX_PURGE_AGE_SECONDS {
                    return Err(invalid(
                        "older_than_seconds",
                        format!("{secs} is more than 100 years ({MAX_PURGE_AGE_SECONDS} s); no job is that old"),
                    ));
                }
                let age = chrono::Duration::try_seconds(secs as i64).ok_or_else(|| invalid("older_than_seconds", "too large"))?;
                let cutoff = Utc::now().checked_sub_signed(age).ok_or_else(|| invalid("older_than_seconds", "too large"))?;
                (None, Some(cutoff))
            }
        };
        let updated = self.shared.store.purge_jobs(selector.as_ref(), cutoff).await.map_err(store_status)?;
        Ok(Response::new(pb::UpdateJobsResponse { updated }))
    }

    async fn get_queue_stats(&self, request: Request<pb::GetQueueStatsRequest>) -> Result<Response<pb::QueueStats>, Status> {
        self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let req = request.into_inner();
        self.check_model("model", &req.model)?;
        let store = &self.shared.store;
        let stats = store.queue_stats((!req.model.is_empty()).then_some(req.model.as_str())).await.map_err(store_status)?;
        let paused = store.pauses().await.map_err(store_status)?.iter().any(|p| p.paused && p.model.is_empty());
        let mut total = JobCounts::default();
        let models = stats
            .iter()
            .map(|s| {
                total.merge(&s.counts);
                pb::ModelQueueStats {
                    model: s.model.clone(),
                    counts: Some(counts_to_proto(&s.counts)),
                    paused: s.paused,
                    oldest_queued_seconds: s.oldest_queued_seconds,
                    waiting_for_worker: s
                        .waiting_for_worker
                        .iter()
                        .map(|(set, jobs)| pb::WaitingForWorker { text_encoders: encoders_to_proto(*set) as i32, jobs: *jobs })
                        .collect(),
                }
            })
            .collect();
        let submitters = store
            .gpu_seconds_by_submitter()
            .await
            .map_err(store_status)?
            .into_iter()
            .map(|(submitter, gpu_seconds)| pb::SubmitterUsage { submitter, gpu_seconds })
            .collect();
        Ok(Response::new(pb::QueueStats { paused, models, total: Some(counts_to_proto(&total)), submitters }))
    }

    async fn list_workers(&self, request: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.shared.auth.authorize(request.metadata(), ADMINS).await?;
        let workers = self.shared.store.list_workers(request.get_ref().include_gone).await.map_err(store_status)?;
        Ok(Response::new(pb::ListWorkersResponse { workers: workers.iter().map(worker_to_proto).collect() }))
    }

    async fn drain_worker(&self, request: Request<pb::WorkerRef>) -> Result<Response<pb::Worker>, Status> {
        self.move_worker(request, WorkerState::Draining).await
    }

    async fn cordon_worker(&self, request: Request<pb::WorkerRef>) -> Result<Response<pb::Worker>, Status> {
        self.move_worker(request, WorkerState::Cordoned).await
    }

    async fn uncordon_worker(&self, request: Request<pb::WorkerRef>) -> Result<Response<pb::Worker>, Status> {
        self.move_worker(request, WorkerState::Active).await
    }

    async fn create_token(&self, request: Request<pb::CreateTokenRequest>) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.create_token_rpc(request).await
    }

    async fn list_tokens(&self, request: Request<pb::ListTokensRequest>) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.list_tokens_rpc(request).await
    }

    async fn revoke_token(&self, request: Request<pb::RevokeTokenRequest>) -> Result<Response<pb::Token>, Status> {
        self.revoke_token_rpc(request).await
    }
}
