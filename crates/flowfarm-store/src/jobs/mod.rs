//! Batches and jobs: submission, queries, and every state transition, one
//! concern per file:
//!
//! - `submit`: a batch and its jobs in one transaction, within quotas;
//! - `query`: batches, jobs and their events read;
//! - `operator`: cancel, retry, requeue, priority, purge;
//! - `dispatch`: queued jobs into the work streams, and lost messages again;
//! - `attempts`: starts, progress, completions and failures fenced by
//!   (job, attempt, worker), and expired leases;
//! - `stats`: pauses, counts and usage.
//!
//! This file holds what they share: the types callers pass in, and [`Move`],
//! the one way a job changes state.
//!
//! Invariant: every state change is one statement that moves only rows whose
//! state the [`Transition`] allows and writes one `job_events` row per job moved.

mod attempts;
mod dispatch;
mod operator;
mod query;
mod stats;
mod submit;

use std::collections::BTreeMap;
use std::time::Duration;

use flowfarm_core::{JobState, Transition};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::rows::{JobResultRow, JOB_COLUMNS};
use crate::{BatchRow, JobRow, PgStore, Quotas, StoreError};

/// One CompleteJob: the attempt, the worker, what it produced.
#[derive(Debug, Clone)]
pub struct Completion {
    pub job_id: Uuid,
    pub attempt: u32,
    pub worker_id: Uuid,
    pub result: JobResultRow,
    pub gpu_seconds: f64,
}

/// A batch about to be stored.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub submitter: String,
    pub idempotency_key: Option<String>,
    /// Hash of the canonical request: equal requests give equal hashes.
    pub content_hash: Vec<u8>,
    pub labels: BTreeMap<String, String>,
    /// The submitting token's quotas, checked in the batch's transaction.
    pub quotas: Quotas,
}

/// What [`PgStore::submit_batch`] did.
#[derive(Debug, Clone)]
pub struct SubmitOutcome {
    pub batch: BatchRow,
    /// False when the idempotency key matched an earlier, identical batch.
    pub created: bool,
}

/// Which jobs an operation applies to.
#[derive(Debug, Clone)]
pub enum JobSelector {
    Ids(Vec<Uuid>),
    Batch(Uuid),
}

/// ListJobs filters; `None` or empty matches everything.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub batch_id: Option<Uuid>,
    pub states: Vec<JobState>,
    /// (key, value): jobs whose labels, or whose batch's labels, hold that pair.
    pub label: Option<(String, String)>,
    pub model: Option<String>,
    /// Only jobs of this submitter's batches.
    pub submitter: Option<String>,
}

/// One report's identity: the job, the attempt it is about, and the worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fence {
    job_id: Uuid,
    attempt: u32,
    worker_id: Uuid,
}

/// A state change applied to every selected row in one statement, with one
/// `job_events` row per job moved.
struct Move<'a> {
    transition: Transition,
    actor: &'a str,
    reason: &'a str,
}

impl Move<'_> {
    /// Runs the move. `select` appends the WHERE conditions (after `AND`),
    /// `set` appends extra `, column = value` assignments, `tail` appends
    /// ORDER BY / LIMIT for the target scan.
    async fn run(
        &self,
        conn: &mut PgConnection,
        select: impl FnOnce(&mut QueryBuilder<'_, Postgres>),
        set: impl FnOnce(&mut QueryBuilder<'_, Postgres>),
        tail: &str,
        skip_locked: bool,
    ) -> Result<Vec<JobRow>, StoreError> {
        let from: Vec<&str> = self.transition.from_states().iter().map(|s| s.as_str()).collect();
        let to = self.transition.to_state().as_str();
        let mut qb = QueryBuilder::new("WITH target AS (SELECT id, state AS from_state FROM jobs WHERE state = ANY(");
        qb.push_bind(from).push(") AND ");
        select(&mut qb);
        qb.push(" ").push(tail).push(" FOR UPDATE");
        if skip_locked {
            qb.push(" SKIP LOCKED");
        }
        qb.push("), upd AS (UPDATE jobs j SET state = ").push_bind(to);
        if self.transition.starts_new_attempt() {
            qb.push(", attempt = j.attempt + 1, progress_step = 0");
        }
        qb.push(", updated_at = now()");
        set(&mut qb);
        qb.push(" FROM target t WHERE j.id = t.id RETURNING j.*, t.from_state), ev AS (");
        qb.push("INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason) ");
        qb.push("SELECT id, batch_id, from_state, state, attempt, ").push_bind(self.actor.to_owned());
        qb.push(", ").push_bind(self.reason.to_owned()).push(" FROM upd) SELECT ");
        qb.push(JOB_COLUMNS).push(" FROM upd ORDER BY id");
        let rows = qb.build().fetch_all(&mut *conn).await?;
        rows.iter().map(JobRow::from_row).collect()
    }
}

fn push_selector(qb: &mut QueryBuilder<'_, Postgres>, selector: &JobSelector) {
    match selector {
        JobSelector::Ids(ids) => qb.push("id = ANY(").push_bind(ids.clone()).push(")"),
        JobSelector::Batch(batch) => qb.push("batch_id = ").push_bind(*batch),
    };
}

fn push_fence(qb: &mut QueryBuilder<'_, Postgres>, fence: Fence) {
    qb.push("id = ").push_bind(fence.job_id);
    qb.push(" AND attempt = ").push_bind(fence.attempt as i32);
    qb.push(" AND worker_id = ").push_bind(fence.worker_id);
}

/// Puts a dispatched job back in the queue (same attempt, held back a
/// second so the same worker does not read it straight back); with
/// `only_if_excluded`, only if `worker_id` failed it and another worker could take it.
async fn decline(
    conn: &mut PgConnection,
    job_id: Uuid,
    worker_id: Uuid,
    actor: &str,
    reason: &str,
    only_if_excluded: bool,
) -> Result<Vec<JobRow>, StoreError> {
    Move { transition: Transition::Decline, actor, reason }
        .run(
            conn,
            |qb| {
                qb.push("id = ").push_bind(job_id);
                if only_if_excluded {
                    qb.push(" AND ").push_bind(worker_id).push(" = ANY(failed_workers) AND ");
                    push_other_worker_available(qb, false);
                }
            },
            |qb| {
                qb.push(", not_before = now() + interval '1 second', dispatched_at = NULL");
            },
            "",
            false,
        )
        .await
}

/// Whether an active worker that can serve the job (its model and its text
/// encoders), other than those that failed it and, with `not_the_holder`,
/// the one holding it, exists (inside a `jobs` scan).
fn push_other_worker_available(qb: &mut QueryBuilder<'_, Postgres>, not_the_holder: bool) {
    qb.push(
        "EXISTS (SELECT 1 FROM workers w WHERE w.state = 'active' AND jobs.model = ANY(w.models) \
         AND jobs.text_encoders = ANY(w.text_encoder_sets) AND NOT (w.id = ANY(jobs.failed_workers))",
    );
    qb.push(if not_the_holder { " AND w.id <> jobs.worker_id)" } else { ")" });
}

/// Why a worker failed a job, which decides where the job goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// Nobody can render it: failed for good.
    BadInput,
    /// This worker lacks what it needs: requeued for another worker without
    /// using up an attempt while one can take it, else as `Transient`.
    WorkerCannot,
    /// Crash, device error: retried while attempts remain, then dead.
    Transient,
}

/// For a retry: remember the worker that failed, and hold the job back by
/// the store's backoff (see [`crate::RetryBackoff`]). `j.attempt` is the
/// attempt that just failed.
fn push_retry_hold(qb: &mut QueryBuilder<'_, Postgres>, backoff: crate::RetryBackoff) {
    qb.push(
        ", failed_workers = CASE WHEN j.worker_id IS NULL OR j.worker_id = ANY(j.failed_workers) \
        THEN j.failed_workers ELSE array_append(j.failed_workers, j.worker_id) END",
    );
    qb.push(", dispatched_at = NULL, not_before = now() + make_interval(secs => LEAST(")
        .push_bind(backoff.max.as_secs_f64())
        .push("::float8, ")
        .push_bind(backoff.base.as_secs_f64())
        .push("::float8 * power(2, j.attempt - 1)) * (0.5 + random() * 0.5))");
}

/// A CompleteJob that did not take effect: a repeat of the completion that
/// did (same attempt, worker and result) is fine; anything else is refused
/// as the job stands now.
pub(crate) fn repeated_completion(job: &JobRow, attempt: u32, worker_id: Uuid, result: &JobResultRow) -> Result<(), StoreError> {
    let same = job.state == JobState::Succeeded
        && job.attempt == attempt
        && job.worker_id == Some(worker_id)
        && job.result.as_ref().map(|r| &r.key) == Some(&result.key);
    if same {
        return Ok(());
    }
    Err(wrong_state_of(job, &format!("attempt {attempt} of worker {worker_id} no longer holds it")))
}

/// StartJob's refusal of a worker in `state` (not active); the job went back
/// to the queue.
pub(crate) fn not_taking_work(worker_id: Uuid, state: &str) -> StoreError {
    StoreError::WorkerUnavailable {
        worker_id,
        state: state.to_owned(),
        why: "only active workers may start jobs; the job went back to the queue".into(),
    }
}

/// Why running jobs are taken back from their worker: the actor, the event
/// reason (also the job's error) of a retry, and that of a death on the last attempt.
pub(crate) struct TakenBack<'a> {
    pub(crate) actor: &'a str,
    pub(crate) retry: &'a str,
    pub(crate) last: &'a str,
}

/// Takes the running jobs `select` picks away from their worker: back to the
/// queue with attempt + 1 (held back by `backoff`, the worker remembered in
/// `failed_workers`), or dead on their last attempt. Returns the jobs moved.
pub(crate) async fn take_back(
    conn: &mut PgConnection,
    select: impl Fn(&mut QueryBuilder<'_, Postgres>),
    why: TakenBack<'_>,
    backoff: crate::RetryBackoff,
    skip_locked: bool,
) -> Result<Vec<JobRow>, StoreError> {
    let clear = |qb: &mut QueryBuilder<'_, Postgres>| {
        qb.push(", lease_expires_at = NULL, error = ").push_bind(why.retry.to_owned());
    };
    let retry = |qb: &mut QueryBuilder<'_, Postgres>| {
        clear(qb);
        push_retry_hold(qb, backoff);
    };
    let mut moved = Move { transition: Transition::Retry, actor: why.actor, reason: why.retry }
        .run(
            conn,
            |qb| {
                select(qb);
                qb.push(" AND attempt < max_attempts");
            },
            retry,
            "ORDER BY id",
            skip_locked,
        )
        .await?;
    moved.extend(
        Move { transition: Transition::Die, actor: why.actor, reason: why.last }
            .run(conn, select, clear, "ORDER BY id", skip_locked)
            .await?,
    );
    Ok(moved)
}

fn lease_interval(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

impl PgStore {
    async fn wrong_state(&self, job_id: Uuid, why: &str) -> StoreError {
        match self.get_job(job_id).await {
            Ok(job) => wrong_state_of(&job, why),
            Err(e) => e,
        }
    }
}

pub(crate) fn wrong_state_of(job: &JobRow, why: &str) -> StoreError {
    StoreError::WrongState {
        job_id: job.id,
        state: job.state,
        attempt: job.attempt,
        holder: job.worker_id.map(|w| format!(", worker {w}")).unwrap_or_default(),
        why: why.to_owned(),
    }
}
