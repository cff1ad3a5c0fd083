//! Dispatch and attempts on SQLite: queued jobs out, claims, progress,
//! completions and failures fenced by (job, attempt, worker), leases that
//! expire, and jobs taken back.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flowfarm_core::{JobState, TextEncoderSet, Transition};
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::jobs::job_in;
use super::rows::{active_workers, duration_micros, instant, now_micros, Event, Live, Moves, Reach};
use super::{by_id, push_ids, select_live, SqliteStore};
use crate::jobs::{not_taking_work, repeated_completion, wrong_state_of, TakenBack};
use crate::{Completion, FailureCause, JobResultRow, JobRow, ProgressNote, RetryBackoff, StoreError};

/// A second: how long a declined job waits, so the worker that declined it
/// does not read it straight back.
const DECLINE_HOLD_MICROS: i64 = 1_000_000;

pub(super) async fn dispatch_jobs(
    s: &SqliteStore,
    model: &str,
    set: TextEncoderSet,
    limit: u32,
    actor: &str,
) -> Result<Vec<JobRow>, StoreError> {
    let mut tx = s.writer.begin().await?;
    let paused: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM queue_state WHERE paused <> 0 AND (model = '' OR model = ?))")
        .bind(model)
        .fetch_one(&mut *tx)
        .await?;
    if paused {
        return Ok(Vec::new());
    }
    let now = now_micros();
    let candidates = select_live(
        &mut tx,
        |qb| {
            qb.push("state = 'queued' AND model = ").push_bind(model.to_owned());
            qb.push(" AND text_encoders = ").push_bind(set.as_str());
            qb.push(" AND (not_before IS NULL OR not_before <= ").push_bind(now).push(")");
        },
        &format!("ORDER BY priority DESC, id LIMIT {limit}"),
    )
    .await?;
    let mut moves = Moves::new(now);
    for mut live in candidates {
        if !live.transit(Transition::Dispatch) {
            continue;
        }
        live.dispatched_at = Some(now);
        live.not_before = None;
        moves.push(live, Event::new(JobState::Queued, actor, "dispatched"));
    }
    let out = moves.write(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

pub(super) async fn dispatch_window(
    s: &SqliteStore,
    model: &str,
    set: TextEncoderSet,
    lookahead_per_worker: u32,
) -> Result<u32, StoreError> {
    let mut tx = s.readers.begin().await?;
    let row = sqlx::query(
        "SELECT COALESCE(sum(capacity), 0) AS capacity, count(*) AS workers FROM workers w WHERE state = 'active' \
             AND EXISTS (SELECT 1 FROM json_each(w.models) WHERE value = ?1) \
             AND EXISTS (SELECT 1 FROM json_each(w.text_encoder_sets) WHERE value = ?2)",
    )
    .bind(model)
    .bind(set.as_str())
    .fetch_one(&mut *tx)
    .await?;
    let (capacity, workers): (i64, i64) = (row.try_get("capacity")?, row.try_get("workers")?);
    let outstanding: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE model = ?1 AND state IN ('dispatched', 'running') AND (?2 = 'clip-only' OR text_encoders = ?2)",
    )
    .bind(model)
    .bind(set.as_str())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    let window = capacity + workers * i64::from(lookahead_per_worker) - outstanding;
    Ok(window.clamp(0, i64::from(u32::MAX)) as u32)
}

pub(super) async fn lane_heads(s: &SqliteStore, model: &str) -> Result<Vec<(TextEncoderSet, i32)>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT text_encoders, max(priority) FROM jobs WHERE model = ? AND state = 'queued' \
             AND (not_before IS NULL OR not_before <= ?) GROUP BY text_encoders ORDER BY 1",
    )
    .bind(model)
    .bind(now_micros())
    .fetch_all(&s.readers)
    .await?;
    rows.into_iter()
        .map(|(set, priority)| {
            let parsed = TextEncoderSet::parse(&set).ok_or_else(|| StoreError::Corrupt(format!("text_encoders = {set}")))?;
            Ok((parsed, priority as i32))
        })
        .collect()
}

pub(super) async fn unserved(s: &SqliteStore, needs: &[(String, TextEncoderSet)]) -> Result<Vec<(String, TextEncoderSet)>, StoreError> {
    let mut conn = s.readers.acquire().await?;
    let fleet = active_workers(&mut conn).await?;
    Ok(needs.iter().filter(|(model, set)| !fleet.iter().any(|w| w.models.contains(model) && w.sets.contains(set))).cloned().collect())
}

pub(super) async fn redispatch_stale(s: &SqliteStore, older_than: Duration, limit: u32, actor: &str) -> Result<Vec<JobRow>, StoreError> {
    let mut tx = s.writer.begin().await?;
    let now = now_micros();
    let stale = select_live(
        &mut tx,
        |qb| {
            qb.push("state = 'dispatched' AND dispatched_at < ").push_bind(now - duration_micros(older_than));
        },
        &format!("ORDER BY dispatched_at LIMIT {limit}"),
    )
    .await?;
    let mut moves = Moves::new(now);
    for mut live in stale {
        live.dispatched_at = Some(now);
        moves.push(live, Event::new(JobState::Dispatched, actor, "dispatched again: not started in time"));
    }
    let mut out = moves.write(&mut tx).await?;
    tx.commit().await?;
    out.sort_by_key(|job| job.id);
    Ok(out)
}

/// Whether `worker` failed the job while another active worker that did not
/// (and, with `not_the_holder`, is not its holder) serves it.
fn another_can_take(live: &Live, fleet: &[Reach], not_the_holder: bool) -> bool {
    fleet
        .iter()
        .any(|w| w.serves(&live.job) && !live.failed_workers.contains(&w.id) && !(not_the_holder && live.job.worker_id == Some(w.id)))
}

pub(super) async fn start_jobs(s: &SqliteStore, requests: &[(Uuid, Uuid)], lease: Duration) -> Result<Vec<Option<JobRow>>, StoreError> {
    let mut tx = s.writer.begin().await?;
    let fleet = active_workers(&mut tx).await?;
    let now = now_micros();
    let lease_end = instant(now + duration_micros(lease))?;
    let filter = |qb: &mut sqlx::QueryBuilder<'_, sqlx::Sqlite>| {
        push_ids(qb, requests.iter().map(|r| r.0));
        qb.push(" AND state = 'dispatched'");
    };
    let mut dispatched = by_id(select_live(&mut tx, filter, "").await?);
    // Each request's place among the moves, for those that start.
    let mut places = Vec::with_capacity(requests.len());
    let mut moves = Moves::new(now);
    let mut started = 0;
    for &(job_id, worker_id) in requests {
        // A job's first request takes it; a repeat finds it gone from the map.
        let Some(mut live) = dispatched.remove(&job_id) else {
            places.push(None);
            continue;
        };
        let claimant = fleet.iter().find(|w| w.id == worker_id);
        let may = claimant.is_some_and(|w| w.serves(&live.job))
            && !(live.failed_workers.contains(&worker_id) && another_can_take(&live, &fleet, false));
        if !may || !live.transit(Transition::Start) {
            places.push(None);
            continue;
        }
        live.job.worker_id = Some(worker_id);
        live.job.lease_expires_at = Some(lease_end);
        live.job.progress_step = 0;
        live.started_at = Some(now);
        moves.push(live, Event::new(JobState::Dispatched, format!("worker:{worker_id}"), "started"));
        places.push(Some(started));
        started += 1;
    }
    let mut jobs: Vec<Option<JobRow>> = moves.write(&mut tx).await?.into_iter().map(Some).collect();
    tx.commit().await?;
    Ok(places.into_iter().map(|place| place.and_then(|i| jobs[i].take())).collect())
}

pub(super) async fn start_job(s: &SqliteStore, job_id: Uuid, worker_id: Uuid, lease: Duration) -> Result<JobRow, StoreError> {
    if let Some(row) = start_jobs(s, &[(job_id, worker_id)], lease).await?.pop().flatten() {
        return Ok(row);
    }
    // A claim repeated by the worker that holds the job (its first answer
    // was lost on the way back) gets the same answer again.
    let job = super::jobs::get_job(s, job_id).await?;
    if job.state == JobState::Running && job.worker_id == Some(worker_id) {
        return Ok(job);
    }
    Err(start_refused(s, job_id, worker_id).await?)
}

/// Why StartJob did not start the job; a job refused because of its worker
/// goes back to the queue so another worker gets it now.
async fn start_refused(s: &SqliteStore, job_id: Uuid, worker_id: Uuid) -> Result<StoreError, StoreError> {
    let actor = format!("worker:{worker_id}");
    let mut tx = s.writer.begin().await?;
    let worker_state: Option<String> =
        sqlx::query_scalar("SELECT state FROM workers WHERE id = ?").bind(worker_id).fetch_optional(&mut *tx).await?;
    let fleet = active_workers(&mut tx).await?;
    let refusal = match worker_state.as_deref() {
        None => StoreError::NotFound { what: "worker", id: worker_id },
        Some("active") => {
            let job = job_in(&mut tx, job_id).await;
            let capable = match (&job, fleet.iter().find(|w| w.id == worker_id)) {
                (Ok(job), Some(w)) => Some(w.serves(job)),
                _ => None,
            };
            let declined = if capable == Some(false) {
                decline(&mut tx, job_id, &actor, "this worker cannot serve it", |_| true).await?
            } else {
                decline(&mut tx, job_id, &actor, "this worker failed it before", |live| {
                    live.failed_workers.contains(&worker_id) && another_can_take(live, &fleet, false)
                })
                .await?
            };
            if declined {
                StoreError::Declined { job_id, worker_id }
            } else {
                match job {
                    Ok(job) => wrong_state_of(&job, "only a dispatched job can be started"),
                    Err(e) => e,
                }
            }
        }
        Some(state) => {
            // The message is spent: put the job back so another worker gets it now.
            decline(&mut tx, job_id, &actor, "the worker takes no new work", |_| true).await?;
            not_taking_work(worker_id, state)
        }
    };
    tx.commit().await?;
    Ok(refusal)
}

/// Puts a dispatched job back in the queue (same attempt, held back a
/// second) if `when` holds for it; whether it moved.
async fn decline(
    conn: &mut SqliteConnection,
    job_id: Uuid,
    actor: &str,
    reason: &str,
    when: impl Fn(&Live) -> bool,
) -> Result<bool, StoreError> {
    let Some(mut live) = select_live(
        conn,
        |qb| {
            qb.push("id = ").push_bind(job_id);
        },
        "",
    )
    .await?
    .pop() else {
        return Ok(false);
    };
    let from = live.job.state;
    if !when(&live) || !live.transit(Transition::Decline) {
        return Ok(false);
    }
    let now = now_micros();
    live.not_before = Some(now + DECLINE_HOLD_MICROS);
    live.dispatched_at = None;
    let mut moves = Moves::new(now);
    moves.push(live, Event::new(from, actor, reason));
    moves.write(conn).await?;
    Ok(true)
}

/// The running attempt `fence` names, if it still holds its job.
async fn held(conn: &mut SqliteConnection, job_id: Uuid, attempt: u32, worker_id: Uuid) -> Result<Option<Live>, StoreError> {
    Ok(select_live(
        conn,
        |qb| {
            qb.push("id = ").push_bind(job_id);
            qb.push(" AND attempt = ").push_bind(i64::from(attempt));
            qb.push(" AND worker_id = ").push_bind(worker_id);
            qb.push(" AND state = 'running'");
        },
        "",
    )
    .await?
    .pop())
}

async fn credit_worker(conn: &mut SqliteConnection, worker_id: Uuid, images: i64, gpu_seconds: f64) -> Result<(), StoreError> {
    sqlx::query("UPDATE workers SET images_done = images_done + ?, gpu_seconds = gpu_seconds + ? WHERE id = ?")
        .bind(images)
        .bind(gpu_seconds)
        .bind(worker_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub(super) async fn complete_jobs(s: &SqliteStore, requests: &[Completion]) -> Result<Vec<bool>, StoreError> {
    let mut tx = s.writer.begin().await?;
    let now = now_micros();
    let filter = |qb: &mut sqlx::QueryBuilder<'_, sqlx::Sqlite>| {
        push_ids(qb, requests.iter().map(|c| c.job_id));
        qb.push(" AND state = 'running'");
    };
    let mut running = by_id(select_live(&mut tx, filter, "").await?);
    let mut answers = Vec::with_capacity(requests.len());
    let mut moves = Moves::new(now);
    let mut credits: HashMap<Uuid, (i64, f64)> = HashMap::new();
    for c in requests {
        // Matched by the whole fence: a stale and a live completion of one
        // job in the same group each get their own answer; a repeat finds
        // the job gone from the map and is answered false.
        let holds = running.get(&c.job_id).is_some_and(|live| live.job.attempt == c.attempt && live.job.worker_id == Some(c.worker_id));
        let Some(mut live) = holds.then(|| running.remove(&c.job_id)).flatten() else {
            answers.push(false);
            continue;
        };
        if !live.transit(Transition::Succeed) {
            answers.push(false);
            continue;
        }
        let seconds = c.gpu_seconds.max(0.0);
        live.job.lease_expires_at = None;
        live.job.error = None;
        live.job.progress_step = live.job.spec.steps;
        live.job.result = Some(c.result.clone());
        live.job.gpu_seconds += seconds;
        let event = Event { gpu_seconds: Some(seconds), ..Event::new(JobState::Running, format!("worker:{}", c.worker_id), "completed") };
        moves.push(live, event);
        let credit = credits.entry(c.worker_id).or_default();
        credit.0 += 1;
        credit.1 += seconds;
        answers.push(true);
    }
    moves.write(&mut tx).await?;
    for (worker, (images, seconds)) in credits {
        credit_worker(&mut tx, worker, images, seconds).await?;
    }
    tx.commit().await?;
    Ok(answers)
}

pub(super) async fn complete_job(
    s: &SqliteStore,
    job_id: Uuid,
    attempt: u32,
    worker_id: Uuid,
    result: &JobResultRow,
    gpu_seconds: f64,
) -> Result<(), StoreError> {
    let completion = Completion { job_id, attempt, worker_id, result: result.clone(), gpu_seconds };
    if complete_jobs(s, std::slice::from_ref(&completion)).await?.first().copied().unwrap_or(false) {
        return Ok(());
    }
    repeated_completion(&super::jobs::get_job(s, job_id).await?, attempt, worker_id, result)
}

pub(super) async fn report_progress(
    s: &SqliteStore,
    job_id: Uuid,
    attempt: u32,
    worker_id: Uuid,
    step: u32,
    lease: Duration,
) -> Result<DateTime<Utc>, StoreError> {
    let mut conn = s.writer.acquire().await?;
    let now = now_micros();
    let lease_end = now + duration_micros(lease);
    let renewed: Option<(Uuid, i64)> = sqlx::query_as(
        "UPDATE jobs SET progress_step = ?, lease_expires_at = ?, updated_at = ? \
         WHERE id = ? AND attempt = ? AND worker_id = ? AND state = 'running' RETURNING batch_id, steps",
    )
    .bind(i64::from(step))
    .bind(lease_end)
    .bind(now)
    .bind(job_id)
    .bind(i64::from(attempt))
    .bind(worker_id)
    .fetch_optional(&mut *conn)
    .await?;
    drop(conn);
    match renewed {
        Some((batch_id, steps)) => {
            // Committed (the statement ran on its own): tell the watchers.
            // Nobody listening is fine.
            let _ = s.progress.send(ProgressNote { batch_id, job_id, attempt, step, total_steps: steps.max(0) as u32 });
            instant(lease_end)
        }
        None => {
            let job = super::jobs::get_job(s, job_id).await?;
            Err(wrong_state_of(&job, &format!("attempt {attempt} of worker {worker_id} no longer holds it")))
        }
    }
}

/// How long the n-th failed attempt holds its job back: `base · 2^(n−1)`, at
/// most `max`, times a random factor in [0.5, 1].
fn retry_hold_micros(backoff: RetryBackoff, failed_attempt: u32) -> i64 {
    let doubling = 2f64.powi(failed_attempt.saturating_sub(1).min(62) as i32);
    let hold = (backoff.base.as_secs_f64() * doubling).min(backoff.max.as_secs_f64()) * (0.5 + rand::random::<f64>() * 0.5);
    (hold * 1e6) as i64
}

/// Takes `jobs` (running, loaded in this transaction) away from their
/// worker: back to the queue with attempt + 1 (held back by `backoff`, the
/// worker remembered as failed), or dead on their last attempt. Returns the
/// retried jobs, then the dead ones, each in id order.
pub(super) async fn take_back(
    conn: &mut SqliteConnection,
    mut jobs: Vec<Live>,
    why: TakenBack<'_>,
    backoff: RetryBackoff,
) -> Result<Vec<JobRow>, StoreError> {
    jobs.sort_by_key(|live| live.job.id);
    let now = now_micros();
    let (mut retried, mut dead) = (Vec::new(), Vec::new());
    for mut live in jobs {
        let from = live.job.state;
        live.job.lease_expires_at = None;
        live.job.error = Some(why.retry.to_owned());
        if live.job.attempt < live.job.spec.max_attempts {
            let failed_attempt = live.job.attempt;
            if !live.transit(Transition::Retry) {
                continue;
            }
            live.remember_failed_holder();
            live.dispatched_at = None;
            live.not_before = Some(now + retry_hold_micros(backoff, failed_attempt));
            retried.push((live, Event::new(from, why.actor, why.retry)));
        } else if live.transit(Transition::Die) {
            dead.push((live, Event::new(from, why.actor, why.last)));
        }
    }
    let mut moves = Moves::new(now);
    for (live, event) in retried.into_iter().chain(dead) {
        moves.push(live, event);
    }
    moves.write(conn).await
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn fail_job(
    s: &SqliteStore,
    job_id: Uuid,
    attempt: u32,
    worker_id: Uuid,
    error: &str,
    cause: FailureCause,
    gpu_seconds: f64,
) -> Result<JobState, StoreError> {
    let actor = format!("worker:{worker_id}");
    let mut tx = s.writer.begin().await?;
    let Some(mut live) = held(&mut tx, job_id, attempt, worker_id).await? else {
        drop(tx);
        let job = super::jobs::get_job(s, job_id).await?;
        return Err(wrong_state_of(&job, &format!("attempt {attempt} of worker {worker_id} no longer holds it")));
    };
    let now = now_micros();
    let fleet = active_workers(&mut tx).await?;
    let moved = if cause == FailureCause::WorkerCannot && another_can_take(&live, &fleet, true) {
        // The attempt is spent (it fences this worker's reports) but not
        // counted: max_attempts grows with it. Remembered as failed (so
        // another worker takes it), but not held back by the retry backoff:
        // nothing went wrong with the job itself.
        live.transit(Transition::Retry);
        live.job.lease_expires_at = None;
        live.job.spec.max_attempts += 1;
        live.job.error = Some(error.to_owned());
        live.remember_failed_holder();
        live.dispatched_at = None;
        live.not_before = Some(now + DECLINE_HOLD_MICROS);
        let mut moves = Moves::new(now);
        moves.push(live, Event::new(JobState::Running, actor.as_str(), error));
        moves.write(&mut tx).await?.pop().ok_or_else(|| StoreError::Corrupt("a held job did not move".into()))?
    } else if cause != FailureCause::BadInput {
        let why = TakenBack { actor: &actor, retry: error, last: error };
        take_back(&mut tx, vec![live], why, s.backoff).await?.pop().ok_or_else(|| StoreError::Corrupt("a held job did not move".into()))?
    } else {
        live.transit(Transition::Fail);
        live.job.lease_expires_at = None;
        live.job.error = Some(error.to_owned());
        let mut moves = Moves::new(now);
        moves.push(live, Event::new(JobState::Running, actor.as_str(), error));
        moves.write(&mut tx).await?.pop().ok_or_else(|| StoreError::Corrupt("a held job did not move".into()))?
    };
    if gpu_seconds > 0.0 {
        // The attempt's time, on the event that just ended it, the job's
        // total and the worker's.
        sqlx::query("UPDATE jobs SET gpu_seconds = gpu_seconds + ?1 WHERE id = ?2")
            .bind(gpu_seconds)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE job_events SET gpu_seconds = ?1 WHERE id = (SELECT max(id) FROM job_events WHERE job_id = ?2)")
            .bind(gpu_seconds)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        credit_worker(&mut tx, worker_id, 0, gpu_seconds).await?;
    }
    tx.commit().await?;
    Ok(moved.state)
}

pub(super) async fn reap_expired_leases(s: &SqliteStore) -> Result<Vec<JobRow>, StoreError> {
    let mut tx = s.writer.begin().await?;
    let expired = select_live(
        &mut tx,
        |qb| {
            qb.push("state = 'running' AND lease_expires_at < ").push_bind(now_micros());
        },
        "ORDER BY id",
    )
    .await?;
    let why = TakenBack { actor: "reaper", retry: "lease expired", last: "lease expired on the last attempt" };
    let moved = take_back(&mut tx, expired, why, s.backoff).await?;
    tx.commit().await?;
    Ok(moved)
}

pub(super) async fn forgive_outage(s: &SqliteStore, lease: Duration) -> Result<u64, StoreError> {
    let mut tx = s.writer.begin().await?;
    let now = now_micros();
    let renewed = sqlx::query("UPDATE jobs SET lease_expires_at = max(COALESCE(lease_expires_at, 0), ?) WHERE state = 'running'")
        .bind(now + duration_micros(lease))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("UPDATE workers SET last_heartbeat_at = max(last_heartbeat_at, ?) WHERE state IN ('active', 'draining', 'cordoned')")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(renewed)
}
