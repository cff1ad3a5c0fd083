//! The store's contract: every read and write of the farm's state, as the
//! coordinator makes them. [`PgStore`](crate::PgStore) implements it on
//! Postgres, [`SqliteStore`](crate::SqliteStore) on SQLite; the conformance
//! suite in `tests/store.rs`, run against both, says what an implementation
//! must do.
//!
//! Invariants every implementation keeps:
//! - A job changes state only along a [`Transition`](flowfarm_core::Transition)
//!   the state machine allows, checked in the same statement (or transaction)
//!   that makes the change, which also writes one `job_events` row per job.
//! - Reports (progress, completion, failure) are fenced by (job, attempt,
//!   worker): a report for an attempt that lost its lease changes nothing.
//! - Nothing is half-written: a call that fails leaves the store as it was.
//!
//! Types that cross this trait are the store's own rows and requests; none
//! carries a database driver's type.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, TextEncoderSet, WorkerState};
use uuid::Uuid;

use crate::{
    BatchRow, Completion, EventRow, FailureCause, HeartbeatOutcome, JobCounts, JobFilter, JobResultRow, JobRow, JobSelector, LogCursor,
    LogPage, ModelStats, NewBatch, NewToken, NewWorker, ProgressNote, QueuePause, RetryBackoff, StoreError, SubmitOutcome, TokenInfo,
    WorkerRow,
};

/// Step progress notes from every coordinator, as they happen.
#[async_trait::async_trait]
pub trait ProgressSource: Send {
    /// The next note. Notes sent while the source was reconnecting are not
    /// seen: a watcher reads the stored steps instead.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the source is lost and cannot be
    /// re-established now (call again to retry); [`StoreError::Corrupt`] for
    /// a note this build does not understand.
    async fn recv(&mut self) -> Result<ProgressNote, StoreError>;
}

/// Where the farm's batches, jobs, events, workers, pauses and tokens live.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The same store, with retried jobs held back by `backoff`
    /// ([`RetryBackoff::NONE`] unless set).
    fn with_retry_backoff(self, backoff: RetryBackoff) -> Self
    where
        Self: Sized;

    /// Stores a batch and all its jobs, with one creation event per job, at once.
    ///
    /// With an idempotency key already used by the same submitter: identical
    /// content returns the first batch (`created = false`), other content is
    /// [`StoreError::IdempotencyConflict`]. A new batch must fit the
    /// submitter's quotas. Nothing is written on error.
    ///
    /// # Errors
    /// [`StoreError::IdempotencyConflict`], [`StoreError::QuotaExceeded`], or
    /// [`StoreError::Database`].
    async fn submit_batch(&self, batch: &NewBatch, jobs: &[ResolvedJob]) -> Result<SubmitOutcome, StoreError>;

    /// The batch with its per-state counts.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such batch.
    async fn get_batch(&self, id: Uuid) -> Result<BatchRow, StoreError>;

    /// The `limit` most recent batches, newest first, with their counts; only
    /// `submitter`'s when given.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn recent_batches(&self, submitter: Option<&str>, limit: u32) -> Result<Vec<BatchRow>, StoreError>;

    /// Jobs of a batch in each state.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn batch_counts(&self, batch_id: Uuid) -> Result<JobCounts, StoreError>;

    /// One job.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such job.
    async fn get_job(&self, id: Uuid) -> Result<JobRow, StoreError>;

    /// Up to `limit` jobs matching `filter` with ids above `after`, in id order.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn list_jobs(&self, filter: &JobFilter, after: Option<Uuid>, limit: u32) -> Result<Vec<JobRow>, StoreError>;

    /// Every event of one job, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn job_events(&self, job_id: Uuid) -> Result<Vec<EventRow>, StoreError>;

    /// The batch and its counts together with the log position they are
    /// consistent with: the counts are those of the snapshot the cursor
    /// names, so counts + every event read from the cursor on = the batch now.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such batch.
    async fn batch_with_cursor(&self, id: Uuid) -> Result<(BatchRow, LogCursor), StoreError>;

    /// The next page (at most `limit` events) of `batch_id`'s log after
    /// `cursor`. Between reads this starts a new read under a fresh snapshot
    /// (and, with `want_counts`, also counts the batch's jobs under it);
    /// inside one it continues where the cursor stands.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn read_batch_log(&self, batch_id: Uuid, cursor: &LogCursor, limit: u32, want_counts: bool) -> Result<LogPage, StoreError>;

    /// Cancels the selected jobs that are queued, dispatched or running.
    /// Returns the jobs cancelled.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn cancel_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError>;

    /// Puts failed, cancelled and dead jobs back in the queue with one more
    /// attempt than they have used.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn retry_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError>;

    /// Takes dispatched and running jobs back to the queue (attempt + 1), so
    /// the old attempt's reports are refused.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn requeue_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError>;

    /// Sets the priority of the selected jobs that are still queued; returns how many.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn set_priority(&self, selector: &JobSelector, priority: i32) -> Result<u64, StoreError>;

    /// Deletes terminal jobs and their events that are selected,
    /// or, without a selector, that were last updated before `older_than`.
    /// Batches left without jobs are deleted too; every batch touched is
    /// listed by [`Store::batches_finished_within`] for a while, so the
    /// result sweeper removes the purged jobs' objects. Returns the jobs deleted.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn purge_jobs(&self, selector: Option<&JobSelector>, older_than: Option<DateTime<Utc>>) -> Result<u64, StoreError>;

    /// Moves up to `limit` queued jobs of `model` that use the text encoders
    /// `set` to dispatched, highest priority then oldest first, skipping rows
    /// another coordinator holds and jobs still in their retry backoff;
    /// returns them in that order. Returns nothing while the queue (global or
    /// the model's) is paused.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn dispatch_jobs(&self, model: &str, set: TextEncoderSet, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError>;

    /// How many more jobs of `model` using the text encoders `set` may be
    /// dispatched now: the free slots of the active workers serving that
    /// model with that set (capacity minus the jobs they may be holding) plus
    /// `lookahead_per_worker` per worker, so that workers never wait on the
    /// dispatcher while the rest stays in the store, where priority changes,
    /// pauses and cancels act on it. A worker with T5 also serves CLIP-only
    /// jobs, so every job of the model counts against the CLIP-only window,
    /// and only T5 jobs against the T5 one.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn dispatch_window(&self, model: &str, set: TextEncoderSet, lookahead_per_worker: u32) -> Result<u32, StoreError>;

    /// Per lane of `model` (its text encoders), the highest priority of the
    /// jobs that may be dispatched now (queued, not held back by a retry);
    /// lanes with none are left out. The dispatcher serves the lane with the
    /// best job first.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn lane_heads(&self, model: &str) -> Result<Vec<(TextEncoderSet, i32)>, StoreError>;

    /// Of the (model, text encoders) pairs `needs`, those no active worker
    /// serves, in one round trip.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn unserved(&self, needs: &[(String, TextEncoderSet)]) -> Result<Vec<(String, TextEncoderSet)>, StoreError>;

    /// Dispatches again up to `limit` jobs that were dispatched more than
    /// `older_than` ago and never started: their stream message may be lost
    /// (Redis restarted or flushed). A duplicate message is harmless: the
    /// second StartJob is refused. Each gets a `dispatched → dispatched` event.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn redispatch_stale(&self, older_than: Duration, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError>;

    /// Claims a dispatched job for `worker_id`: running, with a lease of
    /// `lease` from now. The attempt number is the job's.
    ///
    /// A worker that failed an earlier attempt of the job does not get it
    /// again while another active worker serving the model could: the job
    /// goes back to the queue (same attempt, held back one second so the
    /// same worker does not pick it straight up again) and this is
    /// [`StoreError::Declined`].
    ///
    /// Claims are idempotent: the worker that already runs the job gets the
    /// running job back, with its attempt, as its first claim did.
    ///
    /// # Errors
    /// [`StoreError::WorkerUnavailable`] if the worker is not active (the
    /// job goes back to the queue); [`StoreError::WrongState`] if the job is
    /// not dispatched nor already this worker's (a duplicate message, say); [`StoreError::Declined`];
    /// [`StoreError::NotFound`].
    async fn start_job(&self, job_id: Uuid, worker_id: Uuid, lease: Duration) -> Result<JobRow, StoreError>;

    /// Many StartJobs at once (the coordinator groups concurrent calls;
    /// [`Store::start_job`] is a group of one): a pair starts when
    /// the job is dispatched, the worker active, and the worker did not fail
    /// it before while another active worker serves the model. Returns, in
    /// request order, the started job or None for a request that did not
    /// start (call `start_job` for it to learn why, and to put a declined
    /// job back).
    ///
    /// # Errors
    /// [`StoreError::Database`]; nothing is started then.
    async fn start_jobs(&self, requests: &[(Uuid, Uuid)], lease: Duration) -> Result<Vec<Option<JobRow>>, StoreError>;

    /// Many CompleteJobs at once (the coordinator groups concurrent calls;
    /// [`Store::complete_job`] is a group of one plus the repeat check): each running attempt succeeds with its result, and its worker
    /// is credited once. Returns, in request order, whether each took effect here;
    /// for one that did not, call `complete_job` (a repeat is a no-op there,
    /// anything else is refused with the reason).
    ///
    /// # Errors
    /// [`StoreError::Database`]; nothing is completed then.
    async fn complete_jobs(&self, requests: &[Completion]) -> Result<Vec<bool>, StoreError>;

    /// Records step progress of a running attempt, renews its lease and
    /// notifies every coordinator's watchers ([`Store::listen_progress`]).
    /// Returns the new lease expiry.
    ///
    /// # Errors
    /// [`StoreError::WrongState`] if that attempt no longer holds the job.
    async fn report_progress(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        step: u32,
        lease: Duration,
    ) -> Result<DateTime<Utc>, StoreError>;

    /// Marks a running attempt succeeded with its result, and credits the
    /// worker, in one transaction. Repeating the same completion is a no-op.
    ///
    /// # Errors
    /// [`StoreError::WrongState`] if that attempt no longer holds the job.
    async fn complete_job(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        result: &JobResultRow,
        gpu_seconds: f64,
    ) -> Result<(), StoreError>;

    /// Records a failed attempt, by `cause`: bad input fails the job for
    /// good; a transient error requeues it (attempt + 1) while attempts
    /// remain, else it is dead; a worker that cannot serve it hands it to
    /// another without using up an attempt where one can take it.
    /// `gpu_seconds`, the attempt's device time, is recorded on its event and
    /// added to the job's and the worker's totals. Returns the job's new state.
    ///
    /// # Errors
    /// [`StoreError::WrongState`] if that attempt no longer holds the job.
    async fn fail_job(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        error: &str,
        cause: FailureCause,
        gpu_seconds: f64,
    ) -> Result<JobState, StoreError>;

    /// Returns running jobs whose lease has expired to the queue (attempt + 1)
    /// or, on their last attempt, marks them dead. Returns the jobs moved.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn reap_expired_leases(&self) -> Result<Vec<JobRow>, StoreError>;

    /// After the store or the coordinator could not be reached, nobody could
    /// renew a lease or record a heartbeat: gives every running job at least
    /// a full `lease` from now and counts every live worker as heard from now,
    /// so the outage is not taken for dead workers. Returns the jobs renewed.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn forgive_outage(&self, lease: Duration) -> Result<u64, StoreError>;

    /// Sets or clears a pause; `model` empty is the global switch.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn set_paused(&self, model: &str, paused: bool, reason: &str, by: &str) -> Result<QueuePause, StoreError>;

    /// Every pause switch ever set.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn pauses(&self) -> Result<Vec<QueuePause>, StoreError>;

    /// Per-model job counts, pauses and oldest queued age.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn queue_stats(&self, model: Option<&str>) -> Result<Vec<ModelStats>, StoreError>;

    /// Batches with a job that reached a terminal state, or that a purge
    /// touched, within `within` (purged whole or not): where result objects
    /// of attempts that did not succeed, or of purged jobs, may be left.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn batches_finished_within(&self, within: Duration) -> Result<Vec<Uuid>, StoreError>;

    /// Each job of `batch`: its state and the result key it recorded.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn result_keys(&self, batch: Uuid) -> Result<HashMap<Uuid, (JobState, Option<String>)>, StoreError>;

    /// Device time per submitter over all their jobs' attempts, most first.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn gpu_seconds_by_submitter(&self) -> Result<Vec<(String, f64)>, StoreError>;

    /// The submitter of a batch.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such batch.
    async fn batch_submitter(&self, batch_id: Uuid) -> Result<String, StoreError>;

    /// The submitter of a job's batch.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such job.
    async fn job_submitter(&self, job_id: Uuid) -> Result<String, StoreError>;

    /// Checks that everything `selector` names belongs to `submitter`; a job
    /// or batch of another submitter is reported exactly as a missing one.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] naming the first batch or job that is not the submitter's.
    async fn check_owned(&self, selector: &JobSelector, submitter: &str) -> Result<(), StoreError>;

    /// Registers a worker in state `active`.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed insert.
    async fn register_worker(&self, worker: &NewWorker) -> Result<WorkerRow, StoreError>;

    /// The token worker `id` registered with (None for workers registered
    /// before tokens were recorded).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such worker.
    async fn worker_token(&self, id: Uuid) -> Result<Option<Uuid>, StoreError>;

    /// One worker.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such worker.
    async fn get_worker(&self, id: Uuid) -> Result<WorkerRow, StoreError>;

    /// Workers in registration order; gone ones only if asked.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn list_workers(&self, include_gone: bool) -> Result<Vec<WorkerRow>, StoreError>;

    /// Records a heartbeat, in one transaction: renews the leases of the
    /// listed (job, attempt) pairs the worker still holds, and only those;
    /// takes back the running jobs it holds but no longer lists, once they
    /// started more than `grace` ago (a claim made since the heartbeat left
    /// may not be listed yet); brings a `lost` worker back to `active`; and
    /// names the listed jobs it no longer holds. (GPU time is counted when an
    /// attempt ends, not from heartbeats.)
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown worker;
    /// [`StoreError::WorkerUnavailable`] for one that is gone.
    async fn heartbeat(
        &self,
        worker_id: Uuid,
        running: &[(Uuid, u32)],
        lease: Duration,
        grace: Duration,
    ) -> Result<HeartbeatOutcome, StoreError>;

    /// Replaces what the worker said of its devices (a JSON array of
    /// `{name, memory_bytes, busy_slots, images_done, busy_seconds}`), as its
    /// heartbeats report them.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for an unknown worker.
    async fn set_worker_devices(&self, worker_id: Uuid, devices: &serde_json::Value) -> Result<(), StoreError>;

    /// Moves a worker to `draining`, `cordoned` or back to `active`, or to
    /// `gone` when it deregisters.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::WorkerUnavailable`] if it is
    /// gone (or lost, for anything but gone).
    async fn set_worker_state(&self, worker_id: Uuid, state: WorkerState) -> Result<WorkerRow, StoreError>;

    /// Marks workers silent for longer than `timeout` as lost; returns their ids.
    /// Their jobs are left to lease expiry.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn mark_lost_workers(&self, timeout: Duration) -> Result<Vec<Uuid>, StoreError>;

    /// Creates a token and returns it with its secret, which is not stored
    /// and cannot be shown again. `entropy` must be 32 random bytes.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the insert fails.
    async fn create_token(&self, token: &NewToken, entropy: [u8; 32]) -> Result<(TokenInfo, String), StoreError>;

    /// Makes an admin token named `name` if no live admin token exists, and
    /// returns it with its secret; `None` if one exists. Coordinators that
    /// start together make at most one.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed statement.
    async fn create_first_admin_token(&self, name: &str, entropy: [u8; 32]) -> Result<Option<(TokenInfo, String)>, StoreError>;

    /// The live (not revoked, not expired) token with this secret, if any.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn authenticate(&self, secret: &str) -> Result<Option<TokenInfo>, StoreError>;

    /// Tokens (without secrets) in creation order: the live ones, and with
    /// `include_dead` the revoked and expired ones too.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    async fn list_tokens(&self, include_dead: bool) -> Result<Vec<TokenInfo>, StoreError>;

    /// Revokes a token; its secret stops working at once. Returns it as revoked.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if no unrevoked token has that id.
    async fn revoke_token(&self, id: Uuid) -> Result<TokenInfo, StoreError>;

    /// Starts listening for progress notes from every coordinator.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the listening connection cannot be opened.
    async fn listen_progress(&self) -> Result<Box<dyn ProgressSource>, StoreError>;

    /// Whether the database answers a trivial query now.
    ///
    /// # Errors
    /// [`StoreError::Database`] when it does not.
    async fn ping(&self) -> Result<(), StoreError>;
}
