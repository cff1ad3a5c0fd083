//! Batches and jobs: submission, queries, and every state transition.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, ResolvedJob, TextEncoderSet, Transition};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::rows::{labels_from_json, parse_state, JobResultRow, JOB_COLUMNS};
use crate::{BatchRow, EventRow, JobCounts, JobRow, ModelStats, PgStore, QueuePause, Quotas, StoreError};

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
    /// Stores a batch and all its jobs in one transaction; the jobs and their
    /// creation events go in one statement (UNNEST over column arrays).
    ///
    /// With an idempotency key already used by the same submitter: identical
    /// content returns the first batch (`created = false`), other content is
    /// [`StoreError::IdempotencyConflict`]. A new batch must fit the
    /// submitter's quotas. Nothing is written on error.
    ///
    /// # Errors
    /// [`StoreError::IdempotencyConflict`], [`StoreError::QuotaExceeded`], or
    /// [`StoreError::Database`].
    pub async fn submit_batch(&self, batch: &NewBatch, jobs: &[ResolvedJob]) -> Result<SubmitOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(key) = &batch.idempotency_key {
            // Serialises submissions that share a key, so a concurrent replay
            // waits for the first one and then sees it.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || E'\\x1f' || $2, 0))")
                .bind(&batch.submitter)
                .bind(key)
                .execute(&mut *tx)
                .await?;
            let existing = sqlx::query("SELECT id, content_hash FROM batches WHERE submitter = $1 AND idempotency_key = $2")
                .bind(&batch.submitter)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = existing {
                let id: Uuid = row.try_get("id")?;
                let hash: Vec<u8> = row.try_get("content_hash")?;
                tx.rollback().await?;
                if hash != batch.content_hash {
                    return Err(StoreError::IdempotencyConflict { key: key.clone(), batch_id: id });
                }
                let batch = self.get_batch(id).await?;
                return Ok(SubmitOutcome { batch, created: false });
            }
        }

        crate::tenants::enforce_quotas(&mut tx, &batch.submitter, &batch.quotas, jobs.len()).await?;

        let batch_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO batches (id, submitter, idempotency_key, content_hash, labels, total_jobs) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(batch_id)
        .bind(&batch.submitter)
        .bind(&batch.idempotency_key)
        .bind(&batch.content_hash)
        .bind(serde_json::to_value(&batch.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?)
        .bind(jobs.len() as i32)
        .execute(&mut *tx)
        .await?;

        let n = jobs.len();
        let mut ids = Vec::with_capacity(n);
        let mut idx = Vec::with_capacity(n);
        let (mut model, mut prompt, mut negative) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut width, mut height, mut steps) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut guidance, mut seed, mut shift) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut encoders, mut priority, mut attempts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut labels = Vec::with_capacity(n);
        for (i, job) in jobs.iter().enumerate() {
            ids.push(Uuid::now_v7());
            idx.push(i as i32);
            model.push(job.model.as_str());
            prompt.push(job.prompt.as_str());
            negative.push(job.negative_prompt.as_str());
            width.push(job.width as i32);
            height.push(job.height as i32);
            steps.push(job.steps as i32);
            guidance.push(job.guidance);
            seed.push(job.seed as i64);
            shift.push(job.shift);
            encoders.push(job.text_encoders.as_str());
            priority.push(job.priority);
            attempts.push(job.max_attempts as i32);
            labels.push(serde_json::to_string(&job.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        sqlx::query(
            "WITH ins AS (
                INSERT INTO jobs (id, batch_id, idx, model, prompt, negative_prompt, width, height, steps, guidance,
                                  seed, shift, text_encoders, priority, max_attempts, labels, state)
                SELECT u.id, $1, u.idx, u.model, u.prompt, u.neg, u.width, u.height, u.steps, u.guidance,
                       u.seed, u.shift, u.enc, u.priority, u.attempts, u.labels::jsonb, 'queued'
                FROM UNNEST($2::uuid[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::int4[], $8::int4[],
                            $9::int4[], $10::float4[], $11::int8[], $12::float8[], $13::text[], $14::int4[],
                            $15::int4[], $16::text[])
                     AS u(id, idx, model, prompt, neg, width, height, steps, guidance, seed, shift, enc, priority,
                          attempts, labels)
                RETURNING id, attempt
             )
             INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason)
             SELECT id, $1, NULL, 'queued', attempt, $17, 'submitted' FROM ins",
        )
        .bind(batch_id)
        .bind(&ids)
        .bind(&idx)
        .bind(&model)
        .bind(&prompt)
        .bind(&negative)
        .bind(&width)
        .bind(&height)
        .bind(&steps)
        .bind(&guidance)
        .bind(&seed)
        .bind(&shift)
        .bind(&encoders)
        .bind(&priority)
        .bind(&attempts)
        .bind(&labels)
        .bind(format!("submitter:{}", batch.submitter))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        let batch = self.get_batch(batch_id).await?;
        Ok(SubmitOutcome { batch, created: true })
    }

    /// The batch with its per-state counts.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such batch.
    pub async fn get_batch(&self, id: Uuid) -> Result<BatchRow, StoreError> {
        let row = sqlx::query(
            "SELECT id, submitter, idempotency_key, labels, total_jobs, created_at, \
                 (SELECT COALESCE(sum(gpu_seconds), 0) FROM jobs WHERE batch_id = $1) AS gpu_seconds FROM batches WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound { what: "batch", id })?;
        let counts = self.batch_counts(id).await?;
        Ok(BatchRow {
            id: row.try_get("id")?,
            submitter: row.try_get("submitter")?,
            idempotency_key: row.try_get("idempotency_key")?,
            labels: labels_from_json(row.try_get("labels")?)?,
            total_jobs: row.try_get::<i32, _>("total_jobs")? as u64,
            created_at: row.try_get("created_at")?,
            counts,
            gpu_seconds: row.try_get("gpu_seconds")?,
        })
    }

    /// Jobs of a batch in each state.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn batch_counts(&self, batch_id: Uuid) -> Result<JobCounts, StoreError> {
        let rows = sqlx::query("SELECT state, count(*) AS n FROM jobs WHERE batch_id = $1 GROUP BY state")
            .bind(batch_id)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = JobCounts::default();
        for row in rows {
            counts.add(parse_state(row.try_get("state")?)?, row.try_get::<i64, _>("n")? as u64);
        }
        Ok(counts)
    }

    /// One job.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such job.
    pub async fn get_job(&self, id: Uuid) -> Result<JobRow, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { what: "job", id })?;
        JobRow::from_row(&row)
    }

    /// Up to `limit` jobs matching `filter` with ids above `after`, in id order.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn list_jobs(&self, filter: &JobFilter, after: Option<Uuid>, limit: u32) -> Result<Vec<JobRow>, StoreError> {
        let mut qb = QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE TRUE"));
        if let Some(batch) = filter.batch_id {
            qb.push(" AND batch_id = ").push_bind(batch);
        }
        if !filter.states.is_empty() {
            let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
            qb.push(" AND state = ANY(").push_bind(states).push(")");
        }
        if let Some((key, value)) = &filter.label {
            // A batch's labels are its jobs' labels too.
            let pair = serde_json::json!({ key: value });
            qb.push(" AND (labels @> ").push_bind(pair.clone());
            qb.push(" OR batch_id IN (SELECT id FROM batches WHERE labels @> ").push_bind(pair).push("))");
        }
        if let Some(model) = &filter.model {
            qb.push(" AND model = ").push_bind(model.clone());
        }
        if let Some(submitter) = &filter.submitter {
            qb.push(" AND batch_id IN (SELECT id FROM batches WHERE submitter = ").push_bind(submitter.clone()).push(")");
        }
        if let Some(after) = after {
            qb.push(" AND id > ").push_bind(after);
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(JobRow::from_row).collect()
    }

    /// Every event of one job, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn job_events(&self, job_id: Uuid) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, job_id, batch_id, from_state, to_state, attempt, actor, reason, at, gpu_seconds FROM job_events \
             WHERE job_id = $1 ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(EventRow::from_row).collect()
    }

    /// Cancels the selected jobs that are queued, dispatched or running.
    /// Returns the jobs cancelled.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn cancel_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Move { transition: Transition::Cancel, actor, reason }
            .run(
                &mut conn,
                |qb| push_selector(qb, selector),
                |qb| {
                    qb.push(", lease_expires_at = NULL");
                },
                "",
                false,
            )
            .await
    }

    /// Puts failed, cancelled and dead jobs back in the queue with one more
    /// attempt than they have used.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn retry_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        self.reopen(Transition::Resubmit, selector, actor, reason).await
    }

    /// Takes dispatched and running jobs back to the queue (attempt + 1), so
    /// the old attempt's reports are refused.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn requeue_jobs(&self, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        self.reopen(Transition::Requeue, selector, actor, reason).await
    }

    /// An operator's move back to the queue: a new attempt, which is granted
    /// even if the job had used all of its own.
    async fn reopen(&self, transition: Transition, selector: &JobSelector, actor: &str, reason: &str) -> Result<Vec<JobRow>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Move { transition, actor, reason }
            .run(
                &mut conn,
                |qb| push_selector(qb, selector),
                |qb| {
                    qb.push(", max_attempts = GREATEST(j.max_attempts, j.attempt + 1), lease_expires_at = NULL");
                },
                "",
                false,
            )
            .await
    }

    /// Sets the priority of the selected jobs that are still queued; returns how many.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn set_priority(&self, selector: &JobSelector, priority: i32) -> Result<u64, StoreError> {
        let mut qb = QueryBuilder::new("UPDATE jobs SET priority = ");
        qb.push_bind(priority).push(", updated_at = now() WHERE state = 'queued' AND ");
        push_selector(&mut qb, selector);
        Ok(qb.build().execute(&self.pool).await?.rows_affected())
    }

    /// Deletes terminal jobs and their events that are selected,
    /// or, without a selector, that were last updated before `older_than`.
    /// Batches left without jobs are deleted too. Returns the jobs deleted.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn purge_jobs(&self, selector: Option<&JobSelector>, older_than: Option<DateTime<Utc>>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut qb = QueryBuilder::new("WITH del AS (DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead')");
        if let Some(selector) = selector {
            qb.push(" AND ");
            push_selector(&mut qb, selector);
        }
        if let Some(cutoff) = older_than {
            qb.push(" AND updated_at < ").push_bind(cutoff);
        }
        qb.push(" RETURNING id, batch_id), ev AS (DELETE FROM job_events WHERE job_id IN (SELECT id FROM del))");
        qb.push(" SELECT batch_id, count(*) AS n FROM del GROUP BY batch_id");
        let rows = qb.build().fetch_all(&mut *tx).await?;
        let mut deleted = 0u64;
        let mut batches = Vec::with_capacity(rows.len());
        for row in &rows {
            deleted += row.try_get::<i64, _>("n")? as u64;
            batches.push(row.try_get::<Uuid, _>("batch_id")?);
        }
        sqlx::query("DELETE FROM batches b WHERE b.id = ANY($1) AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id)")
            .bind(&batches)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// Moves up to `limit` queued jobs of `model` that use the text encoders
    /// `set` to dispatched, highest priority then oldest first, skipping rows
    /// another coordinator holds and jobs still in their retry backoff;
    /// returns them in that order. Returns nothing while the queue (global or
    /// the model's) is paused.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn dispatch_jobs(&self, model: &str, set: TextEncoderSet, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError> {
        // One statement (the pause checked in it): a pass over an empty lane
        // costs one round trip.
        let mut conn = self.pool.acquire().await?;
        let rows = Move { transition: Transition::Dispatch, actor, reason: "dispatched" }
            .run(
                &mut conn,
                |qb| {
                    qb.push("model = ").push_bind(model.to_owned());
                    qb.push(" AND text_encoders = ").push_bind(set.as_str());
                    qb.push(" AND (not_before IS NULL OR not_before <= now())");
                    qb.push(" AND NOT EXISTS (SELECT 1 FROM queue_state WHERE paused AND (model = '' OR model = ")
                        .push_bind(model.to_owned())
                        .push("))");
                },
                |qb| {
                    qb.push(", dispatched_at = now(), not_before = NULL");
                },
                &format!("ORDER BY priority DESC, id LIMIT {limit}"),
                true,
            )
            .await?;
        // In the order they are to run, for the work stream.
        let mut rows = rows;
        rows.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then(a.id.cmp(&b.id)));
        Ok(rows)
    }

    /// How many more jobs of `model` using the text encoders `set` may be
    /// dispatched now: the free slots of the active workers serving that
    /// model with that set (capacity minus the jobs they may be holding) plus
    /// `lookahead_per_worker` per worker, so that workers never wait on the
    /// dispatcher while the rest stays in Postgres, where priority changes,
    /// pauses and cancels act on it. A worker with T5 also serves CLIP-only
    /// jobs, so every job of the model counts against the CLIP-only window,
    /// and only T5 jobs against the T5 one.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn dispatch_window(&self, model: &str, set: TextEncoderSet, lookahead_per_worker: u32) -> Result<u32, StoreError> {
        let (capacity, workers, outstanding): (i64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(sum(capacity), 0)::int8, count(*), \
                 (SELECT count(*) FROM jobs WHERE model = $1 AND state IN ('dispatched', 'running') \
                     AND ($2 = 'clip-only' OR text_encoders = $2)) \
             FROM workers WHERE state = 'active' AND $1 = ANY(models) AND $2 = ANY(text_encoder_sets)",
        )
        .bind(model)
        .bind(set.as_str())
        .fetch_one(&self.pool)
        .await?;
        let window = capacity + workers * i64::from(lookahead_per_worker) - outstanding;
        Ok(window.clamp(0, i64::from(u32::MAX)) as u32)
    }

    /// Of the (model, text encoders) pairs `needs`, those no active worker
    /// serves, in one round trip.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn unserved(&self, needs: &[(String, TextEncoderSet)]) -> Result<Vec<(String, TextEncoderSet)>, StoreError> {
        let models: Vec<&str> = needs.iter().map(|(m, _)| m.as_str()).collect();
        let sets: Vec<&str> = needs.iter().map(|(_, s)| s.as_str()).collect();
        let unserved: Vec<i32> = sqlx::query_scalar(
            "SELECT (n.i - 1)::int4 FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS n(model, set, i) \
             WHERE NOT EXISTS (SELECT 1 FROM workers w WHERE w.state = 'active' AND n.model = ANY(w.models) \
                 AND n.set = ANY(w.text_encoder_sets)) ORDER BY n.i",
        )
        .bind(&models)
        .bind(&sets)
        .fetch_all(&self.pool)
        .await?;
        Ok(unserved.into_iter().filter_map(|i| needs.get(i as usize).cloned()).collect())
    }

    /// Dispatches again up to `limit` jobs that were dispatched more than
    /// `older_than` ago and never started: their stream message may be lost
    /// (Redis restarted or flushed). A duplicate message is harmless: the
    /// second StartJob is refused. Each gets a `dispatched → dispatched` event.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn redispatch_stale(&self, older_than: Duration, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "WITH target AS (SELECT id FROM jobs WHERE state = 'dispatched' \
                 AND dispatched_at < now() - make_interval(secs => $1) ORDER BY dispatched_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
             upd AS (UPDATE jobs j SET dispatched_at = now(), updated_at = now() FROM target t WHERE j.id = t.id RETURNING j.*), \
             ev AS (INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason) \
                 SELECT id, batch_id, 'dispatched', 'dispatched', attempt, $3, 'dispatched again: not started in time' FROM upd) \
             SELECT {JOB_COLUMNS} FROM upd ORDER BY id"
        ))
        .bind(older_than.as_secs_f64())
        .bind(i64::from(limit))
        .bind(actor)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(JobRow::from_row).collect()
    }

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
    pub async fn start_job(&self, job_id: Uuid, worker_id: Uuid, lease: Duration) -> Result<JobRow, StoreError> {
        // The usual case: a group of one.
        match self.start_jobs(&[(job_id, worker_id)], lease).await?.pop().flatten() {
            Some(row) => Ok(row),
            None => {
                // A claim repeated by the worker that holds the job (its first
                // answer was lost on the way back) gets the same answer again.
                let job = self.get_job(job_id).await?;
                if job.state == JobState::Running && job.worker_id == Some(worker_id) {
                    return Ok(job);
                }
                Err(self.start_refused(job_id, worker_id, &format!("worker:{worker_id}")).await?)
            }
        }
    }

    /// Many StartJobs in one statement (the coordinator groups concurrent
    /// calls; [`PgStore::start_job`] is a group of one): a pair starts when
    /// the job is dispatched, the worker active, and the worker did not fail
    /// it before while another active worker serves the model. Returns, in
    /// request order, the started job or None for a request that did not
    /// start (call `start_job` for it to learn why, and to put a declined
    /// job back).
    ///
    /// # Errors
    /// [`StoreError::Database`]; nothing is started then.
    pub async fn start_jobs(&self, requests: &[(Uuid, Uuid)], lease: Duration) -> Result<Vec<Option<JobRow>>, StoreError> {
        let jobs: Vec<Uuid> = requests.iter().map(|r| r.0).collect();
        let workers: Vec<Uuid> = requests.iter().map(|r| r.1).collect();
        let rows = sqlx::query(&format!(
            "WITH req AS (SELECT DISTINCT ON (job_id) job_id, worker_id FROM UNNEST($1::uuid[], $2::uuid[]) AS r(job_id, worker_id) ORDER BY job_id), \
             target AS (SELECT jobs.id, jobs.state AS from_state, req.worker_id FROM jobs JOIN req ON req.job_id = jobs.id \
                 WHERE jobs.state = 'dispatched' \
                 AND EXISTS (SELECT 1 FROM workers w WHERE w.id = req.worker_id AND w.state = 'active' \
                     AND jobs.model = ANY(w.models) AND jobs.text_encoders = ANY(w.text_encoder_sets)) \
                 AND NOT (req.worker_id = ANY(jobs.failed_workers) AND EXISTS (SELECT 1 FROM workers w WHERE w.state = 'active' \
                     AND jobs.model = ANY(w.models) AND jobs.text_encoders = ANY(w.text_encoder_sets) \
                     AND NOT (w.id = ANY(jobs.failed_workers)))) \
                 ORDER BY jobs.id FOR UPDATE OF jobs), \
             upd AS (UPDATE jobs j SET state = 'running', worker_id = t.worker_id, \
                 lease_expires_at = now() + make_interval(secs => $3), progress_step = 0, started_at = now(), updated_at = now() \
                 FROM target t WHERE j.id = t.id RETURNING j.*, t.from_state), \
             ev AS (INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason) \
                 SELECT id, batch_id, from_state, state, attempt, 'worker:' || worker_id::text, 'started' FROM upd) \
             SELECT {JOB_COLUMNS} FROM upd"
        ))
        .bind(&jobs)
        .bind(&workers)
        .bind(lease_interval(lease))
        .fetch_all(&self.pool)
        .await?;
        let mut started: std::collections::HashMap<Uuid, JobRow> = HashMap::new();
        for row in &rows {
            let job = JobRow::from_row(row)?;
            started.insert(job.id, job);
        }
        Ok(requests
            .iter()
            .map(|(job, worker)| match started.get(job) {
                Some(row) if row.worker_id == Some(*worker) => started.remove(job),
                _ => None,
            })
            .collect())
    }

    /// Many CompleteJobs in one statement (the coordinator groups concurrent
    /// calls; [`PgStore::complete_job`] is a group of one plus the repeat
    /// check): each running attempt succeeds with its result, and its worker
    /// is credited once. Returns, in request order, whether each took effect here;
    /// for one that did not, call `complete_job` (a repeat is a no-op there,
    /// anything else is refused with the reason).
    ///
    /// # Errors
    /// [`StoreError::Database`]; nothing is completed then.
    pub async fn complete_jobs(&self, requests: &[Completion]) -> Result<Vec<bool>, StoreError> {
        let col = |f: fn(&Completion) -> Uuid| requests.iter().map(f).collect::<Vec<Uuid>>();
        let (jobs, workers) = (col(|c| c.job_id), col(|c| c.worker_id));
        let attempts: Vec<i32> = requests.iter().map(|c| c.attempt as i32).collect();
        let keys: Vec<&str> = requests.iter().map(|c| c.result.key.as_str()).collect();
        let hashes: Vec<&str> = requests.iter().map(|c| c.result.sha256.as_str()).collect();
        let sizes: Vec<i64> = requests.iter().map(|c| c.result.size_bytes as i64).collect();
        let types: Vec<&str> = requests.iter().map(|c| c.result.content_type.as_str()).collect();
        let seconds: Vec<f64> = requests.iter().map(|c| c.gpu_seconds.max(0.0)).collect();
        let model_hashes: Vec<Option<&str>> =
            requests.iter().map(|c| Some(c.result.model_hash.as_str()).filter(|h| !h.is_empty())).collect();
        // Requests are matched by their whole fence: a stale and a live
        // completion of one job in the same group each get their own answer.
        let done: Vec<(Uuid, i32, Uuid)> = sqlx::query_as(
            "WITH req AS (SELECT DISTINCT ON (job_id, attempt, worker_id) * FROM UNNEST($1::uuid[], $2::int4[], $3::uuid[], $4::text[], $5::text[], $6::int8[], $7::text[], $8::float8[], $9::text[]) \
                 AS r(job_id, attempt, worker_id, key, sha256, size, content_type, gpu_seconds, model_hash) ORDER BY job_id, attempt, worker_id), \
             target AS (SELECT jobs.id, jobs.state AS from_state, req.* FROM jobs JOIN req ON req.job_id = jobs.id \
                 AND jobs.attempt = req.attempt AND jobs.worker_id = req.worker_id WHERE jobs.state = 'running' \
                 ORDER BY jobs.id FOR UPDATE OF jobs), \
             upd AS (UPDATE jobs j SET state = 'succeeded', lease_expires_at = NULL, error = NULL, progress_step = j.steps, \
                 result_key = t.key, result_sha256 = t.sha256, result_size = t.size, result_content_type = t.content_type, \
                 result_model_hash = t.model_hash, gpu_seconds = j.gpu_seconds + t.gpu_seconds, updated_at = now() \
                 FROM target t WHERE j.id = t.id RETURNING j.id, j.batch_id, j.attempt, j.state, t.from_state, t.worker_id, t.gpu_seconds), \
             ev AS (INSERT INTO job_events (job_id, batch_id, from_state, to_state, attempt, actor, reason, gpu_seconds) \
                 SELECT id, batch_id, from_state, state, attempt, 'worker:' || worker_id::text, 'completed', gpu_seconds FROM upd), \
             credit AS (UPDATE workers w SET images_done = images_done + c.n, gpu_seconds = w.gpu_seconds + c.g \
                 FROM (SELECT worker_id, count(*) AS n, sum(gpu_seconds) AS g FROM upd GROUP BY worker_id ORDER BY worker_id) c WHERE w.id = c.worker_id) \
             SELECT id, attempt, worker_id FROM upd",
        )
        .bind(&jobs)
        .bind(&attempts)
        .bind(&workers)
        .bind(&keys)
        .bind(&hashes)
        .bind(&sizes)
        .bind(&types)
        .bind(&seconds)
        .bind(&model_hashes)
        .fetch_all(&self.pool)
        .await?;
        let mut done: std::collections::HashSet<(Uuid, i32, Uuid)> = done.into_iter().collect();
        Ok(requests.iter().map(|c| done.remove(&(c.job_id, c.attempt as i32, c.worker_id))).collect())
    }

    /// Why StartJob did not start the job; a job refused because of its
    /// worker goes back to the queue so another worker gets it now.
    async fn start_refused(&self, job_id: Uuid, worker_id: Uuid, actor: &str) -> Result<StoreError, StoreError> {
        let mut tx = self.pool.begin().await?;
        let worker_state: Option<String> =
            sqlx::query_scalar("SELECT state FROM workers WHERE id = $1").bind(worker_id).fetch_optional(&mut *tx).await?;
        let refusal = match worker_state.as_deref() {
            None => StoreError::NotFound { what: "worker", id: worker_id },
            Some("active") => {
                let capable: Option<bool> = sqlx::query_scalar(
                    "SELECT j.model = ANY(w.models) AND j.text_encoders = ANY(w.text_encoder_sets) FROM jobs j, workers w \
                     WHERE j.id = $1 AND w.id = $2",
                )
                .bind(job_id)
                .bind(worker_id)
                .fetch_optional(&mut *tx)
                .await?;
                if capable == Some(false)
                    && !decline(&mut tx, job_id, worker_id, actor, "this worker cannot serve it", false).await?.is_empty()
                {
                    tx.commit().await?;
                    return Ok(StoreError::Declined { job_id, worker_id });
                }
                if decline(&mut tx, job_id, worker_id, actor, "this worker failed it before", true).await?.is_empty() {
                    tx.commit().await?;
                    return Ok(self.wrong_state(job_id, "only a dispatched job can be started").await);
                }
                StoreError::Declined { job_id, worker_id }
            }
            Some(state) => {
                // The message is spent: put the job back so another worker gets it now.
                decline(&mut tx, job_id, worker_id, actor, "the worker takes no new work", false).await?;
                StoreError::WorkerUnavailable {
                    worker_id,
                    state: state.to_owned(),
                    why: "only active workers may start jobs; the job went back to the queue".into(),
                }
            }
        };
        tx.commit().await?;
        Ok(refusal)
    }

    /// Records step progress of a running attempt, renews its lease and
    /// notifies every coordinator's watchers ([`PgStore::listen_progress`]).
    /// Returns the new lease expiry.
    ///
    /// # Errors
    /// [`StoreError::WrongState`] if that attempt no longer holds the job.
    pub async fn report_progress(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        step: u32,
        lease: Duration,
    ) -> Result<DateTime<Utc>, StoreError> {
        // The notification goes out when the update commits, to every
        // coordinator listening (crate::progress), whichever took the report.
        let renewed: Option<DateTime<Utc>> = sqlx::query_scalar(
            "WITH upd AS (UPDATE jobs SET progress_step = $4, lease_expires_at = now() + make_interval(secs => $5), updated_at = now() \
                 WHERE id = $1 AND attempt = $2 AND worker_id = $3 AND state = 'running' \
                 RETURNING id, batch_id, attempt, steps, lease_expires_at), \
             note AS (SELECT pg_notify('flowfarm_progress', json_build_object('b', batch_id, 'j', id, 'a', attempt, 's', $4, 't', steps)::text) FROM upd) \
             SELECT upd.lease_expires_at FROM upd, note",
        )
        .bind(job_id)
        .bind(attempt as i32)
        .bind(worker_id)
        .bind(step as i32)
        .bind(lease_interval(lease))
        .fetch_optional(&self.pool)
        .await?;
        match renewed {
            Some(renewed) => Ok(renewed),
            None => Err(self.wrong_state(job_id, &format!("attempt {attempt} of worker {worker_id} no longer holds it")).await),
        }
    }

    /// Marks a running attempt succeeded with its result, and credits the
    /// worker, in one transaction. Repeating the same completion is a no-op.
    ///
    /// # Errors
    /// [`StoreError::WrongState`] if that attempt no longer holds the job.
    pub async fn complete_job(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        result: &JobResultRow,
        gpu_seconds: f64,
    ) -> Result<(), StoreError> {
        let completion = Completion { job_id, attempt, worker_id, result: result.clone(), gpu_seconds };
        let done = self.complete_jobs(std::slice::from_ref(&completion)).await?;
        if !done.first().copied().unwrap_or(false) {
            let job = self.get_job(job_id).await?;
            let same = job.state == JobState::Succeeded
                && job.attempt == attempt
                && job.worker_id == Some(worker_id)
                && job.result.as_ref().map(|r| &r.key) == Some(&result.key);
            if same {
                return Ok(());
            }
            return Err(wrong_state_of(&job, &format!("attempt {attempt} of worker {worker_id} no longer holds it")));
        }
        Ok(())
    }

    /// Records a failed attempt, by `cause`: bad input fails the job for
    /// good; a transient error requeues it (attempt + 1) while attempts
    /// remain, else it is dead; a worker that cannot serve it hands it to
    /// another without using up an attempt where one can take it.
    /// `gpu_seconds`, the attempt's device time, is recorded on its event and
    /// added to the job's and the worker's totals. Returns the job's new state.
    ///
    /// # Errors
    /// [`StoreError::WrongState`] if that attempt no longer holds the job.
    pub async fn fail_job(
        &self,
        job_id: Uuid,
        attempt: u32,
        worker_id: Uuid,
        error: &str,
        cause: FailureCause,
        gpu_seconds: f64,
    ) -> Result<JobState, StoreError> {
        let fence = Fence { job_id, attempt, worker_id };
        let actor = format!("worker:{worker_id}");
        let mut tx = self.pool.begin().await?;
        let elsewhere = if cause == FailureCause::WorkerCannot {
            // The attempt is spent (it fences this worker's reports) but not
            // counted: max_attempts grows with it.
            Move { transition: Transition::Retry, actor: &actor, reason: error }
                .run(
                    &mut tx,
                    |qb| {
                        push_fence(qb, fence);
                        qb.push(" AND state = 'running' AND ");
                        push_other_worker_available(qb, true);
                    },
                    |qb| {
                        qb.push(", lease_expires_at = NULL, max_attempts = j.max_attempts + 1, error = ").push_bind(error.to_owned());
                        // Remembered as failed (so another worker takes it), but
                        // not held back by the retry backoff: nothing went wrong
                        // with the job itself.
                        qb.push(
                            ", failed_workers = CASE WHEN j.worker_id = ANY(j.failed_workers) THEN j.failed_workers \
                             ELSE array_append(j.failed_workers, j.worker_id) END, dispatched_at = NULL, not_before = now() + interval '1 second'",
                        );
                    },
                    "",
                    false,
                )
                .await?
        } else {
            Vec::new()
        };
        let retryable = cause != FailureCause::BadInput;
        let mut moved = if !elsewhere.is_empty() {
            elsewhere
        } else if retryable {
            let held = |qb: &mut QueryBuilder<'_, Postgres>| {
                push_fence(qb, fence);
                qb.push(" AND state = 'running'");
            };
            take_back(&mut tx, held, TakenBack { actor: &actor, retry: error, last: error }, self.backoff, false).await?
        } else {
            let set_error = |qb: &mut QueryBuilder<'_, Postgres>| {
                qb.push(", lease_expires_at = NULL, error = ").push_bind(error.to_owned());
            };
            Move { transition: Transition::Fail, actor: &actor, reason: error }
                .run(&mut tx, |qb| push_fence(qb, fence), set_error, "", false)
                .await?
        };
        if !moved.is_empty() && gpu_seconds > 0.0 {
            // The attempt's time, on the event that just ended it (the job's
            // latest: its row is locked), the job's total and the worker's.
            sqlx::query(
                "WITH job AS (UPDATE jobs SET gpu_seconds = gpu_seconds + $2 WHERE id = $1), \
                 ev AS (UPDATE job_events SET gpu_seconds = $2 WHERE id = (SELECT max(id) FROM job_events WHERE job_id = $1)) \
                 UPDATE workers SET gpu_seconds = gpu_seconds + $2 WHERE id = $3",
            )
            .bind(job_id)
            .bind(gpu_seconds)
            .bind(worker_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        match moved.pop() {
            Some(job) => Ok(job.state),
            None => Err(self.wrong_state(job_id, &format!("attempt {attempt} of worker {worker_id} no longer holds it")).await),
        }
    }

    /// Returns running jobs whose lease has expired to the queue (attempt + 1)
    /// or, on their last attempt, marks them dead. Returns the jobs moved.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn reap_expired_leases(&self) -> Result<Vec<JobRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let expired = |qb: &mut QueryBuilder<'_, Postgres>| {
            qb.push("state = 'running' AND lease_expires_at < now()");
        };
        let why = TakenBack { actor: "reaper", retry: "lease expired", last: "lease expired on the last attempt" };
        let moved = take_back(&mut tx, expired, why, self.backoff, true).await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// After the store or the coordinator could not be reached, nobody could
    /// renew a lease or record a heartbeat: gives every running job at least
    /// a full `lease` from now and counts every live worker as heard from now,
    /// so the outage is not taken for dead workers. Returns the jobs renewed.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn forgive_outage(&self, lease: Duration) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let renewed = sqlx::query(
            "UPDATE jobs SET lease_expires_at = GREATEST(lease_expires_at, now() + make_interval(secs => $1)) \
             WHERE state = 'running'",
        )
        .bind(lease.as_secs_f64())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE workers SET last_heartbeat_at = GREATEST(last_heartbeat_at, now()) \
             WHERE state IN ('active', 'draining', 'cordoned')",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(renewed)
    }

    /// Sets or clears a pause; `model` empty is the global switch.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn set_paused(&self, model: &str, paused: bool, reason: &str, by: &str) -> Result<QueuePause, StoreError> {
        let row = sqlx::query(
            "INSERT INTO queue_state (model, paused, reason, updated_by) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (model) DO UPDATE SET paused = $2, reason = $3, updated_by = $4, updated_at = now() \
             RETURNING model, paused, reason, updated_by, updated_at",
        )
        .bind(model)
        .bind(paused)
        .bind(reason)
        .bind(by)
        .fetch_one(&self.pool)
        .await?;
        pause_from_row(&row)
    }

    /// Every pause switch ever set.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn pauses(&self) -> Result<Vec<QueuePause>, StoreError> {
        let rows = sqlx::query("SELECT model, paused, reason, updated_by, updated_at FROM queue_state ORDER BY model")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(pause_from_row).collect()
    }

    /// Per-model job counts, pauses and oldest queued age.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn queue_stats(&self, model: Option<&str>) -> Result<Vec<ModelStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, state, count(*) AS n, \
                    EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS oldest \
             FROM jobs WHERE ($1::text IS NULL OR model = $1) GROUP BY model, state ORDER BY model",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        // Waiting jobs no active worker can take: grouped first, then each
        // group held against the (small) workers table.
        let unserved: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT g.model, g.text_encoders, g.n FROM (SELECT model, text_encoders, count(*) AS n FROM jobs \
                 WHERE state IN ('queued', 'dispatched') AND ($1::text IS NULL OR model = $1) GROUP BY model, text_encoders) g \
             WHERE NOT EXISTS (SELECT 1 FROM workers w WHERE w.state = 'active' AND g.model = ANY(w.models) \
                 AND g.text_encoders = ANY(w.text_encoder_sets)) ORDER BY 1, 2",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        let pauses = self.pauses().await?;
        let mut stats: Vec<ModelStats> = Vec::new();
        for row in rows {
            let name: String = row.try_get("model")?;
            if stats.last().map(|s| &s.model) != Some(&name) {
                let paused = pauses.iter().any(|p| p.paused && p.model == name);
                let waiting_for_worker = unserved
                    .iter()
                    .filter(|(m, _, _)| *m == name)
                    .map(|(_, set, n)| {
                        let set = TextEncoderSet::parse(set).ok_or_else(|| StoreError::Corrupt(format!("text_encoders `{set}`")))?;
                        Ok((set, *n as u64))
                    })
                    .collect::<Result<_, StoreError>>()?;
                stats.push(ModelStats {
                    model: name,
                    counts: JobCounts::default(),
                    paused,
                    oldest_queued_seconds: 0.0,
                    waiting_for_worker,
                });
            }
            let entry = stats.last_mut().expect("pushed above");
            let state = parse_state(row.try_get("state")?)?;
            entry.counts.add(state, row.try_get::<i64, _>("n")? as u64);
            if state == JobState::Queued {
                entry.oldest_queued_seconds = row.try_get("oldest")?;
            }
        }
        Ok(stats)
    }

    /// Batches with a job that reached a terminal state within `within`:
    /// where result objects of attempts that did not succeed may be left.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn batches_finished_within(&self, within: Duration) -> Result<Vec<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT batch_id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead') \
                 AND updated_at > now() - make_interval(secs => $1) ORDER BY 1",
        )
        .bind(within.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    /// Each job of `batch`: its state and the result key it recorded.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn result_keys(&self, batch: Uuid) -> Result<HashMap<Uuid, (JobState, Option<String>)>, StoreError> {
        let rows: Vec<(Uuid, String, Option<String>)> =
            sqlx::query_as("SELECT id, state, result_key FROM jobs WHERE batch_id = $1").bind(batch).fetch_all(&self.pool).await?;
        rows.into_iter().map(|(id, state, key)| Ok((id, (parse_state(&state)?, key)))).collect()
    }

    /// Device time per submitter over all their jobs' attempts, most first.
    ///
    /// # Errors
    /// [`StoreError::Database`] on a failed query.
    pub async fn gpu_seconds_by_submitter(&self) -> Result<Vec<(String, f64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT b.submitter, sum(j.gpu_seconds)::float8 FROM jobs j JOIN batches b ON b.id = j.batch_id \
             GROUP BY b.submitter HAVING sum(j.gpu_seconds) > 0 ORDER BY 2 DESC, 1",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn wrong_state(&self, job_id: Uuid, why: &str) -> StoreError {
        match self.get_job(job_id).await {
            Ok(job) => wrong_state_of(&job, why),
            Err(e) => e,
        }
    }
}

fn wrong_state_of(job: &JobRow, why: &str) -> StoreError {
    StoreError::WrongState {
        job_id: job.id,
        state: job.state,
        attempt: job.attempt,
        holder: job.worker_id.map(|w| format!(", worker {w}")).unwrap_or_default(),
        why: why.to_owned(),
    }
}

fn pause_from_row(row: &PgRow) -> Result<QueuePause, StoreError> {
    Ok(QueuePause {
        model: row.try_get("model")?,
        paused: row.try_get("paused")?,
        reason: row.try_get("reason")?,
        updated_by: row.try_get("updated_by")?,
        updated_at: row.try_get("updated_at")?,
    })
}
