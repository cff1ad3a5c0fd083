//! [`Store`] on Postgres: each method is [`PgStore`]'s statement of the
//! same name (in `jobs/`, `events.rs`, `workers.rs`, `tokens.rs`, …).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, TextEncoderSet, WorkerState};
use uuid::Uuid;

use crate::store::{ProgressSource, Store};
use crate::{
    BatchRow, Completion, EventRow, FailureCause, HeartbeatOutcome, JobCounts, JobFilter, JobResultRow, JobRow, JobSelector, LogCursor,
    LogPage, ModelStats, NewBatch, NewToken, NewWorker, PgStore, ProgressListener, ProgressNote, QueuePause, RetryBackoff, StoreError,
    SubmitOutcome, TokenInfo, WorkerRow,
};

#[async_trait::async_trait]
impl ProgressSource for ProgressListener {
    async fn recv(&mut self) -> Result<ProgressNote, StoreError> {
        ProgressListener::recv(self).await
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn with_retry_backoff(self, backoff: RetryBackoff) -> Self {
        PgStore::with_retry_backoff(self, backoff)
    }

    async fn submit_batch(&self, batch: &NewBatch, jobs: &[ResolvedJob]) -> Result<SubmitOutcome, StoreError> {
        PgStore::submit_batch(self, batch, jobs).await
    }

    async fn get_batch(&self, id: Uuid) -> Result<BatchRow, StoreError> {
        PgStore::get_batch(self, id).await
    }

    async fn recent_batches(&self, submitter: Option<&str>, limit: u32) -> Result<Vec<BatchRow>, StoreError> {
        PgStore::recent_batches(self, submitter, limit).await
    }

    async fn batch_counts(&self, batch_id: Uuid) -> Result<JobCounts, StoreError> {
        PgStore::batch_counts(self, batch_id).await
    }

    async fn get_job(&self, id: Uuid) -> Result<JobRow, StoreError> {
        PgStore::get_job(self, id).await
    }

    async fn list_jobs(&self, filter: &JobFilter, after: Option<Uuid>, limit: u32) -> Result<Vec<JobRow>, StoreError> {
        PgStore::list_jobs(self, filter, after, limit).await
    }

    async fn job_events(&self, job_id: Uuid) -> Result<Vec<EventRow>, StoreError> {
        PgStore::job_events(self, job_id).await
    }

    async fn batch_with_cursor(&self, id: Uuid) -> Result<(BatchRow, LogCursor), StoreError> {
        PgStore::batch_with_cursor(self, id).await
    }

    async fn read_batch_log(&self, batch_id: Uuid, cursor: &LogCursor, limit: u32, want_counts: bool) -> Result<LogPage, StoreError> {
        PgStore::read_batch_log(self, batch_id, cursor, limit, want_counts).await
    }

    async fn cancel_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        PgStore::cancel_jobs(self, selector, actor, reason).await
    }

    async fn retry_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        PgStore::retry_jobs(self, selector, actor, reason).await
    }

    async fn requeue_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        PgStore::requeue_jobs(self, selector, actor, reason).await
    }

    async fn set_priority(&self, selector: &JobSelector, priority: i32) -> Result<u64, StoreError> {
        PgStore::set_priority(self, selector, priority).await
    }

    async fn purge_jobs(&self, selector: Option<&JobSelector>, older_than: Option<DateTime<Utc>>) -> Result<u64, StoreError> {
        PgStore::purge_jobs(self, selector, older_than).await
    }

    async fn dispatch_jobs(&self, model: &str, set: TextEncoderSet, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError> {
        PgStore::dispatch_jobs(self, model, set, limit, actor).await
    }

    async fn dispatch_window(&self, model: &str, set: TextEncoderSet, lookahead_per_worker: u32) -> Result<u32, StoreError> {
        PgStore::dispatch_window(self, model, set, lookahead_per_worker).await
    }

    async fn lane_heads(&self, model: &str) -> Result<Vec<(TextEncoderSet, i32)>, StoreError> {
        PgStore::lane_heads(self, model).await
    }

    async fn unserved(&self, needs: &[(String, TextEncoderSet)]) -> Result<Vec<(String, TextEncoderSet)>, StoreError> {
        PgStore::unserved(self, needs).await
    }

    async fn redispatch_stale(&self, older_than: Duration, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError> {
        PgStore::redispatch_stale(self, older_than, limit, actor).await
    }

    async fn start_job(&self, job_id: Uuid, worker_id: Uuid, lease: Duration) -> Result<JobRow, StoreError> {
        PgStore::start_job(self, job_id, worker_id, lease).await
    }

    async fn start_jobs(&self, requests: &[(Uuid, Uuid)], lease: Duration) -> Result<Vec<Option<JobRow>>, StoreError> {
        PgStore::start_jobs(self, requests, lease).await
    }

    async fn complete_jobs(&self, requests: &[Completion]) -> Result<Vec<bool>, StoreError> {
        PgStore::complete_jobs(self, requests).await
    }

    async fn report_progress(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        step: u32,
        lease: Duration,
    ) -> Result<DateTime<Utc>, StoreError> {
        PgStore::report_progress(self, job_id, attempt, worker_id, step, lease).await
    }

    async fn complete_job(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        result: &JobResultRow,
        gpu_seconds: f64,
    ) -> Result<(), StoreError> {
        PgStore::complete_job(self, job_id, attempt, worker_id, result, gpu_seconds).await
    }

    async fn fail_job(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        error: &str,
        cause: FailureCause,
        gpu_seconds: f64,
    ) -> Result<JobState, StoreError> {
        PgStore::fail_job(self, job_id, attempt, worker_id, error, cause, gpu_seconds).await
    }

    async fn reap_expired_leases(&self) -> Result<Vec<JobRow>, StoreError> {
        PgStore::reap_expired_leases(self).await
    }

    async fn forgive_outage(&self, lease: Duration) -> Result<u64, StoreError> {
        PgStore::forgive_outage(self, lease).await
    }

    async fn set_paused(&self, model: &str, paused: bool, reason: &str, by: &str) -> Result<QueuePause, StoreError> {
        PgStore::set_paused(self, model, paused, reason, by).await
    }

    async fn pauses(&self) -> Result<Vec<QueuePause>, StoreError> {
        PgStore::pauses(self).await
    }

    async fn queue_stats(&self, model: Option<&str>) -> Result<Vec<ModelStats>, StoreError> {
        PgStore::queue_stats(self, model).await
    }

    async fn batches_finished_within(&self, within: Duration) -> Result<Vec<Uuid>, StoreError> {
        PgStore::batches_finished_within(self, within).await
    }

    async fn result_keys(&self, batch: Uuid) -> Result<HashMap<Uuid, (JobState, Option<String>)>, StoreError> {
        PgStore::result_keys(self, batch).await
    }

    async fn gpu_seconds_by_submitter(&self) -> Result<Vec<(String, f64)>, StoreError> {
        PgStore::gpu_seconds_by_submitter(self).await
    }

    async fn batch_submitter(&self, batch_id: Uuid) -> Result<String, StoreError> {
        PgStore::batch_submitter(self, batch_id).await
    }

    async fn job_submitter(&self, job_id: Uuid) -> Result<String, StoreError> {
        PgStore::job_submitter(self, job_id).await
    }

    async fn check_owned(&self, selector: &JobSelector, submitter: &str) -> Result<(), StoreError> {
        PgStore::check_owned(self, selector, submitter).await
    }

    async fn register_worker(&self, worker: &NewWorker) -> Result<WorkerRow, StoreError> {
        PgStore::register_worker(self, worker).await
    }

    async fn worker_token(&self, id: Uuid) -> Result<Option<Uuid>, StoreError> {
        PgStore::worker_token(self, id).await
    }

    async fn get_worker(&self, id: Uuid) -> Result<WorkerRow, StoreError> {
        PgStore::get_worker(self, id).await
    }

    async fn list_workers(&self, include_gone: bool) -> Result<Vec<WorkerRow>, StoreError> {
        PgStore::list_workers(self, include_gone).await
    }

    async fn heartbeat(
        &self,
        worker_id: Uuid,
        running: &[(Uuid, u32)],
        lease: Duration,
        grace: Duration,
    ) -> Result<HeartbeatOutcome, StoreError> {
        PgStore::heartbeat(self, worker_id, running, lease, grace).await
    }

    async fn set_worker_devices(&self, worker_id: Uuid, devices: &serde_json::Value) -> Result<(), StoreError> {
        PgStore::set_worker_devices(self, worker_id, devices).await
    }

    async fn set_worker_state(&self, worker_id: Uuid, state: WorkerState) -> Result<WorkerRow, StoreError> {
        PgStore::set_worker_state(self, worker_id, state).await
    }

    async fn mark_lost_workers(&self, timeout: Duration) -> Result<Vec<Uuid>, StoreError> {
        PgStore::mark_lost_workers(self, timeout).await
    }

    async fn create_token(&self, token: &NewToken, entropy: [u8; 32]) -> Result<(TokenInfo, String), StoreError> {
        PgStore::create_token(self, token, entropy).await
    }

    async fn create_first_admin_token(&self, name: &str, entropy: [u8; 32]) -> Result<Option<(TokenInfo, String)>, StoreError> {
        PgStore::create_first_admin_token(self, name, entropy).await
    }

    async fn authenticate(&self, secret: &str) -> Result<Option<TokenInfo>, StoreError> {
        PgStore::authenticate(self, secret).await
    }

    async fn list_tokens(&self, include_dead: bool) -> Result<Vec<TokenInfo>, StoreError> {
        PgStore::list_tokens(self, include_dead).await
    }

    async fn revoke_token(&self, id: Uuid) -> Result<TokenInfo, StoreError> {
        PgStore::revoke_token(self, id).await
    }

    async fn listen_progress(&self) -> Result<Box<dyn ProgressSource>, StoreError> {
        Ok(Box::new(PgStore::listen_progress(self).await?))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        PgStore::ping(self).await
    }
}
