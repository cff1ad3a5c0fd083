//! Attempts: StartJob and its refusals, progress, completion and failure,
//! each fenced by (job, attempt, worker); leases that expire.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, Transition};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::*;
use crate::rows::{JobResultRow, JOB_COLUMNS};
use crate::{JobRow, PgStore, StoreError};

impl PgStore {
    /// [`Store::start_job`](crate::Store::start_job) on Postgres.
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

    /// [`Store::start_jobs`](crate::Store::start_jobs) on Postgres.
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

    /// [`Store::complete_jobs`](crate::Store::complete_jobs) on Postgres.
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
                not_taking_work(worker_id, state)
            }
        };
        tx.commit().await?;
        Ok(refusal)
    }

    /// [`Store::report_progress`](crate::Store::report_progress) on Postgres.
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

    /// [`Store::complete_job`](crate::Store::complete_job) on Postgres.
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
            return repeated_completion(&self.get_job(job_id).await?, attempt, worker_id, result);
        }
        Ok(())
    }

    /// [`Store::fail_job`](crate::Store::fail_job) on Postgres.
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

    /// [`Store::reap_expired_leases`](crate::Store::reap_expired_leases) on Postgres.
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

    /// [`Store::forgive_outage`](crate::Store::forgive_outage) on Postgres.
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
}
