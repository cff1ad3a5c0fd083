//! The worker fleet on SQLite: registration, heartbeats, operator states,
//! lost workers.

use std::collections::HashMap;
use std::time::Duration;

use flowfarm_core::WorkerState;
use sqlx::SqliteConnection;
use uuid::Uuid;

use super::attempts::take_back;
use super::rows::{duration_micros, instant, now_micros, to_json, worker_from_row};
use super::{select_live, SqliteStore};
use crate::jobs::TakenBack;
use crate::workers::heartbeat_state;
use crate::{HeartbeatOutcome, NewWorker, StoreError, WorkerRow};

const WORKER_COLUMNS: &str = "id, name, hostname, state, devices, models, model_hashes, placements, text_encoder_sets, capacity, version, \
    images_done, gpu_seconds, registered_at, last_heartbeat_at";

pub(super) async fn register_worker(s: &SqliteStore, worker: &NewWorker) -> Result<WorkerRow, StoreError> {
    let id = Uuid::now_v7();
    let sets: Vec<&str> = worker.text_encoder_sets.iter().map(|s| s.as_str()).collect();
    let now = now_micros();
    let mut conn = s.writer.acquire().await?;
    sqlx::query(
        "INSERT INTO workers (id, name, hostname, state, devices, models, text_encoder_sets, capacity, version, token_id, model_hashes, \
             placements, registered_at, last_heartbeat_at) VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(&worker.name)
    .bind(&worker.hostname)
    .bind(to_json(&worker.devices)?)
    .bind(to_json(&worker.models)?)
    .bind(to_json(&sets)?)
    .bind(i64::from(worker.capacity))
    .bind(&worker.version)
    .bind(worker.token_id)
    .bind(to_json(&worker.model_hashes)?)
    .bind(to_json(&worker.placements)?)
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    drop(conn);
    get_worker(s, id).await
}

pub(super) async fn worker_token(s: &SqliteStore, id: Uuid) -> Result<Option<Uuid>, StoreError> {
    sqlx::query_scalar::<_, Option<Uuid>>("SELECT token_id FROM workers WHERE id = ?")
        .bind(id)
        .fetch_optional(&s.readers)
        .await?
        .ok_or(StoreError::NotFound { what: "worker", id })
}

/// Workers `condition` selects, in id order, with the jobs each is running.
async fn workers_where(conn: &mut SqliteConnection, condition: &str, id: Option<Uuid>) -> Result<Vec<WorkerRow>, StoreError> {
    let rows =
        sqlx::query(&format!("SELECT {WORKER_COLUMNS} FROM workers WHERE {condition} ORDER BY id")).bind(id).fetch_all(&mut *conn).await?;
    let mut workers: Vec<WorkerRow> = rows.iter().map(worker_from_row).collect::<Result<_, _>>()?;
    let running: Vec<(Uuid, Uuid)> =
        sqlx::query_as("SELECT worker_id, id FROM jobs WHERE state = 'running' AND worker_id IS NOT NULL ORDER BY id")
            .fetch_all(&mut *conn)
            .await?;
    let mut by_worker: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (worker, job) in running {
        by_worker.entry(worker).or_default().push(job);
    }
    for worker in &mut workers {
        worker.current_job_ids = by_worker.remove(&worker.id).unwrap_or_default();
    }
    Ok(workers)
}

pub(super) async fn get_worker(s: &SqliteStore, id: Uuid) -> Result<WorkerRow, StoreError> {
    let mut tx = s.readers.begin().await?;
    let worker = workers_where(&mut tx, "id = ?", Some(id)).await?.pop();
    tx.commit().await?;
    worker.ok_or(StoreError::NotFound { what: "worker", id })
}

pub(super) async fn list_workers(s: &SqliteStore, include_gone: bool) -> Result<Vec<WorkerRow>, StoreError> {
    let mut tx = s.readers.begin().await?;
    let condition = if include_gone { "? IS NULL" } else { "? IS NULL AND state <> 'gone'" };
    let workers = workers_where(&mut tx, condition, None).await?;
    tx.commit().await?;
    Ok(workers)
}

pub(super) async fn heartbeat(
    s: &SqliteStore,
    worker_id: Uuid,
    running: &[(Uuid, u32)],
    lease: Duration,
    grace: Duration,
) -> Result<HeartbeatOutcome, StoreError> {
    let mut tx = s.writer.begin().await?;
    // The clock is read once the writer is ours: a wait behind another
    // write must not shorten the leases this renews.
    let now = now_micros();
    let lease_end = now + duration_micros(lease);
    // Only the listed attempts are renewed: a job the worker dropped must
    // not be kept alive by the worker's other work.
    for (job, attempt) in running {
        sqlx::query("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND attempt = ? AND worker_id = ? AND state = 'running'")
            .bind(lease_end)
            .bind(job)
            .bind(i64::from(*attempt))
            .bind(worker_id)
            .execute(&mut *tx)
            .await?;
    }
    let listed: Vec<Uuid> = running.iter().map(|(id, _)| *id).collect();
    let unlisted: Vec<_> = select_live(
        &mut tx,
        |qb| {
            qb.push("state = 'running' AND worker_id = ").push_bind(worker_id);
            qb.push(" AND started_at < ").push_bind(now - duration_micros(grace));
        },
        "ORDER BY id",
    )
    .await?
    .into_iter()
    .filter(|live| !listed.contains(&live.job.id))
    .collect();
    let actor = format!("worker:{worker_id}");
    let reason = "the worker no longer lists it in its heartbeats";
    let taken_back = take_back(&mut tx, unlisted, TakenBack { actor: &actor, retry: reason, last: reason }, s.backoff).await?;
    let state: Option<String> = sqlx::query_scalar(
        "UPDATE workers SET last_heartbeat_at = ?, state = CASE WHEN state = 'lost' THEN 'active' ELSE state END \
         WHERE id = ? RETURNING state",
    )
    .bind(now)
    .bind(worker_id)
    .fetch_optional(&mut *tx)
    .await?;
    // An unknown or gone worker returns early, rolling the renewal back.
    let state = heartbeat_state(worker_id, state.as_deref())?;
    let mut revoked = Vec::new();
    for (job, attempt) in running {
        let holds: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = ? AND attempt = ? AND worker_id = ? AND state = 'running')")
                .bind(job)
                .bind(i64::from(*attempt))
                .bind(worker_id)
                .fetch_one(&mut *tx)
                .await?;
        if !holds {
            revoked.push(*job);
        }
    }
    revoked.sort();
    tx.commit().await?;
    Ok(HeartbeatOutcome { state, revoked, lease_expires_at: instant(lease_end)?, taken_back })
}

pub(super) async fn set_worker_devices(s: &SqliteStore, worker_id: Uuid, devices: &serde_json::Value) -> Result<(), StoreError> {
    let mut conn = s.writer.acquire().await?;
    let updated = sqlx::query("UPDATE workers SET devices = ? WHERE id = ?")
        .bind(to_json(devices)?)
        .bind(worker_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if updated == 0 {
        return Err(StoreError::NotFound { what: "worker", id: worker_id });
    }
    Ok(())
}

pub(super) async fn set_worker_state(s: &SqliteStore, worker_id: Uuid, state: WorkerState) -> Result<WorkerRow, StoreError> {
    // The states each target may be reached from, checked by the UPDATE
    // itself: a drain racing a deregistration cannot bring a gone worker back.
    let from = match state {
        WorkerState::Gone => "'active', 'draining', 'cordoned', 'lost'",
        // A draining worker is on its way out; cordon or uncordon cannot stop that.
        WorkerState::Active | WorkerState::Cordoned => "'active', 'cordoned'",
        WorkerState::Draining => "'active', 'cordoned', 'draining'",
        WorkerState::Lost => "'active', 'draining', 'cordoned'",
    };
    let mut conn = s.writer.acquire().await?;
    let moved = sqlx::query(&format!("UPDATE workers SET state = ? WHERE id = ? AND state IN ({from})"))
        .bind(state.as_str())
        .bind(worker_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    drop(conn);
    let current = get_worker(s, worker_id).await?;
    if moved == 0 {
        return Err(StoreError::WorkerUnavailable {
            worker_id,
            state: current.state.as_str().into(),
            why: format!("cannot become {}", state.as_str()),
        });
    }
    Ok(current)
}

pub(super) async fn mark_lost_workers(s: &SqliteStore, timeout: Duration) -> Result<Vec<Uuid>, StoreError> {
    let mut conn = s.writer.acquire().await?;
    Ok(sqlx::query_scalar(
        "UPDATE workers SET state = 'lost' WHERE state IN ('active', 'draining', 'cordoned') AND last_heartbeat_at < ? RETURNING id",
    )
    .bind(now_micros() - duration_micros(timeout))
    .fetch_all(&mut *conn)
    .await?)
}
